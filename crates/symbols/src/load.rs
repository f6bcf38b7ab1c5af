//! Building a [`SymbolTable`] from `/proc`.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::demangle::demangle;
use crate::elf::{self, ElfInfo, RawSymbol};
use crate::maps::{self, MappedFile, Mapping, RootView};
use crate::{Module, ModuleFile, Symbol, SymbolError, SymbolExtra, SymbolTable};

/// A module before symbols are merged: its public face, its file facts, its raw symbols,
/// and the names it needs (for ordering).
struct Loaded {
    module: Module,
    file: ModuleFile,
    info: ElfInfo,
}

/// Loads the table of `pid`, or of the calling process for `None`.
pub(crate) fn load(pid: Option<i32>) -> Result<SymbolTable, SymbolError> {
    let proc_dir = match pid {
        Some(pid) if pid <= 0 => return Err(SymbolError::NoSuchProcess { pid }),
        Some(pid) => PathBuf::from(format!("/proc/{pid}")),
        None => PathBuf::from("/proc/self"),
    };
    let maps_path = proc_dir.join("maps");
    let maps = fs::read_to_string(&maps_path).map_err(|e| match (e.kind(), pid) {
        (io::ErrorKind::NotFound, Some(pid)) => SymbolError::NoSuchProcess { pid },
        _ => SymbolError::Io { path: maps_path.clone(), reason: e.to_string() },
    })?;
    let view = match pid {
        Some(pid) => RootView::for_pid(pid),
        None => RootView::current(),
    };
    // The kernel's own answer to "which file is the program"; it may be unreadable for a
    // process we may not ptrace, in which case the first mapped file (the kernel maps the
    // executable before the interpreter) stands in.
    let exe = fs::read_link(proc_dir.join("exe")).ok().map(|p| {
        let s = p.to_string_lossy();
        s.strip_suffix(" (deleted)").map_or(p.clone(), PathBuf::from)
    });

    let files: Vec<MappedFile> = maps::mapped_files(&maps).into_iter().filter(MappedFile::has_code).collect();
    let main_index = exe.and_then(|exe| files.iter().position(|f| Path::new(&f.path) == exe)).unwrap_or(0);

    // dynprobe's own library (the agent), when this is its process: only the functions it
    // exports are kept. Nothing in it may be probed or traced (the probe layer refuses the
    // whole library by its address), and the thousands of Rust symbols it holds made up
    // most of the demangling of a small program, which every image a probed program execs
    // pays again.
    let own_code = pid.is_none().then_some(load as *const () as u64);
    let is_own = |i: usize, file: &MappedFile| {
        i != main_index && own_code.is_some_and(|at| file.mappings.iter().any(|m| (m.start..m.end).contains(&at)))
    };
    let mut loaded = Vec::with_capacity(files.len() + 1);
    let mut warnings = Vec::new();
    for (i, file) in files.iter().enumerate() {
        match load_file(&view, file, i == main_index) {
            Ok(mut l) => {
                if is_own(i, file) {
                    l.info.symbols.retain(|s| s.global);
                }
                loaded.push(l)
            }
            // Without the executable there is nothing to trace: say why.
            Err(e) if i == main_index => return Err(e),
            Err(e) => warnings.push(e),
        }
    }
    if !loaded.iter().any(|l| l.module.is_main) {
        return Err(SymbolError::Io {
            path: maps_path,
            reason: "the process has no mapped executable (a zombie or a kernel thread?)".to_string(),
        });
    }
    // The vdso is a nicety (it names `clock_gettime` in stack traces): if its memory
    // cannot be read, go on without it.
    if let Some(vdso) = maps::find_vdso(&maps) {
        loaded.extend(load_vdso(&proc_dir, &vdso));
    }

    let loaded = load_order(loaded);
    Ok(assemble(loaded, warnings))
}

fn load_file(view: &RootView, file: &MappedFile, is_main: bool) -> Result<Loaded, SymbolError> {
    let readable = maps::readable_path(view, file);
    let mut info = elf::read_path(&readable)?;
    if !info.has_symtab && !add_debug_file_symbols(&mut info, &readable) && is_main {
        // A stripped executable: its functions are still known by their unwind entries.
        let unnamed = crate::unwind::functions_of(&readable, &info.symbols);
        info.symbols.extend(unnamed);
    }
    // Prefer the mapping of file offset 0 (it holds the ELF header and is always the
    // first PT_LOAD); any mapping works as long as a segment covers its offset.
    let anchor = file.mappings.iter().find(|m| m.offset == 0).unwrap_or(&file.mappings[0]);
    let bias = info.bias_from_mapping(anchor.start, anchor.offset).ok_or_else(|| SymbolError::Parse {
        path: readable.clone(),
        reason: format!("no loadable segment covers file offset {:#x}, mapped at {:#x}", anchor.offset, anchor.start),
    })?;
    let path = PathBuf::from(&file.path);
    Ok(Loaded {
        module: Module { name: file_name(&path), path, bias, ranges: file.ranges(), is_main },
        file: ModuleFile { readable: Some(readable), segments: info.segments.clone() },
        info,
    })
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.to_string_lossy(), |n| n.to_string_lossy()).into_owned()
}

/// Stripped binaries (Debian's libraries) keep their full symbol table in a separate
/// debug file when the `-dbg` package is installed; merge its functions in. Whether one
/// was found.
fn add_debug_file_symbols(info: &mut ElfInfo, file: &Path) -> bool {
    for candidate in elf::debug_file_candidates(info, file) {
        let Ok(debug) = elf::read_path(&candidate) else {
            continue;
        };
        // A debug file for another build would give wrong addresses: insist on the same
        // build id whenever both files carry one.
        if info.build_id.is_some() && debug.build_id.is_some() && debug.build_id != info.build_id {
            continue;
        }
        info.symbols.extend(debug.symbols);
        return true;
    }
    false
}

/// Parses the vdso from the process's memory: it has no file.
fn load_vdso(proc_dir: &Path, vdso: &Mapping) -> Option<Loaded> {
    let mem = fs::File::open(proc_dir.join("mem")).ok()?;
    let mut image = vec![0; usize::try_from(vdso.end - vdso.start).ok()?];
    mem.read_exact_at(&mut image, vdso.start).ok()?;
    let info = elf::read_bytes(&image).ok()?;
    let bias = info.bias_from_mapping(vdso.start, 0)?;
    Some(Loaded {
        module: Module {
            path: PathBuf::from("[vdso]"),
            name: "[vdso]".to_string(),
            bias,
            ranges: vec![(vdso.start, vdso.end)],
            is_main: false,
        },
        file: ModuleFile { readable: None, segments: info.segments.clone() },
        info,
    })
}

/// Orders modules as the dynamic linker searches them: the executable, then its
/// `DT_NEEDED` libraries breadth-first, then the rest in address order.
fn load_order(mut rest: Vec<Loaded>) -> Vec<Loaded> {
    let mut ordered = Vec::with_capacity(rest.len());
    let main = rest.iter().position(|l| l.module.is_main);
    ordered.extend(main.map(|i| rest.remove(i)));
    let mut next = 0;
    while next < ordered.len() {
        for needed in ordered[next].info.needed.clone() {
            // A library linked without a soname is needed by the path it was linked as.
            let provides = |l: &Loaded| {
                l.info.soname.as_deref() == Some(needed.as_str())
                    || l.module.name == needed
                    || l.module.path.as_os_str() == needed.as_str()
            };
            if let Some(i) = rest.iter().position(provides) {
                ordered.push(rest.remove(i));
            }
        }
        next += 1;
    }
    ordered.extend(rest);
    ordered
}

/// Merges the modules' symbols into one address-sorted table with name indices.
fn assemble(loaded: Vec<Loaded>, warnings: Vec<SymbolError>) -> SymbolTable {
    let mut raw: Vec<(usize, RawSymbol)> = Vec::new();
    let mut modules = Vec::with_capacity(loaded.len());
    let mut files = Vec::with_capacity(loaded.len());
    for (index, l) in loaded.into_iter().enumerate() {
        let bias = l.module.bias;
        raw.extend(l.info.symbols.into_iter().map(|mut s| {
            s.value = s.value.wrapping_add(bias);
            (index, s)
        }));
        modules.push(l.module);
        files.push(l.file);
    }

    // `.symtab` repeats what `.dynsym` exports (and a debug file repeats `.symtab`):
    // merge equal (address, name) pairs before the costly demangling.
    raw.sort_unstable_by(|(_, a), (_, b)| (a.value, &a.mangled).cmp(&(b.value, &b.mangled)));
    raw.dedup_by(|later, kept| {
        let same = later.1.value == kept.1.value && later.1.mangled == kept.1.mangled;
        if same {
            kept.1.size = kept.1.size.max(later.1.size);
            kept.1.global |= later.1.global;
            kept.1.ifunc |= later.1.ifunc;
        }
        same
    });

    // At one address several aliases may exist (`getpid`, `__getpid`); `resolve` shows the
    // first, so put the one a person would write first: exported, sized, fewest leading
    // underscores, shortest.
    let preference = |s: &RawSymbol| {
        let underscores = s.mangled.bytes().take_while(|&b| b == b'_').count();
        (!s.global, s.size == 0, underscores, s.mangled.len())
    };
    raw.sort_by(|(_, a), (_, b)| (a.value, preference(a), &a.mangled).cmp(&(b.value, preference(b), &b.mangled)));

    let mut symbols = Vec::with_capacity(raw.len());
    let mut extra = Vec::with_capacity(raw.len());
    for (module, s) in raw {
        let d = demangle(&s.mangled);
        symbols.push(Symbol { name: d.name, mangled: s.mangled, addr: s.value, size: s.size, module });
        extra.push(SymbolExtra { short: d.short, global: s.global, ifunc: s.ifunc });
    }

    let by_name = sorted_index(symbols.len(), |i| Some(symbols[i].name.as_str()));
    let by_mangled = sorted_index(symbols.len(), |i| Some(symbols[i].mangled.as_str()));
    let by_short = sorted_index(symbols.len(), |i| extra[i].short.as_deref());
    let max_size = symbols.iter().map(|s| s.size).max().unwrap_or(0);

    SymbolTable { modules, files, symbols, extra, by_name, by_mangled, by_short, max_size, warnings }
}

/// Indices `0..len` that have a key, sorted by it.
fn sorted_index<'a>(len: usize, key: impl Fn(usize) -> Option<&'a str>) -> Vec<u32> {
    let mut index: Vec<u32> = (0..len).filter(|&i| key(i).is_some()).map(|i| i as u32).collect();
    index.sort_unstable_by(|&a, &b| key(a as usize).cmp(&key(b as usize)));
    index
}
