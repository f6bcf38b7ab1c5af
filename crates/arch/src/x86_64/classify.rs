//! May an instruction run out of line (in a slot elsewhere, followed by a jump back)?

use std::fmt;

/// Why an instruction cannot be executed out of line. `Display` names the instruction and
/// says what the user can do instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Address of the refused instruction.
    pub ip: u64,
    /// Its disassembly.
    pub insn_text: String,
    /// The reason, as a sentence fragment ("a system call returns into the slot, ...").
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}

impl std::error::Error for Refusal {}

/// Checks that the instruction at the start of `bytes` (at address `ip`) can run out of line
/// through [`super::build_slot`]. RIP-relative operands, relative jmp/jcc/call, `loop`/`jrcxz`,
/// `ret` and indirect branches are fine (relocated or position-independent); `syscall`,
/// `sysenter`, `int n`, `int3`, far transfers, `iret`, privileged and undecodable instructions
/// are refused with a reason.
pub fn check_out_of_line(bytes: &[u8], ip: u64) -> Result<(), Refusal> {
    todo!()
}
