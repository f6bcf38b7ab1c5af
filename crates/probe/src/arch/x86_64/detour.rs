//! Jump optimization on x86-64 (the kernel's `arch/x86/kernel/kprobes/opt.c`): preparing a
//! site's detour buffer, writing the `jmp` over the probe point and taking it out again, and
//! what runs in the detour.
//!
//! ```text
//!   probe point                           detour (within ±2 GiB)
//!   e9 <rel32> | rest of covered run ...  save registers -> dispatch -> restore
//!   next insn  <------------------------  copy of the covered run ; jmp back
//! ```
//! The jump is written and removed only while every other thread is held stopped, after
//! moving any thread stopped inside the covered bytes (or in the breakpoint slot, which
//! jumps back into them) to the matching place of the copy.

use super::regs::VectorSave;
use super::trap::write_code;
use super::Regs;
use crate::error::ProbeError;
use crate::guard::HandlerGuard;
use crate::site::PatchSite;
use crate::thread_slot::ThreadSlot;
use dynprobe_arch::native::detour::{
    arithmetic_flags_dead, build_detour_from, may_set_direction_flag, Detour, DetourPrefix, DetourSpec, StateSave,
    VectorWidth, FILTER_FLAG_OFFSET, LIGHT_FLAG_OFFSET, REDO_FULL, TRAP_OFFSET,
};
use dynprobe_arch::native::jump_table::TableMemory;
use dynprobe_arch::native::optimize::{covered_run_with, CoveredRun};
use dynprobe_arch::native::{jmp_rel32, jmp_rel8, INT3, JMP_REL32_LEN, JMP_REL8_LEN};
use dynprobe_text::memory::write_verified;
use dynprobe_text::pool::{self, ExecSlot};
use dynprobe_text::stop::{InterruptedSet, StoppedWorld};
use dynprobe_text::trap::{self, TrapContext};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

/// What [`SiteDetour::open_filter`] writes over the filter's flag.
const NOP: u8 = 0x90;

/// Bytes reserved per detour: the code with AVX-512 is about 1 KiB, plus the
/// relocated run (a handful of instructions, each at most ~30 bytes once rewritten).
const DETOUR_SIZE: usize = 1536;

/// A site's prepared detour.
pub(crate) struct SiteDetour {
    pub(crate) slot: ExecSlot,
    pub(crate) run: CoveredRun,
    /// The original bytes of the covered run.
    pub(crate) original: Vec<u8>,
    code: Detour,
    /// The bytes written over the probe point: the first [`Self::jump_len`] of these.
    pub(crate) jump: [u8; 5],
    /// 5 (`jmp rel32` to the detour) or 2 (`jmp rel8` to the island).
    pub(crate) jump_len: usize,
    /// The padding before the function that the probe point's short jump goes to, when
    /// the first five bytes could not be covered (see [`island_before`](dynprobe_arch::native::optimize::island_before)).
    pub(crate) island: Option<Island>,
    /// Built with an entry filter (see [`SiteDetour::open_filter`]).
    filtered: bool,
    /// Built with a light path (see [`SiteDetour::make_heavy`]).
    light: bool,
}

/// A `jmp rel32` to a detour written in the padding before a function, reached by a
/// `jmp rel8` at its entry: the hot-patch layout of
/// [`island_before`](dynprobe_arch::native::optimize::island_before).
#[derive(Clone, Copy)]
pub(crate) struct Island {
    /// Where the `jmp rel32` goes (an instruction boundary of the padding).
    pub(crate) addr: u64,
    /// The padding's bytes there.
    pub(crate) original: [u8; 5],
    /// The `jmp rel32` to the detour.
    pub(crate) jump: [u8; 5],
}

impl Island {
    /// The padding from the island to the entry: where no thread may be stopped when the
    /// island is written (it would resume inside the jump).
    pub(crate) fn range(&self, entry: u64) -> std::ops::Range<u64> {
        self.addr..entry
    }
}

impl SiteDetour {
    /// The bytes of the probe point the jump replaces, as the compiler left them.
    pub(crate) fn original_head(&self) -> &[u8] {
        &self.original[..self.jump_len]
    }

    /// The jump written over the probe point.
    pub(crate) fn jump_head(&self) -> &[u8] {
        &self.jump[..self.jump_len]
    }

    /// Start of the relocated copy of the covered run.
    pub(crate) fn copy_ip(&self) -> u64 {
        self.slot.addr + u64::from(self.code.copy_offset)
    }

    /// Where a thread that should continue at `ip` goes instead: the copy when `ip` is
    /// inside the covered bytes past the first (which hold the jump's displacement while
    /// optimized), `ip` itself otherwise.
    pub(crate) fn redirect(&self, ip: u64) -> Option<u64> {
        if !self.run.strictly_inside(ip) {
            return Some(ip);
        }
        self.code.copy_address(self.slot.addr, (ip - self.run.addr) as u32)
    }

    /// Turns the entry filter off for good: a probe that wants every call joined the
    /// site. One byte, read as data by the filter, never executed.
    pub(crate) fn open_filter(&self) -> Result<(), ProbeError> {
        if self.filtered {
            let flag = self.slot.addr + FILTER_FLAG_OFFSET as u64;
            if dynprobe_text::memory::read_vec(flag, 1)? == [INT3] {
                write_verified(flag, &[INT3], &[NOP])?;
            }
        }
        Ok(())
    }

    /// Turns the light path off for good: a heavy handler joined the site. One byte, read
    /// as data by the detour, never executed. A thread that read it a moment before finds
    /// the heavy handler in the site's list and comes back through the full save
    /// (`detour_dispatch`).
    pub(crate) fn make_heavy(&self) -> Result<(), ProbeError> {
        if self.is_light() {
            let flag = self.slot.addr + LIGHT_FLAG_OFFSET as u64;
            write_verified(flag, &[INT3], &[NOP])?;
        }
        Ok(())
    }

    /// Whether the light path is on.
    pub(crate) fn is_light(&self) -> bool {
        self.light
            && dynprobe_text::memory::read_vec(self.slot.addr + LIGHT_FLAG_OFFSET as u64, 1).is_ok_and(|b| b == [INT3])
    }

    fn trap_addr(&self) -> u64 {
        self.slot.addr + TRAP_OFFSET as u64
    }

    /// Where this detour's code lies and how it maps back to the probed code, for an
    /// unwinder that meets a thread in it.
    pub(crate) fn span(&self) -> crate::DetourSpan {
        let start = self.slot.addr;
        crate::DetourSpan {
            start,
            entry: start + dynprobe_arch::native::detour::ENTRY_OFFSET as u64,
            copy: self.copy_ip(),
            end: start + self.slot.size as u64,
            probe_ip: self.run.addr,
            covered: self.run.len as u32,
            copy_map: self.code.copy_map.clone(),
        }
    }
}

/// The vector registers a detour (and the return probes' trampoline) saves around a
/// handler: every one the CPU and kernel have enabled (XCR0), since a handler may clobber
/// any of them (see [`StateSave`]).
pub fn vector_width() -> VectorWidth {
    static WIDTH: OnceLock<VectorWidth> = OnceLock::new();
    *WIDTH.get_or_init(|| {
        use std::arch::x86_64::__cpuid_count;
        const OSXSAVE: u32 = 1 << 27;
        const AVX512BW: u32 = 1 << 30;
        const AVX: u64 = 0b110;
        const AVX512: u64 = 0b1110_0000;
        if __cpuid_count(1, 0).ecx & OSXSAVE == 0 {
            // No XSAVE at all: SSE only, which every x86-64 has.
            return VectorWidth::Sse;
        }
        let (lo, hi): (u32, u32);
        // SAFETY: xgetbv with ecx=0 reads XCR0; it exists because OSXSAVE is set.
        unsafe { std::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
        let xcr0 = u64::from(lo) | (u64::from(hi) << 32);
        if xcr0 & (AVX | AVX512) == AVX | AVX512 {
            VectorWidth::Avx512 { wide_masks: __cpuid_count(7, 0).ebx & AVX512BW != 0 }
        } else if xcr0 & AVX == AVX {
            VectorWidth::Avx
        } else {
            VectorWidth::Sse
        }
    })
}

/// Checks the probe point against its function (`function`, the original bytes from
/// `start`) and against what the caller knows of the rest of the program (`check_run`:
/// jumps from other functions into the run), and writes its detour, with a light path when
/// `light` (every handler of the site is proven light, and so is the dispatcher). `Err` is
/// the reason it stays a breakpoint probe.
pub(crate) fn prepare_detour(
    site: &PatchSite,
    function: &[u8],
    start: u64,
    tables: &TableMemory<'_>,
    island: Option<(u64, [u8; 5])>,
    light: bool,
    check_run: impl FnOnce(&CoveredRun) -> Result<(), String>,
) -> Result<SiteDetour, String> {
    let jump_len = if island.is_some() { JMP_REL8_LEN } else { JMP_REL32_LEN };
    let run = covered_run_with(function, start, site.addr, jump_len, Some(tables)).map_err(|e| e.to_string())?;
    check_run(&run)?;
    let offset = (site.addr - start) as usize;
    let original = function[offset..offset + run.len].to_vec();
    // Flags are dead at a function entry: a call clobbers them. Inside a function that
    // never sets DF, the flags are read without `pushfq`.
    let flags = site.addr != start;
    let direction_clear = flags && !may_set_direction_flag(function, start);
    let arithmetic_dead = flags && arithmetic_flags_dead(function, start, site.addr);
    let save = StateSave { flags, direction_clear, arithmetic_dead, width: vector_width() };
    let entry_filter = if save.flags { Vec::new() } else { site.entry_filter() };
    let mut slot = pool::alloc_near(site.addr, DETOUR_SIZE).map_err(|e| e.to_string())?;
    let built = (|| {
        let spec = DetourSpec {
            detour_ip: slot.addr,
            probe_ip: site.addr,
            covered: &original,
            save,
            dispatch: detour_dispatch as *const () as u64,
            light_dispatch: light_detour_dispatch as *const () as u64,
            context: site as *const PatchSite as u64,
            entry_filter: &entry_filter,
            light,
        };
        let mut code = build_detour_from(prefix_for(&spec).as_deref(), &spec).map_err(|e| e.to_string())?;
        let entry = slot.addr + dynprobe_arch::native::detour::ENTRY_OFFSET as u64;
        let (jump, island) = match island {
            None => (jmp_rel32(site.addr, entry).ok_or("the detour is out of rel32 reach")?, None),
            Some((addr, original)) => {
                let island =
                    Island { addr, original, jump: jmp_rel32(addr, entry).ok_or("the detour is out of rel32 reach")? };
                let short = jmp_rel8(site.addr, addr).ok_or("the island is out of rel8 reach")?;
                let mut jump = [INT3; 5];
                jump[..JMP_REL8_LEN].copy_from_slice(&short);
                (jump, Some(island))
            }
        };
        if code.code.len() > DETOUR_SIZE {
            return Err(format!("the detour needs {} bytes, more than its {DETOUR_SIZE}", code.code.len()));
        }
        // The rest of the worst-case room goes back to the pool (a detour with AVX-512 is
        // about 1 KiB of its 1.5): a program traced whole has one per function.
        slot = pool::shrink(slot, code.code.len());
        write_code(slot.addr, &code.code, slot.size).map_err(|e| e.to_string())?;
        // Written: the bytes are in the slot, and a program traced whole would otherwise
        // keep a second kilobyte per function on the heap.
        code.code = Vec::new();
        let detour =
            SiteDetour { slot, run, original, code, jump, jump_len, island, filtered: !entry_filter.is_empty(), light };
        trap::register_site(detour.trap_addr(), on_detour_trap, site as *const PatchSite as usize)
            .map_err(|e| e.to_string())?;
        Ok(detour)
    })();
    if built.is_err() {
        pool::free(slot);
    }
    built
}

/// The assembled prefix that fits `spec` (see [`DetourPrefix`]), made on first need: a
/// process has a few kinds of detour (at a function entry or not, dispatcher in reach or
/// not), and a program traced whole has a detour per function.
fn prefix_for(spec: &DetourSpec<'_>) -> Option<Arc<DetourPrefix>> {
    /// Kinds seen so far; a kind whose prefix could not be made is not retried (`None`).
    /// Shared, not copied, with each detour built from it: a prefix is about 1 KiB.
    static PREFIXES: Mutex<Vec<(DetourSpecKind, Option<Arc<DetourPrefix>>)>> = Mutex::new(Vec::new());
    let kind = DetourSpecKind::of(spec);
    let mut prefixes = PREFIXES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, prefix)) = prefixes.iter().find(|(k, _)| *k == kind) {
        return prefix.clone().filter(|p| p.fits(spec));
    }
    let prefix = DetourPrefix::new(spec).ok().flatten().map(Arc::new);
    prefixes.push((kind, prefix.clone()));
    prefix
}

/// What tells kinds of detour apart, for [`prefix_for`]'s cache.
#[derive(Clone, Copy, PartialEq, Eq)]
struct DetourSpecKind {
    save: StateSave,
    dispatch: u64,
    /// The detour's 2 GiB window, roughly: whether the dispatcher is in `rel32` reach
    /// changes with it ([`DetourPrefix::fits`] checks exactly).
    region: u64,
}

impl DetourSpecKind {
    fn of(spec: &DetourSpec<'_>) -> DetourSpecKind {
        DetourSpecKind { save: spec.save, dispatch: spec.dispatch, region: spec.detour_ip >> 31 }
    }
}

/// Gives up the detour's trap ownership (its memory is freed by the caller's quarantine).
pub(crate) fn disown_detour(detour: &SiteDetour) {
    trap::unregister_site(detour.trap_addr());
}

/// A jump cannot be written now: a thread is in the middle of the breakpoint slot's
/// relocated instruction. Try again once it has moved on.
pub(crate) struct Busy;

/// The bytes the jump replaces: the armed `int3`, then the rest of the covered run's first
/// [`SiteDetour::jump_len`] bytes (the first that many of the array count).
pub(crate) fn bytes_under_jump(detour: &SiteDetour) -> [u8; 5] {
    let mut bytes = [INT3; 5];
    bytes[1..detour.jump_len].copy_from_slice(&detour.original[1..detour.jump_len]);
    bytes
}

/// Moves, before the jump over the probe point is written, every stopped thread inside the
/// covered bytes or in the breakpoint slot (which jumps back into them) to the matching place
/// of the detour's copy — and so code a signal interrupted there whose handler a thread is
/// still running. `Busy` (nothing moved) when a thread is in the middle of the slot's
/// relocated instruction, which has no counterpart in the copy. Allocates nothing.
///
/// Every thread that could be there must be held stopped in `world` (a transaction whose
/// heads are armed; the site's own `int3` is its head), and `interrupted` is
/// [`StoppedWorld::all_interrupted_contexts`] of that stop.
pub(crate) fn move_into_copy(
    world: &mut StoppedWorld,
    interrupted: &InterruptedSet,
    site: &PatchSite,
    detour: &SiteDetour,
) -> Result<(), Busy> {
    if !interrupted.complete() {
        return Err(Busy);
    }
    // Checked for every thread and frame first, so that a Busy site moves nobody.
    for ip in world.threads().iter().map(|t| t.ip).chain(interrupted.contexts().iter().map(|c| c.rip)) {
        moved_ip(site, detour, ip)?;
    }
    for i in 0..world.threads().len() {
        let thread = world.threads()[i];
        if let Some(ip) = moved_ip(site, detour, thread.ip)? {
            world.set_ip(thread.tid, ip);
        }
    }
    for &context in interrupted.contexts() {
        if let Some(ip) = moved_ip(site, detour, context.rip)? {
            // Read a moment ago with every thread stopped: it cannot have changed.
            let _ = world.set_interrupted_ip(&context, ip);
        }
    }
    Ok(())
}

/// Where a thread (or interrupted code) at `ip` must continue once the jump is written:
/// `None` when `ip` is not affected; `Busy` when it is in the middle of the breakpoint
/// slot's relocated instruction, which has no counterpart in the copy.
fn moved_ip(site: &PatchSite, detour: &SiteDetour, ip: u64) -> Result<Option<u64>, Busy> {
    let boost = &site.slots;
    let new_ip = if detour.run.strictly_inside(ip) {
        detour.redirect(ip)
    } else if ip == boost.boost_ip {
        Some(detour.copy_ip())
    } else if ip == boost.boost_back {
        detour.redirect(boost.boost_resume)
    } else if ip > boost.boost_ip && ip < boost.boost_back {
        return Err(Busy);
    } else {
        return Ok(None);
    };
    // A thread between two covered instructions' boundaries cannot exist: it would be
    // inside an instruction.
    new_ip.map(Some).ok_or(Busy)
}

/// The address of the light detours' dispatcher, whose code the light proof walks.
pub(crate) fn detour_dispatch_code() -> u64 {
    light_detour_dispatch as *const () as u64
}

/// Runs a site's handlers for a thread that came through the detour, with its registers in
/// `frame`. Returns 0 to continue into the copy of the covered run; 1 when the thread must
/// take the detour's trap, which loads the whole frame (a new `rip` or `rsp`).
extern "C" fn detour_dispatch(site: *const PatchSite, frame: *mut Regs) -> u32 {
    dispatch::<false>(site, frame)
}

/// [`detour_dispatch`] on a detour's light path (no vector state saved): returns
/// [`REDO_FULL`] when a probe of the site is heavy — then it has run nothing, and the detour
/// calls [`detour_dispatch`] with everything saved. Handlers are called without
/// `catch_unwind`: a light handler cannot unwind (a call that may is heavy), and the
/// catching code, reached by the proof's walk, drops a `dyn` payload.
///
/// Everything this reaches, but the handlers (behind `crate::light::call_handler`), is
/// proven light by decoding (`crate::light`): it allocates nothing, takes no lock, and must
/// not be able to panic.
///
/// A site whose list is one light probe ([`Solo`](crate::site::Solo)) hit by a thread that
/// probes see takes the short way: what [`dispatch`] does for it, without the list walk, the
/// post-handler and nested-guard cases, or their registers kept across the handler's call
/// (optimized-probe 8.3 -> 6.6 ns on the Intel Xeon of `dynprobe bench`'s notes). Anything
/// else goes the general way, out of line.
extern "C" fn light_detour_dispatch(site: *const PatchSite, frame: *mut Regs) -> u32 {
    // SAFETY: as in `dispatch`.
    let s = unsafe { &*site };
    if let Some(found) = ThreadSlot::current() {
        if found.1.seen_by_probes() && crate::retprobe::graph_hook_light() {
            // Marked before the list is read, as in `dispatch`.
            if let Ok(guard) = HandlerGuard::enter_found(Some(found), s.addr) {
                if let Some(solo) = s.probes().solo() {
                    // SAFETY: as in `dispatch`.
                    let regs = unsafe { &mut *frame };
                    let rsp = regs.rsp;
                    solo.run(regs, &guard);
                    drop(guard);
                    return way_out(s, regs, rsp, false);
                }
            }
        }
    }
    light_dispatch_general(site, frame)
}

/// The light detours' dispatcher for every hit but a solo probe's common case.
#[cold]
#[inline(never)]
fn light_dispatch_general(site: *const PatchSite, frame: *mut Regs) -> u32 {
    dispatch::<true>(site, frame)
}

/// What the detour does once the handlers of a hit at `site` ran, `regs` as they left them
/// (`rsp`: the thread's stack pointer before): 0, on into the copy; 1, the trap, which loads
/// the whole frame — a new `rip` (a diversion, or the post-handler path when `wants_post`)
/// or a new `rsp`. A changed callee-saved register takes the trap too, which the detour
/// itself notices.
#[inline(always)]
fn way_out(site: &PatchSite, regs: &mut Regs, rsp: u64, wants_post: bool) -> u32 {
    if regs.ip != site.addr {
        return 1;
    }
    if wants_post {
        regs.ip = site.slots.post_ip;
        return 1;
    }
    (regs.rsp != rsp) as u32
}

#[inline(always)]
fn dispatch<const LIGHT: bool>(site: *const PatchSite, frame: *mut Regs) -> u32 {
    // SAFETY: `site` is the context baked into this site's detour; the registry keeps the
    // site alive until no thread can be in the detour (see registry::retire_site).
    let site = unsafe { &*site };
    // SAFETY: the detour passes its register frame, which is a `Regs` (see the arch layer's
    // detour layout) on this thread's stack, not aliased while the call runs.
    let regs = unsafe { &mut *frame };
    // The thread's slot first: the own-thread check answers from it (once per thread, not
    // per hit), and the guard below marks it.
    let found = ThreadSlot::current();
    let own = match found {
        Some((_, slot)) => slot.owner_unseen(),
        None => crate::own_thread::current_thread_is_own(),
    };
    if own {
        // dynprobe's own thread: no handler runs and nothing is counted, as if unprobed.
        return 0;
    }
    // The thread marks itself (or, inside a handler already, the site as the one it
    // misses) before it reads the site's list: the registry frees a replaced list once no
    // thread is marked for its site (`wait_while_active`), so a list read before the mark
    // could be freed under the hit.
    let guard = match HandlerGuard::enter_found(found, site.addr) {
        Ok(guard) => guard,
        Err(_miss) => {
            site.count_missed();
            // Guards rewrite argument registers only: the fast way out still fits.
            site.run_nested_guards::<LIGHT>(site.probes(), regs, 0);
            return 0;
        }
    };
    // One list for the check and the run: a list published meanwhile is the next hit's.
    let probes = site.probes();
    if LIGHT && !PatchSite::all_light(probes) {
        // Runs nothing here: the detour calls the full dispatcher, which marks again.
        drop(guard);
        return REDO_FULL;
    }
    let rsp = regs.rsp;
    if !LIGHT {
        // The full path saved the vector registers below the frame (`hit_xmm`).
        guard.thread().vectors.store(full_save(frame).word(), Ordering::Relaxed);
    }
    let wants_post = site.run_pre_handlers::<LIGHT>(probes, regs, &guard);
    if !LIGHT {
        guard.thread().vectors.store(0, Ordering::Relaxed);
    }
    way_out(site, regs, rsp, wants_post)
}

/// Where the full path of a detour whose register frame is at `frame` saved the vector
/// registers: it aligns `rsp`, the frame's address, down to 64 bytes and reserves the save
/// area of [`vector_width`] below (`save_call_restore` in `dynprobe_arch`'s detour module,
/// on the way in and again after a light call returned `REDO_FULL`).
#[inline(always)]
fn full_save(frame: *mut Regs) -> VectorSave {
    let width = vector_width();
    VectorSave::of_area((frame as usize & !63) - width.save_size() as usize, width)
}

/// The trap owner of a detour's slow-path `int3`: the thread's `rsp` is at its register
/// frame, which the handlers have changed; load all of it. A frame whose `rip` is still the
/// probe point continues after the probed instruction(s), as the fast way would; one
/// diverted into the bytes a written jump covers continues in the copy.
fn on_detour_trap(site: usize, ctx: &mut TrapContext<'_>) {
    // SAFETY: `site` is the PatchSite this detour belongs to, registered with this int3 and
    // alive while the detour is (see registry::quarantine).
    let site = unsafe { &*(site as *const PatchSite) };
    let uc = ctx.ucontext();
    let frame = uc.uc_mcontext.gregs[libc::REG_RSP as usize] as usize as *const Regs;
    // SAFETY: the detour executes this int3 with rsp at the frame it built (a `Regs`), below
    // the red zone of the interrupted code and above the signal frame the kernel pushed.
    let mut regs = unsafe { frame.read() };
    regs.ip = if regs.ip == site.addr { site.resume_after_pre() } else { site.redirect(regs.ip) };
    regs.to_ucontext(uc);
}
