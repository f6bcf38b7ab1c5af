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
//!                 return address 0           ◄── rsp at the call, ≡ 8 (mod 16) as after a `call`
//! ```
//!
//! The function returns to address 0: the thread stops with `SIGSEGV` at `rip == 0` and
//! `rsp` just above that return address, which is how the end of the call is recognized (a
//! crash at address 0 inside the function would leave a different `rsp`).

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::memory::Memory;
use crate::tracee::{Regs, Stop, Tracee};

/// `orig_rax` = -1: "not in a system call", so the kernel does not restart the program's
/// interrupted system call into our code.
const NO_SYSCALL: u64 = u64::MAX;
/// The SysV ABI's red zone below `rsp`, which a leaf function may use without moving `rsp`.
const RED_ZONE: u64 = 128;
/// `eflags` bits a function must not start with: the direction flag (the ABI wants it
/// clear) and the trap flag (a single-step in progress).
const EFLAGS_DF_TF: u64 = 0x400 | 0x100;

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
    /// The function did not return in time. The thread was stopped and its registers
    /// restored; whatever the function held (a lock) stays held.
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
                "the call on thread {tid} did not return within {:.1} s; it was at {rip:#x} (stopped there, \
                 registers restored)",
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
            CallError::Tracee(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for CallError {}

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
    pub fn call_with(&mut self, tid: i32, func: u64, args: &[Arg], timeout: Duration) -> Result<u64, CallError> {
        if args.len() > 6 {
            return Err(CallError::TooManyArgs { count: args.len() });
        }
        let saved = self.save(tid)?;
        let mut regs = saved.regs;
        let mut sp = saved.regs.rsp.wrapping_sub(RED_ZONE);
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
        self.write_memory(sp, &0u64.to_le_bytes())?;
        [regs.rdi, regs.rsi, regs.rdx, regs.rcx, regs.r8, regs.r9] = values;
        regs.rsp = sp;
        regs.rip = func;
        // A variadic callee reads the number of vector registers used from `al`.
        regs.rax = 0;
        regs.orig_rax = NO_SYSCALL;
        regs.eflags &= !EFLAGS_DF_TF;
        let result = self.run(tid, &regs, false, timeout, |r| r.rip == 0 && r.rsp == sp + 8);
        self.finish(tid, &saved, result)
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
        let result = self.run(tid, &regs, true, timeout, |r| r.rip == insn + 2);
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

    /// Runs `tid` with `regs` until it stops with `done(regs)` true at a `SIGSEGV` (a
    /// call's return to 0) or `SIGTRAP` (a system call's single step); returns `rax` then.
    fn run(
        &mut self,
        tid: i32,
        regs: &Regs,
        step: bool,
        timeout: Duration,
        done: impl Fn(&Regs) -> bool,
    ) -> Result<u64, CallError> {
        self.set_regs(tid, regs)?;
        let deadline = Instant::now() + timeout;
        self.resume_raw(tid, 0, step)?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let stop = match self.next_stop_within(tid, left, "return from the remote call") {
                Ok(stop) => stop,
                Err(Error::Timeout { .. }) => return Err(self.timed_out(tid, timeout)),
                Err(e) => return Err(e.into()),
            };
            let mut resume_with = 0;
            match stop {
                Stop::Signal { signal, code, addr } => {
                    let now = self.regs(tid)?;
                    let expected = if step { libc::SIGTRAP } else { libc::SIGSEGV };
                    if signal == expected && done(&now) {
                        return Ok(now.rax);
                    }
                    let kernel_sent = code > 0;
                    match signal {
                        libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE if kernel_sent => {
                            return Err(CallError::Faulted { tid, signal, addr, rip: now.rip });
                        }
                        // A breakpoint planted in the process: its handler must see it.
                        libc::SIGTRAP if kernel_sent && !step => resume_with = libc::SIGTRAP,
                        _ => self.hold_signal(tid)?,
                    }
                }
                // A stop the caller asked for earlier, or the whole process being stopped:
                // the call goes on.
                Stop::Interrupt | Stop::Group { .. } => {}
                Stop::Event { event, .. } if event == libc::PTRACE_EVENT_CLONE => self.pass(tid, stop),
                Stop::Event { .. } => return Err(CallError::Unexpected { tid, stop }),
            }
            self.resume_raw(tid, resume_with, step)?;
        }
    }

    /// Stops a call that ran out of time, and says where it was.
    fn timed_out(&mut self, tid: i32, after: Duration) -> CallError {
        match self.stop(tid, Duration::from_secs(1)) {
            Ok(stop) => {
                if matches!(stop, Stop::Signal { .. }) {
                    // A signal of the program's, arriving just now: keep it.
                    if let Err(e) = self.hold_signal(tid) {
                        return e.into();
                    }
                }
                match self.regs(tid) {
                    Ok(regs) => CallError::Timeout { tid, rip: regs.rip, after },
                    Err(e) => e.into(),
                }
            }
            Err(e) => e.into(),
        }
    }
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
