//! Probes whose code is unloaded under them — a library `dlclose`d while they are armed —
//! come out without a byte written where they were: the address is unmapped, or holds a
//! fresh load of the library (perhaps at the same place), which is not dynprobe's to change.

mod common;

use common::{code, Target};
use dynprobe_probe::{Location, Probe, ReturnProbe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Whether `addr` is mapped in this process.
fn mapped(addr: u64) -> bool {
    let mut byte = [0u8];
    dynprobe_probe::raw::read(addr, &mut byte)
}

/// Probes armed as breakpoints and as jumps (the optimizer's, with their detours), and a
/// return probe, on a library unloaded while they are in place: unregistering each works
/// and says nothing was left; a load of the library afterwards, at whatever address, has
/// its code as the file has it; its functions, probed again, are hit as before.
#[test]
fn probes_on_a_library_unloaded_under_them_come_out_and_a_new_load_is_untouched() {
    let _serial = common::serial();
    for optimize in [false, true] {
        dynprobe_probe::set_optimization(optimize).unwrap();
        let t = Target::build("first_insns", &[]);
        let (push, sub) = (t.addr("f_push"), t.addr("f_sub"));
        let (f_push, f_sub) = (t.func1("f_push"), t.func1("f_sub"));
        let file_bytes = (code(push, 16), code(sub, 16));
        let hits = Arc::new(AtomicU64::new(0));
        let h = Arc::clone(&hits);
        let probe = Probe::at(Location::Address(push)).on_hit(move |_| {
            h.fetch_add(1, Ordering::Relaxed);
        });
        let probe = probe.register().unwrap();
        let ret = ReturnProbe::at(Location::Address(sub)).on_return(|_, _| {}).register().unwrap();
        if optimize {
            dynprobe_probe::wait_for_optimizer().unwrap();
        }
        assert_eq!((f_push(5), f_sub(5)), (6, 7));
        assert_eq!(hits.load(Ordering::Relaxed), 1);
        assert_ne!(code(push, 1), file_bytes.0[..1], "the probe is armed");
        assert!(t.unload(), "the loader kept the library");
        assert!(!mapped(push) || code(push, 16) == file_bytes.0, "optimize {optimize}: the library is still there");
        probe.unregister().unwrap_or_else(|e| panic!("optimize {optimize}: {e}"));
        ret.unregister().unwrap_or_else(|e| panic!("optimize {optimize}: {e}"));
        // Loaded again (the loader often picks the same place): as the file has it.
        let again = Target::build("first_insns", &[]);
        let (push2, sub2) = (again.addr("f_push"), again.addr("f_sub"));
        assert_eq!((code(push2, 16), code(sub2, 16)), file_bytes, "optimize {optimize}: the new load was written");
        let probe = Probe::at(Location::Address(push2)).on_hit(|_| {}).register().unwrap();
        assert_eq!(again.func1("f_push")(7), 8);
        assert_eq!(probe.hits(), 1);
        probe.unregister().unwrap();
        assert_eq!(code(push2, 16), file_bytes.0);
        assert!(again.unload());
    }
}

/// A function whose first instruction is a jump — `jmp rel32` (a tail-call thunk's) or
/// `jmp rel8` — has, once optimized, dynprobe's jump's first byte as its own: its code is
/// still loaded, and unregistering restores every byte as for any other function.
#[test]
fn a_probe_on_a_function_starting_with_a_jump_is_restored_not_taken_for_unloaded() {
    let _serial = common::serial();
    let t = Target::build("first_insns", &[]);
    for optimize in [false, true] {
        dynprobe_probe::set_optimization(optimize).unwrap();
        for name in ["f_jmp32", "f_jmp"] {
            let addr = t.addr(name);
            let f = t.func1(name);
            let before = code(addr, 16);
            let probe = Probe::at(Location::Address(addr)).on_hit(|_| {}).register().unwrap();
            if optimize {
                dynprobe_probe::wait_for_optimizer().unwrap();
            }
            assert_eq!(f(5), 14, "{name}");
            assert_eq!(probe.hits(), 1, "{name}");
            probe.unregister().unwrap();
            assert_eq!(code(addr, 16), before, "{name} (optimize {optimize}): every byte restored");
            assert_eq!(f(5), 14, "{name}");
        }
    }
    // Unloaded: the other test needs the library gone when it unloads its own load of it
    // (the same file, so the same load while this one holds it).
    assert!(t.unload());
}
