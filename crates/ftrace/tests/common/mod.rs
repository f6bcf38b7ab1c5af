//! What the tracer's tests share: the library of patchable sites they trace.

use std::ffi::CString;
use std::path::PathBuf;
use std::process::Command;

/// Builds `tests/lib_sites.c` with `-fpatchable-function-entry=5` and loads it (never
/// unloaded); its handle.
pub fn load_library() -> *mut libc::c_void {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("libftrace_sites.so");
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/lib_sites.c");
    let status = Command::new("gcc")
        .args(["-O1", "-shared", "-fPIC", "-fpatchable-function-entry=5", "-fcf-protection=none", "-o"])
        .arg(&out)
        .arg(&source)
        .status()
        .expect("run gcc (scripts/setup installs it)");
    assert!(status.success());
    let c_path = CString::new(out.to_str().unwrap()).unwrap();
    // SAFETY: dlopen of a library we just built; it is never closed.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW) };
    assert!(!handle.is_null());
    handle
}

/// The library's `outer(x)`: `leaf(x) + leaf(x + 1)`, `leaf(x)` being `3x + 1`.
pub fn outer(handle: *mut libc::c_void) -> extern "C" fn(i64) -> i64 {
    // SAFETY: looking up a function of that library, of that type.
    unsafe { std::mem::transmute(libc::dlsym(handle, c"outer".as_ptr())) }
}

/// A scratch directory of this test process's.
pub fn tempdir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("ftrace-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
