//! The tracer: every thread of the target under `ptrace`, each hit handled from outside.
//!
//! A hit is: the thread executes our `int3` → `SIGTRAP` signal-delivery-stop → we read its
//! registers, write the event line, point `rip` at the site's out-of-line slot (the original
//! instruction relocated, then a jump back: "boosted", so no single-step) and resume it with
//! the signal suppressed. A return probe's entry also swaps the return address at `[rsp]`
//! for the scratch page's trampoline `int3`, whose hit writes the return event and resumes
//! the thread at the original return address.
//!
//! Every other stop is passed through: a foreign `SIGTRAP` and any other signal are
//! delivered unchanged; a group-stop (`SIGSTOP`, `SIGTSTP`...) is left in effect with
//! `PTRACE_LISTEN`, so job control works as without us; new threads are followed with
//! `PTRACE_O_TRACECLONE`.

use std::collections::HashMap;
use std::io;

use dynprobe::fetch::{HitContext, TargetMemory};
use dynprobe::line::{EventFormat, Line};
use dynprobe::{monotonic_ns, Regs};
use dynprobe_arch::native::INT3;
use dynprobe_remote::{sys, thread_signal_pending, Memory, Regs as UserRegs};

use crate::control::Control;
use crate::output::Output;
use crate::scratch::Scratch;
use crate::shadow::{Instance, ShadowStack};
use crate::{Error, ExitInfo, Outcome};

/// `si_code` of a `SIGTRAP` raised by an `int3` (the kernel's `SI_KERNEL`).
const SI_KERNEL: i32 = 0x80;

/// One patched address and the probes that share it (the kernels' aggregate probe).
#[derive(Debug)]
pub(crate) struct Site {
    /// The probed instruction's address.
    pub addr: u64,
    /// The byte our `int3` replaced.
    pub orig: u8,
    /// The out-of-line slot.
    pub slot: u64,
    /// Indices of the entry (`p`) probes here.
    pub entries: Vec<usize>,
    /// Indices of the return (`r`) probes here.
    pub returns: Vec<usize>,
}

/// What a traced thread is doing, as far as we know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Running (or about to report its first stop).
    Running,
    /// In a group-stop we let stand with `PTRACE_LISTEN`.
    Listening,
    /// In a ptrace-stop of ours; `signal` is to be delivered when it resumes (0: none).
    Stopped {
        /// The signal to deliver on resuming.
        signal: i32,
    },
}

/// One traced thread.
#[derive(Debug)]
pub(crate) struct Thread {
    pub state: State,
    pub shadow: ShadowStack,
}

impl Thread {
    pub fn new(state: State) -> Thread {
        Thread { state, shadow: ShadowStack::default() }
    }
}

/// Whether stops are resumed at once (normal running) or kept (stopping every thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Run,
    Stop,
}

/// What a stop meant for the whole session.
#[derive(Debug)]
pub(crate) enum Flow {
    /// Carry on.
    Continue,
    /// The process is gone.
    Gone(Outcome),
    /// The process executed a new program: our probes went with the old image.
    Exec,
}

/// The target's memory for fetches: `process_vm_readv`, thread names from `/proc`.
pub(crate) struct ProcMemory {
    pub pid: i32,
}

impl TargetMemory for ProcMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        if buf.is_empty() {
            return true;
        }
        matches!(sys::read_vm(self.pid, addr, buf), Ok(n) if n == buf.len())
    }

    fn thread_name(&self, tid: u64, buf: &mut [u8; 16]) -> usize {
        let Ok(name) = std::fs::read(format!("/proc/{}/task/{tid}/comm", self.pid)) else { return 0 };
        let name = name.strip_suffix(b"\n").unwrap_or(&name);
        let n = name.len().min(buf.len());
        buf[..n].copy_from_slice(&name[..n]);
        n
    }
}

/// The whole tracing session.
pub(crate) struct Tracer {
    pub pid: i32,
    pub mem: Memory,
    pub formats: Vec<EventFormat>,
    pub sites: Vec<Site>,
    pub site_at: HashMap<u64, usize>,
    pub scratch: Scratch,
    pub threads: HashMap<i32, Thread>,
    pub out: Output,
    pub target: ProcMemory,
    pub info: ExitInfo,
    /// The marker semaphores raised (one count each), lowered at detach.
    pub semaphores: Vec<u64>,
    line: Line,
}

impl Tracer {
    /// A tracer of `pid` whose threads are `threads`, with nothing placed yet.
    pub fn new(pid: i32, threads: HashMap<i32, Thread>, out: Output) -> Result<Tracer, Error> {
        let mem = Memory::open(pid).map_err(|e| Error::Os { what: format!("opening /proc/{pid}/mem"), error: e })?;
        Ok(Tracer {
            pid,
            mem,
            formats: Vec::new(),
            sites: Vec::new(),
            site_at: HashMap::new(),
            scratch: Scratch { base: 0, len: 0 },
            threads,
            out,
            target: ProcMemory { pid },
            info: ExitInfo::default(),
            semaphores: Vec::new(),
            line: Line::new(),
        })
    }

    /// Handles every stop until the process is gone, executes a new program, or detaching
    /// is asked for (by the control channel, or because the output is gone).
    pub fn run(&mut self, control: &Control) -> Result<Outcome, Error> {
        loop {
            if control.detach_requested() || self.out.broken() {
                self.detach_all()?;
                return Ok(Outcome::Detached);
            }
            let event = match sys::waitpid(-1, true) {
                Ok(None) => {
                    // Nothing pending: the moment to write out the batch, then block.
                    self.out.flush();
                    sys::waitpid(-1, false)
                }
                other => other,
            };
            let (tid, status) = match event {
                Ok(Some(stop)) => stop,
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Os { what: "waiting for the target's threads".into(), error: e }),
            };
            match self.handle(tid, status, Mode::Run)? {
                Flow::Continue => {}
                Flow::Gone(outcome) => return Ok(outcome),
                Flow::Exec => {
                    self.exec_detach();
                    return Ok(Outcome::Exec);
                }
            }
        }
    }

    /// Handles one `waitpid` report of thread `tid`.
    pub fn handle(&mut self, tid: i32, status: i32, mode: Mode) -> Result<Flow, Error> {
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            self.threads.remove(&tid);
            if tid == self.pid {
                // The leader is reported last, once every other thread is gone.
                self.threads.clear();
                let outcome = if libc::WIFEXITED(status) {
                    Outcome::Exited(libc::WEXITSTATUS(status))
                } else {
                    Outcome::Killed(libc::WTERMSIG(status))
                };
                return Ok(Flow::Gone(outcome));
            }
            return Ok(Flow::Continue);
        }
        if !libc::WIFSTOPPED(status) {
            return Ok(Flow::Continue);
        }
        let sig = libc::WSTOPSIG(status);
        let event = status >> 16;
        self.threads.entry(tid).or_insert_with(|| Thread::new(State::Running));
        match event {
            libc::PTRACE_EVENT_CLONE => {
                if let Ok(new) = sys::event_msg(tid) {
                    // Its first stop may have been reported already.
                    self.threads.entry(new as i32).or_insert_with(|| Thread::new(State::Running));
                }
                self.settle(tid, 0, mode);
            }
            libc::PTRACE_EVENT_EXEC => return Ok(Flow::Exec),
            libc::PTRACE_EVENT_STOP => {
                let group_stop = matches!(sig, libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU);
                if group_stop && mode == Mode::Run {
                    self.set_state(tid, if sys::listen(tid).is_ok() { State::Listening } else { State::Running });
                } else if mode == Mode::Stop && self.trap_pending(tid) {
                    // It executed one of our int3s, but the SIGTRAP is still queued behind
                    // this stop: let it come, or it would be delivered after detaching.
                    self.resume(tid, 0);
                } else {
                    self.settle(tid, 0, mode);
                }
            }
            0 if sig == libc::SIGTRAP => {
                let handled = self.on_trap(tid)?;
                self.settle(tid, if handled { 0 } else { libc::SIGTRAP }, mode);
            }
            0 => self.settle(tid, sig, mode),
            // Events we did not ask for: resume as they were.
            _ => self.settle(tid, 0, mode),
        }
        Ok(Flow::Continue)
    }

    fn set_state(&mut self, tid: i32, state: State) {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.state = state;
        }
    }

    /// Resumes a stopped thread (`Run`) or keeps it stopped with `signal` to deliver later.
    fn settle(&mut self, tid: i32, signal: i32, mode: Mode) {
        match mode {
            Mode::Run => self.resume(tid, signal),
            Mode::Stop => self.set_state(tid, State::Stopped { signal }),
        }
    }

    fn resume(&mut self, tid: i32, signal: i32) {
        // ESRCH: the thread died meanwhile (killed with its process); its exit report follows.
        let _ = sys::cont(tid, signal);
        self.set_state(tid, State::Running);
    }

    /// Whether thread `tid`, stopped, sits just after one of our `int3`s with a `SIGTRAP`
    /// still queued.
    fn trap_pending(&self, tid: i32) -> bool {
        let Ok(regs) = sys::get_regs(tid) else { return false };
        let at = regs.rip.wrapping_sub(1);
        (self.site_at.contains_key(&at) || (self.scratch.len > 0 && at == self.scratch.trampoline()))
            && thread_signal_pending(self.pid, tid, libc::SIGTRAP)
    }

    /// A `SIGTRAP` stop: one of our `int3`s (handled: true) or someone else's (false).
    fn on_trap(&mut self, tid: i32) -> Result<bool, Error> {
        let mut regs = sys::get_regs(tid).map_err(|e| os(e, "reading a thread's registers"))?;
        let at = regs.rip.wrapping_sub(1);
        let ours = self.site_at.get(&at).copied();
        let trampoline = self.scratch.len > 0 && at == self.scratch.trampoline();
        if ours.is_none() && !trampoline {
            return Ok(false);
        }
        if sys::get_siginfo(tid).map_err(|e| os(e, "reading a thread's signal"))?.si_code != SI_KERNEL {
            // Sent by kill/tgkill, not raised by an int3.
            return Ok(false);
        }
        let now = monotonic_ns();
        if let Some(index) = ours {
            self.on_site_hit(tid, index, &mut regs, now);
        } else if !self.on_return(tid, &mut regs, now) {
            return Ok(false);
        }
        sys::set_regs(tid, &regs).map_err(|e| os(e, "setting a thread's registers"))?;
        Ok(true)
    }

    /// An `int3` at a site: entry events, the return address swapped for return probes,
    /// and `rip` moved into the slot.
    fn on_site_hit(&mut self, tid: i32, index: usize, user: &mut UserRegs, now: u64) {
        self.info.hits += 1;
        let site = &self.sites[index];
        let mut regs = to_regs(user);
        regs.ip = site.addr;
        for &p in &site.entries {
            let ctx = HitContext::entry(&regs, &self.target, tid as u64);
            self.line = Line::new();
            self.formats[p].write(&mut self.line, now, &ctx);
            self.out.line(self.line.finish());
        }
        if !site.returns.is_empty() {
            self.hijack_return(tid, index, &regs, now);
        }
        user.rip = self.sites[index].slot;
    }

    /// Swaps the return address at `[rsp]` for the trampoline and records the instance.
    fn hijack_return(&mut self, tid: i32, index: usize, regs: &Regs, now: u64) {
        let site = &self.sites[index];
        let mut values = Vec::new();
        for &p in &site.returns {
            let ctx = HitContext::entry(regs, &self.target, tid as u64);
            let start = values.len();
            values.resize(start + self.formats[p].entry_count(), 0);
            self.formats[p].save_entry(&ctx, &mut values[start..]);
        }
        let Ok(ret_addr) = self.mem.read_u64(regs.rsp) else {
            self.info.missed_returns += 1;
            return;
        };
        let instance = Instance { slot: regs.rsp, ret_addr, site: index, entry_ns: now, values };
        let Some(thread) = self.threads.get_mut(&tid) else { return };
        match thread.shadow.push(instance) {
            Ok(dropped) => {
                self.info.abandoned_returns += dropped as u64;
                let trampoline = self.scratch.trampoline().to_le_bytes();
                if self.mem.write(regs.rsp, &trampoline).is_err() {
                    // The stack is not writable?! Forget the instance: no return event.
                    thread.shadow.pop(regs.rsp + 8);
                    self.info.missed_returns += 1;
                }
            }
            Err(_) => self.info.missed_returns += 1,
        }
    }

    /// The trampoline's `int3`: the return events, and `rip` back at the original return
    /// address. False if the thread has no instance (it cannot be ours).
    fn on_return(&mut self, tid: i32, user: &mut UserRegs, now: u64) -> bool {
        let Some(thread) = self.threads.get_mut(&tid) else { return false };
        let (instance, dropped) = thread.shadow.pop(user.rsp);
        self.info.abandoned_returns += dropped as u64;
        let Some(instance) = instance else { return false };
        self.write_return_events(tid, user, &instance, now);
        user.rip = instance.ret_addr;
        true
    }

    fn write_return_events(&mut self, tid: i32, user: &UserRegs, instance: &Instance, now: u64) {
        self.info.hits += 1;
        let mut regs = to_regs(user);
        regs.ip = instance.ret_addr;
        let mut start = 0;
        for &p in &self.sites[instance.site].returns {
            let count = self.formats[p].entry_count();
            let entry = instance.values.get(start..start + count).unwrap_or(&[]);
            start += count;
            let ctx = HitContext {
                regs: &regs,
                target: &self.target,
                tid: tid as u64,
                retval: Some(regs.rax),
                entry,
                duration_ns: Some(now.saturating_sub(instance.entry_ns)),
            };
            self.line = Line::new();
            self.formats[p].write(&mut self.line, now, &ctx);
            self.out.line(self.line.finish());
        }
    }

    /// Stops every thread: interrupts those running and handles stops (hits included)
    /// until none runs. Returns early with the outcome if the process ends meanwhile.
    pub fn stop_all(&mut self) -> Result<Option<Flow>, Error> {
        let running: Vec<i32> = self
            .threads
            .iter()
            .filter(|(_, t)| !matches!(t.state, State::Stopped { .. }))
            .map(|(&tid, _)| tid)
            .collect();
        for tid in running {
            // ESRCH: it is exiting; its exit report comes through waitpid.
            let _ = sys::interrupt(tid);
        }
        while self.threads.values().any(|t| !matches!(t.state, State::Stopped { .. })) {
            let (tid, status) = match sys::waitpid(-1, false) {
                Ok(Some(stop)) => stop,
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(os(e, "waiting for the target's threads to stop")),
            };
            // A thread resumed to collect its queued SIGTRAP, or one created meanwhile,
            // stops on its own; a listening one reports the interrupt sent above.
            match self.handle(tid, status, Mode::Stop)? {
                Flow::Continue => {}
                other => return Ok(Some(other)),
            }
        }
        Ok(None)
    }

    /// Resumes every stopped thread with the signal it was stopped for.
    pub fn resume_all(&mut self) {
        let stopped: Vec<(i32, i32)> = self
            .threads
            .iter()
            .filter_map(|(&tid, t)| match t.state {
                State::Stopped { signal } => Some((tid, signal)),
                _ => None,
            })
            .collect();
        for (tid, signal) in stopped {
            self.resume(tid, signal);
        }
    }

    /// Detaches cleanly: every thread stopped, every byte restored, every hijacked return
    /// address put back, threads on the trampoline sent on, then `PTRACE_DETACH` with each
    /// thread's pending signal. The scratch pages stay mapped.
    pub fn detach_all(&mut self) -> Result<(), Error> {
        match self.stop_all()? {
            None => {}
            Some(Flow::Exec) => {
                self.exec_detach();
                return Ok(());
            }
            Some(_) => return Ok(()),
        }
        let mut failures = self.lower_semaphores();
        for site in &self.sites {
            if let Err(e) = self.mem.replace(site.addr, &[INT3], &[site.orig]) {
                failures.push(format!("restoring {:#x}: {e}", site.addr));
            }
        }
        self.sites.clear();
        self.site_at.clear();
        let tids: Vec<i32> = self.threads.keys().copied().collect();
        for tid in tids {
            if let Err(e) = self.release_returns(tid) {
                failures.push(e);
            }
        }
        for (&tid, thread) in &self.threads {
            let signal = match thread.state {
                State::Stopped { signal } => signal,
                _ => 0,
            };
            let _ = sys::detach(tid, signal);
        }
        self.threads.clear();
        self.out.flush();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::Restore { failures })
        }
    }

    /// Lowers every marker semaphore raised (every thread stopped), first: the program
    /// stops taking the markers' paths before their breakpoints go. What failed, if any.
    pub fn lower_semaphores(&mut self) -> Vec<String> {
        self.semaphores.drain(..).filter_map(|addr| crate::marker::lower_semaphore(&self.mem, addr).err()).collect()
    }

    /// Puts back every return address of `tid` still pointing at the trampoline, and sends
    /// the thread on if it stands on the trampoline itself.
    fn release_returns(&mut self, tid: i32) -> Result<(), String> {
        let trampoline = self.scratch.trampoline();
        let Ok(mut regs) = sys::get_regs(tid) else { return Ok(()) };
        if self.scratch.len > 0 && regs.rip == trampoline {
            // It returned into the trampoline but has not trapped yet.
            let now = monotonic_ns();
            if self.on_return(tid, &mut regs, now) {
                sys::set_regs(tid, &regs).map_err(|e| format!("moving thread {tid} off the trampoline: {e}"))?;
            }
        }
        let Some(thread) = self.threads.get_mut(&tid) else { return Ok(()) };
        let mut result = Ok(());
        for frame in thread.shadow.frames() {
            // Only where our address is still in place: a frame abandoned by longjmp has
            // had its slot reused.
            if self.mem.read_u64(frame.slot).ok() == Some(trampoline) {
                if let Err(e) = self.mem.write(frame.slot, &frame.ret_addr.to_le_bytes()) {
                    result = Err(format!("restoring thread {tid}'s return address at {:#x}: {e}", frame.slot));
                }
            }
        }
        thread.shadow.clear();
        result
    }

    /// After an `exec`: the old image (and every byte we wrote) is gone; detach the thread
    /// that remains.
    pub fn exec_detach(&mut self) {
        self.out.line(b"!detached the program executed a new image, which has none of the probes\n");
        // The semaphores went with the old image too.
        self.semaphores.clear();
        for &tid in self.threads.keys() {
            let _ = sys::detach(tid, 0);
        }
        // After exec the process has one thread, whose id is the pid.
        let _ = sys::detach(self.pid, 0);
        self.threads.clear();
        self.out.flush();
    }
}

fn os(error: io::Error, what: &str) -> Error {
    Error::Os { what: what.to_string(), error }
}

/// ptrace's register block as the probe layer's [`Regs`].
pub(crate) fn to_regs(u: &UserRegs) -> Regs {
    Regs {
        r15: u.r15,
        r14: u.r14,
        r13: u.r13,
        r12: u.r12,
        r11: u.r11,
        r10: u.r10,
        r9: u.r9,
        r8: u.r8,
        rbp: u.rbp,
        rbx: u.rbx,
        rax: u.rax,
        rcx: u.rcx,
        rdx: u.rdx,
        rsi: u.rsi,
        rdi: u.rdi,
        rflags: u.eflags,
        rsp: u.rsp,
        ip: u.rip,
    }
}
