//! Verify-then-modify against real mappings of this process.

use dynprobe_text::memory::{read, read_vec, verify, write_verified};
use dynprobe_text::TextError;

/// Maps `len` bytes of anonymous memory with `prot`.
fn map(len: usize, prot: i32) -> u64 {
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED);
    p as u64
}

/// A page no access reaches. It stays mapped (with no permissions) rather than being
/// unmapped: the tests run on parallel threads, and another test's mmap could otherwise be
/// handed the freed address between our munmap and our read.
fn unmapped_page() -> u64 {
    map(4096, libc::PROT_NONE)
}

#[test]
fn reading_an_unmapped_address_is_unreadable_not_a_crash() {
    let addr = unmapped_page();
    let mut buf = [0u8; 8];
    assert_eq!(read(addr, &mut buf), Err(TextError::Unreadable { addr, len: 8 }));
}

#[test]
fn a_read_running_into_an_unmapped_page_is_unreadable() {
    let page = map(8192, libc::PROT_READ);
    // SAFETY: takes every permission from the second page of our own mapping (not unmapped,
    // for the reason given at unmapped_page); nothing refers to it.
    let rc = unsafe { libc::mprotect((page + 4096) as *mut libc::c_void, 4096, libc::PROT_NONE) };
    assert_eq!(rc, 0);
    assert_eq!(read_vec(page + 4092, 8), Err(TextError::Unreadable { addr: page + 4092, len: 8 }));
    assert_eq!(read_vec(page + 4092, 4), Ok(vec![0; 4]));
}

#[test]
fn verify_mismatch_is_unexpected_and_leaves_memory_unchanged() {
    let addr = map(4096, libc::PROT_READ | libc::PROT_EXEC);
    let err = write_verified(addr, &[1, 2, 3], &[9, 9, 9]).unwrap_err();
    assert_eq!(err, TextError::Unexpected { addr, expected: vec![1, 2, 3], found: vec![0, 0, 0] });
    assert_eq!(read_vec(addr, 3).unwrap(), vec![0, 0, 0]);
    assert!(verify(addr, &[0, 0, 0]).is_ok());
    assert!(matches!(verify(addr, &[0, 1]), Err(TextError::Unexpected { .. })));
}

#[test]
fn write_verified_writes_through_a_read_only_executable_mapping() {
    let addr = map(4096, libc::PROT_READ | libc::PROT_EXEC);
    write_verified(addr + 100, &[0; 5], &[0xb8, 1, 2, 3, 4]).unwrap();
    assert_eq!(read_vec(addr + 99, 7).unwrap(), vec![0, 0xb8, 1, 2, 3, 4, 0]);
    // The page is still not writable by ordinary stores: the mapping's protection was not
    // touched (checked through /proc/self/maps).
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    // The kernel may have merged the mapping with a neighbour of the same protection: look
    // for the one that contains the address.
    let contains = |l: &&str| {
        let range = l.split(' ').next().unwrap_or("");
        let (lo, hi) = range.split_once('-').unwrap_or(("0", "0"));
        let (lo, hi) = (u64::from_str_radix(lo, 16).unwrap_or(0), u64::from_str_radix(hi, 16).unwrap_or(0));
        (lo..hi).contains(&addr)
    };
    let line = maps.lines().find(contains).unwrap();
    assert!(line.contains(" r-xp "), "{line}");
}

#[test]
fn write_verified_into_an_unmapped_address_fails_cleanly() {
    let addr = unmapped_page();
    assert_eq!(write_verified(addr, &[0; 4], &[1; 4]), Err(TextError::Unreadable { addr, len: 4 }));
    assert_eq!(read_vec(addr, 1), Err(TextError::Unreadable { addr, len: 1 }));
}

#[test]
fn write_span_applies_the_edits_that_match_in_one_write() {
    let addr = map(8192, libc::PROT_READ | libc::PROT_EXEC);
    let mut writer = dynprobe_text::memory::CodeWriter::lock().unwrap();
    let mut scratch = vec![0u8; 4200];
    let nop = [0u8; 5];
    let call = [0xe8, 1, 2, 3, 4];
    let edits: [(u64, &[u8], &[u8]); 3] = [
        (addr + 10, &nop, &call),
        // Not what is there: left alone, reported.
        (addr + 100, &[0x90; 5], &call),
        // Across the page boundary.
        (addr + 4094, &nop, &call),
    ];
    let mut applied = [false; 3];
    writer.write_span(addr + 10, &mut scratch, &edits, &mut applied).unwrap();
    assert_eq!(applied, [true, false, true]);
    assert_eq!(read_vec(addr + 10, 5).unwrap(), call);
    assert_eq!(read_vec(addr + 100, 5).unwrap(), nop);
    assert_eq!(read_vec(addr + 4094, 5).unwrap(), call);
    // Everything else in the range is as it was.
    let all = read_vec(addr, 8192).unwrap();
    assert_eq!(all.iter().filter(|&&b| b != 0).count(), 10);
}
