//! Probes driven from outside the process, as the kernel's uprobes are: an `int3` written
//! by `ptrace`, the hit handled by the tracer, the instruction run out of line. The
//! fallback of `dynprobe probe` for programs the in-process agent cannot be loaded into
//! (static binaries).
//!
//! [`run`] attaches to a process ([`Target::Pid`]: every thread, new ones followed) or
//! starts one ([`Target::Command`]: the probes are placed at its `exec` stop, before its
//! first instruction), places the probes and handles every hit until the process ends,
//! executes a new image, or the control channel asks to detach. It speaks the agent's line
//! protocol on `out`:
//!
//! ```text
//! !ready <n>                   every probe placed
//! !error <spec>: <message>     a probe refused; nothing was placed (the program untouched)
//! <mono_ns> <tid> <event> name=value ...
//! !exited <status>             (new) the program exited with this status
//! !killed <signal>             (new) the program was killed by this signal number
//! !detached <why>              (new) the program executed a new image: probes gone, detached
//! ```
//!
//! A hit costs two context switches and a handful of `ptrace` calls (see
//! [`measure_hit_ns`]): microseconds, against the agent's nanoseconds.
//!
//! **Process rules.** `run` waits for *any* child (`waitpid(-1, __WALL)`, one blocking call
//! per hit instead of polling every thread), so it must run in a process whose other
//! children nobody else waits for — the CLI runs it in a child process of its own — and
//! only the calling thread may use `ptrace` on the target afterwards. It ignores `SIGPIPE`
//! and installs a no-op `SIGURG` handler (the control channel's wake-up).
//!
//! **If the tracer itself is killed** (`kill -9` of the process running `run`, not of the
//! CLI), the kernel detaches the threads but cannot remove the `int3`s: the next hit kills
//! the program with `SIGTRAP`, as with the kernel's own ptrace debuggers. Closing the
//! control descriptor (the CLI dying) is safe: `run` detaches cleanly.

mod control;
mod marker;
mod output;
mod place;
mod scratch;
mod shadow;
mod spawn;
mod tracer;

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::RawFd;

use dynprobe::line::EventFormat;
use dynprobe::spec::{ProbeKind, ProbeSpec};
use dynprobe_arch::native::{build_slot, INT3};
use dynprobe_remote::{find_syscall_instruction, AttachError, Options, Stop, Tracee};
use dynprobe_symbols::SymbolTable;

use control::Control;
use output::Output;
use scratch::Scratch;
use tracer::{Site, State, Thread, Tracer};

pub use spawn::{measure_hit_ns, HitCost, BENCH_SOURCE};

/// The process to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A running process: every thread is seized, new threads are followed.
    Pid(i32),
    /// A program to start (the first element is looked up in `PATH` when it has no `/`)
    /// with its arguments; the probes are placed before it runs its first instruction.
    Command(Vec<OsString>),
}

/// How a probing session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Detached on request (the control channel), or because `out` was closed; the process
    /// runs on with every byte restored.
    Detached,
    /// The process exited with this status.
    Exited(i32),
    /// The process was killed by this signal.
    Killed(i32),
    /// The process executed a new program; the probes went with the old image.
    Exec,
}

/// The outcome and the counts of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// How it ended.
    pub outcome: Outcome,
    /// Probe hits handled (entries and returns).
    pub hits: u64,
    /// Return probes not armed for a call: the thread's instance stack was full or its
    /// stack could not be written (the kernel's `nmissed`).
    pub missed_returns: u64,
    /// Return probes whose frame was left without returning (`longjmp`, an exception),
    /// dropped when a later return or call showed it abandoned.
    pub abandoned_returns: u64,
}

impl Default for ExitInfo {
    fn default() -> Self {
        ExitInfo { outcome: Outcome::Detached, hits: 0, missed_returns: 0, abandoned_returns: 0 }
    }
}

/// Why a session could not start or end cleanly.
#[derive(Debug)]
pub enum Error {
    /// The process could not be traced (no such process, not permitted — with the reason).
    Attach(AttachError),
    /// The program could not be started.
    Spawn {
        /// The program.
        program: String,
        /// Why.
        error: io::Error,
    },
    /// A probe was refused (also written to `out` as `!error`); nothing was placed.
    Refused {
        /// The spec as given.
        spec: String,
        /// Why.
        message: String,
    },
    /// The scratch page for the out-of-line slots could not be mapped near the code.
    Scratch {
        /// Why.
        reason: String,
    },
    /// A system call on the target failed.
    Os {
        /// What we were doing.
        what: String,
        /// The error.
        error: io::Error,
    },
    /// Detaching could not restore everything; each entry says what.
    Restore {
        /// What could not be restored.
        failures: Vec<String>,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Attach(e) => e.fmt(f),
            Error::Spawn { program, error } => write!(f, "cannot start `{program}`: {error}"),
            Error::Refused { spec, message } => write!(f, "{spec}: {message}"),
            Error::Scratch { reason } => {
                write!(f, "cannot map a page for the out-of-line copies within ±2 GiB of the probed code: {reason}")
            }
            Error::Os { what, error } => write!(f, "{what}: {error}"),
            Error::Restore { failures } => {
                write!(f, "detached, but could not restore everything: {}", failures.join("; "))
            }
        }
    }
}

impl std::error::Error for Error {}

impl From<AttachError> for Error {
    fn from(e: AttachError) -> Self {
        Error::Attach(e)
    }
}

/// How long attaching waits for every thread to stop.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Probes `target` with `specs` from outside (see the crate documentation): writes the
/// protocol lines to `out`, detaches when `control` says `detach` or is closed, and
/// returns how the session ended. Neither descriptor is closed.
pub fn run(target: Target, specs: &[ProbeSpec], out: RawFd, control: RawFd) -> Result<ExitInfo, Error> {
    // SAFETY: ignoring SIGPIPE only changes a write to a closed pipe from killing us (and
    // leaving int3s in the target) into an EPIPE error, which detaches cleanly.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let control = Control::start(control).map_err(|e| os(e, "starting the control thread"))?;
    let mut out = Output::new(out);
    let options = Options::TRACECLONE | Options::TRACEEXEC;
    let (pid, threads, spawned) = match &target {
        Target::Pid(pid) => (*pid, attach(*pid, options)?, false),
        Target::Command(argv) => {
            let pid = spawn::start(argv, options)?;
            let mut threads = HashMap::new();
            threads.insert(pid, Thread::new(State::Stopped { signal: 0 }));
            (pid, threads, true)
        }
    };
    let mut tracer = Tracer::new(pid, threads, out_take(&mut out))?;
    if let Err(e) = place_all(&mut tracer, specs) {
        if let Error::Refused { spec, message } = &e {
            tracer.out.line(format!("!error {spec}: {}\n", message.replace('\n', " ")).as_bytes());
        }
        tracer.out.flush();
        if spawned {
            // The program has not run a single instruction: it must not run without the
            // probes asked for (as with the agent).
            // SAFETY: kill of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = tracer.detach_all();
        } else {
            tracer.detach_all()?;
        }
        return Err(e);
    }
    tracer.out.line(format!("!ready {}\n", specs.len()).as_bytes());
    tracer.out.flush();
    tracer.resume_all();
    let outcome = tracer.run(&control)?;
    match outcome {
        Outcome::Exited(code) => tracer.out.line(format!("!exited {code}\n").as_bytes()),
        Outcome::Killed(signal) => tracer.out.line(format!("!killed {signal}\n").as_bytes()),
        Outcome::Detached | Outcome::Exec => {}
    }
    tracer.out.flush();
    Ok(ExitInfo { outcome, ..tracer.info })
}

fn out_take(out: &mut Output) -> Output {
    std::mem::replace(out, Output::new(-1))
}

fn os(error: io::Error, what: &str) -> Error {
    Error::Os { what: what.to_string(), error }
}

/// Seizes every thread of `pid` (with `dynprobe-remote`'s diagnostics when that is not
/// allowed) and stops them all; from then on the tracer's own loop owns them.
fn attach(pid: i32, options: Options) -> Result<HashMap<i32, Thread>, Error> {
    let mut tracee = Tracee::seize(pid, options)?;
    tracee
        .stop_all(STOP_TIMEOUT)
        .map_err(|e| Error::Os { what: format!("stopping process {pid}"), error: io::Error::other(e.to_string()) })?;
    // The threads stay seized and stopped: the tracer's loop takes them over with one
    // blocking waitpid per hit, where the Tracee polls thread by thread.
    let mut threads = HashMap::new();
    for (tid, stop) in tracee.into_threads() {
        let state = match stop {
            Some(Stop::Signal { signal, .. }) => State::Stopped { signal },
            Some(_) => State::Stopped { signal: 0 },
            // A thread cloned while stopping the others: its first stop comes to the loop.
            None => State::Running,
        };
        threads.insert(tid, Thread::new(state));
    }
    Ok(threads)
}

/// Resolves every spec, maps the scratch page, writes the slots and then the `int3`s. On
/// error nothing stays written (the scratch page, unused, stays mapped).
fn place_all(tracer: &mut Tracer, specs: &[ProbeSpec]) -> Result<(), Error> {
    let table = SymbolTable::for_pid(tracer.pid).map_err(|e| Error::Refused {
        spec: specs.first().map(|s| s.text.clone()).unwrap_or_default(),
        message: e.to_string(),
    })?;
    let mem = &tracer.mem;
    let read = |addr: u64, len: usize| mem.read_vec(addr, len).map_err(|e| e.to_string());
    // Per probe (a marker spec has one per site): where, which spec, its kind.
    let mut points = Vec::new();
    let mut semaphores = Vec::new();
    for (s, spec) in specs.iter().enumerate() {
        let refused = |message: String| Error::Refused { spec: spec.text.clone(), message };
        if spec.kind == ProbeKind::Marker {
            for site in marker::resolve(&table, spec, &read).map_err(refused)? {
                tracer.formats.push(site.format);
                points.push((site.point, s, ProbeKind::Entry));
                semaphores.extend((site.semaphore != 0).then_some((s, site.semaphore)));
            }
            continue;
        }
        let point = place::resolve(&table, spec, &read).map_err(refused)?;
        let mut resolved = spec.clone();
        resolved.resolve_symbols(|name| place::lookup_address(&table, name)).map_err(refused)?;
        tracer.formats.push(EventFormat::new(&resolved).map_err(refused)?);
        points.push((point, s, spec.kind));
    }
    // One site per address, shared by every probe there.
    let mut sites: Vec<(place::Point, Vec<usize>, Vec<usize>)> = Vec::new();
    let spec_of: Vec<usize> = points.iter().map(|(_, s, _)| *s).collect();
    for (i, (point, _, kind)) in points.into_iter().enumerate() {
        let index = match sites.iter().position(|(p, _, _)| p.addr == point.addr) {
            Some(index) => index,
            None => {
                sites.push((point, Vec::new(), Vec::new()));
                sites.len() - 1
            }
        };
        match kind {
            ProbeKind::Return => sites[index].2.push(i),
            ProbeKind::Entry | ProbeKind::Marker => sites[index].1.push(i),
        }
    }
    // The spec of probe `p`, for a refusal.
    let spec_text = |p: usize| specs[spec_of[p]].text.clone();
    if sites.is_empty() {
        return Ok(());
    }
    let lo = sites.iter().map(|s| s.0.addr).min().expect("not empty");
    let hi = sites.iter().map(|s| s.0.insn.end()).max().expect("not empty");
    tracer.scratch = map_scratch(tracer, sites.len(), lo, hi)?;
    let mut slots = Vec::new();
    for (i, (point, _, _)) in sites.iter().enumerate() {
        let slot_ip = tracer.scratch.slot(i);
        let code = build_slot(&point.bytes, point.addr, slot_ip, point.insn.end()).map_err(|e| Error::Refused {
            spec: spec_text(sites[i].1.first().or(sites[i].2.first()).copied().unwrap_or(0)),
            message: e.to_string(),
        })?;
        assert!(scratch::fits(&code), "a slot of {} bytes does not fit in {}", code.len(), scratch::SLOT_SIZE);
        slots.push(code);
    }
    let image = tracer.scratch.image(&slots);
    tracer.mem.write(tracer.scratch.base, &image).map_err(|e| os(e, "writing the out-of-line slots"))?;
    for (i, (point, entries, returns)) in sites.into_iter().enumerate() {
        if let Err(e) = tracer.mem.replace(point.addr, &point.bytes[..1], &[INT3]) {
            // Take back what is written, then refuse.
            for site in &tracer.sites {
                let _ = tracer.mem.replace(site.addr, &[INT3], &[site.orig]);
            }
            tracer.sites.clear();
            tracer.site_at.clear();
            let spec = spec_text(entries.first().or(returns.first()).copied().unwrap_or(0));
            return Err(Error::Refused { spec, message: format!("cannot write the breakpoint: {e}") });
        }
        tracer.site_at.insert(point.addr, i);
        tracer.sites.push(Site {
            addr: point.addr,
            orig: point.bytes[0],
            slot: tracer.scratch.slot(i),
            entries,
            returns,
        });
    }
    raise_semaphores(tracer, specs, &semaphores)
}

/// Raises the semaphore of every marker site that has one, the breakpoints being in (see
/// the `marker` module). On a refusal everything placed is taken back: a marker that
/// cannot fire is refused with the reason, never silently dead.
fn raise_semaphores(tracer: &mut Tracer, specs: &[ProbeSpec], semaphores: &[(usize, u64)]) -> Result<(), Error> {
    for &(s, addr) in semaphores {
        if let Err(why) = marker::raise_semaphore(&tracer.mem, tracer.pid, addr) {
            tracer.lower_semaphores();
            for site in &tracer.sites {
                let _ = tracer.mem.replace(site.addr, &[INT3], &[site.orig]);
            }
            tracer.sites.clear();
            tracer.site_at.clear();
            let marker = match &specs[s].location {
                dynprobe::spec::Target::Marker(marker) => marker.as_str(),
                dynprobe::spec::Target::Code(_) => "?",
            };
            return Err(Error::Refused {
                spec: specs[s].text.clone(),
                message: format!("marker `{marker}` cannot fire: {why}"),
            });
        }
        tracer.semaphores.push(addr);
    }
    Ok(())
}

/// Maps the scratch area within reach of `lo..hi`, making the `mmap` system call on a
/// stopped thread of the target (every thread is stopped) at a `syscall` instruction of
/// its own.
fn map_scratch(tracer: &Tracer, slots: usize, lo: u64, hi: u64) -> Result<Scratch, Error> {
    let len = Scratch::len_for(slots);
    let tid = tracer
        .threads
        .iter()
        .find(|(_, t)| t.state == State::Stopped { signal: 0 })
        .or_else(|| tracer.threads.iter().next())
        .map(|(&tid, _)| tid)
        .ok_or_else(|| Error::Scratch { reason: "the process has no thread left".into() })?;
    let insn = find_syscall_instruction(&tracer.mem).map_err(|e| Error::Scratch { reason: e.to_string() })?;
    let syscall = |nr: i64, args| spawn::remote_syscall(tracer.pid, tid, insn, nr as u64, args);
    let mut last = String::from("no candidate address");
    for hint in scratch::hints(lo, hi, len) {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
        let args = [hint, len, (libc::PROT_READ | libc::PROT_EXEC) as u64, flags as u64, u64::MAX, 0];
        let ret = syscall(libc::SYS_mmap, args).map_err(|e| os(e, "making the mmap system call in the target"))?;
        if (ret as i64) < 0 && (ret as i64) > -4096 {
            last = io::Error::from_raw_os_error(-(ret as i64) as i32).to_string();
            continue;
        }
        if ret == hint {
            return Ok(Scratch { base: ret, len });
        }
        // An old kernel took the flag for a plain hint and put it elsewhere.
        let _ = syscall(libc::SYS_munmap, [ret, len, 0, 0, 0, 0]);
        last = format!("the kernel placed the page at {ret:#x} instead of {hint:#x}");
    }
    Err(Error::Scratch { reason: last })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_their_cause() {
        let e = Error::Refused { spec: "p:wrok".into(), message: "unknown symbol `wrok`".into() };
        assert_eq!(e.to_string(), "p:wrok: unknown symbol `wrok`");
        let e = Error::Scratch { reason: "out of memory".into() };
        assert!(e.to_string().contains("±2 GiB"), "{e}");
    }
}
