//! May the instructions at a probe point be replaced by a 5-byte `jmp rel32` to a detour?
//! The safety checks of the kernel's jump optimization (Documentation/trace/kprobes.rst,
//! "Safety Check"; `can_optimize()` in arch/x86/kernel/kprobes/opt.c), done by decoding the
//! whole function:
//!
//! ```text
//!   function:  ... | i0 | i1 |  i2  | ...        covered run: i0 i1 i2 (>= 5 bytes)
//!                  | e9 <rel32 to detour> | ...  after optimization
//! ```
//! A thread that reached `i1` or `i2` by a jump would execute the middle of the `jmp`'s
//! displacement, so the run is refused when anything may jump there: a direct branch of the
//! function, an entry of a jump table (read by [`super::jump_table`]; an indirect jump whose
//! targets cannot be shown refuses the whole function, as the kernel does), a return into it
//! (a call inside the run), or an entry the decoder cannot see (code after an unconditional
//! transfer, such as an exception landing pad).

use std::fmt;

use super::classify::check_instruction;
use super::decode::{decode_instructions, flow_of, new_decoder, next_instruction, Disassembler};
use super::jump_table::{branch_targets, indirect_targets, IndirectTargets, TableMemory};
use super::{DecodeError, Flow, Refusal, JMP_REL32_LEN};
use iced_x86::{Instruction, Mnemonic};

/// The instructions a detour jump would cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoveredRun {
    /// Address of the first covered instruction (the probe point).
    pub addr: u64,
    /// Length of the run in bytes (at least [`JMP_REL32_LEN`]).
    pub len: usize,
    /// Disassembly of each covered instruction, for the listing.
    pub insns: Vec<String>,
}

impl CoveredRun {
    /// True when `ip` is inside the run past its first byte: where no thread may be when
    /// the jump is written.
    pub fn strictly_inside(&self, ip: u64) -> bool {
        ip > self.addr && ip < self.addr + self.len as u64
    }
}

/// Why a probe point cannot be jump-optimized; the probe stays a breakpoint probe.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OptimizeRefusal {
    /// The probe point is not inside a function of known size.
    NoFunctionBounds,
    /// The function ends before the jump's bytes of whole instructions.
    PastFunctionEnd {
        /// Bytes of whole instructions available from the probe point to the function end.
        available: usize,
        /// Bytes the jump needs.
        needed: usize,
    },
    /// The function could not be decoded.
    Decode(DecodeError),
    /// A direct branch of the function targets a covered instruction past the first.
    BranchInto {
        /// The branch.
        from: u64,
        /// Its target.
        to: u64,
    },
    /// The function has an indirect jump whose targets are unknown (a jump table).
    IndirectJump {
        /// The indirect jump.
        at: u64,
        /// Its disassembly.
        text: String,
    },
    /// A call inside the run would return into the covered bytes.
    CallInside {
        /// The call.
        at: u64,
    },
    /// A covered instruction follows an unconditional transfer, so it is reached some other
    /// way (a jump from elsewhere, an exception landing pad).
    NotFallthrough {
        /// The instruction reached some other way.
        at: u64,
    },
    /// A covered instruction cannot run out of line.
    NotRelocatable(Refusal),
}

impl fmt::Display for OptimizeRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptimizeRefusal::NoFunctionBounds => write!(f, "no function bounds are known for the probe point"),
            OptimizeRefusal::PastFunctionEnd { available, needed } => write!(
                f,
                "only {available} byte(s) of instructions remain before the function ends; a jump needs {needed}"
            ),
            OptimizeRefusal::Decode(err) => write!(f, "the function does not decode: {err}"),
            OptimizeRefusal::BranchInto { from, to } => {
                write!(f, "the branch at {from:#x} jumps to {to:#x}, inside the bytes the jump would cover")
            }
            OptimizeRefusal::IndirectJump { at, text } => {
                write!(f, "the function has an indirect jump with unknown targets at {at:#x} (`{text}`)")
            }
            OptimizeRefusal::CallInside { at } => {
                write!(f, "the call at {at:#x} would return into the bytes the jump would cover")
            }
            OptimizeRefusal::NotFallthrough { at } => write!(
                f,
                "the instruction at {at:#x} follows an unconditional transfer, so something other than \
                 the previous instruction leads to it"
            ),
            OptimizeRefusal::NotRelocatable(refusal) => refusal.fmt(f),
        }
    }
}

/// The error this one wraps, where it wraps one (its message is part of this one's
/// `Display` too, which is complete on its own).
impl std::error::Error for OptimizeRefusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OptimizeRefusal::Decode(e) => Some(e),
            OptimizeRefusal::NotRelocatable(e) => Some(e),
            _ => None,
        }
    }
}

impl From<DecodeError> for OptimizeRefusal {
    fn from(err: DecodeError) -> Self {
        OptimizeRefusal::Decode(err)
    }
}

/// Decides whether the probe point `addr` of the function `function` (its bytes, starting at
/// `start`, as the compiler left them: no `int3` of ours) can be covered by a detour jump,
/// and returns the covered run.
///
/// ```
/// use dynprobe_arch::x86_64::optimize::covered_run;
/// // push %rbp; mov %rsp,%rbp; mov %rdi,%rax; pop %rbp; ret
/// let function = [0x55, 0x48, 0x89, 0xe5, 0x48, 0x89, 0xf8, 0x5d, 0xc3];
/// let run = covered_run(&function, 0x1000, 0x1000).unwrap();
/// assert_eq!(run.len, 7); // push, mov, mov: the first whole instructions covering 5 bytes
/// ```
pub fn covered_run(function: &[u8], start: u64, addr: u64) -> Result<CoveredRun, OptimizeRefusal> {
    covered_run_of(function, start, addr, JMP_REL32_LEN)
}

/// [`covered_run`] for a run of at least `min_len` bytes instead of a jump's 5: the
/// instructions from `addr` that a patch of `min_len` bytes would cover, with the same
/// checks (the ptrace tracer covers two bytes, see `dynprobe-uprobes`).
pub fn covered_run_of(function: &[u8], start: u64, addr: u64, min_len: usize) -> Result<CoveredRun, OptimizeRefusal> {
    covered_run_with(function, start, addr, min_len, None)
}

/// [`covered_run_of`] with the process's memory at hand, so that the jump tables of the
/// function are read and their entries checked like direct branches (without it a jump
/// table refuses the run).
pub fn covered_run_with(
    function: &[u8],
    start: u64,
    addr: u64,
    min_len: usize,
    tables: Option<&TableMemory<'_>>,
) -> Result<CoveredRun, OptimizeRefusal> {
    if function.is_empty() {
        return Err(OptimizeRefusal::NoFunctionBounds);
    }
    let instrs = decode_instructions(function, start)?;
    let first = instrs.iter().position(|i| i.ip() == addr).ok_or(DecodeError::OutsideFunction {
        addr,
        start,
        len: function.len(),
    })?;

    let mut covered: Vec<&Instruction> = Vec::new();
    let mut len = 0;
    for instr in &instrs[first..] {
        if let Some(prev) = covered.last() {
            match flow_of(prev) {
                Flow::Sequential | Flow::CondJump { .. } => {}
                Flow::Call { .. } | Flow::IndirectCall => return Err(OptimizeRefusal::CallInside { at: prev.ip() }),
                _ => return Err(OptimizeRefusal::NotFallthrough { at: instr.ip() }),
            }
        }
        check_instruction(instr).map_err(OptimizeRefusal::NotRelocatable)?;
        covered.push(instr);
        len += instr.len();
        if len >= min_len {
            break;
        }
    }
    if len < min_len {
        return Err(OptimizeRefusal::PastFunctionEnd { available: len, needed: min_len });
    }
    let run = CoveredRun { addr, len, insns: Vec::new() };

    check_branches(&instrs, &run, tables)?;
    let mut disasm = Disassembler::new();
    Ok(CoveredRun { insns: covered.iter().map(|i| disasm.text(i)).collect(), ..run })
}

/// The longest gap between two functions worth looking for an island in: alignment
/// padding is at most 63 bytes (`.p2align 6`).
pub const MAX_ISLAND_GAP: usize = 64;

/// Where, in the padding `gap` (starting at `gap_start`, a boundary: the end of the
/// function before) that runs up to a function's entry, a 5-byte `jmp rel32` can be
/// written for the entry's 2-byte `jmp rel8` to reach — the hot-patch layout, for a
/// function whose first five bytes cannot all be covered (a branch lands inside them, or
/// the function is shorter):
///
/// ```text
///   before:  ... ret | nop nop nop nop nop nop | i0 i1 ...        (i0 at least 2 bytes)
///   after:   ... ret | nop e9 <rel32 detour>  | eb <-7> i1 ...
/// ```
///
/// The padding is only ever executed by falling through it into the entry, so from its
/// first replaced byte on it may as well go where the entry goes. Every instruction of the
/// gap must be a `nop` or an `int3`, the gap must decode exactly up to the entry, and the
/// island starts on one of its instruction boundaries. Returns the island's address.
///
/// ```
/// use dynprobe_arch::x86_64::optimize::island_before;
/// // ret-padding of the function before: nopw 0x0(%rax,%rax,1) (6 bytes), xchg %ax,%ax (2)
/// let gap = [0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x66, 0x90];
/// assert_eq!(island_before(&gap, 0x1000), Some(0x1000)); // the boundary 5+ bytes before the entry
/// assert_eq!(island_before(&gap[6..], 0x1006), None); // 2 bytes: too short
/// assert_eq!(island_before(&[0x48, 0x89, 0xf8, 0x90, 0x90, 0x90], 0x1000), None); // code, not padding
/// ```
pub fn island_before(gap: &[u8], gap_start: u64) -> Option<u64> {
    if gap.len() < JMP_REL32_LEN || gap.len() > MAX_ISLAND_GAP {
        return None;
    }
    let entry = gap_start + gap.len() as u64;
    let mut island = None;
    let mut decoder = new_decoder(gap, gap_start);
    while decoder.can_decode() {
        let instr = next_instruction(&mut decoder).ok()?;
        if !matches!(instr.mnemonic(), Mnemonic::Nop | Mnemonic::Int3) {
            return None;
        }
        if entry - instr.ip() >= JMP_REL32_LEN as u64 {
            island = Some(instr.ip());
        }
    }
    island
}

/// Every direct branch of the code `code` (at `start`) whose target lies outside it, as
/// (branch address, target): the ways into other functions' middles — a `.cold` part's jump
/// back, glibc's `__mempcpy` jumping into `__memmove`, hand-written assembly sharing a body.
/// The probe layer gathers them over a whole module and refuses a covered run that one of
/// them lands inside.
pub fn branches_out(code: &[u8], start: u64) -> Result<Vec<(u64, u64)>, DecodeError> {
    let end = start + code.len() as u64;
    // Streamed, not collected: a whole library's functions go through here when a probe in
    // it is prepared, and most instructions are not branches.
    let mut decoder = new_decoder(code, start);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let instr = next_instruction(&mut decoder)?;
        if let Flow::Jump { target } | Flow::CondJump { target } | Flow::Call { target } = flow_of(&instr) {
            if !(start..end).contains(&target) {
                out.push((instr.ip(), target));
            }
        }
    }
    Ok(out)
}

fn check_branches(
    instrs: &[Instruction],
    run: &CoveredRun,
    tables: Option<&TableMemory<'_>>,
) -> Result<(), OptimizeRefusal> {
    let mut targets = None;
    for (at, instr) in instrs.iter().enumerate() {
        match flow_of(instr) {
            Flow::Jump { target } | Flow::CondJump { target } | Flow::Call { target }
                if run.strictly_inside(target) =>
            {
                return Err(OptimizeRefusal::BranchInto { from: instr.ip(), to: target })
            }
            Flow::IndirectJump => {
                let targets = targets.get_or_insert_with(|| branch_targets(instrs));
                match indirect_targets(instrs, at, targets, tables) {
                    IndirectTargets::TailCall => {}
                    IndirectTargets::Table(entries) => {
                        if let Some(&to) = entries.iter().find(|&&to| run.strictly_inside(to)) {
                            return Err(OptimizeRefusal::BranchInto { from: instr.ip(), to });
                        }
                    }
                    IndirectTargets::Unknown => {
                        return Err(OptimizeRefusal::IndirectJump {
                            at: instr.ip(),
                            text: Disassembler::new().text(instr),
                        })
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(function: &[u8], addr: u64) -> OptimizeRefusal {
        covered_run(function, 0x1000, addr).unwrap_err()
    }

    #[test]
    fn covers_whole_instructions_up_to_five_bytes() {
        // 0x1000: mov %rdi,%rax (3) ; 0x1003: shr $0x1f,%rax (4) ; 0x1007: xor %rdi,%rax (3) ; ret
        let f = [0x48, 0x89, 0xf8, 0x48, 0xc1, 0xe8, 0x1f, 0x48, 0x31, 0xf8, 0xc3];
        let run = covered_run(&f, 0x1000, 0x1000).unwrap();
        assert_eq!(run.len, 7);
        assert_eq!(run.insns, ["mov %rdi,%rax", "shr $0x1f,%rax"]);
        assert!(run.strictly_inside(0x1003) && !run.strictly_inside(0x1000) && !run.strictly_inside(0x1007));
        // From the second instruction: shr (4) + xor (3).
        assert_eq!(covered_run(&f, 0x1000, 0x1003).unwrap().len, 7);
    }

    #[test]
    fn refuses_a_run_past_the_function_end() {
        // mov %rdi,%rax ; ret : 4 bytes in all
        assert_eq!(
            refusal(&[0x48, 0x89, 0xf8, 0xc3], 0x1000),
            OptimizeRefusal::PastFunctionEnd { available: 4, needed: 5 }
        );
        // mov %rdi,%rax ; ret ; nop ; nop : the nops are reached some other way, if at all
        let f = [0x48, 0x89, 0xf8, 0xc3, 0x90, 0x90];
        assert_eq!(refusal(&f, 0x1000), OptimizeRefusal::NotFallthrough { at: 0x1004 });
    }

    #[test]
    fn refuses_a_branch_into_the_covered_bytes() {
        // 0x1000: mov %rdi,%rax ; 0x1003: add $1,%rax (4) ; 0x1007: cmp $9,%rax (4) ;
        // 0x100b: jb 0x1003 ; 0x100d: ret
        let f = [0x48, 0x89, 0xf8, 0x48, 0x83, 0xc0, 0x01, 0x48, 0x83, 0xf8, 0x09, 0x72, 0xf6, 0xc3];
        assert_eq!(refusal(&f, 0x1000), OptimizeRefusal::BranchInto { from: 0x100b, to: 0x1003 });
        // The loop head itself may be covered: a jump to the first byte lands on the jmp.
        assert_eq!(covered_run(&f, 0x1000, 0x1003).unwrap().len, 8);
    }

    #[test]
    fn refuses_a_call_that_returns_inside_but_allows_one_at_the_end() {
        // 0x1000: call 0x2000 (5) ; 0x1005: mov %rdi,%rax ; ret
        let f = [0xe8, 0xfb, 0x0f, 0x00, 0x00, 0x48, 0x89, 0xf8, 0xc3];
        assert_eq!(covered_run(&f, 0x1000, 0x1000).unwrap().len, 5);
        // 0x1000: nop ; 0x1001: call 0x2000 ; ... the call is not the last covered instruction
        let g = [0x90, 0xe8, 0xfa, 0x0f, 0x00, 0x00, 0x48, 0x89, 0xf8, 0xc3];
        assert_eq!(covered_run(&g, 0x1000, 0x1000).unwrap().len, 6);
        // push %rbx ; call 0x2000 ; ... covered: push (1) + call (5): call last, fine.
        // 0x1000: push %rbx ; 0x1001: call *%rax (2) ; 0x1003: mov %rdi,%rax ; ret
        let h = [0x53, 0xff, 0xd0, 0x48, 0x89, 0xf8, 0xc3];
        assert_eq!(refusal(&h, 0x1000), OptimizeRefusal::CallInside { at: 0x1001 });
    }

    #[test]
    fn refuses_a_function_with_a_jump_table_but_not_a_got_tail_call() {
        // mov %rdi,%rax ; shr $0x1f,%rax ; jmp *%rax
        let f = [0x48, 0x89, 0xf8, 0x48, 0xc1, 0xe8, 0x1f, 0xff, 0xe0];
        assert!(matches!(refusal(&f, 0x1000), OptimizeRefusal::IndirectJump { at: 0x1007, .. }));
        // ... ; jmp *0x10(%rip)
        let g = [0x48, 0x89, 0xf8, 0x48, 0xc1, 0xe8, 0x1f, 0xff, 0x25, 0x10, 0x00, 0x00, 0x00];
        assert_eq!(covered_run(&g, 0x1000, 0x1000).unwrap().len, 7);
    }

    #[test]
    fn branches_out_lists_only_targets_outside_the_code() {
        // 0x2000: jmp 0x1003 ; 0x2005: jmp 0x2000
        let rel = (0x1003i64 - 0x2005) as i32;
        let code: Vec<u8> = [0xe9].into_iter().chain(rel.to_le_bytes()).chain([0xeb, 0xf9]).collect();
        assert_eq!(branches_out(&code, 0x2000), Ok(vec![(0x2000, 0x1003)]));
    }

    #[test]
    fn refuses_an_unrelocatable_instruction() {
        // syscall ; mov %rdi,%rax ; ret
        let f = [0x0f, 0x05, 0x48, 0x89, 0xf8, 0xc3];
        assert!(matches!(refusal(&f, 0x1000), OptimizeRefusal::NotRelocatable(_)));
    }
}
