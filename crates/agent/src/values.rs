//! `dynprobe record -a`: the values each traced call's records carry (uftrace's `-a`).
//!
//! The CLI lowers each function's parameters and return value from the program's DWARF to
//! fetches (the `probe` command's lowering) and writes them into the trace directory's
//! `args` file, which the agent reads at start-up (`DYNPROBE_ARGS`):
//!
//! ```text
//! p \t PATH                      the program described (another one it `exec`s gets none)
//! f \t KEY \t NAME                a function, by its link-time entry address (hex)
//! a \t FIELD \t SHOWN \t SOURCE   one of its arguments, in order
//! r \t SHOWN \t SOURCE            its return value (none for `void`)
//! l \t PATH                      a library's section: its `f`/`a`/`r` lines follow
//! ```
//!
//! A library section's functions are matched by the library's path among the process's
//! modules and located by its load bias; its `KEY`s carry the section's number from bit 48
//! up (the link-time address below), so that keys are unique across the file. A library not
//! loaded at start-up gets no values.
//!
//! `SOURCE` is a fetch as the probe grammar writes it (`+0(%di):string`, `$retval:s32`),
//! `xmmN` (the low 64 bits of a vector register: a `float` or `double`), or `-` (not
//! readable at the entry: `(unknown)`). `SHOWN` is for the CLI, which formats the raw
//! values by it when the trace is read; the agent records raw values only.
//!
//! Everything is compiled here once, into programs indexed by function id: a call's hook
//! evaluates them without allocating, as a probe's fetches are evaluated.

use dynprobe::fetch::{EntryValues, FetchProgram, HitContext, SelfMemory, Value};
use dynprobe::spec::{ProbeKind, ProbeSpec, STRING_MAX};
use dynprobe::Regs;
use dynprobe_events::marker::MarkerRecords;
use dynprobe_ftrace::{CallValues, TracedFunction};
use std::collections::HashMap;

/// The `args` file's path, set by `dynprobe record -a`.
pub const ARGS_ENV: &str = "DYNPROBE_ARGS";

/// Where one value is read.
enum Source {
    Fetch(FetchProgram),
    /// The low 64 bits of xmm0–7.
    Vector(usize),
    /// Not readable: recorded as unavailable.
    Unknown,
}

/// One function's values.
#[derive(Default)]
struct Function {
    /// Its description's key in the `args` file.
    key: u64,
    args: Vec<Source>,
    retval: Option<Source>,
}

/// The values of the traced functions that have a description, by function id.
pub(crate) struct Values {
    functions: Vec<Option<Function>>,
}

impl Values {
    /// The programs of the `args` file `text` for the `functions` traced: those of the main
    /// executable (the `modules`' `is_main` one) when the file describes this executable,
    /// and those of each library section (`l PATH`) whose library is among `modules`,
    /// matched by path and located by its load bias. `Err` names the line that cannot be
    /// compiled.
    pub(crate) fn new(
        text: &str,
        functions: &[TracedFunction],
        modules: &[dynprobe_symbols::Module],
    ) -> Result<Values, String> {
        let same = |p: &std::path::Path| std::fs::canonicalize(p).ok();
        // The descriptions, by (module name, link-time address).
        let mut described: HashMap<(&str, u64), Function> = HashMap::new();
        // The module the current section describes, `None` when it is not this process's.
        let mut section: Option<&dynprobe_symbols::Module> = modules.iter().find(|m| m.is_main);
        let mut current: Option<(&str, u64)> = None;
        for (n, line) in text.lines().enumerate() {
            let bad = |why: String| format!("args file line {}: {why}", n + 1);
            let fields: Vec<&str> = line.split('\t').collect();
            match fields.as_slice() {
                ["p", path] => {
                    let path = same(std::path::Path::new(path));
                    section = modules.iter().find(|m| m.is_main && same(&m.path) == path);
                    current = None;
                }
                ["l", path] => {
                    let path = same(std::path::Path::new(path));
                    section = modules.iter().find(|m| !m.is_main && path.is_some() && same(&m.path) == path);
                    current = None;
                }
                ["f", key, _name] => {
                    let key = u64::from_str_radix(key, 16).map_err(|_| bad(format!("bad address `{key}`")))?;
                    current = section.map(|m| (m.name.as_str(), key & LINK_ADDRESS));
                    if let Some(at) = current {
                        described.entry(at).or_default().key = key;
                    }
                }
                ["a", _field, _shown, source] => {
                    let f = function(&mut described, section, current).map_err(bad)?;
                    let source = compile(source, ProbeKind::Entry).map_err(bad)?;
                    if let Some(f) = f {
                        f.args.push(source);
                    }
                }
                ["r", _shown, source] => {
                    let f = function(&mut described, section, current).map_err(bad)?;
                    let source = compile(source, ProbeKind::Return).map_err(bad)?;
                    if let Some(f) = f {
                        f.retval = Some(source);
                    }
                }
                [""] => {}
                [first, ..] if first.starts_with('#') => {}
                _ => return Err(bad(format!("cannot read `{line}`"))),
            }
        }
        let mut by_id: Vec<Option<Function>> = Vec::new();
        by_id.resize_with(functions.len(), || None);
        for f in functions {
            let Some(module) = modules.iter().find(|m| m.name == f.module) else { continue };
            if let Some(values) = described.remove(&(f.module.as_str(), f.addr.wrapping_sub(module.bias))) {
                if let Some(slot) = by_id.get_mut(f.id as usize) {
                    *slot = Some(values);
                }
            }
        }
        Ok(Values { functions: by_id })
    }

    /// The `.values` companion of the image: `id \t key` for each function described, the
    /// key (its link-time address, hex) naming its description in the `args` file.
    pub(crate) fn list(&self) -> String {
        self.functions
            .iter()
            .enumerate()
            .filter_map(|(id, f)| f.as_ref().map(|f| format!("{id}\t{:x}\n", f.key)))
            .collect()
    }

    fn function(&self, id: u32) -> Option<&Function> {
        self.functions.get(id as usize).and_then(Option::as_ref)
    }
}

/// The link-time address in a key: a library section's keys carry its number above it
/// ([`dynprobe_ftrace::LIBRARY_KEY_SHIFT`]), the main executable's are the address.
const LINK_ADDRESS: u64 = (1 << dynprobe_ftrace::LIBRARY_KEY_SHIFT) - 1;

/// The description the `a`/`r` line of `section` adds to: that of function `current`
/// (`None` in a section this process does not have); `Err` when no `f` line came before.
fn function<'a, 'k>(
    described: &'a mut HashMap<(&'k str, u64), Function>,
    section: Option<&dynprobe_symbols::Module>,
    current: Option<(&'k str, u64)>,
) -> Result<Option<&'a mut Function>, String> {
    match (section, current) {
        (None, _) => Ok(None),
        (Some(_), Some(at)) => Ok(described.get_mut(&at)),
        (Some(_), None) => Err("no function".into()),
    }
}

/// A source of the `args` file, compiled.
fn compile(source: &str, kind: ProbeKind) -> Result<Source, String> {
    if source == "-" {
        return Ok(Source::Unknown);
    }
    if let Some(n) = source.strip_prefix("xmm") {
        return match n.parse::<usize>() {
            Ok(n) if n < 8 => Ok(Source::Vector(n)),
            _ => Err(format!("no vector argument register `{source}`")),
        };
    }
    let spec = ProbeSpec::parse(&format!("{}:v f v={source}", kind.letter()))
        .map_err(|e| format!("bad fetch `{source}`: {e}"))?;
    let arg = &spec.args[0];
    FetchProgram::new(&arg.fetch, arg.ty, kind, &mut EntryValues::default())
        .map(Source::Fetch)
        .map_err(|e| format!("fetch `{source}`: {e}"))
}

/// Adds the value `source` reads in `ctx` to `out` (`vector` is `None` when the vector
/// registers cannot be read).
fn add(source: &Source, ctx: &HitContext, vector: Option<&[u64; 8]>, out: &mut MarkerRecords) {
    match source {
        Source::Fetch(program) => {
            let mut buf = [0u8; STRING_MAX];
            match program.eval(ctx, &mut buf) {
                Value::Int(v) => out.unsigned(v),
                Value::Str(bytes) => out.string(bytes),
                Value::Fault => out.unavailable(),
            };
        }
        Source::Vector(n) => {
            match vector {
                Some(vector) => out.unsigned(vector[*n]),
                None => out.unavailable(),
            };
        }
        Source::Unknown => {
            out.unavailable();
        }
    }
}

impl CallValues for Values {
    fn entry(&self, id: u32, regs: &Regs, vector: Option<&[u64; 8]>, out: &mut MarkerRecords) {
        let Some(f) = self.function(id) else { return };
        let ctx = HitContext::entry(regs, &SelfMemory, 0);
        for source in &f.args {
            add(source, &ctx, vector, out);
        }
    }

    fn exit(&self, id: u32, rax: u64, xmm0: u64, out: &mut MarkerRecords) {
        let Some(Function { retval: Some(source), .. }) = self.function(id) else { return };
        let regs = Regs { rax, ..Regs::default() };
        let ctx = HitContext { retval: Some(rax), ..HitContext::entry(&regs, &SelfMemory, 0) };
        // The return trampoline reaches the exit hook without touching xmm0, whatever the
        // entry's site.
        add(source, &ctx, Some(&[xmm0, 0, 0, 0, 0, 0, 0, 0]), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynprobe_events::marker::{data_bytes, decode};
    use dynprobe_events::model::MarkerValue;
    use dynprobe_events::record::Kind;
    use dynprobe_ftrace::SiteMethod;

    fn function(id: u32, addr: u64, module: &str) -> TracedFunction {
        let site = dynprobe_symbols::CompilerSite { addr, kind: dynprobe_symbols::SiteKind::Mcount, function: None };
        let method = SiteMethod::Compiler(site);
        TracedFunction { id, addr, module: module.into(), name: format!("f{id}"), method }
    }

    fn module(name: &str, bias: u64) -> dynprobe_symbols::Module {
        let path = std::env::current_exe().unwrap();
        dynprobe_symbols::Module { path, name: name.into(), bias, ranges: vec![], is_main: true }
    }

    fn values_of(records: &[dynprobe_events::record::Record]) -> Vec<MarkerValue> {
        decode(&data_bytes(&records[1..]).unwrap()).unwrap()
    }

    #[test]
    fn described_functions_of_the_executable_get_their_values() {
        let text = "# args\nf\t1000\tparse\na\tline\tstr\t+0(%rdi):string\na\tlen\ts32\t%rsi:s32\n\
                    a\tx\tf64\txmm1\na\tbig\t?\t-\nr\ts32\t$retval:s32\nf\t2000\tvoid_fn\n";
        let functions = [function(0, 0x5000_1000, "prog"), function(1, 0x5000_2000, "libc.so.6")];
        let values = Values::new(text, &functions, &[module("prog", 0x5000_0000)]).unwrap();
        let line = b"alpha,12\0";
        let regs = Regs { rdi: line.as_ptr() as u64, rsi: 8, ..Regs::default() };
        let mut out = MarkerRecords::new();
        values.entry(0, &regs, Some(&[0, 2.5f64.to_bits(), 0, 0, 0, 0, 0, 0]), &mut out);
        assert_eq!(values.list(), "0\t1000\n");
        let got = values_of(out.finish_as(Kind::Entry, 1, 0, 0));
        let want = [
            MarkerValue::Str { bytes: b"alpha,12".to_vec(), cut: false },
            MarkerValue::Unsigned(8),
            MarkerValue::Unsigned(2.5f64.to_bits()),
            MarkerValue::Unavailable,
        ];
        assert_eq!(got, want);
        let mut out = MarkerRecords::new();
        values.exit(0, 12, 0, &mut out);
        assert_eq!(values_of(out.finish_as(Kind::Exit, 2, 0, 0)), [MarkerValue::Unsigned(12)]);
        // Not described (a library's function, an id beyond): no values, one record.
        let mut out = MarkerRecords::new();
        values.entry(1, &regs, Some(&[0; 8]), &mut out);
        values.exit(7, 1, 0, &mut out);
        assert_eq!(out.finish_as(Kind::Entry, 1, 0, 1).len(), 1);
    }

    #[test]
    fn without_the_vector_registers_a_vector_argument_is_unavailable() {
        let text = "f\t1000\tmix\na\tx\tf64\txmm0\na\tk\ts32\t%rdi:s32\nr\tf64\txmm0\n";
        let plain = TracedFunction { method: SiteMethod::Entry, ..function(0, 0x1000, "prog") };
        let values = Values::new(text, &[plain], &[module("prog", 0)]).unwrap();
        let mut out = MarkerRecords::new();
        values.entry(0, &Regs { rdi: 3, ..Regs::default() }, None, &mut out);
        assert_eq!(
            values_of(out.finish_as(Kind::Entry, 1, 0, 0)),
            [MarkerValue::Unavailable, MarkerValue::Unsigned(3)]
        );
        // With them (a plain entry's probe saves them), the value.
        let mut out = MarkerRecords::new();
        values.entry(0, &Regs { rdi: 3, ..Regs::default() }, Some(&[1.5f64.to_bits(); 8]), &mut out);
        assert_eq!(
            values_of(out.finish_as(Kind::Entry, 1, 0, 0)),
            [MarkerValue::Unsigned(1.5f64.to_bits()), MarkerValue::Unsigned(3)]
        );
        // The exit's xmm0 is read on the return path, whatever the entry's site.
        let mut out = MarkerRecords::new();
        values.exit(0, 0, 2.5f64.to_bits(), &mut out);
        assert_eq!(values_of(out.finish_as(Kind::Exit, 2, 0, 0)), [MarkerValue::Unsigned(2.5f64.to_bits())]);
    }

    #[test]
    fn a_bad_line_is_named() {
        let err = Values::new("f\t10\tf\na\tx\ts32\t%nope\n", &[], &[module("p", 0)]).err().unwrap();
        assert!(err.starts_with("args file line 2: bad fetch `%nope`"), "{err}");
        let err = Values::new("a\tx\ts32\t%rdi\n", &[], &[module("p", 0)]).err().unwrap();
        assert_eq!(err, "args file line 1: no function");
    }

    #[test]
    fn a_library_section_describes_that_library_s_functions_by_its_bias() {
        // Section 1's key carries its number from bit 48; the main executable has a
        // function at the same link-time address, a section of a library not loaded none.
        let text = "f\t1000\tmain_fn\na\tk\ts32\t%rdi:s32\nl\t/nonexistent/libgone.so\nf\t1000001000\tgone\n\
                    a\tx\ts32\t%rsi:s32\nl\t/bin/sh\nf\t1000000001000\tlib_fn\na\tn\ts32\t%rsi:s32\n";
        let library = dynprobe_symbols::Module {
            path: "/bin/sh".into(),
            is_main: false,
            ..module("libfoo.so", 0x7f00_0000_0000)
        };
        let functions = [function(0, 0x1000, "prog"), function(1, 0x7f00_0000_1000, "libfoo.so")];
        let values = Values::new(text, &functions, &[module("prog", 0), library]).unwrap();
        assert_eq!(values.list(), "0\t1000\n1\t1000000001000\n");
        let regs = Regs { rdi: 3, rsi: 4, ..Regs::default() };
        for (id, want) in [(0, 3), (1, 4)] {
            let mut out = MarkerRecords::new();
            values.entry(id, &regs, None, &mut out);
            assert_eq!(values_of(out.finish_as(Kind::Entry, 1, 0, 0)), [MarkerValue::Unsigned(want)]);
        }
    }

    #[test]
    fn another_program_gets_no_values() {
        let text = "p\t/bin/true\nf\t1000\tparse\na\tlen\ts32\t%rsi:s32\n";
        let values = Values::new(text, &[function(0, 0x1000, "prog")], &[module("prog", 0)]).unwrap();
        let mut out = MarkerRecords::new();
        values.entry(0, &Regs::default(), Some(&[0; 8]), &mut out);
        assert_eq!(out.finish_as(Kind::Entry, 1, 0, 0).len(), 1);
    }
}
