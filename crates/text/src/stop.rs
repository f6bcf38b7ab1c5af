//! Stopping every other thread of the process, and grace periods.
//!
//! Each other thread is sent a real-time signal (`SIGRTMAX - 2` by default); its handler
//! reports the thread's interrupted `rip` and waits, allocation- and lock-free, until the
//! controller releases it, possibly with a new `rip`. The trap dispatcher blocks this signal
//! while it runs, so a stopped thread is never inside a trap handler: one full stop is
//! therefore a grace period after which no thread holds a pointer the dispatcher handed out.

use crate::TextError;
use std::time::Duration;

/// The signal used to stop threads.
pub fn stop_signal() -> i32 {
    todo!()
}

/// A thread held stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoppedThread {
    /// Kernel thread id.
    pub tid: i32,
    /// The user-mode instruction pointer it was stopped at.
    pub ip: u64,
}

/// Every other thread of the process, held stopped until this is dropped.
pub struct StoppedWorld {
    _private: (),
}

impl StoppedWorld {
    /// The stopped threads.
    pub fn threads(&self) -> &[StoppedThread] {
        todo!()
    }

    /// Makes thread `tid` resume at `ip` instead of where it stopped (used to move a thread
    /// out of bytes about to be replaced into their relocated copy).
    pub fn set_ip(&mut self, tid: i32, ip: u64) {
        todo!()
    }
}

impl Drop for StoppedWorld {
    fn drop(&mut self) {
        todo!()
    }
}

/// Stops every thread of the process but the calling one. Fails (after resuming any it did
/// stop) if some thread does not answer within `timeout` — for example because it blocks
/// the stop signal.
pub fn stop_other_threads(timeout: Duration) -> Result<StoppedWorld, TextError> {
    todo!()
}

/// Waits for a grace period: returns once every other thread has been outside the trap
/// dispatcher at least once since the call.
pub fn synchronize() -> Result<(), TextError> {
    todo!()
}
