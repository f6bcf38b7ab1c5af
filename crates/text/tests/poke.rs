//! The int3-first protocol against threads executing the very bytes being replaced.

use dynprobe_text::memory::{read_vec, write_verified};
use dynprobe_text::poke::poke;
use dynprobe_text::pool::{alloc_near, ExecSlot};
use dynprobe_text::trap::{self, TrapContext};
use dynprobe_text::TextError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const MOV1: [u8; 5] = [0xb8, 1, 0, 0, 0]; // mov $1, %eax
const MOV2: [u8; 5] = [0xb8, 2, 0, 0, 0]; // mov $2, %eax
const RET: u8 = 0xc3;

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

/// An out-of-line copy of `mov` for threads that hit the transient int3: counts the hit in
/// `*counter`, executes `mov`, and jumps back behind the patched instruction.
///
/// ```text
///   movabs $counter, %rcx       48 b9 <imm64>
///   lock incq (%rcx)            f0 48 ff 01
///   mov $n, %eax                b8 <imm32>
///   jmp resume                  e9 <rel32>
/// ```
fn resume_slot(mov: [u8; 5], counter: &'static AtomicU64, resume: u64) -> ExecSlot {
    let mut code = vec![0x48, 0xb9];
    code.extend_from_slice(&(counter.as_ptr() as u64).to_le_bytes());
    code.extend_from_slice(&[0xf0, 0x48, 0xff, 0x01]);
    code.extend_from_slice(&mov);
    code.push(0xe9);
    let slot = alloc_near(resume, code.len() + 4).unwrap();
    let rel = resume as i64 - (slot.addr as i64 + code.len() as i64 + 4);
    code.extend_from_slice(&i32::try_from(rel).unwrap().to_le_bytes());
    write_verified(slot.addr, &vec![0xCC; code.len()], &code).unwrap();
    slot
}

#[test]
fn patching_a_function_while_two_threads_call_it() {
    static TRAPPED: AtomicU64 = AtomicU64::new(0);
    let func = slot_with(&[MOV1[0], MOV1[1], MOV1[2], MOV1[3], MOV1[4], RET]);
    let after_mov = func.addr + 5;
    let via1 = resume_slot(MOV1, &TRAPPED, after_mov);
    let via2 = resume_slot(MOV2, &TRAPPED, after_mov);

    let quit = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..2)
        .map(|_| {
            let quit = quit.clone();
            let f = as_fn(func);
            thread::spawn(move || {
                let (mut calls, mut bad) = (0u64, Vec::new());
                while !quit.load(Ordering::Relaxed) {
                    let r = f();
                    if r != 1 && r != 2 && bad.len() < 10 {
                        bad.push(r);
                    }
                    calls += 1;
                }
                (calls, bad)
            })
        })
        .collect();

    let started = Instant::now();
    let mut pokes = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        poke(func.addr, &MOV1, &MOV2, via1.addr).unwrap();
        poke(func.addr, &MOV2, &MOV1, via2.addr).unwrap();
        pokes += 2;
    }
    quit.store(true, Ordering::Relaxed);
    let mut calls = 0;
    for c in callers {
        let (n, bad) = c.join().unwrap();
        assert!(bad.is_empty(), "a caller saw {bad:?}");
        calls += n;
    }
    eprintln!("{pokes} pokes, {calls} calls, {} sent through the int3", TRAPPED.load(Ordering::Relaxed));
    assert!(pokes >= 1000, "only {pokes} pokes");
    assert!(calls > 0);
    assert_eq!(read_vec(func.addr, 6).unwrap(), [MOV1[0], MOV1[1], MOV1[2], MOV1[3], MOV1[4], RET]);
    assert!(!trap::is_registered(func.addr), "the transient site is gone");
}

#[test]
fn a_mismatch_changes_nothing() {
    let func = slot_with(&[MOV1[0], MOV1[1], MOV1[2], MOV1[3], MOV1[4], RET]);
    let err = poke(func.addr, &MOV2, &MOV1, func.addr + 5).unwrap_err();
    assert!(matches!(err, TextError::Unexpected { .. }), "{err:?}");
    assert_eq!(read_vec(func.addr, 5).unwrap(), MOV1);
    assert!(!trap::is_registered(func.addr));
    assert_eq!(as_fn(func)(), 1);
}

#[test]
fn trivial_cases_need_no_int3() {
    let func = slot_with(&[MOV1[0], MOV1[1], MOV1[2], MOV1[3], MOV1[4], RET]);
    poke(func.addr, &MOV1, &MOV1, 0).unwrap();
    // Only the head differs: one atomic byte write, here `mov` -> `int3` and back (nothing
    // calls the function meanwhile, so the unowned int3 is never executed).
    poke(func.addr, &MOV1, &[0xCC, 1, 0, 0, 0], 0).unwrap();
    assert_eq!(read_vec(func.addr, 1).unwrap(), [0xCC]);
    poke(func.addr, &[0xCC], &[0xb8], 0).unwrap();
    assert_eq!(as_fn(func)(), 1);
    assert!(!trap::is_registered(func.addr));
}

/// A site that already has a trap owner keeps it through the poke: no transient site.
#[test]
fn an_owned_int3_head_keeps_its_owner() {
    fn owner(resume: usize, ctx: &mut TrapContext<'_>) {
        ctx.set_ip(resume as u64);
    }
    let func = slot_with(&[0xCC, 1, 0, 0, 0, RET]);
    let via = slot_with(&[MOV1[0], MOV1[1], MOV1[2], MOV1[3], MOV1[4], RET]);
    trap::register_site(func.addr, owner, via.addr as usize).unwrap();
    assert_eq!(as_fn(func)(), 1, "the owner handles the int3");
    poke(func.addr, &[0xCC, 1, 0, 0, 0], &MOV2, 0).unwrap();
    assert!(trap::is_registered(func.addr), "the owner's site is left alone");
    trap::unregister_site(func.addr);
    assert_eq!(as_fn(func)(), 2);
}
