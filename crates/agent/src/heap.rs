//! The agent's own heap in attach mode: every Rust allocation of the agent — symbol tables,
//! decoded code, the tables iced-x86 builds once and never frees — comes from one private
//! mapping, which goes away with the library.
//!
//! Why not the C library's `malloc`: the agent's threads would each get a malloc arena of
//! their own (glibc's `arena_get2` makes a new one for a thread's first allocation while
//! there are fewer than 8 per core; mallopt(3) `M_ARENA_MAX`), which the C library never
//! unmaps — two mappings per thread left in the program after the first session — and what
//! the agent's statics still hold when it is unloaded would stay allocated there for good.
//! From a mapping of its own, the end of a session gives everything back at once: the
//! library's destructor unmaps it when `dlclose` unloads the library (which the dynamic
//! loader does only when nothing of it can run any more, dlclose(3)).
//!
//! A started program (the agent preloaded for `probe` or `record`) keeps the C library's
//! allocator: there the agent stays for the process's life.
//!
//! The allocator: power-of-two size classes of at least 16 bytes, each with a free list,
//! carved from the mapping by a bump pointer (a block is aligned to its size, up to a
//! page). Freed blocks of 64 KiB or more are given back to the kernel (`MADV_DONTNEED`)
//! and kept for reuse. One spin lock: allocations come from the agent's own threads and
//! its set-up, never from a probe handler (they allocate nothing).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Address space reserved for the heap (backed only as it is used: `MAP_NORESERVE`).
const REGION: usize = 4 << 30;
/// The smallest block.
const MIN_SHIFT: u32 = 4;
/// Size classes: 2^4 .. 2^34 bytes.
const CLASSES: usize = 31;
const PAGE: usize = 4096;
/// Freed blocks this large give their pages back.
const RETURN_PAGES: usize = 64 << 10;

/// The heap's start (0 while the C library's allocator is used) and end.
static BASE: AtomicUsize = AtomicUsize::new(0);
static END: AtomicUsize = AtomicUsize::new(0);
static LOCK: AtomicBool = AtomicBool::new(false);

/// The bump pointer and the free lists' heads, under [`LOCK`].
struct State {
    next: usize,
    free: [usize; CLASSES],
}

struct Shared(UnsafeCell<State>);
// SAFETY: the state is only touched with LOCK held.
unsafe impl Sync for Shared {}

static STATE: Shared = Shared(UnsafeCell::new(State { next: 0, free: [0; CLASSES] }));

/// The agent's global allocator (see the module documentation).
pub struct AgentHeap;

#[global_allocator]
static HEAP: AgentHeap = AgentHeap;

/// Switches the agent's allocations to its own mapping, for an attach session. Called
/// before the agent allocates anything of the session; what was allocated before stays
/// the C library's and is freed there. Without the mapping (no address space), the C
/// library's allocator goes on serving.
pub fn use_own_mapping() {
    if BASE.load(Ordering::Acquire) != 0 {
        return;
    }
    // SAFETY: a fresh private anonymous mapping at an address of the kernel's choice.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            REGION,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return;
    }
    lock();
    // SAFETY: under LOCK.
    unsafe { (*STATE.0.get()).next = base as usize };
    END.store(base as usize + REGION, Ordering::Release);
    BASE.store(base as usize, Ordering::Release);
    unlock();
}

/// Whether the last attach session left nothing of the agent's that could run (see
/// [`set_released`]).
static RELEASED: AtomicBool = AtomicBool::new(false);

/// Tells the heap whether nothing of the agent's can run any more (`true` at the end of a
/// session that released everything; `false` when a session starts): only then does the
/// library's destructor unmap the heap.
pub fn set_released(released: bool) {
    RELEASED.store(released, Ordering::Release);
}

/// Unmaps the heap, when the library is being unloaded: run by the dynamic loader's
/// `dlclose` (`.fini_array`), after every thread of the agent has ended and before the
/// library's code is unmapped — nothing of the agent runs any more, so nothing uses its
/// heap. The destructor also runs at the process's exit, maybe while probes are still in
/// place (their handlers' state is on this heap): then, or after a session that had to
/// keep something, the heap stays.
extern "C" fn unmap_on_unload() {
    if !RELEASED.load(Ordering::Acquire) {
        return;
    }
    let base = BASE.swap(0, Ordering::AcqRel);
    if base != 0 {
        // SAFETY: the mapping `use_own_mapping` made; no code that could use it runs again.
        unsafe { libc::munmap(base as *mut libc::c_void, REGION) };
    }
}

#[used]
#[link_section = ".fini_array"]
static FINI: extern "C" fn() = unmap_on_unload;

fn lock() {
    while LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        std::hint::spin_loop();
    }
}

fn unlock() {
    LOCK.store(false, Ordering::Release);
}

/// The class of a block for `layout`: its size is `1 << class + MIN_SHIFT`.
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT).checked_next_power_of_two()?;
    let class = (size.trailing_zeros() - MIN_SHIFT) as usize;
    (class < CLASSES).then_some(class)
}

fn ours(ptr: *mut u8) -> bool {
    let (base, addr) = (BASE.load(Ordering::Acquire), ptr as usize);
    base != 0 && addr >= base && addr < END.load(Ordering::Relaxed)
}

/// A block of `class`, or null when the heap is full.
fn take(class: usize) -> *mut u8 {
    let size = 1usize << (class as u32 + MIN_SHIFT);
    lock();
    // SAFETY: under LOCK; a free block's first word holds the next free block of its class.
    let block = unsafe {
        let state = &mut *STATE.0.get();
        let head = state.free[class];
        if head != 0 {
            state.free[class] = *(head as *const usize);
            head
        } else {
            let start = state.next.next_multiple_of(size.min(PAGE));
            if start + size <= END.load(Ordering::Relaxed) {
                state.next = start + size;
                start
            } else {
                0
            }
        }
    };
    unlock();
    block as *mut u8
}

/// Puts a block of `class` back on its free list.
fn give_back(ptr: *mut u8, class: usize) {
    let size = 1usize << (class as u32 + MIN_SHIFT);
    if size >= RETURN_PAGES {
        // SAFETY: the block is page-aligned (blocks are aligned to their size, up to a page)
        // and ours alone; its pages read as zeros next time.
        unsafe { libc::madvise(ptr.cast(), size, libc::MADV_DONTNEED) };
    }
    lock();
    // SAFETY: under LOCK; the block is free and at least a word long.
    unsafe {
        let state = &mut *STATE.0.get();
        *(ptr as *mut usize) = state.free[class];
        state.free[class] = ptr as usize;
    }
    unlock();
}

// SAFETY: blocks are handed out once until given back, sized and aligned for their layout
// (a class's size is a power of two at least the layout's size and alignment, and blocks
// start at a multiple of their size up to a page — the mapping is page-aligned); memory
// not ours goes to the C library's allocator that made it.
unsafe impl GlobalAlloc for AgentHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if BASE.load(Ordering::Acquire) != 0 && layout.align() <= PAGE {
            if let Some(class) = class_of(layout) {
                let block = take(class);
                if !block.is_null() {
                    return block;
                }
            }
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ours(ptr) {
            give_back(ptr, class_of(layout).expect("a block of ours has a class"));
        } else {
            // SAFETY: the C library's block, with the layout it was allocated with.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !ours(ptr) {
            // SAFETY: the C library's block, forwarded as the caller asked.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller promises a valid new size for this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if class_of(new_layout) == class_of(layout) {
            return ptr;
        }
        // SAFETY: as `alloc`; then the old block's bytes (the smaller of the two sizes) are
        // copied into the new one, which does not overlap it, and the old one is freed.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}
