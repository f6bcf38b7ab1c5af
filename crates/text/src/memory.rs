//! Verify-then-modify reads and writes of code in this process.
//!
//! Reads go through `process_vm_readv` on our own pid, so an unmapped address is an error
//! (`Unreadable`), never a `SIGSEGV`. Writes go through `/proc/self/mem`, which writes into
//! read-only executable mappings the way `ptrace(POKETEXT)` does, without ever making a page
//! writable and executable at once and without racing another thread's `mprotect`.

use crate::TextError;

/// Reads `buf.len()` bytes at `addr`.
pub fn read(addr: u64, buf: &mut [u8]) -> Result<(), TextError> {
    todo!()
}

/// Reads `len` bytes at `addr` into a new vector.
pub fn read_vec(addr: u64, len: usize) -> Result<Vec<u8>, TextError> {
    todo!()
}

/// Checks that the bytes at `addr` are `expected`.
pub fn verify(addr: u64, expected: &[u8]) -> Result<(), TextError> {
    todo!()
}

/// Verify-then-modify in one raw write: checks that `addr` holds `expected`, then writes
/// `new` (same length). No cross-modification protocol: use it for a single byte, or for
/// memory no thread can be executing (a fresh slot). For live multi-byte code use
/// [`crate::poke::poke`].
pub fn write_verified(addr: u64, expected: &[u8], new: &[u8]) -> Result<(), TextError> {
    todo!()
}
