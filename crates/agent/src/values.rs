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
//! A library section describes every module of the library's file name, wherever it was
//! loaded from, as the `-F PATH:GLOB` pattern that named it selects their functions
//! (`dynprobe_ftrace::filter::path_names_module`, one rule for both); each module's
//! functions are located by its own load bias; its `KEY`s carry the section's number from
//! bit 48 up (the link-time address below), so that keys are unique across the file. A
//! library loaded later (`dlopen`) gets its section's values when the `dlopen` watch traces
//! its functions ([`Values::describe`]), before their sites are armed.
//!
//! `SOURCE` is a fetch as the probe grammar writes it (`+0(%di):string`, `$retval:s32`),
//! `xmmN` (the low 64 bits of a vector register: a `float` or `double`), or `-` (not
//! readable at the entry: `(unknown)`). `SHOWN` is for the CLI, which formats the raw
//! values by it when the trace is read; the agent records raw values only.
//!
//! Every line is compiled once, when the file is read ([`Values::new`]), into a table of
//! sections by link-time address; describing a module's functions (at the start, at each
//! `dlopen`) only looks them up there and copies each one's programs into the slot of its
//! function id: a call's hook evaluates them without allocating, as a probe's fetches are
//! evaluated. The slots are allocated before any hook reads them and each is filled once,
//! by the thread that places the function's sites, before it arms them: a hook reads a slot
//! with one acquire load (`OnceLock::get`) and never waits for a writer.

use dynprobe::fetch::{EntryValues, FetchProgram, HitContext, SelfMemory, Value};
use dynprobe::spec::{ProbeKind, ProbeSpec, STRING_MAX};
use dynprobe::Regs;
use dynprobe_events::marker::MarkerRecords;
use dynprobe_ftrace::filter::path_names_module;
use dynprobe_ftrace::{CallValues, TracedFunction};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// The `args` file's path, set by `dynprobe record -a`.
pub const ARGS_ENV: &str = "DYNPROBE_ARGS";

/// Where one value is read.
#[derive(Clone)]
enum Source {
    Fetch(FetchProgram),
    /// The low 64 bits of xmm0–7.
    Vector(usize),
    /// Not readable: recorded as unavailable.
    Unknown,
}

/// One function's values.
#[derive(Clone, Default)]
struct Function {
    /// Its description's key in the `args` file.
    key: u64,
    args: Vec<Source>,
    retval: Option<Source>,
}

/// The most functions a tracer traces: its function ids have 24 bits (`dynprobe_ftrace`'s
/// `graph::ID_BITS`).
const MAX_FUNCTIONS: usize = 1 << 24;
/// The slots of one chunk of the table, allocated together the first time one of them is
/// filled.
const CHUNK: usize = 4096;

/// The values of the traced functions that have a description, by function id: shared by
/// the tracer's hooks, which read it, and the `dlopen` watch, which describes the functions
/// of the libraries loaded later.
#[derive(Clone)]
pub(crate) struct Values(Arc<Table>);

struct Table {
    /// The `args` file's sections, compiled once.
    sections: Vec<Section>,
    /// Chunk `id / CHUNK`, slot `id % CHUNK`: function `id`'s values, set once.
    chunks: Box<[OnceLock<Chunk>]>,
}

/// [`CHUNK`] slots of the table, each set once.
type Chunk = Box<[OnceLock<Function>]>;

/// One section of the `args` file: the lines before the first `p` or `l` line, or from one
/// to the next.
struct Section {
    /// The modules it describes.
    about: About,
    /// Its functions, by link-time address.
    functions: HashMap<u64, Function>,
}

/// Which modules a section describes.
enum About {
    /// The main executable: any (the lines before a `p` line), or only the program at
    /// this canonical path (a `p` line).
    Program(Option<PathBuf>),
    /// Every library whose file name is this path's (an `l` line): the modules a `-F
    /// PATH:GLOB` pattern covers, by the same rule.
    Library(String),
}

impl Section {
    /// Whether the section describes `module`; `main` is the main executable's canonical
    /// path, looked up once by the caller.
    fn covers(&self, module: &dynprobe_symbols::Module, main: &mut Option<Option<PathBuf>>) -> bool {
        match &self.about {
            About::Program(None) => module.is_main,
            About::Program(Some(path)) => {
                module.is_main
                    && main.get_or_insert_with(|| std::fs::canonicalize(&module.path).ok()).as_ref() == Some(path)
            }
            About::Library(path) => !module.is_main && path_names_module(path, &module.name),
        }
    }
}

impl Values {
    /// The values the `args` file `text` describes, no function's yet ([`describe`](Self::describe)).
    /// Every line is compiled here, once, so that a description made later cannot fail.
    /// `Err` names the line that cannot be compiled.
    pub(crate) fn new(text: &str) -> Result<Values, String> {
        let sections = sections(text)?;
        let chunks = (0..MAX_FUNCTIONS / CHUNK).map(|_| OnceLock::new()).collect();
        Ok(Values(Arc::new(Table { sections, chunks })))
    }

    /// Gives each of `functions` that the file describes its values: those of the main
    /// executable (the `modules`' `is_main` one) when the file describes this executable,
    /// and those of each library section (`l PATH`) for every library among `modules` of
    /// that file name (as a `-F PATH:GLOB` pattern selects them), located by its load
    /// bias. A function that has values keeps them. Call it before the functions' sites are
    /// armed. Returns the lines of the `.values` companion for those described: `id \t
    /// key`, the key (hex) naming the description in the `args` file.
    pub(crate) fn describe(&self, functions: &[TracedFunction], modules: &[dynprobe_symbols::Module]) -> String {
        let mut main = None;
        // Each module's sections, looked up once.
        let sections: Vec<Vec<&Section>> =
            modules.iter().map(|m| self.0.sections.iter().filter(|s| s.covers(m, &mut main)).collect()).collect();
        let mut list = String::new();
        for f in functions {
            // Two modules of one file name (a library loaded from two paths): the one that
            // holds the function.
            let named = || modules.iter().enumerate().filter(|(_, m)| m.name == f.module);
            let holds = |(_, m): &(usize, &dynprobe_symbols::Module)| {
                m.ranges.iter().any(|&(lo, hi)| lo <= f.addr && f.addr < hi)
            };
            let Some((i, module)) = named().find(holds).or_else(|| named().next()) else { continue };
            let at = f.addr.wrapping_sub(module.bias);
            let Some(values) = sections[i].iter().find_map(|s| s.functions.get(&at)) else { continue };
            let id = f.id as usize;
            let Some(chunk) = self.0.chunks.get(id / CHUNK) else { continue };
            let chunk = chunk.get_or_init(|| (0..CHUNK).map(|_| OnceLock::new()).collect());
            // The release that publishes it to the hooks: `OnceLock` completes with one.
            if chunk[id % CHUNK].set(values.clone()).is_ok() {
                list.push_str(&format!("{id}\t{:x}\n", values.key));
            }
        }
        list
    }

    fn function(&self, id: u32) -> Option<&Function> {
        let id = id as usize;
        self.0.chunks.get(id / CHUNK)?.get()?.get(id % CHUNK)?.get()
    }
}

/// The sections of the `args` file `text`, every line compiled; `Err` names the line that
/// cannot be.
fn sections(text: &str) -> Result<Vec<Section>, String> {
    let mut sections = vec![Section { about: About::Program(None), functions: HashMap::new() }];
    // The function the `a` and `r` lines describe, by link-time address; `None` until an
    // `f` line comes in the section.
    let mut current: Option<u64> = None;
    for (n, line) in text.lines().enumerate() {
        let bad = |why: String| format!("args file line {}: {why}", n + 1);
        let fields: Vec<&str> = line.split('\t').collect();
        let section = sections.last_mut().expect("the first section");
        match fields.as_slice() {
            ["p", path] => {
                // A program whose path cannot be resolved is none of this process's.
                let path = std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from("/nonexistent/"));
                sections.push(Section { about: About::Program(Some(path)), functions: HashMap::new() });
                current = None;
            }
            ["l", path] => {
                sections.push(Section { about: About::Library(path.to_string()), functions: HashMap::new() });
                current = None;
            }
            ["f", key, _name] => {
                let key = u64::from_str_radix(key, 16).map_err(|_| bad(format!("bad address `{key}`")))?;
                let at = key & LINK_ADDRESS;
                section.functions.entry(at).or_default().key = key;
                current = Some(at);
            }
            ["a", _field, _shown, source] => {
                let f = function(section, current).map_err(bad)?;
                f.args.push(compile(source, ProbeKind::Entry).map_err(bad)?);
            }
            ["r", _shown, source] => {
                let f = function(section, current).map_err(bad)?;
                f.retval = Some(compile(source, ProbeKind::Return).map_err(bad)?);
            }
            [""] => {}
            [first, ..] if first.starts_with('#') => {}
            _ => return Err(bad(format!("cannot read `{line}`"))),
        }
    }
    Ok(sections)
}

/// The link-time address in a key: a library section's keys carry its number above it
/// ([`dynprobe_ftrace::LIBRARY_KEY_SHIFT`]), the main executable's are the address.
const LINK_ADDRESS: u64 = (1 << dynprobe_ftrace::LIBRARY_KEY_SHIFT) - 1;

/// The description the `a`/`r` line adds to: that of the section's function `current`;
/// `Err` when no `f` line came before in its section.
fn function(section: &mut Section, current: Option<u64>) -> Result<&mut Function, String> {
    current.and_then(|at| section.functions.get_mut(&at)).ok_or_else(|| "no function".into())
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

    /// A library at `path`, loaded with `bias`, its code in the 64 KiB there.
    fn library(path: &str, bias: u64) -> dynprobe_symbols::Module {
        let name = path.rsplit('/').next().unwrap().to_string();
        let ranges = vec![(bias, bias + 0x1_0000)];
        dynprobe_symbols::Module { path: path.into(), name, bias, ranges, is_main: false }
    }

    /// The values of `text` for `functions`, and the `.values` lines of those described.
    fn described(
        text: &str,
        functions: &[TracedFunction],
        modules: &[dynprobe_symbols::Module],
    ) -> Result<(Values, String), String> {
        let values = Values::new(text)?;
        let list = values.describe(functions, modules);
        Ok((values, list))
    }

    fn values_of(records: &[dynprobe_events::record::Record]) -> Vec<MarkerValue> {
        decode(&data_bytes(&records[1..]).unwrap()).unwrap()
    }

    #[test]
    fn described_functions_of_the_executable_get_their_values() {
        let text = "# args\nf\t1000\tparse\na\tline\tstr\t+0(%rdi):string\na\tlen\ts32\t%rsi:s32\n\
                    a\tx\tf64\txmm1\na\tbig\t?\t-\nr\ts32\t$retval:s32\nf\t2000\tvoid_fn\n";
        let functions = [function(0, 0x5000_1000, "prog"), function(1, 0x5000_2000, "libc.so.6")];
        let (values, list) = described(text, &functions, &[module("prog", 0x5000_0000)]).unwrap();
        let line = b"alpha,12\0";
        let regs = Regs { rdi: line.as_ptr() as u64, rsi: 8, ..Regs::default() };
        let mut out = MarkerRecords::new();
        values.entry(0, &regs, Some(&[0, 2.5f64.to_bits(), 0, 0, 0, 0, 0, 0]), &mut out);
        assert_eq!(list, "0\t1000\n");
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
        let (values, _) = described(text, &[plain], &[module("prog", 0)]).unwrap();
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
        let err = Values::new("f\t10\tf\na\tx\ts32\t%nope\n").err().unwrap();
        assert!(err.starts_with("args file line 2: bad fetch `%nope`"), "{err}");
        let err = Values::new("a\tx\ts32\t%rdi\n").err().unwrap();
        assert_eq!(err, "args file line 1: no function");
    }

    #[test]
    fn a_library_section_describes_that_library_s_functions_by_its_bias() {
        // Section 1's key carries its number from bit 48; the main executable has a
        // function at the same link-time address, a section of a library not loaded none.
        let text = "f\t1000\tmain_fn\na\tk\ts32\t%rdi:s32\nl\t/nonexistent/libgone.so\nf\t1000001000\tgone\n\
                    a\tx\ts32\t%rsi:s32\nl\t/opt/app/libfoo.so\nf\t1000000001000\tlib_fn\na\tn\ts32\t%rsi:s32\n";
        let library = library("/opt/app/libfoo.so", 0x7f00_0000_0000);
        let functions = [function(0, 0x1000, "prog"), function(1, 0x7f00_0000_1000, "libfoo.so")];
        let (values, list) = described(text, &functions, &[module("prog", 0), library]).unwrap();
        assert_eq!(list, "0\t1000\n1\t1000000001000\n");
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
        let (values, _) = described(text, &[function(0, 0x1000, "prog")], &[module("prog", 0)]).unwrap();
        let mut out = MarkerRecords::new();
        values.entry(0, &Regs::default(), Some(&[0; 8]), &mut out);
        assert_eq!(out.finish_as(Kind::Entry, 1, 0, 0).len(), 1);
    }

    /// A library `dlopen`ed later: its functions, with ids following those traced at the
    /// start, get their section's values when they are described, and those described
    /// before keep theirs.
    #[test]
    fn a_library_loaded_later_gets_its_section_s_values_when_its_functions_are_described() {
        let text = "f\t1000\tmain_fn\na\tk\ts32\t%rdi:s32\nl\t/opt/app/libplug.so\nf\t1000000001000\tlib_fn\n\
                    a\tn\ts32\t%rsi:s32\n";
        let main = module("prog", 0);
        let (values, list) = described(text, &[function(0, 0x1000, "prog")], std::slice::from_ref(&main)).unwrap();
        assert_eq!(list, "0\t1000\n");
        let regs = Regs { rdi: 3, rsi: 4, ..Regs::default() };
        let entry = |id| {
            let mut out = MarkerRecords::new();
            values.entry(id, &regs, None, &mut out);
            out.finish_as(Kind::Entry, 1, 0, 0).to_vec()
        };
        // Id 5000 is in a chunk of its own, not allocated yet: no values, one record.
        assert_eq!(entry(5000).len(), 1);
        let library = library("/opt/app/libplug.so", 0x7f00_0000_0000);
        let later = [function(5000, 0x7f00_0000_1000, "libplug.so"), function(0, 0x1000, "prog")];
        let list = values.describe(&later, &[main, library]);
        assert_eq!(list, "5000\t1000000001000\n");
        assert_eq!(values_of(&entry(5000)), [MarkerValue::Unsigned(4)]);
        assert_eq!(values_of(&entry(0)), [MarkerValue::Unsigned(3)]);
    }

    /// A `-F PATH:GLOB` pattern traces every module of that file name: the library section
    /// of that path describes each of them, wherever it was loaded from, each located by its
    /// own bias.
    #[test]
    fn a_library_section_describes_every_library_of_that_file_name() {
        let text = "l\t/build/libplug.so\nf\t1000000001000\tlib_fn\na\tn\ts32\t%rsi:s32\n";
        let (first, second) =
            (library("/opt/app/libplug.so", 0x7f00_0000_0000), library("/tmp/libplug.so", 0x7e00_0000_0000));
        let other = library("/build/libother.so", 0x7d00_0000_0000);
        let functions = [
            function(0, 0x7f00_0000_1000, "libplug.so"),
            function(1, 0x7e00_0000_1000, "libplug.so"),
            function(2, 0x7d00_0000_1000, "libother.so"),
        ];
        let (values, list) = described(text, &functions, &[module("prog", 0), first, second, other]).unwrap();
        assert_eq!(list, "0\t1000000001000\n1\t1000000001000\n");
        for id in [0, 1] {
            let mut out = MarkerRecords::new();
            values.entry(id, &Regs { rsi: 4, ..Regs::default() }, None, &mut out);
            assert_eq!(values_of(out.finish_as(Kind::Entry, 1, 0, 0)), [MarkerValue::Unsigned(4)]);
        }
    }
}
