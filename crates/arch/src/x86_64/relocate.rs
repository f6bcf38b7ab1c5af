//! Moving instructions to a new address.

use std::fmt;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Encoder, FlowControl, IcedError, Instruction, InstructionBlock,
    MemoryOperand, OpKind, Register,
};

use super::classify::check_instruction;
use super::decode::{decode_instruction, decode_instructions, flow_of, is_xbegin};
use super::encode::{jmp_abs, jmp_any, rel32_reaches, INT3};
use super::{DecodeError, Flow, Refusal};

/// Why a run of instructions could not be relocated.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelocError {
    /// An instruction in the run may not run out of line.
    Refused(super::Refusal),
    /// The bytes did not decode.
    Decode(super::DecodeError),
    /// A RIP-relative operand or branch target is out of ±2 GiB reach from the new address.
    OutOfRange {
        /// Address of the instruction whose target cannot be reached.
        ip: u64,
        /// The new address it was to be moved to.
        new_ip: u64,
    },
    /// Any other failure of the encoder, with its message.
    Encoder(String),
}

impl fmt::Display for RelocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelocError::Refused(refusal) => refusal.fmt(f),
            RelocError::Decode(err) => write!(f, "cannot relocate: {err}"),
            RelocError::OutOfRange { ip, new_ip } => write!(
                f,
                "the instruction at {ip:#x} addresses memory more than ±2 GiB away from {new_ip:#x}, \
                 where it was to be moved; place the copy within ±2 GiB of the original code"
            ),
            RelocError::Encoder(msg) => write!(f, "the instruction encoder failed: {msg}"),
        }
    }
}

/// The error this one wraps, where it wraps one (its message is part of this one's
/// `Display` too, which is complete on its own).
impl std::error::Error for RelocError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RelocError::Refused(e) => Some(e),
            RelocError::Decode(e) => Some(e),
            _ => None,
        }
    }
}

impl From<Refusal> for RelocError {
    fn from(refusal: Refusal) -> Self {
        RelocError::Refused(refusal)
    }
}

impl From<DecodeError> for RelocError {
    fn from(err: DecodeError) -> Self {
        RelocError::Decode(err)
    }
}

impl From<IcedError> for RelocError {
    fn from(err: IcedError) -> Self {
        RelocError::Encoder(err.to_string())
    }
}

/// A run of instructions re-encoded for a new address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relocated {
    /// The new code, to be placed at the new address.
    pub code: Vec<u8>,
    /// For each original instruction, in order: (its offset in the original run, its offset in
    /// `code`). This is the map that moves a thread stopped inside the original run to the
    /// matching place of the copy.
    pub offsets: Vec<(u32, u32)>,
}

/// Re-encodes the instructions `bytes` (originally at `old_ip`) to run at `new_ip` with the
/// same effect: RIP-relative operands and relative branches keep their absolute targets,
/// short branches are widened, and every `call` (direct or indirect) becomes
/// "push the *original* return address; jmp target" so the callee returns into the original
/// code, not into the copy. No general register or flag is clobbered by the rewrite.
///
/// A branch from the run to the start of another instruction of the run goes to that
/// instruction's copy, so a loop inside the run stays in the copy and never jumps back into
/// original bytes that a detour jump may have overwritten. Data references are never
/// redirected: a `lea` of an address inside the run still yields the original address.
pub fn relocate(bytes: &[u8], old_ip: u64, new_ip: u64) -> Result<Relocated, RelocError> {
    let instrs = decode_instructions(bytes, old_ip)?;
    for instr in &instrs {
        check_instruction(instr)?;
    }
    // Instructions that neither branch nor address memory relative to `rip` mean the same
    // anywhere: they are their own relocation, copied byte for byte without a round through
    // the block encoder (a program traced whole relocates each function's first
    // instructions several times: its slot, its post slot, its detour's copy).
    if instrs.iter().all(|i| i.flow_control() == FlowControl::Next && !i.is_ip_rel_memory_operand()) {
        let len: usize = instrs.iter().map(Instruction::len).sum();
        let offsets = instrs.iter().map(|i| ((i.ip() - old_ip) as u32, (i.ip() - old_ip) as u32)).collect();
        return Ok(Relocated { code: bytes[..len].to_vec(), offsets });
    }
    relocate_instructions(&instrs, old_ip, new_ip)
}

/// An out-of-line slot for a boosted probe: the relocated instruction(s) `bytes` (originally
/// at `old_ip`) followed by a jump to `resume_ip` (normally `old_ip + bytes.len()`), encoded
/// to sit at `slot_ip`. The jump back is a `jmp rel32` when in reach, otherwise an absolute
/// `jmp [rip+0]; .quad resume_ip`.
pub fn build_slot(bytes: &[u8], old_ip: u64, slot_ip: u64, resume_ip: u64) -> Result<Vec<u8>, RelocError> {
    let mut code = relocate(bytes, old_ip, slot_ip)?.code;
    let jump_back_ip = slot_ip + code.len() as u64;
    code.extend(jmp_any(jump_back_ip, resume_ip));
    Ok(code)
}

/// An out-of-line slot that ends every path out of the instruction in an `int3`, so that a
/// post-handler can run after the instruction completed, whichever way it left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostSlot {
    /// The slot's code.
    pub code: Vec<u8>,
    /// For each `int3` in `code`: (its offset in the slot, the original address execution
    /// continues at after the post-handler ran).
    pub exits: Vec<(u32, u64)>,
}

/// Builds a [`PostSlot`] for the single instruction at the start of `bytes` (at `old_ip`),
/// placed at `slot_ip`. The fall-through path, and for a direct jmp/jcc/call/loop also the
/// taken path, each end in their own `int3`. Indirect branches and `ret` have no statically
/// known successor and are refused with a reason.
///
/// Layouts (`F` = fall-through exit, resumes after the instruction; `T` = taken exit,
/// resumes at the branch target):
///
/// ```text
/// ordinary:   <relocated instruction>  F:int3
/// jmp:        T:int3                            the jump's only effect is where it goes
/// jcc/loop:   j<cc> T (rel8)  F:int3  T:int3
/// call:       lea -8(%rsp),%rsp; movl $ret_lo,(%rsp); movl $ret_hi,4(%rsp)  T:int3
/// ```
pub fn build_post_slot(bytes: &[u8], old_ip: u64, slot_ip: u64) -> Result<PostSlot, RelocError> {
    let instr = decode_instruction(bytes, old_ip)?;
    check_instruction(&instr)?;
    let next = instr.next_ip();
    let unknown_successor = |what: &str| {
        RelocError::Refused(Refusal::new(
            &instr,
            format!("a post-handler needs a known successor, and where {what} goes is only known when it runs"),
        ))
    };
    let (mut code, exit_targets) = match flow_of(&instr) {
        Flow::Sequential => (relocate_instructions(&[instr], old_ip, slot_ip)?.code, vec![next]),
        Flow::Jump { target } => (Vec::new(), vec![target]),
        Flow::CondJump { .. } if is_xbegin(instr.code()) => {
            return Err(RelocError::Refused(Refusal::new(
                &instr,
                "an int3 inside a transaction aborts it, so the post-handler would never see \
                 the transaction start",
            )))
        }
        Flow::CondJump { target } => (branch_over_one_byte(&instr, slot_ip)?, vec![next, target]),
        Flow::Call { target } => (encode_at(&push_return_address(next)?, slot_ip)?, vec![target]),
        Flow::IndirectJump => return Err(unknown_successor("an indirect jump")),
        Flow::IndirectCall => return Err(unknown_successor("an indirect call")),
        Flow::Return => return Err(unknown_successor("a return")),
        // check_instruction refuses both kinds with a better reason.
        Flow::Interrupt | Flow::Exception => return Err(unknown_successor("this instruction")),
    };
    let exits = exit_targets
        .into_iter()
        .map(|resume| {
            code.push(INT3);
            ((code.len() - 1) as u32, resume)
        })
        .collect();
    Ok(PostSlot { code, exits })
}

/// The conditional branch `instr` re-encoded at `ip` in its short form, taken to 1 byte past
/// its own end: with an `int3` after it for each outcome, not taken hits the first, taken
/// the second.
fn branch_over_one_byte(instr: &Instruction, ip: u64) -> Result<Vec<u8>, RelocError> {
    let mut branch = *instr;
    branch.set_code(instr.code().as_short_branch());
    // The length of a short branch does not depend on its target, so a first encoding with
    // any nearby target gives the address of the second int3.
    branch.set_near_branch64(ip);
    let len = Encoder::new(64).encode(&branch, ip)?;
    branch.set_near_branch64(ip + len as u64 + 1);
    encode_at(&[branch], ip)
}

/// Encodes synthetic instructions (no branches into them) at `ip`.
fn encode_at(instrs: &[Instruction], ip: u64) -> Result<Vec<u8>, RelocError> {
    Ok(BlockEncoder::encode(64, InstructionBlock::new(instrs, ip), BlockEncoderOptions::NONE)?.code_buffer)
}

/// Length of [`push_return_address`]'s code: `lea` (5) + `movl` (7) + `movl` (8).
const PUSH_RETURN_LEN: u64 = 20;

/// `push $ret` for any 64-bit `ret` without touching the flags, which the callee may read,
/// or any register but `rsp` (`push $imm32` sign-extends, so it only reaches the low 2 GiB).
///
/// ```text
/// lea  -0x8(%rsp),%rsp
/// movl $ret_lo32,(%rsp)
/// movl $ret_hi32,0x4(%rsp)
/// ```
fn push_return_address(ret: u64) -> Result<[Instruction; 3], IcedError> {
    Ok([
        Instruction::with2(Code::Lea_r64_m, Register::RSP, MemoryOperand::with_base_displ(Register::RSP, -8))?,
        Instruction::with2(Code::Mov_rm32_imm32, MemoryOperand::with_base(Register::RSP), ret as u32)?,
        Instruction::with2(Code::Mov_rm32_imm32, MemoryOperand::with_base_displ(Register::RSP, 4), (ret >> 32) as u32)?,
    ])
}

/// Passes over the layout before giving up on it settling, and how many of them must
/// settle exactly before a group may keep a few bytes of NOP padding.
const MAX_PASSES: usize = 16;
const EXACT_PASSES: usize = 3;
const NOP: u8 = 0x90;

/// The layout loop behind [`relocate`]. Each original instruction becomes a *group* (itself,
/// or the rewrite of a call) encoded as its own iced block at a guessed address; the guesses
/// come from the previous pass's sizes, because a group's size depends on distances (rel8 or
/// rel32, near or absolute) and the distances depend on the sizes of the groups before it.
///
/// Every instruction is handed to iced with `ip` 0 so that iced redirects nothing by itself:
/// it would also redirect RIP-relative *data* references into the run. Branch redirection
/// into the copy is done here instead, by [`rewrite`].
fn relocate_instructions(instrs: &[Instruction], old_ip: u64, new_ip: u64) -> Result<Relocated, RelocError> {
    let mut sizes: Vec<usize> = instrs.iter().map(Instruction::len).collect();
    for pass in 0..MAX_PASSES {
        let starts: Vec<u64> = sizes
            .iter()
            .scan(new_ip, |ip, size| {
                let start = *ip;
                *ip += *size as u64;
                Some(start)
            })
            .collect();
        let redirect = |target: u64| match instrs.binary_search_by_key(&target, Instruction::ip) {
            Ok(index) => starts[index],
            Err(_) => target,
        };
        let groups = instrs
            .iter()
            .zip(&starts)
            .map(|(instr, &at)| rewrite(instr, at, redirect))
            .collect::<Result<Vec<_>, _>>()?;
        let blocks: Vec<_> = groups.iter().zip(&starts).map(|(group, &at)| InstructionBlock::new(group, at)).collect();
        let encoded = BlockEncoder::encode_slice(64, &blocks, BlockEncoderOptions::NONE)
            .map_err(|err| encoder_error(err, instrs, &starts))?;
        let new_sizes: Vec<usize> = encoded.iter().map(|result| result.code_buffer.len()).collect();
        let settled = if pass < EXACT_PASSES {
            new_sizes == sizes
        } else {
            new_sizes.iter().zip(&sizes).all(|(new, old)| new <= old)
        };
        if settled {
            let mut code = Vec::with_capacity(sizes.iter().sum());
            let mut offsets = Vec::with_capacity(instrs.len());
            for ((instr, result), size) in instrs.iter().zip(&encoded).zip(&sizes) {
                offsets.push(((instr.ip() - old_ip) as u32, code.len() as u32));
                code.extend_from_slice(&result.code_buffer);
                code.resize(code.len() + size - result.code_buffer.len(), NOP);
            }
            return Ok(Relocated { code, offsets });
        }
        // Early passes follow the sizes wherever they go; later ones only let them grow, which
        // must stop because every group has a largest form.
        sizes = if pass < EXACT_PASSES {
            new_sizes
        } else {
            new_sizes.iter().zip(&sizes).map(|(new, old)| *new.max(old)).collect()
        };
    }
    Err(RelocError::Encoder("the layout of the relocated branches did not settle".into()))
}

/// The instructions that replace `instr` when its copy starts at `at`; `redirect` maps a
/// branch target to where it now lives.
fn rewrite(instr: &Instruction, at: u64, redirect: impl Fn(u64) -> u64) -> Result<Vec<Instruction>, RelocError> {
    let mut copy = *instr;
    copy.set_ip(0);
    match instr.code() {
        Code::Call_rel32_64 => {
            let target = redirect(instr.near_branch_target());
            let jump_ip = at + PUSH_RETURN_LEN;
            let jump = if rel32_reaches(jump_ip, target) {
                Instruction::with_branch(Code::Jmp_rel32_64, target)?
            } else {
                Instruction::with_declare_byte(&jmp_abs(target))?
            };
            Ok(push_return_address(instr.next_ip())?.into_iter().chain([jump]).collect())
        }
        Code::Call_rm64 => {
            copy.set_code(Code::Jmp_rm64);
            if copy.op0_kind() == OpKind::Memory && matches!(copy.memory_base(), Register::RSP | Register::ESP) {
                // The pushed return address moved rsp down by 8 before the jump reads memory.
                let displacement = copy.memory_displacement64().wrapping_add(8);
                let displacement =
                    if copy.memory_base() == Register::ESP { u64::from(displacement as u32) } else { displacement };
                copy.set_memory_displacement64(displacement);
                if copy.memory_displ_size() == 0 {
                    copy.set_memory_displ_size(1);
                }
            }
            Ok(push_return_address(instr.next_ip())?.into_iter().chain([copy]).collect())
        }
        _ => {
            if copy.op0_kind() == OpKind::NearBranch64 {
                copy.set_near_branch64(redirect(instr.near_branch_target()));
            }
            Ok(vec![copy])
        }
    }
}

/// Tells an unreachable RIP-relative operand (iced's "too far away") apart from other
/// encoder failures, which have no structured form.
fn encoder_error(err: IcedError, instrs: &[Instruction], starts: &[u64]) -> RelocError {
    // The operand may sit up to a few dozen bytes into its group; count it unreachable if
    // it is from either end.
    const SLACK: u64 = 64;
    let fits = |from: u64, to: u64| i32::try_from(to.wrapping_sub(from) as i64).is_ok();
    instrs
        .iter()
        .zip(starts)
        .find(|(instr, &at)| {
            let target = instr.ip_rel_memory_address();
            instr.is_ip_rel_memory_operand()
                && target > u64::from(u32::MAX)
                && !(fits(at, target) && fits(at + SLACK, target))
        })
        .map_or_else(|| RelocError::from(err), |(instr, &new_ip)| RelocError::OutOfRange { ip: instr.ip(), new_ip })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, GasFormatter};

    const OLD: u64 = 0x40_1000;
    /// Within ±2 GiB of `OLD`, far beyond any rel8.
    const NEW: u64 = 0x7000_0000;

    /// The code at `ip` as GNU assembly with RIP-relative operands shown as the absolute
    /// address they reach (`mov 0x401027,%rax`), so a relocated operand reads the same as the
    /// original one.
    fn listing(code: &[u8], ip: u64) -> Vec<String> {
        let mut formatter = GasFormatter::new();
        formatter.options_mut().set_uppercase_hex(false);
        formatter.options_mut().set_branch_leading_zeros(false);
        Decoder::with_ip(64, code, ip, DecoderOptions::NONE)
            .into_iter()
            .map(|instr| {
                let mut text = String::new();
                formatter.format(&instr, &mut text);
                text
            })
            .collect()
    }

    fn relocated_listing(bytes: &[u8]) -> Vec<String> {
        let relocated = relocate(bytes, OLD, NEW).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"));
        listing(&relocated.code, NEW)
    }

    /// (original bytes at `OLD`, the relocated code at `NEW` as a listing)
    #[rustfmt::skip]
    const RELOCATIONS: &[(&[u8], &[&str])] = &[
        // push %rbp; sub $0x10,%rsp
        (&[0x55, 0x48, 0x83, 0xec, 0x10], &["push %rbp", "sub $0x10,%rsp"]),
        // mov 0x20(%rip),%rax             -> 0x401027
        (&[0x48, 0x8b, 0x05, 0x20, 0, 0, 0], &["mov 0x401027,%rax"]),
        // mov %eax,-0x100(%rip)           -> 0x400f06
        (&[0x89, 0x05, 0x00, 0xff, 0xff, 0xff], &["mov %eax,0x400f06"]),
        // lea 0x10(%rip),%rdi             -> 0x401017
        (&[0x48, 0x8d, 0x3d, 0x10, 0, 0, 0], &["lea 0x401017,%rdi"]),
        // jmp 0x401007 (rel8), widened
        (&[0xeb, 0x05], &["jmp 0x401007"]),
        // je 0x401012 (rel8), widened
        (&[0x74, 0x10], &["je 0x401012"]),
        // call 0x401105: push the original return address 0x401005, then jump
        (&[0xe8, 0x00, 0x01, 0, 0], &[
            "lea -8(%rsp),%rsp", "movl $0x401005,(%rsp)", "movl $0,4(%rsp)", "jmp 0x401105",
        ]),
        // call *%rax
        (&[0xff, 0xd0], &["lea -8(%rsp),%rsp", "movl $0x401002,(%rsp)", "movl $0,4(%rsp)", "jmp *%rax"]),
        // call *0x8(%rsp): rsp moved down by 8 before the jump reads it
        (&[0xff, 0x54, 0x24, 0x08], &[
            "lea -8(%rsp),%rsp", "movl $0x401004,(%rsp)", "movl $0,4(%rsp)", "jmpq *0x10(%rsp)",
        ]),
        // call *(%rsp)
        (&[0xff, 0x14, 0x24], &["lea -8(%rsp),%rsp", "movl $0x401003,(%rsp)", "movl $0,4(%rsp)", "jmpq *8(%rsp)"]),
        // call *0x10(%rip)                -> 0x401016
        (&[0xff, 0x15, 0x10, 0, 0, 0], &[
            "lea -8(%rsp),%rsp", "movl $0x401006,(%rsp)", "movl $0,4(%rsp)", "jmpq *0x401016",
        ]),
        // loop 0x401010: rel8 only, so iced branches over a near jmp
        (&[0xe2, 0x0e], &["loop 0x70000004", "jmp 0x70000009", "jmp 0x401010"]),
        // 1: loop 1b — a target inside the run is the copy's
        (&[0xe2, 0xfe], &["loop 0x70000000"]),
        // jrcxz 0x401007
        (&[0xe3, 0x05], &["jrcxz 0x70000004", "jmp 0x70000009", "jmp 0x401007"]),
        // endbr64; ret
        (&[0xf3, 0x0f, 0x1e, 0xfa, 0xc3], &["endbr64", "ret"]),
        // 1: dec %ecx; jne 1b — the loop stays in the copy
        (&[0xff, 0xc9, 0x75, 0xfc], &["dec %ecx", "jne 0x70000000"]),
        // call 1f; 1: pop %rax — the get-pc idiom still yields the original address
        (&[0xe8, 0, 0, 0, 0, 0x58], &[
            "lea -8(%rsp),%rsp", "movl $0x401005,(%rsp)", "movl $0,4(%rsp)", "jmp 0x70000016", "pop %rax",
        ]),
    ];

    #[test]
    fn relocations() {
        let mismatches: Vec<String> = RELOCATIONS
            .iter()
            .filter(|(bytes, expected)| relocated_listing(bytes) != *expected)
            .map(|(bytes, _)| format!("{bytes:02x?}: {:?}", relocated_listing(bytes)))
            .collect();
        assert!(mismatches.is_empty(), "{mismatches:#?}");
    }

    #[test]
    fn position_independent_code_keeps_its_bytes() {
        let bytes = [0x55, 0x48, 0x83, 0xec, 0x10, 0xf3, 0x0f, 0x1e, 0xfa, 0xc3];
        assert_eq!(relocate(&bytes, OLD, NEW).unwrap().code, bytes);
    }

    #[test]
    fn a_run_without_branches_or_rip_operands_is_copied_with_its_offsets() {
        #[rustfmt::skip]
        let bytes = [
            0xf3, 0x0f, 0x1e, 0xfa,             // 0: endbr64
            0x55,                               // 4: push %rbp
            0x48, 0x89, 0xe5,                   // 5: mov %rsp,%rbp
            0x48, 0x8b, 0x44, 0x24, 0x00,       // 8: mov 0x0(%rsp),%rax (a displacement an encoder may drop)
        ];
        let relocated = relocate(&bytes, OLD, NEW).unwrap();
        assert_eq!(relocated.code, bytes);
        assert_eq!(relocated.offsets, [(0, 0), (4, 4), (5, 5), (8, 8)]);
    }

    #[test]
    fn call_rewrite_bytes() {
        let relocated = relocate(&[0xe8, 0x00, 0x01, 0, 0], OLD, NEW).unwrap();
        #[rustfmt::skip]
        assert_eq!(relocated.code, [
            0x48, 0x8d, 0x64, 0x24, 0xf8,                   // lea -0x8(%rsp),%rsp
            0xc7, 0x04, 0x24, 0x05, 0x10, 0x40, 0x00,       // movl $0x401005,(%rsp)
            0xc7, 0x44, 0x24, 0x04, 0x00, 0x00, 0x00, 0x00, // movl $0x0,0x4(%rsp)
            0xe9, 0xec, 0x10, 0x40, 0x90,                   // jmp 0x401105
        ]);
        assert_eq!(PUSH_RETURN_LEN, 20);
    }

    #[test]
    fn offsets_map_each_original_instruction() {
        #[rustfmt::skip]
        let bytes = [
            0x55,                                   // 0: push %rbp
            0x48, 0x8b, 0x05, 0x20, 0, 0, 0,        // 1: mov 0x20(%rip),%rax
            0x74, 0x10,                             // 8: je 0x40101a   (2 -> 6 bytes)
            0xe8, 0x00, 0x01, 0, 0,                 // a: call +0x100   (5 -> 25 bytes)
            0xe2, 0x10,                             // f: loop 0x401021 (2 -> 9 bytes)
            0xe2, 0xee,                             // 11: loop 1b      (stays 2 bytes: to 0x401001's copy)
            0xc3,                                   // 13: ret
        ];
        let relocated = relocate(&bytes, OLD, NEW).unwrap();
        assert_eq!(
            relocated.offsets,
            [(0x0, 0x0), (0x1, 0x1), (0x8, 0x8), (0xa, 0xe), (0xf, 0x27), (0x11, 0x30), (0x13, 0x32)]
        );
        assert_eq!(listing(&relocated.code[0x30..0x32], NEW + 0x30), ["loop 0x70000001"]);
        assert_eq!(relocated.code[0x32..], [0xc3]);
    }

    #[test]
    fn unreachable_rip_relative_operand_is_out_of_range() {
        let old = 0x5555_5555_0000;
        let new = 0x7fff_0000_0000;
        // mov 0x20(%rip),%rax
        assert_eq!(
            relocate(&[0x55, 0x48, 0x8b, 0x05, 0x20, 0, 0, 0], old, new),
            Err(RelocError::OutOfRange { ip: old + 1, new_ip: new + 1 })
        );
        // call *0x10(%rip)
        assert!(matches!(relocate(&[0xff, 0x15, 0x10, 0, 0, 0], old, new), Err(RelocError::OutOfRange { .. })));
        let message = relocate(&[0x48, 0x8d, 0x3d, 0x10, 0, 0, 0], old, new).unwrap_err().to_string();
        assert!(message.contains("0x555555550000") && message.contains("±2 GiB"), "{message}");
    }

    #[test]
    fn rip_relative_operand_in_the_low_4gib_stays_reachable_from_anywhere() {
        // mov 0x20(%rip),%rax -> 0x401027, as eip-relative from far away
        let far = 0x7fff_0000_0000;
        let relocated = relocate(&[0x48, 0x8b, 0x05, 0x20, 0, 0, 0], OLD, far).unwrap();
        let instr = Decoder::with_ip(64, &relocated.code, far, DecoderOptions::NONE).decode();
        assert_eq!((instr.memory_base(), instr.ip_rel_memory_address()), (Register::EIP, 0x401027));
    }

    #[test]
    fn unreachable_branches_go_through_memory() {
        let old = 0x5555_5555_0000;
        let new = 0x7fff_0000_0000;
        // call old+0x105: the absolute jump right after the pushed return address
        let relocated = relocate(&[0xe8, 0x00, 0x01, 0, 0], old, new).unwrap();
        let mut expected = vec![0x48, 0x8d, 0x64, 0x24, 0xf8, 0xc7, 0x04, 0x24, 0x05, 0, 0x55, 0x55];
        expected.extend([0xc7, 0x44, 0x24, 0x04, 0x55, 0x55, 0, 0]);
        expected.extend(jmp_abs(old + 0x105));
        assert_eq!(relocated.code, expected);
        // jmp and jcc: iced's own long forms, which read the target from a qword after them
        for bytes in [&[0xeb, 0x05][..], &[0x74, 0x05]] {
            let relocated = relocate(bytes, old, new).unwrap();
            let text = listing(&relocated.code, new).join("; ");
            assert!(text.contains("jmpq *"), "{text}");
            let quad = &relocated.code[relocated.code.len() - 8..];
            assert_eq!(quad, (old + 7).to_le_bytes(), "{text}");
        }
    }

    #[test]
    fn refused_and_undecodable_runs() {
        // push %rbp; syscall
        let err = relocate(&[0x55, 0x0f, 0x05], OLD, NEW).unwrap_err();
        assert!(matches!(&err, RelocError::Refused(r) if r.ip == OLD + 1 && r.insn_text == "syscall"), "{err:?}");
        // push %rbp; mov 0x20(%rip),%rax cut short
        assert_eq!(
            relocate(&[0x55, 0x48, 0x8b], OLD, NEW),
            Err(RelocError::Decode(DecodeError::Truncated { ip: OLD + 1 }))
        );
        assert!(matches!(relocate(&[0xff, 0xd4], OLD, NEW), Err(RelocError::Refused(_))));
        // call *%rsp
    }

    #[test]
    fn slot_ends_in_a_jump_back() {
        // mov 0x20(%rip),%rax; then jmp 0x401007
        let slot = build_slot(&[0x48, 0x8b, 0x05, 0x20, 0, 0, 0], OLD, NEW, OLD + 7).unwrap();
        assert_eq!(listing(&slot, NEW), ["mov 0x401027,%rax", "jmp 0x401007"]);
        assert_eq!(slot.len(), 7 + 5);
        // Out of rel32 reach: jmp *0(%rip); .quad resume
        let far = 0x7fff_0000_0000;
        let slot = build_slot(&[0x55], OLD, far, OLD + 1).unwrap();
        let mut expected = vec![0x55];
        expected.extend(jmp_abs(OLD + 1));
        assert_eq!(slot, expected);
        assert_eq!(
            build_slot(&[0xcc], OLD, NEW, OLD + 1).unwrap_err().to_string(),
            "the instruction at 0x401000 (`int3`) cannot run out of line: it is a breakpoint \
             itself: the trap must be reported at the program's own address; probe a \
             neighbouring instruction instead"
        );
    }

    /// (bytes at `OLD`, post-slot listing at `NEW`, exits as (offset, resume))
    type PostSlotCase = (&'static [u8], &'static [&'static str], &'static [(u32, u64)]);

    #[rustfmt::skip]
    const POST_SLOTS: &[PostSlotCase] = &[
        // mov 0x20(%rip),%rax
        (&[0x48, 0x8b, 0x05, 0x20, 0, 0, 0], &["mov 0x401027,%rax", "int3"], &[(7, OLD + 7)]),
        // jmp 0x401105
        (&[0xe9, 0x00, 0x01, 0, 0], &["int3"], &[(0, OLD + 0x105)]),
        // je 0x401012
        (&[0x74, 0x10], &["je 0x70000003", "int3", "int3"], &[(2, OLD + 2), (3, OLD + 0x12)]),
        // jg 0x401106 (rel32), shortened: its exits are right after it
        (&[0x0f, 0x8f, 0x00, 0x01, 0, 0], &["jg 0x70000003", "int3", "int3"], &[(2, OLD + 6), (3, OLD + 0x106)]),
        // loop 0x401000
        (&[0xe2, 0xfe], &["loop 0x70000003", "int3", "int3"], &[(2, OLD + 2), (3, OLD)]),
        // jrcxz 0x401007
        (&[0xe3, 0x05], &["jrcxz 0x70000003", "int3", "int3"], &[(2, OLD + 2), (3, OLD + 7)]),
        // call 0x401105: push the return address, then stop; the handler resumes at the callee
        (&[0xe8, 0x00, 0x01, 0, 0], &["lea -8(%rsp),%rsp", "movl $0x401005,(%rsp)", "movl $0,4(%rsp)", "int3"],
            &[(20, OLD + 0x105)]),
    ];

    #[test]
    fn post_slots() {
        for &(bytes, expected, exits) in POST_SLOTS {
            let slot = build_post_slot(bytes, OLD, NEW).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"));
            assert_eq!(listing(&slot.code, NEW), expected, "{bytes:02x?}");
            assert_eq!(slot.exits, exits, "{bytes:02x?}");
            for (offset, _) in exits {
                assert_eq!(slot.code[*offset as usize], INT3);
            }
        }
    }

    #[test]
    fn post_slot_refuses_unknown_successors() {
        #[rustfmt::skip]
        let cases: &[(&[u8], &str)] = &[
            (&[0xc3], "a return"),                      // ret
            (&[0xff, 0xe0], "an indirect jump"),        // jmp *%rax
            (&[0xff, 0xd0], "an indirect call"),        // call *%rax
            (&[0xff, 0x15, 0x10, 0, 0, 0], "an indirect call"), // call *0x10(%rip)
            (&[0xc7, 0xf8, 0x10, 0, 0, 0], "transaction"), // xbegin
            (&[0x0f, 0x05], "system call"),             // syscall
        ];
        for &(bytes, word) in cases {
            let err = build_post_slot(bytes, OLD, NEW).unwrap_err();
            assert!(matches!(&err, RelocError::Refused(r) if r.reason.contains(word)), "{bytes:02x?}: {err}");
        }
    }
}
