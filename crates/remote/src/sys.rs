//! Thin, safe wrappers over the `ptrace`, `waitpid`, `tgkill` and `process_vm_readv` system
//! calls: the raw layer under [`Tracee`](crate::Tracee), public for tracers that run their
//! own event loop (as `dynprobe-uprobes` does, one blocking `waitpid(-1)` per hit) and need
//! none of the `Tracee`'s bookkeeping.
//!
//! Each wrapper returns the raw `errno` as an [`io::Error`]; callers turn it into an error
//! that names the cause. Every request must come from the thread that seized the tracee
//! (Linux makes that *thread* the tracer). The thread ids are the kernel's (`gettid`).

use std::io;

use crate::Regs;

/// `NT_X86_XSTATE`: the `PTRACE_GETREGSET` note of the whole XSAVE area (x87, SSE, AVX, …).
const NT_X86_XSTATE: libc::c_int = 0x202;

/// The largest XSAVE area we accept; the kernel shortens the buffer to the real size
/// (a few KiB with AVX-512, up to ~11 KiB with AMX tiles).
const XSTATE_MAX: usize = 16 * 1024;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `ptrace(request, tid, addr, data)` for requests whose result is only success or `errno`.
fn request(request: libc::c_uint, tid: i32, addr: usize, data: usize) -> io::Result<()> {
    // SAFETY: every caller passes either plain integers or a pointer to a live buffer of
    // the size the request writes or reads; ptrace does not keep the pointers.
    check(unsafe { libc::ptrace(request, tid, addr, data) }).map(drop)
}

/// `PTRACE_SEIZE` with `options` (`PTRACE_O_*`): the thread keeps running.
pub fn seize(tid: i32, options: i32) -> io::Result<()> {
    request(libc::PTRACE_SEIZE, tid, 0, options as usize)
}

/// `PTRACE_INTERRUPT`: the thread stops with `PTRACE_EVENT_STOP` soon after.
pub fn interrupt(tid: i32) -> io::Result<()> {
    request(libc::PTRACE_INTERRUPT, tid, 0, 0)
}

/// `PTRACE_LISTEN`: a thread in a group-stop stays stopped without being in a ptrace-stop,
/// so that job control (a later `SIGCONT`) resumes it while it is traced; it reports its
/// next stop as from running.
pub fn listen(tid: i32) -> io::Result<()> {
    request(libc::PTRACE_LISTEN, tid, 0, 0)
}

/// `PTRACE_CONT`, delivering `signal` if the thread is in a signal-delivery-stop.
pub fn cont(tid: i32, signal: i32) -> io::Result<()> {
    request(libc::PTRACE_CONT, tid, 0, signal as usize)
}

/// `PTRACE_SYSCALL`: resumes the thread until its next system call entry or exit
/// (a syscall-stop, ptrace(2)), delivering `signal` like [`cont`].
pub fn syscall_resume(tid: i32, signal: i32) -> io::Result<()> {
    request(libc::PTRACE_SYSCALL, tid, 0, signal as usize)
}

/// `PTRACE_SETOPTIONS`: replaces the thread's `PTRACE_O_*` options.
pub fn set_options(tid: i32, options: i32) -> io::Result<()> {
    request(libc::PTRACE_SETOPTIONS, tid, 0, options as usize)
}

/// `PTRACE_SINGLESTEP`, delivering `signal` like [`cont`].
pub fn single_step(tid: i32, signal: i32) -> io::Result<()> {
    request(libc::PTRACE_SINGLESTEP, tid, 0, signal as usize)
}

/// `PTRACE_DETACH`, delivering `signal` like [`cont`].
pub fn detach(tid: i32, signal: i32) -> io::Result<()> {
    request(libc::PTRACE_DETACH, tid, 0, signal as usize)
}

/// `PTRACE_GETREGS`.
pub fn get_regs(tid: i32) -> io::Result<Regs> {
    // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
    let mut regs: Regs = unsafe { std::mem::zeroed() };
    request(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut Regs as usize)?;
    Ok(regs)
}

/// `PTRACE_SETREGS`.
pub fn set_regs(tid: i32, regs: &Regs) -> io::Result<()> {
    request(libc::PTRACE_SETREGS, tid, 0, regs as *const Regs as usize)
}

/// `PTRACE_GETFPREGS`: the x87 and SSE state (the FXSAVE layout: xmm0–15 in
/// `xmm_space`, 16 bytes each, `<sys/user.h>`).
pub fn get_fpregs(tid: i32) -> io::Result<libc::user_fpregs_struct> {
    // SAFETY: user_fpregs_struct is plain integers; all-zero is a valid value.
    let mut regs: libc::user_fpregs_struct = unsafe { std::mem::zeroed() };
    request(libc::PTRACE_GETFPREGS, tid, 0, &mut regs as *mut libc::user_fpregs_struct as usize)?;
    Ok(regs)
}

/// The thread's whole XSAVE area (`PTRACE_GETREGSET NT_X86_XSTATE`), as many bytes as the
/// kernel filled.
pub fn get_xstate(tid: i32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    request(libc::PTRACE_GETREGSET, tid, NT_X86_XSTATE as usize, &mut iov as *mut libc::iovec as usize)?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// Writes back an XSAVE area read by [`get_xstate`].
pub fn set_xstate(tid: i32, xstate: &[u8]) -> io::Result<()> {
    // The kernel only reads through the pointer for SETREGSET.
    let mut iov = libc::iovec { iov_base: xstate.as_ptr() as *mut libc::c_void, iov_len: xstate.len() };
    request(libc::PTRACE_SETREGSET, tid, NT_X86_XSTATE as usize, &mut iov as *mut libc::iovec as usize)
}

/// `PTRACE_GETSIGINFO`: the signal of a signal-delivery-stop (fails with `EINVAL` in a
/// group-stop).
pub fn get_siginfo(tid: i32) -> io::Result<libc::siginfo_t> {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    request(libc::PTRACE_GETSIGINFO, tid, 0, &mut info as *mut libc::siginfo_t as usize)?;
    Ok(info)
}

/// `PTRACE_SETSIGINFO`: the signal the thread will be given if resumed with its number.
pub fn set_siginfo(tid: i32, info: &libc::siginfo_t) -> io::Result<()> {
    request(libc::PTRACE_SETSIGINFO, tid, 0, info as *const libc::siginfo_t as usize)
}

/// `PTRACE_SECCOMP_GET_FILTER`: the stopped thread's seccomp filter `index` (0: the one
/// installed first — `seccomp_get_filter` in kernel/seccomp.c counts from the oldest, whatever
/// ptrace(2) says) as the 8-byte `struct sock_filter` instructions of its classic BPF
/// program. Needs `CAP_SYS_ADMIN` (`EACCES` without), and fails with `ENOENT` past the last
/// filter and `EINVAL` when the thread has none (see ptrace(2)).
pub fn seccomp_filter(tid: i32, index: usize) -> io::Result<Vec<[u8; 8]>> {
    const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
    // SAFETY: a null buffer makes the kernel only count the instructions.
    let count = check(unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, 0usize) })? as usize;
    let mut insns = vec![[0u8; 8]; count];
    // SAFETY: the buffer holds `count` instructions, what the kernel writes for a filter of
    // that length (filters never change once installed).
    let written =
        check(unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, insns.as_mut_ptr() as usize) })? as usize;
    insns.truncate(written);
    Ok(insns)
}

/// `PTRACE_GETEVENTMSG`: the new thread's tid of a clone event, the exit status of an exit
/// event, the former tid of an exec event.
pub fn event_msg(tid: i32) -> io::Result<u64> {
    let mut msg: libc::c_ulong = 0;
    request(libc::PTRACE_GETEVENTMSG, tid, 0, &mut msg as *mut libc::c_ulong as usize)?;
    Ok(msg)
}

/// `waitpid(pid, __WALL)`, with `WNOHANG` if `nohang`: `Some((tid, status))` of the next
/// state change of tracee `pid` (-1: of any child or tracee), `None` with `WNOHANG` when
/// there is none. `EINTR` is returned as an error, for a caller that looks at its flags
/// when a signal interrupts the wait.
pub fn waitpid(pid: i32, nohang: bool) -> io::Result<Option<(i32, i32)>> {
    let mut status = 0;
    let flags = libc::__WALL | if nohang { libc::WNOHANG } else { 0 };
    // SAFETY: `status` is a valid out-pointer for the duration of the call.
    let ret = unsafe { libc::waitpid(pid, &mut status, flags) };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        tid => Ok(Some((tid, status))),
    }
}

/// `waitpid(tid, __WALL)`, blocking and retried on `EINTR`: the status of thread `tid`'s
/// next state change.
pub fn wait_thread(tid: i32) -> io::Result<i32> {
    loop {
        match waitpid(tid, false) {
            Ok(Some((_, status))) => return Ok(status),
            // Without WNOHANG waitpid does not return 0; retry as for EINTR if it ever did.
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The calling thread's id: the tracer of every thread it seized, and of every thread those
/// create under `PTRACE_O_TRACECLONE`.
pub fn gettid() -> i32 {
    // SAFETY: a plain system call without arguments; it cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// `tgkill(pid, tid, signal)`.
pub fn tgkill(pid: i32, tid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: a plain system call with integer arguments.
    check(unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) }).map(drop)
}

/// `rt_tgsigqueueinfo(pid, tid, signal, info)`: queues a signal with a whole `siginfo`
/// (the kernel refuses `si_code >= 0` and `SI_TKILL` from another process).
pub fn rt_tgsigqueueinfo(pid: i32, tid: i32, info: &libc::siginfo_t) -> io::Result<()> {
    // SAFETY: `info` points to a whole siginfo_t that the kernel only reads.
    check(unsafe {
        libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, info.si_signo, info as *const libc::siginfo_t)
    })
    .map(drop)
}

/// `process_vm_readv` of `buf.len()` bytes at `addr` in process `pid`; the number of bytes
/// read (fewer when the range runs into an unmapped or unreadable page).
pub fn read_vm(pid: i32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: `local` covers exactly `buf`, which outlives the call; the remote iovec is
    // only interpreted in the other process's address space.
    let ret = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}
