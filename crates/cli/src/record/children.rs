//! Processes forked during a `record -p` session: they are recorded as a started program's
//! children are (the agent's `pthread_atfork` handler gives each its own ring file), and
//! they inherited the patched code of the process they were forked from. When the session
//! ends, that process gets its bytes back from its agent; a child has no session thread to
//! do it (`fork` copies only the calling thread), so this does it from outside, with every
//! thread of the child stopped by ptrace: each executable mapping of a file that the child
//! shares with the attached process (same file, offset and address: inherited) is made
//! byte for byte what it is in the attached process, now restored. The patched bytes are
//! the sites, the markers, the `dlopen` watch and the signal guards — whatever the session
//! wrote, without a list to keep. A child that `exec`ed during the session runs a new image
//! with an agent of its own, recording for its life as an image `record` follows through
//! an `exec` does: it is left alone, its agent ends its recording when the session does. A
//! child such an image forks has no thread to do that (`fork` copies only the calling
//! thread): once the image has said that it restored its own code (its word in the ring
//! directory, `dynprobe_events::ending`), the child gets the image's bytes the same way; an
//! image that could not restore its own has its children left as they are, and said so.
//! The same holds for the images of a program `record` started (the processes it forked
//! that `exec`ed, which may outlive it) and their children, once the program has ended.
//! A process forked from one that has ended by the end of the session (the program `record`
//! started forked it and exited, as a daemon does) has no process to take its bytes from:
//! it gets what dynprobe patched back from the files its code is mapped from, and only that.
//! One forked before the session has no agent. The processes forked during the session are
//! found by the ring files they inherited, not by their parent: the orphan a double fork
//! leaves (a daemon's way to start a helper) is no one's descendant, and found all the same.
//!
//! Left in a child: the agent library, unused, as in a process whose calls were in flight
//! at the detach, with its stop-signal and `SIGTRAP` handlers still installed (they run
//! only for dynprobe's stop signal and for a breakpoint, and none is left).

use dynprobe_events::ending::{self, Process};
use dynprobe_events::ring::UNTRACED_CHILD;
use dynprobe_remote::{Memory, Options, Stop, Tracee};
use dynprobe_symbols::maps::{parse_line, Mapping};
use std::path::Path;
use std::time::Duration;

/// How long the threads of a child may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes compared at a time.
const CHUNK: usize = 1 << 20;

/// What was done for one child.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Restored {
    /// The child's pid.
    pub(crate) pid: i32,
    /// How many runs of bytes were put back, or why it could not be done.
    pub(crate) result: Result<usize, String>,
}

/// Restores the code of every live process forked from `pid` during the session
/// ([`forked_during_the_session`]: directly or not, whoever its parent is now) to what
/// `pid`'s code is now. A process that runs an image `exec`'d during the session is left
/// alone: it was started with the agent preloaded for the recording in `rings` and records
/// as a started program does (its code is its own, even where a non-PIE program exec'd
/// itself and maps its file where `pid` does).
pub(crate) fn restore_forked(pid: i32, agent: &str, rings: &Path) -> Vec<Restored> {
    forked_during_the_session(agent, rings)
        .into_iter()
        .filter(|forked| forked.root == Some(pid))
        .filter(|forked| !started_for(forked.pid, rings))
        .map(|forked| Restored { pid: forked.pid, result: restore(pid, forked.pid, agent, rings) })
        .collect()
}

/// A live process that runs what it was forked with during the session, and the process
/// whose code it was forked with.
struct Forked {
    pid: i32,
    /// The first process up its line of forks that was not itself forked during the
    /// session — the traced program, or an image `exec`'d during the session — whose code
    /// it inherited, if the line could be followed.
    root: Option<i32>,
}

/// Every live process mapping the agent library and a ring file of `rings` (one pass over
/// `/proc`), each with its [`Forked::root`]. Found by what it maps, and its line followed by
/// what its fork handler wrote (`parent` in its `.sites` file, `dynprobe_agent`'s `record`
/// module), rather than by its parent now: a process that forked a child and ended (a
/// daemon's double fork) leaves an orphan, adopted by init or a subreaper, that still runs
/// the patched code it was forked with — no one's descendant any more.
fn forked_during_the_session(agent: &str, rings: &Path) -> Vec<Forked> {
    let files: Vec<String> = std::fs::read_dir(rings)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    let pids = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    pids.filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| runs_what_it_was_forked_with(&maps(pid), agent, rings))
        .map(|pid| Forked { pid, root: root_of(pid, rings, &files) })
        .collect()
}

/// The first process up `pid`'s line of forks (`files`: the names in `rings`) that was not
/// forked during the session: one whose `.sites` file names no parent (`parent 0`: the
/// traced program, or an image `exec`'d during the session). `None` when a link is missing
/// or the line is too long to be one.
///
/// A pid can have several files, `<pid>.<n>.sites`, each process taking the first free `n`:
/// the newest is the one with the highest `n`. An `exec` keeps the pid, so a child forked
/// during the session that then `exec`s has the forked child's file (its parent named) and,
/// newer, the image's (none): what it forks runs the image's code. A pid reused during the
/// session has its earlier process's files, older. (A process forked by such a child before
/// its `exec` is then taken for the image's: it gets the image's restored bytes where the
/// two share a mapping — original bytes, as the image's are — and keeps what they do not
/// share as it is, unsaid.)
fn root_of(pid: i32, rings: &Path, files: &[String]) -> Option<i32> {
    // `Some(parent)`, or `None` for a process not forked during the session.
    let parent = |pid: i32| -> Option<Option<i32>> {
        let prefix = format!("{pid}.");
        let n = |f: &String| f.strip_prefix(&prefix)?.strip_suffix(".sites")?.parse::<u32>().ok();
        let newest = files.iter().filter_map(|f| Some((n(f)?, f))).max()?.1;
        let text = std::fs::read_to_string(rings.join(newest)).ok()?;
        match text.lines().find_map(|l| l.strip_prefix("parent\t")?.trim().parse::<i32>().ok())? {
            0 => Some(None),
            up => Some(Some(up)),
        }
    };
    let mut at = pid;
    for _ in 0..64 {
        match parent(at)? {
            Some(up) => at = up,
            None => return (at != pid).then_some(at),
        }
    }
    None
}

/// How long an `exec`'d image's agent may take to end its recording once the recording
/// file is gone (it looks every 100 ms, then restores its sites).
const IMAGE_END_TIMEOUT: Duration = Duration::from_secs(10);

/// An image `exec`'d during the session, and how its recording ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ImageEnd {
    /// Its pid.
    pub(crate) pid: i32,
    /// What it said, or why it said nothing.
    pub(crate) ended: Ended,
}

/// How an image's recording ended, as far as the CLI knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ended {
    /// It said that every byte it patched is restored.
    Restored,
    /// It said that it could not restore them, and why.
    Kept(String),
    /// It said nothing: why its code cannot be taken as restored.
    Unsaid(String),
}

/// Once the recording file of `rings` is removed: the images `exec`'d during the recording
/// — each still starting (it announced itself before patching anything), still ending its
/// recording (its agent's recording thread there, told by the tid it said) or having given
/// its word already (`dynprobe_events::ending`) — each with its word, waited for all
/// together until one deadline. They are the live processes recording into `rings` that
/// announced themselves there, wherever they are (the program `record` started may have
/// ended, and they are no one's descendants then): one not among them announced itself
/// once the file was gone, and patched nothing.
///
/// A file there of an earlier process that had an image's pid is not its (the start times
/// differ): that process's children, or any later process, may have the pid now.
pub(crate) fn images_ended(rings: &Path) -> Vec<ImageEnd> {
    let word = |p: Process| ending::read_word(rings, p);
    let announced = |p: Process| ending::announced(rings, p);
    // Each as it is now: one that ends while waited for is not taken for a later process
    // given its pid. Only a process recording into `rings` is an image: the traced program
    // can write an announcement for any pid (its ring directory is its own), which must not
    // make another process's code the source of a child's.
    let mut waiting: Vec<Process> = ending::announcers(rings)
        .into_iter()
        .filter_map(Process::live)
        .filter(|&p| announced(p) && recording_into(p.pid as i32, rings))
        .collect();
    let mut ended = Vec::new();
    let deadline = std::time::Instant::now() + IMAGE_END_TIMEOUT;
    loop {
        let late = std::time::Instant::now() > deadline;
        waiting.retain(|&image| {
            let pid = image.pid as i32;
            // Its thread writes the word before it ends: gone, the word is there or never
            // comes — unless the image has not started it yet (it announced itself, and
            // still runs the image that did).
            let alive = Process::live(image.pid) == Some(image);
            let ending = alive && recording_thread_lives(image, rings);
            let said = match word(image) {
                Some(Ok(())) => Some(Ended::Restored),
                Some(Err(why)) => Some(Ended::Kept(why)),
                None if ending || (alive && announced(image) && recording_into(pid, rings)) => late.then(|| {
                    Ended::Unsaid(format!("its recording did not end within {} s", IMAGE_END_TIMEOUT.as_secs()))
                }),
                None => Some(Ended::Unsaid(match alive {
                    true => "it executed another program, or its agent's thread failed".to_string(),
                    false => "it ended first".to_string(),
                })),
            };
            let Some(said) = said else { return true };
            ended.push(ImageEnd { pid, ended: said });
            false
        });
        if waiting.is_empty() {
            return ended;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process forked during the session by an image `exec`'d during it (or by a child that
/// image forked): it inherited that image's patched code and recording, but not the thread
/// with which the image's agent ends its recording when the session does (`fork` copies only
/// the calling thread).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ForkedByImage {
    /// The forked process.
    pub(crate) pid: i32,
    /// The exec'd image it was forked from, whose agent restores its own code.
    pub(crate) image: i32,
}

/// The live processes forked during the session from one of `images` (directly or not,
/// whoever their parent is now: [`forked_during_the_session`]), with that image. Looked for
/// once the images have ended their recording ([`images_ended`]): a child forked until then
/// is found.
pub(crate) fn forked_by_images(agent: &str, rings: &Path, images: &[ImageEnd]) -> Vec<ForkedByImage> {
    let is_image = |p: i32| images.iter().any(|i| i.pid == p);
    forked_during_the_session(agent, rings)
        .into_iter()
        // One that announced itself since is an image too, which found the recording over
        // and patched nothing.
        .filter(|forked| !is_image(forked.pid) && !announced(forked.pid, rings))
        .filter_map(|forked| {
            Some(ForkedByImage { pid: forked.pid, image: forked.root.filter(|&root| is_image(root))? })
        })
        .collect()
}

/// Makes the code of each process of `forked` byte for byte its image's, as
/// [`restore_forked`] does for the attached process's children — only where the image said
/// it restored its own ([`images_ended`]): otherwise the child keeps what it has, and the
/// error says why.
pub(crate) fn restore_forked_by_images(
    forked: &[ForkedByImage],
    images: &[ImageEnd],
    agent: &str,
    rings: &Path,
) -> Vec<Restored> {
    forked
        .iter()
        .map(|f| {
            let ended = images.iter().find(|i| i.pid == f.image).map(|i| &i.ended);
            let result = match ended {
                // An image that `exec`'d another program since has no bytes of the child's
                // code to give (its agent, which stays loaded in an image, is gone with it).
                Some(Ended::Restored) if !maps_agent(&maps(f.image), agent) => {
                    Err(format!("the image it was forked from ({}) executed another program since", f.image))
                }
                Some(Ended::Restored) => restore(f.image, f.pid, agent, rings),
                Some(Ended::Kept(why)) => {
                    Err(format!("the image it was forked from ({}) could not restore its own code: {why}", f.image))
                }
                Some(Ended::Unsaid(why)) => Err(format!(
                    "the image it was forked from ({}) did not say that it restored its own code: {why}",
                    f.image
                )),
                // Not reached: every child's image is one of `images`.
                None => Err(format!("the image it was forked from ({}) is unknown", f.image)),
            };
            Restored { pid: f.pid, result }
        })
        .collect()
}

/// Whether process `pid`, as it is now, announced itself as an image `exec`'d during the
/// recording into `rings`: a file of an earlier process that had its pid is not its
/// (`dynprobe_events::ending`).
fn announced(pid: i32, rings: &Path) -> bool {
    Process::live(pid as u32).is_some_and(|p| ending::announced(rings, p))
}

/// Whether the agent's thread that ends the recording of `image` and gives its word lives:
/// the thread `image` said (`dynprobe_events::ending`) is one of its tasks.
fn recording_thread_lives(image: Process, rings: &Path) -> bool {
    let Some(tid) = ending::recording_thread(rings, image) else { return false };
    Path::new(&format!("/proc/{}/task/{tid}", image.pid)).exists()
}

/// Whether process `pid`'s image was started with `DYNPROBE_RECORD=<rings>`: an `exec`
/// during the session carried it. `/proc/PID/environ` (proc(5)) shows the environment the
/// image started with, which the agent's taking its variables out later does not change.
fn started_for(pid: i32, rings: &Path) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { return false };
    let wanted = [b"DYNPROBE_RECORD=".as_slice(), rings.as_os_str().as_encoded_bytes()].concat();
    environ.split(|&b| b == 0).any(|entry| entry == wanted)
}

/// Whether process `pid` runs an image recording into `rings`: started so
/// ([`started_for`]; before its ring file is made), or mapping a ring file there
/// ([`maps_ring`]; also once the program has written over its environment, as
/// setproctitle-style code does).
fn recording_into(pid: i32, rings: &Path) -> bool {
    started_for(pid, rings) || maps_ring(&maps(pid), rings)
}

/// Whether a process with `maps`, found as a child to restore, still runs the image it was
/// forked with: the agent library and a ring file of `rings` mapped, both of which an
/// `exec` unmaps (an image `exec`'d during the session maps its own only once it runs).
fn runs_what_it_was_forked_with(maps: &[Mapping], agent: &str, rings: &Path) -> bool {
    maps_agent(maps, agent) && maps_ring(maps, rings)
}

/// Whether `m` maps code from a file (not anonymous memory, nor a kernel pseudo file such
/// as `[vdso]`): what a child shares with the process it was forked from, and what the
/// files it maps can give back.
fn is_file_code(m: &Mapping) -> bool {
    m.exec && m.path.as_deref().is_some_and(|p| p.starts_with('/'))
}

/// Whether `maps` (a process's) hold the agent library, `agent` its file name.
fn maps_agent(maps: &[Mapping], agent: &str) -> bool {
    maps.iter().any(|m| m.path.as_deref().is_some_and(|path| path.ends_with(agent)))
}

/// Whether `maps` (a process's) hold a file of the ring directory `rings`: a ring file of
/// the process's (a child an image forked maps its own, and its image's, inherited), which
/// an `exec` unmaps — or, in a child that could not be traced, the memory it put there
/// instead ([`untraced_mark`]).
fn maps_ring(maps: &[Mapping], rings: &Path) -> bool {
    maps.iter().any(|m| m.path.as_deref().is_some_and(|path| Path::new(path).starts_with(rings)))
        || untraced_mark(maps, rings).is_some()
}

/// The `errno` a child forked during the session gave for not being traced (its trace files
/// could not be made: a program that dropped its privileges before it forked cannot write
/// into the session's directory), if `maps` (the child's) hold the memory it mapped where
/// its ring was, named for `rings` (`dynprobe_events::ring::UNTRACED_CHILD`).
fn untraced_mark(maps: &[Mapping], rings: &Path) -> Option<i32> {
    maps.iter().find_map(|m| {
        let name = m.path.as_deref()?.strip_prefix("/memfd:")?.strip_prefix(UNTRACED_CHILD)?.strip_prefix(' ')?;
        let (errno, dir) = name.split_once(' ')?;
        (Path::new(dir) == rings).then(|| errno.parse().ok())?
    })
}

/// The live processes forked during the session that could not be traced (see
/// [`untraced_mark`]), each with the `errno` it gave. They run the code they were forked
/// with, and no `.sites` file names their parent: [`restore_from_files`] gives them their
/// code back.
pub(crate) fn untraced(agent: &str, rings: &Path) -> Vec<(i32, i32)> {
    let pids = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    pids.filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let maps = maps(pid);
            maps_agent(&maps, agent).then(|| Some((pid, untraced_mark(&maps, rings)?)))?
        })
        .collect()
}

/// Process `pid`'s `Uid:` and `Gid:` lines of `/proc/PID/status` (real, effective, saved
/// and file-system ids; proc(5)).
fn ids(pid: i32) -> Option<(String, String)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = |key: &str| status.lines().find(|l| l.starts_with(key)).map(str::to_owned);
    Some((line("Uid:")?, line("Gid:")?))
}

fn maps(pid: i32) -> Vec<Mapping> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    text.lines().filter_map(parse_line).collect()
}

/// Puts `parent`'s bytes into `child` wherever their shared code mappings differ, with the
/// child's threads stopped (see [`put_back`]); how many runs of bytes differed. A child that
/// has `exec`'d an image recording into `rings` by the time it is stopped is left to that
/// image's agent (none: it announced itself before patching anything,
/// `dynprobe_events::ending`); its mappings are read once it is stopped, so that they are the
/// image's that runs.
///
/// Nothing is written unless, once stopped (a stopped process cannot `exec`), the child
/// still runs what it was forked with — the agent library and a ring file of `rings`
/// mapped, both of which an `exec` unmaps — under its parent's user and group ids: a child
/// that `exec`'d another program since it was found (a setuid one, under `record -p` as
/// root) must not get the traced program's bytes.
fn restore(parent: i32, child: i32, agent: &str, rings: &Path) -> Result<usize, String> {
    let source = Memory::open(parent).map_err(|e| format!("cannot read process {parent}'s memory: {e}"))?;
    let differing = |mappings: &[Mapping], read: Read| -> Result<Runs, String> {
        let parent_code: Vec<Mapping> = maps(parent).into_iter().filter(is_file_code).collect();
        let shared = mappings.iter().filter(|m| is_file_code(m) && parent_code.contains(m));
        let (mut want, mut have) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        let mut runs = Vec::new();
        for mapping in shared {
            let mut at = mapping.start;
            while at < mapping.end {
                let len = CHUNK.min((mapping.end - at) as usize);
                let (want, have) = (&mut want[..len], &mut have[..len]);
                source.read(at, want).map_err(|e| format!("cannot read {at:#x} of process {parent}: {e}"))?;
                read(at, have)?;
                runs.extend(differences(want, have).into_iter().map(|(s, e)| (at + s as u64, want[s..e].to_vec())));
                at += len as u64;
            }
        }
        Ok(runs)
    };
    let same_ids = || match ids(parent).is_some() && ids(parent) == ids(child) {
        true => Ok(()),
        false => Err(format!("its user or group ids are not those of process {parent}: left as it is")),
    };
    put_back(child, agent, rings, differing, same_ids)
}

/// Runs of bytes to put into a child's code: each an address, and the bytes wanted there.
type Runs = Vec<(u64, Vec<u8>)>;

/// Reads the bytes at an address of a child's memory into a buffer.
type Read<'a> = &'a dyn Fn(u64, &mut [u8]) -> Result<(), String>;

/// Puts into `child` the [`Runs`] that `find` names (given the child's mappings and a reader
/// of its memory), with every thread of the child stopped; how many runs were written.
/// Nothing is written unless, once stopped, the child still runs what it was forked with
/// (see [`restore`]) and `check` holds.
///
/// `find` looks first while the child runs, and the child is seized only if that look finds
/// something to put back: a child forked from one whose code was restored already (a
/// restored child's late fork), or one that `exec`'d or is ending, is not stopped at all —
/// a process seized as it exits reports its exit to dynprobe before its parent (ptrace(2),
/// "Attaching and detaching"), and a stop is a stop the program did not ask for. Once
/// stopped, `find` looks again, and only that look's runs are written (verify, then modify).
/// A child that ends meanwhile keeps nothing (its code went with it): `Ok(0)`, not a failure.
fn put_back(
    child: i32,
    agent: &str,
    rings: &Path,
    find: impl Fn(&[Mapping], Read) -> Result<Runs, String>,
    check: impl FnOnce() -> Result<(), String>,
) -> Result<usize, String> {
    let written = || -> Result<usize, String> {
        let running_maps = maps(child);
        if announced(child, rings) || !runs_what_it_was_forked_with(&running_maps, agent, rings) {
            return Ok(0);
        }
        // Memory it may not open, it may not seize either: the seize says why.
        if let Ok(running) = Memory::open(child) {
            let read = |at: u64, buf: &mut [u8]| running.read(at, buf).map_err(|e| format!("cannot read {at:#x}: {e}"));
            if find(&running_maps, &read)?.is_empty() {
                return Ok(0);
            }
        }
        let Some(stopped) = stopped_as_forked(child, agent, rings)? else { return Ok(0) };
        check()?;
        let read = |at: u64, buf: &mut [u8]| stopped.0.read_memory(at, buf).map_err(|e| e.to_string());
        let runs = find(&maps(child), &read)?;
        for (at, bytes) in &runs {
            stopped.0.write_memory(*at, bytes).map_err(|e| e.to_string())?;
        }
        // Dropped: every thread of the child is let go and runs on.
        drop(stopped);
        Ok(runs.len())
    };
    match written() {
        Err(_) if ended(child) => Ok(0),
        result => result,
    }
}

/// `child` with every thread stopped, if it still runs what it was forked with (see
/// [`restore`]); `None` when it has `exec`'d since it was found (an image recording into
/// `rings` that announced itself, or another program): none of its code is patched then.
fn stopped_as_forked(child: i32, agent: &str, rings: &Path) -> Result<Option<Stopped>, String> {
    let mut stopped = Stopped(Tracee::seize(child, Options::NONE).map_err(|e| e.to_string())?);
    stopped.0.stop_all(STOP_TIMEOUT).map_err(|e| e.to_string())?;
    let forked = !announced(child, rings) && runs_what_it_was_forked_with(&maps(child), agent, rings);
    Ok(forked.then_some(stopped))
}

/// A child's threads, seized to be stopped ([`stopped_as_forked`]), let go when dropped —
/// on every path, an error's too. A thread that a signal stopped first (it arrived as the
/// thread was being stopped: a signal-delivery-stop, ptrace(2)) is resumed with that signal,
/// which is the program's: a detach from that stop would suppress it (`Tracee::detach_thread`),
/// and a program that waits for it (a `SIGCHLD` from a child of its that ended meanwhile, a
/// `SIGTERM`) would not get it. Then the `Tracee` detaches every thread as it is dropped.
///
/// A `SIGTRAP` the kernel sent (an `int3`, which may be one of the patches just put back)
/// is not delivered: the program's handler would be given a breakpoint that is gone.
struct Stopped(Tracee);

impl Drop for Stopped {
    fn drop(&mut self) {
        for tid in self.0.threads() {
            let signal = match self.0.stop_of(tid) {
                Ok(Some(Stop::Signal { signal: libc::SIGTRAP, code, .. })) if code > 0 => continue,
                Ok(Some(Stop::Signal { signal, .. })) => signal,
                _ => continue,
            };
            // Fails only for a thread that is gone, which needs the signal no more.
            let _ = self.0.cont(tid, signal);
        }
    }
}

/// The live processes forked during the session whose line of forks starts at a process
/// that has ended (the program `record` started, an image `exec`'d during the session), as
/// (pid, that process). No process holds their code restored any more; see
/// [`restore_from_files`].
pub(crate) fn forked_from_ended(agent: &str, rings: &Path) -> Vec<(i32, i32)> {
    forked_during_the_session(agent, rings)
        .into_iter()
        .filter(|forked| !announced(forked.pid, rings))
        .filter_map(|forked| Some((forked.pid, forked.root?)))
        .filter(|&(_, root)| ended(root))
        .collect()
}

/// Whether process `pid` has ended: gone, or a zombie its parent has not reaped yet
/// (`/proc/PID/stat`'s state, proc(5)).
fn ended(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    ending::stat_field(&stat, 3).is_none_or(|state| state == "Z" || state == "X")
}

/// Puts back, in `child` — forked from a process that has ended, so that no process holds
/// its code restored — the bytes dynprobe patched, from the files its code is mapped from
/// (`/proc/PID/map_files`, the very files, for a privileged user; else the path, if it
/// still names the mapped inode). Only what dynprobe writes is put back, where the file has
/// other bytes (see [`dynprobe_patches`]): a `jmp` or `call` with a 32-bit displacement into
/// dynprobe's code (the agent library, or any anonymous executable memory: a detour, a
/// trampoline) and the `int3` padding after it, a short `jmp` to such a jump (an entry and
/// its island), or an `int3` and what follows it of a patch being written. A text
/// relocation or the program's own patching stays; a breakpoint of anyone's (a kernel
/// uprobe's in the child's pages) and another tool's jumps into anonymous code go too.
/// How many runs were put back; nothing is written unless, once stopped, the child still
/// runs what it was forked with, and it is not stopped at all when nothing must be (see
/// [`put_back`]).
pub(crate) fn restore_from_files(child: i32, agent: &str, rings: &Path) -> Result<usize, String> {
    let patches = |maps: &[Mapping], read: Read| -> Result<Runs, String> {
        let ours: Vec<std::ops::Range<u64>> = maps
            .iter()
            .filter(|m| m.exec && m.path.as_deref().is_none_or(|path| path.ends_with(agent)))
            .map(|m| m.start..m.end)
            .collect();
        let mut runs = Vec::new();
        for m in maps.iter().filter(|m| is_file_code(m) && !m.path.as_deref().is_some_and(|p| p.ends_with(agent))) {
            let file = mapped_file(child, m)?;
            let len = (m.end - m.start) as usize;
            if len > MAX_RESTORED_MAPPING {
                return Err(format!("the code mapped at {:#x} is too large to compare ({len} bytes)", m.start));
            }
            let (mut want, mut have) = (vec![0u8; len], vec![0u8; len]);
            // Past the file's end a mapping reads as zeros, as `want` is.
            let mut got = 0;
            while got < len {
                match std::os::unix::fs::FileExt::read_at(&file, &mut want[got..], m.offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) => return Err(format!("cannot read the file mapped at {:#x}: {e}", m.start)),
                }
            }
            read(m.start, &mut have)?;
            let patched = dynprobe_patches(&want, &have, m.start, &ours);
            runs.extend(patched.into_iter().map(|(s, e)| (m.start + s as u64, want[s..e].to_vec())));
        }
        Ok(runs)
    };
    put_back(child, agent, rings, patches, || Ok(()))
}

/// The largest code mapping [`restore_from_files`] compares (it reads it whole, twice).
const MAX_RESTORED_MAPPING: usize = 1 << 30;

/// The file `m` (a code mapping of `child`) maps: through `/proc/PID/map_files` where this
/// user may open it (it takes `CAP_SYS_ADMIN`), else at its path if that still holds the
/// mapped inode and was not unlinked.
fn mapped_file(child: i32, m: &Mapping) -> Result<std::fs::File, String> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(file) = std::fs::File::open(format!("/proc/{child}/map_files/{:x}-{:x}", m.start, m.end)) {
        return Ok(file);
    }
    let path = m.path.as_deref().unwrap_or_default();
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {path}, mapped at {:#x}: {e}", m.start))?;
    let same = !m.deleted && file.metadata().is_ok_and(|meta| meta.ino() == m.inode);
    match same {
        true => Ok(file),
        false => Err(format!("{path}, mapped at {:#x}, was replaced since", m.start)),
    }
}

/// Where `have` (code at `base`) holds, over bytes `want` does not, what dynprobe writes
/// into code (see [`restore_from_files`]), as runs `[start, end)` covering each whole patch:
/// a `jmp`/`call` rel32 into `ours` and the `int3`s after it; a `jmp` rel8 to such a `jmp`
/// (an entry too short for a rel32 reaches its detour through an island in the padding
/// before it) and its `int3`s; an `int3` and the differing bytes after it within a rel32's
/// length (a breakpoint, or a patch caught half-written: `int3` first, then its tail).
fn dynprobe_patches(want: &[u8], have: &[u8], base: u64, ours: &[std::ops::Range<u64>]) -> Vec<(usize, usize)> {
    const REL32: usize = 5;
    const REL8: usize = 2;
    let branch_into_ours = |at: usize| -> bool {
        let Some(bytes) = have.get(at..at + REL32) else { return false };
        let rel = i32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let target = (base + (at + REL32) as u64).wrapping_add_signed(i64::from(rel));
        matches!(bytes[0], 0xe8 | 0xe9) && ours.iter().any(|r| r.contains(&target))
    };
    let short_jump_to_island = |at: usize| -> bool {
        let Some(&[0xeb, rel]) = have.get(at..at + REL8) else { return false };
        let island = (at + REL8).checked_add_signed(isize::from(rel as i8));
        island.is_some_and(|island| have.get(island) == Some(&0xe9) && branch_into_ours(island))
    };
    let mut runs = Vec::new();
    let mut i = 0;
    while i < have.len() {
        if have[i] == want[i] {
            i += 1;
            continue;
        }
        // The patch this difference is part of: a branch starting here or up to four bytes
        // before (its displacement's bytes may differ where its opcode does not).
        let branch = (i.saturating_sub(REL32 - 1)..=i).find(|&at| branch_into_ours(at));
        let short = || (i.saturating_sub(REL8 - 1)..=i).find(|&at| short_jump_to_island(at));
        let (start, mut end) = match (branch, short()) {
            (Some(at), _) => (at, at + REL32),
            (None, Some(at)) => (at, at + REL8),
            (None, None) if have[i] == 0xcc => {
                let tail = (i + 1..(i + REL32).min(have.len())).take_while(|&k| have[k] != want[k]).count();
                (i, i + 1 + tail)
            }
            (None, None) => {
                i += 1;
                continue;
            }
        };
        while end < have.len() && have[end] == 0xcc && want[end] != 0xcc {
            end += 1;
        }
        runs.push((start, end));
        i = end;
    }
    runs
}

/// The runs `[start, end)` where `a` and `b` differ.
fn differences(a: &[u8], b: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < a.len() {
        if a[i] == b[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < a.len() && a[i] != b[i] {
            i += 1;
        }
        runs.push((start, i));
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that could not be traced is told by the memory it mapped where its ring was,
    /// named for this session's ring directory, with the errno it gave; another session's
    /// such child, or another memfd, is not.
    #[test]
    fn an_untraced_child_is_told_by_its_marked_memory_and_its_errno_read() {
        let rings = Path::new("/dev/shm/dynprobe-rings-1");
        let maps = |name: &str| {
            vec![parse_line(&format!("7f4bfbf7e000-7f5bfc000000 rw-s 00000000 00:01 3614   /memfd:{name} (deleted)"))
                .unwrap()]
        };
        assert_eq!(untraced_mark(&maps("dynprobe-untraced-child 13 /dev/shm/dynprobe-rings-1"), rings), Some(13));
        assert_eq!(untraced_mark(&maps("dynprobe-untraced-child 13 /dev/shm/dynprobe-rings-2"), rings), None);
        assert_eq!(untraced_mark(&maps("dynprobe-untraced-child x /dev/shm/dynprobe-rings-1"), rings), None);
        assert_eq!(untraced_mark(&maps("something else /dev/shm/dynprobe-rings-1"), rings), None);
        assert!(maps_ring(&maps("dynprobe-untraced-child 1 /dev/shm/dynprobe-rings-1"), rings));
    }

    /// A child is written into only while it maps the agent and a ring file of the session:
    /// after an `exec` (a setuid program, say) it maps neither, and gets nothing.
    #[test]
    fn a_child_that_maps_no_agent_or_no_ring_file_is_not_what_it_was_forked_as() {
        let rings = Path::new("/dev/shm/dynprobe-rings-1");
        let line = |l: &str| parse_line(l).unwrap();
        let agent = line("7f0000000000-7f0000100000 r-xp 00000000 08:01 7   /opt/dynprobe/libdynprobe_agent.so");
        let ring = line("7f0000200000-7f0000300000 rw-s 00000000 00:1a 9   /dev/shm/dynprobe-rings-1/1234.ring");
        let other_ring = line("7f0000200000-7f0000300000 rw-s 00000000 00:1a 9   /dev/shm/dynprobe-rings-2/1234.ring");
        let code = line("00401000-00402000 r-xp 00001000 08:01 123   /usr/bin/passwd");
        let name = "libdynprobe_agent.so";
        assert!(runs_what_it_was_forked_with(&[code.clone(), agent.clone(), ring.clone()], name, rings));
        assert!(!runs_what_it_was_forked_with(&[code.clone(), ring], name, rings), "no agent");
        assert!(!runs_what_it_was_forked_with(&[code.clone(), agent.clone()], name, rings), "no ring file");
        assert!(!runs_what_it_was_forked_with(&[code.clone(), agent, other_ring], name, rings), "another session's");
        assert!(!runs_what_it_was_forked_with(&[code], name, rings), "a program exec'd since");
    }

    /// A line of forks is followed by the parents the `.sites` files name, up to a process
    /// forked before the session (`parent 0`); a pid that is also an image's (a forked child
    /// that `exec`ed) is a root; a missing link, or a process that was not forked, has none.
    #[test]
    fn a_line_of_forks_ends_at_the_first_process_not_forked_during_the_session() {
        let rings = std::env::temp_dir().join(format!("dynprobe-root-of-{}", std::process::id()));
        std::fs::create_dir_all(&rings).unwrap();
        let write = |name: &str, parent: i32| {
            std::fs::write(rings.join(name), format!("exe\t/bin/worker\nparent\t{parent}\n")).unwrap();
        };
        let files = || -> Vec<String> {
            std::fs::read_dir(&rings).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
        };
        // 10, the traced program, forked 20, which forked 30 and ended (30 an orphan now).
        write("10.0.sites", 0);
        write("20.1.sites", 10);
        write("30.2.sites", 20);
        assert_eq!(root_of(30, &rings, &files()), Some(10));
        assert_eq!(root_of(20, &rings, &files()), Some(10));
        assert_eq!(root_of(10, &rings, &files()), None, "the program itself was not forked");
        assert_eq!(root_of(40, &rings, &files()), None, "no files");
        // 20 `exec`ed: an image of its own, whose children are its.
        write("20.3.sites", 0);
        assert_eq!(root_of(30, &rings, &files()), Some(20));
        // A link whose files are gone.
        write("50.4.sites", 44);
        assert_eq!(root_of(50, &rings, &files()), None);
        // A pid an image had earlier in the session, a forked child's now: its newest file.
        write("60.5.sites", 0);
        write("60.12.sites", 10);
        assert_eq!(root_of(60, &rings, &files()), Some(10));
        std::fs::remove_dir_all(&rings).unwrap();
    }

    /// Only what dynprobe writes is put back from the file: a jmp/call rel32 into its code
    /// with the int3 padding after it (whole, even where a displacement byte equals the
    /// file's), a lone int3; a call elsewhere or any other change stays.
    #[test]
    fn the_patches_put_back_from_files_are_dynprobe_s_only() {
        let base = 0x40_0000u64;
        // The agent library and a detour pool.
        let ours = [0x7000_0000u64..0x7001_0000, 0x7100_0000..0x7100_1000];
        let rel_to =
            |from: usize, target: u64| ((target as i64 - (base + from as u64 + 5) as i64) as i32).to_le_bytes();
        let want = vec![0x90u8; 80];
        let mut have = want.clone();
        // A jump into our code at 4, with two int3s of padding; its last displacement byte
        // happens to equal the file's.
        let r = rel_to(4, 0x7000_9010);
        assert_eq!(r[1], 0x90, "the displacement byte that equals the file's");
        have[4..9].copy_from_slice(&[0xe9, r[0], r[1], r[2], r[3]]);
        have[9..11].copy_from_slice(&[0xcc, 0xcc]);
        // A lone int3 at 20; a call somewhere else at 30; a changed byte at 50.
        have[20] = 0xcc;
        let r = rel_to(30, 0x1234_0000);
        have[30..35].copy_from_slice(&[0xe8, r[0], r[1], r[2], r[3]]);
        have[50] = 0x42;
        // An entry at 60 with a short jump back to its island at 40 and an int3 after it.
        let r = rel_to(40, 0x7100_0000);
        have[40..45].copy_from_slice(&[0xe9, r[0], r[1], r[2], r[3]]);
        have[60..63].copy_from_slice(&[0xeb, (40i64 - 62) as i8 as u8, 0xcc]);
        // A patch half-written at 70: its int3, then two bytes of its tail.
        have[70..73].copy_from_slice(&[0xcc, 0x12, 0x34]);
        assert_eq!(dynprobe_patches(&want, &have, base, &ours), [(4, 11), (20, 21), (40, 45), (60, 63), (70, 73)]);
    }

    /// A child that has ended by its turn (a zombie, which its parent has not reaped) has no
    /// code left to restore: that is no failure to report, and it is not seized — a process
    /// seized as it exits reports its exit to the tracer first (ptrace(2)).
    #[test]
    fn a_child_that_has_ended_keeps_nothing_and_is_no_failure() {
        let mut child = std::process::Command::new("true").spawn().expect("run true");
        let pid = child.id() as i32;
        soon(|| ended(pid).then_some(()), "true ended");
        let rings = Path::new("/dev/shm/dynprobe-rings-none");
        let agent = "libdynprobe_agent.so";
        assert_eq!(restore_from_files(pid, agent, rings), Ok(0));
        assert_eq!(restore(std::process::id() as i32, pid, agent, rings), Ok(0));
        assert!(child.wait().unwrap().success(), "its parent still gets its exit status");
    }

    /// A child whose code holds nothing to put back is not stopped: held here by another
    /// tracer (this test's thread), which a seize would fail on, it is restored with nothing
    /// written and no error. `sleep` stands for the child: its C library stands for the
    /// agent library, and that library's directory for the ring directory, so that it runs
    /// what a child is forked with ([`runs_what_it_was_forked_with`]); its other code (the
    /// program, the dynamic linker) is its files' bytes.
    #[test]
    fn a_child_with_nothing_to_put_back_is_not_stopped() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("run sleep");
        let pid = child.id() as i32;
        let libc = || maps(pid).into_iter().find_map(|m| m.path.filter(|p| p.contains("/libc.so")));
        let path = soon(libc, "sleep mapped its C library");
        let (dir, agent) = path.rsplit_once('/').unwrap();
        let rings = Path::new(dir);
        assert!(runs_what_it_was_forked_with(&maps(pid), agent, rings));
        let held = Tracee::seize(pid, Options::NONE).expect("seize sleep");
        assert_eq!(restore_from_files(pid, agent, rings), Ok(0));
        drop(held);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// A signal that stopped a child's thread as it was being stopped for its restore is the
    /// program's: it is delivered when the child is let go, not suppressed by the detach.
    /// `sleep` stands for the child, a shell's (which says how it ended, as the one to reap
    /// it): `SIGUSR1`, which ends it (its default action), arrives while it is seized, and
    /// stops it (a signal-delivery-stop). Suppressed, it would sleep its 10 s and exit 0.
    #[test]
    fn a_signal_that_stopped_a_child_is_delivered_when_it_is_let_go() {
        use std::io::BufRead as _;
        let script = "sleep 10 & echo $!; wait $!; echo status $?";
        let mut shell = std::process::Command::new("sh");
        shell.args(["-c", script]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
        let mut shell = shell.spawn().unwrap();
        let mut out = std::io::BufReader::new(shell.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let pid: i32 = line.trim().parse().unwrap();
        let mut tracee = Tracee::seize(pid, Options::NONE).expect("seize sleep");
        // SAFETY: kill sends a signal to a process this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
        let stop = tracee.wait_thread(pid, Duration::from_secs(10)).expect("its stop");
        let usr1 = Stop::Signal { signal: libc::SIGUSR1, code: 0, addr: 0 };
        assert_eq!(stop, dynprobe_remote::Event::Stopped { tid: pid, stop: usr1 });
        drop(Stopped(tracee));
        line.clear();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), format!("status {}", 128 + libc::SIGUSR1), "killed by SIGUSR1");
        assert!(shell.wait().unwrap().success());
    }

    /// What `probe` gives once it gives something, looked for until 10 s have passed.
    fn soon<T>(mut probe: impl FnMut() -> Option<T>, what: &str) -> T {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(found) = probe() {
                return found;
            }
            assert!(std::time::Instant::now() < deadline, "never happened: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn differing_runs_and_maps_lines() {
        assert_eq!(differences(b"abcdef", b"abXdYY"), [(2, 3), (4, 6)]);
        assert_eq!(differences(b"same", b"same"), []);
        let line = "00401000-00402000 r-xp 00001000 08:01 123   /usr/bin/worker";
        let m = parse_line(line).unwrap();
        assert_eq!(
            (m.start, m.end, m.exec, m.offset, m.path.as_deref()),
            (0x401000, 0x402000, true, 0x1000, Some("/usr/bin/worker"))
        );
    }
}
