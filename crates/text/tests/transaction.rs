//! The patching transaction against threads executing the very bytes being replaced: busy
//! threads (stopped, so each edit is written whole) and threads that wake from a blocking
//! call in the middle (left running, so edits go int3-first), and the blocking calls of
//! threads left alone never return early.

use dynprobe_text::memory::{read_vec, write_verified};
use dynprobe_text::pool::{alloc_near, ExecSlot};
use dynprobe_text::stop;
use dynprobe_text::transaction::{replace, Edits, Transaction};
use dynprobe_text::trap::{self, TrapContext};
use dynprobe_text::TextError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

const MOV1: [u8; 5] = [0xb8, 1, 0, 0, 0]; // mov $1, %eax
const MOV2: [u8; 5] = [0xb8, 2, 0, 0, 0]; // mov $2, %eax
const RET: u8 = 0xc3;

/// The tests stop each other's threads and count interrupted calls: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn near_here() -> u64 {
    near_here as *const () as usize as u64
}

/// Writes `code` into a fresh slot.
fn slot_with(code: &[u8]) -> ExecSlot {
    let slot = alloc_near(near_here(), code.len()).unwrap();
    write_verified(slot.addr, &vec![0xCC; code.len()], code).unwrap();
    slot
}

/// `mov $1|$2, %eax; ret` as a callable function.
fn as_fn(slot: ExecSlot) -> extern "C" fn() -> u32 {
    // SAFETY: the slot holds a complete C-ABI function at every instant (that is what the
    // protocol under test guarantees).
    unsafe { std::mem::transmute(slot.addr as usize) }
}

/// How long a transaction may wait for the threads to stop. Generous: what these tests
/// check is the code every thread sees, not how fast a thread answers, and a virtual
/// machine's host can leave a woken thread without a CPU for seconds (a CI run once saw a
/// sleeping caller miss a 5 s limit).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Calls `f` from `threads` threads until `quit`, each sleeping `pause` (if any) between
/// calls; returns per thread (calls, wrong results seen, sleeps cut short).
fn callers(
    f: extern "C" fn() -> u32,
    threads: usize,
    pause: Option<Duration>,
    quit: &Arc<AtomicBool>,
) -> Vec<thread::JoinHandle<(u64, Vec<u32>, u64)>> {
    (0..threads)
        .map(|_| {
            let quit = quit.clone();
            thread::spawn(move || {
                let (mut calls, mut bad, mut cut) = (0u64, Vec::new(), 0u64);
                while !quit.load(Ordering::Relaxed) {
                    let r = f();
                    if r != 1 && r != 2 && bad.len() < 10 {
                        bad.push(r);
                    }
                    calls += 1;
                    if let Some(pause) = pause {
                        let ts = libc::timespec { tv_sec: 0, tv_nsec: pause.as_nanos() as _ };
                        // SAFETY: a plain relative sleep with a valid timespec and no remainder.
                        let rc = unsafe { libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &ts, std::ptr::null_mut()) };
                        cut += (rc == libc::EINTR) as u64;
                    }
                }
                (calls, bad, cut)
            })
        })
        .collect()
}

/// Flips `mov $1` ↔ `mov $2` in a function for two seconds (and twenty flips) while `threads` call it; returns
/// (flips, calls, sleeps cut short).
fn flip_while_called(threads: usize, pause: Option<Duration>) -> (u64, u64, u64) {
    let func = slot_with(&[MOV1[0], MOV1[1], MOV1[2], MOV1[3], MOV1[4], RET]);
    let quit = Arc::new(AtomicBool::new(false));
    let handles = callers(as_fn(func), threads, pause, &quit);
    let started = Instant::now();
    let mut flips = 0u64;
    // Two seconds, and at least twenty flips however loaded the machine (within reason).
    let enough = |flips: u64| started.elapsed() >= Duration::from_secs(2) && flips >= 20;
    while !enough(flips) && started.elapsed() < Duration::from_secs(30) {
        replace(func.addr, &MOV1, &MOV2, TIMEOUT).unwrap();
        replace(func.addr, &MOV2, &MOV1, TIMEOUT).unwrap();
        flips += 2;
    }
    quit.store(true, Ordering::Relaxed);
    let (mut calls, mut cut) = (0, 0);
    for h in handles {
        let (n, bad, c) = h.join().unwrap();
        assert!(bad.is_empty(), "a caller saw {bad:?}");
        calls += n;
        cut += c;
    }
    assert_eq!(read_vec(func.addr, 6).unwrap(), [MOV1[0], MOV1[1], MOV1[2], MOV1[3], MOV1[4], RET]);
    assert!(!trap::is_registered(func.addr), "no transient site is left registered");
    (flips, calls, cut)
}

#[test]
fn patching_a_function_while_two_busy_threads_call_it() {
    let _serial = serial();
    let (flips, calls, _) = flip_while_called(2, None);
    eprintln!("{flips} flips, {calls} calls");
    assert!(flips >= 20, "only {flips} flips");
    assert!(calls > 0);
}

#[test]
fn patching_a_function_while_threads_wake_from_sleeps_to_call_it() {
    let _serial = serial();
    // Mostly asleep: most transactions leave them alone, and they wake in the middle of
    // the int3-first phases.
    let interrupted_before = stop::interrupted_system_calls();
    let (flips, calls, cut) = flip_while_called(4, Some(Duration::from_micros(30)));
    let interrupted = stop::interrupted_system_calls() - interrupted_before;
    eprintln!("{flips} flips, {calls} calls, {cut} sleeps cut short, {interrupted} counted by the stop");
    assert!(flips >= 20, "only {flips} flips");
    assert!(calls >= 1000, "only {calls} calls");
    // A sleep cut short is one the stop signal reached as its thread entered it: each is
    // counted, none silent.
    assert!(cut <= interrupted, "{cut} sleeps returned EINTR, the stop counted {interrupted}");
}

#[test]
fn a_mismatch_changes_nothing() {
    let _serial = serial();
    let func = slot_with(&[MOV1[0], MOV1[1], MOV1[2], MOV1[3], MOV1[4], RET]);
    let err = replace(func.addr, &MOV2, &MOV1, TIMEOUT).unwrap_err();
    assert!(matches!(err, TextError::Unexpected { .. }), "{err:?}");
    assert_eq!(read_vec(func.addr, 5).unwrap(), MOV1);
    assert!(!trap::is_registered(func.addr));
    assert_eq!(as_fn(func)(), 1);
}

#[test]
fn trivial_cases_need_no_int3() {
    let _serial = serial();
    let func = slot_with(&[MOV1[0], MOV1[1], MOV1[2], MOV1[3], MOV1[4], RET]);
    replace(func.addr, &MOV1, &MOV1, TIMEOUT).unwrap();
    // Only the head differs: one atomic byte write, here `mov` -> `int3` and back (nothing
    // calls the function meanwhile, so the unowned int3 is never executed).
    replace(func.addr, &MOV1, &[0xCC, 1, 0, 0, 0], TIMEOUT).unwrap();
    assert_eq!(read_vec(func.addr, 1).unwrap(), [0xCC]);
    replace(func.addr, &[0xCC], &[0xb8], TIMEOUT).unwrap();
    assert_eq!(as_fn(func)(), 1);
    assert!(!trap::is_registered(func.addr));
}

/// A site that already has a trap owner keeps it through the transaction.
#[test]
fn an_owned_int3_head_keeps_its_owner() {
    let _serial = serial();
    fn owner(resume: usize, ctx: &mut TrapContext<'_>) {
        ctx.set_ip(resume as u64);
    }
    let func = slot_with(&[0xCC, 1, 0, 0, 0, RET]);
    let via = slot_with(&[MOV1[0], MOV1[1], MOV1[2], MOV1[3], MOV1[4], RET]);
    trap::register_site(func.addr, owner, via.addr as usize).unwrap();
    assert_eq!(as_fn(func)(), 1, "the owner handles the int3");
    replace(func.addr, &[0xCC, 1, 0, 0, 0], &MOV2, TIMEOUT).unwrap();
    assert!(trap::is_registered(func.addr), "the owner's site is left alone");
    trap::unregister_site(func.addr);
    assert_eq!(as_fn(func)(), 2);
}

/// Two edits a few pages apart with a hole between them — node's text has an unmapped gap
/// below its last executable page — are written as two ranges, not one that the hole makes
/// unreadable (which failed the whole transaction with EFAULT).
#[test]
fn edits_on_both_sides_of_an_unmapped_hole_are_written() {
    let _serial = serial();
    const PAGE: usize = 4096;
    // SAFETY: a fresh anonymous mapping of three pages, owned by this test.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            3 * PAGE,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let base = base as u64;
    // SAFETY: the middle page of the mapping made above, which nothing else uses.
    assert_eq!(unsafe { libc::munmap((base + PAGE as u64) as *mut libc::c_void, PAGE) }, 0);
    let (low, high) = (base + PAGE as u64 - 16, base + 2 * PAGE as u64 + 16);
    let zeros = [0u8; 5];
    let mut edits = Edits::new(vec![(low, &zeros[..], &MOV1[..]), (high, &zeros[..], &MOV2[..])]);
    let mut txn = Transaction::begin(edits.ranges(), Duration::from_secs(5)).unwrap();
    txn.write(&mut edits, |_, _| {}).unwrap();
    txn.commit().unwrap();
    assert_eq!(read_vec(low, 5).unwrap(), MOV1);
    assert_eq!(read_vec(high, 5).unwrap(), MOV2);
    // SAFETY: the two pages left of the mapping made above.
    unsafe {
        libc::munmap(base as *mut libc::c_void, PAGE);
        libc::munmap((base + 2 * PAGE as u64) as *mut libc::c_void, PAGE);
    }
}
