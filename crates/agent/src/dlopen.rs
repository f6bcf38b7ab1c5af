//! Record mode's watch for libraries loaded after start: `-F 'libfoo:*'` for a library the
//! program `dlopen`s later, or `-F '*:name'`, reaches it once it is there.
//!
//! A return probe on `dlopen` (and `dlmopen`) asks a thread of the agent's, untraced, to
//! choose the new libraries' functions with the same patterns and add them to the tracer in
//! one batch, appending to the image's function list (and rewriting its site summary) so
//! that the recorder picks them up — and waits for it before `dlopen` returns: the program's
//! first call into the library is traced. (Its constructors, run inside `dlopen`, are not.)
//! The return handler runs from the return trampoline, not a signal handler, so the
//! watcher's stop of the other threads reaches it while it waits.

use crate::record::{function_list, site_list};
use dynprobe_ftrace::{Filter, Selection, Tracer};
use std::collections::HashSet;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a `dlopen` waits for the watcher before it returns anyway.
const WAIT_FOR_WATCHER: Duration = Duration::from_secs(5);

/// `dlopen`s that returned so far, and how many of them the watcher has handled.
static REQUESTED: AtomicU64 = AtomicU64::new(0);
static HANDLED: AtomicU64 = AtomicU64::new(0);
/// The process the watcher thread runs in: a forked child has no watcher (threads do not
/// survive `fork`), so its `dlopen`s do not wait (their libraries are not traced).
static WATCHER_PID: AtomicI32 = AtomicI32::new(0);

/// Starts watching; keeps `tracer` for the rest of the process's life (also when watching
/// cannot start: tracing goes on without it).
pub fn watch(
    tracer: Tracer,
    filter: Filter,
    mut known: HashSet<PathBuf>,
    funcs: PathBuf,
    sites: PathBuf,
    exe: PathBuf,
) -> Result<(), String> {
    let tracer: &'static mut Tracer = Box::leak(Box::new(tracer));
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 stores.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } == -1 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned these descriptors, owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let wake = write.as_raw_fd();
    std::mem::forget(write);
    for name in [c"dlopen", c"dlmopen"] {
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks it up.
        let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as u64;
        if addr == 0 {
            continue;
        }
        let probe = dynprobe::ReturnProbe::at(addr).on_return(move |_, _| wait_for_watcher(wake));
        let handle = probe.register().map_err(|e| format!("cannot probe {}'s return: {e}", name.to_string_lossy()))?;
        handle.leak();
    }
    // SAFETY: getpid cannot fail.
    WATCHER_PID.store(unsafe { libc::getpid() }, Ordering::Relaxed);
    let spawned = std::thread::Builder::new().name("dynprobe-dlopen".into()).spawn(move || {
        dynprobe::set_current_thread_traced(false);
        loop {
            if !wait_for_change(&read) {
                return;
            }
            let requested = REQUESTED.load(Ordering::Acquire);
            if let Err(e) = add_new_modules(tracer, &filter, &mut known, &funcs, &sites, &exe) {
                eprintln!("dynprobe agent: a library loaded later is not traced: {e}");
            }
            HANDLED.store(requested, Ordering::Release);
        }
    });
    spawned.map(drop).map_err(|e| format!("cannot start the watcher thread: {e}"))
}

/// `dlopen`'s return handler: wakes the watcher and waits (boundedly) until it has handled
/// this return.
fn wait_for_watcher(wake: i32) {
    // SAFETY: getpid cannot fail.
    if WATCHER_PID.load(Ordering::Relaxed) != unsafe { libc::getpid() } {
        return;
    }
    let mine = REQUESTED.fetch_add(1, Ordering::AcqRel) + 1;
    // SAFETY: writes one byte from a local to the pipe; a full pipe already holds a wake-up.
    unsafe { libc::write(wake, [1u8].as_ptr().cast(), 1) };
    let deadline = Instant::now() + WAIT_FOR_WATCHER;
    while HANDLED.load(Ordering::Acquire) < mine && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Blocks until a `dlopen` returned, then empties the pipe; false if the pipe broke.
fn wait_for_change(read: &OwnedFd) -> bool {
    let mut poll = libc::pollfd { fd: read.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one initialized pollfd.
    while unsafe { libc::poll(&mut poll, 1, -1) } == -1 {
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
    let mut buf = [0u8; 64];
    // SAFETY: reads into a local buffer from our non-blocking pipe.
    while unsafe { libc::read(read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    true
}

/// Chooses the functions of modules not seen before and traces them.
fn add_new_modules(
    tracer: &mut Tracer,
    filter: &Filter,
    known: &mut HashSet<PathBuf>,
    funcs: &Path,
    sites: &Path,
    exe: &Path,
) -> Result<(), String> {
    // Most dlopens load nothing new (a library already there, a reference count bumped):
    // seen in the memory map alone, before any symbol table is built.
    let paths = dynprobe_symbols::loaded_code_paths().map_err(|e| e.to_string())?;
    if paths.iter().all(|p| known.contains(p)) {
        return Ok(());
    }
    let table = dynprobe_symbols::SymbolTable::current_process().map_err(|e| e.to_string())?;
    let first_id = tracer.functions().len() as u32;
    let mut selection = Selection::new_modules(&table, filter, known, first_id).map_err(|e| e.to_string())?;
    selection.pending = Selection::pending_patterns(&table, filter);
    *known = Selection::module_paths(&table);
    if selection.functions.is_empty() {
        return Ok(());
    }
    // The names first: a record of a new function must never come before its name.
    let lines = function_list(&selection.functions);
    std::fs::OpenOptions::new()
        .append(true)
        .open(funcs)
        .and_then(|mut f| f.write_all(lines.as_bytes()))
        .map_err(|e| format!("cannot extend {}: {e}", funcs.display()))?;
    tracer.add(selection).map_err(|e| e.to_string())?;
    let tmp = sites.with_extension("sites.tmp");
    std::fs::write(&tmp, site_list(exe, tracer.summary()))
        .and_then(|()| std::fs::rename(&tmp, sites))
        .map_err(|e| format!("cannot update {}: {e}", sites.display()))
}
