//! The process's one `SIGTRAP` dispatcher.
//!
//! Owners of `int3` sites (the probe layer, and [`crate::poke`] for its transient `int3`)
//! register the site's address with a plain function and a word of data. The dispatcher
//! finds the owner with a lock-free lookup, allocates nothing, takes no lock, and:
//! * calls the owner, which may change every register through the context;
//! * for an `int3` that was ours but has been removed meanwhile, rewinds `rip` so the thread
//!   re-executes whatever is there now;
//! * passes every other trap on to the handler installed before ours (or the default action).
#![allow(missing_docs, unused_variables)]

use crate::TextError;

/// A site owner's trap handler: `data` is the word given at registration.
pub type TrapFn = fn(data: usize, ctx: &mut TrapContext<'_>);

/// The trapped thread's state, as the owner sees it.
pub struct TrapContext<'a> {
    addr: u64,
    uc: &'a mut libc::ucontext_t,
}

impl<'a> TrapContext<'a> {
    /// Address of the `int3` that trapped.
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// The thread's `rip` (after the `int3` on entry).
    pub fn ip(&self) -> u64 {
        self.uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64
    }
    /// Sets where the thread continues.
    pub fn set_ip(&mut self, ip: u64) {
        self.uc.uc_mcontext.gregs[libc::REG_RIP as usize] = ip as i64;
    }
    /// The whole signal context, for owners that read or change other registers.
    pub fn ucontext(&mut self) -> &mut libc::ucontext_t {
        self.uc
    }
}

/// Installs the dispatcher (idempotent).
pub fn install() -> Result<(), TextError> {
    todo!()
}

/// Makes `handler(data, ..)` the owner of the `int3` at `addr`. Must be called before the
/// `int3` is written. Installs the dispatcher if needed.
pub fn register_site(addr: u64, handler: TrapFn, data: usize) -> Result<(), TextError> {
    todo!()
}

/// Ends the ownership of `addr`, after its `int3` was removed. A thread that trapped on it
/// and was not yet dispatched is rewound to re-execute the restored bytes.
pub fn unregister_site(addr: u64) {
    todo!()
}
