//! Multi-byte cross-modification of live code: the int3-first protocol (seeds 002, 003).
//!
//! ```text
//!   1. verify old bytes           aa bb cc dd ee
//!   2. write int3 on the head     cc bb cc dd ee   sync_core
//!   3. write the tail             cc 22 33 44 55   sync_core
//!   4. write the head             11 22 33 44 55   sync_core
//! ```
//! A thread that reaches the head between steps 2 and 4 traps and is sent to `resume_ip`,
//! so no thread ever runs a half-written instruction.

use crate::TextError;

/// Replaces `expected` at `addr` with `new` (same length) while other threads may be
/// executing it. A thread that hits the transient `int3` continues at `resume_ip` — an
/// out-of-line copy of the old or new code, or `addr + len` where skipping is equivalent.
/// When `expected[0]` is already `int3` (a site that has a trap owner), step 2 is skipped
/// and the owner keeps handling hits until step 4.
pub fn poke(addr: u64, expected: &[u8], new: &[u8], resume_ip: u64) -> Result<(), TextError> {
    todo!()
}
