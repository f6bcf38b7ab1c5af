//! The fixed encodings dynprobe writes into code.

/// `int3`, the breakpoint instruction.
pub const INT3: u8 = 0xCC;
/// The 5-byte NOP `nopl 0x0(%rax,%rax,1)` that gcc's `-mnop-mcount` emits.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// Length of `jmp rel32` and `call rel32`.
pub const JMP_REL32_LEN: usize = 5;

/// True when a rel32 instruction of length 5 at `from` can reach `to`.
pub fn rel32_reaches(from: u64, to: u64) -> bool {
    rel32(from, to).is_some()
}

/// `jmp rel32` at address `from` to `to`, or `None` when out of ±2 GiB range.
pub fn jmp_rel32(from: u64, to: u64) -> Option<[u8; 5]> {
    with_rel32(0xE9, from, to)
}

/// `call rel32` at address `from` to `to`, or `None` when out of ±2 GiB range.
pub fn call_rel32(from: u64, to: u64) -> Option<[u8; 5]> {
    with_rel32(0xE8, from, to)
}

/// Length of `jmp rel8`.
pub const JMP_REL8_LEN: usize = 2;

/// `jmp rel8` at address `from` to `to`, or `None` when out of -128..=127 bytes of the
/// next instruction.
pub fn jmp_rel8(from: u64, to: u64) -> Option<[u8; 2]> {
    let next = from.wrapping_add(JMP_REL8_LEN as u64);
    let disp = i8::try_from(to.wrapping_sub(next) as i64).ok()?;
    Some([0xEB, disp as u8])
}

/// Length of [`jmp_abs`]: `jmp *0(%rip)` (6 bytes) and the 8-byte target after it.
pub const JMP_ABS_LEN: usize = 14;

/// `jmp *0(%rip); .quad to`: reaches any address, at the cost of 14 bytes and an indirect
/// branch. Used where `to` is beyond the ±2 GiB of a rel32.
pub fn jmp_abs(to: u64) -> [u8; JMP_ABS_LEN] {
    let mut code = [0; JMP_ABS_LEN];
    code[..6].copy_from_slice(&[0xFF, 0x25, 0, 0, 0, 0]);
    code[6..].copy_from_slice(&to.to_le_bytes());
    code
}

/// The jump from `from` to `to` in its shortest form of the two: rel32 when in reach,
/// otherwise [`jmp_abs`].
pub fn jmp_any(from: u64, to: u64) -> Vec<u8> {
    match jmp_rel32(from, to) {
        Some(code) => code.to_vec(),
        None => jmp_abs(to).to_vec(),
    }
}

/// The displacement of a 5-byte rel32 instruction at `from` to `to`, when it fits.
fn rel32(from: u64, to: u64) -> Option<i32> {
    let next = from.wrapping_add(JMP_REL32_LEN as u64);
    i32::try_from(to.wrapping_sub(next) as i64).ok()
}

fn with_rel32(opcode: u8, from: u64, to: u64) -> Option<[u8; 5]> {
    let [a, b, c, d] = rel32(from, to)?.to_le_bytes();
    Some([opcode, a, b, c, d])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_jump_reaches_128_bytes_back_and_127_forward() {
        assert_eq!(jmp_rel8(0x1000, 0x0ff8), Some([0xEB, 0xF6]));
        assert_eq!(jmp_rel8(0x1000, 0x1002 - 128), Some([0xEB, 0x80]));
        assert_eq!(jmp_rel8(0x1000, 0x1002 - 129), None);
        assert_eq!(jmp_rel8(0x1000, 0x1002 + 127), Some([0xEB, 0x7F]));
        assert_eq!(jmp_rel8(0x1000, 0x1002 + 128), None);
    }

    #[test]
    fn rel32_encodings() {
        // e9 fb ff ff ff: jmp to itself
        assert_eq!(jmp_rel32(0x1000, 0x1000), Some([0xe9, 0xfb, 0xff, 0xff, 0xff]));
        // e8 0b 00 00 00: call 0x1010 from 0x1000
        assert_eq!(call_rel32(0x1000, 0x1010), Some([0xe8, 0x0b, 0, 0, 0]));
        // farthest forward: next + i32::MAX
        let far = 0x1005 + i32::MAX as u64;
        assert_eq!(jmp_rel32(0x1000, far), Some([0xe9, 0xff, 0xff, 0xff, 0x7f]));
        assert_eq!(jmp_rel32(0x1000, far + 1), None);
        // farthest backward: next + i32::MIN
        let back = 0x8000_1005 - 0x8000_0000;
        assert_eq!(call_rel32(0x8000_1000, back), Some([0xe8, 0, 0, 0, 0x80]));
        assert_eq!(call_rel32(0x8000_1000, back - 1), None);
    }

    #[test]
    fn reach_is_plus_minus_2gib() {
        assert!(rel32_reaches(0x7fff_0000_0000, 0x7fff_7000_0000));
        assert!(!rel32_reaches(0x7fff_0000_0000, 0x40_0000));
    }

    #[test]
    fn absolute_jump() {
        // ff 25 00 00 00 00: jmp *0(%rip); then the target, little-endian
        assert_eq!(
            jmp_abs(0x1122_3344_5566_7788),
            [0xff, 0x25, 0, 0, 0, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(jmp_any(0x1000, 0x2000), jmp_rel32(0x1000, 0x2000).unwrap().to_vec());
        assert_eq!(jmp_any(0x1000, 0x7fff_0000_0000), jmp_abs(0x7fff_0000_0000).to_vec());
    }

    #[test]
    fn fixed_encodings_decode_as_documented() {
        use crate::x86_64::decode_one;
        assert_eq!(decode_one(&NOP5, 0).unwrap().text, "nopl (%rax,%rax)");
        assert_eq!(decode_one(&[INT3], 0).unwrap().text, "int3");
        assert_eq!(decode_one(&jmp_abs(0x1234), 0x1000).unwrap().text, "jmpq *(%rip)");
    }
}
