//! Running the program with the agent preloaded and relaying the agent's lines: one piece
//! for `dynprobe probe` and `dynprobe record`, which differ in the environment they give the
//! agent and in what they do with its hits.

use super::output::{Hit, LineBuf, Message, Printer};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{AddressFamily, Shutdown, SocketFlags, SocketType};
use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};

/// What the agent reported about placing the probes.
#[derive(Debug, PartialEq, Eq)]
pub enum Placement {
    /// `!ready <n>`: all probes (`n` sites) were placed.
    Ready(usize),
    /// `!error`: this line's text after `!error ` (the spec, `: `, why).
    Refused(String),
    /// The agent never reported: it was not loaded (a static or setuid program ignores
    /// `LD_PRELOAD`).
    Silent,
}

/// How a run ended.
pub struct Outcome {
    /// What the agent reported.
    pub placement: Placement,
    /// The program's exit status.
    pub status: ExitStatus,
}

/// The event channel: the read end stays here (close-on-exec), the write end goes to the
/// program and every program it runs.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

/// A Unix stream socket pair rather than a pipe: the agent sends with `MSG_NOSIGNAL`, so a
/// probed program that outlives this CLI (a daemon it started) loses its lines instead of
/// dying of `SIGPIPE` (see the agent's `Channel`).
fn pipe() -> io::Result<Pipe> {
    let (read, write) = rustix::net::socketpair(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    // Only the program writes, and only this end reads; a failure changes nothing that
    // matters.
    let _ = rustix::net::shutdown(&read, Shutdown::Write);
    let _ = rustix::net::shutdown(&write, Shutdown::Read);
    Ok(Pipe { read, write })
}

/// Starts `command` with the agent preloaded, `event_fd` (the agent's channel) open in it,
/// and `env`: what the agent is to do (`DYNPROBE_PROBES`, `DYNPROBE_RECORD`...).
fn spawn(command: &[OsString], agent: &Path, env: &[(&str, OsString)], event: &OwnedFd) -> io::Result<Child> {
    let event_fd: RawFd = event.as_raw_fd();
    let mut preload = OsString::from(agent);
    if let Some(existing) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(existing);
    }
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..])
        .env("LD_PRELOAD", preload)
        .env("DYNPROBE_EVENT_FD", event_fd.to_string())
        // Tells the first image from those its processes `exec` later.
        .env("DYNPROBE_FIRST_IMAGE", "1")
        .envs(env.iter().map(|(name, value)| (name, value)));
    // Without an answer the agents take the descriptor on trust.
    if let Ok(stat) = rustix::fs::fstat(event) {
        // Lets a program `exec`'d later check that its descriptor is still the channel.
        cmd.env("DYNPROBE_EVENT_PIPE", stat.st_ino.to_string());
    }
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: fcntl is one. It lets the write end, created
    // close-on-exec so no other child of ours inherits it, survive this one exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(event_fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Where the hits the agent reports go.
pub trait Hits {
    /// One hit.
    fn hit(&mut self, hit: &Hit);
    /// Called after each batch read from the pipe, so output follows the program live.
    fn flush(&mut self) {}
}

/// Prints hits with a [`Printer`] until a write fails (a closed `| head`): the lines are
/// still read after that, so the program never blocks on a full pipe, but not printed.
pub struct PrintHits<'p> {
    printer: &'p mut Printer,
    printing: bool,
}

impl<'p> PrintHits<'p> {
    /// Hits printed by `printer`.
    pub fn new(printer: &'p mut Printer) -> PrintHits<'p> {
        PrintHits { printer, printing: true }
    }
}

impl Hits for PrintHits<'_> {
    fn hit(&mut self, hit: &Hit) {
        if self.printing && self.printer.hit(hit).is_err() {
            self.printing = false;
        }
    }

    fn flush(&mut self) {
        let _ = self.printer.flush();
    }
}

/// Runs `command` with the agent preloaded and `env` set (see [`spawn`]), handing every
/// hit the agent reports to `hits`, until the program exits.
pub fn run(command: &[OsString], agent: &Path, env: &[(&str, OsString)], hits: &mut dyn Hits) -> io::Result<Outcome> {
    let pipe = pipe()?;
    let mut child = spawn(command, agent, env, &pipe.write)?;
    // Only the program may hold the write end, so the read end sees end-of-file when it
    // (and whatever it forked) is gone.
    drop(pipe.write);
    // Ctrl-C reaches the program too (same process group): let it decide, and stay to
    // relay its last events and exit status. Set after the spawn, since ignored signals
    // are inherited across exec.
    // SAFETY: setting a signal to SIG_IGN installs no handler code.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let placement = relay(&pipe.read, child.id(), hits);
    let status = child.wait()?;
    Ok(Outcome { placement: placement?, status })
}

/// Reads the agent's lines until end-of-file or until the program exits (a process it
/// forked may keep the pipe open), then what is left in the pipe.
pub(crate) fn relay(read: &OwnedFd, child: u32, hits: &mut dyn Hits) -> io::Result<Placement> {
    // Without pidfds (kernels before 5.3) we wait for end-of-file only.
    let pidfd = rustix::process::Pid::from_raw(child as i32)
        .and_then(|pid| rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok());
    let mut lines = Lines::default();
    let mut state = Relay { hits, placement: Placement::Silent, said: HashSet::new() };
    loop {
        let mut fds = vec![PollFd::new(read, PollFlags::IN)];
        fds.extend(pidfd.as_ref().map(|pidfd| PollFd::new(pidfd, PollFlags::IN)));
        match poll(&mut fds, None) {
            Err(Errno::INTR) => continue,
            Err(err) => return Err(err.into()),
            Ok(_) => {}
        }
        let (data, exited) = (!fds[0].revents().is_empty(), fds.get(1).is_some_and(|fd| !fd.revents().is_empty()));
        if data {
            if !lines.fill(read, &mut |l| state.line(l))? {
                break;
            }
        } else if exited {
            // The program exited: everything it wrote is in the pipe now. Read it
            // without waiting for writers it may have left behind.
            let _ = rustix::fs::fcntl_setfl(read, rustix::fs::OFlags::NONBLOCK);
            while lines.fill(read, &mut |l| state.line(l))? {}
            break;
        }
        state.hits.flush();
    }
    state.hits.flush();
    if lines.split.overlong > 0 {
        eprintln!(
            "dynprobe: warning: {} over-long lines from the agent's pipe were dropped (the program wrote into it?)",
            lines.split.overlong
        );
    }
    Ok(state.placement)
}

/// What `relay` keeps between lines.
struct Relay<'h> {
    hits: &'h mut dyn Hits,
    placement: Placement,
    /// The notes printed so far: every process the program runs (it and the programs it
    /// `exec`s, each with its own agent) may send the same one, which is printed once.
    said: HashSet<String>,
}

impl Relay<'_> {
    fn line(&mut self, line: &str) {
        match Message::parse(line) {
            Message::Ready(sites) => self.placement = Placement::Ready(sites),
            // After `!ready`, a probe that waited for its library and was refused once it
            // came: the program runs on with the others.
            Message::Error(error) if matches!(self.placement, Placement::Ready(_)) => {
                self.say(format!("cannot place probe {error}"))
            }
            Message::Error(error) => self.placement = Placement::Refused(error.to_string()),
            Message::Hit(hit) => self.hits.hit(&hit),
            message @ (Message::Pending(_) | Message::Placed(_) | Message::Warning(_) | Message::Note(_)) => {
                self.say(message.note().unwrap_or_default())
            }
            // The tracer's exit status is the program's; the line says nothing more.
            Message::Ended(_) => {}
            Message::Detached { problem, .. } => eprintln!("dynprobe: {problem}"),
            Message::Lost(_) | Message::Unknown(_) => {
                eprintln!("dynprobe: unexpected line from the agent: {line}")
            }
        }
    }
}

impl Relay<'_> {
    /// Prints `note` on stderr, unless it was printed already.
    fn say(&mut self, note: String) {
        if !self.said.contains(&note) {
            eprintln!("dynprobe: {note}");
            self.said.insert(note);
        }
    }
}

/// Splits what is read from the pipe into lines ([`LineBuf`]: made safe to print, bounded
/// in length).
#[derive(Default)]
struct Lines {
    split: LineBuf,
}

impl Lines {
    /// Reads once and hands every complete line to `each`; false at end-of-file (or when
    /// a non-blocking pipe is empty).
    fn fill(&mut self, fd: &OwnedFd, each: &mut dyn FnMut(&str)) -> io::Result<bool> {
        let mut buf = [0u8; 64 * 1024];
        let n = match rustix::io::read(fd, &mut buf) {
            Ok(n) => n,
            Err(Errno::INTR) => return Ok(true),
            Err(Errno::WOULDBLOCK) => return Ok(false),
            Err(err) => return Err(err.into()),
        };
        self.split.push(&buf[..n], each);
        Ok(n > 0)
    }
}

/// The exit code that reports `status` to our caller the way a shell would: the
/// program's own code, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => (128 + signal) as u8,
        (None, None) => 1,
    }
}
