//! Return probes (the kernel's kretprobes): an entry handler when a function is called, a
//! return handler when that call returns, and a per-call data area between the two.
//!
//! A return probe is an ordinary [`Probe`] at the function's entry whose pre-handler takes an
//! *instance* from the calling thread's instance stack, records the original return address
//! and the address of the return-address slot there, and replaces the return address with
//! the trampoline entry of that instance (`arch::rethook`). Instances belong to the thread,
//! as in the kretprobe redesign, and each (thread slot, depth) has its own trampoline entry,
//! so the return path knows its instance from the address it was entered at: no lookup, no
//! lock, no allocation, no atomic read-modify-write besides the statistics counters.
//!
//! ```text
//!   STACKS[slot]   top ─┐            instance table (one mmap)
//!                       ▼            [slot * MAX_DEPTH + depth] = { original return address,
//!   depth 0 1 2 3 ...                   return-address slot, probe index, probe id, data }
//! ```
//!
//! Calls that never return normally leave stale instances. A stale one is dropped when a later
//! return goes through an instance below it and it lies deeper on that stack, and when a later
//! entry finds it at or below its own stack pointer with its slot no longer holding its
//! trampoline entry (a `longjmp` or an exception left it). The value check keeps instances on
//! a thread's other stack (a `sigaltstack`, a coroutine's) alive; when such an instance sits
//! above a returning one, the returning one is given back out of order (its slot address
//! becomes 0) and the top comes down past it later. A thread that exits inside a probed
//! function leaves its instances to its slot's next owner, which starts afresh (the slot's
//! generation changed) — except the thread of a forked child, whose stack still holds the
//! parent thread's probed frames. The trampoline entries stay while any instance is in use (and
//! go with the instance table only when none is: `release_trampoline`, at the end of an
//! attach session), and an instance names its probe by index and id, so a return after the
//! probe was unregistered still reaches the right caller and finds no handler.
//!
//! Four concerns, four files: `instances` (the per-thread instance stacks: claiming,
//! committing and ending instances), `graph` (the hooks only the function-graph tracer
//! uses), `sled` (setting up and taking away the instance table, the trampolines and the
//! backtrace filter), and this module, the public [`ReturnProbe`] and its handlers.

use crate::arch::{current_tid, rethook, thread_pointer, Regs, VectorSave};
use crate::counter::PerThreadCounter;
use crate::guard::HandlerGuard;
use crate::thread_slot::{ThreadSlot, MAX_THREADS};
use crate::{Location, Probe, ProbeError, ProbeHandle, ProbeInfo};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{
    compiler_fence, AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

mod graph;
mod instances;
mod sled;

use graph::*;
pub(crate) use graph::{call_graph_hook, graph_hook_light, on_graph_return};
pub use graph::{
    graph_adopt, graph_enter, graph_enter_from_probe, graph_install, graph_position_from_probe, graph_return_width,
    graph_width, is_return_trampoline, resume_stub_offset, Adopted, GraphEnter, GraphEntry, GraphExit, InFlightCall,
};
use instances::*;
use sled::*;
pub(crate) use sled::{release_backtrace_filter, release_trampoline};

/// Words in an instance's data area.
pub const DATA_WORDS: usize = 8;
/// Return-probe instances a thread can have in flight at once, over all return probes
/// (nesting depth of probed calls); deeper calls are counted in `nmissed`.
pub const MAX_DEPTH: usize = 128;
/// The default [`ReturnProbe::maxactive`].
pub const DEFAULT_MAXACTIVE: usize = 64;
/// Return probes registered at once.
const MAX_RETURN_PROBES: usize = 256;
/// How long unregistering waits for a thread to leave the probe's return handler.
const HANDLER_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The per-call data area: filled by the entry handler, read by the return handler (an entry
/// timestamp, the arguments, …). Zeroed before the entry handler runs.
///
/// ```
/// # extern crate dynprobe_probe as dynprobe;
/// # use dynprobe::InstanceData;
/// let mut data = InstanceData::default();
/// data[0] = 42;
/// assert_eq!(data[0], 42);
/// assert_eq!(data.len(), dynprobe::DATA_WORDS);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct InstanceData(pub [u64; DATA_WORDS]);

impl Deref for InstanceData {
    type Target = [u64; DATA_WORDS];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for InstanceData {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// An entry handler: may read and change the argument registers and fill the data area;
/// returns false to not track this call (no return handler runs for it).
type EntryHandler = Box<dyn Fn(&mut Regs, &mut InstanceData) -> bool + Send + Sync + 'static>;
/// A return handler: sees `rax`, `rdx` (the return value), `rsp` and `ip` (the address the
/// function returns to), may change `rax`, `rdx` and `ip`.
type ReturnHandler = Box<dyn Fn(&mut Regs, &InstanceData) + Send + Sync + 'static>;

/// State shared between a [`ReturnProbeHandle`], its entry probe (which a light detour's
/// dispatcher calls [`on_entry_found`] for directly) and the return path (through
/// [`PROBES`]).
pub(crate) struct RpShared {
    /// Index in [`PROBES`].
    index: u32,
    /// Unique over the process's life: an instance of a probe whose index was reused by a
    /// newer probe is told apart by it.
    id: u32,
    maxactive: u8,
    entry: Option<EntryHandler>,
    ret: Option<ReturnHandler>,
    /// The return handler (none counts) and the light return path are proven to leave the
    /// vector state alone: its calls return through the light sled.
    ret_light: bool,
    /// Calls tracked, per thread.
    hits: PerThreadCounter,
    /// Return handler runs, per thread.
    returns: PerThreadCounter,
    nmissed: AtomicU64,
}

impl RpShared {
    #[cold]
    fn miss(&self) {
        self.nmissed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The registered return probes by index; null when free. A pointer is an `Arc` owned by
/// the table, released only once no thread can be running its return handler.
static PROBES: [AtomicPtr<RpShared>; MAX_RETURN_PROBES] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_RETURN_PROBES];

/// The entry probe's pre-handler: takes an instance and diverts the return address.
/// Runs with the thread's handler guard held (by the probe site), in a signal handler or a
/// detour.
fn on_entry(rp: &RpShared, regs: &mut Regs) {
    let Some((slot, thread)) = ThreadSlot::current() else { return rp.miss() };
    on_entry_found(rp, slot, thread, regs);
}

/// [`on_entry`] with the thread's slot already found: what a light detour's dispatcher
/// calls for a site whose one probe is a return probe's entry (see `crate::site::Solo`),
/// inlined there — the entry's own handler call, and the slot's second lookup, were ~2 ns
/// of the light path's ~15.
#[inline(always)]
pub(crate) fn on_entry_found(rp: &RpShared, slot: usize, thread: &ThreadSlot, regs: &mut Regs) {
    let rsp = regs.rsp;
    let Some(c) = claim(slot, thread, rsp) else { return rp.miss() };
    // Instances at the top already divert this return-address slot: other return probes on
    // this same call (ours joins them, see `on_return`), or this very probe when the thread
    // came back to the entry without a new call (a loop whose head is the first instruction,
    // a tail call to itself), which is no new call to track.
    if c.shared && tracked_by(c.base, c.top, rsp, rp.index, rp.id) {
        return;
    }
    let maxactive = usize::from(rp.maxactive);
    if c.top == MAX_DEPTH || (c.top >= maxactive && in_flight_of(c.base, c.top, rp.index, rp.id) >= maxactive) {
        return rp.miss();
    }
    // SAFETY: the instance at `top` is free and only this thread uses its slot's instances.
    let inst = unsafe { &mut *instance(c.base + c.top) };
    // Only when not zero already: a hit's stores are much of what it costs (on an Intel
    // host, eight stores were ~4 ns of a return probe), and an area no handler wrote stays
    // zero. Read in one pass, one branch (a branch per word cost more than the stores).
    // Word by word: a struct load or store is compiled to vector moves, which a light
    // detour does not allow (see `crate::light`).
    // SAFETY: words of the instance, which only this thread uses.
    let dirty = inst.data.0.iter().fold(0, |any, word| any | unsafe { std::ptr::read_volatile(word) });
    if dirty != 0 {
        for word in inst.data.0.iter_mut() {
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile(word, 0) };
        }
    }
    if let Some(entry) = &rp.entry {
        if !call_entry_handler(&**entry, regs, &mut inst.data) || regs.rsp != rsp {
            return;
        }
    }
    // A return handler proven light, on a call no other instance diverts, returns
    // through the sled that saves the general registers only; any other through the one
    // that saves every register (a graph instance or another probe joining this call later
    // writes that one's entry).
    let sled = match rp.ret_light && !c.shared {
        true => &rethook::RP_LIGHT,
        false => &rethook::FULL,
    };
    commit(&c, rsp, rp.index, rp.id, sled);
    rp.hits.add(Some(slot));
}

/// The one place a return probe's entry handler is called from: the light proofs do not
/// walk into it (a `dyn` call); each entry handler is proven from its own code.
#[inline(never)]
pub(crate) fn call_entry_handler(
    handler: &(dyn Fn(&mut Regs, &mut InstanceData) -> bool + Send + Sync),
    regs: &mut Regs,
    data: &mut InstanceData,
) -> bool {
    handler(regs, data)
}

/// Where a call that returned into a return trampoline goes on, and its thread's handler
/// guard, still held — `None` when the thread was inside a handler already (the mark then is
/// not this path's). The trampoline's code lets go of the guard once no code of the
/// dispatcher's runs any more ([`HandlerGuard::cleared_by_trampoline`]): a thread between
/// giving its instance back and leaving the dispatcher still counts as using the trampoline.
pub(crate) struct Resume {
    /// The original return address (or where a handler sent the call).
    pub(crate) ip: u64,
    /// The guard the return path took, marked `RETURNING`. (`None` leaves the thread
    /// unseen by the trampoline's release once its instance is given back: a thread with
    /// no slot — a coroutine moved to a thread that never reached dynprobe — or one inside
    /// a handler already, which a call entered outside it can only return to by a switch
    /// of stacks inside the handler.)
    pub(crate) guard: Option<HandlerGuard>,
}

/// The return path, called by the trampoline with the index of the instance whose entry the
/// function returned into and the return registers; says where execution continues.
/// `vectors`: where the trampoline saved the vector registers, for the handlers
/// (`crate::hit_xmm`).
#[inline]
pub(crate) fn on_return(index: usize, regs: &mut Regs, vectors: VectorSave) -> Resume {
    return_path::<false>(index, regs, vectors)
}

/// [`on_return`] for the light sled: only a light probe's calls return through it (see
/// `on_entry`), and its handler is called without `catch_unwind` (it cannot unwind).
///
/// Inlined into the sled's dispatcher, with a path of its own for the call such a sled
/// sees nearly always: its instance the top of the thread's stack and alone at its
/// return-address slot (nothing abandoned above it to drop, no other instance to end with
/// it). Anything else takes the general path, out of line.
#[inline(always)]
pub(crate) fn on_return_light(index: usize, regs: &mut Regs) -> Resume {
    let slot = index / MAX_DEPTH;
    let guard = HandlerGuard::enter_returning(slot);
    // SAFETY: the trampoline entry says this thread pushed this instance.
    let inst = unsafe { &*instance(index) };
    if inst.probe == GRAPH || !ends_alone(index, regs.rsp) {
        drop(guard);
        return on_return_light_general(index, regs);
    }
    regs.ip = inst.orig;
    if guard.is_some() {
        run_return_handler::<true>(slot, inst, regs);
    }
    give_back_alone(index);
    Resume { ip: regs.ip, guard }
}

/// [`on_return_light`]'s general path: every case [`end_calls`] handles.
#[inline(never)]
fn on_return_light_general(index: usize, regs: &mut Regs) -> Resume {
    return_path::<true>(index, regs, VectorSave::NONE)
}

#[inline(always)]
fn return_path<const LIGHT: bool>(index: usize, regs: &mut Regs, vectors: VectorSave) -> Resume {
    let guard = HandlerGuard::enter_returning(index / MAX_DEPTH);
    if let (false, Some(guard)) = (LIGHT, &guard) {
        guard.thread().vectors.store(vectors.word(), Ordering::Relaxed);
    }
    // SAFETY: the trampoline entry says this thread pushed this instance.
    regs.ip = unsafe { (*instance(index)).orig };
    let rsp = regs.rsp;
    end_calls(index, rsp, |slot, k, inst| {
        if inst.probe == GRAPH {
            graph_exit(slot, k, inst, false, regs.rax);
        } else if guard.is_some() {
            run_return_handler::<LIGHT>(slot, inst, regs);
        }
    });
    if let (false, Some(guard)) = (LIGHT, &guard) {
        guard.thread().vectors.store(0, Ordering::Relaxed);
    }
    Resume { ip: regs.ip, guard }
}

/// The one place a light return probe's handler is called from (see
/// `crate::light::call_handler`): the proofs stop here, each return handler is proven on its
/// own.
#[inline(never)]
pub(crate) fn call_return_handler(
    handler: &(dyn Fn(&mut Regs, &InstanceData) + Send + Sync),
    regs: &mut Regs,
    data: &InstanceData,
) {
    handler(regs, data)
}

#[inline]
fn run_return_handler<const LIGHT: bool>(slot: usize, inst: &Instance, regs: &mut Regs) {
    let stack = stack(slot);
    stack.dispatching.store(inst.probe + 1, Ordering::Relaxed);
    // Unregistering clears the table entry, then waits out a stop of every thread, then
    // waits for `dispatching`: this store is ordered before the load below by program
    // order on this thread, and the stop's signal delivery publishes it.
    compiler_fence(Ordering::SeqCst);
    // Masked: no index check may panic on the light path (probe indices are below it).
    let rp = PROBES[inst.probe as usize & (MAX_RETURN_PROBES - 1)].load(Ordering::Acquire);
    if !rp.is_null() {
        // SAFETY: non-null entries are live Arcs; unregistering frees one only after it
        // saw `dispatching` clear of its index.
        let rp = unsafe { &*rp };
        if rp.id == inst.id {
            rp.returns.add(Some(slot));
            match (&rp.ret, LIGHT) {
                (None, _) => {}
                (Some(handler), true) => call_return_handler(&**handler, regs, &inst.data),
                // A panic must not unwind into the trampoline: contained and counted here.
                (Some(handler), false) => {
                    if catch_unwind(AssertUnwindSafe(|| handler(regs, &inst.data))).is_err() {
                        crate::count_handler_panic();
                    }
                }
            }
        }
    }
    stack.dispatching.store(0, Ordering::Release);
}

/// A return probe to be registered (the kernel's `kretprobe`): where, how many calls per
/// thread it tracks at once, and what runs at entry and at return.
///
/// ```no_run
/// # extern crate dynprobe_probe as dynprobe;
/// use dynprobe::{monotonic_ns, sym, ReturnProbe};
/// use std::sync::atomic::{AtomicU64, Ordering};
/// static TOTAL_NS: AtomicU64 = AtomicU64::new(0);
/// let probe = ReturnProbe::at(sym!("work"))
///     .on_entry(|_regs, data| {
///         data[0] = monotonic_ns();
///         true // track this call
///     })
///     .on_return(|regs, data| {
///         TOTAL_NS.fetch_add(monotonic_ns() - data[0], Ordering::Relaxed);
///         let _result = regs.retval();
///     })
///     .register()?;
/// // ... the program runs ...
/// let stats = probe.unregister()?;
/// println!("{} calls, {} ns, {} missed", stats.hits, TOTAL_NS.load(Ordering::Relaxed), stats.nmissed);
/// # Ok::<(), dynprobe::ProbeError>(())
/// ```
#[must_use = "a return probe is placed only by `.register()`"]
pub struct ReturnProbe {
    location: Location,
    maxactive: usize,
    entry: Option<EntryHandler>,
    ret: Option<ReturnHandler>,
    enabled: bool,
    /// The entry handler's code, for the light proof.
    entry_code: Option<u64>,
    /// The return handler's code, for the light proof.
    ret_code: Option<u64>,
    /// The handlers read the vector registers ([`ReturnProbe::reads_vectors`]).
    reads_vectors: bool,
}

impl ReturnProbe {
    /// A return probe on the function at `location` (a symbol, `symbol+0`, or the address of
    /// a function's first instruction).
    pub fn at(location: impl Into<Location>) -> ReturnProbe {
        ReturnProbe {
            location: location.into(),
            maxactive: DEFAULT_MAXACTIVE,
            entry: None,
            ret: None,
            enabled: true,
            entry_code: None,
            ret_code: None,
            reads_vectors: false,
        }
    }

    /// The most calls of this function one thread may have in flight with their return
    /// tracked (recursion); a call beyond it runs untracked and counts in `nmissed`. At most
    /// [`MAX_DEPTH`]; default [`DEFAULT_MAXACTIVE`].
    pub fn maxactive(mut self, n: usize) -> ReturnProbe {
        self.maxactive = n.min(MAX_DEPTH);
        self
    }

    /// The entry handler: runs at the function's first instruction with every register (it
    /// may change the arguments) and the call's zeroed data area; returning false leaves the
    /// call untracked (the kernel's non-zero `entry_handler` result).
    pub fn on_entry(
        mut self,
        handler: impl Fn(&mut Regs, &mut InstanceData) -> bool + Send + Sync + 'static,
    ) -> ReturnProbe {
        self.entry_code = Some(crate::light::entry_code_of(&handler));
        self.entry = Some(Box::new(handler));
        self
    }

    /// Whether the return handler, and the light sled's return path, are proven to leave
    /// the vector state alone (see [`crate::light_verdict`]); installs that sled if so.
    fn return_path_light(&self, setup: &mut Setup) -> bool {
        let proven = |roots: &[u64]| crate::registry::prove_light(roots).is_ok();
        let handler = !self.reads_vectors && self.ret_code.is_none_or(|code| proven(&[code]));
        handler && proven(&[rethook::light_return_dispatch_code()]) && setup.install_light_return().is_ok()
    }

    /// The return handler: runs when a tracked call returns, with `rax`, `rdx` (the return
    /// value), the other registers a function may clobber (`rcx`, `rsi`, `rdi`, `r8`–`r11`,
    /// as it left them), `rsp` (as in the caller after the return) and `ip` (the caller's
    /// return address) set — the callee-saved registers and the flags read as 0 — and the
    /// data area the entry handler filled. Changing `rax`/`rdx` changes the value returned,
    /// changing another of those nine changes what the caller finds in it, changing `ip`
    /// returns there.
    ///
    /// A return handler proven, by decoding, to leave the vector, x87 and MXCSR state alone
    /// (as [`Probe::on_hit`]'s) runs behind a trampoline that saves only the general
    /// registers; any other behind one that saves the vector state too.
    pub fn on_return(mut self, handler: impl Fn(&mut Regs, &InstanceData) + Send + Sync + 'static) -> ReturnProbe {
        self.ret_code = Some(crate::light::return_code_of(&handler));
        self.ret = Some(Box::new(handler));
        self
    }

    /// The handlers read the probed thread's vector registers with [`crate::hit_xmm`] (at
    /// the return, xmm0 holds a `float` or `double` return value): the calls return
    /// through the trampoline that saves them, and the entry probe saves them too.
    pub fn reads_vectors(mut self) -> ReturnProbe {
        self.reads_vectors = true;
        self
    }

    /// Registers the probe disabled; enable it later.
    pub fn disabled(mut self) -> ReturnProbe {
        self.enabled = false;
        self
    }

    /// Places the probe. On error nothing in the process has changed (except that the
    /// trampoline, once written, stays).
    pub fn register(self) -> Result<ReturnProbeHandle, ProbeError> {
        let mut setup = setup()?;
        setup.install()?;
        let index = setup.free_index()?;
        let id = setup.next_id;
        setup.next_id = setup.next_id.wrapping_add(1).max(1);
        let ret_light = self.return_path_light(&mut setup);
        let shared = Arc::new(RpShared {
            index,
            id,
            maxactive: self.maxactive as u8,
            entry: self.entry,
            ret: self.ret,
            ret_light,
            hits: PerThreadCounter::new(),
            returns: PerThreadCounter::new(),
            nmissed: AtomicU64::new(0),
        });
        PROBES[index as usize].store(Arc::into_raw(shared.clone()).cast_mut(), Ordering::Release);
        let for_entry = shared.clone();
        // Registered disarmed, as a return probe's entry: the registry's resolver refuses a
        // point away from the function's entry or on a function that returns twice
        // (`point::resolve`) before any call can be diverted.
        let mut probe = Probe::at(self.location).on_hit(move |regs| on_entry(&for_entry, regs)).disabled();
        probe.return_entry = Some(shared.clone());
        probe.reads_vectors = self.reads_vectors;
        // The entry handler runs behind `call_entry_handler`: proven on its own.
        probe.code_roots.extend(self.entry_code);
        let entry = match probe.register() {
            Ok(entry) => entry,
            Err(e) => {
                // No entry handler ever ran: no instance names this index.
                let raw = PROBES[index as usize].swap(std::ptr::null_mut(), Ordering::AcqRel);
                // SAFETY: `raw` is the Arc stored just above.
                drop(unsafe { Arc::from_raw(raw) });
                return Err(e);
            }
        };
        let armed = if self.enabled { entry.enable() } else { Ok(()) };
        if let Err(e) = armed {
            if entry.unregister().is_ok() {
                let _ = retire(index);
            }
            return Err(e);
        }
        Ok(ReturnProbeHandle { entry: Some(entry), shared })
    }
}

/// Takes a probe out of [`PROBES`] once its entry probe is gone, and frees it when no thread
/// can be running its return handler. Returns false (and keeps the probe's memory for good)
/// when that cannot be established.
fn retire(index: u32) -> Result<(), ProbeError> {
    let raw = PROBES[index as usize].swap(std::ptr::null_mut(), Ordering::AcqRel);
    // Every thread is stopped once: a return path that had not yet read the table now sees
    // null, and one that had has its `dispatching` mark visible to us.
    dynprobe_text::stop::synchronize()?;
    let deadline = Instant::now() + HANDLER_EXIT_TIMEOUT;
    while STACKS.iter().any(|s| s.dispatching.load(Ordering::Acquire) == index + 1) {
        if Instant::now() > deadline {
            return Err(ProbeError::ReturnProbeSetup {
                reason: format!(
                    "a thread stayed in the return handler for {HANDLER_EXIT_TIMEOUT:?}; the probe is removed \
                     but its handlers are kept"
                ),
            });
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    // SAFETY: the Arc stored at registration; no thread can reach it through the table any
    // more.
    drop(unsafe { Arc::from_raw(raw) });
    Ok(())
}

/// A registered return probe. Dropping it unregisters the probe.
#[must_use = "dropping the handle unregisters the return probe at once: keep it, or call `.leak()` to keep the probe for the life of the process"]
pub struct ReturnProbeHandle {
    entry: Option<ProbeHandle>,
    shared: Arc<RpShared>,
}

impl ReturnProbeHandle {
    fn entry(&self) -> &ProbeHandle {
        self.entry.as_ref().expect("a live handle always holds its entry probe")
    }

    /// The entry probe the return probe hooks calls with, for enabling it in one batch with
    /// others ([`ProbeHandle::enable_each`]).
    pub fn entry_probe(&self) -> &ProbeHandle {
        self.entry()
    }

    /// The probed function's address.
    pub fn address(&self) -> u64 {
        self.entry().address()
    }

    /// Calls tracked: an instance was taken and the entry handler (if any) returned true.
    pub fn hits(&self) -> u64 {
        self.shared.hits.sum()
    }

    /// Tracked calls that returned through the trampoline (return handler runs).
    pub fn returns(&self) -> u64 {
        self.shared.returns.sum()
    }

    /// Calls not tracked: `maxactive` or [`MAX_DEPTH`] reached, the thread was already
    /// inside a probe handler, or it was not entered by an ABI-conforming call.
    pub fn nmissed(&self) -> u64 {
        self.shared.nmissed.load(Ordering::Relaxed) + self.entry().nmissed()
    }

    /// True while the probe is enabled.
    pub fn is_enabled(&self) -> bool {
        self.entry().is_enabled()
    }

    /// Whether the probe's calls return through the trampoline that saves only the general
    /// registers: its return handler is proven to leave the vector state alone (see
    /// [`ReturnProbe::on_return`]). A call another probe or the function-graph tracer also
    /// diverts returns through the one that saves everything all the same.
    pub fn returns_light(&self) -> bool {
        self.shared.ret_light
    }

    /// Enables the probe.
    pub fn enable(&self) -> Result<(), ProbeError> {
        self.entry().enable()
    }

    /// Disables the probe: calls from now on are not tracked; calls in flight still run
    /// their return handlers.
    pub fn disable(&self) -> Result<(), ProbeError> {
        self.entry().disable()
    }

    /// The entry probe's line of the listing. Panics when called from inside a handler.
    pub fn info(&self) -> ProbeInfo {
        self.entry().info()
    }

    /// False once [`Self::try_unregister`] removed the entry probe (even if retiring the
    /// return handler failed: that is not retried).
    pub fn is_registered(&self) -> bool {
        self.entry.is_some()
    }

    /// Keeps the return probe registered for the rest of the process's life.
    pub fn leak(self) {
        std::mem::forget(self);
    }

    /// Removes the probe and returns its final counts. Calls still in flight return to
    /// their callers as usual, without running the return handler; once this returns, no
    /// handler of the probe runs any more and they have been dropped.
    pub fn unregister(mut self) -> Result<ReturnProbeStats, ProbeError> {
        let result = self.try_unregister();
        // Failed: the entry probe stays registered, as if leaked; this handle lets go of it.
        if let Some(entry) = self.entry.take() {
            entry.leak();
        }
        result
    }

    /// [`Self::unregister`] that can be tried again: when the entry probe cannot be removed
    /// (a thread blocks the stop signal), the handle keeps it, registered and working, for
    /// a later call. Once the entry probe is gone, the return handler is retired; should a
    /// thread stay in it, that error is final (the probe is removed, its handlers kept).
    pub fn try_unregister(&mut self) -> Result<ReturnProbeStats, ProbeError> {
        let Some(entry) = self.entry.as_mut() else {
            return Ok(ReturnProbeStats { hits: 0, returns: 0, nmissed: 0 });
        };
        let missed_at_entry = entry.try_unregister()?.nmissed;
        self.entry = None;
        retire(self.shared.index)?;
        Ok(ReturnProbeStats {
            hits: self.shared.hits.sum(),
            returns: self.shared.returns.sum(),
            nmissed: self.shared.nmissed.load(Ordering::Relaxed) + missed_at_entry,
        })
    }
}

impl Drop for ReturnProbeHandle {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            if entry.unregister().is_ok() {
                let _ = retire(self.shared.index);
            }
        }
    }
}

impl fmt::Debug for ReturnProbeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.entry {
            Some(entry) => write!(f, "ReturnProbeHandle({:#x})", entry.address()),
            None => write!(f, "ReturnProbeHandle(unregistered)"),
        }
    }
}

/// A return probe's final counts, returned by [`ReturnProbeHandle::unregister`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReturnProbeStats {
    /// Calls tracked.
    pub hits: u64,
    /// Return handler runs.
    pub returns: u64,
    /// Calls not tracked (see [`ReturnProbeHandle::nmissed`]).
    pub nmissed: u64,
}
