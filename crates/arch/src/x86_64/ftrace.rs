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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::decode::decode_instructions;
    use iced_x86::{Mnemonic, Register};

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
