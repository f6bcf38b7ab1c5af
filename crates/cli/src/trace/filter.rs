//! Function globs (`-F`/`-N`), with the nearest names when one matches nothing, and
//! durations as the user writes them (`--time-filter 1.5us`).

use dynprobe_events::model::{Function, Trace};
use dynprobe_ftrace::filter::{glob_match, nearest, Pattern};

/// A glob on function names: `*` any run of characters, `?` one character; `MODULE:GLOB`
/// restricts it to modules whose file name starts with `MODULE` (`libc:mall*`). A `::`
/// (C++, Rust paths) is part of the name, not a module separator. The grammar of
/// `dynprobe record`'s patterns, except that without a module it looks in every module
/// of the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionGlob {
    /// As the user wrote it.
    pub text: String,
    pattern: Pattern,
}

impl FunctionGlob {
    /// Parses `[MODULE:]GLOB`.
    pub fn new(text: &str) -> FunctionGlob {
        FunctionGlob { text: text.to_string(), pattern: Pattern::parse(text) }
    }

    /// Whether `function` matches.
    pub fn matches(&self, function: &Function) -> bool {
        self.pattern.module.as_deref().is_none_or(|m| m == "*" || function.module.starts_with(m))
            && glob_match(self.pattern.glob.as_bytes(), function.name.as_bytes())
    }
}

/// A filter that uses each of `globs`, each checked to match some function of `trace`:
/// the error names the first that matches none (`-F`/`-N` as `flag`) and the nearest names.
pub fn parse_globs(globs: &[String], flag: &str, trace: &Trace) -> Result<Vec<FunctionGlob>, String> {
    let globs: Vec<FunctionGlob> = globs.iter().map(|g| FunctionGlob::new(g)).collect();
    let functions = || trace.processes.iter().flat_map(|p| &p.functions);
    for glob in &globs {
        if !functions().any(|f| glob.matches(f)) {
            let near = nearest(&glob.pattern.glob, functions().map(|f| f.name.as_str()), 3);
            let hint = if near.is_empty() { String::new() } else { format!(" (nearest: {})", near.join(", ")) };
            return Err(format!("no function in the trace matches {flag} '{}'{hint}", glob.text));
        }
    }
    Ok(globs)
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
        assert!(FunctionGlob::new("*:ns::Type::*").matches(&method));
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
