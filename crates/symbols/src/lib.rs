//! Symbols of every module loaded in a process: name ↔ address, function bounds,
//! demangling, and the file offsets the kernel's uprobe PMU wants.
//!
//! A [`SymbolTable`] is a snapshot: it reads `/proc/PID/maps` once, parses each mapped ELF
//! file once (`.symtab` and `.dynsym`, plus a separate debug file when the binary was
//! stripped and one is installed), and keeps every function symbol at its *runtime*
//! address. Libraries loaded later (`dlopen`) need a new snapshot.
//!
//! ```
//! use dynprobe_symbols::SymbolTable;
//!
//! let table = SymbolTable::current_process()?;
//! let getpid = table.lookup("libc:getpid")?;
//! assert_eq!(table.resolve(getpid.addr + 1).unwrap().1, 1);
//! println!("{}", table.format_addr(getpid.addr + 4)); // "getpid+0x4 [libc.so.6]"
//! # Ok::<(), dynprobe_symbols::SymbolError>(())
//! ```

mod demangle;
pub mod dwarf;
mod elf;
mod error;
mod load;
mod lookup;
pub mod maps;
mod markers;
mod sites;
mod unwind;

use std::path::PathBuf;

pub use error::SymbolError;

/// The name a linker name `mangled` goes by in symbol tables and traces (`SymbolTable`'s
/// [`Symbol::name`]): Rust without its hash, C++ with its parameters, C as it is.
pub fn readable_name(mangled: &str) -> String {
    demangle::demangle(mangled).name
}
pub use lookup::split_spec as split_module;
pub use markers::{
    nearest_markers, read_markers, ArgKind, ArgLocation, MarkerArg, MarkerGate, MarkerSite, ARG_REGISTERS,
    MARKER_RECORD_SECTION, MARKER_RECORD_VERSION,
};
pub use sites::{CompilerSite, SiteKind};

/// One ELF file mapped into the process (the executable, a shared library, the vdso).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The path as the process sees it (the last column of `/proc/PID/maps`; `[vdso]` for
    /// the vdso). Inside a container this is relative to the container's root.
    pub path: PathBuf,
    /// The file name, e.g. `libc.so.6`; this is what `module:name` specs match.
    pub name: String,
    /// Load bias: runtime address = link-time address + `bias`. Zero for a non-PIE
    /// executable.
    pub bias: u64,
    /// The `[start,end)` runtime ranges the file is mapped at, in address order.
    pub ranges: Vec<(u64, u64)>,
    /// Whether this is the process's main executable (`/proc/PID/exe`).
    pub is_main: bool,
}

/// Whether the module named `name` (a file name, `libc.so.6`) is the C library or the
/// dynamic linker (see [`Module::is_c_runtime`]).
pub fn is_c_runtime(name: &str) -> bool {
    name.starts_with("libc.so") || name.starts_with("ld-linux")
}

impl Module {
    /// Whether this is the C library or the dynamic linker: code that a `vfork`-like child
    /// (`posix_spawn`, `system`) and a thread being created run with every signal blocked
    /// or reset, so a breakpoint there would kill them.
    pub fn is_c_runtime(&self) -> bool {
        is_c_runtime(&self.name)
    }

    /// Whether `addr` falls in one of the module's mappings.
    pub fn contains(&self, addr: u64) -> bool {
        self.ranges.iter().any(|&(s, e)| s <= addr && addr < e)
    }

    /// Whether a spec's module part `wanted` names this module exactly: its file name or
    /// its path.
    pub fn is_exactly(&self, wanted: &str) -> bool {
        self.name == wanted || self.path.as_os_str() == wanted
    }

    /// Whether `wanted` names this module exactly or as a prefix of its file name that
    /// stops at a `.` or `-` (`libc` → `libc.so.6`, `libfoo` → `libfoo-1.2.so`).
    pub fn is_named(&self, wanted: &str) -> bool {
        self.is_exactly(wanted) || name_has_prefix(&self.name, wanted)
    }
}

/// Whether `wanted` is a prefix of the file `name` that stops at a `.` or `-`.
fn name_has_prefix(name: &str, wanted: &str) -> bool {
    name.strip_prefix(wanted).is_some_and(|rest| rest.starts_with(['.', '-']))
}

/// Whether a module that `wanted` names (as [`Module::is_named`] matches) is loaded in this
/// process: one read of `/proc/self/maps`, no symbol table.
pub fn module_loaded(wanted: &str) -> Result<bool, SymbolError> {
    Ok(loaded_code_paths()?.iter().any(|path| {
        let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        name == wanted || path.as_os_str() == wanted || name_has_prefix(&name, wanted)
    }))
}

/// A function symbol at its runtime address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// Readable name: Rust without the hash (`demo::work`), C++ with parameters
    /// (`ns::work(int)`), C as is.
    pub name: String,
    /// The name in the symbol table.
    pub mangled: String,
    /// Runtime address of the first instruction.
    pub addr: u64,
    /// Size in bytes as the symbol table states it; 0 when unknown (hand-written assembly).
    pub size: u64,
    /// Index into [`SymbolTable::modules`].
    pub module: usize,
}

impl Symbol {
    /// Whether `addr` is inside the function; a symbol of unknown size contains only its
    /// own address.
    pub fn contains(&self, addr: u64) -> bool {
        addr == self.addr || (self.addr < addr && addr - self.addr < self.size)
    }
}

/// The paths of the files this process has code mapped from (its executable and every
/// loaded library), read from `/proc/self/maps` without reading any of them: a cheap
/// check for new libraries before building a [`SymbolTable`].
pub fn loaded_code_paths() -> Result<Vec<PathBuf>, SymbolError> {
    let text = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| SymbolError::Io { path: PathBuf::from("/proc/self/maps"), reason: e.to_string() })?;
    Ok(maps::mapped_files(&text).into_iter().filter(|f| f.has_code()).map(|f| PathBuf::from(f.path)).collect())
}

/// Per-symbol facts used for lookups but not part of the public [`Symbol`].
#[derive(Debug, Clone)]
struct SymbolExtra {
    /// C++ name without parameters and return type (`ns::work`).
    short: Option<String>,
    /// Global or weak binding (what the dynamic linker binds references to).
    global: bool,
    ifunc: bool,
}

/// What we keep of a module's file to map addresses back to file offsets.
#[derive(Debug, Clone)]
struct ModuleFile {
    /// Where we read the file from (our mount namespace); `None` for the vdso.
    readable: Option<PathBuf>,
    segments: Vec<elf::LoadSegment>,
}

/// The function symbols of every module of one process, by address and by name.
///
/// ```
/// use dynprobe_symbols::{SymbolError, SymbolTable};
///
/// let table = SymbolTable::current_process()?;
/// // Names resolve to runtime addresses, addresses back to names.
/// let malloc = table.lookup("malloc")?;
/// let (sym, offset) = table.resolve(malloc.addr + 2).unwrap();
/// assert_eq!((sym.addr, offset), (malloc.addr, 2));
/// // Typos get a hint.
/// match table.lookup("libc:mallco") {
///     Err(SymbolError::UnknownSymbol { suggestions, .. }) => {
///         assert!(suggestions.contains(&"malloc".to_string()))
///     }
///     other => panic!("{other:?}"),
/// }
/// # Ok::<(), SymbolError>(())
/// ```
#[derive(Debug, Clone)]
pub struct SymbolTable {
    modules: Vec<Module>,
    files: Vec<ModuleFile>,
    /// Sorted by address; at one address the symbol to show comes first (see `load`).
    symbols: Vec<Symbol>,
    extra: Vec<SymbolExtra>,
    /// Indices into `symbols`, sorted by `name`, by `mangled`, and (those that have one)
    /// by `short`, for binary-searched lookups.
    by_name: Vec<u32>,
    by_mangled: Vec<u32>,
    by_short: Vec<u32>,
    /// The largest symbol size, which bounds how far back `resolve` must look.
    max_size: u64,
    warnings: Vec<SymbolError>,
}

impl SymbolTable {
    /// The symbols of the calling process.
    pub fn current_process() -> Result<SymbolTable, SymbolError> {
        load::load(None)
    }

    /// The symbols of process `pid`. Files are read through `/proc/PID/root` when the
    /// process has a different root (a container), and through `/proc/PID/map_files` when
    /// they were deleted after being mapped (needs `CAP_SYS_ADMIN`).
    pub fn for_pid(pid: i32) -> Result<SymbolTable, SymbolError> {
        load::load(Some(pid))
    }

    /// Every module, in the dynamic linker's search order: the main executable first, then
    /// libraries breadth-first along `DT_NEEDED`, then anything else (`dlopen`ed or
    /// preloaded libraries, in address order), the vdso last.
    pub fn modules(&self) -> &[Module] {
        &self.modules
    }

    /// Every function symbol (`STT_FUNC`, `STT_GNU_IFUNC`) of every module, sorted by
    /// address; a symbol listed in both `.symtab` and `.dynsym` appears once. Aliases (two
    /// names, one address) are both listed, the one [`resolve`](Self::resolve) shows first.
    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// Problems with individual libraries that did not stop the table from being built
    /// (a library that could not be read or parsed is left out of [`modules`](Self::modules)).
    pub fn warnings(&self) -> &[SymbolError] {
        &self.warnings
    }

    /// The symbol named by `spec`: `name` or `module:name`.
    ///
    /// `name` may be the demangled name (`demo::work`, `ns::work(int)`), the mangled one,
    /// a Rust name with its hash (`demo::work::h0123456789abcdef`), a C++ name without its
    /// parameters (`ns::work`), or — when nothing matches exactly — the last components of
    /// a path (`work` for `demo::work`). `module` is a module's file name, a prefix of it
    /// that ends before a `.` or `-` (`libc` for `libc.so.6`), or its full path.
    ///
    /// Without a module, the main executable wins, then the first module in load order
    /// that defines the name. The result is [`SymbolError::Ambiguous`] if that module
    /// defines the name at several different addresses (two `static` functions in two
    /// files, or a C++ overload set named without parameters).
    pub fn lookup(&self, spec: &str) -> Result<&Symbol, SymbolError> {
        lookup::lookup(self, spec).map(|i| &self.symbols[i])
    }

    /// The symbol containing `addr`, and `addr`'s offset into it. When functions nest
    /// (a sized function with a label symbol inside), the innermost one is returned.
    pub fn resolve(&self, addr: u64) -> Option<(&Symbol, u64)> {
        let sym = &self.symbols[self.resolve_index(addr)?];
        Some((sym, addr - sym.addr))
    }

    /// [`resolve`](Self::resolve) as an index into [`symbols`](Self::symbols).
    fn resolve_index(&self, addr: u64) -> Option<usize> {
        let after = self.symbols.partition_point(|s| s.addr <= addr);
        let mut found: Option<usize> = None;
        for (i, s) in self.symbols[..after].iter().enumerate().rev() {
            if found.is_some_and(|f| s.addr < self.symbols[f].addr) || addr - s.addr > self.max_size {
                // Left the innermost group, or no symbol this far back can reach `addr`.
                break;
            }
            // Within one address the preferred alias is first; walking backwards, the last
            // one seen that contains `addr` is the one to report.
            if s.contains(addr) {
                found = Some(i);
            }
        }
        found
    }

    /// Whether `sym` (one of [`symbols`](Self::symbols)) is a GNU indirect function
    /// (`STT_GNU_IFUNC`, e.g. glibc's `memcpy`, `strlen`): its address is the *resolver*,
    /// which runs once at relocation time and returns the implementation for this CPU
    /// (`__memcpy_avx_unaligned_erms`, …). A probe there never fires on calls; probe the
    /// implementation instead.
    pub fn is_ifunc(&self, sym: &Symbol) -> bool {
        let first = self.symbols.partition_point(|s| s.addr < sym.addr);
        self.symbols[first..]
            .iter()
            .zip(&self.extra[first..])
            .take_while(|(s, _)| s.addr == sym.addr)
            .any(|(s, e)| e.ifunc && s.mangled == sym.mangled)
    }

    /// Where the implementation of the indirect function `sym` is written in its process:
    /// the runtime address of the slot (a GOT entry) its module's `R_X86_64_IRELATIVE`
    /// relocation fills in, which a process traced from outside can read. `None` when no
    /// such relocation names it (a library that never calls it itself) or the file cannot
    /// be read from here.
    pub fn ifunc_slot(&self, sym: &Symbol) -> Result<Option<u64>, SymbolError> {
        let bias = self.modules[sym.module].bias;
        let Some(path) = self.files[sym.module].readable.as_deref() else { return Ok(None) };
        let resolver = sym.addr.wrapping_sub(bias);
        let slots = elf::read_irelative(path)?;
        Ok(slots.into_iter().find(|&(r, _)| r == resolver).map(|(_, slot)| slot.wrapping_add(bias)))
    }

    /// `[start,end)` of the function containing `addr`, if its size is known.
    pub fn function_bounds(&self, addr: u64) -> Option<(u64, u64)> {
        let (sym, _) = self.resolve(addr)?;
        (sym.size > 0).then(|| (sym.addr, sym.addr + sym.size))
    }

    /// The module mapped at `addr`.
    pub fn module_of(&self, addr: u64) -> Option<&Module> {
        self.modules.iter().find(|m| m.contains(addr))
    }

    /// The file and file offset holding the code at runtime address `addr`, as the kernel's
    /// uprobe PMU wants them (`config1` = path, `config2` = offset). The path is one that
    /// opens the same file from *this* process; `None` for addresses outside any file (the
    /// vdso, anonymous memory, `.bss`).
    pub fn file_offset(&self, addr: u64) -> Option<(PathBuf, u64)> {
        let index = self.modules.iter().position(|m| m.contains(addr))?;
        let file = &self.files[index];
        let vaddr = addr.wrapping_sub(self.modules[index].bias);
        let offset = elf::file_offset(&file.segments, vaddr)?;
        Some((file.readable.clone()?, offset))
    }

    /// `addr` for people: `work+0x4 [demo]`, `0x7f12a0c3e000 [libc.so.6]` inside a module
    /// but no function, `0x1234` outside every module.
    pub fn format_addr(&self, addr: u64) -> String {
        if let Some((sym, offset)) = self.resolve(addr) {
            let module = &self.modules[sym.module].name;
            return format!("{}+{offset:#x} [{module}]", sym.name);
        }
        match self.module_of(addr) {
            Some(m) => format!("{addr:#x} [{}]", m.name),
            None => format!("{addr:#x}"),
        }
    }
}
