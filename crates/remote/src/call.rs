//! Calling a function, or making a system call, on a stopped thread of a [`Tracee`].
//!
//! The thread's registers and vector state are saved, changed to make the call, and restored
//! afterwards, so the program continues exactly where it was stopped; an interrupted system
//! call of its own is restarted (or fails with `EINTR`) as it would have been without us.
//!
//! The stack of a call (the thread's own, below its red zone):
//!
//! ```text
//!   saved rsp ──► ... program's frames ...
//!                 128-byte red zone          (untouched: a leaf function may keep data there)
//!                 Arg::Bytes / Arg::Str data (each 16-byte aligned)
//!                 return address: the stub   ◄── rsp at the call, ≡ 8 (mod 16) as after a `call`
//! ```
//!
//! # Surviving the tracer's death
//!
//! The function returns into a *return stub* (`dynprobe_arch::native::return_stub`) that
//! puts back every register the thread had before the call and jumps to where it was
//! stopped: if the tracer is killed during the call — the kernel then detaches the thread
//! (`exit_ptrace`, kernel/ptrace.c) and it runs on untraced — the function returns into the
//! stub, which resumes the program exactly as the kernel would have (an interrupted
//! blocking system call restarted), where a return to address 0 killed it with `SIGSEGV`.
//! Every moment is covered: a tracer killed while the thread sits in a stop of ours,
//! before or after its registers were put back, leaves it to run either into the stub or
//! from where it was, with its own registers.
//!
//! Nothing is mapped for it, so no remote `mmap` — a system call that a tracer dying
//! during it would leave with our registers and nowhere to return — comes first:
//! - the registers and XSAVE image go into a frame on the thread's own stack, between its
//!   red zone and the call's arguments (above anything the function writes);
//! - the code (under 256 bytes) goes into the unused end of the last page of a module's
//!   executable segment — the bytes between the segment's end (`p_vaddr + p_memsz` of its
//!   `PT_LOAD`, read from the ELF headers in the target's memory) and the page's end,
//!   which the kernel maps executable with the segment but no code addresses (a write
//!   through `/proc/PID/mem` gives the process a private copy of that page, as a
//!   debugger's breakpoint does). Their original bytes are put back by
//!   [`Tracee::release_return_stub`], or when the tracee is detached; a tracer that died
//!   leaves the stub there, unreachable.
//!
//! A live tracer must see the return without a trap that would kill an untraced thread: it
//! resumes the call with `PTRACE_SYSCALL` (with `PTRACE_O_TRACESYSGOOD`), and the stub's
//! first act is `getpid()` — harmless, and allowed by any seccomp filter that lets the
//! program `dlopen` (an invalid number, `-ENOSYS` for us, would kill the program under a
//! filter that kills on unknown calls). Its entry stop at the stub's address, with `rsp`
//! just above the return address, is the end of the call. The tracer then asks for an
//! interrupt stop (or, if the thread was stopped for a signal, sends it that signal again)
//! and restores the registers there: a stop inside the kernel's signal handling, where a
//! restored interrupted system call is restarted as from the stop the thread came from (a
//! syscall-stop is not such a place). The cost is two stops per system call the function
//! makes and two at the end: `dlopen` of the agent made 26 system calls here, its entry 14.
//!
//! What is still lost with a killed tracer: a signal it held back during the call (see
//! [`Tracee::call_with`]), and the signal of the stop the thread was in, if it was one.
//! And its stub stays where it was written, for good (nobody can tell when its thread has
//! come back through it): the next tracer takes the next [`STUB_MAX`] bytes, and once no
//! segment end has room left, calls are refused with [`CallError::NoStubSite`] — a tail
//! averages 2 KiB, so each module leaves room for a few such deaths.
//! [`Tracee::syscall`] single-steps a `syscall` instruction of the process and has no such
//! protection; the calls do not use it.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use dynprobe_arch::native::return_stub::{
    build_return_stub, Resume as StubResume, FRAME_ALIGN, NOTIFY_SYSCALL, STUB_MAX, STUB_START, XSAVE_OFFSET,
};
use dynprobe_arch::native::RED_ZONE;

use crate::error::Error;
use crate::memory::Memory;
use crate::tracee::{resend, Regs, Resume, Stop, Tracee};

/// `orig_rax` = -1: "not in a system call", so the kernel does not restart the program's
/// interrupted system call into our code.
const NO_SYSCALL: u64 = u64::MAX;
/// `eflags` bits a function must not start with: the direction flag (the ABI wants it
/// clear) and the trap flag (a single-step in progress).
const EFLAGS_DF_TF: u64 = 0x400 | 0x100;
/// The kernel's "restart me" results of a system call interrupted by a stop
/// (include/linux/errno.h): `ERESTARTSYS`, `ERESTARTNOINTR`, `ERESTARTNOHAND` restart the
/// same call; `ERESTART_RESTARTBLOCK` goes through `restart_syscall`.
const ERESTART_SAME: [i64; 3] = [-512, -513, -514];
const ERESTART_RESTARTBLOCK: i64 = -516;
const PAGE: u64 = 4096;

/// Where the return stub is written, and what was there (module documentation).
#[derive(Debug)]
pub(crate) struct StubSite {
    addr: u64,
    original: Vec<u8>,
    /// The stub last written there.
    written: Option<Vec<u8>>,
    /// Held while the site is ours: see [`lock_stub_sites`].
    _lock: OwnedFd,
}

/// How long a tracer waits for another one calling into the same process.
const STUB_LOCK_WAIT: Duration = Duration::from_secs(10);

/// Takes the per-process lock on stub sites: an abstract Unix socket address
/// (`unix(7)`) bound by one tracer at a time, and released with the descriptor — also by a
/// tracer's death, so nothing stale is left behind. Two tracers calling into one process
/// at once would otherwise find the same free site, and the first to finish would put the
/// original bytes back under the other's call.
fn lock_stub_sites(pid: i32) -> Result<OwnedFd, CallError> {
    let deadline = Instant::now() + STUB_LOCK_WAIT;
    let name = format!("dynprobe-stub-{pid}");
    loop {
        // SAFETY: plain socket creation; the descriptor is owned right after.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd == -1 {
            return Err(CallError::Tracee(Error::Memory {
                op: "socket for the stub lock",
                addr: 0,
                len: 0,
                error: io::Error::last_os_error(),
            }));
        }
        // SAFETY: a new descriptor, ours alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        // sun_path[0] stays 0: the abstract namespace.
        for (dst, &src) in addr.sun_path[1..].iter_mut().zip(name.as_bytes()) {
            *dst = src as libc::c_char;
        }
        let len = (std::mem::size_of::<libc::sa_family_t>() + 1 + name.len()) as libc::socklen_t;
        // SAFETY: `addr` is an initialized sockaddr_un, `len` bytes of it used.
        if unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) } == 0 {
            return Ok(fd);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EADDRINUSE) || Instant::now() >= deadline {
            return Err(CallError::StubBusy { pid, error });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An argument of [`Tracee::call_with`].
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    /// A value in the argument register.
    Value(u64),
    /// Bytes copied onto the thread's stack below its red zone; the argument is their
    /// address. Valid only during the call.
    Bytes(&'a [u8]),
    /// A string copied onto the stack with a terminating NUL; the argument is its address.
    Str(&'a str),
}

/// Why a remote call or system call failed. The thread's registers are restored in every
/// case where it still exists.
#[derive(Debug)]
#[non_exhaustive]
pub enum CallError {
    /// More than the six register arguments of the SysV ABI.
    TooManyArgs {
        /// How many were given.
        count: usize,
    },
    /// The thread is stopped inside a system call (a `PTRACE_EVENT_*` stop): changing its
    /// registers there would lose that system call's result. Resume it to a signal or
    /// interrupt stop first.
    BadStop {
        /// The thread.
        tid: i32,
        /// Its stop.
        stop: Stop,
    },
    /// The function did not return in time. A [`call_with`](Tracee::call_with) is left to
    /// finish on its own (the thread resumed, to come back through the return stub, which
    /// stays): stopping it there would keep whatever it holds — the loader's lock, in
    /// `dlopen` — held for good. A system call is stopped and its registers restored.
    Timeout {
        /// The thread.
        tid: i32,
        /// Where it was when stopped.
        rip: u64,
        /// The time allowed.
        after: Duration,
    },
    /// The function crashed: a fault signal at `rip`.
    Faulted {
        /// The thread.
        tid: i32,
        /// `SIGSEGV`, `SIGBUS`, `SIGILL` or `SIGFPE`.
        signal: i32,
        /// The faulting address (`si_addr`).
        addr: u64,
        /// The instruction.
        rip: u64,
    },
    /// The thread stopped in a way a call cannot go on from (an exec).
    Unexpected {
        /// The thread.
        tid: i32,
        /// The stop.
        stop: Stop,
    },
    /// No `syscall` instruction was found in the vdso or any executable mapping.
    NoSyscallInstruction {
        /// The process.
        pid: i32,
    },
    /// The remote system call returned an error.
    Syscall {
        /// Its name.
        name: &'static str,
        /// The error (`errno`).
        error: io::Error,
    },
    /// The return stub could not be built (a bug: it is fixed code).
    Stub {
        /// The encoder's message.
        why: String,
    },
    /// No module of the process has room for the return stub at the end of its code.
    NoStubSite {
        /// The process.
        pid: i32,
    },
    /// Another dynprobe kept calling into the process (its stub lock held) for longer than
    /// a tracer waits.
    StubBusy {
        /// The process.
        pid: i32,
        /// The last `bind` error.
        error: io::Error,
    },
    /// Controlling the thread failed (it exited, a ptrace request failed, …).
    Tracee(Error),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::TooManyArgs { count } => write!(f, "{count} arguments: a remote call takes at most 6"),
            CallError::BadStop { tid, stop } => {
                write!(f, "thread {tid} is stopped inside a system call ({stop:?}); no call can be made there")
            }
            CallError::Timeout { tid, rip, after } => write!(
                f,
                "the call on thread {tid} did not return within {:.1} s (it was at {rip:#x}); it is left to \
                 finish on its own and return to where the thread was",
                after.as_secs_f64()
            ),
            CallError::Faulted { tid, signal, addr, rip } => write!(
                f,
                "the call on thread {tid} crashed: {} at {rip:#x} (address {addr:#x}); registers restored",
                signal_name(*signal)
            ),
            CallError::Unexpected { tid, stop } => {
                write!(f, "thread {tid} stopped unexpectedly during a call: {stop:?}")
            }
            CallError::NoSyscallInstruction { pid } => {
                write!(f, "no `syscall` instruction found in the vdso or the code of process {pid}")
            }
            CallError::Syscall { name, error } => write!(f, "remote {name} failed: {error}"),
            CallError::Stub { why } => write!(f, "cannot build the return stub of a remote call: {why}"),
            CallError::StubBusy { pid, error } => write!(
                f,
                "another dynprobe is calling into process {pid} (its lock on the return stubs is held: {error}); \
                 try again when it is done"
            ),
            CallError::NoStubSite { pid } => write!(
                f,
                "no executable segment of process {pid} ends {STUB_MAX} bytes or more before its page does: no room \
                 for the return stub of a remote call"
            ),
            CallError::Tracee(e) => e.fmt(f),
        }
    }
}

/// The error this one wraps, where it wraps one (its message is part of this one's
/// `Display` too, which is complete on its own).
impl std::error::Error for CallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CallError::Syscall { error, .. } | CallError::StubBusy { error, .. } => Some(error),
            CallError::Tracee(e) => Some(e),
            _ => None,
        }
    }
}

impl From<Error> for CallError {
    fn from(e: Error) -> CallError {
        CallError::Tracee(e)
    }
}

/// What a call changes and puts back.
struct Saved {
    regs: Regs,
    xstate: Vec<u8>,
    stop: Stop,
    info: Option<libc::siginfo_t>,
}

impl Tracee {
    /// Calls `func(args…)` on stopped thread `tid` and returns its `rax`; see
    /// [`call_with`](Self::call_with).
    pub fn call(&mut self, tid: i32, func: u64, args: &[u64], timeout: Duration) -> Result<u64, CallError> {
        let args: Vec<Arg> = args.iter().map(|&a| Arg::Value(a)).collect();
        self.call_with(tid, func, &args, timeout)
    }

    /// Calls `func(args…)` (SysV ABI, at most 6 integer/pointer arguments) on stopped
    /// thread `tid` and returns its `rax`.
    ///
    /// The thread runs the function on its own stack, below the red zone. Other threads
    /// are not touched (seized ones stay as they are, the others keep running), so locks
    /// they hold get released. Signals arriving for the thread during the call are held
    /// and delivered when the caller resumes it; a `SIGTRAP` of a breakpoint planted in the
    /// process (the agent's probes) is delivered at once, since its handler must run.
    ///
    /// Afterwards the general registers, the vector state, and the thread's stop (with
    /// its `siginfo`) are as before, whatever happened. If the thread was blocked in a
    /// system call when stopped, resuming it restarts that call (or makes it fail with
    /// `EINTR`) exactly as without the remote call.
    ///
    /// The return stub (module documentation) is written on the first call; its original
    /// bytes are put back by [`release_return_stub`](Self::release_return_stub) or when
    /// the tracee is detached.
    pub fn call_with(&mut self, tid: i32, func: u64, args: &[Arg], timeout: Duration) -> Result<u64, CallError> {
        if args.len() > 6 {
            return Err(CallError::TooManyArgs { count: args.len() });
        }
        let saved = self.save(tid)?;
        let stub_at = self.stub_site()?;
        // The frame and the stub first: from the moment the registers below are set, a
        // tracer killed leaves the thread to run the call and come back through them.
        let resume = kernel_resume(&saved.regs);
        let top = saved.regs.rsp.wrapping_sub(RED_ZONE);
        let frame = top.wrapping_sub(XSAVE_OFFSET + saved.xstate.len() as u64) & !(FRAME_ALIGN - 1);
        self.write_memory(frame, &regs_bytes(&resume))?;
        self.write_memory(frame + XSAVE_OFFSET, &saved.xstate)?;
        let stub = build_return_stub(stub_at, &StubResume { frame, rcx: resume.rcx, rip: resume.rip })
            .map_err(|e| CallError::Stub { why: e.to_string() })?;
        self.write_stub(&stub.code)?;
        let mut regs = saved.regs;
        let mut sp = frame;
        let mut values = [0u64; 6];
        for (value, arg) in values.iter_mut().zip(args) {
            *value = match *arg {
                Arg::Value(v) => v,
                Arg::Bytes(bytes) => self.push(&mut sp, bytes, false)?,
                Arg::Str(s) => self.push(&mut sp, s.as_bytes(), true)?,
            };
        }
        // As right after a `call`: the return address at a 16-byte boundary minus 8.
        sp = (sp & !15) - 8;
        self.write_memory(sp, &stub_at.to_le_bytes())?;
        [regs.rdi, regs.rsi, regs.rdx, regs.rcx, regs.r8, regs.r9] = values;
        regs.rsp = sp;
        regs.rip = func;
        // A variadic callee reads the number of vector registers used from `al`.
        regs.rax = 0;
        regs.orig_rax = NO_SYSCALL;
        regs.eflags &= !EFLAGS_DF_TF;
        // Syscall-stops marked apart from a SIGTRAP (ptrace(2), PTRACE_O_TRACESYSGOOD), for
        // this call only.
        set_options(tid, self.options.bits() | libc::PTRACE_O_TRACESYSGOOD)?;
        let until = Until::Stub { notified: stub_at + stub.notified, sp };
        let result = self.run(tid, &regs, until, &saved, timeout);
        if let Err(CallError::Timeout { .. }) = result {
            self.let_call_finish(tid)?;
            return result;
        }
        let result = self.finish(tid, &saved, result);
        match (result, set_options(tid, self.options.bits())) {
            (Ok(_), Err(e)) => Err(e),
            (result, _) => result,
        }
    }

    /// Lets the call that ran out of time on `tid` (stopped by [`timed_out`](Self::timed_out))
    /// run on untraced by syscall-stops: it comes back through the return stub, which puts
    /// the thread's registers back itself, as after a tracer's death — so the stub stays
    /// where it is for good (a later call finds another place, see [`find_stub_site`]).
    fn let_call_finish(&mut self, tid: i32) -> Result<(), CallError> {
        self.stub_site = None;
        set_options(tid, self.options.bits())?;
        self.resume_raw(tid, 0, Resume::Cont)?;
        Ok(())
    }

    /// Puts the return stub of the calls from now on only into the modules mapped from
    /// `files`: a call that unmaps the module the stub is in (a `dlclose` of it, or of a
    /// library that loaded it) would return into unmapped memory, and crash there once it
    /// has done its work. A stub placed elsewhere already is put back.
    pub(crate) fn keep_stub_in(&mut self, files: Vec<String>) -> Result<(), Error> {
        self.stub_only_in = Some(files);
        self.release_return_stub()
    }

    /// Puts back the original bytes where the return stub was written, if a call wrote
    /// it (checking first that the stub is still there).
    pub fn release_return_stub(&mut self) -> Result<(), Error> {
        let Some(site) = self.stub_site.take() else { return Ok(()) };
        let Some(written) = &site.written else { return Ok(()) };
        self.mem.replace(site.addr, written, &site.original).map_err(|error| Error::Memory {
            op: "write back (where the return stub was)",
            addr: site.addr,
            len: written.len(),
            error,
        })
    }

    /// Makes system call `nr` with `args` (at most 6) on stopped thread `tid`, at a
    /// `syscall` instruction already in the process (in the vdso, or else the first
    /// executable mapping that has one) — nothing is written into code that other threads
    /// may be running. Returns the raw result (`-errno` on failure). Registers are restored
    /// as by [`call_with`](Self::call_with).
    pub fn syscall(&mut self, tid: i32, nr: i64, args: &[u64], timeout: Duration) -> Result<i64, CallError> {
        if args.len() > 6 {
            return Err(CallError::TooManyArgs { count: args.len() });
        }
        let insn = self.syscall_instruction()?;
        let saved = self.save(tid)?;
        let mut regs = saved.regs;
        let mut values = [0u64; 6];
        values[..args.len()].copy_from_slice(args);
        // The kernel's argument registers: r10 where a function call would use rcx.
        [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9] = values;
        regs.rax = nr as u64;
        regs.orig_rax = NO_SYSCALL;
        regs.rip = insn;
        // Nothing uses the stack, but a signal frame must not land in the red zone.
        regs.rsp = (saved.regs.rsp.wrapping_sub(RED_ZONE)) & !15;
        regs.eflags &= !EFLAGS_DF_TF;
        let result = self.run(tid, &regs, Until::Step { end: insn + 2 }, &saved, timeout);
        self.finish(tid, &saved, result).map(|rax| rax as i64)
    }

    /// `mmap(addr, len, prot, flags, fd, offset)` in the process, made on stopped thread
    /// `tid` (see [`syscall`](Self::syscall)); returns the mapping's address.
    #[allow(clippy::too_many_arguments)]
    pub fn mmap(
        &mut self,
        tid: i32,
        addr: u64,
        len: u64,
        prot: i32,
        flags: i32,
        fd: i32,
        offset: u64,
        timeout: Duration,
    ) -> Result<u64, CallError> {
        let args = [addr, len, prot as u64, flags as u64, fd as i64 as u64, offset];
        let ret = self.syscall(tid, libc::SYS_mmap, &args, timeout)?;
        syscall_result("mmap", ret).map(|v| v as u64)
    }

    /// `munmap(addr, len)` in the process, made on stopped thread `tid`.
    pub fn munmap(&mut self, tid: i32, addr: u64, len: u64, timeout: Duration) -> Result<(), CallError> {
        let ret = self.syscall(tid, libc::SYS_munmap, &[addr, len], timeout)?;
        syscall_result("munmap", ret).map(drop)
    }

    /// The address of a `syscall` instruction (`0f 05`) in the process, found once (see
    /// [`find_syscall_instruction`]).
    pub fn syscall_instruction(&mut self) -> Result<u64, CallError> {
        if let Some(insn) = self.syscall_insn {
            return Ok(insn);
        }
        let insn = find_syscall_instruction(&self.mem)?;
        self.syscall_insn = Some(insn);
        Ok(insn)
    }

    // ---- internals ----

    /// Copies `bytes` (plus a NUL if `nul`) below `*sp`, 16-byte aligned; returns their
    /// address, which becomes the new `*sp`.
    fn push(&self, sp: &mut u64, bytes: &[u8], nul: bool) -> Result<u64, Error> {
        let mut data = bytes.to_vec();
        if nul {
            data.push(0);
        }
        let addr = (sp.wrapping_sub(data.len() as u64)) & !15;
        self.write_memory(addr, &data)?;
        *sp = addr;
        Ok(addr)
    }

    fn save(&mut self, tid: i32) -> Result<Saved, CallError> {
        let stop = self.stopped(tid)?;
        if matches!(stop, Stop::Event { .. }) {
            return Err(CallError::BadStop { tid, stop });
        }
        Ok(Saved { regs: self.regs(tid)?, xstate: self.vector_state(tid)?, stop, info: self.stop_info(tid)? })
    }

    /// Puts back what [`save`](Self::save) saved, unless the thread is gone; the call's
    /// error wins over a restore error.
    fn finish(&mut self, tid: i32, saved: &Saved, result: Result<u64, CallError>) -> Result<u64, CallError> {
        if matches!(
            result,
            Err(CallError::Tracee(Error::Exited { .. })) | Err(CallError::Tracee(Error::NotTraced { .. }))
        ) {
            return result;
        }
        let restored = self
            .set_regs(tid, &saved.regs)
            .and_then(|()| self.set_vector_state(tid, &saved.xstate))
            .and_then(|()| self.restore_stop(tid, saved.stop, saved.info));
        match (result, restored) {
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(e.into()),
            (Ok(v), Ok(())) => Ok(v),
        }
    }

    /// Where the return stub goes, found once (module documentation).
    fn stub_site(&mut self) -> Result<u64, CallError> {
        if let Some(site) = &self.stub_site {
            return Ok(site.addr);
        }
        let lock = lock_stub_sites(self.pid())?;
        let addr = find_stub_site(&self.mem, self.stub_only_in.as_deref())?;
        let original = self.mem.read_vec(addr, STUB_MAX).map_err(|error| Error::Memory {
            op: "read",
            addr,
            len: STUB_MAX,
            error,
        })?;
        self.stub_site = Some(StubSite { addr, original, written: None, _lock: lock });
        Ok(addr)
    }

    /// Writes `code` where the stub goes.
    fn write_stub(&mut self, code: &[u8]) -> Result<(), CallError> {
        let site = self.stub_site.as_mut().expect("stub_site() found it");
        let mut bytes = site.original.clone();
        bytes[..code.len()].copy_from_slice(code);
        self.mem.write(site.addr, &bytes).map_err(|error| Error::Memory {
            op: "write of the return stub",
            addr: site.addr,
            len: bytes.len(),
            error,
        })?;
        site.written = Some(bytes);
        Ok(())
    }

    /// Runs `tid` with `regs` until `until`, and returns `rax` then (the function's result:
    /// `rdi` at the stub's stop, which moved it there). Signals and stops on the way as
    /// [`call_with`](Self::call_with) says.
    fn run(&mut self, tid: i32, regs: &Regs, until: Until, saved: &Saved, timeout: Duration) -> Result<u64, CallError> {
        self.set_regs(tid, regs)?;
        let deadline = Instant::now() + timeout;
        let how = match until {
            Until::Step { .. } => Resume::Step,
            Until::Stub { .. } => Resume::Syscall,
        };
        self.resume_raw(tid, 0, how)?;
        loop {
            let stop = self.stop_before(tid, deadline, timeout)?;
            let mut resume_with = 0;
            match stop {
                Stop::Syscall => {
                    if let Until::Stub { notified, sp } = until {
                        let now = self.regs(tid)?;
                        if now.rip == notified && now.orig_rax == NOTIFY_SYSCALL && now.rsp == sp + 8 {
                            self.stop_in_stub(tid, saved, deadline, timeout)?;
                            return Ok(now.rdi);
                        }
                    }
                }
                Stop::Signal { signal, code, addr } => {
                    let now = self.regs(tid)?;
                    if let Until::Step { end } = until {
                        if signal == libc::SIGTRAP && now.rip == end {
                            return Ok(now.rax);
                        }
                    }
                    let kernel_sent = code > 0;
                    match signal {
                        libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE if kernel_sent => {
                            return Err(CallError::Faulted { tid, signal, addr, rip: now.rip });
                        }
                        // A breakpoint planted in the process: its handler must see it.
                        libc::SIGTRAP if kernel_sent && how != Resume::Step => resume_with = libc::SIGTRAP,
                        _ => self.hold_signal(tid)?,
                    }
                }
                // A stop the caller asked for earlier, or the whole process being stopped:
                // the call goes on.
                Stop::Interrupt | Stop::Group { .. } => {}
                Stop::Event { event, .. } if event == libc::PTRACE_EVENT_CLONE => self.pass(tid, stop),
                Stop::Event { .. } => return Err(CallError::Unexpected { tid, stop }),
            }
            self.resume_raw(tid, resume_with, how)?;
        }
    }

    /// Moves `tid`, at the syscall-entry stop of its stub, to a stop where restoring its
    /// registers resumes it as from the stop it was taken from: an interrupt stop, or — if
    /// it had been stopped for a signal — a stop for that signal again (sent anew: should
    /// we die before it comes, the program gets it as it would have). Both are taken inside
    /// the kernel's signal handling, which restarts a restored interrupted system call; a
    /// syscall-stop is not (the restart would not happen).
    fn stop_in_stub(&mut self, tid: i32, saved: &Saved, deadline: Instant, timeout: Duration) -> Result<(), CallError> {
        let signal = match (saved.stop, &saved.info) {
            (Stop::Signal { signal, .. }, Some(info)) => {
                resend(self.pid(), tid, info).map_err(|error| Error::Ptrace {
                    tid,
                    op: "re-sending the stop's signal",
                    error,
                })?;
                signal
            }
            _ => {
                self.interrupt_now(tid)?;
                0
            }
        };
        self.resume_raw(tid, 0, Resume::Cont)?;
        loop {
            match self.stop_before(tid, deadline, timeout)? {
                Stop::Interrupt | Stop::Group { .. } if signal == 0 => return Ok(()),
                Stop::Signal { signal: s, .. } if s == signal => return Ok(()),
                Stop::Signal { .. } => self.hold_signal(tid)?,
                stop @ Stop::Event { .. } => return Err(CallError::Unexpected { tid, stop }),
                Stop::Interrupt | Stop::Group { .. } | Stop::Syscall => {}
            }
            self.resume_raw(tid, 0, Resume::Cont)?;
        }
    }

    /// `tid`'s next stop, or the call's timeout (the thread stopped where it was).
    fn stop_before(&mut self, tid: i32, deadline: Instant, timeout: Duration) -> Result<Stop, CallError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.next_stop_within(tid, left, "return from the remote call") {
            Ok(stop) => Ok(stop),
            Err(Error::Timeout { .. }) => Err(self.timed_out(tid, timeout)),
            Err(e) => Err(e.into()),
        }
    }

    /// Stops a call that ran out of time, and says where it was.
    fn timed_out(&mut self, tid: i32, after: Duration) -> CallError {
        match self.stop_outside_syscall(tid) {
            Ok(()) => match self.regs(tid) {
                Ok(regs) => CallError::Timeout { tid, rip: regs.rip, after },
                Err(e) => e.into(),
            },
            Err(e) => e.into(),
        }
    }

    /// Stops `tid` in a stop its saved registers can be put back in: not a syscall-stop
    /// (there the kernel would run, or not restart, the system call those registers name).
    fn stop_outside_syscall(&mut self, tid: i32) -> Result<(), Error> {
        match self.stop(tid, Duration::from_secs(1))? {
            Stop::Syscall => {}
            // A signal of the program's, arriving just now: keep it.
            Stop::Signal { .. } => return self.hold_signal(tid),
            _ => return Ok(()),
        }
        // The syscall-stop took the place of our interrupt's (any ptrace stop clears a
        // pending one): ask again, and let the thread run to it.
        self.interrupt_now(tid)?;
        loop {
            self.resume_raw(tid, 0, Resume::Cont)?;
            match self.next_stop_within(tid, Duration::from_secs(1), "stop after a timed-out call")? {
                Stop::Interrupt | Stop::Group { .. } => return Ok(()),
                Stop::Signal { .. } => self.hold_signal(tid)?,
                stop @ Stop::Event { .. } => self.pass(tid, stop),
                Stop::Syscall => {}
            }
        }
    }
}

/// How a remote call or system call ends.
#[derive(Debug, Clone, Copy)]
enum Until {
    /// A single-stepped `syscall` instruction: its `SIGTRAP` with `rip` at `end`.
    Step { end: u64 },
    /// The stub's `getpid` entry stop at `notified`, with `rsp` just above the return
    /// address at `sp`.
    Stub { notified: u64, sp: u64 },
}

/// The registers the kernel would resume a thread stopped with `regs` with: an interrupted
/// system call restarted, which the kernel does only on its way out of a stop (never for a
/// jump, as the stub's): back over the 2-byte `syscall`, as `arch_do_signal_or_restart`
/// (arch/x86/kernel/signal.c) does.
fn kernel_resume(regs: &Regs) -> Regs {
    let mut r = *regs;
    if (r.orig_rax as i64) >= 0 {
        let restart = match r.rax as i64 {
            e if ERESTART_SAME.contains(&e) => Some(r.orig_rax),
            ERESTART_RESTARTBLOCK => Some(libc::SYS_restart_syscall as u64),
            _ => None,
        };
        if let Some(nr) = restart {
            r.rax = nr;
            r.rip -= 2;
        }
    }
    r
}

/// `regs` as `struct user_regs_struct` lays them out (arch/x86/include/asm/user_64.h).
fn regs_bytes(r: &Regs) -> Vec<u8> {
    let words = [
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx, r.rsi, r.rdi,
        r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds, r.es, r.fs, r.gs,
    ];
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A place for the return stub in the process whose memory is `memory`: a 16-byte boundary
/// after the end of a module's executable segment, with [`STUB_MAX`] bytes before the end
/// of that page, inside an executable mapping of the same file, and no stub there already
/// (one a killed tracer left may still be on its way back: [`STUB_START`]; the next
/// [`STUB_MAX`] bytes are tried). Found from the ELF and program headers each module has
/// mapped at its start (elf(5)); only in the modules mapped from `only_in`, if given.
fn find_stub_site(memory: &Memory, only_in: Option<&[String]>) -> Result<u64, CallError> {
    let pid = memory.pid();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| CallError::Tracee(Error::Memory { op: "read of /proc/PID/maps", addr: 0, len: 0, error: e }))?;
    // (start, end, executable, offset, path)
    let mappings: Vec<(u64, u64, bool, u64, &str)> = maps
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let perms = fields.next()?;
            let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
            let path = fields.nth(2).unwrap_or("");
            let (start, end) = (u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?);
            Some((start, end, perms.as_bytes().get(2) == Some(&b'x'), offset, path))
        })
        .collect();
    let executable = |from: u64, to: u64, file: &str| {
        mappings.iter().any(|&(start, end, x, _, path)| x && path == file && start <= from && to <= end)
    };
    for &(base, _, _, offset, path) in &mappings {
        let excluded = only_in.is_some_and(|files| !files.iter().any(|file| file == path));
        if offset != 0 || !path.starts_with('/') || excluded {
            continue;
        }
        for segment_end in executable_segment_ends(memory, base) {
            let page_end = segment_end.next_multiple_of(PAGE);
            let mut at = segment_end.next_multiple_of(16);
            while at + STUB_MAX as u64 <= page_end && executable(at, page_end, path) {
                match memory.read_vec(at, STUB_START.len()) {
                    Ok(bytes) if bytes != STUB_START => return Ok(at),
                    Ok(_) => at += STUB_MAX as u64,
                    Err(_) => break,
                }
            }
        }
    }
    Err(CallError::NoStubSite { pid })
}

/// Where the executable `PT_LOAD` segments of the ELF module whose headers are mapped at
/// `base` end in memory (none if `base` holds no 64-bit ELF header).
fn executable_segment_ends(memory: &Memory, base: u64) -> Vec<u64> {
    const PT_LOAD: u32 = 1;
    const PF_X: u32 = 1;
    const PHDR_SIZE: usize = 56;
    let Ok(header) = memory.read_vec(base, 64) else { return Vec::new() };
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]) as usize;
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    // ELF magic, ELFCLASS64, program headers of the 64-bit size.
    if header[..4] != *b"\x7fELF" || header[4] != 2 || u16_at(&header, 54) != PHDR_SIZE {
        return Vec::new();
    }
    let (phoff, phnum) = (u64_at(&header, 32), u16_at(&header, 56).min(256));
    let Ok(phdrs) = memory.read_vec(base + phoff, phnum * PHDR_SIZE) else { return Vec::new() };
    let loads: Vec<(u32, u64, u64)> = phdrs
        .chunks_exact(PHDR_SIZE)
        .filter(|p| u32_at(p, 0) == PT_LOAD)
        .map(|p| (u32_at(p, 4), u64_at(p, 16), u64_at(p, 40)))
        .collect();
    // The first PT_LOAD (file offset 0) is the one mapped at `base`.
    let Some(&(_, first_vaddr, _)) = loads.first() else { return Vec::new() };
    let bias = base.wrapping_sub(first_vaddr & !(PAGE - 1));
    loads
        .iter()
        .filter(|&&(flags, _, _)| flags & PF_X != 0)
        .map(|&(_, vaddr, memsz)| bias.wrapping_add(vaddr).wrapping_add(memsz))
        .collect()
}

/// `PTRACE_SETOPTIONS`.
fn set_options(tid: i32, options: i32) -> Result<(), CallError> {
    crate::sys::set_options(tid, options)
        .map_err(|error| CallError::Tracee(Error::Ptrace { tid, op: "PTRACE_SETOPTIONS", error }))
}

/// The address of a `syscall` instruction (`0f 05`) in the process whose memory is
/// `memory`: in the vdso, else in the first executable file mapping that has one. A thread
/// made to execute it makes a system call without any byte of the program's code being
/// written (see [`Tracee::syscall`]).
pub fn find_syscall_instruction(memory: &Memory) -> Result<u64, CallError> {
    let pid = memory.pid();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| CallError::Tracee(Error::Memory { op: "read of /proc/PID/maps", addr: 0, len: 0, error: e }))?;
    let mut code: Vec<(u64, u64, bool)> = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        let path = fields.nth(3).unwrap_or("");
        let Some((start, end)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) else {
            continue;
        };
        if perms.as_bytes().get(2) == Some(&b'x') && (path == "[vdso]" || path.starts_with('/')) {
            code.push((start, end, path == "[vdso]"));
        }
    }
    // The vdso first: it is small and always has one (its system call fallbacks).
    code.sort_by_key(|&(_, _, vdso)| !vdso);
    code.into_iter()
        .find_map(|(start, end, _)| find_syscall(memory, start, end))
        .ok_or(CallError::NoSyscallInstruction { pid })
}

/// `0f 05` in `[start, end)`, read in chunks that overlap by one byte.
fn find_syscall(memory: &Memory, start: u64, end: u64) -> Option<u64> {
    const CHUNK: u64 = 64 * 1024;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut at = start;
    while at < end {
        let len = CHUNK.min(end - at) as usize;
        memory.read(at, &mut buf[..len]).ok()?;
        if let Some(i) = buf[..len].windows(2).position(|w| w == [0x0f, 0x05]) {
            return Some(at + i as u64);
        }
        if at + len as u64 >= end {
            break;
        }
        at += len as u64 - 1;
    }
    None
}

/// A raw system call result as a value or an error.
fn syscall_result(name: &'static str, ret: i64) -> Result<i64, CallError> {
    if (-4095..0).contains(&ret) {
        Err(CallError::Syscall { name, error: io::Error::from_raw_os_error(-ret as i32) })
    } else {
        Ok(ret)
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGSEGV => "SIGSEGV".to_string(),
        libc::SIGBUS => "SIGBUS".to_string(),
        libc::SIGILL => "SIGILL".to_string(),
        libc::SIGFPE => "SIGFPE".to_string(),
        other => format!("signal {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The return stub goes only into the modules it is kept in, when it is kept in some
    /// (an unload keeps it out of the library it unloads): in this process, the site found
    /// anywhere is found again when kept in its own module, and another when kept out of it.
    #[test]
    fn the_return_stub_goes_only_where_it_is_kept() {
        let memory = Memory::open(std::process::id() as i32).unwrap();
        let site = find_stub_site(&memory, None).expect("a stub site in this process");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        // (start, end, file) of every mapping of a file.
        let files: Vec<(u64, u64, String)> = maps
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let (start, end) = fields[0].split_once('-')?;
                let file = fields.get(5).filter(|f| f.starts_with('/'))?;
                Some((u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?, file.to_string()))
            })
            .collect();
        let file_of = |at: u64| files.iter().find(|(s, e, _)| (*s..*e).contains(&at)).map(|(_, _, f)| f.clone());
        let home = file_of(site).expect("the site is in a file's mapping");
        assert_eq!(find_stub_site(&memory, Some(std::slice::from_ref(&home))).unwrap(), site);
        assert!(matches!(find_stub_site(&memory, Some(&[])), Err(CallError::NoStubSite { .. })));
        let others: Vec<String> = files.iter().map(|(_, _, f)| f.clone()).filter(|f| *f != home).collect();
        if let Ok(elsewhere) = find_stub_site(&memory, Some(&others)) {
            assert_ne!(file_of(elsewhere), Some(home), "kept out of its module");
        }
    }
}
