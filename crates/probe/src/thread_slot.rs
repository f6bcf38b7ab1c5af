//! Per-thread state found without locks, allocation or thread-local storage, so that it
//! works in a signal handler, in a detour and in a `dlopen`ed library alike.
//!
//! A thread owns one [`ThreadSlot`] of a fixed table, found at a hash of its thread pointer
//! (or a little after it). Only the owning thread writes its slot's per-thread fields, so the
//! hot path reads them with plain loads and no atomic read-modify-write: one compare of the
//! owner word and the tid tells the thread it is home.
//!
//! A slot is claimed once per thread and kept; a thread that reuses a dead thread's TCB (the
//! C library caches them) inherits its slot, told apart by the tid, and starts it afresh.
//! When a thread's window is full, slots whose thread is gone are taken over.

use crate::arch::{current_tid, stack_pointer, thread_pointer};
use dynprobe_text::trap::TrapState;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Number of thread slots: the most threads that can be inside probe machinery at once
/// (and the number of per-thread buffers a client keyed by slot needs).
pub const MAX_THREADS: usize = 4096;
/// The `active` mark of handlers that belong to no site.
pub(crate) const ANY_SITE: usize = 1;
/// The `active` mark of a thread on its way back through a return trampoline: set when the
/// trampoline's dispatcher takes the thread's handler guard, and cleared not by the
/// dispatcher but by the trampoline's own code once the dispatcher has returned into it
/// (see `rethook`): while a thread has it, the trampoline must stay ([`any_returning`]).
pub(crate) const RETURNING: usize = 2;

/// Whether an `active` mark says its thread runs handlers of no site ([`ANY_SITE`]) or is
/// on its way back through a return trampoline ([`RETURNING`]).
pub(crate) fn marks_no_site(active: usize) -> bool {
    active == ANY_SITE || active == RETURNING
}

/// Whether some thread is on its way back through a return trampoline ([`RETURNING`]).
/// Threads that exited count too: a mark that can never clear keeps the trampoline, which is
/// the safe way to be wrong. Allocates nothing (it runs with threads stopped).
pub(crate) fn any_returning() -> bool {
    SLOTS.iter().any(|s| s.active.load(Ordering::Acquire) == RETURNING)
}

/// How far past its hash a thread's slot may lie.
const WINDOW: usize = 16;

/// One thread's state. Aligned to 128 bytes so that no two slots share a cache line, nor
/// the pair of lines Intel's spatial prefetcher fetches together (Intel 64 and IA-32
/// Architectures Optimization Reference Manual, "Data Prefetching"; crossbeam-utils'
/// `CachePadded` pads to 128 on x86-64 for the same reason): every hit writes its thread's
/// `active` twice, and neighbouring slots belong to threads that run at once (a thread whose
/// home slot is taken gets the next one, see `window`).
#[repr(align(128))]
pub(crate) struct ThreadSlot {
    /// The owner's thread pointer; 0 when free.
    owner: AtomicUsize,
    /// The owner's kernel thread id.
    tid: AtomicI32,
    /// The owner's process id: a slot found under the caller's thread pointer but another
    /// process's id is the forking thread's, copied into its `fork` child.
    pid: AtomicI32,
    /// Bumped each time the slot changes hands, so that per-slot data kept elsewhere (a
    /// return-probe instance stack) can tell it belongs to a previous owner.
    generation: AtomicU32,
    /// While the owner runs probe handlers: the address of the site whose handlers run
    /// (or [`ANY_SITE`], or [`RETURNING`]); 0 otherwise.
    pub(crate) active: AtomicUsize,
    /// While the owner, already running handlers, counts a missed hit of another site: that
    /// site's address (the count walks the site's probe list, which must not be freed
    /// under it); 0 otherwise.
    pub(crate) nested: AtomicUsize,
    /// The owner's calls are not recorded by the function-graph tracer (dynprobe's own
    /// threads, and the agent while it sets up).
    pub(crate) untraced: AtomicBool,
    /// The owner's virtual `SIGTRAP` state (see `dynprobe_text::trap::ThreadStateFn`).
    pub(crate) trap_state: TrapState,
    /// While the owner runs the pre-handlers of a breakpoint hit: the address of the mask
    /// word its signal frame restores at `sigreturn` (a signal guard's mask change must go
    /// there, or it would be undone); 0 otherwise.
    pub(crate) trap_mask: AtomicUsize,
    /// The owner runs dynprobe's own work for now (the agent setting up on the program's
    /// main thread): probes do not see it (`own_thread::set_current_thread_hidden`).
    pub(crate) hidden: AtomicBool,
    /// While the owner runs the handlers of a hit whose path saved the vector registers:
    /// where (a packed `VectorSave`, read by `hit_xmm`); 0 otherwise.
    pub(crate) vectors: AtomicUsize,
    /// Whether the owner runs on one of dynprobe's own threads' stacks: 0 not asked since
    /// the slot changed hands, 1 no, 2 yes (see [`ThreadSlot::owner_unseen`]).
    own: AtomicU8,
}

/// Bit `i` set once slot `i` has ever been claimed: what [`for_each_claimed_slot`] walks, so
/// that summing a per-thread table (a probe's hit counter) reads the cells of the threads
/// that can have written one, not all [`MAX_THREADS`] of them, a page apart each.
static EVER_CLAIMED: [AtomicU64; MAX_THREADS / 64] = [const { AtomicU64::new(0) }; MAX_THREADS / 64];

/// Calls `f` with the index of every slot some thread has claimed since the process began
/// (a superset of the slots in use: a slot's bit is never cleared).
pub(crate) fn for_each_claimed_slot(mut f: impl FnMut(usize)) {
    for (word_index, word) in EVER_CLAIMED.iter().enumerate() {
        let mut bits = word.load(Ordering::Acquire);
        while bits != 0 {
            let bit = bits.trailing_zeros() as usize;
            f(word_index * 64 + bit);
            bits &= bits - 1;
        }
    }
}

static SLOTS: [ThreadSlot; MAX_THREADS] = [const {
    ThreadSlot {
        owner: AtomicUsize::new(0),
        tid: AtomicI32::new(0),
        pid: AtomicI32::new(0),
        generation: AtomicU32::new(0),
        active: AtomicUsize::new(0),
        nested: AtomicUsize::new(0),
        untraced: AtomicBool::new(false),
        trap_state: TrapState::new(),
        trap_mask: AtomicUsize::new(0),
        hidden: AtomicBool::new(false),
        vectors: AtomicUsize::new(0),
        own: AtomicU8::new(0),
    }
}; MAX_THREADS];

#[inline(always)]
fn home(tp: usize) -> usize {
    (tp.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52) % MAX_THREADS
}

impl ThreadSlot {
    /// The calling thread's slot, claiming one on first use; `None` when every slot of its
    /// window belongs to a live thread.
    #[inline]
    pub(crate) fn current() -> Option<(usize, &'static ThreadSlot)> {
        let tp = thread_pointer();
        let tid = current_tid();
        let h = home(tp);
        let slot = &SLOTS[h];
        if slot.owner.load(Ordering::Relaxed) == tp && slot.tid.load(Ordering::Relaxed) == tid {
            return Some((h, slot));
        }
        Self::find_or_claim(tp, tid)
    }

    /// Slot `index`, if the calling thread owns it: the compares of [`Self::current`]
    /// without its hash of the thread pointer. For a path that knows which slot its thread
    /// should have — a return into the trampoline entry of an instance the thread pushed —
    /// and asks [`Self::current`] when this says `None`. The tid is compared too: a forked
    /// child's thread has its parent thread's pointer, and so its slot, which
    /// [`Self::current`] restarts for it (tid, pid, what the parent thread held) before its
    /// first use — a guard taken on the slot unrestarted would be undone by that restart.
    #[inline(always)]
    pub(crate) fn owned(index: usize) -> Option<(usize, &'static ThreadSlot)> {
        let index = index & (MAX_THREADS - 1);
        let slot = &SLOTS[index];
        let mine =
            slot.owner.load(Ordering::Relaxed) == thread_pointer() && slot.tid.load(Ordering::Relaxed) == current_tid();
        mine.then_some((index, slot))
    }

    /// The slot of another thread of this process, (`tp`, `tid`), claimed for it as the
    /// thread itself would claim it ([`Self::current`]) if it has none. The caller holds
    /// that thread stopped (the text layer's stop), so that it cannot claim one meanwhile.
    pub(crate) fn of_stopped_thread(tp: usize, tid: i32) -> Option<(usize, &'static ThreadSlot)> {
        let found = window(tp)
            .find(|&i| SLOTS[i].owner.load(Ordering::Acquire) == tp && SLOTS[i].tid.load(Ordering::Relaxed) == tid);
        match found {
            Some(i) => Some((i, &SLOTS[i])),
            None => Self::find_or_claim(tp, tid),
        }
    }

    /// The calling thread's slot if it has one (never claims).
    pub(crate) fn existing() -> Option<&'static ThreadSlot> {
        let (tp, tid) = (thread_pointer(), current_tid());
        window(tp)
            .map(|i| &SLOTS[i])
            .find(|s| s.owner.load(Ordering::Relaxed) == tp && s.tid.load(Ordering::Relaxed) == tid)
    }

    /// True when probes must not see the slot's owner, the calling thread (this must be its
    /// own slot, from [`Self::current`]): it is one of dynprobe's own threads or hidden for
    /// now — what [`current_thread_is_own`](crate::own_thread::current_thread_is_own)
    /// answers, but with its scan of the own stacks made once per owner rather than on
    /// every hit (a thread's stack does not change; a new owner asks again).
    #[inline]
    pub(crate) fn owner_unseen(&self) -> bool {
        let own = match self.own.load(Ordering::Relaxed) {
            0 => {
                let own = crate::own_thread::is_own_stack(stack_pointer() as u64);
                self.own.store(1 + own as u8, Ordering::Relaxed);
                own
            }
            known => known == 2,
        };
        own || self.hidden.load(Ordering::Relaxed)
    }

    /// True when the owner, the calling thread, is known to be seen by probes: asked
    /// already by [`Self::owner_unseen`] and found not dynprobe's own, and not hidden now.
    /// False says nothing: [`Self::owner_unseen`] answers then.
    #[inline]
    pub(crate) fn seen_by_probes(&self) -> bool {
        self.own.load(Ordering::Relaxed) == 1 && !self.hidden.load(Ordering::Relaxed)
    }

    /// The owner's kernel thread id: the calling thread's, on a slot it found as its own.
    #[inline]
    pub(crate) fn owner_tid(&self) -> i32 {
        self.tid.load(Ordering::Relaxed)
    }

    /// The slot's generation (see the field).
    #[inline]
    #[allow(dead_code)] // read by return probes
    pub(crate) fn generation(&self) -> u32 {
        self.generation.load(Ordering::Relaxed)
    }

    #[cold]
    fn find_or_claim(tp: usize, tid: i32) -> Option<(usize, &'static ThreadSlot)> {
        // Our own thread pointer in the window: ours already, or left by a dead thread whose
        // TCB we now use (thread pointers of live threads are unique), which we take over.
        if let Some(i) = window(tp).find(|&i| SLOTS[i].owner.load(Ordering::Acquire) == tp) {
            // A fork child keeps what its thread blocked, as the kernel keeps its mask
            // (fork(2)); a thread reusing a dead one's TCB starts afresh.
            let forked = SLOTS[i].pid.load(Ordering::Relaxed) != current_pid();
            SLOTS[i].restart(tid, !forked);
            return Some((i, &SLOTS[i]));
        }
        for i in window(tp) {
            if SLOTS[i].owner.compare_exchange(0, tp, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                SLOTS[i].restart(tid, true);
                return Some((i, &SLOTS[i]));
            }
        }
        for i in window(tp) {
            let old = SLOTS[i].owner.load(Ordering::Acquire);
            if old != 0
                && !thread_alive(SLOTS[i].tid.load(Ordering::Acquire))
                && SLOTS[i].owner.compare_exchange(old, tp, Ordering::AcqRel, Ordering::Relaxed).is_ok()
            {
                SLOTS[i].restart(tid, true);
                return Some((i, &SLOTS[i]));
            }
        }
        None
    }

    /// Makes the slot thread `tid`'s; `new_thread`: also its virtual `SIGTRAP` state, which
    /// a fork child keeps.
    fn restart(&self, tid: i32, new_thread: bool) {
        let index = (self as *const ThreadSlot as usize - SLOTS.as_ptr() as usize) / std::mem::size_of::<ThreadSlot>();
        EVER_CLAIMED[index / 64].fetch_or(1 << (index % 64), Ordering::Release);
        self.active.store(0, Ordering::Relaxed);
        self.nested.store(0, Ordering::Relaxed);
        self.untraced.store(false, Ordering::Relaxed);
        if new_thread {
            self.trap_state.reset();
        } else {
            self.trap_state.forget_held_after_fork();
        }
        self.trap_mask.store(0, Ordering::Relaxed);
        self.hidden.store(false, Ordering::Relaxed);
        self.vectors.store(0, Ordering::Relaxed);
        self.own.store(0, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.pid.store(current_pid(), Ordering::Relaxed);
        self.tid.store(tid, Ordering::Release);
    }
}

/// The slot of live thread `tid` of this process, if it has one (a scan of the table: for
/// rare questions about another thread).
pub(crate) fn slot_of_thread(tid: i32) -> Option<&'static ThreadSlot> {
    SLOTS.iter().find(|s| s.owner.load(Ordering::Relaxed) != 0 && s.tid.load(Ordering::Relaxed) == tid)
}

/// The calling thread's slot index (below [`MAX_THREADS`]), claiming one on first use;
/// `None` when none is free. The index the return hooks report calls under.
pub fn current_thread_slot() -> Option<usize> {
    ThreadSlot::current().map(|(index, _)| index)
}

/// Stops (`false`) or resumes (`true`) the function-graph tracer's recording of the calling
/// thread's calls: dynprobe's own work — its background threads, the agent setting up —
/// is not the program's and stays out of traces.
pub fn set_current_thread_traced(traced: bool) {
    if let Some((_, slot)) = ThreadSlot::current() {
        slot.untraced.store(!traced, Ordering::Relaxed);
    }
}

fn window(tp: usize) -> impl Iterator<Item = usize> + Clone {
    let start = home(tp);
    (0..WINDOW).map(move |i| (start + i) % MAX_THREADS)
}

/// The process id, by a raw system call (the C library caches it, and a probe may be on
/// its `getpid`).
fn current_pid() -> i32 {
    dynprobe_text::raw::getpid()
}

/// True when thread `tid` of this process still exists.
pub(crate) fn thread_alive(tid: i32) -> bool {
    // Raw: it runs on hit paths, inside the program's calls, whose `errno` it must keep.
    dynprobe_text::raw::thread_alive(tid)
}

/// Waits until no thread runs the handlers of the site at `site` — the grace period of the
/// detour path, whose readers cannot block the stop signal the way the trap path does.
/// Readers mark themselves with a plain store (no fence on the hot path); the
/// `membarrier` in [`try_sync_core`](dynprobe_text::sync_core::try_sync_core), which the
/// caller issues first, orders that store before our scan on every CPU.
pub(crate) fn wait_while_active(site: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    // A slot whose owner is gone (it exited, or this is a forked child and the owner was
    // another thread of the parent) will never be cleared and holds no one up.
    let busy = |s: &ThreadSlot| {
        (s.active.load(Ordering::Acquire) == site || s.nested.load(Ordering::Acquire) == site)
            && thread_alive(s.tid.load(Ordering::Acquire))
    };
    while SLOTS.iter().any(busy) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    true
}
