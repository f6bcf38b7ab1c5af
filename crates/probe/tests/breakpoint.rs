//! Breakpoint probes on real code: C functions chosen for their first instruction, built
//! by the harness and loaded into this process.

mod common;

use common::{code, Target};
use dynprobe_probe::{sym, Location, Probe, ProbeError, ProbeHandle};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| Target::build("first_insns", &[]))
}

/// Probes patch process-wide code: the tests take turns. They test breakpoint probes, so
/// jump optimization (tests/optimized.rs) is switched off.
fn serial() -> MutexGuard<'static, ()> {
    let guard = common::serial();
    dynprobe_probe::set_optimization(false).expect("switching optimization off");
    guard
}

/// Probes `symbol` (a `long f(long)`), calls it with `x`, and checks that the handler saw
/// the argument at the probe address and that the result is unchanged.
fn probe_entry_and_call(symbol: &str, x: i64, expect: i64) {
    let _serial = serial();
    let t = target();
    let f = t.func1(symbol);
    let addr = t.addr(symbol);
    let before = code(addr, 16);
    assert_eq!(f(x), expect, "{symbol} unprobed");
    let seen = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let s = seen.clone();
    let probe = Probe::at(sym!(symbol))
        .on_hit(move |regs| {
            s.0.store(regs.arg(0), Ordering::SeqCst);
            s.1.store(regs.ip, Ordering::SeqCst);
        })
        .register()
        .unwrap_or_else(|e| panic!("probe on {symbol}: {e}"));
    assert_eq!(probe.address(), addr);
    assert_eq!(code(addr, 1), [0xcc], "the probe point holds an int3 while armed");
    for i in 0..100 {
        assert_eq!(f(x + i), expect + i, "{symbol} probed, call {i}");
    }
    assert_eq!(probe.hits(), 100);
    assert_eq!(seen.0.load(Ordering::SeqCst), (x + 99) as u64);
    assert_eq!(seen.1.load(Ordering::SeqCst), addr, "handlers see ip at the probe point");
    probe.unregister().unwrap();
    assert_eq!(code(addr, 16), before, "unregister restores every byte");
    assert_eq!(f(x), expect);
}

#[test]
fn push_first() {
    probe_entry_and_call("f_push", 5, 6);
}

#[test]
fn sub_rsp_first() {
    probe_entry_and_call("f_sub", 5, 7);
}

#[test]
fn rip_relative_mov_first() {
    probe_entry_and_call("f_riprel", 5, 105);
}

#[test]
fn rip_relative_lea_first() {
    probe_entry_and_call("f_lea", 5, 105);
}

#[test]
fn relative_call_first() {
    probe_entry_and_call("f_call_first", 5, 17);
}

#[test]
fn endbr64_first() {
    probe_entry_and_call("f_endbr", 5, 12);
}

#[test]
fn short_jmp_first() {
    probe_entry_and_call("f_jmp", 5, 14);
}

/// Registers a probe with a post-handler at `f_jcc+4`, `jg 1f` (7f 05): taken goes to
/// base+11, not taken to base+6. Calls the function both ways and checks what the
/// post-handler saw; returns the probe.
fn jcc_post_handler_sees_both_ways(t: &Target) -> ProbeHandle {
    let f = t.func1("f_jcc");
    let base = t.addr("f_jcc");
    let after = Arc::new(AtomicU64::new(0));
    let a = after.clone();
    let probe = Probe::at(sym!("f_jcc", 4))
        .on_hit(|_| {})
        .after_hit(move |regs| a.store(regs.ip, Ordering::SeqCst))
        .register()
        .unwrap();
    assert_eq!(f(9), 209);
    assert_eq!(after.load(Ordering::SeqCst), base + 11, "post-handler sees the taken target");
    assert_eq!(f(1), 101);
    assert_eq!(after.load(Ordering::SeqCst), base + 6, "post-handler sees the fall-through");
    probe
}

#[test]
fn jcc_both_ways_with_post_handler() {
    let _serial = serial();
    let probe = jcc_post_handler_sees_both_ways(target());
    assert_eq!(probe.hits(), 2);
    probe.unregister().unwrap();
}

/// A site is placed without its post path (a program traced whole never asks for one);
/// a probe with a post-handler that joins it later gets it written then, and works — or is
/// refused with the reason, leaving the site's probe as it was.
#[test]
fn a_post_handler_joining_a_site_gets_its_post_path_then() {
    let _serial = serial();
    let t = target();
    let first = Probe::at(sym!("f_jcc", 4)).on_hit(|_| {}).register().unwrap();
    assert_eq!(t.func1("f_jcc")(9), 209);
    let second = jcc_post_handler_sees_both_ways(t);
    assert_eq!((first.hits(), second.hits()), (3, 2));
    second.unregister().unwrap();
    first.unregister().unwrap();

    let at_ret = Probe::at(sym!("f_ret", 4)).on_hit(|_| {}).register().unwrap();
    let err = Probe::at(sym!("f_ret", 4)).on_hit(|_| {}).after_hit(|_| {}).register().unwrap_err();
    assert!(matches!(err, ProbeError::PostHandlerRefused { .. }), "{err:?}");
    assert_eq!(t.func1("f_ret")(1), 4);
    assert_eq!(at_ret.hits(), 1);
    at_ret.unregister().unwrap();
}

#[test]
fn relative_call_mid_function_with_post_handler() {
    let _serial = serial();
    let t = target();
    let f = t.func1("f_call");
    let helper = t.addr("f_helper");
    let post_ip = Arc::new(AtomicU64::new(0));
    let (pre_rsp, post_rsp) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (p, r1, r2) = (post_ip.clone(), pre_rsp.clone(), post_rsp.clone());
    let probe = Probe::at(sym!("f_call", 4))
        .on_hit(move |regs| r1.store(regs.rsp, Ordering::SeqCst))
        .after_hit(move |regs| {
            p.store(regs.ip, Ordering::SeqCst);
            r2.store(regs.rsp, Ordering::SeqCst);
        })
        .register()
        .unwrap();
    assert_eq!(f(5), 16);
    assert_eq!(post_ip.load(Ordering::SeqCst), helper, "after a call, the next instruction is the callee's first");
    assert_eq!(post_rsp.load(Ordering::SeqCst), pre_rsp.load(Ordering::SeqCst) - 8, "the call pushed one word");
    probe.unregister().unwrap();
}

#[test]
fn pre_handler_rewrites_an_argument() {
    let _serial = serial();
    let t = target();
    // SAFETY: format_sum has this signature in first_insns.c.
    let format_sum: extern "C" fn(*mut u8, i64, i64) -> i32 = unsafe { std::mem::transmute(t.addr("format_sum")) };
    let print = |a, b| {
        let mut buf = [0u8; 64];
        let n = format_sum(buf.as_mut_ptr(), a, b) as usize;
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(print(2, 3), "sum=5");
    let probe = Probe::at(sym!("format_sum")).on_hit(|regs| regs.set_arg(2, 40)).register().unwrap();
    assert_eq!(print(2, 3), "sum=42", "the program prints the rewritten argument");
    probe.unregister().unwrap();
    assert_eq!(print(2, 3), "sum=5");
}

#[test]
fn pre_handler_diverts_execution() {
    let _serial = serial();
    let t = target();
    let f = t.func1("f_push");
    let endbr = t.addr("f_endbr");
    let probe = Probe::at(sym!("f_push")).on_hit(move |regs| regs.ip = endbr).register().unwrap();
    assert_eq!(f(5), 12, "f_push(5) ran f_endbr instead");
    probe.unregister().unwrap();
    assert_eq!(f(5), 6);
}

#[test]
fn several_probes_share_one_site() {
    let _serial = serial();
    let t = target();
    let f = t.func1("f_sub");
    let addr = t.addr("f_sub");
    let before = code(addr, 8);
    let order = Arc::new(Mutex::new(Vec::new()));
    let (o1, o2) = (order.clone(), order.clone());
    let first = Probe::at(sym!("f_sub")).on_hit(move |_| o1.lock().unwrap().push(1)).register().unwrap();
    let second = Probe::at(Location::Address(addr)).on_hit(move |_| o2.lock().unwrap().push(2)).register().unwrap();
    assert_eq!(f(1), 3);
    assert_eq!(*order.lock().unwrap(), [1, 2], "both handlers, in registration order");
    let listing = dynprobe_probe::format_list();
    assert_eq!(listing.matches("f_sub+0x0").count(), 2, "{listing}");
    first.unregister().unwrap();
    assert_eq!(code(addr, 1), [0xcc], "still armed for the second probe");
    assert_eq!(f(1), 3);
    assert_eq!(*order.lock().unwrap(), [1, 2, 2]);
    second.unregister().unwrap();
    assert_eq!(code(addr, 8), before);
}

#[test]
fn disable_and_enable() {
    let _serial = serial();
    let t = target();
    let f = t.func1("f_lea");
    let addr = t.addr("f_lea");
    let original = code(addr, 1);
    let probe = Probe::at(sym!("f_lea")).on_hit(|_| {}).register().unwrap();
    probe.disable().unwrap();
    assert_eq!(code(addr, 1), original, "a disabled probe leaves the code as it was");
    assert!(probe.info().to_string().ends_with("[DISABLED]"), "{}", probe.info());
    assert_eq!(f(1), 101);
    assert_eq!(probe.hits(), 0);
    probe.enable().unwrap();
    assert_eq!(code(addr, 1), [0xcc]);
    assert_eq!(f(1), 101);
    assert_eq!(probe.hits(), 1);
    let line = probe.info().to_string();
    assert_eq!(line, format!("{addr:016x}  k  f_lea+0x0"));
    probe.unregister().unwrap();
}

#[test]
fn registered_disabled() {
    let _serial = serial();
    let t = target();
    let addr = t.addr("f_endbr");
    let probe = Probe::at(sym!("f_endbr")).on_hit(|_| {}).disabled().register().unwrap();
    assert_eq!(code(addr, 4), [0xf3, 0x0f, 0x1e, 0xfa]);
    assert!(!probe.is_enabled());
    probe.unregister().unwrap();
}

#[test]
fn hit_inside_a_handler_is_missed_not_recursed() {
    let _serial = serial();
    let t = target();
    let hot = t.func1("hot");
    let inner = Probe::at(sym!("hot")).on_hit(|_| {}).register().unwrap();
    let outer = Probe::at(sym!("f_riprel"))
        .on_hit(move |_| {
            // The handler calls a probed function: that hit must not run handlers again.
            assert_eq!(hot(3), 7);
        })
        .register()
        .unwrap();
    assert_eq!(t.func1("f_riprel")(1), 101);
    assert_eq!(outer.hits(), 1);
    assert_eq!(inner.hits(), 0);
    assert_eq!(inner.nmissed(), 1, "the nested hit is counted as missed");
    assert_eq!(hot(3), 7);
    assert_eq!(inner.hits(), 1);
    outer.unregister().unwrap();
    inner.unregister().unwrap();
}

#[test]
fn offset_inside_an_instruction_is_refused() {
    let _serial = serial();
    let t = target();
    let addr = t.addr("f_riprel");
    let before = code(addr, 16);
    let err = Probe::at(sym!("f_riprel", 2)).on_hit(|_| {}).register().unwrap_err();
    assert!(matches!(err, ProbeError::Decode(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&format!("{:#x}", addr)), "the message names the instruction start: {message}");
    assert_eq!(code(addr, 16), before, "nothing changed");
}

#[test]
fn unknown_symbol_is_a_clear_error() {
    let _serial = serial();
    target();
    let err = Probe::at(sym!("f_pusj")).on_hit(|_| {}).register().unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ProbeError::Symbol(_)), "{err:?}");
    assert!(message.contains("f_pusj"), "{message}");
    assert!(message.contains("f_push"), "suggests the near name: {message}");
}

/// The implementation the dynamic linker chose in this process for `name`.
fn chosen(name: &std::ffi::CStr) -> u64 {
    // SAFETY: dlsym with RTLD_DEFAULT only looks the name up (an IFUNC's resolver runs).
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) as u64 }
}

/// glibc's `memcpy` and `strlen` are indirect functions: a probe goes on the
/// implementation the dynamic linker chose for this CPU, and the listing says which. Here
/// dynprobe is linked into the program, so its own copies call the C library's `memcpy`:
/// that probe is refused with the reason, while `strlen`, which it never calls, is probed
/// and sees each of the program's calls.
#[test]
fn ifuncs_are_probed_at_the_chosen_implementation() {
    let _serial = serial();
    let err = Probe::at(sym!("libc:memcpy")).on_hit(|_| {}).register().unwrap_err();
    let ProbeError::Blacklisted { addr, what } = &err else { panic!("{err:?}") };
    assert_eq!(*addr, chosen(c"memcpy"), "{err}");
    assert!(what.starts_with("memcpy → __mem"), "names the implementation: {err}");
    assert!(what.contains("shared with memmove"), "{err}");
    assert!(what.contains("linked into this program"), "{err}");

    static TEXT: &std::ffi::CStr = c"dynprobe: strlen";
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    // Other threads of the test harness may call strlen too: only this text's calls count.
    let probe = Probe::at(sym!("libc:strlen"))
        .on_hit(move |regs| {
            if regs.arg(0) == TEXT.as_ptr() as u64 {
                h.fetch_add(1, Ordering::SeqCst);
            }
        })
        .register()
        .unwrap_or_else(|e| panic!("probe on strlen: {e}"));
    assert_eq!(probe.address(), chosen(c"strlen"));
    let listed = dynprobe_probe::list().into_iter().find(|p| p.addr == probe.address()).expect("listed");
    assert!(listed.symbol.starts_with("strlen → __strlen_"), "{listed}");
    for _ in 0..50 {
        // SAFETY: TEXT is NUL-terminated.
        assert_eq!(unsafe { libc::strlen(std::hint::black_box(TEXT.as_ptr())) }, 16);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 50);
    probe.unregister().unwrap();
}

#[test]
fn offset_past_the_function_is_refused() {
    let _serial = serial();
    target();
    let err = Probe::at(sym!("f_ret", 400)).on_hit(|_| {}).register().unwrap_err();
    assert!(matches!(err, ProbeError::OffsetOutsideFunction { .. }), "{err:?}");
}

#[test]
fn syscall_cannot_run_out_of_line() {
    let _serial = serial();
    let t = target();
    let addr = t.addr("f_syscall");
    let before = code(addr, 8);
    let err = Probe::at(sym!("f_syscall", 5)).on_hit(|_| {}).register().unwrap_err();
    assert!(matches!(err, ProbeError::NotRelocatable(_)), "{err:?}");
    assert!(err.to_string().contains("syscall"), "{err}");
    assert_eq!(code(addr, 8), before);
    // The instruction before it is fine.
    let probe = Probe::at(sym!("f_syscall")).on_hit(|_| {}).register().unwrap();
    assert_eq!(t.func1("f_syscall")(0), std::process::id() as i64);
    probe.unregister().unwrap();
}

#[test]
fn post_handler_on_ret_is_refused_but_pre_handler_works() {
    let _serial = serial();
    let t = target();
    let err = Probe::at(sym!("f_ret", 4)).on_hit(|_| {}).after_hit(|_| {}).register().unwrap_err();
    assert!(matches!(err, ProbeError::PostHandlerRefused { .. }), "{err:?}");
    let probe = Probe::at(sym!("f_ret", 4)).on_hit(|_| {}).register().unwrap();
    assert_eq!(t.func1("f_ret")(1), 4);
    assert_eq!(probe.hits(), 1);
    probe.unregister().unwrap();
}

/// The crates of the functions a breakpoint hit runs through before its handler (pre and
/// post), read from backtraces taken inside the handlers down to the signal frame: each is
/// on the blacklist, and a probe on such a function is refused.
#[test]
fn every_crate_on_the_trap_path_is_blacklisted() {
    static TRACES: Mutex<Vec<std::backtrace::Backtrace>> = Mutex::new(Vec::new());
    let _serial = serial();
    let t = target();
    // In a test only: the probed function holds no lock the capture takes.
    let capture =
        |_: &mut dynprobe_probe::Regs| TRACES.lock().unwrap().push(std::backtrace::Backtrace::force_capture());
    let probe = Probe::at(sym!("f_push")).on_hit(capture).after_hit(capture).register().unwrap();
    t.func1("f_push")(3);
    probe.unregister().unwrap();
    let traces: Vec<String> = TRACES.lock().unwrap().iter().map(|trace| format!("{trace:?}")).collect();
    assert_eq!(traces.len(), 2, "a pre- and a post-handler run");
    let mut seen = std::collections::BTreeMap::new();
    for trace in &traces {
        // `Backtrace [{ fn: "NAME", file: …, line: … }, …]`, innermost first, down to the
        // signal frame (`__restore_rt`), the probed function where the unwinder steps over
        // it, or the end (an out-of-line slot has no unwind information).
        let names: Vec<&str> = trace.split("fn: \"").skip(1).filter_map(|f| f.split('"').next()).collect();
        assert!(names.contains(&"dynprobe_text::trap::dispatch"), "the dispatcher is on the path: {trace}");
        let signal_frame = names.iter().position(|n| *n == "__restore_rt" || *n == "f_push").unwrap_or(names.len());
        for name in &names[..signal_frame] {
            let path = name.trim_start_matches('<');
            if path.starts_with("dynprobe") {
                let krate = &path[..path.find("::").unwrap_or(path.len()) + 2];
                seen.entry(krate.to_string()).or_insert_with(|| name.to_string());
            }
        }
    }
    assert!(seen.contains_key("dynprobe_text::") && seen.contains_key("dynprobe_probe::"), "{seen:?}");
    for (krate, function) in &seen {
        assert!(dynprobe_probe::BLACKLISTED_CODE.contains(&krate.as_str()), "{function} runs on the trap path");
    }
    let dispatcher = dynprobe_text::trap::install as *const () as u64;
    let err = Probe::at(Location::Address(dispatcher)).on_hit(|_| {}).register().unwrap_err();
    assert!(matches!(err, ProbeError::Blacklisted { .. }), "{err:?}");
}

#[test]
fn probes_on_dynprobe_itself_are_refused() {
    let _serial = serial();
    let addr = dynprobe_text::trap::install as *const () as u64;
    let err = Probe::at(Location::Address(addr)).on_hit(|_| {}).register().unwrap_err();
    assert!(matches!(err, ProbeError::Blacklisted { .. }), "{err:?}");
}

#[test]
fn threads_hit_while_another_registers_and_unregisters() {
    let _serial = serial();
    let t = target();
    let hot = t.func1("hot");
    let stop = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut calls = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let x = (calls % 1000) as i64;
                    assert_eq!(hot(x), x * 2 + 1, "a probed call returned a wrong result");
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    // The process's first probe places dynprobe's signal guards (once, and slow in a debug
    // build): not part of the rounds counted.
    Probe::at(sym!("hot")).on_hit(|_| {}).register().unwrap().unregister().unwrap();
    // A number of rounds, not a time: how many fit in a second depends on the host's load.
    // On a loaded machine the workers may get no CPU in a round's 300 µs: rounds go on
    // until some hit was counted, for a bounded time.
    let (mut rounds, mut counted) = (0u64, 0u64);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rounds < 100 || (counted == 0 && std::time::Instant::now() < deadline) {
        let h = handled.clone();
        let probe = Probe::at(sym!("hot")).on_hit(move |_| {
            h.fetch_add(1, Ordering::Relaxed);
        });
        let probe = probe.register().unwrap();
        std::thread::sleep(Duration::from_micros(300));
        counted += probe.unregister().unwrap().hits;
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let calls: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(handled.load(Ordering::Relaxed), counted, "every handler run is counted as a hit of its probe");
    assert!(counted > 0 && counted <= calls, "{counted} hits for {calls} calls");
    eprintln!("{rounds} rounds, {counted} hits, {calls} calls");
}

#[test]
fn a_failed_unregister_leaves_the_probe_working() {
    let _serial = serial();
    let t = target();
    let f = t.func1("f_spare");
    let addr = t.addr("f_spare");
    // A thread that blocks every signal but SIGTRAP cannot be stopped, so no grace period
    // can complete. (Blocking SIGTRAP too, before any probe's guards, would make breakpoints
    // unsafe in the process: tests/signals_hazard.rs.)
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let blocker = std::thread::spawn(move || {
        // SAFETY: blocks all signals for this thread only; the set is a valid sigset_t.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::sigdelset(&mut all, libc::SIGTRAP);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        }
        ready_tx.send(()).unwrap();
        while done_rx.try_recv().is_err() {
            std::hint::spin_loop();
        }
    });
    ready_rx.recv().unwrap();
    let probe = Probe::at(sym!("f_spare")).on_hit(|_| {}).register().unwrap();
    let err = probe.unregister().unwrap_err();
    assert!(err.to_string().contains("stop"), "{err}");
    done_tx.send(()).unwrap();
    blocker.join().unwrap();
    // The probe stays as it was: listed, enabled, armed, owned, and it still fires.
    let left = dynprobe_probe::list().into_iter().find(|p| p.addr == addr).expect("still registered");
    assert!(left.enabled);
    assert_eq!(code(addr, 1), [0xcc]);
    assert_eq!(f(1), 5);
    let left = dynprobe_probe::list().into_iter().find(|p| p.addr == addr).unwrap();
    assert_eq!(left.hits, 1);
    // A second probe at the same address shares the site; removing it keeps the first.
    let second = Probe::at(sym!("f_spare")).on_hit(|_| {}).register().unwrap();
    assert_eq!(f(1), 5);
    assert_eq!(second.unregister().unwrap().hits, 1);
    assert_eq!(code(addr, 1), [0xcc], "the first probe is still there");
    assert_eq!(f(2), 6);
}

#[test]
fn probes_are_armed_and_disarmed_together() {
    let _serial = serial();
    let t = target();
    let names = ["f_push", "f_sub", "f_lea"];
    let before: Vec<Vec<u8>> = names.iter().map(|n| code(t.addr(n), 8)).collect();
    let hits = Arc::new(AtomicU64::new(0));
    let probes: Vec<_> = names
        .iter()
        .map(|&n| {
            let h = hits.clone();
            Probe::at(sym!(n))
                .on_hit(move |_| {
                    h.fetch_add(1, Ordering::SeqCst);
                })
                .disabled()
                .register()
                .unwrap()
        })
        .collect();
    // Registered disabled: nothing written yet.
    for (n, b) in names.iter().zip(&before) {
        assert_eq!(&code(t.addr(n), 8), b, "{n}");
    }
    dynprobe_probe::ProbeHandle::enable_all(&probes).unwrap();
    for n in names {
        assert_eq!(code(t.addr(n), 1), [0xcc], "{n} armed");
        assert_eq!(t.func1(n)(5), [6, 7, 105][names.iter().position(|&m| m == n).unwrap()]);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    assert!(probes.iter().all(|p| p.is_enabled()));
    dynprobe_probe::ProbeHandle::disable_all(&probes).unwrap();
    for (n, b) in names.iter().zip(&before) {
        assert_eq!(&code(t.addr(n), 8), b, "{n} disarmed");
        t.func1(n)(5);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 3, "no hit while disabled");
    for p in probes {
        p.unregister().unwrap();
    }
}
