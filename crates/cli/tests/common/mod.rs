//! What the marker tests share: the two marker programs (`targets/markers.c` with the C
//! header, `targets/markers_rs.rs` with the Rust macro), built once per test binary, what
//! they print, and the `dynprobe` binary.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

pub mod attached;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// This test binary's scratch directory: the programs are built there, apart from other
/// test binaries that build them at the same time.
pub fn scratch() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let name = exe.file_stem().expect("a file name").to_string_lossy().into_owned();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("markers-{name}"));
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}

/// The directory of the test programs' sources.
pub fn targets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/targets")
}

/// The `dynprobe` binary.
pub fn dynprobe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dynprobe"))
}

/// `dynprobe probe [OPTIONS] SPECS... -- PROGRAM ARG` with the events written to the file
/// `events-NAME` of the scratch directory: the run's output and the events' text.
pub fn probe_to_file(name: &str, options: &[&str], specs: &[&str], program: &Path, arg: &str) -> (Output, String) {
    let events = scratch().join(format!("events-{name}"));
    let _ = std::fs::remove_file(&events);
    let out = dynprobe()
        .arg("probe")
        .args(options)
        .arg("-o")
        .arg(&events)
        .args(specs)
        .arg("--")
        .arg(program)
        .arg(arg)
        .output()
        .expect("run dynprobe");
    (out, std::fs::read_to_string(&events).unwrap_or_default())
}

/// `targets/markers.c` with `dynprobe/marker.h`, built once.
pub fn c_program() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build_c("markers.c", "markers-c", &["-I".as_ref(), include().as_os_str()]))
}

/// `targets/usdt.c`: a USDT probe (`usdt_app:work`) of `sys/sdt.h` guarded by its
/// semaphore, built once (sys/sdt.h: scripts/setup installs systemtap-sdt-dev).
pub fn usdt_program() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build_c("usdt.c", "usdt", &["-I".as_ref(), include().as_os_str()]))
}

/// `targets/usdt_floats.c` built with `opt`, once per level.
pub fn usdt_floats_program(opt: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap();
    if let Some((_, path)) = built.iter().find(|(o, _)| o == opt) {
        return path.clone();
    }
    let path = build_c("usdt_floats.c", &format!("usdt-floats{opt}"), &[std::ffi::OsStr::new(opt)]);
    built.push((opt.to_string(), path.clone()));
    path
}

/// The events `usdt_floats.c`'s output says its markers' probes must see: each line
/// `mix D F K` an event `floats/mix: arg1=D arg2=F arg3=K`.
pub fn usdt_floats_events(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .map(|l| {
            let (name, values) = l.split_once(' ').unwrap();
            let values: Vec<String> = values.split(' ').enumerate().map(|(i, v)| format!("arg{}={v}", i + 1)).collect();
            (format!("floats/{name}"), values.join(" "))
        })
        .collect()
}

/// The dynprobe headers' directory (`dynprobe/marker.h`).
fn include() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dynprobe/include")
}

/// Builds `targets/{source}` with gcc (`-O2 -Wall -Werror -fcf-protection=none -pthread`
/// plus `flags`) into the scratch directory as `out`; panics with the reason when it fails.
pub fn build_c(source: &str, out: &str, flags: &[&std::ffi::OsStr]) -> PathBuf {
    build_with("gcc", source, out, flags)
}

/// [`build_c`] for a C++ source, with g++.
pub fn build_cxx(source: &str, out: &str, flags: &[&std::ffi::OsStr]) -> PathBuf {
    build_with("g++", source, out, flags)
}

/// [`build_c`] with another compiler driver (`g++` for a C++ source).
pub fn build_with(compiler: &str, source: &str, out: &str, flags: &[&std::ffi::OsStr]) -> PathBuf {
    let out = scratch().join(out);
    let status = Command::new(compiler)
        .args(["-O2", "-Wall", "-Werror", "-fcf-protection=none", "-pthread"])
        .args(flags)
        .arg(targets().join(source))
        .arg("-o")
        .arg(&out)
        .status()
        .expect("run the compiler (scripts/setup installs gcc and g++)");
    assert!(status.success(), "{compiler} {source} failed");
    out
}

/// `targets/SOURCE` (a Rust program of one file) built with rustc, optimized, panics
/// unwinding, into the scratch directory as `out`.
pub fn build_rust(source: &str, out: &str) -> PathBuf {
    let out = scratch().join(out);
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(rustc)
        .args(["--edition", "2021", "-O", "-C", "panic=unwind", "-o"])
        .arg(&out)
        .arg(targets().join(source))
        .status()
        .expect("run rustc");
    assert!(status.success(), "rustc {source} failed");
    out
}

/// The newest `libdynprobe-*.rlib` beside this test's executable: the library cargo built
/// for the `dynprobe` binary.
fn dynprobe_rlib() -> (PathBuf, PathBuf) {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let rlib = std::fs::read_dir(&deps)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("libdynprobe-") && name.ends_with(".rlib")
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("no libdynprobe-*.rlib in {}", deps.display()))
        .path();
    (rlib, deps)
}

/// `targets/markers_rs.rs` built with rustc against the `dynprobe` library, once.
pub fn rust_program() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = scratch().join("markers-rs");
        let (rlib, deps) = dynprobe_rlib();
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        let status = Command::new(rustc)
            .args(["--edition", "2021", "-O", "-o"])
            .arg(&out)
            .arg("--extern")
            .arg(format!("dynprobe={}", rlib.display()))
            .arg("-L")
            .arg(format!("dependency={}", deps.display()))
            .arg(targets().join("markers_rs.rs"))
            .status()
            .expect("run rustc");
        assert!(status.success(), "rustc markers_rs.rs failed");
        out
    })
}

/// The names the programs' `tick` markers pass, round `i` passing `NAMES[i % 3]`.
pub const NAMES: [&str; 3] = ["alpha", "beta", "gamma"];

/// What both programs compute for `rounds`: the same loop, computed here.
pub fn expected_sum(rounds: u64) -> u64 {
    (0..rounds).fold(0u64, |sum, i| sum.wrapping_mul(31).wrapping_add(i ^ NAMES[i as usize % 3].len() as u64))
}

/// What both programs print for `rounds`.
pub fn expected_output(rounds: u64) -> String {
    format!("rounds {rounds} sum {}\n", expected_sum(rounds))
}

/// The standard output of a command that must have succeeded.
pub fn stdout_of(out: &Output) -> String {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}
