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
    let compiler = cc::Build::new().opt_level(2).pic(false).flag_if_supported("-fcf-protection=none").get_compiler();
    let run = |what: &str, args: &[&OsStr]| {
        let status = compiler.to_command().args(args).status().expect("run the C compiler");
        assert!(status.success(), "{what} bench/graph.c failed");
    };
    let flags = ["-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-fno-pie", "-fno-inline", "-c"];
    let mut compile: Vec<&OsStr> = flags.iter().map(OsStr::new).collect();
    compile.extend(["bench/graph.c".as_ref(), "-o".as_ref(), object.as_os_str()]);
    run("compiling", &compile);
    run("linking", &["-no-pie".as_ref(), object.as_os_str(), "-o".as_ref(), exe.as_os_str()]);
    println!("cargo:rustc-env=DYNPROBE_BENCH_GRAPH={}", exe.display());
}
