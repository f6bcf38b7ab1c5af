//! Hit counters that a thread bumps without a locked instruction.
//!
//! A locked `add` is a full barrier on x86: in a detour it waits for the twenty-odd register
//! stores before it to drain, which costs more than the rest of an empty hit. So each thread
//! counts in its own cell, indexed by its [`ThreadSlot`](crate::thread_slot) and written only
//! by the slot's owner; a reader sums the cells. The cells of all counters share one arena,
//! laid out so that one thread's cells of neighbouring counters share pages.

use crate::thread_slot::MAX_THREADS;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// One counter per thread slot, plus a shared cell for threads without a slot.
pub(crate) struct PerThreadCounter {
    /// The cell of thread slot 0 in the counters' [arena](ARENA); slot `i`'s is
    /// [`PER_BLOCK`] cells further per slot. Null when no arena block could be mapped (all
    /// counts then go to `shared`).
    cells: *mut AtomicU64,
    /// The counter's index in the arena, given back on drop.
    index: usize,
    shared: AtomicU64,
}

// SAFETY: the cells are atomics in arena memory that belongs to the counter until drop.
unsafe impl Send for PerThreadCounter {}
// SAFETY: as above; all access is through atomics.
unsafe impl Sync for PerThreadCounter {}

/// Counters per arena block. A block holds, for each thread slot, the cells of its
/// `PER_BLOCK` counters side by side: a thread that hits many probes touches one page per
/// block, not one page per probe. (One mapping per counter, as before, cost a system call
/// per probe and 4 KiB of memory per probe a thread hit: 80,000 entry probes of a program
/// traced whole were 80,000 mappings and up to 320 MB.)
const PER_BLOCK: usize = 4096 / std::mem::size_of::<AtomicU64>();
/// Bytes of a block: mapped lazily by the kernel, backed a page at a time as threads count.
const BLOCK_BYTES: usize = MAX_THREADS * PER_BLOCK * std::mem::size_of::<AtomicU64>();

/// Every counter's cells: blocks mapped as needed and unmapped only once no counter is
/// left ([`release_unused`]), counter indices reused once their cells are zero again.
struct Arena {
    blocks: Vec<usize>,
    free: Vec<usize>,
    next: usize,
}

static ARENA: Mutex<Arena> = Mutex::new(Arena { blocks: Vec::new(), free: Vec::new(), next: 0 });

impl PerThreadCounter {
    pub(crate) fn new() -> PerThreadCounter {
        let mut arena = ARENA.lock().unwrap_or_else(|e| e.into_inner());
        let index = arena.free.pop().unwrap_or(arena.next);
        let block = index / PER_BLOCK;
        if block == arena.blocks.len() {
            match map_zeroed(BLOCK_BYTES) {
                Ok(map) => arena.blocks.push(map as usize),
                Err(_) => return PerThreadCounter { cells: std::ptr::null_mut(), index, shared: AtomicU64::new(0) },
            }
        }
        if index == arena.next {
            arena.next += 1;
        }
        // SAFETY: the block holds PER_BLOCK cells per slot; index % PER_BLOCK is inside slot 0's.
        let cells = unsafe { (arena.blocks[block] as *mut AtomicU64).add(index % PER_BLOCK) };
        PerThreadCounter { cells, index, shared: AtomicU64::new(0) }
    }

    /// The cell of thread slot `slot` (`slot < MAX_THREADS`, cells not null).
    #[inline]
    fn cell(&self, slot: usize) -> &AtomicU64 {
        Cells(self.cells).cell(slot)
    }

    /// The counter's cells, for a caller that keeps them nearer than the counter (a probe
    /// list's `Solo`); `None` when it counts in its shared cell only.
    pub(crate) fn cells(&self) -> Option<Cells> {
        (!self.cells.is_null()).then_some(Cells(self.cells))
    }

    /// Adds one for the thread owning slot `slot` (`None`: a thread without a slot).
    ///
    /// Only the slot's owner writes its cell, so a load and a store suffice; a signal handler
    /// interrupting the owner between the two and counting on the same probe would lose one
    /// of the two counts, which no probe path does (a nested hit is a miss, counted apart).
    #[inline]
    pub(crate) fn add(&self, slot: Option<usize>) {
        match slot {
            Some(i) if !self.cells.is_null() => Cells(self.cells).add(i),
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
        // Only a thread with a slot writes a cell: the slots ever claimed are enough to read.
        let mut total = shared;
        crate::thread_slot::for_each_claimed_slot(|i| total += self.cell(i).load(Ordering::Relaxed));
        total
    }
}

/// A counter's per-thread cells (not null), valid while the counter lives.
#[derive(Clone, Copy)]
pub(crate) struct Cells(*mut AtomicU64);

impl Cells {
    /// The cell of thread slot `slot` (`slot < MAX_THREADS`).
    #[inline]
    fn cell<'a>(self, slot: usize) -> &'a AtomicU64 {
        // SAFETY: slot < MAX_THREADS and the block holds PER_BLOCK cells for each of them,
        // zero-initialised atomics that live as long as the process.
        // (Wrapping arithmetic: it cannot overflow, and no check may panic on a light
        // detour's path, see `crate::light`.)
        unsafe { &*self.0.add(slot.wrapping_mul(PER_BLOCK)) }
    }

    /// Adds one for the thread owning slot `slot`, which must be the calling thread (see
    /// [`PerThreadCounter::add`]).
    #[inline]
    pub(crate) fn add(self, slot: usize) {
        let cell = self.cell(slot);
        cell.store(cell.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }
}

impl Drop for PerThreadCounter {
    fn drop(&mut self) {
        if self.cells.is_null() {
            return;
        }
        // No thread counts any more (the probe is gone after a grace period): zero what was
        // counted (reading an untouched page backs nothing) and let the next counter reuse
        // the cells.
        crate::thread_slot::for_each_claimed_slot(|i| {
            if self.cell(i).load(Ordering::Relaxed) != 0 {
                self.cell(i).store(0, Ordering::Relaxed);
            }
        });
        ARENA.lock().unwrap_or_else(|e| e.into_inner()).free.push(self.index);
    }
}

/// Unmaps the blocks once no counter is left (every probe gone, the end of an attach
/// session), so that the process keeps no memory of dynprobe's; the next counter maps a
/// block again. False when some counter is still alive.
pub(crate) fn release_unused() -> bool {
    let mut arena = ARENA.lock().unwrap_or_else(|e| e.into_inner());
    if arena.free.len() != arena.next {
        return false;
    }
    for block in arena.blocks.drain(..) {
        // SAFETY: a block `map_zeroed` mapped; no counter points into it (all were dropped).
        unsafe { libc::munmap(block as *mut libc::c_void, BLOCK_BYTES) };
    }
    arena.free.clear();
    arena.next = 0;
    true
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_counters_share_pages_and_a_reused_one_starts_at_zero() {
        // Slots of real threads (a cell is only ever written by a thread that claimed it).
        let slots: Vec<usize> = (0..3)
            .map(|_| std::thread::spawn(crate::thread_slot::current_thread_slot).join().unwrap().expect("a slot"))
            .collect();
        let a = PerThreadCounter::new();
        let b = PerThreadCounter::new();
        assert!(!a.cells.is_null() && !b.cells.is_null());
        for slot in [Some(slots[0]), Some(slots[1]), Some(slots[2]), Some(slots[1]), None] {
            a.add(slot);
        }
        b.add(Some(slots[1]));
        assert_eq!((a.sum(), b.sum()), (5, 1));
        if a.index / PER_BLOCK == b.index / PER_BLOCK {
            // One thread's cells of both counters are on one page.
            let page = |c: &PerThreadCounter| c.cell(slots[1]) as *const _ as usize / 4096;
            assert_eq!(page(&a), page(&b));
        }
        let index = a.index;
        drop(a);
        let c = PerThreadCounter::new();
        assert_eq!(c.index, index, "the freed index is reused");
        assert_eq!(c.sum(), 0, "with its cells zeroed");
        assert_eq!(b.sum(), 1);
    }
}
