//! Loading a shared library into a running process: one of its threads, stopped with
//! ptrace, calls the process's own `dlopen`, then `dlsym` and the library's entry function.
//!
//! Which thread matters. `dlopen` takes the loader's lock and calls `malloc`; a thread
//! stopped while it holds either (inside `malloc`, or half-way through a `dlopen` of its
//! own) would deadlock on itself, or worse re-enter the loader with its data half updated
//! (the loader lock is recursive). The other threads are never stopped, so any lock *they*
//! hold is released in due course. The thread to use is therefore one that holds no such
//! lock:
//!
//! 1. a thread blocked in a system call other than `futex` (`read`, `nanosleep`, `poll`,
//!    `epoll_wait`, …): the program is waiting for input or time, not inside the
//!    allocator; `futex` is excluded since a thread waits there for a lock — perhaps the
//!    allocator's or the loader's, while holding another;
//! 2. then the others (blocked in `futex`, or running).
//!
//! Whatever the kind, the stopped thread's instruction pointer must not be inside the
//! dynamic loader or the allocator; if it is, the thread is let go and caught again a
//! moment later, and after a few tries the next candidate is taken.

use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dynprobe_symbols::{SymbolError, SymbolTable};

use crate::call::{Arg, CallError};
use crate::error::{AttachError, Error};
use crate::proc::{self, ThreadActivity};
use crate::tracee::{Options, Tracee};

/// How long each call made in the target (`dlopen`, `dlsym`, the entry) may take by default.
///
/// Generous: a call that runs out of time is left to finish on its own, so the only cost
/// of a short one is a refused attach on a machine too loaded to run the loader in time.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The longest `dlerror()` message read back.
const DLERROR_MAX: usize = 4096;

/// How often a thread caught inside the loader or the allocator is let go and caught again
/// before the next candidate thread is tried.
const SAFE_PLACE_TRIES: usize = 20;

/// A library loaded by [`inject_library`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// `dlopen`'s handle, in the target's address space.
    pub handle: u64,
    /// The entry function's `int` return value (the agent's `dynprobe_attach` returns 0 or
    /// a negative `errno`).
    pub entry_return: i32,
    /// The thread that made the calls.
    pub tid: i32,
    /// The loader function used: `dlopen`, or `__libc_dlopen_mode` (glibc before 2.34
    /// without `libdl`).
    pub loader: &'static str,
}

/// Why a library could not be loaded into a process.
#[derive(Debug)]
#[non_exhaustive]
pub enum InjectError {
    /// Attaching failed (no such process, not permitted and why, …).
    Attach(AttachError),
    /// The process has no dynamic loader: a statically linked program (no `PT_INTERP`, no
    /// library mapped), or none of its libraries exports `dlopen`. Probes must then be
    /// driven from outside with ptrace.
    NoLoader {
        /// The process.
        pid: i32,
        /// Its executable.
        exe: PathBuf,
        /// What was found missing.
        why: String,
    },
    /// The target's symbols could not be read.
    Symbols(SymbolError),
    /// The library does not exist (here, in our mount namespace).
    LibraryNotFound {
        /// The path given.
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// The library's path does not name the same file in the target's mount namespace (a
    /// container): it would load something else or nothing.
    NotVisible {
        /// The process.
        pid: i32,
        /// The library, as we see it.
        path: PathBuf,
        /// What the target sees there.
        why: String,
    },
    /// The process runs under a seccomp filter that could kill it (or fail a call the agent
    /// needs) on a system call of the injection or the agent, or that cannot be read to
    /// tell: nothing was changed.
    Seccomp {
        /// The process.
        pid: i32,
        /// Which thread, which call and what the filter would do.
        why: String,
    },
    /// No thread of the process could be used (see the module documentation).
    NoUsableThread {
        /// The process.
        pid: i32,
        /// Why each candidate was refused.
        why: String,
    },
    /// A call in the target failed or did not return.
    Call {
        /// `dlopen`, `dlerror`, `dlsym` or the entry symbol.
        function: String,
        /// The thread.
        tid: i32,
        /// Where the thread was, for a timeout or a crash (`symbol+0x12 [module]`).
        location: Option<String>,
        /// The failure.
        error: CallError,
    },
    /// `dlopen` returned NULL.
    DlopenFailed {
        /// The library.
        path: PathBuf,
        /// `dlerror()`'s message.
        message: String,
    },
    /// The library has no such entry symbol.
    NoEntry {
        /// The symbol.
        symbol: String,
        /// `dlerror()`'s message.
        message: String,
    },
    /// Controlling the chosen thread failed.
    Tracee(Error),
}

impl fmt::Display for InjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InjectError::Attach(e) => e.fmt(f),
            InjectError::NoLoader { pid, exe, why } => write!(
                f,
                "process {pid} ({}) cannot load a library: {why} (a statically linked program has no dynamic loader)",
                exe.display()
            ),
            InjectError::Symbols(e) => write!(f, "reading the target's symbols: {e}"),
            InjectError::LibraryNotFound { path, error } => write!(f, "library {}: {error}", path.display()),
            InjectError::NotVisible { pid, path, why } => {
                write!(f, "process {pid} cannot open {}: {why}", path.display())
            }
            InjectError::Seccomp { pid, why } => {
                write!(f, "process {pid} is sandboxed by seccomp: {why}; nothing was changed in it")
            }
            InjectError::NoUsableThread { pid, why } => {
                write!(f, "no thread of process {pid} can load a library: {why}")
            }
            InjectError::Call { function, tid, location, error } => {
                write!(f, "calling {function} in the target (thread {tid}): {error}")?;
                if let Some(location) = location {
                    write!(f, " [at {location}]")?;
                }
                Ok(())
            }
            InjectError::DlopenFailed { path, message } => write!(f, "dlopen of {} failed: {message}", path.display()),
            InjectError::NoEntry { symbol, message } => write!(f, "entry symbol {symbol} not found: {message}"),
            InjectError::Tracee(e) => e.fmt(f),
        }
    }
}

/// The error this one wraps, where it wraps one (its message is part of this one's
/// `Display` too, which is complete on its own).
impl std::error::Error for InjectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            InjectError::Attach(e) => Some(e),
            InjectError::Symbols(e) => Some(e),
            InjectError::LibraryNotFound { error, .. } => Some(error),
            InjectError::Call { error, .. } => Some(error),
            InjectError::Tracee(e) => Some(e),
            _ => None,
        }
    }
}

impl From<AttachError> for InjectError {
    fn from(e: AttachError) -> InjectError {
        InjectError::Attach(e)
    }
}

impl From<Error> for InjectError {
    fn from(e: Error) -> InjectError {
        InjectError::Tracee(e)
    }
}

/// Loads shared library `path` into process `pid` with its `dlopen(path, RTLD_NOW)`, then
/// calls `entry_symbol(entry_arg)` (a C function `int entry(const char *)`) in it and
/// detaches; see [`inject_library_timeout`], with [`DEFAULT_CALL_TIMEOUT`] per call.
pub fn inject_library(pid: i32, path: &Path, entry_symbol: &str, entry_arg: &str) -> Result<Injected, InjectError> {
    inject_library_timeout(pid, path, entry_symbol, entry_arg, DEFAULT_CALL_TIMEOUT)
}

/// [`inject_library`] where each call in the target (`dlopen`, `dlsym`, the entry) may take
/// up to `timeout`.
///
/// One thread is seized (chosen as the module documentation explains), stopped, made to
/// call the functions, restored and detached; the other threads run on undisturbed. Loading
/// the same library again returns the same handle (its constructors do not run again) and
/// calls the entry again.
///
/// [`InjectError::NoLoader`] means the process cannot load libraries at all (statically
/// linked): the caller falls back to driving probes from outside.
pub fn inject_library_timeout(
    pid: i32,
    path: &Path,
    entry_symbol: &str,
    entry_arg: &str,
    timeout: Duration,
) -> Result<Injected, InjectError> {
    if !proc::exists(pid) {
        return Err(AttachError::NoSuchProcess { pid }.into());
    }
    let path = std::fs::canonicalize(path)
        .map_err(|error| InjectError::LibraryNotFound { path: path.to_path_buf(), error })?;
    // The kernel checks the same right (ptrace_may_access, proc(5)) for reading the memory
    // map as for attaching: a refusal here is one to explain the way an attach's is (another
    // user's process, a non-dumpable one, Yama), not as a file that could not be read.
    if let Err(e) = std::fs::File::open(format!("/proc/{pid}/maps")) {
        if e.kind() == io::ErrorKind::PermissionDenied {
            return Err(crate::diagnose::not_permitted(pid, pid).into());
        }
    }
    let table = SymbolTable::for_pid(pid).map_err(|e| match e {
        SymbolError::NoSuchProcess { pid } => InjectError::Attach(AttachError::NoSuchProcess { pid }),
        e => InjectError::Symbols(e),
    })?;
    let loader = Loader::find(pid, &table)?;
    check_visible(pid, &path)?;
    let path_str = path.to_str().ok_or_else(|| InjectError::LibraryNotFound {
        path: path.clone(),
        error: io::Error::new(io::ErrorKind::InvalidInput, "the path is not UTF-8"),
    })?;

    let (mut tracee, tid) = seize_safe_thread(pid, &table)?;
    // Before the first call: a sandbox's filter kills on the spot (the tracee, dropped on
    // a refusal, lets the thread go as it was).
    crate::seccomp::check(pid, tid)?;
    let session = Session { table: &table, tid, timeout };
    let handle = session.call(&mut tracee, loader.dlopen_name, loader.dlopen, &[Arg::Str(path_str), Arg::Value(2)])?;
    if handle == 0 {
        let message = session.dlerror(&mut tracee, &loader)?;
        return Err(InjectError::DlopenFailed { path, message });
    }
    let entry = session.call(&mut tracee, "dlsym", loader.dlsym, &[Arg::Value(handle), Arg::Str(entry_symbol)])?;
    if entry == 0 {
        let message = session.dlerror(&mut tracee, &loader)?;
        return Err(InjectError::NoEntry { symbol: entry_symbol.to_string(), message });
    }
    let ret = session.call(&mut tracee, entry_symbol, entry, &[Arg::Str(entry_arg)])?;
    // Nothing of ours stays in the program: the return stub's bytes go (an error path
    // leaves that to the detach of the dropped tracee).
    tracee.release_return_stub()?;
    tracee.detach()?;
    Ok(Injected { handle, entry_return: ret as u32 as i32, tid, loader: loader.dlopen_name })
}

/// The loader's functions in the target.
struct Loader {
    dlopen: u64,
    dlopen_name: &'static str,
    dlsym: u64,
    dlerror: Option<u64>,
}

impl Loader {
    fn find(pid: i32, table: &SymbolTable) -> Result<Loader, InjectError> {
        let exe = table.modules().iter().find(|m| m.is_main).map(|m| m.path.clone()).unwrap_or_default();
        let has_library = table.modules().iter().any(|m| !m.is_main && m.name != "[vdso]");
        if !has_library {
            let why = "no shared library is mapped".to_string();
            return Err(InjectError::NoLoader { pid, exe, why });
        }
        // Only libraries count: a static program's own dlopen (static glibc has one) loads
        // into a second, separate libc and is not usable from outside.
        let find = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| table.lookup(n).ok().filter(|s| !table.modules()[s.module].is_main).map(|s| s.addr))
        };
        let dlerror = find(&["libc:dlerror", "libdl:dlerror", "dlerror"]);
        if let Some(dlopen) = find(&["libc:dlopen", "libdl:dlopen", "dlopen"]) {
            let dlsym = find(&["libc:dlsym", "libdl:dlsym", "dlsym"]);
            if let Some(dlsym) = dlsym {
                return Ok(Loader { dlopen, dlopen_name: "dlopen", dlsym, dlerror });
            }
        }
        if let (Some(dlopen), Some(dlsym)) = (find(&["libc:__libc_dlopen_mode"]), find(&["libc:__libc_dlsym"])) {
            return Ok(Loader { dlopen, dlopen_name: "__libc_dlopen_mode", dlsym, dlerror });
        }
        let why = "no loaded library exports dlopen and dlsym (nor glibc's __libc_dlopen_mode)".to_string();
        Err(InjectError::NoLoader { pid, exe, why })
    }
}

/// The calls on the chosen thread, with errors that say which call and where.
struct Session<'a> {
    table: &'a SymbolTable,
    tid: i32,
    timeout: Duration,
}

impl Session<'_> {
    fn call(&self, tracee: &mut Tracee, function: &str, addr: u64, args: &[Arg]) -> Result<u64, InjectError> {
        tracee.call_with(self.tid, addr, args, self.timeout).map_err(|error| {
            let rip = match error {
                CallError::Timeout { rip, .. } | CallError::Faulted { rip, .. } => Some(rip),
                _ => None,
            };
            // The table predates the library just loaded: look again for its names.
            let location = rip.map(|rip| match SymbolTable::for_pid(tracee.pid()) {
                Ok(fresh) => fresh.format_addr(rip),
                Err(_) => self.table.format_addr(rip),
            });
            InjectError::Call { function: function.to_string(), tid: self.tid, location, error }
        })
    }

    /// `dlerror()`'s message, or why there is none.
    fn dlerror(&self, tracee: &mut Tracee, loader: &Loader) -> Result<String, InjectError> {
        let Some(dlerror) = loader.dlerror else {
            return Ok("no reason given (this C library has no dlerror)".to_string());
        };
        let text = self.call(tracee, "dlerror", dlerror, &[])?;
        if text == 0 {
            return Ok("no reason given (dlerror returned NULL)".to_string());
        }
        let bytes = tracee.read_c_string(text, DLERROR_MAX)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Refuses a library path that names another file (or none) in the target's mount
/// namespace; when the target's root cannot be looked at, attaching will say why.
fn check_visible(pid: i32, path: &Path) -> Result<(), InjectError> {
    let ours = std::fs::metadata(path).map_err(|error| InjectError::LibraryNotFound { path: path.into(), error })?;
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    if std::fs::metadata(&root).is_err() {
        return Ok(());
    }
    let namespaces = || {
        let ns = |p: &str| std::fs::read_link(p).map(|l| l.display().to_string()).unwrap_or_else(|_| "?".into());
        format!("its mount namespace is {}, ours {}", ns(&format!("/proc/{pid}/ns/mnt")), ns("/proc/self/ns/mnt"))
    };
    let theirs = root.join(path.strip_prefix("/").unwrap_or(path));
    match std::fs::metadata(&theirs) {
        Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => Ok(()),
        Ok(_) => Err(InjectError::NotVisible {
            pid,
            path: path.into(),
            why: format!(
                "that path is a different file for it ({}); copy the library into its file system",
                namespaces()
            ),
        }),
        Err(e) => Err(InjectError::NotVisible {
            pid,
            path: path.into(),
            why: format!(
                "that path does not exist for it ({e}; {}); copy the library into its file system",
                namespaces()
            ),
        }),
    }
}

/// Seizes and stops the thread best suited to call `dlopen` (module documentation).
pub(crate) fn seize_safe_thread(pid: i32, table: &SymbolTable) -> Result<(Tracee, i32), InjectError> {
    let tids = proc::threads(pid).map_err(|_| AttachError::NoSuchProcess { pid })?;
    let rank = |tid: i32| match proc::thread_activity(pid, tid) {
        Ok(ThreadActivity::InSyscall { nr, .. }) if nr != libc::SYS_futex => 0,
        Ok(ThreadActivity::InSyscall { .. }) => 1,
        _ => 2,
    };
    let mut candidates: Vec<(i32, i32)> = tids.into_iter().map(|tid| (rank(tid), tid)).collect();
    candidates.sort();
    let mut refused = Vec::new();
    for (_, tid) in candidates {
        let mut tracee = match Tracee::seize_thread(pid, tid, Options::NONE) {
            Ok(t) => t,
            // The thread ended meanwhile: the next one.
            Err(AttachError::NotAThreadOf { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        match stop_in_safe_place(&mut tracee, tid, table) {
            Ok(None) => return Ok((tracee, tid)),
            Ok(Some(place)) => refused.push(format!("thread {tid} stays {place}")),
            Err(Error::Exited { .. }) | Err(Error::NotTraced { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if refused.is_empty() {
        return Err(AttachError::Exited { pid }.into());
    }
    Err(InjectError::NoUsableThread { pid, why: refused.join("; ") })
}

/// Stops `tid` outside the loader and the allocator; `Some(where)` if it kept being
/// caught inside them.
fn stop_in_safe_place(tracee: &mut Tracee, tid: i32, table: &SymbolTable) -> Result<Option<String>, Error> {
    let mut place = String::new();
    for _ in 0..SAFE_PLACE_TRIES {
        tracee.stop(tid, Duration::from_secs(1))?;
        let rip = tracee.regs(tid)?.rip;
        match unsafe_place(table, rip) {
            None => return Ok(None),
            Some(p) => place = p,
        }
        tracee.cont(tid, 0)?;
        let until = Instant::now() + Duration::from_millis(2);
        while Instant::now() < until {
            std::thread::yield_now();
        }
    }
    Ok(Some(place))
}

/// Why stopping at `rip` would be unsafe for `dlopen`, if it would.
fn unsafe_place(table: &SymbolTable, rip: u64) -> Option<String> {
    let module = table.module_of(rip)?;
    let name = &module.name;
    if name.starts_with("ld-linux") || name.starts_with("ld-musl") || name.starts_with("ld.so") {
        return Some(format!("inside the dynamic loader ({})", table.format_addr(rip)));
    }
    let (sym, _) = table.resolve(rip)?;
    let allocator = ["malloc", "free", "alloc", "_int_", "arena", "tcache", "morecore"];
    if name.starts_with("libc") && allocator.iter().any(|a| sym.name.contains(a)) {
        return Some(format!("inside the allocator ({})", table.format_addr(rip)));
    }
    None
}
