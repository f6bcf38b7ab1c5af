//! Thread identity without a system call or thread-local storage.

use std::sync::atomic::{AtomicU8, Ordering};

/// The calling thread's thread pointer (`%fs:0` holds the TCB's own address on x86-64
/// glibc and musl). Unique among live threads, readable in a signal handler, and — unlike a
/// Rust `thread_local!` in a `dlopen`ed library — never allocates on first use.
#[inline(always)]
pub(crate) fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: reading the word at %fs:0 is defined by the x86-64 TLS ABI; every thread
    // created by the C library has it set to the TCB address.
    unsafe {
        std::arch::asm!("mov {}, qword ptr fs:0", out(reg) tp, options(nostack, readonly, preserves_flags));
    }
    tp
}

/// The calling thread's stack pointer: which stack the thread runs on tells dynprobe's own
/// threads apart (see `own_thread`), from their first instruction on.
#[inline(always)]
pub(crate) fn stack_pointer() -> usize {
    let sp: usize;
    // SAFETY: copies %rsp into a register; reads no memory.
    unsafe {
        std::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags));
    }
    sp
}

/// Where glibc's `struct pthread` keeps the kernel thread id (`tid`), relative to the thread
/// pointer, on x86-64. The kernel clears it when the thread exits (`CLONE_CHILD_CLEARTID`),
/// and glibc reuses a dead thread's TCB for a new thread, so the pair (thread pointer, tid)
/// tells a live thread from the dead one whose TCB it inherited.
const GLIBC_TID_OFFSET: usize = 0x2d0;

/// Whether [`GLIBC_TID_OFFSET`] was checked to hold the tid: 0 unchecked, 1 yes, 2 no.
static TID_IN_TCB: AtomicU8 = AtomicU8::new(0);

/// The calling thread's kernel thread id: one load from the TCB where the C library keeps
/// it (checked once against `gettid`), a system call otherwise.
#[inline]
pub(crate) fn current_tid() -> i32 {
    match TID_IN_TCB.load(Ordering::Relaxed) {
        1 => tcb_tid(),
        _ => tid_by_syscall(),
    }
}

/// [`current_tid`] when the TCB is not known to hold the tid (yet): kept out of line, so
/// that the hot paths which inline `current_tid` carry one load, not two system calls.
#[cold]
#[inline(never)]
fn tid_by_syscall() -> i32 {
    let tid = gettid();
    if TID_IN_TCB.load(Ordering::Relaxed) == 0 {
        let known = cfg!(target_env = "gnu") && tcb_tid() == tid;
        TID_IN_TCB.store(if known { 1 } else { 2 }, Ordering::Relaxed);
    }
    tid
}

#[inline(always)]
fn tcb_tid() -> i32 {
    if !cfg!(target_env = "gnu") {
        return 0;
    }
    let tid: i32;
    // SAFETY: under glibc the TCB is a `struct pthread`, larger than the offset read; the
    // load is through %fs, so it reads the calling thread's own TCB.
    unsafe {
        std::arch::asm!("mov {:e}, dword ptr fs:[{off}]", out(reg) tid, off = const GLIBC_TID_OFFSET,
            options(nostack, readonly, preserves_flags));
    }
    tid
}

fn gettid() -> i32 {
    dynprobe_text::raw::gettid()
}

/// A new thread's start routine and its argument, as `pthread_create` was given them.
#[repr(C)]
pub(crate) struct StartRoutine {
    pub(crate) routine: u64,
    pub(crate) arg: u64,
}

std::arch::global_asm!(
    ".pushsection .text.dynprobe_start_blocked,\"ax\",@progbits",
    ".p2align 4",
    ".globl {trampoline}",
    ".hidden {trampoline}",
    ".type {trampoline},@function",
    "{trampoline}:",
    // The C library calls the start routine with rsp = 16n + 8; the call below needs the
    // same, so one push of the argument (the record) keeps the alignment.
    "push rdi",
    "call {take}",
    "add rsp, 8",
    // Tail-jump into the program's own routine: it returns into the C library's
    // start_thread, exactly as without dynprobe, and nothing of dynprobe stays on the stack.
    "mov rdi, rdx",
    "jmp rax",
    ".size {trampoline},.-{trampoline}",
    ".popsection",
    trampoline = sym dynprobe_inherit_blocked_start,
    take = sym crate::signals::take_blocked_start,
);

extern "C" {
    /// The start routine `pthread_create` is given, in place of the program's, for a thread
    /// whose creator blocks `SIGTRAP` (see `crate::signals`): `arg` is a record that
    /// [`crate::signals::take_blocked_start`] turns back into the program's routine and
    /// argument, after marking the new thread as blocking `SIGTRAP`.
    fn dynprobe_inherit_blocked_start(arg: *mut libc::c_void) -> *mut libc::c_void;
}

/// The address of [`dynprobe_inherit_blocked_start`].
pub(crate) fn blocked_start_trampoline() -> u64 {
    dynprobe_inherit_blocked_start as *const () as u64
}
