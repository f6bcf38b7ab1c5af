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
//! - a string instruction (`rep movsb`, `stos`, `lods`, …), which reads the direction
//!   flag: a light detour at a point where DF is known clear does not clear it again;
//! - an indirect call or jump whose target is not a constant (a `dyn` method, a function
//!   pointer in writable memory). Constant targets are followed: a read-only GOT slot
//!   (`call *f@GOTPCREL(%rip)`, how position-independent code calls another object's
//!   function, Rust's standard library included), loaded into a register first (and
//!   copied to others) or not,
//!   and the entries of a position-independent jump table (see [`prove_light`]);
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
    InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
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
    /// The functions entered, from an entry point to the one holding `at` (each called by
    /// the one before it): how the walk got there.
    pub path: Vec<u64>,
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

/// What the walk needs to know of the program, which the caller reads from memory.
pub trait Program {
    /// The bytes at `ip`: at least one whole instruction, up to [`MAX_INSN_LEN`] bytes
    /// (fewer only where the mapping ends); `None` when `ip` is not readable.
    fn code(&mut self, ip: u64) -> Option<Vec<u8>>;
    /// `len` bytes at `addr` when nothing can change them (read-only memory: a GOT made
    /// read-only after relocation, a jump table in `.rodata`); `None` otherwise.
    fn constant(&mut self, addr: u64, len: usize) -> Option<Vec<u8>>;
    /// The bounds `[start, end)` of the function containing `ip`, when known.
    fn function(&mut self, ip: u64) -> Option<(u64, u64)>;
    /// What a call's (or a jump to another function's) target is.
    fn callee(&mut self, target: u64) -> Callee;
}

/// Jump-table entries read at most (a `match` over a few hundred values has that many).
const MAX_TABLE: u64 = 4096;

/// Walks every path from `entries` and proves that none touches vector, x87 or MXCSR state;
/// at most `limit` instructions are decoded.
///
/// Indirect branches are followed where their targets are constants: a call or jump
/// through a read-only pointer (`call *f@GOTPCREL(%rip)`, or that pointer loaded into a
/// register first, and copied to others), and a jump table as compilers emit it for position-independent code
/// (`lea table(%rip),%rcx ; movslq (%rcx,%rax,4),%rax ; add %rcx,%rax ; jmp *%rax`), whose
/// entries are read: every one that leads into the function is a target. When the path
/// bounds the index (`cmp $n,%eax ; ja default` before it, or a `movzbl` that loaded it),
/// only that many entries are: a table is often followed in memory by another, whose
/// entries, relative to the other table's address, would lead into the middle of
/// instructions. Without a bound, entries past the table's end that happen to lead into
/// the function are walked too, which can only make the verdict more cautious. A register's value is trusted only on the path that set it: an
/// instruction is walked once per set of such values.
pub fn prove_light(entries: &[u64], program: &mut impl Program, limit: usize) -> Result<Light, Heavy> {
    let mut seen: HashSet<(u64, Known)> = HashSet::new();
    let mut decoded = 0;
    let mut functions: HashSet<u64> = entries.iter().copied().collect();
    // (where, registers known, the function it is in)
    let mut todo: VecDeque<(u64, Known, u64)> = entries.iter().map(|&ip| (ip, Known::default(), ip)).collect();
    // Each function entered: the function that first called it.
    let mut caller: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut info = InstructionInfoFactory::new();
    while let Some((mut ip, mut known, function)) = todo.pop_front() {
        let path = |caller: &std::collections::HashMap<u64, u64>| {
            let mut path = vec![function];
            while let Some(&up) = caller.get(path.last().expect("never empty")) {
                if path.contains(&up) {
                    break;
                }
                path.push(up);
            }
            path.reverse();
            path
        };
        // The instruction walked just before on this path (a compare, for a branch's bound).
        let mut previous: Option<Instruction> = None;
        loop {
            if !seen.insert((ip, known.clone())) {
                break;
            }
            decoded += 1;
            if decoded > limit {
                return Err(Heavy {
                    at: 0,
                    reason: format!("more than {limit} instructions are reachable: too much code to prove"),
                    path: Vec::new(),
                });
            }
            let bytes = program.code(ip).ok_or_else(|| Heavy {
                at: ip,
                reason: "code that cannot be read".into(),
                path: path(&caller),
            })?;
            let mut decoder = Decoder::with_ip(64, &bytes, ip, DecoderOptions::NONE);
            let insn = decoder.decode();
            if insn.is_invalid() {
                return Err(Heavy { at: ip, reason: "bytes that do not decode".into(), path: path(&caller) });
            }
            if let Some(what) = touches_vector_state(&insn, &mut info) {
                return Err(Heavy { at: ip, reason: format!("{what} `{}`", text(&insn)), path: path(&caller) });
            }
            let flow = insn.flow_control();
            let unknown = || Heavy {
                at: ip,
                reason: format!("an indirect branch, whose target is not known, `{}`", text(&insn)),
                path: path(&caller),
            };
            let targets: Vec<u64> = match flow {
                FlowControl::UnconditionalBranch | FlowControl::Call if insn.op0_kind() == OpKind::NearBranch64 => {
                    vec![insn.near_branch_target()]
                }
                FlowControl::IndirectBranch | FlowControl::IndirectCall => match insn.op0_kind() {
                    OpKind::Register => match known.get(insn.op0_register()) {
                        Some(Value::Pointer(to)) => vec![to],
                        Some(Value::TableTarget(table, entries)) if flow == FlowControl::IndirectBranch => {
                            table_targets(program, table, entries, ip).ok_or_else(unknown)?
                        }
                        _ => return Err(unknown()),
                    },
                    _ if insn.is_ip_rel_memory_operand() => {
                        vec![pointer(program, insn.ip_rel_memory_address()).ok_or_else(unknown)?]
                    }
                    _ => return Err(unknown()),
                },
                _ => Vec::new(),
            };
            let before = known.clone();
            // What the instruction leaves in the registers.
            for used in info.info(&insn).used_registers() {
                if matches!(
                    used.access(),
                    OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
                ) {
                    known.forget(used.register());
                }
            }
            if let Some((reg, value)) = constant_set(program, &insn, &before) {
                known.set(reg, value);
            }
            // The index bound of an unsigned compare and branch: (register, bound on the
            // taken path, bound on the fall-through path).
            let bounded = previous.as_ref().and_then(|cmp| compare_bound(cmp, &insn));
            match flow {
                FlowControl::Next => {}
                FlowControl::Return | FlowControl::Exception | FlowControl::Interrupt => break,
                // `syscall` is a "call" to the kernel, with no target here.
                FlowControl::Call if targets.is_empty() => {}
                FlowControl::Call | FlowControl::IndirectCall => {
                    match program.callee(targets[0]) {
                        Callee::Follow => {
                            if functions.insert(targets[0]) {
                                caller.insert(targets[0], function);
                                todo.push_back((targets[0], Known::default(), targets[0]));
                            }
                        }
                        Callee::Checked => {}
                        Callee::Ends => break,
                        Callee::Heavy(why) => return Err(Heavy { at: ip, reason: why, path: path(&caller) }),
                    }
                    // The callee may have changed any register but those every function
                    // preserves (the SysV ABI's callee-saved ones, which the code walked
                    // relies on as much as this walk does).
                    known.keep_callee_saved();
                }
                // A jump within the function, a jump table's, or a tail call (whose callee
                // returns for us).
                FlowControl::UnconditionalBranch | FlowControl::IndirectBranch => {
                    for &target in &targets {
                        match program.callee(target) {
                            Callee::Follow => {
                                // A tail call enters another function; a jump within this one
                                // stays in it (told apart by the callee check only: either
                                // way the path is right or one step short).
                                todo.push_back((target, known.clone(), function))
                            }
                            Callee::Checked | Callee::Ends => {}
                            Callee::Heavy(why) => return Err(Heavy { at: ip, reason: why, path: path(&caller) }),
                        }
                    }
                    break;
                }
                FlowControl::ConditionalBranch => {
                    let mut taken = known.clone();
                    if let Some((reg, on_taken, on_fall)) = bounded {
                        if let Some(n) = on_taken {
                            taken.set(reg, Value::Below(n));
                        }
                        if let Some(n) = on_fall {
                            known.set(reg, Value::Below(n));
                        }
                    }
                    todo.push_back((insn.near_branch_target(), taken, function))
                }
                FlowControl::XbeginXabortXend => {
                    return Err(Heavy {
                        at: ip,
                        reason: format!("a transaction `{}`", text(&insn)),
                        path: path(&caller),
                    })
                }
            }
            ip = insn.next_ip();
            previous = Some(insn);
        }
    }
    Ok(Light { instructions: seen.iter().map(|(ip, _)| *ip).collect::<HashSet<_>>().len(), functions: functions.len() })
}

/// The read-only pointer at `addr`.
fn pointer(program: &mut impl Program, addr: u64) -> Option<u64> {
    let bytes = program.constant(addr, 8)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// The targets of a jump through the table at `table` (32-bit offsets from the table) made
/// at `ip`: every entry that leads into `ip`'s function, up to the first that does not.
/// `entries`: how many the path's bound on the index allows, when it has one.
fn table_targets(program: &mut impl Program, table: u64, entries: Option<u64>, ip: u64) -> Option<Vec<u64>> {
    let (start, end) = program.function(ip)?;
    let next = next_object(program, start, end, table);
    let mut targets = Vec::new();
    for i in 0..entries.unwrap_or(MAX_TABLE).min(MAX_TABLE) {
        if next.is_some_and(|next| table + 4 * i >= next) {
            break;
        }
        let Some(entry) = program.constant(table + 4 * i, 4) else { break };
        let target = table.wrapping_add_signed(i64::from(i32::from_le_bytes(entry.try_into().ok()?)));
        if !(start..end).contains(&target) {
            break;
        }
        targets.push(target);
    }
    (!targets.is_empty()).then_some(targets)
}

/// The lowest address above `table` that the function `[start, end)` takes with a
/// `lea …(%rip)`: another object (a compiler lays a function's jump tables out one after
/// the other), where `table` ends at the latest. Decoded linearly from the function's start.
fn next_object(program: &mut impl Program, start: u64, end: u64, table: u64) -> Option<u64> {
    let mut next: Option<u64> = None;
    let mut ip = start;
    while ip < end {
        let bytes = program.code(ip)?;
        let insn = Decoder::with_ip(64, &bytes, ip, DecoderOptions::NONE).decode();
        if insn.is_invalid() {
            break;
        }
        if insn.mnemonic() == Mnemonic::Lea && insn.is_ip_rel_memory_operand() {
            let at = insn.ip_rel_memory_address();
            if at > table && next.is_none_or(|n| at < n) {
                next = Some(at);
            }
        }
        ip = insn.next_ip();
    }
    next
}

/// A constant `insn` puts in a general register, given what the registers held before.
fn constant_set(program: &mut impl Program, insn: &Instruction, before: &Known) -> Option<(Register, Value)> {
    if insn.op0_kind() != OpKind::Register {
        return None;
    }
    if insn.op0_register().is_gpr32() {
        return index_bound(insn, before);
    }
    if !insn.op0_register().is_gpr64() {
        return None;
    }
    let dst = insn.op0_register();
    match insn.mnemonic() {
        // mov f@GOTPCREL(%rip),%rax
        Mnemonic::Mov if insn.is_ip_rel_memory_operand() => {
            Some((dst, Value::Pointer(pointer(program, insn.ip_rel_memory_address())?)))
        }
        // mov %rdx,%r13: a copy, kept by the compiler in a callee-saved register across a
        // call and copied back before its use
        Mnemonic::Mov if insn.op1_kind() == OpKind::Register && insn.op1_register().is_gpr64() => {
            Some((dst, before.get(insn.op1_register())?))
        }
        // lea table(%rip),%rcx
        Mnemonic::Lea if insn.is_ip_rel_memory_operand() => Some((dst, Value::Address(insn.ip_rel_memory_address()))),
        // movslq (%rcx,%rax,4),%rax
        Mnemonic::Movsxd
            if insn.op1_kind() == OpKind::Memory
                && insn.memory_index_scale() == 4
                && insn.memory_displacement64() == 0 =>
        {
            let entries = match before.get(insn.memory_index()) {
                Some(Value::Below(n)) => Some(n),
                _ => None,
            };
            match before.get(insn.memory_base()) {
                Some(Value::Address(table)) => Some((dst, Value::TableEntry(table, entries))),
                _ => None,
            }
        }
        // add %rcx,%rax
        Mnemonic::Add if insn.op1_kind() == OpKind::Register => {
            match (before.get(dst), before.get(insn.op1_register())) {
                (Some(Value::TableEntry(t, n)), Some(Value::Address(a)))
                | (Some(Value::Address(a)), Some(Value::TableEntry(t, n)))
                    if a == t =>
                {
                    Some((dst, Value::TableTarget(t, n)))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The bound a 32-bit write puts on a register used as a table index (a 32-bit write
/// clears the upper half): `movzbl`/`movzwl` load a value below 256 or 65,536, and
/// `mov %eax,%eax` keeps the bound its source had.
fn index_bound(insn: &Instruction, before: &Known) -> Option<(Register, Value)> {
    let dst = insn.op0_register().full_register();
    match insn.mnemonic() {
        Mnemonic::Movzx => {
            let size = match insn.op1_kind() {
                OpKind::Register => insn.op1_register().size(),
                _ => insn.memory_size().size(),
            };
            match size {
                1 => Some((dst, Value::Below(1 << 8))),
                2 => Some((dst, Value::Below(1 << 16))),
                _ => None,
            }
        }
        Mnemonic::Mov if insn.op1_kind() == OpKind::Register => match before.get(insn.op1_register()) {
            Some(Value::Below(n)) if insn.op1_register().is_gpr32() => Some((dst, Value::Below(n))),
            _ => None,
        },
        _ => None,
    }
}

/// For `cmp $imm,%reg` (`compare`) followed by the unsigned conditional jump `branch`: the
/// register and the bound (exclusive) its value has where the jump is taken and where it
/// falls through — compilers check a table index this way before the table's jump, and the
/// program itself relies on the check, so the entries past it are not targets.
fn compare_bound(compare: &Instruction, branch: &Instruction) -> Option<(Register, Option<u64>, Option<u64>)> {
    if compare.mnemonic() != Mnemonic::Cmp
        || compare.op0_kind() != OpKind::Register
        || !matches!(
            compare.op1_kind(),
            OpKind::Immediate8to32 | OpKind::Immediate32 | OpKind::Immediate8to64 | OpKind::Immediate32to64
        )
    {
        return None;
    }
    let reg = compare.op0_register();
    if !(reg.is_gpr32() || reg.is_gpr64()) {
        return None;
    }
    let imm = compare.immediate(1);
    if imm >= MAX_TABLE {
        return None;
    }
    let (taken, fall) = match branch.mnemonic() {
        // Above: taken when > imm.
        Mnemonic::Ja => (None, Some(imm + 1)),
        // Above or equal: taken when >= imm.
        Mnemonic::Jae => (None, Some(imm)),
        Mnemonic::Jb => (Some(imm), None),
        Mnemonic::Jbe => (Some(imm + 1), None),
        _ => return None,
    };
    Some((reg.full_register(), taken, fall))
}

/// What a general register is known to hold on the path walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Value {
    /// A read-only pointer's value: a function's address.
    Pointer(u64),
    /// An address (a `lea` of a table).
    Address(u64),
    /// Some entry of the jump table at this address, and how many entries the index's
    /// bound allows, when it has one.
    TableEntry(u64, Option<u64>),
    /// Some target of the jump table at this address (and the entries allowed).
    TableTarget(u64, Option<u64>),
    /// An unsigned value below this bound (a table index checked on the path).
    Below(u64),
}

/// General registers with a [`Value`] known on the path walked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct Known(Vec<(Register, Value)>);

impl Known {
    fn get(&self, reg: Register) -> Option<Value> {
        self.0.iter().find(|(r, _)| *r == reg.full_register()).map(|(_, v)| *v)
    }

    fn set(&mut self, reg: Register, value: Value) {
        self.forget(reg);
        self.0.push((reg.full_register(), value));
        self.0.sort_unstable_by_key(|(r, _)| *r as u32);
    }

    fn forget(&mut self, reg: Register) {
        self.0.retain(|(r, _)| *r != reg.full_register());
    }

    fn keep_callee_saved(&mut self) {
        const CALLEE_SAVED: [Register; 6] =
            [Register::RBX, Register::RBP, Register::R12, Register::R13, Register::R14, Register::R15];
        self.0.retain(|(r, _)| CALLEE_SAVED.contains(r));
    }
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
    if insn.is_string_instruction() && insn.rflags_read() & iced_x86::RflagsBits::DF != 0 {
        return Some("a string instruction, which reads the direction flag,");
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

    /// A program of code pieces at fixed addresses, read-only constants, and callees named.
    #[derive(Default)]
    struct Test {
        code: BTreeMap<u64, Vec<u8>>,
        constants: BTreeMap<u64, Vec<u8>>,
        callees: BTreeMap<u64, Callee>,
        functions: Vec<(u64, u64)>,
    }

    fn program(pieces: &[(u64, &[u8])]) -> Test {
        Test { code: pieces.iter().map(|(a, b)| (*a, b.to_vec())).collect(), ..Test::default() }
    }

    impl Test {
        fn pointer(mut self, at: u64, value: u64) -> Test {
            self.constants.insert(at, value.to_le_bytes().to_vec());
            self
        }
        fn callee(mut self, at: u64, what: Callee) -> Test {
            self.callees.insert(at, what);
            self
        }
    }

    impl Program for Test {
        fn code(&mut self, ip: u64) -> Option<Vec<u8>> {
            let (&start, bytes) = self.code.range(..=ip).next_back()?;
            let at = (ip - start) as usize;
            (at < bytes.len()).then(|| bytes[at..].iter().take(MAX_INSN_LEN).copied().collect())
        }
        fn constant(&mut self, addr: u64, len: usize) -> Option<Vec<u8>> {
            let (&start, bytes) = self.constants.range(..=addr).next_back()?;
            let at = (addr - start) as usize;
            bytes.get(at..at + len).map(<[u8]>::to_vec)
        }
        fn function(&mut self, ip: u64) -> Option<(u64, u64)> {
            self.functions.iter().copied().find(|&(s, e)| (s..e).contains(&ip))
        }
        fn callee(&mut self, target: u64) -> Callee {
            self.callees.get(&target).cloned().unwrap_or(Callee::Follow)
        }
    }

    #[test]
    fn general_register_code_with_branches_and_calls_is_light() {
        let mut p = program(&[
            // 0x1000: test %rdi,%rdi ; je 0x100a ; call 0x2000 ; lock incq (%rsi) ; ret
            (0x1000, &[0x48, 0x85, 0xff, 0x74, 0x05, 0xe8, 0xf6, 0x0f, 0x00, 0x00, 0xf0, 0x48, 0xff, 0x06, 0xc3]),
            // 0x2000: rdtsc ; mov %eax,%ecx ; syscall ; mfence ; pause ; ret
            (0x2000, &[0x0f, 0x31, 0x89, 0xc1, 0x0f, 0x05, 0x0f, 0xae, 0xf0, 0xf3, 0x90, 0xc3]),
        ]);
        let light = prove_light(&[0x1000], &mut p, 100).unwrap();
        assert_eq!(light, Light { instructions: 11, functions: 2 });
    }

    #[test]
    fn a_vector_instruction_behind_a_chain_of_direct_calls_is_found() {
        let mut p = program(&[
            // 0x1000: call 0x2000 ; ret
            (0x1000, &[0xe8, 0xfb, 0x0f, 0x00, 0x00, 0xc3]),
            // 0x2000: jmp 0x3000 (a tail call)
            (0x2000, &[0xe9, 0xfb, 0x0f, 0x00, 0x00]),
            // 0x3000: xor %eax,%eax ; movups %xmm0,(%rdi) ; ret
            (0x3000, &[0x31, 0xc0, 0x0f, 0x11, 0x07, 0xc3]),
        ]);
        let heavy = prove_light(&[0x1000], &mut p, 100).unwrap_err();
        assert_eq!(heavy.at, 0x3002);
        assert_eq!(heavy.reason, "a vector register `movups %xmm0,(%rdi)`");
        assert_eq!(heavy.path, [0x1000, 0x2000], "called from 0x1000, reached by 0x2000's tail call");
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
            (&[0xf3, 0xa4], "a string instruction"),                      // rep movsb
            (&[0xf3, 0x48, 0xab], "a string instruction"),                // rep stos %rax,(%rdi)
            (&[0xac], "a string instruction"),                            // lods (%rsi),%al
        ];
        for (bytes, what) in cases {
            let mut piece = bytes.to_vec();
            piece.push(0xc3);
            let heavy = prove_light(&[0x1000], &mut program(&[(0x1000, &piece)]), 10).unwrap_err();
            assert!(heavy.reason.starts_with(what), "{bytes:02x?}: {}", heavy.reason);
            assert_eq!(heavy.at, 0x1000);
        }
    }

    #[test]
    fn indirect_branches_of_unknown_target_are_heavy_and_named() {
        for (bytes, shown) in [
            (&[0xff, 0xd0][..], "call *%rax"),
            (&[0xff, 0x25, 0, 0, 0, 0][..], "jmpq *0x1006"),
            (&[0x3e, 0xff, 0xe0][..], "*%rax"),
        ] {
            let heavy = prove_light(&[0x1000], &mut program(&[(0x1000, bytes)]), 10).unwrap_err();
            assert!(heavy.reason.contains("indirect branch") && heavy.reason.contains(shown), "{}", heavy.reason);
        }
    }

    #[test]
    fn a_call_or_jump_through_a_read_only_pointer_goes_to_its_value() {
        // 0x1000: call *0xffa(%rip) (slot 0x2000) ; jmp *0x1000(%rip) (slot 0x200c)
        let pieces: &[(u64, &[u8])] = &[
            (0x1000, &[0xff, 0x15, 0xfa, 0x0f, 0x00, 0x00, 0xff, 0x25, 0x00, 0x10, 0x00, 0x00]),
            (0x3000, &[0xc3]),
            (0x4000, &[0x0f, 0x11, 0x07, 0xc3]), // movups %xmm0,(%rdi) ; ret
        ];
        let slots = |to: u64| program(pieces).pointer(0x2000, 0x3000).pointer(0x200c, to);
        // Both pointers lead to light code.
        let light = prove_light(&[0x1000], &mut slots(0x3000), 10).unwrap();
        assert_eq!(light, Light { instructions: 3, functions: 2 });
        // The tail call's pointer leads to a vector store.
        assert_eq!(prove_light(&[0x1000], &mut slots(0x4000), 10).unwrap_err().at, 0x4000);
        // A pointer not vouched for (writable): unknown.
        assert_eq!(prove_light(&[0x1000], &mut program(pieces), 10).unwrap_err().at, 0x1000);
        // A tail call to an ending callee ends the path.
        assert!(prove_light(&[0x1000], &mut slots(0x4000).callee(0x4000, Callee::Ends), 10).is_ok());
    }

    #[test]
    fn a_call_through_a_register_loaded_from_a_read_only_pointer_goes_to_its_value() {
        // 0x1000: mov 0xff9(%rip),%rax (slot 0x2000) ; lea 8(%rsp),%rdi ; call *%rax ; ret
        // 0x1010: call *%rax (another path, rax unknown)
        let pieces: &[(u64, &[u8])] = &[
            (0x1000, &[0x48, 0x8b, 0x05, 0xf9, 0x0f, 0x00, 0x00, 0x48, 0x8d, 0x7c, 0x24, 0x08, 0xff, 0xd0, 0xc3]),
            (0x1010, &[0xff, 0xd0, 0xc3]),
            (0x3000, &[0xc3]),
        ];
        assert_eq!(prove_light(&[0x1000], &mut program(pieces).pointer(0x2000, 0x3000), 20).unwrap().functions, 2);
        assert_eq!(prove_light(&[0x1010], &mut program(pieces).pointer(0x2000, 0x3000), 20).unwrap_err().at, 0x1010);
        // A callee-saved register keeps its value across a call; rax does not.
        // mov 0xff9(%rip),%rbx ; call 0x3000 ; call *%rbx ; mov 0xfea(%rip),%rax ; call 0x3000 ; call *%rax
        let across: &[(u64, &[u8])] = &[
            (
                0x1000,
                &[
                    0x48, 0x8b, 0x1d, 0xf9, 0x0f, 0x00, 0x00, 0xe8, 0xf4, 0x1f, 0x00, 0x00, 0xff, 0xd3, 0x48, 0x8b,
                    0x05, 0xeb, 0x0f, 0x00, 0x00, 0xe8, 0xe6, 0x1f, 0x00, 0x00, 0xff, 0xd0, 0xc3,
                ],
            ),
            (0x3000, &[0xc3]),
        ];
        let heavy = prove_light(&[0x1000], &mut program(across).pointer(0x2000, 0x3000), 30).unwrap_err();
        assert_eq!(heavy.at, 0x101a, "{heavy}");
        // A write to the register in between: unknown again.
        // mov 0xff9(%rip),%rax ; mov %edi,%eax ; call *%rax
        let clobbered: &[(u64, &[u8])] =
            &[(0x1000, &[0x48, 0x8b, 0x05, 0xf9, 0x0f, 0x00, 0x00, 0x89, 0xf8, 0xff, 0xd0, 0xc3])];
        let heavy = prove_light(&[0x1000], &mut program(clobbered).pointer(0x2000, 0x3000), 20).unwrap_err();
        assert_eq!(heavy.at, 0x1009);
        // Copied into a callee-saved register across a call and back (as rustc keeps a
        // function pointer it loaded before a loop): still known; a copy of an unknown
        // register is not.
        // mov 0xff9(%rip),%rdx ; mov %rdx,%r13 ; call 0x3000 ; mov %r13,%rdx ; call *%rdx ;
        // mov %rcx,%rdx ; call *%rdx
        let copied: &[(u64, &[u8])] = &[
            (
                0x1000,
                &[
                    0x48, 0x8b, 0x15, 0xf9, 0x0f, 0x00, 0x00, 0x49, 0x89, 0xd5, 0xe8, 0xf1, 0x1f, 0x00, 0x00, 0x4c,
                    0x89, 0xea, 0xff, 0xd2, 0x48, 0x89, 0xca, 0xff, 0xd2, 0xc3,
                ],
            ),
            (0x3000, &[0xc3]),
        ];
        let heavy = prove_light(&[0x1000], &mut program(copied).pointer(0x2000, 0x3000), 30).unwrap_err();
        assert_eq!(heavy.at, 0x1017, "{heavy}");
    }

    #[test]
    fn every_target_of_a_jump_table_is_walked() {
        // 0x1000: lea 0xff9(%rip),%rcx (table 0x2000) ; movslq (%rcx,%rdi,4),%rax ;
        //         add %rcx,%rax ; jmp *%rax
        // 0x1010: ret        0x1011: ret        0x1012: movups %xmm0,(%rdi)
        let code: &[u8] = &[
            0x48, 0x8d, 0x0d, 0xf9, 0x0f, 0x00, 0x00, 0x48, 0x63, 0x04, 0xb9, 0x48, 0x01, 0xc8, 0xff, 0xe0, 0xc3, 0xc3,
            0x0f, 0x11, 0x07, 0xc3,
        ];
        let table = |entries: &[i32]| {
            let mut p = program(&[(0x1000, code)]);
            p.constants.insert(0x2000, entries.iter().flat_map(|e| e.to_le_bytes()).collect());
            p.functions.push((0x1000, 0x1016));
            p
        };
        // Two entries into the function (then data leading elsewhere): light.
        let light = prove_light(&[0x1000], &mut table(&[-0xff0, -0xfef, 0x7fff_0000]), 20).unwrap();
        assert_eq!(light.instructions, 6);
        // A third entry leads to the vector store.
        let heavy = prove_light(&[0x1000], &mut table(&[-0xff0, -0xfef, -0xfee]), 20).unwrap_err();
        assert_eq!(heavy.at, 0x1012);
        // Without the function's bounds the table cannot be read safely.
        let mut unbounded = table(&[-0xff0]);
        unbounded.functions.clear();
        assert!(prove_light(&[0x1000], &mut unbounded, 20).unwrap_err().reason.contains("indirect branch"));
    }

    /// `code`, one function at 0x1000, proven with the jump table `entries` at 0x2000.
    fn prove_with_table(code: &[u8], entries: &[i32]) -> Result<Light, Heavy> {
        let mut p = program(&[(0x1000, code)]);
        p.constants.insert(0x2000, entries.iter().flat_map(|e| e.to_le_bytes()).collect());
        p.functions.push((0x1000, 0x1000 + code.len() as u64));
        prove_light(&[0x1000], &mut p, 40)
    }

    #[test]
    fn a_jump_table_checked_by_a_compare_is_read_up_to_the_bound_only() {
        // 0x1000: cmp $N,%edi ; ja 0x1016 ; lea 0xff4(%rip),%rcx (table 0x2000) ;
        //         movslq (%rcx,%rdi,4),%rax ; add %rcx,%rax ; jmp *%rax
        // 0x1015: ret        0x1016: ret        0x1017: movups %xmm0,(%rdi) ; ret
        let code = |n: u8| -> Vec<u8> {
            vec![
                0x83, 0xff, n, 0x77, 0x11, 0x48, 0x8d, 0x0d, 0xf4, 0x0f, 0x00, 0x00, 0x48, 0x63, 0x04, 0xb9, 0x48,
                0x01, 0xc8, 0xff, 0xe0, 0xc3, 0xc3, 0x0f, 0x11, 0x07, 0xc3,
            ]
        };
        // Two entries, then another table's: relative to this one, its entry leads to the
        // vector store.
        let with_bound = |n: u8| prove_with_table(&code(n), &[-0xfeb, -0xfea, -0xfe9]);
        // Index at most 1: the two entries only.
        assert!(with_bound(1).is_ok(), "{:?}", with_bound(1));
        // Index at most 2: the third entry is a target too.
        assert_eq!(with_bound(2).unwrap_err().at, 0x1017);
    }

    #[test]
    fn a_jump_table_ends_where_the_function_takes_the_address_of_the_next_one() {
        // 0x1000: movzbl (%rsi),%edi ; lea 0xff6(%rip),%rcx (table 0x2000) ;
        //         movslq (%rcx,%rdi,4),%rax ; add %rcx,%rax ; jmp *%rax
        // 0x1013: ret        0x1014: ret
        // 0x1015: lea 0xfec(%rip),%rdx (the next table, 0x2008), or 7 NOPs
        // 0x101c: movups %xmm0,(%rdi) ; ret
        let code = |next_table: bool| -> Vec<u8> {
            let lea: &[u8] = match next_table {
                true => &[0x48, 0x8d, 0x15, 0xec, 0x0f, 0x00, 0x00],
                false => &[0x90; 7],
            };
            let head = [
                0x0f, 0xb6, 0x3e, 0x48, 0x8d, 0x0d, 0xf6, 0x0f, 0x00, 0x00, 0x48, 0x63, 0x04, 0xb9, 0x48, 0x01, 0xc8,
                0xff, 0xe0, 0xc3, 0xc3,
            ];
            [&head[..], lea, &[0x0f, 0x11, 0x07, 0xc3]].concat()
        };
        // This table's two entries, then the next table's, which relative to this one leads
        // to the vector store.
        let prove = |next_table: bool| prove_with_table(&code(next_table), &[-0xfed, -0xfec, -0xfe4]);
        assert!(prove(true).is_ok(), "{:?}", prove(true));
        // Nothing says where the table ends: its entries are read on (the cautious way).
        assert_eq!(prove(false).unwrap_err().at, 0x101c);
    }

    #[test]
    fn callees_are_followed_skipped_ended_or_refused_as_named() {
        // 0x1000: call 0x2000 ; call 0x3000 ; ret          0x2000: ret        0x3000: ud2
        let pieces: &[(u64, &[u8])] = &[
            (0x1000, &[0xe8, 0xfb, 0x0f, 0x00, 0x00, 0xe8, 0xf6, 0x1f, 0x00, 0x00, 0xc3]),
            (0x2000, &[0xc3]),
            (0x3000, &[0x0f, 0x0b]),
        ];
        let at_3000 = |what: Callee| program(pieces).callee(0x3000, what);
        assert_eq!(prove_light(&[0x1000], &mut at_3000(Callee::Follow), 10).unwrap().functions, 3);
        assert_eq!(prove_light(&[0x1000], &mut at_3000(Callee::Checked), 10).unwrap().functions, 2);
        // An ending callee: what follows its call is not walked (here: the ret).
        assert_eq!(prove_light(&[0x1000], &mut at_3000(Callee::Ends), 10).unwrap().instructions, 3);
        let heavy = prove_light(&[0x1000], &mut at_3000(Callee::Heavy("it unwinds".into())), 10);
        assert_eq!(heavy.unwrap_err(), Heavy { at: 0x1005, reason: "it unwinds".into(), path: vec![0x1000] });
    }

    #[test]
    fn unreadable_undecodable_and_too_much_code_are_heavy() {
        let heavy = prove_light(&[0x1000], &mut program(&[(0x1000, &[0x90, 0x90])]), 10).unwrap_err();
        assert_eq!(heavy, Heavy { at: 0x1002, reason: "code that cannot be read".into(), path: vec![0x1000] });
        let heavy = prove_light(&[0x1000], &mut program(&[(0x1000, &[0x06])]), 10).unwrap_err();
        assert_eq!(heavy.reason, "bytes that do not decode");
        let heavy = prove_light(&[0x1000], &mut program(&[(0x1000, &[0x90; 20])]), 10).unwrap_err();
        assert!(heavy.reason.contains("more than 10 instructions"), "{heavy}");
        // A loop is walked once.
        assert!(prove_light(&[0x1000], &mut program(&[(0x1000, &[0xeb, 0xfe])]), 10).is_ok());
    }
}
