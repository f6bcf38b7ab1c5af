//! What an `int3` at a probe site does on x86-64: run the handlers, then execute the probed
//! instruction out of line in the site's slot ("boosted": the slot ends in a jump back, so
//! the common path takes one trap, not the two of single-stepping).
//!
//! ```text
//!   probe point          slot (within ±2 GiB)
//!   cc <rest of insn>    +0   relocated insn ; jmp  <probe point + len>      boosted path
//!   next insn ...        +64  relocated insn ; int3 (fall-through exit)      post path
//!                                            ; int3 (taken-branch exit) ...
//! ```
//! With a post-handler the thread runs the post path instead; each way out of the
//! instruction ends in its own `int3`, whose trap runs the post-handlers and resumes at the
//! original successor.

use super::regs::VectorSave;
use super::Regs;
use crate::error::ProbeError;
use crate::guard::HandlerGuard;
use crate::site::PatchSite;
use dynprobe_arch::native::{build_post_slot, build_slot, relocate, INT3};
use dynprobe_text::pool::{self, ExecSlot};
use dynprobe_text::trap::TrapContext;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

/// Bytes of executable memory per probe site: the boosted slot, then the post slot.
const SLOT_SIZE: usize = 128;
const POST_OFFSET: u64 = 64;

/// One `int3` of a post slot: where it is and where the thread continues after it.
pub(crate) struct PostExit {
    /// The site it belongs to; set once the site has its final address.
    pub(crate) site: *const PatchSite,
    /// Address of the `int3` in the slot.
    pub(crate) addr: u64,
    /// The original address execution continues at.
    pub(crate) resume: u64,
}

/// A site's out-of-line code.
pub(crate) struct PreparedSlots {
    /// The slot memory (both paths).
    pub(crate) slot: ExecSlot,
    /// Start of the boosted path.
    pub(crate) boost_ip: u64,
    /// The boosted path's jump back, and the original address it jumps to.
    pub(crate) boost_back: u64,
    pub(crate) boost_resume: u64,
    /// Start of the post path.
    pub(crate) post_ip: u64,
    /// The post path's exits, or why the instruction cannot have a post-handler; unset
    /// until a probe with a post-handler comes (see [`prepare_post`]).
    pub(crate) post: OnceLock<Result<Box<[PostExit]>, String>>,
}

/// Allocates a slot near `addr` and writes the out-of-line copies of the instruction
/// `insn` (its original bytes) into it: the boosted path, and with `post` the post path
/// too ([`prepare_post`] writes it later, into the still untouched half, when the first
/// probe with a post-handler comes: a program traced whole places a site per function and
/// never a post-handler). On error nothing stays allocated.
pub(crate) fn prepare_slots(addr: u64, insn: &[u8], post: bool) -> Result<PreparedSlots, ProbeError> {
    let slot = pool::alloc_near(addr, SLOT_SIZE)?;
    let written = (|| {
        let resume = addr + insn.len() as u64;
        let boost = build_slot(insn, addr, slot.addr, resume)?;
        let boost_back = slot.addr + relocate(insn, addr, slot.addr)?.code.len() as u64;
        assert!(boost.len() <= POST_OFFSET as usize, "a boosted slot of {} bytes overflows its room", boost.len());
        // Both paths in one write.
        let mut code = boost;
        let post_ip = slot.addr + POST_OFFSET;
        let prepared = OnceLock::new();
        if post {
            let exits = match build_post_slot(insn, addr, post_ip) {
                Ok(post) => {
                    code.resize(POST_OFFSET as usize, INT3);
                    code.extend_from_slice(&post.code);
                    let exits = post.exits.iter().map(|&(offset, resume)| PostExit {
                        site: std::ptr::null(),
                        addr: post_ip + u64::from(offset),
                        resume,
                    });
                    Ok(exits.collect())
                }
                Err(e) => Err(e.to_string()),
            };
            let _ = prepared.set(exits);
        }
        write_code(slot.addr, &code, SLOT_SIZE)?;
        Ok(PreparedSlots { slot, boost_ip: slot.addr, boost_back, boost_resume: resume, post_ip, post: prepared })
    })();
    if written.is_err() {
        pool::free(slot);
    }
    written
}

/// Writes the post path of `site`'s slot, left out by [`prepare_slots`], and makes its
/// exits' `int3`s the site's (`insn`: the probed instruction's original bytes); does
/// nothing when it was written already. Why the instruction cannot have a post-handler is
/// kept the same way. Called under the registry lock, before a probe with a post-handler
/// is published at the site, so no thread can be sent to the post path before it exists.
pub(crate) fn prepare_post(site: &PatchSite, insn: &[u8]) -> Result<(), ProbeError> {
    if site.slots.post.get().is_some() {
        return Ok(());
    }
    let post_ip = site.slots.post_ip;
    let post = match build_post_slot(insn, site.addr, post_ip) {
        Ok(post) => post,
        Err(e) => {
            let _ = site.slots.post.set(Err(e.to_string()));
            return Ok(());
        }
    };
    write_code(post_ip, &post.code, SLOT_SIZE - POST_OFFSET as usize)?;
    let exits: Box<[PostExit]> = post
        .exits
        .iter()
        .map(|&(offset, resume)| PostExit { site, addr: post_ip + u64::from(offset), resume })
        .collect();
    let owned = exits.iter().try_for_each(|exit| {
        dynprobe_text::trap::register_site(exit.addr, on_post_trap, exit as *const PostExit as usize)
    });
    let _ = site.slots.post.set(match owned {
        Ok(()) => Ok(exits),
        Err(e) => {
            exits.iter().for_each(|exit| dynprobe_text::trap::unregister_site(exit.addr));
            Err(format!("its post path's exits could not be owned: {e}"))
        }
    });
    Ok(())
}

/// Writes fresh slot code, which must fit in `room` bytes.
pub(crate) fn write_code(at: u64, code: &[u8], room: usize) -> Result<(), ProbeError> {
    assert!(code.len() <= room, "relocated code of {} bytes overflows its {room}-byte slot", code.len());
    pool::write_fresh(at, code)?;
    Ok(())
}

/// The trap owner of a probe site's `int3`.
pub(crate) fn on_site_trap(data: usize, ctx: &mut TrapContext<'_>) {
    // SAFETY: `data` is the address of the boxed PatchSite registered with this handler;
    // the registry frees a site only after unregistering it and waiting a grace period.
    let site = unsafe { &*(data as *const PatchSite) };
    if crate::own_thread::current_thread_is_own() {
        // dynprobe's own thread: no handler runs and nothing is counted, as if unprobed.
        ctx.set_ip(site.resume_after_pre());
        return;
    }
    let guard = match HandlerGuard::enter_site(site.addr) {
        Ok(guard) => guard,
        Err(_miss) => {
            // A hit from inside a handler: counted, not recursed into (but guarded).
            site.count_missed();
            let uc = ctx.ucontext();
            let mut regs = Regs::from_ucontext(uc);
            let frame_mask = &mut uc.uc_sigmask as *mut libc::sigset_t as usize;
            site.run_nested_guards::<false>(site.probes(), &mut regs, frame_mask);
            regs.to_ucontext(uc);
            ctx.set_ip(site.resume_after_pre());
            return;
        }
    };
    let uc = ctx.ucontext();
    let mut regs = Regs::from_ucontext(uc);
    regs.ip = site.addr;
    // A signal guard's mask change must outlive this frame's sigreturn (crate::signals).
    let frame_mask = &mut uc.uc_sigmask as *mut libc::sigset_t as usize;
    guard.thread().trap_mask.store(frame_mask, Ordering::Relaxed);
    // The signal frame holds the vector registers as the thread had them (`hit_xmm`).
    guard.thread().vectors.store(VectorSave::of_ucontext(uc).word(), Ordering::Relaxed);
    let wants_post = site.run_pre_handlers::<false>(site.probes(), &mut regs, &guard);
    guard.thread().vectors.store(0, Ordering::Relaxed);
    guard.thread().trap_mask.store(0, Ordering::Relaxed);
    let diverted = regs.ip != site.addr;
    if diverted {
        regs.ip = site.redirect(regs.ip);
    }
    regs.to_ucontext(uc);
    if !diverted {
        ctx.set_ip(if wants_post { site.slots.post_ip } else { site.resume_after_pre() });
    }
}

/// The trap owner of a post slot's exit `int3`.
pub(crate) fn on_post_trap(data: usize, ctx: &mut TrapContext<'_>) {
    // SAFETY: `data` is the address of a PostExit inside a registered PatchSite, which is
    // freed only after this exit is unregistered and a grace period has passed.
    let exit = unsafe { &*(data as *const PostExit) };
    // SAFETY: set before the exit was registered; same lifetime argument as above.
    let site = unsafe { &*exit.site };
    let guard = match HandlerGuard::enter_site(site.addr) {
        Ok(guard) => guard,
        Err(_miss) => {
            site.count_missed();
            ctx.set_ip(site.redirect(exit.resume));
            return;
        }
    };
    let uc = ctx.ucontext();
    let mut regs = Regs::from_ucontext(uc);
    regs.ip = exit.resume;
    guard.thread().vectors.store(VectorSave::of_ucontext(uc).word(), Ordering::Relaxed);
    site.run_post_handlers(&mut regs);
    guard.thread().vectors.store(0, Ordering::Relaxed);
    if regs.ip == exit.resume {
        regs.ip = site.redirect(exit.resume);
    }
    regs.to_ucontext(uc);
}
