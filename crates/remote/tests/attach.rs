//! Attaching: to a running multi-threaded program (its memory read and written), and the
//! errors of attaching to a process that does not exist, that has exited, or that is traced
//! already.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{wait_in_syscall, worker_program, Target};
use dynprobe_remote::{sys, threads, AttachError, Options, PermissionReason, Stop, Tracee};

#[test]
fn seizes_every_thread_and_reads_and_writes_memory() {
    let expected =
        common::undisturbed_worker_output().replace("counter 5 message original", "counter 42 message patched");
    let target = Target::start(&worker_program(), &[]);
    let pid = target.pid();
    let (counter, message) = (target.number(5), target.number(6));

    let mut tracee = Tracee::seize(pid, Options::NONE).unwrap();
    assert_eq!(tracee.threads(), threads(pid).unwrap(), "every thread seized");
    assert!(tracee.threads().len() >= 2, "main and sleeper at least: {:?}", tracee.threads());

    // Memory while the threads run.
    let mut word = [0u8; 8];
    tracee.read_memory(counter, &mut word).unwrap();
    assert_eq!(i64::from_le_bytes(word), 5);
    assert_eq!(tracee.read_c_string(message, 64).unwrap(), b"original");
    tracee.write_memory(counter, &42i64.to_le_bytes()).unwrap();
    tracee.write_memory(message, b"patched\0").unwrap();

    // Every thread stopped: its registers are readable, and it is where /proc said.
    tracee.stop_all(Duration::from_secs(5)).unwrap();
    for tid in tracee.threads() {
        let regs = tracee.regs(tid).unwrap();
        assert!(regs.rsp != 0 && regs.rip != 0, "thread {tid}: {regs:?}");
        assert!(tracee.stop_of(tid).unwrap().is_some());
    }
    for tid in tracee.threads() {
        tracee.cont(tid, 0).unwrap();
    }
    tracee.detach().unwrap();
    assert_eq!(target.finish("hi\n"), expected);
}

#[test]
fn into_threads_hands_the_stopped_threads_over_without_detaching() {
    let target = Target::start(&worker_program(), &[]);
    let pid = target.pid();
    let mut tracee = Tracee::seize(pid, Options::NONE).unwrap();
    tracee.stop_all(Duration::from_secs(5)).unwrap();
    let tids = tracee.threads();
    let handed = tracee.into_threads();
    assert_eq!(handed.iter().map(|&(tid, _)| tid).collect::<Vec<_>>(), tids);
    // SAFETY: gettid has no preconditions.
    let us = unsafe { libc::gettid() };
    for &(tid, stop) in &handed {
        let stop = stop.unwrap_or_else(|| panic!("thread {tid} was stopped but is handed over as running"));
        // Still traced by this thread and stopped: raw requests work on it.
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
        assert!(status.lines().any(|l| l == format!("TracerPid:\t{us}")), "thread {tid}: {status}");
        assert!(sys::get_regs(tid).unwrap().rsp != 0);
        let signal = match stop {
            Stop::Signal { signal, .. } => signal,
            _ => 0,
        };
        sys::detach(tid, signal).unwrap();
    }
    assert_eq!(target.finish("hi\n"), common::undisturbed_worker_output());
}

#[test]
fn nonexistent_process() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    child.wait().unwrap();
    let err = Tracee::seize(pid, Options::NONE).err().expect("attached to a reaped process");
    assert!(matches!(err, AttachError::NoSuchProcess { pid: p } if p == pid), "{err:?}");
    assert_eq!(err.to_string(), format!("no such process: {pid}"));
}

#[test]
fn process_that_exited_meanwhile() {
    // A zombie: exited, not yet reaped.
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap().contains(") Z ") {
        assert!(std::time::Instant::now() < deadline, "child never became a zombie");
        std::thread::sleep(Duration::from_millis(5));
    }
    let err = Tracee::seize(pid, Options::NONE).err().expect("attached to a zombie");
    child.wait().unwrap();
    assert!(matches!(err, AttachError::Exited { .. }), "{err:?}");
    assert_eq!(err.to_string(), format!("process {pid} exited while attaching"));
}

/// A seized process that exits reports its exit to the tracer first (ptrace(2), "Attaching
/// and detaching"): its real parent's `wait` gets it only once the tracer has reaped or
/// detached it. Dropping the `Tracee` does that, also for a thread that exited while it ran
/// seized, and the parent gets the exit status the process gave.
#[test]
fn a_seized_process_that_exits_is_released_to_its_parent_with_its_status() {
    // The shell's child, not this test's: its parent is the shell, which says what `wait` gave.
    // (Its stdin through fd 3: a background command's fd 0 is /dev/null, sh(1p).)
    let script = "exec 3<&0; sh -c 'read line; exit 7' <&3 & echo $!; wait $!; echo status $?";
    let mut shell =
        Command::new("sh").args(["-c", script]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(shell.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let pid: i32 = line.trim().parse().unwrap();
    let tracee = Tracee::seize(pid, Options::NONE).unwrap();
    // The shell's stdin is the exiting process's too: a line, and it exits, seized.
    use std::io::Write as _;
    writeln!(shell.stdin.take().unwrap()).unwrap();
    let state = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    within_10_s(|| state().contains(") Z "), "the seized process exited");
    // Held for this tracer: its parent cannot reap it, and has said nothing.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains(&format!("TracerPid:\t{}\n", current_tid())), "{status}");
    drop(tracee);
    within_10_s(|| state().is_empty(), "its parent reaped it");
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "status 7");
    assert!(shell.wait().unwrap().success());
}

/// Waits until `done`, failing after 10 s.
fn within_10_s(done: impl Fn() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn attaching_twice_from_this_process() {
    let target = Target::start(&worker_program(), &[]);
    let pid = target.pid();
    let first = Tracee::seize(pid, Options::NONE).unwrap();
    let err = Tracee::seize(pid, Options::NONE).err().expect("attached twice");
    match &err {
        AttachError::NotPermitted { reason: PermissionReason::AlreadyTraced { by_us, tracer_pid, .. }, .. } => {
            assert!(by_us, "{err}");
            // The tracer is the thread that attached: this one.
            assert_eq!(*tracer_pid, current_tid());
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(text.starts_with(&format!("not permitted to trace process {pid}: already traced by pid ")), "{text}");
    assert!(text.contains("a thread of this process: it is attached already"), "{text}");
    first.detach().unwrap();
    // Free again once the first detached.
    Tracee::seize(pid, Options::NONE).unwrap().detach().unwrap();
}

#[test]
fn attaching_while_another_tracer_holds_it() {
    let tracer_program = common::compile("tracer.c", "tracer", &[]);
    let target = Target::start(&worker_program(), &[]);
    let pid = target.pid();
    let mut tracer = Command::new(&tracer_program).arg(pid.to_string()).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(tracer.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "attached\n");

    let err = Tracee::seize(pid, Options::NONE).err().expect("attached beside another tracer");
    let tracer_pid = tracer.id() as i32;
    let name: String = tracer_program.file_name().unwrap().to_str().unwrap().chars().take(15).collect();
    match &err {
        AttachError::NotPermitted {
            reason: PermissionReason::AlreadyTraced { tracer_pid: p, tracer_name, by_us },
            ..
        } => {
            assert_eq!((*p, tracer_name.as_str(), *by_us), (tracer_pid, name.as_str(), false));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!(
            "not permitted to trace process {pid}: already traced by pid {tracer_pid} ({name}); only one tracer \
             at a time is possible, detach that one first"
        )
    );
    tracer.kill().unwrap();
    tracer.wait().unwrap();
    // The tracer's death detached it: the main thread still sits in its read.
    wait_in_syscall(pid, pid, libc::SYS_read);
    let mut tracee = Tracee::seize(pid, Options::NONE).unwrap();
    tracee.stop(pid, Duration::from_secs(5)).unwrap();
    tracee.detach().unwrap();
}

/// The calling thread's id.
fn current_tid() -> i32 {
    std::fs::read_link("/proc/thread-self").unwrap().file_name().unwrap().to_str().unwrap().parse().unwrap()
}

/// The attach error seen by a forked child of this test that runs as uid/gid `nobody`
/// (so without CAP_SYS_PTRACE), as its `Debug` and `Display`.
fn attach_error_as_nobody(pid: i32) -> (String, String) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid two-int array for pipe(2).
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only drops privileges, attaches, writes to the pipe and _exits;
    // glibc's fork leaves the allocator usable in the child.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: plain system calls in the forked child, ending in _exit.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(NOBODY) != 0 || libc::setuid(NOBODY) != 0 {
                libc::_exit(3);
            }
            let text = match Tracee::seize(pid, Options::NONE) {
                Ok(_) => "attached\nattached".to_string(),
                Err(e) => format!("{e:?}\n{e}"),
            };
            libc::write(fds[1], text.as_ptr().cast(), text.len());
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end, reading the read end, reaping the child.
    let text = unsafe {
        libc::close(fds[1]);
        let mut buf = vec![0u8; 4096];
        let n = libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
        libc::close(fds[0]);
        let mut status = 0;
        libc::waitpid(child, &mut status, 0);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child status {status}");
        String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned()
    };
    let (debug, display) = text.split_once('\n').unwrap();
    (debug.to_string(), display.to_string())
}

const NOBODY: u32 = 65534;

#[test]
fn not_permitted_another_user() {
    let target = Target::start(&worker_program(), &[]);
    let pid = target.pid();
    let (debug, display) = attach_error_as_nobody(pid);
    assert!(debug.contains("DifferentUser { target_uid: 0, our_uid: 65534 }"), "{debug}");
    assert!(
        display.starts_with(&format!(
            "not permitted to trace process {pid}: the process runs as uid 0 and we as uid 65534"
        )),
        "{display}"
    );
}

#[test]
fn not_permitted_not_dumpable() {
    // Same user as the tracer, but non-dumpable (as a setuid program would be).
    let mut command = Command::new(worker_program());
    std::os::unix::process::CommandExt::uid(&mut command, NOBODY);
    std::os::unix::process::CommandExt::gid(&mut command, NOBODY);
    command.env("WORKER_NOT_DUMPABLE", "1");
    let target = Target::start_command(command);
    let (debug, display) = attach_error_as_nobody(target.pid());
    assert!(debug.contains("NotDumpable"), "{debug}");
    assert!(display.contains("the process is not dumpable"), "{display}");
}
