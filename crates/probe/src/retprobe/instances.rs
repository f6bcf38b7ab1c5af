//! The per-thread instance stacks of return hooks (the kernel's `rethook` with per-task
//! storage): one instance per call in flight, indexed by (thread slot, depth), so that the
//! trampoline entry a function returns into names its instance without a lookup; what a
//! new instance claims (abandoned ones dropped), how it is committed, and how a return ends
//! it and every instance sharing its return-address slot.

use super::*;

/// One call in flight. `orig` must stay first: the trampoline's unwind rule reads it at
/// `table + index * size_of::<Instance>()`.
#[repr(C)]
pub(super) struct Instance {
    /// The original return address.
    pub(super) orig: u64,
    /// Where the return address lives (`rsp` at the function's entry).
    pub(super) slot_addr: u64,
    pub(super) probe: u32,
    pub(super) id: u32,
    pub(super) _pad: u64,
    pub(super) data: InstanceData,
}

/// A thread slot's instance stack header. Written only by the slot's owner thread (plain
/// loads and stores through atomics), except `dispatching`, which unregistering reads.
/// Every tracked call writes `top` twice and its return writes `dispatching` twice: aligned
/// as [`ThreadSlot`] is, so that threads of neighbouring slots never write one cache line.
#[repr(align(128))]
pub(super) struct SlotStack {
    /// The [`ThreadSlot`] generation the stack belongs to.
    pub(super) generation: AtomicU32,
    /// Instances in use: `[0, top)`.
    pub(super) top: AtomicU32,
    /// `probe index + 1` while the owner may be running that probe's return handler, else 0.
    pub(super) dispatching: AtomicU32,
    /// The owner's thread pointer and process id when the stack was last (re)started: a
    /// forked child's thread has the parent thread's pointer and its stack, and so keeps
    /// its instances.
    pub(super) owner_tp: AtomicUsize,
    pub(super) pid: AtomicI32,
}

pub(super) static STACKS: [SlotStack; MAX_THREADS] = [const {
    SlotStack {
        generation: AtomicU32::new(0),
        top: AtomicU32::new(0),
        dispatching: AtomicU32::new(0),
        owner_tp: AtomicUsize::new(0),
        pid: AtomicI32::new(0),
    }
}; MAX_THREADS];

/// The instance table: `MAX_THREADS * MAX_DEPTH` instances, mapped at the first
/// registration and unmapped only when no instance is in use (a late return may still
/// read it): [`release_trampoline`].
pub(super) static INSTANCES: AtomicPtr<Instance> = AtomicPtr::new(std::ptr::null_mut());

#[inline(always)]
pub(super) fn instance(index: usize) -> *mut Instance {
    // SAFETY: the table holds MAX_THREADS * MAX_DEPTH instances and every caller computes
    // `index` as slot * MAX_DEPTH + depth with both in range.
    unsafe { INSTANCES.load(Ordering::Relaxed).add(index) }
}

/// The instance stack of thread slot `slot` (below [`MAX_THREADS`]). Masked rather than
/// checked: the hit paths must have no index check that could panic (see `crate::light`).
#[inline(always)]
pub(super) fn stack(slot: usize) -> &'static SlotStack {
    &STACKS[slot & (MAX_THREADS - 1)]
}

const _: () = assert!(MAX_THREADS.is_power_of_two() && MAX_RETURN_PROBES.is_power_of_two());

/// How many calls of probe (`index`, `id`) the instances `[base, base + top)` of one thread
/// track, for `maxactive`: a walk of the thread's stack, which a call needs only when the
/// stack already holds `maxactive` instances of any probe. (A count per thread and probe,
/// kept up to date instead, cost every tracked call a store at its entry and its return —
/// ~2 ns of a return probe's ~30 on a Zen 4 host — to spare the deep calls this walk.)
#[cold]
#[inline(never)]
pub(super) fn in_flight_of(base: usize, top: usize, index: u32, id: u32) -> usize {
    (base..base + top)
        // SAFETY: instances of the calling thread below `top`.
        .map(|k| unsafe { &*instance(k) })
        .filter(|inst| inst.slot_addr != 0 && inst.probe == index && inst.id == id)
        .count()
}

/// Reads the return-address slot at `rsp` at a function entry.
#[inline(always)]
pub(super) fn read_slot(rsp: u64) -> u64 {
    // SAFETY: at a function entry `rsp` points at the return address its call pushed.
    unsafe { std::ptr::read_volatile(rsp as *const u64) }
}

/// True when the return-address slot `slot_addr` still holds the trampoline entry of
/// instance `index` (its call is in flight). Read without faulting: an abandoned instance
/// may point into a stack that is gone (a thread's `sigaltstack`, a coroutine's), and then
/// its call is over. Only the paths that deal with abandoned instances get here, so the
/// system call it costs is off the hot path.
#[cold]
pub(super) fn still_diverted(slot_addr: u64, index: usize) -> bool {
    let mut word = [0u8; 8];
    // A raw read: it leaves the program's `errno` alone.
    dynprobe_text::raw::read(slot_addr, &mut word) && rethook::is_entry_of(u64::from_le_bytes(word), index)
}

/// Gives an instance back out of order: [`on_return`] does this when an instance above it
/// may still be live on another stack, so `top` cannot come down.
pub(super) fn free(inst: &mut Instance) {
    inst.slot_addr = 0;
}

impl SlotStack {
    /// Makes the stack the current owner's: emptied for a new thread, kept for the thread
    /// of a forked child (its stack still has the parent thread's probed frames on it).
    #[cold]
    pub(super) fn restart(&self, generation: u32) {
        self.restart_for(generation, thread_pointer());
    }

    /// [`Self::restart`] for the owner whose thread pointer is `tp` (the calling thread, or
    /// one held stopped in this process).
    #[cold]
    pub(super) fn restart_for(&self, generation: u32, tp: usize) {
        // SAFETY: getpid has no arguments and cannot fail.
        let pid = unsafe { libc::getpid() };
        let forked = self.owner_tp.load(Ordering::Relaxed) == tp && self.pid.load(Ordering::Relaxed) != pid;
        if !forked {
            self.top.store(0, Ordering::Relaxed);
        }
        self.owner_tp.store(tp, Ordering::Relaxed);
        self.pid.store(pid, Ordering::Relaxed);
        self.generation.store(generation, Ordering::Relaxed);
    }
}

/// The instance `probe` index of calls entered by the function-graph tracer.
pub(super) const GRAPH: u32 = u32::MAX;

/// Where a new instance goes on the calling thread's stack, after [`claim`] dropped the
/// abandoned ones.
pub(super) struct Claim {
    pub(super) slot: usize,
    pub(super) base: usize,
    pub(super) top: usize,
    /// What the return-address slot holds now.
    pub(super) current: u64,
    /// The instances at the top already divert this return-address slot.
    pub(super) shared: bool,
}

/// The steps every new instance takes, whoever owns it: the thread's stack (started afresh
/// for a new thread), abandoned instances dropped (reported to the graph tracer as unwound),
/// and whether other instances already divert this call. `None` when the thread has no slot
/// or `rsp` holds no return address.
#[inline(always)]
pub(super) fn claim(slot: usize, thread: &ThreadSlot, rsp: u64) -> Option<Claim> {
    if rsp & 7 != 0 {
        // Not entered by a call: no return address there to divert. (A call on a stack not
        // 16-byte aligned is fine: GCC makes those to local functions that need no
        // alignment, and the trampoline aligns its own frame.)
        return None;
    }
    let stack = stack(slot);
    if stack.generation.load(Ordering::Relaxed) != thread.generation() {
        stack.restart(thread.generation());
    }
    let base = slot * MAX_DEPTH;
    let top = stack.top.load(Ordering::Relaxed) as usize;
    // Nearly every call: an empty stack, or the instance below belongs to a caller further
    // up this stack (its slot above ours: in flight, and not this call's). Nothing is
    // abandoned then and nothing diverts our slot yet — what the loop below would find, at
    // the cost of its registers kept across it (a hit's stores are what it costs most).
    // SAFETY: an instance of this thread below `top`.
    if top == 0 || unsafe { (*instance(base + top - 1)).slot_addr } > rsp {
        return Some(Claim { slot, base, top, current: read_slot(rsp), shared: false });
    }
    Some(claim_past_abandoned(slot, base, top, rsp))
}

/// [`claim`] when the instance at the top lies at or below the new call's return-address
/// slot: dropped if abandoned, joined if it diverts this very call.
#[cold]
#[inline(never)]
fn claim_past_abandoned(slot: usize, base: usize, top_now: usize, rsp: u64) -> Claim {
    let stack = stack(slot);
    let mut top = top_now;
    while top > 0 {
        // SAFETY: instances below `top` were written by this thread.
        let below = unsafe { &*instance(base + top - 1) };
        // Given back out of order already, or at or below our own slot and no longer
        // diverting it: its call was abandoned (a longjmp, an exception). Our own slot still
        // diverted is another return probe on this very call.
        let diverted = || match below.slot_addr == rsp {
            true => rethook::is_entry_of(read_slot(rsp), base + top - 1),
            false => still_diverted(below.slot_addr, base + top - 1),
        };
        // A slot within the red zone below ours is a frame of this very stack that is gone:
        // its memory may still hold the sled address (probe paths skip the red zone and
        // leave it as it was), so the value check cannot tell; another stack's live frame
        // cannot sit right under ours.
        let in_red_zone = below.slot_addr < rsp && rsp - below.slot_addr <= dynprobe_arch::native::RED_ZONE;
        let abandoned = below.slot_addr == 0 || in_red_zone || (below.slot_addr <= rsp && !diverted());
        if !abandoned {
            if below.slot_addr < rsp {
                top = abandoned_at_our_slot(base, top, rsp).unwrap_or(top);
            }
            break;
        }
        top -= 1;
    }
    // Taken off the stack before they are reported (see `abandon`), deepest first. (No
    // store when none was: a hit's stores are what it costs most on some hosts.)
    if top != top_now {
        stack.top.store(top as u32, Ordering::Relaxed);
    }
    compiler_fence(Ordering::SeqCst);
    for k in (top..top_now).rev() {
        // SAFETY: instances of this thread, unchanged since they were read above: every
        // caller holds the thread's handler guard, so no signal handler pushes meanwhile.
        let gone = unsafe { &*instance(base + k) };
        if gone.slot_addr != 0 {
            abandon(slot, k, gone.probe, gone.data[0]);
        }
    }
    let current = read_slot(rsp);
    // SAFETY: as above, an instance of this thread below `top`.
    let shared = top > 0
        && unsafe { (*instance(base + top - 1)).slot_addr } == rsp
        && rethook::is_entry_of(current, base + top - 1);
    Claim { slot, base, top, current, shared }
}

/// Where the abandoned instances start when the top ones lie below `rsp` but still look
/// diverted: a `longjmp` out of frames larger than the red zone leaves their memory, sled
/// addresses included, untouched. If an instance further down diverted this very
/// return-address slot, and the slot now holds a plain return address, its frame made a
/// new call from the same place: it and everything pushed after it are gone. (Instances
/// on other stacks — a coroutine's — are not at our slot, so they are kept.) Off the hot
/// path: only reached when the top instance is below the caller's frame.
#[cold]
pub(super) fn abandoned_at_our_slot(base: usize, top: usize, rsp: u64) -> Option<usize> {
    // SAFETY: instances of this thread below `top`.
    let j = (0..top - 1).rev().find(|&j| unsafe { (*instance(base + j)).slot_addr } == rsp)?;
    (!rethook::is_entry_of(read_slot(rsp), base + j)).then_some(j)
}

/// Pushes the instance at `c.top`, whose data is filled in, and diverts the return address
/// at `rsp` to its entry of `sled`.
#[inline(always)]
pub(super) fn commit(c: &Claim, rsp: u64, probe: u32, id: u32, sled: &rethook::Sled) {
    // SAFETY: the instance at `top` is free and only this thread uses its slot's instances.
    let inst = unsafe { &mut *instance(c.base + c.top) };
    // SAFETY: as above.
    inst.orig = if c.shared { unsafe { (*instance(c.base + c.top - 1)).orig } } else { c.current };
    inst.slot_addr = rsp;
    // The two neighbouring u32 fields in one volatile 8-byte store: left to the compiler,
    // they were merged into one 8-byte vector move in a release build, which the light
    // proof refuses.
    const _: () = assert!(std::mem::offset_of!(Instance, id) == std::mem::offset_of!(Instance, probe) + 4);
    const _: () = assert!(std::mem::offset_of!(Instance, probe) % 8 == 0);
    // SAFETY: `probe` and `id`, the 8 bytes at an 8-aligned offset of this thread's free
    // instance (checked above), written as the little-endian pair they are.
    unsafe { std::ptr::write_volatile((&raw mut inst.probe).cast::<u64>(), u64::from(probe) | u64::from(id) << 32) };
    stack(c.slot).top.store(c.top as u32 + 1, Ordering::Relaxed);
    // The instance is complete before the function can return into its entry.
    compiler_fence(Ordering::SeqCst);
    // SAFETY: `rsp` at a function entry points at the return address pushed by its call.
    unsafe { std::ptr::write_volatile(rsp as *mut u64, sled.entry(c.base + c.top)) };
}

/// An instance of `probe` (function `func` for a graph instance) dropped because its call
/// was abandoned: the graph tracer is told its call ended. The caller has taken the
/// instance off the stack first, so that a signal handler running during the report cannot
/// see it, and report it, again.
#[inline]
pub(super) fn abandon(slot: usize, depth: usize, probe: u32, func: u64) {
    if probe == GRAPH {
        report_graph_exit(slot, depth, func as u32, true, 0);
    }
}

/// True when an instance of probe (`index`, `id`) is among those at the top of the stack
/// (`[base, base + top)`) that divert the return-address slot `slot_addr`.
#[inline]
pub(super) fn tracked_by(base: usize, top: usize, slot_addr: u64, index: u32, id: u32) -> bool {
    (0..top)
        .rev()
        // SAFETY: instances of this thread below `top`.
        .map(|k| unsafe { &*instance(base + k) })
        .take_while(|inst| inst.slot_addr == slot_addr)
        .any(|inst| inst.probe == index && inst.id == id)
}

/// Whether the call of instance `index`, whose function returned leaving `rsp`, ends alone:
/// its instance the top of its thread's stack and the only one diverting its return-address
/// slot — nothing abandoned above it to drop, no other instance to end with it, so that
/// [`end_calls`]' walks would find nothing to do. Such a call ends by [`give_back_alone`].
#[inline(always)]
pub(super) fn ends_alone(index: usize, rsp: u64) -> bool {
    let depth = index % MAX_DEPTH;
    // SAFETY: the trampoline entry says this thread pushed this instance.
    let inst = unsafe { &*instance(index) };
    stack(index / MAX_DEPTH).top.load(Ordering::Relaxed) as usize == depth + 1
        && inst.slot_addr + 8 == rsp
        // SAFETY: an instance of this thread below `top`.
        && (depth == 0 || unsafe { (*instance(index - 1)).slot_addr } != inst.slot_addr)
}

/// Gives back instance `index`, whose call [`ends_alone`], once everything needed of it was
/// read (as `end_calls` gives its instances back).
#[inline(always)]
pub(super) fn give_back_alone(index: usize) {
    compiler_fence(Ordering::SeqCst);
    stack(index / MAX_DEPTH).top.store((index % MAX_DEPTH) as u32, Ordering::Release);
}

/// Ends the calls of instance `index` (whose function returned, leaving `rsp`) and of the
/// instances sharing its return-address slot, calling `each(slot, depth, instance)` for
/// them; drops the abandoned instances above it.
#[inline(always)]
pub(super) fn end_calls(index: usize, rsp: u64, mut each: impl FnMut(usize, usize, &Instance)) {
    let (slot, depth) = (index / MAX_DEPTH, index % MAX_DEPTH);
    let base = slot * MAX_DEPTH;
    let stack = stack(slot);
    // SAFETY: the trampoline entry says this thread pushed this instance.
    let returning = unsafe { &*instance(index) };
    let top = stack.top.load(Ordering::Relaxed) as usize;
    if top <= depth || returning.slot_addr + 8 != rsp {
        // Dropped already (cannot happen for a call that returns normally): the original
        // return address is still right.
        return;
    }
    // Instances pushed after the returning call were abandoned (a longjmp, an exception) if
    // they lie deeper on this stack; one higher up is on another stack (a sigaltstack, a
    // coroutine's) and may still be in flight there, if it still diverts its slot.
    let mut live_above = false;
    // Deepest first: the order their ends are reported in.
    for k in (depth + 1..top).rev() {
        // SAFETY: an instance of this thread below `top`.
        let inst = unsafe { &mut *instance(base + k) };
        if inst.slot_addr == 0 {
            continue;
        }
        if inst.slot_addr > returning.slot_addr && still_diverted(inst.slot_addr, base + k) {
            live_above = true;
        } else {
            let (probe, func) = (inst.probe, inst.data[0]);
            inst.slot_addr = 0;
            compiler_fence(Ordering::SeqCst);
            abandon(slot, k, probe, func);
        }
    }
    let mut k = depth + 1;
    // SAFETY: instances of this thread below `top`.
    while k > 0 && unsafe { (*instance(base + k - 1)).slot_addr } == returning.slot_addr {
        k -= 1;
        // SAFETY: as above.
        let inst = unsafe { &mut *instance(base + k) };
        each(slot, k, inst);
        if live_above {
            free(inst);
        }
    }
    // Everything needed was read before the instances are given back.
    compiler_fence(Ordering::SeqCst);
    if !live_above {
        stack.top.store(k as u32, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a hit writes for its thread — the thread slot's `active` mark, the instance
    /// stack's `top` and `dispatching` — lies in 128-byte blocks
    /// (a pair of cache lines, see [`ThreadSlot`]) no other thread slot writes: an array's
    /// element aligned to 128 has a size that is a multiple of it.
    #[test]
    fn no_two_thread_slots_write_one_pair_of_cache_lines() {
        let layouts =
            [("ThreadSlot", std::mem::align_of::<ThreadSlot>()), ("SlotStack", std::mem::align_of::<SlotStack>())];
        for (name, align) in layouts {
            assert_eq!(align % 128, 0, "{name} is aligned to {align} bytes: neighbouring slots share cache lines");
        }
        let (first, second) = (&STACKS[0] as *const SlotStack as usize, &STACKS[1] as *const SlotStack as usize);
        assert!(first % 128 == 0 && second - first >= 128, "{first:#x} {second:#x}");
    }
}
