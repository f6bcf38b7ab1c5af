//! The fallback for programs the agent cannot be loaded into (statically linked ones):
//! probes driven from outside by ptrace (`dynprobe_uprobes`), run in a child process of
//! the CLI's. It speaks the agent's line protocol on a pipe, so `probe` relays it the same
//! way, and takes `detach` on another pipe. A child of its own, because the tracer must be
//! the thread that attached and reaps every stop with `waitpid(-1)`; and because then a
//! `kill -9` of the CLI only closes the control pipe, and the tracer, still alive, removes
//! every int3 before it lets go of the program.

use dynprobe::spec::ProbeSpec;
use dynprobe_uprobes::{Outcome, Target};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

/// The message for a user whose program gets the fallback.
pub(crate) fn fallback_note(what: &str, why: &str) -> String {
    format!(
        "dynprobe: {what}: {why}; its probes are driven from outside with ptrace instead \
         (a trap to dynprobe per hit: tens of microseconds, not nanoseconds)"
    )
}

/// The tracer child.
pub(crate) struct Tracer {
    pid: libc::pid_t,
    /// `detach` goes here; closing it detaches too.
    control: Option<OwnedFd>,
}

impl Tracer {
    /// Forks the tracer for `target`; returns it and the read end of its protocol lines.
    /// The program (for a [`Target::Command`]) inherits this process's standard
    /// descriptors.
    pub fn start(target: Target, specs: Vec<ProbeSpec>) -> io::Result<(Tracer, OwnedFd)> {
        let (out_read, out_write) = pipe()?;
        let (control_read, control_write) = pipe()?;
        // SAFETY: the CLI is single-threaded here (it has not started any thread), so the
        // child may go on running Rust code, allocation included, after fork.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                drop((out_read, control_write));
                // An attach blocks these before it starts (attach::run takes them from a
                // signalfd), and the mask is inherited across fork and exec (sigprocmask(2));
                // the tracer handles them itself.
                super::attach::mask_ending_signals(libc::SIG_UNBLOCK);
                survive_terminal_signals();
                let code = trace(target, &specs, out_write.as_fd(), control_read.as_fd());
                // SAFETY: ends the child without running the parent's exit handlers or
                // flushing its copies of the parent's buffers.
                unsafe { libc::_exit(code) }
            }
            pid => Ok((Tracer { pid, control: Some(control_write) }, out_read)),
        }
    }

    /// The tracer's process id.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Asks the tracer to detach (it restores every byte and lets the program go on).
    pub fn detach(&mut self) {
        if let Some(control) = &self.control {
            // The tracer may be gone (EPIPE, and SIGPIPE is ignored by the caller or
            // harmless: the tracer only ends then).
            let _ = rustix::io::write(control, b"detach\n");
        }
        self.control = None;
    }

    /// Waits for the tracer to end: its exit status, which is the program's for a started
    /// one (`128 + signal` for a program a signal killed), or the signal that killed the
    /// tracer itself.
    pub fn wait(mut self) -> io::Result<TracerEnd> {
        self.control = None;
        let pid = rustix::process::Pid::from_raw(self.pid).ok_or_else(|| io::Error::other("no tracer process"))?;
        let status = loop {
            match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()) {
                Err(rustix::io::Errno::INTR) => continue,
                Err(err) => return Err(err.into()),
                Ok(status) => break status.map(|(_, status)| status),
            }
        };
        Ok(match (status.and_then(|s| s.exit_status()), status.and_then(|s| s.terminating_signal())) {
            (Some(code), _) => TracerEnd::Exited(code),
            (_, Some(signal)) => TracerEnd::Killed { pid: self.pid, signal },
            _ => TracerEnd::Exited(1),
        })
    }
}

/// How the tracer child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TracerEnd {
    /// It exited with this status (the started program's, or 0 after a detach).
    Exited(i32),
    /// It was killed (`kill -9`, the OOM killer).
    Killed {
        /// The tracer's pid.
        pid: libc::pid_t,
        /// The signal.
        signal: i32,
    },
}

impl TracerEnd {
    /// The message for a tracer that was killed while probing `target` (`pid (name)`), or
    /// `None` if it ended by itself.
    pub fn death(&self, target: &str) -> Option<String> {
        let TracerEnd::Killed { pid, signal } = *self else { return None };
        let name = super::signal_name(signal);
        Some(format!(
            "the ptrace tracer (pid {pid}) was killed by signal {signal} ({name}), so no more events come; \
             {target} runs on: the SIGTRAP handler dynprobe left in it runs each probe hit through its \
             out-of-line copy and puts the original bytes back"
        ))
    }
}

/// Keeps the tracer alive through Ctrl-C, Ctrl-\\ and a closed terminal, which reach the
/// whole foreground process group: the CLI decides (it detaches, or a started program
/// gets the signal through the tracer and ends). A handler rather than `SIG_IGN`, because
/// handlers are reset by `exec` and ignored signals are not: the program the tracer
/// starts must get the default actions.
fn survive_terminal_signals() {
    extern "C" fn ignore(_: libc::c_int) {}
    for signal in [libc::SIGINT, libc::SIGQUIT, libc::SIGHUP] {
        // SAFETY: installs an empty async-signal-safe handler; SA_RESTART keeps the
        // tracer's waitpid and writes going.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// The child's work: runs the tracer, says why it could not, and returns the exit code.
fn trace(target: Target, specs: &[ProbeSpec], out: BorrowedFd<'_>, control: BorrowedFd<'_>) -> i32 {
    match dynprobe_uprobes::run(target, specs, out, control) {
        Ok(info) => match info.outcome {
            Outcome::Exited(code) => code,
            Outcome::Killed(signal) => 128 + signal,
            Outcome::Detached | Outcome::Exec => 0,
        },
        Err(dynprobe_uprobes::Error::Refused { .. }) => crate::EXIT_ERROR.into(),
        Err(err) => {
            eprintln!("dynprobe: {err}");
            crate::EXIT_ERROR.into()
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// Why the agent cannot be loaded into `program` (a path or a name looked up in `PATH`),
/// or `None` when it can: a statically linked program has no dynamic loader to honour
/// `LD_PRELOAD`.
pub(crate) fn static_program(program: &std::ffi::OsStr) -> Option<String> {
    let path = find_program(program)?;
    let data = std::fs::read(&path).ok()?;
    use object::read::elf::{FileHeader, ProgramHeader};
    let header = object::elf::FileHeader64::<object::Endianness>::parse(&*data).ok()?;
    let endian = header.endian().ok()?;
    let headers = header.program_headers(endian, &*data).ok()?;
    let dynamic = headers.iter().any(|ph| ph.p_type(endian) == object::elf::PT_INTERP);
    (!dynamic).then(|| "it is statically linked, so the agent cannot be loaded into it".to_string())
}

/// `program` as the shell would find it.
fn find_program(program: &std::ffi::OsStr) -> Option<std::path::PathBuf> {
    if program.as_encoded_bytes().contains(&b'/') {
        return Some(Path::new(program).to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file())
}

/// The target of a started program.
pub(crate) fn command(command: &[OsString]) -> Target {
    Target::Command(command.to_vec())
}
