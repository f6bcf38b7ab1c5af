//! The public face of a probe: the builder and the handle.

use crate::arch::Regs;
use crate::counter::PerThreadCounter;
use crate::{registry, Location, ProbeError};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A probe handler. It runs in a signal handler of the probed thread: it may read and change
/// the registers, but should not take locks the probed code may hold (`println!` takes the
/// stdout lock) — atomics and lock-free structures are the safe tools.
pub(crate) type Handler = Box<dyn Fn(&mut Regs) + Send + Sync + 'static>;

/// State shared between a [`ProbeHandle`] and the trap path.
pub(crate) struct ProbeShared {
    pub(crate) addr: u64,
    pub(crate) pre: Option<Handler>,
    pub(crate) post: Option<Handler>,
    /// The return probe whose entry this is (listed as `r`), which a light detour's
    /// dispatcher runs without the pre-handler's closure (see `crate::site::Solo`); the
    /// pre-handler does the same.
    pub(crate) return_entry: Option<Arc<crate::retprobe::RpShared>>,
    /// One of dynprobe's own (a signal guard): not listed.
    pub(crate) internal: bool,
    /// The first-argument values the probe is for, at a function entry (empty: every
    /// call); see `dynprobe_arch::native::detour::DetourSpec::entry_filter`.
    pub(crate) entry_filter: &'static [i32],
    /// Whether the pre-handler may run in a light detour (see `crate::light`), or why not.
    pub(crate) light: crate::light::Verdict,
    enabled: AtomicBool,
    hits: PerThreadCounter,
    nmissed: AtomicU64,
    /// Handler runs that panicked (contained: the probed code still ran).
    panicked: AtomicU64,
}

impl ProbeShared {
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }
    /// The flag [`Self::enabled`] reads, for a probe list's [`Solo`](crate::site::Solo).
    pub(crate) fn enabled_flag(&self) -> *const AtomicBool {
        &self.enabled
    }
    /// The per-thread cells [`Self::count_hit`] adds to, for a probe list's
    /// [`Solo`](crate::site::Solo); `None` when the hits go to the counter's shared cell.
    pub(crate) fn hit_cells(&self) -> Option<crate::counter::Cells> {
        self.hits.cells()
    }
    pub(crate) fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
    }
    /// Counts a hit by the thread owning slot `slot`.
    #[inline]
    pub(crate) fn count_hit(&self, slot: Option<usize>) {
        self.hits.add(slot);
    }
    pub(crate) fn count_missed(&self) {
        self.nmissed.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn hits(&self) -> u64 {
        self.hits.sum()
    }
    pub(crate) fn nmissed(&self) -> u64 {
        self.nmissed.load(Ordering::Relaxed)
    }
    pub(crate) fn panicked(&self) -> u64 {
        self.panicked.load(Ordering::Relaxed)
    }

    /// Calls one of this probe's handlers. A panic must not unwind through the signal
    /// frame or the detour (that aborts the program): it is contained and counted, and
    /// the probed instruction still runs.
    #[inline]
    pub(crate) fn call(&self, handler: &Handler, regs: &mut crate::Regs) {
        // Through the one gate the light proofs know (see `crate::light::call_handler`).
        let call = || crate::light::call_handler(&**handler, regs);
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).is_err() {
            self.panicked.fetch_add(1, Ordering::Relaxed);
            crate::count_handler_panic();
        }
    }
}

/// A probe to be registered: where, and what runs when a thread reaches it.
///
/// ```no_run
/// # extern crate dynprobe_probe as dynprobe;
/// use dynprobe::{sym, Probe};
/// use std::sync::atomic::{AtomicU64, Ordering};
/// static LAST_ARG: AtomicU64 = AtomicU64::new(0);
/// let probe = Probe::at(sym!("work"))
///     .on_hit(|regs| LAST_ARG.store(regs.arg(0), Ordering::Relaxed))
///     .register()?;
/// // ... the program runs; every call of `work` stores its first argument ...
/// println!("{} hits, {} missed", probe.hits(), probe.nmissed());
/// probe.unregister()?;
/// # Ok::<(), dynprobe::ProbeError>(())
/// ```
#[must_use = "a probe is placed only by `.register()`"]
pub struct Probe {
    pub(crate) location: Location,
    pub(crate) pre: Option<Handler>,
    pub(crate) post: Option<Handler>,
    pub(crate) enabled: bool,
    /// See [`ProbeShared::return_entry`].
    pub(crate) return_entry: Option<Arc<crate::retprobe::RpShared>>,
    pub(crate) internal: bool,
    pub(crate) entry_filter: &'static [i32],
    /// The code the light proof starts from: the pre-handler's, and what a return probe's
    /// entry handler runs.
    pub(crate) code_roots: Vec<u64>,
    /// The handlers read the vector registers ([`Probe::reads_vectors`]).
    pub(crate) reads_vectors: bool,
}

impl Probe {
    /// A probe at `location` (a [`Location`], a `&str` such as `"work+0x4"` or
    /// `"libc:malloc"`, or an address).
    pub fn at(location: impl Into<Location>) -> Probe {
        Probe {
            location: location.into(),
            pre: None,
            post: None,
            enabled: true,
            return_entry: None,
            internal: false,
            entry_filter: &[],
            code_roots: Vec::new(),
            reads_vectors: false,
        }
    }

    /// The pre-handler: runs before the probed instruction, with the thread's registers.
    /// Setting `regs.ip` to another address diverts the thread there and skips the probed
    /// instruction and the post-handlers.
    ///
    /// A jump-optimized probe saves only the general registers and the flags around a
    /// handler proven, by decoding its machine code and everything it reaches by direct
    /// calls, to leave the vector, x87 and MXCSR state alone (the listing says
    /// `[OPTIMIZED, light]`); around any other, every vector register too (`[OPTIMIZED]`,
    /// and why). A handler that calls the C library (whose `memcpy` uses AVX), calls
    /// through a pointer or a `dyn` method, or may panic (the unwinder uses vector
    /// registers) is heavy.
    pub fn on_hit(mut self, handler: impl Fn(&mut Regs) + Send + Sync + 'static) -> Probe {
        self.code_roots = vec![crate::light::code_of(&handler)];
        self.pre = Some(Box::new(handler));
        self
    }

    /// The post-handler: runs after the probed instruction completed, with `regs.ip` at the
    /// instruction that comes next (the branch target when a branch was taken). Refused for
    /// `ret` and indirect branches, whose successor is not known in advance.
    pub fn after_hit(mut self, handler: impl Fn(&mut Regs) + Send + Sync + 'static) -> Probe {
        self.post = Some(Box::new(handler));
        self
    }

    /// The handlers read the probed thread's vector registers with [`crate::hit_xmm`]
    /// (a `float` or `double` argument, local or value in a register): every hit saves
    /// them, as for a heavy handler (a light detour leaves them in place, where a handler
    /// cannot read them without vector instructions of its own).
    pub fn reads_vectors(mut self) -> Probe {
        self.reads_vectors = true;
        self
    }

    /// Registers the probe disabled (the kernel's `KPROBE_FLAG_DISABLED`); enable it later.
    pub fn disabled(mut self) -> Probe {
        self.enabled = false;
        self
    }

    /// Places the probe. On error nothing in the process has changed.
    pub fn register(self) -> Result<ProbeHandle, ProbeError> {
        let enabled = self.enabled;
        crate::signals::ensure_guards();
        let shared = registry::register(self)?;
        debug_assert_eq!(shared.enabled(), enabled);
        Ok(ProbeHandle { shared: Some(shared) })
    }

    pub(crate) fn into_shared(self, addr: u64, light: crate::light::Verdict) -> ProbeShared {
        ProbeShared {
            addr,
            light,
            pre: self.pre,
            post: self.post,
            return_entry: self.return_entry,
            internal: self.internal,
            entry_filter: self.entry_filter,
            enabled: AtomicBool::new(self.enabled),
            hits: PerThreadCounter::new(),
            nmissed: AtomicU64::new(0),
            panicked: AtomicU64::new(0),
        }
    }
}

/// A registered probe. Dropping it unregisters the probe (use [`ProbeHandle::leak`] to keep
/// it for the life of the process).
#[must_use = "dropping the handle unregisters the probe at once: keep it, or call `.leak()` to keep the probe for the life of the process"]
pub struct ProbeHandle {
    shared: Option<Arc<ProbeShared>>,
}

impl ProbeHandle {
    fn shared(&self) -> &Arc<ProbeShared> {
        self.shared.as_ref().expect("a live handle always holds its probe")
    }

    /// The probed address.
    pub fn address(&self) -> u64 {
        self.shared().addr
    }

    /// How many times the probe's handlers ran.
    pub fn hits(&self) -> u64 {
        self.shared().hits()
    }

    /// How many hits were not handled because the thread was already inside a handler.
    pub fn nmissed(&self) -> u64 {
        self.shared().nmissed()
    }

    /// How many handler runs panicked. A panic is contained (the probed code runs on as if
    /// the handler had returned) and counted here, never silent.
    pub fn panicked(&self) -> u64 {
        self.shared().panicked()
    }

    /// True while the probe is enabled.
    pub fn is_enabled(&self) -> bool {
        self.shared().enabled()
    }

    /// Enables the probe (arming its site if needed).
    pub fn enable(&self) -> Result<(), ProbeError> {
        registry::set_enabled(self.shared(), true)
    }

    /// Disables the probe; the site's `int3` is removed when no probe there is enabled.
    pub fn disable(&self) -> Result<(), ProbeError> {
        registry::set_enabled(self.shared(), false)
    }

    /// Enables every probe of `probes` in one batch: their `int3`s are written under one stop
    /// of the other threads and one serialization of the cores, as the kernel's batched
    /// `text_poke` does for many sites (use it when arming hundreds of probes: one by one,
    /// each pays its own core serialization). On an error the probes whose site could not
    /// be armed stay disabled.
    pub fn enable_all(probes: &[ProbeHandle]) -> Result<(), ProbeError> {
        let shared: Vec<&Arc<ProbeShared>> = probes.iter().map(ProbeHandle::shared).collect();
        registry::set_enabled_all(&shared, true)
    }

    /// [`Self::enable_all`] for probes held elsewhere (a return probe's entry probe,
    /// [`ReturnProbeHandle::entry_probe`](crate::ReturnProbeHandle::entry_probe), beside
    /// plain ones): one batch, those whose jump optimization is prepared armed directly as
    /// jumps.
    pub fn enable_each(probes: &[&ProbeHandle]) -> Result<(), ProbeError> {
        let shared: Vec<&Arc<ProbeShared>> = probes.iter().map(|p| p.shared()).collect();
        registry::set_enabled_all(&shared, true)
    }

    /// [`Self::enable_all`]'s counterpart: disables every probe of `probes` in one batch.
    pub fn disable_all(probes: &[ProbeHandle]) -> Result<(), ProbeError> {
        let shared: Vec<&Arc<ProbeShared>> = probes.iter().map(ProbeHandle::shared).collect();
        registry::set_enabled_all(&shared, false)
    }

    /// Removes every probe of `probes`, as [`Self::unregister`] does each: those disabled
    /// already and alone at their address (disable them first with [`Self::disable_all`])
    /// in one batch — one grace period and one stop of the threads that could be in their
    /// slots, instead of one per probe — and the others one by one. The first error is
    /// returned; the probes it concerns stay registered and working, as if leaked.
    pub fn unregister_all(probes: Vec<ProbeHandle>) -> Result<(), ProbeError> {
        let shared: Vec<&Arc<ProbeShared>> = probes.iter().map(ProbeHandle::shared).collect();
        let mut removed: Vec<*const ProbeShared> = match registry::unregister_all(&shared) {
            Ok(removed) => removed.into_iter().map(Arc::as_ptr).collect(),
            // One by one, below.
            Err(_) => Vec::new(),
        };
        // Looked up once per probe: sorted, not scanned (70,000 probes scanned so took
        // record -p of node 20 s to end).
        removed.sort_unstable();
        let mut first = Ok(());
        for mut probe in probes {
            if removed.binary_search(&Arc::as_ptr(probe.shared())).is_ok() {
                probe.shared.take();
                continue;
            }
            if let Err(e) = probe.try_unregister() {
                probe.shared.take();
                first = first.and(Err(e));
            }
        }
        first
    }

    /// This probe's line of the listing. Panics when called from inside a probe handler.
    pub fn info(&self) -> ProbeInfo {
        registry::info(self.shared()).expect("a live handle is registered")
    }

    /// Removes the probe. When it was the last one at its address, the original byte is
    /// restored; returns once no thread is still inside this probe's handler or slot, with
    /// the probe's final counts (no handler run is missing from them).
    ///
    /// When that wait cannot complete — a thread blocks the stop signal, or stays in the slot
    /// — the error says why and the probe stays registered and working, as if leaked: it is
    /// never left half-removed.
    pub fn unregister(mut self) -> Result<ProbeStats, ProbeError> {
        let result = self.try_unregister();
        // Failed: the probe stays registered, as if leaked; this handle lets go of it.
        self.shared.take();
        result
    }

    /// [`Self::unregister`] that can be tried again: when the wait cannot complete, the
    /// error says why and the handle keeps the probe (registered, armed, working), so a
    /// later call — once the thread that blocked the stop signal lets it in — removes it.
    /// After a success the handle holds nothing and another call returns zero counts.
    pub fn try_unregister(&mut self) -> Result<ProbeStats, ProbeError> {
        let Some(shared) = self.shared.as_ref() else {
            return Ok(ProbeStats { hits: 0, nmissed: 0, panicked: 0 });
        };
        registry::unregister(shared)?;
        let shared = self.shared.take().expect("checked above");
        Ok(ProbeStats { hits: shared.hits(), nmissed: shared.nmissed(), panicked: shared.panicked() })
    }

    /// False once the probe was removed by [`Self::try_unregister`].
    pub fn is_registered(&self) -> bool {
        self.shared.is_some()
    }

    /// Keeps the probe registered for the rest of the process's life.
    pub fn leak(mut self) {
        self.shared.take();
    }
}

impl Drop for ProbeHandle {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            if let Err(e) = registry::unregister(&shared) {
                // A destructor cannot return the error, and a probe left behind must not go
                // unnoticed: say so (call `unregister` to handle it instead).
                eprintln!(
                    "dynprobe: the probe at {:#x} could not be removed when its handle was dropped ({e}); it \
                     stays registered and working",
                    shared.addr
                );
            }
        }
    }
}

impl fmt::Debug for ProbeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.shared {
            Some(shared) => write!(f, "ProbeHandle({:#x})", shared.addr),
            None => write!(f, "ProbeHandle(unregistered)"),
        }
    }
}

/// A probe's final counts, returned by [`ProbeHandle::unregister`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeStats {
    /// Handler runs.
    pub hits: u64,
    /// Hits not handled (the thread was already inside a handler).
    pub nmissed: u64,
    /// Handler runs that panicked (contained and counted).
    pub panicked: u64,
}

/// One line of the probe listing, like the kernel's debugfs `kprobes/list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeInfo {
    /// The probed address.
    pub addr: u64,
    /// `symbol+offset`, or the bare address when no symbol covers it.
    pub symbol: String,
    /// The probed instruction.
    pub insn: String,
    /// Whether the probe is enabled.
    pub enabled: bool,
    /// Whether the probe has a post-handler.
    pub has_post_handler: bool,
    /// Handler runs.
    pub hits: u64,
    /// Hits not handled (the thread was already inside a handler).
    pub nmissed: u64,
    /// Whether the probe is jump-optimized (a hit is a jump to a detour, not a trap).
    pub optimized: bool,
    /// Why the probe cannot be optimized, when that is known.
    pub not_optimized: Option<String>,
    /// Whether this is the entry probe of a return probe.
    pub return_probe: bool,
    /// Whether the probe's detour saves only the general registers and the flags around
    /// its handlers (all of them proven to leave the vector state alone).
    pub light: bool,
    /// Why the detour saves the vector state too, when it is optimized and not light.
    pub heavy: Option<String>,
}

impl fmt::Display for ProbeInfo {
    /// `0000000000401126  k  work+0x0    [OPTIMIZED, light]`, as in `kprobes/list` (`k`: a
    /// kprobe, `r`: a return probe; `[DISABLED]`, `[OPTIMIZED]` as there, `light` when the
    /// detour saves no vector state), followed by why a probe is not optimized when it cannot
    /// be, or why its detour saves the vector state.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.return_probe { 'r' } else { 'k' };
        write!(f, "{:016x}  {kind}  {}", self.addr, self.symbol)?;
        if !self.enabled {
            write!(f, "    [DISABLED]")?;
        }
        match (self.optimized, self.light) {
            (true, true) => write!(f, "    [OPTIMIZED, light]")?,
            (true, false) => write!(f, "    [OPTIMIZED]")?,
            (false, _) => {}
        }
        if let (true, false, Some(why)) = (self.optimized, self.light, &self.heavy) {
            write!(f, "    (heavy: {why})")?;
        }
        if let Some(reason) = &self.not_optimized {
            write!(f, "    (not optimized: {reason})")?;
        }
        Ok(())
    }
}
