//! The process's one `SIGTRAP` dispatcher.
//!
//! Owners of `int3` sites (the probe layer, and [`crate::poke`] for its transient `int3`)
//! register the site's address with a plain function and a word of data. The dispatcher
//! finds the owner with a lock-free lookup, allocates nothing, takes no lock, and:
//! * calls the owner, which may change every register through the context;
//! * for an `int3` that was ours but has been removed meanwhile, rewinds `rip` so the thread
//!   re-executes whatever is there now (the kernel's "the breakpoint was removed by another
//!   CPU" case in `kprobe_int3_handler`);
//! * passes every other trap on to the handler installed before ours (or the default action).
//!
//! The dispatcher runs with `SA_NODEFER`: a probe hit inside a handler must be dispatched
//! again (the owner counts it as missed), because the kernel turns a *blocked* `SIGTRAP`
//! from `int3` into a fatal one. It blocks the stop signal of [`crate::stop`] so that a
//! thread held by a stop is never inside the dispatcher: one stop is a grace period.

use crate::TextError;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// A site owner's trap handler: `data` is the word given at registration.
pub type TrapFn = fn(data: usize, ctx: &mut TrapContext<'_>);

/// The trapped thread's state, as the owner sees it.
pub struct TrapContext<'a> {
    addr: u64,
    uc: &'a mut libc::ucontext_t,
}

impl TrapContext<'_> {
    /// Address of the `int3` that trapped.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The thread's `rip` (the byte after the `int3` on entry).
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

/// Capacity of the site table. Keys are never removed (a removed site must still be known
/// as "was ours" to rewind late trappers), so the table only grows. A probe site owns up to
/// three keys (its `int3`, its post slot's exits, its detour's slow-path `int3`), and a
/// program traced whole has as many sites as functions: `node` has 78k. 512 Ki entries
/// hold that with room to spare; they are 12 MiB of zero pages in `.bss`, of which only the
/// pages keys land on are ever touched.
const CAPACITY: usize = 1 << 19;
/// Refuse new keys past this fill, so lookups stay short.
const MAX_KEYS: usize = CAPACITY / 4 * 3;

struct Entry {
    /// Site address; 0 = never used.
    key: AtomicU64,
    /// The owner's `TrapFn` as a word; 0 = the site has no owner now.
    handler: AtomicUsize,
    data: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Entry = Entry { key: AtomicU64::new(0), handler: AtomicUsize::new(0), data: AtomicUsize::new(0) };

static TABLE: [Entry; CAPACITY] = [EMPTY; CAPACITY];

/// Serializes writers of the table and installation; the dispatcher never takes it.
static WRITERS: Mutex<usize> = Mutex::new(0);

/// The `SIGTRAP` action that was in place before ours, to pass foreign traps on to.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

fn slot_of(addr: u64) -> usize {
    // Fibonacci hashing spreads the low-entropy, 1-byte-apart code addresses.
    (addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - CAPACITY.trailing_zeros())) as usize
}

/// Lock-free: the entry whose key is `addr`, if it was ever registered.
fn find(addr: u64) -> Option<&'static Entry> {
    let mut i = slot_of(addr);
    for _ in 0..CAPACITY {
        let entry = &TABLE[i];
        match entry.key.load(Ordering::Acquire) {
            0 => return None,
            k if k == addr => return Some(entry),
            _ => i = (i + 1) & (CAPACITY - 1),
        }
    }
    None
}

/// Installs the dispatcher (idempotent).
pub fn install() -> Result<(), TextError> {
    let _writers = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    if PREVIOUS.get().is_some() {
        return Ok(());
    }
    // SAFETY: an all-zero sigaction is a valid value to be filled in (SIG_DFL, empty mask).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = dispatch as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART;
    // SAFETY: sa_mask is a valid sigset_t owned by `action`.
    unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaddset(&mut action.sa_mask, crate::stop::stop_signal());
    }
    // SAFETY: as above, a zeroed sigaction is valid storage for the old action.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to valid sigaction values; `dispatch` has the SA_SIGINFO
    // signature and is async-signal-safe.
    let rc = unsafe { libc::sigaction(libc::SIGTRAP, &action, &mut previous) };
    if rc != 0 {
        return Err(TextError::Unwritable {
            addr: 0,
            reason: format!("cannot install the SIGTRAP handler: {}", std::io::Error::last_os_error()),
        });
    }
    // The dispatcher may run from here on; a trap before PREVIOUS is set can only be a
    // foreign one, which `pass_on` then treats as SIG_DFL — the behaviour without us.
    let _ = PREVIOUS.set(previous);
    Ok(())
}

/// Makes `handler(data, ..)` the owner of the `int3` at `addr`. Must be called before the
/// `int3` is written. Installs the dispatcher if needed.
pub fn register_site(addr: u64, handler: TrapFn, data: usize) -> Result<(), TextError> {
    install()?;
    let mut keys = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    let entry = match find(addr) {
        Some(entry) => entry,
        None => {
            if *keys >= MAX_KEYS {
                return Err(TextError::TrapTableFull);
            }
            let mut i = slot_of(addr);
            while TABLE[i].key.load(Ordering::Relaxed) != 0 {
                i = (i + 1) & (CAPACITY - 1);
            }
            *keys += 1;
            &TABLE[i]
        }
    };
    // Data before handler: a dispatcher that sees the handler sees this site's data.
    entry.data.store(data, Ordering::Release);
    entry.handler.store(handler as *const () as usize, Ordering::Release);
    entry.key.store(addr, Ordering::Release);
    Ok(())
}

/// Ends the ownership of `addr`, after its `int3` was removed. A thread that trapped on it
/// and was not yet dispatched is rewound to re-execute the restored bytes.
pub fn unregister_site(addr: u64) {
    let _writers = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(entry) = find(addr) {
        entry.handler.store(0, Ordering::Release);
    }
}

/// True when `addr` has an owner now.
pub fn is_registered(addr: u64) -> bool {
    find(addr).is_some_and(|e| e.handler.load(Ordering::Acquire) != 0)
}

/// `si_code` of a `SIGTRAP` raised by `int3` (the kernel's `force_sig(SIGTRAP)`).
const SI_KERNEL: i32 = 0x80;

extern "C" fn dispatch(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel passes valid siginfo and ucontext pointers to an SA_SIGINFO
    // handler, exclusively ours for the duration of the call.
    let (code, uc_ref) = unsafe { ((*info).si_code, &mut *(uc as *mut libc::ucontext_t)) };
    if code == SI_KERNEL {
        let addr = (uc_ref.uc_mcontext.gregs[libc::REG_RIP as usize] as u64).wrapping_sub(1);
        if let Some(entry) = find(addr) {
            // Twice at most: an owner is always registered before its int3 is written, so an
            // int3 found in place after the owner word read 0 means a new owner came in
            // between (the old int3 was removed and a new one written): it is the owner now.
            for _ in 0..2 {
                let handler = entry.handler.load(Ordering::Acquire);
                if handler != 0 {
                    let data = entry.data.load(Ordering::Acquire);
                    // SAFETY: non-zero handler words are only ever stored from a `TrapFn`.
                    let handler: TrapFn = unsafe { std::mem::transmute::<usize, TrapFn>(handler) };
                    handler(data, &mut TrapContext { addr, uc: uc_ref });
                    return;
                }
                // SAFETY: `addr` was registered as code that is mapped; one volatile byte read.
                let now = unsafe { std::ptr::read_volatile(addr as *const u8) };
                if now != dynprobe_arch::x86_64::INT3 {
                    uc_ref.uc_mcontext.gregs[libc::REG_RIP as usize] = addr as i64;
                    return;
                }
            }
        }
    }
    // SAFETY: the arguments are the ones the kernel gave us.
    unsafe { pass_on(sig, info, uc) }
}

/// Hands a trap that is not ours to the previous action, as if we had never been installed.
///
/// # Safety
/// The arguments must be those of a signal handler invocation.
unsafe fn pass_on(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    let previous = PREVIOUS.get();
    let handler = previous.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    if handler == libc::SIG_IGN {
        return;
    }
    if handler == libc::SIG_DFL {
        // The default action of SIGTRAP terminates with a core dump: restore it and raise
        // the signal again, delivered when this handler returns.
        // SAFETY: a zeroed sigaction is SIG_DFL with an empty mask; sigaction, getpid,
        // gettid and tgkill are async-signal-safe.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
            libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), sig);
        }
        return;
    }
    let siginfo = previous.is_some_and(|p| p.sa_flags & libc::SA_SIGINFO != 0);
    if siginfo {
        // SAFETY: the previous owner installed this function with SA_SIGINFO.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, uc);
    } else {
        // SAFETY: the previous owner installed this function as a plain handler.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}
