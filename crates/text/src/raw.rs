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

/// The number of the system call whose `syscall` instruction ends at `rip`, when the code
/// before it set it as the C library's wrappers do: `mov $nr,%eax` (or `xor %eax,%eax`),
/// possibly followed by a few loads of arguments into other registers
/// ([`dynprobe_arch::native::decode::syscall_numbers`]); `None` when no such number, or
/// several that disagree, can be read there. Allocates nothing.
pub(crate) fn syscall_number_before(rip: u64) -> Option<i64> {
    use dynprobe_arch::native::decode::{syscall_numbers, SYSCALL_NUMBER_REACH};
    let mut bytes = [0u8; SYSCALL_NUMBER_REACH];
    let syscall = rip.wrapping_sub(2);
    // The code may start less than the full reach before the call (a mapping's first page).
    let reach =
        [SYSCALL_NUMBER_REACH, 16, 8].into_iter().find(|&n| read(syscall.wrapping_sub(n as u64), &mut bytes[..n]))?;
    let mut numbers = syscall_numbers(&bytes[..reach]);
    let number = numbers.next()?;
    numbers.all(|other| other == number).then_some(i64::from(number))
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

/// `CLOCK_MONOTONIC` in nanoseconds, through the vDSO's own `__vdso_clock_gettime`
/// (vdso(7)) once [`vdso_clock_gettime`] has found it, the system call before (or where
/// there is no vDSO) — never the C library's `clock_gettime`, which the program may be
/// probing and which a hit path must therefore not call. Takes no lock, allocates nothing,
/// never touches `errno`, and calls the vDSO through one gate ([`call_vdso_clock_gettime`])
/// whose target a light detour's proof checks (the kernel builds the vDSO without SSE:
/// arch/x86/entry/vdso/Makefile).
pub fn monotonic_ns() -> u64 {
    let mut ts = std::mem::MaybeUninit::<libc::timespec>::uninit();
    let ts = ts.as_mut_ptr();
    // Through the pointer, one word at a time: a struct literal, or a move of the struct, is
    // compiled to vector stores, which this hot path must not contain (a light detour saves
    // no vector register).
    // SAFETY: field pointers of the local; both fields are written before they are read.
    unsafe {
        std::ptr::write_volatile(std::ptr::addr_of_mut!((*ts).tv_sec), 0);
        std::ptr::write_volatile(std::ptr::addr_of_mut!((*ts).tv_nsec), 0);
    }
    let function = VDSO_CLOCK_GETTIME.load(std::sync::atomic::Ordering::Acquire);
    let done = function > 1 && call_vdso_clock_gettime(function, libc::CLOCK_MONOTONIC, ts) == 0;
    if !done {
        // SAFETY: clock_gettime(CLOCK_MONOTONIC, ts) writes the local `ts`.
        unsafe { syscall4(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC as u64, ts as u64, 0, 0) };
    }
    // SAFETY: as above, initialized.
    let (sec, nsec) = unsafe {
        (
            std::ptr::read_volatile(std::ptr::addr_of!((*ts).tv_sec)),
            std::ptr::read_volatile(std::ptr::addr_of!((*ts).tv_nsec)),
        )
    };
    (sec as u64).wrapping_mul(1_000_000_000).wrapping_add(nsec as u64)
}

/// The vDSO's `__vdso_clock_gettime`: 0 until looked up, 1 when there is none.
static VDSO_CLOCK_GETTIME: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The only place [`monotonic_ns`] calls the vDSO from: a proof that a hit path leaves the
/// vector state alone stops here and checks the vDSO's function itself. Never inlined: its
/// address is what the proof knows.
#[inline(never)]
pub fn call_vdso_clock_gettime(function: usize, clock: libc::clockid_t, ts: *mut libc::timespec) -> i32 {
    // SAFETY: `function` is the vDSO's `__vdso_clock_gettime`, whose C signature this is.
    let f: extern "C" fn(libc::clockid_t, *mut libc::timespec) -> i32 = unsafe { std::mem::transmute(function) };
    f(clock, ts)
}

/// The address of the vDSO's `__vdso_clock_gettime`, looked up in the vDSO's dynamic
/// symbol table on the first call (a cold path: call it before the hot paths need the
/// clock); `None` without a vDSO. From then on [`monotonic_ns`] calls it.
pub fn vdso_clock_gettime() -> Option<usize> {
    use std::sync::atomic::Ordering;
    if VDSO_CLOCK_GETTIME.load(Ordering::Acquire) == 0 {
        let found = find_vdso_symbol(b"__vdso_clock_gettime").unwrap_or(1);
        VDSO_CLOCK_GETTIME.store(found, Ordering::Release);
    }
    Some(VDSO_CLOCK_GETTIME.load(Ordering::Acquire)).filter(|&f| f > 1)
}

/// The address of the vDSO's dynamic symbol `name`, from the image the kernel maps at
/// `getauxval(AT_SYSINFO_EHDR)` (vdso(7)): its program headers give the load bias and the
/// dynamic section, whose `DT_HASH` gives the number of symbols.
fn find_vdso_symbol(name: &[u8]) -> Option<usize> {
    // SAFETY: getauxval only reads the auxiliary vector.
    let base = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
    if base == 0 {
        return None;
    }
    // SAFETY: the kernel maps the whole vDSO image at `base` for the life of the process:
    // every read below is of its ELF headers and tables, inside the image, as elf(5) lays
    // them out (offsets checked against the image's size where they come from the file).
    unsafe {
        let ehdr = &*(base as *const libc::Elf64_Ehdr);
        let phdrs =
            std::slice::from_raw_parts((base + ehdr.e_phoff as usize) as *const libc::Elf64_Phdr, ehdr.e_phnum.into());
        let load = phdrs.iter().find(|p| p.p_type == libc::PT_LOAD)?;
        let bias = base.wrapping_sub(load.p_vaddr as usize);
        let size = load.p_memsz as usize;
        let dynamic = phdrs.iter().find(|p| p.p_type == libc::PT_DYNAMIC)?;
        let inside = |addr: usize| addr.wrapping_sub(base) < size;
        // Elf64_Dyn: { d_tag: i64, d_un: u64 }; DT_NULL 0, DT_HASH 4, DT_STRTAB 5, DT_SYMTAB 6.
        let (mut symtab, mut strtab, mut hash) = (0, 0, 0);
        let mut dynent = bias.wrapping_add(dynamic.p_vaddr as usize) as *const [u64; 2];
        while inside(dynent as usize) && (*dynent)[0] != 0 {
            let value = bias.wrapping_add((*dynent)[1] as usize);
            match (*dynent)[0] {
                4 => hash = value,
                5 => strtab = value,
                6 => symtab = value,
                _ => {}
            }
            dynent = dynent.add(1);
        }
        if !(inside(symtab) && inside(strtab) && inside(hash)) {
            return None;
        }
        let count = *(hash as *const u32).add(1) as usize;
        let symbols = std::slice::from_raw_parts(symtab as *const libc::Elf64_Sym, count);
        symbols.iter().find_map(|sym| {
            let at = strtab + sym.st_name as usize;
            let matches = inside(at + name.len())
                && std::slice::from_raw_parts(at as *const u8, name.len() + 1) == [name, b"\0"].concat().as_slice();
            (matches && sym.st_shndx != 0 && inside(bias.wrapping_add(sym.st_value as usize)))
                .then(|| bias.wrapping_add(sym.st_value as usize))
        })
    }
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

/// The calling thread's thread pointer: the word at `%fs:0`, which the x86-64 TLS ABI
/// sets to the thread control block's own address in every thread the C library made.
pub fn thread_pointer() -> u64 {
    let tp: u64;
    // SAFETY: a read of `%fs:0`, set for every thread (see above); nothing is written.
    unsafe { std::arch::asm!("mov {}, qword ptr fs:0", out(reg) tp, options(nostack, readonly, preserves_flags)) };
    tp
}

/// Sleeps while `*word == expected` (or until a signal / spurious wake; callers loop).
/// No descriptor: nothing the program could close under the caller.
pub fn futex_wait(word: &core::sync::atomic::AtomicU32, expected: u32) {
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
pub fn futex_wake_all(word: &core::sync::atomic::AtomicU32) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_reads_the_vdso_once_found_and_agrees_with_the_system_call() {
        let before = monotonic_ns();
        assert!(vdso_clock_gettime().is_some(), "this x86-64 Linux maps a vDSO with __vdso_clock_gettime");
        let through_vdso = monotonic_ns();
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes the local `ts`.
        unsafe { syscall4(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC as u64, &mut ts as *mut _ as u64, 0, 0) };
        let after = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        assert!(before <= through_vdso && through_vdso <= after, "{before} {through_vdso} {after}");
    }
}
