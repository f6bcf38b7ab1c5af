//! The symbol table of the test process itself, checked against addresses the compiler
//! and the dynamic linker give us.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::OnceLock;

use dynprobe_symbols::{SymbolError, SymbolTable};

/// A C-named function whose address we know from a function pointer.
#[no_mangle]
#[inline(never)]
pub extern "C" fn dynprobe_symbols_test_fn() -> u64 {
    // Some body, so the function is more than one byte long.
    std::hint::black_box(42u64).wrapping_mul(std::hint::black_box(3))
}

/// A Rust-mangled function.
#[inline(never)]
pub fn rust_mangled_test_fn(x: u64) -> u64 {
    std::hint::black_box(x).rotate_left(7) ^ 0x55
}

/// Loading is not free and the table does not change: share one between tests.
fn table() -> &'static SymbolTable {
    static TABLE: OnceLock<SymbolTable> = OnceLock::new();
    TABLE.get_or_init(|| SymbolTable::current_process().expect("load own symbols"))
}

#[test]
fn finds_a_c_named_function_at_its_address() {
    let t = table();
    let addr = dynprobe_symbols_test_fn as *const () as u64;
    let sym = t.lookup("dynprobe_symbols_test_fn").unwrap();
    assert_eq!(sym.addr, addr);
    assert_eq!(sym.name, "dynprobe_symbols_test_fn");
    assert!(sym.size > 1, "size {}", sym.size);
    assert!(t.modules()[sym.module].is_main);

    let (hit, offset) = t.resolve(addr + 1).unwrap();
    assert_eq!((hit.addr, offset), (addr, 1));
    let (start, end) = t.function_bounds(addr + 1).unwrap();
    assert!(start == addr && end > addr + 1 && end == addr + sym.size);
    assert!(!matches!(t.resolve(end), Some((s, _)) if s.addr == addr));

    let exe = &t.modules()[sym.module].name;
    assert_eq!(t.format_addr(addr + 1), format!("dynprobe_symbols_test_fn+0x1 [{exe}]"));
    // The executable's own name qualifies too.
    assert_eq!(t.lookup(&format!("{exe}:dynprobe_symbols_test_fn")).unwrap().addr, addr);
}

#[test]
fn demangles_rust_names_without_the_hash() {
    let t = table();
    let addr = rust_mangled_test_fn as *const () as u64;
    let (sym, 0) = t.resolve(addr).unwrap() else { panic!("not at the start of a symbol") };
    assert!(sym.mangled.starts_with("_ZN") || sym.mangled.starts_with("_R"), "{}", sym.mangled);
    assert_eq!(sym.name, "current_process::rust_mangled_test_fn");
    // Found by demangled name, mangled name, and path suffix.
    assert_eq!(t.lookup("current_process::rust_mangled_test_fn").unwrap().addr, addr);
    assert_eq!(t.lookup(&sym.mangled).unwrap().addr, addr);
    assert_eq!(t.lookup("rust_mangled_test_fn").unwrap().addr, addr);
    // Legacy mangling ends in `17h<16 hex digits>E`: the name with that hash matches too.
    if let Some(hash) = sym.mangled.strip_prefix("_ZN").and_then(|m| m.get(m.len() - 18..)) {
        let with_hash = format!("{}::{}", sym.name, &hash[..17]);
        assert_eq!(t.lookup(&with_hash).unwrap().addr, addr, "{with_hash}");
    }
    assert_eq!(rust_mangled_test_fn(1), (1u64 << 7) ^ 0x55);
}

#[test]
fn libc_function_matches_the_dynamic_linker() {
    let t = table();
    // `libc::getpid as usize` could be a PLT stub in our executable; ask ld.so instead.
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name has no preconditions.
    let real = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"getpid".as_ptr()) } as u64;
    assert_ne!(real, 0);
    let sym = t.lookup("libc:getpid").unwrap();
    assert_eq!(sym.addr, real);
    assert_eq!(t.modules()[sym.module].name, "libc.so.6");
    assert_eq!(t.lookup("libc.so.6:getpid").unwrap().addr, real);
    assert_eq!(t.lookup("getpid").unwrap().addr, real);
    assert!(t.format_addr(real + 2).ends_with("+0x2 [libc.so.6]"));
    assert!(!t.is_ifunc(sym));
    // glibc picks memcpy's implementation per CPU: the symbol is its resolver.
    let memcpy = t.lookup("libc:memcpy").unwrap();
    assert!(t.is_ifunc(memcpy));
    // SAFETY: as above.
    let bound = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"memcpy".as_ptr()) } as u64;
    assert_ne!(bound, memcpy.addr, "dlsym returns the resolved implementation");
    assert!(t.resolve(bound).is_some());
    // The compat version keeps its version suffix instead of clashing with the default.
    assert!(t.lookup("libc:memcpy@GLIBC_2.2.5").is_ok());
}

#[test]
fn libc_file_offset_holds_the_same_bytes_as_memory() {
    let t = table();
    let sym = t.lookup("libc:getpid").unwrap();
    let (path, offset) = t.file_offset(sym.addr).unwrap();
    let mut from_file = [0u8; 16];
    let mut f = File::open(&path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut from_file).unwrap();
    // SAFETY: getpid's first 16 bytes are mapped, readable code of libc.
    let in_memory = unsafe { std::slice::from_raw_parts(sym.addr as *const u8, 16) };
    assert_eq!(&from_file, in_memory);
}

#[test]
fn modules_have_consistent_biases_and_ranges() {
    let t = table();
    let modules = t.modules();
    assert!(modules[0].is_main, "main executable first");
    assert_eq!(modules.iter().filter(|m| m.is_main).count(), 1);
    let libc = modules.iter().find(|m| m.name == "libc.so.6").unwrap();
    // libc's ELF header is mapped at bias + 0 (its first PT_LOAD has vaddr 0).
    assert_eq!(libc.ranges[0].0, libc.bias);
    // SAFETY: the first page of a mapped ELF file holds its header.
    let magic = unsafe { std::slice::from_raw_parts(libc.bias as *const u8, 4) };
    assert_eq!(magic, b"\x7fELF");
    let libc_index = modules.iter().position(|m| m.name == "libc.so.6").unwrap();
    assert!(t.module_of(libc.ranges[0].0).unwrap().name == "libc.so.6");
    assert!(t.module_of(8).is_none());
    assert_eq!(t.format_addr(8), "0x8");

    let symbols = t.symbols();
    assert!(symbols.windows(2).all(|w| w[0].addr <= w[1].addr), "sorted");
    assert!(symbols.iter().all(|s| modules[s.module].contains(s.addr)));
    assert!(symbols.iter().any(|s| s.module == libc_index));
    // .symtab and .dynsym overlap in our executable; every (addr, name) pair appears once.
    let mut pairs: Vec<_> = symbols.iter().map(|s| (s.addr, &s.mangled)).collect();
    let total = pairs.len();
    pairs.dedup();
    assert_eq!(pairs.len(), total);
    assert!(t.warnings().is_empty(), "{:?}", t.warnings());
}

#[test]
fn vdso_symbols_are_named() {
    let t = table();
    // SAFETY: getauxval has no preconditions.
    let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
    let module = t.module_of(vdso).expect("vdso module");
    assert_eq!(module.name, "[vdso]");
    let sym = t.lookup("[vdso]:__vdso_clock_gettime").unwrap();
    assert!(module.contains(sym.addr));
    assert!(t.file_offset(sym.addr).is_none(), "the vdso has no file");
}

#[test]
fn unknown_symbol_suggests_close_names() {
    let err = table().lookup("dynprobe_symbols_tset_fn").unwrap_err();
    match &err {
        SymbolError::UnknownSymbol { name, suggestions } => {
            assert_eq!(name, "dynprobe_symbols_tset_fn");
            assert_eq!(suggestions[0], "dynprobe_symbols_test_fn");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("did you mean `dynprobe_symbols_test_fn`"));

    // Within a module, suggestions come from that module.
    match table().lookup("libc:getpdi").unwrap_err() {
        SymbolError::UnknownSymbol { suggestions, .. } => {
            assert!(suggestions.iter().any(|s| s == "getpid"), "{suggestions:?}")
        }
        other => panic!("{other:?}"),
    }
    match table().lookup("no_such_function_anywhere_at_all").unwrap_err() {
        SymbolError::UnknownSymbol { suggestions, .. } => assert!(suggestions.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_module_lists_loaded_modules() {
    let err = table().lookup("libnothere:getpid").unwrap_err();
    match &err {
        SymbolError::UnknownModule { name, loaded } => {
            assert_eq!(name, "libnothere");
            assert!(loaded.iter().any(|m| m == "libc.so.6"), "{loaded:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("`libc.so.6`"), "{err}");
    // A prefix must stop at '.' or '-': `lib` is not `libc`.
    assert!(matches!(table().lookup("lib:getpid"), Err(SymbolError::UnknownModule { .. })));
}

#[test]
fn no_such_process() {
    // Pid numbers above the kernel's pid_max (at most 2^22) never exist.
    let pid = 1 << 23;
    assert_eq!(SymbolTable::for_pid(pid).unwrap_err(), SymbolError::NoSuchProcess { pid });
    assert!(matches!(SymbolTable::for_pid(-5), Err(SymbolError::NoSuchProcess { pid: -5 })));
}

#[test]
fn for_pid_of_ourselves_matches_current_process() {
    let pid = std::process::id() as i32;
    let other = SymbolTable::for_pid(pid).unwrap();
    let t = table();
    let addr = dynprobe_symbols_test_fn as *const () as u64;
    assert_eq!(other.lookup("dynprobe_symbols_test_fn").unwrap().addr, addr);
    assert_eq!(other.modules().len(), t.modules().len());
}

#[test]
fn the_loaded_code_paths_are_the_modules_with_code() {
    let paths = dynprobe_symbols::loaded_code_paths().unwrap();
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    assert!(paths.contains(&exe), "{paths:?} lacks {exe:?}");
    assert!(paths.iter().any(|p| p.to_string_lossy().contains("libc.so")), "{paths:?}");
    let table = dynprobe_symbols::SymbolTable::current_process().unwrap();
    for path in &paths {
        assert!(table.modules().iter().any(|m| &m.path == path), "{path:?} is no module of the table");
    }
}
