//! Dynamic ftrace for a Linux process (the kernel's `kernel/trace/ftrace.c` and its
//! function-graph tracer): finds the functions to trace, patches their entry sites in one
//! batch, and records every entry and exit into per-thread ring buffers.
//!
//! ```text
//!   Selection::new(symbols, filter)      which functions, and how each entry is patched:
//!                                        the compiler's NOP (mcount, patchable) if any,
//!                                        else a probe on the first instruction
//!   Tracer::start(selection, ring, ..)   return hooks ready, NOPs -> calls in one batch,
//!                                        entry probes placed
//!   every call:  site -> stub -> caller -> entry record, return address diverted
//!   every return: light sled -> exit record -> the real return address
//! ```
//!
//! Exits are caught by return-address replacement on the probe layer's per-thread instance
//! stacks (shared with return probes, as the kernel's fprobe shares `rethook` with
//! kretprobes), so `longjmp`, exceptions, signals and `fork` are handled there: a call left
//! without returning is reported as unwound when that is noticed.

mod batch;
pub mod error;
pub mod filter;
mod graph;
mod inflight;
pub mod select;

pub use error::FtraceError;

/// What the tracer's entry caller saves of the vector state around its dispatcher: nothing
/// when the dispatcher is proven to leave it alone (`dynprobe_probe::graph_width`), which
/// the light return trampoline then matches.
pub fn trampoline_width() -> dynprobe_arch::native::detour::VectorWidth {
    dynprobe_probe::graph_width(graph::caller_dispatch as *const () as u64)
}
pub use filter::{Filter, Pattern};
pub use inflight::InFlight;
pub use select::{Selection, SiteMethod, TracedFunction};

use dynprobe_events::clock::Clock;
use dynprobe_events::marker::MarkerRecords;
use dynprobe_events::model::{RefusedSite, SiteSummary};
use dynprobe_events::ring::RingFile;
use dynprobe_probe::{Probe, ProbeHandle, Regs};

/// Where the calling thread's next event goes, for events recorded beside its calls (a
/// static marker's hits): its ring, and the time and call depth to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPosition {
    /// The thread's ring (its thread slot).
    pub slot: usize,
    /// The thread id.
    pub tid: u32,
    /// The depth a call entered now would have: the event is inside the calls of lower depth.
    pub depth: u16,
    /// The clock now, in the ring file's ticks.
    pub time: u64,
}

/// How `record -a`'s description of the calls (written by the CLI, read by the agent) keys a
/// shared library's functions: section `n` (1-based, in file order) keys them
/// `n << LIBRARY_KEY_SHIFT | link-time address`, so that keys stay distinct across modules
/// (link-time addresses of an x86-64 shared object are far below 2^48); the main
/// executable's keys are its link-time addresses.
pub const LIBRARY_KEY_SHIFT: u32 = 48;

/// What `record -a` records with each call (uftrace's `-a`): the values its entry record and
/// its exit record carry. Called on the traced thread at every entry and exit of a traced
/// function, after the call is entered (so on the calls [`Tracer`] records only), with the
/// thread's calls untraced meanwhile: implementations allocate nothing, take no lock and read
/// memory without faulting (raw system calls; see `dynprobe::fetch`).
pub trait CallValues: Send + Sync {
    /// Adds the arguments of function `id`'s call (none when it has no description) to `out`:
    /// `regs` holds the integer argument registers and `rsp` (pointing at the return
    /// address), `vector` the low 64 bits of xmm0–7 (`None` when the entry's path could not
    /// read them: the values they hold are recorded as unavailable).
    fn entry(&self, id: u32, regs: &Regs, vector: Option<&[u64; 8]>, out: &mut MarkerRecords);
    /// Adds the return value of function `id`'s call to `out`: `rax` and the low 64 bits of
    /// xmm0 as it returned.
    fn exit(&self, id: u32, rax: u64, xmm0: u64, out: &mut MarkerRecords);
}

/// Function tracing in progress in this process (one per process: records go to one ring
/// file).
pub struct Tracer {
    /// Whether calls carry values (`record -a`): the entry sites use the dispatchers that
    /// fetch them.
    values: bool,
    functions: Vec<TracedFunction>,
    summary: SiteSummary,
    patched: Vec<batch::PatchedSite>,
    probes: Vec<ProbeHandle>,
}

/// When a tracer's records begin ([`Tracer::start_with_values`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recording {
    /// As soon as the sites are patched.
    Now,
    /// In a process that was already running (`dynprobe record -p`): the sites are patched
    /// but nothing is recorded until [`Tracer::adopt_in_flight`] has found the calls
    /// already in flight on every thread and published the recording.
    AfterAdoption,
}

impl Tracer {
    /// Starts tracing the functions of `selection`: records go to `ring` (one ring per
    /// thread slot, so it needs [`dynprobe_probe::MAX_THREADS`] rings), timed by `clock`;
    /// calls deeper than `max_depth` are not recorded. Sites that cannot be patched are
    /// listed in the [`summary`](Self::summary), not errors; an error means nothing is
    /// traced.
    pub fn start(selection: Selection, ring: RingFile, clock: Clock, max_depth: usize) -> Result<Tracer, FtraceError> {
        Tracer::start_with_values(selection, ring, clock, max_depth, None, Recording::Now)
    }

    /// [`start`](Self::start), the calls carrying the `values` given (`record -a`), the
    /// recording beginning as `recording` says. With values the entry sites call a
    /// dispatcher that fetches them and that is not proven light: its caller saves the
    /// vector state, and so does the return trampoline (the first tracer of a process
    /// chooses the exit hook for its life: a later one with values after one without
    /// records its exits without them).
    pub fn start_with_values(
        selection: Selection,
        ring: RingFile,
        clock: Clock,
        max_depth: usize,
        values: Option<Box<dyn CallValues>>,
        recording: Recording,
    ) -> Result<Tracer, FtraceError> {
        if ring.rings() < dynprobe_probe::MAX_THREADS {
            return Err(FtraceError::TooFewRings { rings: ring.rings(), needed: dynprobe_probe::MAX_THREADS });
        }
        let with_values = values.is_some();
        let output = graph::Output { ring, clock, max_depth, tag: graph::next_tag(), values };
        if !graph::set_output(output, recording == Recording::Now) {
            return Err(FtraceError::AlreadyRunning);
        }
        let exit_hook: fn(&dynprobe_probe::GraphExit) =
            if with_values { graph::on_exit_values } else { graph::on_exit };
        // From here a failure ends the recording as `end` does: the output retired, its
        // ring let go of (a tracer that failed to start left its ring mapped, 64 GiB of
        // address space in the process it was to record, and any later start refused).
        if let Err(e) = dynprobe_probe::graph_install(exit_hook) {
            graph::retire_output();
            return Err(e.into());
        }
        let mut tracer = Tracer {
            values: with_values,
            functions: Vec::new(),
            summary: SiteSummary::default(),
            patched: Vec::new(),
            probes: Vec::new(),
        };
        if let Err(e) = tracer.add(selection) {
            // `add` leaves nothing patched when it fails.
            let _ = tracer.end();
            return Err(e);
        }
        Ok(tracer)
    }

    /// Traces the functions of `selection` too (a library `dlopen`ed since the start, chosen
    /// by [`Selection::new_modules`] with ids following this tracer's): its NOPs in one
    /// batch, its entry probes armed together. Returns how many sites were patched; the
    /// [`summary`](Self::summary) adds them up.
    pub fn add(&mut self, selection: Selection) -> Result<u64, FtraceError> {
        let found = selection.counts();
        let Selection { mut functions, mut refused, pending } = selection;
        // The return hooks carry the output's tag above the id (see `graph::Output::tag`).
        functions.retain(|f| {
            let fits = f.id < 1 << graph::ID_BITS;
            if !fits {
                refused.push(batch::refusal(f, f.addr, format!("more than 2^{} functions traced", graph::ID_BITS)));
            }
            fits
        });
        // The newest selection knows which library patterns still wait for their library.
        self.summary.pending = pending;
        self.summary.refused.extend(refused);
        let started = std::time::Instant::now();
        let dispatch = match self.values {
            true => graph::caller_dispatch_values as *const () as u64,
            false => graph::caller_dispatch as *const () as u64,
        };
        let batch = batch::enable(&functions, dispatch)?;
        let took = started.elapsed().as_nanos() as u64;
        self.summary.patch_ns = Some(self.summary.patch_ns.unwrap_or(0) + took);
        self.summary.refused.extend(batch.refused);
        // Entry probes are placed disarmed, their detours prepared, then armed together:
        // one stop of the other threads for all of them, like the NOPs, and those that can
        // be jump-optimized armed directly as jumps — no breakpoint phase, so no call of
        // the program's (or of this set-up's own, into a traced C library) ever traps on
        // them.
        let mut probes = Vec::new();
        let mut probed = Vec::new();
        for f in functions.iter().filter(|f| f.method == SiteMethod::Entry) {
            let id = f.id;
            let probe = match self.values {
                // The values read xmm0-7 as the probe's path saved them (`hit_xmm`): the
                // dispatcher runs before and may have used them itself.
                true => Probe::at(f.addr).on_hit(move |regs| graph::probe_entry_values(id, regs)).reads_vectors(),
                false => Probe::at(f.addr).on_hit(move |regs| graph::probe_entry(id, regs)),
            };
            match probe.disabled().register() {
                Ok(handle) => {
                    probes.push(handle);
                    probed.push(f);
                }
                Err(e) => self.summary.refused.push(batch::refusal(f, f.addr, e.to_string())),
            }
        }
        if !probes.is_empty() && dynprobe_probe::optimization_enabled() {
            // A failure leaves the probes breakpoint probes, for the optimizer to try again.
            let _ = dynprobe_probe::prepare_optimization();
        }
        if let Err(e) = ProbeHandle::enable_all(&probes) {
            for (probe, f) in probes.iter().zip(&probed).filter(|(p, _)| !p.is_enabled()) {
                let reason = format!("its breakpoint could not be armed: {e}");
                self.summary.refused.push(batch::refusal(f, probe.address(), reason));
            }
        }
        let probes = keep_optimized(probes, &probed, &mut self.summary.refused);
        let entry_patched = probes.iter().filter(|p| p.is_enabled()).count() as u64;
        let mut total = 0;
        for (kind, found) in found {
            let patched = match kind {
                "entry" => entry_patched,
                k => batch.patched.iter().filter(|p| p.kind == k).count() as u64,
            };
            total += patched;
            match self.summary.kinds.iter_mut().find(|(k, _, _)| k == kind) {
                Some((_, f, p)) => {
                    *f += found;
                    *p += patched;
                }
                None => self.summary.kinds.push((kind.to_string(), found, patched)),
            }
        }
        self.functions.extend(functions);
        self.patched.extend(batch.patched);
        self.probes.extend(probes);
        Ok(total)
    }

    /// Forgets the sites whose code was unloaded (their library `dlclose`d): nothing is
    /// written where they were, which is not mapped any more (or is another library's now).
    /// Their functions keep their ids, for the records already made; a later load of the
    /// library is new to [`Self::add`]. Returns how many sites were forgotten.
    pub fn forget_unloaded(&mut self) -> usize {
        let mapped = |addr: u64| dynprobe_probe::raw::read(addr, &mut [0u8]);
        let before = self.patched.len() + self.probes.len();
        self.patched.retain(|site| mapped(site.addr));
        let (gone, kept): (Vec<ProbeHandle>, Vec<ProbeHandle>) =
            std::mem::take(&mut self.probes).into_iter().partition(|probe| !mapped(probe.address()));
        self.probes = kept;
        for probe in gone {
            // Unloaded code has nothing of ours to take out: this only forgets the site (a
            // failure leaves the probe registered, as if leaked, in memory that is gone).
            let _ = probe.unregister();
        }
        before - self.patched.len() - self.probes.len()
    }

    /// Shows the calls already in flight when a recording of a running process starts, and
    /// starts recording (held back by [`Recording::AfterAdoption`]): in one stop of every other
    /// thread, each thread's stack is unwound, the calls of traced functions on it are
    /// tracked from then on (their returns diverted like those of calls entered later, below
    /// them on the thread's instance stack) and recorded as entered before the attach, and
    /// the recording is published, so that every call entered after the stop is recorded.
    /// See the `inflight` module for how and why. An error (the threads could not be
    /// stopped) says why no call in flight is shown; recording starts all the same.
    pub fn adopt_in_flight(&self) -> Result<InFlight, String> {
        let mut walker = inflight::Walker::new(self.functions.iter().map(|f| (f.addr, f.id)));
        let adopted = walker.adopt_and_publish();
        graph::publish_held();
        adopted
    }

    /// The traced functions, by id.
    pub fn functions(&self) -> &[TracedFunction] {
        &self.functions
    }

    /// Sites found, patched and refused (the kernel's `dyn_ftrace_total_info`).
    pub fn summary(&self) -> &SiteSummary {
        &self.summary
    }

    /// The ring file records go to, for a forked child to reopen (see
    /// [`RingFile::reopen_in_child`]) — also while the recording is held back for the
    /// adoption of the calls in flight (`Recording::AfterAdoption`): a child forked then
    /// inherits the patched code all the same, and needs files of its own for the session's
    /// end to find it and give it its code back.
    pub fn ring() -> Option<&'static RingFile> {
        graph::output().or_else(graph::held_output).map(|o| &o.ring)
    }

    /// Calls not recorded because their thread was inside the tracer or a probe handler
    /// already (a signal arriving at that moment) or had no thread slot.
    pub fn missed() -> u64 {
        graph::output().map_or(0, |o| o.ring.missed())
    }

    /// Where an event of the calling thread goes now, from a probe's pre-handler (a
    /// marker's); `None` when nothing is recorded (no tracer, the thread is dynprobe's own,
    /// or it is forking). Allocation-free and lock-free.
    pub fn event_position() -> Option<EventPosition> {
        graph::event_position()
    }

    /// Pushes an event's `records` into the ring of `at`, together (see
    /// [`RingFile::push_all`]). Allocation-free and lock-free.
    pub fn push_event(at: &EventPosition, records: &[dynprobe_events::record::Record]) {
        graph::push_event(at, records)
    }

    /// For a `pthread_atfork` prepare handler: the calling thread's records are dropped (and
    /// counted) until [`Self::fork_done`], so that the child does not write into this
    /// process's ring before it has one of its own.
    pub fn fork_prepare() {
        graph::fork_prepare();
    }

    /// For the parent's `pthread_atfork` handler, and for the child's once it has its own
    /// ring ([`RingFile::reopen_in_child`]).
    pub fn fork_done() {
        graph::fork_done();
    }

    /// Puts every NOP back in one batch and removes the entry probes. Calls in flight still
    /// return through the tracer and are recorded.
    pub fn stop(self) -> Result<(), FtraceError> {
        batch::disable(&self.patched)?;
        ProbeHandle::disable_all(&self.probes)?;
        // Disabled together, removed together: one grace period for all of them.
        ProbeHandle::unregister_all(self.probes)?;
        Ok(())
    }

    /// Ends tracing in a process that goes on running (the end of `dynprobe record -p`):
    /// [`stop`](Self::stop), then nothing more is recorded — calls still in flight return
    /// through the return trampoline to their callers unrecorded — and the ring file is let
    /// go ([`RingFile::let_go_of_file`]). A later [`Tracer::start`] in this process records
    /// into a ring file of its own. Whatever `stop` could not restore is the error; the
    /// recording ends either way.
    pub fn end(self) -> Result<(), FtraceError> {
        let stopped = self.stop();
        graph::retire_output();
        stopped
    }

    /// Frees what [`end`](Self::end) had to keep (the ended outputs and their mappings)
    /// once nothing of the tracer can run any more: no site is patched and no call is still
    /// to return through the return trampoline (`dynprobe_probe::release_all` succeeded).
    pub fn free_ended() {
        graph::free_retired();
    }
}

/// The entry probes that became jumps, or need not; the C library's others are taken out
/// and listed as refused.
///
/// A breakpoint left at the entry of a C library function would kill a `vfork`-like child
/// that calls it: `posix_spawn` (and so `system`) runs its child in the parent's memory
/// after resetting every signal handler to the default, and `SIGTRAP`'s default ends the
/// process. The jumps need no signal. The program's own functions, which that child does
/// not run, keep their breakpoints when they cannot be jump-optimized (short functions).
/// With optimization switched off (`record --no-optimize`) the others get breakpoints, but
/// the C library's entries still get their jumps (the probe layer keeps them, for the same
/// reason), and those that cannot have one are refused here just the same.
fn keep_optimized(
    probes: Vec<ProbeHandle>,
    functions: &[&TracedFunction],
    refused: &mut Vec<RefusedSite>,
) -> Vec<ProbeHandle> {
    if probes.is_empty() {
        return probes;
    }
    if let Err(e) = dynprobe_probe::wait_for_optimizer() {
        refused.push(RefusedSite {
            kind: "entry".into(),
            addr: 0,
            function: String::new(),
            reason: format!("the optimizer did not run ({e}); entry probes stay breakpoints"),
        });
        return probes;
    }
    let (kept, dropped): (Vec<_>, Vec<_>) = probes
        .into_iter()
        .zip(functions)
        .partition(|(p, f)| !dynprobe_symbols::is_c_runtime(&f.module) || !p.is_enabled() || p.info().optimized);
    let (dropped, names): (Vec<ProbeHandle>, Vec<&TracedFunction>) = dropped.into_iter().unzip();
    let reasons: Vec<String> = dropped.iter().map(|p| p.info().not_optimized.unwrap_or_default()).collect();
    // Disarmed in one batch and kept registered, disabled: unregistering each would wait
    // out a grace period apiece.
    if ProbeHandle::disable_all(&dropped).is_err() {
        return kept.into_iter().map(|(p, _)| p).chain(dropped).collect();
    }
    for ((probe, f), why) in dropped.into_iter().zip(names).zip(reasons) {
        let addr = probe.address();
        probe.leak();
        let reason = format!(
            "not jump-optimized ({why}), and a breakpoint there would kill a posix_spawn/vfork child that calls \
             it"
        );
        refused.push(batch::refusal(f, addr, reason));
    }
    kept.into_iter().map(|(p, _)| p).collect()
}
