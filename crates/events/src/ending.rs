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

use std::io;
use std::path::{Path, PathBuf};

/// The file in a ring directory whose presence says the recording goes on.
pub const RECORDING_FILE: &str = "record.live";

/// Where the image of process `pid` gives its word in ring directory `dir`.
fn word_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.ended"))
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
/// code is restored, `Err` with why not.
pub fn read_word(dir: &Path, pid: u32) -> Option<Result<(), String>> {
    let word = std::fs::read_to_string(word_path(dir, pid)).ok()?;
    let word = word.trim_end();
    Some(match word.split_once('\t') {
        None if word == "restored" => Ok(()),
        Some(("kept", why)) => Err(why.to_string()),
        _ => Err(format!("its word cannot be read: `{word}`")),
    })
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
    }
}
