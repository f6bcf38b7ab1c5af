//! `dynprobe probe -p PID`: probing a process that is already running. `dynprobe record -p
//! PID` goes through the same steps, its request (`Request::record`) asking the agent to
//! record the process's calls into rings instead of placing probes.
//!
//! 1. A control socket is made in a fresh directory only the target's user can enter.
//! 2. The agent library is loaded into the target by a `dlopen` the target is made to
//!    call through ptrace, and then its `dynprobe_attach(socket)` is called the same way
//!    (`dynprobe_remote::inject_library`); ptrace lets go right after.
//! 3. The agent connects; the CLI accepts only the target itself (`SO_PEERCRED`), sends
//!    the specs and an event pipe, and relays hits until Ctrl-C, `--duration`, or the
//!    target's exit. Detaching asks the agent to remove every probe and waits for it to
//!    say so. If this CLI dies instead, the agent sees the socket close and does the same.
//! 4. Once the agent says nothing of it is in use any more (`!unload`), and its threads
//!    have ended, the target is made to `dlclose` the library the same way
//!    (`dynprobe_remote::unload_library`): the process is left as it was.
//!
//! The control protocol is described in the agent's `attach` module.

use super::output::{poll_one, sanitize, Format, LineBuf, Message, Outbox, OUTBOX_MAX};
use super::ptrace::{self, Tracer};
use dynprobe::spec::ProbeSpec;
use dynprobe_uprobes::Target;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::net::{self, AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the agent has to connect after `dynprobe_attach` returned.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent has to place the probes (symbol tables, optimizer) and to remove
/// them at detach.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The event pipe's size: room for ~16,000 lines while the CLI is behind.
const PIPE_SIZE: libc::c_int = 1 << 20;

/// What `dynprobe probe -p` was asked to do.
pub(crate) struct Request<'a> {
    /// The target.
    pub pid: i32,
    /// The specs, one a line, as the agent parses them.
    pub specs: &'a [String],
    /// False keeps every probe a breakpoint probe.
    pub optimize: bool,
    /// Detach after this long.
    pub duration: Option<Duration>,
    /// The agent library.
    pub agent: &'a Path,
    /// When `dynprobe` started, for the attach time it reports.
    pub started: Instant,
    /// Use the ptrace fallback even where the agent could be loaded.
    pub ptrace: bool,
    /// `dynprobe record -p`: the attach message's lines (`record <ring dir>` and the
    /// recording's settings, see the agent's `attach` module) instead of specs.
    pub record: Option<&'a [String]>,
}

/// Attaches, relays hits to `out` (as `format` says) until it is time to detach, and
/// detaches. `Err` is a message for the user: by then nothing is left in the target, or the
/// message says precisely what is.
pub(crate) fn run(request: &Request, out: Outbox, format: Format) -> Result<(), String> {
    // Blocked before anything touches the target: a Ctrl-C while the injection has a thread
    // of the target stopped in a call of ours (its registers and stack borrowed) would kill
    // this process there, leave that thread to run on from a half-made call (a SIGSEGV) and
    // the control socket's directory behind. Blocked, the signals wait in the signalfd
    // and the relay loop takes them at its first round: it detaches as usual.
    let signals = Signals::block()?;
    let name = process_name(request.pid)?;
    check_not_stopped(request.pid, &name, request.ptrace)?;
    let (backend, events) = match request.ptrace {
        true => ptrace_backend(request)?,
        false => match agent_backend(request, &name)? {
            Some(attached) => attached,
            None if request.record.is_some() => {
                return Err(format!(
                    "{} ({name}) cannot load libraries (statically linked), so its calls cannot be recorded: \
                     `dynprobe probe -p {} --ptrace 'p:FUNCTION' 'r:FUNCTION took=$duration'` probes chosen \
                     functions of it from outside",
                    request.pid, request.pid
                ))
            }
            None => {
                eprintln!(
                    "{}",
                    ptrace::fallback_note(&format!("{} ({name})", request.pid), "it cannot load libraries")
                );
                ptrace_backend(request)?
            }
        },
    };
    let mut session = Session {
        pid: request.pid,
        name: &name,
        backend,
        events,
        out,
        format,
        lines: LineBuf::default(),
        events_closed: false,
        strays: 0,
        unprinted: 0,
        lost: 0,
        pending: 0,
        ready: false,
        unload: false,
        later: Vec::new(),
    };
    let result = session.relay(request, &signals);
    session.out.finish(signals.fd.as_fd());
    session.report_strays();
    if let (Backend::Agent(control), true) = (&session.backend, session.unload) {
        unload_agent(request.pid, &name, control, std::mem::take(&mut session.later));
    }
    if let Backend::Ptrace(tracer) = session.backend {
        let end = tracer.wait().map_err(|e| format!("cannot wait for the ptrace tracer: {e}"))?;
        if let Some(death) = end.death(&format!("{} ({name})", request.pid)) {
            return Err(death);
        }
        if let (ptrace::TracerEnd::Exited(status @ 1..), Ok(())) = (end, &result) {
            return Err(format!("the ptrace tracer of {} ({name}) failed (status {status})", request.pid));
        }
    }
    result
}

/// How long the agent's threads have to end once it said its library can be unloaded.
const THREADS_END_TIMEOUT: Duration = Duration::from_secs(10);

/// Unloads the agent library at the end of a clean session, as it was loaded: the agent
/// says `!unload <n>` once everything it put into the process is gone (code pools, the
/// return trampoline, signal handlers), and this waits for its last threads to end (the
/// session thread and the one that joins it, named `dynprobe-…`) and has the target
/// `dlclose` it `n` times — this session's load and those earlier CLIs could not undo. The
/// agent says `!keep <why>` instead when something of it must stay (a thread still to
/// return through the return trampoline): then it stays, loaded once, for the next session
/// to unload. Problems are warnings: the probes are gone either way.
fn unload_agent(pid: i32, name: &str, control: &Control, earlier: Vec<String>) {
    let deadline = Instant::now() + AGENT_TIMEOUT;
    let mut earlier = earlier.into_iter();
    let unload = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = match earlier.next() {
            Some(message) => message,
            None if left.is_zero() || !wait_readable(&control.fd, left) => {
                eprintln!(
                    "dynprobe: warning: the agent in {pid} ({name}) did not say whether it can be unloaded; it \
                     stays loaded"
                );
                return;
            }
            None => match control.receive() {
                Some(message) => message,
                None => {
                    eprintln!(
                        "dynprobe: warning: the agent in {pid} ({name}) ended without saying whether it can be \
                         unloaded; it stays loaded"
                    );
                    return;
                }
            },
        };
        if let Some(unload) = message.strip_prefix("!unload ").and_then(Unload::parse) {
            break unload;
        }
        if let Some(why) = message.strip_prefix("!keep ") {
            eprintln!("dynprobe: the agent library stays loaded in {pid} ({name}), unused: {why}");
            return;
        }
        if let Some(note) = Message::parse(&message).note() {
            eprintln!("dynprobe: {note}");
        }
    };
    // For tests: the window in which a killed CLI leaves the loads it was to undo.
    if let Some(ms) = std::env::var("DYNPROBE_TEST_PAUSE_BEFORE_UNLOAD_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let deadline = Instant::now() + THREADS_END_TIMEOUT;
    while agent_threads(pid) > 0 {
        if Instant::now() > deadline {
            eprintln!("dynprobe: warning: the agent's threads in {pid} ({name}) did not end; its library stays loaded");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let timeout = dynprobe_remote::DEFAULT_CALL_TIMEOUT;
    if let Err(e) = dynprobe_remote::unload_library(pid, control.handle, unload.loads, unload.stack, timeout) {
        eprintln!("dynprobe: warning: cannot unload the agent library from {pid} ({name}): {e}");
    }
}

/// What `!unload <loads>[ <stack> <length>]` asks: `dlclose` the library `loads` times,
/// after unmapping the stack of the agent's last thread (which nothing inside the process
/// can join once the library is gone).
struct Unload {
    loads: u64,
    stack: Option<(u64, u64)>,
}

impl Unload {
    fn parse(text: &str) -> Option<Unload> {
        let mut words = text.split_whitespace();
        let loads = words.next()?.parse().ok()?;
        let stack = match (words.next(), words.next()) {
            (Some(base), Some(len)) => {
                Some((u64::from_str_radix(base.strip_prefix("0x")?, 16).ok()?, len.parse().ok()?))
            }
            _ => None,
        };
        Some(Unload { loads, stack })
    }
}

/// How many threads of `pid` are the agent's (named `dynprobe-…`).
fn agent_threads(pid: i32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(Result::ok)
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("dynprobe-")))
        .count()
}

/// Loads the agent into the target and hands it the specs; `None` when the target cannot
/// load libraries (statically linked), which calls for the ptrace fallback.
fn agent_backend(request: &Request, name: &str) -> Result<Option<(Backend, OwnedFd)>, String> {
    let mut socket = ControlSocket::listen(request.pid)?;
    let injected = match dynprobe_remote::inject_library(
        request.pid,
        request.agent,
        "dynprobe_attach",
        &socket.path.to_string_lossy(),
    ) {
        Ok(injected) => injected,
        Err(dynprobe_remote::InjectError::NoLoader { .. }) => return Ok(None),
        Err(e) => return Err(format!("cannot attach to {} ({name}): {e}", request.pid)),
    };
    if injected.entry_return != 0 {
        return Err(attach_refused(request.pid, name, -injected.entry_return));
    }
    // The agent connected inside `dynprobe_attach` (its connection waits in the backlog):
    // the socket's name is needed no more, and a kill of this process from here on leaves
    // no directory behind.
    socket.remove_dir();
    let mut control = socket.accept(request.pid)?;
    control.handle = injected.handle;
    // Before the agent has its settings: an image the process `exec`s during `record -p`
    // maps the agent too, elsewhere (see `super::exec`).
    control.mapping = super::exec::agent_mapping(request.pid, request.agent);
    let events = EventPipe::new()?;
    control.send_setup(request, &events)?;
    Ok(Some((Backend::Agent(control), events.read)))
}

/// Starts the ptrace-driven tracer on the target.
fn ptrace_backend(request: &Request) -> Result<(Backend, OwnedFd), String> {
    let specs = request
        .specs
        .iter()
        .map(|text| ProbeSpec::parse(text).map_err(|e| format!("bad probe spec: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let (tracer, out) =
        Tracer::start(Target::Pid(request.pid), specs).map_err(|e| format!("cannot start the ptrace tracer: {e}"))?;
    // The relay reads until the pipe is empty.
    let _ = rustix::fs::fcntl_setfl(&out, rustix::fs::OFlags::NONBLOCK);
    Ok((Backend::Ptrace(tracer), out))
}

/// The message for a negative errno from `dynprobe_attach`.
fn attach_refused(pid: i32, name: &str, errno: i32) -> String {
    match errno {
        libc::EBUSY => {
            format!(
                "{pid} ({name}) already has a dynprobe session: detach that one first (Ctrl-C in its dynprobe); \
                 if its dynprobe was killed a moment ago, the session is still removing its probes: try again \
                 in a few seconds"
            )
        }
        libc::EACCES => format!("the agent in {pid} ({name}) refused the control socket: it belongs to another user"),
        errno => format!("the agent in {pid} ({name}) could not start: {}", io::Error::from_raw_os_error(errno)),
    }
}

/// Refuses a stopped target (state `T`: `SIGSTOP`, `SIGTSTP`, Ctrl-Z; proc(5)) at once: it
/// would take the injected call only once continued, and the agent would never answer. The
/// ptrace tracer can attach to it: there it is a warning, the probes firing once it runs.
fn check_not_stopped(pid: i32, name: &str, ptrace: bool) -> Result<(), String> {
    if process_state(pid) != Some('T') {
        return Ok(());
    }
    let why = format!("{pid} ({name}) is stopped (state T: SIGSTOP, SIGTSTP or Ctrl-Z)");
    if ptrace {
        eprintln!("dynprobe: warning: {why}: its probes fire once it is continued (`kill -CONT {pid}`)");
        return Ok(());
    }
    Err(format!(
        "{why}, so it cannot load the agent: continue it first (`kill -CONT {pid}`), or probe it with --ptrace"
    ))
}

/// The state letter of `/proc/PID/stat` (proc(5)): after the command name, which is in
/// parentheses and may itself hold `) `.
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// The target's command name, which also tells whether it exists.
fn process_name(pid: i32) -> Result<String, String> {
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => Ok(comm.trim_end().to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(format!("no process with pid {pid}")),
        Err(e) => Err(format!("cannot read /proc/{pid}/comm: {e}")),
    }
}

/// The listening control socket, in a directory of its own that is removed with it, or as
/// soon as the agent has connected.
struct ControlSocket {
    dir: Option<PathBuf>,
    path: PathBuf,
    listener: OwnedFd,
}

/// The control socket directory's name before `mkdtemp`'s six random characters.
const DIR_PREFIX: &str = "dynprobe-";

impl ControlSocket {
    /// A socket only `pid`'s user (and root) can reach: the directory is mode 0700 and,
    /// when dynprobe runs as root for another user's process, owned by that user. The
    /// directories that killed runs left are swept first (see [`sweep_stale`]).
    fn listen(pid: i32) -> Result<ControlSocket, String> {
        sweep_stale(&std::env::temp_dir());
        let dir = dynprobe_events::files::PrivateDir::new_in(&std::env::temp_dir(), DIR_PREFIX)
            .map_err(|e| format!("cannot make a directory for the control socket: {e}"))?
            .into_path();
        let socket = ControlSocket::bind(dir.clone(), pid);
        if socket.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        socket
    }

    fn bind(dir: PathBuf, pid: i32) -> Result<ControlSocket, String> {
        let path = dir.join("control");
        let listener = net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
            .map_err(|e| format!("cannot make the control socket: {e}"))?;
        let addr = sockaddr(&path)?;
        // Room in the backlog for the agent's connection beside those of other dynprobes
        // sweeping stale directories at their start-up: a full backlog would hold the
        // agent's connect, and our injection with it.
        if let Err(e) = net::bind(&listener, &addr).and_then(|()| net::listen(&listener, 8)) {
            return Err(format!("cannot listen on {}: {e}", path.display()));
        }
        let socket = ControlSocket { dir: Some(dir), path, listener };
        socket.hand_to_owner_of(pid)?;
        Ok(socket)
    }

    /// As root, gives the directory and socket to the target's user, so its agent can
    /// connect while nobody else can.
    fn hand_to_owner_of(&self, pid: i32) -> Result<(), String> {
        let owner = std::fs::metadata(format!("/proc/{pid}"))
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .map_err(|_| format!("no process with pid {pid}"))?;
        if !rustix::process::geteuid().is_root() || owner == 0 {
            return Ok(());
        }
        for path in self.dir.iter().chain([&self.path]) {
            std::os::unix::fs::chown(path, Some(owner), None)
                .map_err(|e| format!("cannot give {} to uid {owner}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// Waits for the agent of `pid` to connect; a connection from any other process is
    /// closed and waited past.
    fn accept(&self, pid: i32) -> Result<Control, String> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !wait_readable(&self.listener, left) {
                return Err(format!(
                    "the agent loaded into {pid} did not connect within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ));
            }
            let Ok(conn) = net::accept_with(&self.listener, SocketFlags::CLOEXEC) else { continue };
            if peer_pid(&conn) == Some(pid) {
                return Ok(Control { fd: conn, handle: 0, mapping: None });
            }
        }
    }
}

impl ControlSocket {
    /// Removes the socket's name and its directory; the listening socket stays.
    fn remove_dir(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_file(&self.path);
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.remove_dir();
    }
}

/// Removes from `tmp` the control socket directories that runs of `dynprobe probe -p`
/// killed during their attach left behind (a killed process removes nothing). Only what
/// is certainly such a directory goes: a real directory (never a symbolic link: every step
/// works through descriptors opened with `O_NOFOLLOW`) named `dynprobe-` and six `mkdtemp`
/// characters, mode 0700, owned by our effective user, holding nothing but a socket named
/// `control`, also ours, which refuses connections (`ECONNREFUSED`: nobody listens on it
/// any more; a live session's socket accepts). A directory handed to another user (root
/// attaching to that user's process) is that user's to sweep. Best effort: whatever
/// cannot be checked is left alone.
fn sweep_stale(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    let directory = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let Ok(tmp_fd) = rustix::fs::open(tmp, directory, Mode::empty()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(random) = name.as_bytes().strip_prefix(DIR_PREFIX.as_bytes()) else { continue };
        if random.len() != 6 || !random.iter().all(u8::is_ascii_alphanumeric) {
            continue;
        }
        let Ok(name) = CString::new(name.as_bytes()) else { continue };
        if stale_dir(&tmp_fd, &name) {
            // Names relative to our directory descriptors; REMOVEDIR removes only an empty
            // directory and fails on a symbolic link.
            if let Some(dir) = open_dir_at(&tmp_fd, &name) {
                let _ = rustix::fs::unlinkat(&dir, c"control", AtFlags::empty());
            }
            let _ = rustix::fs::unlinkat(&tmp_fd, name.as_c_str(), AtFlags::REMOVEDIR);
        }
    }
}

/// Opens directory `name` in `parent`, never through a symbolic link.
fn open_dir_at(parent: &OwnedFd, name: &std::ffi::CStr) -> Option<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(parent, name, flags, Mode::empty()).ok()
}

/// `fstatat` without following a symbolic link.
fn stat_at(dir: &OwnedFd, name: &std::ffi::CStr) -> Option<Stat> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).ok()
}

/// Whether `name` in `tmp` is a control socket directory of ours whose socket nobody
/// listens on any more (see [`sweep_stale`]).
fn stale_dir(tmp: &OwnedFd, name: &std::ffi::CStr) -> bool {
    let euid = rustix::process::geteuid().as_raw();
    let Some(dir) = open_dir_at(tmp, name) else { return false };
    let Ok(st) = rustix::fs::fstat(&dir) else { return false };
    if st.st_uid != euid || st.st_mode & 0o7777 != 0o700 {
        return false;
    }
    let Ok(listing) = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())) else { return false };
    let names: Vec<_> = listing.flatten().map(|e| e.file_name()).collect();
    if names.is_empty() {
        // Killed between making the directory and binding its socket, or between unlinking
        // the socket and removing the directory: microseconds apart in a live dynprobe.
        return unchanged_for(&st, EMPTY_DIR_AGE);
    }
    if names.len() != 1 || names[0] != "control" {
        return false;
    }
    let Some(socket) = stat_at(&dir, c"control") else { return false };
    if FileType::from_raw_mode(socket.st_mode) != FileType::Socket || socket.st_uid != euid {
        return false;
    }
    // Connected through the directory's descriptor: the path cannot lead elsewhere.
    let Ok(addr) = sockaddr(Path::new(&format!("/proc/self/fd/{}/control", dir.as_raw_fd()))) else {
        return false;
    };
    // Non-blocking: a live session busy injecting accepts nothing meanwhile, and a
    // blocking connect would wait for room in its backlog (EAGAIN here: alive, kept).
    let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
    let Ok(probe) = net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, flags, None) else { return false };
    net::connect(&probe, &addr) == Err(rustix::io::Errno::CONNREFUSED)
}

/// How long an empty control directory must have stood unchanged to be swept.
const EMPTY_DIR_AGE: Duration = Duration::from_secs(2);

/// Whether the file `st` describes has not changed for `age`.
fn unchanged_for(st: &Stat, age: Duration) -> bool {
    let changed = std::time::UNIX_EPOCH + Duration::new(st.st_mtime.max(0) as u64, st.st_mtime_nsec as u32);
    std::time::SystemTime::now().duration_since(changed).is_ok_and(|d| d >= age)
}

/// A Unix socket address for `path`.
fn sockaddr(path: &Path) -> Result<SocketAddrUnix, String> {
    SocketAddrUnix::new(path)
        .map_err(|_| format!("the socket path {} is too long (set TMPDIR to a shorter directory)", path.display()))
}

/// The pid of the process at the other end of a connected socket.
fn peer_pid(socket: &OwnedFd) -> Option<i32> {
    net::sockopt::socket_peercred(socket).ok().map(|cred| cred.pid.as_raw_nonzero().get())
}

/// Whether `fd` becomes readable within `timeout`.
fn wait_readable(fd: &OwnedFd, timeout: Duration) -> bool {
    poll_one(fd.as_fd(), PollFlags::IN, timeout.as_millis().min(i32::MAX as u128) as u64)
}

/// The event pipe: the agent gets both ends (it holds the read end open so that a hit
/// after this CLI died meets a full pipe, never `SIGPIPE`); the CLI keeps the read end.
struct EventPipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl EventPipe {
    fn new() -> Result<EventPipe, String> {
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| format!("cannot make the event pipe: {e}"))?;
        // A bigger pipe is best effort (the system's pipe-max-size may forbid it); the
        // write end never blocks a hit.
        let _ = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE as usize);
        let _ = rustix::fs::fcntl_setfl(&write, OFlags::NONBLOCK);
        let _ = rustix::fs::fcntl_setfl(&read, OFlags::NONBLOCK);
        Ok(EventPipe { read, write })
    }
}

/// The accepted control connection.
struct Control {
    fd: OwnedFd,
    /// The agent library's `dlopen` handle in the target, for the `dlclose` at the end.
    handle: u64,
    /// The agent library's first line in the target's `/proc/PID/maps` once loaded.
    mapping: Option<String>,
}

impl Control {
    /// Sends `attach`, the options and the specs, with the event pipe's two ends.
    fn send_setup(&self, request: &Request, events: &EventPipe) -> Result<(), String> {
        let mut text = String::from("attach\n");
        if !request.optimize {
            text.push_str("optimize 0\n");
        }
        for spec in request.record.unwrap_or_default().iter().chain(request.specs) {
            text.push_str(spec);
            text.push('\n');
        }
        let fds = [events.write.as_fd(), events.read.as_fd()];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut control = net::SendAncillaryBuffer::new(&mut space);
        control.push(net::SendAncillaryMessage::ScmRights(&fds));
        // NOSIGNAL: a gone agent gives EPIPE.
        net::sendmsg(&self.fd, &[io::IoSlice::new(text.as_bytes())], &mut control, SendFlags::NOSIGNAL)
            .map_err(|e| format!("cannot send the probes to the agent: {e}"))?;
        Ok(())
    }

    fn send(&self, text: &str) {
        // NOSIGNAL as above.
        let _ = net::send(&self.fd, text.as_bytes(), SendFlags::NOSIGNAL);
    }

    /// One message, or `None` once the agent closed the socket.
    fn receive(&self) -> Option<String> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = match net::recv(&self.fd, &mut buf[..], net::RecvFlags::DONTWAIT) {
            Ok((0, _)) => return None,
            Ok((n, _)) => n,
            Err(rustix::io::Errno::WOULDBLOCK) => return Some(String::new()),
            Err(_) => return None,
        };
        // The agent runs in the target, which can send anything on this socket too.
        Some(sanitize(&buf[..n]))
    }
}

/// The signals that end a session (Ctrl-C, `kill`, a closed terminal), read from a
/// signalfd so that the relay loop sees them as one more descriptor.
struct Signals {
    fd: OwnedFd,
}

/// Blocks (`SIG_BLOCK`) or unblocks (`SIG_UNBLOCK`) the signals that end a session, for
/// the calling thread; their set.
pub(crate) fn mask_ending_signals(how: libc::c_int) -> libc::sigset_t {
    // SAFETY: builds a signal set on the stack and changes this thread's mask with it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
        set
    }
}

impl Signals {
    fn block() -> Result<Signals, String> {
        // Blocked for this thread, the CLI's only one.
        let set = mask_ending_signals(libc::SIG_BLOCK);
        // SAFETY: makes a signalfd for an initialized set and owns the new descriptor.
        unsafe {
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd == -1 {
                return Err(format!("signalfd: {}", io::Error::last_os_error()));
            }
            Ok(Signals { fd: OwnedFd::from_raw_fd(fd) })
        }
    }

    /// Consumes the pending signals; true if there was one.
    fn take(&self) -> bool {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        let mut any = false;
        // Whole siginfo records, into a buffer of that size.
        while rustix::io::read(&self.fd, &mut info).is_ok_and(|n| n > 0) {
            any = true;
        }
        any
    }
}

/// Whether the target has exited (a zombie counts), the socket's closing being ambiguous.
pub(super) fn exited(pid: i32, pidfd: Option<&OwnedFd>) -> bool {
    match pidfd {
        Some(fd) => wait_readable(fd, Duration::from_millis(100)),
        None => std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with(['Z', 'X']))),
    }
}

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for `!ready` (or `!error`).
    Placing,
    /// Relaying hits.
    Running,
    /// `detach` sent; waiting for `!detached`.
    Detaching,
}

/// What a control message means for the session.
enum Step {
    /// Nothing changes.
    Stay,
    /// `!ready`: every probe is placed (or pending).
    Ready,
    /// `!detached`: every probe is removed; the session is over.
    Detached,
}

/// Who places the probes in the target.
enum Backend {
    /// The agent, loaded into it: status messages on the control socket.
    Agent(Control),
    /// The ptrace tracer (a child process): status lines among the hits.
    Ptrace(Tracer),
}

/// A session after the probes were handed over.
struct Session<'a> {
    pid: i32,
    name: &'a str,
    backend: Backend,
    /// Hit lines (and, from the ptrace tracer, status lines).
    events: OwnedFd,
    /// Where the hits are printed.
    out: Outbox,
    format: Format,
    /// What was read from the event pipe, split into lines.
    lines: LineBuf,
    /// The event pipe reached its end. The agent's session ends by its socket, not by its
    /// pipe: a detach that leaves probes behind points the pipe's write end at /dev/null
    /// just before it says so.
    events_closed: bool,
    /// Lines of the agent's event pipe that were not events: the program wrote them (it
    /// holds the pipe, as it holds everything of the agent's). Dropped and counted.
    strays: u64,
    /// Events read after the end with the output queue full: dropped and counted.
    unprinted: u64,
    /// Events the agent reported dropped.
    lost: u64,
    /// Probes waiting for their library.
    pending: usize,
    /// Whether `!ready` came.
    ready: bool,
    /// The agent ended the session cleanly (every probe removed, or none placed): it then
    /// says whether its library can be unloaded.
    unload: bool,
    /// Messages of the agent's read with the one that ended the session, not yet acted on.
    later: Vec<String>,
}

/// The most bytes read from the event pipe after the session ended (whatever was in it
/// then, while a writer the program keeps could go on forever).
const DRAIN_MAX: usize = 4 * PIPE_SIZE as usize;

impl Session<'_> {
    /// The relay loop. Each round waits for any of its descriptors and then does a bounded
    /// amount of work on each — one read of the event pipe, the writes the output takes
    /// without blocking — so that under a steady stream of hits, and with a reader slower
    /// than them, Ctrl-C, `--duration` and the agent's messages are still seen in the next
    /// round.
    fn relay(&mut self, request: &Request, signals: &Signals) -> Result<(), String> {
        let pidfd = rustix::process::Pid::from_raw(self.pid)
            .and_then(|pid| rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok());
        let mut phase = Phase::Placing;
        let mut deadline = Some(Instant::now() + AGENT_TIMEOUT);
        loop {
            let control_fd = match &self.backend {
                Backend::Agent(control) => Some(control.fd.as_fd()),
                Backend::Ptrace(_) => None,
            };
            // While the output queue is full the pipe is left unread: the agent counts
            // what does not fit as lost.
            let events_fd = (!self.out.full() && !self.events_closed).then(|| self.events.as_fd());
            let out_fd = self.out.waiting().then(|| self.out.fd());
            // Which of them are ready, in this order; one not asked about is not.
            let asked = [
                (control_fd, PollFlags::IN),
                (events_fd, PollFlags::IN),
                (Some(signals.fd.as_fd()), PollFlags::IN),
                (pidfd.as_ref().map(|fd| fd.as_fd()), PollFlags::IN),
                (out_fd, PollFlags::OUT),
            ];
            let mut fds: Vec<PollFd> =
                asked.iter().filter_map(|&(fd, flags)| Some(PollFd::from_borrowed_fd(fd?, flags))).collect();
            let timeout = deadline.map(|at| {
                Timespec::try_from(at.saturating_duration_since(Instant::now()))
                    .unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 0 })
            });
            if poll(&mut fds, timeout.as_ref()).is_err() {
                continue;
            }
            let mut polled = fds.iter().map(|fd| !fd.revents().is_empty());
            let ready: [bool; 5] = std::array::from_fn(|i| asked[i].0.is_some() && polled.next() == Some(true));
            drop(fds);
            let mut status = Vec::new();
            let mut ended = false;
            if ready[1] && self.read_events(&mut status) == Read::Closed {
                match self.backend {
                    Backend::Agent(_) => self.events_closed = true,
                    Backend::Ptrace(_) => ended = true,
                }
            }
            if ready[4] {
                self.out.write_some();
            }
            if let Backend::Agent(control) = &self.backend {
                if ready[0] {
                    // Bounded too: the program could flood the socket as well.
                    for _ in 0..256 {
                        match control.receive() {
                            Some(message) if message.is_empty() => break,
                            Some(message) => status.push(message),
                            None => {
                                ended = true;
                                break;
                            }
                        }
                    }
                }
            }
            let mut status = status.into_iter();
            while let Some(message) = status.next() {
                let step = self.control_message(&message, request);
                if !matches!(step, Ok(Step::Stay | Step::Ready)) {
                    // The session ends here: what the agent said after this (whether its
                    // library can be unloaded) is for `unload_agent`.
                    self.later.extend(status.by_ref());
                }
                match step? {
                    Step::Stay => {}
                    Step::Ready => {
                        self.ready = true;
                        phase = Phase::Running;
                        deadline = request.duration.map(|d| Instant::now() + d);
                    }
                    Step::Detached => {
                        self.drain_events();
                        return Ok(());
                    }
                }
            }
            if ended || ready[3] {
                // The agent's socket or the tracer's pipe closed, or the target ended.
                self.drain_events();
                if exited(self.pid, pidfd.as_ref()) {
                    eprintln!("dynprobe: process {} ({}) exited", self.pid, self.name);
                    return Ok(());
                }
                if let Backend::Agent(control) = &self.backend {
                    if super::exec::executed(self.pid, request.agent, control.mapping.as_deref()) {
                        if request.record.is_some() {
                            // The new image records on, as `record` follows an exec.
                            eprintln!("dynprobe: {}", super::exec::recorded_note(self.pid, self.name));
                            let end = match phase {
                                Phase::Placing => request.duration.map(|d| Instant::now() + d),
                                Phase::Running => deadline,
                                // The end was asked for already: what is in the rings is kept.
                                Phase::Detaching => Some(Instant::now()),
                            };
                            super::exec::wait_for_end(self.pid, pidfd.as_ref(), end, &|| signals.take());
                            return Ok(());
                        }
                        eprintln!("dynprobe: {}", super::exec::note(self.pid, self.name));
                        return Ok(());
                    }
                }
                return match (&self.backend, phase) {
                    (Backend::Ptrace(_), Phase::Detaching) => {
                        eprintln!(
                            "dynprobe: detached from {} ({}): every probed byte is restored",
                            self.pid, self.name
                        );
                        Ok(())
                    }
                    (Backend::Ptrace(_), _) => {
                        Err(format!("the ptrace tracer of {} ({}) ended unexpectedly", self.pid, self.name))
                    }
                    (Backend::Agent(_), _) => {
                        Err(format!("the agent in {} ({}) ended the session unexpectedly", self.pid, self.name))
                    }
                };
            }
            let interrupted = ready[2] && signals.take();
            let timed_out = deadline.is_some_and(|at| Instant::now() >= at);
            match phase {
                Phase::Placing | Phase::Detaching if timed_out => {
                    return Err(format!(
                        "the agent in {} ({}) did not answer within {} s",
                        self.pid,
                        self.name,
                        AGENT_TIMEOUT.as_secs()
                    ))
                }
                Phase::Detaching if interrupted => {
                    eprintln!("dynprobe: still detaching: waiting for every probed byte to be restored")
                }
                Phase::Placing | Phase::Running if interrupted || timed_out => {
                    match &mut self.backend {
                        Backend::Agent(control) => control.send("detach"),
                        Backend::Ptrace(tracer) => tracer.detach(),
                    }
                    phase = Phase::Detaching;
                    deadline = Some(Instant::now() + AGENT_TIMEOUT);
                }
                _ => {}
            }
        }
    }

    /// Acts on one message of the agent's.
    fn control_message(&mut self, text: &str, request: &Request) -> Result<Step, String> {
        let message = Message::parse(text);
        if let Some(note) = message.note() {
            eprintln!("dynprobe: {note}");
        }
        match message {
            Message::Pending(_) => self.pending += 1,
            Message::Ready(placed) => {
                let ms = request.started.elapsed().as_secs_f64() * 1e3;
                let waiting = match self.pending {
                    0 => String::new(),
                    n => format!(", {n} waiting for their library"),
                };
                let what = match request.record {
                    Some(_) => format!("{placed} site{} patched, recording", if placed == 1 { "" } else { "s" }),
                    None => format!("{placed} probe{} placed{waiting}", if placed == 1 { "" } else { "s" }),
                };
                eprintln!("dynprobe: attached to {} ({}) in {ms:.1} ms: {what}; Ctrl-C to detach", self.pid, self.name);
                return Ok(Step::Ready);
            }
            Message::Error(error) if self.ready => eprintln!("dynprobe: cannot place probe {error}"),
            Message::Error(error) if request.record.is_some() => {
                self.unload = true;
                let why = error.strip_prefix("record: ").unwrap_or(error);
                return Err(format!(
                    "cannot record {} ({}): {why}; nothing was left in it, and it goes on running",
                    self.pid, self.name
                ));
            }
            Message::Error(error) => {
                self.unload = true;
                return Err(format!(
                    "cannot place probe {error}; nothing was left in {} ({}), which goes on running",
                    self.pid, self.name
                ));
            }
            Message::Lost(lost) => self.lost = lost,
            Message::Detached { lost, problem } => {
                self.lost = lost;
                if self.lost > 0 {
                    eprintln!(
                        "dynprobe: warning: {} events were lost: {} hit the probes faster than they could be read",
                        self.lost, self.name
                    );
                }
                if super::exec::is_exec_note(problem) {
                    eprintln!("dynprobe: {}", super::exec::note(self.pid, self.name));
                    return Ok(Step::Detached);
                }
                if !problem.is_empty() {
                    return Err(format!("detach from {} ({}) was not complete: {problem}", self.pid, self.name));
                }
                eprintln!("dynprobe: detached from {} ({}): every probed byte is restored", self.pid, self.name);
                self.unload = true;
                return Ok(Step::Detached);
            }
            Message::Placed(_) | Message::Warning(_) | Message::Note(_) | Message::Ended(_) => {}
            Message::Hit(_) | Message::Unknown(_) => eprintln!("dynprobe: unexpected message from the agent: {text}"),
        }
        Ok(Step::Stay)
    }

    /// Reads the event pipe once and prints every hit line it completes. Other lines are
    /// the ptrace tracer's status lines, which go to `status`; in the agent's pipe they can
    /// only be the program's (the agent's own go over the control socket), and are dropped.
    fn read_events(&mut self, status: &mut Vec<String>) -> Read {
        let mut buf = [0u8; 64 * 1024];
        // The pipe's read end is non-blocking.
        let n = match rustix::io::read(&self.events, &mut buf) {
            Ok(0) => return Read::Closed,
            Ok(n) => n,
            Err(_) => return Read::Empty,
        };
        let (format, out, strays, unprinted) = (&self.format, &mut self.out, &mut self.strays, &mut self.unprinted);
        let agent = matches!(self.backend, Backend::Agent(_));
        self.lines.push(&buf[..n], &mut |line| match Message::parse(line) {
            Message::Hit(_) if out.full() => *unprinted += 1,
            Message::Hit(hit) => out.push(&format.line(&hit)),
            _ if agent => *strays += 1,
            _ => status.push(line.to_string()),
        });
        Read::Some(n)
    }

    /// Reads what is left in the event pipe once the session ended, up to [`DRAIN_MAX`].
    fn drain_events(&mut self) {
        let mut read = 0;
        while read < DRAIN_MAX {
            match self.read_events(&mut Vec::new()) {
                Read::Some(n) => read += n,
                Read::Empty | Read::Closed => break,
            }
        }
    }

    /// Says how many lines of the event pipe were not the agent's, and how many events
    /// were not printed.
    fn report_strays(&self) {
        if self.unprinted > 0 {
            eprintln!(
                "dynprobe: warning: {} events in the pipe at the end were not printed: the output was {} KiB behind",
                self.unprinted,
                OUTBOX_MAX / 1024
            );
        }
        let strays = self.strays + self.lines.overlong;
        if strays > 0 && matches!(self.backend, Backend::Ptrace(_)) {
            eprintln!("dynprobe: warning: {strays} over-long lines from the ptrace tracer were dropped");
        } else if strays > 0 {
            eprintln!(
                "dynprobe: warning: {strays} line{} in the event pipe of {} ({}) were not events: the program \
                 wrote into the agent's pipe; they were dropped",
                if strays == 1 { "" } else { "s" },
                self.pid,
                self.name
            );
        }
    }
}

/// What one read of the event pipe got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// This many bytes.
    Some(usize),
    /// Nothing for now.
    Empty,
    /// End of file: every writer closed its end.
    Closed,
}
