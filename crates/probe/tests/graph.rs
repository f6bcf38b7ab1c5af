//! The function-graph tracer's entry (`graph_enter`), called directly on return-address
//! slots of a stack made for the test: its short path, taken by the call nearly every call
//! is, and its general path must decide every case alike — a call entered, a call already
//! tracked, one deeper than asked, and a call made where an abandoned one's frame was —
//! and stamp the entry with a time that sorts after the exits entering reported.

use dynprobe_probe::{graph_enter, graph_install, is_return_trampoline, GraphEnter, GraphExit};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The exits the hook heard of: (depth, function, unwound).
static EXITS: Mutex<Vec<(usize, u32, bool)>> = Mutex::new(Vec::new());

/// The test's clock: a count of its readings.
static TICKS: AtomicU64 = AtomicU64::new(0);

fn tick() -> u64 {
    TICKS.fetch_add(1, Ordering::Relaxed) + 1
}

/// The clock reading an exit's record would carry (the tracer's hook reads the clock).
static LAST_EXIT_TIME: AtomicU64 = AtomicU64::new(0);

fn hook(exit: &GraphExit) {
    LAST_EXIT_TIME.store(tick(), Ordering::Relaxed);
    EXITS.lock().unwrap().push((exit.depth, exit.func, exit.unwound));
}

/// [`graph_enter`] with the test's clock: what it decided, and the entry's time.
fn enter(rsp: u64, func: u32, max_depth: usize) -> (GraphEnter, u64) {
    graph_enter(rsp, func, max_depth, tick)
}

fn entered_at(result: GraphEnter) -> usize {
    match result {
        GraphEnter::Entered(entry) => {
            // SAFETY: gettid cannot fail.
            assert_eq!(entry.tid, unsafe { libc::gettid() } as u32);
            entry.depth
        }
        other => panic!("not entered: {other:?}"),
    }
}

#[test]
fn the_entry_decides_each_case_as_the_general_path_does() {
    graph_install(hook).unwrap();
    // A stack of return-address slots, higher index = outer frame (stacks grow down).
    let mut stack = vec![0u64; 64];
    let slot = |stack: &mut Vec<u64>, i: usize, ret: u64| {
        stack[i] = ret;
        &raw mut stack[i] as u64
    };
    // The first call of the thread (asked once whether it is dynprobe's own), then a call it
    // makes: both entered, their return addresses diverted into the sled.
    let outer = slot(&mut stack, 40, 0x1111);
    assert_eq!(entered_at(enter(outer, 1, 8).0), 0);
    let inner = slot(&mut stack, 30, 0x2222);
    let before = TICKS.load(Ordering::Relaxed);
    let (entered, time) = enter(inner, 2, 8);
    assert_eq!(entered_at(entered), 1);
    assert_eq!(time, before + 1, "the short path reads the clock once, first");
    assert!(is_return_trampoline(stack[40]) && is_return_trampoline(stack[30]), "{stack:x?}");
    // The same call entered again (a loop at its first instruction, a tail call to itself):
    // tracked already.
    assert_eq!(enter(inner, 2, 8).0, GraphEnter::Skipped);
    // Deeper than asked.
    let deeper = slot(&mut stack, 20, 0x3333);
    assert_eq!(enter(deeper, 3, 2).0, GraphEnter::Skipped);
    assert_eq!(stack[20], 0x3333, "a skipped call's return address is left alone");
    // A call made from where the inner call's frame was (a longjmp left it): the inner call
    // is reported unwound, and the new one takes its depth, at a time after that report's.
    let after_longjmp = slot(&mut stack, 35, 0x4444);
    let (entered, time) = enter(after_longjmp, 4, 8);
    assert_eq!(entered_at(entered), 1);
    assert_eq!(*EXITS.lock().unwrap(), [(1, 2, true)]);
    assert!(time > LAST_EXIT_TIME.load(Ordering::Relaxed), "the entry's time is not after the exit it reported");
    // And calls go on above it by the short path.
    let next = slot(&mut stack, 25, 0x5555);
    assert_eq!(entered_at(enter(next, 5, 8).0), 2);
    assert_eq!(EXITS.lock().unwrap().len(), 1);
}
