//! Setting up and taking away what return hooks share: the instance table, the two
//! trampoline sleds (`arch::rethook`) and the probe that hides them from backtraces.

use super::*;
use dynprobe_arch::native::detour::VectorWidth;

/// Registration state; never touched by the hit paths.
pub(super) struct Setup {
    /// The instance table is mapped and the trampoline written.
    pub(super) trampoline: bool,
    /// The light trampoline of the function-graph tracer is written.
    pub(super) light: bool,
    /// The light trampoline of return probes is written.
    pub(super) light_return: bool,
    /// Backtraces skip the trampoline.
    pub(super) filter: bool,
    pub(super) next_id: u32,
    pub(super) next_index: usize,
}

/// Removes what return probes keep between uses — the probe on `_Unwind_Backtrace` that
/// hides the trampoline from backtraces — when no return probe is registered and no call
/// is still to return through the trampoline on any thread, so that no code of dynprobe's
/// runs when the program takes a backtrace. The next return probe places it again.
pub(crate) fn release_backtrace_filter() {
    let Ok(mut setup) = setup() else { return };
    let registered = PROBES.iter().any(|p| !p.load(Ordering::Acquire).is_null());
    // Conservative: a stack left by a thread that has exited counts as in use.
    let pending = STACKS.iter().any(|s| s.top.load(Ordering::Acquire) != 0);
    if setup.filter && !registered && !pending && rethook::show_backtraces_again() {
        setup.filter = false;
    }
}

/// How many times [`release_trampoline`] looks for a thread in the trampoline's code before it
/// keeps the trampoline.
const RELEASE_TRIES: u32 = 5;

/// Takes the return trampoline and the instance table away when no return probe is
/// registered and no call can return through the trampoline any more — no instance in use
/// on any thread's stack (a thread that exited inside a probed call counts as in use, as
/// does one still inside a probed call now) and no thread in the trampoline's code or
/// coming back to it from a signal handler — so that a session's end leaves nothing of
/// dynprobe's in the process. `Err` says why they stay. The next return probe makes them
/// again.
pub(crate) fn release_trampoline() -> Result<(), String> {
    let mut setup = setup().map_err(|e| e.to_string())?;
    if !setup.trampoline {
        return Ok(());
    }
    let registered = PROBES.iter().filter(|p| !p.load(Ordering::Acquire).is_null()).count();
    if registered > 0 {
        return Err(format!("{registered} return probes are still registered"));
    }
    let in_flight = |s: &SlotStack| s.top.load(Ordering::Acquire) != 0 || s.dispatching.load(Ordering::Acquire) != 0;
    let threads = STACKS.iter().filter(|s| in_flight(s)).count();
    if threads > 0 {
        return Err(format!(
            "{threads} thread(s) are inside a function a return probe diverted (or exited there): their return \
             goes through the trampoline"
        ));
    }
    let code: Vec<_> =
        [&rethook::FULL, &rethook::LIGHT, &rethook::RP_LIGHT].into_iter().filter_map(rethook::memory).collect();
    // A thread that gave its instance back may still be in the dispatcher's code, about to
    // return into `common`: its guard's mark says so until `common` clears it. A thread
    // found there, or in the trampoline, is out within a few instructions unless it was
    // preempted: asked again a few times before the trampoline is kept.
    let mut tries = 0;
    while !crate::registry::memory_unused(code.clone(), crate::thread_slot::any_returning).map_err(|e| e.to_string())? {
        tries += 1;
        if tries == RELEASE_TRIES {
            return Err("a thread is in the return trampoline".to_string());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if STACKS.iter().any(in_flight) {
        return Err("a call was diverted meanwhile".to_string());
    }
    rethook::uninstall(&rethook::FULL);
    rethook::uninstall(&rethook::LIGHT);
    rethook::uninstall(&rethook::RP_LIGHT);
    let table = INSTANCES.swap(std::ptr::null_mut(), Ordering::AcqRel);
    let bytes = MAX_THREADS * MAX_DEPTH * std::mem::size_of::<Instance>();
    // SAFETY: the table `Setup::install` mapped, of that size; no thread can read it now
    // (no instance in use, no thread in the trampoline).
    unsafe { libc::munmap(table.cast(), bytes) };
    setup.trampoline = false;
    setup.light = false;
    setup.light_return = false;
    Ok(())
}

pub(super) static SETUP: Mutex<Setup> = Mutex::new(Setup {
    trampoline: false,
    light: false,
    light_return: false,
    filter: false,
    next_id: 1,
    next_index: 0,
});

pub(super) fn setup() -> Result<MutexGuard<'static, Setup>, ProbeError> {
    if HandlerGuard::current_thread_inside() {
        return Err(ProbeError::InsideHandler);
    }
    Ok(SETUP.lock().unwrap_or_else(|e| e.into_inner()))
}

impl Setup {
    /// Writes the light trampoline of return probes (after [`Setup::install`]), once.
    pub(super) fn install_light_return(&mut self) -> Result<(), ProbeError> {
        if !self.light_return {
            let stride = std::mem::size_of::<Instance>() as u64;
            let table = INSTANCES.load(Ordering::Relaxed) as u64;
            rethook::install(&rethook::RP_LIGHT, MAX_THREADS * MAX_DEPTH, table, stride, VectorWidth::None)?;
            self.light_return = true;
        }
        Ok(())
    }

    /// Maps the instance table, writes the trampoline and hides it from backtraces, once.
    pub(super) fn install(&mut self) -> Result<(), ProbeError> {
        if !self.trampoline {
            let bytes = MAX_THREADS * MAX_DEPTH * std::mem::size_of::<Instance>();
            let table = crate::counter::map_zeroed(bytes)
                .map_err(|e| ProbeError::ReturnProbeSetup { reason: format!("cannot map the instance table: {e}") })?;
            INSTANCES.store(table.cast(), Ordering::Release);
            let stride = std::mem::size_of::<Instance>() as u64;
            let width = crate::vector_width();
            rethook::install(&rethook::FULL, MAX_THREADS * MAX_DEPTH, table as u64, stride, width)?;
            self.trampoline = true;
        }
        if !self.filter {
            rethook::hide_from_backtraces()?;
            self.filter = true;
        }
        Ok(())
    }

    /// A free probe index, handed out round-robin so that a freed index is reused last
    /// (its stale instances, if any, are told apart by the probe's id all the same).
    pub(super) fn free_index(&mut self) -> Result<u32, ProbeError> {
        let found = (0..MAX_RETURN_PROBES)
            .map(|i| (self.next_index + i) % MAX_RETURN_PROBES)
            .find(|&i| PROBES[i].load(Ordering::Relaxed).is_null())
            .ok_or(ProbeError::TooManyReturnProbes { max: MAX_RETURN_PROBES })?;
        self.next_index = found + 1;
        Ok(found as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A thread that gave its instance back but has not left the dispatcher's code yet —
    /// its guard still marked `RETURNING`, as it stays until the trampoline's `common`
    /// clears it — keeps the trampoline: `release_trampoline` refuses while the mark is
    /// there (the trampoline would be unmapped under the thread's return into `common`),
    /// and takes the trampoline away once it is gone. Calls that returned through it left
    /// no mark behind.
    #[test]
    fn a_thread_still_on_its_way_back_from_the_dispatcher_keeps_the_trampoline() {
        // A C library function (dynprobe refuses its own code): labs(3).
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
        let labs = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"labs".as_ptr()) } as u64;
        assert_ne!(labs, 0);
        // SAFETY: labs(3)'s own type.
        let call: extern "C" fn(libc::c_long) -> libc::c_long = unsafe { std::mem::transmute(labs as usize) };
        let probe = ReturnProbe::at(labs).on_return(|_, _| ()).register().unwrap();
        assert_eq!(call(std::hint::black_box(-13)), 13);
        assert_eq!(probe.unregister().unwrap().returns, 1);
        assert!(!crate::thread_slot::any_returning(), "the return through the trampoline left its mark");
        let (marked_tx, marked) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        let returning = std::thread::spawn(move || {
            let (slot, _) = ThreadSlot::current().unwrap();
            let guard = HandlerGuard::enter_returning(slot).unwrap();
            marked_tx.send(()).unwrap();
            let _ = go_rx.recv();
            drop(guard);
        });
        marked.recv().unwrap();
        let refused = release_trampoline().unwrap_err();
        assert!(refused.contains("a thread is in the return trampoline"), "{refused}");
        assert!(rethook::memory(&rethook::FULL).is_some(), "the trampoline stays");
        go.send(()).unwrap();
        returning.join().unwrap();
        release_trampoline().unwrap();
        assert!(rethook::memory(&rethook::FULL).is_none(), "the trampoline went");
    }
}
