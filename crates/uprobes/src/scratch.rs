//! The out-of-line slots the tracer maps into the target: one area per ±2 GiB region of
//! probed code (an executable at `0x400000` and a library near the top of the address
//! space are terabytes apart, and a slot's relocated RIP-relative operands and its jump back
//! must reach both ways), each holding one slot per probed instruction of its region.
//!
//! ```text
//! base + 0      slot 0            relocated instruction; jmp back to the next original one
//! base + 64     slot 1
//! ...           int3 ...          (filler: a stray jump traps instead of running garbage)
//! ```
//!
//! The return trampoline and the fallback `SIGTRAP` handler live in the area of
//! [`crate::fallback`], which needs no particular address. The areas stay mapped after
//! detaching: a thread may be inside a slot at that moment.

use dynprobe_arch::native::{rel32_reaches, INT3};

/// Bytes reserved for each slot: a relocated instruction (at most a `call` rewritten as a
/// push and a jump, about 25 bytes) plus the jump back (14 bytes when absolute).
pub(crate) const SLOT_SIZE: u64 = 64;

const PAGE: u64 = 4096;

/// The widest span of probed code one area serves: half of rel32's reach, so that an area
/// placed just outside the span still reaches all of it.
pub(crate) const REGION_SPAN: u64 = 1 << 30;

/// A mapped area of slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotArea {
    /// First byte.
    pub base: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
}

impl SlotArea {
    /// The length needed for `slots` slots, in whole pages.
    pub fn len_for(slots: usize) -> u64 {
        (slots as u64 * SLOT_SIZE).div_ceil(PAGE).max(1) * PAGE
    }

    /// Address of slot `index`.
    pub fn slot(&self, index: usize) -> u64 {
        self.base + index as u64 * SLOT_SIZE
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

/// Groups probed instructions (`(start, end)` each, in any order) into regions no wider
/// than [`REGION_SPAN`], each to get its own slot area: the indices of each group, by
/// address.
pub(crate) fn regions(spans: &[(u64, u64)]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| spans[i].0);
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut lo = 0;
    for i in order {
        match groups.last_mut() {
            Some(group) if spans[i].1 - lo <= REGION_SPAN => group.push(i),
            _ => {
                lo = spans[i].0;
                groups.push(vec![i]);
            }
        }
    }
    groups
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
    fn slots_follow_each_other_in_whole_pages() {
        assert_eq!(SlotArea::len_for(1), 4096);
        assert_eq!(SlotArea::len_for(64), 4096);
        assert_eq!(SlotArea::len_for(65), 8192);
        let s = SlotArea { base: 0x10000, len: 4096 };
        assert_eq!(s.slot(0), 0x10000);
        assert_eq!(s.slot(2), 0x10080);
        let image = s.image(&[vec![0x90, 0xc3], vec![0x55]]);
        assert_eq!(image.len(), 4096);
        assert_eq!(&image[0..3], &[0x90, 0xc3, INT3]);
        assert_eq!(image[0x40], 0x55);
    }

    #[test]
    fn an_executable_and_a_library_get_a_region_each() {
        let exe = (0x401000, 0x401005);
        let libc = (0x7f12_3456_7000, 0x7f12_3456_7003);
        let exe2 = (0x402000, 0x402004);
        assert_eq!(regions(&[libc, exe, exe2]), vec![vec![1, 2], vec![0]]);
        assert_eq!(regions(&[exe, (0x401000 + REGION_SPAN + 1, 0x401000 + REGION_SPAN + 3)]), vec![vec![0], vec![1]]);
        assert!(regions(&[]).is_empty());
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
