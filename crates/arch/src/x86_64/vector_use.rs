//! Proof, by decoding, that a handler leaves the vector, x87 and MXCSR state alone: the
//! check that lets a detour save only the general registers and the flags around it
//! ("light"), in the spirit of the kernel's `can_optimize()` (arch/x86/kernel/kprobes/opt.c),
//! which decodes a whole function before it trusts a jump into it.
//!
//! The walk starts at the code's entry points and follows every path control can take —
//! fall-through, direct jumps and branches both ways, direct calls (and what follows them,
//! where the callee returns) — decoding each instruction once. Anything it cannot follow
//! makes the code *heavy*, with the reason:
//!
//! - an instruction that reads or writes a vector, x87, MMX or opmask register, or MXCSR,
//!   or saves/restores that state (`xsave`, `fxrstor`, …), or any VEX/EVEX/XOP encoding
//!   (`vzeroupper` names no register but zeroes the upper halves);
//! - an indirect call or jump (a `dyn` method, a PLT's `jmp *GOT`, a jump table): its
//!   target is not known from the bytes;
//! - a callee the caller names as heavy (one that unwinds: the unwinder copies its
//!   contexts with the C library's vector `memcpy`);
//! - bytes that cannot be read or decoded, or more code than the walk's limit.
//!
//! Landing pads are not reached by the walk, and need not be: they run only when
//! something unwinds, which the callee check above rules out. A path ends at `ret`, at
//! `ud2`/`int3`/`int n` (a trap: the kernel saves and restores the whole FPU state around
//! a signal handler), and at a callee the caller names as ending the process (an abort:
//! what it clobbers is never seen). System calls keep the vector state (the kernel's
//! x86-64 system call ABI clobbers only `rcx`, `r11` and `rax`).
//!
//! The module is pure: the caller supplies the code bytes and names the callees.

use iced_x86::{
    CpuidFeature, Decoder, DecoderOptions, EncodingKind, FlowControl, Formatter, GasFormatter, Instruction,
    InstructionInfoFactory, Mnemonic, OpKind, Register,
};
use std::collections::{HashSet, VecDeque};
use std::fmt;

/// What the caller knows of a direct call's target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Callee {
    /// Ordinary code: walked like the caller's own.
    Follow,
    /// Never returns and ends the process (an abort): the path ends there.
    Ends,
    /// Runs code checked separately (the gate through which a dispatcher calls handlers
    /// whose own proofs it checks at run time): not walked, the path continues after it.
    Checked,
    /// Cannot be light, for the reason given (it may unwind, say).
    Heavy(String),
}

/// Why code may touch the vector state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heavy {
    /// Where: the instruction or call that cannot be proven light (0 when the walk as a
    /// whole failed, as with the limit).
    pub at: u64,
    /// What was found there.
    pub reason: String,
}

impl fmt::Display for Heavy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            0 => f.write_str(&self.reason),
            at => write!(f, "{} at {at:#x}", self.reason),
        }
    }
}

/// What a successful walk saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Light {
    /// Instructions decoded.
    pub instructions: usize,
    /// Functions entered by a direct call (the entry points included).
    pub functions: usize,
}

/// The longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

/// Walks every path from `entries` and proves that none touches vector, x87 or MXCSR state.
///
/// `code(ip)` gives the bytes at `ip` — at least one whole instruction, up to
/// [`MAX_INSN_LEN`] bytes, fewer only where the mapping ends — or `None` when `ip` is not
/// readable. `callee(target)` says what a direct call's target is. At most `limit`
/// instructions are decoded.
pub fn prove_light(
    entries: &[u64],
    mut code: impl FnMut(u64) -> Option<Vec<u8>>,
    mut callee: impl FnMut(u64) -> Callee,
    limit: usize,
) -> Result<Light, Heavy> {
    let mut seen = HashSet::new();
    let mut functions: HashSet<u64> = entries.iter().copied().collect();
    let mut todo: VecDeque<u64> = entries.iter().copied().collect();
    let mut info = InstructionInfoFactory::new();
    while let Some(mut ip) = todo.pop_front() {
        loop {
            if !seen.insert(ip) {
                break;
            }
            if seen.len() > limit {
                return Err(Heavy {
                    at: 0,
                    reason: format!("more than {limit} instructions are reachable: too much code to prove"),
                });
            }
            let bytes = code(ip).ok_or_else(|| Heavy { at: ip, reason: "code that cannot be read".into() })?;
            let mut decoder = Decoder::with_ip(64, &bytes, ip, DecoderOptions::NONE);
            let insn = decoder.decode();
            if insn.is_invalid() {
                return Err(Heavy { at: ip, reason: "bytes that do not decode".into() });
            }
            if let Some(what) = touches_vector_state(&insn, &mut info) {
                return Err(Heavy { at: ip, reason: format!("{what} `{}`", text(&insn)) });
            }
            match insn.flow_control() {
                FlowControl::Next => {}
                FlowControl::Return | FlowControl::Exception | FlowControl::Interrupt => break,
                FlowControl::UnconditionalBranch => {
                    ip = insn.near_branch_target();
                    continue;
                }
                FlowControl::ConditionalBranch => todo.push_back(insn.near_branch_target()),
                // `syscall` is a "call" to the kernel, with no target here.
                FlowControl::Call if insn.op0_kind() != OpKind::NearBranch64 => {}
                FlowControl::Call => match callee(insn.near_branch_target()) {
                    Callee::Follow => {
                        if functions.insert(insn.near_branch_target()) {
                            todo.push_back(insn.near_branch_target());
                        }
                    }
                    Callee::Checked => {}
                    Callee::Ends => break,
                    Callee::Heavy(why) => return Err(Heavy { at: ip, reason: why }),
                },
                FlowControl::IndirectBranch | FlowControl::IndirectCall => {
                    return Err(Heavy {
                        at: ip,
                        reason: format!("an indirect branch, whose target is not known, `{}`", text(&insn)),
                    })
                }
                FlowControl::XbeginXabortXend => {
                    return Err(Heavy { at: ip, reason: format!("a transaction `{}`", text(&insn)) })
                }
            }
            ip = insn.next_ip();
        }
    }
    Ok(Light { instructions: seen.len(), functions: functions.len() })
}

/// What of the vector, x87 or MXCSR state `insn` touches, if anything.
fn touches_vector_state(insn: &Instruction, info: &mut InstructionInfoFactory) -> Option<&'static str> {
    if insn.encoding() != EncodingKind::Legacy {
        // VEX, EVEX, XOP, 3DNow!, MVEX: vector instructions all (vzeroupper names no register).
        return Some("a vector instruction");
    }
    let vector = |r: Register| r.is_xmm() || r.is_ymm() || r.is_zmm() || r.is_k() || r.is_tmm();
    let x87 = |r: Register| r.is_st() || r.is_mm();
    for used in info.info(insn).used_registers() {
        if vector(used.register()) {
            return Some("a vector register");
        }
        if x87(used.register()) {
            return Some("an x87/MMX register");
        }
    }
    use Mnemonic::*;
    match insn.mnemonic() {
        Ldmxcsr | Stmxcsr => return Some("MXCSR"),
        Fxsave | Fxsave64 | Fxrstor | Fxrstor64 | Xsave | Xsave64 | Xsavec | Xsavec64 | Xsaveopt | Xsaveopt64
        | Xsaves | Xsaves64 | Xrstor | Xrstor64 | Xrstors | Xrstors64 | Emms | Femms => {
            return Some("a save or reset of the vector state")
        }
        _ => {}
    }
    // x87 control instructions name no stack register (fninit, fldcw, fnstenv, …).
    let x87_feature = |f: &CpuidFeature| {
        matches!(
            f,
            CpuidFeature::FPU
                | CpuidFeature::FPU287
                | CpuidFeature::FPU287XL_ONLY
                | CpuidFeature::FPU387
                | CpuidFeature::FPU387SL_ONLY
                | CpuidFeature::MMX
        )
    };
    insn.cpuid_features().iter().any(x87_feature).then_some("an x87 instruction")
}

fn text(insn: &Instruction) -> String {
    let mut out = String::new();
    GasFormatter::new().format(insn, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Code at fixed addresses: `(address, bytes)` pieces.
    fn memory(pieces: &[(u64, &[u8])]) -> impl FnMut(u64) -> Option<Vec<u8>> {
        let map: BTreeMap<u64, Vec<u8>> = pieces.iter().map(|(a, b)| (*a, b.to_vec())).collect();
        move |ip| {
            let (&start, bytes) = map.range(..=ip).next_back()?;
            let at = (ip - start) as usize;
            (at < bytes.len()).then(|| bytes[at..].iter().take(MAX_INSN_LEN).copied().collect())
        }
    }

    fn follow(_: u64) -> Callee {
        Callee::Follow
    }

    #[test]
    fn general_register_code_with_branches_and_calls_is_light() {
        let code = memory(&[
            // 0x1000: test %rdi,%rdi ; je 0x100a ; call 0x2000 ; lock incq (%rsi) ; ret
            (0x1000, &[0x48, 0x85, 0xff, 0x74, 0x05, 0xe8, 0xf6, 0x0f, 0x00, 0x00, 0xf0, 0x48, 0xff, 0x06, 0xc3]),
            // 0x2000: rdtsc ; mov %eax,%ecx ; syscall ; mfence ; pause ; ret
            (0x2000, &[0x0f, 0x31, 0x89, 0xc1, 0x0f, 0x05, 0x0f, 0xae, 0xf0, 0xf3, 0x90, 0xc3]),
        ]);
        let light = prove_light(&[0x1000], code, follow, 100).unwrap();
        assert_eq!(light, Light { instructions: 11, functions: 2 });
    }

    #[test]
    fn a_vector_instruction_behind_a_chain_of_direct_calls_is_found() {
        let code = memory(&[
            // 0x1000: call 0x2000 ; ret
            (0x1000, &[0xe8, 0xfb, 0x0f, 0x00, 0x00, 0xc3]),
            // 0x2000: jmp 0x3000 (a tail call)
            (0x2000, &[0xe9, 0xfb, 0x0f, 0x00, 0x00]),
            // 0x3000: xor %eax,%eax ; movups %xmm0,(%rdi) ; ret
            (0x3000, &[0x31, 0xc0, 0x0f, 0x11, 0x07, 0xc3]),
        ]);
        let heavy = prove_light(&[0x1000], code, follow, 100).unwrap_err();
        assert_eq!(heavy.at, 0x3002);
        assert_eq!(heavy.reason, "a vector register `movups %xmm0,(%rdi)`");
    }

    #[test]
    fn every_kind_of_vector_x87_and_mxcsr_use_is_heavy() {
        let cases: &[(&[u8], &str)] = &[
            (&[0xc5, 0xf8, 0x77], "a vector instruction"),                // vzeroupper
            (&[0x0f, 0xae, 0x17], "MXCSR"),                               // ldmxcsr (%rdi)
            (&[0x0f, 0xae, 0x1f], "MXCSR"),                               // stmxcsr (%rdi)
            (&[0xdb, 0xe3], "an x87 instruction"),                        // fninit
            (&[0xd9, 0x2f], "an x87 instruction"),                        // fldcw (%rdi)
            (&[0xd9, 0xc9], "an x87/MMX register"),                       // fxch %st(1)
            (&[0x0f, 0x6f, 0xc1], "an x87/MMX register"),                 // movq %mm1,%mm0
            (&[0x0f, 0xae, 0x27], "a save or reset of the vector state"), // xsave (%rdi)
            (&[0x0f, 0xae, 0x0f], "a save or reset of the vector state"), // fxrstor (%rdi)
            (&[0x66, 0x48, 0x0f, 0x6e, 0xc7], "a vector register"),       // movq %rdi,%xmm0
            (&[0x62, 0xf1, 0xfe, 0x48, 0x6f, 0x07], "a vector instruction"), // vmovdqu64 (%rdi),%zmm0
        ];
        for (bytes, what) in cases {
            let mut piece = bytes.to_vec();
            piece.push(0xc3);
            let heavy = prove_light(&[0x1000], memory(&[(0x1000, &piece)]), follow, 10).unwrap_err();
            assert!(heavy.reason.starts_with(what), "{bytes:02x?}: {}", heavy.reason);
            assert_eq!(heavy.at, 0x1000);
        }
    }

    #[test]
    fn indirect_branches_are_heavy_and_named() {
        for (bytes, shown) in [
            (&[0xff, 0xd0][..], "call *%rax"),
            (&[0xff, 0x25, 0, 0, 0, 0][..], "jmpq *0x1006"),
            (&[0x3e, 0xff, 0xe0][..], "*%rax"),
        ] {
            let heavy = prove_light(&[0x1000], memory(&[(0x1000, bytes)]), follow, 10).unwrap_err();
            assert!(heavy.reason.contains("indirect branch") && heavy.reason.contains(shown), "{}", heavy.reason);
        }
    }

    #[test]
    fn callees_are_followed_skipped_ended_or_refused_as_named() {
        // 0x1000: call 0x2000 ; call 0x3000 ; ret          0x2000: ret        0x3000: ud2
        let pieces: &[(u64, &[u8])] = &[
            (0x1000, &[0xe8, 0xfb, 0x0f, 0x00, 0x00, 0xe8, 0xf6, 0x1f, 0x00, 0x00, 0xc3]),
            (0x2000, &[0xc3]),
            (0x3000, &[0x0f, 0x0b]),
        ];
        let at_3000 = |what: Callee| move |t: u64| if t == 0x3000 { what.clone() } else { Callee::Follow };
        assert_eq!(prove_light(&[0x1000], memory(pieces), at_3000(Callee::Follow), 10).unwrap().functions, 3);
        assert_eq!(prove_light(&[0x1000], memory(pieces), at_3000(Callee::Checked), 10).unwrap().functions, 2);
        // An ending callee: what follows its call is not walked (here: the ret).
        assert_eq!(prove_light(&[0x1000], memory(pieces), at_3000(Callee::Ends), 10).unwrap().instructions, 3);
        let heavy = prove_light(&[0x1000], memory(pieces), at_3000(Callee::Heavy("it unwinds".into())), 10);
        assert_eq!(heavy.unwrap_err(), Heavy { at: 0x1005, reason: "it unwinds".into() });
    }

    #[test]
    fn unreadable_undecodable_and_too_much_code_are_heavy() {
        let heavy = prove_light(&[0x1000], memory(&[(0x1000, &[0x90, 0x90])]), follow, 10).unwrap_err();
        assert_eq!(heavy, Heavy { at: 0x1002, reason: "code that cannot be read".into() });
        let heavy = prove_light(&[0x1000], memory(&[(0x1000, &[0x06])]), follow, 10).unwrap_err();
        assert_eq!(heavy.reason, "bytes that do not decode");
        let heavy = prove_light(&[0x1000], memory(&[(0x1000, &[0x90; 20])]), follow, 10).unwrap_err();
        assert!(heavy.reason.contains("more than 10 instructions"), "{heavy}");
        // A loop is walked once.
        assert!(prove_light(&[0x1000], memory(&[(0x1000, &[0xeb, 0xfe])]), follow, 10).is_ok());
    }
}
