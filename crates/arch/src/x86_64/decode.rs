//! Instruction boundaries and control-flow facts.

use std::fmt;

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, FlowControl, Formatter, GasFormatter, Instruction};

/// How control leaves an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Falls through to the next instruction (includes `rep`-prefixed string ops).
    Sequential,
    /// Direct unconditional jump (`jmp rel8/rel32`).
    Jump {
        /// Absolute target address.
        target: u64,
    },
    /// Direct conditional branch (`jcc`, `loop*`, `jrcxz`/`jecxz`, `xbegin`).
    CondJump {
        /// Absolute target address when taken.
        target: u64,
    },
    /// Direct call (`call rel32`).
    Call {
        /// Absolute target address.
        target: u64,
    },
    /// Indirect jump through a register or memory (`jmp rax`, `jmp [rip+x]`, `notrack jmp`).
    IndirectJump,
    /// Indirect call through a register or memory.
    IndirectCall,
    /// `ret`, `ret imm16`.
    Return,
    /// `syscall`, `sysenter`, `int n`, `int3`, `into`, `int1`.
    Interrupt,
    /// Far transfers, `iret`, `ud*`, `hlt` and anything else that cannot continue normally.
    Exception,
}

/// One decoded instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insn {
    /// Address of its first byte.
    pub ip: u64,
    /// Length in bytes (1..=15).
    pub len: usize,
    /// How control leaves it.
    pub flow: Flow,
    /// True when an operand is addressed relative to `rip` (`mov rax, [rip+0x20]`).
    pub rip_relative: bool,
    /// GNU-syntax disassembly, for messages and listings.
    pub text: String,
}

impl Insn {
    /// Address of the byte after this instruction.
    pub fn end(&self) -> u64 {
        self.ip + self.len as u64
    }
}

/// Why an address is not a usable instruction start.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes at `ip` do not decode to a valid x86-64 instruction.
    Invalid {
        /// Address of the undecodable bytes.
        ip: u64,
    },
    /// The bytes end in the middle of an instruction.
    Truncated {
        /// Address of the incomplete instruction.
        ip: u64,
    },
    /// `addr` lies inside the instruction `insn_ip .. insn_ip + insn_len`.
    NotOnBoundary {
        /// The requested address.
        addr: u64,
        /// Start of the instruction that contains it.
        insn_ip: u64,
        /// Length of that instruction.
        insn_len: usize,
        /// Its disassembly.
        insn_text: String,
    },
    /// `addr` is not inside the function `start .. start + len`.
    OutsideFunction {
        /// The requested address.
        addr: u64,
        /// Function start.
        start: u64,
        /// Function length in bytes.
        len: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Invalid { ip } => {
                write!(f, "the bytes at {ip:#x} are not a valid x86-64 instruction")
            }
            DecodeError::Truncated { ip } => {
                write!(f, "the instruction at {ip:#x} runs past the end of the bytes given (truncated)")
            }
            DecodeError::NotOnBoundary { addr, insn_ip, insn_len, insn_text } => write!(
                f,
                "{addr:#x} is inside the instruction at {insn_ip:#x} (`{insn_text}`, {insn_len} bytes); \
                 probe {insn_ip:#x} or {:#x} instead",
                insn_ip + *insn_len as u64
            ),
            DecodeError::OutsideFunction { addr, start, len } => {
                write!(f, "{addr:#x} is outside the function at {start:#x}..{:#x} ({len} bytes)", start + *len as u64)
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes exactly one instruction at the start of `bytes`, which sit at address `ip`.
pub fn decode_one(bytes: &[u8], ip: u64) -> Result<Insn, DecodeError> {
    Ok(Disassembler::new().insn(&decode_instruction(bytes, ip)?))
}

/// Decodes a whole function by linear sweep: `bytes` are the function's bytes, starting at
/// `start`. Errors if any instruction is invalid or runs past the end.
pub fn decode_function(bytes: &[u8], start: u64) -> Result<Vec<Insn>, DecodeError> {
    let mut disasm = Disassembler::new();
    Ok(decode_instructions(bytes, start)?.iter().map(|i| disasm.insn(i)).collect())
}

/// The instruction that starts exactly at `addr`, decoding from the function start so that
/// an address in the middle of an instruction is recognised and refused.
pub fn instruction_at(function_bytes: &[u8], start: u64, addr: u64) -> Result<Insn, DecodeError> {
    let len = function_bytes.len();
    if addr < start || addr - start >= len as u64 {
        return Err(DecodeError::OutsideFunction { addr, start, len });
    }
    // Only the instructions up to `addr` matter: bytes after it may be data or padding that
    // a linear sweep would stumble on.
    let mut decoder = new_decoder(function_bytes, start);
    loop {
        let instr = next_instruction(&mut decoder)?;
        if instr.next_ip() > addr {
            let insn = Disassembler::new().insn(&instr);
            return if insn.ip == addr {
                Ok(insn)
            } else {
                Err(DecodeError::NotOnBoundary { addr, insn_ip: insn.ip, insn_len: insn.len, insn_text: insn.text })
            };
        }
    }
}

pub(crate) fn new_decoder(bytes: &[u8], ip: u64) -> Decoder<'_> {
    Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE)
}

/// Decodes the next instruction, turning iced's "invalid instruction" value into an error.
pub(crate) fn next_instruction(decoder: &mut Decoder<'_>) -> Result<Instruction, DecodeError> {
    let ip = decoder.ip();
    let instr = decoder.decode();
    match decoder.last_error() {
        DecoderError::None => Ok(instr),
        DecoderError::NoMoreBytes => Err(DecodeError::Truncated { ip }),
        _ => Err(DecodeError::Invalid { ip }),
    }
}

/// The raw iced instruction at the start of `bytes`, for the modules that re-encode it.
pub(crate) fn decode_instruction(bytes: &[u8], ip: u64) -> Result<Instruction, DecodeError> {
    next_instruction(&mut new_decoder(bytes, ip))
}

/// All raw iced instructions in `bytes`, which must end on an instruction boundary.
pub(crate) fn decode_instructions(bytes: &[u8], start: u64) -> Result<Vec<Instruction>, DecodeError> {
    let mut decoder = new_decoder(bytes, start);
    let mut out = Vec::new();
    while decoder.can_decode() {
        out.push(next_instruction(&mut decoder)?);
    }
    Ok(out)
}

/// Turns iced instructions into [`Insn`]s, reusing one formatter because building it is
/// not free and whole functions are decoded at once.
pub(crate) struct Disassembler(GasFormatter);

impl Disassembler {
    pub(crate) fn new() -> Self {
        let mut formatter = GasFormatter::new();
        // objdump's style: `0x2ec6(%rip)` rather than the absolute address, so the text
        // matches the bytes a user sees in a listing.
        let options = formatter.options_mut();
        options.set_rip_relative_addresses(true);
        options.set_uppercase_hex(false);
        options.set_branch_leading_zeros(false);
        Self(formatter)
    }

    pub(crate) fn text(&mut self, instr: &Instruction) -> String {
        let mut text = String::new();
        self.0.format(instr, &mut text);
        text
    }

    fn insn(&mut self, instr: &Instruction) -> Insn {
        Insn {
            ip: instr.ip(),
            len: instr.len(),
            flow: flow_of(instr),
            rip_relative: instr.is_ip_rel_memory_operand(),
            text: self.text(instr),
        }
    }
}

/// Maps iced's control-flow classes onto [`Flow`], which separates what a relocator can
/// follow (near, direct) from what it cannot (far transfers, privileged returns).
pub(crate) fn flow_of(instr: &Instruction) -> Flow {
    let code = instr.code();
    match instr.flow_control() {
        FlowControl::Next if code == Code::Hlt => Flow::Exception,
        FlowControl::Next => Flow::Sequential,
        FlowControl::UnconditionalBranch if code.is_jmp_short_or_near() => {
            Flow::Jump { target: instr.near_branch_target() }
        }
        FlowControl::ConditionalBranch => Flow::CondJump { target: instr.near_branch_target() },
        FlowControl::XbeginXabortXend if is_xbegin(code) => Flow::CondJump { target: instr.near_branch_target() },
        // xabort and xend continue with the next instruction unless a transaction is active,
        // and a transaction's abort path belongs to its xbegin.
        FlowControl::XbeginXabortXend => Flow::Sequential,
        FlowControl::Call if code.is_call_near() => Flow::Call { target: instr.near_branch_target() },
        FlowControl::Call if matches!(code, Code::Syscall | Code::Sysenter) => Flow::Interrupt,
        FlowControl::IndirectBranch if code.is_jmp_near_indirect() => Flow::IndirectJump,
        FlowControl::IndirectCall if code.is_call_near_indirect() => Flow::IndirectCall,
        FlowControl::Return if is_near_ret(code) => Flow::Return,
        FlowControl::Interrupt => Flow::Interrupt,
        _ => Flow::Exception,
    }
}

pub(crate) fn is_xbegin(code: Code) -> bool {
    matches!(code, Code::Xbegin_rel16 | Code::Xbegin_rel32)
}

pub(crate) fn is_near_ret(code: Code) -> bool {
    matches!(code, Code::Retnw | Code::Retnw_imm16 | Code::Retnd | Code::Retnd_imm16 | Code::Retnq | Code::Retnq_imm16)
}

/// How far before a `syscall` [`syscall_numbers`] looks for the `mov` of its number.
pub const SYSCALL_NUMBER_REACH: usize = 32;

/// Most instructions between the `mov` of a system call's number and the `syscall`.
const SYSCALL_NUMBER_GAP: usize = 6;

/// The system call numbers `code` — the bytes right before a `syscall` instruction, at
/// most [`SYSCALL_NUMBER_REACH`] of them — can leave in `eax`: each start in `code` that
/// decodes, instruction by instruction, to exactly its end as `mov $nr,%eax` (or `%rax`, or
/// `xor %eax,%eax` for 0) followed by instructions that leave `rax` alone (moves, address
/// arithmetic and logic into other registers or memory). The C library's wrappers load
/// their arguments around the number: `mov $0x119,%eax; mov 0x4(%rsp),%edi; syscall` in
/// glibc's `epoll_pwait`. One number when the code is such a wrapper; none, or several that
/// disagree, when the bytes are something else — callers decide what that means. Decoding
/// backwards is ambiguous: a start right after a prefix byte is skipped, since the prefix
/// makes it another instruction (`41 b8 imm` is `mov $imm,%r8d`, not `mov $imm,%eax`).
///
/// Allocates nothing (it runs in a signal handler).
///
/// ```
/// # use dynprobe_arch::x86_64::decode::syscall_numbers;
/// // mov $0x119,%eax ; mov 0x4(%rsp),%edi ; (syscall)
/// let code = [0xb8, 0x19, 0x01, 0, 0, 0x8b, 0x7c, 0x24, 0x04];
/// assert_eq!(syscall_numbers(&code).collect::<Vec<_>>(), [0x119]);
/// ```
pub fn syscall_numbers(code: &[u8]) -> impl Iterator<Item = u32> + '_ {
    let code = &code[code.len().saturating_sub(SYSCALL_NUMBER_REACH)..];
    let after_prefix = |start: usize| start > 0 && matches!(code[start - 1], 0x40..=0x4f | 0x66 | 0x67 | 0xf2 | 0xf3);
    (0..code.len())
        .filter(move |&start| !after_prefix(start))
        .filter_map(move |start| syscall_number_from(&code[start..]))
}

/// The number `code` leaves in `eax` when its first instruction sets it and every other
/// one, to its very end, leaves `rax` alone.
fn syscall_number_from(code: &[u8]) -> Option<u32> {
    use iced_x86::{Mnemonic, OpKind, Register};
    let mut decoder = Decoder::new(64, code, DecoderOptions::NONE);
    let first = decoder.decode();
    let number = match (first.mnemonic(), first.op0_kind(), first.op_count()) {
        _ if first.is_invalid() || first.op0_kind() != OpKind::Register => return None,
        (Mnemonic::Mov, _, 2) if matches!(first.op0_register(), Register::EAX | Register::RAX) => {
            match first.op1_kind() {
                OpKind::Immediate32 => first.immediate32(),
                OpKind::Immediate32to64 => u32::try_from(first.immediate32to64()).ok()?,
                _ => return None,
            }
        }
        (Mnemonic::Xor, _, 2)
            if first.op0_register() == Register::EAX
                && first.op1_kind() == OpKind::Register
                && first.op1_register() == Register::EAX =>
        {
            0
        }
        _ => return None,
    };
    for _ in 0..SYSCALL_NUMBER_GAP {
        if decoder.position() == code.len() {
            return Some(number);
        }
        let insn = decoder.decode();
        let leaves_rax_alone = matches!(
            insn.mnemonic(),
            Mnemonic::Mov
                | Mnemonic::Movzx
                | Mnemonic::Movsx
                | Mnemonic::Movsxd
                | Mnemonic::Lea
                | Mnemonic::Xor
                | Mnemonic::Or
                | Mnemonic::And
                | Mnemonic::Add
                | Mnemonic::Sub
                | Mnemonic::Nop
        ) && (insn.op0_kind() != OpKind::Register
            || insn.op0_register().full_register() != Register::RAX);
        if insn.is_invalid() || !leaves_rax_alone {
            return None;
        }
    }
    (decoder.position() == code.len()).then_some(number)
}

/// The `syscall` instructions in `code` (starting at `start`) that change a signal action or
/// a thread's signal mask: `rt_sigaction` (13) or `rt_sigprocmask` (14), their number set a
/// few instructions before ([`syscall_numbers`]). Code that does this outside the C library
/// bypasses dynprobe's signal guards.
///
/// ```
/// # use dynprobe_arch::x86_64::signal_syscalls;
/// // mov $14,%eax ; xor %edi,%edi ; syscall ; ret
/// let code = [0xb8, 0x0e, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05, 0xc3];
/// assert_eq!(signal_syscalls(&code, 0x1000), [0x1007]);
/// ```
pub fn signal_syscalls(code: &[u8], start: u64) -> Vec<u64> {
    let syscalls = code.windows(2).enumerate().filter(|(_, w)| *w == [0x0f, 0x05]).map(|(i, _)| i);
    syscalls
        .filter(|&at| syscall_numbers(&code[..at]).any(|nr| nr == 13 || nr == 14))
        .map(|at| start + at as u64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: u64 = 0x40_1000;

    #[test]
    fn signal_syscalls_are_the_rt_sigaction_and_rt_sigprocmask_ones_reached_in_sequence() {
        #[rustfmt::skip]
        let cases: &[(&[u8], &[u64])] = &[
            // mov $0xd,%rax ; syscall                           rt_sigaction
            (&[0x48, 0xc7, 0xc0, 0x0d, 0, 0, 0, 0x0f, 0x05], &[IP + 7]),
            // mov $0xe,%eax ; mov %rsi,%rdx ; syscall            rt_sigprocmask
            (&[0xb8, 0x0e, 0, 0, 0, 0x48, 0x89, 0xf2, 0x0f, 0x05], &[IP + 8]),
            // mov $0x27,%eax ; syscall                           getpid
            (&[0xb8, 0x27, 0, 0, 0, 0x0f, 0x05], &[]),
            // mov $0xe,%eax ; jmp +0 ; syscall                   not in sequence
            (&[0xb8, 0x0e, 0, 0, 0, 0xeb, 0x00, 0x0f, 0x05], &[]),
            // mov $0xe,%eax ; mov %edx,%eax ; syscall            eax overwritten
            (&[0xb8, 0x0e, 0, 0, 0, 0x89, 0xd0, 0x0f, 0x05], &[]),
        ];
        for (code, want) in cases {
            assert_eq!(signal_syscalls(code, IP), *want, "{code:02x?}");
        }
    }

    /// The numbers glibc 2.36's cancellable wrappers (multi-threaded path) leave in `eax`,
    /// from their bytes (Debian 12's libc.so.6, `objdump -d`), and code that sets none.
    #[test]
    fn syscall_numbers_are_read_through_the_argument_loads_around_them() {
        #[rustfmt::skip]
        let cases: &[(&[u8], &[u32])] = &[
            // epoll_pwait: mov $0x119,%eax ; mov 0x4(%rsp),%edi
            (&[0xb8, 0x19, 0x01, 0, 0, 0x8b, 0x7c, 0x24, 0x04], &[0x119]),
            // recvfrom: mov $0x2d,%eax ; mov 0x10(%rsp),%rdx ; mov 0x8(%rsp),%rsi
            (&[0xb8, 0x2d, 0, 0, 0, 0x48, 0x8b, 0x54, 0x24, 0x10, 0x48, 0x8b, 0x74, 0x24, 0x08], &[0x2d]),
            // read: mov %eax,%r8d ; mov 0x8(%rsp),%edi ; xor %eax,%eax
            (&[0x41, 0x89, 0xc0, 0x8b, 0x7c, 0x24, 0x08, 0x31, 0xc0], &[0]),
            // waitid: xor %r8d,%r8d ; mov $0xf7,%eax
            (&[0x45, 0x31, 0xc0, 0xb8, 0xf7, 0, 0, 0], &[0xf7]),
            // mov $0xca,%rax (REX.W)
            (&[0x48, 0xc7, 0xc0, 0xca, 0, 0, 0], &[0xca]),
            // glibc's syscall(): mov %rdi,%rax ; mov %rsi,%rdi — the number came in a register
            (&[0x48, 0x89, 0xf8, 0x48, 0x89, 0xf7], &[]),
            // mov $0x119,%eax ; mov %edx,%eax — overwritten
            (&[0xb8, 0x19, 0x01, 0, 0, 0x89, 0xd0], &[]),
            // mov $0x119,%eax ; call … — not in sequence
            (&[0xb8, 0x19, 0x01, 0, 0, 0xe8, 0, 0, 0, 0], &[]),
            // mov $0x7,%r8d — another register
            (&[0x41, 0xb8, 0x07, 0, 0, 0], &[]),
        ];
        for (code, want) in cases {
            // `48 c7 c0 imm` also decodes, one byte on, as `c7 c0 imm`: the same number twice.
            let mut got: Vec<u32> = syscall_numbers(code).collect();
            got.dedup();
            assert_eq!(got, *want, "{code:02x?}");
        }
    }

    /// (bytes, expected length, expected flow, expected GNU disassembly)
    #[rustfmt::skip]
    const ONE: &[(&[u8], usize, Flow, &str)] = &[
        (&[0x55],                               1, Flow::Sequential, "push %rbp"),
        (&[0x48, 0x8b, 0x05, 0x20, 0, 0, 0],    7, Flow::Sequential, "mov 0x20(%rip),%rax"),
        (&[0xf3, 0x48, 0xa5],                   3, Flow::Sequential, "rep movsq (%rsi),(%rdi)"),
        (&[0xf3, 0x0f, 0x1e, 0xfa],             4, Flow::Sequential, "endbr64"),
        (&[0xeb, 0x05],                         2, Flow::Jump { target: IP + 7 }, "jmp 0x401007"),
        (&[0xe9, 0x00, 0x01, 0, 0],             5, Flow::Jump { target: IP + 0x105 }, "jmp 0x401105"),
        (&[0x74, 0xfe],                         2, Flow::CondJump { target: IP }, "je 0x401000"),
        (&[0x0f, 0x8f, 0x10, 0, 0, 0],          6, Flow::CondJump { target: IP + 0x16 }, "jg 0x401016"),
        (&[0xe2, 0xfe],                         2, Flow::CondJump { target: IP }, "loop 0x401000"),
        (&[0xe3, 0x05],                         2, Flow::CondJump { target: IP + 7 }, "jrcxz 0x401007"),
        (&[0xc7, 0xf8, 0x10, 0, 0, 0],          6, Flow::CondJump { target: IP + 0x16 }, "xbegin 0x401016"),
        (&[0xe8, 0x00, 0x01, 0, 0],             5, Flow::Call { target: IP + 0x105 }, "call 0x401105"),
        (&[0xff, 0xe0],                         2, Flow::IndirectJump, "jmp *%rax"),
        (&[0x3e, 0xff, 0x24, 0xc5, 0, 0x20, 0x40, 0], 8, Flow::IndirectJump, "notrack jmpq *0x402000(,%rax,8)"),
        (&[0xff, 0xd0],                         2, Flow::IndirectCall, "call *%rax"),
        (&[0xff, 0x15, 0x10, 0, 0, 0],          6, Flow::IndirectCall, "callq *0x10(%rip)"),
        (&[0xc3],                               1, Flow::Return, "ret"),
        (&[0xc2, 0x08, 0x00],                   3, Flow::Return, "ret $8"),
        (&[0x0f, 0x05],                         2, Flow::Interrupt, "syscall"),
        (&[0x0f, 0x34],                         2, Flow::Interrupt, "sysenter"),
        (&[0xcc],                               1, Flow::Interrupt, "int3"),
        (&[0xf1],                               1, Flow::Interrupt, "int1"),
        (&[0xcd, 0x80],                         2, Flow::Interrupt, "int $0x80"),
        (&[0x48, 0xcf],                         2, Flow::Exception, "iretq"),
        (&[0xcb],                               1, Flow::Exception, "lretl"),
        (&[0xff, 0x1c, 0x24],                   3, Flow::Exception, "lcalll *(%rsp)"),
        (&[0xff, 0x2c, 0x24],                   3, Flow::Exception, "ljmpl *(%rsp)"),
        (&[0xf4],                               1, Flow::Exception, "hlt"),
        (&[0x0f, 0x0b],                         2, Flow::Exception, "ud2"),
    ];

    #[test]
    fn decode_one_length_flow_and_text() {
        let mismatches: Vec<String> = ONE
            .iter()
            .filter_map(|&(bytes, len, flow, text)| {
                let insn = decode_one(bytes, IP).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"));
                assert_eq!(insn.ip, IP);
                let got = (insn.len, insn.flow, insn.text.as_str());
                (got != (len, flow, text)).then(|| format!("{bytes:02x?}: got {got:?}"))
            })
            .collect();
        assert!(mismatches.is_empty(), "{mismatches:#?}");
    }

    #[test]
    fn rip_relative_is_reported() {
        assert!(decode_one(&[0x48, 0x8d, 0x3d, 0x10, 0, 0, 0], IP).unwrap().rip_relative); // lea 0x10(%rip),%rdi
        assert!(decode_one(&[0xff, 0x15, 0x10, 0, 0, 0], IP).unwrap().rip_relative); // call *0x10(%rip)
        assert!(!decode_one(&[0x48, 0x8b, 0x45, 0xf8], IP).unwrap().rip_relative);
        // mov -0x8(%rbp),%rax
    }

    #[test]
    fn invalid_and_truncated() {
        assert_eq!(decode_one(&[], IP), Err(DecodeError::Truncated { ip: IP }));
        // mov 0x20(%rip),%rax cut after its ModRM byte
        assert_eq!(decode_one(&[0x48, 0x8b, 0x05], IP), Err(DecodeError::Truncated { ip: IP }));
        // `into` does not exist in 64-bit mode
        assert_eq!(decode_one(&[0xce, 0x90], IP), Err(DecodeError::Invalid { ip: IP }));
        // `push %es` does not either
        assert_eq!(decode_one(&[0x06, 0x90], IP), Err(DecodeError::Invalid { ip: IP }));
    }

    /// A small function:
    /// ```text
    /// 401000: 55                      push %rbp
    /// 401001: 48 89 e5                mov %rsp,%rbp
    /// 401004: 8b 05 c6 2e 00 00       mov 0x2ec6(%rip),%eax
    /// 40100a: 85 c0                   test %eax,%eax
    /// 40100c: 74 02                   je 0x401010
    /// 40100e: ff c0                   inc %eax
    /// 401010: 5d                      pop %rbp
    /// 401011: c3                      ret
    /// ```
    const FUNCTION: &[u8] =
        &[0x55, 0x48, 0x89, 0xe5, 0x8b, 0x05, 0xc6, 0x2e, 0x00, 0x00, 0x85, 0xc0, 0x74, 0x02, 0xff, 0xc0, 0x5d, 0xc3];

    #[test]
    fn decode_function_sweeps_every_instruction() {
        let insns = decode_function(FUNCTION, IP).unwrap();
        let starts: Vec<u64> = insns.iter().map(|i| i.ip - IP).collect();
        assert_eq!(starts, [0x0, 0x1, 0x4, 0xa, 0xc, 0xe, 0x10, 0x11]);
        assert_eq!(insns[4].flow, Flow::CondJump { target: 0x40_1010 });
        assert_eq!(insns[7].flow, Flow::Return);
    }

    #[test]
    fn decode_function_reports_the_bad_instruction() {
        let mut bytes = FUNCTION.to_vec();
        bytes[0xe] = 0x06; // push %es: invalid in 64-bit mode
        assert_eq!(decode_function(&bytes, IP), Err(DecodeError::Invalid { ip: IP + 0xe }));
        assert_eq!(decode_function(&FUNCTION[..9], IP), Err(DecodeError::Truncated { ip: IP + 4 }));
    }

    #[test]
    fn instruction_at_boundaries() {
        for start in [0x0, 0x1, 0x4, 0xa, 0xc, 0xe, 0x10, 0x11] {
            assert_eq!(instruction_at(FUNCTION, IP, IP + start).unwrap().ip, IP + start);
        }
        let inside = instruction_at(FUNCTION, IP, 0x40_1006).unwrap_err();
        assert_eq!(
            inside,
            DecodeError::NotOnBoundary {
                addr: 0x40_1006,
                insn_ip: 0x40_1004,
                insn_len: 6,
                insn_text: "mov 0x2ec6(%rip),%eax".into()
            }
        );
        assert_eq!(
            inside.to_string(),
            "0x401006 is inside the instruction at 0x401004 (`mov 0x2ec6(%rip),%eax`, 6 bytes); \
             probe 0x401004 or 0x40100a instead"
        );
        for outside in [IP - 1, IP + FUNCTION.len() as u64] {
            let err = instruction_at(FUNCTION, IP, outside).unwrap_err();
            assert_eq!(err, DecodeError::OutsideFunction { addr: outside, start: IP, len: FUNCTION.len() });
        }
        assert_eq!(
            instruction_at(FUNCTION, IP, IP - 1).unwrap_err().to_string(),
            "0x400fff is outside the function at 0x401000..0x401012 (18 bytes)"
        );
    }

    #[test]
    fn instruction_at_ignores_bytes_after_the_address() {
        let mut bytes = FUNCTION.to_vec();
        bytes.push(0x06); // garbage after the function's end, e.g. padding
        assert_eq!(instruction_at(&bytes, IP, IP + 4).unwrap().len, 6);
    }

    #[test]
    fn error_messages_name_address_and_cause() {
        assert_eq!(
            DecodeError::Invalid { ip: 0x1234 }.to_string(),
            "the bytes at 0x1234 are not a valid x86-64 instruction"
        );
        assert!(DecodeError::Truncated { ip: 0x1234 }.to_string().contains("0x1234"));
    }
}
