//! Probes keep working, and the program keeps its own SIGTRAP, whatever the program does
//! with signals: threads that block every signal (three ways), SIGTRAP handlers installed,
//! replaced, reset and ignored (`sigaction`, `signal`, raw `rt_sigaction`), its own `int3`
//! and `raise(SIGTRAP)`. The program is tests/targets/signals.c, loaded into this process.

mod common;

use common::Target;
use dynprobe_probe::{sym, Probe, ProbeHandle};
use std::sync::OnceLock;

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| Target::build("signals", &[]))
}

fn call(symbol: &str, x: i64) -> i64 {
    target().func1(symbol)(x)
}

/// A breakpoint probe on `sig_bp` (which cannot be optimized) and a jump-optimized one on
/// `sig_jump`, checked to be what they are.
fn probes() -> (ProbeHandle, ProbeHandle) {
    target();
    let bp = Probe::at(sym!("sig_bp")).on_hit(|_| {}).register().unwrap();
    let jump = Probe::at(sym!("sig_jump")).on_hit(|_| {}).register().unwrap();
    dynprobe_probe::wait_for_optimizer().unwrap();
    assert!(!bp.info().optimized, "{}", bp.info());
    assert!(jump.info().optimized, "{}", jump.info());
    assert_eq!(dynprobe_probe::guard_failure(), None);
    (bp, jump)
}

/// The calling thread's real blocked mask, as the kernel shows it.
fn kernel_blocked_mask() -> u64 {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
    u64::from_str_radix(line["SigBlk:".len()..].trim(), 16).unwrap()
}

const TRAP_BIT: u64 = 1 << (libc::SIGTRAP - 1);

/// Runs `f` in a forked child and returns how it ended: `Ok(code)` for an exit,
/// `Err(signal)` when a signal killed it. The child only calls the target's C functions.
fn in_child(f: impl FnOnce() -> i32) -> Result<i32, i32> {
    // SAFETY: the child runs only `f` (calls into the C target, no allocation) and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = f();
        // SAFETY: ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    if libc::WIFSIGNALED(status) {
        Err(libc::WTERMSIG(status))
    } else {
        Ok(libc::WEXITSTATUS(status))
    }
}

#[test]
fn a_thread_blocking_every_signal_still_takes_breakpoint_and_jump_probes() {
    let _serial = common::serial();
    let (bp, jump) = probes();
    for (way, name) in ["pthread_sigmask", "sigprocmask", "syscall(SYS_rt_sigprocmask)"].iter().enumerate() {
        let before = (bp.hits(), jump.hits());
        std::thread::spawn(move || {
            assert_eq!(call("block_all", way as i64), 0, "{name}");
            assert_eq!(call("trap_blocked", 0), 1, "{name}: the program reads back the mask it set");
            assert_eq!(kernel_blocked_mask() & TRAP_BIT, 0, "{name}: SIGTRAP is not really blocked");
            assert_ne!(kernel_blocked_mask() & (1 << (libc::SIGINT - 1)), 0, "{name}: the other signals are");
            for i in 0..50 {
                assert_eq!(call("sig_bp", i), i + 2);
                assert_eq!(call("sig_jump", i), i + 1);
            }
        })
        .join()
        .unwrap_or_else(|_| panic!("the thread that blocked every signal with {name} failed"));
        assert_eq!((bp.hits(), jump.hits()), (before.0 + 50, before.1 + 50), "{name}");
    }
    bp.unregister().unwrap();
    jump.unregister().unwrap();
}

#[test]
fn a_handler_with_sa_resethand_and_sa_nodefer_gets_its_own_traps_once_each() {
    let _serial = common::serial();
    let (bp, _jump) = probes();
    let seen = call("traps_seen", 0);
    assert_eq!(call("install_handler", (libc::SA_RESETHAND | libc::SA_NODEFER) as i64), 0);
    assert_eq!(call("trap_handler_is", 0), 1, "the program reads its own handler back");
    assert_eq!(call("sig_bp", 1), 3, "dynprobe's breakpoint still works");
    assert_eq!(call("traps_seen", 0), seen, "and is not the program's trap");
    assert_eq!(call("own_int3", 7), 7);
    assert_eq!(call("traps_seen", 0), seen + 1, "the program's int3 reaches its handler once");
    assert_eq!(call("last_trap_code", 0), 0x80, "with the int3's si_code (SI_KERNEL)");
    assert_eq!(call("trap_handler_is", 0), 0, "SA_RESETHAND reset the action to SIG_DFL");
    assert_eq!(call("sig_bp", 1), 3, "dynprobe's breakpoint still works after the reset");
    assert_eq!(in_child(|| call("own_int3", 0) as i32), Err(libc::SIGTRAP), "an int3 under SIG_DFL kills");

    assert_eq!(call("install_handler", 0), 0);
    assert_eq!(call("own_raise", 0), 0);
    assert_eq!(call("traps_seen", 0), seen + 2, "raise(SIGTRAP) reaches the handler once");
    assert_eq!(call("last_trap_code", 0), -6, "with raise's si_code (SI_TKILL)");
    assert_eq!(bp.hits(), 2);
    assert_eq!(call("trap_disposition", 0), 0);
}

#[test]
fn a_handler_installed_with_raw_rt_sigaction_gets_its_traps() {
    let _serial = common::serial();
    let (bp, _jump) = probes();
    assert_eq!(call("trap_disposition", 0), 0);
    assert_eq!(call("install_raw", 0), 0, "the old handler read back is the program's SIG_DFL");
    assert_eq!(call("trap_handler_is", 1), 1);
    assert_eq!(call("trap_handler_is", 0), 1, "sigaction reads what rt_sigaction set");
    let seen = call("traps_seen", 0);
    assert_eq!(call("own_int3", 3), 3);
    assert_eq!(call("sig_bp", 3), 5);
    assert_eq!(call("traps_seen", 0), seen + 1);
    assert_eq!(bp.hits(), 1);
    assert_eq!(call("trap_disposition", 0), 0);
}

#[test]
fn sig_ign_discards_a_sent_sigtrap_and_an_int3_still_kills() {
    let _serial = common::serial();
    let (bp, _jump) = probes();
    assert_eq!(call("trap_disposition", 1), 0);
    assert_eq!(call("trap_handler_is", 0), 2);
    assert_eq!(call("own_raise", 0), 0, "an ignored SIGTRAP is discarded");
    assert_eq!(call("sig_bp", 0), 2);
    assert_eq!(bp.hits(), 1);
    assert_eq!(in_child(|| call("own_int3", 0) as i32), Err(libc::SIGTRAP), "the kernel forces an int3's SIGTRAP");
    assert_eq!(in_child(|| call("sig_bp", 40) as i32), Ok(42), "dynprobe's own int3 is not the program's");
    assert_eq!(call("trap_disposition", 0), 0);
}

#[test]
fn a_sigtrap_sent_while_blocked_waits_for_the_unblock() {
    let _serial = common::serial();
    let (bp, _jump) = probes();
    assert_eq!(call("install_handler", 0), 0);
    let seen = call("traps_seen", 0);
    assert_eq!(call("block_trap", 1), 0);
    assert_eq!(call("own_raise", 0), 0);
    assert_eq!(call("sig_bp", 0), 2, "a breakpoint hit while the program blocks SIGTRAP");
    assert_eq!(call("traps_seen", 0), seen, "pending while blocked");
    assert_eq!(call("block_trap", 0), 0);
    assert_eq!(call("traps_seen", 0), seen + 1, "delivered once at the unblock");
    assert_eq!(bp.hits(), 1);
    assert_eq!(
        in_child(|| {
            call("block_trap", 1);
            call("own_int3", 0) as i32
        }),
        Err(libc::SIGTRAP),
        "an int3 while the program blocks SIGTRAP kills, as the kernel's force_sig does"
    );
    assert_eq!(call("trap_disposition", 0), 0);
}

#[test]
fn a_handler_whose_mask_blocks_every_signal_still_takes_a_breakpoint_probe() {
    let _serial = common::serial();
    let (bp, _jump) = probes();
    assert_eq!(call("usr1_full_mask", 0), 1042, "the handler's call ran; its mask reads back as set");
    assert_eq!(bp.hits(), 1);
}

#[test]
fn a_probe_on_a_guarded_function_sees_the_programs_own_arguments() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static ACT: AtomicU64 = AtomicU64::new(0);
    let _serial = common::serial();
    let (_bp, _jump) = probes();
    let probe = Probe::at("libc:sigaction")
        .on_hit(|regs| {
            if regs.arg(0) == libc::SIGTRAP as u64 {
                ACT.store(regs.arg(1), Ordering::Relaxed);
            }
        })
        .register()
        .unwrap();
    assert_eq!(call("install_handler", 0), 0);
    assert_ne!(ACT.load(Ordering::Relaxed), 0, "the probe ran before the guard rewrote the arguments");
    assert_eq!(call("trap_handler_is", 0), 1);
    assert!(probe.unregister().unwrap().hits >= 2);
    assert_eq!(call("trap_disposition", 0), 0);
}

#[test]
fn a_guarded_call_from_inside_a_probe_handler_is_still_guarded() {
    let _serial = common::serial();
    let (bp, _jump) = probes();
    let ignore = Probe::at(sym!("sig_jump"))
        .on_hit(|_| {
            // SAFETY: signal() with a valid signal and SIG_IGN.
            unsafe { libc::signal(libc::SIGTRAP, libc::SIG_IGN) };
        })
        .register()
        .unwrap();
    dynprobe_probe::wait_for_optimizer().unwrap();
    assert_eq!(call("sig_jump", 1), 2);
    assert_eq!(call("trap_handler_is", 0), 2, "the handler's signal() set the program's action");
    assert_eq!(call("sig_bp", 1), 3, "and left dynprobe's in place");
    assert_eq!(bp.hits(), 1);
    ignore.unregister().unwrap();
    assert_eq!(call("trap_disposition", 0), 0);
}

#[test]
fn released_signals_go_back_to_the_program_and_come_back_with_the_next_probe() {
    let _serial = common::serial();
    {
        let (_bp, _jump) = probes();
        assert_eq!(call("install_handler", 0), 0);
        assert!(matches!(
            dynprobe_probe::release_signals(),
            Err(dynprobe_probe::ProbeError::SignalsInUse { probes: 2 })
        ));
    }
    dynprobe_probe::release_signals().unwrap();
    assert_eq!(call("trap_handler_is", 1), 1, "the kernel's action is the program's handler again");
    let seen = call("traps_seen", 0);
    assert_eq!(call("own_int3", 0), 0);
    assert_eq!(call("traps_seen", 0), seen + 1);

    let (bp, _jump) = probes();
    assert_eq!(call("trap_handler_is", 0), 1, "the program's handler, read back through the guards");
    assert_eq!(call("sig_bp", 0), 2);
    assert_eq!(call("own_int3", 0), 0);
    assert_eq!((bp.hits(), call("traps_seen", 0)), (1, seen + 2));
    assert_eq!(call("trap_disposition", 0), 0);
}

#[test]
fn an_sa_onstack_handler_runs_on_the_threads_alternate_stack() {
    let _serial = common::serial();
    let (bp, _jump) = probes();
    // 0, and SS_AUTODISARM (include/uapi/linux/signal.h), which the libc crate lacks.
    for flags in [0, 1i64 << 31] {
        // The handler needs more stack than its thread has (on the thread's stack it dies),
        // and unwinds its own stack back to the int3 (through dynprobe's frames).
        assert_eq!(in_child(|| call("onstack_trap", flags) as i32), Ok(111), "sigaltstack flags {flags:#x}");
    }
    assert_eq!(call("sig_bp", 1), 3);
    assert_eq!(bp.hits(), 1);
}

#[test]
fn a_thread_created_while_its_creator_blocks_sigtrap_blocks_it_too() {
    let _serial = common::serial();
    let (bp, _jump) = probes();
    assert_eq!(call("install_handler", 0), 0);
    assert_eq!(call("new_thread_blocks", 0), 100, "a thread created while unblocked does not block");
    assert_eq!(call("new_thread_blocks", 1), 111, "blocks, a raise waits for its unblock, and takes probes");
    assert_eq!(bp.hits(), 2);
    assert_eq!(call("trap_disposition", 0), 0);
}

#[test]
fn the_image_a_thread_blocking_sigtrap_executes_starts_with_it_blocked() {
    let _serial = common::serial();
    let (bp, _jump) = probes();
    assert_eq!(in_child(|| call("exec_blocking", 1) as i32), Ok(0), "grep reads SIGTRAP in its SigBlk");
    assert_eq!(in_child(|| call("exec_blocking", 0) as i32), Ok(1), "and not when the thread did not block it");
    std::thread::spawn(move || {
        assert_eq!(call("exec_fails_blocking", 0), 1, "a failed execv returns -1, ENOENT, still blocking");
        assert_eq!(kernel_blocked_mask() & TRAP_BIT, 0, "SIGTRAP is not really blocked after the failure");
        assert_eq!(call("sig_bp", 1), 3);
    })
    .join()
    .unwrap();
    assert_eq!(bp.hits(), 1);
}

#[test]
fn a_fork_child_of_a_thread_blocking_sigtrap_blocks_it_too() {
    let _serial = common::serial();
    let (_bp, _jump) = probes();
    assert_eq!(call("install_handler", 0), 0);
    let seen = call("traps_seen", 0);
    assert_eq!(call("forked_child_blocks", 0), 11, "the child reads SIGTRAP blocked and its raise waits");
    assert_eq!(call("traps_seen", 0), seen, "the parent saw none of it");
    assert_eq!(call("trap_disposition", 0), 0);
}

#[test]
fn a_sigtrap_sent_while_blocked_is_pending_for_sigwait_and_sigpending() {
    let _serial = common::serial();
    let (_bp, _jump) = probes();
    assert_eq!(call("install_handler", 0), 0);
    for (way, sent) in ["raise", "kill"].iter().enumerate() {
        for (how, wait) in ["sigwait", "sigwaitinfo", "sigtimedwait"].iter().enumerate() {
            let code = (way * 10 + how) as i64;
            assert_eq!(in_child(|| call("wait_for_held", code) as i32), Ok(0), "{sent}, then {wait}");
        }
    }
    assert_eq!(in_child(|| call("suspend_with_held", 0) as i32), Ok(0), "sigsuspend delivers it");
    assert_eq!(call("trap_disposition", 0), 0);
}

#[test]
fn a_sigtrap_sent_to_the_process_goes_to_a_thread_that_takes_it() {
    let _serial = common::serial();
    let (_bp, _jump) = probes();
    assert_eq!(call("install_handler", 0), 0);
    assert_eq!(in_child(|| call("kill_to_blocking_process", 1) as i32), Ok(0), "to the thread in sigwaitinfo");
    assert_eq!(in_child(|| call("kill_to_blocking_process", 0) as i32), Ok(0), "to the first thread to unblock");
    assert_eq!(call("trap_disposition", 0), 0);
}

#[test]
fn a_probe_on_syscall_sees_every_call_the_guard_lets_through() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static GETPPID: AtomicU64 = AtomicU64::new(0);
    let _serial = common::serial();
    let (_bp, _jump) = probes();
    // The guard's detour skips calls of other system calls; a probe of the program's own on
    // the same function must see them all.
    let probe = Probe::at("libc:syscall")
        .on_hit(|regs| {
            if regs.arg(0) == libc::SYS_getppid as u64 {
                GETPPID.fetch_add(1, Ordering::Relaxed);
            }
        })
        .register()
        .unwrap();
    dynprobe_probe::wait_for_optimizer().unwrap();
    for _ in 0..10 {
        // SAFETY: getppid takes no arguments.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    assert_eq!(GETPPID.load(Ordering::Relaxed), 10);
    std::thread::spawn(|| assert_eq!(call("block_all", 2), 0, "syscall(SYS_rt_sigprocmask) is still guarded"))
        .join()
        .unwrap();
    // Those calls, the thread's rt_sigprocmask, and its futexes (Rust's, through syscall()).
    assert!(probe.unregister().unwrap().hits >= 11);
}

#[test]
fn a_sigtrap_held_when_the_signals_are_released_stays_pending_in_the_kernel() {
    let _serial = common::serial();
    std::thread::spawn(|| {
        let seen = {
            let (_bp, _jump) = probes();
            assert_eq!(call("install_handler", 0), 0);
            assert_eq!(call("block_trap", 1), 0);
            let seen = call("traps_seen", 0);
            assert_eq!(call("own_raise", 0), 0);
            assert_eq!(call("traps_seen", 0), seen, "held while blocked");
            seen
        };
        dynprobe_probe::release_signals().unwrap();
        assert_ne!(kernel_blocked_mask() & TRAP_BIT, 0, "SIGTRAP is blocked for real now");
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let pending = status.lines().find_map(|l| l.strip_prefix("SigPnd:")).unwrap();
        assert_ne!(u64::from_str_radix(pending.trim(), 16).unwrap() & TRAP_BIT, 0, "and pending in the kernel");
        assert_eq!(call("traps_seen", 0), seen);
        assert_eq!(call("block_trap", 0), 0);
        assert_eq!(call("traps_seen", 0), seen + 1, "delivered once at the unblock");
        assert_eq!(call("trap_disposition", 0), 0);
    })
    .join()
    .unwrap();
}
