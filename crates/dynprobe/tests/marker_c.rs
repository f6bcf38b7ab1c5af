//! Markers of the C header `dynprobe/marker.h`, in a shared library this test loads into
//! its own process: [`dynprobe::markers`] finds them in the library's file, a handler
//! attached to them sees every hit with its arguments (ints, a pointer, a C string), the
//! library computes the same either way, and detach puts the NOPs back. A USDT probe of
//! `sys/sdt.h` guarded by its semaphore (`usdt.c`) fires only while attached: the
//! semaphore is raised by the attach and back to zero after detach.

use std::ffi::{c_char, c_int, c_long, c_ulong, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use dynprobe::marker::{ArgKind, ArgValue, Marker, NOP5};

extern "C" {
    fn dlopen(path: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void;
    fn dlerror() -> *const c_char;
}
const RTLD_NOW: c_int = 2;

/// `markers_run(rounds)` of `tests/targets/markers.c`.
type Run = unsafe extern "C" fn(c_long) -> c_ulong;

fn header_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include")
}

/// `SOURCE` of the CLI's test targets.
fn source(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../cli/tests/targets").join(name)
}

/// Builds the C target `name` as the shared library `lib` (with `define`) and loads it;
/// returns its path and its `dlopen` handle.
fn load_library(name: &str, define: &str, lib: &str) -> (PathBuf, *mut c_void) {
    let lib = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(lib);
    let status = Command::new("gcc")
        .args(["-O2", "-shared", "-fPIC", "-fcf-protection=none", define, "-I"])
        .arg(header_dir())
        .arg(source(name))
        .arg("-o")
        .arg(&lib)
        .status()
        .expect("run gcc (scripts/setup installs it)");
    assert!(status.success(), "gcc failed on {}", source(name).display());
    let path = CString::new(lib.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path; the library has no constructors.
    let handle = unsafe { dlopen(path.as_ptr(), RTLD_NOW) };
    // SAFETY: dlerror returns a NUL-terminated message after a failed dlopen.
    assert!(!handle.is_null(), "dlopen: {:?}", unsafe { CStr::from_ptr(dlerror()) });
    (lib, handle)
}

/// The address of `name` in the library `handle` (never closed).
fn symbol(handle: *mut c_void, name: &CStr) -> *mut c_void {
    // SAFETY: the handle is live (never closed) and the name NUL-terminated.
    let found = unsafe { dlsym(handle, name.as_ptr()) };
    assert!(!found.is_null(), "{name:?} not found");
    found
}

fn code_at(addr: u64) -> [u8; 5] {
    // SAFETY: `addr` is a marker site in the library's mapped, readable text.
    unsafe { std::ptr::read_volatile(addr as *const [u8; 5]) }
}

fn same_file(a: &Path, b: &Path) -> bool {
    a.canonicalize().ok() == b.canonicalize().ok()
}

#[test]
fn markers_of_a_c_library_are_found_attached_and_detached() {
    let (lib, handle) = load_library("markers.c", "-DMARKERS_LIBRARY", "libmarkers-c.so");
    // SAFETY: markers_run has exactly the `Run` signature in markers.c.
    let run = unsafe { std::mem::transmute::<*mut c_void, Run>(symbol(handle, c"markers_run")) };
    // SAFETY: markers_run only computes.
    let plain = unsafe { run(300) };

    let tick: Vec<_> = Marker::find("cmarkers:tick").unwrap();
    assert_eq!(tick.len(), 1);
    assert!(same_file(&tick[0].path, &lib), "{:?}", tick[0].path);
    assert!(tick[0].dynprobe);
    let kinds: Vec<ArgKind> = tick[0].args.iter().map(|a| a.kind).collect();
    assert_eq!(kinds, [ArgKind::I32, ArgKind::I64, ArgKind::Pointer, ArgKind::CStr]);
    assert_eq!(tick[0].sdt_args, "-4@%edi -8@%rsi 8@%rdx 8@%rcx");
    assert_eq!(code_at(tick[0].addr), NOP5);

    static HITS: AtomicU64 = AtomicU64::new(0);
    static WRONG: AtomicU64 = AtomicU64::new(0);
    let ticks = Marker::attach("cmarkers:tick", |hit| {
        let i = HITS.fetch_add(1, Ordering::Relaxed) as i64;
        let name: &[u8] = [b"alpha".as_slice(), b"beta", b"gamma"][i as usize % 3];
        let right = hit.arg(0) == Some(ArgValue::Signed(i))
            && hit.arg(1) == Some(ArgValue::Signed(-i))
            // SAFETY: the marker passes the address of a live local int of the loop.
            && matches!(hit.arg(2), Some(ArgValue::Pointer(p)) if unsafe { *(p as *const c_int) } == 42)
            && hit.arg(3) == Some(ArgValue::CStr(name));
        if !right {
            WRONG.fetch_add(1, Ordering::Relaxed);
        }
    })
    .unwrap();
    static DONE: AtomicU64 = AtomicU64::new(0);
    let done = Marker::attach("cmarkers:done", |hit| {
        let values: Vec<ArgValue> = hit.args().collect();
        if let [ArgValue::Unsigned(sum), ArgValue::Unsigned(7), ArgValue::Signed(-3), ArgValue::Bool(true)] = values[..]
        {
            DONE.store(sum, Ordering::Relaxed);
        }
    })
    .unwrap();
    assert!(ticks.all_optimized() && done.all_optimized());

    // SAFETY: as above.
    assert_eq!(unsafe { run(300) }, plain, "the library computes the same with handlers attached");
    assert_eq!((HITS.load(Ordering::Relaxed), WRONG.load(Ordering::Relaxed)), (300, 0));
    assert_eq!(DONE.load(Ordering::Relaxed), plain);

    assert_eq!(ticks.detach().unwrap().hits, 300);
    assert_eq!(done.detach().unwrap().hits, 1);
    assert_eq!(code_at(tick[0].addr), NOP5, "detach puts the exact NOP back");
    // SAFETY: as above.
    assert_eq!(unsafe { run(300) }, plain);
    assert_eq!(HITS.load(Ordering::Relaxed), 300);
}

#[test]
fn a_usdt_semaphore_is_raised_while_attached_and_lowered_at_detach() {
    let (_, handle) = load_library("usdt.c", "-DUSDT_LIBRARY", "libusdt.so");
    // SAFETY: `long usdt_run(long)` and `unsigned usdt_semaphore(void)` in usdt.c.
    let (run, semaphore) = unsafe {
        (
            std::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_long) -> c_long>(symbol(handle, c"usdt_run")),
            std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> u32>(symbol(handle, c"usdt_semaphore")),
        )
    };
    let sites = Marker::find("usdt_app:work").unwrap();
    assert_eq!(sites.len(), 1);
    assert_ne!(sites[0].semaphore, 0, "the note names the semaphore");
    // SAFETY: both only compute or read the counter.
    assert_eq!(unsafe { (run(50), semaphore()) }, (0, 0), "nobody listens: the probe's path is skipped");

    static HITS: AtomicU64 = AtomicU64::new(0);
    for round in 0..2 {
        let handle = Marker::attach("usdt_app:work", |hit| {
            let i = HITS.fetch_add(1, Ordering::Relaxed);
            assert_eq!(hit.arg(1), Some(ArgValue::Signed(i as i64 % 50 + 1)));
        })
        .unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { semaphore() }, 1);
        // SAFETY: as above.
        assert_eq!(unsafe { run(50) }, 50, "every round takes the probe's path");
        // Detached, then dropped: both lower the semaphore.
        match round {
            0 => assert_eq!(handle.detach().unwrap().hits, 50),
            _ => drop(handle),
        }
        // SAFETY: as above.
        assert_eq!(unsafe { (semaphore(), run(50)) }, (0, 0));
    }
    assert_eq!(HITS.load(Ordering::Relaxed), 100);
}
