//! Starting a program under the tracer, making a system call on a stopped thread, and the
//! per-hit benchmark.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use dynprobe::spec::ProbeSpec;
use dynprobe_arch::native::INT3;
use dynprobe_events::files::PrivateDir;
use dynprobe_remote::{sys, Memory, Options, Regs};

use crate::{Error, Outcome, Target};

/// Starts `argv` traced: forks, the child waits on a pipe until it is seized, then execs;
/// returns the child's pid once it is stopped at its `PTRACE_EVENT_EXEC` stop, before the
/// new program's first instruction.
pub(crate) fn start(argv: &[OsString], options: Options) -> Result<i32, Error> {
    let program = argv.first().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let spawn_error = |error: io::Error| Error::Spawn { program: program.clone(), error };
    if argv.is_empty() {
        return Err(spawn_error(io::Error::new(io::ErrorKind::InvalidInput, "no program given")));
    }
    let args: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| spawn_error(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let (gate_read, gate_write) = pipe().map_err(spawn_error)?;
    let (report_read, report_write) = pipe().map_err(spawn_error)?;
    // SAFETY: the child only makes async-signal-safe calls (rustix's raw close, read and
    // write; signal, execvp, _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(spawn_error(io::Error::last_os_error()));
    }
    if pid == 0 {
        drop((gate_write, report_read));
        // Returns at end of file, once the parent has seized us.
        let _ = rustix::io::read(&gate_read, &mut [0u8; 1]);
        // SAFETY: see above; the pointers stay valid (the parent's memory is copied).
        let errno = unsafe {
            // The program starts with SIGPIPE's default action, as under a shell: the
            // Rust runtime and the tracer ignore it, and ignored signals survive exec.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::execvp(ptrs[0], ptrs.as_ptr());
            *libc::__errno_location()
        };
        let _ = rustix::io::write(&report_write, &errno.to_ne_bytes());
        // SAFETY: ends the child that could not exec, running none of the parent's exit
        // handlers.
        unsafe { libc::_exit(127) };
    }
    drop((gate_read, report_write));
    let seized = sys::seize(pid, options.bits());
    // Closing the gate lets the child exec.
    drop(gate_write);
    let mut errno = [0u8; 4];
    // End of file means the exec happened (the report pipe is close-on-exec).
    let got = rustix::io::read(&report_read, &mut errno);
    drop(report_read);
    if let Err(e) = seized {
        let _ = sys::wait_thread(pid);
        return Err(Error::Os { what: format!("PTRACE_SEIZE of the new process {pid}"), error: e });
    }
    if got == Ok(4) {
        let _ = sys::wait_thread(pid);
        return Err(spawn_error(io::Error::from_raw_os_error(i32::from_ne_bytes(errno))));
    }
    let status = sys::wait_thread(pid).map_err(spawn_error)?;
    if libc::WIFSTOPPED(status) && status >> 16 == libc::PTRACE_EVENT_EXEC {
        return Ok(pid);
    }
    Err(spawn_error(io::Error::other(format!("it did not stop at its exec (wait status {status:#x})"))))
}

/// `AT_ENTRY` of the auxiliary vector (`<elf.h>`): the executable's entry point.
const AT_ENTRY: u64 = 9;

/// Runs a program stopped at its exec stop on to its own entry point (`AT_ENTRY`, read from
/// `/proc/PID/auxv`), where the dynamic loader has mapped every library it needs (its
/// `DT_NEEDED`s) and run nothing of the program yet: probes on `libc` can be placed then.
/// A static program is at its entry already. On the way, signals are delivered as they
/// come; the temporary `int3` at the entry is taken back before returning.
pub(crate) fn run_to_entry(pid: i32, program: &str) -> Result<(), Error> {
    let failed = |what: &str, error: io::Error| Error::Spawn {
        program: program.to_string(),
        error: io::Error::other(format!("{what}: {error}")),
    };
    let auxv = std::fs::read(format!("/proc/{pid}/auxv")).map_err(|e| failed("reading its auxiliary vector", e))?;
    let entry = auxv
        .chunks_exact(16)
        .map(|pair| {
            (
                u64::from_le_bytes(pair[..8].try_into().expect("8 bytes")),
                u64::from_le_bytes(pair[8..].try_into().expect("8 bytes")),
            )
        })
        .find(|&(key, _)| key == AT_ENTRY)
        .map(|(_, value)| value)
        .ok_or_else(|| failed("reading its auxiliary vector", io::Error::other("no AT_ENTRY")))?;
    let regs = sys::get_regs(pid).map_err(|e| failed("reading its registers", e))?;
    if regs.rip == entry {
        return Ok(());
    }
    let mem = Memory::open(pid).map_err(|e| failed("opening its memory", e))?;
    let orig = mem.read_vec(entry, 1).map_err(|e| failed("reading its entry point", e))?;
    mem.replace(entry, &orig, &[INT3]).map_err(|e| failed("writing a breakpoint at its entry point", e))?;
    let mut signal = 0;
    let reached = loop {
        if let Err(e) = sys::cont(pid, signal) {
            break Err(failed("resuming it", e));
        }
        let status = match sys::wait_thread(pid) {
            Ok(status) => status,
            Err(e) => break Err(failed("waiting for it", e)),
        };
        if !libc::WIFSTOPPED(status) {
            // Its loader failed (a missing library): it ended before its first instruction.
            let how = match libc::WIFEXITED(status) {
                true => format!("exited with status {}", libc::WEXITSTATUS(status)),
                false => format!("was killed by signal {}", libc::WTERMSIG(status)),
            };
            return Err(Error::Spawn {
                program: program.to_string(),
                error: io::Error::other(format!("it {how} before reaching its entry point")),
            });
        }
        signal = if status >> 16 == 0 { libc::WSTOPSIG(status) } else { 0 };
        if signal == libc::SIGTRAP && sys::get_regs(pid).is_ok_and(|r| r.rip == entry + 1) {
            break Ok(());
        }
    };
    mem.replace(entry, &[INT3], &orig).map_err(|e| failed("taking back the breakpoint at its entry point", e))?;
    reached?;
    let mut regs = sys::get_regs(pid).map_err(|e| failed("reading its registers", e))?;
    regs.rip = entry;
    sys::set_regs(pid, &regs).map_err(|e| failed("setting its registers", e))
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// Makes system call `nr` with `args` on stopped thread `tid` of process `pid`, executing
/// the `syscall` instruction at `insn` (one already in the process, found by
/// [`dynprobe_remote::find_syscall_instruction`]: nothing is written into code). No other
/// thread may run. Registers are restored afterwards; signals that arrive meanwhile are
/// sent again. Returns the raw result (`-errno` on failure).
///
/// This is `Tracee::syscall` of `dynprobe-remote` without a `Tracee`, which this crate
/// cannot use here: a started program is seized by a raw `PTRACE_SEIZE` before its
/// `execve` (a `Tracee`'s `/proc/PID/mem` opened then would belong to the old image) and
/// stands in its `PTRACE_EVENT_EXEC` stop, which `Tracee::syscall` refuses; an attached
/// program's threads belong to the tracer's `waitpid(-1)` loop by now.
///
/// A thread stopped *inside* a system call of its own — at a ptrace event the call reports
/// before it returns: `PTRACE_EVENT_CLONE` in the middle of `clone3`, whose child exists
/// already, or the exec stop — is first let out of that call ([`finish_syscall`]). Its
/// registers at the event are the call's entry state (`rax` = `-ENOSYS`): saved there and
/// put back, they made the call return `-ENOSYS` to the program after it had done its work,
/// and glibc's `pthread_create` then falls back to `clone` and starts the same thread a
/// second time, on the same stack — the two corrupt each other's frames until one returns
/// to address 0.
pub(crate) fn remote_syscall(pid: i32, tid: i32, insn: u64, nr: u64, args: [u64; 6]) -> io::Result<u64> {
    let mut signals = Vec::new();
    if stopped_inside_syscall(tid) {
        if let Err(e) = finish_syscall(tid, &mut signals) {
            // The program's signals held meanwhile are its own: sent again even so.
            resend(pid, tid, signals);
            return Err(e);
        }
    }
    let saved = sys::get_regs(tid)?;
    let mut regs = saved;
    regs.rip = insn;
    regs.rax = nr;
    (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9) = (args[0], args[1], args[2], args[3], args[4], args[5]);
    // Not inside a system call any more: no restart logic on resuming.
    regs.orig_rax = u64::MAX;
    // The step's trap is a forced SIGTRAP, and the kernel resets the action of a forced
    // signal the thread blocks to the default (`force_sig_info_to_task`, kernel/signal.c):
    // stepping a thread inside a SIGTRAP handler would take the program's handler (or our
    // fallback) away. So SIGTRAP is unblocked for the step and blocked again after.
    let mask = sig_mask(tid)?;
    let trap_bit = 1u64 << (libc::SIGTRAP - 1);
    if mask & trap_bit != 0 {
        set_sig_mask(tid, mask & !trap_bit)?;
    }
    let result = step_over_syscall(tid, &regs, &mut signals);
    if mask & trap_bit != 0 {
        let _ = set_sig_mask(tid, mask);
    }
    let restored = sys::set_regs(tid, &saved);
    resend(pid, tid, signals);
    let value = result?;
    restored?;
    Ok(value)
}

/// Re-sends the signals thread `tid` received while we borrowed it; a send fails only for
/// a thread that is gone.
fn resend(pid: i32, tid: i32, signals: Vec<i32>) {
    for signal in signals {
        let _ = sys::tgkill(pid, tid, signal);
    }
}

/// The ptrace events a system call reports from inside itself, before it returns
/// (`ptrace_event` called by `kernel_clone` and `exec_binprm`, ptrace(2) "PTRACE_EVENT
/// stops").
const EVENTS_INSIDE_A_CALL: [i32; 5] = [
    libc::PTRACE_EVENT_FORK,
    libc::PTRACE_EVENT_VFORK,
    libc::PTRACE_EVENT_CLONE,
    libc::PTRACE_EVENT_EXEC,
    libc::PTRACE_EVENT_VFORK_DONE,
];

/// Whether stopped thread `tid` is in a ptrace-event stop inside one of its system calls:
/// the stop's siginfo says `SIGTRAP | event << 8` (`ptrace_do_notify`, kernel/signal.c).
fn stopped_inside_syscall(tid: i32) -> bool {
    sys::get_siginfo(tid).is_ok_and(|info| {
        info.si_signo == libc::SIGTRAP
            && info.si_code & 0xff == libc::SIGTRAP
            && EVENTS_INSIDE_A_CALL.contains(&(info.si_code >> 8))
    })
}

/// Lets thread `tid`, stopped inside a system call of its own, finish it: one step returns
/// from the call, which the kernel reports at the call's exit, before any instruction of
/// the program's (`syscall_exit_work` in kernel/entry/common.c) — the call's result is in
/// `rax` then, as the program will see it. A stop of ours still pending comes first
/// (`PTRACE_EVENT_STOP`), the step's trap after it; signals of the program's that come are
/// held in `signals`, to be sent again.
fn finish_syscall(tid: i32, signals: &mut Vec<i32>) -> io::Result<()> {
    // Each stop but the last is one of a few: the pending interrupt, a signal or two.
    for _ in 0..16 {
        sys::single_step(tid, 0)?;
        let status = sys::wait_thread(tid)?;
        if !libc::WIFSTOPPED(status) {
            return Err(io::Error::other("the thread ended in its system call"));
        }
        let (sig, event) = (libc::WSTOPSIG(status), status >> 16);
        if event == 0 && sig == libc::SIGTRAP {
            return Ok(());
        }
        if event == 0 {
            signals.push(sig);
        }
    }
    Err(io::Error::other("the thread did not come out of its system call"))
}

/// `PTRACE_GETSIGMASK` and `PTRACE_SETSIGMASK` (`<linux/ptrace.h>`, since Linux 3.11).
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;

/// The blocked-signal mask of stopped thread `tid` (bit `n - 1` for signal `n`).
pub(crate) fn sig_mask(tid: i32) -> io::Result<u64> {
    let mut mask = 0u64;
    // SAFETY: the kernel writes 8 bytes (the size passed) into `mask`.
    let r = unsafe { libc::ptrace(PTRACE_GETSIGMASK, tid, 8usize, &mut mask as *mut u64) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(mask)
}

/// Sets the blocked-signal mask of stopped thread `tid`.
fn set_sig_mask(tid: i32, mask: u64) -> io::Result<()> {
    // SAFETY: the kernel reads 8 bytes (the size passed) from `mask`.
    let r = unsafe { libc::ptrace(PTRACE_SETSIGMASK, tid, 8usize, &mask as *const u64) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `regs` (at a `syscall` instruction) and single-steps until the instruction has run
/// (`rip` past its two bytes); returns `rax`. Signals that stopped the thread meanwhile go
/// to `signals` (held back, to be sent again).
fn step_over_syscall(tid: i32, regs: &Regs, signals: &mut Vec<i32>) -> io::Result<u64> {
    sys::set_regs(tid, regs)?;
    loop {
        sys::single_step(tid, 0)?;
        let status = sys::wait_thread(tid)?;
        if !libc::WIFSTOPPED(status) {
            return Err(io::Error::other("the thread ended during the system call"));
        }
        let sig = libc::WSTOPSIG(status);
        if status >> 16 == 0 && sig == libc::SIGTRAP {
            let now = sys::get_regs(tid)?;
            if now.rip == regs.rip + 2 {
                return Ok(now.rax);
            }
            // A SIGTRAP queued before the step, delivered before our instruction ran (and
            // suppressed): set the registers again and step on.
            sys::set_regs(tid, regs)?;
            continue;
        }
        if status >> 16 == 0 {
            signals.push(sig);
        }
    }
}

/// The C source of the per-hit benchmark target: build it with
/// `cc -static -O1 -fno-inline -o ptrace_probe ptrace_probe.c` and give it to
/// [`measure_hit_ns`].
pub const BENCH_SOURCE: &str = include_str!("../bench/ptrace_probe.c");

/// One measurement of [`measure_hit_ns`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HitCost {
    /// Added nanoseconds per probed call: (probed loop − plain loop) / calls.
    pub ns_per_hit: f64,
    /// The plain loop's nanoseconds per call.
    pub plain_ns_per_call: f64,
    /// Hit lines received (must equal the calls).
    pub hits: u64,
}

/// Measures the cost of one ptrace probe hit: runs `program` (built from [`BENCH_SOURCE`])
/// under [`crate::run`] with `p:bench_probed`, which times `calls` calls of an unprobed
/// function and `calls` of an identical probed one in the same run.
///
/// Runs the tracer on the calling thread (see the crate's process rules: no other child of
/// this process may be waited for meanwhile); the event lines are read and counted on a
/// helper thread.
pub fn measure_hit_ns(program: &Path, calls: u64) -> Result<HitCost, Error> {
    // In a fresh directory of its own (mkdtemp, 0700): never at a name another user could
    // have made first, as a symbolic link to a file of ours; removed on every way out.
    let scratch = PrivateDir::new_in(&std::env::temp_dir(), "dynprobe-ptrace-probe-")
        .map_err(|e| Error::Os { what: "creating the benchmark's scratch directory".into(), error: e })?;
    let result_file = scratch.path().join("result.txt");
    let argv: Vec<OsString> = vec![program.into(), calls.to_string().into(), result_file.clone().into_os_string()];
    let spec = ProbeSpec::parse("p:bench_probed")
        .map_err(|e| Error::Refused { spec: e.spec.clone(), message: e.to_string() })?;
    let (out_read, out_write) = pipe().map_err(|e| Error::Os { what: "creating a pipe".into(), error: e })?;
    let (control_read, control_write) = pipe().map_err(|e| Error::Os { what: "creating a pipe".into(), error: e })?;
    let reader = std::thread::spawn(move || {
        let mut hits = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n @ 1..) = rustix::io::read(&out_read, &mut buf) {
            hits +=
                buf[..n].split(|&b| b == b'\n').filter(|l| l.first().is_some_and(u8::is_ascii_digit)).count() as u64;
        }
        hits
    });
    let info = crate::run(Target::Command(argv), &[spec], out_write.as_fd(), control_read.as_fd());
    // Closing the write end ends the reader.
    drop((out_write, control_read, control_write));
    let hits = reader.join().unwrap_or(0);
    let info = info?;
    let text = std::fs::read_to_string(&result_file).unwrap_or_default();
    let field =
        |name: &str| text.split_whitespace().find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse::<f64>().ok());
    match (info.outcome, field("plain_ns"), field("probed_ns")) {
        (Outcome::Exited(0), Some(plain), Some(probed)) => {
            Ok(HitCost { ns_per_hit: (probed - plain) / calls as f64, plain_ns_per_call: plain / calls as f64, hits })
        }
        (outcome, ..) => Err(Error::Os {
            what: format!("running the benchmark {}", program.display()),
            error: io::Error::other(format!("it ended with {outcome:?} and printed {text:?}")),
        }),
    }
}
