//! The scratch pages the tracer maps into the target: the return trampoline and one
//! out-of-line slot per probed instruction.
//!
//! ```text
//! base + 0      int3              the return trampoline: hijacked returns land here
//! base + 1..16  int3 ...          (filler: a stray jump traps instead of running garbage)
//! base + 16     slot 0            relocated instruction; jmp back to the next original one
//! base + 80     slot 1
//! ...           int3 ...
//! ```
//!
//! The pages stay mapped after detaching: a thread may be inside a slot at that moment, and
//! a return address the tracer could not restore (copied elsewhere by the program) may still
//! point at the trampoline.

use dynprobe_arch::native::{rel32_reaches, INT3};

/// Bytes reserved for each slot: a relocated instruction (at most a `call` rewritten as a
/// push and a jump, about 25 bytes) plus the jump back (14 bytes when absolute).
pub(crate) const SLOT_SIZE: u64 = 64;

/// Where the first slot starts.
const SLOTS_START: u64 = 16;

const PAGE: u64 = 4096;

/// The mapped scratch area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scratch {
    /// First byte.
    pub base: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
}

impl Scratch {
    /// The length needed for `slots` slots, in whole pages.
    pub fn len_for(slots: usize) -> u64 {
        (SLOTS_START + slots as u64 * SLOT_SIZE).div_ceil(PAGE) * PAGE
    }

    /// Address of the return trampoline's `int3`.
    pub fn trampoline(&self) -> u64 {
        self.base
    }

    /// Address of slot `index`.
    pub fn slot(&self, index: usize) -> u64 {
        self.base + SLOTS_START + index as u64 * SLOT_SIZE
    }

    /// The area's whole contents, given each slot's code in order. Panics if a slot's code
    /// exceeds [`SLOT_SIZE`]; callers check with [`fits`] first.
    pub fn image(&self, slots: &[Vec<u8>]) -> Vec<u8> {
        let mut image = vec![INT3; self.len as usize];
        for (i, code) in slots.iter().enumerate() {
            let at = (self.slot(i) - self.base) as usize;
            image[at..at + code.len()].copy_from_slice(code);
        }
        image
    }
}

/// Whether a slot's code fits its reserved space.
pub(crate) fn fits(code: &[u8]) -> bool {
    code.len() as u64 <= SLOT_SIZE
}

/// Addresses to ask `mmap` for (with `MAP_FIXED_NOREPLACE`), so that the area lands
/// within ±2 GiB of every probed instruction in `lo..hi` and relocated RIP-relative operands
/// still reach their targets: below `lo` first (the gap under a non-PIE executable is
/// usually free), then above `hi`, stepping outwards by 16 MiB, page-aligned.
pub(crate) fn hints(lo: u64, hi: u64, len: u64) -> Vec<u64> {
    const STEP: u64 = 16 << 20;
    let mut out = Vec::new();
    for i in 1..=64u64 {
        if let Some(below) = lo.checked_sub(i * STEP + len) {
            out.push(below & !(PAGE - 1));
        }
        out.push((hi + i * STEP).next_multiple_of(PAGE));
    }
    out.retain(|&a| a >= 0x10000 && rel32_reaches(a, lo) && rel32_reaches(a + len, hi));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_puts_the_trampoline_first_and_slots_after() {
        assert_eq!(Scratch::len_for(1), 4096);
        assert_eq!(Scratch::len_for(63), 4096);
        assert_eq!(Scratch::len_for(64), 8192);
        let s = Scratch { base: 0x10000, len: 4096 };
        assert_eq!(s.trampoline(), 0x10000);
        assert_eq!(s.slot(0), 0x10010);
        assert_eq!(s.slot(2), 0x10090);
        let image = s.image(&[vec![0x90, 0xc3], vec![0x55]]);
        assert_eq!(image.len(), 4096);
        assert_eq!(image[0], INT3);
        assert_eq!(&image[0x10..0x13], &[0x90, 0xc3, INT3]);
        assert_eq!(image[0x50], 0x55);
    }

    #[test]
    fn hints_stay_within_reach_and_skip_the_null_page() {
        let h = hints(0x401000, 0x4c0000, 4096);
        assert!(!h.is_empty());
        assert!(h.iter().all(|&a| a >= 0x10000 && a % 4096 == 0));
        assert!(h.iter().all(|&a| rel32_reaches(a, 0x401000) && rel32_reaches(a + 4096, 0x4c0000)));
        // High addresses too (a PIE or a library).
        let h = hints(0x7f00_0000_0000, 0x7f00_0010_0000, 8192);
        assert_eq!(h.len(), 128);
    }
}
