//! Per-thread shadow stacks of return-probe instances: what a hijacked return address was,
//! and where on the thread's stack it sat.
//!
//! At a return probe's entry the tracer replaces the return address at `[rsp]` with the
//! address of the trampoline `int3` and pushes an [`Instance`] here; when the thread reaches
//! the trampoline it pops the matching instance and sends the thread to the original return
//! address. The kernel's kretprobes find the instance by task (its `rethooks` list,
//! kernel/trace/rethook.c);
//! ptrace sees the stack pointer too, which lets a frame that was left without returning
//! (`longjmp`, a C++ exception unwinding through it) be recognised and dropped instead of
//! being matched with the wrong return.

/// One pending return: a call whose return address the tracer replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Instance {
    /// The stack address that held the return address (`rsp` at the function's entry).
    pub slot: u64,
    /// The original return address, to continue at after the return event.
    pub ret_addr: u64,
    /// Index of the return probe site this instance belongs to.
    pub site: usize,
    /// `CLOCK_MONOTONIC` at entry, for `$duration`.
    pub entry_ns: u64,
    /// Values the return specs fetched at entry (their `$argN`...), per spec in order.
    pub values: Vec<u64>,
    /// Its entry in the fallback's return table (see [`crate::fallback`]).
    pub entry: usize,
}

/// The pending returns of one thread, innermost last.
#[derive(Debug, Default)]
pub(crate) struct ShadowStack {
    frames: Vec<Instance>,
}

/// How deep one thread's shadow stack may grow; deeper calls are not hijacked (and counted
/// as missed, as the kernel's `maxactive` does), so that runaway recursion cannot make the
/// tracer's memory grow without bound.
pub(crate) const MAX_DEPTH: usize = 4096;

impl ShadowStack {
    /// Records a hijacked call whose return address was at `instance.slot`. Instances at or
    /// below that address (deeper in a downward-growing stack) belong to frames that are no
    /// longer live — the new frame reuses their stack — and are dropped and returned.
    /// Returns `Err(instance)` when the stack is full.
    pub fn push(&mut self, instance: Instance) -> Result<Vec<Instance>, Instance> {
        let dropped = self.drop_below(instance.slot + 1);
        if self.frames.len() >= MAX_DEPTH {
            return Err(instance);
        }
        self.frames.push(instance);
        Ok(dropped)
    }

    /// The instance a thread reaching the trampoline with stack pointer `rsp` is returning
    /// from: the `ret` popped the address at `rsp - 8`. Instances deeper than that one were
    /// abandoned and are dropped (the second value). When no instance sits
    /// exactly at `rsp - 8` (the stack was switched, as by `swapcontext`), the innermost one
    /// is used, as the kernel's kretprobes do.
    pub fn pop(&mut self, rsp: u64) -> (Option<Instance>, Vec<Instance>) {
        let slot = rsp.wrapping_sub(8);
        let dropped = match self.frames.iter().rposition(|f| f.slot == slot) {
            Some(i) => self.frames.split_off(i + 1),
            None => Vec::new(),
        };
        (self.frames.pop(), dropped)
    }

    /// Drops every instance whose slot is below `limit` (deeper than the live frames).
    fn drop_below(&mut self, limit: u64) -> Vec<Instance> {
        let keep = self.frames.iter().rposition(|f| f.slot >= limit).map_or(0, |i| i + 1);
        self.frames.split_off(keep)
    }

    /// Every pending instance, outermost first.
    pub fn frames(&self) -> &[Instance] {
        &self.frames
    }

    /// Forgets every instance (after their return addresses were restored), returning them.
    pub fn take(&mut self) -> Vec<Instance> {
        std::mem::take(&mut self.frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(slot: u64, ret_addr: u64) -> Instance {
        Instance { slot, ret_addr, site: 0, entry_ns: 0, values: Vec::new(), entry: 0 }
    }

    #[test]
    fn nested_calls_return_innermost_first() {
        let mut s = ShadowStack::default();
        assert_eq!(s.push(inst(0x1000, 1)), Ok(vec![]));
        assert_eq!(s.push(inst(0xf00, 2)), Ok(vec![]));
        assert_eq!(s.pop(0xf08), (Some(inst(0xf00, 2)), vec![]));
        assert_eq!(s.pop(0x1008), (Some(inst(0x1000, 1)), vec![]));
        assert_eq!(s.pop(0x1008), (None, vec![]));
    }

    #[test]
    fn a_longjmp_past_frames_drops_them_at_the_next_return() {
        let mut s = ShadowStack::default();
        s.push(inst(0x1000, 1)).unwrap();
        s.push(inst(0xf00, 2)).unwrap();
        s.push(inst(0xe00, 3)).unwrap();
        // The two inner frames were abandoned; the outer one returns.
        assert_eq!(s.pop(0x1008), (Some(inst(0x1000, 1)), vec![inst(0xf00, 2), inst(0xe00, 3)]));
        assert!(s.frames().is_empty());
    }

    #[test]
    fn a_new_call_over_an_abandoned_frame_replaces_it() {
        let mut s = ShadowStack::default();
        s.push(inst(0x1000, 1)).unwrap();
        s.push(inst(0xf00, 2)).unwrap();
        // longjmp back to the outer function, which calls again: same slot as before, or a
        // higher one.
        assert_eq!(s.push(inst(0xf00, 4)), Ok(vec![inst(0xf00, 2)]));
        assert_eq!(s.frames(), &[inst(0x1000, 1), inst(0xf00, 4)]);
        assert_eq!(s.push(inst(0xff0, 5)), Ok(vec![inst(0xf00, 4)]));
        assert_eq!(s.frames(), &[inst(0x1000, 1), inst(0xff0, 5)]);
    }

    #[test]
    fn a_switched_stack_returns_the_innermost_instance() {
        let mut s = ShadowStack::default();
        s.push(inst(0x1000, 1)).unwrap();
        s.push(inst(0xf00, 2)).unwrap();
        // A return on another stack matches no slot: nothing is dropped.
        assert_eq!(s.pop(0x9_0000), (Some(inst(0xf00, 2)), vec![]));
        assert_eq!(s.frames(), &[inst(0x1000, 1)]);
    }

    #[test]
    fn depth_is_bounded() {
        let mut s = ShadowStack::default();
        for i in 0..MAX_DEPTH as u64 {
            s.push(inst(0x100000 - i * 16, i)).unwrap();
        }
        assert!(s.push(inst(0x10, 0)).is_err());
        assert_eq!(s.frames().len(), MAX_DEPTH);
    }
}
