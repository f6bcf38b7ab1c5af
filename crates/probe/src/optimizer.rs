//! The background optimizer: a probe is armed as a breakpoint and turned into a jump shortly
//! after, by a thread of its own, like the kernel's delayed `kprobe_optimizer` work. The
//! delay batches the stops of the other threads when many probes are registered at once.
//!
//! The thread is one of dynprobe's own (`own_thread`): never seen by a probe. It starts at
//! the first kick and runs until [`stop_optimizer`] (an attach session ends with it, so no
//! dynprobe thread is left in the process); a later kick starts it again.

use crate::own_thread::{self, OwnThread};
use crate::registry;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// How long the optimizer waits after a kick before it stops the world.
const DELAY: Duration = Duration::from_millis(5);

/// What the thread is asked to do.
struct Asked {
    /// An optimizer pass.
    pass: bool,
    /// End.
    stop: bool,
}

static ASKED: Mutex<Asked> = Mutex::new(Asked { pass: false, stop: false });
static WAKE: Condvar = Condvar::new();
/// The running thread. Held while it is started or stopped, so that a kick never races a
/// stop.
static THREAD: Mutex<Option<OwnThread>> = Mutex::new(None);

/// Asks for an optimizer pass soon.
pub(crate) fn kick() {
    if !registry::optimization_enabled() {
        return;
    }
    {
        let mut thread = THREAD.lock().unwrap_or_else(|e| e.into_inner());
        if thread.is_none() {
            // Without the thread, probes stay breakpoint probes until wait_for_optimizer runs.
            *thread = own_thread::spawn(c"dynprobe-optimizer", run).ok();
        }
    }
    ASKED.lock().unwrap_or_else(|e| e.into_inner()).pass = true;
    WAKE.notify_one();
}

/// Ends the background optimizer thread, if it runs, and waits until it has ended: probes
/// not optimized yet stay breakpoint probes until the next registration (or
/// [`wait_for_optimizer`](crate::wait_for_optimizer)) starts it again. Must not be called
/// from a probe handler.
pub fn stop_optimizer() {
    let mut thread = THREAD.lock().unwrap_or_else(|e| e.into_inner());
    let Some(running) = thread.take() else { return };
    ASKED.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
    WAKE.notify_one();
    running.join();
    ASKED.lock().unwrap_or_else(|e| e.into_inner()).stop = false;
}

fn run() {
    loop {
        {
            let mut asked = ASKED.lock().unwrap_or_else(|e| e.into_inner());
            while !asked.pass && !asked.stop {
                asked = WAKE.wait(asked).unwrap_or_else(|e| e.into_inner());
            }
            if asked.stop {
                return;
            }
            asked.pass = false;
        }
        std::thread::sleep(DELAY);
        // A failed pass (a thread that would not stop) leaves the probes as working
        // breakpoint probes; the next kick tries again.
        if let Ok(true) = registry::optimize_pending() {
            ASKED.lock().unwrap_or_else(|e| e.into_inner()).pass = true;
        }
    }
}
