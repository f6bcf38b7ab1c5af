//! The code behind a return probe's trampoline: what runs when a probed function returns
//! into the sled the probe layer put in place of its return address.
//!
//! ```text
//!   sled entry i:  call common                    pushes entry_i + 5
//!                  jmp  *-16(%rsp)                the original return address, left by common
//!   common:        lea  -8(%rsp),%rsp             room for the original return address
//!                  push %rbp ; mov %rsp,%rbp
//!                  and  $-64,%rsp ; sub $area,%rsp
//!                  <save rax rdx rcx rsi rdi r8-r11, MXCSR and every vector register>
//!                  call dispatch(entry_i + 5, saved registers, caller's rsp)
//!                  mov  %rax,8(%rbp)              the original return address
//!                  movq $0,(%rdx)                 the thread's "returning" mark cleared
//!                  <restore all of it>
//!                  mov  %rbp,%rsp ; pop %rbp ; lea 8(%rsp),%rsp
//!                  ret                            to entry_i + 5: the return predictor stays balanced
//! ```
//!
//! For return handlers proven to leave the vector state alone, [`build_return_common_regs`]
//! saves the general registers only, straight into the handler's register record.
//!
//! Every register a function may clobber is saved, not only the return-value registers:
//! GCC's `-fipa-ra` lets a caller keep values in any register it knows the callee leaves
//! alone, and the return handler runs Rust code that may clobber any of them. The original
//! return address travels in memory, 16 bytes below the caller's `rsp` (inside the red zone,
//! which a signal handler does not touch, and below the return-address slot the sled's `ret`
//! uses), so no register is spent on it.

use iced_x86::code_asm::*;

use super::detour::{vector_moves, Direction, VectorWidth, FRAME_GPRS, FRAME_IP, FRAME_RSP, FRAME_SIZE};
use super::relocate::RelocError;
use iced_x86::IcedError;

/// Bytes of one sled entry: `call rel32` (5) and `jmp *-16(%rsp)` (4).
pub const SLED_ENTRY_SIZE: u64 = 9;
/// Offset, in a sled entry, of the instruction after its `call` (what the call pushes).
pub const SLED_AFTER_CALL: u64 = 5;

/// The saved general registers, in the order of the dispatcher's register record.
pub const SAVED_GPRS: [AsmRegister64; 9] = [rax, rdx, rcx, rsi, rdi, r8, r9, r10, r11];

/// What a dispatcher `common` calls returns, in rax and rdx (a two-word `#[repr(C)]` struct
/// is returned in that pair under the System V ABI): where the function returns to, and the
/// address of a word `common` zeroes once the dispatcher has returned — the thread's mark of
/// being on its way back through the trampoline, which the probe layer sets while its
/// dispatcher runs and checks before it takes the trampoline away (or a word of no meaning,
/// when the thread had no mark to clear).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReturnTo {
    /// The original return address.
    pub ip: u64,
    /// The word `common` zeroes after the dispatcher's return.
    pub mark: u64,
}

/// Where the canonical frame address (the unwinders' name for the caller's `rsp` + 8 here)
/// is, from an offset in `common` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cfa {
    /// `rsp` + the offset.
    Rsp(u8),
    /// `rbp` + the offset; `rbp` of the caller is saved at CFA - the offset.
    Rbp(u8),
}

/// `common`'s code and, for its unwind information, where the CFA rule changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnCommon {
    /// The code, placed at the address it was built for.
    pub code: Vec<u8>,
    /// (offset of the first instruction the rule holds for, the rule); the first entry is
    /// offset 0.
    pub cfa: Vec<(u32, Cfa)>,
}

/// One sled entry at `entry_ip`, calling `common_ip`.
pub fn sled_entry(entry_ip: u64, common_ip: u64) -> [u8; SLED_ENTRY_SIZE as usize] {
    let rel = (common_ip as i64 - (entry_ip + SLED_AFTER_CALL) as i64) as i32;
    let r = rel.to_le_bytes();
    [0xe8, r[0], r[1], r[2], r[3], 0xff, 0x64, 0x24, 0xf0]
}

/// Builds `common` at `ip`: `dispatch` is
/// `extern "C" fn(after_call: u64, saved: *mut [u64; 9], caller_rsp: u64) -> ReturnTo`
/// (see [`ReturnTo`]), with the registers in [`SAVED_GPRS`] order (it may change them).
pub fn build_return_common(ip: u64, dispatch: u64, width: VectorWidth) -> Result<ReturnCommon, RelocError> {
    // The frame below rbp: the vector area (as `vector_moves` lays it out), then the
    // general registers.
    let vectors = width.save_size();
    let area = (vectors as u32 + 8 * SAVED_GPRS.len() as u32).next_multiple_of(64) as i32;
    in_common_frame(ip, |a| {
        a.and(rsp, -64)?;
        a.sub(rsp, area)?;
        for (i, &reg) in SAVED_GPRS.iter().enumerate() {
            a.mov(qword_ptr(rsp + (vectors + 8 * i as i32)), reg)?;
        }
        vector_moves(a, width, Direction::Save)?;
        a.mov(rdi, qword_ptr(rbp + 16))?;
        a.lea(rsi, ptr(rsp + vectors))?;
        a.lea(rdx, ptr(rbp + 24))?;
        call_dispatcher(a, dispatch)?;
        vector_moves(a, width, Direction::Restore)?;
        for (i, &reg) in SAVED_GPRS.iter().enumerate() {
            a.mov(reg, qword_ptr(rsp + (vectors + 8 * i as i32)))?;
        }
        Ok(())
    })
}

/// Builds `common` at `ip` for return handlers proven to leave the vector state alone: the
/// general registers only, saved straight into a register record laid out as the probe
/// layer's `Regs` (the detour frame's layout: [`FRAME_SIZE`] bytes, r15 at the lowest
/// address), so that the dispatcher hands that record to the handler as it is — no copy,
/// and the registers are reloaded from it, with whatever the handler changed.
///
/// ```text
///   and  $-16,%rsp ; sub $144,%rsp     the record, 16-byte aligned for the call
///   mov  %r11..%rdi,32..112(%rsp)      the nine registers a function may clobber
///   xor  %eax,%eax
///   mov  %rax,{0,8,16,24,64,72,120}(%rsp)   the others and the flags read as 0
///   lea  24(%rbp),%rax ; mov %rax,128(%rsp)     rsp: the caller's after the return
///   mov  16(%rbp),%rdi ; mov %rsp,%rsi
///   call dispatch(entry_i + 5, record)
///   mov  %rax,8(%rbp)                  the original return address
///   movq $0,(%rdx)                     the thread's "returning" mark cleared (see ReturnTo)
///   mov  32..112(%rsp),%r11..%rdi      the nine registers back, rax and rdx as the handler left them
/// ```
///
/// `dispatch` is `extern "C" fn(after_call: u64, record: *mut Regs) -> ReturnTo` (see
/// [`ReturnTo`]); it writes the record's `ip` (the original return address, what a handler
/// reads there) itself, so `common` leaves that word alone: every store costs (see the
/// `floor-ret-*` rows of `dynprobe bench`).
pub fn build_return_common_regs(ip: u64, dispatch: u64) -> Result<ReturnCommon, RelocError> {
    // (register, offset in the record) of the registers saved: every caller-saved one.
    let saved = || {
        FRAME_GPRS.iter().enumerate().map(|(i, &reg)| (reg, 8 * i as i32)).filter(|(reg, _)| SAVED_GPRS.contains(reg))
    };
    let zeroed = (0..FRAME_SIZE / 8)
        .map(|i| 8 * i)
        .filter(|&offset| offset != FRAME_RSP && offset != FRAME_IP && saved().all(|(_, at)| at != offset));
    in_common_frame(ip, |a| {
        a.and(rsp, -16)?;
        a.sub(rsp, FRAME_SIZE)?;
        for (reg, at) in saved() {
            a.mov(qword_ptr(rsp + at), reg)?;
        }
        a.xor(eax, eax)?;
        for at in zeroed {
            a.mov(qword_ptr(rsp + at), rax)?;
        }
        a.lea(rax, ptr(rbp + 24))?;
        a.mov(qword_ptr(rsp + FRAME_RSP), rax)?;
        a.mov(rdi, qword_ptr(rbp + 16))?;
        a.mov(rsi, rsp)?;
        call_dispatcher(a, dispatch)?;
        for (reg, at) in saved() {
            a.mov(reg, qword_ptr(rsp + at))?;
        }
        Ok(())
    })
}

/// The call of `dispatch` in `common`, and what `common` does with its two results: the
/// original return address (rax) goes where `common`'s `ret` leaves it for the sled entry's
/// `jmp`, and the word at the address in rdx is zeroed — the dispatcher's mark that its
/// thread is on its way back through the trampoline (see [`build_return_common`]), cleared
/// here, in the trampoline's own code, because a thread still in the dispatcher's code
/// after it gave its instance back must not see the trampoline taken away under it.
fn call_dispatcher(a: &mut CodeAssembler, dispatch: u64) -> Result<(), IcedError> {
    a.mov(rax, dispatch)?;
    a.call(rax)?;
    a.mov(qword_ptr(rbp + 8), rax)?;
    a.mov(qword_ptr(rdx), 0)
}

/// `common` at `ip`: the fixed prologue (room for the original return address, an rbp
/// frame), `body`, then the fixed epilogue, with the CFA rules of both.
fn in_common_frame(
    ip: u64,
    body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<ReturnCommon, RelocError> {
    // The prologue and epilogue are fixed bytes, so their offsets are known.
    const PROLOGUE: [u8; 9] = [
        0x48, 0x8d, 0x64, 0x24, 0xf8, // lea  -8(%rsp),%rsp
        0x55, //                         push %rbp
        0x48, 0x89, 0xe5, //             mov  %rsp,%rbp
    ];
    const EPILOGUE: [u8; 10] = [
        0x48, 0x89, 0xec, //             mov  %rbp,%rsp
        0x5d, //                         pop  %rbp
        0x48, 0x8d, 0x64, 0x24, 0x08, // lea  8(%rsp),%rsp
        0xc3, //                         ret
    ];
    let mut a = CodeAssembler::new(64)?;
    body(&mut a)?;
    let body = a.assemble(ip + PROLOGUE.len() as u64)?;

    let mut code = PROLOGUE.to_vec();
    code.extend_from_slice(&body);
    let epilogue = code.len() as u32;
    code.extend_from_slice(&EPILOGUE);
    // CFA = the caller's rsp + 8, i.e. the rsp `common` starts with + 16.
    let cfa = vec![
        (0, Cfa::Rsp(16)),
        (5, Cfa::Rsp(24)),
        (6, Cfa::Rsp(32)),
        (9, Cfa::Rbp(32)),
        (epilogue + 3, Cfa::Rsp(32)),
        (epilogue + 4, Cfa::Rsp(24)),
        (epilogue + 9, Cfa::Rsp(16)),
    ];
    Ok(ReturnCommon { code, cfa })
}

/// Bytes of the resume stub ([`resume_stub`]).
pub const RESUME_STUB_SIZE: usize = 23;
/// Offset, in the resume stub, of the instruction after its `push %rdx` (CFA = rsp + 8
/// from there, the return address at CFA - 8).
pub const RESUME_STUB_PUSHED: u32 = 1;
/// Offset, in the resume stub, of the instruction after its `sub $8,%rsp` (CFA = rsp + 16
/// from there: the call of `resume` and the `ud2` after it).
pub const RESUME_STUB_ALIGNED: u32 = 5;

/// The frame of a thread at offset `at` of the resume stub, as the stub's unwind
/// information says: its CFA (the caller's `rsp`) is `rsp` + the first value, and its
/// return address is in `rdx` (the second value true: before the push) or at CFA - 8.
/// Every other register is the caller's.
pub fn resume_stub_frame(at: u32) -> (u64, bool) {
    match at {
        at if at < RESUME_STUB_PUSHED => (0, true),
        at if at < RESUME_STUB_ALIGNED => (8, false),
        _ => (16, false),
    }
}

/// The resume stub: entered with `rsp` where a function that was diverted returned to (its
/// caller's `rsp` after the call), its original return address in `rdx` and an exception
/// object in `rax`, it makes a frame that looks like that function's own just before its
/// `ret` — the return address pushed back at its slot — and calls `resume`
/// (`_Unwind_Resume(exception)`, which never returns) from it, so that the unwinder goes on
/// from the caller exactly as if the return had never been diverted.
///
/// ```text
///   push %rdx                the original return address, back in its slot
///   sub  $8,%rsp             the call below with rsp 16-byte aligned (System V ABI 3.2.2)
///   mov  %rax,%rdi           the exception object: resume's argument
///   movabs $resume,%r11 ; call *%r11
///   ud2
/// ```
pub fn resume_stub(resume: u64) -> [u8; RESUME_STUB_SIZE] {
    let r = resume.to_le_bytes();
    [
        0x52, // push %rdx
        0x48, 0x83, 0xec, 0x08, // sub $8,%rsp
        0x48, 0x89, 0xc7, // mov %rax,%rdi
        0x49, 0xbb, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], // movabs $resume,%r11
        0x41, 0xff, 0xd3, // call *%r11
        0x0f, 0x0b, // ud2
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::decode::decode_instructions;

    #[test]
    fn a_sled_entry_calls_common_and_jumps_through_the_slot_below_the_callers_rsp() {
        let entry = sled_entry(0x1000, 0x2000);
        let instrs = decode_instructions(&entry, 0x1000).unwrap();
        assert_eq!(instrs.len(), 2);
        assert_eq!(instrs[0].near_branch_target(), 0x2000);
        assert_eq!(instrs[0].next_ip(), 0x1000 + SLED_AFTER_CALL);
        assert_eq!(instrs[1].memory_base(), iced_x86::Register::RSP);
        assert_eq!(instrs[1].memory_displacement64() as i64, -16);
    }

    /// Right after the dispatcher's call, `common` stores the original return address (rax)
    /// for the sled entry's `jmp` and zeroes the word whose address came in rdx (the thread's
    /// mark, see `ReturnTo`) — before any register is reloaded over rdx.
    fn assert_takes_both_results(instrs: &[iced_x86::Instruction]) {
        use iced_x86::{Mnemonic, OpKind, Register};
        let call = instrs.iter().position(|i| i.mnemonic() == Mnemonic::Call).unwrap();
        let (ip, mark) = (&instrs[call + 1], &instrs[call + 2]);
        assert_eq!(
            (ip.mnemonic(), ip.memory_base(), ip.memory_displacement64(), ip.op1_register()),
            (Mnemonic::Mov, Register::RBP, 8, Register::RAX)
        );
        assert_eq!(
            (mark.mnemonic(), mark.memory_base(), mark.memory_displacement64()),
            (Mnemonic::Mov, Register::RDX, 0)
        );
        assert_eq!(
            (mark.op1_kind(), mark.immediate(1), mark.memory_size()),
            (OpKind::Immediate32to64, 0, iced_x86::MemorySize::UInt64)
        );
    }

    #[test]
    fn common_saves_and_restores_every_clobberable_register() {
        let width = VectorWidth::Avx512 { wide_masks: true };
        let common = build_return_common(0x7000_0000, 0x5000_0000, width).unwrap();
        let instrs = decode_instructions(&common.code, 0x7000_0000).unwrap();
        let count = |m| instrs.iter().filter(|i| i.mnemonic() == m).count();
        assert_eq!(count(iced_x86::Mnemonic::Vmovdqa64), 64, "zmm0-31 out and back");
        assert_eq!(count(iced_x86::Mnemonic::Kmovq), 16);
        assert_eq!(instrs.last().unwrap().mnemonic(), iced_x86::Mnemonic::Ret);
        assert_takes_both_results(&instrs);
        // The CFA offsets name instruction boundaries.
        let starts: Vec<u64> = instrs.iter().map(|i| i.ip() - 0x7000_0000).collect();
        for (offset, _) in &common.cfa {
            assert!(starts.contains(&u64::from(*offset)), "{offset} is not an instruction start");
        }
    }

    /// The record-shaped `common`: every word of the `Regs` record but `ip` (the
    /// dispatcher's to write) written once before the call (the nine caller-saved registers
    /// at their fields, the caller's rsp, zeros), no vector register touched, the nine read
    /// back after it, and the same frame as `common`.
    #[test]
    fn the_record_shaped_common_writes_a_whole_register_record_and_reloads_what_a_function_may_clobber() {
        use iced_x86::{Mnemonic, Register};
        use Register::{EAX, R10, R11, R8, R9, RAX, RBP, RCX, RDI, RDX, RSI, RSP};
        let (ip, dispatch) = (0x7000_0000, 0x5000_0000);
        let common = build_return_common_regs(ip, dispatch).unwrap();
        let instrs = decode_instructions(&common.code, ip).unwrap();
        let call = instrs.iter().position(|i| i.mnemonic() == Mnemonic::Call).unwrap();
        let stores_at = |range: &[iced_x86::Instruction]| -> Vec<(i64, Register)> {
            range
                .iter()
                .filter(|i| i.mnemonic() == Mnemonic::Mov && i.memory_base() == Register::RSP)
                .map(|i| (i.memory_displacement64() as i64, i.op1_register()))
                .collect()
        };
        let mut before = stores_at(&instrs[..call]);
        before.sort();
        let offsets: Vec<i64> = before.iter().map(|&(at, _)| at).collect();
        assert_eq!(offsets, (0..17).map(|i| 8 * i).collect::<Vec<_>>(), "each word of the record but ip once");
        // Regs order: r15 r14 r13 r12 r11 r10 r9 r8 rbp rbx rax rcx rdx rsi rdi rflags rsp ip.
        let field = |name: usize| before[name].1;
        let expected = [R11, R10, R9, R8, RAX, RCX, RDX, RSI, RDI];
        assert_eq!([4, 5, 6, 7, 10, 11, 12, 13, 14].map(field), expected);
        let zero = instrs[..call].iter().find(|i| i.mnemonic() == Mnemonic::Xor).unwrap();
        assert_eq!(zero.op0_register(), EAX);
        assert!([0, 1, 2, 3, 8, 9, 15].map(field).iter().all(|&r| r == RAX), "the others are 0: {before:?}");
        // rsp: the caller's, rbp + 24 (rbp = the rsp `common` starts with - 16).
        let caller_rsp =
            instrs[..call].iter().find(|i| i.mnemonic() == Mnemonic::Lea && i.memory_base() == RBP).unwrap();
        assert_eq!((caller_rsp.op0_register(), caller_rsp.memory_displacement64()), (RAX, 24));
        assert_eq!(field(16), RAX);
        let loaded: Vec<(i64, Register)> = instrs[call..]
            .iter()
            .filter(|i| i.mnemonic() == Mnemonic::Mov && i.memory_base() == RSP)
            .map(|i| (i.memory_displacement64() as i64, i.op0_register()))
            .collect();
        assert_eq!(loaded, [4, 5, 6, 7, 10, 11, 12, 13, 14].map(|f| (8 * f, before[f as usize].1)));
        assert!(!instrs.iter().any(|i| i.op_count() > 0 && (0..i.op_count()).any(|n| i.op_register(n).is_xmm())));
        // The call's target and arguments, and the same frame and CFA rules as `common`.
        assert_eq!(instrs[call - 1].immediate64(), dispatch);
        assert_takes_both_results(&instrs);
        assert_eq!(common.cfa.len(), build_return_common(ip, dispatch, VectorWidth::None).unwrap().cfa.len());
        let starts: Vec<u64> = instrs.iter().map(|i| i.ip() - ip).collect();
        for (offset, _) in &common.cfa {
            assert!(starts.contains(&u64::from(*offset)), "{offset} is not an instruction start");
        }
        assert_eq!(instrs.last().unwrap().mnemonic(), Mnemonic::Ret);
    }

    #[test]
    fn the_resume_stub_pushes_the_return_address_back_and_calls_resume_aligned() {
        let stub = resume_stub(0x1234_5678_9abc);
        let instrs = decode_instructions(&stub, 0x1000).unwrap();
        let mnemonics: Vec<_> = instrs.iter().map(|i| i.mnemonic()).collect();
        use iced_x86::Mnemonic::*;
        assert_eq!(mnemonics, [Push, Sub, Mov, Mov, Call, Ud2]);
        assert_eq!(instrs[0].op0_register(), iced_x86::Register::RDX);
        assert_eq!(instrs[1].immediate(1), 8);
        assert_eq!(instrs[3].immediate(1), 0x1234_5678_9abc);
        assert_eq!(instrs[1].ip() - 0x1000, u64::from(RESUME_STUB_PUSHED));
        assert_eq!(instrs[2].ip() - 0x1000, u64::from(RESUME_STUB_ALIGNED));
        assert_eq!(instrs.last().unwrap().next_ip() - 0x1000, RESUME_STUB_SIZE as u64);
        // Its frame: the return address in rdx before the push, then at CFA - 8 with the CFA
        // 8, then 16 bytes above rsp (at the call, and at its return address).
        let frames: Vec<_> = [0, 1, 4, 5, 20, 22].map(resume_stub_frame).into();
        assert_eq!(frames, [(0, true), (8, false), (8, false), (16, false), (16, false), (16, false)]);
    }
}
