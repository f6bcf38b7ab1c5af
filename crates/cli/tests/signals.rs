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

fn alone() -> String {
    let out = Command::new(program()).arg(ROUNDS).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = stdout_of(&out);
    assert!(text.contains("traps=3 reset=1"), "the program sees each of its 3 traps once: {text}");
    text
}

#[test]
fn probe_started_with_breakpoints_and_jumps_sees_every_call_and_changes_nothing() {
    for options in [&["--no-optimize"][..], &[]] {
        let hits = common::scratch().join(format!("signals-hits{}", options.len()));
        let out = dynprobe()
            .args(["probe", "-o"])
            .arg(&hits)
            .args(options)
            .args(["p:work", "--"])
            .arg(program())
            .arg(ROUNDS)
            .output()
            .unwrap();
        assert!(out.status.success(), "{options:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout_of(&out), alone(), "{options:?}");
        let lines = std::fs::read_to_string(&hits).unwrap();
        assert_eq!(lines.lines().filter(|l| l.contains("work")).count(), CALLS, "{options:?}");
    }
}

#[test]
fn record_started_with_breakpoints_and_jumps_sees_every_call_and_changes_nothing() {
    for options in [&["--no-optimize"][..], &[]] {
        let dir = common::scratch().join(format!("signals-trace{}", options.len()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = dynprobe()
            .args(["record", "-o"])
            .arg(&dir)
            .args(options)
            .args(["-F", "work", "--"])
            .arg(program())
            .arg(ROUNDS)
            .output()
            .unwrap();
        assert!(out.status.success(), "{options:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout_of(&out), alone(), "{options:?}");
        let replay = dynprobe().arg("replay").arg(&dir).output().unwrap();
        let calls = stdout_of(&replay).lines().filter(|l| l.contains("work()")).count();
        assert_eq!(calls, CALLS, "{options:?}");
    }
}
