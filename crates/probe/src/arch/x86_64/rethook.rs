//! The return-probe trampoline on x86-64 (the kernel's `kretprobe_trampoline`), its unwind
//! information, and the filter that keeps it out of backtraces.
//!
//! A probed function's return address is replaced by the address of one *sled entry*; there
//! is one entry per (thread slot, depth) of the instance stacks kept by `retprobe`, so the
//! entry a function returns into says which instance it is, with no thread lookup:
//!
//! ```text
//!   base - 16   int3 × 16                        covered by the FDE: unwinders look up pc - 1
//!   base + 9i   call common                      entry i: pushes base + 9i + 5
//!   base + 9i+5 jmp  *-16(%rsp)                  ...common returns here, having left the
//!                                                original return address 16 bytes below rsp
//!   base + 9N   common                           see dynprobe_arch's trampoline module
//!   after it    the resume stub                  see `sled_personality`
//! ```
//!
//! There are three sleds over the same instance table: [`FULL`], whose `common` saves every
//! register a return handler written by the user may clobber, [`LIGHT`], which saves the
//! general registers and xmm0–15 only, for calls diverted by dynprobe's function-graph
//! tracer alone (its return path is dynprobe's own baseline-x86-64 code), and [`RP_LIGHT`],
//! for return probes whose handler is proven light, whose `common` saves the general
//! registers straight into the handler's `Regs` record (`build_return_common_regs`). An
//! instance's index is the same in all of them; only the address written into the
//! return-address slot says which `common` runs.
//!
//! Why this shape:
//! - `common` saves every register a function may clobber (GCC's `-fipa-ra` lets a caller
//!   keep values in any register it knows the callee leaves alone) and no register carries
//!   the original return address out: it waits in the caller's red zone, which signal
//!   handlers skip.
//! - `common` leaves through `ret` to the instruction after the entry's `call`, so the CPU's
//!   return-stack predictor stays balanced: the caller's own `ret` later is still predicted.
//!
//! **Unwinding.** One DWARF FDE, registered with libgcc's `__register_frame_info`, covers the whole
//! sled and `common` (a second one the resume stub). Its return-address rule reads the sled address still held in the probed
//! function's return-address slot, turns it into an instance index and loads the original
//! return address from the instance table, so C++ exceptions, Rust panics, `pthread_exit` and
//! `pthread_cancel` unwind through a probed frame into the real caller (see [`eh_frame`] for
//! why the trampoline's CFA sits 8 bytes above the probed function's). Its personality
//! routine lets an exception that was already on its way when a return address was diverted
//! under it still reach its handler (see [`sled_personality`]). Backtraces would still
//! list the sled entry as one extra frame, and the resume stub while `_Unwind_Resume` runs
//! from it: [`hide_from_backtraces`] filters both out of every `_Unwind_Backtrace` (glibc
//! `backtrace()`, Rust `std::backtrace`).

use super::regs::VectorSave;
use super::Regs;
use crate::error::ProbeError;
use crate::thread_slot::{ThreadSlot, MAX_THREADS};
use crate::Probe;
use dynprobe_arch::native::detour::VectorWidth;
use dynprobe_arch::native::trampoline::{
    build_return_common, build_return_common_regs, resume_stub, sled_entry, Cfa, ReturnTo, RESUME_STUB_ALIGNED,
    RESUME_STUB_PUSHED, RESUME_STUB_SIZE, SLED_ENTRY_SIZE,
};
use dynprobe_text::pool;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes per sled entry (`call common; jmp *-16(%rsp)`).
pub(crate) const ENTRY_SIZE: u64 = SLED_ENTRY_SIZE;
/// `int3` bytes before the first entry, so that `pc - 1` of the first entry is covered.
const LEAD: u64 = 16;

/// One sled: where its entries start (0 until installed), how many, and its `common`.
pub(crate) struct Sled {
    base: AtomicU64,
    entries: AtomicU64,
    common_len: AtomicU64,
    /// The pool slot holding the code, and the registered `.eh_frame` (0 until installed).
    slot: AtomicU64,
    slot_size: AtomicU64,
    eh_frame: AtomicU64,
    eh_frame_len: AtomicU64,
    /// The instance table and its stride (see [`install`]), and the resume stub after
    /// `common` (see [`sled_personality`]).
    table: AtomicU64,
    stride: AtomicU64,
    stub: AtomicU64,
    /// libgcc's `struct object` for the registered section (room to spare).
    object: FrameObject,
}

impl Sled {
    const fn new() -> Sled {
        Sled {
            base: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            common_len: AtomicU64::new(0),
            slot: AtomicU64::new(0),
            slot_size: AtomicU64::new(0),
            eh_frame: AtomicU64::new(0),
            eh_frame_len: AtomicU64::new(0),
            table: AtomicU64::new(0),
            stride: AtomicU64::new(0),
            stub: AtomicU64::new(0),
            object: FrameObject(std::cell::UnsafeCell::new([0; 16])),
        }
    }

    /// The address a diverted function returns to for instance `index`.
    #[inline(always)]
    pub(crate) fn entry(&self, index: usize) -> u64 {
        self.base.load(Ordering::Relaxed) + index as u64 * ENTRY_SIZE
    }

    fn is_entry_of(&self, addr: u64, index: usize) -> bool {
        let e = self.entry(index);
        addr == e || addr == e + 5
    }

    /// The original return address of the call diverted to sled entry `addr` (its start,
    /// or what its `call` pushed), if `addr` is one of this sled's entries.
    fn original_return(&self, addr: u64) -> Option<u64> {
        let base = self.base.load(Ordering::Acquire);
        let index = addr.checked_sub(base)? / ENTRY_SIZE;
        if base == 0 || index >= self.entries.load(Ordering::Relaxed) {
            return None;
        }
        let at = self.table.load(Ordering::Relaxed) + index * self.stride.load(Ordering::Relaxed);
        // SAFETY: the instance table holds `entries` instances of `stride` bytes, mapped for
        // as long as the sled is installed; an instance starts with its original return
        // address (see `retprobe`'s `Instance`).
        Some(unsafe { std::ptr::read_volatile(at as *const u64) })
    }

    /// Whether `ip` lies in the sled's code before the resume stub (from `int3` lead to the
    /// end of `common`), and with `stub`, in the resume stub too.
    fn code_contains(&self, ip: u64, stub: bool) -> bool {
        let base = self.base.load(Ordering::Relaxed);
        let len = LEAD
            + self.entries.load(Ordering::Relaxed) * ENTRY_SIZE
            + self.common_len.load(Ordering::Relaxed)
            + if stub { RESUME_STUB_SIZE as u64 } else { 0 };
        base != 0 && ip.wrapping_sub(base - LEAD) < len
    }
}

/// The sled whose `common` saves every register a handler may clobber, vector state
/// included: return probes, whose handlers are the user's code.
pub(crate) static FULL: Sled = Sled::new();
/// The sled whose `common` saves the general registers and xmm0–15 only: calls diverted by
/// dynprobe's own function-graph tracer alone, whose return path is built for the baseline
/// x86-64 and calls no C library routine (see `dynprobe_arch`'s `ftrace` module).
pub(crate) static LIGHT: Sled = Sled::new();
/// The sled whose `common` saves the general registers only, into a `Regs` record its
/// dispatcher hands the handler as it is, for return probes whose return handler is proven
/// to leave the vector state alone (see `crate::light`) on calls no other instance diverts;
/// its dispatcher calls that handler without `catch_unwind` (a light handler cannot unwind).
pub(crate) static RP_LIGHT: Sled = Sled::new();

/// What the [`FULL`] and [`LIGHT`] sleds' `common` saved of the registers a function may
/// clobber, in
/// [`SAVED_GPRS`](dynprobe_arch::native::trampoline::SAVED_GPRS) order.
#[repr(C)]
pub(crate) struct SaveArea {
    rax: u64,
    rdx: u64,
    rcx: u64,
    rsi: u64,
    rdi: u64,
    r8: u64,
    r9: u64,
    r10: u64,
    r11: u64,
}

/// The vector state the function-graph tracer's trampolines save (its entry caller and the
/// light sled): xmm0–15 and MXCSR, all that dynprobe's own code, built for the baseline
/// x86-64, can clobber — legacy SSE instructions leave the upper halves of ymm and zmm alone.
/// Built with AVX enabled (`-C target-cpu=native`) the compiler may emit VEX code, which
/// zeroes those halves: then everything is saved, as for a user's handler.
pub fn light_width() -> VectorWidth {
    if cfg!(target_feature = "avx") {
        super::detour::vector_width()
    } else {
        VectorWidth::Sse
    }
}

/// True when `addr` is a sled entry of instance `index` (of either sled), before (`entry`)
/// or just after (`entry + 5`, pushed by its `call` while `common` runs) the probed
/// function returned.
#[inline(always)]
pub(crate) fn is_entry_of(addr: u64, index: usize) -> bool {
    FULL.is_entry_of(addr, index) || LIGHT.is_entry_of(addr, index) || RP_LIGHT.is_entry_of(addr, index)
}

/// True when `ip` lies in a trampoline's code, its resume stub included: a frame there is
/// dynprobe's, not the program's (a backtrace leaves it out). The stub's frame stands for
/// the diverted function's just before its `ret` (see [`sled_personality`]): it is on the
/// stack while `_Unwind_Resume`, called from it, runs the catching function's personality
/// routine — which a program may interpose, or a profiler's signal interrupt.
pub(crate) fn contains(ip: u64) -> bool {
    [&FULL, &LIGHT, &RP_LIGHT].into_iter().any(|sled| sled.code_contains(ip, true))
}

/// Where `ip` is in a sled's resume stub (its offset there), if it is.
pub(crate) fn resume_stub_offset(ip: u64) -> Option<u32> {
    [&FULL, &LIGHT, &RP_LIGHT].into_iter().find_map(|sled| {
        let stub = sled.stub.load(Ordering::Relaxed);
        let at = ip.wrapping_sub(stub);
        (sled.base.load(Ordering::Relaxed) != 0 && at < RESUME_STUB_SIZE as u64).then_some(at as u32)
    })
}

/// True when `ip` is a sled entry or in a `common`: a return address a return hook
/// diverted, or the return path under way. The resume stub is not: its frame's return
/// address is the original one again, pushed back.
pub(crate) fn in_return_path(ip: u64) -> bool {
    [&FULL, &LIGHT, &RP_LIGHT].into_iter().any(|sled| sled.code_contains(ip, false))
}

/// Writes `sled` for `entries` instances and registers its unwind information. `table` is
/// the address of the instance table: instance `i`'s original return address is the `u64`
/// at `table + i * stride`; `common` saves the vector state of `width`. Called once per
/// sled, before any call can be diverted to it.
pub(crate) fn install(
    sled_kind: &'static Sled,
    entries: usize,
    table: u64,
    stride: u64,
    width: VectorWidth,
) -> Result<(), ProbeError> {
    let dispatch = if std::ptr::eq(sled_kind, &LIGHT) {
        let _ = LIGHT_WIDTH.set(width);
        light_dispatch as *const () as u64
    } else if std::ptr::eq(sled_kind, &RP_LIGHT) {
        light_return_dispatch as *const () as u64
    } else {
        full_dispatch as *const () as u64
    };
    // The light return probes' `common` saves the general registers straight into the
    // handler's register record; the others save them, and the vector state of `width`,
    // into an area their dispatcher reads.
    let build = |ip| match std::ptr::eq(sled_kind, &RP_LIGHT) {
        true => build_return_common_regs(ip, dispatch),
        false => build_return_common(ip, dispatch, width),
    };
    // `common` is built once for its length, then again at its final address (its call is
    // absolute, so the length does not depend on the address).
    let common_len = build(0).map_err(setup_error)?.code.len();
    let size = LEAD as usize + entries * ENTRY_SIZE as usize + common_len + RESUME_STUB_SIZE;
    let slot = pool::alloc_near(dispatch, size)?;
    let sled = slot.addr + LEAD;
    let common_ip = sled + entries as u64 * ENTRY_SIZE;
    let common = build(common_ip).map_err(setup_error)?;
    let mut code = Vec::with_capacity(size);
    for i in 0..entries as u64 {
        code.extend_from_slice(&sled_entry(sled + i * ENTRY_SIZE, common_ip));
    }
    code.extend_from_slice(&common.code);
    let stub = common_ip + common.code.len() as u64;
    code.extend_from_slice(&resume_stub(_Unwind_Resume as *const () as u64));
    // Fresh pool memory, checked in place: the sled is 4.7 MB (an entry per instance of
    // every thread), which a copy of the expected int3s and a read-back would double.
    pool::write_fresh(sled, &code)?;

    let eh_frame = eh_frame(slot.addr, stub, sled, common_ip, &common.cfa, table, stride);
    // The unwinder keeps a pointer to the section for the rest of the process's life.
    let eh_frame: &'static [u8] = Box::leak(eh_frame.into_boxed_slice());
    // SAFETY: `eh_frame` is a well-formed .eh_frame section (two CIEs and their FDEs, a zero
    // terminator) that is freed only after `__deregister_frame_info` (see `uninstall`);
    // libgcc copies nothing and only reads it. The object libgcc keeps for it is this
    // sled's own storage (`__register_frame` would `malloc` it: on a thread of dynprobe's,
    // the start of a malloc arena of its own), untouched by us until deregistered.
    unsafe { __register_frame_info(eh_frame.as_ptr(), sled_kind.object.0.get().cast()) };
    sled_kind.eh_frame.store(eh_frame.as_ptr() as u64, Ordering::Relaxed);
    sled_kind.eh_frame_len.store(eh_frame.len() as u64, Ordering::Relaxed);
    sled_kind.slot.store(slot.addr, Ordering::Relaxed);
    sled_kind.slot_size.store(slot.size as u64, Ordering::Relaxed);

    sled_kind.table.store(table, Ordering::Relaxed);
    sled_kind.stride.store(stride, Ordering::Relaxed);
    sled_kind.stub.store(stub, Ordering::Relaxed);
    sled_kind.entries.store(entries as u64, Ordering::Relaxed);
    sled_kind.common_len.store(common.code.len() as u64, Ordering::Relaxed);
    sled_kind.base.store(sled, Ordering::Release);
    Ok(())
}

/// Storage for libgcc's `struct object` (six words in libgcc 12's unwind-dw2-fde.h).
pub(crate) struct FrameObject(std::cell::UnsafeCell<[u64; 16]>);

// SAFETY: only libgcc touches it, between registration and deregistration, under its own
// lock.
unsafe impl Sync for FrameObject {}

/// The memory of `sled`'s code, while it is installed.
pub(crate) fn memory(sled: &Sled) -> Option<std::ops::Range<u64>> {
    let (addr, size) = (sled.slot.load(Ordering::Relaxed), sled.slot_size.load(Ordering::Relaxed));
    (addr != 0).then_some(addr..addr + size)
}

/// Takes `sled` away — its unwind information deregistered, its code given back to the
/// pool — so that nothing of dynprobe's stays in the process at the end of a session. The
/// caller makes sure no call can return through it any more: no instance is in use and no
/// thread is in its code or will return into it.
pub(crate) fn uninstall(sled: &Sled) {
    let Some(code) = memory(sled) else { return };
    sled.base.store(0, Ordering::Release);
    let eh_frame = sled.eh_frame.swap(0, Ordering::Relaxed) as *mut u8;
    let len = sled.eh_frame_len.swap(0, Ordering::Relaxed) as usize;
    // SAFETY: the section `install` registered; libgcc drops its record of it (and hands
    // back the object storage, ours).
    unsafe { __deregister_frame_info(eh_frame) };
    // SAFETY: the boxed slice `install` leaked, of that length; nothing refers to it once
    // deregistered.
    drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(eh_frame, len)) });
    sled.slot.store(0, Ordering::Relaxed);
    sled.slot_size.store(0, Ordering::Relaxed);
    sled.entries.store(0, Ordering::Relaxed);
    sled.common_len.store(0, Ordering::Relaxed);
    sled.stub.store(0, Ordering::Relaxed);
    pool::free(pool::ExecSlot { addr: code.start, size: (code.end - code.start) as usize });
}

fn setup_error(e: dynprobe_arch::native::RelocError) -> ProbeError {
    ProbeError::ReturnProbeSetup { reason: format!("the trampoline could not be encoded: {e}") }
}

/// One CIE and one FDE covering `[start, stub)` (the sled and `common`), a CIE and an FDE
/// for the resume stub at `stub`, then the zero terminator.
///
/// The trampoline's frame is given a CFA 8 bytes *above* the probed function's (rsp + 8 in
/// the sled, where rsp is the probed function's CFA): unwinders identify a frame by the CFA
/// of the frame below it, and if the trampoline's CFA equalled the probed function's, the
/// trampoline's frame and the caller's would look the same to libgcc's second phase, which
/// then aborts when the caller catches the exception (it takes the trampoline for the
/// handler frame). The caller's rsp is therefore given explicitly: CFA - 8.
///
/// The return address (column 16) is `*(table + ((*(CFA - 16) - sled) / 9) * stride)`: the
/// slot at CFA - 16 (the probed function's return-address slot) holds the sled entry's
/// address (before the return) or the address its `call` pushed (after it), and both divide
/// down to the entry's index.
///
/// CFA by location: in the sled rsp + 8; in `common`, as `rules` (from the generated code)
/// say: rsp + 16 on entry, then rbp-based while its frame is up.
fn eh_frame(start: u64, stub: u64, sled: u64, common: u64, rules: &[(u32, Cfa)], table: u64, stride: u64) -> Vec<u8> {
    let end = stub;
    const DW_CFA_DEF_CFA: u8 = 0x0c;
    const DW_CFA_DEF_CFA_OFFSET: u8 = 0x0e;
    const DW_CFA_VAL_OFFSET: u8 = 0x14;
    const DW_CFA_VAL_EXPRESSION: u8 = 0x16;
    const DW_CFA_ADVANCE_LOC4: u8 = 0x04;
    const DW_CFA_SAME_VALUE: u8 = 0x08;
    const DW_CFA_OFFSET: u8 = 0x80;
    const DW_CFA_REGISTER: u8 = 0x09;
    const RSP: u8 = 7;
    const RBP: u8 = 6;
    const RA: u8 = 16;

    let mut out = Vec::new();
    // CIE: version 1, "zPR", code alignment 1, data alignment -8, RA column 16, ten bytes of
    // augmentation data (the personality routine as an absolute pointer, then absolute
    // pointers for the FDE); CFA = rsp + 8 as for any call (the FDE's rules below override
    // it).
    let personality = (sled_personality as *const () as u64).to_le_bytes();
    let cie =
        [&[1u8][..], b"zPR\0", &[1, 0x78, RA, 10, 0x00], &personality, &[0x00], &[DW_CFA_DEF_CFA, RSP, 8]].concat();
    push_entry(&mut out, 0, &cie);

    let mut expr = vec![0x40, 0x1c, 0x06]; // lit16, minus, deref: *(CFA - 16)
    expr.push(0x0e); // const8u sled
    expr.extend_from_slice(&sled.to_le_bytes());
    // minus, lit<entry size>, div: the index (an entry's start and its call's return
    // address both divide down to it)
    expr.extend_from_slice(&[0x1c, 0x30 + ENTRY_SIZE as u8, 0x1b]);
    expr.push(0x0e); // const8u stride
    expr.extend_from_slice(&stride.to_le_bytes());
    expr.push(0x1e); // mul
    expr.push(0x0e); // const8u table
    expr.extend_from_slice(&table.to_le_bytes());
    expr.extend_from_slice(&[0x22, 0x06]); // plus, deref

    let mut fde = Vec::new();
    fde.extend_from_slice(&start.to_le_bytes());
    fde.extend_from_slice(&(end - start).to_le_bytes());
    fde.push(0); // no augmentation data
    fde.extend_from_slice(&[DW_CFA_DEF_CFA_OFFSET, 8]); // in the sled
    fde.extend_from_slice(&[DW_CFA_VAL_OFFSET, RSP, 1]); // caller's rsp = CFA - 1 * 8
    fde.extend_from_slice(&[DW_CFA_VAL_EXPRESSION, RA, expr.len() as u8]);
    fde.extend_from_slice(&expr);
    let mut at = common - start;
    fde.push(DW_CFA_ADVANCE_LOC4);
    fde.extend_from_slice(&(at as u32).to_le_bytes());
    at = common - start;
    for &(offset, rule) in rules {
        let delta = (common - start + u64::from(offset)) - at;
        if delta > 0 {
            fde.push(DW_CFA_ADVANCE_LOC4);
            fde.extend_from_slice(&(delta as u32).to_le_bytes());
            at += delta;
        }
        match rule {
            Cfa::Rsp(off) => {
                fde.extend_from_slice(&[DW_CFA_DEF_CFA, RSP, off]);
                if off <= 24 {
                    // The caller's rbp is back in rbp.
                    fde.extend_from_slice(&[DW_CFA_SAME_VALUE, RBP]);
                } else {
                    fde.extend_from_slice(&[DW_CFA_OFFSET | RBP, off / 8]);
                }
            }
            Cfa::Rbp(off) => {
                fde.extend_from_slice(&[DW_CFA_DEF_CFA, RBP, off]);
                fde.extend_from_slice(&[DW_CFA_OFFSET | RBP, off / 8]);
            }
        }
    }
    let cie_pointer = out.len() as u32 + 4; // from the FDE's CIE-pointer field back to offset 0
    push_entry(&mut out, cie_pointer, &fde);

    // The resume stub's frame is the diverted function's just before its `ret`: CFA = rsp
    // on entry (its caller's rsp after the call), the return address pushed back at CFA - 8,
    // every other register the caller's. No personality routine.
    let stub_cie_at = out.len() as u32;
    // At its first instruction the return address is still in rdx (DWARF register 1).
    let stub_cie =
        [&[1u8][..], b"zR\0", &[1, 0x78, RA, 1, 0x00], &[DW_CFA_DEF_CFA, RSP, 0, DW_CFA_REGISTER, RA, 1]].concat();
    push_entry(&mut out, 0, &stub_cie);
    let mut fde = Vec::new();
    fde.extend_from_slice(&stub.to_le_bytes());
    fde.extend_from_slice(&(RESUME_STUB_SIZE as u64).to_le_bytes());
    fde.push(0); // no augmentation data
    fde.push(DW_CFA_ADVANCE_LOC4);
    fde.extend_from_slice(&RESUME_STUB_PUSHED.to_le_bytes());
    fde.extend_from_slice(&[DW_CFA_DEF_CFA_OFFSET, 8, DW_CFA_OFFSET | RA, 1]);
    fde.push(DW_CFA_ADVANCE_LOC4);
    fde.extend_from_slice(&(RESUME_STUB_ALIGNED - RESUME_STUB_PUSHED).to_le_bytes());
    fde.extend_from_slice(&[DW_CFA_DEF_CFA_OFFSET, 16]);
    let cie_pointer = out.len() as u32 + 4 - stub_cie_at;
    push_entry(&mut out, cie_pointer, &fde);
    out.extend_from_slice(&0u32.to_le_bytes());
    out
}

/// `_Unwind_Action` and `_Unwind_Reason_Code` values (the Itanium C++ ABI's "Exception
/// Handling" chapter, as in libgcc's `unwind.h`).
const UA_HANDLER_FRAME: libc::c_int = 4;
const URC_FATAL_PHASE2_ERROR: libc::c_int = 2;
const URC_CONTINUE_UNWIND: libc::c_int = 8;

/// `_URC_INSTALL_CONTEXT`, and the DWARF numbers of the two registers a personality
/// routine may set for a landing pad (`__builtin_eh_return_data_regno`: rax and rdx).
const URC_INSTALL_CONTEXT: libc::c_int = 7;
const EH_DATA_RAX: libc::c_int = 0;
const EH_DATA_RDX: libc::c_int = 1;

/// The personality routine of the sled's frame, which libgcc calls for it in both phases of
/// every exception that goes through a diverted return.
///
/// It has one job. libgcc names the frame that catches an exception, between its search
/// phase and its cleanup phase, by the CFA of the frame below it (`uw_identify_context` in
/// libgcc's `unwind-dw2.c`). A return address diverted while an exception is already on its
/// way — `record -p` adopting the calls in flight of a thread stopped in the middle of
/// one, in the unwinder or in a cleanup landing pad — puts a sled frame between the
/// catching function and its callee that the search phase did not see: the sled frame
/// then has the name the search phase gave the catching frame, and the cleanup phase calls
/// this routine for it as the handler frame (without one, libgcc aborts). The sled frame's
/// registers are the catching function's after its callee returned, so this routine
/// installs them with the resume stub as the landing pad ([`resume_stub`]): it pushes the
/// original return address back into its slot and calls `_Unwind_Resume` from a frame shaped
/// like the callee's own just before its return. The unwinder then goes on into the
/// catching function as if the return had never been diverted, that function has the name
/// the search phase gave it, and its own personality routine installs its handler — for an
/// exception of any language.
extern "C" fn sled_personality(
    _version: libc::c_int,
    actions: libc::c_int,
    _class: u64,
    exception: *mut libc::c_void,
    context: *mut libc::c_void,
) -> libc::c_int {
    if actions & UA_HANDLER_FRAME == 0 {
        return URC_CONTINUE_UNWIND;
    }
    // SAFETY: `context` is the live unwind context libgcc passes its personality routines.
    let ip = unsafe { _Unwind_GetIP(context) } as u64;
    let sled = [&FULL, &LIGHT, &RP_LIGHT].into_iter().find(|s| s.original_return(ip).is_some());
    let Some((sled, orig)) = sled.and_then(|s| Some((s, s.original_return(ip)?))) else {
        return URC_FATAL_PHASE2_ERROR;
    };
    // SAFETY: the same context; rax and rdx are the registers a personality routine sets
    // for a landing pad, and the IP the resume stub of the sled it was diverted to.
    unsafe {
        _Unwind_SetGR(context, EH_DATA_RAX, exception as usize);
        _Unwind_SetGR(context, EH_DATA_RDX, orig as usize);
        _Unwind_SetIP(context, sled.stub.load(Ordering::Relaxed) as usize);
    }
    URC_INSTALL_CONTEXT
}

/// Appends one CIE/FDE: length, id (0 for a CIE, else the CIE pointer), body, `DW_CFA_nop`
/// padding to 8 bytes.
fn push_entry(out: &mut Vec<u8>, id: u32, body: &[u8]) {
    let len = (4 + body.len()).next_multiple_of(8);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(body);
    out.resize(out.len() + len - 4 - body.len(), 0);
}

/// Called by the full sled's `common` with the address its entry pushed, the saved
/// registers and the caller's `rsp` after the return; runs the generic return path (the
/// kernel's `kretprobe_trampoline_handler`) and returns where to continue. Never unwinds
/// (handlers' panics are contained by `retprobe`).
extern "C" fn full_dispatch(after_call: u64, save: *mut SaveArea, caller_rsp: u64) -> ReturnTo {
    // SAFETY: `common` passes its own stack save area, live for the whole call.
    let save = unsafe { &mut *save };
    let mut regs = Regs {
        rax: save.rax,
        rdx: save.rdx,
        rcx: save.rcx,
        rsi: save.rsi,
        rdi: save.rdi,
        r8: save.r8,
        r9: save.r9,
        r10: save.r10,
        r11: save.r11,
        rsp: caller_rsp,
        ..Regs::default()
    };
    // `common` saved the vector registers just below the general ones (`build_return_common`
    // in `dynprobe_arch`'s trampoline module), with the width the sled was built for.
    let width = super::detour::vector_width();
    let vectors = VectorSave::of_area(save as *mut SaveArea as usize - width.save_size() as usize, width);
    let resume = crate::retprobe::on_return(sled_index(&FULL, after_call), &mut regs, vectors);
    // Every register `common` reloads, as the light sled's does: a handler's change reaches
    // the caller the same way on both sleds.
    *save = SaveArea {
        rax: regs.rax,
        rdx: regs.rdx,
        rcx: regs.rcx,
        rsi: regs.rsi,
        rdi: regs.rdi,
        r8: regs.r8,
        r9: regs.r9,
        r10: regs.r10,
        r11: regs.r11,
    };
    return_to(resume)
}

/// The word `common` zeroes after a return whose thread held no guard of its own (it was
/// inside a handler already, whose mark is not the return path's to clear).
static NO_MARK: AtomicU64 = AtomicU64::new(0);

/// What a dispatcher hands `common` for `resume`: where to go on, and the mark `common`
/// clears (see `dynprobe_arch`'s `ReturnTo`).
#[inline(always)]
fn return_to(resume: crate::retprobe::Resume) -> ReturnTo {
    let mark = match resume.guard {
        Some(guard) => guard.cleared_by_trampoline(),
        None => &NO_MARK as *const AtomicU64 as u64,
    };
    ReturnTo { ip: resume.ip, mark }
}

/// [`full_dispatch`] for the [`RP_LIGHT`] sled, whose `common` saved the registers straight
/// into `regs` (`build_return_common_regs`) and reloads them from it: the same return path,
/// its handler called directly.
extern "C" fn light_return_dispatch(after_call: u64, regs: *mut Regs) -> ReturnTo {
    // SAFETY: `common` passes the register record on its own stack, live for the whole call,
    // every word written but `ip`, which the return path writes before anything reads it.
    let regs = unsafe { &mut *regs };
    return_to(crate::retprobe::on_return_light(sled_index(&RP_LIGHT, after_call), regs))
}

/// The light return-probe sled's dispatcher, for its proof.
pub(crate) fn light_return_dispatch_code() -> u64 {
    light_return_dispatch as *const () as u64
}

/// What the light sled's `common` saves (set at its first installation).
static LIGHT_WIDTH: std::sync::OnceLock<VectorWidth> = std::sync::OnceLock::new();

/// What the light sled saves of the vector state, once installed.
pub(crate) fn light_sled_width() -> Option<VectorWidth> {
    LIGHT_WIDTH.get().copied()
}

/// The light sled's dispatcher, for its proof.
pub(crate) fn light_dispatch_code() -> u64 {
    light_dispatch as *const () as u64
}

/// [`full_dispatch`] for the light sled: only the function-graph tracer's calls return
/// through it, and they need no registers but the return value (`record -a` records it).
extern "C" fn light_dispatch(after_call: u64, save: *mut SaveArea, caller_rsp: u64) -> ReturnTo {
    // SAFETY: the sled's `common` passes its save area, on this thread's stack, filled.
    let retval = unsafe { (*save).rax };
    return_to(crate::retprobe::on_graph_return(sled_index(&LIGHT, after_call), caller_rsp, retval))
}

/// The instance index of the sled entry whose `call` pushed `after_call`.
#[inline(always)]
fn sled_index(sled: &Sled, after_call: u64) -> usize {
    ((after_call - sled.base.load(Ordering::Relaxed)) / ENTRY_SIZE) as usize
}

extern "C" {
    /// libgcc's registration of a run-time `.eh_frame` section, with the caller's storage
    /// for libgcc's `struct object` (unwind-dw2-fde.h: a few words).
    fn __register_frame_info(begin: *const u8, object: *mut u8);
    /// libgcc: forgets a section `__register_frame_info` registered; returns its object.
    fn __deregister_frame_info(begin: *const u8) -> *mut u8;
    /// libgcc: the instruction pointer of an unwind context.
    fn _Unwind_GetIP(ctx: *mut libc::c_void) -> usize;
    /// libgcc: sets a register of an unwind context, for the landing pad it installs.
    fn _Unwind_SetGR(ctx: *mut libc::c_void, index: libc::c_int, value: usize);
    /// libgcc: sets the instruction pointer of an unwind context: where it is installed.
    fn _Unwind_SetIP(ctx: *mut libc::c_void, value: usize);
    /// libgcc: goes on unwinding with `exception` from its caller's frame; never returns.
    fn _Unwind_Resume(exception: *mut libc::c_void) -> !;
}

/// An `_Unwind_Trace_Fn`.
type TraceFn = extern "C" fn(ctx: *mut libc::c_void, arg: *mut libc::c_void) -> libc::c_int;
/// `_URC_NO_REASON`: go on to the next frame.
const URC_NO_REASON: libc::c_int = 0;

/// Backtraces in flight per thread (nested ones: a backtrace from a signal handler that
/// interrupted one).
const RING: usize = 8;

/// One intercepted `_Unwind_Backtrace` call: the caller's callback and its argument.
#[repr(C)]
struct TraceRecord {
    trace: AtomicU64,
    arg: AtomicU64,
}

static RECORDS: [[TraceRecord; RING]; MAX_THREADS] =
    [const { [const { TraceRecord { trace: AtomicU64::new(0), arg: AtomicU64::new(0) } }; RING] }; MAX_THREADS];
/// Each thread's next ring position; written only by its owner.
static NEXT_RECORD: [AtomicU64; MAX_THREADS] = [const { AtomicU64::new(0) }; MAX_THREADS];

/// The probe [`hide_from_backtraces`] placed.
static BACKTRACE_FILTER: std::sync::Mutex<Option<crate::ProbeHandle>> = std::sync::Mutex::new(None);

/// Places a probe on libgcc's `_Unwind_Backtrace` that hides sled frames from every
/// backtrace: its pre-handler swaps the (callback, argument) pair for [`skip_sled_frames`]
/// and a per-thread record of the pair. Kept until [`show_backtraces_again`].
pub(crate) fn hide_from_backtraces() -> Result<(), ProbeError> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
    let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"_Unwind_Backtrace".as_ptr()) } as u64;
    if addr == 0 {
        // No libgcc unwinder in the process: no backtrace can meet the sled.
        return Ok(());
    }
    let probe = Probe::at(addr).on_hit(redirect_backtrace).register()?;
    *BACKTRACE_FILTER.lock().unwrap_or_else(|e| e.into_inner()) = Some(probe);
    Ok(())
}

/// Removes the probe of [`hide_from_backtraces`], for when no call can return through the
/// sled any more (so no backtrace can meet it); false if it could not be removed (it stays).
pub(crate) fn show_backtraces_again() -> bool {
    let Some(probe) = BACKTRACE_FILTER.lock().unwrap_or_else(|e| e.into_inner()).take() else { return true };
    probe.unregister().is_ok()
}

/// Pre-handler at `_Unwind_Backtrace(trace, arg)`.
fn redirect_backtrace(regs: &mut Regs) {
    let Some((slot, _)) = ThreadSlot::current() else { return };
    let n = NEXT_RECORD[slot].load(Ordering::Relaxed);
    NEXT_RECORD[slot].store(n.wrapping_add(1), Ordering::Relaxed);
    let record = &RECORDS[slot][n as usize % RING];
    record.trace.store(regs.rdi, Ordering::Relaxed);
    record.arg.store(regs.rsi, Ordering::Relaxed);
    regs.rdi = skip_sled_frames as *const () as u64;
    regs.rsi = record as *const TraceRecord as u64;
}

/// The callback `_Unwind_Backtrace` now calls: forwards every frame but the sled's and its
/// resume stub's.
extern "C" fn skip_sled_frames(ctx: *mut libc::c_void, record: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `ctx` is the live unwind context `_Unwind_Backtrace` passes its callback.
    let ip = unsafe { _Unwind_GetIP(ctx) } as u64;
    if contains(ip) {
        return URC_NO_REASON;
    }
    // SAFETY: `record` is the RECORDS entry `redirect_backtrace` passed as the argument.
    let record = unsafe { &*(record as *const TraceRecord) };
    let trace = record.trace.load(Ordering::Relaxed);
    // SAFETY: the record holds the `_Unwind_Trace_Fn` the caller passed.
    let trace: TraceFn = unsafe { std::mem::transmute(trace as usize) };
    trace(ctx, record.arg.load(Ordering::Relaxed) as *mut libc::c_void)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gimli::{
        BaseAddresses, CfaRule, CieOrFde, EhFrame, LittleEndian, RegisterRule, UnwindContext, UnwindSection, X86_64,
    };

    /// The section libgcc is given, read back by another reader: the sled's FDE names the
    /// personality routine, the stub's does not, and the stub's frame at its call of
    /// `_Unwind_Resume` is the diverted function's own just before its `ret`.
    #[test]
    fn the_unwind_section_names_the_personality_and_gives_the_stub_the_diverted_function_s_frame() {
        let (start, sled, stub) = (0x10_0000u64, 0x10_0010u64, 0x10_0100u64);
        let common = sled + 4 * ENTRY_SIZE;
        let bytes = eh_frame(start, stub, sled, common, &[(0, Cfa::Rsp(16))], 0x20_0000, 96);
        let section = EhFrame::new(&bytes, LittleEndian);
        let bases = BaseAddresses::default();
        let mut entries = section.entries(&bases);
        let mut fdes = Vec::new();
        while let Some(entry) = entries.next().unwrap() {
            if let CieOrFde::Fde(partial) = entry {
                fdes.push(partial.parse(EhFrame::cie_from_offset).unwrap());
            }
        }
        let [sled_fde, stub_fde] = &fdes[..] else { panic!("{} FDEs", fdes.len()) };
        assert_eq!((sled_fde.initial_address(), sled_fde.len()), (start, stub - start));
        let personality = sled_personality as *const () as u64;
        assert_eq!(sled_fde.personality(), Some(gimli::Pointer::Direct(personality)));
        assert_eq!((stub_fde.initial_address(), stub_fde.len()), (stub, RESUME_STUB_SIZE as u64));
        assert_eq!(stub_fde.personality(), None);
        let mut context = UnwindContext::new();
        // Where an unwinder looks, one byte before the return address of the stub's call.
        let at_call = stub + RESUME_STUB_SIZE as u64 - 3;
        let row = stub_fde.unwind_info_for_address(&section, &bases, &mut context, at_call).unwrap();
        assert_eq!(*row.cfa(), CfaRule::RegisterAndOffset { register: X86_64::RSP, offset: 16 });
        assert_eq!(row.register(X86_64::RA), Some(RegisterRule::Offset(-8)));
        let row = stub_fde.unwind_info_for_address(&section, &bases, &mut context, stub).unwrap();
        assert_eq!(*row.cfa(), CfaRule::RegisterAndOffset { register: X86_64::RSP, offset: 0 });
        assert_eq!(row.register(X86_64::RA), Some(RegisterRule::Register(X86_64::RDX)));
        // In the sled the caller's rsp is the CFA - 8, the trampoline's CFA 8 above the
        // diverted function's (see `eh_frame`).
        let row = sled_fde.unwind_info_for_address(&section, &bases, &mut context, sled + 2).unwrap();
        assert_eq!(*row.cfa(), CfaRule::RegisterAndOffset { register: X86_64::RSP, offset: 8 });
        assert_eq!(row.register(X86_64::RSP), Some(RegisterRule::ValOffset(-8)));
    }
}
