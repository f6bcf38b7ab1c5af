//! A stop signal still pending when dynprobe puts the signal's action back must not end the
//! program. A thread that blocks every signal while it runs cannot answer a stop: the stop
//! gives up on it and its signal stays queued. Once the handler is uninstalled the action is
//! the default again — for a real-time signal, ending the process — and the thread later
//! unblocks its signals. Without the pending signal discarded the process dies here, so the
//! test has no harness (`harness = false` in Cargo.toml): the failure is this process's
//! death by that signal, which the test runner reports, and an alarm ends a stuck run.

use dynprobe_text::stop;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

fn main() {
    // SAFETY: alarm takes a plain number; its default action ends a stuck run.
    unsafe { libc::alarm(60) };
    println!("\nrunning 1 test");
    let (blocked, unblock) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let holder = {
        let (blocked, unblock) = (blocked.clone(), unblock.clone());
        thread::spawn(move || {
            // SAFETY: a full set, then this thread's mask set to it and back.
            unsafe {
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                let mut before: libc::sigset_t = std::mem::zeroed();
                libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut before);
                blocked.store(true, Ordering::Release);
                // Running, so that the stop signals it rather than leaving it alone.
                while !unblock.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
            }
            // A signal pending and unblocked is delivered on the way back from that call.
            thread::sleep(Duration::from_millis(50));
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !blocked.load(Ordering::Acquire) {
        assert!(Instant::now() < deadline, "the thread did not start");
        thread::yield_now();
    }
    let err = stop::stop_other_threads(Duration::from_millis(300))
        .err()
        .expect("a thread blocking the stop signal cannot be stopped");
    eprintln!("the stop failed as it must: {err}");
    assert!(
        pending_in_some_thread(stop::stop_signal()),
        "the refused stop should have left its signal pending (the premise of this test)"
    );
    stop::uninstall_handler().unwrap();
    assert!(
        !pending_in_some_thread(stop::stop_signal()),
        "a stop signal is still pending with the default action back: the process dies when the thread unblocks it"
    );
    unblock.store(true, Ordering::Release);
    holder.join().unwrap();
    println!("test a_stop_signal_left_pending_is_discarded_when_the_handler_is_uninstalled ... ok\n");
}

/// Whether `signal` is pending in a thread of this process (`SigPnd` in
/// `/proc/self/task/*/status`) or in the process (`ShdPnd`).
fn pending_in_some_thread(signal: i32) -> bool {
    let bit = 1u64 << (signal - 1);
    std::fs::read_dir("/proc/self/task").unwrap().flatten().any(|task| {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        status
            .lines()
            .filter_map(|l| l.strip_prefix("SigPnd:").or_else(|| l.strip_prefix("ShdPnd:")))
            .any(|mask| u64::from_str_radix(mask.trim(), 16).is_ok_and(|m| m & bit != 0))
    })
}
