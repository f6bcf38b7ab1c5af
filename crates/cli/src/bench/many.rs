//! A generated C program with tens of thousands of functions, for `record` at scale: the
//! bench's start-up rows and the record tests (which include this file by path) build it.
//!
//! Its functions are `g<G>_<NNNN>` in groups of [`GROUP`], so that a glob selects a known
//! number of them (`-F 'g0_*'`: 10,000; `-F 'g[0-3]_*'`: 40,000), plus `hot`, a function
//! with a `.cold` part as GCC's hot/cold partitioning makes, and `main`. `main` calls a few
//! of them and prints their sum; run as `PROGRAM clock` it first prints `main_ns <N>`, the
//! `CLOCK_MONOTONIC` time at which `main` began, and `cpu_ns <N>`, the CPU time the process
//! had used by then (all its threads). Run as `PROGRAM loop` it prints `ready` and calls
//! the first 16 functions of group 0 in a loop until killed, a hundred microseconds apart:
//! a running process for `record -p`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

/// Functions per group.
pub const GROUP: usize = 10_000;

/// The name of function `i` of group `group`.
pub fn name(group: usize, i: usize) -> String {
    format!("g{group}_{i:04}")
}

/// The C source of a program with `groups` groups of functions.
pub fn source(groups: usize) -> String {
    let mut c = String::from("#include <stdio.h>\n#include <string.h>\n#include <time.h>\n#include <unistd.h>\n\n");
    for group in 0..groups {
        for i in 0..GROUP {
            let _ = writeln!(c, "int {}(int x) {{ return x * {} + {i}; }}", name(group, i), i % 97 + 3);
        }
    }
    // hot(x) = |5x| + 1, its negative case in hot.cold, which jumps back into hot.
    c.push_str(concat!(
        "__asm__(\".text\\n.globl hot\\n.type hot,@function\\nhot:\\n\"\n",
        "        \" lea (%rdi,%rdi,4),%eax\\n test %edi,%edi\\n js hot.cold\\n\"\n",
        "        \"hot_join:\\n add $1,%eax\\n ret\\n.size hot,.-hot\\n\"\n",
        "        \".section .text.unlikely,\\\"ax\\\",@progbits\\n\"\n",
        "        \".type hot.cold,@function\\nhot.cold:\\n neg %eax\\n jmp hot_join\\n\"\n",
        "        \".size hot.cold,.-hot.cold\\n.text\\n\");\n",
        "int hot(int x);\n\n",
    ));
    c.push_str("int main(int argc, char **argv) {\n");
    c.push_str("    struct timespec now, cpu;\n    clock_gettime(CLOCK_MONOTONIC, &now);\n");
    c.push_str("    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu);\n");
    c.push_str("    if (argc > 1 && strcmp(argv[1], \"clock\") == 0)\n");
    c.push_str(
        "        printf(\"main_ns %lld\\ncpu_ns %lld\\n\", (long long)now.tv_sec * 1000000000LL + now.tv_nsec,\n",
    );
    c.push_str("               (long long)cpu.tv_sec * 1000000000LL + cpu.tv_nsec);\n");
    c.push_str("    long sum = hot(-3) + hot(4);\n");
    if groups > 0 {
        c.push_str("    if (argc > 1 && strcmp(argv[1], \"loop\") == 0) {\n");
        c.push_str("        printf(\"ready\\n\");\n        fflush(stdout);\n        for (;;) {\n");
        for i in 0..16 {
            let _ = writeln!(c, "            sum += {}((int)sum);", name(0, i));
        }
        c.push_str("            usleep(100);\n        }\n    }\n");
        let _ = writeln!(c, "    sum += {}(1) + {}(2);", name(0, 0), name(groups - 1, GROUP - 1));
    }
    c.push_str("    printf(\"sum %ld\\n\", sum);\n    return 0;\n}\n");
    c
}

/// Writes the source of a `groups`-group program beside `out` and compiles it into `out`.
/// Unoptimized, which compiles fastest (about 2 s per group on a loaded 2-core machine):
/// each function still starts with `push %rbp; mov %rsp,%rbp`, room for a jump.
pub fn build(groups: usize, out: &Path) -> Result<(), String> {
    let c_file = out.with_extension("c");
    std::fs::write(&c_file, source(groups)).map_err(|e| format!("cannot write {}: {e}", c_file.display()))?;
    let status = Command::new("gcc")
        .args(["-O0", "-pipe", "-fcf-protection=none", "-o"])
        .arg(out)
        .arg(&c_file)
        .status()
        .map_err(|e| format!("cannot run gcc (scripts/setup installs it): {e}"))?;
    if !status.success() {
        return Err(format!("gcc {} failed ({status})", c_file.display()));
    }
    Ok(())
}
