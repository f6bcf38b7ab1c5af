//! The optimization knob: the same probe as a breakpoint (a trap per hit) and as a jump to a
//! detour, switched for every probe at once like the kernel's `debug.kprobes_optimization`.
//! The figures it prints are one run on one loaded machine — an illustration, not a
//! benchmark (`dynprobe bench` is that).
//!
//! `cargo run --release --example optimize`

use dynprobe::{sym, Probe};
use std::hint::black_box;
use std::time::Instant;

/// The probed function.
#[no_mangle]
#[inline(never)]
pub extern "C" fn example_hot(x: u64) -> u64 {
    black_box(x).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Nanoseconds per call of `example_hot`, over `n` calls.
fn per_call(n: u64) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        black_box(example_hot(black_box(i)));
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() -> Result<(), dynprobe::ProbeError> {
    const CALLS: u64 = 20_000;
    let plain = per_call(CALLS);
    let probe = Probe::at(sym!("example_hot")).on_hit(|_| {}).register()?;
    dynprobe::wait_for_optimizer()?;
    println!("{}", probe.info());
    let jump = per_call(CALLS);
    dynprobe::set_optimization(false)?;
    println!("{}", probe.info());
    let trap = per_call(CALLS);
    dynprobe::set_optimization(true)?;
    dynprobe::wait_for_optimizer()?;
    let optimized_again = probe.info().optimized;
    let stats = probe.unregister()?;
    println!("per call: {plain:.1} ns plain, {jump:.1} ns with the jump, {trap:.1} ns with the breakpoint");
    assert!(optimized_again, "switched back on, the probe is a jump again");
    assert_eq!(stats.hits, 2 * CALLS);
    Ok(())
}
