//! May an instruction run out of line (in a slot elsewhere, followed by a jump back)?

use std::fmt;

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, OpKind, Register};

use super::decode::{decode_instruction, is_near_ret, Disassembler};
use super::DecodeError;

/// Why an instruction cannot be executed out of line. `Display` names the instruction and
/// says what the user can do instead.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
        write!(
            f,
            "the instruction at {:#x} (`{}`) cannot run out of line: {}; probe a neighbouring instruction instead",
            self.ip, self.insn_text, self.reason
        )
    }
}

impl std::error::Error for Refusal {}

impl Refusal {
    /// A refusal of `instr` for `reason`.
    pub(crate) fn new(instr: &Instruction, reason: impl Into<String>) -> Self {
        Self { ip: instr.ip(), insn_text: Disassembler::new().text(instr), reason: reason.into() }
    }

    fn undecodable(err: &DecodeError, ip: u64) -> Self {
        Self { ip, insn_text: "(bad)".into(), reason: format!("it cannot be decoded ({err})") }
    }
}

/// Checks that the instruction at the start of `bytes` (at address `ip`) can run out of line
/// through [`super::build_slot`]. RIP-relative operands, relative jmp/jcc/call, `loop`/`jrcxz`,
/// `ret` and indirect branches are fine (relocated or position-independent); `syscall`,
/// `sysenter`, `int n`, `int3`, far transfers, `iret`, privileged and undecodable instructions
/// are refused with a reason.
pub fn check_out_of_line(bytes: &[u8], ip: u64) -> Result<(), Refusal> {
    let instr = decode_instruction(bytes, ip).map_err(|err| Refusal::undecodable(&err, ip))?;
    check_instruction(&instr)?;
    // iced decodes as Intel CPUs execute; AMD CPUs honour an operand-size prefix on near
    // branches (`66 e8` is a 16-bit call there), which changes the length and what it does.
    let amd = Decoder::with_ip(64, bytes, ip, DecoderOptions::AMD).decode();
    if amd.code() != instr.code() || amd.len() != instr.len() {
        return Err(Refusal::new(
            &instr,
            "it decodes differently on AMD and Intel processors (an operand-size prefix on a \
             branch), so its relocated copy could behave differently from the original",
        ));
    }
    Ok(())
}

/// [`check_out_of_line`] for an instruction already decoded.
pub(crate) fn check_instruction(instr: &Instruction) -> Result<(), Refusal> {
    match refusal_reason(instr) {
        Some(reason) => Err(Refusal::new(instr, reason)),
        None => Ok(()),
    }
}

/// The whole policy: `None` when the instruction behaves the same at any address once
/// [`super::relocate()`] has rewritten it.
fn refusal_reason(instr: &Instruction) -> Option<&'static str> {
    let code = instr.code();
    Some(match code {
        Code::Syscall => {
            "a system call returns to the address after it, which would be inside the \
             out-of-line slot, and the kernel restarts an interrupted one by stepping back \
             into the slot"
        }
        Code::Sysenter => "sysenter does not return to the instruction after it",
        Code::Int3 => "it is a breakpoint itself: the trap must be reported at the program's own address",
        Code::Int1 | Code::Int_imm8 | Code::Into => {
            "a software interrupt enters the kernel, which reports the slot address instead \
             of the program's"
        }
        _ if instr.is_privileged() => {
            "it is a privileged instruction: it faults in user mode, and the fault must be \
             reported at its own address"
        }
        Code::Call_rm64 if instr.op0_kind() == OpKind::Register && instr.op0_register() == Register::RSP => {
            "`call *%rsp` jumps to the stack pointer, which the relocated call must move \
             before it jumps"
        }
        _ => match instr.flow_control() {
            FlowControl::UnconditionalBranch if !code.is_jmp_short_or_near() => FAR,
            FlowControl::IndirectBranch if !code.is_jmp_near_indirect() => FAR,
            FlowControl::Call if !code.is_call_near() => FAR,
            FlowControl::IndirectCall if !code.is_call_near_indirect() => FAR,
            FlowControl::Return if !is_near_ret(code) => {
                "a far return or iret reloads the code segment from the stack and cannot be \
                 relocated"
            }
            FlowControl::Exception => {
                "it raises an invalid-opcode exception, which must be reported at its own address"
            }
            FlowControl::Interrupt => {
                "an interrupt instruction enters the kernel, which reports the slot address \
                 instead of the program's"
            }
            _ => return None,
        },
    })
}

const FAR: &str = "a far transfer changes the code segment and cannot be relocated";

#[cfg(test)]
mod tests {
    use super::*;

    const IP: u64 = 0x40_1000;

    #[test]
    fn branches_that_decode_differently_on_amd_are_refused() {
        // 66 e8 00 00 00 00: `call` with an operand-size prefix — 6 bytes on Intel, a
        // 16-bit call of 4 bytes on AMD.
        let refusal = check_out_of_line(&[0x66, 0xe8, 0, 0, 0, 0], IP).unwrap_err();
        assert!(refusal.reason.contains("AMD"), "{refusal}");
        assert!(check_out_of_line(&[0xe8, 0, 0, 0, 0], IP).is_ok());
    }

    #[rustfmt::skip]
    const ALLOWED: &[&[u8]] = &[
        &[0x55],                                // push %rbp
        &[0x48, 0x83, 0xec, 0x10],              // sub $0x10,%rsp
        &[0x48, 0x8b, 0x05, 0x20, 0, 0, 0],     // mov 0x20(%rip),%rax
        &[0x48, 0x8d, 0x3d, 0x10, 0, 0, 0],     // lea 0x10(%rip),%rdi
        &[0xeb, 0x05],                          // jmp +5
        &[0x74, 0x10],                          // je +0x10
        &[0xe8, 0x00, 0x01, 0, 0],              // call +0x100
        &[0xe2, 0xfe],                          // loop .
        &[0xe3, 0x05],                          // jrcxz +5
        &[0xc3],                                // ret
        &[0xc2, 0x08, 0x00],                    // ret $8
        &[0xff, 0xe0],                          // jmp *%rax
        &[0xff, 0xd0],                          // call *%rax
        &[0xff, 0x54, 0x24, 0x08],              // call *0x8(%rsp)
        &[0xff, 0x15, 0x10, 0, 0, 0],           // call *0x10(%rip)
        &[0xff, 0x25, 0x10, 0, 0, 0],           // jmp *0x10(%rip)
        &[0xf3, 0x0f, 0x1e, 0xfa],              // endbr64
        &[0xf3, 0x48, 0xa5],                    // rep movsq
        &[0xc7, 0xf8, 0x10, 0, 0, 0],           // xbegin +0x10
    ];

    /// (bytes, disassembly, a word the reason must contain)
    #[rustfmt::skip]
    const REFUSED: &[(&[u8], &str, &str)] = &[
        (&[0x0f, 0x05],         "syscall",          "system call"),
        (&[0x0f, 0x34],         "sysenter",         "sysenter"),
        (&[0xcc],               "int3",             "breakpoint"),
        (&[0xf1],               "int1",             "interrupt"),
        (&[0xcd, 0x80],         "int $0x80",        "interrupt"),
        (&[0x48, 0xcf],         "iretq",            "iret"),
        (&[0xcb],               "lretl",            "far"),
        (&[0xca, 0x08, 0x00],   "lretl $8",         "far"),
        (&[0xff, 0x1c, 0x24],   "lcalll *(%rsp)",   "far"),
        (&[0xff, 0x2c, 0x24],   "ljmpl *(%rsp)",    "far"),
        (&[0xf4],               "hlt",              "privileged"),
        (&[0xfa],               "cli",              "privileged"),
        (&[0x0f, 0x01, 0xf8],   "swapgs",           "privileged"),
        (&[0x0f, 0x0b],         "ud2",              "invalid-opcode"),
        (&[0xff, 0xd4],         "call *%rsp",       "stack pointer"),
    ];

    #[test]
    fn ordinary_relative_and_indirect_instructions_may_run_out_of_line() {
        for bytes in ALLOWED {
            assert_eq!(check_out_of_line(bytes, IP), Ok(()), "{bytes:02x?}");
        }
    }

    #[test]
    fn refusals_name_instruction_and_reason() {
        for &(bytes, text, word) in REFUSED {
            let refusal = check_out_of_line(bytes, IP).expect_err(text);
            assert_eq!((refusal.ip, refusal.insn_text.as_str()), (IP, text), "{bytes:02x?}");
            assert!(refusal.reason.contains(word), "{text}: {}", refusal.reason);
        }
    }

    #[test]
    fn undecodable_bytes_are_refused() {
        let refusal = check_out_of_line(&[0x06, 0x90], IP).unwrap_err(); // push %es
        assert!(refusal.reason.contains("not a valid x86-64 instruction"), "{}", refusal.reason);
        assert_eq!(refusal.insn_text, "(bad)");
    }

    #[test]
    fn display_says_what_to_do() {
        assert_eq!(
            check_out_of_line(&[0x0f, 0x05], 0x401234).unwrap_err().to_string(),
            "the instruction at 0x401234 (`syscall`) cannot run out of line: a system call returns \
             to the address after it, which would be inside the out-of-line slot, and the kernel \
             restarts an interrupted one by stepping back into the slot; probe a neighbouring \
             instruction instead"
        );
    }
}
