//! "Is this thread already running a probe handler?" — answered from the thread's
//! [`ThreadSlot`], with plain loads and stores, so the check costs a few instructions on the
//! optimized path and is safe in a signal handler.

use crate::thread_slot::{ThreadSlot, ANY_SITE, RETURNING};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Held while the current thread runs probe handlers; released on drop.
pub(crate) struct HandlerGuard {
    slot: &'static ThreadSlot,
    index: usize,
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
        Self::enter_site(ANY_SITE as u64).ok()
    }

    /// The guard of a thread coming back through a return trampoline, which should own
    /// thread slot `index` (the thread that pushed the instance it returns through, whose
    /// slot it is in: checked by [`ThreadSlot::owned`]'s one compare), marked
    /// [`RETURNING`]: let go of by the trampoline's code, see [`Self::cleared_by_trampoline`].
    #[inline(always)]
    pub(crate) fn enter_returning(index: usize) -> Option<HandlerGuard> {
        Self::enter_found(ThreadSlot::owned(index).or_else(ThreadSlot::current), RETURNING as u64).ok()
    }

    /// Hands the guard over to the return trampoline's code: the address of the mark word,
    /// which the trampoline zeroes once the dispatcher has returned into it (see
    /// `dynprobe_arch`'s `ReturnTo`). Until then the thread counts as inside a handler, and
    /// as still using the trampoline.
    #[inline(always)]
    pub(crate) fn cleared_by_trampoline(self) -> u64 {
        let mark = &self.slot.active as *const AtomicUsize as u64;
        std::mem::forget(self);
        mark
    }

    /// [`Self::enter`] for the handlers of the site at `site`, which
    /// [`wait_while_active`](crate::thread_slot::wait_while_active) can then wait for.
    ///
    /// When the thread is already inside a handler, the `Err` holds a mark that keeps the
    /// site's probe list alive while the caller counts the miss on it.
    #[inline]
    pub(crate) fn enter_site(site: u64) -> Result<HandlerGuard, MissMark> {
        Self::enter_found(ThreadSlot::current(), site)
    }

    /// [`Self::enter_site`] with the calling thread's slot already looked up
    /// ([`ThreadSlot::current`]'s answer, `None` when it has none).
    #[inline]
    pub(crate) fn enter_found(
        found: Option<(usize, &'static ThreadSlot)>,
        site: u64,
    ) -> Result<HandlerGuard, MissMark> {
        let Some((index, slot)) = found else { return Err(MissMark { slot: None }) };
        if slot.active.load(Ordering::Relaxed) != 0 {
            slot.nested.store(site as usize, Ordering::Relaxed);
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
            return Err(MissMark { slot: Some(slot) });
        }
        slot.active.store(site as usize, Ordering::Relaxed);
        // Orders the mark before the handlers' reads of the probe list, for the compiler;
        // the CPU side is the writer's membarrier.
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        Ok(HandlerGuard { slot, index })
    }

    /// The thread's slot index (for per-thread counters).
    #[inline]
    pub(crate) fn slot_index(&self) -> usize {
        self.index
    }

    /// The thread's slot.
    #[inline]
    pub(crate) fn thread(&self) -> &'static ThreadSlot {
        self.slot
    }

    /// True when the calling thread is inside a probe handler.
    pub(crate) fn current_thread_inside() -> bool {
        ThreadSlot::existing().is_some_and(|slot| slot.active.load(Ordering::Relaxed) != 0)
    }
}

impl Drop for HandlerGuard {
    #[inline]
    fn drop(&mut self) {
        self.slot.active.store(0, Ordering::Release);
    }
}

/// A hit that found its thread already inside a handler: while held, the site stays marked
/// so its probe list outlives the count of the miss. (A thread without a slot cannot mark;
/// its count reads the list unprotected, which needs more than 4096 threads in a window.)
pub(crate) struct MissMark {
    slot: Option<&'static ThreadSlot>,
}

impl Drop for MissMark {
    #[inline]
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            slot.nested.store(0, Ordering::Release);
        }
    }
}
