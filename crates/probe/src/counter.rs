//! Hit counters that a thread bumps without a locked instruction.
//!
//! A locked `add` is a full barrier on x86: in a detour it waits for the twenty-odd register
//! stores before it to drain, which costs more than the rest of an empty hit. So each thread
//! counts in its own cell, indexed by its [`ThreadSlot`](crate::thread_slot) and written only
//! by the slot's owner; a reader sums the cells.

use crate::thread_slot::MAX_THREADS;
use std::sync::atomic::{AtomicU64, Ordering};

/// One counter per thread slot, plus a shared cell for threads without a slot.
pub(crate) struct PerThreadCounter {
    /// `MAX_THREADS` cells, mapped lazily by the kernel: a page is only backed once a thread
    /// whose slot falls in it counts.
    cells: *mut AtomicU64,
    shared: AtomicU64,
}

// SAFETY: the cells are atomics in memory owned by the counter until drop.
unsafe impl Send for PerThreadCounter {}
// SAFETY: as above; all access is through atomics.
unsafe impl Sync for PerThreadCounter {}

const BYTES: usize = MAX_THREADS * std::mem::size_of::<AtomicU64>();

impl PerThreadCounter {
    pub(crate) fn new() -> PerThreadCounter {
        let cells = map_zeroed(BYTES).map_or(std::ptr::null_mut(), |cells| cells.cast());
        PerThreadCounter { cells, shared: AtomicU64::new(0) }
    }

    /// Adds one for the thread owning slot `slot` (`None`: a thread without a slot).
    ///
    /// Only the slot's owner writes its cell, so a load and a store suffice; a signal handler
    /// interrupting the owner between the two and counting on the same probe would lose one
    /// of the two counts, which no probe path does (a nested hit is a miss, counted apart).
    #[inline]
    pub(crate) fn add(&self, slot: Option<usize>) {
        match slot {
            Some(i) if !self.cells.is_null() => {
                // SAFETY: i < MAX_THREADS (a slot index) and the mapping holds MAX_THREADS cells.
                let cell = unsafe { &*self.cells.add(i) };
                cell.store(cell.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            }
            _ => {
                self.shared.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The total over all threads.
    pub(crate) fn sum(&self) -> u64 {
        let shared = self.shared.load(Ordering::Relaxed);
        if self.cells.is_null() {
            return shared;
        }
        // SAFETY: the mapping holds MAX_THREADS zero-initialised atomics.
        let cells = unsafe { std::slice::from_raw_parts(self.cells, MAX_THREADS) };
        shared + cells.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>()
    }
}

impl Drop for PerThreadCounter {
    fn drop(&mut self) {
        if !self.cells.is_null() {
            // SAFETY: the mapping made in new(), no longer referenced.
            unsafe { libc::munmap(self.cells.cast(), BYTES) };
        }
    }
}

/// `bytes` of zeroed, private memory that the kernel backs one page at a time as it is
/// first written — for tables indexed by thread slot, where most slots stay unused.
pub(crate) fn map_zeroed(bytes: usize) -> std::io::Result<*mut libc::c_void> {
    // SAFETY: an anonymous private mapping at an address of the kernel's choice has no
    // preconditions; failure is checked.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(map)
}
