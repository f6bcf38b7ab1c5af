//! Compiles `bench/target.c`, the functions `dynprobe bench` measures, and the program
//! `dynprobe demo` runs, `demo/demo.c`.

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
