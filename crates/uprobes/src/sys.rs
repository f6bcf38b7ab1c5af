//! The thin system-call wrappers the tracer's event loop needs on every hit (wait, registers,
//! continue) and around it (listen, event messages, memory through `/proc/PID/mem`).
//! Attaching, with its diagnostics, and remote system calls come from `dynprobe-remote`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The general registers as `PTRACE_GETREGS` gives them.
pub(crate) type UserRegs = libc::user_regs_struct;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `ptrace(request, tid, addr, data)` with no output.
fn request(request: libc::c_uint, tid: i32, addr: usize, data: usize) -> io::Result<()> {
    // SAFETY: the requests passed here take integers (not pointers) as addr and data, or
    // pointers the callers own for the call's duration.
    check(unsafe { libc::ptrace(request, tid, addr, data) }).map(drop)
}

/// Resumes a stopped tracee, delivering `signal` (0 for none).
pub(crate) fn cont(tid: i32, signal: i32) -> io::Result<()> {
    request(libc::PTRACE_CONT, tid, 0, signal as usize)
}

/// Lets a tracee in group-stop stay stopped without being in a ptrace-stop, so that job
/// control (a later `SIGCONT`) works while it is traced.
pub(crate) fn listen(tid: i32) -> io::Result<()> {
    request(libc::PTRACE_LISTEN, tid, 0, 0)
}

/// Asks a running tracee to stop (`PTRACE_EVENT_STOP`).
pub(crate) fn interrupt(tid: i32) -> io::Result<()> {
    request(libc::PTRACE_INTERRUPT, tid, 0, 0)
}

/// Detaches a stopped tracee, delivering `signal` (0 for none).
pub(crate) fn detach(tid: i32, signal: i32) -> io::Result<()> {
    request(libc::PTRACE_DETACH, tid, 0, signal as usize)
}

/// The registers of a stopped tracee.
pub(crate) fn get_regs(tid: i32) -> io::Result<UserRegs> {
    // SAFETY: user_regs_struct is plain integers; all-zero is valid.
    let mut regs: UserRegs = unsafe { std::mem::zeroed() };
    request(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut UserRegs as usize)?;
    Ok(regs)
}

/// Sets the registers of a stopped tracee.
pub(crate) fn set_regs(tid: i32, regs: &UserRegs) -> io::Result<()> {
    request(libc::PTRACE_SETREGS, tid, 0, regs as *const UserRegs as usize)
}

/// The `si_code` of the signal a tracee is stopped for.
pub(crate) fn siginfo_code(tid: i32) -> io::Result<i32> {
    // SAFETY: siginfo_t is plain data; all-zero is valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    request(libc::PTRACE_GETSIGINFO, tid, 0, &mut info as *mut libc::siginfo_t as usize)?;
    Ok(info.si_code)
}

/// The message of the last ptrace event (the new thread's id at a clone event).
pub(crate) fn event_msg(tid: i32) -> io::Result<u64> {
    let mut msg: libc::c_ulong = 0;
    request(libc::PTRACE_GETEVENTMSG, tid, 0, &mut msg as *mut libc::c_ulong as usize)?;
    Ok(msg)
}

/// `waitpid(-1, __WALL | flags)`: the next tracee state change, `None` with `WNOHANG` when
/// there is none. `EINTR` is returned as an error for the caller to look at its flags.
pub(crate) fn wait_any(nohang: bool) -> io::Result<Option<(i32, i32)>> {
    let mut status = 0;
    let flags = libc::__WALL | if nohang { libc::WNOHANG } else { 0 };
    // SAFETY: `status` is a valid out-pointer.
    let tid = unsafe { libc::waitpid(-1, &mut status, flags) };
    match tid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        tid => Ok(Some((tid, status))),
    }
}

/// Whether `signal` is pending for thread `tid` alone (`SigPnd` of its status file).
pub(crate) fn thread_signal_pending(pid: i32, tid: i32, signal: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigPnd:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// The target's memory through `/proc/PID/mem`, which writes even read-only text (as a
/// debugger's breakpoints do).
pub(crate) struct Mem {
    file: File,
    pid: i32,
}

impl Mem {
    /// Opens `/proc/PID/mem` for reading and writing.
    pub fn open(pid: i32) -> io::Result<Mem> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(format!("/proc/{pid}/mem"))?;
        Ok(Mem { file, pid })
    }

    /// The process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Reads `len` bytes at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.file.read_exact_at(&mut buf, addr)?;
        Ok(buf)
    }

    /// Reads a 64-bit word at `addr`.
    pub fn read_u64(&self, addr: u64) -> io::Result<u64> {
        let mut buf = [0; 8];
        self.file.read_exact_at(&mut buf, addr)?;
        Ok(u64::from_le_bytes(buf))
    }

    /// Writes `bytes` at `addr`.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all_at(bytes, addr)
    }

    /// Writes `new` at `addr` if `expected` is there, else fails naming what was found:
    /// the "verify, then modify" rule of the text layer.
    pub fn replace(&self, addr: u64, expected: &[u8], new: &[u8]) -> io::Result<()> {
        let found = self.read(addr, expected.len())?;
        if found != expected {
            return Err(io::Error::other(format!(
                "expected {expected:02x?} at {addr:#x} but found {found:02x?}; leaving it alone"
            )));
        }
        self.write(addr, new)
    }
}

/// Seizes `tid` (`PTRACE_SEIZE`) with `PTRACE_O_*` `options`: our own child, which needs
/// none of the attach diagnostics of `dynprobe-remote`.
pub(crate) fn seize(tid: i32, options: i32) -> io::Result<()> {
    request(libc::PTRACE_SEIZE, tid, 0, options as usize)
}

/// Executes one instruction of a stopped tracee.
pub(crate) fn single_step(tid: i32, signal: i32) -> io::Result<()> {
    request(libc::PTRACE_SINGLESTEP, tid, 0, signal as usize)
}

/// `waitpid(tid, __WALL)`, retried on `EINTR`.
pub(crate) fn wait_thread(tid: i32) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        if unsafe { libc::waitpid(tid, &mut status, libc::__WALL) } == tid {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
