//! The protocol lines to the CLI, batched: lines collect while stops keep coming and are
//! written when the tracer is about to block, so a burst of hits costs one `write`.
//!
//! Nothing is dropped: when the reader is slow the `write` blocks, the tracer waits, and the
//! target's threads wait at their traps. If the reader is gone (`EPIPE`), the output is
//! marked broken and the tracer detaches.

use std::os::fd::OwnedFd;

/// Flush before the batch grows past this, even while stops keep coming.
const BATCH: usize = 64 * 1024;

/// The `out` descriptor with its pending batch.
pub(crate) struct Output {
    fd: OwnedFd,
    buf: Vec<u8>,
    broken: bool,
}

impl Output {
    /// Writes to `fd` (a copy of the caller's descriptor, which stays open).
    pub fn new(fd: OwnedFd) -> Output {
        Output { fd, buf: Vec::with_capacity(BATCH), broken: false }
    }

    /// Adds one whole line (ending in `\n`).
    pub fn line(&mut self, line: &[u8]) {
        self.buf.extend_from_slice(line);
        if self.buf.len() >= BATCH {
            self.flush();
        }
    }

    /// Writes the batch out.
    pub fn flush(&mut self) {
        let mut done = 0;
        while done < self.buf.len() && !self.broken {
            let rest = &self.buf[done..];
            match rustix::io::write(&self.fd, rest) {
                Ok(n) if n > 0 => done += n,
                Err(rustix::io::Errno::INTR) => continue,
                _ => self.broken = true,
            }
        }
        self.buf.clear();
    }

    /// Whether the reader is gone.
    pub fn broken(&self) -> bool {
        self.broken
    }
}
