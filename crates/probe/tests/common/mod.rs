//! Builds the C targets and loads them into the test process.
#![allow(dead_code)]

use std::ffi::CString;
use std::path::PathBuf;
use std::process::Command;

/// A shared object built from a file of `tests/targets/` (C with gcc, C++ with g++) and
/// loaded with `dlopen`.
pub struct Target {
    handle: *mut libc::c_void,
}

// SAFETY: a dlopen handle may be used from any thread.
unsafe impl Send for Target {}
// SAFETY: as above; dlsym is thread-safe.
unsafe impl Sync for Target {}

impl Target {
    /// Compiles `tests/targets/{file}` (`NAME` for `NAME.c`, or a file name with its `.c` or
    /// `.cpp` extension) with `-O1 -g -fPIC -shared -pthread` plus `flags`, and loads it.
    /// Panics with the compiler's message if it does not build: a test never skips.
    pub fn build(file: &str, flags: &[&str]) -> Target {
        let file = if file.contains('.') { file.to_string() } else { format!("{file}.c") };
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/targets").join(&file);
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
        Target { handle }
    }

    /// The address of a symbol of the target.
    pub fn addr(&self, symbol: &str) -> u64 {
        let name = CString::new(symbol).unwrap();
        // SAFETY: valid handle and NUL-terminated name.
        let addr = unsafe { libc::dlsym(self.handle, name.as_ptr()) };
        assert!(!addr.is_null(), "symbol {symbol} not found in the target");
        addr as u64
    }

    /// Unloads the target (`dlclose`); false if the loader kept it.
    pub fn unload(self) -> bool {
        // SAFETY: a handle of ours, dlclosed once; nothing of the target is used afterwards
        // (its function pointers taken by the caller must not be called any more).
        unsafe { libc::dlclose(self.handle) == 0 }
    }

    /// A `long f(long)` function of the target.
    pub fn func1(&self, symbol: &str) -> extern "C" fn(i64) -> i64 {
        // SAFETY: the named target functions all have the `long f(long)` signature.
        unsafe { std::mem::transmute::<u64, extern "C" fn(i64) -> i64>(self.addr(symbol)) }
    }
}

/// Reads `len` bytes of code at `addr`.
pub fn code(addr: u64, len: usize) -> Vec<u8> {
    // SAFETY: the callers pass addresses of functions of a loaded target.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len).to_vec() }
}

/// Probes patch process-wide code and the tests count hits exactly: they take turns.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
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
