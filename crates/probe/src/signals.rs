//! Guards that keep the program's `SIGTRAP` virtual, so breakpoint probes survive what
//! programs do with signals.
//!
//! The kernel kills a process whose thread reaches an `int3` while it blocks `SIGTRAP`, and
//! delivers the trap to whatever `SIGTRAP` handler is installed at that moment
//! (kernel/signal.c `force_sig_info_to_task`). Thread pools block every signal in their
//! workers (xz: `pthread_sigmask(SIG_SETMASK, {all})`), and programs install their own
//! `SIGTRAP` handlers (LLVM: `SA_ONSTACK | SA_NODEFER | SA_RESETHAND`). So the text layer's
//! dispatcher stays the kernel's action and `SIGTRAP` is never really blocked; what the
//! program asked for is kept beside it ([`dynprobe_text::trap`]'s chained action and
//! per-thread blocked bit) and the dispatcher delivers the program's own traps by it.
//!
//! What keeps that state is a probe of our own at the entry of each C library function that
//! changes a signal action or a thread's mask — `sigaction` (which `signal`, `bsd_signal`,
//! `sysv_signal` and `sigset` call), `pthread_sigmask` (which `sigprocmask`, `sighold`,
//! `siglongjmp` call) and `syscall()` for `SYS_rt_sigaction` / `SYS_rt_sigprocmask`. Each
//! is jump-optimized as soon as it is placed, so a guard costs no trap; the one on
//! `syscall()` filters at its detour's entry, so that other system calls (a Rust program's
//! futexes) pass it without saving anything. Its handler does
//! the call's work itself with raw system calls — `SIGTRAP`'s action into the chained
//! action, `SIGTRAP` taken out of the mask being set (and out of every other handler's
//! `sa_mask`, which would block it while that handler runs), the program's view written
//! back into the `old` arguments — then rewrites the call's arguments into a no-op that
//! returns success (`sigaction(sig, NULL, NULL)`, `pthread_sigmask(SIG_BLOCK, NULL, NULL)`).
//! A call the kernel would refuse (a bad signal, `how` or size) is left alone, to fail as it
//! would. A guard reached through its breakpoint, before it is optimized, changes the mask
//! saved in the signal frame, which the kernel restores at `sigreturn`.
//!
//! A `SIGTRAP` sent while the program blocks it is held by the dispatcher ([`trap`]); the
//! guards on `sigtimedwait` (which `sigwait` and `sigwaitinfo` call), `sigsuspend` and
//! `sigpending` give it to the program as the kernel would give a pending signal.
//!
//! What a thread passes on is guarded too: `pthread_create` gives a thread created while
//! its creator blocks `SIGTRAP` the blocked bit (its start routine goes through a
//! trampoline that sets it), and `execve` (which the other `exec` functions call) makes
//! the call itself with `SIGTRAP` really blocked, which the new image keeps; the agent of
//! a traced new image finds it blocked and makes it virtual again before its first probe.
//!
//! The C library's own internal blocks (around `clone` in `pthread_create`, in `raise` and
//! `abort`) are raw system calls in its code, a few instructions long, and are not guarded.
//! A `fork` child keeps its thread's bit (its thread slot, copied, is kept for it; see
//! `thread_slot`). Not carried over: the bit into a `posix_spawn` child, whose mask is
//! the parent's real one.

use crate::arch::StartRoutine;
use crate::exec_env::ExecEnvironment;
use crate::guard::HandlerGuard;
use crate::probe::ProbeShared;
use crate::thread_slot::{slot_of_thread, ThreadSlot};
use crate::{registry, Probe, ProbeError, Regs};
use dynprobe_arch::native::signal_syscalls;
use dynprobe_symbols::SymbolTable;
use dynprobe_text::memory;
use dynprobe_text::trap::{self, KernelSigaction, SigInfo, TrapState, SA_RESTORER, TRAP_BIT};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The glibc-internal signals (`SIGCANCEL`, `SIGSETXID`) that `sigaction` refuses and
/// `pthread_sigmask` never blocks.
const INTERNAL: u64 = trap::sigbit(32) | trap::sigbit(33);
/// Signals no mask can hold (the kernel drops them from every mask).
const UNBLOCKABLE: u64 = trap::sigbit(libc::SIGKILL) | trap::sigbit(libc::SIGSTOP);

/// Per signal (bit `n - 1`): the program asked for `SIGTRAP` in that handler's `sa_mask`,
/// which it gets back when it reads the action.
static ASKED_TRAP_IN_MASK: AtomicU64 = AtomicU64::new(0);

/// Set once the guards are placed (or were tried: a process without the C library's
/// functions — a static program — has nothing to guard).
static GUARDED: AtomicBool = AtomicBool::new(false);
static PLACING: Mutex<Option<String>> = Mutex::new(None);
/// The guards placed, removed by [`release_signals`].
static PLACED: Mutex<Vec<Arc<ProbeShared>>> = Mutex::new(Vec::new());

/// A guard: the pre-handler of the probe at a guarded function's entry.
type Guard = fn(&mut Regs);

/// The C library functions guarded, and their guards.
const GUARDS: [(&str, Guard); 8] = [
    ("sigaction", guard_sigaction),
    ("pthread_sigmask", guard_pthread_sigmask),
    ("syscall", guard_syscall),
    ("pthread_create", guard_pthread_create),
    ("execve", guard_execve),
    ("sigtimedwait", guard_sigtimedwait),
    ("sigsuspend", guard_sigsuspend),
    ("sigpending", guard_sigpending),
];

/// Places the guards once per process, before the first probe: called by every probe
/// registration. Failing to place one is not an error of that registration (the probe
/// works as long as the program leaves `SIGTRAP` alone); the reason is kept for
/// [`guard_failure`].
pub(crate) fn ensure_guards() {
    if GUARDED.load(Ordering::Acquire) || HandlerGuard::current_thread_inside() {
        return;
    }
    let mut failure = PLACING.lock().unwrap_or_else(|e| e.into_inner());
    if GUARDED.load(Ordering::Acquire) {
        return;
    }
    if let Err(e) = place_guards() {
        *failure = Some(e);
    }
    GUARDED.store(true, Ordering::Release);
}

/// Places the signal guards now, as the first probe does (they stay until
/// [`release_signals`]); `Err` says why not all of them could be placed.
pub fn place_signal_guards() -> Result<(), String> {
    ensure_guards();
    guard_failure().map_or(Ok(()), Err)
}

/// Whether the signal guards are in place (or were tried) in this process.
pub fn signal_guards_placed() -> bool {
    GUARDED.load(Ordering::Acquire)
}

/// Why the guards could not all be placed, if so.
pub fn guard_failure() -> Option<String> {
    PLACING.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn place_guards() -> Result<(), String> {
    trap::set_thread_state_source(thread_trap_state, thread_refuses_trap);
    adopt_real_block();
    trap::install().map_err(|e| e.to_string())?;
    strip_trap_from_installed_masks();
    // SAFETY: a NUL-terminated name; RTLD_NOLOAD only looks the library up.
    let libc_handle = unsafe { libc::dlopen(c"libc.so.6".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if libc_handle.is_null() {
        return Err("the C library is not loaded: nothing to guard".into());
    }
    let mut failures = Vec::new();
    for (name, guard) in GUARDS {
        let cname = std::ffi::CString::new(name).expect("no NUL in the names");
        // SAFETY: a valid handle and NUL-terminated name; dlsym only looks it up.
        let addr = unsafe { libc::dlsym(libc_handle, cname.as_ptr()) } as u64;
        if addr == 0 {
            failures.push(format!("{name}: not found in the C library"));
            continue;
        }
        let mut probe = Probe::at(addr).on_hit(guard);
        probe.internal = true;
        if name == "syscall" {
            // Most calls are other system calls (a Rust program's futexes): they skip the
            // guard's detour entirely.
            probe.entry_filter = &SIGNAL_SYSCALLS;
        }
        match registry::register(probe) {
            // Kept until release_signals: the guards are the program's SIGTRAP.
            Ok(shared) => PLACED.lock().unwrap_or_else(|e| e.into_inner()).push(shared),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    // SAFETY: the handle from dlopen above.
    unsafe { libc::dlclose(libc_handle) };
    if let Err(e) = registry::wait_for_optimizer() {
        failures.push(format!("the guards stay breakpoints: {e}"));
    }
    // A guard left a breakpoint still works, but traps on every call it guards.
    for guard in PLACED.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        match registry::info(guard) {
            Some(info) if !info.optimized => failures.push(format!(
                "{} stays a breakpoint: {}",
                info.symbol,
                info.not_optimized.as_deref().unwrap_or("not yet optimized")
            )),
            _ => {}
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("signal guards not placed: {}", failures.join("; ")))
    }
}

/// Removes the guards and gives `SIGTRAP` back to the program — its own action becomes the
/// kernel's again, the handlers whose `sa_mask` it asked `SIGTRAP` in get it back, the
/// calling thread blocks it for real if the program asked, and a `SIGTRAP` held for the
/// calling thread or the process goes back to the kernel, pending — once
/// no other probe is left (the end of an attach session: nothing of dynprobe runs in the
/// program afterwards). The next probe places the guards again.
///
/// Other threads that asked to block `SIGTRAP` do not get it blocked for real: a thread's
/// mask can only be changed by that thread.
pub fn release_signals() -> Result<(), ProbeError> {
    let _placing = PLACING.lock().unwrap_or_else(|e| e.into_inner());
    if !GUARDED.load(Ordering::Acquire) {
        return Ok(());
    }
    let mut placed = PLACED.lock().unwrap_or_else(|e| e.into_inner());
    let others = registry::probe_count()? - placed.len();
    if others > 0 {
        return Err(ProbeError::SignalsInUse { probes: others });
    }
    while let Some(guard) = placed.pop() {
        if let Err(e) = registry::unregister(&guard) {
            placed.push(guard);
            return Err(e);
        }
    }
    trap::uninstall()?;
    restore_trap_in_masks();
    // The calling thread blocks SIGTRAP for real if the program asked, and dynprobe's own
    // (the session's) from now on, before the held SIGTRAPs go back to the kernel: the
    // program's handler must not run on dynprobe's thread.
    if trap::take_program_blocks_trap() || crate::own_thread::current_thread_is_own() {
        // SAFETY: a valid mask.
        unsafe { trap::rt_sigprocmask(libc::SIG_BLOCK, &TRAP_BIT, std::ptr::null_mut()) };
    }
    trap::release_held();
    GUARDED.store(false, Ordering::Release);
    Ok(())
}

/// The calling thread's virtual `SIGTRAP` state (see [`trap::set_thread_state_source`]).
fn thread_trap_state() -> Option<&'static TrapState> {
    ThreadSlot::current().map(|(_, slot)| &slot.trap_state)
}

/// Whether thread `tid` blocks `SIGTRAP` or is dynprobe's own (untraced): a `SIGTRAP` sent
/// to the process must not be passed to it. A thread without a slot never called a guard,
/// so it cannot block `SIGTRAP`.
fn thread_refuses_trap(tid: i32) -> bool {
    slot_of_thread(tid).is_some_and(|slot| slot.trap_state.blocked() || slot.untraced.load(Ordering::Relaxed))
}

/// A thread that blocks `SIGTRAP` for real when the guards come — the main thread of an
/// image `exec`'d by a thread that blocked it (the mask survives `execve`, see execve(2)) —
/// keeps blocking it, virtually: a breakpoint would kill it otherwise.
fn adopt_real_block() {
    let mut mask = 0u64;
    // SAFETY: a query into a valid u64.
    unsafe { trap::rt_sigprocmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask) };
    if mask & TRAP_BIT != 0 {
        trap::set_program_blocks_trap(true);
        // SAFETY: a valid mask.
        unsafe { trap::rt_sigprocmask(libc::SIG_UNBLOCK, &TRAP_BIT, std::ptr::null_mut()) };
    }
}

/// Handlers installed before the guards (a process attached to) may block `SIGTRAP` while
/// they run: take it out of their masks, remembering that the program asked for it.
fn strip_trap_from_installed_masks() {
    for sig in 1..=64 {
        if sig == libc::SIGTRAP || sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let mut action = KernelSigaction::default();
        // SAFETY: a query into a valid KernelSigaction.
        if unsafe { trap::rt_sigaction(sig, std::ptr::null(), &mut action) } != 0 || action.mask & TRAP_BIT == 0 {
            continue;
        }
        ASKED_TRAP_IN_MASK.fetch_or(trap::sigbit(sig), Ordering::Relaxed);
        action.mask &= !TRAP_BIT;
        // SAFETY: the action just read back, with one bit less.
        unsafe { trap::rt_sigaction(sig, &action, std::ptr::null_mut()) };
    }
}

/// Puts `SIGTRAP` back into the `sa_mask` of the handlers the program asked it for.
fn restore_trap_in_masks() {
    let asked = ASKED_TRAP_IN_MASK.swap(0, Ordering::Relaxed);
    for sig in (1..=64).filter(|&sig| asked & trap::sigbit(sig) != 0) {
        let mut action = KernelSigaction::default();
        // SAFETY: a query into a valid KernelSigaction.
        if unsafe { trap::rt_sigaction(sig, std::ptr::null(), &mut action) } == 0 {
            action.mask |= TRAP_BIT;
            // SAFETY: the action just read back, with the bit the program asked for.
            unsafe { trap::rt_sigaction(sig, &action, std::ptr::null_mut()) };
        }
    }
}

// ---------------------------------------------------------------------------------------
// Actions.

/// Changes (or reads, with `None`) signal `sig`'s action as the program sees it; returns
/// the old one as the program sees it, or `None` when the kernel refuses the change (the
/// caller then lets the original call fail by itself).
fn change_action(sig: i32, new: Option<KernelSigaction>) -> Option<KernelSigaction> {
    if sig == libc::SIGTRAP {
        return Some(match new {
            Some(new) => trap::set_program_action(&KernelSigaction { mask: new.mask & !UNBLOCKABLE, ..new }),
            None => trap::program_action(),
        });
    }
    let bit = trap::sigbit(sig);
    let stripped = new.map(|a| KernelSigaction { mask: a.mask & !TRAP_BIT, ..a });
    let mut old = KernelSigaction::default();
    let new_ptr = stripped.as_ref().map_or(std::ptr::null(), |a| a as *const KernelSigaction);
    // SAFETY: pointers to valid KernelSigactions, or null.
    if unsafe { trap::rt_sigaction(sig, new_ptr, &mut old) } != 0 {
        return None;
    }
    let asked = match new {
        Some(new) if new.mask & TRAP_BIT != 0 => ASKED_TRAP_IN_MASK.fetch_or(bit, Ordering::Relaxed),
        Some(_) => ASKED_TRAP_IN_MASK.fetch_and(!bit, Ordering::Relaxed),
        None => ASKED_TRAP_IN_MASK.load(Ordering::Relaxed),
    };
    if asked & bit != 0 {
        old.mask |= TRAP_BIT;
    }
    Some(old)
}

/// Whether `sig` is one whose action may be changed (else the call is left to fail).
fn changeable(sig: u64) -> bool {
    (1..=64).contains(&sig) && sig != libc::SIGKILL as u64 && sig != libc::SIGSTOP as u64
}

/// `int sigaction(int sig, const struct sigaction *act, struct sigaction *oact)`, the C
/// library's structure (sysdeps/unix/sysv/linux/libc_sigaction.c converts it to the
/// kernel's the same way).
fn guard_sigaction(regs: &mut Regs) {
    let (sig, act, oact) = (regs.rdi as i32 as i64 as u64, regs.rsi as *const libc::sigaction, regs.rdx);
    if !changeable(sig) || INTERNAL & trap::sigbit(sig as i32) != 0 {
        return;
    }
    let new = (!act.is_null()).then(|| {
        // SAFETY: the C library reads `*act` the same way; an invalid pointer faults here
        // as it would have there.
        let act = unsafe { act.read_volatile() };
        KernelSigaction {
            handler: act.sa_sigaction as u64,
            flags: act.sa_flags as u32 as u64 | SA_RESTORER,
            restorer: trap::c_library_restorer(),
            // SAFETY: the first word of a sigset_t holds signals 1..=64.
            mask: unsafe { *(&act.sa_mask as *const libc::sigset_t as *const u64) },
        }
    });
    let Some(old) = change_action(sig as i32, new) else { return };
    if oact != 0 {
        let oact = oact as *mut libc::sigaction;
        // SAFETY: as the C library would, through the caller's pointer: the handler, the
        // mask's first word (the rest is left as it is), the flags and the restorer.
        unsafe {
            std::ptr::addr_of_mut!((*oact).sa_sigaction).write_volatile(old.handler as usize);
            (std::ptr::addr_of_mut!((*oact).sa_mask) as *mut u64).write_volatile(old.mask);
            std::ptr::addr_of_mut!((*oact).sa_flags).write_volatile(old.flags as i32);
            (std::ptr::addr_of_mut!((*oact).sa_restorer) as *mut u64).write_volatile(old.restorer);
        }
    }
    regs.rsi = 0;
    regs.rdx = 0;
}

// ---------------------------------------------------------------------------------------
// Masks.

/// The calling thread's real mask, and where a change of it must go: the mask a breakpoint
/// hit's signal frame will restore, when the guard runs in one (see
/// [`ThreadSlot::trap_mask`]), else the thread's own.
fn real_mask() -> (u64, Option<*mut u64>) {
    let frame = ThreadSlot::existing().map_or(0, |slot| slot.trap_mask.load(Ordering::Relaxed));
    if frame != 0 {
        let frame = frame as *mut u64;
        // SAFETY: set by the trap path to the uc_sigmask of the frame being handled on this
        // thread, which outlives the pre-handlers.
        return (unsafe { frame.read() }, Some(frame));
    }
    let mut mask = 0u64;
    // SAFETY: a query into a valid u64.
    unsafe { trap::rt_sigprocmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask) };
    (mask, None)
}

/// Does `how, set, oset` for the calling thread with `SIGTRAP` virtual; `false` when the
/// kernel would refuse it (left for the original call to fail by itself).
///
/// `internal`: the C library's `pthread_sigmask`, which never blocks its own signals.
fn change_mask(how: u64, set: *const u64, oset: *mut u64, internal: bool) -> bool {
    let how = how as i32 as i64;
    if !set.is_null() && !(0..=2).contains(&how) {
        return false;
    }
    let (real, frame) = real_mask();
    let blocked = trap::program_blocks_trap();
    if !oset.is_null() {
        // The kernel checks that `oset` can be written; a bad one is left to fail.
        // SAFETY: the kernel validates `oset` and writes the mask there, or returns EFAULT.
        if unsafe { trap::rt_sigprocmask(libc::SIG_BLOCK, std::ptr::null(), oset) } != 0 {
            return false;
        }
        let old = real & !TRAP_BIT | if blocked { TRAP_BIT } else { 0 };
        // SAFETY: just written by the kernel, so writable.
        unsafe { oset.write_volatile(old) };
    }
    if set.is_null() {
        return true;
    }
    // SAFETY: the C library's pthread_sigmask reads `*set` the same way (a raw
    // rt_sigprocmask with a bad `set` would fail: `syscall`'s caller gets a fault here
    // instead of EFAULT, as glibc's own wrapper would give it).
    let asked = unsafe { set.read_volatile() };
    let mut bits = asked & !TRAP_BIT;
    if internal {
        bits &= !INTERNAL;
    }
    let trap_asked = asked & TRAP_BIT != 0;
    let (new, now_blocked) = match how as i32 {
        libc::SIG_BLOCK => (real | bits, blocked || trap_asked),
        libc::SIG_UNBLOCK => (real & !bits, blocked && !trap_asked),
        _ => (bits, trap_asked),
    };
    let new = new & !UNBLOCKABLE & !TRAP_BIT;
    match frame {
        // SAFETY: the frame's mask word (see real_mask); sigreturn applies it.
        Some(frame) => unsafe { frame.write(new) },
        // SAFETY: a valid mask.
        None => unsafe {
            trap::rt_sigprocmask(libc::SIG_SETMASK, &new, std::ptr::null_mut());
        },
    }
    trap::set_program_blocks_trap(now_blocked);
    true
}

/// `int pthread_sigmask(int how, const sigset_t *set, sigset_t *oset)`.
fn guard_pthread_sigmask(regs: &mut Regs) {
    if change_mask(regs.rdi, regs.rsi as *const u64, regs.rdx as *mut u64, true) {
        regs.rdi = libc::SIG_BLOCK as u64;
        regs.rsi = 0;
        regs.rdx = 0;
    }
}

/// The system call numbers [`guard_syscall`] looks at.
const SIGNAL_SYSCALLS: [i32; 3] =
    [libc::SYS_rt_sigaction as i32, libc::SYS_rt_sigprocmask as i32, libc::SYS_execve as i32];

/// `long syscall(long nr, ...)` with `nr` `SYS_rt_sigaction` or `SYS_rt_sigprocmask`: the
/// kernel's structures, the arguments in `rsi, rdx, rcx, r8`; or `SYS_execve`, made as
/// [`guard_execve`] makes it.
fn guard_syscall(regs: &mut Regs) {
    if regs.rdi as i64 == libc::SYS_execve {
        if let Some(errno) = execve_for_the_program(regs.rsi, regs.rdx, regs.rcx) {
            fail_call(regs, errno);
        }
        return;
    }
    let done = match regs.rdi as i64 {
        libc::SYS_rt_sigprocmask if regs.r8 == 8 => {
            change_mask(regs.rsi, regs.rdx as *const u64, regs.rcx as *mut u64, false)
        }
        libc::SYS_rt_sigaction if regs.r8 == 8 && changeable(regs.rsi) => {
            let (act, oact) = (regs.rdx as *const KernelSigaction, regs.rcx as *mut KernelSigaction);
            // SAFETY: the program passed `act` for the kernel to read; a bad one faults here.
            let new = (!act.is_null()).then(|| unsafe { act.read_volatile() });
            match change_action(regs.rsi as i32, new) {
                Some(old) => {
                    if !oact.is_null() {
                        // SAFETY: the program passed `oact` for the kernel to write.
                        unsafe { oact.write_volatile(old) };
                    }
                    true
                }
                None => false,
            }
        }
        _ => false,
    };
    if done {
        // rt_sigprocmask(SIG_BLOCK, NULL, NULL, 8): does nothing, returns 0.
        regs.rdi = libc::SYS_rt_sigprocmask as u64;
        regs.rsi = libc::SIG_BLOCK as u64;
        regs.rdx = 0;
        regs.rcx = 0;
        regs.r8 = 8;
    }
}

// ---------------------------------------------------------------------------------------
// What a thread passes on: to the threads it creates, to the image it executes.

/// A thread created while its creator blocks `SIGTRAP`: its start routine and argument, from
/// `pthread_create` to the new thread's first instruction (glibc's `pthread_create` gives
/// the new thread its creator's mask, nptl/pthread_create.c).
pub(crate) struct BlockedStart {
    used: AtomicBool,
    routine: AtomicU64,
    arg: AtomicU64,
}

/// Threads being created at once by threads that block `SIGTRAP`. A record is taken back by
/// the new thread; a `pthread_create` that fails keeps its record for good. With every
/// record in use, a new thread starts without the blocked bit (as it did before).
const BLOCKED_STARTS: usize = 256;
static STARTS: [BlockedStart; BLOCKED_STARTS] =
    [const { BlockedStart { used: AtomicBool::new(false), routine: AtomicU64::new(0), arg: AtomicU64::new(0) } };
        BLOCKED_STARTS];

/// `int pthread_create(pthread_t *thread, const pthread_attr_t *attr, void *(*start)(void *),
/// void *arg)`: when the creator blocks `SIGTRAP`, the new thread starts in a trampoline
/// ([`crate::arch::blocked_start_trampoline`]) that marks it blocking too, then jumps to
/// `start(arg)` — returning into the C library's thread start, as without it.
fn guard_pthread_create(regs: &mut Regs) {
    if !trap::program_blocks_trap() {
        return;
    }
    let Some(record) =
        STARTS.iter().find(|s| s.used.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok())
    else {
        return;
    };
    record.routine.store(regs.rdx, Ordering::Relaxed);
    record.arg.store(regs.rcx, Ordering::Relaxed);
    regs.rdx = crate::arch::blocked_start_trampoline();
    regs.rcx = record as *const BlockedStart as u64;
}

/// How many threads [`guard_pthread_create`] sent through the trampoline have not reached
/// it yet (or never will: their `pthread_create` failed). The trampoline is dynprobe's code:
/// while one is due, dynprobe must stay loaded.
pub(crate) fn blocked_starts_pending() -> usize {
    STARTS.iter().filter(|s| s.used.load(Ordering::Acquire)).count()
}

/// The first call of a thread created by [`guard_pthread_create`]: marks it blocking
/// `SIGTRAP`, frees the record and returns the program's start routine and argument.
pub(crate) extern "C" fn take_blocked_start(record: *const BlockedStart) -> StartRoutine {
    // SAFETY: the record guard_pthread_create passed as the start argument: one of STARTS.
    let record = unsafe { &*record };
    let start =
        StartRoutine { routine: record.routine.load(Ordering::Relaxed), arg: record.arg.load(Ordering::Relaxed) };
    record.used.store(false, Ordering::Release);
    trap::set_program_blocks_trap(true);
    start
}

/// `int execve(const char *path, char *const argv[], char *const envp[])` (which `execv`,
/// `execl`, `execvp`, `posix_spawn`, `system`… call): the new image gets the environment
/// dynprobe follows it by ([`crate::exec_env`]) whatever environment the program gave; and
/// a thread that blocks `SIGTRAP` executes the new image with it blocked for real, as the
/// mask is kept across `execve`. Either way the guard makes the call itself and, on
/// failure, returns `-1` with `errno` set, as the C library's wrapper does.
fn guard_execve(regs: &mut Regs) {
    if let Some(errno) = execve_for_the_program(regs.rdi, regs.rsi, regs.rdx) {
        fail_call(regs, errno);
    }
}

/// Makes the program's `execve(path, argv, envp)` here, as [`guard_execve`] describes, when
/// it needs dynprobe to (the environment lacks dynprobe's variables, or the thread blocks
/// `SIGTRAP`); the `errno` it failed with, or `None` when the program's own call should go
/// on. Returns only if the call failed or was not made.
fn execve_for_the_program(path: u64, argv: u64, envp: u64) -> Option<i32> {
    let mut environment = ExecEnvironment::new();
    let carried = environment.build(envp);
    let blocks_trap = trap::program_blocks_trap();
    if !blocks_trap && carried.is_none() {
        return None;
    }
    // The new image starts with the mask the program has (in a breakpoint hit's handler,
    // the one sigreturn restores, not the handler's), SIGTRAP in it if the program blocks it.
    let (real, _) = real_mask();
    let exec_mask = if blocks_trap { real | TRAP_BIT } else { real };
    let mut saved = 0u64;
    // SAFETY: valid masks.
    unsafe { trap::rt_sigprocmask(libc::SIG_SETMASK, &exec_mask, &mut saved) };
    // A vfork child shares this slot with its parent (same thread pointer and TCB tid):
    // the new image must not leave the parent marked as inside a handler.
    let slot = ThreadSlot::existing();
    let marks = slot.map(|s| (s.active.swap(0, Ordering::Relaxed), s.trap_mask.swap(0, Ordering::Relaxed)));
    // SAFETY: the program's own arguments to execve, but for an environment built from
    // its own (on this stack, alive until the call returns).
    let failed = unsafe { trap::execve(path, argv, carried.unwrap_or(envp)) };
    if let (Some(slot), Some((active, trap_mask))) = (slot, marks) {
        slot.active.store(active, Ordering::Relaxed);
        slot.trap_mask.store(trap_mask, Ordering::Relaxed);
    }
    // SAFETY: the mask read above.
    unsafe { trap::rt_sigprocmask(libc::SIG_SETMASK, &saved, std::ptr::null_mut()) };
    Some(-failed as i32)
}

/// Makes the guarded call return `value` to its caller at once, instead of running: the
/// return address is at the top of the stack at a function's entry.
fn return_from_call(regs: &mut Regs, value: u64) {
    regs.rax = value;
    // SAFETY: rsp at a function's entry points at its return address.
    regs.ip = unsafe { (regs.rsp as *const u64).read() };
    regs.rsp += 8;
}

/// Makes the guarded call fail at once with `errno`, as the C library's wrappers do: -1.
fn fail_call(regs: &mut Regs, errno: i32) {
    // SAFETY: the calling thread's errno.
    unsafe { *libc::__errno_location() = errno };
    return_from_call(regs, u64::MAX);
}

// ---------------------------------------------------------------------------------------
// Waiting for a signal, and asking what is pending.

/// `int sigtimedwait(const sigset_t *set, siginfo_t *info, const struct timespec *timeout)`
/// (which `sigwait` and `sigwaitinfo` call): a `SIGTRAP` held while the thread blocks it is
/// pending, so waiting for it returns it at once with its `siginfo` — the C library's
/// wrapper shows a `tgkill`'s `SI_TKILL` as `SI_USER` (sysdeps/unix/sysv/linux/
/// sigtimedwait.c). One sent later is the kernel's to give the waiter
/// ([`trap`] passes a process-directed one to a thread waiting for it).
fn guard_sigtimedwait(regs: &mut Regs) {
    // SAFETY: the C library reads `*set` the same way; a bad pointer faults as it would.
    let set = unsafe { (regs.rdi as *const u64).read_volatile() };
    if set & TRAP_BIT == 0 {
        return;
    }
    let Some(mut info) = trap::take_held_trap() else { return };
    if regs.rsi != 0 {
        // si_code, the third int of siginfo_t.
        if info[1] as u32 as i32 == SI_TKILL {
            info[1] &= !0xffff_ffff;
        }
        // SAFETY: the program passed `info` for the kernel to write a siginfo_t there.
        unsafe { (regs.rsi as *mut SigInfo).write_volatile(info) };
    }
    return_from_call(regs, libc::SIGTRAP as u64);
}

/// `si_code` of a signal sent by `tgkill`.
const SI_TKILL: i32 = -6;

/// `int sigsuspend(const sigset_t *mask)`: with `SIGTRAP` held and not in `mask`, the
/// kernel would deliver it at once and return `EINTR`.
fn guard_sigsuspend(regs: &mut Regs) {
    // SAFETY: the C library reads `*mask` the same way; a bad pointer faults as it would.
    let mask = unsafe { (regs.rdi as *const u64).read_volatile() };
    if mask & TRAP_BIT == 0 && trap::deliver_held_now() {
        fail_call(regs, libc::EINTR);
    }
}

/// `int sigpending(sigset_t *set)`: a `SIGTRAP` held is pending.
fn guard_sigpending(regs: &mut Regs) {
    if !trap::trap_is_held() {
        return;
    }
    let mut pending = 0u64;
    // SAFETY: a valid u64 for the kernel's 8-byte set.
    unsafe { trap::rt_sigpending(&mut pending) };
    // SAFETY: the program passed `set` for the kernel to write; a bad one faults here.
    unsafe { (regs.rdi as *mut u64).write_volatile(pending | TRAP_BIT) };
    return_from_call(regs, 0);
}

// ---------------------------------------------------------------------------------------
// What the guards cannot cover.

/// Why `SIGTRAP` may be blocked when a breakpoint is hit in this process, despite the guards:
/// a thread that blocked it before they were placed (a process attached to), or code outside
/// the C library that changes masks or actions with its own `syscall` instruction (found by
/// decoding the loaded modules once each). `None` when neither is known.
///
/// A "none" is kept for a moment: registering thousands of probes looks once. A thread found
/// blocking `SIGTRAP` is looked at again alone, with no pause: it blocked it for the
/// [`thread_blocking_trap`] pauses already, and a program may keep such a thread for its
/// whole life (node's signal-inspector thread blocks every signal), so placing hundreds of
/// probes must not pay the pauses each time. Another hazard is looked for again each time:
/// it may be gone, and a stale one would refuse probes.
pub(crate) fn breakpoint_hazard(symbols: &SymbolTable) -> Option<String> {
    static LAST: Mutex<Option<(Instant, Option<Hazard>)>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    match &*last {
        Some((when, None)) if when.elapsed() < HAZARD_FRESH => return None,
        Some((_, Some(Hazard::BlockingThread(tid)))) if blocks_trap(*tid) => {
            return Some(Hazard::BlockingThread(*tid).to_string())
        }
        _ => {}
    }
    let found = match thread_blocking_trap() {
        Some(tid) => Some(Hazard::BlockingThread(tid)),
        None => raw_signal_syscall(symbols).map(Hazard::RawSyscall),
    };
    let reason = found.as_ref().map(Hazard::to_string);
    *last = Some((Instant::now(), found));
    reason
}

/// What may keep `SIGTRAP` blocked at a breakpoint ([`breakpoint_hazard`]).
enum Hazard {
    /// This thread blocks it, and did before the guards were placed.
    BlockingThread(i32),
    /// This code (`symbol+offset`) changes masks or actions with its own `syscall`.
    RawSyscall(String),
}

impl std::fmt::Display for Hazard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hazard::BlockingThread(tid) => {
                write!(f, "thread {tid} blocks SIGTRAP (it did before dynprobe's signal guards were placed)")
            }
            Hazard::RawSyscall(at) => {
                write!(f, "{at} changes signal masks or actions with its own syscall instruction, which no guard sees")
            }
        }
    }
}

/// How long a "none" of [`breakpoint_hazard`] is trusted.
const HAZARD_FRESH: Duration = Duration::from_millis(100);

/// Whether thread `tid`'s real mask blocks `SIGTRAP` now (`SigBlk` of
/// /proc/self/task/TID/status, see proc(5)); false once it is gone.
fn blocks_trap(tid: i32) -> bool {
    crate::blocked_signals(tid).is_some_and(|mask| mask & TRAP_BIT != 0)
}

/// A thread of this process whose real mask blocks `SIGTRAP` and keeps it blocked. Some
/// masks block everything for a moment — a thread being created (glibc blocks every signal
/// around `clone`), one in `raise`, one leaving dynprobe's stop handler — so a thread counts
/// only if it still blocks `SIGTRAP` when looked at again a little later.
fn thread_blocking_trap() -> Option<i32> {
    const LOOK_AGAIN: [Duration; 2] = [Duration::from_millis(5), Duration::from_millis(50)];
    let mut candidates: Vec<i32> = crate::thread_ids().ok()?.into_iter().filter(|&tid| blocks_trap(tid)).collect();
    for pause in LOOK_AGAIN {
        if candidates.is_empty() {
            return None;
        }
        std::thread::sleep(pause);
        candidates.retain(|&tid| blocks_trap(tid));
    }
    candidates.first().copied()
}

/// Modules whose own signal system calls are the guarded ones, or dynprobe's.
fn signal_code_is_known(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("libc.so") || name.starts_with("ld-linux") || name.starts_with("libdynprobe_agent")
}

/// The first signal system call outside the C library and dynprobe, as `symbol+offset`.
fn raw_signal_syscall(symbols: &SymbolTable) -> Option<String> {
    type Scanned = BTreeMap<(String, u64), Arc<Vec<u64>>>;
    static SCANNED: Mutex<Option<Scanned>> = Mutex::new(None);
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let mut scanned = SCANNED.lock().unwrap_or_else(|e| e.into_inner());
    let scanned = scanned.get_or_insert_with(BTreeMap::new);
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [range, perms, _, _, _, path] = fields[..] else { continue };
        if !perms.contains('x') || !path.starts_with('/') || signal_code_is_known(path) {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) else { continue };
        let found = scanned.entry((path.to_string(), start)).or_insert_with(|| Arc::new(scan_code(start, end))).clone();
        let foreign = found.iter().find(|&&at| {
            let name = symbols.resolve(at).map(|(sym, _)| sym.name.as_str()).unwrap_or("");
            !registry::BLACKLISTED_CODE
                .iter()
                .any(|prefix| name.starts_with(prefix) || name.contains(&format!("<{prefix}")))
        });
        if let Some(&at) = foreign {
            // A module loaded after the table was read has no symbols in it: name the file.
            return Some(match symbols.resolve(at) {
                Some(_) => symbols.format_addr(at),
                None => format!("the code at {at:#x} in {path}"),
            });
        }
    }
    None
}

/// [`signal_syscalls`] of the code in `[start, end)`, read a chunk at a time, each with the
/// bytes before it where the `mov` of a system call at its start may be.
fn scan_code(start: u64, end: u64) -> Vec<u64> {
    const CHUNK: u64 = 1 << 20;
    const BEFORE: u64 = 64;
    let mut found = Vec::new();
    let mut at = start;
    while at < end {
        let from = at.saturating_sub(BEFORE).max(start);
        let to = (at + CHUNK + 1).min(end);
        let Ok(code) = memory::read_vec(from, (to - from) as usize) else { break };
        found.extend(signal_syscalls(&code, from).into_iter().filter(|&a| a >= at && a < at + CHUNK));
        at += CHUNK;
    }
    found
}
