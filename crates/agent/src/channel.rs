//! The event channel to the CLI: a pipe, inherited as a file descriptor (a program started
//! by `dynprobe probe`) or passed over the control socket (an attach session).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// The write end of the CLI's pipe. Every line goes out in one `write`: lines are at most
/// [`crate::line::LINE_MAX`] bytes, below `PIPE_BUF`, so the kernel writes each one
/// atomically and lines of different threads never interleave.
///
/// A blocking channel makes a hit wait while the CLI is behind (a program the CLI started
/// and that must not lose an event); a lossy one never waits — a line that does not fit in
/// the pipe is dropped and counted (a running process someone attached to, whose pace must
/// not depend on the reader, as `perf` counts lost samples).
#[derive(Debug, Clone, Copy)]
pub struct Channel {
    fd: RawFd,
    lost: Option<&'static AtomicU64>,
}

impl Channel {
    /// Takes over the inherited `fd` and marks it close-on-exec, so that programs the
    /// target `exec`s do not hold the pipe open (the CLI stops reading at end of file).
    pub fn new(fd: RawFd) -> Result<Channel, String> {
        // SAFETY: F_SETFD on a plain integer fd touches no memory; a bad fd gives EBADF.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
            return Err(format!("the event fd {fd} is not open: {}", std::io::Error::last_os_error()));
        }
        Ok(Channel { fd, lost: None })
    }

    /// The inherited `fd`, left open across `exec` so that the programs the target runs
    /// are probed into the same pipe. With `pipe` (the inode number the CLI gave its
    /// pipe) the descriptor must still be that pipe: a program may close its descriptors
    /// before an `exec` (Python's `subprocess` does), and the number may name another
    /// file by then, which must never receive event lines.
    pub fn inherited(fd: RawFd, pipe: Option<u64>) -> Result<Channel, String> {
        // SAFETY: `stat` is plain data, filled by fstat; a bad fd gives EBADF.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into the local `stat`.
        if unsafe { libc::fstat(fd, &mut stat) } == -1 {
            return Err(format!("the event fd {fd} is not open: {}", std::io::Error::last_os_error()));
        }
        let is_pipe = stat.st_mode & libc::S_IFMT == libc::S_IFIFO;
        if !is_pipe || pipe.is_some_and(|ino| ino != stat.st_ino) {
            return Err(format!("the event fd {fd} is no longer dynprobe's pipe (the program closed or reused it)"));
        }
        Ok(Channel { fd, lost: None })
    }

    /// A lossy channel on `fd`, which must be non-blocking: lines that do not fit are
    /// counted in `lost`.
    pub fn lossy(fd: RawFd, lost: &'static AtomicU64) -> Channel {
        Channel { fd, lost: Some(lost) }
    }

    /// A channel that writes nowhere, for formatting tests.
    #[cfg(test)]
    pub(crate) fn closed() -> Channel {
        Channel { fd: -1, lost: None }
    }

    /// Writes `bytes` whole. Async-signal-safe: no allocation, and `errno` is restored,
    /// because the interrupted code may be about to read its own. A failed write (the CLI
    /// is gone) loses the line: the target must go on running regardless.
    pub fn send(&self, mut bytes: &[u8]) {
        // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's
        // life.
        let errno = unsafe { libc::__errno_location() };
        // SAFETY: as above; the slot is a plain int.
        let saved = unsafe { *errno };
        while !bytes.is_empty() {
            // SAFETY: `bytes` is a live slice of `bytes.len()` readable bytes.
            let n = unsafe { libc::write(self.fd, bytes.as_ptr().cast(), bytes.len()) };
            match n {
                // SAFETY: reading this thread's errno, as above.
                -1 if unsafe { *errno } == libc::EINTR => continue,
                // A lossy channel's pipe is full. Lines are below PIPE_BUF, so the kernel
                // wrote none of this one.
                // SAFETY: reading this thread's errno, as above.
                -1 if unsafe { *errno } == libc::EAGAIN => {
                    if let Some(lost) = self.lost {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                n if n <= 0 => break,
                n => bytes = &bytes[n as usize..],
            }
        }
        // SAFETY: restoring this thread's errno, as above.
        unsafe { *errno = saved };
    }
}
