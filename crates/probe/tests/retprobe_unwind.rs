//! Calls that do not return normally through functions with return probes: `longjmp`, C++
//! exceptions, Rust panics, a thread exiting inside; and backtraces taken inside probed
//! functions. Each must behave exactly as without the probes and leave nothing stale.

mod common;

use common::{serial, symbol_of, Target as Lib};
use dynprobe_probe::{sym, ReturnProbe, ReturnProbeHandle};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Mutex, OnceLock};

fn c_lib() -> &'static Lib {
    static LIB: OnceLock<Lib> = OnceLock::new();
    LIB.get_or_init(|| Lib::build("ret_basic.c", &[]))
}

fn cxx_lib() -> &'static Lib {
    static LIB: OnceLock<Lib> = OnceLock::new();
    LIB.get_or_init(|| Lib::build("ret_cxx.cpp", &[]))
}

/// A return probe with empty handlers.
fn retprobe(symbol: &str) -> ReturnProbeHandle {
    ReturnProbe::at(sym!(symbol))
        .on_entry(|_, _| true)
        .on_return(|_, _| ())
        .register()
        .unwrap_or_else(|e| panic!("return probe on {symbol}: {e}"))
}

/// Unregisters and checks the counts: `hits` tracked calls, `returns` of them returned,
/// nothing missed (a stale instance left behind would eventually fill the thread's stack).
fn check(probe: ReturnProbeHandle, hits: u64, returns: u64) {
    let stats = probe.unregister().unwrap();
    assert_eq!((stats.hits, stats.returns, stats.nmissed), (hits, returns, 0));
}

const ROUNDS: u64 = 5_000;

#[test]
fn longjmp_out_of_probed_functions_leaves_nothing_stale() {
    let _serial = serial();
    let (run, work) = (c_lib().func1("setjmp_then_jump"), c_lib().func1("work"));
    // The function that called setjmp is not probed: stale instances are found by the next
    // entries.
    let (jumper, outer) = (retprobe("jumper"), retprobe("jump_outer"));
    for i in 1..=ROUNDS as i64 {
        assert_eq!(run(i % 7 + 1), (i % 7 + 1) * 10);
        assert_eq!(work(i), 3 * i + 1);
    }
    assert_eq!(run(0), 0, "a call that returns normally");
    check(jumper, ROUNDS + 1, 1);
    check(outer, ROUNDS + 1, 1);

    // Now probed too: its return drops the two abandoned instances above it.
    let (jumper, outer, run_probe) = (retprobe("jumper"), retprobe("jump_outer"), retprobe("setjmp_then_jump"));
    for i in 1..=ROUNDS as i64 {
        assert_eq!(run(i % 7 + 1), (i % 7 + 1) * 10);
    }
    check(jumper, ROUNDS, 0);
    check(outer, ROUNDS, 0);
    check(run_probe, ROUNDS, ROUNDS);
}

#[test]
fn cxx_exceptions_unwind_through_probed_frames_to_the_same_handlers() {
    let _serial = serial();
    let lib = cxx_lib();
    let (above_two, direct, destroyed) =
        (lib.func1("catch_above_two"), lib.func1("catch_direct"), lib.func1("destroyed_count"));
    // Unprobed, for reference.
    let before = destroyed(0);
    assert_eq!(above_two(3), -3);
    assert_eq!(direct(3), -6);
    let per_round = destroyed(0) - before;
    assert_eq!(per_round, 3, "thrower's and mid's guards, then thrower's");

    let (thrower, mid) = (retprobe("thrower"), retprobe("mid"));
    let before = destroyed(0);
    for i in 1..=ROUNDS as i64 {
        assert_eq!(above_two(i), -i, "caught above two probed frames");
        assert_eq!(direct(i), -2 * i, "caught by the direct caller");
        assert_eq!(above_two(-i), -i + 1, "no exception");
    }
    assert_eq!(destroyed(0) - before, ROUNDS as i64 * (per_round + 2), "every destructor on the way ran");
    check(thrower, 3 * ROUNDS, ROUNDS);
    check(mid, 2 * ROUNDS, ROUNDS);
}

/// Rust functions of this test program with return probes; a panic unwinds through both.
#[no_mangle]
#[inline(never)]
pub extern "C-unwind" fn retprobe_test_panicker(x: i64) -> i64 {
    if x > 0 {
        std::panic::panic_any(x);
    }
    black_box(x) - 1
}

static DROPPED: AtomicU64 = AtomicU64::new(0);
struct CountDrop;
impl Drop for CountDrop {
    fn drop(&mut self) {
        DROPPED.fetch_add(1, SeqCst);
    }
}

/// Calls the panicker with a value to drop on the way out.
#[no_mangle]
#[inline(never)]
pub extern "C-unwind" fn retprobe_test_panic_mid(x: i64) -> i64 {
    let _guard = CountDrop;
    black_box(retprobe_test_panicker(black_box(x))) * 2
}

/// A Rust-ABI function between the test and the `extern "C-unwind"` ones.
#[no_mangle]
#[inline(never)]
pub fn retprobe_test_rust_abi(x: i64) -> i64 {
    black_box(retprobe_test_panic_mid(black_box(x))) + 3
}

#[test]
fn rust_panics_unwind_through_probed_frames_to_catch_unwind() {
    let _serial = serial();
    let call = |x: i64| std::panic::catch_unwind(|| retprobe_test_rust_abi(black_box(x)));
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| ()));
    let (inner, mid, outer) =
        (retprobe("retprobe_test_panicker"), retprobe("retprobe_test_panic_mid"), retprobe("retprobe_test_rust_abi"));
    let dropped = DROPPED.load(SeqCst);
    for i in 1..=1000i64 {
        let payload = call(i).expect_err("the panic reaches catch_unwind");
        assert_eq!(payload.downcast_ref::<i64>(), Some(&i));
        assert_eq!(call(-i).unwrap(), (-i - 1) * 2 + 3);
    }
    std::panic::set_hook(quiet);
    assert_eq!(DROPPED.load(SeqCst) - dropped, 2000, "drops ran while unwinding through the probed frame");
    check(inner, 2000, 1000);
    check(mid, 2000, 1000);
    check(outer, 2000, 1000);
}

#[test]
fn a_thread_exiting_inside_a_probed_function_leaves_others_working() {
    let _serial = serial();
    let (spawn_exiting, work) = (c_lib().func1("thread_exits_inside"), c_lib().func1("work"));
    let (exit_inside, caller, work_probe) = (retprobe("exit_inside"), retprobe("calls_exit_inside"), retprobe("work"));
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2i64)
            .map(|t| {
                s.spawn(move || {
                    for i in 0..20_000 {
                        assert_eq!(work(t * 100_000 + i), 3 * (t * 100_000 + i) + 1);
                    }
                })
            })
            .collect();
        for i in 1..=50 {
            assert_eq!(spawn_exiting(i), i + 7, "pthread_exit's value, past two probed frames");
        }
        workers.into_iter().for_each(|w| w.join().unwrap());
    });
    // Threads whose slots the exited threads had now start afresh.
    for i in 0..1000 {
        assert_eq!(work(i), 3 * i + 1);
    }
    check(exit_inside, 50, 0);
    check(caller, 50, 0);
    check(work_probe, 41_000, 41_000);
}

#[test]
fn a_thread_cancelled_inside_probed_functions_unwinds_through_them() {
    let _serial = serial();
    let (cancel, work) = (c_lib().func1("thread_cancelled_inside"), c_lib().func1("work"));
    let (inner, outer) = (retprobe("wait_for_cancel"), retprobe("calls_wait_for_cancel"));
    for i in 0..50 {
        assert_eq!(cancel(i), 1, "the thread ended cancelled");
        assert_eq!(work(i), 3 * i + 1);
    }
    check(inner, 50, 0);
    check(outer, 50, 0);
}

/// The addresses glibc's `backtrace()` saw inside `bt_inner`, called through two other
/// functions from here.
#[inline(never)]
fn c_backtrace() -> Vec<u64> {
    let lib = c_lib();
    assert_eq!(lib.func1("bt_outer")(black_box(4)), 13);
    (0..lib.func1("bt_frames_taken")(0)).map(|i| lib.func1("bt_frame")(i) as u64).collect()
}

#[test]
fn glibc_backtrace_inside_probed_functions_shows_the_real_callers() {
    let _serial = serial();
    let probes = ["bt_inner", "bt_middle", "bt_outer"];
    // From one call site: without probes, with breakpoint probes, with optimized probes.
    let runs: Vec<Vec<u64>> = [(&[][..], false), (&probes[..], false), (&probes[..], true)]
        .map(|(p, opt)| with_probes(p, opt, c_backtrace))
        .into();
    for probed in &runs[1..] {
        let names: Vec<String> = probed.iter().map(|&a| symbol_of(a)).collect();
        assert_eq!(&names[..3], ["bt_inner", "bt_middle", "bt_outer"], "{names:?}");
        // The C frames and c_backtrace's exactly, and as many frames in all (no trampoline
        // frame); the test harness's frames above may differ in return address, as the
        // optimizer may copy `with_probes`' call of `f` into each of its paths.
        assert_eq!(probed.len(), runs[0].len(), "as many frames as without probes (no trampoline frame): {names:?}");
        assert_eq!(probed[..4], runs[0][..4], "the same frames as without probes: {names:?}");
    }
}

/// Runs `f` once with return probes on `functions` (and on `_Unwind_Backtrace`, placed by
/// the first return probe), jump-optimized or all breakpoints.
fn with_probes<T>(functions: &[&str], optimized: bool, f: impl FnOnce() -> T) -> T {
    dynprobe_probe::set_optimization(optimized).unwrap();
    let probes: Vec<_> = functions.iter().map(|&name| retprobe(name)).collect();
    if optimized {
        dynprobe_probe::wait_for_optimizer().unwrap();
    }
    let result = f();
    probes.into_iter().for_each(|p| check(p, 1, 1));
    dynprobe_probe::set_optimization(true).unwrap();
    result
}

static RUST_TRACE: Mutex<String> = Mutex::new(String::new());

/// Captures a Rust backtrace.
#[no_mangle]
#[inline(never)]
pub extern "C" fn retprobe_test_bt_inner(x: i64) -> i64 {
    *RUST_TRACE.lock().unwrap() = format!("{:?}", std::backtrace::Backtrace::force_capture());
    black_box(x) + 1
}

/// Calls the capturing function.
#[no_mangle]
#[inline(never)]
pub extern "C" fn retprobe_test_bt_outer(x: i64) -> i64 {
    black_box(retprobe_test_bt_inner(black_box(x))) * 2
}

#[inline(never)]
fn rust_backtrace() -> String {
    assert_eq!(retprobe_test_bt_outer(black_box(1)), 4);
    std::mem::take(&mut *RUST_TRACE.lock().unwrap())
}

#[test]
fn rust_backtrace_inside_probed_functions_shows_the_real_callers() {
    let _serial = serial();
    let probes = ["retprobe_test_bt_inner", "retprobe_test_bt_outer"];
    let runs: Vec<String> = [(&[][..], false), (&probes[..], false), (&probes[..], true)]
        .map(|(p, opt)| with_probes(p, opt, rust_backtrace))
        .into();
    for probed in &runs[1..] {
        assert!(probed.contains("retprobe_test_bt_outer"), "{probed}");
        assert!(probed.contains("rust_backtrace_inside_probed_functions_shows_the_real_callers"), "{probed}");
        assert_eq!(probed, &runs[0], "the same frames as without probes");
    }
}

#[inline(never)]
fn call_work_from_here() -> i64 {
    c_lib().func1("work")(black_box(2))
}

#[test]
fn a_backtrace_taken_in_a_return_handler_continues_to_the_real_caller() {
    let _serial = serial();
    let work = c_lib().func1("work");
    assert_eq!(work(0), 1);
    let probe = ReturnProbe::at(sym!("work"))
        .on_return(|_, _| {
            // The return path runs in the thread's normal context: a capture may allocate here.
            *RUST_TRACE.lock().unwrap() = format!("{:?}", std::backtrace::Backtrace::force_capture());
        })
        .register()
        .unwrap();
    assert_eq!(call_work_from_here(), 7);
    check(probe, 1, 1);
    let trace = std::mem::take(&mut *RUST_TRACE.lock().unwrap());
    assert!(trace.contains("call_work_from_here"), "the unwinder went from the trampoline to the caller:\n{trace}");
    assert!(trace.contains("a_backtrace_taken_in_a_return_handler_continues_to_the_real_caller"), "{trace}");
}
