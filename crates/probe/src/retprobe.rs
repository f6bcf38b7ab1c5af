//! Return probes (the kernel's kretprobes): an entry handler when a function is called, a
//! return handler when that call returns, and a per-call data area between the two.
//!
//! A return probe is an ordinary [`Probe`] at the function's entry whose pre-handler takes an
//! *instance* from the calling thread's instance stack, records the original return address
//! and the address of the return-address slot there, and replaces the return address with
//! the trampoline entry of that instance (`arch::rethook`). Instances belong to the thread,
//! as in the kretprobe redesign, and each (thread slot, depth) has its own trampoline entry,
//! so the return path knows its instance from the address it was entered at: no lookup, no
//! lock, no allocation, no atomic read-modify-write besides the statistics counters.
//!
//! ```text
//!   STACKS[slot]   top ─┐            instance table (one mmap)
//!                       ▼            [slot * MAX_DEPTH + depth] = { original return address,
//!   depth 0 1 2 3 ...                   return-address slot, probe index, probe id, data }
//! ```
//!
//! Calls that never return normally leave stale instances. A stale one is dropped when a later
//! return goes through an instance below it and it lies deeper on that stack, and when a later
//! entry finds it at or below its own stack pointer with its slot no longer holding its
//! trampoline entry (a `longjmp` or an exception left it). The value check keeps instances on
//! a thread's other stack (a `sigaltstack`, a coroutine's) alive; when such an instance sits
//! above a returning one, the returning one is given back out of order (its slot address
//! becomes 0) and the top comes down past it later. A thread that exits inside a probed
//! function leaves its instances to its slot's next owner, which starts afresh (the slot's
//! generation changed) — except the thread of a forked child, whose stack still holds the
//! parent thread's probed frames. The trampoline entries stay while any instance is in use (and
//! go with the instance table only when none is: `release_trampoline`, at the end of an
//! attach session), and an instance names its probe by index and id, so a return after the
//! probe was unregistered still reaches the right caller and finds no handler.

use crate::arch::{current_tid, rethook, thread_pointer, Regs};
use crate::counter::PerThreadCounter;
use crate::guard::HandlerGuard;
use crate::thread_slot::{ThreadSlot, MAX_THREADS};
use crate::{Location, Probe, ProbeError, ProbeHandle, ProbeInfo};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{
    compiler_fence, AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Words in an instance's data area.
pub const DATA_WORDS: usize = 8;
/// Return-probe instances a thread can have in flight at once, over all return probes
/// (nesting depth of probed calls); deeper calls are counted in `nmissed`.
pub const MAX_DEPTH: usize = 128;
/// The default [`ReturnProbe::maxactive`].
pub const DEFAULT_MAXACTIVE: usize = 64;
/// Return probes registered at once.
const MAX_RETURN_PROBES: usize = 256;
/// How long unregistering waits for a thread to leave the probe's return handler.
const HANDLER_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The per-call data area: filled by the entry handler, read by the return handler (an entry
/// timestamp, the arguments, …). Zeroed before the entry handler runs.
///
/// ```
/// # use dynprobe_probe::InstanceData;
/// let mut data = InstanceData::default();
/// data[0] = 42;
/// assert_eq!(data[0], 42);
/// assert_eq!(data.len(), dynprobe_probe::DATA_WORDS);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct InstanceData(pub [u64; DATA_WORDS]);

impl Deref for InstanceData {
    type Target = [u64; DATA_WORDS];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for InstanceData {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the vDSO called directly, safe in any handler (no
/// lock, no allocation, no `errno`) and never the C library's `clock_gettime`, which may
/// carry the program's own probe — for timing a call from its entry to its return.
pub fn monotonic_ns() -> u64 {
    dynprobe_text::raw::monotonic_ns()
}

/// An entry handler: may read and change the argument registers and fill the data area;
/// returns false to not track this call (no return handler runs for it).
type EntryHandler = Box<dyn Fn(&mut Regs, &mut InstanceData) -> bool + Send + Sync + 'static>;
/// A return handler: sees `rax`, `rdx` (the return value), `rsp` and `ip` (the address the
/// function returns to), may change `rax`, `rdx` and `ip`.
type ReturnHandler = Box<dyn Fn(&mut Regs, &InstanceData) + Send + Sync + 'static>;

/// State shared between a [`ReturnProbeHandle`], its entry probe's handler and the return
/// path (through [`PROBES`]).
struct RpShared {
    /// Index in [`PROBES`] and in the per-thread counts.
    index: u32,
    /// Unique over the process's life: an instance of a probe whose index was reused by a
    /// newer probe is told apart by it.
    id: u32,
    maxactive: u8,
    entry: Option<EntryHandler>,
    ret: Option<ReturnHandler>,
    /// Calls tracked, per thread.
    hits: PerThreadCounter,
    /// Return handler runs, per thread.
    returns: PerThreadCounter,
    nmissed: AtomicU64,
}

impl RpShared {
    #[cold]
    fn miss(&self) {
        self.nmissed.fetch_add(1, Ordering::Relaxed);
    }
}

/// One call in flight. `orig` must stay first: the trampoline's unwind rule reads it at
/// `table + index * size_of::<Instance>()`.
#[repr(C)]
struct Instance {
    /// The original return address.
    orig: u64,
    /// Where the return address lives (`rsp` at the function's entry).
    slot_addr: u64,
    probe: u32,
    id: u32,
    _pad: u64,
    data: InstanceData,
}

/// A thread slot's instance stack header. Written only by the slot's owner thread (plain
/// loads and stores through atomics), except `dispatching`, which unregistering reads.
struct SlotStack {
    /// The [`ThreadSlot`] generation the stack belongs to.
    generation: AtomicU32,
    /// Instances in use: `[0, top)`.
    top: AtomicU32,
    /// `probe index + 1` while the owner may be running that probe's return handler, else 0.
    dispatching: AtomicU32,
    /// The owner's thread pointer and process id when the stack was last (re)started: a
    /// forked child's thread has the parent thread's pointer and its stack, and so keeps
    /// its instances.
    owner_tp: AtomicUsize,
    pid: AtomicI32,
}

static STACKS: [SlotStack; MAX_THREADS] = [const {
    SlotStack {
        generation: AtomicU32::new(0),
        top: AtomicU32::new(0),
        dispatching: AtomicU32::new(0),
        owner_tp: AtomicUsize::new(0),
        pid: AtomicI32::new(0),
    }
}; MAX_THREADS];

/// Per thread slot and probe index: instances of that probe in the slot's stack (for
/// `maxactive`). Owner-written only.
static COUNTS: [[AtomicU8; MAX_RETURN_PROBES]; MAX_THREADS] =
    [const { [const { AtomicU8::new(0) }; MAX_RETURN_PROBES] }; MAX_THREADS];

/// The registered return probes by index; null when free. A pointer is an `Arc` owned by
/// the table, released only once no thread can be running its return handler.
static PROBES: [AtomicPtr<RpShared>; MAX_RETURN_PROBES] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_RETURN_PROBES];

/// The instance table: `MAX_THREADS * MAX_DEPTH` instances, mapped at the first
/// registration and unmapped only when no instance is in use (a late return may still
/// read it): [`release_trampoline`].
static INSTANCES: AtomicPtr<Instance> = AtomicPtr::new(std::ptr::null_mut());

#[inline(always)]
fn instance(index: usize) -> *mut Instance {
    debug_assert!(index < MAX_THREADS * MAX_DEPTH);
    // SAFETY: the table holds MAX_THREADS * MAX_DEPTH instances and every caller computes
    // `index` as slot * MAX_DEPTH + depth with both in range.
    unsafe { INSTANCES.load(Ordering::Relaxed).add(index) }
}

#[inline(always)]
fn count(slot: usize, probe: u32) -> &'static AtomicU8 {
    &COUNTS[slot][probe as usize]
}

/// Adds `delta` to a count only the calling thread writes (no read-modify-write needed).
#[inline(always)]
fn bump(counter: &AtomicU8, delta: i8) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add_signed(delta), Ordering::Relaxed);
}

/// Reads the return-address slot at `rsp` at a function entry.
#[inline(always)]
fn read_slot(rsp: u64) -> u64 {
    // SAFETY: at a function entry `rsp` points at the return address its call pushed.
    unsafe { std::ptr::read_volatile(rsp as *const u64) }
}

/// True when the return-address slot `slot_addr` still holds the trampoline entry of
/// instance `index` (its call is in flight). Read without faulting: an abandoned instance
/// may point into a stack that is gone (a thread's `sigaltstack`, a coroutine's), and then
/// its call is over. Only the paths that deal with abandoned instances get here, so the
/// system call it costs is off the hot path.
#[cold]
fn still_diverted(slot_addr: u64, index: usize) -> bool {
    let mut word = [0u8; 8];
    // A raw read: it leaves the program's `errno` alone.
    dynprobe_text::raw::read(slot_addr, &mut word) && rethook::is_entry_of(u64::from_le_bytes(word), index)
}

/// Gives an instance back out of order (its count too): [`on_return`] does this when an
/// instance above it may still be live on another stack, so `top` cannot come down.
fn free(slot: usize, inst: &mut Instance) {
    uncount(slot, inst.probe);
    inst.slot_addr = 0;
}

impl SlotStack {
    /// Makes the stack the current owner's: emptied for a new thread, kept for the thread
    /// of a forked child (its stack still has the parent thread's probed frames on it).
    #[cold]
    fn restart(&self, slot: usize, generation: u32) {
        let tp = thread_pointer();
        // SAFETY: getpid has no arguments and cannot fail.
        let pid = unsafe { libc::getpid() };
        let forked = self.owner_tp.load(Ordering::Relaxed) == tp && self.pid.load(Ordering::Relaxed) != pid;
        if !forked {
            self.top.store(0, Ordering::Relaxed);
            COUNTS[slot].iter().for_each(|c| c.store(0, Ordering::Relaxed));
        }
        self.owner_tp.store(tp, Ordering::Relaxed);
        self.pid.store(pid, Ordering::Relaxed);
        self.generation.store(generation, Ordering::Relaxed);
    }
}

/// The SysV ABI's red zone below `rsp`.
const RED_ZONE: u64 = 128;

/// The instance `probe` index of calls entered by the function-graph tracer.
const GRAPH: u32 = u32::MAX;

/// Gives back the `maxactive` count of an instance of `probe` (graph instances have none).
#[inline(always)]
fn uncount(slot: usize, probe: u32) {
    if probe != GRAPH {
        bump(count(slot, probe), -1);
    }
}

/// Where a new instance goes on the calling thread's stack, after [`claim`] dropped the
/// abandoned ones.
struct Claim {
    slot: usize,
    base: usize,
    top: usize,
    /// What the return-address slot holds now.
    current: u64,
    /// The instances at the top already divert this return-address slot.
    shared: bool,
}

/// The steps every new instance takes, whoever owns it: the thread's stack (started afresh
/// for a new thread), abandoned instances dropped (reported to the graph tracer as unwound),
/// and whether other instances already divert this call. `None` when the thread has no slot
/// or `rsp` holds no return address.
#[inline(always)]
fn claim(slot: usize, thread: &ThreadSlot, rsp: u64) -> Option<Claim> {
    if rsp & 7 != 0 {
        // Not entered by a call: no return address there to divert. (A call on a stack not
        // 16-byte aligned is fine: GCC makes those to local functions that need no
        // alignment, and the trampoline aligns its own frame.)
        return None;
    }
    let stack = &STACKS[slot];
    if stack.generation.load(Ordering::Relaxed) != thread.generation() {
        stack.restart(slot, thread.generation());
    }
    let base = slot * MAX_DEPTH;
    let top_now = stack.top.load(Ordering::Relaxed) as usize;
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
        let in_red_zone = below.slot_addr < rsp && rsp - below.slot_addr <= RED_ZONE;
        let abandoned = below.slot_addr == 0 || in_red_zone || (below.slot_addr <= rsp && !diverted());
        if !abandoned {
            if below.slot_addr < rsp {
                top = abandoned_at_our_slot(base, top, rsp).unwrap_or(top);
            }
            break;
        }
        top -= 1;
    }
    // Taken off the stack before they are reported (see `abandon`), deepest first.
    stack.top.store(top as u32, Ordering::Relaxed);
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
    Some(Claim { slot, base, top, current, shared })
}

/// Where the abandoned instances start when the top ones lie below `rsp` but still look
/// diverted: a `longjmp` out of frames larger than the red zone leaves their memory, sled
/// addresses included, untouched. If an instance further down diverted this very
/// return-address slot, and the slot now holds a plain return address, its frame made a
/// new call from the same place: it and everything pushed after it are gone. (Instances
/// on other stacks — a coroutine's — are not at our slot, so they are kept.) Off the hot
/// path: only reached when the top instance is below the caller's frame.
#[cold]
fn abandoned_at_our_slot(base: usize, top: usize, rsp: u64) -> Option<usize> {
    // SAFETY: instances of this thread below `top`.
    let j = (0..top - 1).rev().find(|&j| unsafe { (*instance(base + j)).slot_addr } == rsp)?;
    (!rethook::is_entry_of(read_slot(rsp), base + j)).then_some(j)
}

/// Pushes the instance at `c.top`, whose data is filled in, and diverts the return address
/// at `rsp` to its entry of `sled`.
#[inline(always)]
fn commit(c: &Claim, rsp: u64, probe: u32, id: u32, sled: &rethook::Sled) {
    // SAFETY: the instance at `top` is free and only this thread uses its slot's instances.
    let inst = unsafe { &mut *instance(c.base + c.top) };
    // SAFETY: as above.
    inst.orig = if c.shared { unsafe { (*instance(c.base + c.top - 1)).orig } } else { c.current };
    inst.slot_addr = rsp;
    inst.probe = probe;
    inst.id = id;
    if probe != GRAPH {
        bump(count(c.slot, probe), 1);
    }
    STACKS[c.slot].top.store(c.top as u32 + 1, Ordering::Relaxed);
    // The instance is complete before the function can return into its entry.
    compiler_fence(Ordering::SeqCst);
    // SAFETY: `rsp` at a function entry points at the return address pushed by its call.
    unsafe { std::ptr::write_volatile(rsp as *mut u64, sled.entry(c.base + c.top)) };
}

/// The entry probe's pre-handler: takes an instance and diverts the return address.
/// Runs with the thread's handler guard held (by the probe site), in a signal handler or a
/// detour.
fn on_entry(rp: &RpShared, regs: &mut Regs) {
    let rsp = regs.rsp;
    let Some((slot, thread)) = ThreadSlot::current() else { return rp.miss() };
    let Some(c) = claim(slot, thread, rsp) else { return rp.miss() };
    // Instances at the top already divert this return-address slot: other return probes on
    // this same call (ours joins them, see `on_return`), or this very probe when the thread
    // came back to the entry without a new call (a loop whose head is the first instruction,
    // a tail call to itself), which is no new call to track.
    if c.shared && tracked_by(c.base, c.top, rsp, rp.index, rp.id) {
        return;
    }
    if c.top == MAX_DEPTH || count(slot, rp.index).load(Ordering::Relaxed) >= rp.maxactive {
        return rp.miss();
    }
    // SAFETY: the instance at `top` is free and only this thread uses its slot's instances.
    let inst = unsafe { &mut *instance(c.base + c.top) };
    // Word by word: a struct store is compiled to vector moves, which a light detour
    // does not allow (see `crate::light`).
    for word in inst.data.0.iter_mut() {
        // SAFETY: a word of the instance, which only this thread uses.
        unsafe { std::ptr::write_volatile(word, 0) };
    }
    if let Some(entry) = &rp.entry {
        if !call_entry_handler(&**entry, regs, &mut inst.data) || regs.rsp != rsp {
            return;
        }
    }
    // Return handlers are user code: the sled that saves every register.
    commit(&c, rsp, rp.index, rp.id, &rethook::FULL);
    rp.hits.add(Some(slot));
}

/// A call entered by the function-graph tracer has ended, or was found abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphExit {
    /// The thread's slot index (below [`MAX_THREADS`]): what the tracer keys per-thread
    /// buffers by.
    pub slot: usize,
    /// The thread's kernel id.
    pub tid: u32,
    /// The call's depth on the thread's instance stack.
    pub depth: usize,
    /// The function id the tracer gave [`graph_enter`].
    pub func: u32,
    /// True when the call was left without returning (a `longjmp`, an exception), noticed
    /// now; false for a return.
    pub unwound: bool,
}

/// A call entered by [`graph_enter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphEntry {
    /// As in [`GraphExit`].
    pub slot: usize,
    /// As in [`GraphExit`].
    pub tid: u32,
    /// As in [`GraphExit`].
    pub depth: usize,
}

/// What [`graph_enter`] did with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphEnter {
    /// The call is tracked: its end will be reported.
    Entered(GraphEntry),
    /// Not tracked, as asked: deeper than the caller's limit, the very call already tracked
    /// (a tail call), or a thread whose calls are not traced.
    Skipped,
    /// Not tracked though it should have been: the thread was inside a probe handler (a
    /// signal arriving in the tracer itself), had no thread slot or no return address at
    /// its stack pointer, or [`MAX_DEPTH`] calls are in flight on it already.
    Missed,
}

/// The function-graph tracer's exit hook; set once by [`graph_install`].
static GRAPH_HOOK: OnceLock<fn(&GraphExit)> = OnceLock::new();
/// Set, before [`GRAPH_HOOK`], when the hook is not proven light: no detour may then run
/// code that reaches it on its light path.
static GRAPH_HOOK_HEAVY: AtomicBool = AtomicBool::new(false);

/// Whether the function-graph tracer's exit hook, which the entry of any return hook may
/// call (for calls it finds abandoned), is light (see `crate::light`).
#[inline]
pub(crate) fn graph_hook_light() -> bool {
    !GRAPH_HOOK_HEAVY.load(Ordering::Relaxed)
}

/// The one place the graph tracer's hook is called from: the light proofs do not walk into
/// it (an indirect call), [`graph_install`] proves the hook itself.
#[inline(never)]
pub(crate) fn call_graph_hook(hook: fn(&GraphExit), exit: &GraphExit) {
    hook(exit)
}

/// The one place a return probe's entry handler is called from: the light proofs do not
/// walk into it (a `dyn` call); each entry handler is proven from its own code.
#[inline(never)]
pub(crate) fn call_entry_handler(
    handler: &(dyn Fn(&mut Regs, &mut InstanceData) -> bool + Send + Sync),
    regs: &mut Regs,
    data: &mut InstanceData,
) -> bool {
    handler(regs, data)
}

/// Reports the end of a graph instance.
#[inline(always)]
fn graph_exit(slot: usize, depth: usize, inst: &Instance, unwound: bool) {
    report_graph_exit(slot, depth, inst.data[0] as u32, unwound);
}

#[inline(always)]
fn report_graph_exit(slot: usize, depth: usize, func: u32, unwound: bool) {
    if let Some(hook) = GRAPH_HOOK.get() {
        call_graph_hook(*hook, &GraphExit { slot, tid: current_tid() as u32, depth, func, unwound });
    }
}

/// An instance of `probe` (function `func` for a graph instance) dropped because its call
/// was abandoned. The caller has taken the instance off the stack first, so that a signal
/// handler running during the report cannot see it, and report it, again.
#[inline]
fn abandon(slot: usize, depth: usize, probe: u32, func: u64) {
    if probe == GRAPH {
        report_graph_exit(slot, depth, func as u32, true);
    }
    uncount(slot, probe);
}

/// Prepares the return hooks for dynprobe's function-graph tracer (the kernel's `fprobe`
/// on `rethook`): the instance table, the light trampoline and the backtrace filter, and
/// `hook`, which every call entered by [`graph_enter`] reaches exactly once — when it
/// returns, or when it is found abandoned. `hook` runs on the traced thread, with the
/// returning function's registers saved only as far as the light trampoline saves them:
/// it must allocate nothing, take no lock, and use no vector register beyond xmm0–15 (no
/// C library routine such as `memcpy`). Only the first call's hook is kept.
pub fn graph_install(hook: fn(&GraphExit)) -> Result<(), ProbeError> {
    let mut setup = setup()?;
    setup.install()?;
    if !setup.light {
        let stride = std::mem::size_of::<Instance>() as u64;
        rethook::install(&rethook::LIGHT, MAX_THREADS * MAX_DEPTH, INSTANCES.load(Ordering::Relaxed) as u64, stride)?;
        setup.light = true;
    }
    if GRAPH_HOOK.get().is_none() {
        // Until the hook is set no call is entered by the tracer, so no hook can be called
        // by a hit that checked the flag before it is set.
        if crate::registry::prove_light(&[hook as *const () as u64]).is_err() {
            GRAPH_HOOK_HEAVY.store(true, Ordering::Relaxed);
        }
    }
    let _ = GRAPH_HOOK.set(hook);
    Ok(())
}

/// Enters a call for the function-graph tracer: `rsp` is the stack pointer at the entry of
/// function `func` (it points at the return address), `max_depth` the deepest call to
/// track. Diverts the return address so that [`graph_install`]'s hook hears of the call's
/// end, and says whether the call is tracked and where. Allocation-free and lock-free: it runs on the traced thread at every
/// call. [`graph_install`] must have succeeded first.
#[inline]
pub fn graph_enter(rsp: u64, func: u32, max_depth: usize) -> GraphEnter {
    // dynprobe's own threads are never traced, from their first instruction on.
    if crate::own_thread::current_thread_is_own() {
        return GraphEnter::Skipped;
    }
    let Some(guard) = HandlerGuard::enter() else { return GraphEnter::Missed };
    enter_graph_call(guard.slot_index(), guard.thread(), rsp, func, max_depth)
}

/// [`graph_enter`] from inside a probe's pre-handler at a function's first instruction
/// (the tracer's plain-entry sites), where the probe site already holds the thread's
/// handler guard.
pub fn graph_enter_from_probe(regs: &Regs, func: u32, max_depth: usize) -> GraphEnter {
    let Some((slot, thread)) = ThreadSlot::current() else { return GraphEnter::Missed };
    enter_graph_call(slot, thread, regs.rsp, func, max_depth)
}

/// Where the function-graph tracer would put an event that is not a call (a marker hit)
/// made by the calling thread now, from inside a probe's pre-handler: its slot, tid, and
/// the depth a call entered here would get (the instances on its stack; ones abandoned by
/// a `longjmp` and not yet noticed count too). `None` when the thread is not traced.
/// Allocation-free and lock-free.
pub fn graph_position_from_probe() -> Option<GraphEntry> {
    let (slot, thread) = ThreadSlot::current()?;
    if thread.untraced.load(Ordering::Relaxed) {
        return None;
    }
    let stack = &STACKS[slot];
    // A stack of an earlier thread of this slot is empty for this one.
    let top = match stack.generation.load(Ordering::Relaxed) == thread.generation() {
        true => stack.top.load(Ordering::Relaxed) as usize,
        false => 0,
    };
    Some(GraphEntry { slot, tid: current_tid() as u32, depth: top })
}

#[inline(always)]
fn enter_graph_call(slot: usize, thread: &ThreadSlot, rsp: u64, func: u32, max_depth: usize) -> GraphEnter {
    if thread.untraced.load(Ordering::Relaxed) {
        return GraphEnter::Skipped;
    }
    let Some(c) = claim(slot, thread, rsp) else { return GraphEnter::Missed };
    if (c.shared && tracked_by(c.base, c.top, rsp, GRAPH, 0)) || c.top >= max_depth {
        return GraphEnter::Skipped;
    }
    if c.top >= MAX_DEPTH {
        // Deeper than the instance stacks go: not what the user asked for.
        return GraphEnter::Missed;
    }
    // SAFETY: the instance at `top` is free and only this thread uses its slot's instances.
    let inst = unsafe { &mut *instance(c.base + c.top) };
    inst.data[0] = u64::from(func);
    // A return probe on this same call needs every register saved on the way back.
    let sled = if c.shared { &rethook::FULL } else { &rethook::LIGHT };
    commit(&c, rsp, GRAPH, 0, sled);
    GraphEnter::Entered(GraphEntry { slot: c.slot, tid: current_tid() as u32, depth: c.top })
}

/// True when an instance of probe (`index`, `id`) is among those at the top of the stack
/// (`[base, base + top)`) that divert the return-address slot `slot_addr`.
#[inline]
fn tracked_by(base: usize, top: usize, slot_addr: u64, index: u32, id: u32) -> bool {
    (0..top)
        .rev()
        // SAFETY: instances of this thread below `top`.
        .map(|k| unsafe { &*instance(base + k) })
        .take_while(|inst| inst.slot_addr == slot_addr)
        .any(|inst| inst.probe == index && inst.id == id)
}

/// The return path, called by the trampoline with the index of the instance whose entry the
/// function returned into and the return registers; returns where execution continues.
#[inline]
pub(crate) fn on_return(index: usize, regs: &mut Regs) -> u64 {
    let guard = HandlerGuard::enter();
    // SAFETY: the trampoline entry says this thread pushed this instance.
    regs.ip = unsafe { (*instance(index)).orig };
    let rsp = regs.rsp;
    end_calls(index, rsp, |slot, k, inst| {
        if inst.probe == GRAPH {
            graph_exit(slot, k, inst, false);
        } else if guard.is_some() {
            run_return_handler(slot, inst, regs);
        }
    });
    regs.ip
}

/// The return path of the light sled: every instance diverting this return-address slot is
/// the function-graph tracer's (a return probe joining a call writes the full sled's
/// entry), so there are no handlers to give registers to.
#[inline]
pub(crate) fn on_graph_return(index: usize, caller_rsp: u64) -> u64 {
    // Held so that a signal handler's traced call cannot push onto the stack while the
    // instances are given back (it counts as missed instead).
    let _guard = HandlerGuard::enter();
    // SAFETY: the trampoline entry says this thread pushed this instance.
    let orig = unsafe { (*instance(index)).orig };
    end_calls(index, caller_rsp, |slot, k, inst| {
        debug_assert_eq!(inst.probe, GRAPH, "a return probe's call returned through the light sled");
        graph_exit(slot, k, inst, false);
    });
    orig
}

/// Ends the calls of instance `index` (whose function returned, leaving `rsp`) and of the
/// instances sharing its return-address slot, calling `each(slot, depth, instance)` for
/// them; drops the abandoned instances above it.
#[inline(always)]
fn end_calls(index: usize, rsp: u64, mut each: impl FnMut(usize, usize, &Instance)) {
    let (slot, depth) = (index / MAX_DEPTH, index % MAX_DEPTH);
    let base = slot * MAX_DEPTH;
    let stack = &STACKS[slot];
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
            free(slot, inst);
        } else {
            uncount(slot, inst.probe);
        }
    }
    // Everything needed was read before the instances are given back.
    compiler_fence(Ordering::SeqCst);
    if !live_above {
        stack.top.store(k as u32, Ordering::Release);
    }
}

#[inline]
fn run_return_handler(slot: usize, inst: &Instance, regs: &mut Regs) {
    let stack = &STACKS[slot];
    stack.dispatching.store(inst.probe + 1, Ordering::Relaxed);
    // Unregistering clears the table entry, then waits out a stop of every thread, then
    // waits for `dispatching`: this store is ordered before the load below by program
    // order on this thread, and the stop's signal delivery publishes it.
    compiler_fence(Ordering::SeqCst);
    let rp = PROBES[inst.probe as usize].load(Ordering::Acquire);
    if !rp.is_null() {
        // SAFETY: non-null entries are live Arcs; unregistering frees one only after it
        // saw `dispatching` clear of its index.
        let rp = unsafe { &*rp };
        if rp.id == inst.id {
            rp.returns.add(Some(slot));
            if let Some(handler) = &rp.ret {
                // A panic must not unwind into the trampoline: contained and counted here.
                if catch_unwind(AssertUnwindSafe(|| handler(regs, &inst.data))).is_err() {
                    crate::count_handler_panic();
                }
            }
        }
    }
    stack.dispatching.store(0, Ordering::Release);
}

/// Registration state; never touched by the hit paths.
struct Setup {
    /// The instance table is mapped and the trampoline written.
    trampoline: bool,
    /// The light trampoline of the function-graph tracer is written.
    light: bool,
    /// Backtraces skip the trampoline.
    filter: bool,
    next_id: u32,
    next_index: usize,
}

/// Removes what return probes keep between uses — the probe on `_Unwind_Backtrace` that
/// hides the trampoline from backtraces — when no return probe is registered and no call
/// is still to return through the trampoline on any thread, so that no code of dynprobe's
/// runs when the program takes a backtrace. The next return probe places it again.
pub(crate) fn release_backtrace_filter() {
    let Ok(mut setup) = setup() else { return };
    let registered = PROBES.iter().any(|p| !p.load(Ordering::Acquire).is_null());
    // Conservative: a stack left by a thread that has exited counts as in use.
    let pending = STACKS.iter().any(|s| s.top.load(Ordering::Acquire) != 0);
    if setup.filter && !registered && !pending && rethook::show_backtraces_again() {
        setup.filter = false;
    }
}

/// Takes the return trampoline and the instance table away when no return probe is
/// registered and no call can return through the trampoline any more — no instance in use
/// on any thread's stack (a thread that exited inside a probed call counts as in use, as
/// does one still inside a probed call now) and no thread in the trampoline's code or
/// coming back to it from a signal handler — so that a session's end leaves nothing of
/// dynprobe's in the process. `Err` says why they stay. The next return probe makes them
/// again.
pub(crate) fn release_trampoline() -> Result<(), String> {
    let mut setup = setup().map_err(|e| e.to_string())?;
    if !setup.trampoline {
        return Ok(());
    }
    let registered = PROBES.iter().filter(|p| !p.load(Ordering::Acquire).is_null()).count();
    if registered > 0 {
        return Err(format!("{registered} return probes are still registered"));
    }
    let in_flight = |s: &SlotStack| s.top.load(Ordering::Acquire) != 0 || s.dispatching.load(Ordering::Acquire) != 0;
    let threads = STACKS.iter().filter(|s| in_flight(s)).count();
    if threads > 0 {
        return Err(format!(
            "{threads} thread(s) are inside a function a return probe diverted (or exited there): their return \
             goes through the trampoline"
        ));
    }
    let code = rethook::memory(&rethook::FULL).into_iter().chain(rethook::memory(&rethook::LIGHT)).collect();
    if !crate::registry::memory_unused(code).map_err(|e| e.to_string())? {
        return Err("a thread is in the return trampoline".to_string());
    }
    if STACKS.iter().any(in_flight) {
        return Err("a call was diverted meanwhile".to_string());
    }
    rethook::uninstall(&rethook::FULL);
    rethook::uninstall(&rethook::LIGHT);
    let table = INSTANCES.swap(std::ptr::null_mut(), Ordering::AcqRel);
    let bytes = MAX_THREADS * MAX_DEPTH * std::mem::size_of::<Instance>();
    // SAFETY: the table `Setup::install` mapped, of that size; no thread can read it now
    // (no instance in use, no thread in the trampoline).
    unsafe { libc::munmap(table.cast(), bytes) };
    setup.trampoline = false;
    setup.light = false;
    Ok(())
}

static SETUP: Mutex<Setup> =
    Mutex::new(Setup { trampoline: false, light: false, filter: false, next_id: 1, next_index: 0 });

fn setup() -> Result<MutexGuard<'static, Setup>, ProbeError> {
    if HandlerGuard::current_thread_inside() {
        return Err(ProbeError::InsideHandler);
    }
    Ok(SETUP.lock().unwrap_or_else(|e| e.into_inner()))
}

impl Setup {
    /// Maps the instance table, writes the trampoline and hides it from backtraces, once.
    fn install(&mut self) -> Result<(), ProbeError> {
        if !self.trampoline {
            let bytes = MAX_THREADS * MAX_DEPTH * std::mem::size_of::<Instance>();
            let table = crate::counter::map_zeroed(bytes)
                .map_err(|e| ProbeError::ReturnProbeSetup { reason: format!("cannot map the instance table: {e}") })?;
            INSTANCES.store(table.cast(), Ordering::Release);
            let stride = std::mem::size_of::<Instance>() as u64;
            rethook::install(&rethook::FULL, MAX_THREADS * MAX_DEPTH, table as u64, stride)?;
            self.trampoline = true;
        }
        if !self.filter {
            rethook::hide_from_backtraces()?;
            self.filter = true;
        }
        Ok(())
    }

    /// A free probe index, handed out round-robin so that a freed index (whose stale
    /// instances may still count against `maxactive`) is reused last.
    fn free_index(&mut self) -> Result<u32, ProbeError> {
        let found = (0..MAX_RETURN_PROBES)
            .map(|i| (self.next_index + i) % MAX_RETURN_PROBES)
            .find(|&i| PROBES[i].load(Ordering::Relaxed).is_null())
            .ok_or(ProbeError::TooManyReturnProbes { max: MAX_RETURN_PROBES })?;
        self.next_index = found + 1;
        Ok(found as u32)
    }
}

/// A return probe to be registered (the kernel's `kretprobe`): where, how many calls per
/// thread it tracks at once, and what runs at entry and at return.
///
/// ```no_run
/// use dynprobe_probe::{monotonic_ns, sym, ReturnProbe};
/// use std::sync::atomic::{AtomicU64, Ordering};
/// static TOTAL_NS: AtomicU64 = AtomicU64::new(0);
/// let probe = ReturnProbe::at(sym!("work"))
///     .on_entry(|_regs, data| {
///         data[0] = monotonic_ns();
///         true // track this call
///     })
///     .on_return(|regs, data| {
///         TOTAL_NS.fetch_add(monotonic_ns() - data[0], Ordering::Relaxed);
///         let _result = regs.retval();
///     })
///     .register()?;
/// // ... the program runs ...
/// let stats = probe.unregister()?;
/// println!("{} calls, {} ns, {} missed", stats.hits, TOTAL_NS.load(Ordering::Relaxed), stats.nmissed);
/// # Ok::<(), dynprobe_probe::ProbeError>(())
/// ```
pub struct ReturnProbe {
    location: Location,
    maxactive: usize,
    entry: Option<EntryHandler>,
    ret: Option<ReturnHandler>,
    enabled: bool,
    /// The entry handler's code, for the light proof.
    entry_code: Option<u64>,
}

impl ReturnProbe {
    /// A return probe on the function at `location` (a symbol, `symbol+0`, or the address of
    /// a function's first instruction).
    pub fn at(location: impl Into<Location>) -> ReturnProbe {
        ReturnProbe {
            location: location.into(),
            maxactive: DEFAULT_MAXACTIVE,
            entry: None,
            ret: None,
            enabled: true,
            entry_code: None,
        }
    }

    /// The most calls of this function one thread may have in flight with their return
    /// tracked (recursion); a call beyond it runs untracked and counts in `nmissed`. At most
    /// [`MAX_DEPTH`]; default [`DEFAULT_MAXACTIVE`].
    pub fn maxactive(mut self, n: usize) -> ReturnProbe {
        self.maxactive = n.min(MAX_DEPTH);
        self
    }

    /// The entry handler: runs at the function's first instruction with every register (it
    /// may change the arguments) and the call's zeroed data area; returning false leaves the
    /// call untracked (the kernel's non-zero `entry_handler` result).
    pub fn on_entry(
        mut self,
        handler: impl Fn(&mut Regs, &mut InstanceData) -> bool + Send + Sync + 'static,
    ) -> ReturnProbe {
        self.entry_code = Some(crate::light::entry_code_of(&handler));
        self.entry = Some(Box::new(handler));
        self
    }

    /// The return handler: runs when a tracked call returns, with `rax`, `rdx` (the return
    /// value), `rsp` (as in the caller after the return) and `ip` (the caller's return
    /// address) set — the other registers read as 0 — and the data area the entry handler
    /// filled. Changing `rax`/`rdx` changes the value returned; changing `ip` returns there.
    pub fn on_return(mut self, handler: impl Fn(&mut Regs, &InstanceData) + Send + Sync + 'static) -> ReturnProbe {
        self.ret = Some(Box::new(handler));
        self
    }

    /// Registers the probe disabled; enable it later.
    pub fn disabled(mut self) -> ReturnProbe {
        self.enabled = false;
        self
    }

    /// Places the probe. On error nothing in the process has changed (except that the
    /// trampoline, once written, stays).
    pub fn register(self) -> Result<ReturnProbeHandle, ProbeError> {
        if let Location::SymbolOffset(symbol, offset @ 1..) = &self.location {
            return Err(ProbeError::ReturnProbeNotAtEntry { symbol: symbol.clone(), offset: *offset });
        }
        let mut setup = setup()?;
        setup.install()?;
        let index = setup.free_index()?;
        let id = setup.next_id;
        setup.next_id = setup.next_id.wrapping_add(1).max(1);
        let shared = Arc::new(RpShared {
            index,
            id,
            maxactive: self.maxactive as u8,
            entry: self.entry,
            ret: self.ret,
            hits: PerThreadCounter::new(),
            returns: PerThreadCounter::new(),
            nmissed: AtomicU64::new(0),
        });
        PROBES[index as usize].store(Arc::into_raw(shared.clone()).cast_mut(), Ordering::Release);
        let for_entry = shared.clone();
        // Registered disarmed: the function is checked by the name the registry resolved
        // before any call can be diverted.
        let mut probe = Probe::at(self.location).on_hit(move |regs| on_entry(&for_entry, regs)).disabled();
        probe.return_probe = true;
        // The entry handler runs behind `call_entry_handler`: proven on its own.
        probe.code_roots.extend(self.entry_code);
        let entry = match probe.register() {
            Ok(entry) => entry,
            Err(e) => {
                // No entry handler ever ran: no instance names this index.
                let raw = PROBES[index as usize].swap(std::ptr::null_mut(), Ordering::AcqRel);
                // SAFETY: `raw` is the Arc stored just above.
                drop(unsafe { Arc::from_raw(raw) });
                return Err(e);
            }
        };
        let armed = refuse_returning_twice(&entry).and_then(|()| if self.enabled { entry.enable() } else { Ok(()) });
        if let Err(e) = armed {
            if entry.unregister().is_ok() {
                let _ = retire(index);
            }
            return Err(e);
        }
        Ok(ReturnProbeHandle { entry: Some(entry), shared })
    }
}

/// Functions that return more than once from one call: the second return would go through
/// an instance the first one consumed (`setjmp` saves its return address, which by then is
/// the trampoline's; a `vfork` child returns on the parent's stack and instance stack).
pub const RETURNS_TWICE: &[&str] =
    &["setjmp", "_setjmp", "__sigsetjmp", "sigsetjmp", "savectx", "vfork", "__vfork", "getcontext", "__getcontext"];

fn refuse_returning_twice(entry: &ProbeHandle) -> Result<(), ProbeError> {
    let symbol = entry.info().symbol;
    let function = symbol.rsplit_once('+').map_or(symbol.as_str(), |(name, _)| name);
    if RETURNS_TWICE.contains(&function) {
        return Err(ProbeError::ReturnsTwice { symbol: function.to_string() });
    }
    Ok(())
}

/// Takes a probe out of [`PROBES`] once its entry probe is gone, and frees it when no thread
/// can be running its return handler. Returns false (and keeps the probe's memory for good)
/// when that cannot be established.
fn retire(index: u32) -> Result<(), ProbeError> {
    let raw = PROBES[index as usize].swap(std::ptr::null_mut(), Ordering::AcqRel);
    // Every thread is stopped once: a return path that had not yet read the table now sees
    // null, and one that had has its `dispatching` mark visible to us.
    dynprobe_text::stop::synchronize()?;
    let deadline = Instant::now() + HANDLER_EXIT_TIMEOUT;
    while STACKS.iter().any(|s| s.dispatching.load(Ordering::Acquire) == index + 1) {
        if Instant::now() > deadline {
            return Err(ProbeError::ReturnProbeSetup {
                reason: format!(
                    "a thread stayed in the return handler for {HANDLER_EXIT_TIMEOUT:?}; the probe is removed \
                     but its handlers are kept"
                ),
            });
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    // SAFETY: the Arc stored at registration; no thread can reach it through the table any
    // more.
    drop(unsafe { Arc::from_raw(raw) });
    Ok(())
}

/// A registered return probe. Dropping it unregisters the probe.
pub struct ReturnProbeHandle {
    entry: Option<ProbeHandle>,
    shared: Arc<RpShared>,
}

impl ReturnProbeHandle {
    fn entry(&self) -> &ProbeHandle {
        self.entry.as_ref().expect("a live handle always holds its entry probe")
    }

    /// The entry probe the return probe hooks calls with, for enabling it in one batch with
    /// others ([`ProbeHandle::enable_each`]).
    pub fn entry_probe(&self) -> &ProbeHandle {
        self.entry()
    }

    /// The probed function's address.
    pub fn address(&self) -> u64 {
        self.entry().address()
    }

    /// Calls tracked: an instance was taken and the entry handler (if any) returned true.
    pub fn hits(&self) -> u64 {
        self.shared.hits.sum()
    }

    /// Tracked calls that returned through the trampoline (return handler runs).
    pub fn returns(&self) -> u64 {
        self.shared.returns.sum()
    }

    /// Calls not tracked: `maxactive` or [`MAX_DEPTH`] reached, the thread was already
    /// inside a probe handler, or it was not entered by an ABI-conforming call.
    pub fn nmissed(&self) -> u64 {
        self.shared.nmissed.load(Ordering::Relaxed) + self.entry().nmissed()
    }

    /// True while the probe is enabled.
    pub fn is_enabled(&self) -> bool {
        self.entry().is_enabled()
    }

    /// Enables the probe.
    pub fn enable(&self) -> Result<(), ProbeError> {
        self.entry().enable()
    }

    /// Disables the probe: calls from now on are not tracked; calls in flight still run
    /// their return handlers.
    pub fn disable(&self) -> Result<(), ProbeError> {
        self.entry().disable()
    }

    /// The entry probe's line of the listing. Panics when called from inside a handler.
    pub fn info(&self) -> ProbeInfo {
        self.entry().info()
    }

    /// False once [`Self::try_unregister`] removed the entry probe (even if retiring the
    /// return handler failed: that is not retried).
    pub fn is_registered(&self) -> bool {
        self.entry.is_some()
    }

    /// Keeps the return probe registered for the rest of the process's life.
    pub fn leak(self) {
        std::mem::forget(self);
    }

    /// Removes the probe and returns its final counts. Calls still in flight return to
    /// their callers as usual, without running the return handler; once this returns, no
    /// handler of the probe runs any more and they have been dropped.
    pub fn unregister(mut self) -> Result<ReturnProbeStats, ProbeError> {
        let result = self.try_unregister();
        // Failed: the entry probe stays registered, as if leaked; this handle lets go of it.
        if let Some(entry) = self.entry.take() {
            entry.leak();
        }
        result
    }

    /// [`Self::unregister`] that can be tried again: when the entry probe cannot be removed
    /// (a thread blocks the stop signal), the handle keeps it, registered and working, for
    /// a later call. Once the entry probe is gone, the return handler is retired; should a
    /// thread stay in it, that error is final (the probe is removed, its handlers kept).
    pub fn try_unregister(&mut self) -> Result<ReturnProbeStats, ProbeError> {
        let Some(entry) = self.entry.as_mut() else {
            return Ok(ReturnProbeStats { hits: 0, returns: 0, nmissed: 0 });
        };
        let missed_at_entry = entry.try_unregister()?.nmissed;
        self.entry = None;
        retire(self.shared.index)?;
        Ok(ReturnProbeStats {
            hits: self.shared.hits.sum(),
            returns: self.shared.returns.sum(),
            nmissed: self.shared.nmissed.load(Ordering::Relaxed) + missed_at_entry,
        })
    }
}

impl Drop for ReturnProbeHandle {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            if entry.unregister().is_ok() {
                let _ = retire(self.shared.index);
            }
        }
    }
}

impl fmt::Debug for ReturnProbeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.entry {
            Some(entry) => write!(f, "ReturnProbeHandle({:#x})", entry.address()),
            None => write!(f, "ReturnProbeHandle(unregistered)"),
        }
    }
}

/// A return probe's final counts, returned by [`ReturnProbeHandle::unregister`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReturnProbeStats {
    /// Calls tracked.
    pub hits: u64,
    /// Return handler runs.
    pub returns: u64,
    /// Calls not tracked (see [`ReturnProbeHandle::nmissed`]).
    pub nmissed: u64,
}
