//! What can go wrong reading ring files and trace directories.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// An error of this crate; each names the file and what is wrong with it.
#[derive(Debug)]
#[non_exhaustive]
pub enum EventsError {
    /// A system call on `path` failed.
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done (`"read"`, `"create"`...).
        op: &'static str,
        /// The system's error.
        source: io::Error,
    },
    /// `path` is a directory but holds no `info.json`.
    NotATrace(PathBuf),
    /// `path` (an `info.json`, `functions.txt` or `sites.txt`) does not parse.
    Malformed {
        /// The file.
        path: PathBuf,
        /// The line (1-based) where it went wrong, when known.
        line: Option<usize>,
        /// What is wrong.
        what: String,
    },
    /// A `.dat` file does not start with `DYNPTRC1`.
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// A record in a `.dat` file is invalid.
    CorruptRecord {
        /// The file.
        path: PathBuf,
        /// Byte offset of the record in the file.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A ring file is not one (bad magic, version, sizes).
    BadRingFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

impl EventsError {
    /// An [`EventsError::Io`] for `op` on `path`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> EventsError {
        let path = path.into();
        move |source| EventsError::Io { path, op, source }
    }
}

impl fmt::Display for EventsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventsError::Io { path, op, source } => write!(f, "cannot {op} {}: {source}", path.display()),
            EventsError::NotATrace(path) => {
                write!(
                    f,
                    "{} is not a trace directory (it has no info.json; `dynprobe record` writes one)",
                    path.display()
                )
            }
            EventsError::Malformed { path, line: Some(line), what } => {
                write!(f, "{}:{line}: {what}", path.display())
            }
            EventsError::Malformed { path, line: None, what } => write!(f, "{}: {what}", path.display()),
            EventsError::BadMagic { path } => {
                write!(f, "{}: not a dynprobe thread trace (it does not start with DYNPTRC1)", path.display())
            }
            EventsError::CorruptRecord { path, offset, what } => {
                write!(f, "{}: corrupt record at byte {offset}: {what}", path.display())
            }
            EventsError::BadRingFile { path, what } => {
                write!(f, "{}: not a dynprobe ring file: {what}", path.display())
            }
        }
    }
}

impl std::error::Error for EventsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EventsError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
