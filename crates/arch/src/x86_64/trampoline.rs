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
//!                  <restore all of it>
//!                  mov  %rbp,%rsp ; pop %rbp ; lea 8(%rsp),%rsp
//!                  ret                            to entry_i + 5: the return predictor stays balanced
//! ```
//!
//! Every register a function may clobber is saved, not only the return-value registers:
//! GCC's `-fipa-ra` lets a caller keep values in any register it knows the callee leaves
//! alone, and the return handler runs Rust code that may clobber any of them. The original
//! return address travels in memory, 16 bytes below the caller's `rsp` (inside the red zone,
//! which a signal handler does not touch, and below the return-address slot the sled's `ret`
//! uses), so no register is spent on it.

use iced_x86::code_asm::*;

use super::detour::{vector_moves, Direction, VectorWidth};
use super::relocate::RelocError;

/// Bytes of one sled entry: `call rel32` (5) and `jmp *-16(%rsp)` (4).
pub const SLED_ENTRY_SIZE: u64 = 9;
/// Offset, in a sled entry, of the instruction after its `call` (what the call pushes).
pub const SLED_AFTER_CALL: u64 = 5;

/// The saved general registers, in the order of the dispatcher's register record.
pub const SAVED_GPRS: [AsmRegister64; 9] = [rax, rdx, rcx, rsi, rdi, r8, r9, r10, r11];

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
/// `extern "C" fn(after_call: u64, saved: *mut [u64; 9], caller_rsp: u64) -> u64`, with the
/// registers in [`SAVED_GPRS`] order (it may change them), returning the original return
/// address.
pub fn build_return_common(ip: u64, dispatch: u64, width: VectorWidth) -> Result<ReturnCommon, RelocError> {
    // The frame below rbp: the vector area (as `vector_moves` lays it out), then the
    // general registers.
    let vectors = width.save_size();
    let area = (vectors as u32 + 8 * SAVED_GPRS.len() as u32).next_multiple_of(64) as i32;

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
    a.and(rsp, -64)?;
    a.sub(rsp, area)?;
    for (i, &reg) in SAVED_GPRS.iter().enumerate() {
        a.mov(qword_ptr(rsp + (vectors + 8 * i as i32)), reg)?;
    }
    vector_moves(&mut a, width, Direction::Save)?;
    a.mov(rdi, qword_ptr(rbp + 16))?;
    a.lea(rsi, ptr(rsp + vectors))?;
    a.lea(rdx, ptr(rbp + 24))?;
    a.mov(rax, dispatch)?;
    a.call(rax)?;
    a.mov(qword_ptr(rbp + 8), rax)?;
    vector_moves(&mut a, width, Direction::Restore)?;
    for (i, &reg) in SAVED_GPRS.iter().enumerate() {
        a.mov(reg, qword_ptr(rsp + (vectors + 8 * i as i32)))?;
    }
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

    #[test]
    fn common_saves_and_restores_every_clobberable_register() {
        let width = VectorWidth::Avx512 { wide_masks: true };
        let common = build_return_common(0x7000_0000, 0x5000_0000, width).unwrap();
        let instrs = decode_instructions(&common.code, 0x7000_0000).unwrap();
        let count = |m| instrs.iter().filter(|i| i.mnemonic() == m).count();
        assert_eq!(count(iced_x86::Mnemonic::Vmovdqa64), 64, "zmm0-31 out and back");
        assert_eq!(count(iced_x86::Mnemonic::Kmovq), 16);
        assert_eq!(instrs.last().unwrap().mnemonic(), iced_x86::Mnemonic::Ret);
        // The CFA offsets name instruction boundaries.
        let starts: Vec<u64> = instrs.iter().map(|i| i.ip() - 0x7000_0000).collect();
        for (offset, _) in &common.cfa {
            assert!(starts.contains(&u64::from(*offset)), "{offset} is not an instruction start");
        }
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
    }
}
