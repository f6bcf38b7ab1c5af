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
    let code = [&rethook::FULL, &rethook::LIGHT, &rethook::RP_LIGHT].into_iter().filter_map(rethook::memory).collect();
    if !crate::registry::memory_unused(code).map_err(|e| e.to_string())? {
        return Err("a thread is in the return trampoline".to_string());
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
