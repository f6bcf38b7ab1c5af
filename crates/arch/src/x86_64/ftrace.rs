//! The code behind a traced function's entry site (the kernel's `ftrace_caller` with its
//! per-site `ftrace_ops` trampolines): what the `call` written over a compiler-recorded NOP
//! leads to.
//!
//! ```text
//!   site (function entry):  call stub_i             was 0f 1f 44 00 00 (mcount) or 90 × 5
//!   stub_i:                 push $id_i              which function this is
//!                           jmp  caller
//!   caller:                 push rdi rsi rdx rcx rax r8 r9 r10 r11
//!                           push rbp ; mov %rsp,%rbp
//!                           and  $-64,%rsp ; sub $area,%rsp ; <save MXCSR, xmm0-15>
//!                           mov  80(%rbp),%rdi            id
//!                           lea  96(%rbp),%rsi            the function's return-address slot
//!                           call dispatch(id, slot)
//!                           <restore xmm, MXCSR>
//!                           mov  %rbp,%rsp ; pop %rbp
//!                           pop  r11 ... rdi
//!                           lea  8(%rsp),%rsp             drop the id
//!                           ret                           to the site's next instruction
//! ```
//!
//! Why this shape:
//! - At a function entry only the argument registers (and `rax`, the vector count of a
//!   varargs call) carry values, but GCC's `-fipa-ra` lets a caller keep values in any
//!   register it knows the callee leaves alone: every register the dispatcher may clobber is
//!   saved. The dispatcher is dynprobe's own code, built for the baseline x86-64 (SSE2, no
//!   AVX): it can clobber xmm0–15 with legacy SSE instructions, which leave the upper halves
//!   of ymm/zmm alone, and no more. So the 2 KiB AVX-512 save of a general probe is not
//!   needed here, and neither are the flags (dead at a call).
//! - The stack is aligned by hand (`and $-64`, as wider vector saves need): the ABI's `rsp ≡ 8 (mod 16)` at a function
//!   entry does not hold for every call — GCC calls local functions that need no alignment
//!   from an unaligned stack — and the xmm saves and the dispatcher need it.
//! - The caller leaves through `ret` to the address the site's `call` pushed, so the CPU's
//!   return predictor stays balanced.
//! - One stub per function rather than a table lookup by return address: the id costs one
//!   `push`, and the stubs of a module sit in one block beside its caller.

use iced_x86::code_asm::*;

use super::detour::{vector_moves, Direction, VectorWidth};
use super::relocate::RelocError;

/// The NOP `-pg -mfentry -mnop-mcount` puts at a function's entry.
pub const MCOUNT_NOP: [u8; 5] = super::encode::NOP5;
/// What `-fpatchable-function-entry=5` puts there: five one-byte NOPs (a thread may be
/// stopped between them).
pub const PATCHABLE_NOPS: [u8; 5] = [0x90; 5];

/// Bytes reserved per stub (`push imm32` 5 + `jmp rel32` 5, padded for alignment).
pub const STUB_SIZE: u64 = 16;

/// The general registers the caller saves, in push order.
const SAVED: [AsmRegister64; 9] = [rdi, rsi, rdx, rcx, rax, r8, r9, r10, r11];

/// The integer argument registers of the SysV ABI (`rdi rsi rdx rcx r8 r9`) as the caller
/// saved them on entry: bytes below the traced function's return-address slot (the
/// dispatcher's `ra_slot`), between which lie the stub's id and the site's return address.
/// A dispatcher that records arguments (`record -a`) reads them there.
pub const ARGUMENTS_BELOW_SLOT: [u64; 6] = [24, 32, 40, 48, 64, 72];

/// The stub for function `id` at `stub_ip`, jumping to the caller at `caller_ip`; `None`
/// when the caller is out of `rel32` reach or `id` does not fit a sign-extended imm32.
pub fn stub(stub_ip: u64, id: u32, caller_ip: u64) -> Option<[u8; STUB_SIZE as usize]> {
    if id > i32::MAX as u32 {
        return None;
    }
    let jmp = super::encode::jmp_rel32(stub_ip + 5, caller_ip)?;
    let mut code = [super::encode::INT3; STUB_SIZE as usize];
    code[0] = 0x68; // push imm32 (sign-extended to 64 bits)
    code[1..5].copy_from_slice(&id.to_le_bytes());
    code[5..10].copy_from_slice(&jmp);
    Some(code)
}

/// Builds the caller at `ip`. `dispatch` is `extern "C" fn(id: u64, ra_slot: u64)`: it may
/// clobber the caller-saved general registers, the vector state of `width` and MXCSR,
/// nothing else.
pub fn build_caller(ip: u64, dispatch: u64, width: VectorWidth) -> Result<Vec<u8>, RelocError> {
    let area = width.save_size();
    // From rbp up: saved rbp, the nine registers, the id, the site's return address, the
    // function's return-address slot.
    let id = 8 + 8 * SAVED.len() as i32;
    let mut a = CodeAssembler::new(64)?;
    for reg in SAVED {
        a.push(reg)?;
    }
    a.push(rbp)?;
    a.mov(rbp, rsp)?;
    a.and(rsp, -64)?;
    a.sub(rsp, area)?;
    vector_moves(&mut a, width, Direction::Save)?;
    a.mov(rdi, qword_ptr(rbp + id))?;
    a.lea(rsi, ptr(rbp + (id + 16)))?;
    a.mov(rax, dispatch)?;
    a.call(rax)?;
    vector_moves(&mut a, width, Direction::Restore)?;
    a.mov(rsp, rbp)?;
    a.pop(rbp)?;
    for reg in SAVED.into_iter().rev() {
        a.pop(reg)?;
    }
    a.lea(rsp, ptr(rsp + 8))?;
    a.ret()?;
    Ok(a.assemble(ip)?)
}

/// Bytes a thread has pushed when it enters a stub: the site's return address.
pub const STUB_ENTRY_DEPTH: u32 = 8;
/// Bytes a thread has pushed when it enters the caller: the site's return address and the
/// stub's id.
pub const CALLER_ENTRY_DEPTH: u32 = 16;

/// Where the traced function's stack pointer at its site (the `rsp` its `call` of the stub
/// was made with) is, seen from a thread inside a stub or the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteRsp {
    /// `rsp` + the offset.
    Rsp(u32),
    /// `rbp` + the offset (the caller's frame pointer is up; `rsp` was aligned by hand).
    Rbp(u32),
}

/// What [`caller_position`] found at an instruction of a stub or the caller: how an
/// unwinder gets from there back to the traced function's site (the site's return address
/// is the word just below the site's `rsp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallerPosition {
    /// Where the site's `rsp` is.
    pub site_rsp: SiteRsp,
    /// The program's `rbp` is saved at the site's `rsp` minus this (the caller uses `rbp` as
    /// its frame pointer); `None`: `rbp` holds the program's.
    pub rbp_saved: Option<u32>,
    /// The dispatcher has been called (the call is under way or over).
    pub called: bool,
}

/// Where a thread at `pc` in `code` (a stub or the caller, placed at `code_ip`, entered at
/// its first byte with `entry_depth` bytes pushed below the site's `rsp`:
/// [`STUB_ENTRY_DEPTH`] or [`CALLER_ENTRY_DEPTH`]) finds the traced function's site;
/// `None` when `pc` is not an instruction of `code` reached from its entry, or the code
/// moves `rsp` or `rbp` in a way this does not follow. `pc` may be where a thread is
/// stopped or the return address of the caller's call of the dispatcher.
///
/// The code is run forward from its entry, as [`super::hook_frame`] does for a detour,
/// following the few instructions [`build_caller`] and [`stub`] emit: pushes and pops,
/// `mov %rsp,%rbp` / `mov %rbp,%rsp` around the stack's alignment, `lea n(%rsp),%rsp`, the
/// call. Nothing is allocated: an unwinder calls this while the other threads are stopped.
pub fn caller_position(code: &[u8], code_ip: u64, entry_depth: u32, pc: u64) -> Option<CallerPosition> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};
    let mut decoder = Decoder::with_ip(64, code, code_ip, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    // How many bytes below the site's rsp the current rsp is (`Some` while rsp is
    // followed), and rbp while the caller's frame pointer is up.
    let (mut below_rsp, mut below_rbp): (Option<u32>, Option<u32>) = (Some(entry_depth), None);
    let mut rbp_saved = None;
    let mut called = false;
    // Forward branches within the code: (target, the state they take there).
    #[allow(clippy::type_complexity)]
    let mut pending: [Option<(u64, Option<u32>, Option<u32>, Option<u32>, bool)>; 4] = [None; 4];
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if insn.is_invalid() || insn.ip() > pc {
            return None;
        }
        if insn.ip() == pc {
            let site_rsp = match (below_rsp, below_rbp) {
                (Some(d), _) => SiteRsp::Rsp(d),
                (None, Some(d)) => SiteRsp::Rbp(d),
                (None, None) => return None,
            };
            return Some(CallerPosition { site_rsp, rbp_saved, called });
        }
        let op0 = (insn.op_count() > 0 && insn.op0_kind() == OpKind::Register).then(|| insn.op0_register());
        let op1 = (insn.op_count() > 1 && insn.op1_kind() == OpKind::Register).then(|| insn.op1_register());
        match (insn.mnemonic(), op0, op1) {
            (Mnemonic::Push, reg, _) => {
                let d = below_rsp? + 8;
                below_rsp = Some(d);
                if reg == Some(Register::RBP) && below_rbp.is_none() && rbp_saved.is_none() {
                    rbp_saved = Some(d);
                }
            }
            (Mnemonic::Pop, Some(reg), _) => {
                below_rsp = Some(below_rsp?.checked_sub(8)?);
                if reg == Register::RBP {
                    // The program's rbp is back in rbp.
                    (below_rbp, rbp_saved) = (None, None);
                }
            }
            (Mnemonic::Mov, Some(Register::RBP), Some(Register::RSP)) => below_rbp = Some(below_rsp?),
            (Mnemonic::Mov, Some(Register::RSP), Some(Register::RBP)) => below_rsp = Some(below_rbp?),
            (Mnemonic::And | Mnemonic::Sub, Some(Register::RSP), None) => {
                // Aligned or grown by hand: followed through rbp from now on.
                below_rbp?;
                below_rsp = None;
            }
            (Mnemonic::Lea, Some(Register::RSP), _)
                if insn.memory_base() == Register::RSP && insn.memory_index() == Register::None =>
            {
                let d = i64::from(below_rsp?) - insn.memory_displacement64() as i64;
                below_rsp = Some(u32::try_from(d).ok()?);
            }
            (Mnemonic::Call, _, _) => called = true,
            (_, Some(reg), _) if reg.full_register() == Register::RSP || reg.full_register() == Register::RBP => {
                return None;
            }
            _ => {}
        }
        match insn.flow_control() {
            // The caller's vector restore jumps forward over one of its two ways: the
            // instructions after the jump are reached only from a branch to them, with the
            // state the branch had (checked to be the state followed so far when it lands).
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
                if insn.near_branch_target() > insn.ip() && insn.near_branch_target() < code_ip + code.len() as u64 =>
            {
                let state = (insn.near_branch_target(), below_rsp, below_rbp, rbp_saved, called);
                *pending.iter_mut().find(|p| p.is_none())? = Some(state);
            }
            // The end of the stub (its jump to the caller) or of the caller.
            FlowControl::UnconditionalBranch
            | FlowControl::ConditionalBranch
            | FlowControl::Return
            | FlowControl::IndirectBranch
            | FlowControl::Interrupt => return None,
            _ => {}
        }
        let next = insn.next_ip();
        for p in pending.iter_mut() {
            if let Some((target, rsp_at, rbp_at, saved_at, called_at)) = *p {
                if target == next {
                    if (rsp_at, rbp_at, saved_at, called_at) != (below_rsp, below_rbp, rbp_saved, called) {
                        return None;
                    }
                    *p = None;
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::decode::decode_instructions;
    use iced_x86::{Mnemonic, Register};

    /// Runs `code` on a model machine (the instructions the stub and the caller use), from
    /// its entry with `entry_depth` bytes pushed below the site's `rsp`, and checks at every
    /// instruction that [`caller_position`] finds the site's `rsp` and the program's `rbp`
    /// again from the machine's registers and memory. Returns how many it checked.
    fn check_every_instruction(code: &[u8], ip: u64, entry_depth: u32) -> usize {
        const SITE_RSP: u64 = 0x7fff_0000_1008;
        const PROGRAM_RBP: u64 = 0x1234_5678_9abc;
        let instrs = decode_instructions(code, ip).unwrap();
        let (mut stack_ptr, mut frame_ptr) = (SITE_RSP - u64::from(entry_depth), PROGRAM_RBP);
        let mut memory = std::collections::HashMap::<u64, u64>::new();
        let mut called = false;
        for insn in &instrs {
            let found =
                caller_position(code, ip, entry_depth, insn.ip()).unwrap_or_else(|| panic!("no rule at {insn}"));
            let site = match found.site_rsp {
                SiteRsp::Rsp(d) => stack_ptr + u64::from(d),
                SiteRsp::Rbp(d) => frame_ptr + u64::from(d),
            };
            assert_eq!(site, SITE_RSP, "at {insn}");
            let program_rbp = found.rbp_saved.map_or(frame_ptr, |d| memory[&(SITE_RSP - u64::from(d))]);
            assert_eq!(program_rbp, PROGRAM_RBP, "at {insn}");
            assert_eq!(found.called, called, "at {insn}");
            match (insn.mnemonic(), insn.op0_register(), insn.op1_register()) {
                (Mnemonic::Push, reg, _) => {
                    stack_ptr -= 8;
                    memory.insert(stack_ptr, if reg == Register::RBP { frame_ptr } else { 0 });
                }
                (Mnemonic::Pop, reg, _) => {
                    if reg == Register::RBP {
                        frame_ptr = memory[&stack_ptr];
                    }
                    stack_ptr += 8;
                }
                (Mnemonic::Mov, Register::RBP, Register::RSP) => frame_ptr = stack_ptr,
                (Mnemonic::Mov, Register::RSP, Register::RBP) => stack_ptr = frame_ptr,
                (Mnemonic::And, Register::RSP, _) => stack_ptr &= insn.immediate(1),
                (Mnemonic::Sub, Register::RSP, _) => stack_ptr -= insn.immediate(1),
                (Mnemonic::Lea, Register::RSP, _) => stack_ptr = stack_ptr.wrapping_add(insn.memory_displacement64()),
                (Mnemonic::Call, _, _) => called = true,
                _ => {}
            }
        }
        instrs.len()
    }

    #[test]
    fn the_site_is_found_from_every_instruction_of_the_stub_and_the_caller() {
        let ip = 0x7000_0000;
        for width in [VectorWidth::None, VectorWidth::Sse, VectorWidth::Avx512 { wide_masks: true }] {
            let caller = build_caller(ip, 0x5000_0000, width).unwrap();
            assert!(check_every_instruction(&caller, ip, CALLER_ENTRY_DEPTH) > 20);
            // The dispatcher's return address (the instruction after the call) has a rule.
            let instrs = decode_instructions(&caller, ip).unwrap();
            let call = instrs.iter().find(|i| i.mnemonic() == Mnemonic::Call).unwrap();
            assert!(caller_position(&caller, ip, CALLER_ENTRY_DEPTH, call.next_ip()).is_some_and(|p| p.called));
            // An address inside an instruction, or past the code, has none.
            let long = instrs.iter().find(|i| i.len() > 1).unwrap();
            assert_eq!(caller_position(&caller, ip, CALLER_ENTRY_DEPTH, long.ip() + 1), None);
            assert_eq!(caller_position(&caller, ip, CALLER_ENTRY_DEPTH, ip + caller.len() as u64), None);
        }
        let code = stub(ip, 7, ip + 0x1000).unwrap();
        assert_eq!(check_every_instruction(&code[..10], ip, STUB_ENTRY_DEPTH), 2);
        assert_eq!(caller_position(&code, ip, STUB_ENTRY_DEPTH, ip + 10), None, "the padding is never run");
    }

    #[test]
    fn a_stub_pushes_its_id_and_jumps_to_the_caller() {
        let code = stub(0x1000, 1234, 0x2000).unwrap();
        let instrs = decode_instructions(&code[..10], 0x1000).unwrap();
        assert_eq!(instrs[0].mnemonic(), Mnemonic::Push);
        assert_eq!(instrs[0].immediate32(), 1234);
        assert_eq!(instrs[1].near_branch_target(), 0x2000);
        assert!(stub(0x1000, u32::MAX, 0x2000).is_none());
        assert!(stub(0x1000, 1, 0x1000 + (1 << 32)).is_none());
    }

    #[test]
    fn a_caller_for_a_light_dispatcher_saves_no_vector_register() {
        let code = build_caller(0x7000_0000, 0x5000_0000, VectorWidth::None).unwrap();
        let instrs = decode_instructions(&code, 0x7000_0000).unwrap();
        let mut info = iced_x86::InstructionInfoFactory::new();
        for insn in &instrs {
            let used = info.info(insn).used_registers().iter().map(|u| u.register()).collect::<Vec<_>>();
            assert!(used.iter().all(|r| !r.is_xmm() && !r.is_ymm() && !r.is_zmm()), "{insn}");
            assert!(!matches!(insn.mnemonic(), Mnemonic::Stmxcsr | Mnemonic::Ldmxcsr), "{insn}");
        }
        assert_eq!(instrs.last().unwrap().mnemonic(), Mnemonic::Ret);
    }

    #[test]
    fn the_caller_keeps_the_stack_aligned_and_restores_what_it_saved() {
        let code = build_caller(0x7000_0000, 0x5000_0000, VectorWidth::Sse).unwrap();
        let instrs = decode_instructions(&code, 0x7000_0000).unwrap();
        let pushes = instrs.iter().filter(|i| i.mnemonic() == Mnemonic::Push).count();
        let pops = instrs.iter().filter(|i| i.mnemonic() == Mnemonic::Pop).count();
        assert_eq!((pushes, pops), (10, 10));
        // Aligned by hand whatever rsp the function was entered with.
        assert!(instrs.iter().any(|i| i.mnemonic() == Mnemonic::And && i.op0_register() == Register::RSP));
        assert_eq!(VectorWidth::Sse.save_size() % 16, 0);
        let saves = instrs.iter().filter(|i| i.mnemonic() == Mnemonic::Movaps).count();
        assert_eq!(saves, 32, "xmm0-15 out and back");
        let call = instrs.iter().position(|i| i.mnemonic() == Mnemonic::Call).unwrap();
        // The id and the return-address slot are read relative to the frame.
        assert_eq!(instrs[call - 3].memory_base(), Register::RBP);
        assert_eq!(instrs[call - 3].memory_displacement64(), 80);
        assert_eq!(instrs[call - 2].memory_displacement64(), 96);
        // The argument registers lie where ARGUMENTS_BELOW_SLOT says: pushed in SAVED's order
        // below the id and the site's return address.
        for (k, reg) in [rdi, rsi, rdx, rcx, r8, r9].into_iter().enumerate() {
            let pushed = SAVED.iter().position(|r| *r == reg).unwrap() as u64;
            assert_eq!(ARGUMENTS_BELOW_SLOT[k], 24 + 8 * pushed);
        }
        assert_eq!(instrs.last().unwrap().mnemonic(), Mnemonic::Ret);
    }
}
