//! Core serialization: the process-local "sync all CPUs" step between cross-modification
//! steps, by `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`.

use crate::stop;
use crate::TextError;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE` from `<linux/membarrier.h>`.
const CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 5;
/// `MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE` from `<linux/membarrier.h>`.
const CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 6;

/// How long the fallback waits for the other threads to answer the stop signal.
const FALLBACK_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Not yet known which way this kernel serializes.
const UNKNOWN: u8 = 0;
/// Registered for the membarrier command.
const MEMBARRIER: u8 = 1;
/// The kernel lacks the command: use a stop-the-world round trip.
const STOP_THE_WORLD: u8 = 2;

static METHOD: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Makes every thread of this process execute a serializing instruction before it next runs
/// user code, so none of them can still execute stale instruction bytes. Registers for the
/// command once on first use; where the kernel lacks it, falls back to a stop-the-world
/// round trip (signal delivery serializes).
///
/// # Panics
///
/// Only on the fallback path (kernels before 4.16), when some thread does not answer the
/// stop signal: carrying on would let it run stale code. Use [`try_sync_core`] to get the
/// error instead.
pub fn sync_core() {
    if let Err(e) = try_sync_core() {
        panic!("sync_core: cannot serialize the other threads: {e}");
    }
}

/// [`sync_core`], returning an error instead of panicking when the fallback cannot stop the
/// other threads. The membarrier path cannot fail.
pub fn try_sync_core() -> Result<(), TextError> {
    match METHOD.load(Ordering::Acquire) {
        MEMBARRIER => {
            if membarrier(CMD_PRIVATE_EXPEDITED_SYNC_CORE) == 0 {
                return Ok(());
            }
            // Registered but refused now: nothing documented causes this, but the fallback
            // is still correct, so use it rather than skip the serialization.
            stop_the_world_round_trip()
        }
        STOP_THE_WORLD => stop_the_world_round_trip(),
        _ => {
            // Registering twice (two threads racing here) is harmless, so no lock is needed.
            let method =
                if membarrier(CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) == 0 { MEMBARRIER } else { STOP_THE_WORLD };
            METHOD.store(method, Ordering::Release);
            try_sync_core()
        }
    }
}

/// Issues one membarrier command with no flags; returns the raw syscall result.
fn membarrier(cmd: libc::c_long) -> libc::c_long {
    // SAFETY: membarrier takes plain integers (command, flags, cpu id) and touches no memory
    // of ours.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_long, 0 as libc::c_long) }
}

/// Stopping every other thread and letting it go again: each one takes a signal and returns
/// from it by `rt_sigreturn`, whose return to user mode (`iret`) serializes its core.
fn stop_the_world_round_trip() -> Result<(), TextError> {
    if stop::held_by_current_thread() {
        // The others are parked in the stop handler already and will serialize on their way
        // out of it; stopping again from this thread would deadlock on the stop lock.
        return Ok(());
    }
    drop(stop::stop_other_threads(FALLBACK_STOP_TIMEOUT)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_methods_work() {
        try_sync_core().unwrap();
        assert_ne!(METHOD.load(Ordering::Acquire), UNKNOWN);
        sync_core();
        // The fallback, whatever this kernel supports, with another thread to stop.
        let quit = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let q = quit.clone();
        let other = std::thread::spawn(move || {
            while !q.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        stop_the_world_round_trip().unwrap();
        quit.store(true, Ordering::Relaxed);
        other.join().unwrap();
    }
}
