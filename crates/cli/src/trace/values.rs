//! The values calls carry in a trace recorded with `record -a`, shown by type: the trace
//! directory's `args` file (written by `crate::record`) describes each function's
//! arguments and return value, the process's `values.txt` says which function ids have a
//! description, and the records carry the raw values ([`ThreadTrace::call_values`]).
//!
//! A trace recorded without `-a` has none of these, and every call shows as before.

use super::calls::{Call, End};
use dynprobe_events::model::{MarkerValue, ProcessTrace, ThreadTrace};
use std::collections::HashMap;
use std::path::Path;

/// How one value is shown, and what it is called.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Described {
    name: String,
    /// `s32`, `u8`, `x64`, `bool`, `char`, `str`, `f32`, `f64`, `enum:0=RED,1=GREEN`, `?`.
    shown: String,
    /// Not readable at the entry (a struct in registers, after an argument whose passing
    /// is not sure): `(unknown)`, whatever was recorded.
    unknown: bool,
}

/// One function's description.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Function {
    args: Vec<Described>,
    retval: Option<Described>,
}

/// The descriptions of a trace's `args` file, by key.
#[derive(Debug, Clone, Default)]
pub struct Descriptions {
    functions: HashMap<u64, Function>,
}

impl Descriptions {
    /// The descriptions in trace directory `dir` (none when it was recorded without `-a`);
    /// `Err` names the file and line that cannot be read.
    pub fn load(dir: &Path) -> Result<Descriptions, String> {
        let path = dir.join("args");
        match std::fs::read_to_string(&path) {
            Ok(text) => Descriptions::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Descriptions::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    fn parse(text: &str) -> Result<Descriptions, String> {
        let mut functions = HashMap::new();
        let mut current: Option<u64> = None;
        for (n, line) in text.lines().enumerate() {
            let fields: Vec<&str> = line.split('\t').collect();
            let described = |name: &str, shown: &str, source: &str| Described {
                name: name.to_string(),
                shown: shown.to_string(),
                unknown: source == "-",
            };
            match fields.as_slice() {
                ["f", key, _name] => {
                    let key = u64::from_str_radix(key, 16).map_err(|_| format!("line {}: bad key `{key}`", n + 1))?;
                    functions.insert(key, Function::default());
                    current = Some(key);
                }
                ["a", name, shown, source] => {
                    function(&mut functions, current, n)?.args.push(described(name, shown, source))
                }
                ["r", shown, source] => {
                    function(&mut functions, current, n)?.retval = Some(described("retval", shown, source))
                }
                ["p", _] | ["l", _] | [""] => {}
                [first, ..] if first.starts_with('#') => {}
                _ => return Err(format!("line {}: cannot read `{line}`", n + 1)),
            }
        }
        Ok(Descriptions { functions })
    }

    fn of(&self, process: &ProcessTrace, func: u32) -> Option<&Function> {
        self.functions.get(process.described.get(&func)?)
    }

    /// The arguments of `call` as `(name, value)` pairs, when they were recorded.
    pub fn args(&self, process: &ProcessTrace, thread: &ThreadTrace, call: &Call) -> Option<Vec<(String, String)>> {
        let f = self.of(process, call.func)?;
        let values = thread.call_values.get(&(call.begin?, call.func, false))?;
        Some(
            f.args
                .iter()
                .enumerate()
                .map(|(i, d)| (d.name.clone(), values.get(i).map_or("(unknown)".to_string(), |v| show(d, v))))
                .collect(),
        )
    }

    /// The return value of `call`, when it returned and it was recorded.
    pub fn retval(&self, process: &ProcessTrace, thread: &ThreadTrace, call: &Call) -> Option<String> {
        let d = self.of(process, call.func)?.retval.as_ref()?;
        let End::Returned(ns) = call.end else { return None };
        let values = thread.call_values.get(&(ns, call.func, true))?;
        Some(values.first().map_or("(unknown)".to_string(), |v| show(d, v)))
    }

    /// How a call of `name` is shown: `parse_record(line="alpha,12", len=8)` with recorded
    /// arguments (a C++ name's parameter list replaced by them), else `name()` (a C++ name
    /// that carries its parameter list as it is: `catcher(int)`).
    pub fn signature(&self, process: &ProcessTrace, thread: &ThreadTrace, call: &Call, name: &str) -> String {
        match self.args(process, thread, call) {
            Some(args) => {
                let args: Vec<String> = args.iter().map(|(n, v)| format!("{n}={v}")).collect();
                format!("{}({})", without_parameters(name), args.join(", "))
            }
            None if name.ends_with(')') => name.to_string(),
            None => format!("{name}()"),
        }
    }
}

/// `name` without the parameter list a demangled C++ name ends with (`Parser::parse(char
/// const*)` → `Parser::parse`).
fn without_parameters(name: &str) -> &str {
    if !name.ends_with(')') {
        return name;
    }
    let mut depth = 0;
    for (i, c) in name.char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' => {
                depth -= 1;
                if depth == 0 {
                    return &name[..i];
                }
            }
            _ => {}
        }
    }
    name
}

/// The function being described at line `n` (0-based) of an `args` file.
fn function(functions: &mut HashMap<u64, Function>, current: Option<u64>, n: usize) -> Result<&mut Function, String> {
    current.and_then(|key| functions.get_mut(&key)).ok_or(format!("line {}: no function", n + 1))
}

/// `value` shown as `d` says.
fn show(d: &Described, value: &MarkerValue) -> String {
    if d.unknown {
        return "(unknown)".into();
    }
    let raw = match value {
        MarkerValue::Unsigned(raw) => *raw,
        MarkerValue::Str { bytes, cut } => {
            let mut text = format!("\"{}\"", bytes.escape_ascii());
            if *cut {
                text.push_str("...");
            }
            return text;
        }
        // A vector register is never a fault: not readable at a plain entry site.
        MarkerValue::Unavailable if d.shown.starts_with('f') => return "(unknown)".into(),
        MarkerValue::Unavailable => return "(fault)".into(),
        other => return other.to_string(),
    };
    let bits =
        |kind: &str| d.shown.strip_prefix(kind).and_then(|b| b.parse::<u32>().ok()).filter(|b| (1..=64).contains(b));
    let low = |bits: u32| if bits == 64 { raw } else { raw & ((1u64 << bits) - 1) };
    let signed = |bits: u32| ((low(bits) << (64 - bits)) as i64) >> (64 - bits);
    match d.shown.as_str() {
        "bool" => (raw & 0xff != 0).to_string(),
        "char" => match raw as u8 {
            c @ b' '..=b'~' if c != b'\'' && c != b'\\' => format!("'{}'", c as char),
            c => format!("'\\x{c:02x}'"),
        },
        "f32" => format!("{}", f32::from_bits(raw as u32)),
        "f64" => format!("{}", f64::from_bits(raw)),
        "str" => "(fault)".into(),
        shown if shown.starts_with("enum:") => {
            let n = signed(32);
            let name = shown["enum:".len()..].split(',').find_map(|e| {
                let (v, name) = e.split_once('=')?;
                (v.parse::<i64>().ok()? == n).then_some(name)
            });
            name.map_or(n.to_string(), str::to_string)
        }
        _ => match (bits("s"), bits("u"), bits("x")) {
            (Some(b), _, _) => signed(b).to_string(),
            (_, Some(b), _) => low(b).to_string(),
            (_, _, Some(b)) => format!("{:#x}", low(b)),
            _ => format!("{raw:#x}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(shown: &str) -> Described {
        Described { name: "v".into(), shown: shown.into(), unknown: false }
    }

    #[test]
    fn raw_values_show_by_their_type() {
        let u = MarkerValue::Unsigned;
        assert_eq!(show(&d("s32"), &u(0xffff_fff9)), "-7");
        assert_eq!(show(&d("s64"), &u(-8i64 as u64)), "-8");
        assert_eq!(show(&d("u8"), &u(0x1ff)), "255");
        assert_eq!(show(&d("x64"), &u(0x7fff_0010)), "0x7fff0010");
        assert_eq!(show(&d("bool"), &u(0x100)), "false");
        assert_eq!(show(&d("char"), &u(b'a' as u64)), "'a'");
        assert_eq!(show(&d("char"), &u(0)), "'\\x00'");
        assert_eq!(show(&d("f64"), &u(1.5f64.to_bits())), "1.5");
        assert_eq!(show(&d("f32"), &u(0.25f32.to_bits() as u64)), "0.25");
        assert_eq!(show(&d("enum:0=RED,5=GREEN,-1=NONE"), &u(5)), "GREEN");
        assert_eq!(show(&d("enum:0=RED,5=GREEN,-1=NONE"), &u(0xffff_ffff)), "NONE");
        assert_eq!(show(&d("enum:0=RED"), &u(3)), "3");
        let s = MarkerValue::Str { bytes: b"a\"b".to_vec(), cut: true };
        assert_eq!(show(&d("str"), &s), "\"a\\\"b\"...");
        assert_eq!(show(&d("str"), &MarkerValue::Unavailable), "(fault)");
        assert_eq!(show(&d("f64"), &MarkerValue::Unavailable), "(unknown)");
        assert_eq!(show(&Described { unknown: true, ..d("?") }, &MarkerValue::Unavailable), "(unknown)");
    }

    #[test]
    fn a_cxx_name_loses_its_parameter_list() {
        assert_eq!(without_parameters("Parser::parse(char const*, int)"), "Parser::parse");
        assert_eq!(without_parameters("apply(void (*)(int), int)"), "apply");
        assert_eq!(without_parameters("parse_record"), "parse_record");
    }

    #[test]
    fn an_args_file_reads_back_and_a_bad_line_is_named() {
        let text = "# x\np\t/bin/x\nf\t1179\tparse\na\tline\tstr\t+0($arg1):string\na\tp\t?\t-\nr\ts32\t$retval:s32\n";
        let ds = Descriptions::parse(text).unwrap();
        let f = &ds.functions[&0x1179];
        assert_eq!(f.args.len(), 2);
        assert!(f.args[1].unknown);
        assert_eq!(f.retval.as_ref().unwrap().shown, "s32");
        assert_eq!(Descriptions::parse("a\tx\ts32\t$arg1\n").unwrap_err(), "line 1: no function");
        assert_eq!(Descriptions::parse("f\tzz\tparse\n").unwrap_err(), "line 1: bad key `zz`");
    }
}
