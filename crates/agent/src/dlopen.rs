//! The watch for libraries loaded after start (and unloaded), for the agent's two modes:
//! record mode traces a library matching `-F 'libfoo:*'` (or `-F '*:name'`) once it is
//! there, and an attach session places a probe on `libfoo:f` once `libfoo` is loaded, and
//! takes it back when `libfoo` is unloaded, to wait for it again.
//!
//! A return probe on `dlopen` (and `dlmopen`, and `dlclose`) asks a thread of the agent's,
//! untraced, to run the mode's callback — and waits for it before the call returns: the
//! program's first call into the library is seen. (Its constructors, run inside `dlopen`,
//! are not.) The
//! return handler runs from the return trampoline, not a signal handler, so the watcher's
//! stop of the other threads (to patch code) reaches it while it waits.
//!
//! The wake-up is a futex, not a pipe: a descriptor of the agent's can be closed under it by
//! the program (bubblewrap closes every descriptor it did not open before it runs its
//! child), and its number then reused for one of the program's own files — which a wake-up
//! byte would have been written into.

use dynprobe::ReturnProbeHandle;
use dynprobe_probe::own_thread::OwnThread;
use dynprobe_probe::raw::{futex_wait, futex_wake_all};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
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
/// Bumped at each wake-up of the watcher, which sleeps on it (a futex word).
static WAKE: AtomicU32 = AtomicU32::new(0);

/// A running watch: the return probes on `dlopen` and the watcher thread. One at a time
/// per process (record mode keeps its for the process's life; an attach session stops its
/// own at detach).
pub struct ModuleWatch {
    probes: Vec<ReturnProbeHandle>,
    /// Set, then the watcher woken, to end the watcher thread.
    stopping: Arc<AtomicBool>,
    thread: OwnThread,
}

/// Starts watching: after each `dlopen` or `dlclose` returns, `on_load` runs on the watcher
/// thread (which is untraced) before the caller goes on. `on_load` itself decides whether
/// anything was loaded or unloaded (`dynprobe_symbols::loaded_code_paths` is the cheap
/// check).
pub fn watch(mut on_load: impl FnMut() + Send + 'static) -> Result<ModuleWatch, String> {
    if WATCHER_PID.load(Ordering::Relaxed) != 0 {
        return Err("another dynprobe session already watches this process's dlopen calls".into());
    }
    let mut probes = Vec::new();
    for name in [c"dlopen", c"dlmopen", c"dlclose"] {
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks it up.
        let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as u64;
        if addr == 0 {
            continue;
        }
        let probe = dynprobe::ReturnProbe::at(addr).on_return(|_, _| wait_for_watcher()).disabled();
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
    let spawned = dynprobe_probe::own_thread::spawn(c"dynprobe-dlopen", move || loop {
        // Read before the checks: a wake-up after them changes it, and the wait returns at once.
        let seen = WAKE.load(Ordering::Acquire);
        if stop.load(Ordering::Acquire) {
            break;
        }
        let requested = REQUESTED.load(Ordering::Acquire);
        if requested == HANDLED.load(Ordering::Acquire) {
            futex_wait(&WAKE, seen);
            continue;
        }
        on_load();
        HANDLED.store(requested, Ordering::Release);
    });
    match spawned {
        Ok(thread) => Ok(ModuleWatch { probes, stopping, thread }),
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
        self.thread.keep();
    }

    /// Stops watching: `dlopen` is unprobed (its bytes restored) and the watcher thread
    /// has ended when this returns.
    pub fn stop(self) {
        unregister(self.probes);
        self.stopping.store(true, Ordering::Release);
        wake_watcher();
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

/// Wakes the watcher thread.
fn wake_watcher() {
    WAKE.fetch_add(1, Ordering::AcqRel);
    futex_wake_all(&WAKE);
}

/// `dlopen`'s return handler: wakes the watcher and waits (boundedly) until it has handled
/// this return.
fn wait_for_watcher() {
    // SAFETY: getpid cannot fail.
    if WATCHER_PID.load(Ordering::Relaxed) != unsafe { libc::getpid() } {
        return;
    }
    let mine = REQUESTED.fetch_add(1, Ordering::AcqRel) + 1;
    wake_watcher();
    let deadline = Instant::now() + WAIT_FOR_WATCHER;
    while HANDLED.load(Ordering::Acquire) < mine && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
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
