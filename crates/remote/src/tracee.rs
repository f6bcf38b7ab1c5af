//! [`Tracee`]: the threads of one process this thread has seized, their stops, registers and
//! memory.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::marker::PhantomData;
use std::ops::BitOr;
use std::time::{Duration, Instant};

use crate::diagnose;
use crate::error::{AttachError, Error, PermissionReason};
use crate::memory::Memory;
use crate::proc;
use crate::sys;

/// The general registers of a stopped thread (`PTRACE_GETREGS`).
pub type Regs = libc::user_regs_struct;

/// `PTRACE_O_*` options given to `PTRACE_SEIZE`.
///
/// Forks are not followed (no `TRACEFORK`/`TRACEVFORK`): a [`Tracee`] is one process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options(i32);

impl Options {
    /// No option: only signals and interrupts stop the threads.
    pub const NONE: Options = Options(0);
    /// New threads are traced from their first instruction; their first stop is handled
    /// by the [`Tracee`] (they just run), the parent reports [`Stop::Event`] with
    /// `PTRACE_EVENT_CLONE` and the new tid as message.
    pub const TRACECLONE: Options = Options(libc::PTRACE_O_TRACECLONE);
    /// An `execve` stops with `PTRACE_EVENT_EXEC`.
    pub const TRACEEXEC: Options = Options(libc::PTRACE_O_TRACEEXEC);
    /// A thread about to exit stops with `PTRACE_EVENT_EXIT` (its registers still readable).
    pub const TRACEEXIT: Options = Options(libc::PTRACE_O_TRACEEXIT);
    /// The traced process is killed (`SIGKILL`) if the tracer exits without detaching.
    /// Not for injection, where the target must outlive us.
    pub const EXITKILL: Options = Options(libc::PTRACE_O_EXITKILL);

    /// The raw `PTRACE_O_*` bits.
    pub fn bits(self) -> i32 {
        self.0
    }
}

impl BitOr for Options {
    type Output = Options;
    fn bitor(self, other: Options) -> Options {
        Options(self.0 | other.0)
    }
}

/// Why a thread is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Signal-delivery-stop: the thread is about to receive `signal`. Resuming it with
    /// `signal` delivers it (with its original `siginfo`), with 0 suppresses it.
    Signal {
        /// The signal number.
        signal: i32,
        /// `si_code`: > 0 when the kernel sent it (a fault, a trap), ≤ 0 from a process.
        code: i32,
        /// `si_addr` for `SIGSEGV`, `SIGBUS`, `SIGILL`, `SIGFPE` and `SIGTRAP`, else 0.
        addr: u64,
    },
    /// Stopped by [`Tracee::interrupt`] / [`Tracee::stop`] (`PTRACE_EVENT_STOP`).
    Interrupt,
    /// Group-stop: the whole process was stopped by `signal` (`SIGSTOP`, `SIGTSTP`, …).
    /// Resuming the thread lets it run anyway.
    Group {
        /// The stop signal.
        signal: i32,
    },
    /// A syscall-stop (entry or exit, ptrace(2)): only while a [`Tracee::call`] runs the
    /// called function under `PTRACE_SYSCALL`, watching for its return; never reported.
    Syscall,
    /// A `PTRACE_EVENT_*` stop (clone, exec, exit) enabled by [`Options`].
    Event {
        /// `PTRACE_EVENT_CLONE`, `PTRACE_EVENT_EXEC`, `PTRACE_EVENT_EXIT`.
        event: i32,
        /// `PTRACE_GETEVENTMSG`: the new tid, the former tid, the exit status.
        message: u64,
    },
}

/// Something that happened to a traced thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The thread stopped and stays stopped until resumed.
    Stopped {
        /// The thread.
        tid: i32,
        /// Why.
        stop: Stop,
    },
    /// The thread stopped while the [`Tracee`] was busy with it (inside [`Tracee::stop`],
    /// [`Tracee::call`] …) for a reason that was not the point of that operation, e.g. a
    /// clone event; it has been resumed past that stop already. Reported so that nothing
    /// is missed.
    Passed {
        /// The thread.
        tid: i32,
        /// The stop it went through.
        stop: Stop,
    },
    /// The thread exited with `code` (it is no longer traced).
    Exited {
        /// The thread.
        tid: i32,
        /// Its exit status.
        code: i32,
    },
    /// The thread was killed by `signal` (it is no longer traced).
    Killed {
        /// The thread.
        tid: i32,
        /// The signal.
        signal: i32,
    },
}

/// How a stopped thread is resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resume {
    /// `PTRACE_CONT`.
    Cont,
    /// `PTRACE_SINGLESTEP`.
    Step,
    /// `PTRACE_SYSCALL`: to the next syscall-stop.
    Syscall,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Stopped(Stop),
}

/// What the [`Tracee`] knows of one seized thread.
struct Thread {
    state: State,
    /// The `siginfo` of the current signal-delivery-stop.
    info: Option<libc::siginfo_t>,
    /// Signals that arrived while we were busy with the thread and were held back (their
    /// stops resumed with 0): delivered again when the thread is resumed or detached, so
    /// the program loses none.
    held: VecDeque<libc::siginfo_t>,
    /// A `PTRACE_INTERRUPT` trap is still due (we asked for a stop and another stop came
    /// first, or a new thread's first stop): its `PTRACE_EVENT_STOP` is ours, not news.
    swallow_interrupt: bool,
    /// How it was last resumed: a swallowed interrupt stop resumes it the same way, so that
    /// a call watching for syscall-stops keeps seeing them.
    resume: Resume,
}

impl Thread {
    fn new(swallow_interrupt: bool) -> Thread {
        Thread { state: State::Running, info: None, held: VecDeque::new(), swallow_interrupt, resume: Resume::Cont }
    }
}

/// The seized threads of one process.
///
/// Created by [`seize`](Tracee::seize) (every thread) or [`seize_thread`](Tracee::seize_thread)
/// (one). Threads keep running when seized (`PTRACE_SEIZE`, not `PTRACE_ATTACH`: no
/// `SIGSTOP` is sent, so the program sees nothing); [`stop`](Tracee::stop) one to read or
/// change its registers or to [`call`](Tracee::call) a function on it. Memory can be
/// read and written while threads run.
///
/// The `Tracee` keeps track of each thread's state (running or stopped, and why) and of
/// signals it had to hold back while it worked on a thread; it delivers those again when
/// the thread is resumed, so the program loses no signal.
///
/// Dropping a `Tracee` detaches every thread (see [`detach`](Tracee::detach)); if our
/// process dies instead, the kernel detaches them.
///
/// **One thread only**: Linux makes the *thread* that attached the tracer, so every
/// request must come from it; the type is neither `Send` nor `Sync`. A program that
/// wants a ptrace loop beside other work creates the `Tracee` on a dedicated thread.
pub struct Tracee {
    pid: i32,
    pub(crate) options: Options,
    threads: BTreeMap<i32, Thread>,
    /// [`Event::Passed`] events not reported yet.
    passed: VecDeque<Event>,
    /// Opened before seizing: writes go through even to read-only text.
    pub(crate) mem: Memory,
    /// A `syscall` instruction in the process, once found (see `call`).
    pub(crate) syscall_insn: Option<u64>,
    /// Where calls write their return stub, once found (see `call`).
    pub(crate) stub_site: Option<crate::call::StubSite>,
    /// The files of the modules the return stub may go into (see `call`), when not any.
    pub(crate) stub_only_in: Option<Vec<String>>,
    _one_thread: PhantomData<*const ()>,
}

/// Polls with growing pauses until a deadline: `waitpid` has no timeout, and a blocking
/// wait would also reap events of threads we are not asking about.
struct Pacer {
    deadline: Instant,
    pause: Duration,
}

impl Pacer {
    fn new(timeout: Duration) -> Pacer {
        Pacer { deadline: Instant::now() + timeout, pause: Duration::from_micros(5) }
    }

    /// Sleeps a little; false once the deadline has passed.
    fn wait(&mut self) -> bool {
        let now = Instant::now();
        if now >= self.deadline {
            return false;
        }
        std::thread::sleep(self.pause.min(self.deadline - now));
        self.pause = (self.pause * 2).min(Duration::from_millis(1));
        true
    }
}

impl Tracee {
    /// Seizes every thread of process `pid` (threads started meanwhile too: the thread list
    /// is read again until it holds no new thread). Threads keep running.
    pub fn seize(pid: i32, options: Options) -> Result<Tracee, AttachError> {
        let mut tracee = Tracee::seize_thread(pid, pid, options)?;
        loop {
            let tids = proc::threads(pid).map_err(|_| diagnose::vanished(pid, pid))?;
            let new: Vec<i32> = tids.into_iter().filter(|t| !tracee.threads.contains_key(t)).collect();
            if new.is_empty() {
                return Ok(tracee);
            }
            for tid in new {
                match tracee.seize_more(tid) {
                    // A thread that exited between listing and seizing is no loss.
                    Err(AttachError::NotAThreadOf { .. }) | Err(AttachError::Exited { .. }) if proc::exists(pid) => {
                        continue
                    }
                    // Created since by a thread seized with PTRACE_O_TRACECLONE, which made
                    // this thread ours already (it starts in a PTRACE_EVENT_STOP, ptrace(2)
                    // "Attaching and detaching"): adopted as seized.
                    Err(AttachError::NotPermitted {
                        reason: PermissionReason::AlreadyTraced { tracer_pid, .. },
                        ..
                    }) if tracer_pid == sys::gettid() => {
                        tracee.threads.insert(tid, Thread::new(false));
                    }
                    other => other?,
                }
            }
        }
    }

    /// Seizes only thread `tid` of process `pid` (`tid == pid` for the main thread); the
    /// others are not touched and keep running untraced.
    pub fn seize_thread(pid: i32, tid: i32, options: Options) -> Result<Tracee, AttachError> {
        if !proc::exists(pid) {
            return Err(AttachError::NoSuchProcess { pid });
        }
        // Opened before seizing (it takes the same permission check), so that a failure
        // leaves nothing to undo.
        let mem = Memory::open(pid).map_err(|error| {
            match (error.kind(), error.raw_os_error()) {
                (io::ErrorKind::PermissionDenied, _) => diagnose::not_permitted(pid, tid),
                // ESRCH: a zombie has no memory any more.
                (io::ErrorKind::NotFound, _) | (_, Some(libc::ESRCH)) => diagnose::vanished(pid, tid),
                _ => AttachError::Os { tid, op: "opening /proc/PID/mem", error },
            }
        })?;
        seize_one(pid, tid, options)?;
        let mut threads = BTreeMap::new();
        threads.insert(tid, Thread::new(false));
        Ok(Tracee {
            pid,
            options,
            threads,
            passed: VecDeque::new(),
            mem,
            syscall_insn: None,
            stub_site: None,
            stub_only_in: None,
            _one_thread: PhantomData,
        })
    }

    /// Seizes one more thread of the process.
    pub fn seize_more(&mut self, tid: i32) -> Result<(), AttachError> {
        if self.threads.contains_key(&tid) {
            return Ok(());
        }
        seize_one(self.pid, tid, self.options)?;
        self.threads.insert(tid, Thread::new(false));
        Ok(())
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The seized threads, in tid order.
    pub fn threads(&self) -> Vec<i32> {
        self.threads.keys().copied().collect()
    }

    /// Why `tid` is stopped, `None` while it runs.
    pub fn stop_of(&self, tid: i32) -> Result<Option<Stop>, Error> {
        Ok(match self.thread(tid)?.state {
            State::Running => None,
            State::Stopped(stop) => Some(stop),
        })
    }

    /// Asks running thread `tid` to stop (`PTRACE_INTERRUPT`); the stop is then reported by
    /// [`wait_thread`](Self::wait_thread) / [`wait_any`](Self::wait_any) as
    /// [`Stop::Interrupt`] (or, if something else stopped it first, as that). Prefer
    /// [`stop`](Self::stop), which waits too.
    pub fn interrupt(&mut self, tid: i32) -> Result<(), Error> {
        let thread = self.thread_mut(tid)?;
        if thread.swallow_interrupt {
            // One is due already: it is the caller's now.
            thread.swallow_interrupt = false;
            return Ok(());
        }
        sys::interrupt(tid).map_err(|error| Error::Ptrace { tid, op: "PTRACE_INTERRUPT", error })
    }

    /// Stops thread `tid` and returns why it is stopped: [`Stop::Interrupt`] normally; if
    /// it was stopped already or something else stopped it first (a signal, an event),
    /// that stop, which the caller then handles as if it came from a wait.
    pub fn stop(&mut self, tid: i32, timeout: Duration) -> Result<Stop, Error> {
        if let State::Stopped(stop) = self.thread(tid)?.state {
            return Ok(stop);
        }
        self.interrupt(tid)?;
        let stop = self.next_stop(tid, &mut Pacer::new(timeout), "stop after PTRACE_INTERRUPT")?;
        if !matches!(stop, Stop::Interrupt | Stop::Group { .. }) {
            self.thread_mut(tid)?.swallow_interrupt = true;
        }
        Ok(stop)
    }

    /// Stops every seized thread (see [`stop`](Self::stop)); the stops are read back with
    /// [`stop_of`](Self::stop_of).
    pub fn stop_all(&mut self, timeout: Duration) -> Result<(), Error> {
        let tids = self.threads();
        // Interrupt them all first, so they stop in parallel.
        for &tid in &tids {
            if self.thread(tid)?.state == State::Running {
                self.interrupt(tid)?;
            }
        }
        for tid in tids {
            match self.stop(tid, timeout) {
                Ok(_) => {}
                // A thread that exits while stopping is simply gone.
                Err(Error::Exited { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The next event of thread `tid`: an [`Event::Passed`] not yet reported, else its
    /// current stop if it is stopped, else whatever it does next (waiting up to `timeout`).
    pub fn wait_thread(&mut self, tid: i32, timeout: Duration) -> Result<Event, Error> {
        if let Some(i) = self.passed.iter().position(|e| event_tid(e) == tid) {
            return Ok(self.passed.remove(i).expect("index from position"));
        }
        if let State::Stopped(stop) = self.thread(tid)?.state {
            return Ok(Event::Stopped { tid, stop });
        }
        let mut pacer = Pacer::new(timeout);
        loop {
            if let Some(event) = self.poll(tid)? {
                return Ok(event);
            }
            if !pacer.wait() {
                return Err(Error::Timeout { tid: Some(tid), what: "event", after: timeout });
            }
        }
    }

    /// The next event of any seized thread, waiting up to `timeout`: unreported
    /// [`Event::Passed`] events first, then stops, exits and kills as they happen.
    /// Threads already stopped are not looked at (their stop was reported).
    pub fn wait_any(&mut self, timeout: Duration) -> Result<Event, Error> {
        if let Some(event) = self.passed.pop_front() {
            return Ok(event);
        }
        let mut pacer = Pacer::new(timeout);
        loop {
            let running: Vec<i32> =
                self.threads.iter().filter(|(_, t)| t.state == State::Running).map(|(&tid, _)| tid).collect();
            if running.is_empty() {
                return Err(Error::NothingRunning);
            }
            for tid in running {
                match self.poll(tid) {
                    Ok(Some(event)) => return Ok(event),
                    Ok(None) => {}
                    Err(Error::Exited { tid, how }) if how == GONE => {
                        return Ok(Event::Exited { tid, code: 0 });
                    }
                    Err(e) => return Err(e),
                }
            }
            if let Some(event) = self.passed.pop_front() {
                return Ok(event);
            }
            if !pacer.wait() {
                return Err(Error::Timeout { tid: None, what: "event", after: timeout });
            }
        }
    }

    /// The general registers of stopped thread `tid`.
    pub fn regs(&self, tid: i32) -> Result<Regs, Error> {
        self.stopped(tid)?;
        sys::get_regs(tid).map_err(|error| Error::Ptrace { tid, op: "PTRACE_GETREGS", error })
    }

    /// Sets the general registers of stopped thread `tid`.
    ///
    /// To make a thread stopped inside an interrupted system call run code of ours, set
    /// `orig_rax` to `u64::MAX` (-1), or the kernel "restarts" the call by moving `rip`
    /// back over the `syscall` instruction when the thread resumes.
    pub fn set_regs(&mut self, tid: i32, regs: &Regs) -> Result<(), Error> {
        self.stopped(tid)?;
        sys::set_regs(tid, regs).map_err(|error| Error::Ptrace { tid, op: "PTRACE_SETREGS", error })
    }

    /// The whole XSAVE area of stopped thread `tid` (x87, SSE, AVX, AVX-512 …), opaque
    /// bytes to give back to [`set_vector_state`](Self::set_vector_state).
    pub fn vector_state(&self, tid: i32) -> Result<Vec<u8>, Error> {
        self.stopped(tid)?;
        sys::get_xstate(tid).map_err(|error| Error::Ptrace { tid, op: "PTRACE_GETREGSET(NT_X86_XSTATE)", error })
    }

    /// Restores an XSAVE area read by [`vector_state`](Self::vector_state).
    pub fn set_vector_state(&mut self, tid: i32, xstate: &[u8]) -> Result<(), Error> {
        self.stopped(tid)?;
        sys::set_xstate(tid, xstate).map_err(|error| Error::Ptrace {
            tid,
            op: "PTRACE_SETREGSET(NT_X86_XSTATE)",
            error,
        })
    }

    /// Reads `buf.len()` bytes at `addr` (threads may be running): `process_vm_readv`, and
    /// `/proc/PID/mem` for what that cannot read (pages without read permission).
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        let len = buf.len();
        self.mem.read(addr, buf).map_err(|error| Error::Memory { op: "read", addr, len, error })
    }

    /// Reads a NUL-terminated string at `addr`, at most `max` bytes (without the NUL; the
    /// result is cut there if no NUL comes first).
    pub fn read_c_string(&self, addr: u64, max: usize) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 256];
        while out.len() < max {
            let at = addr + out.len() as u64;
            // Never read across a page boundary in one go: the string may end just before
            // an unmapped page.
            let to_page_end = 4096 - (at % 4096) as usize;
            let n = chunk.len().min(to_page_end).min(max - out.len());
            self.read_memory(at, &mut chunk[..n])?;
            match chunk[..n].iter().position(|&b| b == 0) {
                Some(end) => {
                    out.extend_from_slice(&chunk[..end]);
                    return Ok(out);
                }
                None => out.extend_from_slice(&chunk[..n]),
            }
        }
        Ok(out)
    }

    /// Writes `data` at `addr` through `/proc/PID/mem`, which writes even to read-only
    /// mappings (the text of a program, as a debugger does: a private copy of the page).
    ///
    /// It does not make other threads see the change atomically: patching code that
    /// running threads may execute needs the int3-first protocol (crate `text`).
    pub fn write_memory(&self, addr: u64, data: &[u8]) -> Result<(), Error> {
        self.mem.write(addr, data).map_err(|error| Error::Memory { op: "write", addr, len: data.len(), error })
    }

    /// Resumes stopped thread `tid` (`PTRACE_CONT`). `signal` is delivered if the thread is
    /// in a signal-delivery-stop (0 suppresses that stop's signal). Signals the `Tracee`
    /// held back are delivered too (the first with this resume, when `signal` is 0 and the
    /// stop allows it; the others are sent again with `tgkill`/`rt_tgsigqueueinfo` and come
    /// back as new signal-delivery-stops).
    pub fn cont(&mut self, tid: i32, signal: i32) -> Result<(), Error> {
        let signal = self.release_held(tid, signal)?;
        self.resume_raw(tid, signal, Resume::Cont)
    }

    /// Executes one instruction of stopped thread `tid` (`PTRACE_SINGLESTEP`); it then
    /// stops with `SIGTRAP`. `signal` and held signals as in [`cont`](Self::cont) (a
    /// delivered signal runs its handler first, and the step stops at the handler's first
    /// instruction).
    pub fn step(&mut self, tid: i32, signal: i32) -> Result<(), Error> {
        let signal = self.release_held(tid, signal)?;
        self.resume_raw(tid, signal, Resume::Step)
    }

    /// Detaches thread `tid`, stopping it first if it runs; held signals are delivered,
    /// and so is a signal that stopped it on the way. The signal of a signal-delivery-stop
    /// the caller has not resumed is suppressed.
    pub fn detach_thread(&mut self, tid: i32) -> Result<(), Error> {
        let was_running = matches!(self.thread(tid).map(|t| t.state), Ok(State::Running));
        let result = self.stop(tid, Duration::from_secs(1)).and_then(|stop| {
            let arrived = match stop {
                Stop::Signal { signal, .. } if was_running => signal,
                _ => 0,
            };
            self.release_held(tid, arrived)
        });
        let signal = match result {
            Ok(signal) => signal,
            Err(Error::Exited { .. }) | Err(Error::NotTraced { .. }) => {
                self.threads.remove(&tid);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.threads.remove(&tid);
        match sys::detach(tid, signal) {
            // Gone meanwhile (killed): nothing left to detach.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other.map_err(|error| Error::Ptrace { tid, op: "PTRACE_DETACH", error }),
        }
    }

    /// Hands the seized threads over to a caller that runs its own `ptrace` loop (with the
    /// raw requests of [`sys`](crate::sys)), without detaching them: each thread with its
    /// stop, `None` for one that runs (a new thread whose first stop is not reported yet).
    ///
    /// What the caller takes over:
    /// - a thread in a [`Stop::Signal`] is resumed with that signal to deliver it (0
    ///   suppresses it), as with [`cont`](Self::cont);
    /// - signals this `Tracee` held back during a [`call`](Self::call) are sent again now
    ///   (as [`cont`](Self::cont) would), and come back as signal-delivery-stops;
    /// - a `PTRACE_INTERRUPT` this `Tracee` sent whose stop has not come yet (another stop
    ///   came first, or a new thread's first stop) arrives later as a `PTRACE_EVENT_STOP`
    ///   nobody asked for;
    /// - unreported [`Event::Passed`] events are dropped (they happened already).
    ///
    /// The threads stay traced by the calling thread; the caller detaches them
    /// (`PTRACE_DETACH`), or the kernel does when our process exits.
    pub fn into_threads(mut self) -> Vec<(i32, Option<Stop>)> {
        let threads = std::mem::take(&mut self.threads);
        let mut out = Vec::with_capacity(threads.len());
        for (tid, thread) in threads {
            for info in &thread.held {
                // Fails only for a thread that is gone, which needs the signal no more.
                let _ = resend(self.pid, tid, info);
            }
            let stop = match thread.state {
                State::Running => None,
                State::Stopped(stop) => Some(stop),
            };
            out.push((tid, stop));
        }
        // Dropping `self` now detaches nothing: its thread list is empty.
        out
    }

    /// Detaches every thread (see [`detach_thread`](Self::detach_thread)); the first error
    /// is returned after trying all. The bytes a call's return stub was written over are
    /// put back first (best effort: see [`release_return_stub`](Self::release_return_stub)
    /// for the error).
    pub fn detach(mut self) -> Result<(), Error> {
        self.detach_all()
    }

    fn detach_all(&mut self) -> Result<(), Error> {
        let _ = self.release_return_stub();
        let mut first = None;
        for tid in self.threads() {
            if let Err(e) = self.detach_thread(tid) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    // ---- for the other modules of the crate ----

    /// The stop of `tid`, or [`Error::NotStopped`].
    pub(crate) fn stopped(&self, tid: i32) -> Result<Stop, Error> {
        match self.thread(tid)?.state {
            State::Stopped(stop) => Ok(stop),
            State::Running => Err(Error::NotStopped { tid }),
        }
    }

    /// The `siginfo` of `tid`'s current signal-delivery-stop.
    pub(crate) fn stop_info(&self, tid: i32) -> Result<Option<libc::siginfo_t>, Error> {
        Ok(self.thread(tid)?.info)
    }

    /// Makes `info` the signal of `tid`'s current signal-delivery-stop again (after a call
    /// changed it).
    pub(crate) fn restore_stop(&mut self, tid: i32, stop: Stop, info: Option<libc::siginfo_t>) -> Result<(), Error> {
        if let Some(info) = &info {
            sys::set_siginfo(tid, info).map_err(|error| Error::Ptrace { tid, op: "PTRACE_SETSIGINFO", error })?;
        }
        let thread = self.thread_mut(tid)?;
        thread.state = State::Stopped(stop);
        thread.info = info;
        Ok(())
    }

    /// Holds the signal of `tid`'s current signal-delivery-stop back, for delivery when the
    /// thread is resumed by the caller.
    pub(crate) fn hold_signal(&mut self, tid: i32) -> Result<(), Error> {
        let thread = self.thread_mut(tid)?;
        if let Some(info) = thread.info.take() {
            thread.held.push_back(info);
        }
        Ok(())
    }

    /// Records that `tid` went through `stop` while we were busy with it.
    pub(crate) fn pass(&mut self, tid: i32, stop: Stop) {
        self.passed.push_back(Event::Passed { tid, stop });
    }

    /// Resumes `tid` without delivering held signals.
    pub(crate) fn resume_raw(&mut self, tid: i32, signal: i32, how: Resume) -> Result<(), Error> {
        self.stopped(tid)?;
        let (op, result) = match how {
            Resume::Cont => ("PTRACE_CONT", sys::cont(tid, signal)),
            Resume::Step => ("PTRACE_SINGLESTEP", sys::single_step(tid, signal)),
            Resume::Syscall => ("PTRACE_SYSCALL", sys::syscall_resume(tid, signal)),
        };
        result.map_err(|error| Error::Ptrace { tid, op, error })?;
        let thread = self.thread_mut(tid)?;
        thread.state = State::Running;
        thread.info = None;
        thread.resume = how;
        Ok(())
    }

    /// Sends `PTRACE_INTERRUPT` to `tid` now, stopped or not, for a stop the caller waits
    /// for. An interrupt of ours still due merges with it (the kernel keeps one pending
    /// STOP trap, and any other ptrace stop clears it: `ptrace_stop` in kernel/signal.c),
    /// so exactly one interrupt stop comes, and it is the caller's.
    pub(crate) fn interrupt_now(&mut self, tid: i32) -> Result<(), Error> {
        self.thread_mut(tid)?.swallow_interrupt = false;
        sys::interrupt(tid).map_err(|error| Error::Ptrace { tid, op: "PTRACE_INTERRUPT", error })
    }

    /// Waits for `tid`'s next stop (events of other threads stay queued in the kernel).
    pub(crate) fn next_stop_within(&mut self, tid: i32, timeout: Duration, what: &'static str) -> Result<Stop, Error> {
        self.next_stop(tid, &mut Pacer::new(timeout), what).map_err(|e| match e {
            Error::Timeout { tid, what, .. } => Error::Timeout { tid, what, after: timeout },
            e => e,
        })
    }

    // ---- internals ----

    fn thread(&self, tid: i32) -> Result<&Thread, Error> {
        self.threads.get(&tid).ok_or(Error::NotTraced { tid })
    }

    fn thread_mut(&mut self, tid: i32) -> Result<&mut Thread, Error> {
        self.threads.get_mut(&tid).ok_or(Error::NotTraced { tid })
    }

    fn next_stop(&mut self, tid: i32, pacer: &mut Pacer, what: &'static str) -> Result<Stop, Error> {
        loop {
            match self.poll(tid)? {
                Some(Event::Stopped { stop, .. }) => return Ok(stop),
                Some(Event::Exited { code, .. }) => {
                    return Err(Error::Exited { tid, how: format!("exit status {code}") })
                }
                Some(Event::Killed { signal, .. }) => {
                    return Err(Error::Exited { tid, how: format!("killed by signal {signal}") })
                }
                Some(Event::Passed { .. }) | None => {}
            }
            if !pacer.wait() {
                return Err(Error::Timeout { tid: Some(tid), what, after: Duration::ZERO });
            }
        }
    }

    /// One non-blocking `waitpid` for `tid`, its result decoded and recorded.
    fn poll(&mut self, tid: i32) -> Result<Option<Event>, Error> {
        let status = match sys::waitpid(tid, true) {
            Ok(Some((_, status))) => status,
            Ok(None) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                // Not our tracee any more (reaped by someone else, or its tid changed in
                // an exec by another thread).
                self.threads.remove(&tid);
                return Err(Error::Exited { tid, how: GONE.to_string() });
            }
            Err(error) => return Err(Error::Ptrace { tid, op: "waitpid", error }),
        };
        if libc::WIFEXITED(status) {
            self.threads.remove(&tid);
            return Ok(Some(Event::Exited { tid, code: libc::WEXITSTATUS(status) }));
        }
        if libc::WIFSIGNALED(status) {
            self.threads.remove(&tid);
            return Ok(Some(Event::Killed { tid, signal: libc::WTERMSIG(status) }));
        }
        if !libc::WIFSTOPPED(status) {
            return Ok(None);
        }
        let signal = libc::WSTOPSIG(status);
        let event = (status >> 16) & 0xff;
        let mut info = None;
        let stop = match event {
            // PTRACE_O_TRACESYSGOOD marks syscall-stops apart from a real SIGTRAP.
            0 if signal == libc::SIGTRAP | 0x80 => Stop::Syscall,
            0 => {
                let si =
                    sys::get_siginfo(tid).map_err(|error| Error::Ptrace { tid, op: "PTRACE_GETSIGINFO", error })?;
                info = Some(si);
                Stop::Signal { signal, code: si.si_code, addr: fault_addr(&si) }
            }
            libc::PTRACE_EVENT_STOP => match signal {
                libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU => Stop::Group { signal },
                _ => Stop::Interrupt,
            },
            event => {
                let message =
                    sys::event_msg(tid).map_err(|error| Error::Ptrace { tid, op: "PTRACE_GETEVENTMSG", error })?;
                if event == libc::PTRACE_EVENT_CLONE {
                    // The new thread is traced already; its first stop is an interrupt
                    // stop nobody asked for.
                    self.threads.entry(message as i32).or_insert_with(|| Thread::new(true));
                }
                Stop::Event { event, message }
            }
        };
        let thread = self.thread_mut(tid)?;
        thread.state = State::Stopped(stop);
        thread.info = info;
        if stop == Stop::Interrupt && thread.swallow_interrupt {
            thread.swallow_interrupt = false;
            let how = thread.resume;
            self.resume_raw(tid, 0, how)?;
            return Ok(None);
        }
        Ok(Some(Event::Stopped { tid, stop }))
    }

    /// The signal to resume `tid` with: `signal` if not 0, else the first held signal when
    /// the stop can deliver one; the held signals not delivered that way are sent again.
    fn release_held(&mut self, tid: i32, signal: i32) -> Result<i32, Error> {
        let pid = self.pid;
        let stop = self.stopped(tid)?;
        let thread = self.thread_mut(tid)?;
        let mut held = std::mem::take(&mut thread.held);
        let mut deliver = signal;
        if signal == 0 && matches!(stop, Stop::Signal { .. }) {
            if let Some(first) = held.pop_front() {
                sys::set_siginfo(tid, &first).map_err(|error| Error::Ptrace { tid, op: "PTRACE_SETSIGINFO", error })?;
                deliver = first.si_signo;
            }
        }
        for info in held {
            resend(pid, tid, &info).map_err(|error| Error::Ptrace { tid, op: "re-sending a held signal", error })?;
        }
        Ok(deliver)
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        let _ = self.detach_all();
    }
}

/// How [`Error::Exited`] says a thread vanished from `waitpid`.
const GONE: &str = "no longer traced: exited and reaped, or replaced by an exec";

fn event_tid(event: &Event) -> i32 {
    match *event {
        Event::Stopped { tid, .. }
        | Event::Passed { tid, .. }
        | Event::Exited { tid, .. }
        | Event::Killed { tid, .. } => tid,
    }
}

/// `si_addr` of a fault or trap signal.
fn fault_addr(info: &libc::siginfo_t) -> u64 {
    match info.si_signo {
        // SAFETY: for these signals the kernel fills the `_sigfault` member of the union,
        // whose first field `si_addr` reads.
        libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGTRAP => unsafe { info.si_addr() as u64 },
        _ => 0,
    }
}

/// Sends a held signal again: with its whole `siginfo` when the kernel allows that from
/// another process (a `sigqueue` payload, `si_code < 0` but not `SI_TKILL`), else as a
/// plain `tgkill` (the sender's pid and the fault address are lost, the signal is not).
pub(crate) fn resend(pid: i32, tid: i32, info: &libc::siginfo_t) -> io::Result<()> {
    const SI_TKILL: i32 = -6;
    if info.si_code < 0 && info.si_code != SI_TKILL {
        sys::rt_tgsigqueueinfo(pid, tid, info)
    } else {
        sys::tgkill(pid, tid, info.si_signo)
    }
}

/// `PTRACE_SEIZE` of one thread, with the reason when refused.
fn seize_one(pid: i32, tid: i32, options: Options) -> Result<(), AttachError> {
    if tid <= 0 || pid <= 0 {
        return Err(AttachError::NoSuchProcess { pid });
    }
    if !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists() {
        return Err(diagnose::vanished(pid, tid));
    }
    sys::seize(tid, options.bits()).map_err(|error| match error.raw_os_error() {
        Some(libc::EPERM) => diagnose::not_permitted(pid, tid),
        Some(libc::ESRCH) => diagnose::vanished(pid, tid),
        _ => AttachError::Os { tid, op: "PTRACE_SEIZE", error },
    })
}
