//! Executable memory near a target: reach, contents, executability, reuse.

use dynprobe_text::memory::{read_vec, write_verified};
use dynprobe_text::pool::{alloc_near, contains, free, ExecSlot};

const TWO_GIB: u64 = 1 << 31;

/// The tests share the pool; the reuse check needs no other test allocating in between.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[inline(never)]
fn a_function_in_the_executable() -> u32 {
    std::hint::black_box(7)
}

/// Every byte of `slot` is within ±2 GiB of every byte of `target .. target + 4096`.
fn assert_in_reach(slot: ExecSlot, target: u64) {
    let (first, last) = (slot.addr, slot.addr + slot.size as u64 - 1);
    for t in [target, target + 4095] {
        assert!(first.abs_diff(t) < TWO_GIB, "{first:#x} too far from {t:#x}");
        assert!(last.abs_diff(t) < TWO_GIB, "{last:#x} too far from {t:#x}");
    }
}

/// Writes `mov $42, %eax; ret` into `slot` and calls it.
fn run_mov42(slot: ExecSlot) -> u32 {
    let code = [0xb8, 42, 0, 0, 0, 0xc3];
    write_verified(slot.addr, &[0xCC; 6], &code).unwrap();
    // SAFETY: the slot holds a complete function following the C ABI (returns in eax).
    let f: extern "C" fn() -> u32 = unsafe { std::mem::transmute(slot.addr as usize) };
    f()
}

fn check_target(target: u64) {
    let _serial = serial();
    let slot = alloc_near(target, 100).unwrap();
    eprintln!("target {target:#x}: slot {:#x}+{}", slot.addr, slot.size);
    assert!(slot.size >= 100);
    assert_in_reach(slot, target);
    assert!(contains(slot.addr) && contains(slot.addr + slot.size as u64 - 1));
    assert_eq!(read_vec(slot.addr, slot.size).unwrap(), vec![0xCC; slot.size]);
    assert_eq!(run_mov42(slot), 42);

    free(slot);
    assert_eq!(read_vec(slot.addr, slot.size).unwrap(), vec![0xCC; slot.size], "refilled with int3");
    let again = alloc_near(target, 100).unwrap();
    assert_eq!(again.addr, slot.addr, "a freed slot is reused");
    free(again);
}

#[test]
fn slots_near_the_main_executable() {
    check_target(a_function_in_the_executable as *const () as usize as u64);
}

#[test]
fn slots_near_libc() {
    check_target(libc::getpid as *const () as usize as u64);
}

#[test]
fn slots_do_not_overlap_and_big_requests_work() {
    let _serial = serial();
    let target = a_function_in_the_executable as *const () as usize as u64;
    let a = alloc_near(target, 1).unwrap();
    let b = alloc_near(target, 1).unwrap();
    assert!(a.addr + a.size as u64 <= b.addr || b.addr + b.size as u64 <= a.addr);
    assert_eq!(a.addr % 16, 0);
    let big = alloc_near(target, 200 * 1024).unwrap();
    assert!(big.size >= 200 * 1024);
    assert_in_reach(big, target);
    assert_eq!(read_vec(big.addr + big.size as u64 - 16, 16).unwrap(), vec![0xCC; 16]);
    for s in [a, b, big] {
        free(s);
    }
}

#[test]
fn contains_is_false_elsewhere() {
    assert!(!contains(a_function_in_the_executable as *const () as usize as u64));
    let x = 0u64;
    assert!(!contains(&x as *const u64 as u64));
}

/// A chunk none of whose slots is handed out is unmapped by `release_unused` (the end of
/// an attach session); one with a slot in use stays.
#[test]
fn release_unused_unmaps_only_chunks_with_no_slot_in_use() {
    let _serial = serial();
    let mapped = |addr: u64| {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines().any(|l| {
            let (start, end) = l.split_whitespace().next().unwrap().split_once('-').unwrap();
            (u64::from_str_radix(start, 16).unwrap()..u64::from_str_radix(end, 16).unwrap()).contains(&addr)
        })
    };
    let target = a_function_in_the_executable as *const () as usize as u64;
    let kept = alloc_near(target, 64).unwrap();
    let freed = alloc_near(target, 64).unwrap();
    free(freed);
    assert!(dynprobe_text::pool::release_unused() > 0, "the chunk with a slot in use was unmapped");
    assert!(contains(kept.addr) && mapped(kept.addr));
    assert_eq!(run_mov42(kept), 42);
    free(kept);
    dynprobe_text::pool::release_unused();
    assert!(!contains(kept.addr), "the pool still lists the chunk");
    assert!(!mapped(kept.addr), "the unused chunk is still mapped");
}
