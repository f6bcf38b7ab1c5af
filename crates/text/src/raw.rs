//! Raw system calls for code that runs in signal handlers, while other threads are stopped,
//! and on the paths of a probe hit: it must not call into libc, whose functions may carry
//! the program's probes (an `int3` hit while `SIGTRAP` is blocked kills the process; a hit
//! inside a handler is a miss of the program's probe, and an event the program did not make)
//! and whose wrappers write `errno`. Errors come back as `-errno`; `errno` is never touched.

/// `syscall(nr, a1, a2, a3, a4)`.
///
/// # Safety
///
/// The arguments must be valid for system call `nr`.
pub unsafe fn syscall4(nr: i64, a1: u64, a2: u64, a3: u64, a4: u64) -> i64 {
    // SAFETY: the caller vouches for the arguments; the last two are unused by such calls.
    unsafe { syscall6(nr, a1, a2, a3, a4, 0, 0) }
}

/// Reads `buf.len()` bytes at `addr` of this process with `process_vm_readv`, so that an
/// unmapped address is an error, not a fault. True when every byte was read.
pub fn read(addr: u64, buf: &mut [u8]) -> bool {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as usize as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: getpid takes no arguments.
    let pid = unsafe { syscall4(libc::SYS_getpid, 0, 0, 0, 0) };
    // SAFETY: process_vm_readv(pid, local, 1, remote, 1, 0): both iovecs are valid for the
    // call and `local` describes `buf`; the kernel checks the remote one.
    let n = unsafe {
        syscall6(
            libc::SYS_process_vm_readv,
            pid as u64,
            &local as *const libc::iovec as u64,
            1,
            &remote as *const libc::iovec as u64,
            1,
            0,
        )
    };
    n >= 0 && n as usize == buf.len()
}

/// Whether the two bytes before `rip` are a `syscall` instruction (`0f 05`).
pub(crate) fn follows_syscall(rip: u64) -> bool {
    let mut bytes = [0u8; 2];
    read(rip.wrapping_sub(2), &mut bytes) && bytes == [0x0f, 0x05]
}

/// The number of the system call whose `syscall` instruction ends at `rip`, when the
/// instruction right before it set it as the C library's wrappers do: `mov $nr,%eax`
/// (`b8 imm32`) or `xor %eax,%eax` (`31 c0`, `read`). The byte before a `b8` must not be a
/// REX prefix (`41 b8` is `mov $imm,%r8d`); anything else is `None`. Allocates nothing.
pub(crate) fn syscall_number_before(rip: u64) -> Option<i64> {
    let mut bytes = [0u8; 8];
    if !read(rip.wrapping_sub(8), &mut bytes) || bytes[6..] != [0x0f, 0x05] {
        return None;
    }
    if bytes[1] == 0xb8 && !(0x40..=0x4f).contains(&bytes[0]) {
        return Some(i64::from(u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]])));
    }
    (bytes[4..6] == [0x31, 0xc0] && !(0x40..=0x4f).contains(&bytes[3])).then_some(0)
}

/// `syscall(nr, a1, …, a6)`.
///
/// # Safety
///
/// The arguments must be valid for system call `nr`.
pub unsafe fn syscall6(nr: i64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64, a6: u64) -> i64 {
    let ret: i64;
    // SAFETY: as in `syscall4`; r8 and r9 carry the fifth and sixth arguments.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            in("r10") a4,
            in("r8") a5,
            in("r9") a6,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// True when thread `tid` of this process still exists (`tgkill` with signal 0, which
/// only checks: tgkill(2)).
pub fn thread_alive(tid: i32) -> bool {
    // SAFETY: getpid takes no arguments; signal 0 sends nothing.
    let r = unsafe { syscall4(libc::SYS_tgkill, syscall4(libc::SYS_getpid, 0, 0, 0, 0) as u64, tid as u64, 0, 0) };
    r != -(libc::ESRCH as i64)
}

/// `CLOCK_MONOTONIC` in nanoseconds, through the vDSO's own `__vdso_clock_gettime` (found
/// by rustix in the vDSO's symbol table, vdso(7); the system call where there is none), not
/// the C library's `clock_gettime`, which the program may be probing and which a hit path
/// must therefore not call. The first call finds the function; later ones take no lock,
/// allocate nothing and never touch `errno`. The one such clock of dynprobe: the probe
/// layer's handlers, the event writers and the CLI all read this one.
#[inline]
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The calling process's id.
pub fn getpid() -> i32 {
    // SAFETY: getpid takes no arguments and cannot fail.
    unsafe { syscall4(libc::SYS_getpid, 0, 0, 0, 0) as i32 }
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { syscall4(libc::SYS_gettid, 0, 0, 0, 0) as i32 }
}

/// Sleeps while `*word == expected` (or until a signal / spurious wake; callers loop).
pub(crate) fn futex_wait(word: &core::sync::atomic::AtomicU32, expected: u32) {
    // SAFETY: `word` is a valid, aligned u32 for the whole call; no timeout pointer.
    unsafe {
        syscall4(
            libc::SYS_futex,
            word.as_ptr() as u64,
            (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG) as u64,
            expected as u64,
            0,
        )
    };
}

/// Wakes every waiter on `word`.
pub(crate) fn futex_wake_all(word: &core::sync::atomic::AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE only reads its address.
    unsafe {
        syscall4(
            libc::SYS_futex,
            word.as_ptr() as u64,
            (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG) as u64,
            i32::MAX as u64,
            0,
        )
    };
}

/// `write(fd, bytes)`, or `send(fd, bytes, MSG_NOSIGNAL)` when `socket` (a peer gone away
/// then gives `-EPIPE`, not `SIGPIPE`): the bytes written, or `-errno`.
pub fn write(fd: i32, bytes: &[u8], socket: bool) -> i64 {
    // SAFETY: `bytes` is a live slice of `bytes.len()` readable bytes; sendto with no
    // address is send.
    unsafe {
        if socket {
            syscall6(
                libc::SYS_sendto,
                fd as u64,
                bytes.as_ptr() as u64,
                bytes.len() as u64,
                libc::MSG_NOSIGNAL as u64,
                0,
                0,
            )
        } else {
            syscall4(libc::SYS_write, fd as u64, bytes.as_ptr() as u64, bytes.len() as u64, 0)
        }
    }
}
