//! The background optimizer: a probe is armed as a breakpoint and turned into a jump shortly
//! after, by a thread of its own, like the kernel's delayed `kprobe_optimizer` work. The
//! delay batches the stops of the other threads when many probes are registered at once.

use crate::registry;
use std::sync::{Condvar, Mutex, Once};
use std::time::Duration;

/// How long the optimizer waits after a kick before it stops the world.
const DELAY: Duration = Duration::from_millis(5);

static PENDING: Mutex<bool> = Mutex::new(false);
static WAKE: Condvar = Condvar::new();
static START: Once = Once::new();

/// Asks for an optimizer pass soon.
pub(crate) fn kick() {
    if !registry::optimization_enabled() {
        return;
    }
    START.call_once(|| {
        // Without the thread, probes stay breakpoint probes until wait_for_optimizer runs.
        let _ = std::thread::Builder::new().name("dynprobe-optimizer".into()).spawn(run);
    });
    *PENDING.lock().unwrap_or_else(|e| e.into_inner()) = true;
    WAKE.notify_one();
}

fn run() {
    // The optimizer's own calls (the C library's, when it is traced) are not the program's.
    crate::thread_slot::set_current_thread_traced(false);
    loop {
        {
            let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
            while !*pending {
                pending = WAKE.wait(pending).unwrap_or_else(|e| e.into_inner());
            }
            *pending = false;
        }
        std::thread::sleep(DELAY);
        // A failed pass (a thread that would not stop) leaves the probes as working
        // breakpoint probes; the next kick tries again.
        if let Ok(true) = registry::optimize_pending() {
            *PENDING.lock().unwrap_or_else(|e| e.into_inner()) = true;
        }
    }
}
