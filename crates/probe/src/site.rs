//! A patch site: one probed address, shared by every probe registered there (the kernel's
//! aggregate probe), with its original byte and out-of-line code.

use crate::arch::{PreparedSlots, Regs, SiteDetour};
use crate::guard::HandlerGuard;
use crate::probe::ProbeShared;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};

/// The probes of a site. Immutable once published: a change publishes a new list and the
/// old one is freed after a grace period, so the trap path reads it without a lock.
///
/// What every hit of a light detour asks of the whole list — may its handlers run without
/// the vector state saved? — is answered once, when the list is made, and kept beside the
/// probes: a hit reads one byte instead of walking each probe's verdict.
#[derive(Clone)]
pub(crate) struct ProbeList {
    probes: Vec<Arc<ProbeShared>>,
    /// Every probe's handlers proven light (see `crate::light`).
    light: bool,
    /// The list's one probe, when it is the light detour's common case.
    solo: Option<Solo>,
}

/// A list of one light probe with a pre-handler and no post-handler, not one of dynprobe's
/// own — the common case of a light detour — and what its hit needs of that probe, kept in
/// the list: a hit reaches the flag, the counter cells and the handler one pointer nearer.
/// The pointers are into the probe, which the list holds.
#[derive(Clone, Copy)]
pub(crate) struct Solo {
    enabled: *const AtomicBool,
    hits: crate::counter::Cells,
    pre: *const (dyn Fn(&mut Regs) + Send + Sync),
    /// The return probe whose entry the probe is (null: none), run directly instead of
    /// through `pre`, which would look the thread's slot up again.
    return_entry: *const crate::retprobe::RpShared,
}

impl Solo {
    /// [`PatchSite::run_pre_handlers`] on a light path for a list that is this solo probe
    /// (no post-handler: nothing to return).
    #[inline(always)]
    pub(crate) fn run(&self, regs: &mut Regs, guard: &HandlerGuard) {
        // SAFETY: the probe the pointers are into is held by the list, which the caller
        // read and which outlives its hit (see `PatchSite::probes`).
        if unsafe { &*self.enabled }.load(Ordering::Acquire) {
            self.hits.add(guard.slot_index());
            // SAFETY: the return probe the pointer is into is held (an `Arc`) by the probe,
            // which the list holds, as above.
            match unsafe { self.return_entry.as_ref() } {
                Some(rp) => crate::retprobe::on_entry_found(rp, guard.slot_index(), guard.thread(), regs),
                // SAFETY: as above.
                None => crate::light::call_handler(unsafe { &*self.pre }, regs),
            }
        }
    }
}

impl ProbeList {
    /// The list of `probes`, in the order their handlers run.
    pub(crate) fn new(probes: Vec<Arc<ProbeShared>>) -> ProbeList {
        let light = probes.iter().all(|p| p.light.is_ok());
        let solo = match probes.as_slice() {
            [p] if light && !p.internal && p.post.is_none() => p.pre.as_deref().and_then(|pre| {
                let return_entry = p.return_entry.as_ref().map_or(std::ptr::null(), Arc::as_ptr);
                Some(Solo { enabled: p.enabled_flag(), hits: p.hit_cells()?, pre: pre as *const _, return_entry })
            }),
            _ => None,
        };
        ProbeList { probes, light, solo }
    }

    /// The list's one probe, when it is a [`Solo`].
    #[inline]
    pub(crate) fn solo(&self) -> Option<&Solo> {
        self.solo.as_ref()
    }
}

// SAFETY: `solo` points into the probe the list holds (an `Arc`, immutable but for
// atomics), which is Send and Sync.
unsafe impl Send for ProbeList {}
// SAFETY: as above.
unsafe impl Sync for ProbeList {}

impl std::ops::Deref for ProbeList {
    type Target = [Arc<ProbeShared>];
    fn deref(&self) -> &[Arc<ProbeShared>] {
        &self.probes
    }
}

pub(crate) struct PatchSite {
    /// The probed address.
    pub(crate) addr: u64,
    /// The instruction's first byte, which the `int3` replaces while armed.
    pub(crate) orig_byte: u8,
    /// The probed instruction's disassembly.
    pub(crate) insn_text: String,
    /// `symbol+offset`, or the bare address.
    pub(crate) symbol: String,
    pub(crate) slots: PreparedSlots,
    /// The containing function's name, start and size, when known (needed to optimize).
    pub(crate) function: Option<(String, u64, u64)>,
    /// The site is in the C library or the dynamic linker (see [`Self::jumps_regardless`]);
    /// set by the registry right after `new`.
    pub(crate) c_runtime: bool,
    /// True while the `int3` is written; changed only under the registry lock.
    pub(crate) armed: AtomicBool,
    /// True while the detour jump is written over the `int3` (the probe is optimized).
    pub(crate) optimized: AtomicBool,
    /// Why the site cannot be optimized, once that is known for good.
    pub(crate) not_optimized: Mutex<Option<String>>,
    probes: AtomicPtr<ProbeList>,
    /// The prepared detour, or null; set once under the registry lock, before the first
    /// jump is written, and freed with the site.
    detour: AtomicPtr<SiteDetour>,
}

// SAFETY: the raw pointers inside (the probe list, post exits' back pointers) point to
// heap data owned by this site and freed only by the registry after a grace period.
unsafe impl Send for PatchSite {}
// SAFETY: as above; every field shared with the trap path is immutable or atomic.
unsafe impl Sync for PatchSite {}

impl PatchSite {
    pub(crate) fn new(
        addr: u64,
        orig_byte: u8,
        insn_text: String,
        symbol: String,
        function: Option<(String, u64, u64)>,
        slots: PreparedSlots,
        probes: ProbeList,
    ) -> Box<PatchSite> {
        let mut site = Box::new(PatchSite {
            addr,
            orig_byte,
            insn_text,
            symbol,
            slots,
            function,
            c_runtime: false,
            armed: AtomicBool::new(false),
            optimized: AtomicBool::new(false),
            not_optimized: Mutex::new(None),
            probes: AtomicPtr::new(Box::into_raw(Box::new(probes))),
            detour: AtomicPtr::new(std::ptr::null_mut()),
        });
        let back: *const PatchSite = &*site;
        if let Some(Ok(exits)) = site.slots.post.get_mut() {
            exits.iter_mut().for_each(|exit| exit.site = back);
        }
        site
    }

    /// The current probe list.
    /// Whether every probe here is one of dynprobe's own (signal guards).
    pub(crate) fn internal(&self) -> bool {
        self.probes().iter().all(|p| p.internal)
    }

    /// The first-argument values every probe here is for, when all are (dynprobe's guard
    /// on `syscall()`): a detour at a function entry goes straight on for any other. Empty:
    /// every call runs the handlers.
    pub(crate) fn entry_filter(&self) -> Vec<i32> {
        let probes = self.probes();
        if probes.is_empty() || probes.iter().any(|p| p.entry_filter.is_empty()) {
            return Vec::new();
        }
        let mut values: Vec<i32> = probes.iter().flat_map(|p| p.entry_filter.iter().copied()).collect();
        values.sort_unstable();
        values.dedup();
        values
    }

    /// Whether the site gets its jump even with optimization switched off: dynprobe's own
    /// guards, and the C library's and dynamic linker's code, which `vfork`-like children
    /// and threads being created run with every signal blocked — a breakpoint there would
    /// kill them (see `Module::is_c_runtime`).
    pub(crate) fn jumps_regardless(&self) -> bool {
        self.c_runtime || self.internal()
    }

    pub(crate) fn probes(&self) -> &ProbeList {
        // SAFETY: the pointer is always a leaked Box<ProbeList>, freed only after it was
        // replaced and a grace period passed, so it outlives any reader in a trap handler
        // and any reader holding the registry lock.
        unsafe { &*self.probes.load(Ordering::Acquire) }
    }

    /// Publishes a new probe list; returns the old one, to be freed after a grace period.
    pub(crate) fn publish(&self, list: ProbeList) -> *mut ProbeList {
        self.probes.swap(Box::into_raw(Box::new(list)), Ordering::AcqRel)
    }

    /// The prepared detour, if any.
    pub(crate) fn detour(&self) -> Option<&SiteDetour> {
        // SAFETY: set once from a leaked Box and freed only when the site is dropped.
        unsafe { self.detour.load(Ordering::Acquire).as_ref() }
    }

    /// Installs the prepared detour (once, under the registry lock).
    pub(crate) fn set_detour(&self, detour: SiteDetour) {
        let old = self.detour.swap(Box::into_raw(Box::new(detour)), Ordering::AcqRel);
        assert!(old.is_null(), "a site's detour is prepared once");
    }

    /// The detour while its jump is written.
    fn jump_written(&self) -> Option<&SiteDetour> {
        self.detour().filter(|_| self.optimized.load(Ordering::Acquire))
    }

    /// Where a thread goes after the pre-handlers when nothing diverted it: while the jump
    /// is written, the detour's copy of the covered run (the breakpoint slot would jump back
    /// into the jump's displacement); otherwise the breakpoint slot, which runs only the
    /// probed instruction, so that a probe on a later covered instruction still fires.
    ///
    /// The switch between the two happens with every other thread stopped outside the trap
    /// handler, and the jump writer moves threads it finds in the slot, so a thread never
    /// acts on a stale answer.
    pub(crate) fn resume_after_pre(&self) -> u64 {
        self.jump_written().map_or(self.slots.boost_ip, SiteDetour::copy_ip)
    }

    /// `ip` if a thread may continue there, or its place in the detour's copy when `ip` is
    /// inside the bytes the written jump covers.
    pub(crate) fn redirect(&self, ip: u64) -> u64 {
        self.jump_written().and_then(|d| d.redirect(ip)).unwrap_or(ip)
    }

    /// Whether every probe of `probes` (enabled or not: one may be enabled while a hit runs)
    /// is light, so that a hit may run their handlers in a light detour.
    #[inline]
    pub(crate) fn all_light(probes: &ProbeList) -> bool {
        probes.light && crate::retprobe::graph_hook_light()
    }

    /// Why the site's detour must save the vector state: the first heavy probe's reason.
    pub(crate) fn heavy_reason(&self) -> Option<String> {
        self.probes().iter().find_map(|p| p.light.clone().err())
    }

    /// True when some probe here is enabled.
    pub(crate) fn any_enabled(&self) -> bool {
        self.probes().iter().any(|p| p.enabled())
    }

    /// Runs the enabled probes' pre-handlers in registration order, stopping after one that
    /// diverts `ip`. Returns true when an enabled probe has a post-handler. `LIGHT`: on a
    /// light detour's path, every probe of `probes` light (see [`Self::call`]).
    #[inline]
    pub(crate) fn run_pre_handlers<const LIGHT: bool>(
        &self,
        probes: &ProbeList,
        regs: &mut Regs,
        guard: &HandlerGuard,
    ) -> bool {
        let mut wants_post = false;
        for probe in probes.iter().filter(|p| p.enabled()) {
            probe.count_hit(Some(guard.slot_index()));
            wants_post |= probe.post.is_some();
            if let Some(pre) = &probe.pre {
                Self::call::<LIGHT>(probe, pre, regs);
                if regs.ip != self.addr {
                    break;
                }
            }
        }
        wants_post
    }

    /// Runs the pre-handlers of dynprobe's own probes here (signal guards) for a hit that
    /// found its thread already inside a handler: the program's probes miss it, but a guard
    /// must not (a `sigaction` passed through would replace dynprobe's `SIGTRAP` handler). A
    /// guard only makes raw system calls and rewrites arguments, so it may nest. `frame_mask`
    /// is the mask word the hit's signal frame restores, 0 on the detour path.
    pub(crate) fn run_nested_guards<const LIGHT: bool>(&self, probes: &ProbeList, regs: &mut Regs, frame_mask: usize) {
        if !probes.iter().any(|p| p.internal) {
            return;
        }
        let slot = crate::thread_slot::ThreadSlot::existing();
        let outer = slot.map(|s| s.trap_mask.swap(frame_mask, Ordering::Relaxed));
        for probe in probes.iter().filter(|p| p.internal && p.enabled()) {
            if let Some(pre) = &probe.pre {
                Self::call::<LIGHT>(probe, pre, regs);
            }
        }
        if let (Some(slot), Some(outer)) = (slot, outer) {
            slot.trap_mask.store(outer, Ordering::Relaxed);
        }
    }

    /// Calls a pre-handler: on a light detour's path (`LIGHT`) directly, for a light
    /// handler cannot unwind (a call that may is heavy); elsewhere with its panic contained.
    #[inline(always)]
    fn call<const LIGHT: bool>(probe: &ProbeShared, handler: &crate::probe::Handler, regs: &mut Regs) {
        match LIGHT {
            true => crate::light::call_handler(&**handler, regs),
            false => probe.call(handler, regs),
        }
    }

    /// Runs the enabled probes' post-handlers.
    pub(crate) fn run_post_handlers(&self, regs: &mut Regs) {
        for probe in self.probes().iter().filter(|p| p.enabled()) {
            if let Some(post) = &probe.post {
                probe.call(post, regs);
            }
        }
    }

    /// A hit that could not run handlers (the thread was already inside one).
    pub(crate) fn count_missed(&self) {
        self.probes().iter().filter(|p| p.enabled()).for_each(|p| p.count_missed());
    }
}

impl Drop for PatchSite {
    fn drop(&mut self) {
        // SAFETY: the registry drops a site only after its last grace period.
        drop(unsafe { Box::from_raw(self.probes.load(Ordering::Acquire)) });
        let detour = self.detour.load(Ordering::Acquire);
        if !detour.is_null() {
            // SAFETY: a leaked Box (set_detour); no thread can be in the detour any more.
            drop(unsafe { Box::from_raw(detour) });
        }
    }
}
