//! Instruction boundaries and control-flow facts.

use std::fmt;

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
        todo!()
    }
}

impl std::error::Error for DecodeError {}

/// Decodes exactly one instruction at the start of `bytes`, which sit at address `ip`.
pub fn decode_one(bytes: &[u8], ip: u64) -> Result<Insn, DecodeError> {
    todo!()
}

/// Decodes a whole function by linear sweep: `bytes` are the function's bytes, starting at
/// `start`. Errors if any instruction is invalid or runs past the end.
pub fn decode_function(bytes: &[u8], start: u64) -> Result<Vec<Insn>, DecodeError> {
    todo!()
}

/// The instruction that starts exactly at `addr`, decoding from the function start so that
/// an address in the middle of an instruction is recognised and refused.
pub fn instruction_at(function_bytes: &[u8], start: u64, addr: u64) -> Result<Insn, DecodeError> {
    todo!()
}
