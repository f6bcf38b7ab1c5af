//! Jump-optimized probes on real code: the probe point becomes a `jmp` to a detour buffer.

mod common;

use common::{code, Target};
use dynprobe_arch::native::decode_function;
use dynprobe_probe::{sym, Location, Probe, ProbeError, ProbeHandle};
use dynprobe_symbols::SymbolTable;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const JMP: u8 = 0xe9;
const INT3: u8 = 0xcc;

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| Target::build("optimize", &[]))
}

/// The targets that need GCC's -O2 code generation.
fn target_o2() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| Target::build("optimize_o2", &["-O2"]))
}

/// Probes patch process-wide code and the switch is process-wide: the tests take turns,
/// each starting with optimization on.
fn serial() -> MutexGuard<'static, ()> {
    let guard = common::serial();
    dynprobe_probe::set_optimization(true).unwrap();
    guard
}

/// Registers `probe` and waits until the optimizer is done with it.
fn optimized(probe: Probe) -> ProbeHandle {
    let handle = probe.register().expect("register");
    dynprobe_probe::wait_for_optimizer().expect("optimizer");
    handle
}

#[test]
fn an_entry_probe_becomes_a_jump_and_runs_its_handler() {
    let _serial = serial();
    let t = target();
    let (f, addr) = (t.func1("opt_push"), t.addr("opt_push"));
    let before = code(addr, 16);
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let probe = optimized(Probe::at(sym!("opt_push")).on_hit(move |regs| {
        assert_eq!(regs.ip, addr, "handlers see ip at the probe point");
        s.store(regs.arg(0), Ordering::SeqCst);
    }));
    let info = probe.info();
    assert!(info.optimized, "{info}");
    // The handler asserts: it may panic, and the unwinder uses vector registers.
    assert!(info.to_string().contains("[OPTIMIZED]    (heavy: a call of core::panicking::"), "{info}");
    assert_eq!(code(addr, 1), [JMP]);
    assert_eq!(&code(addr, 16)[5..], &before[5..], "only the 5 bytes of the jump change");
    for i in 0..1000 {
        assert_eq!(f(i), i + 1);
    }
    assert_eq!((probe.hits(), probe.nmissed()), (1000, 0));
    assert_eq!(seen.load(Ordering::SeqCst), 999);
    probe.unregister().unwrap();
    assert_eq!(code(addr, 16), before, "unregister restores every byte");
    assert_eq!(f(1), 2);
}

/// dynprobe's own threads and a thread hidden for now run through the detour unseen — no
/// handler, no count — and a program thread after them is seen: the dispatcher answers from
/// the thread's slot, asked once per thread, and must answer each thread for itself.
#[test]
fn own_and_hidden_threads_pass_an_optimized_probe_unseen() {
    let _serial = serial();
    let t = target();
    let f = t.func1("opt_push");
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let probe = optimized(Probe::at(sym!("opt_push")).on_hit(move |_regs| {
        s.fetch_add(1, Ordering::Relaxed);
    }));
    assert!(probe.info().optimized, "{}", probe.info());
    let own = dynprobe_probe::own_thread::spawn(c"dynprobe-test", move || {
        for i in 0..100 {
            assert_eq!(f(i), i + 1);
        }
    })
    .expect("spawn an own thread");
    own.join();
    assert_eq!((probe.hits(), seen.load(Ordering::Relaxed)), (0, 0), "the own thread was seen");
    let hidden = std::thread::spawn(move || {
        assert_eq!(f(1), 2);
        dynprobe_probe::own_thread::set_current_thread_hidden(true);
        for i in 0..100 {
            assert_eq!(f(i), i + 1);
        }
        dynprobe_probe::own_thread::set_current_thread_hidden(false);
        assert_eq!(f(1), 2);
    });
    hidden.join().unwrap();
    assert_eq!((probe.hits(), seen.load(Ordering::Relaxed)), (2, 2), "only the visible calls are seen");
    for i in 0..100 {
        assert_eq!(f(i), i + 1);
    }
    assert_eq!((probe.hits(), probe.nmissed(), seen.load(Ordering::Relaxed)), (102, 0, 102));
    probe.unregister().unwrap();
}

#[test]
fn handlers_rewrite_arguments_and_divert_on_an_optimized_probe() {
    let _serial = serial();
    let t = target();
    let f = t.func1("opt_push");
    let rewrite = optimized(Probe::at(sym!("opt_push")).on_hit(|regs| regs.set_arg(0, 41)));
    assert!(rewrite.info().optimized);
    assert_eq!(f(5), 42, "the argument register was restored from the changed frame");
    rewrite.unregister().unwrap();

    // Diverting to opt_jcc's body skips opt_push entirely: a new rip takes the slow way.
    let jcc = t.addr("opt_jcc");
    let divert = optimized(Probe::at(sym!("opt_push")).on_hit(move |regs| regs.ip = jcc));
    assert!(divert.info().optimized);
    assert_eq!(f(1), 101);
    assert_eq!(f(10), 210);
    assert_eq!(divert.hits(), 2);
    divert.unregister().unwrap();
    assert_eq!(f(1), 2);
}

/// A site whose one probe is light takes the light dispatcher's short way (the list's solo
/// probe). It must still count a hit made from inside another probe's handler as missed and
/// run nothing for it, see argument rewrites and diversions, and count every other hit.
#[test]
fn a_light_solo_probe_misses_hits_from_inside_a_handler_and_rewrites_and_diverts() {
    let _serial = serial();
    let t = target();
    let (push, jcc) = (t.func1("opt_push"), t.func1("opt_jcc"));
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let inner = optimized(Probe::at(sym!("opt_push")).on_hit(|regs| {
        SEEN.fetch_add(1, Ordering::Relaxed);
        if regs.rdi == 1000 {
            regs.rdi = 41;
        }
    }));
    assert!(inner.info().optimized && inner.info().light, "{}", inner.info());
    // The outer handler calls opt_push through a pointer: heavy, and its nested hit of the
    // solo site must be a miss.
    let outer = optimized(Probe::at(sym!("opt_jcc")).on_hit(move |regs| {
        let x = regs.rdi as i64;
        assert_eq!(push(x), x + 1, "a nested hit runs no handler");
    }));
    for i in 0..100 {
        assert_eq!(jcc(i), if i > 5 { i + 200 } else { i + 100 });
    }
    assert_eq!((outer.hits(), inner.hits(), inner.nmissed()), (100, 0, 100), "every nested hit missed");
    assert_eq!(SEEN.load(Ordering::Relaxed), 0);
    assert_eq!(push(1000), 42, "the solo handler's rewrite reaches the function");
    assert_eq!((inner.hits(), SEEN.load(Ordering::Relaxed)), (1, 1));
    outer.unregister().unwrap();
    inner.unregister().unwrap();

    let to = t.addr("opt_jcc");
    let divert = optimized(Probe::at(sym!("opt_push")).on_hit(move |regs| regs.ip = to));
    assert!(divert.info().light, "{}", divert.info());
    assert_eq!((push(1), push(10)), (101, 210), "diverted into opt_jcc");
    assert_eq!(divert.hits(), 2);
    divert.unregister().unwrap();
    assert_eq!(push(1), 2);
}

#[test]
fn a_post_handler_keeps_working_when_optimized() {
    let _serial = serial();
    let t = target();
    let f = t.func1("opt_jcc");
    let jcc = t.addr("opt_jcc") + 4;
    let after = Arc::new(Mutex::new(Vec::new()));
    let a = after.clone();
    let probe = optimized(
        Probe::at(Location::SymbolOffset("opt_jcc".into(), 4))
            .on_hit(|_| {})
            .after_hit(move |regs| a.lock().unwrap().push(regs.ip)),
    );
    assert!(probe.info().optimized, "{}", probe.info());
    assert_eq!(f(1), 101);
    assert_eq!(f(9), 209);
    // Not taken: the instruction after the jg (jcc + 2); taken: the branch target.
    assert_eq!(*after.lock().unwrap(), [jcc + 2, jcc + 7]);
    probe.unregister().unwrap();
}

#[test]
fn a_probe_that_fails_a_check_stays_a_working_breakpoint_and_says_why() {
    let _serial = serial();
    let t = target();
    let cases = [("opt_jmp", 0, "follows an unconditional transfer"), ("opt_loop", 0, "jumps to")];
    for (symbol, offset, why) in cases {
        let addr = t.addr(symbol) + offset;
        let probe = optimized(Probe::at(Location::SymbolOffset(symbol.into(), offset)).on_hit(|_| {}));
        let info = probe.info();
        assert!(!info.optimized, "{info}");
        let reason = info.not_optimized.clone().unwrap_or_default();
        assert!(reason.contains(why), "{symbol}+{offset}: {reason}");
        assert!(info.to_string().contains("(not optimized: "), "{info}");
        assert_eq!(code(addr, 1), [INT3]);
        let f = t.func1(symbol);
        assert_eq!(f(3), if symbol == "opt_jmp" { 5 } else { 1002 });
        assert_eq!(probe.hits(), 1);
        probe.unregister().unwrap();
    }
    // Past the loop head, the same function is fine.
    let probe = optimized(Probe::at(Location::SymbolOffset("opt_loop".into(), 3)).on_hit(|_| {}));
    assert!(probe.info().optimized, "{}", probe.info());
    assert_eq!(t.func1("opt_loop")(3), 1002);
    assert_eq!(probe.hits(), 333);
}

#[test]
fn vector_registers_and_flags_survive_a_mid_function_probe_whose_handler_formats() {
    let _serial = serial();
    let t = target();
    // SAFETY: avx_sums(const double *x, long n, double out[8]), n a multiple of 4.
    let avx_sums: extern "C" fn(*const f64, i64, *mut f64) =
        unsafe { std::mem::transmute(t.addr("avx_sums") as usize) };
    let input: Vec<f64> = (0..4096).map(|i| (i as f64).sin() * 1e3 + 1.0 / (i as f64 + 0.5)).collect();
    let run = || {
        let mut out = [0f64; 8];
        avx_sums(input.as_ptr(), input.len() as i64, out.as_mut_ptr());
        out.map(f64::to_bits)
    };
    let expected = run();

    let start = t.addr("avx_sums");
    let insns = function_insns("avx_sums");
    let offset_of =
        |text: &str| insns.iter().find(|i| i.text.starts_with(text)).unwrap_or_else(|| panic!("no {text}")).ip - start;
    let formatted = Arc::new(AtomicU64::new(0));
    let handler = {
        let formatted = formatted.clone();
        move |regs: &mut dynprobe_probe::Regs| {
            // Formatting floats and copying with libc's vectorized memcpy: both use the
            // vector registers the loop keeps its sums in.
            let text = format!("{regs:?} {:.3} {:e}", regs.rax as f64 * 1.5, (regs.rsi as f64).sqrt());
            let copy = text.repeat(40).into_bytes().clone();
            formatted.fetch_add(u64::from(!copy.is_empty()), Ordering::Relaxed);
            regs.rflags ^= 0; // the flags are part of the frame, and restored from it
        }
    };
    let vadd =
        optimized(Probe::at(Location::SymbolOffset("avx_sums".into(), offset_of("vaddpd"))).on_hit(handler.clone()));
    let jb = optimized(Probe::at(Location::SymbolOffset("avx_sums".into(), offset_of("jb"))).on_hit(handler));
    assert!(vadd.info().optimized, "{}", vadd.info());
    assert!(jb.info().optimized, "{}", jb.info());
    for round in 0..20 {
        assert_eq!(run(), expected, "round {round}: a probed run differs from the unprobed one");
    }
    assert_eq!(vadd.hits(), 20 * 1024);
    assert_eq!(jb.hits(), 20 * 1024);
    assert_eq!(formatted.load(Ordering::Relaxed), 2 * 20 * 1024);
}

/// Every instruction of `symbol`, decoded from its symbol's bounds.
fn function_insns(symbol: &str) -> Vec<dynprobe_arch::native::Insn> {
    let table = SymbolTable::current_process().unwrap();
    let sym = table.lookup(symbol).unwrap();
    decode_function(&code(sym.addr, sym.size as usize), sym.addr).unwrap()
}

#[test]
fn a_probe_on_each_instruction_in_turn_leaves_results_unchanged() {
    let _serial = serial();
    let t = target();
    let mix = t.func1("mix");
    let inputs: Vec<i64> = (-20..140).chain([1000, 12345, -999]).collect();
    let expected: Vec<i64> = inputs.iter().map(|&x| mix(x)).collect();
    let insns = function_insns("mix");
    let start = insns[0].ip;
    let mut optimized_count = 0;
    for insn in &insns {
        let offset = insn.ip - start;
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let probe = Probe::at(Location::SymbolOffset("mix".into(), offset)).on_hit(move |_| {
            h.fetch_add(1, Ordering::Relaxed);
        });
        let probe = match probe.register() {
            Ok(p) => p,
            // The instruction cannot run out of line at all (none in this function should).
            Err(e) => panic!("mix+{offset:#x} `{}`: {e}", insn.text),
        };
        dynprobe_probe::wait_for_optimizer().unwrap();
        optimized_count += probe.info().optimized as usize;
        let got: Vec<i64> = inputs.iter().map(|&x| mix(x)).collect();
        assert_eq!(got, expected, "mix+{offset:#x} `{}` ({})", insn.text, probe.info());
        assert_eq!(probe.hits(), hits.load(Ordering::Relaxed));
        probe.unregister().unwrap();
    }
    assert!(optimized_count * 2 >= insns.len(), "only {optimized_count} of {} instructions optimized", insns.len());
}

/// Calls `work(x)` for ever-new `x` on three threads until the returned flag is set; joined,
/// they give back how many calls they made.
fn hammer(work: impl Fn(i64) + Send + Sync + 'static) -> (Arc<AtomicBool>, Vec<std::thread::JoinHandle<u64>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let work = Arc::new(work);
    let workers = (0..3)
        .map(|k| {
            let (stop, work) = (stop.clone(), work.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    work((n as i64) * 3 + k);
                    n += 1;
                }
                n
            })
        })
        .collect();
    (stop, workers)
}

/// Stops the threads of [`hammer`]; how many calls they made.
fn stop_hammering((stop, workers): (Arc<AtomicBool>, Vec<std::thread::JoinHandle<u64>>)) -> u64 {
    stop.store(true, Ordering::Relaxed);
    workers.into_iter().map(|w| w.join().unwrap()).sum()
}

#[test]
fn threads_keep_calling_while_optimization_is_switched_on_and_off() {
    let _serial = serial();
    let t = target();
    let hot = t.func1("opt_hot");
    let probe = optimized(Probe::at(sym!("opt_hot")).on_hit(|regs| regs.rax ^= 0));
    assert!(probe.info().optimized);
    let hammering = hammer(move |x| assert_eq!(hot(x), x * 2 + 1));
    // A fixed number of switches, not a time: on a loaded machine each takes longer.
    for _ in 0..20 {
        dynprobe_probe::set_optimization(false).unwrap();
        assert!(!probe.info().optimized);
        assert_eq!(code(t.addr("opt_hot"), 1), [INT3]);
        dynprobe_probe::set_optimization(true).unwrap();
        dynprobe_probe::wait_for_optimizer().unwrap();
        assert!(probe.info().optimized);
    }
    let calls = stop_hammering(hammering);
    let stats = probe.unregister().unwrap();
    assert_eq!(stats.hits + stats.nmissed, calls);
    assert_eq!(stats.nmissed, 0);
}

/// While threads call through a light site, its list keeps changing between one probe (the
/// dispatcher's solo way) and two (the general way), and the first probe is disabled and
/// enabled: every call is still correct, and each probe counts exactly the hits its
/// handler ran.
#[test]
fn threads_keep_calling_while_a_light_sites_list_changes_between_one_probe_and_two() {
    let _serial = serial();
    let t = target();
    let hot = t.func1("opt_hot");
    static FIRST: AtomicU64 = AtomicU64::new(0);
    static SECOND: AtomicU64 = AtomicU64::new(0);
    let first = optimized(Probe::at(sym!("opt_hot")).on_hit(|_| {
        FIRST.fetch_add(1, Ordering::Relaxed);
    }));
    assert!(first.info().optimized && first.info().light, "{}", first.info());
    let hammering = hammer(move |x| assert_eq!(hot(x), x * 2 + 1));
    let mut second_hits = 0;
    // Forty rounds at least; on a loaded machine the callers may get no CPU in a round's
    // few milliseconds, so rounds go on until both probes saw hits, for a bounded time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut round = 0;
    while round < 40
        || ((FIRST.load(Ordering::Relaxed) == 0 || second_hits == 0) && std::time::Instant::now() < deadline)
    {
        round += 1;
        if round % 4 == 1 {
            first.disable().unwrap();
        }
        if round % 4 == 3 {
            first.enable().unwrap();
        }
        let second = Probe::at(sym!("opt_hot"))
            .on_hit(|_| {
                SECOND.fetch_add(1, Ordering::Relaxed);
            })
            .register()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        second_hits += second.unregister().unwrap().hits;
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    first.enable().unwrap();
    let calls = stop_hammering(hammering);
    let stats = first.unregister().unwrap();
    assert_eq!((stats.hits, stats.nmissed), (FIRST.load(Ordering::Relaxed), 0), "the first probe's counts");
    assert_eq!(second_hits, SECOND.load(Ordering::Relaxed), "the second probe's counts");
    assert!(stats.hits > 0 && second_hits > 0 && stats.hits <= calls, "{stats:?} of {calls} calls");
}

#[test]
fn a_probe_inside_an_optimized_jump_turns_it_back_into_a_breakpoint() {
    let _serial = serial();
    let t = target();
    let f = t.func1("opt_push");
    let outer = optimized(Probe::at(sym!("opt_push")).on_hit(|_| {}));
    assert!(outer.info().optimized);
    // opt_push+1 (mov %rsp,%rbp) lies under the outer probe's jump.
    let inner = optimized(Probe::at(Location::SymbolOffset("opt_push".into(), 1)).on_hit(|_| {}));
    assert!(!outer.info().optimized, "{}", outer.info());
    assert!(inner.info().optimized, "{}", inner.info());
    assert_eq!(f(1), 2);
    assert_eq!((outer.hits(), inner.hits()), (1, 1));
    inner.unregister().unwrap();
    dynprobe_probe::wait_for_optimizer().unwrap();
    assert!(outer.info().optimized, "{}", outer.info());
    assert_eq!(f(1), 2);
    assert_eq!(outer.hits(), 2);
}

#[test]
fn a_jump_back_from_the_functions_cold_part_is_seen() {
    let _serial = serial();
    let t = target();
    let f = t.func1("hotcold");
    assert_eq!((f(3), f(-3)), (16, 16));
    let probe = optimized(Probe::at(Location::SymbolOffset("hotcold".into(), 13)).on_hit(|_| {}));
    let info = probe.info();
    assert!(!info.optimized, "{info}");
    let reason = info.not_optimized.clone().unwrap_or_default();
    assert!(reason.contains("hotcold.cold"), "{reason}");
    assert_eq!((f(3), f(-3)), (16, 16));
    assert_eq!(probe.hits(), 1, "the cold path joins after the probe point");
    // At +4 the covered bytes end before the join: optimized, and both paths work.
    drop(probe);
    let probe = optimized(Probe::at(Location::SymbolOffset("hotcold".into(), 4)).on_hit(|_| {}));
    assert!(probe.info().optimized, "{}", probe.info());
    assert_eq!((f(3), f(-3)), (16, 16));
    assert_eq!(probe.hits(), 2);
}

#[test]
fn a_handler_changing_a_callee_saved_register_at_an_entry_takes_effect() {
    let _serial = serial();
    let t = target();
    let f = t.func1("opt_rbx_outer");
    assert_eq!(f(5), 6);
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let probe = optimized(Probe::at(sym!("opt_rbx")).on_hit(move |regs| {
        s.store(regs.rbx, Ordering::SeqCst);
        if regs.rbx == 40 {
            regs.rbx = 99;
        }
    }));
    assert!(probe.info().optimized, "{}", probe.info());
    assert_eq!(f(5), 6, "unchanged registers take the fast way out");
    assert_eq!(seen.load(Ordering::SeqCst), 5, "handlers see the callee-saved registers");
    assert_eq!(f(40), 100, "a changed rbx is loaded");
    assert_eq!(probe.hits(), 2);
}

#[test]
fn a_probe_past_the_jump_but_inside_the_covered_run_is_reached() {
    let _serial = serial();
    let t = target();
    let f = t.func1("opt_push");
    // opt_push: push %rbp (1) ; mov %rsp,%rbp (3) ; lea 1(%rdi),%rax (4): a jump at +0
    // covers 8 bytes, and lea at +4 lies past the jump's 5 bytes but inside the run.
    let outer = optimized(Probe::at(sym!("opt_push")).on_hit(|_| {}));
    assert!(outer.info().optimized);
    let inner = optimized(Probe::at(Location::SymbolOffset("opt_push".into(), 4)).on_hit(|_| {}));
    assert!(!outer.info().optimized, "{}", outer.info());
    assert_eq!(f(1), 2);
    assert_eq!((outer.hits(), inner.hits()), (1, 1));
}

/// A Rust function of this test binary, probed by its symbol.
#[no_mangle]
#[inline(never)]
pub extern "C" fn opt_rust_mix(x: u64) -> u64 {
    let mut acc = x;
    for i in 0..(x % 5) {
        acc = acc.rotate_left(7) ^ (i * 0x9e37_79b9);
    }
    std::hint::black_box(acc)
}

#[test]
fn rust_functions_are_optimized_at_every_instruction_they_allow() {
    let _serial = serial();
    let inputs: Vec<u64> = (0..64).chain([u64::MAX, 1 << 40]).collect();
    let expected: Vec<u64> = inputs.iter().map(|&x| opt_rust_mix(x)).collect();
    let insns = function_insns("opt_rust_mix");
    let start = insns[0].ip;
    let mut optimized_count = 0;
    for insn in &insns {
        let offset = insn.ip - start;
        let probe = match Probe::at(Location::SymbolOffset("opt_rust_mix".into(), offset)).on_hit(|_| {}).register() {
            Ok(p) => p,
            // The overflow check's `ud2` cannot run out of line at all.
            Err(ProbeError::NotRelocatable(_)) if insn.text.starts_with("ud2") => continue,
            Err(e) => panic!("opt_rust_mix+{offset:#x} `{}`: {e}", insn.text),
        };
        dynprobe_probe::wait_for_optimizer().unwrap();
        optimized_count += probe.info().optimized as usize;
        let got: Vec<u64> = inputs.iter().map(|&x| opt_rust_mix(std::hint::black_box(x))).collect();
        assert_eq!(got, expected, "opt_rust_mix+{offset:#x} `{}` ({})", insn.text, probe.info());
        probe.unregister().unwrap();
    }
    assert!(optimized_count > 0, "no instruction of a Rust function was optimized");
}

#[test]
fn a_caller_keeping_vector_values_across_the_call_is_safe_from_an_entry_handler() {
    let _serial = serial();
    let t = target_o2();
    // SAFETY: the signatures of the C functions.
    let work: extern "C" fn(*const f64, i32) -> f64 = unsafe { std::mem::transmute(t.addr("ipa_work") as usize) };
    // SAFETY: as above.
    let leaf: extern "C" fn() -> u64 = unsafe { std::mem::transmute(t.addr("ipa_leaf") as usize) };
    let v: Vec<f64> = (0..10).map(|i| 1.0 + i as f64 * 0.25).collect();
    let expected = work(v.as_ptr(), 50).to_bits();
    let probe = optimized(Probe::at(Location::Address(leaf())).on_hit(|_| {
        // What any handler may do: the ABI calls every vector register clobbered.
        // SAFETY: only clobbers registers, declared as such.
        unsafe {
            std::arch::asm!("xorps xmm8, xmm8", "xorps xmm9, xmm9", "xorps xmm15, xmm15",
                out("xmm8") _, out("xmm9") _, out("xmm15") _)
        };
    }));
    assert!(probe.info().optimized, "{}", probe.info());
    assert_eq!(work(v.as_ptr(), 50).to_bits(), expected, "the caller's xmm8 and up were clobbered");
    assert_eq!(probe.hits(), 50);
}

#[test]
fn handlers_run_with_the_direction_flag_clear_and_the_programs_flag_survives() {
    let _serial = serial();
    let t = target_o2();
    let f = t.func1("df_set");
    let df_seen = Arc::new(AtomicU64::new(0));
    let d = df_seen.clone();
    let probe = optimized(Probe::at(Location::SymbolOffset("df_set".into(), 1)).on_hit(move |_| {
        let flags: u64;
        // SAFETY: reads the flags through the stack, which the asm block may use.
        unsafe { std::arch::asm!("pushfq", "pop {}", out(reg) flags) };
        d.fetch_or(flags & 0x400, Ordering::SeqCst);
        // A copy runs backwards with DF set: it must still copy right.
        let copy = vec![7u8; 4096].clone();
        assert!(copy.iter().all(|&b| b == 7));
    }));
    assert!(probe.info().optimized, "{}", probe.info());
    assert_eq!(f(1), 4);
    assert_eq!(df_seen.load(Ordering::SeqCst), 0, "the handler ran with DF set");
    assert_eq!(probe.hits(), 1);
}

/// A mid-function light detour puts the arithmetic flags back without `popfq` (by `sahf`
/// and an `add` for OF): every one of CF PF AF ZF SF OF must survive it, a handler's change
/// to one in the frame must reach the program, and so must one to DF (the `popfq` way).
#[test]
fn every_arithmetic_flag_survives_a_mid_function_probe_and_a_handlers_change_reaches_the_program() {
    let _serial = serial();
    let t = target_o2();
    let f = t.func1("flags_of_double");
    const SHOWN: i64 = 0xfff; // CF .. OF, DF, IF
                              // x + x: zero (ZF PF), carries (CF), overflows (OF), negatives (SF), nibble carries (AF).
    let inputs = [0, 1, 3, 8, 0x7f, 0x4000_0000_0000_0000, i64::MIN, -0x4000_0000_0000_0000, -1, 0x5555];
    let expected: Vec<i64> = inputs.iter().map(|&x| f(x) & SHOWN).collect();
    let all: i64 = expected.iter().fold(0, |acc, flags| acc | flags);
    assert_eq!(all & 0x8d5, 0x8d5, "the inputs set every arithmetic flag: {all:#x}");
    let probe = optimized(Probe::at(Location::SymbolOffset("flags_of_double".into(), 6)).on_hit(|_| {}));
    let info = probe.info();
    assert!(info.optimized && info.light, "{info}");
    let probed: Vec<i64> = inputs.iter().map(|&x| f(x) & SHOWN).collect();
    assert_eq!(probed, expected, "flags after a probed run differ");
    probe.unregister().unwrap();

    // A handler's change to the frame's flags: CF set (the sahf way), then DF (popfq's).
    for (set, name) in [(0x1u64, "CF"), (0x400, "DF")] {
        let probe = optimized(Probe::at(Location::SymbolOffset("flags_of_double".into(), 6)).on_hit(move |regs| {
            regs.rflags |= set;
        }));
        assert!(probe.info().optimized, "{}", probe.info());
        assert_eq!(f(0) & set as i64, set as i64, "the handler's {name} did not reach the program");
        assert_eq!(f(1) & SHOWN & !(set as i64), expected[1] & !(set as i64), "{name}: the other flags changed");
        probe.unregister().unwrap();
    }
}

/// In a function that sets DF nowhere the detour does not read the flags with `pushfq` and
/// a light handler runs without `cld` (it is proven not to read DF); a handler that is not
/// light still runs with DF clear, even when a caller broke the ABI and called with DF set.
#[test]
fn a_heavy_handler_runs_with_df_clear_where_the_function_sets_it_nowhere() {
    let _serial = serial();
    let t = target_o2();
    let (f, with_df) = (t.func1("no_std_inside"), t.func1("call_with_df_set"));
    let df_seen = Arc::new(AtomicU64::new(0));
    let d = df_seen.clone();
    let probe = optimized(
        Probe::at(Location::SymbolOffset("no_std_inside".into(), 3))
            .on_hit(move |_| {
                let flags: u64;
                // SAFETY: reads the flags through the stack, which the asm block may use.
                unsafe { std::arch::asm!("pushfq", "pop {}", out(reg) flags) };
                d.fetch_or(flags & 0x400 | 1, Ordering::SeqCst);
            })
            .reads_vectors(),
    );
    let info = probe.info();
    assert!(info.optimized && !info.light, "{info}");
    assert_eq!((f(1), with_df(1)), (4, 4));
    assert_eq!(df_seen.load(Ordering::SeqCst), 1, "the handler ran (1) with DF set (0x400)");
    assert_eq!(probe.hits(), 2);
}

/// Where the code after the probe overwrites every arithmetic flag before reading one, the
/// detour does not put them back; a handler's change to another flag still reaches the
/// program (here DF, which the `lodsb` after the probed `add` steps by).
#[test]
fn at_a_point_where_the_arithmetic_flags_are_dead_a_handlers_df_still_reaches_the_program() {
    let _serial = serial();
    let t = target_o2();
    let f = t.func1("df_after_dead_flags");
    assert_eq!(f(0), 1, "lodsb steps forward with DF clear");
    let probe = optimized(Probe::at(Location::SymbolOffset("df_after_dead_flags".into(), 3)).on_hit(|_| {}));
    assert!(probe.info().optimized, "{}", probe.info());
    assert_eq!(f(0), 1, "an empty handler changes nothing");
    probe.unregister().unwrap();
    let probe = optimized(Probe::at(Location::SymbolOffset("df_after_dead_flags".into(), 3)).on_hit(|regs| {
        regs.rflags |= 0x400;
    }));
    assert!(probe.info().optimized, "{}", probe.info());
    assert_eq!(f(0), -1, "the handler's DF did not reach the program");
    assert_eq!(probe.hits(), 1);
}

#[test]
fn a_jump_from_another_function_into_the_run_keeps_it_a_breakpoint() {
    let _serial = serial();
    let t = target_o2();
    let (a, b) = (t.func1("shared_a"), t.func1("shared_b"));
    assert_eq!((a(1), b(1)), (104, 4));
    let probe = optimized(Probe::at(sym!("shared_b")).on_hit(|_| {}));
    let info = probe.info();
    assert!(!info.optimized, "{info}");
    let reason = info.not_optimized.clone().unwrap_or_default();
    assert!(reason.contains("shared_a"), "{reason}");
    assert_eq!((a(1), b(1)), (104, 4));
    assert_eq!(probe.hits(), 1);
}

#[test]
fn vector_registers_in_their_initial_state_come_back_zeroed() {
    let _serial = serial();
    let t = target();
    let mut cases = vec![("upper_zero", 3)];
    if std::arch::is_x86_feature_detected!("avx512f") {
        cases.push(("hi16_zero", 6));
    } else {
        eprintln!("no AVX-512 on this CPU: zmm16-31 not checked");
    }
    for (symbol, offset) in cases {
        let f = t.func1(symbol);
        assert_eq!(f(5), 0, "{symbol} unprobed");
        let probe = optimized(Probe::at(Location::SymbolOffset(symbol.into(), offset)).on_hit(|_| {
            // Dirty what the function keeps at zero.
            // SAFETY: only clobbers the registers named.
            unsafe {
                std::arch::asm!("vpcmpeqd ymm0, ymm0, ymm0", out("ymm0") _);
                if std::arch::is_x86_feature_detected!("avx512f") {
                    std::arch::asm!("vpternlogd zmm16, zmm16, zmm16, 0xff", out("zmm16") _);
                }
            }
        }));
        assert!(probe.info().optimized, "{}", probe.info());
        assert_eq!(f(5), 0, "{symbol}: the handler's dirt came back to the program");
        assert_eq!(probe.hits(), 1);
    }
}

/// XINUSE's AVX and ZMM_Hi256 bits (`xgetbv` with ecx=1): non-zero while the upper halves of
/// ymm/zmm0-15 may be non-zero, the "dirty" upper state in which legacy SSE code is slow on
/// Intel cores (~300 ns per dirtying on a Xeon these tests ran on). `None` on a CPU without
/// AVX, which has no upper state.
fn upper_state() -> Option<u32> {
    if !std::arch::is_x86_feature_detected!("avx") {
        return None;
    }
    // Leaf 0xd exists on every CPU with AVX (XSAVE is part of it).
    let xinuse_readable = std::arch::x86_64::__cpuid_count(0xd, 1).eax & 4 != 0;
    assert!(xinuse_readable, "this CPU has AVX but no xgetbv with ecx=1: the upper state cannot be read");
    let xinuse: u32;
    // SAFETY: xgetbv with ecx=1 is supported (checked above) and only reads XINUSE.
    unsafe { std::arch::asm!("xgetbv", in("ecx") 1, out("eax") xinuse, out("edx") _, options(nomem, nostack)) };
    Some(xinuse & 0x44)
}

/// The target, on a CPU that has an upper state to keep (AVX); `None`, said on stderr,
/// on one that has none.
fn target_with_upper_state() -> Option<&'static Target> {
    if upper_state().is_none() {
        eprintln!("no AVX on this CPU: there is no upper state to keep, nothing to check");
        return None;
    }
    Some(target())
}

#[test]
fn a_probe_leaves_a_clean_upper_state_clean() {
    let _serial = serial();
    let Some(t) = target_with_upper_state() else { return };
    // SAFETY: upper_state_after_call(long (*f)(long), long x) calls f(x).
    let after_call: extern "C" fn(u64, i64) -> i64 =
        unsafe { std::mem::transmute(t.addr("upper_state_after_call") as usize) };
    let leaf = t.addr("upper_leaf");
    let after_mid = t.func1("upper_state_after");
    assert_eq!((after_mid(1), after_call(leaf, 1)), (0, 0), "unprobed, the program keeps its state clean");

    /// A handler that dirties it, as AVX code (libc's memcpy) may.
    fn dirty(_: &mut dynprobe_probe::Regs) {
        // SAFETY: only clobbers the register named.
        unsafe { std::arch::asm!("vpcmpeqd ymm3, ymm3, ymm3", out("ymm3") _) };
    }
    let mid = optimized(Probe::at(Location::SymbolOffset("upper_state_after".into(), 3)).on_hit(dirty));
    assert!(mid.info().optimized, "{}", mid.info());
    assert_eq!(after_mid(1), 0, "a mid-function probe's detour left the upper state dirty");
    assert_eq!(mid.hits(), 1);
    mid.unregister().unwrap();

    let entry = optimized(Probe::at(Location::Address(leaf)).on_hit(dirty));
    assert!(entry.info().optimized, "{}", entry.info());
    assert_eq!(after_call(leaf, 1), 0, "an entry probe's detour left the upper state dirty");
    assert_eq!(entry.hits(), 1);
    entry.unregister().unwrap();

    let ret = dynprobe_probe::ReturnProbe::at(Location::Address(leaf))
        .on_entry(|regs, _| {
            dirty(regs);
            true
        })
        .on_return(|regs, _| dirty(regs))
        .register()
        .unwrap();
    dynprobe_probe::wait_for_optimizer().unwrap();
    assert_eq!(after_call(leaf, 1), 0, "a return probe left the upper state dirty");
    assert_eq!(ret.returns(), 1);
}

#[test]
fn handlers_start_with_a_clean_upper_state_and_the_programs_dirty_upper_halves_come_back() {
    let _serial = serial();
    let Some(t) = target_with_upper_state() else { return };
    let (upper_ones, dirty_leaf_caller) = (t.func1("upper_ones"), t.func1("dirty_leaf_caller"));
    assert_eq!((upper_ones(1), dirty_leaf_caller(1)), (-1, -1), "unprobed");
    // What each handler found; the value no read can give until one runs.
    let seen = Arc::new(AtomicU64::new(u64::MAX));
    let record = |seen: &Arc<AtomicU64>| {
        let seen = seen.clone();
        move || seen.store(u64::from(upper_state().unwrap()), Ordering::SeqCst)
    };
    let on_hit = record(&seen);
    let mid = optimized(Probe::at(Location::SymbolOffset("upper_ones".into(), 4)).on_hit(move |_| on_hit()));
    assert!(mid.info().optimized, "{}", mid.info());
    assert_eq!(upper_ones(1), -1, "the program's upper half of ymm0 was lost");
    assert_eq!(seen.swap(u64::MAX, Ordering::SeqCst), 0, "the handler ran with the program's dirty upper state");
    mid.unregister().unwrap();

    let on_return = record(&seen);
    let ret = dynprobe_probe::ReturnProbe::at(Location::Address(t.addr("dirty_leaf")))
        .on_return(move |_, _| on_return())
        .register()
        .unwrap();
    dynprobe_probe::wait_for_optimizer().unwrap();
    assert_eq!(dirty_leaf_caller(1), -1, "the upper half of ymm2 was lost at the return");
    assert_eq!(seen.load(Ordering::SeqCst), 0, "the return handler ran with the program's dirty upper state");
    assert_eq!(ret.returns(), 1);
}

#[test]
fn a_caller_keeping_values_across_the_call_is_safe_from_a_return_handler() {
    let _serial = serial();
    let t = target_o2();
    // SAFETY: the signatures of the C functions.
    let work: extern "C" fn(*const f64, i32) -> f64 = unsafe { std::mem::transmute(t.addr("ipa_work") as usize) };
    // SAFETY: as above.
    let leaf: extern "C" fn() -> u64 = unsafe { std::mem::transmute(t.addr("ipa_leaf") as usize) };
    let v: Vec<f64> = (0..10).map(|i| 0.5 + i as f64 * 0.75).collect();
    let expected = work(v.as_ptr(), 40).to_bits();
    let probe = dynprobe_probe::ReturnProbe::at(Location::Address(leaf()))
        .on_return(|_, _| {
            // Everything the ABI lets a function clobber, but the return value.
            // SAFETY: only clobbers the registers named.
            unsafe {
                std::arch::asm!(
                    "xor ecx, ecx", "xor esi, esi", "xor edi, edi", "xor r8d, r8d", "xor r9d, r9d",
                    "xor r10d, r10d", "xor r11d, r11d", "xorps xmm8, xmm8", "xorps xmm9, xmm9",
                    out("rcx") _, out("rsi") _, out("rdi") _, out("r8") _, out("r9") _, out("r10") _,
                    out("r11") _, out("xmm8") _, out("xmm9") _,
                )
            };
        })
        .register()
        .unwrap();
    dynprobe_probe::wait_for_optimizer().unwrap();
    assert_eq!(work(v.as_ptr(), 40).to_bits(), expected, "the caller's registers were clobbered at the return");
    assert_eq!(probe.returns(), 40);
}

#[test]
fn cpp_exceptions_pass_through_functions_optimized_at_every_instruction() {
    let _serial = serial();
    static CXX: OnceLock<Target> = OnceLock::new();
    let t = CXX.get_or_init(|| Target::build("ret_cxx.cpp", &[]));
    let catch_above_two = t.func1("catch_above_two");
    let destroyed = t.func1("destroyed_count");
    for symbol in ["thrower", "mid", "catch_above_two"] {
        let insns = function_insns(symbol);
        let start = insns[0].ip;
        for insn in &insns {
            let offset = insn.ip - start;
            let probe = match Probe::at(Location::SymbolOffset(symbol.into(), offset)).on_hit(|_| {}).register() {
                Ok(p) => p,
                Err(ProbeError::NotRelocatable(_)) if insn.text.starts_with("ud2") => continue,
                Err(e) => panic!("{symbol}+{offset:#x} `{}`: {e}", insn.text),
            };
            dynprobe_probe::wait_for_optimizer().unwrap();
            let before = destroyed(0);
            // Thrown in thrower, through mid, caught two frames up; then no throw.
            assert_eq!(catch_above_two(3), -3, "{symbol}+{offset:#x} `{}` ({})", insn.text, probe.info());
            assert_eq!(catch_above_two(-3), -2, "{symbol}+{offset:#x} ({})", probe.info());
            assert_eq!(destroyed(0) - before, 4, "both frames' destructors ran, twice");
            probe.unregister().unwrap();
        }
    }
}

#[test]
fn a_handler_changing_mxcsr_leaves_the_programs_alone() {
    let _serial = serial();
    let t = target();
    let f = t.func1("mxcsr_after");
    let before = f(0);
    let probe = optimized(Probe::at(Location::SymbolOffset("mxcsr_after".into(), 3)).on_hit(|_| {
        // Round toward zero and set the inexact flag, as a careless handler might.
        let mxcsr: u32 = 0x7f80 | 0x20;
        // SAFETY: loads a valid MXCSR value; the detour restores the program's.
        unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &mxcsr, options(nostack, readonly)) };
    }));
    assert!(probe.info().optimized, "{}", probe.info());
    assert_eq!(f(0), before, "the handler's MXCSR leaked into the program");
    assert_eq!(probe.hits(), 1);
}

/// Where the SIGUSR1 handler of the signal tests parks: once the `rip` it interrupted is
/// inside `(SIG_LO, SIG_HI)`, it records it and waits for the release — on a deep stack
/// frame when `SIG_DEEP`.
static SIG_LO: AtomicU64 = AtomicU64::new(0);
static SIG_HI: AtomicU64 = AtomicU64::new(0);
static SIG_PARKED: AtomicU64 = AtomicU64::new(0);
static SIG_RELEASE: AtomicBool = AtomicBool::new(false);
static SIG_DEEP: AtomicBool = AtomicBool::new(false);

extern "C" fn park_inside_the_run(_: i32, _: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel passes this SA_SIGINFO handler a valid ucontext, ours until we return.
    let gregs = unsafe { &mut (*(uc as *mut libc::ucontext_t)).uc_mcontext.gregs };
    let mut rip = gregs[libc::REG_RIP as usize] as u64;
    let lo = SIG_LO.load(Ordering::Relaxed);
    if rip == lo && SIG_PARKED.load(Ordering::Relaxed) == 0 {
        // Some hosts (an Intel Xeon) deliver the signal almost only at the call's target,
        // never at sig_fn+3. Step the interrupted code over sig_fn's first instruction,
        // `mov %rdi,%rax` (3 bytes), so that it resumes inside the run every time.
        gregs[libc::REG_RAX as usize] = gregs[libc::REG_RDI as usize];
        rip = lo + 3;
        gregs[libc::REG_RIP as usize] = rip as i64;
    }
    let inside = rip > lo && rip < SIG_HI.load(Ordering::Relaxed);
    if inside && SIG_PARKED.load(Ordering::Relaxed) == 0 {
        SIG_PARKED.store(rip, Ordering::SeqCst);
        if SIG_DEEP.load(Ordering::Relaxed) {
            wait_under_a_deep_frame();
        } else {
            wait_for_release();
        }
    }
}

fn wait_for_release() {
    while !SIG_RELEASE.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
}

/// Waits with 80 KiB of handler stack between the signal frame and the stop's.
#[inline(never)]
fn wait_under_a_deep_frame() {
    let mut buf = [0u8; 80 * 1024];
    std::hint::black_box(&mut buf);
    wait_for_release();
    std::hint::black_box(&mut buf);
}

/// Parks a worker that calls sig_fn in a loop in a SIGUSR1 handler that interrupted it
/// inside the first 7 bytes (the run a jump at sig_fn+0 covers), runs `while_parked`,
/// releases it, and checks that it survived and that every result was right. Returns what
/// `while_parked` did, kept until the worker is gone.
fn with_a_worker_interrupted_inside_sig_fn<R>(deep: bool, while_parked: impl FnOnce() -> R) -> R {
    let t = target();
    let f = t.func1("sig_fn");
    let addr = t.addr("sig_fn");
    SIG_LO.store(addr, Ordering::SeqCst);
    SIG_HI.store(addr + 7, Ordering::SeqCst);
    SIG_PARKED.store(0, Ordering::SeqCst);
    SIG_RELEASE.store(false, Ordering::SeqCst);
    SIG_DEEP.store(deep, Ordering::SeqCst);
    // SAFETY: installs an async-signal-safe handler (atomics and a spin) for SIGUSR1, which
    // nothing else in this test binary uses.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = park_inside_the_run as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let tid = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let worker = {
        let (tid, wrong) = (tid.clone(), wrong.clone());
        std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid.store(unsafe { libc::gettid() } as u64, Ordering::SeqCst);
            let mut i = 0i64;
            while !(SIG_RELEASE.load(Ordering::Relaxed) && SIG_PARKED.load(Ordering::Relaxed) != 0) || i % 1000 != 0 {
                if f(i) != i + 3 {
                    wrong.fetch_add(1, Ordering::SeqCst);
                }
                i += 1;
            }
        })
    };
    while tid.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while SIG_PARKED.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the worker was never interrupted inside sig_fn's first 7 bytes");
        // SAFETY: signals a thread of this process.
        unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid.load(Ordering::SeqCst) as i32, libc::SIGUSR1) };
        std::thread::sleep(Duration::from_micros(50));
    }
    let kept = while_parked();
    SIG_RELEASE.store(true, Ordering::SeqCst);
    worker.join().expect("the interrupted worker crashed or panicked");
    assert_eq!(wrong.load(Ordering::SeqCst), 0, "sig_fn returned wrong results");
    kept
}

#[test]
fn code_a_signal_interrupted_inside_the_run_resumes_in_the_copy() {
    let _serial = serial();
    // The second time, 80 KiB of the handler's stack lie between its signal frame and the
    // stop's.
    for deep in [false, true] {
        let probe = with_a_worker_interrupted_inside_sig_fn(deep, || {
            // The worker sits in its signal handler, which returns to sig_fn+3.
            let probe = optimized(Probe::at(sym!("sig_fn")).on_hit(|_| {}));
            assert!(probe.info().optimized, "{}", probe.info());
            assert_eq!(code(target().addr("sig_fn"), 1), [JMP]);
            probe
        });
        assert_eq!(probe.unregister().unwrap().nmissed, 0);
    }
}

#[test]
fn a_detour_that_interrupted_code_will_return_into_outlives_its_probe() {
    let _serial = serial();
    with_a_worker_interrupted_inside_sig_fn(false, || {
        let probe = optimized(Probe::at(sym!("sig_fn")).on_hit(|_| {}));
        assert!(probe.info().optimized, "{}", probe.info());
        // The worker's handler now returns into the detour's copy. Removing the probe and
        // letting its quarantine run out must not free that memory.
        probe.unregister().unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        let other = optimized(Probe::at(sym!("opt_push")).on_hit(|_| {}));
        other.unregister().unwrap();
    });
}

/// A probe registered disabled and prepared is armed by `enable()` directly as its jump:
/// there is no breakpoint phase for the optimizer to end later (the background optimizer,
/// stopped here, plays no part).
#[test]
fn a_prepared_probe_is_enabled_directly_as_its_jump() {
    let _serial = serial();
    let t = target();
    let (f, addr) = (t.func1("opt_push"), t.addr("opt_push"));
    let before = code(addr, 16);
    dynprobe_probe::stop_optimizer();
    let probe = Probe::at(sym!("opt_push")).on_hit(|_| {}).disabled().register().unwrap();
    dynprobe_probe::prepare_optimization().unwrap();
    assert_eq!(code(addr, 16), before, "a disabled probe changes no byte");
    probe.enable().unwrap();
    assert_eq!(code(addr, 1), [JMP], "enabled as a breakpoint first");
    assert!(probe.info().optimized, "{}", probe.info());
    assert_eq!(f(1), 2);
    assert_eq!(probe.hits(), 1);
    probe.disable().unwrap();
    assert_eq!(code(addr, 16), before);
    probe.enable().unwrap();
    assert_eq!(code(addr, 1), [JMP], "enabled again as a breakpoint");
    probe.unregister().unwrap();
    assert_eq!(code(addr, 16), before);
}

#[test]
fn probes_registered_together_are_optimized_in_one_pass() {
    let _serial = serial();
    let t = target();
    let points = [("opt_push", 0), ("opt_jcc", 4), ("opt_hot", 0), ("sig_fn", 0), ("mxcsr_after", 3)];
    let probes: Vec<ProbeHandle> = points
        .iter()
        .map(|&(symbol, offset)| {
            Probe::at(Location::SymbolOffset(symbol.into(), offset)).on_hit(|_| {}).register().unwrap()
        })
        .collect();
    dynprobe_probe::wait_for_optimizer().unwrap();
    for (probe, (symbol, offset)) in probes.iter().zip(points) {
        assert!(probe.info().optimized, "{}", probe.info());
        assert_eq!(code(t.addr(symbol) + offset, 1), [JMP]);
    }
    assert_eq!(t.func1("opt_push")(1), 2);
    assert_eq!(t.func1("opt_jcc")(9), 209);
    for probe in probes {
        probe.unregister().unwrap();
    }
}

#[test]
fn a_panicking_handler_is_contained_and_counted_on_both_paths() {
    let _serial = serial();
    let t = target();
    let f = t.func1("opt_push");
    let before = dynprobe_probe::handler_panics();
    // Quiet the default hook's message for the panics this test makes on purpose.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for optimize in [false, true] {
        dynprobe_probe::set_optimization(optimize).unwrap();
        let probe = optimized(Probe::at(sym!("opt_push")).on_hit(|_| panic!("a handler bug")));
        assert_eq!(probe.info().optimized, optimize, "{}", probe.info());
        assert_eq!(f(41), 42, "the probed code runs on after the panic");
        assert_eq!(f(1), 2);
        assert_eq!(probe.panicked(), 2);
        let stats = probe.unregister().unwrap();
        assert_eq!((stats.hits, stats.panicked), (2, 2));
    }
    std::panic::set_hook(hook);
    dynprobe_probe::set_optimization(true).unwrap();
    assert_eq!(dynprobe_probe::handler_panics() - before, 4);
}

#[test]
fn a_function_with_a_jump_table_or_a_pointer_tail_call_is_optimized_when_no_entry_lands_inside() {
    let _serial = serial();
    let t = target();
    // A switch whose cases lie past the covered bytes, and a tail call through a pointer:
    // their targets are known (the table is read), so the entries become jumps.
    for (symbol, args, results) in
        [("opt_switch", [0, 1, 2, 7], [10, 20, 30, 40]), ("opt_tailptr", [3, 0, 9, 1], [9, 6, 15, 7])]
    {
        let probe = optimized(Probe::at(sym!(symbol)).on_hit(|_| {}));
        let info = probe.info();
        assert!(info.optimized, "{info}");
        assert_eq!(code(t.addr(symbol), 1), [JMP]);
        let f = t.func1(symbol);
        assert_eq!(args.map(|x| f(x)), results, "{symbol}");
        assert_eq!(probe.hits(), 4, "{symbol}");
    }
    // A switch one of whose cases is 3 bytes in: the entry stays a breakpoint, and says why.
    let probe = optimized(Probe::at(sym!("opt_switch_head")).on_hit(|_| {}));
    let info = probe.info();
    assert!(!info.optimized, "{info}");
    let reason = info.not_optimized.clone().unwrap_or_default();
    let head = t.addr("opt_switch_head") + 3;
    assert!(reason.contains(&format!("jumps to {head:#x}")), "{reason}");
    assert_eq!(code(t.addr("opt_switch_head"), 1), [INT3]);
    let f = t.func1("opt_switch_head");
    assert_eq!([f(3), f(12)], [10, 13]);
    assert_eq!(probe.hits(), 2);
}

#[test]
fn an_entry_a_jump_cannot_cover_is_reached_by_a_short_jump_through_the_padding_before_it() {
    let _serial = serial();
    let t = target();
    let (isl, tiny) = (t.addr("opt_isl"), t.addr("opt_isl_tiny"));
    let padding_before = |addr: u64| code(addr - 16, 16);
    let (isl_padding, tiny_padding) = (padding_before(isl), padding_before(tiny));
    for (symbol, addr) in [("opt_isl", isl), ("opt_isl_tiny", tiny)] {
        let probe = optimized(Probe::at(sym!(symbol)).on_hit(|_| {}));
        let info = probe.info();
        assert!(info.optimized, "{symbol}: {info}");
        // A jmp rel8 back into the padding, where a jmp rel32 to the detour now is.
        let head = code(addr, 2);
        assert_eq!(head[0], 0xeb, "{symbol}: {head:x?}");
        let island = (addr as i64 + 2 + head[1] as i8 as i64) as u64;
        assert!(island < addr && addr - island <= 16, "{symbol}: island at {island:#x}");
        assert_eq!(code(island, 1), [JMP], "{symbol}");
        let (f, other, fall) = (t.func1(symbol), t.func1("opt_isl_other"), t.func1("opt_isl_fall"));
        if symbol == "opt_isl" {
            // The way into the middle still works, and is not a hit.
            assert_eq!([f(5), other(5), f(-1)], [6, 106, 0]);
            assert_eq!(probe.hits(), 2);
        } else {
            // Falling through the padding into the entry goes through the island: a hit,
            // as reaching the entry is.
            assert_eq!([f(5), fall(5), f(7)], [5, 15, 7]);
            assert_eq!(probe.hits(), 3);
        }
        probe.unregister().unwrap();
        // `mov %rdi,%rax` starts both.
        assert_eq!(code(addr, 3), [0x48, 0x89, 0xf8], "{symbol}: entry restored");
    }
    assert_eq!((padding_before(isl), padding_before(tiny)), (isl_padding, tiny_padding), "padding restored");
    assert_eq!([t.func1("opt_isl")(5), t.func1("opt_isl_other")(5), t.func1("opt_isl_fall")(5)], [6, 106, 15]);
}

#[test]
fn threads_falling_through_the_padding_keep_working_while_islands_come_and_go() {
    let _serial = serial();
    let t = target();
    let (tiny, fall, isl, other) =
        (t.func1("opt_isl_tiny"), t.func1("opt_isl_fall"), t.func1("opt_isl"), t.func1("opt_isl_other"));
    let hammering = hammer(move |x| assert_eq!([fall(x), tiny(x), isl(x), other(x)], [x + 10, x, x + 1, x + 101]));
    let mut tiny_hits = 0;
    for _ in 0..5 {
        // Registered (the island written), optimization switched off and on (taken out
        // and written again), unregistered (the padding back) — all under the workers.
        let probe = optimized(Probe::at(sym!("opt_isl_tiny")).on_hit(|_| {}));
        let probe_isl = optimized(Probe::at(sym!("opt_isl")).on_hit(|_| {}));
        assert!(probe.info().optimized && probe_isl.info().optimized, "{}", probe.info());
        dynprobe_probe::set_optimization(false).unwrap();
        assert_eq!(code(t.addr("opt_isl_tiny"), 1), [INT3]);
        dynprobe_probe::set_optimization(true).unwrap();
        dynprobe_probe::wait_for_optimizer().unwrap();
        assert!(probe.info().optimized);
        let stats = probe.unregister().unwrap();
        assert_eq!(stats.nmissed, 0);
        tiny_hits += stats.hits;
        probe_isl.unregister().unwrap();
    }
    let calls = stop_hammering(hammering);
    assert!(tiny_hits > 0, "no call was seen");
    assert!(tiny_hits <= 2 * calls, "{tiny_hits} hits for {calls} calls");
}

/// Zeroes ymm0: the vector use a handler hides behind a chain of direct calls.
#[inline(never)]
fn clobber_ymm0() {
    // SAFETY: only clobbers the register named.
    unsafe { std::arch::asm!("vpxor ymm0, ymm0, ymm0", out("ymm0") _) };
}

/// Calls [`clobber_ymm0`] (the second link of the chain).
#[inline(never)]
fn through_a_helper() {
    clobber_ymm0();
    std::hint::black_box(());
}

/// `upper_ones` keeps ymm0 all ones across its instruction at +4 and returns its upper 64
/// bits: -1 unless a probe there lets its handler's vector use reach the program.
fn upper_ones() -> (extern "C" fn(i64) -> i64, Location) {
    assert!(std::arch::is_x86_feature_detected!("avx2"), "the light-detour tests need AVX2 (vpcmpeqd on ymm)");
    (target().func1("upper_ones"), Location::SymbolOffset("upper_ones".into(), 4))
}

#[test]
fn a_handler_proven_light_gets_a_detour_that_saves_no_vector_register() {
    let _serial = serial();
    let (f, at) = upper_ones();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let probe = optimized(Probe::at(at).on_hit(|regs| {
        HITS.fetch_add(regs.rdi, Ordering::Relaxed);
    }));
    let info = probe.info();
    assert!(info.light, "{info}");
    assert!(info.to_string().ends_with("[OPTIMIZED, light]"), "{info}");
    for _ in 0..100 {
        assert_eq!(f(5), -1, "the program's ymm0");
    }
    assert_eq!((probe.hits(), HITS.load(Ordering::Relaxed)), (100, 500));
    probe.unregister().unwrap();
}

#[test]
fn a_handler_hiding_vector_use_behind_direct_calls_is_heavy_and_the_program_keeps_its_registers() {
    let _serial = serial();
    let (f, at) = upper_ones();
    assert_eq!(f(5), -1, "unprobed");
    let probe = optimized(Probe::at(at.clone()).on_hit(|_| through_a_helper()));
    let info = probe.info();
    assert!(info.optimized && !info.light, "{info}");
    let why = info.heavy.clone().unwrap_or_default();
    assert!(why.contains("vpxor %ymm0,%ymm0,%ymm0") && why.contains("clobber_ymm0"), "{why}");
    assert!(info.to_string().contains("[OPTIMIZED]    (heavy: a vector instruction `vpxor"), "{info}");
    for round in 0..100 {
        assert_eq!(f(5), -1, "round {round}: the handler's vpxor reached the program's ymm0");
    }
    assert_eq!(probe.hits(), 100);
    probe.unregister().unwrap();
}

#[test]
fn a_heavy_handler_joining_a_light_site_turns_its_detour_heavy() {
    let _serial = serial();
    let (f, at) = upper_ones();
    let light = optimized(Probe::at(at.clone()).on_hit(|_| {}));
    assert!(light.info().light, "{}", light.info());
    assert_eq!(f(5), -1);
    let heavy = optimized(Probe::at(at).on_hit(|_| through_a_helper()));
    let info = light.info();
    assert!(info.optimized && !info.light, "{info}");
    assert!(info.heavy.as_deref().is_some_and(|why| why.starts_with("a probe sharing its site: ")), "{info}");
    for round in 0..100 {
        assert_eq!(f(5), -1, "round {round}: the heavy handler ran in the light detour");
    }
    assert_eq!((light.hits(), heavy.hits()), (101, 100));
    heavy.unregister().unwrap();
    light.unregister().unwrap();
}

/// Zeroes ymm2, behind a chain of direct calls: the vector use a return handler hides.
#[inline(never)]
fn clobber_ymm2() {
    // SAFETY: only clobbers the register named.
    unsafe { std::arch::asm!("vpxor ymm2, ymm2, ymm2", out("ymm2") _) };
}

/// Calls [`clobber_ymm2`].
#[inline(never)]
fn through_another_helper() {
    clobber_ymm2();
    std::hint::black_box(());
}

#[test]
fn a_light_return_handler_returns_through_the_light_sled_and_a_hidden_vector_use_does_not() {
    let _serial = serial();
    assert!(std::arch::is_x86_feature_detected!("avx2"), "the test needs AVX2 (vpcmpeqd on ymm)");
    let t = target();
    // dirty_leaf_caller keeps ymm2 all ones across dirty_leaf's return: -1 unless the
    // return path lets a handler's vector use reach it.
    let caller = t.func1("dirty_leaf_caller");
    assert_eq!(caller(1), -1, "unprobed");
    static RETURNS: AtomicU64 = AtomicU64::new(0);
    let light = dynprobe_probe::ReturnProbe::at(sym!("dirty_leaf"))
        .on_return(|regs, _| {
            RETURNS.fetch_add(regs.rax, Ordering::Relaxed);
        })
        .register()
        .unwrap();
    assert!(light.returns_light());
    dynprobe_probe::wait_for_optimizer().unwrap();
    assert!(light.info().light, "the entry's detour too: {}", light.info());
    for _ in 0..50 {
        assert_eq!(caller(1), -1, "the program's ymm2 across a light return");
    }
    assert_eq!((light.returns(), RETURNS.load(Ordering::Relaxed)), (50, 50));
    light.unregister().unwrap();

    let heavy = dynprobe_probe::ReturnProbe::at(sym!("dirty_leaf"))
        .on_return(|_, _| through_another_helper())
        .register()
        .unwrap();
    assert!(!heavy.returns_light(), "vpxor behind two direct calls");
    for round in 0..50 {
        assert_eq!(caller(1), -1, "round {round}: the return handler's vpxor reached the program's ymm2");
    }
    assert_eq!(heavy.returns(), 50);
    heavy.unregister().unwrap();
}

/// The light sled's return path — its `common` saving the general registers straight into
/// the handler's register record, and its path for a call alone at the top of the stack —
/// keeps every register a caller may keep across the call, hands the handler the return
/// value and the caller's `rsp`, returns what the handler leaves in `rax` and `rdx`, and
/// counts each call once, giving its `maxactive` count back (200 calls through a
/// `maxactive` of 4 miss none).
/// A return handler's change to a register a function may clobber (here `rcx`, which
/// `kept_gprs_caller` checks it kept across its call: it answers -1 if not) reaches the
/// caller the same way whether the handler is light (its sled reloads the record) or heavy
/// (the full sled writes the nine registers back).
#[test]
fn a_return_handlers_change_to_a_clobberable_register_reaches_the_caller_on_both_sleds() {
    let _serial = serial();
    let t = target();
    let caller = t.func1("kept_gprs_caller");
    fn check(
        caller: extern "C" fn(i64) -> i64,
        light: bool,
        handler: impl Fn(&mut dynprobe_probe::Regs, &dynprobe_probe::InstanceData) + Send + Sync + 'static,
    ) {
        let probe = dynprobe_probe::ReturnProbe::at(sym!("kept_gprs_leaf")).on_return(handler).register().unwrap();
        assert_eq!(probe.returns_light(), light);
        dynprobe_probe::wait_for_optimizer().unwrap();
        for x in 0..20 {
            assert_eq!(caller(x), -1, "light {light}, x = {x}: the caller found its rcx as it kept it");
        }
        probe.unregister().unwrap();
    }
    check(caller, true, |regs, _| regs.rcx = 0);
    check(caller, false, |regs, _| {
        // Floating point: vector instructions, so the handler is heavy.
        regs.rax = std::hint::black_box(regs.rax as f64 * 1.0) as u64;
        regs.rcx = 0;
    });
    assert_eq!(caller(5), 16);
}

#[test]
fn a_light_return_keeps_the_callers_registers_and_returns_what_the_handler_leaves() {
    let _serial = serial();
    let t = target();
    let caller = t.func1("kept_gprs_caller");
    assert_eq!(caller(5), 16, "unprobed: 3x + 1");
    static WRONG: AtomicU64 = AtomicU64::new(0);
    static RSP: AtomicU64 = AtomicU64::new(0);
    let probe = dynprobe_probe::ReturnProbe::at(sym!("kept_gprs_leaf"))
        .maxactive(4)
        .on_entry(|regs, data| {
            data[0] = regs.arg(0);
            data[1] = regs.rsp + 8;
            true
        })
        .on_return(|regs, data| {
            // The leaf's result (x + 1, 2x; x in rbx, which the record shows as 0), the
            // caller's rsp after the return, and a record of which nothing else is filled.
            let x = (regs.rax - 1) as i64;
            let seen_ok = regs.rdx == 2 * x as u64 && regs.rsp == data[1] && regs.rbx == 0 && regs.rflags == 0;
            if !seen_ok || regs.rdi != 0x13 || regs.r11 != 0x17 || data[0] != 0x13 {
                WRONG.fetch_add(1, Ordering::Relaxed);
            }
            RSP.store(regs.rsp, Ordering::Relaxed);
            regs.rax += 1000;
            regs.rdx += 1;
            // Everything else the ABI lets a function clobber: only the sled's reload puts
            // the caller's values back. General registers only, so the handler stays light.
            // SAFETY: only clobbers the registers named.
            unsafe {
                std::arch::asm!(
                    "xor ecx, ecx", "xor esi, esi", "xor edi, edi", "xor r8d, r8d", "xor r9d, r9d",
                    "xor r10d, r10d", "xor r11d, r11d",
                    out("rcx") _, out("rsi") _, out("rdi") _, out("r8") _, out("r9") _, out("r10") _, out("r11") _,
                )
            };
        })
        .register()
        .unwrap();
    assert!(probe.returns_light(), "a handler of general registers only returns through the light sled");
    dynprobe_probe::wait_for_optimizer().unwrap();
    for x in 0..200 {
        assert_eq!(caller(x), 3 * x + 1 + 1001, "x = {x}: the caller's registers, or the handler's rax and rdx");
    }
    assert_eq!(WRONG.load(Ordering::Relaxed), 0, "the handler saw a wrong register record");
    assert_ne!(RSP.load(Ordering::Relaxed), 0);
    let stats = probe.unregister().unwrap();
    assert_eq!((stats.hits, stats.returns, stats.nmissed), (200, 200, 0));
    assert_eq!(caller(5), 16, "unprobed again");
}

#[test]
fn disabled_probes_come_out_together_while_threads_call_them() {
    let _serial = serial();
    let t = target();
    let hot = t.func1("opt_hot");
    let (hot_addr, push_addr) = (t.addr("opt_hot"), t.addr("opt_push"));
    let (hot_before, push_before) = (code(hot_addr, 16), code(push_addr, 16));
    // Two probes alone at their site, and two sharing one: those come out one by one.
    let probes = vec![
        optimized(Probe::at(sym!("opt_hot")).on_hit(|regs| regs.rax ^= 0)),
        optimized(Probe::at(sym!("opt_push")).on_hit(|_| {})),
        optimized(Probe::at(sym!("opt_push")).on_hit(|_| {})),
    ];
    assert_eq!(code(hot_addr, 1), [JMP]);
    let hammering = hammer(move |x| assert_eq!(hot(x), x * 2 + 1));
    std::thread::sleep(Duration::from_millis(50));
    ProbeHandle::disable_all(&probes).unwrap();
    ProbeHandle::unregister_all(probes).unwrap();
    assert_eq!((code(hot_addr, 16), code(push_addr, 16)), (hot_before, push_before), "every byte restored");
    std::thread::sleep(Duration::from_millis(50));
    stop_hammering(hammering);
    let left: Vec<String> = dynprobe_probe::list().iter().map(ToString::to_string).collect();
    assert!(!left.iter().any(|p| p.contains("opt_hot") || p.contains("opt_push")), "{left:?}");
}
