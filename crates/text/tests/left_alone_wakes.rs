//! A thread left alone at the start of a transaction (blocked outside the edits) that wakes
//! before the heads are armed is stopped by the settling after them, so the world ends up
//! wholly stopped in the middle of an int3-first write: the write must still finish as
//! int3-first (tails, then heads over the int3s), not as if every thread had been stopped
//! from the start — which found the int3 heads "unexpected", wrote nothing and left them in
//! the code.
//!
//! The scenario needs a process with no thread but its own two: a test harness's threads,
//! blocked, would be left alone by every stop, and a `fork` from a harness's threads once
//! left CI waiting on a child that never ended. So this test has no harness (`harness =
//! false` in Cargo.toml): `main` runs it, says each step on stderr, and an alarm ends a
//! stuck run with the last step named instead of hanging the test run.

use dynprobe_text::memory::{read_vec, write_verified};
use dynprobe_text::pool::alloc_near;
use dynprobe_text::transaction::{Edits, Transaction};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const MOV1: [u8; 5] = [0xb8, 1, 0, 0, 0]; // mov $1, %eax
const MOV2: [u8; 5] = [0xb8, 2, 0, 0, 0]; // mov $2, %eax
const RET: u8 = 0xc3;
const TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    // SAFETY: alarm takes a plain number; its default action ends the process, which the
    // test runner reports as a failure (SIGALRM) after the last step printed below.
    unsafe { libc::alarm(120) };
    println!("\nrunning 1 test");
    match wake_a_thread_left_alone_during_an_int3_first_write() {
        Ok(()) => println!(
            "test a_thread_left_alone_that_wakes_before_the_heads_are_armed_changes_nothing_of_the_outcome ... ok\n"
        ),
        Err(why) => {
            println!("test a_thread_left_alone_that_wakes_before_the_heads_are_armed_changes_nothing_of_the_outcome ... FAILED\n{why}");
            std::process::exit(1);
        }
    }
}

/// Where the scenario is, on stderr: the step a stuck run was in is the last one printed.
fn step(what: &str) {
    eprintln!("step: {what}");
}

/// Waits (yielding) until `ready`, at most ten seconds; the error says what never came.
fn until(ready: impl Fn() -> bool, what: &str) -> Result<(), String> {
    step(&format!("waiting for {what}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        if Instant::now() > deadline {
            return Err(format!("waited ten seconds for {what}"));
        }
        thread::yield_now();
    }
    Ok(())
}

/// `Err` when the edit was not written whole or a step did not come.
fn wake_a_thread_left_alone_during_an_int3_first_write() -> Result<(), String> {
    let func = alloc_near(main as *const () as usize as u64, 6).map_err(|e| e.to_string())?;
    let code = [MOV1[0], MOV1[1], MOV1[2], MOV1[3], MOV1[4], RET];
    write_verified(func.addr, &[0xCC; 6], &code).map_err(|e| e.to_string())?;
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (rd, wr) = (fds[0], fds[1]);
    let flag = || Arc::new(AtomicBool::new(false));
    let (woke, quit, done) = (flag(), flag(), flag());
    let tid = Arc::new(AtomicI32::new(0));
    let sleeper = {
        let (woke, quit, done, tid) = (woke.clone(), quit.clone(), done.clone(), tid.clone());
        thread::spawn(move || {
            // SAFETY: gettid takes no arguments.
            tid.store(unsafe { libc::gettid() }, Ordering::Release);
            let mut byte = 0u8;
            // SAFETY: reads one byte into a local.
            let n = unsafe { libc::read(rd, (&mut byte as *mut u8).cast(), 1) };
            // Woken by the byte, not cut short (EINTR would be the very fault the stop
            // must never cause): otherwise `woke` stays false and the test says so.
            if n != 1 {
                return;
            }
            woke.store(true, Ordering::Release);
            // Running, not blocked: the settling stops it.
            while !quit.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
            done.store(true, Ordering::Release);
        })
    };
    // The transaction must begin with the sleeper blocked in its read (a fixed sleep is not
    // enough on a loaded machine): `read` is system call 0.
    until(|| tid.load(Ordering::Acquire) != 0, "the sleeper to start")?;
    let syscall = format!("/proc/self/task/{}/syscall", tid.load(Ordering::Acquire));
    until(|| std::fs::read_to_string(&syscall).is_ok_and(|s| s.starts_with("0 ")), "the sleeper to block in read")?;
    let mut edits = Edits::new(vec![(func.addr, &MOV1[..], &MOV2[..])]);
    step("begin");
    let mut txn = Transaction::begin(edits.ranges(), TIMEOUT).map_err(|e| e.to_string())?;
    if txn.world().left_running() != 1 {
        return Err(format!("{} threads left alone, not the sleeper alone", txn.world().left_running()));
    }
    // SAFETY: writes one byte to the pipe, waking the reader.
    assert_eq!(unsafe { libc::write(wr, b"x".as_ptr().cast(), 1) }, 1);
    until(|| woke.load(Ordering::Acquire), "the sleeper to wake")?;
    step("arm the heads");
    txn.arm_heads(&mut edits).map_err(|e| e.to_string())?;
    step("finish");
    let finished = txn.finish(&mut edits);
    step("commit");
    txn.commit().map_err(|e| e.to_string())?;
    quit.store(true, Ordering::Relaxed);
    until(|| done.load(Ordering::Acquire), "the sleeper, released, to end")?;
    sleeper.join().map_err(|_| "the sleeper panicked".to_string())?;
    // SAFETY: the pipe's two ends, used by nothing any more.
    unsafe {
        libc::close(rd);
        libc::close(wr);
    }
    finished.map_err(|e| e.to_string())?;
    let now = read_vec(func.addr, 6).map_err(|e| e.to_string())?;
    if !edits.outcomes().all(|(_, done)| done) || now != [MOV2[0], MOV2[1], MOV2[2], MOV2[3], MOV2[4], RET] {
        return Err(format!("the edit was not written whole: {now:x?}"));
    }
    Ok(())
}
