//! How a recording ends for the process images it follows through an `exec`, and how each
//! says it did.
//!
//! `dynprobe record` makes [`RECORDING_FILE`] in the ring directory with the directory; an
//! image `exec`'d during the recording (the agent's `record` module) records while it is
//! there, and its `exec`s carry the recording on. To end the recording the CLI removes the
//! file: each such image then restores every byte it patched and gives its word, a file
//! `<pid>.ended` in the ring directory ([`write_word`]): `restored`, or `kept` and why. The
//! CLI waits for that word before it gives a child the image forked (which has no thread to
//! end anything: `fork` copies only the calling thread) the image's code, and never
//! claims a child's code restored when its image kept patched bytes. The directory goes
//! after that, with the words.
//!
//! Such an image says that it is one ([`announce`], a file `<pid>.image`) before it patches
//! anything: until its recording thread runs it has nothing else to show it, and the CLI
//! must not take it for a child forked by another image and give it that image's bytes.
//! The CLI finds the images by their announcements ([`announcers`]), wherever they are in
//! the process tree (the program `record` started may have ended before them), once it has
//! removed the recording file; an image patches nothing if it finds the file gone once it
//! has announced itself ([`still_recording`]). So every image that patched is found: one
//! whose `exec` was under way as the recording ended may announce itself after the CLI
//! looked, but then finds the file gone.
//!
//! Both files name the process they are of by its [`Process`]: its pid and its start time.
//! A pid is given again to a later process once the first has ended — during the recording
//! too, to a child of another image or to any program — and the files of the process that
//! had it are no word of the new one's: the CLI compares the start time in a file with the
//! live process's, and a file of another start time is stale, ignored as if it were not
//! there. (Not removed: the live process may be announcing itself at that name just then.)
//!
//! The ring directory belongs to the recorded process's user (`record -p` as root of
//! another user's process), who can put anything at these names: the words are read as
//! regular files of bounded size only ([`crate::files::read_regular`]), and what they say is
//! printed with its control characters escaped.

use std::io;
use std::path::{Path, PathBuf};

/// The file in a ring directory whose presence says the recording goes on.
pub const RECORDING_FILE: &str = "record.live";

/// The longest word read: `kept` and a reason of a line.
const WORD_LIMIT: usize = 4096;

/// One process, told apart from any other that has or had its pid: a pid is reused once its
/// process has ended, its start time with it is not (two processes would have to get the
/// same pid within one clock tick).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    /// Its pid.
    pub pid: u32,
    /// When it started, in clock ticks after the system's boot: field 22 (`starttime`) of
    /// `/proc/PID/stat`, proc(5). An `exec` keeps it (the process is the same).
    pub start: u64,
}

impl Process {
    /// The calling process.
    pub fn this() -> io::Result<Process> {
        let stat = std::fs::read_to_string("/proc/self/stat")?;
        let start = start_time(&stat).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "/proc/self/stat"))?;
        Ok(Process { pid: std::process::id(), start })
    }

    /// Process `pid` as it is now, if there is one.
    pub fn live(pid: u32) -> Option<Process> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Some(Process { pid, start: start_time(&stat)? })
    }
}

/// Field `n` (numbered from 1 as in proc(5): 1 is the pid, 2 the command name, 3 the state,
/// 4 the parent's pid) of a `/proc/PID/stat` line. The command name may hold spaces and
/// parentheses: the fields after it are counted from its last `) `.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split(' ').nth(n.checked_sub(3)?)
}

/// The start time in a `/proc/PID/stat` line ([`Process::start`]).
fn start_time(stat: &str) -> Option<u64> {
    stat_field(stat, 22)?.parse().ok()
}

/// Where the image of process `pid` gives its word in ring directory `dir`.
fn word_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.ended"))
}

/// Where process `pid` says that it runs an image `exec`'d during the recording.
fn image_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.image"))
}

/// Says in ring directory `dir` that `process` (the caller) runs an image `exec`'d during
/// the recording, which will give its word ([`write_word`]): before it patches anything,
/// and then patches only if [`still_recording`].
///
/// A word already there is an earlier image's of this process (one not traced, which said
/// `restored` at once, then `exec`'d this one): it is removed first, so that the word the
/// CLI finds is this image's — taken for it, it had the CLI stop waiting for an image still
/// recording and copy its code, patched or half-restored, into its children.
pub fn announce(dir: &Path, process: Process) -> io::Result<()> {
    let word = word_path(dir, process.pid);
    let mut result = Ok(());
    for stale in [word.with_extension("ended.tmp"), word] {
        match std::fs::remove_file(&stale) {
            Err(e) if e.kind() != io::ErrorKind::NotFound && result.is_ok() => result = Err(e),
            _ => {}
        }
    }
    write_whole(&image_path(dir, process.pid), process, "").and(result)
}

/// Says in ring directory `dir` which thread of `process` (the caller, which announced
/// itself: [`announce`]) ends its recording and then gives its word: `tid`. Until that
/// thread has given it, the CLI waits for the word while the thread lives ([`recording_thread`]).
pub fn say_recording_thread(dir: &Path, process: Process, tid: u64) -> io::Result<()> {
    write_whole(&image_path(dir, process.pid), process, &tid.to_string())
}

/// The thread of `process` that ends the recording of its image and then gives its word
/// ([`say_recording_thread`]), once said: a thread is told by its tid, not by its name,
/// which the program can give any thread of its own (and take from the agent's).
pub fn recording_thread(dir: &Path, process: Process) -> Option<u64> {
    read_file(&image_path(dir, process.pid), process).ok()??.parse().ok()
}

/// Whether the recording into ring directory `dir` goes on ([`RECORDING_FILE`] is there).
pub fn still_recording(dir: &Path) -> bool {
    dir.join(RECORDING_FILE).exists()
}

/// The pids of the processes that announced themselves in ring directory `dir`
/// ([`announce`]), whether still there or not: [`announced`] says which still are.
pub fn announcers(dir: &Path) -> Vec<u32> {
    let names = std::fs::read_dir(dir).into_iter().flatten().flatten();
    names.filter_map(|entry| entry.file_name().to_str()?.strip_suffix(".image")?.parse().ok()).collect()
}

/// Whether `process` said that it runs an image `exec`'d during the recording
/// ([`announce`]): a file of another process that had its pid is not its word. What cannot
/// be read as a file there counts (the directory's owner put it there: the CLI waits for
/// the process's word rather than overwrite its code).
pub fn announced(dir: &Path, process: Process) -> bool {
    match read_file(&image_path(dir, process.pid), process) {
        Ok(said) => said.is_some(),
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    }
}

/// Says in ring directory `dir` that the image of `process` (the caller) ended its
/// recording: every byte it patched restored (`Ok`), or not, and why (`Err`).
pub fn write_word(dir: &Path, process: Process, ended: Result<(), &str>) -> io::Result<()> {
    let word = match ended {
        Ok(()) => "restored".to_string(),
        Err(why) => format!("kept\t{}", why.replace('\n', " ")),
    };
    write_whole(&word_path(dir, process.pid), process, &word)
}

/// The word of `process`'s image in ring directory `dir`, once given: `Ok` when its code is
/// restored, `Err` with why not (its control characters escaped) — also when what is there
/// is no word (not a regular file, too long, not one of the two). A word of another process
/// that had its pid is none.
pub fn read_word(dir: &Path, process: Process) -> Option<Result<(), String>> {
    let word = match read_file(&word_path(dir, process.pid), process) {
        Ok(word) => word?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(format!("its word cannot be read: {}", escaped(&e.to_string())))),
    };
    Some(match word.split_once('\t') {
        None if word == "restored" => Ok(()),
        Some(("kept", why)) => Err(escaped(why)),
        _ => Err(format!("its word cannot be read: `{}`", escaped(&word))),
    })
}

/// Writes `path` as `process`'s start time on a line, then `text`: under another name and
/// renamed, so that a reader sees it whole or not at all (an announcement read half-written
/// would be taken for another process's).
fn write_whole(path: &Path, process: Process, text: &str) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    crate::files::write_private(Path::new(&tmp), format!("{}\n{text}\n", process.start).as_bytes())?;
    std::fs::rename(&tmp, path)
}

/// What follows the start time in file `path` ([`write_whole`]), its last line end taken
/// off; `None` when the file is of another process than `process` (another start time, or
/// none: an older dynprobe's, or something else).
fn read_file(path: &Path, process: Process) -> io::Result<Option<String>> {
    let content = crate::files::read_regular(path, WORD_LIMIT)?;
    let content = String::from_utf8_lossy(&content);
    let Some((start, text)) = content.split_once('\n') else { return Ok(None) };
    Ok((start.parse() == Ok(process.start)).then(|| text.trim_end().to_string()))
}

/// `text` with its control characters (a terminal's escape sequences among them) written
/// as Rust escapes: another user's text, printed on this user's terminal.
fn escaped(text: &str) -> String {
    text.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Process 7, 8 or 9 of a made-up start time.
    fn process(pid: u32) -> Process {
        Process { pid, start: 4242 }
    }

    #[test]
    fn a_word_reads_back_as_written() {
        let dir = crate::files::PrivateDir::new_in(&std::env::temp_dir(), "dynprobe-ending-test-").unwrap();
        let (seven, eight, nine) = (process(7), process(8), process(9));
        assert_eq!(read_word(dir.path(), seven), None);
        write_word(dir.path(), seven, Ok(())).unwrap();
        write_word(dir.path(), eight, Err("a site's bytes changed:\nmix")).unwrap();
        assert_eq!(read_word(dir.path(), seven), Some(Ok(())));
        assert_eq!(read_word(dir.path(), eight), Some(Err("a site's bytes changed: mix".to_string())));
        std::fs::write(dir.path().join("9.ended"), "4242\nkept\t\x1b[2Jgone\n").unwrap();
        assert_eq!(read_word(dir.path(), nine), Some(Err("\\u{1b}[2Jgone".to_string())), "escapes escaped");
        assert!(!announced(dir.path(), seven));
        announce(dir.path(), seven).unwrap();
        assert!(announced(dir.path(), seven));
        assert_eq!(recording_thread(dir.path(), seven), None, "not said yet");
        say_recording_thread(dir.path(), seven, 77).unwrap();
        assert_eq!((announced(dir.path(), seven), recording_thread(dir.path(), seven)), (true, Some(77)));
        // The word of the image before (given at once: it was not traced) is not the word of
        // the image that announces itself after it in the same process.
        assert_eq!(read_word(dir.path(), seven), None, "an earlier image's word is gone");
        write_word(dir.path(), seven, Err("its thread could not start")).unwrap();
        assert_eq!(read_word(dir.path(), seven), Some(Err("its thread could not start".to_string())));
        assert_eq!(announcers(dir.path()), [7]);
    }

    /// A later process with the pid of one that announced itself and gave its word (the
    /// pid reused during the recording) has neither: the files are the first one's.
    #[test]
    fn the_files_of_a_process_are_not_those_of_a_later_one_with_its_pid() {
        let dir = crate::files::PrivateDir::new_in(&std::env::temp_dir(), "dynprobe-ending-test-").unwrap();
        let (first, later) = (process(7), Process { pid: 7, start: 4343 });
        announce(dir.path(), first).unwrap();
        write_word(dir.path(), first, Ok(())).unwrap();
        assert!(announced(dir.path(), first));
        assert!(!announced(dir.path(), later), "another process's announcement");
        assert_eq!(read_word(dir.path(), later), None, "another process's word");
        // Files without a start time (an older dynprobe's) are nobody's.
        std::fs::write(dir.path().join("8.image"), "").unwrap();
        std::fs::write(dir.path().join("8.ended"), "restored\n").unwrap();
        assert!(!announced(dir.path(), process(8)));
        assert_eq!(read_word(dir.path(), process(8)), None);
        // The process this is, as proc(5) shows it.
        let this = Process::this().unwrap();
        assert_eq!(Some(this), Process::live(this.pid));
        assert_eq!(stat_field("42 (a) b) S 7 42 42 0", 4), Some("7"), "a command name with ') '");
    }

    /// What the ring directory's owner puts at a word's name is refused at once, and the
    /// refusal says why: a link to a device read for ever, a FIFO that nobody writes.
    #[test]
    fn a_word_that_is_no_regular_file_is_refused_at_once() {
        let dir = crate::files::PrivateDir::new_in(&std::env::temp_dir(), "dynprobe-ending-test-").unwrap();
        std::os::unix::fs::symlink("/dev/zero", word_path(dir.path(), 7)).unwrap();
        let fifo = std::ffi::CString::new(word_path(dir.path(), 8).into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::fs::write(word_path(dir.path(), 9), vec![b'x'; WORD_LIMIT + 1]).unwrap();
        let said = |pid: u32| match read_word(dir.path(), process(pid)) {
            Some(Err(why)) => why,
            other => panic!("{other:?}"),
        };
        let (link, fifo, long) = (said(7), said(8), said(9));
        assert!(link.starts_with("its word cannot be read: "), "{link}");
        assert!(link.ends_with("7.ended is a symbolic link, not a file"), "{link}");
        assert!(fifo.ends_with("8.ended is not a regular file"), "{fifo}");
        assert!(long.ends_with("9.ended is larger than 4096 bytes"), "{long}");
    }
}
