//! Moving instructions to a new address.

use std::fmt;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Encoder, IcedError, Instruction, InstructionBlock,
    MemoryOperand, OpKind, Register,
};

use super::classify::check_instruction;
use super::decode::{decode_instruction, decode_instructions, flow_of};
use super::encode::{jmp_abs, jmp_any, rel32_reaches, INT3};
use super::{DecodeError, Flow, Refusal};

/// Why a run of instructions could not be relocated.
#[derive(Debug, Clone, PartialEq, Eq)]
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

impl std::error::Error for RelocError {}

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
    relocate_instructions(&instrs, old_ip, new_ip)
}

/// An out-of-line slot for a boosted probe: the relocated instruction(s) `bytes` (originally
/// at `old_ip`) followed by a jump to `resume_ip` (normally `old_ip + bytes.len()`), encoded
/// to sit at `slot_ip`. The jump back is a `jmp rel32` when in reach, otherwise an absolute
/// `jmp [rip+0]; .quad resume_ip`.
pub fn build_slot(
    bytes: &[u8],
    old_ip: u64,
    slot_ip: u64,
    resume_ip: u64,
) -> Result<Vec<u8>, RelocError> {
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
        Flow::Sequential => (
            relocate_instructions(&[instr], old_ip, slot_ip)?.code,
            vec![next],
        ),
        Flow::Jump { target } => (Vec::new(), vec![target]),
        Flow::CondJump { .. } if is_xbegin(instr.code()) => {
            return Err(RelocError::Refused(Refusal::new(
                &instr,
                "an int3 inside a transaction aborts it, so the post-handler would never see \
                 the transaction start",
            )))
        }
        Flow::CondJump { target } => (branch_over_one_byte(&instr, slot_ip)?, vec![next, target]),
        Flow::Call { target } => (
            encode_at(&push_return_address(next)?, slot_ip)?,
            vec![target],
        ),
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

fn is_xbegin(code: Code) -> bool {
    matches!(code, Code::Xbegin_rel16 | Code::Xbegin_rel32)
}

/// Encodes synthetic instructions (no branches into them) at `ip`.
fn encode_at(instrs: &[Instruction], ip: u64) -> Result<Vec<u8>, RelocError> {
    Ok(BlockEncoder::encode(
        64,
        InstructionBlock::new(instrs, ip),
        BlockEncoderOptions::NONE,
    )?
    .code_buffer)
}

/// Length of [`push_return_address`]'s code: `lea` (5) + `movl` (7) + `movl` (8).
const PUSH_RETURN_LEN: u64 = 20;

/// `push $ret` for any 64-bit `ret`, without touching flags or any register but `rsp`
/// (`push imm32` would sign-extend, and `pushf`-free code matters because the flags a
/// call leaves are the callee's input).
///
/// ```text
/// lea  -0x8(%rsp),%rsp
/// movl $ret_lo32,(%rsp)
/// movl $ret_hi32,0x4(%rsp)
/// ```
fn push_return_address(ret: u64) -> Result<[Instruction; 3], IcedError> {
    Ok([
        Instruction::with2(
            Code::Lea_r64_m,
            Register::RSP,
            MemoryOperand::with_base_displ(Register::RSP, -8),
        )?,
        Instruction::with2(
            Code::Mov_rm32_imm32,
            MemoryOperand::with_base(Register::RSP),
            ret as u32,
        )?,
        Instruction::with2(
            Code::Mov_rm32_imm32,
            MemoryOperand::with_base_displ(Register::RSP, 4),
            (ret >> 32) as u32,
        )?,
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
fn relocate_instructions(
    instrs: &[Instruction],
    old_ip: u64,
    new_ip: u64,
) -> Result<Relocated, RelocError> {
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
        let blocks: Vec<_> = groups
            .iter()
            .zip(&starts)
            .map(|(group, &at)| InstructionBlock::new(group, at))
            .collect();
        let encoded = BlockEncoder::encode_slice(64, &blocks, BlockEncoderOptions::NONE)
            .map_err(|err| encoder_error(err, instrs, &starts))?;
        let new_sizes: Vec<usize> = encoded
            .iter()
            .map(|result| result.code_buffer.len())
            .collect();
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
            new_sizes
                .iter()
                .zip(&sizes)
                .map(|(new, old)| *new.max(old))
                .collect()
        };
    }
    Err(RelocError::Encoder(
        "the layout of the relocated branches did not settle".into(),
    ))
}

/// The instructions that replace `instr` when its copy starts at `at`; `redirect` maps a
/// branch target to where it now lives.
fn rewrite(
    instr: &Instruction,
    at: u64,
    redirect: impl Fn(u64) -> u64,
) -> Result<Vec<Instruction>, RelocError> {
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
            Ok(push_return_address(instr.next_ip())?
                .into_iter()
                .chain([jump])
                .collect())
        }
        Code::Call_rm64 => {
            copy.set_code(Code::Jmp_rm64);
            if copy.op0_kind() == OpKind::Memory
                && matches!(copy.memory_base(), Register::RSP | Register::ESP)
            {
                // The pushed return address moved rsp down by 8 before the jump reads memory.
                let displacement = copy.memory_displacement64().wrapping_add(8);
                let displacement = if copy.memory_base() == Register::ESP {
                    u64::from(displacement as u32)
                } else {
                    displacement
                };
                copy.set_memory_displacement64(displacement);
                if copy.memory_displ_size() == 0 {
                    copy.set_memory_displ_size(1);
                }
            }
            Ok(push_return_address(instr.next_ip())?
                .into_iter()
                .chain([copy])
                .collect())
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
        .map_or_else(
            || RelocError::from(err),
            |(instr, &new_ip)| RelocError::OutOfRange {
                ip: instr.ip(),
                new_ip,
            },
        )
}
