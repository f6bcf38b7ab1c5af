//! Choosing the functions to trace and how to patch each (the kernel's `ftrace_process_locs`
//! plus the filter files): a compiler-recorded NOP site when the function has one, else a
//! probe on its first instruction.

use crate::error::FtraceError;
use crate::filter::{nearest, Filter};
use dynprobe_events::model::RefusedSite;
use dynprobe_symbols::{CompilerSite, SiteKind, SymbolTable};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

/// How a function's entry is patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteMethod {
    /// The compiler's NOP at the entry becomes a `call` to the tracer.
    Compiler(CompilerSite),
    /// A probe on the first instruction (jump-optimized where the checks allow).
    Entry,
}

impl SiteMethod {
    /// The kind's name in summaries: `mcount`, `patchable` or `entry`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            SiteMethod::Compiler(CompilerSite { kind: SiteKind::Mcount, .. }) => "mcount",
            SiteMethod::Compiler(_) => "patchable",
            SiteMethod::Entry => "entry",
        }
    }
}

/// A function chosen for tracing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracedFunction {
    /// Its id in the records (its index in [`Selection::functions`]).
    pub id: u32,
    /// Its first instruction.
    pub addr: u64,
    /// The file name of its module.
    pub module: String,
    /// Its readable name.
    pub name: String,
    /// How its entry is patched.
    pub method: SiteMethod,
}

/// The functions to trace.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Every chosen function, by id.
    pub functions: Vec<TracedFunction>,
    /// Compiler sites that cannot be used (their function is then probed at its entry, or
    /// not traced when it has no symbol).
    pub refused: Vec<RefusedSite>,
    /// `-F` patterns naming a module that is not loaded: matched when one is `dlopen`ed.
    pub pending: Vec<String>,
}

/// Code entered otherwise than by a `call`, so that no return address is at `rsp` on its
/// first instruction, by name prefix: the dynamic linker's lazy-binding and TLS-descriptor
/// trampolines (entered by a PLT jump with an index on the stack), `makecontext`'s start
/// (returned into), the signal return trampoline.
const NOT_CALLED: &[&str] =
    &["_dl_runtime_resolve", "_dl_runtime_profile", "_dl_tlsdesc_", "__start_context", "__restore_rt"];

/// The name prefix of V8's embedded builtins (`Builtins_InterpreterEntryTrampoline`, …):
/// code of the JavaScript engine in `node` and other V8 embedders, compiled ahead of time
/// into the executable's text with symbols like functions'. Tracing all of `node` with them
/// hung it in a loop through the tracer's return trampoline; without them it runs.
const V8_BUILTIN: &str = "Builtins_";

/// Whether `name` (demangled, with its parameters) is a function that V8's generated code
/// calls through an exit frame: a runtime function (`v8::internal::Runtime_StringSplit`), a
/// C++ builtin (`v8::internal::Builtin_ArrayPush`), or an API callback taking a
/// `v8::FunctionCallbackInfo` or `v8::PropertyCallbackInfo` (`node::fs::Read`). V8 finds
/// the code an exit frame returns to by its return address, also while collecting garbage
/// in the middle of the call (its `ExitFrame::Iterate`).
fn called_through_v8_exit_frames(name: &str) -> bool {
    name.starts_with("v8::internal::Runtime_")
        || name.starts_with("v8::internal::Builtin_")
        || name.contains("v8::FunctionCallbackInfo<")
        || name.contains("v8::PropertyCallbackInfo<")
}

/// Start-up and tear-down code of the C runtime: it runs before the tracer exists or calls
/// `main` without returning, and no compiler site is recorded in it.
const C_RUNTIME: &[&str] = &[
    "_start",
    "_init",
    "_fini",
    "frame_dummy",
    "register_tm_clones",
    "deregister_tm_clones",
    "__do_global_dtors_aux",
    "__libc_csu_init",
    "__libc_csu_fini",
    "_dl_relocate_static_pie",
];

impl Selection {
    /// Chooses, from every module of `table` that `filter` covers, the functions it selects.
    /// Every `-F` pattern must match something: one that does not is an error naming the
    /// nearest function names. Functions that return twice (`setjmp`, `vfork`) and the C
    /// runtime's start-up code are never traced; neither is dynprobe's own module. A
    /// function's `.cold` part is not a function: it is neither counted nor patched.
    ///
    /// A pattern naming a module that is not loaded (yet) is not an error: it is
    /// [`pending`](Self::pending), for [`Selection::new_modules`] to match once a `dlopen`
    /// brings the module in.
    pub fn new(table: &SymbolTable, filter: &Filter) -> Result<Selection, FtraceError> {
        Selection::choose_in(table, filter, &HashSet::new(), 0, true)
    }

    /// The functions `filter` selects in the modules of `table` not in `known` (paths): a
    /// library `dlopen`ed since. Ids start at `first_id`. No pattern has to match.
    pub fn new_modules(
        table: &SymbolTable,
        filter: &Filter,
        known: &HashSet<PathBuf>,
        first_id: u32,
    ) -> Result<Selection, FtraceError> {
        let mut selection = Selection::choose_in(table, filter, known, first_id, false)?;
        selection.pending.clear();
        Ok(selection)
    }

    /// The `-F` patterns of `filter` that name a module no module of `table` is (a library
    /// not loaded, or a misspelt one).
    pub fn pending_patterns(table: &SymbolTable, filter: &Filter) -> Vec<String> {
        let loaded = |p: &crate::filter::Pattern| {
            table.modules().iter().any(|m| p.covers_module(&m.name, m.is_main) && !m.name.starts_with('['))
        };
        filter
            .include
            .iter()
            .filter(|p| p.module.as_deref().is_some_and(|m| m != "*") && !loaded(p))
            .map(|p| p.text.clone())
            .collect()
    }

    /// The module paths of `table` (what [`Selection::new_modules`] calls known).
    pub fn module_paths(table: &SymbolTable) -> HashSet<PathBuf> {
        table.modules().iter().map(|m| m.path.clone()).collect()
    }

    fn choose_in(
        table: &SymbolTable,
        filter: &Filter,
        known: &HashSet<PathBuf>,
        first_id: u32,
        require_matches: bool,
    ) -> Result<Selection, FtraceError> {
        let ours = table.module_of(Selection::new as fn(_, _) -> _ as usize as u64).map(|m| m.path.clone());
        let mut selection = Selection::default();
        let mut matched = vec![false; filter.include.len()];
        let mut seen = HashSet::new();
        for (index, module) in table.modules().iter().enumerate() {
            if !filter.covers_module(&module.name, module.is_main)
                || Some(&module.path) == ours.as_ref()
                || module.name.starts_with('[')
                || known.contains(&module.path)
            {
                continue;
            }
            let sites = match table.compiler_sites(index) {
                Ok(sites) => sites,
                Err(e) => {
                    selection.refused.push(RefusedSite {
                        kind: "compiler".into(),
                        addr: 0,
                        function: module.name.clone(),
                        reason: format!(
                            "the module's site tables cannot be read ({e}); its functions are probed at their entries"
                        ),
                    });
                    Vec::new()
                }
            };
            let mut site_of = std::collections::HashMap::new();
            for site in &sites {
                match site.function {
                    Some(f) => {
                        site_of.insert(f, *site);
                    }
                    None => selection.refused.push(RefusedSite {
                        kind: kind_name(site.kind).into(),
                        addr: site.addr,
                        function: String::new(),
                        reason: "no function symbol contains the site".into(),
                    }),
                }
            }
            let public = ifunc_implementations(table, index, filter, &mut selection.refused);
            for (sym_index, sym) in table.symbols().iter().enumerate().filter(|(_, s)| s.module == index) {
                if !seen.insert(sym.addr)
                    || C_RUNTIME.contains(&sym.name.as_str())
                    || table.is_ifunc(sym)
                    || is_fragment(&sym.mangled)
                {
                    continue;
                }
                // An indirect function's chosen implementation goes by the public names
                // that lead to it (`memcpy`, not `__memmove_avx_unaligned_erms`), its own
                // name after them.
                let public_names = public.get(&sym.addr).map_or(&[][..], Vec::as_slice);
                let names = public_names.iter().map(String::as_str).chain(std::iter::once(sym.name.as_str()));
                for (i, p) in filter.include.iter().enumerate() {
                    matched[i] |= names.clone().any(|name| p.matches(&module.name, module.is_main, name));
                }
                let Some(name) = names.clone().find(|name| filter.selects(&module.name, module.is_main, name)) else {
                    continue;
                };
                let name = name.to_string();
                if let Some(reason) = untraceable(&name) {
                    selection.refused.push(RefusedSite {
                        kind: "entry".into(),
                        addr: sym.addr,
                        function: name.clone(),
                        reason: reason.into(),
                    });
                    continue;
                }
                let method = match site_of.get(&sym_index) {
                    Some(site) => match usable(site, sym.addr) {
                        Ok(()) => SiteMethod::Compiler(*site),
                        Err(reason) => {
                            selection.refused.push(RefusedSite {
                                kind: kind_name(site.kind).into(),
                                addr: site.addr,
                                function: name.clone(),
                                reason: format!("{reason}; probed at its entry instead"),
                            });
                            SiteMethod::Entry
                        }
                    },
                    // In a module built with NOP sites, a function without one was built
                    // apart (crt and libc_nonshared pieces: `atexit`, `__gmon_start__`):
                    // traced only when a pattern names it.
                    None if !sites.is_empty() && filter.include.is_empty() => continue,
                    None => SiteMethod::Entry,
                };
                selection.functions.push(TracedFunction {
                    id: first_id + selection.functions.len() as u32,
                    addr: sym.addr,
                    module: module.name.clone(),
                    name,
                    method,
                });
            }
        }
        // A library that is not loaded yet: its functions are chosen when it is.
        selection.pending = Selection::pending_patterns(table, filter);
        if let Some(i) = matched
            .iter()
            .enumerate()
            .position(|(i, m)| !m && require_matches && !selection.pending.contains(&filter.include[i].text))
        {
            let pattern = &filter.include[i];
            let names = table
                .symbols()
                .iter()
                .filter(|s| pattern.covers_module(&table.modules()[s.module].name, table.modules()[s.module].is_main))
                .map(|s| s.name.as_str());
            return Err(FtraceError::NoMatch {
                pattern: pattern.text.clone(),
                nearest: nearest(&pattern.glob, names, 5),
            });
        }
        Ok(selection)
    }

    /// How many functions use each kind of site: (kind, count), in the order `mcount`,
    /// `patchable`, `entry`.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        ["mcount", "patchable", "entry"]
            .into_iter()
            .map(|k| (k, self.functions.iter().filter(|f| f.method.kind_name() == k).count() as u64))
            .collect()
    }
}

/// Why the function graph cannot follow calls of `name`, if it cannot: replacing its return
/// address would break it.
/// The implementations the dynamic linker chose in this process for module `index`'s
/// indirect functions (`STT_GNU_IFUNC`, default versions), each with the public names that
/// lead to it, sorted: glibc's `memcpy` and `memmove` both lead to
/// `__memmove_avx_unaligned_erms`. One whose implementation no symbol names (a stripped
/// library without its debug symbols) cannot be traced — its bounds are unknown, so its
/// entry cannot have a jump —: when the filter selects it, it is refused with that reason.
fn ifunc_implementations(
    table: &SymbolTable,
    index: usize,
    filter: &Filter,
    refused: &mut Vec<RefusedSite>,
) -> HashMap<u64, Vec<String>> {
    let module = &table.modules()[index];
    let mut public: HashMap<u64, Vec<String>> = HashMap::new();
    let ifuncs = table.symbols().iter().filter(|s| s.module == index && !s.mangled.contains('@') && table.is_ifunc(s));
    for sym in ifuncs {
        let Some(addr) = dynprobe_probe::ifunc::chosen_implementation(table, sym) else { continue };
        match table.resolve(addr) {
            Some((_, 0)) => public.entry(addr).or_default().push(sym.name.clone()),
            _ if filter.selects(&module.name, module.is_main, &sym.name) => refused.push(RefusedSite {
                kind: "entry".into(),
                addr,
                function: sym.name.clone(),
                reason: format!(
                    "an indirect function whose implementation here ({addr:#x}) no symbol names, so its bounds are \
                     unknown; the library's debug symbols name it (Debian: the -dbg package, e.g. libc6-dbg)"
                ),
            }),
            _ => {}
        }
    }
    for names in public.values_mut() {
        names.sort();
        names.dedup();
    }
    public
}

fn untraceable(name: &str) -> Option<&'static str> {
    if dynprobe_probe::RETURNS_TWICE.contains(&name) {
        return Some(
            "it returns twice (setjmp, vfork, getcontext): the second return would find its return address consumed",
        );
    }
    if name.starts_with(V8_BUILTIN) {
        return Some(
            "it is a V8 embedded builtin (JavaScript engine code with its own calling convention, whose frames V8 \
             walks by their return addresses): a replaced return address sends V8 into a loop",
        );
    }
    if called_through_v8_exit_frames(name) {
        return Some(
            "V8's generated code calls it through an exit frame (a runtime function, a C++ builtin, an API \
             callback), whose return address V8's garbage collector reads: a replaced one makes V8 abort \
             (\"Check failed: maybe_code.has_value()\")",
        );
    }
    NOT_CALLED.iter().any(|prefix| name.starts_with(prefix)).then_some(
        "it is not entered by a call (a PLT or TLS-descriptor trampoline, a context start, the signal return): \
         no return address is at rsp on its first instruction",
    )
}

/// Whether `name`, as the symbol table spells it, is a part of a function the compiler moved
/// out of it (GCC's and LLVM's `f.cold`, `f.cold.1`: the rarely run blocks of `f`, entered
/// by a jump from `f`, never by a call): not a function of its own, so not counted, patched
/// or traced apart from `f` — its first instruction finds one of `f`'s locals at `rsp`, not a
/// return address. The mangled name, since a demangler spells a C++ one's suffix
/// `f(int) [clone .cold]`. (`f.part.0`, `f.isra.0`, `f.constprop.0` are clones that are
/// called: they are functions.)
fn is_fragment(name: &str) -> bool {
    name.split('.').skip(1).any(|part| part == "cold")
}

fn kind_name(kind: SiteKind) -> &'static str {
    match kind {
        SiteKind::Mcount => "mcount",
        SiteKind::Patchable { .. } => "patchable",
    }
}

/// `endbr64`, the only instruction a site may follow (`-fcf-protection`).
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// Whether a compiler site at `site.addr` can become the tracer's call for the function at
/// `function`: at its entry (or right after its `endbr64`), where the return address is at
/// `rsp`, with room for a 5-byte call.
fn usable(site: &CompilerSite, function: u64) -> Result<(), String> {
    let after_endbr = site.addr == function + 4 && {
        let mut first = [0u8; 4];
        dynprobe_text::memory::read(function, &mut first).is_ok() && first == ENDBR64
    };
    if site.addr != function && !after_endbr {
        // `-pg` without `-mfentry` puts the site after the prologue (`push %rbp; mov
        // %rsp,%rbp` is 4 bytes too), where `rsp` holds no return address.
        return Err(format!(
            "the site is {:+} bytes into the function, not at its entry or after an endbr64 (built with -pg \
             without -mfentry?): no return address is at rsp there",
            site.addr as i64 - function as i64
        ));
    }
    match site.kind {
        SiteKind::Patchable { nops } if nops < 5 => {
            Err(format!("only {nops} patchable NOPs (a call needs 5: build with -fpatchable-function-entry=5)"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v8_builtins_and_trampolines_are_refused_with_the_reason() {
        let why = untraceable("Builtins_InterpreterEntryTrampoline").expect("refused");
        assert!(why.contains("V8 embedded builtin"), "{why}");
        assert!(untraceable("_dl_runtime_resolve_xsavec").is_some());
        assert!(untraceable("setjmp").is_some());
        assert!(untraceable("v8::internal::Heap::CollectGarbage").is_none() && untraceable("parse_record").is_none());
        for exit_frame_callee in [
            "v8::internal::Runtime_StringSplit(int, unsigned long*, v8::internal::Isolate*)",
            "v8::internal::Builtin_ArrayPush(int, unsigned long*, v8::internal::Isolate*)",
            "node::fs::Read(v8::FunctionCallbackInfo<v8::Value> const&)",
            "node::GetterCallback(v8::Local<v8::Name>, v8::PropertyCallbackInfo<v8::Value> const&)",
        ] {
            let why = untraceable(exit_frame_callee).expect("refused");
            assert!(why.contains("exit frame"), "{why}");
        }
    }

    #[test]
    fn cold_parts_are_not_functions() {
        assert!(is_fragment("hot.cold") && is_fragment("f.cold.12") && is_fragment("f.part.0.cold"));
        assert!(!is_fragment("f.part.0") && !is_fragment("coldstart") && !is_fragment("f.isra.0"));
        assert!(is_fragment("_ZN4node6loader10ModuleWrap8EvaluateERKN2v820FunctionCallbackInfoINS1_5ValueEEE.cold"));
    }
}
