//! The function-graph tracer's two hot paths (the kernel's `function_graph_enter` and
//! `ftrace_return_to_handler`): a record into the thread's ring at every entry and at every
//! exit of a traced function.
//!
//! Both run on the traced thread, at every call: no allocation, no lock, no C library
//! routine, no vector register and nothing that could panic — proven by decoding when the
//! trampolines are built (`dynprobe_probe::graph_width`, and the test below), so that the
//! caller and the light return trampoline save the general registers only (otherwise
//! xmm0–15 and MXCSR; see `dynprobe_arch`'s `ftrace` module). The thread's ring is its
//! thread slot's, which the return hooks hand out.

use dynprobe_events::marker::MarkerRecords;
use dynprobe_events::record::{Kind, Record};
use dynprobe_events::{clock::Clock, ring::RingFile};
use dynprobe_probe::{graph_enter, graph_enter_from_probe, GraphEnter, GraphExit, Regs};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::Mutex;

/// Where records go.
pub(crate) struct Output {
    pub(crate) ring: RingFile,
    pub(crate) clock: Clock,
    /// The deepest call recorded (`--depth`).
    pub(crate) max_depth: usize,
    /// This output's tag, in the bits above [`ID_BITS`] of every function id it hands the
    /// return hooks: a call entered for an earlier output (an attach session that ended
    /// while the call was in flight, its return still diverted) ends unrecorded, never
    /// under another session's function of the same number.
    pub(crate) tag: u32,
    /// With `record -a`: what each call's entry and exit records carry.
    pub(crate) values: Option<Box<dyn crate::CallValues>>,
}

/// The bits of a function id handed to the return hooks that are the tracer's id; the
/// bits above are the output's tag.
pub(crate) const ID_BITS: u32 = 24;
pub(crate) const ID_MASK: u32 = (1 << ID_BITS) - 1;

/// A fresh tag for an output (one of 255, cycling: a call still in flight 255 sessions
/// later could be taken for the current session's).
pub(crate) fn next_tag() -> u32 {
    static LAST: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = LAST.fetch_add(1, Ordering::Relaxed) % 255 + 1;
    n << ID_BITS
}

/// The current output, or null: set by [`set_output`], taken away by [`retire_output`] at
/// the end of an attach session (a later session of the same loaded agent sets its own).
/// The hot paths read it once per event.
static OUTPUT: AtomicPtr<Output> = AtomicPtr::new(std::ptr::null_mut());

/// Outputs taken away while a thread may still be using them (it read the pointer just
/// before it went): kept allocated, their rings moved onto anonymous memory, until
/// [`free_retired`] says no thread can be.
static RETIRED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Per thread slot: the slot's thread is inside `fork`. Between the fork's prepare handler
/// and the parent's or child's, that thread's records are dropped (and counted), because
/// the child, a copy of it with the same slot, would otherwise write into the parent's ring
/// until it gets a ring of its own. One flag per slot, so that threads forking at once do
/// not clear each other's.
static FORKING: [AtomicBool; dynprobe_probe::MAX_THREADS] =
    [const { AtomicBool::new(false) }; dynprobe_probe::MAX_THREADS];

/// The calling thread is about to fork.
pub(crate) fn fork_prepare() {
    if let Some(slot) = dynprobe_probe::current_thread_slot() {
        FORKING[slot].store(true, Ordering::Relaxed);
    }
}

/// The calling thread's fork is over, in the parent or (once it has its own ring) in the
/// child.
pub(crate) fn fork_done() {
    if let Some(slot) = dynprobe_probe::current_thread_slot() {
        FORKING[slot].store(false, Ordering::Relaxed);
    }
}

/// True when records of thread slot `slot` must be dropped now (see [`FORKING`]).
#[inline(always)]
fn forking(slot: usize) -> bool {
    // `get`: no index check that could panic on the hot path (see `dynprobe_probe::light_verdict`).
    FORKING.get(slot).is_some_and(|f| f.load(Ordering::Relaxed))
}

/// An output set but not published yet (see [`set_output`]), or null.
static HELD: AtomicPtr<Output> = AtomicPtr::new(std::ptr::null_mut());

/// Sets where records go, at once (`publish`) or held back until [`publish_held`]; false
/// when an output was set already.
pub(crate) fn set_output(output: Output, publish: bool) -> bool {
    let new = Box::into_raw(Box::new(output));
    let null = std::ptr::null_mut();
    let set = match publish {
        true => {
            HELD.load(Ordering::Acquire).is_null()
                && OUTPUT.compare_exchange(null, new, Ordering::AcqRel, Ordering::Acquire).is_ok()
        }
        false => {
            OUTPUT.load(Ordering::Acquire).is_null()
                && HELD.compare_exchange(null, new, Ordering::AcqRel, Ordering::Acquire).is_ok()
        }
    };
    if !set {
        // SAFETY: `new` came from Box::into_raw just above and was never shared.
        drop(unsafe { Box::from_raw(new) });
    }
    set
}

/// The output held back by [`set_output`], if any.
pub(crate) fn held_output() -> Option<&'static Output> {
    // SAFETY: as in `output`: a leaked Box, freed only once retired and unused.
    unsafe { HELD.load(Ordering::Acquire).as_ref() }
}

/// Publishes the held output: the hot paths record from now on.
pub(crate) fn publish_held() {
    let held = HELD.swap(std::ptr::null_mut(), Ordering::AcqRel);
    if !held.is_null() {
        OUTPUT.store(held, Ordering::Release);
    }
}

/// The output, once set.
#[inline(always)]
pub(crate) fn output() -> Option<&'static Output> {
    // SAFETY: a non-null pointer is a leaked Box that is freed only by `free_retired`,
    // once no thread can be using it (see there).
    unsafe { OUTPUT.load(Ordering::Acquire).as_ref() }
}

/// Ends recording: from now on the hot paths record nothing. The ring file is let go (its
/// mapping becomes anonymous memory, so a thread that read the output just before still
/// writes somewhere harmless, and the file's memory is freed once the recorder removes it);
/// the output itself stays allocated until [`free_retired`].
pub(crate) fn retire_output() {
    // A recording that ends before it was published ends unpublished.
    publish_held();
    let old = OUTPUT.swap(std::ptr::null_mut(), Ordering::AcqRel);
    // SAFETY: as in `output`: still allocated, and stays so until `free_retired`.
    if let Some(out) = unsafe { old.as_ref() } {
        out.ring.let_go_of_file();
        RETIRED.lock().unwrap_or_else(|e| e.into_inner()).push(old as usize);
    }
}

/// Frees the outputs [`retire_output`] took away (unmapping their rings). The caller knows
/// that no thread is inside a hot path of this module any more, or can enter one with an
/// output it read before: no site calls the tracer and no return is still to come through
/// its trampoline (`dynprobe_probe::release_all` succeeded).
pub(crate) fn free_retired() {
    let retired = std::mem::take(&mut *RETIRED.lock().unwrap_or_else(|e| e.into_inner()));
    for old in retired {
        // SAFETY: a pointer `set_output` leaked and `retire_output` took out of OUTPUT, freed
        // once (it is taken out of the list here); no thread uses it any more (see above).
        drop(unsafe { Box::from_raw(old as *mut Output) });
    }
}

/// Called by the ftrace caller (see `dynprobe_arch`'s `ftrace` module) at a compiler site:
/// `ra_slot` is the traced function's return-address slot.
pub(crate) extern "C" fn caller_dispatch(id: u64, ra_slot: u64) {
    let Some(out) = output() else { return };
    // The entry's time sorts after the records of any calls entering finds abandoned (see
    // `graph_enter`).
    let (entry, time) = graph_enter(ra_slot, id as u32 | out.tag, out.max_depth, || out.clock.now());
    record_entry(out, entry, time, id);
}

/// The pre-handler of a plain-entry site's probe.
pub(crate) fn probe_entry(id: u32, regs: &Regs) {
    let Some(out) = output() else { return };
    let entry = graph_enter_from_probe(regs, id | out.tag, out.max_depth);
    record_entry(out, entry, out.clock.now(), u64::from(id));
}

#[inline(always)]
fn record_entry(out: &Output, entry: GraphEnter, time: u64, id: u64) {
    match entry {
        GraphEnter::Entered(e) if forking(e.slot) => out.ring.count_missed(),
        GraphEnter::Entered(e) => out.ring.push(e.slot, e.tid, Record::new(Kind::Entry, time, e.depth as u16, id)),
        GraphEnter::Skipped => {}
        // Not recorded though it should have been: counted in the ring file, where the
        // recorder reads it (`--depth` and dynprobe's own calls are left out by design).
        GraphEnter::Missed => out.ring.count_missed(),
    }
}

/// Where an event that is not a call goes: see [`crate::EventPosition`].
pub(crate) fn event_position() -> Option<crate::EventPosition> {
    let out = output()?;
    let at = dynprobe_probe::graph_position_from_probe()?;
    if forking(at.slot) {
        out.ring.count_missed();
        return None;
    }
    Some(crate::EventPosition { slot: at.slot, tid: at.tid, depth: at.depth as u16, time: out.clock.now() })
}

/// Pushes the records of an event at `at`, together.
pub(crate) fn push_event(at: &crate::EventPosition, records: &[Record]) {
    if let Some(out) = output() {
        out.ring.push_all(at.slot, at.tid, records);
    }
}

/// The return hooks' report of a call's end.
pub(crate) fn on_exit(exit: &GraphExit) {
    let Some(out) = output() else { return };
    if exit.func & !ID_MASK != out.tag {
        // Entered for an earlier session's output: not this trace's call.
        return;
    }
    if forking(exit.slot) {
        return out.ring.count_missed();
    }
    let kind = if exit.unwound { Kind::Unwound } else { Kind::Exit };
    let func = u64::from(exit.func & ID_MASK);
    out.ring.push(exit.slot, exit.tid, Record::new(kind, out.clock.now(), exit.depth as u16, func));
}

/// The vector argument registers xmm0–7 (their low 64 bits), read before anything here can
/// have changed them: the entry caller and the light return trampoline run no vector
/// instruction on the way to a dispatcher (see `dynprobe_arch`'s `ftrace` module), and a
/// heavy dispatcher only makes them save the vector state, unchanged, around it.
#[inline(always)]
fn vector_arguments() -> [u64; 8] {
    let (v0, v1, v2, v3, v4, v5, v6, v7): (u64, u64, u64, u64, u64, u64, u64, u64);
    // SAFETY: reads registers only.
    unsafe {
        std::arch::asm!(
            "movq {0}, xmm0", "movq {1}, xmm1", "movq {2}, xmm2", "movq {3}, xmm3",
            "movq {4}, xmm4", "movq {5}, xmm5", "movq {6}, xmm6", "movq {7}, xmm7",
            out(reg) v0, out(reg) v1, out(reg) v2, out(reg) v3,
            out(reg) v4, out(reg) v5, out(reg) v6, out(reg) v7,
            options(nomem, nostack, preserves_flags),
        );
    }
    [v0, v1, v2, v3, v4, v5, v6, v7]
}

/// [`caller_dispatch`] with `record -a`: the entry record carries the call's arguments, read
/// from the argument registers the caller saved below `ra_slot`, the stack above it and the
/// vector registers. Not the plain path: it reads the vector registers and calls the
/// fetches (raw system calls), so its caller saves the vector state around it.
pub(crate) extern "C" fn caller_dispatch_values(id: u64, ra_slot: u64) {
    let vector = vector_arguments();
    let Some(out) = output() else { return };
    let (entry, time) = graph_enter(ra_slot, id as u32 | out.tag, out.max_depth, || out.clock.now());
    let word = |below: u64| {
        // SAFETY: the caller pushed these registers on this thread's stack, just below the
        // return-address slot (`ARGUMENTS_BELOW_SLOT`).
        unsafe { *((ra_slot - below) as *const u64) }
    };
    let [rdi, rsi, rdx, rcx, r8, r9] = dynprobe_arch::native::ftrace::ARGUMENTS_BELOW_SLOT.map(word);
    let regs = Regs { rdi, rsi, rdx, rcx, r8, r9, rsp: ra_slot, ..Regs::default() };
    record_entry_values(out, entry, time, id as u32, &regs, Some(&vector));
}

/// [`probe_entry`] with `record -a` (see [`caller_dispatch_values`]): the vector arguments
/// as the probe's path saved them before its dispatcher ran (its probe
/// [reads them](dynprobe_probe::Probe::reads_vectors)).
pub(crate) fn probe_entry_values(id: u32, regs: &Regs) {
    let xmm = dynprobe_probe::hit_xmm();
    let Some(out) = output() else { return };
    let entry = graph_enter_from_probe(regs, id | out.tag, out.max_depth);
    let vector = xmm.map(|x| std::array::from_fn::<u64, 8, _>(|i| x[i]));
    record_entry_values(out, entry, out.clock.now(), id, regs, vector.as_ref());
}

fn record_entry_values(out: &Output, entry: GraphEnter, time: u64, id: u32, regs: &Regs, vector: Option<&[u64; 8]>) {
    let (Some(values), GraphEnter::Entered(e)) = (&out.values, entry) else {
        return record_entry(out, entry, time, u64::from(id));
    };
    if forking(e.slot) {
        return out.ring.count_missed();
    }
    let mut records = MarkerRecords::new();
    // The fetches are dynprobe's work: a traced function they reach (the C library's
    // `memset`, when it is traced) is not the program's call, and must not recurse here.
    dynprobe_probe::set_current_thread_traced(false);
    values.entry(id, regs, vector, &mut records);
    dynprobe_probe::set_current_thread_traced(true);
    out.ring.push_all(e.slot, e.tid, records.finish_as(Kind::Entry, time, e.depth as u16, id));
}

/// [`on_exit`] with `record -a`: the exit record carries the return value (`rax`, or xmm0).
pub(crate) fn on_exit_values(exit: &GraphExit) {
    let xmm0 = vector_arguments()[0];
    let Some(out) = output() else { return };
    let Some(values) = &out.values else { return on_exit(exit) };
    if exit.func & !ID_MASK != out.tag || exit.unwound || forking(exit.slot) {
        return on_exit(exit);
    }
    let time = out.clock.now();
    let func = exit.func & ID_MASK;
    let mut records = MarkerRecords::new();
    dynprobe_probe::set_current_thread_traced(false);
    values.exit(func, exit.retval, xmm0, &mut records);
    dynprobe_probe::set_current_thread_traced(true);
    out.ring.push_all(exit.slot, exit.tid, records.finish_as(Kind::Exit, time, exit.depth as u16, func));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tracer's hot paths leave the vector state alone, proven by decoding: a change that
    /// makes one heavy (a struct copy compiled to vector moves, a call of the C library, a
    /// possible panic) fails here with the instruction and the call chain to it.
    #[test]
    fn the_entry_and_exit_paths_are_light() {
        dynprobe_probe::light_verdict(&|regs: &mut Regs| probe_entry(7, regs)).unwrap();
        dynprobe_probe::function_light_verdict(caller_dispatch as *const () as u64).unwrap();
        dynprobe_probe::function_light_verdict(on_exit as *const () as u64).unwrap();
        // And so the entry caller saves no vector register.
        let width = dynprobe_probe::graph_width(caller_dispatch as *const () as u64);
        assert_eq!(width, dynprobe_arch::native::detour::VectorWidth::None);
    }
}
