//! "Is this thread already running a probe handler?" — answered from the thread's
//! [`ThreadSlot`], with plain loads and stores, so the check costs a few instructions on the
//! optimized path and is safe in a signal handler.

use crate::thread_slot::ThreadSlot;
use std::sync::atomic::Ordering;

/// Held while the current thread runs probe handlers; released on drop.
pub(crate) struct HandlerGuard {
    slot: &'static ThreadSlot,
}

impl HandlerGuard {
    /// Marks the current thread as running handlers, or returns `None` when it already is
    /// (a probe hit from inside a handler: the caller counts it as missed) or when it has no
    /// thread slot (also counted as missed, never blocked on).
    ///
    /// Only the owning thread writes its flag. A signal arriving between the load and the
    /// store runs its own handlers to completion before this thread goes on, so the plain
    /// load-then-store cannot lose a nested hit.
    #[inline]
    pub(crate) fn enter() -> Option<HandlerGuard> {
        let (_, slot) = ThreadSlot::current()?;
        if slot.in_handler.load(Ordering::Relaxed) {
            return None;
        }
        slot.in_handler.store(true, Ordering::Relaxed);
        Some(HandlerGuard { slot })
    }

    /// True when the calling thread is inside a probe handler.
    pub(crate) fn current_thread_inside() -> bool {
        ThreadSlot::existing().is_some_and(|slot| slot.in_handler.load(Ordering::Relaxed))
    }
}

impl Drop for HandlerGuard {
    #[inline]
    fn drop(&mut self) {
        self.slot.in_handler.store(false, Ordering::Relaxed);
    }
}
