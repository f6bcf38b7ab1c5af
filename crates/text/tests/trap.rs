//! The dispatcher's handling of a trap on an `int3` that was ours but is gone by the time
//! the thread is dispatched: the thread must re-execute whatever is there now.

use dynprobe_text::{memory, pool, trap};

fn never_called(_: usize, _: &mut trap::TrapContext<'_>) {
    panic!("the site was unregistered; its handler must not run");
}

#[test]
fn a_trap_on_a_removed_int3_re_executes_the_restored_bytes() {
    // The window between "a thread trapped on our int3" and "the dispatcher looked the
    // address up" cannot be hit on purpose, so build its outcome directly: `int $3` (cd 03)
    // traps with rip after it, so the dispatcher reads the trapping address as the `03`
    // byte — an address we owned, that no longer holds 0xcc. Rewinding there executes
    // `03 c0` = add %eax,%eax.
    //
    //   +0  89 f8     mov %edi,%eax
    //   +2  cd 03     int $3           (site +3 "was ours")
    //   +3     03 c0  add %eax,%eax    (what a rewound thread executes)
    //   +5  c3        ret
    let code = [0x89, 0xf8, 0xcd, 0x03, 0xc0, 0xc3];
    let anchor = a_trap_on_a_removed_int3_re_executes_the_restored_bytes as *const () as u64;
    let slot = pool::alloc_near(anchor, 64).unwrap();
    memory::write_verified(slot.addr, &[0xcc; 6], &code).unwrap();
    let site = slot.addr + 3;
    trap::register_site(site, never_called, 0).unwrap();
    trap::unregister_site(site);
    assert!(!trap::is_registered(site));

    // SAFETY: the slot holds the complete function above, with the SysV signature.
    let f: extern "C" fn(u32) -> u32 = unsafe { std::mem::transmute(slot.addr) };
    assert_eq!(f(21), 42, "the thread was rewound onto the restored instruction");
}
