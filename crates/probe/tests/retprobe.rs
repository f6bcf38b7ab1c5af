//! Return probes on real C code: entry and return values, the data area, recursion, several
//! probes on one function, `maxactive`, threads, and calls that return through the
//! trampoline after their probe is gone.

mod common;

use common::{serial, Target as Lib};
use dynprobe_probe::{monotonic_ns, sym, ProbeError, ReturnProbe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};

fn lib() -> &'static Lib {
    static LIB: OnceLock<Lib> = OnceLock::new();
    LIB.get_or_init(|| Lib::build("ret_basic.c", &[]))
}

/// Takes the test lock and loads the target first, so that its symbols are found (and not
/// this program's own `fib`).
fn setup() -> std::sync::MutexGuard<'static, ()> {
    let serial = serial();
    lib();
    serial
}

fn fib(n: i64) -> i64 {
    if n < 2 {
        n
    } else {
        fib(n - 1) + fib(n - 2)
    }
}

/// How many calls `fib(n)` makes, itself included.
/// A return probe on `fib` whose entry keeps the argument and whose return handler counts
/// the returns whose value is not fib(argument): (the probe, that count).
fn fib_checker() -> (dynprobe_probe::ReturnProbeHandle, Arc<AtomicU64>) {
    let wrong = Arc::new(AtomicU64::new(0));
    let w = wrong.clone();
    let probe = ReturnProbe::at(sym!("fib"))
        .maxactive(64)
        // The first argument's register read directly: `Regs::arg`'s index check may panic,
        // which would make the handler heavy, and the light path is the one to test.
        .on_entry(|regs, data| {
            data[0] = regs.rdi;
            true
        })
        .on_return(move |regs, data| {
            if regs.retval() as i64 != fib(data[0] as i64) {
                w.fetch_add(1, SeqCst);
            }
        })
        .register()
        .unwrap();
    (probe, wrong)
}

fn fib_calls(n: i64) -> u64 {
    if n < 2 {
        1
    } else {
        1 + fib_calls(n - 1) + fib_calls(n - 2)
    }
}

#[test]
fn entry_and_return_see_arguments_values_and_the_data_area() {
    let _serial = setup();
    let work = lib().func1("work");
    let work_addr = lib().addr("work");
    let seen = Arc::new([const { AtomicU64::new(0) }; 6]);
    let s = seen.clone();
    let s2 = seen.clone();
    let probe = ReturnProbe::at(sym!("work"))
        .on_entry(move |regs, data| {
            data[0] = regs.arg(0);
            data[1] = monotonic_ns();
            data[7] = regs.ip;
            s[0].fetch_add(1, SeqCst);
            true
        })
        .on_return(move |regs, data| {
            let ok = regs.retval() == data[0] * 3 + 1 && data[7] == work_addr;
            s2[1].fetch_add(ok as u64, SeqCst);
            s2[2].fetch_max(monotonic_ns() - data[1], SeqCst);
            s2[3].store(regs.ip, SeqCst);
            s2[4].store(regs.rsp, SeqCst);
        })
        .register()
        .expect("return probe on work");
    assert_eq!(probe.address(), work_addr);
    for i in 0..1000 {
        assert_eq!(work(i), i * 3 + 1);
    }
    assert_eq!(seen[0].load(SeqCst), 1000, "entry handler runs");
    assert_eq!(seen[1].load(SeqCst), 1000, "return handler sees the argument and the return value");
    assert!(seen[2].load(SeqCst) > 0, "entry timestamps reach the return handler");
    let ret_ip = seen[3].load(SeqCst);
    assert_eq!(
        common::symbol_of(ret_ip),
        common::symbol_of(entry_and_return_see_arguments_values_and_the_data_area as *const () as u64),
        "the return handler's ip is the real return address, in this test"
    );
    assert_ne!(seen[4].load(SeqCst), 0);
    let listed = dynprobe_probe::list().into_iter().find(|p| p.addr == work_addr).expect("the entry is listed");
    assert!(listed.return_probe);
    assert!(listed.to_string().contains("  r  work+0x0"), "{listed}");
    let stats = probe.unregister().unwrap();
    assert_eq!((stats.hits, stats.returns, stats.nmissed), (1000, 1000, 0));
    assert!(dynprobe_probe::list().iter().all(|p| p.addr != work_addr));
    assert_eq!(work(5), 16);
}

#[test]
fn multi_register_and_floating_point_return_values_survive() {
    let _serial = setup();
    let rdx_seen = Arc::new(AtomicU64::new(0));
    let r = rdx_seen.clone();
    let probes = [
        ReturnProbe::at(sym!("make_pair"))
            .on_return(move |regs, _| {
                r.store(regs.rdx, SeqCst);
            })
            .register()
            .unwrap(),
        ReturnProbe::at(sym!("halve")).on_return(|_, _| ()).register().unwrap(),
        ReturnProbe::at(sym!("third")).on_return(|_, _| ()).register().unwrap(),
    ];
    for x in 1..200 {
        assert_eq!(lib().func1("pair_sum")(x), (x + 1) * 1000 + 2 * x, "rax:rdx");
        assert_eq!(rdx_seen.load(SeqCst), 2 * x as u64, "the handler sees rdx");
        assert_eq!(lib().func1("halve_times_100")(x), x * 50, "xmm0");
        assert_eq!(lib().func1("third_times_300")(x), x * 100, "st0");
    }
    for p in probes {
        let stats = p.unregister().unwrap();
        assert_eq!((stats.hits, stats.returns), (199, 199));
    }
}

#[test]
fn recursion_pairs_every_entry_with_its_return() {
    let _serial = setup();
    let (probe, wrong) = fib_checker();
    assert_eq!(lib().func1("fib")(15), 610);
    assert_eq!(lib().func1("fib")(20), 6765);
    let stats = probe.unregister().unwrap();
    let calls = fib_calls(15) + fib_calls(20);
    assert_eq!((stats.hits, stats.returns, stats.nmissed), (calls, calls, 0));
    assert_eq!(wrong.load(SeqCst), 0, "each return handler saw its own call's value");
}

#[test]
fn two_return_probes_on_one_function_both_run_last_registered_first() {
    let _serial = setup();
    let order = Arc::new(AtomicU64::new(0));
    let (o1, o2) = (order.clone(), order.clone());
    let first = ReturnProbe::at(sym!("fib"))
        .on_entry(|regs, data| {
            data[0] = regs.arg(0);
            true
        })
        .on_return(move |regs, data| {
            assert_eq!(regs.retval() as i64, fib(data[0] as i64));
            // runs second: the other probe already shifted in a 2
            o1.store(o1.load(SeqCst) * 10 + 1, SeqCst);
        })
        .register()
        .unwrap();
    let second = ReturnProbe::at(sym!("fib"))
        .on_entry(|regs, data| {
            data[3] = regs.arg(0) + 100;
            true
        })
        .on_return(move |regs, data| {
            assert_eq!(regs.retval() as i64, fib(data[3] as i64 - 100));
            o2.store(o2.load(SeqCst) * 10 + 2, SeqCst);
        })
        .register()
        .unwrap();
    assert_eq!(lib().func1("fib")(1), 1);
    assert_eq!(order.load(SeqCst), 21, "the later probe's return handler runs first, as in the kernel");
    assert_eq!(lib().func1("fib")(12), 144);
    let (a, b) = (second.unregister().unwrap(), first.unregister().unwrap());
    let calls = 1 + fib_calls(12);
    assert_eq!((a.hits, a.returns, b.hits, b.returns), (calls, calls, calls, calls));
}

#[test]
fn maxactive_one_tracks_the_outermost_call_and_counts_the_rest_missed() {
    let _serial = setup();
    let probe = ReturnProbe::at(sym!("fib")).maxactive(1).on_return(|_, _| ()).register().unwrap();
    assert_eq!(lib().func1("fib")(10), 55);
    assert_eq!(lib().func1("fib")(10), 55);
    let stats = probe.unregister().unwrap();
    assert_eq!((stats.hits, stats.returns, stats.nmissed), (2, 2, 2 * (fib_calls(10) - 1)));
}

/// `maxactive` counts the probe's own calls in flight on the thread, not every instance on
/// its stack: with another return probe on the same function, the calls at depth 3 find
/// four instances on the stack (more than the `maxactive` of 3) but only two of this
/// probe's, and are tracked; the calls at depth 4 and below are missed.
#[test]
fn maxactive_counts_the_probes_own_calls_among_other_probes_instances() {
    let _serial = setup();
    let limited = ReturnProbe::at(sym!("fib")).maxactive(3).on_return(|_, _| ()).register().unwrap();
    let every = ReturnProbe::at(sym!("fib")).on_return(|_, _| ()).register().unwrap();
    assert_eq!(lib().func1("fib")(10), 55);
    let (every, limited) = (every.unregister().unwrap(), limited.unregister().unwrap());
    let calls = fib_calls(10);
    assert_eq!((every.hits, every.returns, every.nmissed), (calls, calls, 0));
    // fib(10) calls fib(9) and fib(8), which call two each: 1 + 2 + 4 calls at depths 1–3.
    assert_eq!((limited.hits, limited.returns, limited.nmissed), (7, 7, calls - 7));
}

#[test]
fn entry_handler_returning_false_leaves_the_call_untracked() {
    let _serial = setup();
    let probe = ReturnProbe::at(sym!("work"))
        .on_entry(|regs, _| regs.arg(0) % 2 == 0)
        .on_return(|regs, _| assert_eq!(regs.retval() % 2, 1))
        .register()
        .unwrap();
    for i in 0..100 {
        assert_eq!(lib().func1("work")(i), 3 * i + 1);
    }
    let stats = probe.unregister().unwrap();
    assert_eq!((stats.hits, stats.returns, stats.nmissed), (50, 50, 0));
}

/// The data area an entry handler gets is zeroed, whatever the previous call through the
/// same instance (same thread, same depth) left in it — another probe's words, or some of
/// this probe's own — and the return handler sees what the entry handler wrote.
#[test]
fn every_call_s_data_area_starts_zeroed_whatever_the_last_call_left_in_it() {
    let _serial = setup();
    let dirty = Arc::new(AtomicU64::new(0));
    let (d1, d2) = (dirty.clone(), dirty.clone());
    let filler = ReturnProbe::at(sym!("work"))
        .on_entry(|regs, data| {
            data.iter_mut().enumerate().for_each(|(i, w)| *w = regs.arg(0) + i as u64 + 1);
            true
        })
        .on_return(|_, _| {})
        .register()
        .unwrap();
    let checker = ReturnProbe::at(sym!("make_pair"))
        .on_entry(move |regs, data| {
            if data.iter().any(|&w| w != 0) {
                d1.fetch_add(1, SeqCst);
            }
            // One word of its own, in a place that changes, for its next call to find.
            data[regs.arg(0) as usize % 8] = u64::MAX;
            true
        })
        .on_return(move |_, data| {
            if data.iter().filter(|&&w| w == u64::MAX).count() != 1 || data.iter().any(|&w| w != 0 && w != u64::MAX) {
                d2.fetch_add(1, SeqCst);
            }
        })
        .register()
        .unwrap();
    for i in 0..100 {
        // Both at depth 0 of this thread's instance stack: one instance, in turn.
        assert_eq!(lib().func1("work")(i), 3 * i + 1);
        assert_eq!(lib().func1("pair_sum")(i), (i + 1) * 1000 + 2 * i);
        assert_eq!(lib().func1("pair_sum")(i + 1), (i + 2) * 1000 + 2 * (i + 1));
    }
    assert_eq!(
        dirty.load(SeqCst),
        0,
        "an entry handler found words the last call left, or a return handler \
        not the entry handler's"
    );
    assert_eq!(checker.unregister().unwrap().hits, 200);
    assert_eq!(filler.unregister().unwrap().hits, 100);
}

#[test]
fn a_return_handler_can_change_the_return_value() {
    let _serial = setup();
    let probe = ReturnProbe::at(sym!("work")).on_return(|regs, _| regs.rax += 1000).register().unwrap();
    assert_eq!(lib().func1("work")(1), 1004);
    drop(probe);
    assert_eq!(lib().func1("work")(1), 4, "dropping the handle unregisters");
}

#[test]
fn threads_calling_concurrently_are_counted_exactly() {
    let _serial = setup();
    const THREADS: u64 = 4;
    const CALLS: i64 = 20_000;
    let wrong = Arc::new(AtomicU64::new(0));
    let w = wrong.clone();
    let probe = ReturnProbe::at(sym!("work"))
        .on_entry(|regs, data| {
            data[0] = regs.arg(0);
            true
        })
        .on_return(move |regs, data| {
            if regs.retval() != data[0] * 3 + 1 {
                w.fetch_add(1, SeqCst);
            }
        })
        .register()
        .unwrap();
    let work = lib().func1("work");
    std::thread::scope(|s| {
        for t in 0..THREADS as i64 {
            s.spawn(move || {
                for i in 0..CALLS {
                    let x = t * 1_000_000 + i;
                    assert_eq!(work(x), 3 * x + 1);
                }
            });
        }
    });
    let stats = probe.unregister().unwrap();
    let all = THREADS * CALLS as u64;
    assert_eq!((stats.hits, stats.returns, stats.nmissed), (all, all, 0));
    assert_eq!(wrong.load(SeqCst), 0);
}

#[test]
fn calls_in_flight_at_unregister_still_return_to_their_callers() {
    let _serial = setup();
    let ran_after = Arc::new(AtomicBool::new(false));
    let unregistered = Arc::new(AtomicBool::new(false));
    let (r, u) = (ran_after.clone(), unregistered.clone());
    let probe = ReturnProbe::at(sym!("fib"))
        .on_return(move |_, _| {
            if u.load(SeqCst) {
                r.store(true, SeqCst);
            }
        })
        .register()
        .unwrap();
    // A worker keeps calling the probed function while the main thread unregisters.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        let fib = lib().func1("fib");
        let mut total = 0;
        rx.recv().unwrap();
        for _ in 0..200 {
            total += fib(18);
        }
        total
    });
    tx.send(()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let stats = probe.unregister().unwrap();
    unregistered.store(true, SeqCst);
    assert_eq!(worker.join().unwrap(), 200 * 2584, "every call returned to its caller");
    assert!(!ran_after.load(SeqCst), "no return handler runs after unregister returned");
    assert!(stats.hits >= stats.returns);
}

#[test]
fn functions_that_return_twice_are_refused() {
    let _serial = setup();
    for function in ["libc:_setjmp", "libc:__sigsetjmp", "libc:vfork", "libc:getcontext"] {
        match ReturnProbe::at(function).register() {
            Err(e @ ProbeError::ReturnsTwice { .. }) => assert!(e.to_string().contains("more than once"), "{e}"),
            other => panic!("{function}: expected a refusal, got {other:?}"),
        }
    }
    assert!(dynprobe_probe::list().iter().all(|p| !p.return_probe), "a refused probe leaves nothing registered");
}

#[test]
fn only_function_entries_take_return_probes() {
    let _serial = setup();
    match ReturnProbe::at("work+0x4").register() {
        Err(ProbeError::ReturnProbeNotAtEntry { symbol, offset: 4 }) => assert_eq!(symbol, "work"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // By address too: inside `work`, the return address is not at `rsp` any more.
    match ReturnProbe::at(lib().addr("work") + 4).register() {
        Err(ProbeError::ReturnProbeNotAtEntry { symbol, offset: 4 }) => assert_eq!(symbol, "work"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(dynprobe_probe::list().iter().all(|p| !p.return_probe), "a refused probe leaves nothing registered");
}

fn program() -> &'static Lib {
    static LIB: OnceLock<Lib> = OnceLock::new();
    LIB.get_or_init(|| Lib::build("ret_program.c", &[]))
}

/// Runs the program with `seed` and returns its output.
fn program_output(seed: i64) -> String {
    let len = program().func1("run_program")(seed) as usize;
    let ptr = program().func1("program_output")(0) as *const u8;
    // SAFETY: `run_program` wrote `len` bytes at the address `program_output` returns.
    String::from_utf8(unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec()).unwrap()
}

#[test]
fn a_programs_output_is_the_same_with_and_without_return_probes_on_its_hot_functions() {
    let _serial = setup();
    let bare: Vec<String> = (1..=5).map(program_output).collect();
    let total_ns = Arc::new(AtomicU64::new(0));
    let t = total_ns.clone();
    let probes = [
        ReturnProbe::at(sym!("compare_words"))
            .on_entry(|regs, data| {
                data[0] = monotonic_ns();
                data[1] = regs.arg(0);
                true
            })
            .on_return(move |_, data| {
                t.fetch_add(monotonic_ns() - data[0], SeqCst);
            })
            .register()
            .unwrap(),
        ReturnProbe::at(sym!("hash_word")).on_return(|_, _| ()).register().unwrap(),
        ReturnProbe::at(sym!("next_random")).on_return(|_, _| ()).register().unwrap(),
        ReturnProbe::at(sym!("mean_length")).on_return(|_, _| ()).register().unwrap(),
    ];
    let probed: Vec<String> = (1..=5).map(program_output).collect();
    assert_eq!(probed, bare, "identical output");
    assert!(total_ns.load(SeqCst) > 0);
    for p in probes {
        let stats = p.unregister().unwrap();
        assert!(stats.hits > 0);
        assert_eq!((stats.returns, stats.nmissed), (stats.hits, 0));
    }
}

#[test]
fn return_probes_on_jump_optimized_entries_while_optimization_is_switched() {
    let _serial = setup();
    let fib_fn = lib().func1("fib");
    let (probe, wrong) = fib_checker();
    dynprobe_probe::wait_for_optimizer().unwrap();
    assert!(probe.info().optimized, "the entry probe is jump-optimized: {}", probe.info());
    // Light: the light detour's dispatcher runs the entry itself (the site's solo probe is
    // a return probe's entry), the path the counts below pin while threads share it.
    assert!(probe.info().light && probe.returns_light(), "the handlers are light: {}", probe.info());
    assert_eq!(fib_fn(16), 987);
    let stop = AtomicBool::new(false);
    let calls = std::thread::scope(|s| {
        let workers: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let mut calls = 0;
                    while !stop.load(SeqCst) {
                        assert_eq!(fib_fn(12), 144);
                        calls += 1;
                    }
                    calls
                })
            })
            .collect();
        for round in 0..20 {
            dynprobe_probe::set_optimization(round % 2 == 1).unwrap();
            if round % 2 == 1 {
                dynprobe_probe::wait_for_optimizer().unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        stop.store(true, SeqCst);
        workers.into_iter().map(|w| w.join().unwrap()).sum::<u64>()
    });
    dynprobe_probe::set_optimization(true).unwrap();
    let stats = probe.unregister().unwrap();
    let expected = fib_calls(16) + calls * fib_calls(12);
    assert_eq!((stats.hits, stats.returns, stats.nmissed), (expected, expected, 0));
    assert_eq!(wrong.load(SeqCst), 0);
}

#[test]
fn a_call_in_flight_when_its_probe_is_unregistered_returns_without_its_handler() {
    let _serial = setup();
    let block = lib().func1("block_until");
    let ran = Arc::new(AtomicU64::new(0));
    let r = ran.clone();
    let probe = ReturnProbe::at(sym!("block_until"))
        .on_return(move |_, _| {
            r.fetch_add(1, SeqCst);
        })
        .register()
        .unwrap();
    let flag = Box::leak(Box::new(AtomicU64::new(0)));
    let flag_addr = flag as *const AtomicU64 as i64;
    let worker = std::thread::spawn(move || block(flag_addr));
    while probe.hits() == 0 {
        std::thread::yield_now();
    }
    let stats = probe.unregister().unwrap();
    // One call, though its loop went through the entry probe many times.
    assert_eq!((stats.hits, stats.returns, stats.nmissed), (1, 0, 0));
    flag.store(1, SeqCst);
    assert_eq!(worker.join().unwrap(), 7, "the call returned to its caller with its value");
    assert_eq!(ran.load(SeqCst), 0, "the handler of an unregistered probe does not run");
    // The trampoline entry it used is taken again by later calls.
    let again =
        ReturnProbe::at(sym!("block_until")).on_return(|regs, _| assert_eq!(regs.retval(), 7)).register().unwrap();
    assert_eq!(block(flag_addr), 7);
    let stats = again.unregister().unwrap();
    assert_eq!((stats.hits, stats.returns), (1, 1));
}

static IN_HANDLER_RESULTS: AtomicU64 = AtomicU64::new(0);

extern "C" fn calls_probed_functions(_: libc::c_int) {
    let (work, fib) = (lib().func1("work"), lib().func1("fib"));
    let ok = (0..10).all(|i| work(i) == 3 * i + 1) && fib(10) == 55;
    IN_HANDLER_RESULTS.fetch_add(ok as u64, SeqCst);
}

/// Maps a 1 MiB stack above the current stack pointer (the harder case for a signal stack:
/// the interrupted thread's instances lie below the handler's `rsp`).
fn stack_above_rsp() -> *mut libc::c_void {
    const SIZE: usize = 1 << 20;
    let local = 0u8;
    let rsp = std::hint::black_box(&local) as *const u8 as usize;
    for gap in [1usize << 30, 1 << 28, 1 << 26, 1 << 24] {
        let hint = (rsp + gap) & !0xfff;
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
        let p = unsafe {
            libc::mmap(
                hint as *mut libc::c_void,
                SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return p;
        }
    }
    panic!("no free address range above the stack for a second stack");
}

#[test]
fn signal_handlers_on_an_alternate_stack_call_probed_functions_mid_call() {
    let _serial = setup();
    let raise_inside = lib().func1("raise_inside");
    let stack = stack_above_rsp();
    let local = 0u8;
    assert!(stack as usize > std::hint::black_box(&local) as *const u8 as usize);
    let probes = [
        ReturnProbe::at(sym!("raise_inside")).on_return(|regs, _| assert_eq!(regs.retval(), 1000 + 10)),
        ReturnProbe::at(sym!("work")).on_return(|_, _| ()),
        ReturnProbe::at(sym!("fib")).on_return(|_, _| ()),
    ]
    .map(|p| p.register().unwrap());
    // SAFETY: the handler only calls the target's pure functions and an atomic; the stack is
    // a fresh 1 MiB mapping that stays mapped (it is leaked).
    unsafe {
        let ss = libc::stack_t { ss_sp: stack, ss_flags: 0, ss_size: 1 << 20 };
        assert_eq!(libc::sigaltstack(&ss, std::ptr::null_mut()), 0);
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = calls_probed_functions as *const () as usize;
        action.sa_flags = libc::SA_ONSTACK;
        assert_eq!(libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()), 0);
    }
    for _ in 0..100 {
        assert_eq!(raise_inside(libc::SIGUSR2 as i64), libc::SIGUSR2 as i64 + 1000);
    }
    // SAFETY: restores the default disposition and turns the alternate stack off.
    unsafe {
        libc::signal(libc::SIGUSR2, libc::SIG_DFL);
        let off = libc::stack_t { ss_sp: std::ptr::null_mut(), ss_flags: libc::SS_DISABLE, ss_size: 0 };
        libc::sigaltstack(&off, std::ptr::null_mut());
    }
    assert_eq!(IN_HANDLER_RESULTS.load(SeqCst), 100);
    let [raiser, work, fib_probe] = probes.map(|p| p.unregister().unwrap());
    assert_eq!((raiser.hits, raiser.returns, raiser.nmissed), (100, 100, 0));
    assert_eq!((work.hits, work.returns, work.nmissed), (1000, 1000, 0));
    assert_eq!((fib_probe.hits, fib_probe.returns, fib_probe.nmissed), (100 * fib_calls(10), 100 * fib_calls(10), 0));
}

#[test]
fn the_child_of_a_fork_inside_a_probed_function_returns_through_it() {
    let _serial = setup();
    let driver = lib().func1("fork_driver");
    let probes =
        ["fork_and_return", "work", "fib"].map(|s| ReturnProbe::at(sym!(s)).on_return(|_, _| ()).register().unwrap());
    for x in 0..5 {
        assert_eq!(driver(x), 42, "the child returned from the probed fork with its instance stack");
    }
    let [fork_probe, ..] = probes.map(|p| p.unregister().unwrap());
    assert_eq!((fork_probe.hits, fork_probe.returns, fork_probe.nmissed), (5, 5, 0), "the parent's side");
}

/// A forked child's first return through the trampoline runs on the slot of the parent's
/// thread, which the child's thread has not used yet: its return handler still runs with the
/// thread's guard held, so that a probe hit inside the handler is missed, in the child as in
/// the parent (the child's counts reach the test through a shared page).
#[test]
fn a_forked_child_s_first_return_runs_its_handler_inside_the_guard() {
    let _serial = setup();
    let driver = lib().func1("fork_driver");
    let work = lib().func1("work");
    // SAFETY: a fresh shared anonymous page, unmapped at the end.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(page, libc::MAP_FAILED);
    // SAFETY: the page is mapped, zeroed and aligned, until the munmap below.
    let nested: &'static AtomicU64 = unsafe { &*(page as *const AtomicU64) };
    let inner = dynprobe_probe::Probe::at(sym!("work"))
        .on_hit(move |regs| {
            if regs.arg(0) == 777 {
                nested.fetch_add(1, SeqCst);
            }
        })
        .register()
        .unwrap();
    let outer = ReturnProbe::at(sym!("fork_and_return"))
        .on_return(move |_, _| {
            work(777);
        })
        .register()
        .unwrap();
    for x in 0..5 {
        assert_eq!(driver(x), 42, "the child returned from the probed fork and exited as it should");
    }
    let stats = outer.unregister().unwrap();
    inner.unregister().unwrap();
    assert_eq!((stats.hits, stats.returns), (5, 5), "the parent's side");
    assert_eq!(nested.load(SeqCst), 0, "a probe's handler ran inside a return handler, in a forked child");
    // SAFETY: the page mapped above; nothing refers to it any more.
    unsafe { libc::munmap(page, 4096) };
}

#[test]
fn a_coroutine_suspended_inside_a_probed_function_returns_after_its_starter() {
    let _serial = setup();
    let demo = lib().func1("coroutine_demo");
    let stack = stack_above_rsp() as i64;
    let probes = [
        ReturnProbe::at(sym!("co_outer")).on_return(|regs, _| assert_eq!(regs.retval(), 2)),
        ReturnProbe::at(sym!("co_inner")).on_return(|regs, _| assert_eq!(regs.retval(), 42)),
        ReturnProbe::at(sym!("work")).on_return(|regs, _| assert_eq!(regs.retval(), 16)),
    ]
    .map(|p| p.register().unwrap());
    for _ in 0..100 {
        assert_eq!(demo(stack), 2 * 10000 + 16 * 100 + 42);
    }
    for p in probes {
        let stats = p.unregister().unwrap();
        assert_eq!((stats.hits, stats.returns, stats.nmissed), (100, 100, 0));
    }
}
