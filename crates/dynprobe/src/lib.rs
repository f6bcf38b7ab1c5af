//! dynprobe: the Linux kernel's dynamic instrumentation — kprobes first — for ordinary
//! Linux processes.
//!
//! Probe any instruction of your own process, with the thread's registers in hand:
//!
//! ```no_run
//! use dynprobe::{sym, Probe};
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! static CALLS: AtomicU64 = AtomicU64::new(0);
//! let probe = Probe::at(sym!("work"))
//!     .on_hit(|regs| {
//!         CALLS.fetch_add(1, Ordering::Relaxed);
//!         if regs.arg(0) > 1000 {
//!             regs.set_arg(0, 1000); // a pre-handler may change registers
//!         }
//!     })
//!     .register()?;
//! print!("{}", dynprobe::format_list()); // like the kernel's kprobes/list
//! let counts = probe.unregister()?;      // restores the original bytes
//! println!("{} hits, {} missed", counts.hits, counts.nmissed);
//! # Ok::<(), dynprobe::ProbeError>(())
//! ```
//!
//! The layers underneath — `dynprobe-arch` (instruction facts), `dynprobe-text` (safe code
//! patching), `dynprobe-symbols` (symbol tables) and `dynprobe-probe` (the probes) — are
//! usable on their own; this crate is the one to depend on.

pub use dynprobe_probe::{
    format_list, list, sym, Location, Probe, ProbeError, ProbeHandle, ProbeInfo, ProbeStats, Regs,
};
pub use dynprobe_symbols as symbols;
