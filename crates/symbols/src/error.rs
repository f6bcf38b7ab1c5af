//! Errors, and the "did you mean" suggestions they carry.

use std::fmt;
use std::path::PathBuf;

/// Why a symbol table could not be built or a name could not be resolved.
///
/// Every message names the cause and says what to do next, since these end up in front of
/// the user verbatim (`dynprobe probe 'p:wrok'`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SymbolError {
    /// No loaded module defines a function with this name.
    UnknownSymbol {
        /// The name as given (without its module qualifier).
        name: String,
        /// Close names that do exist, best first (at most three).
        suggestions: Vec<String>,
    },
    /// The module part of a `module:name` spec matches no loaded module.
    UnknownModule {
        /// The module as given.
        name: String,
        /// File names of every loaded module.
        loaded: Vec<String>,
    },
    /// The name (or module name) denotes several different functions (or modules).
    Ambiguous {
        /// The name as given.
        name: String,
        /// One readable line per candidate, e.g. `ns::f(int) at 0x401126 [demo]`.
        candidates: Vec<String>,
    },
    /// A file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        reason: String,
    },
    /// A file was read but is not an ELF file we understand.
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// There is no process with this pid (or it exited while we looked).
    NoSuchProcess {
        /// The pid.
        pid: i32,
    },
}

impl fmt::Display for SymbolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SymbolError::UnknownSymbol { name, suggestions } => {
                write!(f, "unknown symbol `{name}`")?;
                match suggestions.as_slice() {
                    [] => write!(
                        f,
                        ": no loaded module defines a function of that name; check the \
                         spelling, or qualify it with its library as `module:name`"
                    ),
                    [one] => write!(f, "; did you mean `{one}`?"),
                    many => write!(f, "; did you mean one of {}?", backticked(many)),
                }
            }
            SymbolError::UnknownModule { name, loaded } => write!(
                f,
                "unknown module `{name}`: no loaded file is named like that; the process has \
                 loaded {}",
                backticked(loaded)
            ),
            SymbolError::Ambiguous { name, candidates } => write!(
                f,
                "`{name}` is ambiguous: it could be {}; qualify it as `module:name` or give \
                 the full (mangled) name",
                candidates.join("; ")
            ),
            SymbolError::Io { path, reason } => {
                write!(f, "cannot read `{}`: {reason}; check that it exists and that you may read it", path.display())
            }
            SymbolError::Parse { path, reason } => {
                write!(f, "cannot use `{}` as an x86-64 ELF file: {reason}", path.display())
            }
            SymbolError::NoSuchProcess { pid } => {
                write!(f, "there is no process with pid {pid} (it may have exited); check the pid with `ps`")
            }
        }
    }
}

impl std::error::Error for SymbolError {}

fn backticked(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("`{s}`")).collect();
    quoted.join(", ")
}

/// The (at most three) names closest to `wanted` by edit distance, best first; only names
/// within about a third of `wanted`'s length qualify, so that a typo gets a useful hint and
/// a wholly wrong name gets none.
pub(crate) fn suggest<'a>(wanted: &str, names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let limit = (wanted.chars().count() / 3).max(1);
    let mut scored: Vec<(usize, &str)> = names
        // Cheap length filter first: most names are far longer or shorter.
        .filter(|n| n.len().abs_diff(wanted.len()) <= limit)
        .filter_map(|n| {
            let d = edit_distance(wanted, n);
            (d <= limit).then_some((d, n))
        })
        .collect();
    scored.sort_unstable();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(3).map(|(_, n)| n.to_string()).collect()
}

/// Optimal-string-alignment distance: Levenshtein plus adjacent transpositions, because
/// swapped letters (`wrok`) are the most common typo and should cost one edit, not two.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Three rolling rows: the transposition looks two rows back.
    let mut prev2 = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                cur[j] = cur[j].min(prev2[j - 2] + 1);
            }
        }
        std::mem::swap(&mut prev2, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_counts_transpositions_once() {
        assert_eq!(edit_distance("work", "work"), 0);
        assert_eq!(edit_distance("wrok", "work"), 1);
        assert_eq!(edit_distance("wor", "work"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn suggestions_are_close_sorted_and_deduplicated() {
        let names = ["work", "worker", "word", "malloc", "work", "fork"];
        assert_eq!(suggest("wrok", names.iter().copied()), ["work"]);
        assert_eq!(suggest("worke", names.iter().copied()), ["work", "worker"]);
        assert!(suggest("zzzzzz", names.iter().copied()).is_empty());
    }

    #[test]
    fn messages_name_the_cause_and_the_fix() {
        let e = SymbolError::UnknownSymbol { name: "wrok".into(), suggestions: vec!["work".into()] };
        assert_eq!(e.to_string(), "unknown symbol `wrok`; did you mean `work`?");
        let e = SymbolError::UnknownSymbol { name: "x".into(), suggestions: vec!["a".into(), "b".into()] };
        assert_eq!(e.to_string(), "unknown symbol `x`; did you mean one of `a`, `b`?");
        let e = SymbolError::UnknownModule { name: "libfo".into(), loaded: vec!["demo".into(), "libc.so.6".into()] };
        assert!(e.to_string().contains("`demo`, `libc.so.6`"), "{e}");
        let e = SymbolError::NoSuchProcess { pid: 99 };
        assert!(e.to_string().contains("pid 99"));
    }
}
