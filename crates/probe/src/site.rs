//! A patch site: one probed address, shared by every probe registered there (the kernel's
//! aggregate probe), with its original byte and out-of-line code.

use crate::arch::{PreparedSlots, Regs};
use crate::probe::ProbeShared;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::Arc;

/// The probes of a site. Immutable once published: a change publishes a new list and the
/// old one is freed after a grace period, so the trap path reads it without a lock.
pub(crate) type ProbeList = Vec<Arc<ProbeShared>>;

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
    /// True while the `int3` is written; changed only under the registry lock.
    pub(crate) armed: AtomicBool,
    probes: AtomicPtr<ProbeList>,
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
        slots: PreparedSlots,
        probes: ProbeList,
    ) -> Box<PatchSite> {
        let mut site = Box::new(PatchSite {
            addr,
            orig_byte,
            insn_text,
            symbol,
            slots,
            armed: AtomicBool::new(false),
            probes: AtomicPtr::new(Box::into_raw(Box::new(probes))),
        });
        let back: *const PatchSite = &*site;
        if let Ok(exits) = &mut site.slots.post {
            exits.iter_mut().for_each(|exit| exit.site = back);
        }
        site
    }

    /// The current probe list.
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

    /// True when some probe here is enabled.
    pub(crate) fn any_enabled(&self) -> bool {
        self.probes().iter().any(|p| p.enabled())
    }

    /// Runs the enabled probes' pre-handlers in registration order, stopping after one that
    /// diverts `ip`. Returns true when an enabled probe has a post-handler.
    pub(crate) fn run_pre_handlers(&self, regs: &mut Regs) -> bool {
        let mut wants_post = false;
        for probe in self.probes().iter().filter(|p| p.enabled()) {
            probe.count_hit();
            wants_post |= probe.post.is_some();
            if let Some(pre) = &probe.pre {
                call(pre, regs);
                if regs.ip != self.addr {
                    break;
                }
            }
        }
        wants_post
    }

    /// Runs the enabled probes' post-handlers.
    pub(crate) fn run_post_handlers(&self, regs: &mut Regs) {
        for probe in self.probes().iter().filter(|p| p.enabled()) {
            if let Some(post) = &probe.post {
                call(post, regs);
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
    }
}

/// Calls a user handler. A panic must not unwind through the signal frame (that aborts the
/// program); it is contained here and the probed instruction still runs.
fn call(handler: &crate::probe::Handler, regs: &mut Regs) {
    let _ = catch_unwind(AssertUnwindSafe(|| handler(regs)));
}
