//! dynprobe's own threads inside the probed process (the optimizer, the agent's session and
//! `dlopen` watcher), which must never be seen: no probe hit, no traced call, no event.
//!
//! A thread is told apart by the stack it runs on. dynprobe maps each of its threads' stack
//! itself and records the range *before* `pthread_create`, so the check holds from the new
//! thread's first instruction — the C library's `start_thread` and what it calls run before
//! any code of ours could set a per-thread flag, and a probe on them must not see that
//! thread either. Every hit path asks [`current_thread_is_own`] first (the detours' dispatcher
//! asks the thread's slot, which keeps that answer per thread): a couple of loads and
//! compares, no system call, safe in a signal handler and a detour (a signal handler of an
//! own thread runs on the same stack: a new thread starts without an alternate signal
//! stack, `sigaltstack(2)`).
//!
//! Each thread is joined at the end of its work and its stack unmapped ([`OwnThread::join`]),
//! so a session leaves no thread and no mapping behind. The threads block every signal the
//! program could send to the process (`signal(7)`: a process-directed signal goes to any
//! thread that does not block it, and the program's handler would then run on dynprobe's
//! thread); the synchronous ones, and the stop signal of the text layer, stay deliverable.

use crate::arch::stack_pointer;
use crate::thread_slot::{thread_alive, ThreadSlot};
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// How many own threads may run at once.
const MAX_OWN: usize = 8;
/// Each own thread's stack (Rust's default for spawned threads), plus one guard page below.
const STACK_SIZE: usize = 2 << 20;
const PAGE: usize = 4096;

/// The stacks of the own threads: `[LOW[i], LOW[i] + LEN[i])`; a free entry has `LEN` 0.
static LOW: [AtomicUsize; MAX_OWN] = [const { AtomicUsize::new(0) }; MAX_OWN];
static LEN: [AtomicUsize; MAX_OWN] = [const { AtomicUsize::new(0) }; MAX_OWN];
/// One past the highest entry ever used: the hot path scans no further.
static USED: AtomicUsize = AtomicUsize::new(0);
/// Serializes the writers of the table (thread creation and joining, both rare).
static TABLE: Mutex<()> = Mutex::new(());

/// How many threads are hidden by [`set_current_thread_hidden`] now: while none is, the
/// hot path does not look for the caller's slot.
static HIDDEN: AtomicUsize = AtomicUsize::new(0);

/// True when the calling thread is one of dynprobe's own (see the module documentation),
/// or is hidden for now ([`set_current_thread_hidden`]). Allocation-free, lock-free, no
/// system call.
#[inline]
pub fn current_thread_is_own() -> bool {
    let used = USED.load(Ordering::Relaxed);
    if used != 0 {
        let sp = stack_pointer();
        // A length is published (Release) after its base: a reader that sees it sees the base.
        // Iterated, not indexed: the detours' dispatcher calls this, and must not be able
        // to panic (see `crate::light`).
        let own = LOW.iter().zip(&LEN).take(used).any(|(low, len)| {
            let len = len.load(Ordering::Acquire);
            len != 0 && sp.wrapping_sub(low.load(Ordering::Relaxed)) < len
        });
        if own {
            return true;
        }
    }
    HIDDEN.load(Ordering::Relaxed) != 0 && ThreadSlot::existing().is_some_and(|s| s.hidden.load(Ordering::Relaxed))
}

/// True when `sp` lies on the stack of one of dynprobe's own threads: another thread, held
/// stopped, is told apart by the stack pointer it was stopped with, as a thread tells
/// itself apart in [`current_thread_is_own`].
pub(crate) fn is_own_stack(sp: u64) -> bool {
    let used = USED.load(Ordering::Relaxed);
    LOW.iter().zip(&LEN).take(used).any(|(low, len)| {
        let len = len.load(Ordering::Acquire);
        len != 0 && (sp as usize).wrapping_sub(low.load(Ordering::Relaxed)) < len
    })
}

/// Hides (`true`) or shows again (`false`) the calling thread from every probe, for dynprobe
/// work that runs on a thread of the program: the agent placing probes from the loader's
/// constructor, on the main thread, before `main` (its allocations would be hits of a probe
/// on `malloc`). Calls must pair on one thread.
pub fn set_current_thread_hidden(hidden: bool) {
    let Some((_, slot)) = ThreadSlot::current() else { return };
    if slot.hidden.swap(hidden, Ordering::Relaxed) != hidden {
        if hidden {
            HIDDEN.fetch_add(1, Ordering::Relaxed);
        } else {
            HIDDEN.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A running own thread; [`OwnThread::join`] waits for it and frees its stack.
#[derive(Debug)]
#[must_use = "an own thread must be joined, kept or detached: dropped, it is never joined and its stack stays mapped"]
pub struct OwnThread {
    thread: libc::pthread_t,
    entry: usize,
    /// The mapping: a guard page, then `size` bytes of stack.
    stack: usize,
    size: usize,
}

// SAFETY: the fields are a pthread id and addresses owned by this value; joining from any
// thread is what pthread_join allows.
unsafe impl Send for OwnThread {}

/// Starts `f` on a new own thread named `name` (the kernel keeps 15 bytes of it:
/// `prctl(2)` `PR_SET_NAME`). Fails with the error of `mmap` or `pthread_create`, or
/// `EAGAIN` when `MAX_OWN` (8) own threads already run.
pub fn spawn(name: &'static CStr, f: impl FnOnce() + Send + 'static) -> io::Result<OwnThread> {
    let size = stack_size();
    let stack = map_stack(size)?;
    let Some(entry) = register(stack, size + PAGE) else {
        unmap_stack(stack, size);
        return Err(io::Error::from_raw_os_error(libc::EAGAIN));
    };
    let start: Box<Start> = Box::new(Start { name, f: Box::new(f) });
    let arg = Box::into_raw(start);
    // SAFETY: the stack above the guard page is fresh and ours alone.
    match unsafe { create(stack + PAGE, size, false, arg) } {
        Ok(thread) => Ok(OwnThread { thread, entry, stack, size }),
        Err(e) => {
            // SAFETY: the thread was not created: the box is still ours alone.
            drop(unsafe { Box::from_raw(arg) });
            unregister(entry);
            unmap_stack(stack, size);
            Err(e)
        }
    }
}

impl OwnThread {
    /// Waits until the thread has ended, then unmaps its stack.
    pub fn join(self) {
        // SAFETY: the thread is joinable and joined once (this consumes the handle).
        unsafe { libc::pthread_join(self.thread, std::ptr::null_mut()) };
        unregister(self.entry);
        unmap_stack(self.stack, self.size);
    }

    /// Detaches the thread, leaving its stack mapped: `(base, length)` of the mapping, for
    /// whoever unmaps it once the thread has ended (its task gone from `/proc/PID/task`;
    /// the C library has let go of a detached thread's stack by then). For the last thread
    /// of a library about to be unloaded, which nothing inside the process can join.
    pub fn detach_leaving_stack(self) -> (usize, usize) {
        // SAFETY: detaching a joinable thread we created, once.
        unsafe { libc::pthread_detach(self.thread) };
        (self.stack, self.size + PAGE)
    }

    /// Lets the thread run for the rest of the process's life (its stack stays).
    pub fn keep(self) {
        // SAFETY: detaching a joinable thread we created, once.
        unsafe { libc::pthread_detach(self.thread) };
    }

    /// Has the thread joined, and its stack unmapped, once it has ended — for a thread that
    /// hands over its own handle as its last act (an attach session, which nobody waits
    /// for). The join runs on the *reaper*, a short-lived own thread whose small stack is
    /// part of this library's own memory (no mapping of its own) and which, detached, leaves
    /// nothing behind either. If no reaper can run (the previous one has not ended within a
    /// second, or the C library needs more than its stack for a program's large static TLS),
    /// the error says so and the thread is joined by the next call instead: its stack stays
    /// mapped until then, one at a time.
    pub fn join_when_ended(self) -> io::Result<()> {
        let _reaper = REAPER.lock().unwrap_or_else(|e| e.into_inner());
        // Threads no reaper could take: ended long ago (each handed itself over as its last
        // act), so joining them here is immediate.
        let left = std::mem::take(&mut *UNJOINED.lock().unwrap_or_else(|e| e.into_inner()));
        left.into_iter().for_each(OwnThread::join);
        // The reaper's stack is reused: the previous reaper must have left it entirely.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let tid = REAPER_TID.load(Ordering::Acquire);
            if tid == 0 || (tid > 0 && !thread_alive(tid)) {
                break;
            }
            if std::time::Instant::now() > deadline {
                UNJOINED.lock().unwrap_or_else(|e| e.into_inner()).push(self);
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the previous reaper thread did not end"));
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        REAPER_TID.store(-1, Ordering::Release);
        let stack = REAPER_STACK.0.get() as usize;
        let mut entry = REAPER_ENTRY.load(Ordering::Relaxed);
        if entry == usize::MAX {
            // Registered once, for good: the memory is this library's and never a program
            // thread's stack.
            entry = register(stack, REAPER_STACK_SIZE).unwrap_or(usize::MAX);
            REAPER_ENTRY.store(entry, Ordering::Relaxed);
        }
        // Shared so that a failed start can take the handle back.
        let handle = std::sync::Arc::new(Mutex::new(Some(self)));
        let reaped = handle.clone();
        let start: Box<Start> = Box::new(Start {
            name: c"dynprobe-reaper",
            f: Box::new(move || {
                // SAFETY: gettid cannot fail.
                REAPER_TID.store(unsafe { libc::syscall(libc::SYS_gettid) } as i32, Ordering::Release);
                if let Some(thread) = reaped.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    thread.join();
                }
            }),
        });
        let arg = Box::into_raw(start);
        // SAFETY: the static stack is unused (the previous reaper is gone, checked above).
        match unsafe { create(stack, REAPER_STACK_SIZE, true, arg) } {
            Ok(_) => Ok(()),
            Err(e) => {
                REAPER_TID.store(0, Ordering::Release);
                // SAFETY: no thread was created: the box is still ours alone.
                drop(unsafe { Box::from_raw(arg) });
                if let Some(thread) = handle.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    UNJOINED.lock().unwrap_or_else(|e| e.into_inner()).push(thread);
                }
                Err(e)
            }
        }
    }
}

/// The reaper's stack: enough for the C library's thread start and exit and one join.
const REAPER_STACK_SIZE: usize = 128 << 10;

#[repr(C, align(4096))]
struct ReaperStack(std::cell::UnsafeCell<[u8; REAPER_STACK_SIZE]>);

// SAFETY: only one reaper at a time runs on it (REAPER_TID, under REAPER).
unsafe impl Sync for ReaperStack {}

static REAPER_STACK: ReaperStack = ReaperStack(std::cell::UnsafeCell::new([0; REAPER_STACK_SIZE]));
/// Serializes reaper starts.
static REAPER: Mutex<()> = Mutex::new(());
/// Threads handed over when no reaper could run: joined by the next hand-over.
static UNJOINED: Mutex<Vec<OwnThread>> = Mutex::new(Vec::new());
/// The last reaper's tid; -1 while one starts, 0 before the first.
static REAPER_TID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// The reaper stack's entry in the table (`usize::MAX` until registered).
static REAPER_ENTRY: AtomicUsize = AtomicUsize::new(usize::MAX);

/// What the new thread runs.
struct Start {
    name: &'static CStr,
    f: Box<dyn FnOnce() + Send>,
}

extern "C" fn start(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `spawn` passed a leaked Box<Start> and gave up ownership to this thread.
    let start = unsafe { Box::from_raw(arg.cast::<Start>()) };
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (the kernel truncates it to 15 bytes).
    unsafe { libc::prctl(libc::PR_SET_NAME, start.name.as_ptr()) };
    // Also out of the function-graph tracer's own bookkeeping (its `untraced` mark).
    crate::thread_slot::set_current_thread_traced(false);
    // A panic must not unwind into the C library's start_thread.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(start.f));
    std::ptr::null_mut()
}

/// The stack size to ask for: [`STACK_SIZE`] for our code, plus what the C library takes
/// from the top of a stack it is given — the static TLS blocks of every module, which a
/// program's large `__thread` arrays make large — as Rust's standard library computes it
/// (glibc's `__pthread_get_minstack`, when it has one).
fn stack_size() -> usize {
    type MinStack = unsafe extern "C" fn(*const libc::pthread_attr_t) -> usize;
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks it up.
    let found = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__pthread_get_minstack".as_ptr()) };
    let extra = match found.is_null() {
        true => libc::PTHREAD_STACK_MIN,
        false => {
            // SAFETY: glibc's function of this name has this signature; the attribute is
            // initialized before and destroyed after the call.
            unsafe {
                let get: MinStack = std::mem::transmute(found);
                let mut attr: libc::pthread_attr_t = std::mem::zeroed();
                libc::pthread_attr_init(&mut attr);
                let min = get(&attr);
                libc::pthread_attr_destroy(&mut attr);
                min
            }
        }
    };
    (STACK_SIZE + extra).next_multiple_of(PAGE)
}

/// Maps a stack of `size` bytes with a guard page below; returns its base (the guard page's).
fn map_stack(size: usize) -> io::Result<usize> {
    // SAFETY: a fresh anonymous private mapping, no address hint.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size + PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the first page of the mapping just made, ours alone.
    if unsafe { libc::mprotect(base, PAGE, libc::PROT_NONE) } == -1 {
        let e = io::Error::last_os_error();
        unmap_stack(base as usize, size);
        return Err(e);
    }
    Ok(base as usize)
}

fn unmap_stack(base: usize, size: usize) {
    // SAFETY: unmaps a stack `map_stack` made, whose thread has ended (or never started).
    unsafe { libc::munmap(base as *mut libc::c_void, size + PAGE) };
}

/// Records the stack `[base, base + len)` in a free entry; its index.
fn register(base: usize, len: usize) -> Option<usize> {
    let _table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let entry = (0..MAX_OWN).find(|&i| LEN[i].load(Ordering::Relaxed) == 0)?;
    LOW[entry].store(base, Ordering::Relaxed);
    LEN[entry].store(len, Ordering::Release);
    USED.fetch_max(entry + 1, Ordering::Release);
    Some(entry)
}

fn unregister(entry: usize) {
    let _table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    LEN[entry].store(0, Ordering::Release);
}

/// `pthread_create` on the stack `[base, base + len)`, detached or joinable, with every
/// asynchronous signal blocked from the new thread's first instruction (it inherits the mask
/// the creator has during the call).
///
/// # Safety
/// The stack must be writable memory no other thread uses until the new one has ended.
unsafe fn create(base: usize, len: usize, detached: bool, arg: *mut Start) -> io::Result<libc::pthread_t> {
    // SAFETY: attr, mask and thread are local plain data initialized by the calls below
    // before use; the stack is the caller's promise.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstack(&mut attr, base as *mut libc::c_void, len);
        if detached {
            libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        }
        let mut block: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut block);
        for sig in [libc::SIGTRAP, libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGSYS] {
            libc::sigdelset(&mut block, sig);
        }
        libc::sigdelset(&mut block, dynprobe_text::stop::stop_signal());
        libc::pthread_sigmask(libc::SIG_SETMASK, &block, &mut old);
        let mut thread: libc::pthread_t = 0;
        let created = libc::pthread_create(&mut thread, &attr, start, arg.cast());
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        libc::pthread_attr_destroy(&mut attr);
        match created {
            0 => Ok(thread),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_own_thread_is_told_apart_from_its_first_instruction_and_leaves_nothing() {
        assert!(!current_thread_is_own());
        let mapped = |addr: usize| {
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            maps.lines().any(|l| l.starts_with(&format!("{addr:x}-")))
        };
        let (send, receive) = std::sync::mpsc::channel();
        let thread = spawn(c"dynprobe-test", move || {
            let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
            send.send((current_thread_is_own(), comm)).unwrap();
        })
        .unwrap();
        let (own, comm) = receive.recv().unwrap();
        assert!(own);
        assert_eq!(comm.trim(), "dynprobe-test");
        let stack = thread.stack;
        assert!(mapped(stack), "the guard page starts the stack's mapping");
        thread.join();
        assert!(!current_thread_is_own());
        assert!(!mapped(stack), "the thread's stack is unmapped after the join");
    }
}
