//! The control channel: a line `detach`, or end of file, asks the tracer to detach.
//!
//! The tracer spends its life blocked in `waitpid`, which no file descriptor can wake. So a
//! small thread reads the control descriptor, and when detaching is asked for it sets a
//! flag and interrupts the tracer thread's `waitpid` with a signal whose handler does
//! nothing and is installed without `SA_RESTART` (`waitpid` then fails with `EINTR`). The
//! signal is repeated until the tracer acknowledges, because one sent just before the
//! tracer entered `waitpid` would be lost.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The signal that interrupts the tracer's `waitpid`. `SIGURG` is ignored by default, so a
/// stray one (should the handler ever be missing) harms nobody.
const WAKE_SIGNAL: libc::c_int = libc::SIGURG;

/// How often the wake signal is repeated until the tracer notices.
const WAKE_INTERVAL: Duration = Duration::from_millis(5);

/// Shared between the tracer thread and the control thread.
#[derive(Default)]
struct Flags {
    /// Detaching was asked for.
    detach: AtomicBool,
    /// The tracer saw the request (or is finishing for another reason): stop waking it.
    seen: AtomicBool,
}

/// Watches the control descriptor on its own thread; see the module documentation.
pub(crate) struct Control {
    flags: Arc<Flags>,
    /// Written to (closed) to make the control thread return when the tracer is done.
    stop_write: RawFd,
    thread: Option<JoinHandle<()>>,
}

extern "C" fn on_wake(_: libc::c_int) {}

impl Control {
    /// Starts watching `control` on behalf of the calling thread (the tracer).
    pub fn start(control: RawFd) -> io::Result<Control> {
        install_wake_handler()?;
        let mut pipe = [0; 2];
        // SAFETY: `pipe` is a valid array of two descriptors for pipe2 to fill.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = Arc::new(Flags::default());
        // SAFETY: gettid has no preconditions.
        let tracer = unsafe { libc::gettid() };
        // SAFETY: getpid has no preconditions.
        let process = unsafe { libc::getpid() };
        let shared = Arc::clone(&flags);
        let stop_read = pipe[0];
        let thread = std::thread::Builder::new().name("dynprobe-control".into()).spawn(move || {
            if wait_for_detach(control, stop_read) {
                shared.detach.store(true, Ordering::SeqCst);
                while !shared.seen.load(Ordering::SeqCst) {
                    // SAFETY: tgkill with our own process and the tracer thread's id; the
                    // tracer thread outlives this thread (it joins it in `Drop`).
                    unsafe { libc::syscall(libc::SYS_tgkill, process, tracer, WAKE_SIGNAL) };
                    std::thread::sleep(WAKE_INTERVAL);
                }
            }
            // SAFETY: closes the read end this thread owns.
            unsafe { libc::close(stop_read) };
        })?;
        Ok(Control { flags, stop_write: pipe[1], thread: Some(thread) })
    }

    /// Whether detaching was asked for. Calling this also tells the control thread that
    /// the request was seen, so it stops interrupting the tracer.
    pub fn detach_requested(&self) -> bool {
        let asked = self.flags.detach.load(Ordering::SeqCst);
        if asked {
            self.flags.seen.store(true, Ordering::SeqCst);
        }
        asked
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.flags.seen.store(true, Ordering::SeqCst);
        // SAFETY: closing our write end wakes the control thread's poll with POLLHUP.
        unsafe { libc::close(self.stop_write) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Blocks until `control` says `detach` or reaches end of file (true), or `stop` is
/// closed (false).
fn wait_for_detach(control: RawFd, stop: RawFd) -> bool {
    let mut pending = Vec::new();
    loop {
        let mut fds = [
            libc::pollfd { fd: control, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // A poll that cannot work leaves no way to hear the controller: detach now
            // rather than keep probes nobody can remove.
            return true;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents == 0 {
            continue;
        }
        let mut buf = [0u8; 256];
        // SAFETY: reads into a local buffer of the given length.
        let got = unsafe { libc::read(control, buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if got <= 0 {
            // End of file (the controller is gone, maybe killed) or a broken descriptor.
            return true;
        }
        pending.extend_from_slice(&buf[..got as usize]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if line.trim_ascii() == b"detach" {
                return true;
            }
        }
    }
}

/// Installs the no-op handler of [`WAKE_SIGNAL`], without `SA_RESTART`.
fn install_wake_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask is well-formed;
    // the handler is async-signal-safe (it does nothing).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_wake as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(WAKE_SIGNAL, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
