//! Attach mode: `dynprobe probe -p PID` (or `record -p PID`, which asks for a recording of
//! the process's calls instead of probes) loads this library into a running process (a
//! `dlopen` the CLI makes the process call, through ptrace) and then calls
//! [`dynprobe_attach`] with the path of its control socket. Everything after that happens
//! here, in-process, on a thread of the agent's: the CLI has already let go of ptrace.
//!
//! The control socket (`SOCK_SEQPACKET`: one message per `send`, never split or merged):
//!
//! ```text
//! CLI → agent   attach\n[optimize 0\n]<spec>\n<spec>...   with the event pipe's two ends (SCM_RIGHTS)
//!               attach\nrecord <ring dir>\n<setting>...     instead: record the process's function calls
//!                                                         (`dynprobe record -p`); settings `F <glob>`,
//!                                                         `N <glob>`, `depth <n>`, `ring-records <n>`,
//!                                                         `marker <provider:name>` (the `record` module)
//!               detach
//! agent → CLI   !pending <spec>: <why>                    (before !ready) its module is not loaded yet
//!               !ready <placed>                           every other probe is placed (recording: the
//!                                                         sites patched; the calls go into the rings)
//!               !error <spec>: <why>                      refused: nothing is left placed, the session ends
//!               !placed <spec>                            a pending probe's module was loaded: placed now
//!               !lost <n>                                 events dropped so far (a full pipe)
//!               !warning <text>                           something the user should know
//!               !detached <lost>[ could not restore: …]   every probe removed, every byte restored
//!                                                         (or which probes could not be, and why)
//!               !unload <n>                               after !detached (or a refusal): nothing of
//!                                                         the agent's is left in use; once its threads
//!                                                         have ended, `dlclose` it n times
//!               !keep <why>                               instead of !unload: something must stay
//! ```
//!
//! Status goes only over this socket, events only through the pipe: the CLI takes no line
//! of the pipe as status. The program holds both (they are in its descriptor table and its
//! memory, as the agent is), so neither is proof against a hostile program; keeping them
//! apart makes a stray write into the pipe harmless, and the CLI prints whatever comes with
//! its control characters escaped.
//!
//! Hits go to the event pipe in the line format of the crate's protocol. The pipe is
//! lossy: a process someone attached to must not slow down because the reader is behind;
//! what does not fit is counted and reported (`!lost`). The agent keeps the pipe's read end
//! open too, so a hit after the CLI died meets a full pipe, never `SIGPIPE`.
//!
//! The session ends on `detach` or when the socket closes — the CLI exited or was killed,
//! even by `SIGKILL` — and either way every probe is unregistered, which restores every
//! byte, and the process carries on. A CLI gone before the probes are armed (killed while
//! the agent placed them: symbol tables and decoding take seconds on a loaded machine) gets
//! none armed, so no byte changes at all (`arm_unless_gone`). A probe that cannot be
//! removed (a thread that blocks the stop signal while the jump must come out) stays, armed
//! and whole, its events going to `/dev/null`: the pipe's descriptor number is not freed
//! for the program to reuse while any probe is left. The session thread then tries again, whenever no thread blocks the
//! stop signal, until every probe is out (`retry_removal`). Then everything else the session
//! put into the process goes (`dynprobe::release_all`: code pools, the return trampoline,
//! signal handlers), and the CLI unloads the library (`!unload`), whose destructor unmaps
//! the agent's heap (the `heap` module). What must stay is named (`!keep`: a thread still
//! to return through the return trampoline), and the library stays loaded, unused, for a
//! later session to unload. No thread of the agent's outlives the session (the session thread, the
//! optimizer, the `dlopen` watcher), and none of them is ever seen by a probe: they are
//! dynprobe's own threads (`dynprobe_probe::own_thread`), told apart by their stacks from their
//! first instruction.
//!
//! Only the user who attached may control the session: the socket lives in a directory
//! only that user can enter, the agent connects (it never listens), and it checks the
//! peer's credentials (`SO_PEERCRED`) — the same user as this process, or root. The CLI in
//! turn checks that the peer is the process it attached to.

use crate::channel::Channel;
use crate::probes::{ProbeSet, Report};
use std::ffi::{c_char, c_int, CStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Whether a session is running: one at a time.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The running session's thread, which hands itself over to be joined at its end.
static SESSION_THREAD: Mutex<Option<dynprobe_probe::own_thread::OwnThread>> = Mutex::new(None);
/// Loads of this library (`dlopen`s by an attaching CLI) that no `dlclose` undid: sessions
/// whose CLI went away, or that had to keep the library. The next CLI that can unload it
/// undoes them all.
static UNDONE_LOADS: AtomicU64 = AtomicU64::new(0);
/// Events the current session dropped.
static LOST: AtomicU64 = AtomicU64::new(0);

/// How long the session waits for the CLI's first message.
const FIRST_MESSAGE_TIMEOUT_MS: libc::c_int = 10_000;
/// How often the session reports a changed `!lost` count.
const LOST_REPORT_MS: libc::c_int = 200;
/// The largest control message (every spec of a session in one).
const MESSAGE_MAX: usize = 256 * 1024;

/// Starts an attach session: connects to the CLI's control socket at `socket` (a
/// NUL-terminated path), checks the peer, and hands the session to a new thread. Returns
/// at once, because the CLI calls it on a thread of the program's that it interrupted.
///
/// Returns 0, or a negative `errno`: `-EBUSY` when a session is already running,
/// `-EACCES` when the socket's owner is neither this process's user nor root, `-EINVAL`
/// for a bad argument, or the error of `socket`/`connect`/`pthread_create`.
#[no_mangle]
pub extern "C" fn dynprobe_attach(socket: *const c_char) -> c_int {
    // A panic must not unwind into the program's frames (the CLI's injected call).
    let started = std::panic::catch_unwind(|| start_session(socket)).unwrap_or(-libc::EFAULT);
    if started != 0 {
        // The CLI that loaded the library for this call gives up: its load stays for the
        // next session's CLI to undo.
        UNDONE_LOADS.fetch_add(1, Ordering::Relaxed);
    }
    started
}

/// [`dynprobe_attach`]'s work.
fn start_session(socket: *const c_char) -> c_int {
    {
        if socket.is_null() {
            return -libc::EINVAL;
        }
        // Before this session allocates anything: its memory goes with the library.
        crate::heap::use_own_mapping();
        // SAFETY: the CLI passes a NUL-terminated path it wrote into this process's memory.
        let path = unsafe { CStr::from_ptr(socket) };
        if ACTIVE.swap(true, Ordering::AcqRel) {
            return -libc::EBUSY;
        }
        crate::heap::set_released(false);
        // Held until the handle is stored: the session takes it back at its end.
        let mut thread = SESSION_THREAD.lock().unwrap_or_else(|e| e.into_inner());
        let started = connect(path).and_then(|socket| {
            dynprobe_probe::own_thread::spawn(c"dynprobe-attach", move || session(socket))
                .map(|handle| *thread = Some(handle))
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EAGAIN))
        });
        match started {
            Ok(()) => 0,
            Err(errno) => {
                ACTIVE.store(false, Ordering::Release);
                -errno
            }
        }
    }
}

/// Connects to the control socket and checks who listens on it.
fn connect(path: &CStr) -> Result<OwnedFd, c_int> {
    let bytes = path.to_bytes();
    // SAFETY: sockaddr_un is plain data; all zeros is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() {
        return Err(libc::EINVAL);
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as c_char;
    }
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd == -1 {
        return Err(errno());
    }
    // SAFETY: the descriptor was just created and is ours alone.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is an initialized sockaddr_un of `len` bytes.
    if unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) } == -1 {
        return Err(errno());
    }
    let peer = peer_credentials(fd)?;
    // SAFETY: getuid/geteuid cannot fail.
    let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
    if peer.uid != 0 && peer.uid != uid && peer.uid != euid {
        return Err(libc::EACCES);
    }
    Ok(socket)
}

/// The credentials of the process at the other end of the connected socket `fd`.
fn peer_credentials(fd: RawFd) -> Result<libc::ucred, c_int> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a writable ucred and `len` its size.
    let got = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len)
    };
    if got == -1 {
        return Err(errno());
    }
    Ok(cred)
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// The session thread: places the probes, serves the socket, and removes every probe
/// when the CLI says `detach` or goes away.
fn session(socket: OwnedFd) {
    dynprobe_probe::set_current_thread_traced(false);
    LOST.store(0, Ordering::Relaxed);
    let control = Control { fd: socket.as_raw_fd() };
    let detach_asked = first_message(&control).is_some_and(|setup| run(&control, setup));
    // No thread of dynprobe's is left running after the session, refused or not: the
    // optimizer ends here, the dlopen watcher ended with `run`, and this thread is joined
    // (its stack unmapped) once it has returned.
    dynprobe::stop_optimizer();
    // Everything else dynprobe put into the process goes too: code pools, the return
    // trampoline, the stop signal's handler, the caches.
    let before_release = dynprobe::interrupted_system_calls();
    let released = dynprobe::release_all();
    // Freeing what the session leaves stops threads too (to check that none is in it).
    warn_interrupted(&control, dynprobe::interrupted_system_calls() - before_release);
    // What the session allocated (symbol tables, decoded code: megabytes) came from the
    // agent's own heap (the `heap` module), which goes with the library: the C library's
    // arenas, the program's, are left as they were.
    // The CLI that loaded the library unloads it (`dlclose`, as it called `dlopen`) once
    // this thread has ended, if nothing of it is still in use; it is told how many loads
    // to undo: this session's, and those of earlier sessions whose CLI could not.
    crate::heap::set_released(released.is_ok());
    if released.is_ok() {
        // No site calls the function-graph tracer any more and no call is still to return
        // through its trampoline: what ended recordings kept can go.
        dynprobe_ftrace::Tracer::free_ended();
    }
    // Stored by `dynprobe_attach` (under this lock) before this thread could get here.
    let thread = SESSION_THREAD.lock().unwrap_or_else(|e| e.into_inner()).take();
    match (&released, detach_asked) {
        (Ok(()), true) => {
            // Nothing in the process can join this thread once the library is gone (a
            // reaper thread would run the library's code): detached, its stack is the
            // CLI's to unmap, after the thread has ended and before the `dlclose`.
            // This session's load counts as undone until the CLI has undone it: the count
            // goes with the library once unloaded, and stays right for the next CLI if this
            // one is killed before its `dlclose` calls (it stops calling `dlclose` once the
            // library is gone, should it be killed between two of them).
            let loads = UNDONE_LOADS.fetch_add(1, Ordering::Relaxed) + 1;
            let stack = thread.map(|t| t.detach_leaving_stack()).map(|(base, len)| format!(" {base:#x} {len}"));
            control.send(&format!("!unload {loads}{}", stack.unwrap_or_default()));
            ACTIVE.store(false, Ordering::Release);
            return;
        }
        (Err(why), true) => {
            UNDONE_LOADS.fetch_add(1, Ordering::Relaxed);
            control.send(&format!("!keep {why}"));
        }
        (_, false) => {
            UNDONE_LOADS.fetch_add(1, Ordering::Relaxed);
        }
    }
    drop(socket);
    ACTIVE.store(false, Ordering::Release);
    if let Some(thread) = thread {
        // On failure the thread's stack stays mapped; nothing of the session runs on.
        let _ = thread.join_when_ended();
    }
}

/// The control socket's sending side.
#[derive(Clone, Copy)]
struct Control {
    fd: RawFd,
}

impl Control {
    /// Whether the CLI is gone: its end of the socket closed (it exited, or was killed).
    /// Only looks: a message waiting (a `detach`) is left for [`serve`] to read.
    fn gone(&self) -> bool {
        let mut poll = libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one initialized pollfd; a zero timeout does not wait. A closed peer of a
        // SOCK_SEQPACKET socket makes it POLLHUP (`unix_dgram_poll` in the kernel's
        // net/unix/af_unix.c), POLLERR too if it left messages unread.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready == 1 && poll.revents & (libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Sends one message; a CLI that is gone is noticed by the session loop, not here.
    fn send(&self, message: &str) {
        // SAFETY: sends a live byte slice; MSG_NOSIGNAL: a closed peer gives EPIPE, not
        // SIGPIPE (which would kill the program).
        unsafe { libc::send(self.fd, message.as_ptr().cast(), message.len(), libc::MSG_NOSIGNAL) };
    }
}

/// What the CLI's first message asks for.
struct Setup {
    specs: Vec<String>,
    /// `record <ring dir>` and the recording's settings, instead of specs.
    record: Option<(String, Vec<String>)>,
    optimize: bool,
    /// The event pipe: hits are written to `write`; `read` is only held open.
    write: OwnedFd,
    read: OwnedFd,
}

/// Waits for and parses the `attach` message; `None` (after telling the CLI why, when it
/// is still there) if it is missing or malformed.
fn first_message(control: &Control) -> Option<Setup> {
    let mut poll = libc::pollfd { fd: control.fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one initialized pollfd.
    if unsafe { libc::poll(&mut poll, 1, FIRST_MESSAGE_TIMEOUT_MS) } != 1 {
        return None;
    }
    let (text, fds) = receive_with_fds(control.fd)?;
    let [write, read]: [OwnedFd; 2] = match fds.try_into() {
        Ok(fds) => fds,
        Err(_) => {
            control.send("!error attach: the attach message must carry the event pipe's two ends");
            return None;
        }
    };
    let mut lines = text.lines();
    if lines.next() != Some("attach") {
        control.send("!error attach: the first message must be `attach`");
        return None;
    }
    let mut optimize = true;
    let mut specs = Vec::new();
    let mut record = None;
    for line in lines.map(str::trim).filter(|l| !l.is_empty()) {
        match (line.strip_prefix("optimize "), line.strip_prefix("record "), &mut record) {
            (Some(value), _, _) => optimize = value != "0",
            (None, Some(dir), None) => record = Some((dir.to_string(), Vec::new())),
            (None, _, Some((_, settings))) => settings.push(line.to_string()),
            (None, _, None) => specs.push(line.to_string()),
        }
    }
    Some(Setup { specs, record, optimize, write, read })
}

/// Receives one message and the descriptors it carries.
fn receive_with_fds(fd: RawFd) -> Option<(String, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MESSAGE_MAX];
    // Room for a few descriptors' control message, aligned for cmsghdr.
    let mut cmsg = [0u64; 16];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; all zeros is valid before the fields are set.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    // SAFETY: `msg` points at live buffers of the sizes it states; MSG_CMSG_CLOEXEC keeps
    // the received descriptors out of programs this one execs.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n <= 0 {
        return None;
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled, within
    // msg_controllen; SCM_RIGHTS data is an array of descriptors now owned by us.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                let count = ((*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    buf.truncate(n as usize);
    Some((String::from_utf8_lossy(&buf).into_owned(), fds))
}

/// Places the probes, serves the socket until `detach` or until it closes, then removes
/// every probe. True when the CLI asked for the detach (it is still there).
fn run(control: &Control, setup: Setup) -> bool {
    // SAFETY: F_SETFL on a descriptor we own; a lossy channel needs O_NONBLOCK (the CLI
    // sets it too, on the same open file; this makes sure).
    unsafe { libc::fcntl(setup.write.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let channel = Channel::lossy(setup.write.as_raw_fd(), &LOST);
    let interrupted_before = dynprobe::interrupted_system_calls();
    // Only fails inside a handler, which this thread is not.
    let _ = dynprobe::set_optimization(setup.optimize);
    if let Some((dir, settings)) = &setup.record {
        return record(control, dir, settings, interrupted_before);
    }
    let placed = ProbeSet::place_disarmed(setup.specs.iter().map(String::as_str), channel)
        .and_then(|set| arm_unless_gone(control, set));
    let (set, armed) = match placed {
        Ok(placed) => placed,
        Err(refused) => {
            control.send(&format!("!error {refused}"));
            // The CLI reports the refusal and then waits for the end, as after a detach.
            return true;
        }
    };
    let set = Arc::new(Mutex::new(set));
    let report: Report = {
        let control = *control;
        Box::new(move |line| control.send(line))
    };
    // Not for a CLI that is gone: the probes placed at a `dlopen` would be armed.
    let watch = armed.then(|| ProbeSet::watch_pending(&set, report)).and_then(|watch| {
        watch.unwrap_or_else(|why| {
            control.send(&format!("!warning the probes waiting for a library will not be placed: {why}"));
            None
        })
    });
    if armed {
        // Jump-optimizes what was placed: the program's hits cost nanoseconds from here on.
        let _ = dynprobe::wait_for_optimizer();
        let set = set.lock().unwrap_or_else(|e| e.into_inner());
        set.pending_lines().iter().for_each(|line| control.send(line));
        control.send(&format!("!ready {}", set.placed()));
    }
    let detach_asked = serve(control);
    if let Some(watch) = watch {
        watch.stop();
    }
    let mut problems = set.lock().unwrap_or_else(|e| e.into_inner()).remove_all();
    // Those probes stay armed, their handlers writing to the event pipe's descriptor.
    let discarded = (!problems.is_empty()).then(|| discard_events(setup.write, setup.read));
    let left = problems.len();
    release_signals(&mut problems, left);
    let interrupted = dynprobe::interrupted_system_calls() - interrupted_before;
    warn_interrupted(control, interrupted);
    if detach_asked {
        let problems = match problems.is_empty() {
            true => String::new(),
            false => format!(
                " could not restore: {}; these probes stay in place, their events discarded, and the agent \
                 tries again to remove them (every {} s at most) until it can",
                problems.join("; "),
                RETRY_MAX.as_secs()
            ),
        };
        control.send(&format!("!detached {}{problems}", LOST.load(Ordering::Relaxed)));
    }
    if let Some(discarded) = discarded {
        retry_removal(&set, control);
        // Every probe is gone and no handler runs any more (unregistering waits for that):
        // the descriptor number may be freed now.
        drop(discarded);
        // That CLI has reported the incomplete detach and gone: it unloads nothing.
        return false;
    }
    // Otherwise the pipe closes only now (dropped with `setup`): no handler can run any more.
    detach_asked
}

/// Arms the probes `set` placed disarmed, unless the CLI is gone by now; whether it armed
/// them. A CLI killed while they were placed (even by `SIGKILL`) wants nothing patched any
/// more: armed, its probes would stay in the program's code, for nobody, until the
/// optimizer pass and their removal were done — seconds, on a machine loaded enough to
/// have made the placing slow. Left disarmed, they are removed at once (`serve` finds the
/// socket closed) and no byte of the program changes. `Err` is a refusal, as
/// [`ProbeSet::arm_all`] words it.
fn arm_unless_gone(control: &Control, mut set: ProbeSet) -> Result<(ProbeSet, bool), String> {
    // For tests: the window between the specs' arrival and the arming, which placing (the
    // symbol tables, the decoding of whole modules) makes seconds long on a loaded machine.
    if let Some(ms) = std::env::var("DYNPROBE_TEST_PAUSE_BEFORE_ARMING_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let armed = !control.gone();
    if armed {
        set.arm_all()?;
    }
    Ok((set, armed))
}

/// [`run`] for `dynprobe record -p`: starts recording into the ring directory `dir` as
/// `settings` say, serves the socket until `detach` or until it closes, then ends the
/// recording (every patched site restored). True when the CLI asked for the detach and
/// everything was restored (it then unloads the library if nothing of it is in use).
fn record(control: &Control, dir: &str, settings: &[String], interrupted_before: u64) -> bool {
    let attached = crate::record::Settings::from_lines(settings.iter().map(String::as_str))
        .and_then(|settings| crate::record::attach(std::path::Path::new(dir), &settings));
    let attached = match attached {
        Ok(attached) => attached,
        Err(why) => {
            control.send(&format!("!error record: {}", why.replace('\n', " ")));
            return true;
        }
    };
    match &attached.in_flight {
        Ok(found) if found.unreadable > 0 => control.send(&format!(
            "!warning {} of {} thread(s) were stopped where their stack could not be unwound (code without \
             call-frame information, a signal handler): their calls in flight at the attach are shown from \
             where the unwinding stopped",
            found.unreadable, found.threads
        )),
        Ok(_) => {}
        Err(why) => control.send(&format!("!warning the calls in flight at the attach are not shown: {why}")),
    }
    if let Ok(found) = &attached.in_flight {
        control.send(&format!("!note {}", found.describe()));
        if found.left > 0 {
            control.send(&format!(
                "!warning {} thread(s) block dynprobe's stop signal ({}): their calls in flight at the attach are \
                 not shown",
                found.left,
                dynprobe::stop_signal()
            ));
        }
    }
    control.send(&format!("!ready {}", attached.patched));
    let detach_asked = serve(control);
    let mut problems: Vec<String> = attached.end().err().into_iter().collect();
    let left = problems.len();
    release_signals(&mut problems, left);
    warn_interrupted(control, dynprobe::interrupted_system_calls() - interrupted_before);
    if detach_asked {
        let problems = match problems.is_empty() {
            true => String::new(),
            // The sites left record nothing more (the recording is over): they only cost
            // the time of a call into the tracer, which returns at once.
            false => format!(" could not restore: {}", problems.join("; ")),
        };
        control.send(&format!("!detached 0{problems}"));
    }
    detach_asked && problems.is_empty()
}

/// Tells the CLI that `count` blocking system calls of the program returned early because
/// dynprobe stopped their threads, when some did: it never goes unsaid.
fn warn_interrupted(control: &Control, count: u64) {
    if count > 0 {
        control.send(&format!(
            "!warning {count} blocking system call(s) of the program returned early (EINTR): a thread entered \
             them as dynprobe stopped it to change code"
        ));
    }
}

/// The longest pause between two tries of removing the probes a detach left.
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Tries again to remove the probes a detach could not (a thread of the program blocked
/// the stop signal, for instance while it spins): each try either removes a probe whole or
/// leaves it armed and working. A try stops the program's threads that could be in the
/// changing code and waits for the one that does not answer, holding them meanwhile, so it
/// is only made when no thread blocks the stop signal (`SigBlk` in proc(5)), and after a
/// failed one the pause before the next grows (0.1 s doubling up to [`RETRY_MAX`]).
/// Returns once every probe is removed, and the program's `SIGTRAP` action back. A CLI
/// still listening hears what each try left, and the end.
fn retry_removal(set: &Mutex<ProbeSet>, control: &Control) {
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        std::thread::sleep(pause);
        if stop_signal_blocked() {
            pause = std::time::Duration::from_millis(100).max(pause.min(RETRY_MAX));
            continue;
        }
        let mut problems = set.lock().unwrap_or_else(|e| e.into_inner()).remove_all();
        let left = problems.len();
        release_signals(&mut problems, left);
        if problems.is_empty() {
            control.send("!warning the probes a detach had left are removed now: every probed byte is restored");
            return;
        }
        control.send(&format!("!warning still armed, tried again: {}", problems.join("; ")));
        pause = (pause * 2).min(RETRY_MAX);
    }
}

/// Whether some thread of this process blocks the text layer's stop signal now.
fn stop_signal_blocked() -> bool {
    let bit = 1u64 << (dynprobe::stop_signal() - 1);
    let Ok(tids) = dynprobe_probe::thread_ids() else { return false };
    tids.into_iter().any(|tid| dynprobe_probe::blocked_signals(tid).is_some_and(|mask| mask & bit != 0))
}

/// Gives `SIGTRAP` back to the program with the guards, once no probe is `left`; probes
/// dynprobe keeps for the process's life (a return probe's unwinder hook) keep them too. A
/// failure is added to `problems`.
fn release_signals(problems: &mut Vec<String>, left: usize) {
    if left > 0 {
        return;
    }
    match dynprobe_probe::release_signals() {
        Ok(()) | Err(dynprobe_probe::ProbeError::SignalsInUse { .. }) => {}
        Err(e) => problems.push(e.to_string()),
    }
}

/// Points the event pipe's write end at `/dev/null`, for probes that could not be removed
/// and whose handlers go on writing to that descriptor number. Closing it would let the
/// program's next `open` get the number and fill its file with event lines. `dup3` swaps
/// the file under the number atomically (dup2(2)): a handler writes to the pipe or to
/// `/dev/null`, never to a closed or reused descriptor. What it returns holds the number
/// (and, without `/dev/null`, the pipe's read end): drop it only once no probe is left.
fn discard_events(write: OwnedFd, read: OwnedFd) -> (OwnedFd, Option<OwnedFd>) {
    // SAFETY: opens a path from a NUL-terminated literal.
    let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    // SAFETY: dup3 of our own descriptors, then closing the spare one.
    let swapped = null >= 0 && unsafe { libc::dup3(null, write.as_raw_fd(), libc::O_CLOEXEC) } != -1;
    if null >= 0 {
        // SAFETY: `null` is ours and nothing else refers to it.
        unsafe { libc::close(null) };
    }
    // Without /dev/null, both pipe ends stay: hits fill the pipe nobody reads and are
    // counted lost (the write end is non-blocking; the read end held open means EAGAIN,
    // never SIGPIPE).
    (write, (!swapped).then_some(read))
}

/// Serves the socket until the CLI says `detach` (true) or is gone (false), reporting
/// changes of the lost-event count meanwhile.
fn serve(control: &Control) -> bool {
    let mut reported = 0;
    loop {
        let mut poll = libc::pollfd { fd: control.fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one initialized pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, LOST_REPORT_MS) };
        if ready == -1 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
        if ready == 1 {
            let mut buf = [0u8; 64];
            // SAFETY: receives into a local buffer.
            let n = unsafe { libc::recv(control.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                // End of file or a reset: the CLI exited or was killed.
                return false;
            }
            match &buf[..n as usize] {
                b"detach" => return true,
                other => control.send(&format!("!error unknown command `{}`", String::from_utf8_lossy(other))),
            }
        }
        let lost = LOST.load(Ordering::Relaxed);
        if lost != reported {
            control.send(&format!("!lost {lost}"));
            reported = lost;
        }
    }
}
