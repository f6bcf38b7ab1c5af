//! Reading fetch arguments out of the registers at a hit.
//!
//! Runs in the probe handler: plain reads, no allocation. Memory fetches (`+OFF(ARG)`)
//! will add a fault-safe read here.

use dynprobe::spec::{Fetch, Reg};
use dynprobe::Regs;

/// The raw 64-bit value of `fetch` (the type is applied when it is printed).
pub fn fetch(fetch: Fetch, regs: &Regs) -> u64 {
    match fetch {
        Fetch::Reg(reg) => register(reg, regs),
        // The spec is 1-based like the kernel's `$argN`; the parser keeps N in 1..=6, the
        // range `Regs::arg` reads without panicking.
        Fetch::Arg(n) => regs.arg(usize::from(n) - 1),
    }
}

fn register(reg: Reg, regs: &Regs) -> u64 {
    match reg {
        Reg::Rax => regs.rax,
        Reg::Rbx => regs.rbx,
        Reg::Rcx => regs.rcx,
        Reg::Rdx => regs.rdx,
        Reg::Rsi => regs.rsi,
        Reg::Rdi => regs.rdi,
        Reg::Rbp => regs.rbp,
        Reg::Rsp => regs.rsp,
        Reg::R8 => regs.r8,
        Reg::R9 => regs.r9,
        Reg::R10 => regs.r10,
        Reg::R11 => regs.r11,
        Reg::R12 => regs.r12,
        Reg::R13 => regs.r13,
        Reg::R14 => regs.r14,
        Reg::R15 => regs.r15,
        Reg::Rip => regs.ip,
        Reg::Rflags => regs.rflags,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_one_based_and_registers_map_to_their_field() {
        let regs = Regs {
            rdi: 1,
            rsi: 2,
            rdx: 3,
            rcx: 4,
            r8: 5,
            r9: 6,
            rax: 7,
            ip: 0x401000,
            rflags: 0x246,
            ..Regs::default()
        };
        for n in 1..=6u8 {
            assert_eq!(fetch(Fetch::Arg(n), &regs), u64::from(n));
        }
        assert_eq!(fetch(Fetch::Reg(Reg::Rax), &regs), 7);
        assert_eq!(fetch(Fetch::Reg(Reg::Rip), &regs), 0x401000);
        assert_eq!(fetch(Fetch::Reg(Reg::Rflags), &regs), 0x246);
        assert_eq!(fetch(Fetch::Reg(Reg::R9), &regs), 6);
    }
}
