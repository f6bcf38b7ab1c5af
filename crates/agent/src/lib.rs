//! The dynprobe agent: a library the CLI preloads into the program it starts
//! (`LD_PRELOAD`), which places the requested probes before `main` runs and streams one
//! line per hit back to the CLI.
//!
//! The protocol, on the pipe whose write end is `DYNPROBE_EVENT_FD`:
//!
//! ```text
//! !pending <spec>: <why>            its library is not loaded yet: placed when a dlopen loads it
//! !ready <n>                        every other probe of DYNPROBE_PROBES is placed; main runs next
//! !error <spec>: <message>          a probe was refused; none is left placed and the
//!                                   program exits with status 127 before main (after
//!                                   !ready: a pending probe refused once its library came)
//! !placed <spec>                    a pending probe was placed, its library loaded
//! !warning <text>                   something the user should know
//! <mono_ns> <tid> <event> name=value...   one hit (CLOCK_MONOTONIC nanoseconds)
//! ```
//!
//! Loaded into a running process by `dynprobe probe -p PID` instead, the agent does
//! nothing at load time; the CLI then calls its `dynprobe_attach` (the `attach` module).
//!
//! `DYNPROBE_PROBES` holds the specs, one a line, in the grammar of [`dynprobe::spec`];
//! `DYNPROBE_OPTIMIZE=0` keeps them breakpoint probes.
//!
//! With `DYNPROBE_RECORD` set instead, the agent traces functions for `dynprobe record`
//! (see the `record` module): `!ready <sites patched>` or `!error <message>` on the pipe.

mod attach;
mod channel;
mod dlopen;
mod event;
mod marker;
mod place;
mod probes;
mod record;

use channel::Channel;
// The line writer lives in `dynprobe`, shared with every backend; `crate::line` keeps
// naming it here.
use dlopen::ModuleWatch;
use dynprobe::line;
use probes::{ProbeSet, Report};
use std::sync::{Arc, Mutex};

/// The environment variable holding the probe specs, one a line.
pub const PROBES_ENV: &str = "DYNPROBE_PROBES";
/// `0` keeps every probe a breakpoint probe (`dynprobe probe --no-optimize`).
pub const OPTIMIZE_ENV: &str = "DYNPROBE_OPTIMIZE";
/// The environment variable holding the event pipe's file descriptor.
pub const EVENT_FD_ENV: &str = "DYNPROBE_EVENT_FD";

/// The exit status when probes cannot be placed: the shell's "command could not run".
pub(crate) const EXIT_NOT_RUN: libc::c_int = 127;

/// Run by the dynamic loader when the agent is loaded, after libc is initialized and
/// before the program's `main`: the probes are in place before any of its code runs.
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

extern "C" fn init() {
    // Unwinding out of an `extern "C"` function aborts; a panic here is a bug in dynprobe,
    // so report it like a refused probe rather than dying with SIGABRT.
    let paused = ProfTimerPause::new();
    // The agent's own calls on the program's main thread (allocations, reading symbol
    // tables, the optimizer's pass) are not the program's: no probe sees them.
    dynprobe::own_thread::set_current_thread_hidden(true);
    let result = std::panic::catch_unwind(start);
    dynprobe::own_thread::set_current_thread_hidden(false);
    drop(paused);
    if result.is_err() {
        eprintln!("dynprobe agent: internal error while placing probes");
        // SAFETY: _exit ends the process at once; nothing of ours needs cleanup.
        unsafe { libc::_exit(EXIT_NOT_RUN) };
    }
}

/// Reads and removes the agent's environment, then places the probes.
fn start() {
    // Removed so that programs this one starts do not inherit them (they would inherit
    // `LD_PRELOAD` too, but an agent without DYNPROBE_PROBES does nothing). The loader
    // runs constructors on one thread, so changing the environment here races with no one.
    let probes = take_env(PROBES_ENV);
    let fd = take_env(EVENT_FD_ENV);
    // Record mode keeps its own settings in the environment: a program this one execs is
    // traced too.
    let record = std::env::var(record::RECORD_ENV).ok();
    let optimize = match record {
        Some(_) => std::env::var(OPTIMIZE_ENV).ok(),
        None => take_env(OPTIMIZE_ENV),
    };
    if optimize.as_deref() == Some("0") {
        // Only fails inside a handler, which the loader's constructor is not.
        let _ = dynprobe::set_optimization(false);
    }
    if let Some(dir) = record {
        let channel = fd.as_deref().and_then(|fd| fd.parse().ok()).and_then(|fd| Channel::new(fd).ok());
        return record::start(&dir, channel);
    }
    let Some(probes) = probes else { return };
    let channel = match fd.as_deref().map(str::parse) {
        Some(Ok(fd)) => Channel::new(fd),
        _ => Err(format!("{EVENT_FD_ENV} is missing or not a number")),
    };
    let channel = channel.unwrap_or_else(|message| {
        // Without a channel there is no CLI to tell; stderr is the only way left.
        eprintln!("dynprobe agent: {message}; the program was not run");
        // SAFETY: _exit ends the process at once, before main, as intended.
        unsafe { libc::_exit(EXIT_NOT_RUN) }
    });
    match ProbeSet::place_all(probes.lines(), channel) {
        Ok(set) => {
            let n = set.placed();
            let pending = set.pending_lines();
            let set = Arc::new(Mutex::new(set));
            let report: Report = Box::new(move |line| channel.send(format!("{line}\n").as_bytes()));
            match ProbeSet::watch_pending(&set, report) {
                Ok(watch) => watch.into_iter().for_each(ModuleWatch::keep),
                Err(why) => channel
                    .send(format!("!warning the probes waiting for a library will not be placed: {why}\n").as_bytes()),
            }
            // Only this thread exists yet, so jump-optimizing now costs no stop of anyone
            // and the program's first hits are already nanosecond ones. A probe that cannot
            // be optimized keeps working as a breakpoint.
            let _ = dynprobe::wait_for_optimizer();
            // The probes stay for the process's life (the watch holds the set too).
            std::mem::forget(set);
            pending.iter().for_each(|line| channel.send(format!("{line}\n").as_bytes()));
            channel.send(format!("!ready {n}\n").as_bytes());
        }
        Err(refused) => {
            channel.send(format!("!error {refused}\n").as_bytes());
            // SAFETY: _exit ends the process before main ran, which is the point: the
            // program must not run without the probes the user asked for.
            unsafe { libc::_exit(EXIT_NOT_RUN) };
        }
    }
}

/// A `-pg` program that `exec`s leaves its profiling timer (`ITIMER_PROF`, which survives
/// `execve`) armed for the new image, whose `SIGPROF` is back to the default action —
/// terminate — until its own start-up code installs a handler. The agent runs before that
/// code and takes long enough to be hit, so it stops such a timer while it works and
/// re-arms it afterwards.
struct ProfTimerPause(Option<libc::itimerval>);

impl ProfTimerPause {
    fn new() -> ProfTimerPause {
        // SAFETY: plain system calls on local structs.
        unsafe {
            let mut timer: libc::itimerval = std::mem::zeroed();
            let mut action: libc::sigaction = std::mem::zeroed();
            let armed = libc::getitimer(libc::ITIMER_PROF, &mut timer) == 0
                && (timer.it_value.tv_sec != 0 || timer.it_value.tv_usec != 0);
            if !armed
                || libc::sigaction(libc::SIGPROF, std::ptr::null(), &mut action) != 0
                || action.sa_sigaction != libc::SIG_DFL
            {
                return ProfTimerPause(None);
            }
            let off: libc::itimerval = std::mem::zeroed();
            libc::setitimer(libc::ITIMER_PROF, &off, std::ptr::null_mut());
            ProfTimerPause(Some(timer))
        }
    }
}

impl Drop for ProfTimerPause {
    fn drop(&mut self) {
        if let Some(timer) = &self.0 {
            // SAFETY: re-arms the timer with the value read in `new`.
            unsafe { libc::setitimer(libc::ITIMER_PROF, timer, std::ptr::null_mut()) };
        }
    }
}

/// The variable's value, removed from the environment. An unset variable is left alone:
/// loaded into a running process (attach mode), the agent's constructor runs on a thread
/// the CLI interrupted, maybe inside `setenv` holding the C library's environment lock.
fn take_env(name: &str) -> Option<String> {
    let value = std::env::var(name).ok();
    if value.is_some() {
        std::env::remove_var(name);
    }
    value
}
