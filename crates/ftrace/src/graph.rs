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

use dynprobe_events::record::{Kind, Record};
use dynprobe_events::{clock::Clock, ring::RingFile};
use dynprobe_probe::{graph_enter, graph_enter_from_probe, GraphEnter, GraphExit, Regs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Where records go.
pub(crate) struct Output {
    pub(crate) ring: RingFile,
    pub(crate) clock: Clock,
    /// The deepest call recorded (`--depth`).
    pub(crate) max_depth: usize,
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

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

/// Sets where records go; false when an output was set already.
pub(crate) fn set_output(output: Output) -> bool {
    OUTPUT.set(output).is_ok()
}

/// The output, once set.
pub(crate) fn output() -> Option<&'static Output> {
    OUTPUT.get()
}

/// Called by the ftrace caller (see `dynprobe_arch`'s `ftrace` module) at a compiler site:
/// `ra_slot` is the traced function's return-address slot.
pub(crate) extern "C" fn caller_dispatch(id: u64, ra_slot: u64) {
    let Some(out) = OUTPUT.get() else { return };
    // Entering may report calls found abandoned (with their own, later, clock reading):
    // the entry's time is read after, so that its record sorts after theirs.
    let entry = graph_enter(ra_slot, id as u32, out.max_depth);
    record_entry(out, entry, out.clock.now(), id);
}

/// The pre-handler of a plain-entry site's probe.
pub(crate) fn probe_entry(id: u32, regs: &Regs) {
    let Some(out) = OUTPUT.get() else { return };
    let entry = graph_enter_from_probe(regs, id, out.max_depth);
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
    let out = OUTPUT.get()?;
    let at = dynprobe_probe::graph_position_from_probe()?;
    if forking(at.slot) {
        out.ring.count_missed();
        return None;
    }
    Some(crate::EventPosition { slot: at.slot, tid: at.tid, depth: at.depth as u16, time: out.clock.now() })
}

/// Pushes the records of an event at `at`, together.
pub(crate) fn push_event(at: &crate::EventPosition, records: &[Record]) {
    if let Some(out) = OUTPUT.get() {
        out.ring.push_all(at.slot, at.tid, records);
    }
}

/// The return hooks' report of a call's end.
pub(crate) fn on_exit(exit: &GraphExit) {
    let Some(out) = OUTPUT.get() else { return };
    if forking(exit.slot) {
        return out.ring.count_missed();
    }
    let kind = if exit.unwound { Kind::Unwound } else { Kind::Exit };
    out.ring.push(exit.slot, exit.tid, Record::new(kind, out.clock.now(), exit.depth as u16, u64::from(exit.func)));
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
