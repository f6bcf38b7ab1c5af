//! Where the program's stack pointer is while a thread runs code dynprobe generated (a
//! detour buffer's save-call-restore prefix, see [`super::detour`]), found from the code
//! itself: an unwinder that meets a thread stopped there (`dynprobe record -p` unwinds every
//! thread at the attach) has no call-frame information for it, so it asks this module.
//!
//! The analysis runs the code forward from its entry, where `rsp` is the program's, and
//! follows every value of `rsp` symbolically, as the call-frame information a compiler
//! emits follows it (the CFA rules of the System V x86-64 ABI, §3.7 "Stack Unwind
//! Algorithm"): `rsp` is the entry `rsp` plus a known offset, or an address aligned by
//! `and $-n,%rsp` plus a known offset, in which case the entry `rsp` is found through a
//! word the code stored relative to it (the detour keeps its register frame's address
//! there). Branches are forward only in generated code; the state at a branch target is
//! the one every way into it agrees on, or none. Nothing is allocated: the unwinder calls
//! this while the other threads are stopped.

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};

/// Where the entry `rsp` (the program's stack pointer when it entered the code) is, seen
/// from a thread at some instruction of the code with stack pointer `rsp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryRsp {
    /// `rsp + offset`.
    Rsp(i64),
    /// General register number `reg` (rax = 0 … r15 = 15, as in `Regs` order of the ABI's
    /// encoding), plus `offset`.
    Register {
        /// The register's number.
        reg: u8,
        /// What to add to it.
        offset: i64,
    },
    /// The word at `rsp + at`, plus `offset`.
    Word {
        /// Where the word is, from `rsp`.
        at: i64,
        /// What to add to the word.
        offset: i64,
    },
}

/// What [`entry_rsp`] found at an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookPosition {
    /// Where the entry `rsp` is.
    pub rsp: EntryRsp,
    /// A `call` was made on every way to the instruction (the dispatcher has been called).
    pub called: bool,
}

/// A value followed by the analysis: the entry `rsp` plus an offset, or an aligned address
/// (numbered by the `and` that made it) plus an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    Unknown,
    Entry(i64),
    Aligned(u8, i64),
}

impl Val {
    fn add(self, n: i64) -> Val {
        match self {
            Val::Entry(k) => Val::Entry(k + n),
            Val::Aligned(a, k) => Val::Aligned(a, k + n),
            Val::Unknown => Val::Unknown,
        }
    }
}

/// Words stored at aligned addresses: (the `and` they are relative to, offset, the value).
const FACTS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    rsp: Val,
    /// The general registers by number (rax = 0 … r15 = 15).
    regs: [Val; 16],
    facts: [Option<(u8, i64, Val)>; FACTS],
    called: bool,
}

impl State {
    fn entry() -> State {
        State { rsp: Val::Entry(0), regs: [Val::Unknown; 16], facts: [None; FACTS], called: false }
    }

    /// The state both `self` and `other` guarantee.
    fn merge(self, other: State) -> State {
        let mut regs = self.regs;
        for (r, o) in regs.iter_mut().zip(other.regs) {
            if *r != o {
                *r = Val::Unknown;
            }
        }
        let mut facts = [None; FACTS];
        for (f, mine) in facts.iter_mut().zip(self.facts) {
            if other.facts.contains(&mine) {
                *f = mine;
            }
        }
        let rsp = if self.rsp == other.rsp { self.rsp } else { Val::Unknown };
        State { rsp, regs, facts, called: self.called && other.called }
    }

    fn fact(&self, at: Val) -> Val {
        let Val::Aligned(a, k) = at else { return Val::Unknown };
        self.facts.iter().flatten().find(|&&(fa, fk, _)| fa == a && fk == k).map_or(Val::Unknown, |f| f.2)
    }

    /// A store of `value` at `at` (8 bytes): it replaces what it overlaps.
    fn store(&mut self, at: Val, value: Val) {
        let Val::Aligned(a, k) = at else { return };
        for f in self.facts.iter_mut() {
            if matches!(*f, Some((fa, fk, _)) if fa == a && (fk - k).abs() < 8) {
                *f = None;
            }
        }
        if value != Val::Unknown {
            if let Some(free) = self.facts.iter_mut().find(|f| f.is_none()) {
                *free = Some((a, k, value));
            }
        }
    }

    /// A store of `size` bytes at `at` that is not a tracked value.
    fn clobber(&mut self, at: Val, size: i64) {
        let Val::Aligned(a, k) = at else { return };
        for f in self.facts.iter_mut() {
            if matches!(*f, Some((fa, fk, _)) if fa == a && fk < k + size && k < fk + 8) {
                *f = None;
            }
        }
    }
}

/// The general register's number (rax = 0 … r15 = 15) of a 64-bit register.
fn gpr(reg: Register) -> Option<usize> {
    let full = reg.full_register();
    full.is_gpr64().then(|| (full as usize) - (Register::RAX as usize))
}

const RSP: usize = 4;
/// rbx, rbp, r12–r15: the code must leave them alone, or the registers the unwinder holds
/// would not be the program's.
const CALLEE_SAVED: [usize; 6] = [3, 5, 12, 13, 14, 15];
/// The registers a call clobbers (System V x86-64 ABI, §3.2.1).
const CALL_CLOBBERED: [usize; 9] = [0, 1, 2, 6, 7, 8, 9, 10, 11];

/// Branch targets seen ahead, with the state on the way there.
const PENDING: usize = 32;

/// Where the entry `rsp` is for a thread at `pc` in `code` (placed at `code_ip`, entered at
/// its first byte with the program's `rsp`), and whether it has made a call on its way
/// there; `None` when `pc` is not an instruction of `code` reached from its entry, or the
/// stack pointer there is not known, or the code changed a callee-saved register on the
/// way (then the registers a thread there holds are not the program's).
///
/// `pc` may be an instruction a thread is stopped at, or the return address of a `call` of
/// `code` (the state is the one after the call has returned).
pub fn entry_rsp(code: &[u8], code_ip: u64, pc: u64) -> Option<HookPosition> {
    let mut decoder = Decoder::with_ip(64, code, code_ip, DecoderOptions::NONE);
    let mut pending: [Option<(u64, State)>; PENDING] = [None; PENDING];
    let mut current = Some(State::entry());
    let mut aligned = 0u8;
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            return None;
        }
        let ip = insn.ip();
        for p in pending.iter_mut() {
            if let Some((target, state)) = *p {
                if target == ip {
                    current = Some(current.map_or(state, |c| c.merge(state)));
                    *p = None;
                }
            }
        }
        if ip == pc {
            let state = current?;
            return position(&state);
        }
        if ip > pc {
            return None;
        }
        let Some(mut state) = current else { continue };
        if CALLEE_SAVED.iter().any(|&r| writes(&insn, r)) {
            return None;
        }
        step(&mut state, &insn, &mut aligned);
        current = Some(state);
        match insn.flow_control() {
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                let target = insn.near_branch_target();
                if target > ip && target < code_ip + code.len() as u64 {
                    let free = pending.iter_mut().find(|p| p.is_none())?;
                    *free = Some((target, state));
                }
                if insn.flow_control() == FlowControl::UnconditionalBranch {
                    current = None;
                }
            }
            FlowControl::Return | FlowControl::Interrupt | FlowControl::IndirectBranch => current = None,
            FlowControl::Exception if insn.mnemonic() == Mnemonic::Int3 => current = None,
            _ => {}
        }
    }
    None
}

fn position(state: &State) -> Option<HookPosition> {
    let rsp = match state.rsp {
        Val::Entry(k) => EntryRsp::Rsp(-k),
        Val::Aligned(a, k) => {
            let stored = state.facts.iter().flatten().find(|f| f.0 == a && matches!(f.2, Val::Entry(_)));
            let held = state.regs.iter().position(|r| matches!(r, Val::Entry(_)));
            match (stored, held) {
                (Some(&(_, at, Val::Entry(v))), _) => EntryRsp::Word { at: at - k, offset: -v },
                (_, Some(r)) => {
                    let Val::Entry(v) = state.regs[r] else { return None };
                    EntryRsp::Register { reg: r as u8, offset: -v }
                }
                _ => return None,
            }
        }
        Val::Unknown => return None,
    };
    Some(HookPosition { rsp, called: state.called })
}

/// Whether `insn` writes general register `r` (as its destination operand).
fn writes(insn: &Instruction, r: usize) -> bool {
    if matches!(insn.mnemonic(), Mnemonic::Cmp | Mnemonic::Test | Mnemonic::Push) {
        return false;
    }
    let dest = insn.op_count() > 0 && insn.op0_kind() == OpKind::Register && gpr(insn.op0_register()) == Some(r);
    let pops = insn.mnemonic() == Mnemonic::Pop && gpr(insn.op0_register()) == Some(r);
    dest || pops
}

/// The memory operand's address, when it is `rsp`-relative without an index.
fn rsp_operand(state: &State, insn: &Instruction) -> Val {
    match (insn.memory_base(), insn.memory_index()) {
        (Register::RSP, Register::None) => state.rsp.add(insn.memory_displacement64() as i64),
        _ => Val::Unknown,
    }
}

fn step(state: &mut State, insn: &Instruction, aligned: &mut u8) {
    let op0_reg = (insn.op_count() > 0 && insn.op0_kind() == OpKind::Register).then(|| insn.op0_register());
    let op1_reg = (insn.op_count() > 1 && insn.op1_kind() == OpKind::Register).then(|| insn.op1_register());
    let dest = op0_reg.and_then(gpr);
    match insn.mnemonic() {
        Mnemonic::Push | Mnemonic::Pushfq => {
            state.rsp = state.rsp.add(-8);
            let value = op0_reg.and_then(gpr).map_or(Val::Unknown, |r| state.regs[r]);
            state.store(state.rsp, value);
            return;
        }
        Mnemonic::Pop | Mnemonic::Popfq => {
            if let Some(r) = dest {
                state.regs[r] = state.fact(state.rsp);
            }
            state.rsp = state.rsp.add(8);
            return;
        }
        Mnemonic::Call => {
            state.called = true;
            CALL_CLOBBERED.iter().for_each(|&r| state.regs[r] = Val::Unknown);
            return;
        }
        Mnemonic::Lea if dest.is_some() => {
            let value = match insn.memory_index() {
                Register::None => {
                    let base = insn.memory_base();
                    let d = insn.memory_displacement64() as i64;
                    gpr(base).map_or(Val::Unknown, |b| state.regs_or_rsp(b).add(d))
                }
                _ => Val::Unknown,
            };
            state.set(dest.unwrap_or(0), value);
            return;
        }
        Mnemonic::Mov if insn.op0_kind() == OpKind::Memory => {
            let at = rsp_operand(state, insn);
            let value = op1_reg.and_then(gpr).map_or(Val::Unknown, |r| state.regs_or_rsp(r));
            match insn.memory_size().size() {
                8 => state.store(at, value),
                n => state.clobber(at, n as i64),
            }
            return;
        }
        Mnemonic::Mov if dest.is_some() => {
            let value = match (insn.op1_kind(), op1_reg.and_then(gpr)) {
                (OpKind::Register, Some(r)) if op0_reg.is_some_and(Register::is_gpr64) => state.regs_or_rsp(r),
                (OpKind::Memory, _) if op0_reg.is_some_and(Register::is_gpr64) => state.fact(rsp_operand(state, insn)),
                _ => Val::Unknown,
            };
            state.set(dest.unwrap_or(0), value);
            return;
        }
        Mnemonic::And if dest == Some(RSP) && insn.op1_kind() != OpKind::Register => {
            *aligned = aligned.wrapping_add(1);
            state.rsp = Val::Aligned(*aligned, 0);
            return;
        }
        Mnemonic::Sub | Mnemonic::Add if dest.is_some() && insn.op1_kind() != OpKind::Register => {
            let n = insn.immediate(1) as i64;
            let n = if insn.mnemonic() == Mnemonic::Sub { -n } else { n };
            let r = dest.unwrap_or(0);
            let value = state.regs_or_rsp(r).add(n);
            state.set(r, value);
            return;
        }
        _ => {}
    }
    // Anything else: a register it writes is no longer known, nor memory it writes.
    if let Some(r) = dest {
        if !matches!(insn.mnemonic(), Mnemonic::Cmp | Mnemonic::Test) {
            state.set(r, Val::Unknown);
        }
    }
    if insn.op_count() > 0 && insn.op0_kind() == OpKind::Memory {
        let at = rsp_operand(state, insn);
        state.clobber(at, insn.memory_size().size().max(1) as i64);
    }
}

impl State {
    fn regs_or_rsp(&self, r: usize) -> Val {
        if r == RSP {
            self.rsp
        } else {
            self.regs[r]
        }
    }

    fn set(&mut self, r: usize, value: Val) {
        if r == RSP {
            self.rsp = value;
        } else {
            self.regs[r] = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::decode::decode_instructions;
    use crate::x86_64::detour::{build_detour, DetourSpec, StateSave, VectorWidth, ENTRY_OFFSET};

    fn spec(covered: &[u8], flags: bool, light: bool, width: VectorWidth) -> DetourSpec<'_> {
        DetourSpec {
            detour_ip: 0x7000_0000,
            probe_ip: 0x40_1000,
            covered,
            save: StateSave { flags, direction_clear: false, arithmetic_dead: false, width },
            dispatch: 0x7000_8000,
            light_dispatch: 0x7000_9000,
            context: 0x1234_5678,
            entry_filter: &[],
            light,
        }
    }

    /// Runs the detour's prefix on a model machine (the few instructions it uses), from
    /// its entry with `rsp` = `entry`, and checks at every instruction that
    /// [`entry_rsp`] finds `entry` again from the machine's `rsp` and memory.
    fn check_every_instruction(spec: &DetourSpec<'_>, light_path: bool) {
        let detour = build_detour(spec).unwrap();
        let start = ENTRY_OFFSET;
        let prefix = &detour.code[start..detour.copy_offset as usize];
        let ip = spec.detour_ip + start as u64;
        let instrs = decode_instructions(prefix, ip).unwrap();
        let entry: u64 = 0x7fff_0000_1008;
        let mut rsp = entry;
        let mut memory = std::collections::HashMap::<u64, u64>::new();
        let mut regs = [0u64; 16];
        let (mut checked, mut called) = (0, false);
        let mut i = 0;
        while i < instrs.len() {
            let insn = &instrs[i];
            let found = entry_rsp(prefix, ip, insn.ip()).unwrap_or_else(|| panic!("no rule at {insn}"));
            let back = match found.rsp {
                EntryRsp::Rsp(k) => rsp.wrapping_add_signed(k),
                EntryRsp::Register { reg, offset } => regs[reg as usize].wrapping_add_signed(offset),
                EntryRsp::Word { at, offset } => memory[&rsp.wrapping_add_signed(at)].wrapping_add_signed(offset),
            };
            assert_eq!(back, entry, "at {insn}");
            assert_eq!(found.called, called, "at {insn}");
            checked += 1;
            // The model: what these instructions do to rsp, the registers and memory.
            let reg = |r: Register| gpr(r).unwrap();
            let mem = |rsp: u64| rsp.wrapping_add(insn.memory_displacement64());
            let mut next = i + 1;
            match insn.mnemonic() {
                Mnemonic::Lea if insn.op0_register() == Register::RSP => rsp = mem(rsp),
                Mnemonic::Lea => regs[reg(insn.op0_register())] = mem(rsp),
                Mnemonic::Pushfq => rsp -= 8,
                Mnemonic::And if insn.op0_register() == Register::RSP => rsp &= insn.immediate(1),
                Mnemonic::Sub if insn.op0_register() == Register::RSP => rsp -= insn.immediate(1),
                Mnemonic::Mov if insn.op0_kind() == OpKind::Memory && insn.memory_size().size() == 8 => {
                    let value = match insn.op1_kind() {
                        OpKind::Register if insn.op1_register().is_gpr64() => regs[reg(insn.op1_register())],
                        _ => 0,
                    };
                    memory.insert(mem(rsp), value);
                }
                Mnemonic::Mov if insn.op0_register() == Register::RSP => match insn.op1_kind() {
                    OpKind::Memory => rsp = memory[&mem(rsp)],
                    _ => rsp = regs[reg(insn.op1_register())],
                },
                Mnemonic::Mov if insn.op0_register().is_gpr64() && insn.op1_kind() == OpKind::Register => {
                    let value = if insn.op1_register() == Register::RSP { rsp } else { regs[reg(insn.op1_register())] };
                    regs[reg(insn.op0_register())] = value;
                }
                Mnemonic::Call => called = true,
                // The light flag: taken (light path) or not, as asked; the REDO check and
                // the trap are not taken.
                Mnemonic::Jne if insn.near_branch_target() < ip => {}
                Mnemonic::Jne | Mnemonic::Je | Mnemonic::Jmp => {
                    // Before the call: the light flag's `jne vectors`, taken off the light
                    // path; after it: the light path's `jne tail`.
                    let taken = if called { light_path } else { !light_path };
                    if (taken && insn.mnemonic() == Mnemonic::Jne) || insn.mnemonic() == Mnemonic::Jmp {
                        next = instrs.iter().position(|j| j.ip() == insn.near_branch_target()).unwrap();
                    }
                }
                _ => {}
            }
            i = next;
        }
        assert!(checked > 20, "{checked} instructions checked");
        assert!(called, "the dispatcher was called");
    }

    #[test]
    fn the_program_s_rsp_is_found_at_every_instruction_of_a_detour_s_prefix() {
        let covered = [0x55, 0x48, 0x89, 0xe5, 0x90]; // push %rbp; mov %rsp,%rbp; nop
        for width in [VectorWidth::None, VectorWidth::Sse, VectorWidth::Avx512 { wide_masks: true }] {
            for light_path in [true, false] {
                check_every_instruction(&spec(&covered, false, true, width), light_path);
            }
            check_every_instruction(&spec(&covered, false, false, width), false);
            check_every_instruction(&spec(&covered, true, false, width), false);
        }
    }

    #[test]
    fn an_address_outside_the_code_or_between_instructions_has_no_rule() {
        let covered = [0x55, 0x48, 0x89, 0xe5, 0x90];
        let s = spec(&covered, false, true, VectorWidth::None);
        let detour = build_detour(&s).unwrap();
        let prefix = &detour.code[ENTRY_OFFSET..detour.copy_offset as usize];
        let ip = s.detour_ip + ENTRY_OFFSET as u64;
        assert_eq!(entry_rsp(prefix, ip, ip), Some(HookPosition { rsp: EntryRsp::Rsp(0), called: false }));
        assert_eq!(entry_rsp(prefix, ip, ip + 1), None, "inside the first instruction");
        assert_eq!(entry_rsp(prefix, ip, ip + prefix.len() as u64 + 1), None);
    }
}
