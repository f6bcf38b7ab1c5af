//! The errors of attaching and of working on an attached process.

use std::fmt;
use std::io;
use std::time::Duration;

/// Why attaching to a process or thread failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum AttachError {
    /// No process (or thread) with this id exists.
    NoSuchProcess {
        /// The id asked for.
        pid: i32,
    },
    /// The process existed but exited (or is a zombie waiting to be reaped) before it could
    /// be attached.
    Exited {
        /// The id asked for.
        pid: i32,
    },
    /// The kernel refused the attach (`EPERM`); `reason` is what we found out about why.
    NotPermitted {
        /// The process (or thread) asked for.
        pid: i32,
        /// The cause, as far as `/proc` tells.
        reason: PermissionReason,
    },
    /// `tid` is not a thread of process `pid`.
    NotAThreadOf {
        /// The process.
        pid: i32,
        /// The id that is not one of its threads.
        tid: i32,
    },
    /// Anything else the kernel said.
    Os {
        /// The thread being attached.
        tid: i32,
        /// What we were doing.
        op: &'static str,
        /// The error.
        error: io::Error,
    },
}

/// Why the kernel would not let us trace a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PermissionReason {
    /// Another tracer (a debugger, `strace`, another dynprobe) holds it: `TracerPid` of
    /// `/proc/PID/status`.
    AlreadyTraced {
        /// The tracer's thread id.
        tracer_pid: i32,
        /// Its name (`comm`), empty if unknown.
        tracer_name: String,
        /// The tracer is a thread of this very process (attached twice).
        by_us: bool,
    },
    /// Yama's `kernel.yama.ptrace_scope` forbids it.
    PtraceScope {
        /// The value of `/proc/sys/kernel/yama/ptrace_scope` (1, 2 or 3).
        scope: u32,
    },
    /// The process runs as another user (any of its real, effective or saved uids or gids
    /// differ from ours) and we lack `CAP_SYS_PTRACE`.
    DifferentUser {
        /// The process's effective uid.
        target_uid: u32,
        /// Our effective uid.
        our_uid: u32,
    },
    /// The process is not dumpable: it changed credentials (a setuid or setgid program, or
    /// file capabilities) or called `prctl(PR_SET_DUMPABLE, 0)`.
    NotDumpable,
    /// A thread of the calling process itself: a process cannot trace its own threads.
    OwnProcess,
    /// A kernel thread, which cannot be traced.
    KernelThread,
    /// None of the above: most likely a security module (SELinux, AppArmor) or a seccomp
    /// or namespace restriction.
    Unknown,
}

impl fmt::Display for PermissionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PermissionReason::AlreadyTraced { tracer_pid, tracer_name, by_us } => {
                write!(f, "already traced by pid {tracer_pid}")?;
                if !tracer_name.is_empty() {
                    write!(f, " ({tracer_name})")?;
                }
                if *by_us {
                    write!(f, ", a thread of this process: it is attached already")?;
                } else {
                    write!(f, "; only one tracer at a time is possible, detach that one first")?;
                }
                Ok(())
            }
            PermissionReason::PtraceScope { scope } => {
                write!(f, "kernel.yama.ptrace_scope is {scope}: ")?;
                match scope {
                    1 => write!(
                        f,
                        "a process may only trace its own descendants unless it has CAP_SYS_PTRACE \
                         (run as root, start the program under dynprobe, or `sysctl kernel.yama.ptrace_scope=0`)"
                    ),
                    2 => write!(f, "only a process with CAP_SYS_PTRACE may trace (run as root)"),
                    3 => write!(f, "no process may attach with ptrace at all (it cannot be lowered until reboot)"),
                    _ => write!(f, "an unknown Yama mode"),
                }
            }
            PermissionReason::DifferentUser { target_uid, our_uid } => write!(
                f,
                "the process runs as uid {target_uid} and we as uid {our_uid}; tracing another user's \
                 process needs CAP_SYS_PTRACE (run as root or as that user)"
            ),
            PermissionReason::NotDumpable => write!(
                f,
                "the process is not dumpable (a setuid/setgid program, or it called prctl(PR_SET_DUMPABLE, 0)); \
                 only root may trace it"
            ),
            PermissionReason::OwnProcess => write!(f, "it is a thread of this very process"),
            PermissionReason::KernelThread => write!(f, "it is a kernel thread"),
            PermissionReason::Unknown => write!(
                f,
                "no Yama, uid, dumpable or tracer restriction applies; probably a security module \
                 (SELinux, AppArmor) forbids it"
            ),
        }
    }
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttachError::NoSuchProcess { pid } => write!(f, "no such process: {pid}"),
            AttachError::Exited { pid } => write!(f, "process {pid} exited while attaching"),
            AttachError::NotPermitted { pid, reason } => {
                write!(f, "not permitted to trace process {pid}: {reason}")
            }
            AttachError::NotAThreadOf { pid, tid } => write!(f, "{tid} is not a thread of process {pid}"),
            AttachError::Os { tid, op, error } => write!(f, "{op} of thread {tid} failed: {error}"),
        }
    }
}

/// The error this one wraps, where it wraps one (its message is part of this one's
/// `Display` too, which is complete on its own).
impl std::error::Error for AttachError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AttachError::Os { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Why an operation on an attached process failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The thread is not one the [`Tracee`](crate::Tracee) traces (never attached, detached,
    /// or exited).
    NotTraced {
        /// The thread.
        tid: i32,
    },
    /// The operation needs the thread stopped (see [`Tracee::stop`](crate::Tracee::stop)).
    NotStopped {
        /// The thread.
        tid: i32,
    },
    /// The thread exited (or was killed) meanwhile.
    Exited {
        /// The thread.
        tid: i32,
        /// How: `exit status N` or `killed by signal N`.
        how: String,
    },
    /// Nothing happened within the time allowed.
    Timeout {
        /// The thread waited for (`None`: any thread).
        tid: Option<i32>,
        /// What we waited for.
        what: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// No traced thread is running, so waiting for an event would wait forever.
    NothingRunning,
    /// Reading or writing the process's memory failed.
    Memory {
        /// `read` or `write`.
        op: &'static str,
        /// The address.
        addr: u64,
        /// How many bytes.
        len: usize,
        /// The error.
        error: io::Error,
    },
    /// A `ptrace` or `waitpid` request failed.
    Ptrace {
        /// The thread.
        tid: i32,
        /// The request (`PTRACE_GETREGS`, …).
        op: &'static str,
        /// The error.
        error: io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotTraced { tid } => write!(f, "thread {tid} is not traced (not attached, detached, or exited)"),
            Error::NotStopped { tid } => write!(f, "thread {tid} is running; it must be stopped first"),
            Error::Exited { tid, how } => write!(f, "thread {tid} exited ({how})"),
            Error::Timeout { tid: Some(tid), what, after } => {
                write!(f, "thread {tid}: no {what} within {:.1} s", after.as_secs_f64())
            }
            Error::Timeout { tid: None, what, after } => write!(f, "no {what} within {:.1} s", after.as_secs_f64()),
            Error::NothingRunning => write!(f, "no traced thread is running: nothing to wait for"),
            Error::Memory { op, addr, len, error } => write!(f, "{op} of {len} bytes at {addr:#x} failed: {error}"),
            Error::Ptrace { tid, op, error } => write!(f, "{op} on thread {tid} failed: {error}"),
        }
    }
}

/// The error this one wraps, where it wraps one (its message is part of this one's
/// `Display` too, which is complete on its own).
impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Memory { error, .. } | Error::Ptrace { error, .. } => Some(error),
            _ => None,
        }
    }
}
