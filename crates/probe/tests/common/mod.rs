//! Builds the C targets and loads them into the test process.
#![allow(dead_code)]

use std::ffi::CString;
use std::path::PathBuf;
use std::process::Command;

/// A shared object built from `tests/targets/NAME.c` and loaded with `dlopen`.
pub struct Target {
    handle: *mut libc::c_void,
}

// SAFETY: a dlopen handle may be used from any thread.
unsafe impl Send for Target {}
// SAFETY: as above; dlsym is thread-safe.
unsafe impl Sync for Target {}

impl Target {
    /// Compiles `tests/targets/{name}.c` with gcc (`-O1 -fPIC -shared` plus `flags`) and
    /// loads it. Panics with gcc's message if it does not build: a test never skips.
    pub fn build(name: &str, flags: &[&str]) -> Target {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/targets/{name}.c"));
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("lib{name}-{}.so", std::process::id()));
        let output = Command::new("gcc")
            .args(["-O1", "-fPIC", "-shared", "-Wl,-Bsymbolic", "-o"])
            .arg(&out)
            .arg(&src)
            .args(flags)
            .output()
            .expect("gcc must be installed to build the test targets (apt-get install gcc)");
        assert!(
            output.status.success(),
            "gcc failed on {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let path = CString::new(out.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; the library has no constructors with effects.
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
