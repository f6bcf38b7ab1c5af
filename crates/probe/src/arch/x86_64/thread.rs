//! Thread identity without a system call or thread-local storage.

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
