//! Compiles `bench/target.c`, the functions `dynprobe bench` measures.

fn main() {
    println!("cargo:rerun-if-changed=bench/target.c");
    cc::Build::new()
        .file("bench/target.c")
        .opt_level(2)
        // The probed entry must be an ordinary instruction, whatever the toolchain's
        // default (Ubuntu's gcc emits endbr64 unless told otherwise).
        .flag_if_supported("-fcf-protection=none")
        .compile("dynprobe_bench_target");
}
