//! dynprobe: the Linux kernel's dynamic instrumentation — kprobes, return probes,
//! jump-optimized probes, static markers — for ordinary Linux processes, from Rust.
//!
//! This crate is the one to depend on: everything a program needs to probe itself is
//! re-exported here, under the names below. (The `dynprobe` command-line tool, which traces
//! *other* programs, is built on the same engine: `dynprobe probe --help`.)
//!
//! # Handlers
//!
//! A handler runs on the thread that reached the probe, in a detour or in that thread's
//! `SIGTRAP` handler, possibly on several threads at once. Like a kprobe handler it must
//! not block, allocate or take a lock the program may hold: atomics, lock-free structures,
//! the raw system calls of [`raw`] and [`monotonic_ns`] are the tools. A panic in a handler
//! is contained and counted ([`handler_panics`]); the probed code runs on.
//!
//! # Probes
//!
//! A [`Probe`] goes on any instruction of the process — a function's entry, `symbol+offset`,
//! an address — with a pre-handler ([`Probe::on_hit`]) that sees and may change every
//! register, and optionally a post-handler ([`Probe::after_hit`]) that runs after the probed
//! instruction. [`Probe::register`] returns a [`ProbeHandle`]; dropping the handle removes
//! the probe, so keep it for as long as the probe should stay.
//!
//! ```
//! use dynprobe::{sym, Probe};
//! use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
//!
//! #[no_mangle]
//! #[inline(never)]
//! pub extern "C" fn guide_work(x: u64) -> u64 {
//!     std::hint::black_box(x) * 2
//! }
//!
//! static SEEN: AtomicU64 = AtomicU64::new(0);
//! let probe = Probe::at(sym!("guide_work"))
//!     .on_hit(|regs| {
//!         SEEN.fetch_add(regs.arg(0), Relaxed);
//!         regs.set_arg(0, 10); // every call now runs as guide_work(10)
//!     })
//!     .register()?;
//! assert_eq!(guide_work(std::hint::black_box(3)), 20);
//! let stats = probe.unregister()?; // the original bytes are back
//! assert_eq!((stats.hits, SEEN.load(Relaxed)), (1, 3));
//! assert_eq!(guide_work(std::hint::black_box(3)), 6);
//! # Ok::<(), dynprobe::ProbeError>(())
//! ```
//!
//! A handle that is not kept is a probe removed as soon as it is placed, so the compiler warns
//! about one left unused (every builder and handle is `#[must_use]`); with the warning
//! denied, this does not build:
//!
//! ```compile_fail
//! #![deny(unused_must_use)]
//! # #[no_mangle] #[inline(never)] pub extern "C" fn guide_kept(x: u64) -> u64 { x }
//! # fn main() -> Result<(), dynprobe::ProbeError> {
//! # guide_kept(1);
//! dynprobe::Probe::at(dynprobe::sym!("guide_kept")).on_hit(|_| {}).register()?;
//! # Ok(()) }
//! ```
//!
//! while the same lines with the handle kept do (and so would `.leak()`, which keeps the
//! probe for the life of the process):
//!
//! ```
//! #![deny(unused_must_use)]
//! # #[no_mangle] #[inline(never)] pub extern "C" fn guide_kept(x: u64) -> u64 { x }
//! # fn main() -> Result<(), dynprobe::ProbeError> {
//! # guide_kept(1);
//! let _probe = dynprobe::Probe::at(dynprobe::sym!("guide_kept")).on_hit(|_| {}).register()?;
//! # Ok(()) }
//! ```
//!
//! A probe that cannot be placed is refused with the reason, and changes nothing: an unknown
//! symbol (with the nearest names), an offset inside an instruction, an instruction that
//! cannot run out of line, dynprobe's own code ([`ProbeError`]).
//!
//! # Return probes
//!
//! A [`ReturnProbe`] (the kernel's kretprobe) runs an entry handler at the function's first
//! instruction and a return handler when that call returns, with a per-call data area
//! ([`InstanceData`]) between them.
//!
//! ```
//! use dynprobe::{monotonic_ns, sym, ReturnProbe};
//! use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
//!
//! #[no_mangle]
//! #[inline(never)]
//! pub extern "C" fn guide_square(x: u64) -> u64 {
//!     std::hint::black_box(x) * x
//! }
//!
//! static LAST: AtomicU64 = AtomicU64::new(0);
//! static TOTAL_NS: AtomicU64 = AtomicU64::new(0);
//! let probe = ReturnProbe::at(sym!("guide_square"))
//!     .on_entry(|_regs, data| {
//!         data[0] = monotonic_ns();
//!         true // track this call's return
//!     })
//!     .on_return(|regs, data| {
//!         LAST.store(regs.retval(), Relaxed);
//!         TOTAL_NS.fetch_add(monotonic_ns() - data[0], Relaxed);
//!     })
//!     .register()?;
//! assert_eq!(guide_square(std::hint::black_box(7)), 49);
//! let stats = probe.unregister()?;
//! assert_eq!((stats.hits, stats.nmissed, LAST.load(Relaxed)), (1, 0, 49));
//! # Ok::<(), dynprobe::ProbeError>(())
//! ```
//!
//! # Static markers
//!
//! A [`marker!`] is a 5-byte NOP (plus a record describing its arguments, and a SystemTap SDT
//! note, so perf and bpftrace see it too) until a handler is attached with
//! [`Marker::attach`]; the C header `include/dynprobe/marker.h` makes the same sites in C.
//!
//! ```
//! use dynprobe::marker::{ArgValue, Marker};
//! use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
//!
//! #[inline(never)]
//! fn step(n: u64) {
//!     dynprobe::marker!(guide, step, n);
//! }
//!
//! step(100); // nothing attached: one NOP
//! static SUM: AtomicU64 = AtomicU64::new(0);
//! let handle = Marker::attach("guide:step", |hit| {
//!     if let Some(ArgValue::Unsigned(n)) = hit.arg(0) {
//!         SUM.fetch_add(n, Relaxed);
//!     }
//! })?;
//! (1..=4).for_each(step);
//! let stats = handle.detach()?;
//! assert_eq!((stats.hits, SUM.load(Relaxed)), (4, 10));
//! # Ok::<(), dynprobe::marker::MarkerError>(())
//! ```
//!
//! # Listing
//!
//! [`list`] gives every registered probe ([`ProbeInfo`]), [`format_list`] the same as text,
//! one line each, like the kernel's debugfs `kprobes/list`; [`markers`] lists the marker
//! sites of every loaded module.
//!
//! ```
//! use dynprobe::{sym, Probe};
//!
//! #[no_mangle]
//! #[inline(never)]
//! pub extern "C" fn guide_listed(x: u64) -> u64 {
//!     std::hint::black_box(x) + 1
//! }
//!
//! let probe = Probe::at(sym!("guide_listed")).on_hit(|_| {}).register()?;
//! assert_eq!(guide_listed(std::hint::black_box(1)), 2);
//! let listed = dynprobe::list();
//! assert_eq!(listed.len(), 1);
//! assert_eq!((listed[0].addr, listed[0].symbol.as_str()), (probe.address(), "guide_listed+0x0"));
//! // 0000000000401196  k  guide_listed+0x0    [OPTIMIZED]
//! assert!(dynprobe::format_list().contains("  k  guide_listed+0x0"));
//! probe.unregister()?;
//! assert!(dynprobe::list().is_empty());
//! assert_eq!(guide_listed(std::hint::black_box(1)), 2);
//! # Ok::<(), dynprobe::ProbeError>(())
//! ```
//!
//! # Optimization
//!
//! A probe starts as a breakpoint (an `int3` and a trap per hit); a background optimizer then
//! replaces it with a jump to a detour wherever the checks allow (the kernel's
//! jump-optimized kprobes), so that a hit costs nanoseconds. [`wait_for_optimizer`] waits for
//! it; [`set_optimization`] switches it off and on for every probe, like the kernel's
//! `debug.kprobes_optimization` sysctl.
//!
//! ```
//! use dynprobe::{sym, Probe};
//!
//! #[no_mangle]
//! #[inline(never)]
//! pub extern "C" fn guide_fast(x: u64) -> u64 {
//!     std::hint::black_box(x) ^ 0x5a
//! }
//!
//! let probe = Probe::at(sym!("guide_fast")).on_hit(|_| {}).register()?;
//! dynprobe::wait_for_optimizer()?;
//! assert!(probe.info().optimized, "{}", probe.info());
//! dynprobe::set_optimization(false)?; // every probe traps from now on
//! assert!(!probe.info().optimized);
//! assert_eq!(guide_fast(std::hint::black_box(1)), 0x5b);
//! dynprobe::set_optimization(true)?;
//! dynprobe::wait_for_optimizer()?; // ... and is a jump again
//! assert!(probe.info().optimized);
//! assert_eq!(probe.unregister()?.hits, 1);
//! # Ok::<(), dynprobe::ProbeError>(())
//! ```
//!
//! # Probe specs
//!
//! [`spec`] parses the kernel's `kprobe_events`-like text that `dynprobe probe` takes
//! (`p:libc:malloc size=%rdi:u64`), [`fetch`] runs its fetch arguments inside a handler and
//! [`line`](mod@line) formats events without allocating.
//!
//! Run `cargo run --example` with `probe`, `return_probe`, `marker` or `optimize` for
//! whole programs.

#![deny(missing_docs)]

pub mod fetch;
pub mod line;
pub mod marker;
pub mod spec;

pub use marker::{markers, Marker, MarkerHandle, MarkerHit};

pub use dynprobe_probe::{
    // Listing.
    format_list,
    // Health and the end of a session.
    handler_panics,
    // For handlers.
    hit_xmm,
    interrupted_system_calls,
    list,
    // For handlers.
    monotonic_ns,
    // Optimization.
    optimization_enabled,
    prepare_optimization,
    raw,
    release_all,
    set_optimization,
    stop_optimizer,
    stop_signal,
    // Probes, and what their handlers see.
    sym,
    wait_for_optimizer,
    // Return probes.
    InstanceData,
    Location,
    Probe,
    ProbeError,
    ProbeHandle,
    ProbeInfo,
    ProbeStats,
    Regs,
    ReturnProbe,
    ReturnProbeHandle,
    ReturnProbeStats,
    DATA_WORDS,
    DEFAULT_MAXACTIVE,
};

/// The plumbing the `dynprobe` tool's own crates (the function-graph tracer, the agent
/// library it injects, the ptrace backend, the benchmarks) share with the probe engine.
/// Not part of the API: it changes with them, without notice.
#[doc(hidden)]
pub mod internals {
    pub use dynprobe_probe::{
        adopt_symbols, current_thread_is_own, current_thread_slot, graph_enter, graph_enter_from_probe, graph_install,
        graph_position_from_probe, guard_failure, ifunc, light_width, own_thread, place_signal_guards, point,
        release_caches, release_signals, set_current_thread_traced, signal_guards_placed, thread_ids, vector_width,
        GraphEnter, GraphEntry, GraphExit, MAX_DEPTH, MAX_THREADS, RETURNS_TWICE,
    };
}
