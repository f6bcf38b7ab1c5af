//! Compiles `bench/target.c`, the functions `dynprobe bench` measures, the program its
//! function-graph rows trace, `bench/graph.c`, and the program `dynprobe demo` runs,
//! `demo/demo.c`.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=bench/target.c");
    cc::Build::new()
        .file("bench/target.c")
        .opt_level(2)
        // The probed entry must be an ordinary instruction, whatever the toolchain's
        // default (Ubuntu's gcc emits endbr64 unless told otherwise).
        .flag_if_supported("-fcf-protection=none")
        .compile("dynprobe_bench_target");
    build_demo();
    build_bench_graph();
    build_bench_sites();
    build_bench_ptrace();
    build_bench_hot();
}

/// Builds the ptrace-probe row's program, `crates/uprobes/bench/ptrace_probe.c` (the one
/// source the uprobes crate's own benchmark uses too), statically linked as the programs
/// that get ptrace-driven probes are. The path is baked in as `DYNPROBE_BENCH_PTRACE`.
fn build_bench_ptrace() {
    build_program("../uprobes/bench/ptrace_probe.c", &["-static"], "DYNPROBE_BENCH_PTRACE");
}

/// Builds the detach-ms row's program, `tests/targets/hot.c` (the attach tests' hot
/// target): threads that call `work` without a pause. The path is baked in as
/// `DYNPROBE_BENCH_HOT`.
fn build_bench_hot() {
    build_program("tests/targets/hot.c", &["-pthread"], "DYNPROBE_BENCH_HOT");
}

/// Compiles the C program `source` with `flags` (its functions kept out of line) into
/// OUT_DIR, and bakes its path into the binary as the environment variable `env`.
fn build_program(source: &str, flags: &[&str], env: &str) {
    println!("cargo:rerun-if-changed={source}");
    let name = std::path::Path::new(source).file_stem().expect("a file name");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join(name);
    let compiler = cc::Build::new().opt_level(1).flag_if_supported("-fcf-protection=none").get_compiler();
    let status = compiler
        .to_command()
        .args(flags)
        .args(["-fno-inline", source, "-o"])
        .arg(&out)
        .status()
        .expect("run the C compiler");
    assert!(status.success(), "compiling {source} with {flags:?} failed (is libc6-dev installed?)");
    println!("cargo:rustc-env={env}={}", out.display());
}

/// Links `demo/demo.c` into an executable in OUT_DIR and bakes its path into the binary
/// as `DYNPROBE_DEMO`. The cc crate only builds libraries, so it just supplies the
/// configured C compiler.
fn build_demo() {
    println!("cargo:rerun-if-changed=demo/demo.c");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("demo");
    let compiler = cc::Build::new().opt_level(1).debug(true).flag_if_supported("-fcf-protection=none").get_compiler();
    let status = compiler
        .to_command()
        // The demo's functions are what users probe by name: keep them out of line.
        .arg("-fno-inline")
        .arg("demo/demo.c")
        .arg("-o")
        .arg(&out)
        .status()
        .expect("run the C compiler");
    assert!(status.success(), "compiling demo/demo.c failed");
    println!("cargo:rustc-env=DYNPROBE_DEMO={}", out.display());
}

/// Builds `bench/graph.c` into an executable in OUT_DIR and bakes its path into the binary
/// as `DYNPROBE_BENCH_GRAPH`. Its functions get the compiler's NOP sites (`-pg -mfentry
/// -mnop-mcount -mrecord-mcount`, which GCC refuses with PIE), the fast path of both
/// dynprobe's tracer and uftrace's dynamic patching. It is compiled and linked in two steps
/// because `-pg` at link time would add glibc's gprof start-up: a profiling timer and a
/// `gmon.out` written at exit, neither of which any tracer needs.
fn build_bench_graph() {
    use std::ffi::OsStr;
    println!("cargo:rerun-if-changed=bench/graph.c");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let (object, exe) = (out_dir.join("graph.o"), out_dir.join("graph"));
    // With DWARF (`-g` changes no code), for the `function-graph-args` row's `record -a`.
    let compiler =
        cc::Build::new().opt_level(2).debug(true).pic(false).flag_if_supported("-fcf-protection=none").get_compiler();
    let run = |what: &str, args: &[&OsStr]| {
        let status = compiler.to_command().args(args).status().expect("run the C compiler");
        assert!(status.success(), "{what} bench/graph.c failed");
    };
    let flags = ["-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-fno-pie", "-fno-inline", "-c"];
    let mut compile: Vec<&OsStr> = flags.iter().map(OsStr::new).collect();
    compile.extend(["bench/graph.c".as_ref(), "-o".as_ref(), object.as_os_str()]);
    run("compiling", &compile);
    run("linking", &["-no-pie".as_ref(), "-pthread".as_ref(), object.as_os_str(), "-o".as_ref(), exe.as_os_str()]);
    println!("cargo:rustc-env=DYNPROBE_BENCH_GRAPH={}", exe.display());
}

/// Functions in `bench_sites`, the program the `enable-sites` row records: the batch the
/// design's target speaks of.
const BENCH_SITES: usize = 10_000;

/// Generates and builds `bench_sites`: [`BENCH_SITES`] small functions with compiler NOP
/// sites (as `build_bench_graph`: compiled with `-pg …`, linked without), each called once.
/// The path is baked in as `DYNPROBE_BENCH_SITES`.
fn build_bench_sites() {
    use std::ffi::OsStr;
    use std::fmt::Write as _;
    println!("cargo:rerun-if-changed=build.rs");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let (source, object, exe) = (out_dir.join("sites.c"), out_dir.join("sites.o"), out_dir.join("sites"));
    let mut c =
        String::from("/* Generated by build.rs: the enable-sites bench row's program. */\n#include <stdio.h>\n");
    for i in 0..BENCH_SITES {
        let _ = writeln!(c, "__attribute__((noinline)) long f{i}(long x) {{ return x * {} + 1; }}", i + 3);
    }
    c.push_str("static long (*const table[])(long) = {");
    for i in 0..BENCH_SITES {
        let _ = write!(c, "f{i},");
    }
    let _ = writeln!(
        c,
        "}};\nint main(void) {{ long s = 0; for (int i = 0; i < {BENCH_SITES}; i++) s += table[i](i); \
         printf(\"sum %ld\\n\", s); return 0; }}"
    );
    std::fs::write(&source, c).expect("write sites.c");
    let compiler = cc::Build::new().opt_level(1).pic(false).flag_if_supported("-fcf-protection=none").get_compiler();
    let run = |what: &str, args: &[&OsStr]| {
        let status = compiler.to_command().args(args).status().expect("run the C compiler");
        assert!(status.success(), "{what} the enable-sites program failed");
    };
    let flags = ["-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-fno-pie", "-c"];
    let mut compile: Vec<&OsStr> = flags.iter().map(OsStr::new).collect();
    compile.extend([source.as_os_str(), "-o".as_ref(), object.as_os_str()]);
    run("compiling", &compile);
    run("linking", &["-no-pie".as_ref(), object.as_os_str(), "-o".as_ref(), exe.as_os_str()]);
    println!("cargo:rustc-env=DYNPROBE_BENCH_SITES={}", exe.display());
}
