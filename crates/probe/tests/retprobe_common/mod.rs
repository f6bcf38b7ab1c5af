//! Shared by the return-probe tests: C and C++ targets built and loaded like
//! `common::Target`, and the lock that makes the tests take turns.
#![allow(dead_code)]

use std::ffi::CString;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// A shared object built from `tests/targets/{name}` (`.c` with gcc, `.cpp` with g++) and
/// loaded with `dlopen`.
pub struct Lib {
    handle: *mut libc::c_void,
}

// SAFETY: a dlopen handle may be used from any thread.
unsafe impl Send for Lib {}
// SAFETY: as above; dlsym is thread-safe.
unsafe impl Sync for Lib {}

impl Lib {
    /// Compiles the target (`-O1 -fPIC -shared`, plus `flags`) and loads it. Panics with the
    /// compiler's message if it does not build: a test never skips.
    pub fn build(file: &str, flags: &[&str]) -> Lib {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/targets").join(file);
        let compiler = if file.ends_with(".cpp") { "g++" } else { "gcc" };
        let stem = file.split('.').next().unwrap();
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("lib{stem}-{}.so", std::process::id()));
        let output = Command::new(compiler)
            .args(["-O1", "-g", "-fPIC", "-shared", "-pthread", "-Wl,-Bsymbolic", "-o"])
            .arg(&out)
            .arg(&src)
            .args(flags)
            .output()
            .unwrap_or_else(|e| panic!("{compiler} must be installed to build the test targets (scripts/setup): {e}"));
        assert!(
            output.status.success(),
            "{compiler} failed on {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let path = CString::new(out.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; the targets' constructors have no effects.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!handle.is_null(), "dlopen {} failed", out.display());
        Lib { handle }
    }

    /// The address of a symbol of the target.
    pub fn addr(&self, symbol: &str) -> u64 {
        let name = CString::new(symbol).unwrap();
        // SAFETY: valid handle and NUL-terminated name.
        let addr = unsafe { libc::dlsym(self.handle, name.as_ptr()) };
        assert!(!addr.is_null(), "symbol {symbol} not found in the target");
        addr as u64
    }

    /// A `long f(long)` function of the target.
    pub fn func1(&self, symbol: &str) -> extern "C" fn(i64) -> i64 {
        // SAFETY: the targets' functions looked up this way all are `long f(long)`.
        unsafe { std::mem::transmute::<u64, extern "C" fn(i64) -> i64>(self.addr(symbol)) }
    }
}

/// Probes patch process-wide code and the tests count hits exactly: they take turns.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The symbol `dladdr` names for `addr`, or "?".
pub fn symbol_of(addr: u64) -> String {
    // SAFETY: dladdr only reads the loader's tables; an all-zero Dl_info is valid.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: any address may be asked about.
    let found = unsafe { libc::dladdr(addr as *const libc::c_void, &mut info) };
    if found == 0 || info.dli_sname.is_null() {
        return "?".to_string();
    }
    // SAFETY: dladdr set a NUL-terminated name that lives as long as the module.
    unsafe { std::ffi::CStr::from_ptr(info.dli_sname) }.to_string_lossy().into_owned()
}
