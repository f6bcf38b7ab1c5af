//! Remote calls and system calls on stopped threads of `worker.c`: results, and the
//! program carrying on exactly as without them (its blocked `read` and `nanosleep`
//! restarted, signals that arrived meanwhile delivered).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::{wait_in_syscall, worker_program, Target};
use dynprobe_remote::{Arg, CallError, Options, Tracee};

const SECOND: Duration = Duration::from_secs(5);

/// The target with its main thread blocked in `read` and its sleeper in `nanosleep`.
fn blocked_target() -> (Target, i32, i32) {
    let target = Target::start(&worker_program(), &[]);
    let (pid, sleeper) = (target.pid(), target.number(1) as i32);
    wait_in_syscall(pid, pid, libc::SYS_read);
    wait_in_syscall(pid, sleeper, libc::SYS_clock_nanosleep);
    (target, pid, sleeper)
}

#[test]
fn calls_on_threads_blocked_in_read_and_nanosleep_leave_the_program_unchanged() {
    let expected = common::undisturbed_worker_output();
    let (target, pid, sleeper) = blocked_target();
    let (combine, text_length) = (target.number(2), target.number(3));

    let mut tracee = Tracee::seize(pid, Options::NONE).unwrap();
    tracee.stop(pid, SECOND).unwrap();
    tracee.stop(sleeper, SECOND).unwrap();
    let before = tracee.regs(pid).unwrap();
    let xstate = tracee.vector_state(pid).unwrap();

    assert_eq!(tracee.call(pid, combine, &[1, 2, 3, 4, 5, 6], SECOND).unwrap(), 91);
    let hello = tracee.call_with(sleeper, text_length, &[Arg::Str("hello, world")], SECOND).unwrap();
    assert_eq!(hello, 12);
    let bytes = tracee.call_with(pid, text_length, &[Arg::Bytes(b"abc\0def")], SECOND).unwrap();
    assert_eq!(bytes, 3);

    // Registers, including the vector state the callee may have used, are as before.
    let after = tracee.regs(pid).unwrap();
    assert_eq!(format!("{before:?}"), format!("{after:?}"));
    assert_eq!(tracee.vector_state(pid).unwrap(), xstate);
    // Still inside the interrupted read: the kernel will restart it.
    assert_eq!(after.orig_rax, libc::SYS_read as u64);

    for tid in [pid, sleeper] {
        tracee.cont(tid, 0).unwrap();
    }
    tracee.detach().unwrap();
    assert_eq!(target.finish("hi\n"), expected);
}

#[test]
fn remote_mmap_and_munmap() {
    let expected = common::undisturbed_worker_output();
    let (target, pid, _) = blocked_target();
    let mut tracee = Tracee::seize_thread(pid, pid, Options::NONE).unwrap();
    tracee.stop(pid, SECOND).unwrap();
    let prot = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    let addr = tracee.mmap(pid, 0, 8192, prot, flags, -1, 0, SECOND).unwrap();
    assert_eq!(addr % 4096, 0);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let line = format!("{addr:x}-{:x} rwxp", addr + 8192);
    assert!(maps.lines().any(|l| l.starts_with(&line)), "{line} not in\n{maps}");

    tracee.write_memory(addr + 100, b"remote").unwrap();
    let mut back = [0u8; 6];
    tracee.read_memory(addr + 100, &mut back).unwrap();
    assert_eq!(&back, b"remote");

    // A failing system call reports its errno.
    let err = tracee.mmap(pid, 0, 4096, prot, libc::MAP_PRIVATE, -1, 0, SECOND).unwrap_err();
    match &err {
        CallError::Syscall { name: "mmap", error } => assert_eq!(error.raw_os_error(), Some(libc::EBADF)),
        other => panic!("{other:?}"),
    }
    assert_eq!(err.to_string(), format!("remote mmap failed: {}", std::io::Error::from_raw_os_error(libc::EBADF)));

    tracee.munmap(pid, addr, 8192, SECOND).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(!maps.lines().any(|l| l.starts_with(&line)));
    tracee.detach().unwrap();
    assert_eq!(target.finish("hi\n"), expected);
}

#[test]
fn a_signal_arriving_during_a_call_is_delivered_afterwards() {
    let expected = common::undisturbed_worker_output().replace("usr1 handled 0", "usr1 handled 1");
    let (target, pid, _) = blocked_target();
    let slow_square = target.number(4);
    let mut tracee = Tracee::seize_thread(pid, pid, Options::NONE).unwrap();
    tracee.stop(pid, SECOND).unwrap();
    // SIGUSR1 to the main thread while it runs the 1.5 s call.
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: a plain system call with integer arguments.
        let ret = unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, libc::SIGUSR1) };
        assert_eq!(ret, 0);
    });
    assert_eq!(tracee.call(pid, slow_square, &[12], SECOND).unwrap(), 144);
    sender.join().unwrap();
    // The handler has not run yet: the signal was held during the call.
    let mut tracee_out = tracee;
    tracee_out.cont(pid, 0).unwrap();
    tracee_out.detach().unwrap();
    // The handler ran once, and the read, restarted after it (SA_RESTART), got the line.
    assert_eq!(target.finish("hi\n"), expected);
}

#[test]
fn a_call_waits_while_another_tracer_holds_the_process_stub_sites() {
    use std::os::linux::net::SocketAddrExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let expected = common::undisturbed_worker_output();
    let (target, pid, _) = blocked_target();
    let text_length = target.number(3);
    // Another tracer calling into the same process holds its lock: the abstract socket name
    // each tracer binds while it owns a stub site there.
    let name = std::os::unix::net::SocketAddr::from_abstract_name(format!("dynprobe-stub-{pid}")).unwrap();
    let other = std::os::unix::net::UnixListener::bind_addr(&name).expect("bind the lock's name");
    let released = Arc::new(AtomicBool::new(false));
    let releaser = {
        let released = released.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            released.store(true, Ordering::SeqCst);
            drop(other);
        })
    };
    let mut tracee = Tracee::seize_thread(pid, pid, Options::NONE).unwrap();
    tracee.stop(pid, SECOND).unwrap();
    assert_eq!(tracee.call_with(pid, text_length, &[Arg::Str("abcd")], SECOND).unwrap(), 4);
    assert!(released.load(Ordering::SeqCst), "the call did not wait for the other tracer's lock");
    releaser.join().unwrap();
    tracee.detach().unwrap();
    assert_eq!(target.finish("hi\n"), expected);
}

#[test]
fn code_written_into_read_only_text_runs() {
    let expected = common::undisturbed_worker_output();
    let (target, pid, _) = blocked_target();
    let text_length = target.number(3);
    let mut tracee = Tracee::seize_thread(pid, pid, Options::NONE).unwrap();
    tracee.stop(pid, SECOND).unwrap();
    let mut original = [0u8; 6];
    tracee.read_memory(text_length, &mut original).unwrap();
    // mov eax, 42; ret — into the r-x text (the program never calls text_length itself).
    tracee.write_memory(text_length, &[0xb8, 42, 0, 0, 0, 0xc3]).unwrap();
    assert_eq!(tracee.call(pid, text_length, &[0], SECOND).unwrap(), 42);
    tracee.write_memory(text_length, &original).unwrap();
    assert_eq!(tracee.call_with(pid, text_length, &[Arg::Str("abcd")], SECOND).unwrap(), 4);
    tracee.detach().unwrap();
    assert_eq!(target.finish("hi\n"), expected);
}

#[test]
fn a_call_that_does_not_return_in_time_finishes_on_its_own_and_one_that_crashes_is_undone() {
    let expected = common::undisturbed_worker_output();
    let (target, pid, _) = blocked_target();
    let slow_square = target.number(4);
    let mut tracee = Tracee::seize_thread(pid, pid, Options::NONE).unwrap();
    tracee.stop(pid, SECOND).unwrap();
    let before = tracee.regs(pid).unwrap();

    let err = tracee.call(pid, slow_square, &[3], Duration::from_millis(50)).unwrap_err();
    match err {
        CallError::Timeout { tid, rip, .. } => {
            assert_eq!(tid, pid);
            assert_ne!(rip, 0);
        }
        ref other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("did not return within 0.1 s"), "{err}");
    assert!(err.to_string().contains("left to finish on its own"), "{err}");
    // slow_square spins 1.5 s, then returns through the stub, which puts the thread back
    // into its read(0) as it was: stopped again, it has the registers it had.
    std::thread::sleep(Duration::from_millis(2500));
    tracee.stop(pid, SECOND).unwrap();
    assert_eq!(format!("{before:?}"), format!("{:?}", tracee.regs(pid).unwrap()));

    let err = tracee.call(pid, 0x10, &[], SECOND).unwrap_err();
    assert!(matches!(err, CallError::Faulted { signal: libc::SIGSEGV, rip: 0x10, .. }), "{err:?}");
    assert!(err.to_string().contains("crashed: SIGSEGV at 0x10"), "{err}");

    let err = tracee.call(pid, slow_square, &[1, 2, 3, 4, 5, 6, 7], SECOND).unwrap_err();
    assert!(matches!(err, CallError::TooManyArgs { count: 7 }), "{err:?}");

    assert_eq!(format!("{before:?}"), format!("{:?}", tracee.regs(pid).unwrap()));
    tracee.detach().unwrap();
    assert_eq!(target.finish("hi\n"), expected);
}

/// Set in the environment of this test binary run again as a tracer: "PID TID FUNCTION".
const TRACER_OF: &str = "DYNPROBE_TEST_TRACER_OF";

/// The tracer of a call is killed (`SIGKILL`) while the function runs: the thread returns
/// through the stub the call left, which puts its registers back itself, and the program
/// carries on exactly as without the call — on the sleeper thread, whose `nanosleep` is
/// restarted through `restart_syscall`, then on the main thread, whose `read` is
/// restarted. The tracer is this test binary run again with [`TRACER_OF`] set (a tracer's
/// death detaches what it traces; the test's own process must live on).
#[test]
fn a_tracer_killed_during_a_call_leaves_the_program_running() {
    if let Ok(what) = std::env::var(TRACER_OF) {
        let [pid, tid, func]: [u64; 3] =
            what.split(' ').map(|w| w.parse().unwrap()).collect::<Vec<_>>().try_into().unwrap();
        let mut tracee = Tracee::seize_thread(pid as i32, tid as i32, Options::NONE).unwrap();
        tracee.stop(tid as i32, SECOND).unwrap();
        println!("calling");
        // slow_square busy-waits 1.5 s: the parent kills this process long before.
        let result = tracee.call(tid as i32, func, &[12], SECOND);
        panic!("the tracer lived to see the call end: {result:?}");
    }
    let expected = common::undisturbed_worker_output();
    let (target, pid, sleeper) = blocked_target();
    let slow_square = target.number(4);
    for tid in [sleeper, pid] {
        let mut tracer = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "a_tracer_killed_during_a_call_leaves_the_program_running", "--nocapture"])
            .env(TRACER_OF, format!("{pid} {tid} {slow_square}"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(tracer.stdout.take().unwrap());
        let calling = std::io::BufRead::lines(stdout).map_while(Result::ok).any(|line| line == "calling");
        assert!(calling, "the tracer ended before its call: {:?}", tracer.wait());
        // Well inside slow_square's 1.5 s.
        std::thread::sleep(Duration::from_millis(300));
        tracer.kill().unwrap();
        assert_eq!(tracer.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
    // Past the end of both calls: the program lives (it died of SIGSEGV when a call
    // returned to address 0), and the main thread went back into its read (the sleeper
    // may have ended already: its 2 s are counted from before the calls).
    std::thread::sleep(Duration::from_millis(1500));
    let mut target = target;
    assert_eq!(target.child.try_wait().unwrap(), None, "the program died");
    common::wait_in_syscall(pid, pid, libc::SYS_read);
    // The read got its line, the sleeper slept its whole 2 s, nothing else changed.
    assert_eq!(target.finish("hi\n"), expected);
}
