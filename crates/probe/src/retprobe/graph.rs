//! The return hooks only dynprobe's function-graph tracer uses (the kernel's `fprobe` on
//! `rethook`): entering a call for the tracer, the light sled's return path, and the one
//! exit hook every entered call reaches exactly once.

use super::*;
use dynprobe_arch::native::detour::VectorWidth;

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
    /// What the function returned in `rax` (0 when it was unwound): `record -a` records it.
    pub retval: u64,
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
pub(super) static GRAPH_HOOK: OnceLock<fn(&GraphExit)> = OnceLock::new();
/// Set, before [`GRAPH_HOOK`], when the hook is not proven light: no detour may then run
/// code that reaches it on its light path.
pub(super) static GRAPH_HOOK_HEAVY: AtomicBool = AtomicBool::new(false);

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

/// Reports the end of a graph instance.
#[inline(always)]
pub(super) fn graph_exit(slot: usize, depth: usize, inst: &Instance, unwound: bool, retval: u64) {
    report_graph_exit(slot, depth, inst.data[0] as u32, unwound, retval);
}

#[inline(always)]
pub(super) fn report_graph_exit(slot: usize, depth: usize, func: u32, unwound: bool, retval: u64) {
    if let Some(hook) = GRAPH_HOOK.get() {
        call_graph_hook(*hook, &GraphExit { slot, tid: current_tid() as u32, depth, func, unwound, retval });
    }
}

/// Prepares the return hooks for dynprobe's function-graph tracer (the kernel's `fprobe`
/// on `rethook`): the instance table, the light trampoline and the backtrace filter, and
/// `hook`, which every call entered by [`graph_enter`] reaches exactly once — when it
/// returns, or when it is found abandoned. `hook` runs on the traced thread, with the
/// returning function's registers saved only as far as the light trampoline saves them:
/// it must allocate nothing, take no lock, and leave the vector state alone (no C library
/// routine such as `memcpy`). When it and the return path are proven to (by decoding, see
/// [`crate::light_verdict`]) the light trampoline saves the general registers only;
/// otherwise xmm0–15 and MXCSR too ([`crate::light_width`]). Only the first call's hook is
/// kept.
pub fn graph_install(hook: fn(&GraphExit)) -> Result<(), ProbeError> {
    let mut setup = setup()?;
    setup.install()?;
    if GRAPH_HOOK.get().is_none() {
        // Until the hook is set no call is entered by the tracer, so no hook can be called
        // by a hit that checked the flag before it is set.
        if crate::registry::prove_light(&[hook as *const () as u64]).is_err() {
            GRAPH_HOOK_HEAVY.store(true, Ordering::Relaxed);
        }
    }
    if !setup.light {
        let stride = std::mem::size_of::<Instance>() as u64;
        let path_light = crate::registry::prove_light(&[rethook::light_dispatch_code()]).is_ok();
        let width = match graph_hook_light() && path_light {
            true => VectorWidth::None,
            false => crate::light_width(),
        };
        let table = INSTANCES.load(Ordering::Relaxed) as u64;
        rethook::install(&rethook::LIGHT, MAX_THREADS * MAX_DEPTH, table, stride, width)?;
        setup.light = true;
    }
    let _ = GRAPH_HOOK.set(hook);
    Ok(())
}

/// What the function-graph tracer's trampolines save of the vector state around a
/// dispatcher at `dispatch` (an `extern "C" fn` of the tracer's, as its entry caller calls):
/// nothing when the dispatcher and everything it reaches are proven to leave it alone (see
/// [`crate::light_verdict`]), else xmm0–15 and MXCSR ([`crate::light_width`]).
pub fn graph_width(dispatch: u64) -> VectorWidth {
    match crate::registry::prove_light(&[dispatch]) {
        Ok(()) => VectorWidth::None,
        Err(_) => crate::light_width(),
    }
}

/// What the light return trampoline saves of the vector state, once installed by
/// [`graph_install`].
pub fn graph_return_width() -> Option<VectorWidth> {
    rethook::light_sled_width()
}

/// Enters a call for the function-graph tracer: `rsp` is the stack pointer at the entry of
/// function `func` (it points at the return address), `max_depth` the deepest call to
/// track. Diverts the return address so that [`graph_install`]'s hook hears of the call's
/// end, and says whether the call is tracked and where, with the entry's time read from
/// `now` (the tracer's clock). Allocation-free and lock-free: it runs on the traced thread
/// at every call. [`graph_install`] must have succeeded first.
///
/// The time is read before the entering on the path nearly every call takes, which
/// reports nothing: the clock's latency (`rdtsc`'s, tens of cycles) then overlaps the
/// entering instead of adding to it (1.2–1.6 ns of a traced call on an AMD EPYC Zen 4
/// host). Entering on the general path may report calls found abandoned, whose records
/// carry their own clock readings: the time is read again after it, so that the entry
/// sorts after them.
#[inline]
pub fn graph_enter(rsp: u64, func: u32, max_depth: usize, now: impl Fn() -> u64) -> (GraphEnter, u64) {
    let time = now();
    match enter_above_live_calls(rsp, func, max_depth) {
        Some(entry) => (GraphEnter::Entered(entry), time),
        None => (graph_enter_general(rsp, func, max_depth), now()),
    }
}

/// [`graph_enter`] for the call nearly every traced call is: made by a thread known to be
/// the program's, outside any handler, with its instance stack current and the call on top
/// of it still in flight (its return-address slot above ours), so that nothing is
/// abandoned, shared or too deep. `None` sends every other case to the general path, which
/// decides it as it always has: this is only that path with its answers known in advance.
#[inline(always)]
fn enter_above_live_calls(rsp: u64, func: u32, max_depth: usize) -> Option<GraphEntry> {
    let (slot, thread) = ThreadSlot::current()?;
    if !thread.seen_by_probes() || thread.untraced.load(Ordering::Relaxed) || rsp & 7 != 0 {
        return None;
    }
    if thread.active.load(Ordering::Relaxed) != 0 {
        return None;
    }
    let _guard = HandlerGuard::enter_found(Some((slot, thread)), crate::thread_slot::ANY_SITE as u64).ok()?;
    let stack = stack(slot);
    let top = stack.top.load(Ordering::Relaxed) as usize;
    if stack.generation.load(Ordering::Relaxed) != thread.generation() || top >= max_depth.min(MAX_DEPTH) {
        return None;
    }
    let base = slot * MAX_DEPTH;
    // SAFETY: an instance of this thread below `top`.
    if top > 0 && unsafe { (*instance(base + top - 1)).slot_addr } <= rsp {
        return None;
    }
    // SAFETY: the instance at `top` is free and only this thread uses its slot's instances.
    unsafe { (*instance(base + top)).data.0[0] = u64::from(func) };
    let c = Claim { slot, base, top, current: read_slot(rsp), shared: false };
    commit(&c, rsp, GRAPH, 0, &rethook::LIGHT);
    Some(GraphEntry { slot, tid: thread.owner_tid() as u32, depth: top })
}

/// [`graph_enter`]'s every case: dynprobe's own and hidden threads, a thread inside a
/// handler, calls abandoned or shared, too deep.
#[cold]
#[inline(never)]
fn graph_enter_general(rsp: u64, func: u32, max_depth: usize) -> GraphEnter {
    // dynprobe's own threads are never traced, from their first instruction on.
    if crate::own_thread::current_thread_is_own() {
        return GraphEnter::Skipped;
    }
    let Some(guard) = HandlerGuard::enter() else { return GraphEnter::Missed };
    // Asked once per thread: what the fast path reads next time.
    if guard.thread().owner_unseen() {
        return GraphEnter::Skipped;
    }
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
    let stack = stack(slot);
    // A stack of an earlier thread of this slot is empty for this one.
    let top = match stack.generation.load(Ordering::Relaxed) == thread.generation() {
        true => stack.top.load(Ordering::Relaxed) as usize,
        false => 0,
    };
    Some(GraphEntry { slot, tid: current_tid() as u32, depth: top })
}

#[inline(always)]
pub(super) fn enter_graph_call(slot: usize, thread: &ThreadSlot, rsp: u64, func: u32, max_depth: usize) -> GraphEnter {
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

/// The return path of the light sled: every instance diverting this return-address slot is
/// the function-graph tracer's (a return probe joining a call writes the full sled's
/// entry), so there are no handlers to give registers to; `retval` is the returning
/// function's `rax`, for the exit hook.
///
/// The call such a sled sees nearly always — its instance the top of the thread's stack and
/// alone at its return-address slot — ends without [`end_calls`]' walks (as a light return
/// probe's does, see `on_return_light`).
#[inline(always)]
pub(crate) fn on_graph_return(index: usize, caller_rsp: u64, retval: u64) -> Resume {
    // Held so that a signal handler's traced call cannot push onto the stack while the
    // instances are given back (it counts as missed instead).
    let guard = HandlerGuard::enter_returning(index / MAX_DEPTH);
    // SAFETY: the trampoline entry says this thread pushed this instance.
    let inst = unsafe { &*instance(index) };
    let orig = inst.orig;
    if !ends_alone(index, caller_rsp) {
        on_graph_return_general(index, caller_rsp, retval);
    } else {
        graph_exit(index / MAX_DEPTH, index % MAX_DEPTH, inst, false, retval);
        give_back_alone(index);
    }
    Resume { ip: orig, guard }
}

/// [`on_graph_return`]'s every case: instances abandoned above the returning one, others
/// sharing its return-address slot.
#[cold]
#[inline(never)]
fn on_graph_return_general(index: usize, caller_rsp: u64, retval: u64) {
    end_calls(index, caller_rsp, |slot, k, inst| {
        graph_exit(slot, k, inst, false, retval);
    });
}

/// True when `addr` lies in a return trampoline (a return address a return hook diverted):
/// an unwinder reaching one has reached a call already tracked. Allocation-free.
pub fn is_return_trampoline(addr: u64) -> bool {
    rethook::in_return_path(addr)
}

/// Where `pc` is in a return trampoline's resume stub, if it is: its offset there. A frame
/// there stands for the diverted function's just before its `ret`, the original return
/// address pushed back (`dynprobe_arch`'s `resume_stub_frame` says where): an unwinder goes
/// on from it to the caller, as if the return had never been diverted. Allocation-free.
pub fn resume_stub_offset(pc: u64) -> Option<u32> {
    rethook::resume_stub_offset(pc)
}

/// A call that was already in flight on a thread when the function-graph tracer started,
/// found on its stack by unwinding: [`graph_adopt`] tracks its return from then on as if
/// [`graph_enter`] had entered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InFlightCall {
    /// Where its return address is: its frame's canonical frame address − 8.
    pub slot_addr: u64,
    /// The return address found there.
    pub ret: u64,
    /// The function id for the exit hook, as [`graph_enter`] takes it.
    pub func: u32,
}

/// Where [`graph_adopt`] put a thread's calls: `count` calls from depth `first_depth` on,
/// outermost first, on the instance stack of thread slot `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adopted {
    /// The thread's slot (as in [`GraphExit::slot`]).
    pub slot: usize,
    /// The depth of the outermost adopted call (calls already tracked lie below it).
    pub first_depth: usize,
    /// How many of the calls given were adopted: the outermost ones; the others (deeper
    /// than `max_depth` or [`MAX_DEPTH`], or whose return address changed) are left alone.
    pub count: usize,
}

/// Tracks the calls `calls` (outermost first) of thread (`tp`, `tid`), which is held
/// stopped with its stack pointer at `sp`: each gets an instance on the thread's instance
/// stack, above those already there, and its return address diverted to that instance's
/// light sled entry, so that its return (or its being unwound) reaches [`graph_install`]'s
/// hook exactly as a call [`graph_enter`] entered. The stack is the one the thread finds
/// when it runs again: the calls it then makes go above them, in the order their frames
/// lie on its stack.
///
/// `None` when the thread is not to be touched: dynprobe's own, in the return path or
/// another handler of no site (its instance stack may be being changed), or without a
/// thread slot. A thread stopped inside a probe site's handlers is taken up: the caller
/// makes sure no handler placed then changes an instance stack (the function-graph
/// tracer's entry handlers change nothing until its recording is published, and a call
/// they enter after that finds its return address diverted already and is not entered
/// twice). Allocates nothing and takes no lock, for callers that hold the other threads
/// stopped.
///
/// # Safety
///
/// The thread must be another thread of this process, held stopped (the text layer's stop)
/// for the whole call, and `calls` must have been read from its stack in this stop, each
/// return-address slot inside its stack's mapping and newer frames' slots lower.
pub unsafe fn graph_adopt(tp: u64, tid: i32, sp: u64, calls: &[InFlightCall], max_depth: usize) -> Option<Adopted> {
    if crate::own_thread::is_own_stack(sp) {
        return None;
    }
    let (slot, thread) = ThreadSlot::of_stopped_thread(tp as usize, tid)?;
    if crate::thread_slot::marks_no_site(thread.active.load(Ordering::Acquire))
        || thread.untraced.load(Ordering::Relaxed)
    {
        return None;
    }
    let stack = stack(slot);
    if stack.generation.load(Ordering::Relaxed) != thread.generation() {
        stack.restart_for(thread.generation(), tp as usize);
    }
    let base = slot * MAX_DEPTH;
    // Instances whose call is over (left by a longjmp, an exception, or an earlier session
    // whose calls have returned) come off first, as `claim` would take them off.
    let mut top = stack.top.load(Ordering::Relaxed) as usize;
    while top > 0 {
        // SAFETY: an instance of the stopped thread's stack below `top`.
        let below = unsafe { &*instance(base + top - 1) };
        if below.slot_addr != 0 && still_diverted(below.slot_addr, base + top - 1) {
            break;
        }
        top -= 1;
    }
    stack.top.store(top as u32, Ordering::Relaxed);
    // A call still tracked lies deeper on the stack than every adopted one (the unwinding
    // stops at a diverted return address): any frame at or past it is not adopted.
    let floor = match top {
        0 => u64::MAX,
        // SAFETY: as above.
        _ => unsafe { (*instance(base + top - 1)).slot_addr },
    };
    let first_depth = top;
    let mut count = 0;
    for call in calls {
        let unchanged = {
            let mut word = [0u8; 8];
            dynprobe_text::raw::read(call.slot_addr, &mut word) && u64::from_le_bytes(word) == call.ret
        };
        if top >= max_depth.min(MAX_DEPTH) || call.slot_addr >= floor || call.slot_addr & 7 != 0 || !unchanged {
            break;
        }
        // SAFETY: the instance at `top` is free; its thread is stopped and uses it only
        // once it runs again, after the stop's release orders these writes before it.
        let inst = unsafe { &mut *instance(base + top) };
        inst.data[0] = u64::from(call.func);
        let c = Claim { slot, base, top, current: call.ret, shared: false };
        // Writes the sled entry over the return address just read back unchanged, in the
        // stopped thread's stack mapping.
        commit(&c, call.slot_addr, GRAPH, 0, &rethook::LIGHT);
        top += 1;
        count += 1;
    }
    Some(Adopted { slot, first_depth, count })
}
