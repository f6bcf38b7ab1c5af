//! The tracer: every thread of the target under `ptrace`, each hit handled from outside.
//!
//! A hit is: the thread executes our `int3` → `SIGTRAP` signal-delivery-stop → we read its
//! registers, write the event line, point `rip` at the site's out-of-line slot (the original
//! instruction relocated, then a jump back: "boosted", so no single-step) and resume it with
//! the signal suppressed. A return probe's entry also swaps the return address at `[rsp]`
//! for the fallback page's trampoline `int3`, whose hit writes the return event and resumes
//! the thread at the original return address.
//!
//! A `SIGTRAP` that is not ours is delivered under the program's own action, which the
//! fallback handler stands in for while probes are placed (see [`crate::fallback`]).
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
use dynprobe_remote::{deliverable_signal_pending, signal_mask, sys, thread_signal_pending, Memory, Regs as UserRegs};
use dynprobe_text::stop::RESTARTABLE_WAITS;

use crate::control::Control;
use crate::fallback::Fallback;
use crate::output::Output;
use crate::scratch::SlotArea;
use crate::shadow::{Instance, ShadowStack};
use crate::spawn::remote_syscall;
use crate::{Error, ExitInfo, Outcome};

/// `si_code` of a `SIGTRAP` raised by an `int3` (the kernel's `SI_KERNEL`).
const SI_KERNEL: i32 = 0x80;

/// The `syscall` instruction.
const SYSCALL: [u8; 2] = [0x0f, 0x05];

/// One patched address and the probes that share it (the kernels' aggregate probe).
#[derive(Debug)]
pub(crate) struct Site {
    /// The probed instruction's address.
    pub addr: u64,
    /// The bytes our `int3`s replaced: the run (see `place::RUN`).
    pub orig: Vec<u8>,
    /// The out-of-line slot.
    pub slot: u64,
    /// Indices of the entry (`p`) probes here.
    pub entries: Vec<usize>,
    /// Indices of the return (`r`) probes here.
    pub returns: Vec<usize>,
}

impl Site {
    /// Puts the original bytes back where our `int3`s still are: the rest of the run first,
    /// then its first byte, so that no thread enters a half-restored run.
    pub fn restore(&self, mem: &Memory) -> io::Result<()> {
        let traps = vec![INT3; self.orig.len()];
        mem.replace(self.addr + 1, &traps[1..], &self.orig[1..])?;
        mem.replace(self.addr, &traps[..1], &self.orig[..1])
    }
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
    /// Whether it hit one of our `int3`s before (see [`Tracer::keep_fallback`]).
    pub hit_before: bool,
}

impl Thread {
    pub fn new(state: State) -> Thread {
        Thread { state, shadow: ShadowStack::default(), hit_before: false }
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
    /// Instructions inside a site's run past its first, and where they are in the slot.
    pub inside: HashMap<u64, u64>,
    /// The slot areas, one per region of probed code.
    pub areas: Vec<SlotArea>,
    /// The trampoline and the in-target `SIGTRAP` handler, once mapped.
    pub fallback: Option<Fallback>,
    /// A `syscall` instruction of the target's, for system calls made on its threads.
    pub syscall_insn: u64,
    /// Wait statuses consumed outside the main loop (a thread that died while we stepped
    /// it), handled before the next `waitpid`.
    deferred: Vec<(i32, i32)>,
    pub threads: HashMap<i32, Thread>,
    pub out: Output,
    pub target: ProcMemory,
    pub info: ExitInfo,
    /// The marker semaphores raised (one count each), lowered at detach.
    pub semaphores: Vec<u64>,
    /// Whether an `exec` of the process ends [`run`](Self::run) with the thread left in its
    /// exec stop (a started program: the session goes on in the new image) rather than
    /// detaching.
    pub follow_exec: bool,
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
            inside: HashMap::new(),
            areas: Vec::new(),
            fallback: None,
            syscall_insn: 0,
            deferred: Vec::new(),
            threads,
            out,
            target: ProcMemory { pid },
            info: ExitInfo::default(),
            semaphores: Vec::new(),
            follow_exec: false,
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
            let event = match self.deferred.pop() {
                Some(stop) => Ok(Some(stop)),
                None => sys::waitpid(-1, true),
            };
            let event = match event {
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
                Flow::Exec if self.follow_exec => return Ok(Outcome::Exec),
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
            if let Some(mut thread) = self.threads.remove(&tid) {
                // Its stack is gone: only the table entries are freed.
                let frames = thread.shadow.take();
                self.free_returns(&frames);
            }
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
                    // Its first stop may have been reported already — and a short-lived
                    // thread's whole life, its exit included, before its creator reached
                    // this stop: a thread we reaped is not listed in /proc any more, and
                    // must not be waited for (stop_all would wait for it forever).
                    if std::path::Path::new(&format!("/proc/{}/task/{new}", self.pid)).exists() {
                        self.threads.entry(new as i32).or_insert_with(|| Thread::new(State::Running));
                    }
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
                    if !group_stop {
                        // Our PTRACE_INTERRUPT's stop (a group-stop is the program's own
                        // job control, which cuts the same calls short without us).
                        put_back_cut_call(self.pid, tid);
                    }
                    self.settle(tid, 0, mode);
                }
            }
            0 if sig == libc::SIGTRAP => {
                let handled = self.on_trap(tid)?;
                if handled {
                    self.keep_fallback(tid);
                }
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
        if signal == libc::SIGTRAP && self.fallback.as_ref().is_some_and(|f| f.installed) {
            self.deliver_foreign_trap(tid);
        } else {
            // ESRCH: the thread died meanwhile (killed with its process); its exit report follows.
            let _ = sys::cont(tid, signal);
        }
        self.set_state(tid, State::Running);
    }

    /// Makes system call `nr` on stopped thread `tid` (see [`remote_syscall`]).
    pub fn syscall(&self, tid: i32, nr: i64, args: [u64; 6]) -> io::Result<u64> {
        let ret = remote_syscall(self.pid, tid, self.syscall_insn, nr as u64, args)?;
        if (ret as i64) < 0 && (ret as i64) > -4096 {
            return Err(io::Error::from_raw_os_error(-(ret as i64) as i32));
        }
        Ok(ret)
    }

    /// Delivers the `SIGTRAP` thread `tid` is stopped with, which is not ours, under the
    /// program's own action rather than the fallback handler standing in for it: that
    /// action is put back, the signal delivered with a single step — the kernel stops the
    /// thread again as soon as the handler's frame is set up (`signal_setup_done` in
    /// `kernel/signal.c` reports a stepping thread) — and our handler installed again. A
    /// program without a handler of its own dies of the signal, as it would untraced.
    fn deliver_foreign_trap(&mut self, tid: i32) {
        let info = sys::get_siginfo(tid);
        if info.is_err() || self.program_action_back(tid).is_err() {
            // The thread is gone (its exit report follows), or the action cannot be
            // changed: deliver it as it is.
            let _ = sys::cont(tid, libc::SIGTRAP);
            return;
        }
        let Some(fallback) = &self.fallback else { return };
        let reinstall = fallback.reinstall_args();
        let info = info.expect("checked above");
        let _ = sys::set_siginfo(tid, &info);
        let mut signal = libc::SIGTRAP;
        let mut held = Vec::new();
        loop {
            if sys::single_step(tid, signal).is_err() {
                return;
            }
            signal = 0;
            let Ok(status) = sys::wait_thread(tid) else { return };
            if !libc::WIFSTOPPED(status) {
                // It died of it (the default action): the main loop hears of it.
                self.deferred.push((tid, status));
                return;
            }
            let sig = libc::WSTOPSIG(status);
            if status >> 16 == 0 && sig != libc::SIGTRAP {
                held.push(sig);
                continue;
            }
            break;
        }
        let _ = self.syscall(tid, libc::SYS_rt_sigaction, reinstall);
        for sig in held {
            let _ = sys::tgkill(self.pid, tid, sig);
        }
        let _ = sys::cont(tid, 0);
    }

    /// After thread `tid` hit one of our `int3`s: if a thread blocked `SIGTRAP`, the kernel reset
    /// the action's handler to `SIG_DFL` and unblocked the signal in the thread
    /// (`force_sig_info_to_task`, kernel/signal.c) — the fallback gone, a tracer killed from
    /// then on left `int3`s that killed the program (`xz -T2`, whose worker threads block
    /// every signal, with a probe on `malloc`). Seen as `SIGTRAP` missing from the caught
    /// signals (`SigCgt`), with our action so reset the current one: our action is
    /// installed again (checked as said below). The signal stays unblocked in the thread
    /// that blocked it (another
    /// thread's hit may be the one that sees the reset, and must not get it blocked), and a
    /// reset action of the program's own cannot be put back (nobody outside knows it).
    fn keep_fallback(&mut self, tid: i32) {
        if !self.fallback.as_ref().is_some_and(|f| f.installed) {
            return;
        }
        // Reading SigCgt at every hit tripled a hit's cost: it is read at a thread's first
        // hit, and at each hit of a thread that still blocks some signal — the kernel
        // unblocked only SIGTRAP, a thread that blocks nothing else now gets no check.
        let first = self.threads.get_mut(&tid).is_some_and(|t| !std::mem::replace(&mut t.hit_before, true));
        let blocks_some = crate::spawn::sig_mask(tid).map_or(true, |mask| mask != 0);
        if !(first || blocks_some) || trap_caught(self.pid) {
            return;
        }
        let (Ok(Some((_, true))), Some(fallback)) = (self.trap_action(tid), &self.fallback) else { return };
        let _ = self.syscall(tid, libc::SYS_rt_sigaction, fallback.reinstall_args());
    }

    /// The program's current `SIGTRAP` action, read on stopped thread `tid` into the
    /// fallback's scratch memory, and whether it is the fallback's; `None` without a fallback.
    fn trap_action(&self, tid: i32) -> io::Result<Option<(Vec<u8>, bool)>> {
        let Some(fallback) = &self.fallback else { return Ok(None) };
        self.syscall(tid, libc::SYS_rt_sigaction, fallback.query_args())?;
        let action = self.mem.read_vec(fallback.saved_and_replaced().1, 32)?;
        let ours = fallback.is_ours(&action);
        Ok(Some((action, ours)))
    }

    /// Makes the program's own `SIGTRAP` action the current one, on stopped thread `tid`:
    /// the saved one while ours is installed, or the one the program installed over ours
    /// since — which becomes the saved one, put back at detach.
    fn program_action_back(&mut self, tid: i32) -> io::Result<()> {
        let (Some((action, ours)), Some(fallback)) = (self.trap_action(tid)?, &self.fallback) else { return Ok(()) };
        if ours {
            self.syscall(tid, libc::SYS_rt_sigaction, fallback.restore_saved_args())?;
        } else {
            self.mem.write(fallback.saved_and_replaced().0, &action)?;
        }
        Ok(())
    }

    /// The return trampoline's address, once mapped.
    fn trampoline(&self) -> Option<u64> {
        self.fallback.as_ref().map(Fallback::trampoline)
    }

    /// Frees the return-table entries of `frames` in the target and here.
    fn free_returns(&mut self, frames: &[Instance]) {
        let Some(fallback) = &mut self.fallback else { return };
        for frame in frames {
            let _ = self.mem.write(fallback.return_entry(frame.entry), &0u64.to_le_bytes());
            fallback.give_back_return(frame.entry);
        }
    }

    /// Whether thread `tid`, stopped, sits just after one of our `int3`s with a `SIGTRAP`
    /// still queued.
    fn trap_pending(&self, tid: i32) -> bool {
        let Ok(regs) = sys::get_regs(tid) else { return false };
        let at = regs.rip.wrapping_sub(1);
        (self.site_at.contains_key(&at) || self.inside.contains_key(&at) || self.trampoline() == Some(at))
            && thread_signal_pending(self.pid, tid, libc::SIGTRAP)
    }

    /// A `SIGTRAP` stop: one of our `int3`s (handled: true) or someone else's (false).
    fn on_trap(&mut self, tid: i32) -> Result<bool, Error> {
        let mut regs = sys::get_regs(tid).map_err(|e| os(e, "reading a thread's registers"))?;
        let at = regs.rip.wrapping_sub(1);
        let ours = self.site_at.get(&at).copied();
        let trampoline = self.trampoline() == Some(at);
        let inside = self.inside.get(&at).copied();
        if ours.is_none() && !trampoline && inside.is_none() {
            return Ok(false);
        }
        if sys::get_siginfo(tid).map_err(|e| os(e, "reading a thread's signal"))?.si_code != SI_KERNEL {
            // Sent by kill/tgkill, not raised by an int3.
            return Ok(false);
        }
        let now = monotonic_ns();
        let mut returned = None;
        if let Some(to) = inside {
            // A thread that got inside a run without passing its first byte (back from a
            // signal handler that interrupted it there): on in the slot.
            regs.rip = to;
        } else if let Some(index) = ours {
            self.on_site_hit(tid, index, &mut regs, now);
        } else {
            returned = self.on_return(tid, &mut regs, now);
            if returned.is_none() {
                return Ok(false);
            }
        }
        sys::set_regs(tid, &regs).map_err(|e| os(e, "setting a thread's registers"))?;
        // Only now: should we die before the thread left the trampoline, the fallback
        // handler still finds where it returns to.
        self.free_returns(returned.as_slice());
        Ok(true)
    }

    /// An `int3` at a site: entry events, the return address swapped for return probes,
    /// and `rip` moved into the slot.
    fn on_site_hit(&mut self, tid: i32, index: usize, user: &mut UserRegs, now: u64) {
        self.info.hits += 1;
        let site = &self.sites[index];
        let mut regs = to_regs(user);
        regs.ip = site.addr;
        let xmm = self.vectors(tid, &site.entries);
        for &p in &site.entries {
            let ctx = HitContext { xmm: xmm.as_ref(), ..HitContext::entry(&regs, &self.target, tid as u64) };
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
        // The fallback's table learns the original first: if we die after the swap, the
        // target's own handler finds it there.
        let Some(fallback) = &mut self.fallback else { return };
        let trampoline = fallback.trampoline().to_le_bytes();
        let Some(entry) = fallback.take_return() else {
            self.info.missed_returns += 1;
            return;
        };
        let mut record = [0u8; 16];
        record[..8].copy_from_slice(&regs.rsp.to_le_bytes());
        record[8..].copy_from_slice(&ret_addr.to_le_bytes());
        if self.mem.write(fallback.return_entry(entry), &record).is_err() {
            fallback.give_back_return(entry);
            self.info.missed_returns += 1;
            return;
        }
        let instance = Instance { slot: regs.rsp, ret_addr, site: index, entry_ns: now, values, entry };
        let Some(thread) = self.threads.get_mut(&tid) else { return };
        let dropped = match thread.shadow.push(instance) {
            Ok(dropped) => {
                self.info.abandoned_returns += dropped.len() as u64;
                if self.mem.write(regs.rsp, &trampoline).is_err() {
                    // The stack is not writable?! Forget the instance: no return event.
                    let (instance, _) = thread.shadow.pop(regs.rsp + 8);
                    self.info.missed_returns += 1;
                    dropped.into_iter().chain(instance).collect()
                } else {
                    dropped
                }
            }
            Err(instance) => {
                self.info.missed_returns += 1;
                vec![instance]
            }
        };
        self.free_returns(&dropped);
    }

    /// The trampoline's `int3`: the return events, and `rip` back at the original return
    /// address. Returns the instance, whose table entry the caller frees once `rip` is set;
    /// `None` if the thread has none (the trap cannot be ours).
    fn on_return(&mut self, tid: i32, user: &mut UserRegs, now: u64) -> Option<Instance> {
        let thread = self.threads.get_mut(&tid)?;
        let (instance, dropped) = thread.shadow.pop(user.rsp);
        self.info.abandoned_returns += dropped.len() as u64;
        self.free_returns(&dropped);
        let instance = instance?;
        self.write_return_events(tid, user, &instance, now);
        user.rip = instance.ret_addr;
        Some(instance)
    }

    fn write_return_events(&mut self, tid: i32, user: &UserRegs, instance: &Instance, now: u64) {
        self.info.hits += 1;
        let mut regs = to_regs(user);
        regs.ip = instance.ret_addr;
        let xmm = self.vectors(tid, &self.sites[instance.site].returns);
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
                xmm: xmm.as_ref(),
            };
            self.line = Line::new();
            self.formats[p].write(&mut self.line, now, &ctx);
            self.out.line(self.line.finish());
        }
    }

    /// The low 64 bits of stopped thread `tid`'s xmm0–15 when one of the `probes` reads a
    /// vector register (`%xmm0`, a DWARF `double`), else `None` (a `PTRACE_GETFPREGS` per
    /// hit is spared); `None` too if they cannot be read (then `%xmmN` reads as a fault).
    fn vectors(&self, tid: i32, probes: &[usize]) -> Option<[u64; 16]> {
        if !probes.iter().any(|&p| self.formats[p].reads_vectors()) {
            return None;
        }
        let fp = sys::get_fpregs(tid).ok()?;
        // FXSAVE keeps each register in 16 bytes, as four 32-bit words, low word first.
        Some(std::array::from_fn(|n| u64::from(fp.xmm_space[4 * n]) | u64::from(fp.xmm_space[4 * n + 1]) << 32))
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
    /// thread's pending signal. The slot areas and the fallback page stay mapped.
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
            if let Err(e) = site.restore(&self.mem) {
                failures.push(format!("restoring {:#x}: {e}", site.addr));
            }
        }
        self.sites.clear();
        self.site_at.clear();
        self.inside.clear();
        let tids: Vec<i32> = self.threads.keys().copied().collect();
        for &tid in &tids {
            if let Err(e) = self.release_returns(tid) {
                failures.push(e);
            }
        }
        if let Some(&tid) = tids.first() {
            if let Err(e) = self.uninstall_fallback(tid) {
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
        let Some(trampoline) = self.trampoline() else { return Ok(()) };
        let Ok(mut regs) = sys::get_regs(tid) else { return Ok(()) };
        if regs.rip == trampoline {
            // It returned into the trampoline but has not trapped yet.
            let now = monotonic_ns();
            if let Some(instance) = self.on_return(tid, &mut regs, now) {
                sys::set_regs(tid, &regs).map_err(|e| format!("moving thread {tid} off the trampoline: {e}"))?;
                self.free_returns(&[instance]);
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
        let frames = thread.shadow.take();
        self.free_returns(&frames);
        result
    }

    /// Takes back every breakpoint placed so far and the fallback handler (placing was
    /// refused half-way): the original bytes, then the program's own `SIGTRAP` action, with
    /// the system call made on stopped thread `tid`.
    pub fn take_back_sites(&mut self, tid: i32) {
        for site in &self.sites {
            site.restore(&self.mem).ok();
        }
        self.sites.clear();
        self.site_at.clear();
        self.inside.clear();
        let _ = self.uninstall_fallback(tid);
    }

    /// Puts the program's own `SIGTRAP` action back, making the system call on stopped
    /// thread `tid` — unless the program installed an action of its own meanwhile, which
    /// stays.
    pub fn uninstall_fallback(&mut self, tid: i32) -> Result<(), String> {
        let Some(fallback) = &self.fallback else { return Ok(()) };
        if !fallback.installed {
            return Ok(());
        }
        let replaced = fallback.replaced_handler_addr();
        let (uninstall, reinstate) = (fallback.uninstall_args(), fallback.reinstate_replaced_args());
        let failed = |e: io::Error| format!("putting the program's SIGTRAP action back: {e}");
        self.syscall(tid, libc::SYS_rt_sigaction, uninstall).map_err(failed)?;
        if let Some(f) = &mut self.fallback {
            f.installed = false;
        }
        let action = self.mem.read_vec(replaced, 32).map_err(failed)?;
        if !self.fallback.as_ref().is_some_and(|f| f.is_ours(&action)) {
            self.syscall(tid, libc::SYS_rt_sigaction, reinstate).map_err(failed)?;
        }
        Ok(())
    }

    /// After an `exec`: the old image (and every byte we wrote) is gone; detach the thread
    /// that remains.
    pub fn exec_detach(&mut self) {
        self.out.line(format!("!detached {}\n", crate::EXEC_NOTE).as_bytes());
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

/// Whether process `pid` catches `SIGTRAP` (its `SigCgt`); true if that cannot be read.
fn trap_caught(pid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return true };
    signal_mask(&status, "SigCgt").is_none_or(|caught| caught & (1 << (libc::SIGTRAP - 1)) != 0)
}

/// Puts back a blocking system call of thread `tid`, in its interrupt stop, that our
/// `PTRACE_INTERRUPT` cut short. The interrupt wakes the thread as a signal would, and the
/// calls the kernel does not restart after a stop return `EINTR` (`epoll_wait`,
/// `sigtimedwait`, socket calls with a timeout…; signal(7), "Interruption of system calls
/// and library functions by stop signals"): a thread of the program's would see one at
/// every attach and detach. When nothing else can have cut the call short — it returned
/// `EINTR`, it is one of the waits that are the same call when made again with the same
/// registers ([`RESTARTABLE_WAITS`]; the kernel keeps the argument registers), the
/// instruction before `rip` is the `syscall` that made it, and no signal the thread does
/// not block is pending (one would be delivered next, and the call must end for its
/// handler) — `rip` goes back onto the `syscall` with `rax` its number: the kernel's own
/// restart (`regs->ax = regs->orig_ax; regs->ip -= 2`, arch/x86/kernel/signal.c). A
/// relative timeout starts over: the call lasts longer by the time it had waited.
pub(crate) fn put_back_cut_call(pid: i32, tid: i32) {
    let Ok(mut regs) = sys::get_regs(tid) else { return };
    let nr = regs.orig_rax as i64;
    if regs.rax as i64 != -i64::from(libc::EINTR) || !RESTARTABLE_WAITS.contains(&nr) {
        return;
    }
    let mut insn = [0u8; 2];
    let is_syscall = matches!(sys::read_vm(pid, regs.rip.wrapping_sub(2), &mut insn), Ok(2)) && insn == SYSCALL;
    if !is_syscall || deliverable_signal_pending(pid, tid) {
        return;
    }
    regs.rax = regs.orig_rax;
    regs.rip -= 2;
    // ESRCH: the thread is gone (killed with its process); its exit report follows.
    let _ = sys::set_regs(tid, &regs);
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
