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

use crate::memory;
use crate::sync_core::try_sync_core;
use crate::trap::{self, TrapContext};
use crate::TextError;
use std::sync::Mutex;

/// The `int3` opcode.
const INT3: u8 = 0xCC;

/// Serializes pokes, like the kernel's `text_mutex`: two pokes interleaving their steps on
/// overlapping bytes would each verify the other's half-written state.
static TEXT_MUTEX: Mutex<()> = Mutex::new(());

/// Replaces `expected` at `addr` with `new` (same length) while other threads may be
/// executing it. A thread that hits the transient `int3` continues at `resume_ip` — an
/// out-of-line copy of the old or new code, or `addr + len` where skipping is equivalent.
/// When `expected[0]` is already `int3` (a site that has a trap owner), step 2 is skipped
/// and the owner keeps handling hits until step 4.
///
/// On error nothing is left changed: bytes already written are put back (in the reverse
/// order, under the same `int3` protection). Should even that fail, the transient `int3`
/// stays registered, so a thread reaching it is still sent to `resume_ip`.
///
/// # Panics
///
/// If `expected` and `new` differ in length.
pub fn poke(addr: u64, expected: &[u8], new: &[u8], resume_ip: u64) -> Result<(), TextError> {
    assert_eq!(expected.len(), new.len(), "poke: expected and new differ in length");
    let _text = TEXT_MUTEX.lock().unwrap_or_else(|e| e.into_inner());
    memory::verify(addr, expected)?;
    if expected == new {
        return Ok(());
    }
    // A single byte is written atomically, so a change confined to the head needs no
    // protection: a thread fetches either the old or the new instruction.
    if expected[1..] == new[1..] {
        memory::write_verified(addr, &expected[..1], &new[..1])?;
        return try_sync_core();
    }

    let own_int3 = expected[0] != INT3;
    if own_int3 {
        trap::register_site(addr, resume_at, resume_ip as usize)?;
        let armed = memory::write_verified(addr, &expected[..1], &[INT3]).and_then(|()| try_sync_core());
        if let Err(e) = armed {
            restore_head(addr, expected[0], true);
            return Err(e);
        }
    }

    // From here on the head is an int3 (ours or the owner's): no thread can start executing
    // the bytes behind it, so the tail may change freely.
    let tail = addr + 1;
    if let Err(e) = memory::write_verified(tail, &expected[1..], &new[1..]).and_then(|()| try_sync_core()) {
        // The tail write either happened entirely or not at all; put the old one back if
        // it did (a no-op verify mismatch otherwise).
        let _ = memory::write_verified(tail, &new[1..], &expected[1..]);
        let _ = try_sync_core();
        restore_head(addr, expected[0], own_int3);
        return Err(e);
    }

    if let Err(e) = memory::write_verified(addr, &[INT3], &new[..1]).and_then(|()| try_sync_core()) {
        let _ = memory::write_verified(addr, &new[..1], &[INT3]);
        let _ = memory::write_verified(tail, &new[1..], &expected[1..]);
        let _ = try_sync_core();
        restore_head(addr, expected[0], own_int3);
        return Err(e);
    }

    if own_int3 {
        // A thread that trapped on our int3 but was not yet dispatched is rewound by the
        // dispatcher and re-executes the new instruction.
        trap::unregister_site(addr);
    }
    Ok(())
}

/// The transient site's handler: continue at `resume_ip` (the site's data word).
fn resume_at(resume_ip: usize, ctx: &mut TrapContext<'_>) {
    ctx.set_ip(resume_ip as u64);
}

/// Undoes step 2: puts the original head back over our int3 and ends the transient site.
/// When the head cannot be restored the site stays registered, so the int3 left behind
/// still has an owner that sends threads to `resume_ip`.
fn restore_head(addr: u64, old_head: u8, own_int3: bool) {
    if !own_int3 {
        return;
    }
    // The int3 may not have been written at all (step 2 failed before writing): then the old
    // head is already in place.
    let restored = memory::verify(addr, &[old_head])
        .or_else(|_| memory::write_verified(addr, &[INT3], &[old_head]).and_then(|()| try_sync_core()));
    if restored.is_ok() {
        trap::unregister_site(addr);
    }
}
