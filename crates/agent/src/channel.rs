//! The event channel to the CLI: a stream socket inherited as a file descriptor (a
//! program started by `dynprobe probe` or `record`, and every program it runs), or a pipe
//! passed over the control socket (an attach session).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// The write end of the CLI's pipe or socket. Every line goes out in one `write` (`send`):
/// lines are at most [`crate::line::LINE_MAX`] bytes, below `PIPE_BUF`, so the kernel
/// writes each one atomically into a pipe, and a Unix stream socket queues it as one buffer
/// (`unix_stream_sendmsg` in the kernel's `net/unix/af_unix.c`): lines of different threads
/// and processes never interleave.
///
/// On a socket, lines are sent with `MSG_NOSIGNAL`: a program that outlives the CLI (a
/// daemon a probed program started, still probed) gets `EPIPE` and loses the line instead
/// of dying of `SIGPIPE`, which writing into a pipe without a reader would raise.
///
/// A blocking channel makes a hit wait while the CLI is behind (a program the CLI started
/// and that must not lose an event); a lossy one never waits — a line that does not fit in
/// the pipe is dropped and counted (a running process someone attached to, whose pace must
/// not depend on the reader, as `perf` counts lost samples).
#[derive(Debug, Clone, Copy)]
pub struct Channel {
    fd: RawFd,
    lost: Option<&'static AtomicU64>,
    /// `fd` is a socket: lines are sent with `MSG_NOSIGNAL`.
    socket: bool,
}

impl Channel {
    /// Takes over the inherited `fd` and marks it close-on-exec, so that programs the
    /// target `exec`s do not hold the pipe open (the CLI stops reading at end of file).
    pub fn new(fd: RawFd) -> Result<Channel, String> {
        // SAFETY: F_SETFD on a plain integer fd touches no memory; a bad fd gives EBADF.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
            return Err(format!("the event fd {fd} is not open: {}", std::io::Error::last_os_error()));
        }
        let socket = file_type(fd)?.0 == libc::S_IFSOCK;
        Ok(Channel { fd, lost: None, socket })
    }

    /// The inherited `fd`, left open across `exec` so that the programs the target runs
    /// are probed into the same channel. With `ino` (the inode number the CLI gave its
    /// socket or pipe) the descriptor must still be that one: a program may close its
    /// descriptors before an `exec` (Python's `subprocess` does), and the number may name
    /// another file by then, which must never receive event lines.
    pub fn inherited(fd: RawFd, ino: Option<u64>) -> Result<Channel, String> {
        let (kind, found) = file_type(fd)?;
        let ours = matches!(kind, libc::S_IFSOCK | libc::S_IFIFO) && ino.is_none_or(|ino| ino == found);
        if !ours {
            return Err(format!("the event fd {fd} is no longer dynprobe's (the program closed or reused it)"));
        }
        Ok(Channel { fd, lost: None, socket: kind == libc::S_IFSOCK })
    }

    /// A lossy channel on `fd`, which must be non-blocking: lines that do not fit are
    /// counted in `lost`.
    pub fn lossy(fd: RawFd, lost: &'static AtomicU64) -> Channel {
        Channel { fd, lost: Some(lost), socket: false }
    }

    /// A channel that writes nowhere, for formatting tests.
    #[cfg(test)]
    pub(crate) fn closed() -> Channel {
        Channel { fd: -1, lost: None, socket: false }
    }

    /// Writes `bytes` whole. Async-signal-safe: no allocation, and `errno` is untouched (the
    /// interrupted code may be about to read its own): raw system calls, which also keep
    /// dynprobe's own writes out of the program's probes on `write`/`send`. A failed write
    /// (the CLI is gone) loses the line: the target must go on running regardless.
    pub fn send(&self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match dynprobe_probe::raw::write(self.fd, bytes, self.socket) {
                n if n == -(libc::EINTR as i64) => continue,
                // A lossy channel's pipe is full. Lines are below PIPE_BUF, so the kernel
                // wrote none of this one.
                n if n == -(libc::EAGAIN as i64) => {
                    if let Some(lost) = self.lost {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                n if n <= 0 => break,
                n => bytes = &bytes[n as usize..],
            }
        }
    }
}

/// The file type (`S_IFMT` bits) and inode number of `fd`.
fn file_type(fd: RawFd) -> Result<(libc::mode_t, u64), String> {
    // SAFETY: `stat` is plain data that fstat fills.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the local `stat`; a bad fd gives EBADF.
    if unsafe { libc::fstat(fd, &mut stat) } == -1 {
        return Err(format!("the event fd {fd} is not open: {}", std::io::Error::last_os_error()));
    }
    Ok((stat.st_mode & libc::S_IFMT, stat.st_ino))
}
