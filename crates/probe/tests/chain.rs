//! Traps that are not dynprobe's reach the handler that was installed before it.
//!
//! Alone in its test binary so that the order "program's own SIGTRAP handler first, then
//! dynprobe" is guaranteed.

mod common;

use dynprobe_probe::{sym, Probe};
use std::sync::atomic::{AtomicU64, Ordering};

static FOREIGN_TRAPS: AtomicU64 = AtomicU64::new(0);

extern "C" fn program_handler(_sig: libc::c_int, _info: *mut libc::siginfo_t, _uc: *mut libc::c_void) {
    FOREIGN_TRAPS.fetch_add(1, Ordering::SeqCst);
}

#[inline(never)]
fn program_breakpoint() {
    // SAFETY: an int3 whose SIGTRAP the program's handler above ignores; rip is already past it.
    unsafe { std::arch::asm!("int3") };
}

#[test]
fn foreign_traps_are_passed_to_the_previous_handler() {
    // SAFETY: installs a valid SA_SIGINFO handler that only touches an atomic.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = program_handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        assert_eq!(libc::sigaction(libc::SIGTRAP, &action, std::ptr::null_mut()), 0);
    }
    program_breakpoint();
    assert_eq!(FOREIGN_TRAPS.load(Ordering::SeqCst), 1);

    let target = common::Target::build("first_insns", &[]);
    let f = target.func1("f_push");
    let probe = Probe::at(sym!("f_push")).on_hit(|_| {}).register().unwrap();
    program_breakpoint();
    assert_eq!(FOREIGN_TRAPS.load(Ordering::SeqCst), 2, "the program's own int3 still reaches its handler");
    assert_eq!(f(1), 2);
    assert_eq!(probe.hits(), 1, "while dynprobe's int3 is handled by dynprobe");
    assert_eq!(FOREIGN_TRAPS.load(Ordering::SeqCst), 2);
    probe.unregister().unwrap();
    program_breakpoint();
    assert_eq!(FOREIGN_TRAPS.load(Ordering::SeqCst), 3);
}
