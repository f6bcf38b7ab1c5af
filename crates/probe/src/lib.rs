//! kprobes for a Linux process: the engine behind the `dynprobe` crate, which is the one to
//! depend on (it re-exports what a program needs from here, under the same names).
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
//! # extern crate dynprobe_probe as dynprobe;
//! use dynprobe::{sym, Probe};
//! let probe = Probe::at(sym!("work")).on_hit(|regs| regs.set_arg(0, 42)).register()?;
//! // every call of work(x) now runs as work(42)
//! probe.unregister()?;
//! # Ok::<(), dynprobe::ProbeError>(())
//! ```
//!
//! Generic logic lives in `registry`, `site`, `optimizer`, `retprobe` and `thread_slot`; what
//! depends on the instruction set lives under `arch/` (the kernel's `kernel/kprobes.c` versus
//! `arch/x86/kernel/kprobes/`).

mod arch;
mod counter;
mod error;
mod exec_env;
mod guard;
pub mod ifunc;
mod light;
mod location;
mod optimizer;
pub mod own_thread;
pub mod point;
mod probe;
mod registry;
mod retprobe;
mod signals;
mod site;
mod thread_slot;

pub use arch::{hit_xmm, light_width, vector_width, Regs};
pub use error::ProbeError;
pub use exec_env::{carry_into_exec, exec_environment_carried, stop_carrying_into_exec};
pub use location::Location;
pub use optimizer::stop_optimizer;
pub use own_thread::current_thread_is_own;
pub use point::RETURNS_TWICE;
pub use probe::{Probe, ProbeHandle, ProbeInfo, ProbeStats};
#[doc(hidden)]
pub use registry::BLACKLISTED_CODE;
pub use registry::{
    adopt_symbols, detours, list, optimization_enabled, prepare_optimization, release_caches, set_optimization,
    wait_for_optimizer,
};
pub use retprobe::{
    graph_adopt, graph_enter, graph_enter_from_probe, graph_install, graph_position_from_probe, graph_return_width,
    graph_width, is_return_trampoline, resume_stub_offset, Adopted, GraphEnter, GraphEntry, GraphExit, InFlightCall,
    InstanceData, ReturnProbe, ReturnProbeHandle, ReturnProbeStats, DATA_WORDS, DEFAULT_MAXACTIVE, MAX_DEPTH,
};
pub use signals::{guard_failure, place_signal_guards, release_signals, signal_guards_placed};
pub use thread_slot::{current_thread_slot, set_current_thread_traced, MAX_THREADS};

/// An optimized probe's detour buffer (see `dynprobe_arch`'s `detour` module): the code a
/// thread runs between the probe point's jump and its return into the probed function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetourSpan {
    /// Its first byte (the slow path's `int3`s).
    pub start: u64,
    /// Where the probe point's jump enters it, with the program's `rsp`.
    pub entry: u64,
    /// The relocated copy of the covered instructions.
    pub copy: u64,
    /// The end of its code (after the jump back).
    pub end: u64,
    /// The probe point.
    pub probe_ip: u64,
    /// Bytes of the probed code the copy stands for, from the probe point.
    pub covered: u32,
    /// (offset in the covered run, offset in the detour) of each covered instruction.
    pub copy_map: Vec<(u32, u32)>,
}

/// Raw system calls for handlers and event writers: they reach the kernel without going
/// through the C library, whose functions the program may have probed (`p:libc:write`), so
/// dynprobe's own writes and reads never show up as the program's events or misses.
pub use dynprobe_text::raw;

/// `CLOCK_MONOTONIC` in nanoseconds, safe in any handler (no lock, no allocation, no
/// `errno`, never the C library's `clock_gettime`, which may carry the program's own probe):
/// for timing a call from its entry to its return.
pub use dynprobe_text::raw::monotonic_ns;

/// Whether `handler`, as a probe's pre-handler, may run in a light detour — one that saves
/// only the general registers and the flags — or why not: its machine code and everything
/// it reaches by direct calls are decoded, and any vector, x87 or MXCSR instruction, call
/// through an unknown pointer, or call that may unwind makes it heavy (see
/// [`Probe::on_hit`]). For tests that keep a hot path light.
pub fn light_verdict<F: Fn(&mut Regs)>(handler: &F) -> Result<(), String> {
    registry::prove_light(&[light::code_of(handler)])
}

/// [`light_verdict`] for the function at `code` (an `extern "C" fn` a trampoline calls, a
/// hook), with everything it reaches.
pub fn function_light_verdict(code: u64) -> Result<(), String> {
    registry::prove_light(&[code])
}

/// [`light_verdict`] for a return probe's entry handler.
pub fn entry_light_verdict<F: Fn(&mut Regs, &mut InstanceData) -> bool>(handler: &F) -> Result<(), String> {
    registry::prove_light(&[light::entry_code_of(handler)])
}

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

/// How long [`release_all`] waits for removed sites' memory to come out of quarantine.
const RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes away everything dynprobe put into the process besides probes — the code pools
/// (out-of-line slots, detour buffers), the return trampoline and its instance table, the
/// stop signal's handler, the caches, the signal guards (`SIGTRAP` goes back to the
/// program: [`release_signals`]) — once no probe of the program's is left, so that the process runs
/// no code of dynprobe's and maps none of its memory: the end of an attach session, after
/// which the agent library itself can be unloaded. A removed site's memory is freed after
/// its quarantine, as the kernel frees a detour buffer after a quiescent period (waiting
/// up to 5 s). `Err` names what must stay, and why (a probe left, a thread still to
/// return through the return trampoline, a slot some thread may still run); what could be
/// released is, either way. Call it from no handler and with no probe being placed.
pub fn release_all() -> Result<(), String> {
    // The return probes' backtrace filter first: the signal guards stay while it does.
    registry::release_caches();
    match release_signals() {
        Ok(()) | Err(ProbeError::SignalsInUse { .. }) => {}
        Err(e) => return Err(e.to_string()),
    }
    let probes = registry::probe_count().map_err(|e| e.to_string())?;
    if probes > 0 {
        // With a call still to return through the return trampoline, the probe that hides
        // it from backtraces stays, and so do the signal guards: say why.
        return Err(match retprobe::release_trampoline() {
            Err(why) => format!(
                "the return trampoline stays, with the probe that hides it from backtraces and the signal \
                 guards: {why}"
            ),
            Ok(()) => format!("{probes} probes are still registered"),
        });
    }
    // Again, now that the guards are gone too: the symbol tables go with the last site.
    registry::release_caches();
    let mut kept = Vec::new();
    if !registry::drain_quarantine(RELEASE_TIMEOUT).map_err(|e| e.to_string())? {
        kept.push(
            "the memory of a removed probe some thread may still run (a signal handler's frame returns into it)"
                .to_string(),
        );
    }
    if let Err(why) = retprobe::release_trampoline() {
        kept.push(format!("the return trampoline: {why}"));
    }
    // A thread created a moment ago by one that blocks SIGTRAP starts in dynprobe's code.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while signals::blocked_starts_pending() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    if signals::blocked_starts_pending() > 0 {
        kept.push(format!(
            "the start trampoline of {} thread(s) created while their creator blocked SIGTRAP, not started yet (or \
             whose pthread_create failed)",
            signals::blocked_starts_pending()
        ));
    }
    // With no probe left, no int3 of ours is either: the program's own SIGTRAP action goes
    // back (release_signals did it, but the stops above install the dispatcher again, as
    // every patching transaction does), and so does the stop signal's.
    if let Err(e) = dynprobe_text::trap::uninstall() {
        kept.push(e.to_string());
    }
    if kept.is_empty() {
        if let Err(e) = dynprobe_text::stop::uninstall_handler() {
            kept.push(e.to_string());
        }
    }
    if !counter::release_unused() {
        kept.push("the hit counters of a probe not yet freed".to_string());
    }
    let mapped = dynprobe_text::pool::release_unused();
    if kept.is_empty() && mapped > 0 {
        kept.push(format!("{mapped} bytes of code pools still in use"));
    }
    match kept.is_empty() {
        true => Ok(()),
        false => Err(kept.join("; ")),
    }
}

/// The ids of this process's threads (`/proc/self/task`), read without the C library's
/// `opendir` (which allocates with `malloc`: on a thread of dynprobe's, that would start a
/// malloc arena of its own). `Err` is the errno.
pub fn thread_ids() -> Result<Vec<i32>, i32> {
    let mut tids = Vec::new();
    dynprobe_text::stop::for_each_task(|tid| tids.push(tid))?;
    Ok(tids)
}

/// The signal dynprobe stops the program's threads with while it changes their code; a
/// thread that blocks it cannot be stopped, and removing a probe whose jump it may be in
/// waits for it (and fails after a timeout, to be tried again).
pub fn stop_signal() -> i32 {
    dynprobe_text::stop::stop_signal()
}

/// The signals thread `tid` of this process blocks now (bit `n - 1` for signal `n`, from
/// `SigBlk` in `/proc/self/task/<tid>/status`, see proc(5)); `None` when it is gone.
pub fn blocked_signals(tid: i32) -> Option<u64> {
    dynprobe_text::stop::blocked_signals(tid)
}

/// The listing of every registered probe, one line each, like the kernel's debugfs
/// `kprobes/list`.
pub fn format_list() -> String {
    list().iter().map(|p| format!("{p}\n")).collect()
}
