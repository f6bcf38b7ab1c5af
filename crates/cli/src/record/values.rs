//! `dynprobe record -a`: the `args` file describing the values each traced function's calls
//! carry — written here from the program's DWARF before the program runs, compiled by the
//! agent into fetch programs (`dynprobe_agent`'s `values` module documents the format), and
//! read again by replay, report and export to show the raw values by type
//! (`crate::trace::values`).

use crate::probe::source::{call_values, override_values, CallValue};
use dynprobe_events::files;
use dynprobe_ftrace::Filter;
use dynprobe_symbols::dwarf::{DebugInfo, SourcePoint};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The file's name in the trace directory (and in the ring directory, for the agent).
pub(crate) const ARGS_FILE: &str = "args";

/// What `-A FUNC@FIELDS` and `-R FUNC@FETCH` say: for the functions matching each glob, the
/// arguments or the return value recorded in place of the DWARF's.
#[derive(Debug, Default)]
pub(crate) struct Overrides {
    args: Vec<(String, Vec<CallValue>)>,
    retvals: Vec<(String, CallValue)>,
}

impl Overrides {
    /// The overrides of the `-A` and `-R` options; `Err` names a bad one.
    pub(crate) fn parse(args: &[String], retvals: &[String]) -> Result<Overrides, String> {
        let split = |option: &str, text: &str| -> Result<(String, String), String> {
            let (glob, rest) = text.split_once('@').ok_or_else(|| format!("{option} `{text}`: write FUNC@…"))?;
            Ok((glob.to_string(), rest.to_string()))
        };
        let mut out = Overrides::default();
        for text in args {
            let (glob, fields) = split("-A", text)?;
            out.args.push((glob, override_values(&fields, false)?));
        }
        for text in retvals {
            let (glob, fetch) = split("-R", text)?;
            let value = override_values(&fetch, true)?.into_iter().next().ok_or(format!("-R `{text}`: no value"))?;
            out.retvals.push((glob, value));
        }
        Ok(out)
    }

    /// `args` and `retval` of function `name` as the overrides leave them.
    fn apply(&self, name: &str, args: &mut Vec<CallValue>, retval: &mut Option<CallValue>) {
        let matches = |glob: &str| dynprobe_ftrace::filter::glob_match(glob.as_bytes(), name.as_bytes());
        if let Some((_, values)) = self.args.iter().rev().find(|(glob, _)| matches(glob)) {
            args.clone_from(values);
        }
        if let Some((_, value)) = self.retvals.iter().rev().find(|(glob, _)| matches(glob)) {
            *retval = Some(value.clone());
        }
    }
}

/// Describes the functions of `program` that `filter` (the agent's `F`/`N` lines) selects
/// and that have DWARF, as `overrides` change them, into `ARGS_FILE` in each of `dirs`;
/// then, in a section of its own (`l PATH`), those of each library a `-F MODULE:…` pattern
/// names, from the library's own DWARF (a pattern naming a library by its path finds one the
/// program loads later with `dlopen`). Returns how many were described. A program
/// without DWARF is an error naming it (the caller warns and records without values),
/// unless a library named by the filter has some; a library that cannot be found or has
/// no DWARF is a warning naming it.
pub(crate) fn write_args(program: &Path, filter: &str, overrides: &Overrides, dirs: &[&Path]) -> Result<usize, String> {
    let filter = Filter::from_lines(filter)?;
    let exe = std::fs::canonicalize(program).unwrap_or_else(|_| program.to_path_buf());
    let mut text =
        format!("# dynprobe record -a: what each call records (see `dynprobe record --help`)\np\t{}\n", exe.display());
    let main = DebugInfo::open(program).map_err(|e| e.to_string());
    let exe_module = program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut count = 0;
    if let Ok(info) = &main {
        count += describe(info, &exe_module, true, 0, &filter, overrides, &mut text);
    }
    // The libraries the patterns name (not `*:…`, every module: each library's DWARF
    // would be opened), each once.
    let mut libraries: Vec<PathBuf> = Vec::new();
    for module in filter.include.iter().filter_map(|p| p.module.as_deref()).filter(|m| *m != "*") {
        match crate::probe::source::module_path(program, module) {
            Ok(path) => {
                let path = std::fs::canonicalize(&path).unwrap_or(path);
                if !libraries.contains(&path) {
                    libraries.push(path);
                }
            }
            // `-F PROG:GLOB` names the executable itself (described above).
            Err(_) if exe_module.starts_with(module) => {}
            Err(e) => {
                eprintln!(
                    "dynprobe: -a: no argument of `{module}:…` is recorded: {e}; in -F: '/path/to/{module}.so:GLOB'"
                )
            }
        }
    }
    let mut sections: u64 = 0;
    for path in &libraries {
        let info = match DebugInfo::open(path) {
            Ok(info) => info,
            Err(e) => {
                eprintln!("dynprobe: -a: no argument of {} is recorded: {e}", path.display());
                continue;
            }
        };
        sections += 1;
        let _ = writeln!(text, "l\t{}", path.display());
        let module = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        count += describe(
            &info,
            &module,
            false,
            sections << dynprobe_ftrace::LIBRARY_KEY_SHIFT,
            &filter,
            overrides,
            &mut text,
        );
    }
    if let (Err(e), 0) = (&main, sections) {
        return Err(e.clone());
    }
    for dir in dirs {
        let path = dir.join(ARGS_FILE);
        files::write_private(&path, text.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(count)
}

/// Adds to `text` the `f`/`a`/`r` lines of the functions of `info` (module `module`) that
/// `filter` selects, keyed `tag | link-time address`; returns how many.
fn describe(
    info: &DebugInfo,
    module: &str,
    is_main: bool,
    tag: u64,
    filter: &Filter,
    overrides: &Overrides,
    text: &mut String,
) -> usize {
    let mut described = std::collections::HashSet::new();
    for f in info.functions() {
        let Some(&(start, _)) = f.ranges.first() else { continue };
        // Resolving is the cost: only for a function the filter selects, by the name the
        // agent selects it by (its symbol's, demangled: `Parser::parse(char const*)`).
        let readable = |symbol: &str| dynprobe_symbols::readable_name(symbol);
        if !info.symbol_at(start).is_some_and(|(s, _)| filter.selects(module, is_main, &readable(s))) {
            continue;
        }
        let point = SourcePoint::Function { name: f.name.clone(), file: Some(f.file.clone()) };
        let Ok(sites) = info.resolve(&point) else { continue };
        for site in sites.iter().filter(|s| !s.inlined && s.entry) {
            // Only a function entered at its own symbol: a compiler's clone (`.isra`,
            // `.constprop`, `.part`) may take its parameters otherwise than the source says.
            let Some((symbol, 0)) = info.symbol_at(site.addr) else { continue };
            let name = readable(symbol);
            if symbol.contains('.') || !filter.selects(module, is_main, &name) || !described.insert(site.addr) {
                continue;
            }
            // C++ and Rust names are mangled; their ABI for aggregates is not C's.
            let c_abi = !symbol.starts_with("_Z") && !symbol.starts_with("_R");
            let (mut args, mut retval) = call_values(info, site, c_abi);
            overrides.apply(&name, &mut args, &mut retval);
            let _ = writeln!(text, "f\t{:x}\t{}", tag | site.addr, f.name);
            for CallValue { name, shown, source } in args {
                let _ = writeln!(text, "a\t{name}\t{shown}\t{source}");
            }
            if let Some(CallValue { shown, source, .. }) = retval {
                let _ = writeln!(text, "r\t{shown}\t{source}");
            }
        }
    }
    described.len()
}
