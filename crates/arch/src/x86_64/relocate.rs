//! Moving instructions to a new address.

use std::fmt;

/// Why a run of instructions could not be relocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelocError {
    /// An instruction in the run may not run out of line.
    Refused(super::Refusal),
    /// The bytes did not decode.
    Decode(super::DecodeError),
    /// A RIP-relative operand or branch target is out of ±2 GiB reach from the new address.
    OutOfRange {
        /// Address of the instruction whose target cannot be reached.
        ip: u64,
        /// The new address it was to be moved to.
        new_ip: u64,
    },
    /// Any other failure of the encoder, with its message.
    Encoder(String),
}

impl fmt::Display for RelocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}

impl std::error::Error for RelocError {}

/// A run of instructions re-encoded for a new address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relocated {
    /// The new code, to be placed at the new address.
    pub code: Vec<u8>,
    /// For each original instruction, in order: (its offset in the original run, its offset in
    /// `code`). This is the map that moves a thread stopped inside the original run to the
    /// matching place of the copy.
    pub offsets: Vec<(u32, u32)>,
}

/// Re-encodes the instructions `bytes` (originally at `old_ip`) to run at `new_ip` with the
/// same effect: RIP-relative operands and relative branches keep their absolute targets,
/// short branches are widened, and every `call` (direct or indirect) becomes
/// "push the *original* return address; jmp target" so the callee returns into the original
/// code, not into the copy. No general register or flag is clobbered by the rewrite.
pub fn relocate(bytes: &[u8], old_ip: u64, new_ip: u64) -> Result<Relocated, RelocError> {
    todo!()
}

/// An out-of-line slot for a boosted probe: the relocated instruction(s) `bytes` (originally
/// at `old_ip`) followed by a jump to `resume_ip` (normally `old_ip + bytes.len()`), encoded
/// to sit at `slot_ip`. The jump back is a `jmp rel32` when in reach, otherwise an absolute
/// `jmp [rip+0]; .quad resume_ip`.
pub fn build_slot(bytes: &[u8], old_ip: u64, slot_ip: u64, resume_ip: u64) -> Result<Vec<u8>, RelocError> {
    todo!()
}

/// An out-of-line slot that ends every path out of the instruction in an `int3`, so that a
/// post-handler can run after the instruction completed, whichever way it left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostSlot {
    /// The slot's code.
    pub code: Vec<u8>,
    /// For each `int3` in `code`: (its offset in the slot, the original address execution
    /// continues at after the post-handler ran).
    pub exits: Vec<(u32, u64)>,
}

/// Builds a [`PostSlot`] for the single instruction at the start of `bytes` (at `old_ip`),
/// placed at `slot_ip`. The fall-through path, and for a direct jmp/jcc/call/loop also the
/// taken path, each end in their own `int3`. Indirect branches and `ret` have no statically
/// known successor and are refused with a reason.
pub fn build_post_slot(bytes: &[u8], old_ip: u64, slot_ip: u64) -> Result<PostSlot, RelocError> {
    todo!()
}
