//! The process's one `SIGTRAP` dispatcher.
//!
//! Owners of `int3` sites (the probe layer) register the site's address with a plain
//! function and a word of data. The dispatcher finds the owner with a lock-free lookup,
//! allocates nothing, takes no lock, and:
//! * calls the owner, which may change every register through the context;
//! * for an `int3` that was ours but has been removed meanwhile, rewinds `rip` so the thread
//!   re-executes whatever is there now (the kernel's "the breakpoint was removed by another
//!   CPU" case in `kprobe_int3_handler`);
//! * for an `int3` no owner registered, while a patching transaction is in progress, waits
//!   until its byte changes and rewinds likewise: the transient head of an edit written
//!   int3-first ([`crate::transaction`]);
//! * delivers every other trap to the program, as the kernel would have (below).
//!
//! The dispatcher runs with `SA_NODEFER`: a probe hit inside a handler must be dispatched
//! again (the owner counts it as missed), because the kernel turns a *blocked* `SIGTRAP`
//! from `int3` into a fatal one. It blocks the stop signal of [`crate::stop`] so that a
//! thread held by a stop is never inside the dispatcher: one stop is a grace period.
//!
//! # The program's `SIGTRAP` stays the program's
//!
//! The kernel's `force_sig_info_to_task` (kernel/signal.c) delivers the `SIGTRAP` of an
//! `int3` to the handler installed *now*, and kills the process when the signal is blocked
//! or ignored. So a program that installs its own `SIGTRAP` handler after dynprobe (LLVM
//! does, with `SA_RESETHAND`) or whose threads block every signal (thread pools, xz's
//! workers) would die at the next breakpoint probe. As Frida's exceptor does, dispatcher
//! stays in front instead, and what the program sees of `SIGTRAP` becomes *virtual*:
//! * the kernel's action is always `dispatch`; the action the program asked for is the
//!   *chained action* kept here ([`program_action`], [`set_program_action`]), which the
//!   program reads back as its own;
//! * no thread really blocks `SIGTRAP`; whether the program asked a thread to block it is
//!   a per-thread bit ([`program_blocks_trap`], [`set_program_blocks_trap`]), kept where
//!   the caller of [`set_thread_state_source`] says (the probe layer's thread slots).
//!
//! Both are kept by the probe layer's guards on the C library's `sigaction` and
//! `pthread_sigmask` and on `syscall()` (jump-optimized probes whose handlers rewrite the
//! call). A trap that is not dynprobe's is then delivered here with the kernel's rules
//! (kernel/signal.c `force_sig_info_to_task`, `get_signal`; arch/x86/kernel/signal.c
//! `handle_signal`): an `int3` or single step (forced: `si_code` is `SI_KERNEL` or a
//! positive `TRAP_*`) with the signal blocked, ignored or default kills the process with
//! `SIGTRAP`; a sent one (`kill`, `raise`) is discarded when ignored and kills under
//! `SIG_DFL`; otherwise the program's handler runs with its `sa_mask` (and `SIGTRAP`
//! itself unless `SA_NODEFER`) blocked, after its `SA_RESETHAND` reset the action, on the
//! thread's alternate signal stack with `SA_ONSTACK`.
//!
//! A sent `SIGTRAP` that finds its thread blocking it is *held* with its `siginfo`, as the
//! kernel keeps it pending: for the thread when it was sent to the thread (`raise`,
//! `tgkill`); when it was sent to the process (`kill`, `sigqueue`), it goes on to a thread
//! that would take it (one that does not block it, or one waiting for it in
//! `sigtimedwait` or `sigsuspend`, as kernel/signal.c `complete_signal` chooses), else it
//! is held for the process. A held `SIGTRAP` is delivered when a thread it may go to
//! unblocks it, returned by the guarded `sigtimedwait` (so `sigwait`, `sigwaitinfo`),
//! delivered by `sigsuspend`, and shown by `sigpending`. Not reproduced: a `signalfd` never
//! reads a sent `SIGTRAP` (the kernel queues only what a thread really blocks), nor do the
//! raw `rt_sigtimedwait`/`rt_sigpending` system calls see a held one; and `SA_RESTART`'s
//! absence for a sent `SIGTRAP` that interrupts a system call (it is restarted).

use crate::raw;
use crate::TextError;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

/// A site owner's trap handler: `data` is the word given at registration.
pub type TrapFn = fn(data: usize, ctx: &mut TrapContext<'_>);

/// The trapped thread's state, as the owner sees it.
pub struct TrapContext<'a> {
    addr: u64,
    uc: &'a mut libc::ucontext_t,
}

impl TrapContext<'_> {
    /// Address of the `int3` that trapped.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The thread's `rip` (the byte after the `int3` on entry).
    pub fn ip(&self) -> u64 {
        self.uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64
    }

    /// Sets where the thread continues.
    pub fn set_ip(&mut self, ip: u64) {
        self.uc.uc_mcontext.gregs[libc::REG_RIP as usize] = ip as i64;
    }

    /// The whole signal context, for owners that read or change other registers.
    pub fn ucontext(&mut self) -> &mut libc::ucontext_t {
        self.uc
    }
}

/// Capacity of the site table. Keys are never removed (a removed site must still be known
/// as "was ours" to rewind late trappers), so the table only grows. A probe site owns up to
/// three keys (its `int3`, its post slot's exits, its detour's slow-path `int3`), and a
/// program traced whole has as many sites as functions: `node` has 78k. 512 Ki entries
/// hold that with room to spare; they are 12 MiB of zero pages in `.bss`, of which only the
/// pages keys land on are ever touched.
const CAPACITY: usize = 1 << 19;
/// Refuse new keys past this fill, so lookups stay short.
const MAX_KEYS: usize = CAPACITY / 4 * 3;

struct Entry {
    /// Site address; 0 = never used.
    key: AtomicU64,
    /// The owner's `TrapFn` as a word; 0 = the site has no owner now.
    handler: AtomicUsize,
    data: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Entry = Entry { key: AtomicU64::new(0), handler: AtomicUsize::new(0), data: AtomicUsize::new(0) };

static TABLE: [Entry; CAPACITY] = [EMPTY; CAPACITY];

/// Serializes writers of the table and installation; the dispatcher never takes it.
static WRITERS: Mutex<usize> = Mutex::new(0);

/// Set once the dispatcher is the kernel's `SIGTRAP` action.
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// The C library's signal return trampoline (`__restore_rt`), read back from our own
/// installation, for actions the probe layer installs with `rt_sigaction` itself.
static RESTORER: AtomicU64 = AtomicU64::new(0);

fn slot_of(addr: u64) -> usize {
    // Fibonacci hashing spreads the low-entropy, 1-byte-apart code addresses.
    (addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - CAPACITY.trailing_zeros())) as usize
}

/// Lock-free: the entry whose key is `addr`, if it was ever registered.
fn find(addr: u64) -> Option<&'static Entry> {
    let mut i = slot_of(addr);
    for _ in 0..CAPACITY {
        let entry = &TABLE[i];
        match entry.key.load(Ordering::Acquire) {
            0 => return None,
            k if k == addr => return Some(entry),
            _ => i = (i + 1) & (CAPACITY - 1),
        }
    }
    None
}

/// Installs the dispatcher (idempotent). The action it replaces becomes the program's
/// chained action (see the module documentation).
pub fn install() -> Result<(), TextError> {
    let _writers = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    if INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: an all-zero sigaction is a valid value to be filled in (SIG_DFL, empty mask).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = dispatch as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART;
    // SAFETY: sa_mask is a valid sigset_t owned by `action`.
    unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaddset(&mut action.sa_mask, crate::stop::stop_signal());
    }
    // SAFETY: as above, a zeroed sigaction is valid storage for the old action.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // Through the C library, once, so that the kernel gets its signal return trampoline
    // (SA_RESTORER): no guard is in place yet, since guards are probes and every probe
    // installs the dispatcher first.
    // SAFETY: both pointers are to valid sigaction values; `dispatch` has the SA_SIGINFO
    // signature and is async-signal-safe.
    let rc = unsafe { libc::sigaction(libc::SIGTRAP, &action, &mut previous) };
    if rc != 0 {
        return Err(TextError::Unwritable {
            addr: 0,
            reason: format!("cannot install the SIGTRAP handler: {}", std::io::Error::last_os_error()),
        });
    }
    // The dispatcher may run from here on; a trap before the record is written can only be
    // a foreign one, which then meets SIG_DFL — the behaviour without us.
    // SAFETY: sa_mask's first word holds signals 1..=64, the kernel's whole mask.
    let mask = unsafe { *(&previous.sa_mask as *const libc::sigset_t as *const u64) };
    let sa_restorer = previous.sa_restorer.map_or(0, |f| f as usize as u64);
    set_program_action(&KernelSigaction {
        handler: previous.sa_sigaction as u64,
        flags: previous.sa_flags as u32 as u64,
        restorer: sa_restorer,
        mask,
    });
    let mut ours = KernelSigaction::default();
    // SAFETY: a query of SIGTRAP's action into a valid KernelSigaction.
    if unsafe { rt_sigaction(libc::SIGTRAP, std::ptr::null(), &mut ours) } == 0 {
        RESTORER.store(ours.restorer, Ordering::Relaxed);
    }
    INSTALLED.store(true, Ordering::Release);
    Ok(())
}

/// Gives `SIGTRAP` back to the program: its chained action becomes the kernel's action
/// again, as at the end of a session (no `int3` of ours may be left). The next
/// [`install`] starts afresh from the action then in place.
pub fn uninstall() -> Result<(), TextError> {
    let _writers = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    if !INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    let action = program_action();
    // SAFETY: a valid kernel action, as the program (or the C library for it) set it.
    let rc = unsafe { rt_sigaction(libc::SIGTRAP, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(TextError::Unwritable {
            addr: 0,
            reason: format!("cannot give SIGTRAP's action back: {}", std::io::Error::from_raw_os_error(-rc as i32)),
        });
    }
    INSTALLED.store(false, Ordering::Release);
    Ok(())
}

/// Makes `handler(data, ..)` the owner of the `int3` at `addr`. Must be called before the
/// `int3` is written. Installs the dispatcher if needed.
pub fn register_site(addr: u64, handler: TrapFn, data: usize) -> Result<(), TextError> {
    install()?;
    let mut keys = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    let entry = match find(addr) {
        Some(entry) => entry,
        None => {
            if *keys >= MAX_KEYS {
                return Err(TextError::TrapTableFull);
            }
            let mut i = slot_of(addr);
            while TABLE[i].key.load(Ordering::Relaxed) != 0 {
                i = (i + 1) & (CAPACITY - 1);
            }
            *keys += 1;
            &TABLE[i]
        }
    };
    // Data before handler: a dispatcher that sees the handler sees this site's data.
    entry.data.store(data, Ordering::Release);
    entry.handler.store(handler as *const () as usize, Ordering::Release);
    entry.key.store(addr, Ordering::Release);
    Ok(())
}

/// Ends the ownership of `addr`, after its `int3` was removed. A thread that trapped on it
/// and was not yet dispatched is rewound to re-execute the restored bytes.
pub fn unregister_site(addr: u64) {
    let _writers = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(entry) = find(addr) {
        entry.handler.store(0, Ordering::Release);
    }
}

/// True when `addr` has an owner now.
pub fn is_registered(addr: u64) -> bool {
    find(addr).is_some_and(|e| e.handler.load(Ordering::Acquire) != 0)
}

// ---------------------------------------------------------------------------------------
// The program's virtual SIGTRAP: its chained action and per-thread blocked bit.

/// The kernel's `struct sigaction` as `rt_sigaction(2)` takes it on x86-64
/// (include/linux/signal_types.h), not the C library's, whose mask has 1024 bits.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelSigaction {
    /// `SIG_DFL` (0), `SIG_IGN` (1) or the handler's address.
    pub handler: u64,
    /// `SA_*` flags.
    pub flags: u64,
    /// The signal return trampoline (with `SA_RESTORER`).
    pub restorer: u64,
    /// Signals blocked while the handler runs: bit `n - 1` for signal `n`.
    pub mask: u64,
}

/// `SA_RESTORER` (arch/x86/include/uapi/asm/signal.h): the C library sets it on every action.
pub const SA_RESTORER: u64 = 0x0400_0000;

/// Bit of signal `sig` in a kernel signal mask.
pub const fn sigbit(sig: i32) -> u64 {
    1 << (sig - 1)
}

/// `SIGTRAP`'s bit in a kernel signal mask.
pub const TRAP_BIT: u64 = sigbit(libc::SIGTRAP);

/// One version of the chained action, read under a sequence count (a seqlock: the writer
/// never waits, a reader retries while a write is under way).
struct ActionRecord {
    seq: AtomicU64,
    words: [AtomicU64; 4],
}

/// Versions written round-robin; the current one is [`CURRENT_ACTION`]. A version is
/// overwritten only after this many later `sigaction(SIGTRAP)` calls.
const ACTION_RECORDS: usize = 64;
#[allow(clippy::declare_interior_mutable_const)]
const NO_ACTION: ActionRecord = ActionRecord { seq: AtomicU64::new(0), words: [const { AtomicU64::new(0) }; 4] };
static ACTIONS: [ActionRecord; ACTION_RECORDS] = [NO_ACTION; ACTION_RECORDS];
/// Index of the current version (record 0, all zero, is `SIG_DFL`).
static CURRENT_ACTION: AtomicUsize = AtomicUsize::new(0);
static NEXT_ACTION: AtomicUsize = AtomicUsize::new(1);

fn read_action(index: usize) -> KernelSigaction {
    let record = &ACTIONS[index % ACTION_RECORDS];
    loop {
        let before = record.seq.load(Ordering::Acquire);
        let w: [u64; 4] = std::array::from_fn(|i| record.words[i].load(Ordering::Relaxed));
        fence(Ordering::Acquire);
        if before & 1 == 0 && record.seq.load(Ordering::Relaxed) == before {
            return KernelSigaction { handler: w[0], flags: w[1], restorer: w[2], mask: w[3] };
        }
        std::hint::spin_loop();
    }
}

/// Writes `action` as a new version (not yet current); returns its index.
fn write_action(action: &KernelSigaction) -> usize {
    let index = NEXT_ACTION.fetch_add(1, Ordering::Relaxed) % ACTION_RECORDS;
    let record = &ACTIONS[index];
    record.seq.fetch_add(1, Ordering::Relaxed);
    fence(Ordering::Release);
    for (word, value) in record.words.iter().zip([action.handler, action.flags, action.restorer, action.mask]) {
        word.store(value, Ordering::Relaxed);
    }
    record.seq.fetch_add(1, Ordering::Release);
    index
}

/// The `SIGTRAP` action the program asked for (what it would have in the kernel without
/// dynprobe): the action traps that are not dynprobe's are delivered with.
pub fn program_action() -> KernelSigaction {
    read_action(CURRENT_ACTION.load(Ordering::Acquire))
}

/// Makes `action` the program's `SIGTRAP` action; returns the one it replaces, which the
/// program reads back as its old action. Lock-free: callable from a probe handler.
pub fn set_program_action(action: &KernelSigaction) -> KernelSigaction {
    let index = write_action(action);
    read_action(CURRENT_ACTION.swap(index, Ordering::AcqRel))
}

/// The C library's signal return trampoline, for an action installed with a raw
/// `rt_sigaction` in the C library's place (0 before the dispatcher is installed).
pub fn c_library_restorer() -> u64 {
    RESTORER.load(Ordering::Relaxed)
}

/// One `SIGTRAP` sent while the program blocked it, held with its `siginfo` until the
/// program unblocks it or waits for it. Like the kernel's queue of a standard signal, it
/// holds one: a second sent meanwhile is merged into it (signal(7)).
pub struct HeldTrap {
    /// [`NOTHING`], [`BUSY`] (being written or taken) or [`FULL`].
    state: AtomicU8,
    info: [AtomicU64; SIGINFO_WORDS],
}

/// `siginfo_t` is 128 bytes (include/uapi/asm-generic/siginfo.h).
const SIGINFO_WORDS: usize = 16;
/// A `siginfo_t` as words.
pub type SigInfo = [u64; SIGINFO_WORDS];
const NOTHING: u8 = 0;
const BUSY: u8 = 1;
const FULL: u8 = 2;

impl HeldTrap {
    /// Nothing held.
    pub const fn new() -> HeldTrap {
        HeldTrap { state: AtomicU8::new(NOTHING), info: [const { AtomicU64::new(0) }; SIGINFO_WORDS] }
    }

    /// Holds `info`, unless one is held already (then it is merged into that one).
    fn put(&self, info: &SigInfo) {
        if self.state.compare_exchange(NOTHING, BUSY, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return;
        }
        for (word, value) in self.info.iter().zip(info) {
            word.store(*value, Ordering::Relaxed);
        }
        self.state.store(FULL, Ordering::Release);
    }

    /// Takes what is held.
    fn take(&self) -> Option<SigInfo> {
        self.state.compare_exchange(FULL, BUSY, Ordering::Acquire, Ordering::Relaxed).ok()?;
        let info = std::array::from_fn(|i| self.info[i].load(Ordering::Relaxed));
        self.state.store(NOTHING, Ordering::Release);
        Some(info)
    }

    fn is_held(&self) -> bool {
        self.state.load(Ordering::Acquire) != NOTHING
    }
}

impl Default for HeldTrap {
    fn default() -> Self {
        Self::new()
    }
}

/// One thread's virtual `SIGTRAP`: whether the program asked it to block the signal, and a
/// `SIGTRAP` sent to the thread (`raise`, `tgkill`) meanwhile.
#[derive(Default)]
pub struct TrapState {
    blocked: AtomicBool,
    held: HeldTrap,
}

impl TrapState {
    /// Not blocked, nothing held.
    pub const fn new() -> TrapState {
        TrapState { blocked: AtomicBool::new(false), held: HeldTrap::new() }
    }

    /// Back to [`TrapState::new`], for a new thread.
    pub fn reset(&self) {
        self.blocked.store(false, Ordering::Relaxed);
        self.held.take();
    }

    /// For the thread of a fork child: what it blocked stays (fork(2) keeps the mask), but
    /// nothing held for the parent is pending in the child — the kernel starts a child with
    /// no pending signal, the process-wide ones included.
    pub fn forget_held_after_fork(&self) {
        self.held.take();
        PROCESS_HELD.take();
    }

    /// Whether the program asked this thread to block `SIGTRAP` (readable from any thread).
    pub fn blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }
}

/// A `SIGTRAP` sent to the process (`kill`, `sigqueue`) while the thread the kernel gave it
/// to blocked it and no other thread could take it: the kernel keeps such a signal pending
/// on the process until a thread unblocks or waits for it.
static PROCESS_HELD: HeldTrap = HeldTrap::new();

/// Where the calling thread's virtual `SIGTRAP` state lives: owned by that thread (`None`
/// when it has none, e.g. too many threads), found without locks or allocation.
pub type ThreadStateFn = fn() -> Option<&'static TrapState>;
/// Whether thread `tid` of the process may not be given the program's `SIGTRAP` now: it
/// blocks it, or it is one of dynprobe's own threads. Called from the dispatcher.
pub type ThreadRefusesFn = fn(tid: i32) -> bool;

static THREAD_STATE: AtomicUsize = AtomicUsize::new(0);
static THREAD_REFUSES: AtomicUsize = AtomicUsize::new(0);

/// Says where each thread's virtual `SIGTRAP` state is kept (the probe layer's per-thread
/// slots), and how to ask about another thread's. Until it is called no thread is seen as
/// blocking `SIGTRAP`.
pub fn set_thread_state_source(source: ThreadStateFn, refuses: ThreadRefusesFn) {
    THREAD_REFUSES.store(refuses as *const () as usize, Ordering::Release);
    THREAD_STATE.store(source as *const () as usize, Ordering::Release);
}

fn thread_state() -> Option<&'static TrapState> {
    let source = THREAD_STATE.load(Ordering::Acquire);
    if source == 0 {
        return None;
    }
    // SAFETY: non-zero words are only ever stored from a `ThreadStateFn`.
    let source: ThreadStateFn = unsafe { std::mem::transmute::<usize, ThreadStateFn>(source) };
    source()
}

fn thread_refuses(tid: i32) -> bool {
    let refuses = THREAD_REFUSES.load(Ordering::Acquire);
    // SAFETY: non-zero words are only ever stored from a `ThreadRefusesFn`.
    refuses != 0 && unsafe { std::mem::transmute::<usize, ThreadRefusesFn>(refuses) }(tid)
}

/// Whether the program asked the calling thread to block `SIGTRAP`.
pub fn program_blocks_trap() -> bool {
    thread_state().is_some_and(TrapState::blocked)
}

/// Records whether the program asked the calling thread to block `SIGTRAP`; returns the
/// previous answer. Unblocking delivers a `SIGTRAP` held for the thread or the process, as
/// the kernel does when a mask change unblocks a pending signal.
pub fn set_program_blocks_trap(blocked: bool) -> bool {
    let Some(state) = thread_state() else { return false };
    let old = state.blocked.swap(blocked, Ordering::Relaxed);
    if !blocked {
        deliver_held(state);
    }
    old
}

/// Forgets whether the program asked the calling thread to block `SIGTRAP`, delivering
/// nothing; returns the answer (see [`release_held`]).
pub fn take_program_blocks_trap() -> bool {
    thread_state().is_some_and(|s| s.blocked.swap(false, Ordering::Relaxed))
}

/// Gives the `SIGTRAP`s held back to the kernel, at the end of a session (after
/// [`uninstall`]): the calling thread's is sent to itself, pending there if it now blocks
/// `SIGTRAP` for real; the process's is sent to the process, with its own `siginfo` when
/// the kernel accepts it, for the kernel to give to a thread that takes it. (What other
/// threads hold cannot be sent back as theirs: the kernel accepts another thread's
/// `siginfo` only for a queued signal; they keep it until they unblock or wait.)
pub fn release_held() {
    if let Some(info) = thread_state().and_then(|s| s.held.take()) {
        send_to(raw::gettid(), &info);
    }
    if let Some(info) = PROCESS_HELD.take() {
        let pid = raw::getpid() as u64;
        // SAFETY: a 128-byte siginfo for the kernel to read; kill of our own process.
        unsafe {
            let sent = raw::syscall4(libc::SYS_rt_sigqueueinfo, pid, libc::SIGTRAP as u64, info.as_ptr() as u64, 0);
            if sent != 0 {
                raw::syscall4(libc::SYS_kill, pid, libc::SIGTRAP as u64, 0, 0);
            }
        }
    }
}

/// Delivers to the calling thread, now, the `SIGTRAP`s held for it and for the process:
/// sent again to itself with their own `siginfo` (`rt_tgsigqueueinfo` to oneself accepts
/// any `si_code`, kernel/signal.c `do_rt_tgsigqueueinfo`), they reach the program's action
/// as the system call returns.
fn deliver_held(state: &TrapState) {
    for held in [&state.held, &PROCESS_HELD] {
        if let Some(info) = held.take() {
            send_to(raw::gettid(), &info);
        }
    }
}

/// Takes a `SIGTRAP` held for the calling thread or the process, for the program's
/// `sigwait`, `sigwaitinfo` or `sigtimedwait` on it, which the kernel would have returned
/// at once. Its `siginfo`, as the kernel gave it.
pub fn take_held_trap() -> Option<SigInfo> {
    thread_state().and_then(|s| s.held.take()).or_else(|| PROCESS_HELD.take())
}

/// Whether a `SIGTRAP` is held for the calling thread or the process: pending, as the
/// program's `sigpending` sees it.
pub fn trap_is_held() -> bool {
    thread_state().is_some_and(|s| s.held.is_held()) || PROCESS_HELD.is_held()
}

/// Delivers the held `SIGTRAP`s as if the calling thread unblocked it for a moment (the
/// program's `sigsuspend` with a mask without it); true when there was one.
pub fn deliver_held_now() -> bool {
    let Some(state) = thread_state() else { return false };
    let held = state.held.is_held() || PROCESS_HELD.is_held();
    if held {
        let was = state.blocked.swap(false, Ordering::Relaxed);
        deliver_held(state);
        state.blocked.store(was, Ordering::Relaxed);
    }
    held
}

/// Sends `SIGTRAP` with `info` to thread `tid` of this process; as `tgkill` (the sender
/// becomes this process) when the kernel refuses the `siginfo` (to another thread, it
/// accepts only an `si_code` of a queued signal).
fn send_to(tid: i32, info: &SigInfo) {
    let pid = raw::getpid() as u64;
    // SAFETY: a 128-byte siginfo for the kernel to read; tgkill of a thread of ours.
    unsafe {
        let sent =
            raw::syscall4(libc::SYS_rt_tgsigqueueinfo, pid, tid as u64, libc::SIGTRAP as u64, info.as_ptr() as u64);
        if sent != 0 {
            raw::syscall4(libc::SYS_tgkill, pid, tid as u64, libc::SIGTRAP as u64, 0);
        }
    }
}

/// A thread the kernel would give a process-directed `SIGTRAP` that the calling thread
/// blocks (kernel/signal.c `complete_signal`): one that does not block it, or one waiting
/// for it in `sigtimedwait` (which unblocks what it waits for) or in a `sigsuspend` whose
/// mask lets it through — seen in `/proc/self/task/TID/syscall` (proc(5)).
fn thread_taking_trap(me: i32) -> Option<i32> {
    let mut found = None;
    let _ = crate::stop::for_each_task(|tid| {
        if found.is_none() && tid != me && (!thread_refuses(tid) || waits_for_trap(tid)) {
            found = Some(tid);
        }
    });
    found
}

/// Whether thread `tid` sleeps in a system call that takes a `SIGTRAP` although the
/// thread blocks it: `rt_sigtimedwait` on a set with it, `rt_sigsuspend` on a mask without.
fn waits_for_trap(tid: i32) -> bool {
    let Some((nr, set)) = crate::stop::system_call_of(tid) else { return false };
    let mut mask = [0u8; 8];
    if !raw::read(set, &mut mask) {
        return false;
    }
    let mask = u64::from_ne_bytes(mask);
    match nr {
        libc::SYS_rt_sigtimedwait => mask & TRAP_BIT != 0,
        libc::SYS_rt_sigsuspend => mask & TRAP_BIT == 0,
        _ => false,
    }
}

/// `rt_sigaction(sig, new, old)` as a raw system call: the C library's `sigaction` carries
/// a guard, and this layer's callers must not write `errno`. Returns 0 or `-errno`.
///
/// # Safety
/// `new` and `old` must be null or valid for the kernel to read / write.
pub unsafe fn rt_sigaction(sig: i32, new: *const KernelSigaction, old: *mut KernelSigaction) -> i64 {
    // SAFETY: the caller vouches for the pointers; the size is the kernel's mask size.
    unsafe { raw::syscall4(libc::SYS_rt_sigaction, sig as u64, new as u64, old as u64, 8) }
}

/// `rt_sigprocmask(how, set, old)` as a raw system call, on the kernel's 64-bit mask.
/// Returns 0 or `-errno`.
///
/// # Safety
/// `set` and `old` must be null or valid for the kernel to read / write.
pub unsafe fn rt_sigprocmask(how: i32, set: *const u64, old: *mut u64) -> i64 {
    // SAFETY: the caller vouches for the pointers; the size is the kernel's mask size.
    unsafe { raw::syscall4(libc::SYS_rt_sigprocmask, how as u64, set as u64, old as u64, 8) }
}

/// `rt_sigpending(set)` as a raw system call, on the kernel's 64-bit mask. Returns 0 or
/// `-errno`.
///
/// # Safety
/// `set` must be valid for the kernel to write.
pub unsafe fn rt_sigpending(set: *mut u64) -> i64 {
    // SAFETY: the caller vouches for the pointer; the size is the kernel's mask size.
    unsafe { raw::syscall4(libc::SYS_rt_sigpending, set as u64, 8, 0, 0) }
}

/// `execve(path, argv, envp)` as a raw system call, for a guard that must make it with a
/// mask of its choosing. Returns only on failure, with `-errno`.
///
/// # Safety
/// The arguments must be valid for `execve(2)`, as the program passed them.
pub unsafe fn execve(path: u64, argv: u64, envp: u64) -> i64 {
    // SAFETY: the caller vouches for the arguments.
    unsafe { raw::syscall4(libc::SYS_execve, path, argv, envp, 0) }
}

/// Sends `sig` to the calling thread (raw `tgkill`).
fn raise_here(sig: i32) {
    // SAFETY: getpid takes no arguments; tgkill to our own thread with a valid signal.
    unsafe {
        let pid = raw::syscall4(libc::SYS_getpid, 0, 0, 0, 0);
        raw::syscall4(libc::SYS_tgkill, pid as u64, raw::gettid() as u64, sig as u64, 0);
    }
}

/// `si_code` of a `SIGTRAP` raised by `int3` (the kernel's `force_sig(SIGTRAP)`).
const SI_KERNEL: i32 = 0x80;
/// `si_code` of a signal sent by `tkill`/`tgkill` (`raise`): directed at one thread.
const SI_TKILL: i32 = -6;

extern "C" fn dispatch(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel passes valid siginfo and ucontext pointers to an SA_SIGINFO
    // handler, exclusively ours for the duration of the call.
    let (code, uc_ref) = unsafe { ((*info).si_code, &mut *(uc as *mut libc::ucontext_t)) };
    if code == SI_KERNEL {
        let addr = (uc_ref.uc_mcontext.gregs[libc::REG_RIP as usize] as u64).wrapping_sub(1);
        if let Some(entry) = find(addr) {
            // Twice at most: an owner is always registered before its int3 is written, so an
            // int3 found in place after the owner word read 0 means a new owner came in
            // between (the old int3 was removed and a new one written): it is the owner now.
            for _ in 0..2 {
                let handler = entry.handler.load(Ordering::Acquire);
                if handler != 0 {
                    let data = entry.data.load(Ordering::Acquire);
                    // SAFETY: non-zero handler words are only ever stored from a `TrapFn`.
                    let handler: TrapFn = unsafe { std::mem::transmute::<usize, TrapFn>(handler) };
                    handler(data, &mut TrapContext { addr, uc: uc_ref });
                    return;
                }
                // SAFETY: `addr` was registered as code that is mapped; one volatile byte read.
                let now = unsafe { std::ptr::read_volatile(addr as *const u8) };
                if now != dynprobe_arch::x86_64::INT3 {
                    uc_ref.uc_mcontext.gregs[libc::REG_RIP as usize] = addr as i64;
                    return;
                }
            }
        } else if crate::transaction::resolve_transient(addr) {
            uc_ref.uc_mcontext.gregs[libc::REG_RIP as usize] = addr as i64;
            return;
        }
    }
    // SAFETY: the arguments are the ones the kernel gave us.
    unsafe { deliver_to_program(sig, info, uc) }
}

/// Delivers a trap that is not ours as the kernel would have without us, by the program's
/// chained action and virtual blocked bit (see the module documentation).
///
/// # Safety
/// The arguments must be those of a signal handler invocation.
unsafe fn deliver_to_program(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: as the caller vouches, `info` is the kernel's siginfo.
    let code = unsafe { (*info).si_code };
    // An int3 (SI_KERNEL) or a debug exception (TRAP_BRKPT, TRAP_TRACE, ...): the kernel's
    // force_sig, which neither waits for an unblock nor respects SIG_IGN.
    let forced = code == SI_KERNEL || code > 0;
    let index = CURRENT_ACTION.load(Ordering::Acquire);
    let action = read_action(index);
    let blocked = program_blocks_trap();
    let ignored = action.handler == libc::SIG_IGN as u64;
    let default = action.handler == libc::SIG_DFL as u64;
    if forced && (blocked || ignored || default) {
        die_by(sig);
        return;
    }
    if ignored {
        return;
    }
    if blocked {
        // SAFETY: the kernel's siginfo, 128 bytes.
        let info = unsafe { *(info as *const SigInfo) };
        if code == SI_TKILL {
            // Sent to this thread (raise, tgkill): pending for it.
            if let Some(state) = thread_state() {
                state.held.put(&info);
            }
        } else {
            // Sent to the process (kill, sigqueue): another thread may take it now, else
            // it is pending for whichever thread unblocks or waits for it first.
            match thread_taking_trap(raw::gettid()) {
                Some(tid) => send_to(tid, &info),
                None => PROCESS_HELD.put(&info),
            }
        }
        return;
    }
    if default {
        die_by(sig);
        return;
    }
    if action.flags & libc::SA_RESETHAND as u64 != 0 {
        // Only the version delivered with is reset: a sigaction that came in between wins.
        let dfl = write_action(&KernelSigaction::default());
        let _ = CURRENT_ACTION.compare_exchange(index, dfl, Ordering::AcqRel, Ordering::Acquire);
    }
    // The handler runs with the interrupted code's mask plus its sa_mask (without the stop
    // signal this dispatcher blocks: a long handler must not hold up a stop); SIGTRAP's
    // part of that is virtual.
    // SAFETY: the kernel's ucontext for this invocation; its mask's first word is the
    // kernel's whole 64-signal mask.
    let interrupted =
        unsafe { *(&(*(uc as *const libc::ucontext_t)).uc_sigmask as *const libc::sigset_t as *const u64) };
    let during = (interrupted | action.mask) & !TRAP_BIT;
    // SAFETY: a valid mask; sigreturn restores the interrupted one from the ucontext.
    unsafe { rt_sigprocmask(libc::SIG_SETMASK, &during, std::ptr::null_mut()) };
    let trap_blocked = action.mask & TRAP_BIT != 0 || action.flags & libc::SA_NODEFER as u64 == 0;
    set_program_blocks_trap(trap_blocked);
    let alternate = if action.flags & libc::SA_ONSTACK as u64 != 0 {
        // SAFETY: the kernel's ucontext for this invocation.
        alternate_stack_top(unsafe { &*(uc as *const libc::ucontext_t) })
    } else {
        None
    };
    // A plain handler takes one argument; the other two registers are ignored by it.
    // SAFETY: the kernel's arguments, and the handler the program installed.
    unsafe {
        match alternate {
            Some(top) => run_on_stack(action.handler, sig, info, uc, top),
            None => {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(action.handler as usize);
                f(sig, info, uc);
            }
        }
    }
    // As sigreturn restores the interrupted mask: a SIGTRAP sent to this thread while its
    // handler blocked it is delivered now.
    set_program_blocks_trap(false);
}

/// Where the program's `SA_ONSTACK` handler must run: the top of the thread's alternate
/// signal stack, when it had one armed at the trap and the trap did not come on it already
/// (arch/x86/kernel/signal.c `get_sigframe`). The dispatcher is installed without
/// `SA_ONSTACK`, so that dynprobe's own hits do not use a program's small alternate stack;
/// the kernel saved that stack in the frame (`uc_stack`) all the same, disarmed it when
/// the program asked for `SS_AUTODISARM`, and re-arms it from there at `sigreturn`.
fn alternate_stack_top(uc: &libc::ucontext_t) -> Option<u64> {
    let stack = &uc.uc_stack;
    if stack.ss_flags & libc::SS_DISABLE != 0 || stack.ss_size == 0 {
        return None;
    }
    let (base, size) = (stack.ss_sp as u64, stack.ss_size as u64);
    let sp = uc.uc_mcontext.gregs[libc::REG_RSP as usize] as u64;
    if sp.wrapping_sub(base) < size {
        return None;
    }
    Some((base + size) & !15)
}

/// Calls `handler(sig, info, uc)` with `rsp` at `top`, and comes back to this stack.
///
/// # Safety
/// `handler` must be a signal handler of the program, `top` the 16-byte aligned end of
/// memory the thread may use as its stack.
unsafe fn run_on_stack(handler: u64, sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void, top: u64) {
    // SAFETY: the trampoline follows the C calling convention; the caller vouches for the
    // handler and the stack.
    unsafe { dynprobe_call_on_stack(sig as i64, info, uc, handler, top) }
}

extern "C" {
    /// `handler(sig, info, uc)` with `rsp` at `top`. Its frame is described to unwinders
    /// through `rbp` (`.cfi_def_cfa_register`), so that a handler that unwinds its own
    /// stack — LLVM's prints a backtrace — walks back through the dispatcher to the signal
    /// frame and the interrupted code, as from the kernel's own frame on that stack.
    fn dynprobe_call_on_stack(sig: i64, info: *mut libc::siginfo_t, uc: *mut libc::c_void, handler: u64, top: u64);
}

std::arch::global_asm!(
    ".pushsection .text.dynprobe_call_on_stack,\"ax\",@progbits",
    ".p2align 4",
    ".globl dynprobe_call_on_stack",
    ".hidden dynprobe_call_on_stack",
    ".type dynprobe_call_on_stack,@function",
    "dynprobe_call_on_stack:",
    ".cfi_startproc",
    "push rbp",
    ".cfi_def_cfa_offset 16",
    ".cfi_offset rbp, -16",
    "mov rbp, rsp",
    ".cfi_def_cfa_register rbp",
    // top is 16-byte aligned: the call leaves the handler's entry at 16n + 8, as the ABI
    // wants.
    "mov rsp, r8",
    "call rcx",
    "mov rsp, rbp",
    "pop rbp",
    ".cfi_def_cfa rsp, 8",
    "ret",
    ".cfi_endproc",
    ".size dynprobe_call_on_stack,.-dynprobe_call_on_stack",
    ".popsection",
);

/// Ends the process by `sig`'s default action, as the kernel does: the kernel's action is
/// reset to `SIG_DFL` and the signal sent again, delivered as this handler returns.
fn die_by(sig: libc::c_int) {
    let dfl = KernelSigaction::default();
    set_program_action(&dfl);
    let unblock = sigbit(sig);
    // SAFETY: valid pointers to a zeroed (SIG_DFL) action and a mask.
    unsafe {
        rt_sigaction(sig, &dfl, std::ptr::null_mut());
        rt_sigprocmask(libc::SIG_UNBLOCK, &unblock, std::ptr::null_mut());
    }
    raise_here(sig);
}
