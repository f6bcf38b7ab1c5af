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

/// Where the image of process `pid` gives its word in ring directory `dir`.
fn word_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.ended"))
}

/// Where process `pid` says that it runs an image `exec`'d during the recording.
fn image_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.image"))
}

/// Says in ring directory `dir` that process `pid` runs an image `exec`'d during the
/// recording, which will give its word ([`write_word`]): before it patches anything.
///
/// A word already there is an earlier image's of this process (one not traced, which said
/// `restored` at once, then `exec`'d this one): it is removed first, so that the word the
/// CLI finds is this image's — taken for it, it had the CLI stop waiting for an image still
/// recording and copy its code, patched or half-restored, into its children.
pub fn announce(dir: &Path, pid: u32) -> io::Result<()> {
    let word = word_path(dir, pid);
    let mut result = Ok(());
    for stale in [word.with_extension("ended.tmp"), word] {
        match std::fs::remove_file(&stale) {
            Err(e) if e.kind() != io::ErrorKind::NotFound && result.is_ok() => result = Err(e),
            _ => {}
        }
    }
    crate::files::write_private(&image_path(dir, pid), b"").and(result)
}

/// Whether process `pid` said that it runs an image `exec`'d during the recording
/// ([`announce`]); whatever is at that name counts.
pub fn announced(dir: &Path, pid: u32) -> bool {
    std::fs::symlink_metadata(image_path(dir, pid)).is_ok()
}

/// Says in ring directory `dir` that the image of process `pid` ended its recording:
/// every byte it patched restored (`Ok`), or not, and why (`Err`). Written under another
/// name and renamed, so that a reader sees it whole or not at all.
pub fn write_word(dir: &Path, pid: u32, ended: Result<(), &str>) -> io::Result<()> {
    let word = match ended {
        Ok(()) => "restored\n".to_string(),
        Err(why) => format!("kept\t{}\n", why.replace('\n', " ")),
    };
    let path = word_path(dir, pid);
    let tmp = path.with_extension("ended.tmp");
    crate::files::write_private(&tmp, word.as_bytes())?;
    std::fs::rename(&tmp, &path)
}

/// The word of process `pid`'s image in ring directory `dir`, once given: `Ok` when its
/// code is restored, `Err` with why not (its control characters escaped) — also when what is
/// there is no word (not a regular file, too long, not one of the two).
pub fn read_word(dir: &Path, pid: u32) -> Option<Result<(), String>> {
    let word = match crate::files::read_regular(&word_path(dir, pid), WORD_LIMIT) {
        Ok(word) => word,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(format!("its word cannot be read: {}", escaped(&e.to_string())))),
    };
    let word = String::from_utf8_lossy(&word);
    let word = word.trim_end();
    Some(match word.split_once('\t') {
        None if word == "restored" => Ok(()),
        Some(("kept", why)) => Err(escaped(why)),
        _ => Err(format!("its word cannot be read: `{}`", escaped(word))),
    })
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

    #[test]
    fn a_word_reads_back_as_written() {
        let dir = crate::files::PrivateDir::new_in(&std::env::temp_dir(), "dynprobe-ending-test-").unwrap();
        assert_eq!(read_word(dir.path(), 7), None);
        write_word(dir.path(), 7, Ok(())).unwrap();
        write_word(dir.path(), 8, Err("a site's bytes changed:\nmix")).unwrap();
        assert_eq!(read_word(dir.path(), 7), Some(Ok(())));
        assert_eq!(read_word(dir.path(), 8), Some(Err("a site's bytes changed: mix".to_string())));
        std::fs::write(dir.path().join("9.ended"), "kept\t\x1b[2Jgone\n").unwrap();
        assert_eq!(read_word(dir.path(), 9), Some(Err("\\u{1b}[2Jgone".to_string())), "escapes escaped");
        assert!(!announced(dir.path(), 7));
        announce(dir.path(), 7).unwrap();
        assert!(announced(dir.path(), 7));
        // The word of the image before (given at once: it was not traced) is not the word of
        // the image that announces itself after it in the same process.
        assert_eq!(read_word(dir.path(), 7), None, "an earlier image's word is gone");
        write_word(dir.path(), 7, Err("its thread could not start")).unwrap();
        assert_eq!(read_word(dir.path(), 7), Some(Err("its thread could not start".to_string())));
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
        let said = |pid: u32| match read_word(dir.path(), pid) {
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
