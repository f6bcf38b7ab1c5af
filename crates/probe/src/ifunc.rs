//! GNU indirect functions (`STT_GNU_IFUNC`: glibc's `memcpy`, `memset`, `strlen`, …): the
//! symbol's address is a *resolver*, which the dynamic linker runs when it relocates the
//! program and which returns the implementation for this CPU
//! (`__memmove_avx_unaligned_erms`, …); every call then goes straight there. A probe on
//! such a name belongs on the implementation the linker chose for this process, which
//! `dlsym(3)` returns: for an indirect function it gives the resolver's result, as a
//! relocation would.

use dynprobe_symbols::{Symbol, SymbolTable};
use std::ffi::{CStr, CString};

/// The implementation the dynamic linker chose in this process for the indirect function
/// `sym` (one of `table`'s symbols), asked from its own module (`dlopen` with
/// `RTLD_NOLOAD` by the name the loader knows it under, then `dlsym`, or `dlvsym` for a
/// versioned name such as `memcpy@GLIBC_2.2.5`). `None` when the loader does not know the
/// module or the name.
pub fn chosen_implementation(table: &SymbolTable, sym: &Symbol) -> Option<u64> {
    let module = table.modules().get(sym.module)?;
    let (name, version) = match sym.mangled.split_once('@') {
        Some((name, version)) => (name, Some(version.trim_start_matches('@'))),
        None => (sym.mangled.as_str(), None),
    };
    let name = CString::new(name).ok()?;
    let version = version.map(CString::new).transpose().ok()?;
    // The loader's own name for the module: the one that contains the resolver.
    // SAFETY: Dl_info is plain data; dladdr only fills it in and accepts any address.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let found = unsafe { libc::dladdr(sym.addr as *const libc::c_void, &mut info) } != 0;
    if !found || info.dli_fname.is_null() {
        return None;
    }
    let file: Option<&CStr> = if module.is_main {
        // dlopen(NULL) is the main program (dlopen(3)).
        None
    } else {
        // SAFETY: dli_fname is the loader's NUL-terminated name of the object.
        Some(unsafe { CStr::from_ptr(info.dli_fname) })
    };
    // SAFETY: RTLD_NOLOAD only looks the object up (and counts a reference, given back
    // below); the name is NUL-terminated.
    let handle =
        unsafe { libc::dlopen(file.map_or(std::ptr::null(), CStr::as_ptr), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return None;
    }
    // SAFETY: `handle` is live; the names are NUL-terminated. For an indirect function
    // dlsym runs its resolver, which only reads the CPU's features.
    let addr = unsafe {
        match &version {
            Some(version) => libc::dlvsym(handle, name.as_ptr(), version.as_ptr()),
            None => libc::dlsym(handle, name.as_ptr()),
        }
    } as u64;
    // SAFETY: gives back the reference the dlopen above took; the module stays loaded.
    unsafe { libc::dlclose(handle) };
    (addr != 0 && addr != sym.addr).then_some(addr)
}

/// The other indirect functions of `sym`'s module (default versions, by name) whose chosen
/// implementation is `implementation` too: glibc's `memcpy` and `memmove` share
/// `__memmove_avx_unaligned_erms`, so a probe there sees the calls of both.
pub fn sharing_implementation(table: &SymbolTable, sym: &Symbol, implementation: u64) -> Vec<String> {
    let mut names: Vec<String> = table
        .symbols()
        .iter()
        .filter(|s| s.module == sym.module && s.name != sym.name && !s.mangled.contains('@') && table.is_ifunc(s))
        .filter(|s| chosen_implementation(table, s) == Some(implementation))
        .map(|s| s.name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}
