//! The control channel: a line `detach`, or end of file, asks the tracer to detach.
//!
//! The tracer spends its life blocked in `waitpid`, which no file descriptor can wake. So a
//! small thread reads the control descriptor, and when detaching is asked for it sets a
//! flag and interrupts the tracer thread's `waitpid` with a signal whose handler does
//! nothing and is installed without `SA_RESTART` (`waitpid` then fails with `EINTR`). The
//! signal is repeated until the tracer acknowledges, because one sent just before the
//! tracer entered `waitpid` would be lost.

use rustix::event::{poll, PollFd, PollFlags};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
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
    /// Closed (dropped) to make the control thread return when the tracer is done.
    stop_write: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

extern "C" fn on_wake(_: libc::c_int) {}

impl Control {
    /// Starts watching `control` (a copy of it: the caller's stays open) on behalf of the
    /// calling thread (the tracer).
    pub fn start(control: BorrowedFd<'_>) -> io::Result<Control> {
        install_wake_handler()?;
        let control = control.try_clone_to_owned()?;
        let (stop_read, stop_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let flags = Arc::new(Flags::default());
        let tracer = rustix::thread::gettid().as_raw_nonzero().get();
        let process = rustix::process::getpid().as_raw_nonzero().get();
        let shared = Arc::clone(&flags);
        let thread = std::thread::Builder::new().name("dynprobe-control".into()).spawn(move || {
            if wait_for_detach(&control, &stop_read) {
                shared.detach.store(true, Ordering::SeqCst);
                while !shared.seen.load(Ordering::SeqCst) {
                    // SAFETY: tgkill (no wrapper in rustix or the libc crate) with our own
                    // process and the tracer thread's id; the tracer thread outlives this
                    // thread (it joins it in `Drop`).
                    unsafe { libc::syscall(libc::SYS_tgkill, process, tracer, WAKE_SIGNAL) };
                    std::thread::sleep(WAKE_INTERVAL);
                }
            }
        })?;
        Ok(Control { flags, stop_write: Some(stop_write), thread: Some(thread) })
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
        // Closing our write end wakes the control thread's poll with POLLHUP.
        drop(self.stop_write.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Blocks until `control` says `detach` or reaches end of file (true), or `stop` is
/// closed (false).
fn wait_for_detach(control: &OwnedFd, stop: &OwnedFd) -> bool {
    let mut pending = Vec::new();
    loop {
        let mut fds = [PollFd::new(control, PollFlags::IN), PollFd::new(stop, PollFlags::IN)];
        match poll(&mut fds, None) {
            Err(rustix::io::Errno::INTR) => continue,
            // A poll that cannot work leaves no way to hear the controller: detach now
            // rather than keep probes nobody can remove.
            Err(_) => return true,
            Ok(_) => {}
        }
        if !fds[1].revents().is_empty() {
            return false;
        }
        if fds[0].revents().is_empty() {
            continue;
        }
        let mut buf = [0u8; 256];
        let got = match rustix::io::read(control, &mut buf) {
            Err(rustix::io::Errno::INTR) => continue,
            // End of file (the controller is gone, maybe killed) or a broken descriptor.
            Ok(0) | Err(_) => return true,
            Ok(got) => got,
        };
        pending.extend_from_slice(&buf[..got]);
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
