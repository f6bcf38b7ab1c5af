//! The fixed encodings dynprobe writes into code.

/// `int3`, the breakpoint instruction.
pub const INT3: u8 = 0xCC;
/// The 5-byte NOP `nopl 0x0(%rax,%rax,1)` that gcc's `-mnop-mcount` emits.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// Length of `jmp rel32` and `call rel32`.
pub const JMP_REL32_LEN: usize = 5;

/// True when a rel32 instruction of length 5 at `from` can reach `to`.
pub fn rel32_reaches(from: u64, to: u64) -> bool {
    todo!()
}

/// `jmp rel32` at address `from` to `to`, or `None` when out of ±2 GiB range.
pub fn jmp_rel32(from: u64, to: u64) -> Option<[u8; 5]> {
    todo!()
}

/// `call rel32` at address `from` to `to`, or `None` when out of ±2 GiB range.
pub fn call_rel32(from: u64, to: u64) -> Option<[u8; 5]> {
    todo!()
}
