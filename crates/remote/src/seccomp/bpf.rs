//! Running a seccomp filter — a classic BPF program (`struct sock_filter[]`) — over a system
//! call, as the kernel does before the call runs (`kernel/seccomp.c`, and the instruction set
//! of `Documentation/networking/filter.rst`): pure logic, no system call.
//!
//! The kernel checked the program when it was installed (`seccomp_check_filter`): only the
//! instructions below, loads of aligned 32-bit words of `struct seccomp_data`, forward jumps
//! that stay inside the program, a `ret` at the end. A program read back from a process
//! is checked again here all the same; one that breaks a rule is [`BadFilter`], never a
//! panic nor a loop.

/// One instruction of a classic BPF program (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

impl Insn {
    /// The instruction from its 8 bytes as `struct sock_filter` lays them out.
    pub fn from_bytes(b: [u8; 8]) -> Insn {
        Insn {
            code: u16::from_le_bytes([b[0], b[1]]),
            jt: b[2],
            jf: b[3],
            k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

/// What the filter sees of a system call (`struct seccomp_data`, 64 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SyscallData {
    pub nr: i32,
    pub arch: u32,
    pub instruction_pointer: u64,
    pub args: [u64; 6],
}

impl SyscallData {
    /// The 32-bit word at byte `offset` of `struct seccomp_data` (little-endian halves of the
    /// 64-bit fields), if `offset` is an aligned word inside it.
    fn word(&self, offset: u32) -> Option<u32> {
        if !offset.is_multiple_of(4) || offset >= 64 {
            return None;
        }
        let half = |v: u64, at: u32| if at.is_multiple_of(8) { v as u32 } else { (v >> 32) as u32 };
        Some(match offset {
            0 => self.nr as u32,
            4 => self.arch,
            8 | 12 => half(self.instruction_pointer, offset),
            _ => half(self.args[(offset as usize - 16) / 8], offset),
        })
    }
}

/// A filter that breaks a rule the kernel enforces: it cannot be the process's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadFilter {
    /// The instruction's index.
    pub at: usize,
    pub why: &'static str,
}

// The instruction classes and fields of `linux/bpf_common.h`.
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const STX: u16 = 0x03;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const IMM: u16 = 0x00;
const ABS: u16 = 0x20;
const MEM: u16 = 0x60;
const LEN: u16 = 0x80;
const K: u16 = 0x00;
const X: u16 = 0x08;
const A: u16 = 0x10;
/// Scratch memory words (`BPF_MEMWORDS`).
const MEMWORDS: u32 = 16;
/// `BPF_MAXINSNS`: the longest program the kernel accepts.
pub(crate) const MAX_INSNS: usize = 4096;

/// The filter's return value for `data` (an action in the top 16 bits, its data below).
pub(crate) fn run(prog: &[Insn], data: &SyscallData) -> Result<u32, BadFilter> {
    if prog.is_empty() || prog.len() > MAX_INSNS {
        return Err(BadFilter { at: 0, why: "no instruction, or more than the kernel allows" });
    }
    let (mut a, mut x) = (0u32, 0u32);
    let mut mem = [0u32; MEMWORDS as usize];
    let mut pc = 0usize;
    // Every jump goes forward, so each instruction runs at most once.
    while let Some(&insn) = prog.get(pc) {
        let bad = |why| BadFilter { at: pc, why };
        let mut next = pc + 1;
        let src = |x: u32| if insn.code & X != 0 { x } else { insn.k };
        match insn.code & 0x07 {
            LD | LDX => {
                let value = match insn.code & 0xe0 {
                    IMM => insn.k,
                    ABS if insn.code & 0x07 == LD && insn.code & 0x18 == W => {
                        data.word(insn.k).ok_or(bad("a load outside struct seccomp_data"))?
                    }
                    MEM => *mem.get(insn.k as usize).ok_or(bad("scratch memory out of range"))?,
                    LEN => 64,
                    _ => return Err(bad("a load mode seccomp does not allow")),
                };
                if insn.code & 0x07 == LD {
                    a = value;
                } else {
                    x = value;
                }
            }
            ST | STX => {
                let word = mem.get_mut(insn.k as usize).ok_or(bad("scratch memory out of range"))?;
                *word = if insn.code & 0x07 == ST { a } else { x };
            }
            ALU => {
                let operand = src(x);
                a = match insn.code & 0xf0 {
                    0x00 => a.wrapping_add(operand),
                    0x10 => a.wrapping_sub(operand),
                    0x20 => a.wrapping_mul(operand),
                    // Division by zero ends the whole filter with 0, SECCOMP_RET_KILL_THREAD (the
                    // kernel's classic-to-eBPF conversion, net/core/filter.c).
                    0x30 | 0x90 if operand == 0 => return Ok(0),
                    0x30 => a / operand,
                    0x40 => a | operand,
                    0x50 => a & operand,
                    // 32-bit shifts by the count modulo 32, as the kernel's interpreter and JIT do.
                    0x60 => a.wrapping_shl(operand),
                    0x70 => a.wrapping_shr(operand),
                    0x80 => a.wrapping_neg(),
                    0x90 => a % operand,
                    0xa0 => a ^ operand,
                    _ => return Err(bad("an ALU operation classic BPF does not have")),
                };
            }
            JMP => {
                let taken = match insn.code & 0xf0 {
                    0x00 => {
                        next = next.checked_add(insn.k as usize).ok_or(bad("a jump out of the program"))?;
                        None
                    }
                    0x10 => Some(a == src(x)),
                    0x20 => Some(a > src(x)),
                    0x30 => Some(a >= src(x)),
                    0x40 => Some(a & src(x) != 0),
                    _ => return Err(bad("a jump classic BPF does not have")),
                };
                if let Some(taken) = taken {
                    next += usize::from(if taken { insn.jt } else { insn.jf });
                }
            }
            RET => {
                return match insn.code & 0x18 {
                    K => Ok(insn.k),
                    A => Ok(a),
                    _ => Err(bad("a return of neither A nor a constant")),
                }
            }
            MISC => match insn.code & 0xf8 {
                0x00 => x = a,
                0x80 => a = x,
                _ => return Err(bad("a miscellaneous operation classic BPF does not have")),
            },
            _ => unreachable!("the class is three bits"),
        }
        pc = next;
    }
    Err(BadFilter { at: prog.len(), why: "the program runs past its end" })
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn stmt(code: u16, k: u32) -> Insn {
        Insn { code, jt: 0, jf: 0, k }
    }
    const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
        Insn { code, jt, jf, k }
    }
    const LD_ABS_W: u16 = LD | W | ABS;
    const JEQ_K: u16 = JMP | 0x10 | K;
    const JSET_K: u16 = JMP | 0x40 | K;
    const RET_K: u16 = RET | K;
    const KILL: u32 = 0x8000_0000;
    const ALLOW: u32 = 0x7fff_0000;

    fn call(nr: i32, args: [u64; 6]) -> SyscallData {
        SyscallData { nr, arch: 0xc000_003e, instruction_pointer: 0x7f00_1234_5678, args }
    }

    #[test]
    fn a_filter_on_the_number_kills_that_call_only() {
        let prog = [stmt(LD_ABS_W, 0), jump(JEQ_K, 41, 0, 1), stmt(RET_K, KILL), stmt(RET_K, ALLOW)];
        assert_eq!(run(&prog, &call(41, [0; 6])), Ok(KILL));
        assert_eq!(run(&prog, &call(42, [0; 6])), Ok(ALLOW));
    }

    #[test]
    fn a_filter_on_an_argument_reads_its_low_and_high_halves() {
        // mmap's prot (args[2], low half at 32) with PROT_EXEC: EPERM; a high half (at 36)
        // that is not zero: kill.
        let prog = [
            stmt(LD_ABS_W, 36),
            jump(JEQ_K, 0, 1, 0),
            stmt(RET_K, KILL),
            stmt(LD_ABS_W, 32),
            jump(JSET_K, 4, 0, 1),
            stmt(RET_K, 0x0005_0001),
            stmt(RET_K, ALLOW),
        ];
        assert_eq!(run(&prog, &call(9, [0, 4096, 1 | 4, 2, 3, 0])), Ok(0x0005_0001));
        assert_eq!(run(&prog, &call(9, [0, 4096, 1 | 2, 2, 3, 0])), Ok(ALLOW));
        assert_eq!(run(&prog, &call(9, [0, 4096, 1 << 32, 2, 3, 0])), Ok(KILL));
    }

    #[test]
    fn scratch_memory_index_register_and_arithmetic_work_as_the_kernel_s() {
        // A = nr; M[3] = A; X = 5; A = A + X; A = A & 0xff; A == nr + 5 ? allow : kill,
        // then the return value from A after TXA.
        let prog = [
            stmt(LD_ABS_W, 0),
            stmt(ST, 3),
            stmt(LDX | IMM, 5),
            stmt(ALU | X, 0),
            stmt(ALU | 0x50 | K, 0xff),
            stmt(LDX | MEM, 3),
            stmt(MISC | 0x80, 0),
            jump(JEQ_K, 7, 0, 1),
            stmt(RET | A, 0),
            stmt(RET_K, KILL),
        ];
        assert_eq!(run(&prog, &call(7, [0; 6])), Ok(7));
        assert_eq!(run(&prog, &call(8, [0; 6])), Ok(KILL));
    }

    #[test]
    fn a_program_that_breaks_the_kernel_s_rules_is_refused_not_run() {
        assert!(run(&[], &call(0, [0; 6])).is_err());
        // No return at the end.
        assert_eq!(run(&[stmt(LD_ABS_W, 0)], &call(0, [0; 6])).unwrap_err().why, "the program runs past its end");
        // A load past struct seccomp_data, or unaligned.
        assert!(run(&[stmt(LD_ABS_W, 64), stmt(RET_K, ALLOW)], &call(0, [0; 6])).is_err());
        assert!(run(&[stmt(LD_ABS_W, 2), stmt(RET_K, ALLOW)], &call(0, [0; 6])).is_err());
        // A jump past the end.
        assert!(run(&[jump(JEQ_K, 0, 9, 9), stmt(RET_K, ALLOW)], &call(0, [0; 6])).is_err());
        assert!(run(&[stmt(JMP, u32::MAX), stmt(RET_K, ALLOW)], &call(0, [0; 6])).is_err());
        // Scratch memory out of range.
        assert!(run(&[stmt(ST, 16), stmt(RET_K, ALLOW)], &call(0, [0; 6])).is_err());
    }

    #[test]
    fn a_division_by_zero_ends_the_filter_with_0_as_the_kernel_s_does() {
        // A = nr; X = 0; A = A / X; allow.
        let prog = [stmt(LD_ABS_W, 0), stmt(LDX | IMM, 0), stmt(ALU | 0x30 | X, 0), stmt(RET_K, ALLOW)];
        assert_eq!(run(&prog, &call(1, [0; 6])), Ok(0));
        // Shifts count modulo 32.
        let prog = [stmt(LD | IMM, 1), stmt(ALU | 0x60 | K, 33), stmt(RET | A, 0)];
        assert_eq!(run(&prog, &call(1, [0; 6])), Ok(2));
    }

    #[test]
    fn an_instruction_reads_back_from_its_eight_bytes() {
        let insn = Insn::from_bytes([0x15, 0x00, 0x01, 0x02, 0x29, 0x00, 0x00, 0x00]);
        assert_eq!(insn, Insn { code: 0x15, jt: 1, jf: 2, k: 41 });
    }
}
