//! Which functions to trace: `-F` / `-N` patterns (the kernel's `set_ftrace_filter` and
//! `set_ftrace_notrace`).
//!
//! A pattern is a glob (`*`, `?`, `[a-f]`, `[!x]`) on the function's readable name, optionally restricted to
//! modules: `parse_*` looks in the main executable, `libc:malloc` in modules whose file
//! name starts with `libc`, `/opt/x/libplug.so:run` in the module of that file name (a
//! library the program `dlopen`s by its path, which no list of libraries names before it is
//! loaded), `*:malloc` in every module.

/// One `-F` or `-N` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// As given, for messages.
    pub text: String,
    /// The module file-name prefix, or a path (it has a `/`) whose file name is the
    /// module's; `None` for the main executable, `Some("*")` for all.
    pub module: Option<String>,
    /// The glob on the function name.
    pub glob: String,
}

impl Pattern {
    /// Parses `[MODULE:]GLOB`. A `::` (a C++ or Rust path) is part of the name, not a module
    /// separator.
    ///
    /// ```
    /// use dynprobe_ftrace::filter::Pattern;
    /// let p = Pattern::parse("libc:mall*");
    /// assert_eq!((p.module.as_deref(), p.glob.as_str()), (Some("libc"), "mall*"));
    /// assert_eq!(Pattern::parse("ns::work").module, None);
    /// ```
    pub fn parse(text: &str) -> Pattern {
        let split = text
            .char_indices()
            .find(|&(i, c)| c == ':' && !text[i + 1..].starts_with(':') && (i == 0 || &text[i - 1..i] != ":"));
        match split {
            Some((i, _)) if i > 0 => {
                Pattern { text: text.to_string(), module: Some(text[..i].to_string()), glob: text[i + 1..].to_string() }
            }
            _ => Pattern { text: text.to_string(), module: None, glob: text.to_string() },
        }
    }

    /// Whether the pattern's module part covers a module named `module`.
    pub fn covers_module(&self, module: &str, is_main: bool) -> bool {
        match self.module.as_deref() {
            None => is_main,
            Some("*") => true,
            Some(path) if path.contains('/') => path_names_module(path, module),
            Some(prefix) => module.starts_with(prefix),
        }
    }

    /// Whether function `name` of module `module` matches.
    pub fn matches(&self, module: &str, is_main: bool, name: &str) -> bool {
        self.covers_module(module, is_main) && glob_match(self.glob.as_bytes(), name.as_bytes())
    }
}

/// Whether `path` (a pattern's module part with a `/`, or the library section of `record
/// -a`'s `args` file) names a module whose file name is `module`: the module of that file
/// name wherever it was loaded from (a copy, a symlinked directory), as the README says.
pub fn path_names_module(path: &str, module: &str) -> bool {
    path.rsplit('/').next() == Some(module)
}

/// The `-F` and `-N` patterns together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// `-F`: trace only what matches one of these (everything of the main executable when
    /// empty).
    pub include: Vec<Pattern>,
    /// `-N`: never trace what matches one of these.
    pub exclude: Vec<Pattern>,
}

impl Filter {
    /// Reads the agent's form: one pattern a line, `F <pattern>` or `N <pattern>`.
    pub fn from_lines(text: &str) -> Result<Filter, String> {
        let mut filter = Filter::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            match line.split_once(' ') {
                Some(("F", p)) => filter.include.push(Pattern::parse(p.trim())),
                Some(("N", p)) => filter.exclude.push(Pattern::parse(p.trim())),
                _ => return Err(format!("bad filter line `{line}` (expected `F <pattern>` or `N <pattern>`)")),
            }
        }
        Ok(filter)
    }

    /// Whether any pattern could select functions of this module.
    pub fn covers_module(&self, module: &str, is_main: bool) -> bool {
        if self.include.is_empty() {
            is_main
        } else {
            self.include.iter().any(|p| p.covers_module(module, is_main))
        }
    }

    /// Whether function `name` of `module` is traced.
    pub fn selects(&self, module: &str, is_main: bool, name: &str) -> bool {
        let included = if self.include.is_empty() {
            is_main
        } else {
            self.include.iter().any(|p| p.matches(module, is_main, name))
        };
        included && !self.exclude.iter().any(|p| p.matches(module, is_main, name))
    }
}

/// Glob matching as the shell does (`glob(7)`): `*` (any run), `?` (any one byte) and
/// character classes `[a-f_]`, negated by a leading `!` or `^` (`[!x]`), where a `]` right
/// after the opening (or the negation) is a member and a `[` without a closing `]` is
/// itself. Iterative with backtracking to the last `*`.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
                continue;
            }
            Some(b'?') => Some(1),
            Some(b'[') => match class_match(&pattern[p..], text[t]) {
                Some((len, true)) => Some(len),
                Some((_, false)) => None,
                // No closing `]`: a plain `[`.
                None => (text[t] == b'[').then_some(1),
            },
            Some(&c) => (c == text[t]).then_some(1),
            None => None,
        };
        match (step, star) {
            (Some(len), _) => {
                p += len;
                t += 1;
            }
            (None, Some((sp, st))) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            (None, None) => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The class at the start of `pattern` (which begins with `[`): its length in the pattern
/// and whether `byte` is in it; `None` when no `]` closes it.
fn class_match(pattern: &[u8], byte: u8) -> Option<(usize, bool)> {
    let mut i = 1;
    let negated = matches!(pattern.get(i), Some(b'!' | b'^'));
    if negated {
        i += 1;
    }
    let mut found = false;
    let mut first = true;
    loop {
        let c = *pattern.get(i)?;
        if c == b']' && !first {
            return Some((i + 1, found != negated));
        }
        first = false;
        match (pattern.get(i + 1), pattern.get(i + 2)) {
            (Some(b'-'), Some(&hi)) if hi != b']' => {
                found |= (c..=hi).contains(&byte);
                i += 3;
            }
            _ => {
                found |= c == byte;
                i += 1;
            }
        }
    }
}

/// Up to `max` names of `names` close to `word` (a pattern's wildcards are ignored): the
/// ones containing it (or contained in it), then those within an edit distance of a third
/// of its length, closest first.
///
/// ```
/// let names = ["parse_record", "checksum", "print_records"];
/// let near = dynprobe_ftrace::filter::nearest("parse_recrd", names.iter().copied(), 3);
/// assert_eq!(near, ["parse_record"]);
/// ```
pub fn nearest<'a>(word: &str, names: impl Iterator<Item = &'a str>, max: usize) -> Vec<String> {
    let word: String = word.chars().filter(|&c| c != '*' && c != '?').collect();
    let mut names: Vec<&str> = names.collect();
    names.sort_unstable();
    names.dedup();
    let word_lower = word.to_lowercase();
    let mut scored: Vec<(usize, &str)> = names
        .iter()
        .filter_map(|&name| {
            let lower = name.to_lowercase();
            if !word.is_empty() && (lower.contains(&word_lower) || word_lower.contains(&lower)) {
                return Some((0, name));
            }
            let distance = edit_distance(&word_lower, &lower);
            (distance <= word.chars().count().div_ceil(3).max(1)).then_some((distance, name))
        })
        .collect();
    scored.sort();
    scored.into_iter().take(max).map(|(_, name)| name.to_string()).collect()
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != cb)).min(row[j] + 1).min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_the_shell() {
        assert!(glob_match(b"parse_*", b"parse_record"));
        assert!(glob_match(b"*rec?rd", b"parse_record"));
        assert!(glob_match(b"*", b""));
        assert!(!glob_match(b"parse_*x", b"parse_record"));
        assert!(glob_match(b"a*b*c", b"aXXbYYbZc"));
        assert!(!glob_match(b"a?c", b"ac"));
    }

    #[test]
    fn globs_have_character_classes() {
        assert!(glob_match(b"parse_[a-f]*", b"parse_body"));
        assert!(!glob_match(b"parse_[a-f]*", b"parse_record"));
        assert!(glob_match(b"parse_[!a-f]*", b"parse_record"));
        assert!(glob_match(b"parse_[^a-f]*", b"parse_record"));
        assert!(!glob_match(b"parse_[!a-f]*", b"parse_body"));
        assert!(glob_match(b"f[xyz_]", b"f_") && !glob_match(b"f[xyz_]", b"fa"));
        assert!(glob_match(b"[]]x", b"]x") && glob_match(b"[!]]x", b"ax") && !glob_match(b"[!]]x", b"]x"));
        assert!(glob_match(b"a[-z]", b"a-") && glob_match(b"a[z-]", b"a-"));
        // An unclosed `[` is itself.
        assert!(glob_match(b"a[b", b"a[b") && !glob_match(b"a[b", b"ab"));
        assert!(glob_match(b"*[0-9]", b"f12") && !glob_match(b"*[0-9]", b"f1x"));
    }

    #[test]
    fn patterns_split_module_but_not_paths() {
        let p = Pattern::parse("*:malloc");
        assert!(p.matches("libc.so.6", false, "malloc") && p.matches("demo", true, "malloc"));
        let p = Pattern::parse("work");
        assert!(p.matches("demo", true, "work") && !p.matches("libc.so.6", false, "work"));
        assert_eq!(Pattern::parse("a::b::c").glob, "a::b::c");
        assert_eq!(Pattern::parse("libfoo:ns::f").module.as_deref(), Some("libfoo"));
        let p = Pattern::parse("/opt/x/libplug.so:run");
        assert!(p.matches("libplug.so", false, "run") && !p.matches("libplug.so.1", false, "run"));
    }

    #[test]
    fn include_then_exclude() {
        let f = Filter::from_lines("F parse_*\nN parse_header\n").unwrap();
        assert!(f.selects("demo", true, "parse_record"));
        assert!(!f.selects("demo", true, "parse_header"));
        assert!(!f.selects("demo", true, "main"));
        let all = Filter::from_lines("N main").unwrap();
        assert!(all.selects("demo", true, "work") && !all.selects("demo", true, "main"));
        assert!(!all.selects("libc.so.6", false, "malloc"));
        assert!(Filter::from_lines("X y").is_err());
    }

    #[test]
    fn nearest_names_for_a_typo() {
        let names = ["parse_record", "checksum", "main", "print_records"];
        let near = |w| nearest(w, names.iter().copied(), 3);
        assert_eq!(near("parse_recrd"), ["parse_record"]);
        assert_eq!(near("record"), ["parse_record", "print_records"]);
        assert!(near("zzzzzz").is_empty());
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
