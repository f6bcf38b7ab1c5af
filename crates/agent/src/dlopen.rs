//! The watch for libraries loaded after start, for the agent's two modes: record mode
//! traces a library matching `-F 'libfoo:*'` (or `-F '*:name'`) once it is there, and an
//! attach session places a probe on `libfoo:f` once `libfoo` is loaded.
//!
//! A return probe on `dlopen` (and `dlmopen`) asks a thread of the agent's, untraced, to
//! run the mode's callback — and waits for it before `dlopen` returns: the program's first
//! call into the library is seen. (Its constructors, run inside `dlopen`, are not.) The
//! return handler runs from the return trampoline, not a signal handler, so the watcher's
//! stop of the other threads (to patch code) reaches it while it waits.

use dynprobe::ReturnProbeHandle;
use dynprobe_probe::own_thread::OwnThread;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a `dlopen` waits for the watcher before it returns anyway.
const WAIT_FOR_WATCHER: Duration = Duration::from_secs(5);

/// `dlopen`s that returned so far, and how many of them the watcher has handled.
static REQUESTED: AtomicU64 = AtomicU64::new(0);
static HANDLED: AtomicU64 = AtomicU64::new(0);
/// The process the watcher thread runs in (0: none): a forked child has no watcher
/// (threads do not survive `fork`), so its `dlopen`s do not wait.
static WATCHER_PID: AtomicI32 = AtomicI32::new(0);

/// A running watch: the return probes on `dlopen` and the watcher thread. One at a time
/// per process (record mode keeps its for the process's life; an attach session stops its
/// own at detach).
pub struct ModuleWatch {
    probes: Vec<ReturnProbeHandle>,
    /// The write end of the wake-up pipe.
    wake: OwnedFd,
    /// Set, then the watcher woken, to end the watcher thread. Closing the write end is not
    /// enough: a child forked meanwhile holds a copy of it (`fork` duplicates every
    /// descriptor, `O_CLOEXEC` closes them only at an `exec`), so the pipe would never reach
    /// its end of file and [`ModuleWatch::stop`] would wait for the thread forever.
    stopping: Arc<AtomicBool>,
    thread: OwnThread,
}

/// Starts watching: after each `dlopen` returns, `on_load` runs on the watcher thread
/// (which is untraced) before `dlopen`'s caller goes on. `on_load` itself decides whether
/// anything new was loaded (`dynprobe_symbols::loaded_code_paths` is the cheap check).
pub fn watch(mut on_load: impl FnMut() + Send + 'static) -> Result<ModuleWatch, String> {
    if WATCHER_PID.load(Ordering::Relaxed) != 0 {
        return Err("another dynprobe session already watches this process's dlopen calls".into());
    }
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 stores.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } == -1 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned these descriptors, owned by nobody else.
    let (read, wake) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let wake_fd = wake.as_raw_fd();
    let mut probes = Vec::new();
    for name in [c"dlopen", c"dlmopen"] {
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks it up.
        let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as u64;
        if addr == 0 {
            continue;
        }
        let probe = dynprobe::ReturnProbe::at(addr).on_return(move |_, _| wait_for_watcher(wake_fd)).disabled();
        match probe.register() {
            Ok(handle) => probes.push(handle),
            Err(e) => {
                unregister(probes);
                return Err(format!("cannot probe {}'s return: {e}", name.to_string_lossy()));
            }
        }
    }
    // Armed directly as jumps, together, where they can be: a thread of the program calling
    // `dlopen` meanwhile (an attached process runs on) never meets a breakpoint there.
    let _ = dynprobe::prepare_optimization();
    let entries: Vec<&dynprobe::ProbeHandle> = probes.iter().map(ReturnProbeHandle::entry_probe).collect();
    if let Err(e) = dynprobe::ProbeHandle::enable_each(&entries) {
        unregister(probes);
        return Err(format!("cannot arm the probes on dlopen's return: {e}"));
    }
    // SAFETY: getpid cannot fail.
    WATCHER_PID.store(unsafe { libc::getpid() }, Ordering::Relaxed);
    let stopping = Arc::new(AtomicBool::new(false));
    let stop = Arc::clone(&stopping);
    // One of dynprobe's own threads: no probe sees it, from its first instruction on.
    let spawned = dynprobe_probe::own_thread::spawn(c"dynprobe-dlopen", move || {
        while wait_for_change(&read) && !stop.load(Ordering::Acquire) {
            let requested = REQUESTED.load(Ordering::Acquire);
            on_load();
            HANDLED.store(requested, Ordering::Release);
        }
    });
    match spawned {
        Ok(thread) => Ok(ModuleWatch { probes, wake, stopping, thread }),
        Err(e) => {
            WATCHER_PID.store(0, Ordering::Relaxed);
            unregister(probes);
            Err(format!("cannot start the watcher thread: {e}"))
        }
    }
}

impl ModuleWatch {
    /// Keeps watching for the rest of the process's life.
    pub fn keep(self) {
        self.probes.into_iter().for_each(ReturnProbeHandle::leak);
        std::mem::forget(self.wake);
        self.thread.keep();
    }

    /// Stops watching: `dlopen` is unprobed (its bytes restored) and the watcher thread
    /// has ended when this returns.
    pub fn stop(self) {
        // The return handlers use the wake-up pipe: it closes only once no handler can run.
        unregister(self.probes);
        self.stopping.store(true, Ordering::Release);
        // SAFETY: writes one byte from a local to our non-blocking pipe; a full pipe already
        // holds a wake-up.
        unsafe { libc::write(self.wake.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        drop(self.wake);
        self.thread.join();
        WATCHER_PID.store(0, Ordering::Relaxed);
    }
}

/// Unregisters `probes`, best effort: a return probe whose byte cannot be restored stays
/// and keeps waking a watcher that is gone, which `wait_for_watcher` bounds.
fn unregister(probes: Vec<ReturnProbeHandle>) {
    for probe in probes {
        let _ = probe.unregister();
    }
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

/// Blocks until a `dlopen` returned (or [`ModuleWatch::stop`] woke it), then empties the
/// pipe; false once the pipe is closed or broken.
fn wait_for_change(read: &OwnedFd) -> bool {
    let mut poll = libc::pollfd { fd: read.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one initialized pollfd.
    while unsafe { libc::poll(&mut poll, 1, -1) } == -1 {
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: reads into a local buffer from our non-blocking pipe.
        match unsafe { libc::read(read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } {
            // End of file: every write end is closed.
            0 => return false,
            n if n > 0 => continue,
            _ => return std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probes on `dlopen`'s return are armed once their jumps were tried, before any
    /// optimizer pass: jumps where they can be (a thread of an attached program calling
    /// `dlopen` meanwhile never meets a breakpoint there), breakpoints only where the
    /// function cannot have one (glibc 2.36's `dlopen` ends in `jmp *%rax`), and said why.
    #[test]
    fn the_watch_on_dlopen_is_armed_directly_as_jumps_where_it_can_be() {
        dynprobe::stop_optimizer();
        let watch = watch(|| {}).unwrap();
        assert!(!watch.probes.is_empty());
        for probe in &watch.probes {
            let info = probe.info();
            assert!(info.optimized || info.not_optimized.is_some(), "armed before its jump was tried: {info}");
        }
        watch.stop();
    }
}
