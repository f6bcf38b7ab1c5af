//! A probe on a function of this program: counts its calls, sums an argument, and changes
//! it — then takes the probe away and shows the function as it was.
//!
//! `cargo run --example probe`

use dynprobe::{sym, Probe};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The probed function: `#[no_mangle]` keeps its symbol name, `#[inline(never)]` keeps it a
/// function of its own that calls reach.
#[no_mangle]
#[inline(never)]
pub extern "C" fn example_checksum(seed: u64, len: u64) -> u64 {
    (0..black_box(len)).fold(seed, |acc, i| acc.rotate_left(5) ^ i)
}

/// Handlers run on the probed thread, in a detour or its SIGTRAP handler: atomics, not
/// locks or `println!`.
static LENGTHS: AtomicU64 = AtomicU64::new(0);

fn main() -> Result<(), dynprobe::ProbeError> {
    let before = example_checksum(black_box(1), 8);
    let probe = Probe::at(sym!("example_checksum"))
        .on_hit(|regs| {
            LENGTHS.fetch_add(regs.arg(1), Relaxed);
            regs.set_arg(0, 1); // every call now starts from seed 1
        })
        .register()?;
    dynprobe::wait_for_optimizer()?;
    print!("{}", dynprobe::format_list());
    let during: Vec<u64> = (0..4).map(|seed| example_checksum(black_box(seed), 8)).collect();
    let stats = probe.unregister()?;
    println!("{} hits, {} missed; lengths summed by the handler: {}", stats.hits, stats.nmissed, LENGTHS.load(Relaxed));
    assert_eq!((stats.hits, LENGTHS.load(Relaxed)), (4, 32));
    assert!(during.iter().all(|&c| c == before), "the handler changed every seed to 1");
    assert_ne!(example_checksum(black_box(2), 8), before, "unregistered: seed 2 is seed 2 again");
    Ok(())
}
