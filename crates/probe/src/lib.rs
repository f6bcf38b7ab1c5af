//! kprobes for a Linux process.
//!
//! A [`Probe`] placed at any instruction of the process — a function entry, a symbol plus
//! offset, an address — runs a pre-handler (and optionally a post-handler) with the thread's
//! registers every time a thread reaches it. The instruction's first byte becomes an `int3`;
//! the `SIGTRAP` it raises runs the handlers and then executes the original instruction out
//! of line in a slot that jumps back ("boosted"), so a hit costs one trap. Shortly after,
//! the background optimizer replaces the `int3` with a jump to a detour buffer where the
//! checks allow ([`wait_for_optimizer`], [`set_optimization`]): a hit then costs tens of
//! nanoseconds. A [`ReturnProbe`] adds a handler that runs when the probed function returns.
//!
//! ```no_run
//! use dynprobe_probe::{sym, Probe};
//! let probe = Probe::at(sym!("work")).on_hit(|regs| regs.set_arg(0, 42)).register()?;
//! // every call of work(x) now runs as work(42)
//! probe.unregister()?;
//! # Ok::<(), dynprobe_probe::ProbeError>(())
//! ```
//!
//! Generic logic lives in `registry`, `site`, `optimizer`, `retprobe` and `thread_slot`; what
//! depends on the instruction set lives under `arch/` (the kernel's `kernel/kprobes.c` versus
//! `arch/x86/kernel/kprobes/`).

mod arch;
mod counter;
mod error;
mod guard;
mod location;
mod optimizer;
pub mod own_thread;
mod probe;
mod registry;
mod retprobe;
mod signals;
mod site;
mod thread_slot;

pub use arch::{light_width, Regs};
pub use error::ProbeError;
pub use location::Location;
pub use optimizer::stop_optimizer;
pub use own_thread::current_thread_is_own;
pub use probe::{Probe, ProbeHandle, ProbeInfo, ProbeStats};
pub use registry::{
    list, optimization_enabled, prepare_optimization, release_caches, set_optimization, wait_for_optimizer,
};
pub use retprobe::{
    graph_enter, graph_enter_from_probe, graph_install, graph_position_from_probe, monotonic_ns, GraphEnter,
    GraphEntry, GraphExit, InstanceData, ReturnProbe, ReturnProbeHandle, ReturnProbeStats, DATA_WORDS,
    DEFAULT_MAXACTIVE, MAX_DEPTH, RETURNS_TWICE,
};
pub use signals::{guard_failure, place_signal_guards, release_signals, signal_guards_placed};
pub use thread_slot::{current_thread_slot, set_current_thread_traced, MAX_THREADS};

/// Raw system calls for handlers and event writers: they reach the kernel without going
/// through the C library, whose functions the program may have probed (`p:libc:write`), so
/// dynprobe's own writes and reads never show up as the program's events or misses.
pub use dynprobe_text::raw;

/// Handler runs of every probe kind that panicked, in this process (see
/// [`ProbeHandle::panicked`] for one probe's). A panic in a handler is contained — the
/// probed code runs on — and counted, never silent.
pub fn handler_panics() -> u64 {
    HANDLER_PANICS.load(std::sync::atomic::Ordering::Relaxed)
}

static HANDLER_PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(crate) fn count_handler_panic() {
    HANDLER_PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// How many blocking system calls of the program placing, optimizing or removing probes has
/// cut short (`EINTR`) so far in this process. Threads blocked in the kernel away from the
/// code being changed are never disturbed; this counts the rare call a thread entered in the
/// microseconds between being seen running and being stopped, so that it is reported rather
/// than silent.
pub fn interrupted_system_calls() -> u64 {
    dynprobe_text::stop::interrupted_system_calls()
}

/// The listing of every registered probe, one line each, like the kernel's debugfs
/// `kprobes/list`.
pub fn format_list() -> String {
    list().iter().map(|p| format!("{p}\n")).collect()
}
