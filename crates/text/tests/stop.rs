//! Stop-the-world with real threads: the stop holds, `set_ip` moves a thread, failures are
//! clean.

use dynprobe_text::memory::write_verified;
use dynprobe_text::pool::{alloc_near, ExecSlot};
use dynprobe_text::stop::{
    stop_other_threads, stop_signal, stop_threads_that_answer, stop_threads_touching, synchronize, StoppedWorld,
};
use dynprobe_text::TextError;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Each test stops every thread of the binary, including the other tests' threads, and one
/// test makes stops fail on purpose: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Polls `cond` for up to five seconds.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
    false
}

struct Spinner {
    tid: Arc<AtomicI32>,
    count: Arc<AtomicU64>,
    handle: thread::JoinHandle<()>,
}

/// A thread that counts as fast as it can until `quit`.
fn spinner(quit: &Arc<AtomicBool>) -> Spinner {
    let (tid, count, quit) = (Arc::new(AtomicI32::new(0)), Arc::new(AtomicU64::new(0)), quit.clone());
    let (t, c) = (tid.clone(), count.clone());
    let handle = thread::spawn(move || {
        t.store(gettid(), Ordering::SeqCst);
        while !quit.load(Ordering::Relaxed) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    });
    Spinner { tid, count, handle }
}

fn tids(world: &StoppedWorld) -> Vec<i32> {
    world.threads().iter().map(|t| t.tid).collect()
}

#[test]
fn stopped_threads_do_not_run_until_released() {
    let _serial = serial();
    let quit = Arc::new(AtomicBool::new(false));
    let spinners: Vec<Spinner> = (0..3).map(|_| spinner(&quit)).collect();
    assert!(eventually(|| spinners.iter().all(|s| s.count.load(Ordering::Relaxed) > 0)));

    let world = stop_other_threads(TIMEOUT).unwrap();
    let stopped = tids(&world);
    assert!(!stopped.contains(&gettid()), "the caller is not stopped");
    for s in &spinners {
        let tid = s.tid.load(Ordering::SeqCst);
        let t = world.threads().iter().find(|t| t.tid == tid).expect("every spinner is stopped");
        assert_ne!(t.ip, 0);
    }
    let before: Vec<u64> = spinners.iter().map(|s| s.count.load(Ordering::SeqCst)).collect();
    thread::sleep(Duration::from_millis(50));
    let during: Vec<u64> = spinners.iter().map(|s| s.count.load(Ordering::SeqCst)).collect();
    assert_eq!(before, during, "no stopped thread advanced its counter");
    drop(world);

    assert!(eventually(|| spinners.iter().zip(&during).all(|(s, &d)| s.count.load(Ordering::Relaxed) > d)));
    quit.store(true, Ordering::Relaxed);
    for s in spinners {
        s.handle.join().unwrap();
    }
}

/// Writes `code` into a fresh slot near this test's code.
fn slot_with(code: &[u8]) -> ExecSlot {
    let slot = alloc_near(slot_with as *const () as usize as u64, code.len()).unwrap();
    write_verified(slot.addr, &vec![0xCC; code.len()], code).unwrap();
    slot
}

#[test]
fn set_ip_moves_a_stopped_thread() {
    let _serial = serial();
    // 1: jmp 1b — a function that never returns on its own.
    let spin = slot_with(&[0xeb, 0xfe]);
    // mov $7, %eax; ret — an exit for it: the return address is still on the stack.
    let exit = slot_with(&[0xb8, 7, 0, 0, 0, 0xc3]);
    let tid = Arc::new(AtomicI32::new(0));
    let t = tid.clone();
    let handle = thread::spawn(move || {
        t.store(gettid(), Ordering::SeqCst);
        // SAFETY: the slot holds code that follows the C ABI once it is moved to `exit`.
        let f: extern "C" fn() -> u32 = unsafe { std::mem::transmute(spin.addr as usize) };
        f()
    });
    assert!(eventually(|| tid.load(Ordering::SeqCst) != 0));
    let tid = tid.load(Ordering::SeqCst);
    // Stop until the thread is seen inside the loop (it may still be on its way there).
    let moved = eventually(|| {
        let mut world = stop_other_threads(TIMEOUT).unwrap();
        let ip = world.threads().iter().find(|t| t.tid == tid).unwrap().ip;
        if ip != spin.addr {
            return false;
        }
        world.set_ip(tid, exit.addr);
        true
    });
    assert!(moved, "the thread was never seen spinning in its slot");
    assert_eq!(handle.join().unwrap(), 7);
}

#[test]
fn synchronize_returns() {
    let _serial = serial();
    let quit = Arc::new(AtomicBool::new(false));
    let s = spinner(&quit);
    for _ in 0..100 {
        synchronize().unwrap();
    }
    quit.store(true, Ordering::Relaxed);
    s.handle.join().unwrap();
    synchronize().unwrap();
}

#[test]
fn nested_stop_fails_instead_of_deadlocking_and_synchronize_is_immediate() {
    let _serial = serial();
    let world = stop_other_threads(TIMEOUT).unwrap();
    assert!(matches!(stop_other_threads(TIMEOUT), Err(TextError::StopFailed { .. })));
    synchronize().unwrap();
    drop(world);
    drop(stop_other_threads(TIMEOUT).unwrap());
}

#[test]
fn a_thread_blocking_the_signal_fails_the_stop_and_the_others_resume_or_is_left_alone_when_asked() {
    let _serial = serial();
    let quit = Arc::new(AtomicBool::new(false));
    let free = spinner(&quit);
    let (blocked_tid, unblock) = (Arc::new(AtomicI32::new(0)), Arc::new(AtomicBool::new(false)));
    let (t, u) = (blocked_tid.clone(), unblock.clone());
    let blocked = thread::spawn(move || {
        // SAFETY: plain sigset manipulation on a local set, then this thread's own mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, stop_signal());
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            t.store(gettid(), Ordering::SeqCst);
            while !u.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
            // The stale signal is delivered now and must be ignored by the handler.
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    });
    assert!(eventually(|| blocked_tid.load(Ordering::SeqCst) != 0 && free.count.load(Ordering::Relaxed) > 0));

    let started = Instant::now();
    let err = stop_other_threads(Duration::from_millis(200)).err().expect("the stop must fail");
    assert!(started.elapsed() < Duration::from_secs(3));
    let TextError::StopFailed { reason } = err else { panic!("{err:?}") };
    let tid = blocked_tid.load(Ordering::SeqCst);
    assert!(reason.contains(&tid.to_string()), "{reason}");
    assert!(reason.contains("blocks the stop signal"), "{reason}");

    // The thread that did stop was resumed.
    let c = free.count.load(Ordering::SeqCst);
    assert!(eventually(|| free.count.load(Ordering::Relaxed) > c));

    // The stop that leaves such a thread alone holds the others, at once.
    let started = Instant::now();
    let world = stop_threads_that_answer(TIMEOUT).unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!tids(&world).contains(&tid) && tids(&world).contains(&free.tid.load(Ordering::SeqCst)));
    assert_eq!(world.left_running(), 1, "the thread that blocks the signal runs on");
    drop(world);

    unblock.store(true, Ordering::Relaxed);
    blocked.join().unwrap();
    // A late signal left no trace: the next stops work and hold.
    for _ in 0..3 {
        let world = stop_other_threads(TIMEOUT).unwrap();
        assert!(tids(&world).contains(&free.tid.load(Ordering::SeqCst)));
    }
    quit.store(true, Ordering::Relaxed);
    free.handle.join().unwrap();
}

#[test]
fn threads_created_during_a_stop_are_stopped_too() {
    let _serial = serial();
    let quit = Arc::new(AtomicBool::new(false));
    let spawned = Arc::new(AtomicU64::new(0));
    let (q, n) = (quit.clone(), spawned.clone());
    // Keeps creating short-lived threads, so stops race with clone() and exit.
    let spawner = thread::spawn(move || {
        while !q.load(Ordering::Relaxed) {
            thread::spawn(|| std::hint::black_box(0)).join().unwrap();
            n.fetch_add(1, Ordering::Relaxed);
        }
    });
    assert!(eventually(|| spawned.load(Ordering::Relaxed) > 10));
    for _ in 0..50 {
        let world = stop_other_threads(TIMEOUT).unwrap();
        let before = spawned.load(Ordering::SeqCst);
        thread::sleep(Duration::from_millis(2));
        assert_eq!(spawned.load(Ordering::SeqCst), before, "the spawner is held");
        drop(world);
    }
    quit.store(true, Ordering::Relaxed);
    spawner.join().unwrap();
}

/// What one blocking call returned: its result and errno.
type Outcome = (&'static str, i64, i32);

/// Runs `call` on a new thread, returning its outcome when joined.
fn blocked_in(name: &'static str, call: impl FnOnce() -> i64 + Send + 'static) -> thread::JoinHandle<Outcome> {
    thread::spawn(move || {
        let rc = call();
        (name, rc, std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    })
}

/// Threads blocked in the kernel outside the code a stop is about are left alone: none of
/// their blocking calls returns early (EINTR), however many stops and grace periods run.
#[test]
fn threads_blocked_in_system_calls_are_left_alone_and_their_calls_never_cut_short() {
    let _serial = serial();
    const WAIT_MS: i64 = 1500;
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (rd, wr) = (fds[0], fds[1]);
    let ts = libc::timespec { tv_sec: 1, tv_nsec: 500_000_000 };
    let mut threads = vec![
        // SAFETY: plain system calls on valid arguments owned by the closure or by
        // this test, which outlives the thread.
        blocked_in("nanosleep", move || unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) as i64 }),
        // SAFETY: plain system calls on valid arguments owned by the closure or by
        // this test, which outlives the thread.
        blocked_in("clock_nanosleep", move || unsafe {
            libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &ts, std::ptr::null_mut()) as i64
        }),
        // SAFETY: plain system calls on valid arguments owned by the closure or by
        // this test, which outlives the thread.
        blocked_in("poll", move || unsafe {
            let mut p = libc::pollfd { fd: rd, events: libc::POLLPRI, revents: 0 };
            libc::poll(&mut p, 1, WAIT_MS as i32) as i64
        }),
        // SAFETY: plain system calls on valid arguments owned by the closure or by
        // this test, which outlives the thread.
        blocked_in("select", move || unsafe {
            let mut set: libc::fd_set = std::mem::zeroed();
            libc::FD_SET(rd, &mut set);
            let mut tv = libc::timeval { tv_sec: 1, tv_usec: 500_000 };
            libc::select(rd + 1, std::ptr::null_mut(), std::ptr::null_mut(), &mut set, &mut tv) as i64
        }),
        // SAFETY: plain system calls on valid arguments owned by the closure or by
        // this test, which outlives the thread.
        blocked_in("epoll_wait", move || unsafe {
            let ep = libc::epoll_create1(0);
            let mut ev = libc::epoll_event { events: libc::EPOLLPRI as u32, u64: 0 };
            libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, rd, &mut ev);
            let rc = libc::epoll_wait(ep, &mut ev, 1, WAIT_MS as i32) as i64;
            libc::close(ep);
            rc
        }),
        // SAFETY: plain system calls on valid arguments owned by the closure or by
        // this test, which outlives the thread.
        blocked_in("sigtimedwait", move || unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) as i64
        }),
        // SAFETY: plain system calls on valid arguments owned by the closure or by
        // this test, which outlives the thread.
        blocked_in("futex", move || unsafe {
            let word = 0u32;
            libc::syscall(libc::SYS_futex, &word, libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG, 0, &ts) as i64
        }),
        // SAFETY: plain system calls on valid arguments owned by the closure or by
        // this test, which outlives the thread.
        blocked_in("read", move || unsafe {
            let mut byte = 0u8;
            libc::read(rd, (&mut byte as *mut u8).cast(), 1) as i64
        }),
    ];
    thread::sleep(Duration::from_millis(200));
    let (mut stops, mut most_left) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(900) {
        synchronize().unwrap();
        let here = tids as *const () as u64;
        let world = stop_threads_touching(std::slice::from_ref(&(here..here + 16)), TIMEOUT).unwrap();
        most_left = most_left.max(world.left_running());
        drop(world);
        stops += 2;
    }
    // SAFETY: writes one byte to the pipe's write end, ending the `read`.
    assert_eq!(unsafe { libc::write(wr, b"x".as_ptr().cast(), 1) }, 1);
    let outcomes: Vec<Outcome> = threads.drain(..).map(|t| t.join().unwrap()).collect();
    // SAFETY: closes the pipe created above, once.
    unsafe {
        libc::close(rd);
        libc::close(wr);
    }
    eprintln!("{stops} stops; at most {most_left} threads left alone; {outcomes:?}");
    assert!(most_left >= 8, "the blocked threads were signalled instead of left alone ({most_left} left)");
    for (name, rc, errno) in outcomes {
        let expected = match name {
            "read" => 1,
            "sigtimedwait" | "futex" => -1, // EAGAIN / ETIMEDOUT at the timeout
            _ => 0,
        };
        assert_eq!(rc, expected, "{name} returned {rc} (errno {errno}): cut short by a stop");
        assert!(!(errno == libc::EINTR && rc == -1), "{name} returned EINTR");
    }
}

/// A thread that keeps entering short blocking calls is sometimes seen running by a stop and
/// signalled just as it enters one: the kernel cuts that call short (`EINTR`) as it
/// delivers the stop signal, and the handler puts it back — also where the C library loads
/// arguments between the number and the `syscall`. The program never sees `EINTR`.
#[test]
fn a_blocking_call_entered_just_as_the_stop_signal_lands_is_put_back() {
    let _serial = serial();
    let quit = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let sleeper = {
        let (quit, calls) = (quit.clone(), calls.clone());
        thread::spawn(move || {
            let mut seen = Vec::new();
            let short = libc::timespec { tv_sec: 0, tv_nsec: 20_000 };
            // SAFETY: epoll_create1 takes a flag word.
            let epoll = unsafe { libc::epoll_create1(0) };
            assert!(epoll >= 0);
            let mut event = libc::epoll_event { events: 0, u64: 0 };
            while !quit.load(Ordering::Relaxed) {
                // SAFETY: plain system calls on valid arguments owned by this thread. In a
                // process with several threads, glibc's wrappers of epoll_pwait and pselect
                // load arguments between the `mov` of the number and the `syscall`.
                let rcs = unsafe {
                    [
                        libc::nanosleep(&short, std::ptr::null_mut()),
                        libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &short, std::ptr::null_mut()),
                        libc::poll(std::ptr::null_mut(), 0, 0) | libc::poll(std::ptr::null_mut(), 0, 1),
                        libc::epoll_pwait(epoll, &mut event, 1, 0, std::ptr::null())
                            | libc::epoll_pwait(epoll, &mut event, 1, 1, std::ptr::null()),
                        libc::pselect(
                            0,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            &short,
                            std::ptr::null(),
                        ),
                    ]
                };
                let names = ["nanosleep", "clock_nanosleep", "poll", "epoll_pwait", "pselect"];
                for (call, rc) in names.into_iter().zip(rcs) {
                    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                    // clock_nanosleep returns the error number itself.
                    if rc == libc::EINTR || (rc == -1 && errno == libc::EINTR) {
                        seen.push(call);
                    }
                }
                calls.fetch_add(rcs.len() as u64, Ordering::Relaxed);
            }
            // SAFETY: the descriptor is this thread's own.
            unsafe { libc::close(epoll) };
            seen
        })
    };
    let (restarted, interrupted) =
        (dynprobe_text::stop::restarted_system_calls(), dynprobe_text::stop::interrupted_system_calls());
    let here = tids as *const () as u64;
    let started = Instant::now();
    let mut stops = 0;
    // Until the race was met 30 times (a few thousand stops each; 3 of the 7 calls a round
    // are the wrappers that load arguments after the number), or 20 s.
    while started.elapsed() < Duration::from_secs(20) && dynprobe_text::stop::restarted_system_calls() - restarted < 30
    {
        drop(stop_threads_touching(std::slice::from_ref(&(here..here + 16)), TIMEOUT).unwrap());
        stops += 1;
    }
    quit.store(true, Ordering::Relaxed);
    let seen = sleeper.join().unwrap();
    let put_back = dynprobe_text::stop::restarted_system_calls() - restarted;
    let cut_short = dynprobe_text::stop::interrupted_system_calls() - interrupted;
    eprintln!("{stops} stops, {} calls: {put_back} put back, {cut_short} cut short", calls.load(Ordering::Relaxed));
    assert!(seen.is_empty(), "the program saw EINTR from {seen:?}");
    assert_eq!(cut_short, 0);
    assert!(put_back > 0, "the race was never met in {stops} stops: the test proves nothing");
}

/// A stop of every thread signals threads blocked in the kernel too; a wait cut short is put
/// back even when no `mov` before its `syscall` names the call, as in the C library's
/// `syscall(2)` function, which takes the number as an argument: the stop saw the thread
/// blocked in that very call (the same instruction and arguments) before signalling it.
#[test]
fn a_futex_wait_made_through_syscall_is_put_back_after_a_stop_of_every_thread() {
    let _serial = serial();
    static WORD: AtomicI32 = AtomicI32::new(0);
    let waiter = blocked_in("futex", || {
        let timeout = libc::timespec { tv_sec: 1, tv_nsec: 0 };
        // SAFETY: FUTEX_WAIT on a static word with a relative timeout; nothing wakes it.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                WORD.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                0,
                &timeout as *const libc::timespec,
                0usize,
                0u32,
            )
        }
    });
    thread::sleep(Duration::from_millis(200));
    let restarted = dynprobe_text::stop::restarted_system_calls();
    drop(stop_other_threads(TIMEOUT).unwrap());
    let (name, rc, errno) = waiter.join().unwrap();
    assert_eq!((name, rc, errno), ("futex", -1, libc::ETIMEDOUT), "cut short by the stop");
    assert!(dynprobe_text::stop::restarted_system_calls() > restarted, "the stop signal landed in the wait");
}
