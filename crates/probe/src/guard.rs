//! "Is this thread already running a probe handler?" — answered without locks, allocation
//! or thread-local storage, so it works in a signal handler of a `dlopen`ed library.
//!
//! A thread inside a handler owns one word of a fixed table, found within a short window
//! starting at a hash of its thread pointer. Only the owning thread ever writes its own
//! thread pointer, so a scan of the window for it is exact even while other threads claim
//! and release neighbouring words.

use crate::arch::thread_pointer;
use std::sync::atomic::{AtomicUsize, Ordering};

const SLOTS: usize = 4096;
const WINDOW: usize = 32;

static ACTIVE: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

/// Held while the current thread runs probe handlers; released on drop.
pub(crate) struct HandlerGuard {
    index: usize,
}

/// The table words where the thread with thread pointer `tp` may sit.
fn window(tp: usize) -> impl Iterator<Item = usize> + Clone {
    let start = tp.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52;
    (0..WINDOW).map(move |i| (start + i) % SLOTS)
}

impl HandlerGuard {
    /// Marks the current thread as running handlers, or returns `None` when it already is
    /// (a probe hit from inside a handler: the caller counts it as missed) or when the
    /// window is full (also counted as missed, never blocked on).
    pub(crate) fn enter() -> Option<HandlerGuard> {
        if Self::current_thread_inside() {
            return None;
        }
        let tp = thread_pointer();
        window(tp)
            .find(|&i| ACTIVE[i].compare_exchange(0, tp, Ordering::Acquire, Ordering::Relaxed).is_ok())
            .map(|index| HandlerGuard { index })
    }

    /// True when the calling thread is inside a probe handler.
    pub(crate) fn current_thread_inside() -> bool {
        let tp = thread_pointer();
        window(tp).any(|i| ACTIVE[i].load(Ordering::Relaxed) == tp)
    }
}

impl Drop for HandlerGuard {
    fn drop(&mut self) {
        ACTIVE[self.index].store(0, Ordering::Release);
    }
}
