//! A program that uses SIGTRAP itself and blocks every signal in its threads
//! (`targets/signals.c`: LLVM's SA_RESETHAND|SA_NODEFER handler, its own int3 and raise,
//! a raw rt_sigaction, xz-style workers) runs under `record` and `probe`, breakpoint and
//! jump-optimized, exactly as it runs alone, and every call is seen.

mod common;

use common::{build_c, dynprobe, stdout_of};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const ROUNDS: &str = "200";
/// The worker of each of the three ways of blocking, plus one call from the main thread.
const CALLS: usize = 3 * 200 + 1;

fn program() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build_c("signals.c", "signals", &[]))
}

fn alone(args: &[&str]) -> String {
    let out = Command::new(program()).args(args).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = stdout_of(&out);
    assert!(text.contains("traps=3 reset=1"), "the program sees each of its 3 traps once: {text}");
    text
}

/// Runs `dynprobe COMMAND -o OUT OPTIONS SPEC -- program ARGS` for each of breakpoint
/// probes (`--no-optimize`) and jumps, checks that the program printed what it prints
/// alone, and returns, per mode, how many of `OUT`'s (or its replay's) lines name `work`.
fn run_under(command: &str, spec: &[&str], args: &[&str], out_name: &str) -> Vec<usize> {
    let mut counts = Vec::new();
    for options in [&["--no-optimize"][..], &[]] {
        let out_path = common::scratch().join(format!("{out_name}{}", options.len()));
        let _ = std::fs::remove_dir_all(&out_path);
        let out = dynprobe()
            .args([command, "-o"])
            .arg(&out_path)
            .args(options)
            .args(spec)
            .arg("--")
            .arg(program())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{command} {options:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout_of(&out), alone(args), "{command} {options:?}");
        let lines = match command {
            "record" => stdout_of(&dynprobe().arg("replay").arg(&out_path).output().unwrap()),
            _ => std::fs::read_to_string(&out_path).unwrap(),
        };
        counts.push(lines.lines().filter(|l| l.contains("work")).count());
    }
    counts
}

#[test]
fn probe_started_with_breakpoints_and_jumps_sees_every_call_and_changes_nothing() {
    assert_eq!(run_under("probe", &["p:work"], &[ROUNDS], "signals-hits"), [CALLS, CALLS]);
}

#[test]
fn record_started_with_breakpoints_and_jumps_sees_every_call_and_changes_nothing() {
    assert_eq!(run_under("record", &["-F", "work"], &[ROUNDS], "signals-trace"), [CALLS, CALLS]);
}

#[test]
fn an_image_executed_with_sigtrap_blocked_keeps_it_blocked_and_takes_its_probes() {
    let args = ["exec", ROUNDS];
    assert!(alone(&args).starts_with("blocked=1 first=4\n"), "{}", alone(&args));
    // The new image's first call of work() comes while it blocks SIGTRAP.
    assert_eq!(run_under("probe", &["p:work"], &args, "signals-exec-hits"), [CALLS + 1, CALLS + 1]);
    assert_eq!(run_under("record", &["-F", "work"], &args, "signals-exec-trace"), [CALLS + 1, CALLS + 1]);
}
