//! Probes driven from outside the process, as the kernel's uprobes are: an `int3` written
//! by `ptrace`, the hit handled by the tracer, the instruction run out of line. The
//! fallback of `dynprobe probe` for programs the in-process agent cannot be loaded into
//! (static binaries).
//!
//! [`run`] attaches to a process ([`Target::Pid`]: every thread, new ones followed) or
//! starts one ([`Target::Command`]: the probes are placed at its entry point, before its
//! first instruction), places the probes and handles every hit until the process ends,
//! executes a new image, or the control channel asks to detach. A started program that
//! executes a new image is followed into it (its specs placed again, those that do not
//! apply there a `!warning`), as the agent follows one through `LD_PRELOAD`; forked
//! children are not traced. It speaks the agent's line protocol on `out`:
//!
//! ```text
//! !ready <n>                   every probe placed
//! !error <spec>: <message>     a probe refused; nothing was placed (the program untouched)
//! <mono_ns> <tid> <event> name=value ...
//! !exited <status>             (new) the program exited with this status
//! !killed <signal>             (new) the program was killed by this signal number
//! !warning <text>              (new) a spec not placed in an image the program executed
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
//! CLI), the kernel detaches the threads but cannot remove the `int3`s. The program runs on
//! all the same: while probes are placed its `SIGTRAP` action is a handler the tracer left
//! in it, which sends every later hit through the out-of-line copy, puts the hijacked
//! return addresses back, and the original bytes too half a second later (see
//! `src/fallback.rs` for how, and for what it cannot do). Closing the control
//! descriptor (the CLI dying) is safe: `run` detaches cleanly.

mod control;
mod fallback;
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
use std::os::fd::BorrowedFd;

use dynprobe::line::EventFormat;
use dynprobe::spec::{ProbeKind, ProbeSpec};
use dynprobe_arch::native::{build_slot, relocate, INT3};
use dynprobe_remote::{find_syscall_instruction, sys, AttachError, Options, Stop, Tracee};
use dynprobe_symbols::SymbolTable;

use control::Control;
use fallback::{Fallback, SiteEntry};
use output::Output;
use scratch::SlotArea;
use tracer::{Site, State, Thread, Tracer};

pub use spawn::{measure_hit_ns, HitCost, BENCH_SOURCE};

/// What `!detached` says when the program executed a new image (the session is over, the
/// probes gone with the old image).
pub const EXEC_NOTE: &str = "the program executed a new image, which has none of the probes";

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
#[non_exhaustive]
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

/// The error this one wraps, where it wraps one (its message is part of this one's
/// `Display` too, which is complete on its own).
impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Attach(e) => Some(e),
            Error::Spawn { error, .. } | Error::Os { error, .. } => Some(error),
            _ => None,
        }
    }
}

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
pub fn run(
    target: Target,
    specs: &[ProbeSpec],
    out: BorrowedFd<'_>,
    control: BorrowedFd<'_>,
) -> Result<ExitInfo, Error> {
    // SAFETY: ignoring SIGPIPE only changes a write to a closed pipe from killing us (and
    // leaving int3s in the target) into an EPIPE error, which detaches cleanly.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let control = Control::start(control).map_err(|e| os(e, "starting the control thread"))?;
    let out = Output::new(out.try_clone_to_owned().map_err(|e| os(e, "duplicating the output descriptor"))?);
    let options = Options::TRACECLONE | Options::TRACEEXEC;
    let (pid, threads, spawned) = match &target {
        Target::Pid(pid) => (*pid, attach(*pid, options)?, false),
        Target::Command(argv) => {
            let pid = spawn::start(argv, options)?;
            if let Err(e) = spawn::run_to_entry(pid, &argv[0].to_string_lossy()) {
                // Our own child, which has not run an instruction of its own.
                kill(pid);
                let _ = sys::wait_thread(pid);
                return Err(e);
            }
            let mut threads = HashMap::new();
            threads.insert(pid, Thread::new(State::Stopped { signal: 0 }));
            (pid, threads, true)
        }
    };
    let mut tracer = Tracer::new(pid, threads, out)?;
    if let Err(e) = place_all(&mut tracer, specs) {
        if let Error::Refused { spec, message } = &e {
            tracer.out.line(format!("!error {spec}: {}\n", message.replace('\n', " ")).as_bytes());
        }
        tracer.out.flush();
        if spawned {
            // The program has not run a single instruction: it must not run without the
            // probes asked for (as with the agent).
            kill(pid);
            let _ = tracer.detach_all();
        } else {
            tracer.detach_all()?;
        }
        return Err(e);
    }
    tracer.out.line(format!("!ready {}\n", specs.len()).as_bytes());
    tracer.out.flush();
    tracer.follow_exec = spawned;
    let outcome = loop {
        tracer.resume_all();
        let outcome = tracer.run(&control)?;
        if !matches!(outcome, Outcome::Exec) || !tracer.follow_exec {
            break outcome;
        }
        let info = tracer.info;
        match follow_exec(tracer, specs)? {
            Some(next) => tracer = next,
            None => return Ok(ExitInfo { outcome, ..info }),
        }
    };
    match outcome {
        Outcome::Exited(code) => tracer.out.line(format!("!exited {code}\n").as_bytes()),
        Outcome::Killed(signal) => tracer.out.line(format!("!killed {signal}\n").as_bytes()),
        Outcome::Detached | Outcome::Exec => {}
    }
    tracer.out.flush();
    Ok(ExitInfo { outcome, ..tracer.info })
}

/// Goes on into the new image of a started program that executed one (as the agent
/// does through `LD_PRELOAD`): the process, in its exec stop, runs to the new
/// executable's entry point (its libraries mapped), and every spec that applies there is
/// placed again; one that does not (its module or symbol is not in the new image) is a
/// `!warning`, never the end of the session. `None` when nothing could be placed: the
/// process is detached and runs on unprobed.
fn follow_exec(old: Tracer, specs: &[ProbeSpec]) -> Result<Option<Tracer>, Error> {
    let (pid, info) = (old.pid, old.info);
    let Tracer { out, .. } = old;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| format!("process {pid}"));
    spawn::run_to_entry(pid, &exe)?;
    // A fresh tracer for each try: a refused `place_all` leaves the formats (and slot
    // areas) of the specs before the refused one, which would misname every later event.
    let fresh = |out: Output| -> Result<Tracer, Error> {
        let mut threads = HashMap::new();
        threads.insert(pid, Thread::new(State::Stopped { signal: 0 }));
        let mut tracer = Tracer::new(pid, threads, out)?;
        tracer.info = info;
        tracer.follow_exec = true;
        Ok(tracer)
    };
    let mut tracer = fresh(out)?;
    let mut left = specs.to_vec();
    while !left.is_empty() {
        match place_all(&mut tracer, &left) {
            Ok(()) => break,
            Err(Error::Refused { spec, message }) => {
                let Tracer { out, .. } = tracer;
                tracer = fresh(out)?;
                let why = message.replace('\n', " ");
                tracer
                    .out
                    .line(format!("!warning probe `{spec}` is not placed in `{exe}` (exec'd): {why}\n").as_bytes());
                let before = left.len();
                left.retain(|s| s.text != spec);
                if left.len() == before {
                    // Refused as a whole (its symbols unreadable): nothing applies.
                    left.clear();
                }
            }
            Err(e) => return Err(e),
        }
    }
    tracer.out.flush();
    if left.is_empty() {
        tracer.detach_all()?;
        tracer.out.line(format!("!detached {EXEC_NOTE}\n").as_bytes());
        tracer.out.flush();
        return Ok(None);
    }
    Ok(Some(tracer))
}

/// `SIGKILL` to the program dynprobe started, `pid`.
fn kill(pid: i32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
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
            Some(Stop::Interrupt) => {
                tracer::put_back_cut_call(pid, tid);
                State::Stopped { signal: 0 }
            }
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
                semaphores.extend(site.gates.iter().map(|&gate| (s, gate)));
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
    let addrs: Vec<u64> = points.iter().map(|(p, _, _)| p.addr).collect();
    for (point, _, _) in &mut points {
        point.yield_to(&addrs);
    }
    let spec_index: Vec<usize> = points.iter().map(|(_, s, _)| *s).collect();
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
    if sites.is_empty() {
        return Ok(());
    }
    let tid = stopped_thread(tracer)?;
    tracer.syscall_insn =
        find_syscall_instruction(&tracer.mem).map_err(|e| Error::Scratch { reason: e.to_string() })?;
    // The spec of a site's first probe, for a refusal.
    let spec_of = |entries: &[usize], returns: &[usize]| {
        specs[spec_index[entries.first().or(returns.first()).copied().unwrap_or(0)]].text.clone()
    };

    // The slots: one area per region of probed code, each within reach of its region.
    let spans: Vec<(u64, u64)> = sites.iter().map(|s| (s.0.addr, s.0.addr + s.0.bytes.len() as u64)).collect();
    let mut slot_of = vec![0u64; sites.len()];
    for region in scratch::regions(&spans) {
        let lo = region.iter().map(|&i| spans[i].0).min().expect("a region has sites");
        let hi = region.iter().map(|&i| spans[i].1).max().expect("a region has sites");
        let area = map_near(tracer, tid, SlotArea::len_for(region.len()), lo, hi)?;
        let mut slots = Vec::new();
        for (j, &i) in region.iter().enumerate() {
            let (point, entries, returns) = &sites[i];
            slot_of[i] = area.slot(j);
            let refused = |e: dynprobe_arch::native::RelocError| Error::Refused {
                spec: spec_of(entries, returns),
                message: e.to_string(),
            };
            let code = build_slot(&point.bytes, point.addr, slot_of[i], spans[i].1).map_err(refused)?;
            // Where a thread that reached an instruction inside the run continues (one held
            // there at attach, or returning there from a signal handler).
            for (old, new) in relocate(&point.bytes, point.addr, slot_of[i]).map_err(refused)?.offsets {
                if old > 0 {
                    tracer.inside.insert(point.addr + u64::from(old), slot_of[i] + u64::from(new));
                }
            }
            assert!(scratch::fits(&code), "a slot of {} bytes does not fit in {}", code.len(), scratch::SLOT_SIZE);
            slots.push(code);
        }
        tracer.mem.write(area.base, &area.image(&slots)).map_err(|e| os(e, "writing the out-of-line slots"))?;
        tracer.areas.push(area);
    }

    // The trampoline and the handler that outlives us (see `fallback`), installed as the
    // SIGTRAP action before the first int3 is written.
    let base = map_anywhere(tracer, tid, Fallback::len_for(sites.len()))?;
    let mut fallback = Fallback::at(base, sites.len());
    let addrs: Vec<u64> = sites.iter().map(|s| s.0.addr).collect();
    let prots = fallback::page_protections(tracer.pid, &addrs);
    let table: Vec<SiteEntry> = sites
        .iter()
        .zip(prots)
        .enumerate()
        .map(|(i, (s, prot))| SiteEntry { addr: s.0.addr, slot: slot_of[i], orig: s.0.bytes.clone(), prot })
        .collect();
    let code = fallback.code_image().map_err(|reason| Error::Scratch { reason })?;
    let data = fallback.data_image(&table);
    tracer.mem.write(fallback.code, &code).map_err(|e| os(e, "writing the fallback handler"))?;
    tracer.mem.write(fallback.data, &data).map_err(|e| os(e, "writing the fallback handler's tables"))?;
    let args = [
        fallback.data,
        fallback.len - (fallback.data - fallback.code),
        (libc::PROT_READ | libc::PROT_WRITE) as u64,
        0,
        0,
        0,
    ];
    tracer.syscall(tid, libc::SYS_mprotect, args).map_err(|e| os(e, "making the fallback's tables writable"))?;
    let install = fallback.install_args();
    tracer.fallback = Some(fallback);
    tracer
        .syscall(tid, libc::SYS_rt_sigaction, install)
        .map_err(|e| os(e, "installing the fallback SIGTRAP handler"))?;
    if let Some(f) = &mut tracer.fallback {
        f.installed = true;
    }

    // A thread stopped inside a run goes to the same place in the slot.
    let tids: Vec<i32> = tracer.threads.keys().copied().collect();
    for tid in tids {
        let Ok(mut regs) = dynprobe_remote::sys::get_regs(tid) else { continue };
        if let Some(&to) = tracer.inside.get(&regs.rip) {
            regs.rip = to;
            dynprobe_remote::sys::set_regs(tid, &regs).map_err(|e| os(e, "moving a thread out of a probed run"))?;
        }
    }
    for (i, (point, entries, returns)) in sites.into_iter().enumerate() {
        // The first byte first: from then on no thread enters the rest.
        let traps = vec![INT3; point.bytes.len()];
        let written = tracer
            .mem
            .replace(point.addr, &point.bytes[..1], &traps[..1])
            .and_then(|()| tracer.mem.replace(point.addr + 1, &point.bytes[1..], &traps[1..]));
        if let Err(e) = written {
            // Take back what is written, then refuse.
            let _ = tracer.mem.replace(point.addr, &traps[..1], &point.bytes[..1]);
            tracer.take_back_sites(tid);
            let spec = spec_of(&entries, &returns);
            return Err(Error::Refused { spec, message: format!("cannot write the breakpoint: {e}") });
        }
        tracer.site_at.insert(point.addr, i);
        tracer.sites.push(Site { addr: point.addr, orig: point.bytes, slot: slot_of[i], entries, returns });
    }
    raise_semaphores(tracer, tid, specs, &semaphores)
}

/// Raises the semaphore of every marker site that has one, the breakpoints being in (see
/// the `marker` module). On a refusal everything placed is taken back: a marker that
/// cannot fire is refused with the reason, never silently dead.
fn raise_semaphores(
    tracer: &mut Tracer,
    tid: i32,
    specs: &[ProbeSpec],
    semaphores: &[(usize, u64)],
) -> Result<(), Error> {
    for &(s, addr) in semaphores {
        if let Err(why) = marker::raise_semaphore(&tracer.mem, tracer.pid, addr) {
            tracer.lower_semaphores();
            tracer.take_back_sites(tid);
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

/// A thread of the target stopped by us (every thread is, while placing), to make system
/// calls on.
fn stopped_thread(tracer: &Tracer) -> Result<i32, Error> {
    tracer
        .threads
        .iter()
        .find(|(_, t)| t.state == State::Stopped { signal: 0 })
        .or_else(|| tracer.threads.iter().next())
        .map(|(&tid, _)| tid)
        .ok_or_else(|| Error::Scratch { reason: "the process has no thread left".into() })
}

/// Maps `len` bytes (read-execute) within reach of `lo..hi`, making the `mmap` system call
/// on stopped thread `tid` at a `syscall` instruction of the target's own.
fn map_near(tracer: &Tracer, tid: i32, len: u64, lo: u64, hi: u64) -> Result<SlotArea, Error> {
    let mut last = String::from("no candidate address");
    for hint in scratch::hints(lo, hi, len) {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
        let args = [hint, len, (libc::PROT_READ | libc::PROT_EXEC) as u64, flags as u64, u64::MAX, 0];
        let ret = match tracer.syscall(tid, libc::SYS_mmap, args) {
            Ok(ret) => ret,
            Err(e) if e.raw_os_error().is_some() => {
                last = e.to_string();
                continue;
            }
            Err(e) => return Err(os(e, "making the mmap system call in the target")),
        };
        if ret == hint {
            return Ok(SlotArea { base: ret, len });
        }
        // An old kernel took the flag for a plain hint and put it elsewhere.
        let _ = tracer.syscall(tid, libc::SYS_munmap, [ret, len, 0, 0, 0, 0]);
        last = format!("the kernel placed the page at {ret:#x} instead of {hint:#x}");
    }
    Err(Error::Scratch { reason: format!("{last} (for the code at {lo:#x}..{hi:#x})") })
}

/// Maps `len` bytes (read-execute) wherever the kernel likes, on stopped thread `tid`.
fn map_anywhere(tracer: &Tracer, tid: i32, len: u64) -> Result<u64, Error> {
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let args = [0, len, (libc::PROT_READ | libc::PROT_EXEC) as u64, flags, u64::MAX, 0];
    tracer.syscall(tid, libc::SYS_mmap, args).map_err(|e| Error::Scratch { reason: e.to_string() })
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
