//! Executable memory near a target, for out-of-line slots and detour buffers.
//!
//! A `jmp rel32` and a RIP-relative operand reach ±2 GiB, so slots are mapped within that
//! distance of the code they serve. Fresh memory is filled with `int3`; slots are written
//! with [`crate::memory::write_verified`] expecting those `int3` bytes.

use crate::TextError;

/// A run of executable memory handed out by the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecSlot {
    /// First byte.
    pub addr: u64,
    /// Size in bytes (at least what was asked).
    pub size: usize,
}

/// Hands out `size` bytes of executable memory (filled with `int3`) whose every byte is
/// within ±2 GiB of every byte of `target .. target + 4096`.
pub fn alloc_near(target: u64, size: usize) -> Result<ExecSlot, TextError> {
    todo!()
}

/// Returns a slot to the pool, refilled with `int3`. The caller guarantees no thread can be
/// executing it any more (after [`crate::stop::synchronize`]).
pub fn free(slot: ExecSlot) {
    todo!()
}

/// True when `addr` lies in memory this pool mapped (used to refuse probes on slots).
pub fn contains(addr: u64) -> bool {
    todo!()
}
