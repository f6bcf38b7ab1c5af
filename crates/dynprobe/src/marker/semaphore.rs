//! USDT semaphores: the `unsigned short` counter (in section `.probes`) that an SDT note
//! may name, which the program reads to skip a probe's argument set-up while nobody
//! listens (`if (PYTHON_FUNCTION_ENTRY_ENABLED()) …` in CPython, `_SDT_HAS_SEMAPHORES`
//! in `sys/sdt.h`). A marker with one fires only while the counter is non-zero, so a tool
//! raises it for as long as its probe is attached and lowers it at detach, as the kernel
//! does for perf and bpftrace through the uprobe's reference counter (`ref_ctr_offset`,
//! `update_ref_ctr` in the kernel's `kernel/events/uprobes.c`): one count per site.
//!
//! In this process the counter is changed atomically (a `lock`-prefixed add), so another
//! tool changing it at the same time (the kernel, for a perf session) loses no count.

use std::sync::atomic::{AtomicU16, Ordering};

/// Raises the semaphore at `addr` (a runtime address) by one. Refused, with the reason,
/// when `addr` is not a 2-byte aligned address of writable memory of this process, or the
/// counter is at its maximum.
pub(crate) fn raise(addr: u64) -> Result<(), String> {
    check(addr)?;
    let counter = counter(addr);
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_add(1))
        .map(drop)
        .map_err(|n| format!("its semaphore at {addr:#x} is at its maximum ({n})"))
}

/// Lowers the semaphore at `addr`, which [`raise`] raised; never below zero (a program
/// that reset it itself keeps its zero).
pub(crate) fn lower(addr: u64) {
    let _ = counter(addr).fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
}

/// The counter at `addr`, checked by [`check`] when it was raised.
fn counter(addr: u64) -> &'static AtomicU16 {
    // SAFETY: `raise` checked that `addr` is aligned and inside a writable mapping of a
    // module that stays loaded while its marker's probes exist (they hold the module's
    // code); the program itself only reads the counter.
    unsafe { &*(addr as *const AtomicU16) }
}

/// Whether the counter can be changed here: aligned for an atomic `u16`, and inside a
/// mapping of `/proc/self/maps` with write permission (writing anywhere else would fault
/// in the program).
fn check(addr: u64) -> Result<(), String> {
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| format!("cannot read /proc/self/maps to check its semaphore at {addr:#x}: {e}"))?;
    check_semaphore(&maps, addr)
}

/// Checks that a marker's semaphore at `addr` can be raised: 2-byte aligned and inside a
/// writable mapping of `maps` (the text of the process's `/proc/PID/maps`). The error
/// says why not, as the end of "marker … cannot fire: …". A tracer writing through
/// `/proc/PID/mem` checks this first: such writes succeed even into read-only memory.
pub fn check_semaphore(maps: &str, addr: u64) -> Result<(), String> {
    if !addr.is_multiple_of(2) {
        return Err(format!("its semaphore at {addr:#x} is not 2-byte aligned"));
    }
    let writable = maps.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { return false };
        let Some((start, end)) = range.split_once('-') else { return false };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) else {
            return false;
        };
        start <= addr && addr + 2 <= end && perms.as_bytes().get(1) == Some(&b'w')
    });
    match writable {
        true => Ok(()),
        false => Err(format!("its semaphore at {addr:#x} is not in writable memory of the process")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_semaphore_is_raised_and_lowered_and_bad_addresses_are_refused() {
        static SEMAPHORE: AtomicU16 = AtomicU16::new(0);
        let addr = SEMAPHORE.as_ptr() as u64;
        raise(addr).unwrap();
        raise(addr).unwrap();
        assert_eq!(SEMAPHORE.load(Ordering::SeqCst), 2);
        lower(addr);
        lower(addr);
        lower(addr);
        assert_eq!(SEMAPHORE.load(Ordering::SeqCst), 0, "never below zero");
        SEMAPHORE.store(u16::MAX, Ordering::SeqCst);
        assert!(raise(addr).unwrap_err().contains("at its maximum"));
        SEMAPHORE.store(0, Ordering::SeqCst);
        assert!(raise(addr + 1).unwrap_err().contains("not 2-byte aligned"));
        // Code is mapped read-only: refused, not written.
        let code = check as *const () as u64 & !1;
        assert!(raise(code).unwrap_err().contains("not in writable memory"));
        assert!(raise(8).unwrap_err().contains("not in writable memory"));
    }
}
