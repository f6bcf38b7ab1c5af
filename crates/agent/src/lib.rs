//! The dynprobe agent: a library the CLI preloads into the program it starts
//! (`LD_PRELOAD`), which places the requested probes before `main` runs and streams one
//! line per hit back to the CLI.
//!
//! The protocol, on the stream socket whose write end is `DYNPROBE_EVENT_FD`:
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
//! The settings stay in the environment and the socket stays open across `exec`, so a
//! program the started one (or any child of it) `exec`s is probed too, into the same socket
//! (`bash -c 'exec …'`, `env`, `nice`, `timeout`, a pyenv shim). Only the first image's
//! refusals are fatal (it finds and removes `DYNPROBE_FIRST_IMAGE`); a later image places
//! each spec it can and reports the others as `!warning probe SPEC is not placed in
//! EXE (exec'd): WHY`. `DYNPROBE_EVENT_PIPE` (the channel's inode number) lets a later
//! image check that its descriptor is still the socket: a program may have closed it first.
//!
//! With `DYNPROBE_RECORD` set instead, the agent traces functions for `dynprobe record`
//! (see the `record` module): `!ready <sites patched>` or `!error <message>` on the socket.

mod attach;
mod channel;
mod dlopen;
mod event;
mod heap;
mod marker;
mod mem;
mod place;
mod probes;
mod record;
mod values;

use channel::Channel;
// The line writer lives in `dynprobe`, shared with every backend; `crate::line` keeps
// naming it here.
use dlopen::ModuleWatch;
use dynprobe::line;
use probes::{ProbeSet, Report};
use std::ffi::CStr;
use std::sync::{Arc, Mutex};

/// The environment variable holding the probe specs, one a line.
pub const PROBES_ENV: &str = "DYNPROBE_PROBES";
/// `0` keeps every probe a breakpoint probe (`dynprobe probe --no-optimize`).
pub const OPTIMIZE_ENV: &str = "DYNPROBE_OPTIMIZE";
/// The environment variable holding the event socket's file descriptor.
pub const EVENT_FD_ENV: &str = "DYNPROBE_EVENT_FD";
/// The event channel's inode number: an image `exec`'d later checks that its descriptor
/// is still that channel.
pub const EVENT_PIPE_ENV: &str = "DYNPROBE_EVENT_PIPE";
/// Set by the CLI for the program it starts; that image's agent removes it, so an image
/// `exec`'d later knows it is not the first (its refusals are warnings, not fatal).
pub const FIRST_IMAGE_ENV: &str = "DYNPROBE_FIRST_IMAGE";

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
    dynprobe_probe::own_thread::set_current_thread_hidden(true);
    let result = std::panic::catch_unwind(|| {
        if preloaded() {
            start();
            carry_environment();
        }
    });
    dynprobe_probe::own_thread::set_current_thread_hidden(false);
    drop(paused);
    if result.is_err() {
        eprintln!("dynprobe agent: internal error while placing probes");
        // SAFETY: _exit ends the process at once; nothing of ours needs cleanup.
        unsafe { libc::_exit(EXIT_NOT_RUN) };
    }
}

/// Reads the agent's environment, then places the probes (or starts recording).
///
/// Only for a program dynprobe started (the library preloaded): loaded by `dynprobe probe
/// -p` into a running process, the environment it has may still hold the settings of a
/// `dynprobe probe` that started one of its ancestors, which are not for this session (it
/// is set up through `dynprobe_attach`).
fn start() {
    // Removed by the first image only: the images its processes `exec` later find it gone.
    let first = take_env(FIRST_IMAGE_ENV).is_some();
    let pipe = std::env::var(EVENT_PIPE_ENV).ok().and_then(|ino| ino.parse().ok());
    if let Ok(dir) = std::env::var(record::RECORD_ENV) {
        // Record mode keeps its own settings in the environment (a program this one execs
        // is traced too); only the first image reports to the CLI.
        let fd = take_env(EVENT_FD_ENV);
        if std::env::var(OPTIMIZE_ENV).as_deref() == Ok("0") {
            // Only fails inside a handler, which the loader's constructor is not.
            let _ = dynprobe::set_optimization(false);
        }
        let channel = fd.as_deref().and_then(|fd| fd.parse().ok()).and_then(|fd| Channel::new(fd).ok());
        return record::start(&dir, channel);
    }
    // Probe mode keeps its settings in the environment too, and the event socket open across
    // `exec`: a program this one (or a child of it) execs is probed into the same output.
    let Ok(probes) = std::env::var(PROBES_ENV) else { return };
    if std::env::var(OPTIMIZE_ENV).as_deref() == Ok("0") {
        let _ = dynprobe::set_optimization(false);
    }
    let channel = match std::env::var(EVENT_FD_ENV).map(|fd| fd.parse()) {
        Ok(Ok(fd)) => Channel::inherited(fd, pipe),
        _ => Err(format!("{EVENT_FD_ENV} is missing or not a number")),
    };
    match (channel, first) {
        (Ok(channel), true) => place_first(&probes, channel),
        (Ok(channel), false) => place_exec(&probes, channel),
        (Err(message), true) => {
            // Without a channel there is no CLI to tell; stderr is the only way left.
            eprintln!("dynprobe agent: {message}; the program was not run");
            // SAFETY: _exit ends the process at once, before main, as intended.
            unsafe { libc::_exit(EXIT_NOT_RUN) }
        }
        // A program exec'd further down cannot reach the CLI: it runs unprobed, and says so.
        (Err(message), false) => eprintln!("dynprobe agent: `{}` is not probed: {message}", exe_name()),
    }
}

/// The first image (the program `dynprobe probe` started): every probe is placed before
/// `main`, or none and the program does not run.
fn place_first(probes: &str, channel: Channel) {
    match ProbeSet::place_all(probes.lines(), channel) {
        Ok(set) => {
            let n = set.placed();
            let pending = set.pending_lines();
            keep(set, channel);
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

/// An image a probed program (or a child of it) `exec`'d: the probes are placed again in
/// the new program, each on its own. One whose symbol it lacks (a probe meant for the
/// wrapper that ran it) is reported as a warning, and the program runs with the others;
/// one waiting for its library was reported by the first image already.
fn place_exec(probes: &str, channel: Channel) {
    let exe = exe_name();
    let refused = |spec: &str, why: &str| {
        let why = why.replace('\n', " ");
        channel.send(format!("!warning probe `{spec}` is not placed in `{exe}` (exec'd): {why}\n").as_bytes());
    };
    keep(ProbeSet::place_each(probes.lines(), channel, &refused), channel);
}

/// Keeps `set` for the process's life: the probes waiting for a library are placed when a
/// `dlopen` brings it, and every probe becomes a jump before `main`.
fn keep(set: ProbeSet, channel: Channel) {
    let set = Arc::new(Mutex::new(set));
    let report: Report = Box::new(move |line| channel.send(format!("{line}\n").as_bytes()));
    match ProbeSet::watch_pending(&set, report) {
        Ok(watch) => watch.into_iter().for_each(ModuleWatch::keep),
        Err(why) => {
            channel.send(format!("!warning the probes waiting for a library will not be placed: {why}\n").as_bytes())
        }
    }
    // Only this thread exists yet, so jump-optimizing now costs no stop of anyone and the
    // program's first hits are already nanosecond ones. A probe that cannot be optimized
    // keeps working as a breakpoint.
    let _ = dynprobe::wait_for_optimizer();
    // The probes stay for the process's life (the watch holds the set too).
    std::mem::forget(set);
}

/// Whether the dynamic loader loaded this library for `LD_PRELOAD` (a program dynprobe
/// started, or one that program ran) rather than for a `dlopen` an attaching CLI made the
/// process call. When the loader cannot say, the environment decides as before.
fn preloaded() -> bool {
    let Some(me) = own_path() else { return true };
    // The loader splits LD_PRELOAD at colons and spaces (ld.so(8)).
    std::env::var_os("LD_PRELOAD")
        .is_some_and(|preload| preload.as_encoded_bytes().split(|&b| b == b':' || b == b' ').any(|path| path == me))
}

/// The path the loader loaded this library by, when it can say.
pub(crate) fn own_path() -> Option<&'static [u8]> {
    // SAFETY: `Dl_info` is plain data that dladdr fills; `init` is a function of this
    // library, so the answer names its file.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::dladdr(init as *const libc::c_void, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr gave a NUL-terminated name that lives as long as the library.
    Some(unsafe { CStr::from_ptr(info.dli_fname) }.to_bytes())
}

/// The variables the CLI gives a program it starts (a user's own `DYNPROBE_*` variables are
/// not among them, and stay).
const SETTINGS: [&str; 10] = [
    PROBES_ENV,
    OPTIMIZE_ENV,
    EVENT_FD_ENV,
    EVENT_PIPE_ENV,
    FIRST_IMAGE_ENV,
    record::RECORD_ENV,
    record::FILTER_ENV,
    record::DEPTH_ENV,
    record::MARKERS_ENV,
    record::RING_RECORDS_ENV,
];

/// Hands dynprobe's variables (`LD_PRELOAD`, the [`SETTINGS`]) to the `execve` guard, which
/// gives them to every image the program `exec`s whatever environment it passes (`env -i`
/// included), and takes them out of the program's environment, which is left as the user
/// started it (`LD_PRELOAD` holding only the user's own preloads): the program's `env`,
/// `getenv` and children see no trace of dynprobe. Only with the guards in place: without
/// the `execve` guard the variables must stay for the `exec`s to inherit.
fn carry_environment() {
    if !dynprobe_probe::signal_guards_placed() || dynprobe_probe::guard_failure().is_some() {
        return;
    }
    let Some(agent) = own_path() else { return };
    let ours: Vec<(String, std::ffi::OsString)> = std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value)))
        .filter(|(name, _)| name == "LD_PRELOAD" || SETTINGS.contains(&name.as_str()))
        .collect();
    // An environment without LD_PRELOAD gets the agent alone: the user's own preloads are
    // not the program's to pass where it passes none.
    let entries = ours
        .iter()
        .filter_map(|(name, value)| {
            let mut entry = format!("{name}=").into_bytes();
            entry.extend_from_slice(if name == "LD_PRELOAD" { agent } else { value.as_encoded_bytes() });
            std::ffi::CString::new(entry).ok()
        })
        .collect();
    // A recording's images carry it only while its ring directory's recording file is
    // there (`dynprobe_events::ending`): a process that outlives the recording execs
    // untraced.
    let alive_while = ours.iter().find(|(name, _)| name == record::RECORD_ENV).and_then(|(_, dir)| {
        let live = std::path::Path::new(dir).join(dynprobe_events::ending::RECORDING_FILE);
        std::ffi::CString::new(live.into_os_string().into_encoded_bytes()).ok()
    });
    dynprobe_probe::carry_into_exec(entries, std::ffi::CString::new(agent).expect("a C string's bytes"), alive_while);
    for (name, value) in &ours {
        if name != "LD_PRELOAD" {
            take_env(name);
            continue;
        }
        // The loader splits LD_PRELOAD at colons and spaces (ld.so(8)).
        let own: Vec<&[u8]> = value
            .as_encoded_bytes()
            .split(|&b| b == b':' || b == b' ')
            .filter(|path| !path.is_empty() && *path != agent)
            .collect();
        if own.is_empty() {
            take_env(name);
        } else {
            replace_env(name, &own.join(&b':'));
        }
    }
}

/// This process's executable, for messages.
fn exe_name() -> String {
    std::fs::read_link("/proc/self/exe").map_or_else(|_| "?".to_string(), |p| p.display().to_string())
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
///
/// The entry is taken out of the `environ` array in place, as glibc's `unsetenv` does,
/// rather than through `unsetenv`: bash defines its own `unsetenv`, which before bash's
/// `main` has run changes nothing, and bash's `main` then exports the whole `environ` to
/// every program it runs. The loader runs constructors on one thread, so nothing else
/// reads the array meanwhile.
fn take_env(name: &str) -> Option<String> {
    let value = std::env::var(name).ok()?;
    // SAFETY: `environ` is the C library's NULL-terminated array of NUL-terminated
    // strings; entries are only moved down within it (never past its terminator), on the
    // only thread running (see above).
    unsafe {
        let mut read = environ;
        let mut write = environ;
        while !read.is_null() && !(*read).is_null() {
            let entry = CStr::from_ptr(*read).to_bytes();
            let named = entry.strip_prefix(name.as_bytes()).is_some_and(|rest| rest.first() == Some(&b'='));
            if !named {
                *write = *read;
                write = write.add(1);
            }
            read = read.add(1);
        }
        if !write.is_null() {
            *write = std::ptr::null_mut();
        }
    }
    Some(value)
}

/// Gives the variable `name` the value `value` in the `environ` array, in place (see
/// [`take_env`] for why not `setenv`). The new string is leaked: the environment keeps it.
fn replace_env(name: &str, value: &[u8]) {
    let mut entry = format!("{name}=").into_bytes();
    entry.extend_from_slice(value);
    let Ok(entry) = std::ffi::CString::new(entry) else { return };
    let entry = entry.into_raw();
    // SAFETY: as in `take_env`: the C library's NULL-terminated array, on the only thread
    // running; one pointer is replaced by a string that lives forever.
    unsafe {
        let mut at = environ;
        while !at.is_null() && !(*at).is_null() {
            let current = CStr::from_ptr(*at).to_bytes();
            if current.strip_prefix(name.as_bytes()).is_some_and(|rest| rest.first() == Some(&b'=')) {
                *at = entry;
                return;
            }
            at = at.add(1);
        }
    }
}

extern "C" {
    /// The process's environment (environ(7)).
    static mut environ: *mut *mut std::ffi::c_char;
}
