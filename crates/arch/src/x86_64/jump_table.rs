//! Where an indirect jump can go: the entries of a jump table, or the entry of another
//! function (a tail call through a pointer).
//!
//! The optimizer must know that nothing jumps into the middle of the bytes a detour jump
//! covers. Direct branches say where they go; an indirect jump does not, and the kernel's
//! optimizer (`arch/x86/kernel/kprobes/opt.c`, `can_optimize()`) refuses every function that
//! has one. Most indirect jumps are one of two shapes the compiler emits, and both can be
//! read off the instructions before the jump:
//!
//! * a **jump table** (`switch`): the target is loaded from a table indexed by a register,
//!   in position-independent code as a 32-bit offset from the table's own address
//!   (`lea T(%rip),%rdx; movslq (%rdx,%rax,4),%rax; add %rdx,%rax; jmp *%rax`), otherwise as
//!   an absolute address (`jmp *T(,%rax,8)`). The table's entries are read and every one
//!   becomes a known target;
//! * a **tail call through a pointer**: the target was loaded from memory without an index
//!   (a function pointer in a structure, `jmp *8(%rax)`, or one loaded into a register), was
//!   demangled from glibc's pointer guard (`xor %fs:0x30,%rax`), or the jump follows the
//!   function's stack-frame teardown (`pop`, `add $n,%rsp`, `leave`): a jump table's cases
//!   are code of the same function and need its frame. A pointer to code is a function's
//!   entry or a return address, never the middle of a covered run (a run never ends in the
//!   middle of a call's return).
//!
//! Anything else stays unknown, and the function keeps its breakpoint probes.
//!
//! A table's length is not read from the bounds check before it (which may be far away);
//! entries are read for as long as they point into the module's code. Every real entry
//! does, so the entries read are all the real ones and perhaps some more: a superset, which
//! can only refuse more, never less.

use std::collections::BTreeSet;
use std::ops::Range;

use iced_x86::{Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register};

use super::decode::{flow_of, Flow};

/// The most entries read from one table: a `switch` of this many cases is beyond any
/// program's, and a reader that never finds the end must stop.
const MAX_TABLE_ENTRIES: usize = 4096;

/// Table entries read at once.
const CHUNK: usize = 64;

/// How far back from an indirect jump its target's loading is looked for, in instructions.
const REACH: usize = 12;

/// The memory a jump table is read from: the module's code (entries must point into it)
/// and a reader of the process's memory, supplied by the caller (this layer does no I/O).
pub struct TableMemory<'a> {
    /// The module's code: a table entry pointing outside it ends the table.
    pub code: Range<u64>,
    /// Fills the buffer with the bytes at the address; false when they cannot be read.
    pub read: &'a dyn Fn(u64, &mut [u8]) -> bool,
}

/// What is known of an indirect jump's targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndirectTargets {
    /// A jump table's: every entry read, as absolute addresses.
    Table(Vec<u64>),
    /// A tail call through a pointer: its target is some function's entry.
    TailCall,
    /// Neither shape could be shown.
    Unknown,
}

/// The targets of the indirect jump `instrs[at]`, `instrs` being a whole function's
/// instructions; `branch_targets` are the function's direct branch targets (where straight-
/// line code may be entered from elsewhere). Tables are read through `memory`; without it a
/// jump table is [`IndirectTargets::Unknown`].
///
/// ```
/// use dynprobe_arch::x86_64::jump_table::{indirect_targets_in, IndirectTargets, TableMemory};
/// // 0x1000: lea 0x100(%rip),%rdx  (table at 0x1107) ; movslq (%rdx,%rax,4),%rax ;
/// //         add %rdx,%rax ; jmp *%rax ; nop...
/// let mut f = vec![0x48, 0x8d, 0x15, 0x00, 0x01, 0x00, 0x00, 0x48, 0x63, 0x04, 0x82,
///                  0x48, 0x01, 0xd0, 0xff, 0xe0];
/// f.resize(0x20, 0x90);
/// // The table: offsets -0x107 and -0x100 from 0x1107 (0x1000 and 0x1007), then a value
/// // that points outside the code, which ends it.
/// let table: Vec<u8> = [-0x107i32, -0x100, 0x7fff_0000].iter().flat_map(|e| e.to_le_bytes()).collect();
/// let read = |addr: u64, buf: &mut [u8]| {
///     let at = addr.wrapping_sub(0x1107) as usize;
///     table.get(at..at + buf.len()).map(|b| buf.copy_from_slice(b)).is_some()
/// };
/// let memory = TableMemory { code: 0x1000..0x1020, read: &read };
/// assert_eq!(indirect_targets_in(&f, 0x1000, 0x100e, Some(&memory)), IndirectTargets::Table(vec![0x1000, 0x1007]));
/// ```
pub fn indirect_targets(
    instrs: &[Instruction],
    at: usize,
    branch_targets: &BTreeSet<u64>,
    memory: Option<&TableMemory<'_>>,
) -> IndirectTargets {
    let jump = &instrs[at];
    let block = Block::before(instrs, at, branch_targets);
    match jump.op0_kind() {
        OpKind::Register => block.targets_of_register(jump.op0_register().full_register(), at, memory),
        OpKind::Memory => block.through_memory_operand(jump, at, memory),
        _ => IndirectTargets::Unknown,
    }
}

/// [`indirect_targets`] of the indirect jump at `jump_at` in the function `function`
/// (starting at `start`), decoding it first: for tests and one-off questions.
pub fn indirect_targets_in(
    function: &[u8],
    start: u64,
    jump_at: u64,
    memory: Option<&TableMemory<'_>>,
) -> IndirectTargets {
    let Ok(instrs) = super::decode::decode_instructions(function, start) else { return IndirectTargets::Unknown };
    let Some(at) = instrs.iter().position(|i| i.ip() == jump_at) else { return IndirectTargets::Unknown };
    indirect_targets(&instrs, at, &branch_targets(&instrs), memory)
}

/// The direct branch targets of a function's instructions.
pub fn branch_targets(instrs: &[Instruction]) -> BTreeSet<u64> {
    instrs
        .iter()
        .filter_map(|i| match flow_of(i) {
            Flow::Jump { target } | Flow::CondJump { target } => Some(target),
            _ => None,
        })
        .collect()
}

/// The straight-line code that ends at an indirect jump: entered only at its first
/// instruction, so a register's last writer in it is the writer of the value the jump uses.
struct Block<'i> {
    instrs: &'i [Instruction],
    /// Index of the block's first instruction.
    first: usize,
    /// Whether the block starts at the function's entry and nothing else leads there: a
    /// register it does not write still holds what the caller passed.
    from_caller: bool,
}

impl<'i> Block<'i> {
    fn before(instrs: &'i [Instruction], at: usize, branch_targets: &BTreeSet<u64>) -> Self {
        let mut first = at;
        while first > 0 && at - first < REACH {
            let prev = &instrs[first - 1];
            // A transfer ends the block before; a branch target starts this one.
            if !matches!(flow_of(prev), Flow::Sequential) || branch_targets.contains(&instrs[first].ip()) {
                break;
            }
            first -= 1;
        }
        let from_caller = first == 0 && !branch_targets.contains(&instrs[0].ip());
        Block { instrs, first, from_caller }
    }

    /// The index of the last instruction before `before` that writes `reg` (any width).
    fn writer_of(&self, reg: Register, before: usize) -> Option<usize> {
        let mut factory = InstructionInfoFactory::new();
        (self.first..before).rev().find(|&i| writes(&mut factory, &self.instrs[i], reg))
    }

    /// The table address a register holds before `before`: `lea T(%rip),%reg`.
    fn table_base(&self, reg: Register, before: usize) -> Option<u64> {
        let lea = &self.instrs[self.writer_of(reg, before)?];
        (lea.mnemonic() == Mnemonic::Lea && lea.memory_base() == Register::RIP && lea.memory_index() == Register::None)
            .then(|| lea.memory_displacement64())
    }

    /// `jmp *%reg`: what loaded `reg`.
    fn targets_of_register(&self, reg: Register, at: usize, memory: Option<&TableMemory<'_>>) -> IndirectTargets {
        let (mut reg, mut w) = (reg, at);
        let writer = loop {
            let Some(found) = self.writer_of(reg, w) else {
                // Set before the block: a caller's argument (a callback) or a value kept
                // across the epilogue that ends in this jump.
                return if self.from_caller || self.tears_down_frame(at) {
                    IndirectTargets::TailCall
                } else {
                    IndirectTargets::Unknown
                };
            };
            w = found;
            let writer = &self.instrs[w];
            // mov %other,%reg: follow the copy.
            if writer.mnemonic() == Mnemonic::Mov && writer.op1_kind() == OpKind::Register {
                reg = writer.op1_register().full_register();
                continue;
            }
            break writer;
        };
        match writer.mnemonic() {
            // add %base,%entry (or add %entry,%base): base + sign-extended 32-bit entry.
            Mnemonic::Add if writer.op1_kind() == OpKind::Register => {
                self.relative_table(w, [reg, writer.op1_register().full_register()], memory)
            }
            // lea (%base,%entry),%reg: the same sum, written by hand-made assembly.
            Mnemonic::Lea
                if writer.memory_index() != Register::None
                    && writer.memory_index_scale() == 1
                    && writer.memory_displacement64() == 0 =>
            {
                self.relative_table(w, [writer.memory_base(), writer.memory_index()], memory)
            }
            Mnemonic::Mov if writer.op1_kind() == OpKind::Memory => self.through_memory_operand(writer, w, memory),
            // glibc's PTR_DEMANGLE: a pointer kept mangled with the thread's pointer guard.
            Mnemonic::Xor if writer.op1_kind() == OpKind::Memory && writer.memory_segment() == Register::FS => {
                IndirectTargets::TailCall
            }
            _ => IndirectTargets::Unknown,
        }
    }

    /// A code address loaded from the memory operand of `instr` (`instrs[at]`, the jump
    /// itself or the `mov` that loaded its register): an indexed operand is a table of
    /// absolute addresses, an unindexed one a pointer.
    fn through_memory_operand(
        &self,
        instr: &Instruction,
        at: usize,
        memory: Option<&TableMemory<'_>>,
    ) -> IndirectTargets {
        if instr.memory_index() == Register::None {
            return IndirectTargets::TailCall;
        }
        if instr.memory_index_scale() != 8 {
            return IndirectTargets::Unknown;
        }
        let table = match instr.memory_base() {
            Register::None => Some(instr.memory_displacement64()),
            base => self.table_base(base.full_register(), at).map(|t| t.wrapping_add(instr.memory_displacement64())),
        };
        match (table, memory) {
            (Some(table), Some(memory)) => read_table(memory, table, 8),
            _ => IndirectTargets::Unknown,
        }
    }

    /// `base + entry`, written at `instrs[sum]` from the two registers `parts`: one holds
    /// the table's address (`lea T(%rip)`), the other an entry loaded from it
    /// (`movslq (%base,%index,4)`).
    fn relative_table(&self, sum: usize, parts: [Register; 2], memory: Option<&TableMemory<'_>>) -> IndirectTargets {
        for (base, entry) in [(parts[0], parts[1]), (parts[1], parts[0])] {
            let tables = match self.table_base(base, sum) {
                Some(table) => vec![table],
                None => self.tables_kept_in(base),
            };
            if tables.is_empty() {
                continue;
            }
            let Some(load) = self.writer_of(entry, sum) else { continue };
            let load = &self.instrs[load];
            let loads_entry = load.mnemonic() == Mnemonic::Movsxd
                && load.op1_kind() == OpKind::Memory
                && load.memory_base().full_register() == base
                && load.memory_index() != Register::None
                && load.memory_index_scale() == 4
                && load.memory_displacement64() == 0;
            if loads_entry {
                let Some(memory) = memory else { return IndirectTargets::Unknown };
                let mut all = Vec::new();
                for table in tables {
                    match read_table(memory, table, 4) {
                        IndirectTargets::Table(targets) => all.extend(targets),
                        _ => return IndirectTargets::Unknown,
                    }
                }
                return IndirectTargets::Table(all);
            }
        }
        IndirectTargets::Unknown
    }

    /// The tables a register holds when the compiler keeps a table's address in it across
    /// blocks (loaded once before a loop): every instruction of the function that writes
    /// it is a `lea T(%rip)` or the epilogue's `pop`. Empty when some other write exists.
    fn tables_kept_in(&self, reg: Register) -> Vec<u64> {
        let mut factory = InstructionInfoFactory::new();
        let mut tables = Vec::new();
        for instr in self.instrs {
            if !writes(&mut factory, instr, reg) {
                continue;
            }
            match instr.mnemonic() {
                Mnemonic::Lea if instr.memory_base() == Register::RIP && instr.memory_index() == Register::None => {
                    tables.push(instr.memory_displacement64())
                }
                Mnemonic::Pop => {}
                _ => return Vec::new(),
            }
        }
        tables.sort_unstable();
        tables.dedup();
        tables
    }

    /// Whether the straight-line code before `at` pops or releases the stack frame.
    fn tears_down_frame(&self, at: usize) -> bool {
        self.instrs[self.first..at].iter().any(|i| match i.mnemonic() {
            Mnemonic::Pop | Mnemonic::Leave => true,
            Mnemonic::Add | Mnemonic::Lea => {
                i.op0_kind() == OpKind::Register
                    && i.op0_register() == Register::RSP
                    && i.op1_kind() != OpKind::Register
            }
            _ => false,
        })
    }
}

/// Whether `instr` writes `reg` (any part of it).
fn writes(factory: &mut InstructionInfoFactory, instr: &Instruction, reg: Register) -> bool {
    factory.info(instr).used_registers().iter().any(|used| {
        used.register().full_register() == reg
            && matches!(
                used.access(),
                OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
            )
    })
}

/// Reads a table of `width`-byte entries at `table` (4: offsets from the table, 8: absolute
/// addresses) until an entry points outside the module's code. Entries are read
/// [`CHUNK`] at a time (one read each, a module has thousands of tables), one by one where
/// a chunk runs past the end of readable memory.
fn read_table(memory: &TableMemory<'_>, table: u64, width: usize) -> IndirectTargets {
    let mut targets = Vec::new();
    let mut chunk = [0u8; CHUNK * 8];
    'chunks: for first in (0..MAX_TABLE_ENTRIES).step_by(CHUNK) {
        let at = table.wrapping_add((first * width) as u64);
        let bytes = &mut chunk[..CHUNK * width];
        let whole = (memory.read)(at, bytes);
        for i in 0..CHUNK {
            let entry = &mut bytes[i * width..(i + 1) * width];
            if !whole && !(memory.read)(at.wrapping_add((i * width) as u64), entry) {
                break 'chunks;
            }
            let target = match width {
                4 => table.wrapping_add(i32::from_le_bytes(entry[..4].try_into().expect("4 bytes")) as i64 as u64),
                _ => u64::from_le_bytes(entry[..8].try_into().expect("8 bytes")),
            };
            if !memory.code.contains(&target) {
                break 'chunks;
            }
            targets.push(target);
        }
    }
    if targets.is_empty() {
        IndirectTargets::Unknown
    } else {
        IndirectTargets::Table(targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(code: &[u8], jump_at: u64) -> IndirectTargets {
        indirect_targets_in(code, 0x1000, jump_at, None)
    }

    /// The targets of the jump at `jump_at` of `code` (at 0x1000, the module's code up to
    /// 0x1100), the bytes at `table_at` being `table`.
    fn targets_with_table(code: &[u8], jump_at: u64, table_at: u64, table: &[u8]) -> IndirectTargets {
        let read = |addr: u64, buf: &mut [u8]| {
            let at = addr.wrapping_sub(table_at) as usize;
            table.get(at..at + buf.len()).map(|b| buf.copy_from_slice(b)).is_some()
        };
        let memory = TableMemory { code: 0x1000..0x1100, read: &read };
        indirect_targets_in(code, 0x1000, jump_at, Some(&memory))
    }

    /// 32-bit table entries' bytes.
    fn offsets(entries: &[i32]) -> Vec<u8> {
        entries.iter().flat_map(|e| e.to_le_bytes()).collect()
    }

    #[test]
    fn a_pointer_loaded_from_a_structure_is_a_tail_call() {
        // mov (%rdi),%rax ; mov %rdx,%rdi ; jmp *%rax
        assert_eq!(targets(&[0x48, 0x8b, 0x07, 0x48, 0x89, 0xd7, 0xff, 0xe0], 0x1006), IndirectTargets::TailCall);
        // jmpq *0x8(%rax)
        assert_eq!(targets(&[0xff, 0x60, 0x08], 0x1000), IndirectTargets::TailCall);
    }

    #[test]
    fn a_demangled_pointer_or_a_jump_after_the_epilogue_is_a_tail_call() {
        // ror $0x11,%rax ; xor %fs:0x30,%rax ; pop %rbx ; jmp *%rax
        let demangled = [0x48, 0xc1, 0xc8, 0x11, 0x64, 0x48, 0x33, 0x04, 0x25, 0x30, 0, 0, 0, 0x5b, 0xff, 0xe0];
        assert_eq!(targets(&demangled, 0x100e), IndirectTargets::TailCall);
        // add $0x38,%rsp ; pop %rbx ; jmp *%rax  (rax set before the block)
        assert_eq!(targets(&[0x48, 0x83, 0xc4, 0x38, 0x5b, 0xff, 0xe0], 0x1005), IndirectTargets::TailCall);
    }

    #[test]
    fn a_copied_pointer_and_a_callers_argument_are_tail_calls() {
        // mov %rbp,%rax ; pop %rbx ; jmp *%rax : a copy, set before the epilogue
        assert_eq!(targets(&[0x90, 0x48, 0x89, 0xe8, 0x5b, 0xff, 0xe0], 0x1005), IndirectTargets::TailCall);
        // At the entry: mov %rsi,%rcx ; xor %eax,%eax ; jmp *%rcx (a callback argument)
        assert_eq!(targets(&[0x48, 0x89, 0xf1, 0x31, 0xc0, 0xff, 0xe1], 0x1005), IndirectTargets::TailCall);
        // The same after a branch target: rsi may hold anything there.
        // 0x1000: jne 0x1002 ; 0x1002: mov %rsi,%rcx ; jmp *%rcx
        assert_eq!(targets(&[0x75, 0x00, 0x48, 0x89, 0xf1, 0xff, 0xe1], 0x1005), IndirectTargets::Unknown);
    }

    #[test]
    fn a_table_base_loaded_once_before_a_loop_is_found_in_the_function() {
        // 0x1000: lea 0x100(%rip),%r14 (0x1107) ; 0x1007: jne 0x1007 (a block boundary) ;
        // 0x1009: movslq (%r14,%rax,4),%rax ; 0x100d: add %r14,%rax ; 0x1010: jmp *%rax ; pop %r14
        let code = [
            0x4c, 0x8d, 0x35, 0x00, 0x01, 0x00, 0x00, 0x75, 0xfe, 0x49, 0x63, 0x04, 0x86, 0x4c, 0x01, 0xf0, 0xff, 0xe0,
            0x41, 0x5e,
        ];
        let table = offsets(&[-0x107, -0x0fe, i32::MIN]);
        assert_eq!(targets_with_table(&code, 0x1010, 0x1107, &table), IndirectTargets::Table(vec![0x1000, 0x1009]));
        // Another write of %r14 (mov %rdi,%r14) makes its value unknown.
        let mut other = code.to_vec();
        other.extend([0x49, 0x89, 0xfe]);
        assert_eq!(targets_with_table(&other, 0x1010, 0x1107, &table), IndirectTargets::Unknown);
    }

    #[test]
    fn a_computed_target_or_an_unread_table_is_unknown() {
        // shr $0x1f,%rax ; jmp *%rax
        assert_eq!(targets(&[0x48, 0xc1, 0xe8, 0x1f, 0xff, 0xe0], 0x1004), IndirectTargets::Unknown);
        // jmp *%rax with nothing before it in its block and no frame torn down:
        // 0x1000: test %eax,%eax ; 0x1002: jne 0x1004 ; 0x1004: jmp *%rax
        assert_eq!(targets(&[0x85, 0xc0, 0x75, 0x00, 0xff, 0xe0], 0x1004), IndirectTargets::Unknown);
        // notrack jmpq *0x402000(,%rax,8) with no memory to read the table from
        assert_eq!(targets(&[0x3e, 0xff, 0x24, 0xc5, 0, 0x20, 0x40, 0], 0x1000), IndirectTargets::Unknown);
    }

    #[test]
    fn a_writer_before_a_branch_target_does_not_count() {
        // 0x1000: mov (%rdi),%rax ; 0x1003: jmp *%rax is entered by the jne at 0x1005 too
        // 0x1003: jmp *%rax ; 0x1005: jne 0x1003
        let code = [0x48, 0x8b, 0x07, 0xff, 0xe0, 0x75, 0xfc];
        assert_eq!(targets(&code, 0x1003), IndirectTargets::Unknown);
    }

    #[test]
    fn an_absolute_table_is_read_until_an_entry_leaves_the_code() {
        // jmpq *0x2000(,%rax,8)
        let code = [0xff, 0x24, 0xc5, 0x00, 0x20, 0x00, 0x00];
        let table: Vec<u8> = [0x1000u64, 0x1003, 0x1000, 0x9999].iter().flat_map(|e| e.to_le_bytes()).collect();
        assert_eq!(
            targets_with_table(&code, 0x1000, 0x2000, &table),
            IndirectTargets::Table(vec![0x1000, 0x1003, 0x1000])
        );
    }

    #[test]
    fn a_relative_table_summed_by_lea_is_read() {
        // lea 0x100(%rip),%r11 (table at 0x1107) ; movslq (%r11,%rcx,4),%rcx ;
        // lea (%r11,%rcx,1),%rcx ; notrack jmp *%rcx
        let code = [
            0x4c, 0x8d, 0x1d, 0x00, 0x01, 0x00, 0x00, 0x49, 0x63, 0x0c, 0x8b, 0x49, 0x8d, 0x0c, 0x0b, 0x3e, 0xff, 0xe1,
        ];
        let table = offsets(&[-0x107, -0x0f8, i32::MAX]);
        assert_eq!(targets_with_table(&code, 0x100f, 0x1107, &table), IndirectTargets::Table(vec![0x1000, 0x100f]));
    }
}
