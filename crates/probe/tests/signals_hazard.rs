//! Breakpoints that cannot be taken safely are refused up front, with the reason; jump-
//! optimized probes are still placed. Alone in its test binary: the thread that blocks
//! SIGTRAP before any probe exists, and the raw-syscall target, make every breakpoint of
//! the process unsafe.

mod common;

use common::Target;
use dynprobe_probe::{sym, Probe, ProbeError};
use std::sync::mpsc::channel;

/// A breakpoint probe on `sig_bp` (not optimizable) is refused with `why` in the reason; a
/// probe on `sig_jump` is placed, optimized, and counts its hits.
fn only_jumps_are_placed(signals: &Target, why: &str) {
    match Probe::at(sym!("sig_bp")).on_hit(|_| {}).register() {
        Err(e @ ProbeError::BreakpointUnsafe { .. }) => {
            let text = e.to_string();
            assert!(text.contains(why) && text.contains("follows an unconditional transfer"), "{text}");
        }
        other => panic!("a breakpoint on sig_bp must be refused ({why}): {other:?}"),
    }
    assert_eq!(signals.func1("sig_bp")(1), 3, "the refused probe left nothing behind");
    let jump = Probe::at(sym!("sig_jump")).on_hit(|_| {}).register().unwrap();
    dynprobe_probe::wait_for_optimizer().unwrap();
    assert!(jump.info().optimized, "{}", jump.info());
    assert_eq!(signals.func1("sig_jump")(1), 2);
    assert_eq!(jump.unregister().unwrap().hits, 1);
}

#[test]
fn breakpoints_are_refused_where_sigtrap_may_be_blocked_and_jumps_placed() {
    let signals = Target::build("signals", &[]);
    // A thread that blocked SIGTRAP before dynprobe's guards existed. (Not every signal:
    // one that blocks the stop signal too cannot be stopped for a jump to be written.)
    let (blocked, wait_blocked) = channel();
    let (release, wait_release) = channel::<()>();
    let block_trap = signals.func1("block_trap");
    let thread = std::thread::spawn(move || {
        assert_eq!(block_trap(1), 0);
        blocked.send(()).unwrap();
        wait_release.recv().unwrap();
    });
    wait_blocked.recv().unwrap();
    only_jumps_are_placed(&signals, "blocks SIGTRAP (it did before dynprobe's signal guards were placed)");
    release.send(()).unwrap();
    thread.join().unwrap();
    // The thread is gone: breakpoints are fine again.
    let bp = Probe::at(sym!("sig_bp")).on_hit(|_| {}).register().unwrap();
    assert_eq!(signals.func1("sig_bp")(1), 3);
    assert_eq!(bp.unregister().unwrap().hits, 1);

    // Code that blocks SIGTRAP with its own syscall instruction.
    let raw = Target::build("signals_raw", &[]);
    std::thread::sleep(std::time::Duration::from_millis(150));
    only_jumps_are_placed(&signals, "libsignals_raw");
    assert_eq!(raw.func1("raw_block_trap")(libc::SIG_UNBLOCK as i64), 0);
}
