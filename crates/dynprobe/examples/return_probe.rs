//! A return probe: the time each call of a function takes and the value it returns,
//! gathered by an entry and a return handler sharing the call's data area.
//!
//! `cargo run --example return_probe`

use dynprobe::{monotonic_ns, sym, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The probed function (recursive, so that several of its calls are in flight at once).
#[no_mangle]
#[inline(never)]
pub extern "C" fn example_fib(n: u64) -> u64 {
    if n < 2 {
        return n;
    }
    black_box(example_fib(n - 1)) + example_fib(n - 2)
}

static CALLS: AtomicU64 = AtomicU64::new(0);
static TOTAL_NS: AtomicU64 = AtomicU64::new(0);
static RESULTS: AtomicU64 = AtomicU64::new(0);

fn main() -> Result<(), dynprobe::ProbeError> {
    let probe = ReturnProbe::at(sym!("example_fib"))
        .maxactive(32) // calls of one thread in flight at once, as deep as the recursion goes
        .on_entry(|_regs, data| {
            data[0] = monotonic_ns();
            true // track this call
        })
        .on_return(|regs, data| {
            CALLS.fetch_add(1, Relaxed);
            RESULTS.fetch_add(regs.retval(), Relaxed);
            TOTAL_NS.fetch_add(monotonic_ns() - data[0], Relaxed);
        })
        .register()?;
    let value = example_fib(black_box(12));
    let stats = probe.unregister()?;
    println!(
        "fib(12) = {value}: {} calls ({} returns seen, {} missed), {} ns inside in total",
        stats.hits,
        CALLS.load(Relaxed),
        stats.nmissed,
        TOTAL_NS.load(Relaxed)
    );
    // fib(12) makes 465 calls; the values they return add up to 1_308.
    assert_eq!((value, stats.hits, CALLS.load(Relaxed), stats.nmissed), (144, 465, 465, 0));
    assert_eq!(RESULTS.load(Relaxed), 1_308);
    Ok(())
}
