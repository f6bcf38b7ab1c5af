//! Stopping every other thread of the process, and grace periods.
//!
//! Each other thread is sent a real-time signal (`SIGRTMAX - 2` by default); its handler
//! reports the thread's interrupted `rip` and waits, allocation- and lock-free, until the
//! controller releases it, possibly with a new `rip`. The trap dispatcher blocks this signal
//! while it runs, so a stopped thread is never inside a trap handler: one full stop is
//! therefore a grace period after which no thread holds a pointer the dispatcher handed out.
//!
//! ```text
//!   controller                          each other thread (signal handler)
//!   slot[i] = (tid, SENT)
//!   tgkill(tid) ──────────────────────▶ CAS slot (me, SENT) → (me, CLAIMED)
//!                                       slot.ip = rip; (me, STOPPED); arrived += 1
//!   wait arrived == sent (or timeout) ◀─ futex wake
//!   rescan /proc/self/task until no new thread appears
//!   ... caller inspects threads, set_ip ...
//!   release_gen += 1, futex wake ─────▶ rip = slot.new_ip if set; (me, LEFT); left += 1
//!   wait left == stopped ◀───────────── futex wake; return from the handler
//! ```
//!
//! While the world is stopped, the controller neither allocates nor takes a lock a stopped
//! thread could hold (the task directory is read with `getdents64` into a stack buffer): a
//! stopped thread may be holding the `malloc` arena lock.
//!
//! # Threads that are left alone
//!
//! A signal handler that runs while its thread is blocked in `nanosleep`, `poll`,
//! `epoll_wait`, `select`, `pause`, `sigtimedwait`… makes that call return `EINTR`: the
//! kernel restarts those only when no handler ran (`ERESTARTNOHAND`,
//! `ERESTART_RESTARTBLOCK`; see signal(7), "Interruption of system calls and library
//! functions by signal handlers"). So a stop that knows which code is about to change
//! ([`stop_threads_touching`]) does not signal a thread that is *quiescent*: one that
//! `/proc/self/task/TID/syscall` shows blocked in the kernel (in a system call, or stopped)
//! at a user `pc` outside every range given, with no signal frame on its stack (so it is in
//! no signal handler — not the trap dispatcher's, nor one whose interrupted code could lie in
//! a range). Such a thread can only come back to the changing code through its first byte,
//! never into the middle of an instruction being replaced: the kernel's own reasoning for
//! optimized kprobes (int3 first, then wait for every task to be seen outside), with the
//! blocked thread's saved `pc` as the proof that it is outside. Writers that leave threads
//! running therefore change multi-byte instructions int3-first ([`crate::transaction`]).
//!
//! A thread that is running when the stop looks at it is signalled; should it enter a
//! blocking call in the microseconds before the signal lands, the kernel ends that call with
//! `EINTR` as it delivers the signal. The handler then puts the call back: when the stop
//! signal was not blocked in the thread as it was sent (so no handler of the program's, with
//! a mask holding ours back, can have run first and cut the call short itself), the
//! interrupted instruction is a `syscall` whose number the instruction before it set
//! (`mov $nr,%eax`, as the C library's wrappers do), and the call is one of the waits that
//! are the same call when made again with the same registers (the kernel keeps the
//! argument registers), the handler rewinds `rip` onto the `syscall` with `rax` = its
//! number — the kernel's own restart (`regs->ax = regs->orig_ax; regs->ip -= 2`, see
//! `arch/x86/kernel/signal.c`), which it skips only because a handler ran. A relative
//! timeout then starts again: the call lasts longer by the time the thread was held. Calls
//! that cannot be put back so are counted ([`interrupted_system_calls`]) so that they are
//! reported, never silent; those put back, by [`restarted_system_calls`].

use crate::TextError;
use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most threads one stop can hold (the handler cannot allocate, so the table is static).
pub const MAX_STOPPED_THREADS: usize = 8192;

/// How long [`synchronize`] waits for the other threads.
const GRACE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the controller looks for threads that exited instead of answering.
const EXIT_POLL: Duration = Duration::from_millis(2);

/// The signal used to stop threads.
pub fn stop_signal() -> i32 {
    libc::SIGRTMAX() - 2
}

/// A thread held stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoppedThread {
    /// Kernel thread id.
    pub tid: i32,
    /// The user-mode instruction pointer it was stopped at.
    pub ip: u64,
    /// Address of the stop handler's `ucontext` on the thread's stack: signal frames the
    /// thread was already in lie above it (see [`StoppedWorld::interrupted_contexts`]).
    pub frame: u64,
    /// Its thread pointer (`%fs:0`, the C library's TCB address), by which per-thread
    /// tables find a thread without its help.
    pub tp: u64,
}

// ---------------------------------------------------------------------------------------
// State shared with the signal handler: atomics only.

// A slot's state lives in the low 32 bits of [`Slot::word`], the thread id in the high 32.
// Packing them makes the handler's claim one compare-and-swap on (its tid, SENT): a late
// signal can never claim a slot that was meanwhile given to another thread. A slot never
// used holds 0, which no handler matches.

/// The controller sent the signal and waits for the thread.
const SENT: u32 = 1;
/// The handler owns the slot and is writing its `ip`.
const CLAIMED: u32 = 2;
/// The thread is parked in the handler.
const STOPPED: u32 = 3;
/// The thread was released and is past its last access to the slot.
const LEFT: u32 = 4;
/// The thread exited (or is a zombie) before answering.
const GONE: u32 = 5;
/// The controller gave up on the thread (timeout); its signal, if it ever comes, is ignored.
const ABANDONED: u32 = 6;
/// The thread was quiescent (blocked outside every range of the stop): it was not signalled.
const QUIESCENT: u32 = 7;

fn pack(tid: i32, state: u32) -> u64 {
    ((tid as u32 as u64) << 32) | state as u64
}

fn unpack(word: u64) -> (i32, u32) {
    ((word >> 32) as u32 as i32, word as u32)
}

/// One thread's entry in the stop table.
struct Slot {
    /// `pack(tid, state)`.
    word: AtomicU64,
    /// Where the thread was interrupted (valid from STOPPED on).
    ip: AtomicU64,
    /// Where it should resume instead; 0 for "where it was".
    new_ip: AtomicU64,
    /// The handler's `ucontext` (valid from STOPPED on).
    frame: AtomicU64,
    /// The thread pointer (valid from STOPPED on).
    tp: AtomicU64,
    /// Whether the thread did not block the stop signal when it was sent: a system call
    /// the handler finds cut short was cut short by it alone (see the module's
    /// documentation), and may be put back.
    restartable: AtomicBool,
    /// The system call the thread was blocked in when the signal was sent (its number, or
    /// -1), its six arguments and the `pc` after its `syscall`, from
    /// `/proc/self/task/<tid>/syscall`: the handler's way to the number when no `mov`
    /// before the `syscall` names it (the C library's `syscall(2)` function takes it as an
    /// argument).
    blocked_nr: AtomicI64,
    blocked_args: [AtomicU64; 6],
    blocked_pc: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)] // only used as an array initializer
const SLOT_INIT: Slot = Slot {
    word: AtomicU64::new(0),
    ip: AtomicU64::new(0),
    new_ip: AtomicU64::new(0),
    frame: AtomicU64::new(0),
    tp: AtomicU64::new(0),
    restartable: AtomicBool::new(false),
    blocked_nr: AtomicI64::new(-1),
    blocked_args: [const { AtomicU64::new(0) }; 6],
    blocked_pc: AtomicU64::new(0),
};

static SLOTS: [Slot; MAX_STOPPED_THREADS] = [SLOT_INIT; MAX_STOPPED_THREADS];
/// Slots `0 .. USED` belong to the current stop.
static USED: AtomicU32 = AtomicU32::new(0);
/// The threads a stop gave up on at its deadline (the first [`LATE_NAMED`]) and how many
/// there were, kept for the error's description: a slot's ABANDONED state does not last
/// (a late handler that runs after the deadline moves it on), so the description cannot
/// read it from the slots.
static LATE: [AtomicI32; LATE_NAMED] = [const { AtomicI32::new(0) }; LATE_NAMED];
static LATE_COUNT: AtomicU32 = AtomicU32::new(0);
/// How many late threads an error names.
const LATE_NAMED: usize = 8;
/// Threads that reached STOPPED in the current stop (futex word the controller waits on).
static ARRIVED: AtomicU32 = AtomicU32::new(0);
/// Threads that reached LEFT in the current stop (futex word the controller waits on).
static LEFT_COUNT: AtomicU32 = AtomicU32::new(0);
/// Bumped to release every stopped thread (futex word the handlers wait on).
static RELEASE_GEN: AtomicU32 = AtomicU32::new(0);
/// Thread id of the controller holding the world stopped, or 0.
static HOLDER: AtomicI32 = AtomicI32::new(0);
/// Blocking system calls that the stop signal cut short (see [`interrupted_system_calls`]).
static INTERRUPTED_SYSCALLS: AtomicU64 = AtomicU64::new(0);
/// Blocking system calls that the stop signal cut short and its handler put back.
static RESTARTED_SYSCALLS: AtomicU64 = AtomicU64::new(0);

/// The waits a stop's handler makes again when its signal cut one short: made again with
/// the same registers each is the same call (a relative timeout starts over). `read`,
/// `accept` and the like are here for sockets with a receive timeout, which `SA_RESTART`
/// does not restart (signal(7)). `connect` is not: made again it fails with `EALREADY`.
/// (The ptrace backend puts back the same calls when its `PTRACE_INTERRUPT` cut one short.)
pub const RESTARTABLE_WAITS: [i64; 21] = [
    libc::SYS_read,
    libc::SYS_poll,
    libc::SYS_select,
    libc::SYS_pause,
    libc::SYS_nanosleep,
    libc::SYS_accept,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_wait4,
    libc::SYS_msgrcv,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_sigsuspend,
    libc::SYS_futex,
    libc::SYS_semtimedop,
    libc::SYS_clock_nanosleep,
    libc::SYS_epoll_wait,
    libc::SYS_waitid,
    libc::SYS_pselect6,
    libc::SYS_ppoll,
    libc::SYS_epoll_pwait,
    libc::SYS_accept4,
];

/// How many blocking system calls of the program the stop signal has made return early
/// (`EINTR`) so far: it reached a thread in the microseconds between the stop seeing it
/// running and its entering the call. Reported by callers; zero when every other thread was
/// either running user code or quiescent.
pub fn interrupted_system_calls() -> u64 {
    INTERRUPTED_SYSCALLS.load(Ordering::Relaxed)
}

/// How many blocking system calls the stop signal cut short and its handler put back, so
/// that the program never saw them end (see the module's documentation).
pub fn restarted_system_calls() -> u64 {
    RESTARTED_SYSCALLS.load(Ordering::Relaxed)
}

use crate::raw;

/// The stop-signal handler. Async-signal-safe: atomics and raw system calls only.
extern "C" fn on_stop_signal(_sig: libc::c_int, _info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    let me = raw::gettid();
    let used = (USED.load(Ordering::Acquire) as usize).min(MAX_STOPPED_THREADS);
    // A late signal (its stop timed out and was abandoned, or it was sent twice) finds no
    // SENT slot for this thread and returns at once.
    // The plain load first keeps the scan from writing every slot's cache line.
    let Some(slot) = SLOTS[..used].iter().find(|s| {
        s.word.load(Ordering::Relaxed) == pack(me, SENT)
            && s.word.compare_exchange(pack(me, SENT), pack(me, CLAIMED), Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }) else {
        return;
    };
    // Read the generation only now: the controller cannot release this stop before the slot
    // is STOPPED (it waits for CLAIMED slots even when it times out), so this is the value
    // that the release will change.
    let gen = RELEASE_GEN.load(Ordering::Acquire);
    let uc = uc.cast::<libc::ucontext_t>();
    // SAFETY: the kernel passes a valid ucontext for an SA_SIGINFO handler; it lives on this
    // thread's signal frame until the handler returns.
    let mut rip = unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] } as u64;
    // SAFETY: as above.
    let rax = unsafe { (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] };
    if rax == -(libc::EINTR as i64) && raw::follows_syscall(rip) {
        let restart = slot
            .restartable
            .load(Ordering::Relaxed)
            // The call seen blocked as the signal was sent, when it is this one, is a fact;
            // the number decoded from the instructions before the `syscall` is an inference.
            .then(|| blocked_call_number(slot, uc, rip).or_else(|| raw::syscall_number_before(rip)))
            .flatten()
            .filter(|nr| RESTARTABLE_WAITS.contains(nr));
        match restart {
            Some(nr) => {
                rip -= 2;
                // SAFETY: as above; sigreturn loads these registers from this frame.
                unsafe {
                    (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] = rip as i64;
                    (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = nr;
                }
                RESTARTED_SYSCALLS.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                INTERRUPTED_SYSCALLS.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    slot.ip.store(rip, Ordering::Relaxed);
    slot.frame.store(uc as u64, Ordering::Relaxed);
    slot.tp.store(raw::thread_pointer(), Ordering::Relaxed);
    slot.word.store(pack(me, STOPPED), Ordering::Release);
    ARRIVED.fetch_add(1, Ordering::AcqRel);
    raw::futex_wake_all(&ARRIVED);

    while RELEASE_GEN.load(Ordering::Acquire) == gen {
        raw::futex_wait(&RELEASE_GEN, gen);
    }

    let new_ip = slot.new_ip.load(Ordering::Acquire);
    if new_ip != 0 {
        // SAFETY: as above; sigreturn loads rip from this frame.
        unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] = new_ip as i64 };
    }
    // Last touch of the slot: after this the controller may reuse it.
    slot.word.store(pack(me, LEFT), Ordering::Release);
    LEFT_COUNT.fetch_add(1, Ordering::AcqRel);
    raw::futex_wake_all(&LEFT_COUNT);
}

/// The number of the system call a thread was seen blocked in as its signal was sent, when
/// the call the handler finds cut short at `rip` is that very call: the same `syscall`
/// instruction with the same six argument registers (the kernel leaves them as they were,
/// `rax` alone carries the result). Async-signal-safe.
fn blocked_call_number(slot: &Slot, uc: *const libc::ucontext_t, rip: u64) -> Option<i64> {
    let nr = slot.blocked_nr.load(Ordering::Relaxed);
    if nr < 0 || slot.blocked_pc.load(Ordering::Relaxed) != rip {
        return None;
    }
    let registers = [libc::REG_RDI, libc::REG_RSI, libc::REG_RDX, libc::REG_R10, libc::REG_R8, libc::REG_R9];
    let same = registers.iter().zip(&slot.blocked_args).all(|(&reg, arg)| {
        // SAFETY: the handler's ucontext, valid until it returns (see `on_stop_signal`).
        let value = unsafe { (*uc).uc_mcontext.gregs[reg as usize] } as u64;
        value == arg.load(Ordering::Relaxed)
    });
    same.then_some(nr)
}

/// The stop signal's action before [`install_handler`] replaced it (`Some` while ours is
/// installed): [`uninstall_handler`] puts it back.
static PREVIOUS_ACTION: Mutex<Option<libc::sigaction>> = Mutex::new(None);

/// Installs [`on_stop_signal`], once until [`uninstall_handler`].
fn install_handler() -> Result<(), TextError> {
    let mut previous = PREVIOUS_ACTION.lock().unwrap_or_else(|e| e.into_inner());
    if previous.is_some() {
        return Ok(());
    }
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; every field we
    // rely on is set below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_stop_signal as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // Block every signal while stopped, SIGTRAP included: a stopped thread must run no code
    // at all — not another handler that could step on the bytes being patched or enter the
    // trap dispatcher during a grace period.
    // SAFETY: `sa.sa_mask` is a valid sigset_t owned by us.
    unsafe { libc::sigfillset(&mut sa.sa_mask) };
    // SAFETY: a zeroed sigaction is valid storage for the old action.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: `sa` is fully initialized; the handler is async-signal-safe.
    if unsafe { libc::sigaction(stop_signal(), &sa, &mut old) } != 0 {
        let reason = format!("sigaction: {}", std::io::Error::last_os_error());
        return Err(TextError::StopFailed { reason });
    }
    *previous = Some(old);
    // The C library's signal return trampoline, which every handler installed through it
    // returns into: the first word of each signal frame.
    // SAFETY: as above; a query only writes `installed`.
    let mut installed: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: reads back the action just installed.
    if unsafe { libc::sigaction(stop_signal(), std::ptr::null(), &mut installed) } == 0 {
        RESTORER.store(installed.sa_restorer.map_or(0, |f| f as usize as u64), Ordering::Relaxed);
    }
    Ok(())
}

/// Puts back the stop signal's action from before dynprobe (its default, for a program
/// that does not use that real-time signal), so that a process dynprobe is done with runs
/// no handler of it — at the end of an attach session, when no stop is under way or will
/// be. The next stop installs dynprobe's handler again.
pub fn uninstall_handler() -> Result<(), TextError> {
    let _controller = CONTROLLER.lock().unwrap_or_else(|e| e.into_inner());
    let mut previous = PREVIOUS_ACTION.lock().unwrap_or_else(|e| e.into_inner());
    let Some(old) = previous.as_ref() else { return Ok(()) };
    // A stop signal can still be pending after its stop: in a thread that blocked it (the
    // stop gave up on it) or that was waiting in the trap dispatcher (left alone). Under the
    // program's own action — the default, for a real-time signal, ends the process — it would
    // kill the program the moment that thread unblocks it. Setting SIG_IGN discards a pending
    // signal in every thread, blocked or not (sigaction(2), and POSIX's "Signal Actions"),
    // so the action goes back with nothing of ours left queued. Only when the program had no
    // handler of its own for the signal: a pending one might then be its own.
    let default_or_ignored = [libc::SIG_DFL, libc::SIG_IGN].contains(&old.sa_sigaction);
    // SAFETY: a zeroed sigaction is valid storage for the action queried into it.
    let mut ours: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a query of the current action into `ours`.
    unsafe { libc::sigaction(stop_signal(), std::ptr::null(), &mut ours) };
    if default_or_ignored {
        // SAFETY: a zeroed sigaction with SIG_IGN (0 flags, empty mask) is a valid action.
        let mut ignore: libc::sigaction = unsafe { std::mem::zeroed() };
        ignore.sa_sigaction = libc::SIG_IGN;
        // SAFETY: `ignore` is fully initialized; no handler runs for an ignored signal.
        if unsafe { libc::sigaction(stop_signal(), &ignore, std::ptr::null_mut()) } != 0 {
            let reason = format!("cannot discard pending stop signals: {}", std::io::Error::last_os_error());
            return Err(TextError::StopFailed { reason });
        }
    }
    // SAFETY: `old` is the action the kernel gave back when ours was installed.
    if unsafe { libc::sigaction(stop_signal(), old, std::ptr::null_mut()) } != 0 {
        let reason = format!("cannot put the stop signal's action back: {}", std::io::Error::last_os_error());
        // Ours again, as before the call (not the SIG_IGN set above): an error changes nothing.
        // SAFETY: `ours` is the action the kernel gave back above.
        unsafe { libc::sigaction(stop_signal(), &ours, std::ptr::null_mut()) };
        return Err(TextError::StopFailed { reason });
    }
    *previous = None;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Controller side.

/// Serializes stops: one at a time in the process.
static CONTROLLER: Mutex<()> = Mutex::new(());

/// The stopped threads as the caller sees them; written only by the holder of [`CONTROLLER`]
/// while the world is stopped, so it needs no allocation.
struct ThreadTable(UnsafeCell<[StoppedThread; MAX_STOPPED_THREADS]>);
// SAFETY: only the thread holding CONTROLLER writes the table, and readers borrow it through
// a StoppedWorld, which holds CONTROLLER's guard for as long as the borrow lives.
unsafe impl Sync for ThreadTable {}
static THREADS: ThreadTable =
    ThreadTable(UnsafeCell::new([StoppedThread { tid: 0, ip: 0, frame: 0, tp: 0 }; MAX_STOPPED_THREADS]));
/// The signal return trampoline (`sa_restorer`) of the C library; 0 when unknown.
static RESTORER: AtomicU64 = AtomicU64::new(0);

/// True when the calling thread holds the world stopped (a nested stop would deadlock).
pub fn held_by_current_thread() -> bool {
    HOLDER.load(Ordering::Acquire) == raw::gettid()
}

/// Every other thread of the process, held stopped until this is dropped.
#[must_use = "the other threads run again as soon as this is dropped"]
pub struct StoppedWorld {
    /// Number of entries of [`THREADS`] that are ours.
    count: usize,
    /// Threads left alone because they were quiescent.
    left_running: usize,
    /// Held for the lifetime of the stop; also ties the `threads()` borrow to it.
    _guard: MutexGuard<'static, ()>,
}

impl StoppedWorld {
    /// How many other threads were left alone, blocked outside the stop's ranges (see
    /// [`stop_threads_touching`]): they may run again at any moment, so bytes that change
    /// while any did must be written int3-first.
    pub fn left_running(&self) -> usize {
        self.left_running
    }

    /// Looks again at the threads left alone and at threads created since the stop, and
    /// stops each that is not (or no longer) blocked outside `ranges`. A writer calls it once
    /// the heads of the instructions it changes are `int3`s (and the cores serialized): from
    /// then on no thread can newly enter those instructions, so after this every thread
    /// that could be inside them is stopped, in [`Self::threads`], and can be moved.
    /// On failure the world stays stopped as it was (a thread that did not answer is left).
    pub fn settle(&mut self, ranges: &[Range<u64>], timeout: Duration) -> Result<(), TextError> {
        if self.left_running == 0 {
            return Ok(());
        }
        match stop_all(raw::gettid(), ranges, Instant::now() + timeout, false) {
            Ok(count) => {
                self.count = count;
                self.left_running = count_in(QUIESCENT);
                Ok(())
            }
            Err(failure) => Err(TextError::StopFailed { reason: failure.describe(timeout) }),
        }
    }

    /// The stopped threads.
    pub fn threads(&self) -> &[StoppedThread] {
        // SAFETY: we hold CONTROLLER (see ThreadTable), and no one writes the table again
        // until our guard is dropped, which cannot happen while `&self` is borrowed.
        let table: &[StoppedThread; MAX_STOPPED_THREADS] = unsafe { &*THREADS.0.get() };
        &table[..self.count]
    }

    /// Makes thread `tid` resume at `ip` instead of where it stopped (used to move a thread
    /// out of bytes about to be replaced into their relocated copy).
    ///
    /// # Panics
    ///
    /// If `tid` is not one of [`Self::threads`], or `ip` is 0.
    pub fn set_ip(&mut self, tid: i32, ip: u64) {
        assert_ne!(ip, 0, "set_ip: 0 is not a valid instruction pointer");
        let used = USED.load(Ordering::Acquire) as usize;
        let slot = SLOTS[..used]
            .iter()
            .find(|s| s.word.load(Ordering::Acquire) == pack(tid, STOPPED))
            .unwrap_or_else(|| panic!("set_ip: thread {tid} is not held stopped"));
        // Published by the release bump of RELEASE_GEN, which the handler acquires.
        slot.new_ip.store(ip, Ordering::Relaxed);
    }

    /// The contexts `thread` will return to from signal handlers it was running when it
    /// was stopped, innermost first: where each interrupted piece of code resumes. A thread
    /// stopped inside a handler reports the handler's `rip`; the code the handler
    /// interrupted could be inside bytes about to be replaced, and is found here.
    ///
    /// Signal frames start with the C library's `sa_restorer` address. The walk starts at
    /// the `rsp` the stop interrupted, looks upward (at most [`SIGNAL_FRAME_SCAN`] bytes)
    /// for a word holding it whose frame looks like the kernel's (flags, link, FPU-state
    /// pointer), and goes on from the `rsp` saved in that frame — so it follows nested
    /// handlers from one stack to another (an alternate signal stack and back). Allocates
    /// nothing.
    pub fn interrupted_contexts(&self, thread: &StoppedThread) -> InterruptedContexts {
        let restorer = RESTORER.load(Ordering::Relaxed);
        let mut rsp = [0u8; 8];
        let start = match crate::memory::read(thread.frame + frame::UC_RSP, &mut rsp) {
            Ok(()) => u64::from_le_bytes(rsp),
            Err(_) => 0,
        };
        InterruptedContexts { restorer, next: start, end: start.saturating_add(SIGNAL_FRAME_SCAN), hops: 0 }
    }

    /// [`Self::interrupted_contexts`] of every stopped thread, gathered once: the walk reads
    /// the threads' stacks, and a caller checking several code ranges needs it only once.
    pub fn all_interrupted_contexts(&self) -> InterruptedSet {
        let mut set = InterruptedSet {
            contexts: [InterruptedContext { rip_at: 0, rip: 0 }; MAX_INTERRUPTED],
            len: 0,
            complete: true,
        };
        for context in self.threads().iter().flat_map(|thread| self.interrupted_contexts(thread)) {
            match set.contexts.get_mut(set.len) {
                Some(slot) => {
                    *slot = context;
                    set.len += 1;
                }
                None => {
                    set.complete = false;
                    break;
                }
            }
        }
        set
    }

    /// Makes the code interrupted at `context` resume at `ip` when its signal handler
    /// returns. The frame is checked to still hold the `rip` it was found with; nothing is
    /// allocated, even on failure.
    pub fn set_interrupted_ip(&mut self, context: &InterruptedContext, ip: u64) -> Result<(), TextError> {
        let mut now = [0u8; 8];
        crate::memory::read(context.rip_at, &mut now)?;
        if u64::from_le_bytes(now) != context.rip {
            return Err(TextError::StopFailed { reason: String::new() });
        }
        // SAFETY: `rip_at` is a saved-rip word of a signal frame on a thread's stack (just
        // read back unchanged); the thread is held stopped, so nothing else touches it until
        // it returns through that frame and loads the new value.
        unsafe { std::ptr::write_volatile(context.rip_at as usize as *mut u64, ip) };
        Ok(())
    }
}

/// Most signal frames an [`InterruptedSet`] holds.
pub const MAX_INTERRUPTED: usize = 256;

/// The signal frames of every stopped thread (see [`StoppedWorld::all_interrupted_contexts`]),
/// in a fixed array: nothing may allocate while the threads are stopped.
pub struct InterruptedSet {
    contexts: [InterruptedContext; MAX_INTERRUPTED],
    len: usize,
    complete: bool,
}

impl InterruptedSet {
    /// The frames found.
    pub fn contexts(&self) -> &[InterruptedContext] {
        &self.contexts[..self.len]
    }

    /// False when there were more than [`MAX_INTERRUPTED`]: a caller that must see every one
    /// tries again later.
    pub fn complete(&self) -> bool {
        self.complete
    }
}

/// How far above an interrupted `rsp` [`StoppedWorld::interrupted_contexts`] looks for the
/// signal frame of the handler that was running: a handler's own stack use.
pub const SIGNAL_FRAME_SCAN: u64 = 1024 * 1024;
/// Most nested signal frames followed.
const MAX_SIGNAL_HOPS: u32 = 16;

/// Offsets in an x86-64 `rt_sigframe`, from the `sa_restorer` word that starts it: the
/// kernel's `struct ucontext` follows, laid out as glibc's `ucontext_t` up to `uc_mcontext`.
mod frame {
    use std::mem::offset_of;
    const UC: u64 = 8;
    pub const FLAGS: u64 = UC + offset_of!(libc::ucontext_t, uc_flags) as u64;
    pub const LINK: u64 = UC + offset_of!(libc::ucontext_t, uc_link) as u64;
    const GREGS: u64 = UC + offset_of!(libc::ucontext_t, uc_mcontext) as u64;
    pub const RSP: u64 = GREGS + 8 * libc::REG_RSP as u64;
    pub const RIP: u64 = GREGS + 8 * libc::REG_RIP as u64;
    pub const FPREGS: u64 = GREGS + offset_of!(libc::mcontext_t, fpregs) as u64;
    /// The saved `rsp` relative to a `ucontext` (the stop handler's own, which we know).
    pub const UC_RSP: u64 = RSP - UC;
}

/// A signal frame a stopped thread will return through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptedContext {
    /// Where in the frame the saved `rip` is.
    pub rip_at: u64,
    /// The saved `rip`: where the interrupted code resumes.
    pub rip: u64,
}

/// Iterator of [`StoppedWorld::interrupted_contexts`].
pub struct InterruptedContexts {
    restorer: u64,
    next: u64,
    end: u64,
    hops: u32,
}

impl InterruptedContexts {
    fn word(at: u64) -> Option<u64> {
        let mut bytes = [0u8; 8];
        crate::memory::read(at, &mut bytes).ok().map(|()| u64::from_le_bytes(bytes))
    }

    /// Whether the `sa_restorer` word at `at` starts what looks like a kernel signal frame:
    /// only the kernel's `UC_*` flags, no link, the FPU state saved just above.
    fn is_frame(at: u64) -> Option<bool> {
        let flags = Self::word(at + frame::FLAGS)?;
        let link = Self::word(at + frame::LINK)?;
        let fpregs = Self::word(at + frame::FPREGS)?;
        Some(flags & !7 == 0 && link == 0 && (fpregs == 0 || fpregs.wrapping_sub(at) < 64 * 1024))
    }
}

impl Iterator for InterruptedContexts {
    type Item = InterruptedContext;

    fn next(&mut self) -> Option<InterruptedContext> {
        if self.restorer == 0 || self.next == 0 || self.hops >= MAX_SIGNAL_HOPS {
            return None;
        }
        let mut page = [0u64; 512];
        while self.next < self.end {
            // Read to the end of the current page; an unreadable page ends the stack.
            let page_end = (self.next | 4095) + 1;
            let words = ((page_end - self.next) / 8) as usize;
            // SAFETY: the buffer is plain u64 words, any bytes are valid.
            let bytes = unsafe { std::slice::from_raw_parts_mut(page.as_mut_ptr().cast::<u8>(), words * 8) };
            crate::memory::read(self.next, bytes).ok()?;
            let base = self.next;
            self.next = page_end;
            for (i, &word) in page[..words].iter().enumerate() {
                let at = base + 8 * i as u64;
                if word != self.restorer || Self::is_frame(at) != Some(true) {
                    continue;
                }
                let (Some(rip), Some(rsp)) = (Self::word(at + frame::RIP), Self::word(at + frame::RSP)) else {
                    continue;
                };
                // Go on from the code this frame returns to: the next handler out, if any.
                self.hops += 1;
                self.next = rsp;
                self.end = rsp.saturating_add(SIGNAL_FRAME_SCAN);
                return Some(InterruptedContext { rip_at: at + frame::RIP, rip });
            }
        }
        None
    }
}

impl Drop for StoppedWorld {
    fn drop(&mut self) {
        release_all();
    }
}

/// Stops every thread of the process but the calling one. Fails (after resuming any it did
/// stop) if some thread does not answer within `timeout` — for example because it blocks
/// the stop signal.
///
/// Threads that exit before answering are left out; threads created while the stop is in
/// progress are stopped too (the task list is read again until it no longer changes).
/// Calling it from a thread that already holds the world stopped fails instead of
/// deadlocking.
pub fn stop_other_threads(timeout: Duration) -> Result<StoppedWorld, TextError> {
    stop_threads_touching(&[EVERYWHERE], timeout)
}

/// Every address: a stop about it leaves no thread alone.
const EVERYWHERE: Range<u64> = 0..u64::MAX;

/// Stops every other thread that could be executing in `ranges` (code about to change or to
/// be freed) or inside a signal handler, and leaves alone those that are quiescent: blocked
/// in the kernel at a `pc` outside every range, with no signal frame on their stack (see the
/// module's documentation). Those are not interrupted, so their blocking system calls never
/// return early; they may wake and run while the world is "stopped", but can enter the
/// ranges only through their first byte. [`StoppedWorld::left_running`] counts them; a writer
/// must then change multi-byte instructions int3-first ([`crate::transaction`] does).
///
/// An empty `ranges` asks only for a grace period: every thread outside the trap dispatcher.
///
/// ```no_run
/// use dynprobe_text::stop::stop_threads_touching;
/// # let site = 0x401000u64;
/// let world = stop_threads_touching(&[site..site + 5], std::time::Duration::from_secs(5))?;
/// assert!(world.threads().iter().all(|t| !(site..site + 5).contains(&t.ip)) || true);
/// # Ok::<(), dynprobe_text::TextError>(())
/// ```
pub fn stop_threads_touching(ranges: &[Range<u64>], timeout: Duration) -> Result<StoppedWorld, TextError> {
    stop_threads(ranges, timeout, false)
}

/// [`stop_other_threads`] that leaves alone, running, the threads that block the stop
/// signal (a program's signal-handling thread that blocks every signal): they are not in
/// [`StoppedWorld::threads`] and count in [`StoppedWorld::left_running`]. For a caller that
/// wants every thread it can hold still and no other (the unwinding of the threads' stacks
/// at a `record -p` attach), not for one that changes code they may run.
pub fn stop_threads_that_answer(timeout: Duration) -> Result<StoppedWorld, TextError> {
    stop_threads(&[EVERYWHERE], timeout, true)
}

fn stop_threads(ranges: &[Range<u64>], timeout: Duration, leave_blocking: bool) -> Result<StoppedWorld, TextError> {
    if held_by_current_thread() {
        return Err(TextError::StopFailed {
            reason: "this thread already holds the other threads stopped (nested stop)".into(),
        });
    }
    let guard = CONTROLLER.lock().unwrap_or_else(|e| e.into_inner());
    // Under the controller lock: `uninstall_handler` cannot take the handler away between
    // its installation and the signals this stop sends.
    install_handler()?;
    let me = raw::gettid();
    HOLDER.store(me, Ordering::Release);
    USED.store(0, Ordering::Release);
    ARRIVED.store(0, Ordering::Release);
    LEFT_COUNT.store(0, Ordering::Release);

    match stop_all(me, ranges, Instant::now() + timeout, leave_blocking) {
        Ok(count) => Ok(StoppedWorld { count, left_running: count_in(QUIESCENT), _guard: guard }),
        Err(failure) => {
            release_all();
            drop(guard);
            Err(TextError::StopFailed { reason: failure.describe(timeout) })
        }
    }
}

/// Waits for a grace period: returns once every other thread has been outside the trap
/// dispatcher at least once since the call.
pub fn synchronize() -> Result<(), TextError> {
    if held_by_current_thread() {
        // Every other thread is parked in the stop handler, which the dispatcher cannot be
        // nested in: the grace period has already happened.
        return Ok(());
    }
    drop(stop_threads_touching(&[], GRACE_TIMEOUT)?);
    Ok(())
}

/// Why a stop failed, gathered without allocating while threads may still be stopped.
enum Failure {
    /// More threads than [`MAX_STOPPED_THREADS`].
    TooMany,
    /// `/proc/self/task` could not be read (errno).
    TaskDir(i32),
    /// `tgkill` failed for this thread with this errno.
    Signal(i32, i32),
    /// Threads were still SENT at the deadline (now ABANDONED); their tids are in
    /// [`LATE`], read after release.
    Timeout,
}

impl Failure {
    /// The user-facing reason; called after every stopped thread was released.
    fn describe(&self, timeout: Duration) -> String {
        match *self {
            Failure::TooMany => format!("more than {MAX_STOPPED_THREADS} threads"),
            Failure::TaskDir(errno) => {
                format!("cannot list /proc/self/task: {}", std::io::Error::from_raw_os_error(errno))
            }
            Failure::Signal(tid, errno) => format!(
                "cannot send signal {} to thread {tid}: {}",
                stop_signal(),
                std::io::Error::from_raw_os_error(errno)
            ),
            Failure::Timeout => {
                let count = LATE_COUNT.load(Ordering::Acquire) as usize;
                let mut late: Vec<String> = LATE[..count.min(LATE_NAMED)]
                    .iter()
                    .map(|tid| tid.load(Ordering::Relaxed))
                    .map(|tid| format!("{tid} ({})", likely_cause(tid)))
                    .collect();
                if count > LATE_NAMED {
                    late.push(format!("{} more", count - LATE_NAMED));
                }
                format!(
                    "thread(s) {} did not answer signal {} within {timeout:?}; the threads that \
                     did stop were resumed",
                    late.join(", "),
                    stop_signal()
                )
            }
        }
    }
}

/// Why thread `tid` probably did not answer, from `/proc/self/task/<tid>/status`.
fn likely_cause(tid: i32) -> String {
    let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
        return "exited meanwhile".into();
    };
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("").to_string();
    if blocks_stop_signal(tid) == Some(true) {
        return "it blocks the stop signal: masked by the program, or stuck inside the trap dispatcher".into();
    }
    let state = field("State:");
    if state.starts_with('D') {
        return "in uninterruptible sleep (D state): a signal cannot reach it until the kernel \
                call returns"
            .into();
    }
    if state.starts_with('T') || state.starts_with('t') {
        return "stopped by job control or a debugger".into();
    }
    format!("state {state}: not scheduled in time")
}

/// Sends the stop signal to every other thread and waits for all of them, until the task
/// list is stable. Returns how many are stopped, with their entries copied to [`THREADS`].
fn stop_all(me: i32, ranges: &[Range<u64>], deadline: Instant, leave_blocking: bool) -> Result<usize, Failure> {
    let pid = std::process::id() as i32;
    let restorer = RESTORER.load(Ordering::Relaxed);
    let signal = |slot: &Slot, tid: i32| -> Result<(), Failure> {
        slot.restartable.store(blocks_stop_signal(tid) == Some(false), Ordering::Relaxed);
        let (nr, args, pc) = blocked_call(tid).unwrap_or((-1, [0; 6], 0));
        slot.blocked_nr.store(nr, Ordering::Relaxed);
        slot.blocked_pc.store(pc, Ordering::Relaxed);
        slot.blocked_args.iter().zip(args).for_each(|(a, v)| a.store(v, Ordering::Relaxed));
        // Published to the handler by the Release store of SENT, which it acquires.
        slot.word.store(pack(tid, SENT), Ordering::Release);
        // SAFETY: tgkill takes plain integers; a wrong tid yields ESRCH, nothing worse.
        if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, stop_signal()) } != 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if errno != libc::ESRCH {
                return Err(Failure::Signal(tid, errno));
            }
            // Exited between the listing and the signal.
            mark_gone(slot, tid);
        }
        Ok(())
    };
    // A settling round looks again at the threads left alone: one that is no longer blocked
    // outside the ranges may have run into them, so it is stopped now.
    let used = USED.load(Ordering::Acquire) as usize;
    for slot in &SLOTS[..used] {
        let (tid, state) = unpack(slot.word.load(Ordering::Acquire));
        if state == QUIESCENT && !is_quiescent(tid, ranges, restorer) {
            signal(slot, tid)?;
        }
    }
    loop {
        let before = USED.load(Ordering::Acquire) as usize;
        let mut err = None;
        for_each_task(|tid| {
            if err.is_some() || tid == me || slot_of(tid).is_some() {
                return;
            }
            let i = USED.load(Ordering::Relaxed) as usize;
            if i == MAX_STOPPED_THREADS {
                err = Some(Failure::TooMany);
                return;
            }
            let slot = &SLOTS[i];
            slot.new_ip.store(0, Ordering::Relaxed);
            slot.ip.store(0, Ordering::Relaxed);
            let quiescent =
                is_quiescent(tid, ranges, restorer) || (leave_blocking && blocks_stop_signal(tid) == Some(true));
            slot.word.store(pack(tid, if quiescent { QUIESCENT } else { SENT }), Ordering::Release);
            USED.store(i as u32 + 1, Ordering::Release);
            if !quiescent {
                if let Err(e) = signal(slot, tid) {
                    err = Some(e);
                }
            }
        })
        .map_err(Failure::TaskDir)?;
        if let Some(e) = err {
            return Err(e);
        }
        wait_for_answers(deadline)?;
        if USED.load(Ordering::Acquire) as usize == before {
            // A full listing found nobody new: every live thread is stopped or was left
            // alone (a stopped thread cannot create one; one left alone can, later, but the
            // new thread starts outside the ranges just as its creator was).
            break;
        }
    }
    // SAFETY: we hold CONTROLLER (the caller locked it) and no StoppedWorld borrows the table.
    let table = unsafe { &mut *THREADS.0.get() };
    let mut count = 0;
    for slot in &SLOTS[..USED.load(Ordering::Acquire) as usize] {
        let (tid, state) = unpack(slot.word.load(Ordering::Acquire));
        if state == STOPPED {
            table[count] = StoppedThread {
                tid,
                ip: slot.ip.load(Ordering::Relaxed),
                frame: slot.frame.load(Ordering::Relaxed),
                tp: slot.tp.load(Ordering::Relaxed),
            };
            count += 1;
        }
    }
    Ok(count)
}

/// The slot of `tid` in the current stop.
fn slot_of(tid: i32) -> Option<&'static Slot> {
    let used = USED.load(Ordering::Acquire) as usize;
    SLOTS[..used].iter().find(|s| unpack(s.word.load(Ordering::Acquire)).0 == tid)
}

/// SENT → GONE, unless the handler claimed the slot first (then it answers normally).
fn mark_gone(slot: &Slot, tid: i32) {
    let _ = slot.word.compare_exchange(pack(tid, SENT), pack(tid, GONE), Ordering::AcqRel, Ordering::Acquire);
}

/// Counts slots of the current stop in `state`.
fn count_in(state: u32) -> usize {
    let used = USED.load(Ordering::Acquire) as usize;
    SLOTS[..used].iter().filter(|s| unpack(s.word.load(Ordering::Acquire)).1 == state).count()
}

/// Waits until no slot is SENT or CLAIMED. Threads that exit while we wait are marked GONE;
/// at the deadline the remaining SENT slots are ABANDONED.
fn wait_for_answers(deadline: Instant) -> Result<(), Failure> {
    let mut last_exit_check = Instant::now();
    loop {
        let seen = ARRIVED.load(Ordering::Acquire);
        if count_in(SENT) == 0 && count_in(CLAIMED) == 0 {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            let used = USED.load(Ordering::Acquire) as usize;
            let mut late = 0;
            for slot in &SLOTS[..used] {
                let (tid, _) = unpack(slot.word.load(Ordering::Acquire));
                let abandoned = slot
                    .word
                    .compare_exchange(pack(tid, SENT), pack(tid, ABANDONED), Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
                if abandoned {
                    if let Some(named) = LATE.get(late) {
                        named.store(tid, Ordering::Relaxed);
                    }
                    late += 1;
                }
            }
            LATE_COUNT.store(late as u32, Ordering::Release);
            // A handler that claimed its slot before we abandoned it is a few instructions
            // from STOPPED; it must get there before the release, or it would miss it.
            while count_in(CLAIMED) != 0 {
                std::hint::spin_loop();
            }
            // Every thread answered, the last ones just now (claimed, then stopped while we
            // looked): the stop holds, as it would have a moment earlier. Failing it named
            // no late thread ("thread(s)  did not answer …", seen under heavy load).
            if late == 0 {
                return Ok(());
            }
            return Err(Failure::Timeout);
        }
        if now.duration_since(last_exit_check) >= EXIT_POLL {
            last_exit_check = now;
            let used = USED.load(Ordering::Acquire) as usize;
            for slot in &SLOTS[..used] {
                let (tid, state) = unpack(slot.word.load(Ordering::Acquire));
                if state == SENT && !task_alive(tid) {
                    mark_gone(slot, tid);
                } else if state == SENT && crate::transaction::is_waiting(tid) {
                    // It trapped on a transient head and waits in the dispatcher, where the
                    // stop signal is blocked: leave it alone (the signal, delivered once it
                    // leaves, finds no SENT slot and returns at once).
                    let _ = slot.word.compare_exchange(
                        pack(tid, SENT),
                        pack(tid, QUIESCENT),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
            }
        }
        let wait = deadline.saturating_duration_since(now).min(EXIT_POLL);
        futex_wait_timeout(&ARRIVED, seen, wait);
    }
}

/// Releases every STOPPED thread (with its new ip, if any) and waits until each one has left
/// the handler, so the slots can be reused. SENT slots are abandoned first.
fn release_all() {
    let used = USED.load(Ordering::Acquire) as usize;
    for slot in &SLOTS[..used] {
        let (tid, _) = unpack(slot.word.load(Ordering::Acquire));
        let _ = slot.word.compare_exchange(pack(tid, SENT), pack(tid, ABANDONED), Ordering::AcqRel, Ordering::Acquire);
    }
    while count_in(CLAIMED) != 0 {
        std::hint::spin_loop();
    }
    let stopped = count_in(STOPPED);
    RELEASE_GEN.fetch_add(1, Ordering::AcqRel);
    raw::futex_wake_all(&RELEASE_GEN);
    loop {
        let left = LEFT_COUNT.load(Ordering::Acquire);
        if left as usize >= stopped {
            break;
        }
        futex_wait_timeout(&LEFT_COUNT, left, Duration::from_millis(10));
    }
    HOLDER.store(0, Ordering::Release);
}

/// Sleeps while `*word == expected`, at most `timeout`.
fn futex_wait_timeout(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
    // SAFETY: `word` is a valid aligned u32 and `ts` a valid relative timeout, both alive for
    // the call. Errors (EAGAIN, ETIMEDOUT, EINTR) all mean "look again", which callers do.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

/// Calls `f` with the id of every thread listed in `/proc/self/task`, reading the directory
/// with `getdents64` into a stack buffer (no allocation: other threads may be stopped while
/// holding the allocator's lock; and `opendir` would `malloc`, on a thread of dynprobe's
/// the start of a malloc arena of its own). Raw system calls only ([`raw`]): the `SIGTRAP`
/// dispatcher calls this, where the C library's `open`/`close` may carry the program's
/// probes and would write the interrupted code's `errno`. Returns the errno when the
/// directory cannot be read.
pub fn for_each_task(mut f: impl FnMut(i32)) -> Result<(), i32> {
    let fd = raw_open(c"/proc/self/task", libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC)?;
    let mut buf = [0u8; 4096];
    let result = loop {
        // SAFETY: `buf` is writable for its whole length; `fd` is the directory opened above.
        let n = unsafe { raw::syscall4(libc::SYS_getdents64, fd as u64, buf.as_mut_ptr() as u64, buf.len() as u64, 0) };
        if n < 0 {
            break Err(-n as i32);
        }
        if n == 0 {
            break Ok(());
        }
        // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
        let mut off = 0usize;
        while off < n as usize {
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let name = &buf[off + 19..off + reclen];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if let Some(tid) = parse_decimal(name) {
                f(tid);
            }
            off += reclen;
        }
    };
    raw_close(fd);
    result
}

/// `open(path, flags)` as a raw system call (no `errno`, no C library): the descriptor or
/// the errno.
fn raw_open(path: &std::ffi::CStr, flags: i32) -> Result<i32, i32> {
    // SAFETY: a NUL-terminated path; openat with AT_FDCWD only opens it.
    let fd = unsafe { raw::syscall4(libc::SYS_openat, libc::AT_FDCWD as u64, path.as_ptr() as u64, flags as u64, 0) };
    if fd < 0 {
        Err(-fd as i32)
    } else {
        Ok(fd as i32)
    }
}

/// `close(fd)` as a raw system call.
fn raw_close(fd: i32) {
    // SAFETY: the caller's own descriptor, closed once.
    unsafe { raw::syscall4(libc::SYS_close, fd as u64, 0, 0, 0) };
}

/// `name` as a positive decimal i32 (`.` and `..` are not).
fn parse_decimal(name: &[u8]) -> Option<i32> {
    if name.is_empty() {
        return None;
    }
    name.iter().try_fold(0i32, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add((b - b'0') as i32)
    })
}

/// False when thread `tid` is gone or a zombie (a thread-group leader that called
/// `pthread_exit` stays listed as `Z` but never handles a signal). Reads
/// `/proc/self/task/<tid>/stat` into a stack buffer.
fn task_alive(tid: i32) -> bool {
    let mut stat = [0u8; 512];
    let n = match read_task_file(tid, b"stat", &mut stat) {
        Ok(n) => n,
        // Only "no such entry" proves the thread is gone; on any other error (out of file
        // descriptors...) keep waiting for it rather than let a live thread run unstopped.
        Err(errno) => return !matches!(errno, libc::ENOENT | libc::ESRCH),
    };
    if n == 0 {
        return false;
    }
    // "tid (comm) S ...": the state follows the last ')' (comm may contain ')').
    let stat = &stat[..n];
    match stat.iter().rposition(|&b| b == b')') {
        Some(p) => !matches!(stat.get(p + 2), Some(b'Z' | b'X' | b'x')),
        None => true,
    }
}

/// Reads `/proc/self/task/<tid>/<name>` into `buf` without allocating; the bytes read, or
/// the errno of the open.
fn read_task_file(tid: i32, name: &[u8], buf: &mut [u8]) -> Result<usize, i32> {
    let mut path = [0u8; 64];
    let prefix = b"/proc/self/task/";
    path[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let mut n = tid.unsigned_abs();
    let mut d = digits.len();
    loop {
        d -= 1;
        digits[d] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let digits = &digits[d..];
    let mut end = prefix.len();
    path[end..end + digits.len()].copy_from_slice(digits);
    end += digits.len();
    path[end] = b'/';
    end += 1;
    let name = &name[..name.len().min(path.len() - end - 1)];
    path[end..end + name.len()].copy_from_slice(name);
    // The rest of `path` stays 0: the terminator.
    let path = std::ffi::CStr::from_bytes_until_nul(&path).map_err(|_| libc::EINVAL)?;
    let fd = raw_open(path, libc::O_RDONLY | libc::O_CLOEXEC)?;
    // SAFETY: `buf` is writable for its length; `fd` was just opened.
    let n = unsafe { raw::syscall4(libc::SYS_read, fd as u64, buf.as_mut_ptr() as u64, buf.len() as u64, 0) };
    raw_close(fd);
    Ok(n.max(0) as usize)
}

/// Whether thread `tid` blocks the stop signal now, from its `SigBlk` in
/// `/proc/self/task/<tid>/status`; `None` when that cannot be read. Allocates nothing.
fn blocks_stop_signal(tid: i32) -> Option<bool> {
    Some(blocked_signals(tid)? & (1u64 << (stop_signal() - 1)) != 0)
}

/// The signals thread `tid` of this process blocks now (`SigBlk` of
/// `/proc/self/task/<tid>/status`, see proc(5); bit `n - 1` for signal `n`); `None` when
/// the thread is gone. Allocates nothing, so a stop may ask while threads are held.
pub fn blocked_signals(tid: i32) -> Option<u64> {
    let mut buf = [0u8; 4096];
    let n = read_task_file(tid, b"status", &mut buf).ok()?;
    sig_mask_field(&buf[..n], b"SigBlk:")
}

/// The hexadecimal signal mask of the `/proc/PID/status` line starting with `name`.
fn sig_mask_field(status: &[u8], name: &[u8]) -> Option<u64> {
    let at = status.windows(name.len()).position(|w| w == name)?;
    let rest = &status[at + name.len()..];
    let line = &rest[..rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len())];
    let hex = line.iter().skip_while(|b| b.is_ascii_whitespace()).take_while(|b| b.is_ascii_hexdigit());
    let mut mask = 0u64;
    let mut digits = 0;
    for &b in hex {
        mask = mask.checked_mul(16)? | u64::from((b as char).to_digit(16)?);
        digits += 1;
    }
    (digits > 0).then_some(mask)
}

/// What `/proc/self/task/<tid>/syscall` says of a thread: `None` while it runs (`running`),
/// else the user `(sp, pc)` it will resume at — blocked in a system call (`nr args… sp pc`)
/// or in the kernel for another reason (`-1 sp pc`: stopped, faulting).
fn blocked_at(tid: i32) -> Option<(u64, u64)> {
    let mut buf = [0u8; 256];
    let n = read_task_file(tid, b"syscall", &mut buf).ok()?;
    let text = &buf[..n];
    let mut fields = text.split(|&b| b == b' ' || b == b'\n').filter(|f| !f.is_empty());
    let first = fields.next()?;
    if first == b"running" {
        return None;
    }
    // The last two fields are the stack pointer and the program counter, in hex.
    let (mut sp, mut pc) = (None, None);
    for field in fields {
        sp = pc;
        pc = Some(field);
    }
    Some((parse_hex(sp?)?, parse_hex(pc?)?))
}

/// The system call thread `tid` is blocked in, from `/proc/self/task/<tid>/syscall`
/// (`nr arg1 … arg6 sp pc`): its number, its six arguments and the `pc` it resumes at.
/// `None` while it runs or is in the kernel for another reason. Allocates nothing.
fn blocked_call(tid: i32) -> Option<(i64, [u64; 6], u64)> {
    let mut buf = [0u8; 256];
    let n = read_task_file(tid, b"syscall", &mut buf).ok()?;
    let mut fields = buf[..n].split(|&b| b == b' ' || b == b'\n').filter(|f| !f.is_empty());
    let nr = i64::from(parse_decimal(fields.next()?)?);
    let mut args = [0u64; 6];
    for arg in args.iter_mut() {
        *arg = parse_hex(fields.next()?)?;
    }
    let _sp = fields.next()?;
    Some((nr, args, parse_hex(fields.next()?)?))
}

/// The system call thread `tid` is blocked in, from `/proc/self/task/<tid>/syscall`: its
/// number and first argument (`None` while it runs or is not in a system call).
pub(crate) fn system_call_of(tid: i32) -> Option<(i64, u64)> {
    let mut buf = [0u8; 256];
    let n = read_task_file(tid, b"syscall", &mut buf).ok()?;
    let mut fields = buf[..n].split(|&b| b == b' ' || b == b'\n').filter(|f| !f.is_empty());
    let nr = parse_decimal(fields.next()?)?;
    Some((i64::from(nr), parse_hex(fields.next()?)?))
}

/// `0x…` as a number.
fn parse_hex(field: &[u8]) -> Option<u64> {
    let digits = field.strip_prefix(b"0x")?;
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| Some(acc << 4 | (b as char).to_digit(16)? as u64))
}

/// Whether thread `tid` may be left alone by a stop about `ranges` (see
/// [`stop_threads_touching`]): blocked in the kernel at a `pc` outside every range, and in no
/// signal handler — its stack, read from the blocked `sp` up, holds no signal frame
/// (`restorer` unknown: assume one). Allocates nothing.
fn is_quiescent(tid: i32, ranges: &[Range<u64>], restorer: u64) -> bool {
    if crate::transaction::is_waiting(tid) {
        return true;
    }
    // A thread seen running may be on its way into a blocking call: a signal landing then
    // would cut it short. Look twice more, yielding in between, before calling it running.
    let mut blocked = blocked_at(tid);
    for _ in 0..2 {
        if blocked.is_some() {
            break;
        }
        // SAFETY: sched_yield takes no arguments.
        unsafe { raw::syscall4(libc::SYS_sched_yield, 0, 0, 0, 0) };
        blocked = blocked_at(tid);
    }
    let Some((sp, pc)) = blocked else { return false };
    if restorer == 0 || ranges.iter().any(|r| r.contains(&pc)) {
        return false;
    }
    let mut frames = InterruptedContexts { restorer, next: sp, end: sp.saturating_add(SIGNAL_FRAME_SCAN), hops: 0 };
    frames.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_words_round_trip() {
        assert_eq!(unpack(pack(12345, STOPPED)), (12345, STOPPED));
        assert_eq!(unpack(pack(i32::MAX, ABANDONED)), (i32::MAX, ABANDONED));
    }

    #[test]
    fn task_names() {
        assert_eq!(parse_decimal(b"4242"), Some(4242));
        assert_eq!(parse_decimal(b"."), None);
        assert_eq!(parse_decimal(b".."), None);
        assert_eq!(parse_decimal(b""), None);
    }

    #[test]
    fn signal_masks_are_read_from_a_status_file() {
        let status = b"Name:\tx\nSigPnd:\t0000000000000000\nSigBlk:\tfffffffe7ffbfeff\nSigIgn:\t0\n";
        assert_eq!(sig_mask_field(status, b"SigBlk:"), Some(0xfffffffe7ffbfeff));
        assert_eq!(sig_mask_field(status, b"SigIgn:"), Some(0));
        assert_eq!(sig_mask_field(status, b"SigCgt:"), None);
        assert_eq!(blocked_signals(raw::gettid()).map(|m| m & (1 << (stop_signal() - 1))), Some(0));
    }

    #[test]
    fn syscall_fields() {
        assert_eq!(parse_hex(b"0x7ffd1234"), Some(0x7ffd1234));
        assert_eq!(parse_hex(b"1234"), None);
        assert_eq!(parse_hex(b"0x"), None);
    }

    #[test]
    fn own_task_is_alive() {
        assert!(task_alive(raw::gettid()));
        assert!(!task_alive(i32::MAX));
    }
}
