//! Function globs (`-F`/`-N`), with the nearest names when one matches nothing, and
//! durations as the user writes them (`--time-filter 1.5us`).

use dynprobe_events::model::{Function, Trace};

/// A glob on function names: `*` any run of characters, `?` one character; `MODULE:GLOB`
/// restricts it to modules whose file name starts with `MODULE` (`libc:mall*`). A `::`
/// (C++, Rust paths) is part of the name, not a module separator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionGlob {
    /// As the user wrote it.
    pub text: String,
    module: Option<String>,
    name: Vec<char>,
}

impl FunctionGlob {
    /// Parses `[MODULE:]GLOB`.
    pub fn new(text: &str) -> FunctionGlob {
        let (module, name) = match module_separator(text) {
            Some(i) => (Some(text[..i].to_string()), &text[i + 1..]),
            None => (None, text),
        };
        FunctionGlob { text: text.to_string(), module, name: name.chars().collect() }
    }

    /// Whether `function` matches.
    pub fn matches(&self, function: &Function) -> bool {
        self.module.as_ref().is_none_or(|m| function.module.starts_with(m.as_str()))
            && glob_match(&self.name, &function.name.chars().collect::<Vec<_>>())
    }

    /// The pattern without its wildcards, for finding similar names.
    fn literal(&self) -> String {
        self.name.iter().filter(|&&c| c != '*' && c != '?').collect()
    }
}

/// The first `:` that is not part of a `::`.
fn module_separator(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    (0..bytes.len()).find(|&i| bytes[i] == b':' && bytes.get(i + 1) != Some(&b':') && (i == 0 || bytes[i - 1] != b':'))
}

/// Wildcard matching with backtracking to the last `*` (linear in practice).
fn glob_match(pattern: &[char], name: &[char]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == '?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// A filter that uses each of `globs`, each checked to match some function of `trace`:
/// the error names the first that matches none (`-F`/`-N` as `flag`) and the nearest names.
pub fn parse_globs(globs: &[String], flag: &str, trace: &Trace) -> Result<Vec<FunctionGlob>, String> {
    let globs: Vec<FunctionGlob> = globs.iter().map(|g| FunctionGlob::new(g)).collect();
    let functions = || trace.processes.iter().flat_map(|p| &p.functions);
    for glob in &globs {
        if !functions().any(|f| glob.matches(f)) {
            let names: Vec<&str> = functions().map(|f| f.name.as_str()).collect();
            let near = nearest(&glob.literal(), &names);
            let hint = if near.is_empty() { String::new() } else { format!(" (nearest: {})", near.join(", ")) };
            return Err(format!("no function in the trace matches {flag} '{}'{hint}", glob.text));
        }
    }
    Ok(globs)
}

/// Up to three names close to `word`: the ones containing it (or contained in it), then
/// those within an edit distance of a third of its length, closest first.
pub fn nearest<'a>(word: &str, names: &[&'a str]) -> Vec<&'a str> {
    let mut names: Vec<&str> = names.to_vec();
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
    scored.into_iter().take(3).map(|(_, name)| name).collect()
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

/// Parses a duration: a number with an optional unit `ns` (the default), `us`, `ms`, `s`.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit.trim() {
        "" | "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        other => return Err(format!("unknown unit `{other}` in duration `{text}`: use ns, us, ms or s")),
    };
    let value: f64 =
        number.parse().map_err(|_| format!("bad duration `{text}`: expected a number and a unit, as in 1.5us"))?;
    Ok((value * scale).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(module: &str, name: &str) -> Function {
        Function { name: name.to_string(), module: module.to_string(), addr: 0 }
    }

    #[test]
    fn globs() {
        let parse = function("demo", "parse_record");
        assert!(FunctionGlob::new("parse_*").matches(&parse));
        assert!(FunctionGlob::new("*_rec?rd").matches(&parse));
        assert!(FunctionGlob::new("*").matches(&parse));
        assert!(!FunctionGlob::new("parse").matches(&parse));
        assert!(FunctionGlob::new("de:parse_record").matches(&parse));
        assert!(FunctionGlob::new("dem:parse_record").matches(&parse));
        assert!(!FunctionGlob::new("libc:parse_record").matches(&parse));
        let method = function("app", "ns::Type::run");
        assert!(FunctionGlob::new("ns::*::run").matches(&method));
        assert!(FunctionGlob::new("app:ns::Type::*").matches(&method));
        assert!(glob_match(&['a', '*', 'b', '*', 'c'], &"axxbyybc".chars().collect::<Vec<_>>()));
        assert!(!glob_match(&['a', '*', 'b'], &"axxbc".chars().collect::<Vec<_>>()));
    }

    #[test]
    fn nearest_names() {
        let names = ["parse_record", "checksum", "main", "print_records"];
        assert_eq!(nearest("parse_recrd", &names), vec!["parse_record"]);
        assert_eq!(nearest("record", &names), vec!["parse_record", "print_records"]);
        assert_eq!(nearest("zzzzzz", &names), Vec::<&str>::new());
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn a_glob_matching_nothing_names_the_nearest() {
        let trace = Trace {
            processes: vec![dynprobe_events::model::ProcessTrace {
                functions: vec![function("demo", "parse_record"), function("demo", "checksum")],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(parse_globs(&["check*".into()], "-F", &trace).unwrap().len(), 1);
        assert_eq!(
            parse_globs(&["parse_recrd".into()], "-N", &trace).unwrap_err(),
            "no function in the trace matches -N 'parse_recrd' (nearest: parse_record)"
        );
        assert_eq!(
            parse_globs(&["libc:checksum".into()], "-F", &trace).unwrap_err(),
            "no function in the trace matches -F 'libc:checksum' (nearest: checksum)"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1us"), Ok(1000));
        assert_eq!(parse_duration("1.5ms"), Ok(1_500_000));
        assert_eq!(parse_duration("250"), Ok(250));
        assert_eq!(parse_duration("2 s"), Ok(2_000_000_000));
        assert!(parse_duration("3 weeks").unwrap_err().contains("unknown unit `weeks`"));
        assert!(parse_duration("us").is_err());
    }
}
