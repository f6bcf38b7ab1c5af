//! A recorded trace as the analyses see it: processes (one per program image: a `fork`
//! starts a new one with the same functions, an `exec` one with its own), their threads,
//! and each thread's events in time order, with times in nanoseconds of `CLOCK_MONOTONIC`.
//!
//! [`crate::trace`] reads a trace directory into this form; `dynprobe replay`, `report`
//! and `export` work on it.

use std::fmt;
use std::path::PathBuf;

/// A whole trace.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// The directory it was read from.
    pub dir: PathBuf,
    /// The recorded command line.
    pub command: Vec<String>,
    /// When recording started and ended (`CLOCK_MONOTONIC` ns); `end_ns` is the last
    /// event's time when the recorder did not finish (it was killed).
    pub start_ns: u64,
    /// See `start_ns`.
    pub end_ns: u64,
    /// The program's exit status as a shell shows it (128 + signal when killed); `None`
    /// when unknown.
    pub exit_code: Option<i32>,
    /// Every process image, in the order they started.
    pub processes: Vec<ProcessTrace>,
    /// What is missing or cut short in the directory, the rest having been read (see
    /// [`crate::trace::read`]): the events of these files, or past these offsets, are not
    /// in the trace.
    pub damage: Vec<Damage>,
}

/// A file of a trace directory that is missing, or ends before its data does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The file (or process directory).
    pub path: PathBuf,
    /// The byte offset where its complete data ends, for a file cut short.
    pub offset: Option<u64>,
    /// What is missing or cut, and what it costs.
    pub what: String,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(offset) => write!(f, "{}: at byte {offset}: {}", self.path.display(), self.what),
            None => write!(f, "{}: {}", self.path.display(), self.what),
        }
    }
}

/// One process image: a process between its start (or `exec`) and its exit (or `exec`).
#[derive(Debug, Clone, Default)]
pub struct ProcessTrace {
    /// The process id.
    pub pid: u32,
    /// The parent process id when it was forked from a traced process, else 0.
    pub parent: u32,
    /// The executable's path.
    pub exe: String,
    /// The traced functions; a record's function id indexes this.
    pub functions: Vec<Function>,
    /// How the function sites were found and patched.
    pub sites: SiteSummary,
    /// The threads that recorded anything.
    pub threads: Vec<ThreadTrace>,
    /// The marker sites recorded (`record -M`); a marker event's site id indexes this.
    pub markers: Vec<MarkerSite>,
    /// The functions whose calls carry values (`record -a`), by id: the key of each one's
    /// description in the trace directory's `args` file.
    pub described: std::collections::BTreeMap<u32, u64>,
}

/// A static marker site whose hits were recorded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MarkerSite {
    /// The marker's provider.
    pub provider: String,
    /// The marker's name.
    pub name: String,
    /// The site's runtime address.
    pub addr: u64,
}

/// One argument of a recorded marker hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkerValue {
    /// An unsigned integer.
    Unsigned(u64),
    /// A signed integer.
    Signed(i64),
    /// A `bool`.
    Bool(bool),
    /// A `char`'s code point (not necessarily a valid one).
    Char(u32),
    /// A pointer.
    Pointer(u64),
    /// A `float` (`bits` 32) or `double` (`bits` 64), by its bits.
    Float {
        /// 32 or 64.
        bits: u8,
        /// The value's bits (a `float`'s in the low 32).
        raw: u64,
    },
    /// A string's bytes (the first `MARKER_STRING_MAX` of them).
    Str {
        /// The bytes kept.
        bytes: Vec<u8>,
        /// Whether the string was longer.
        cut: bool,
    },
    /// The value could not be read at the hit.
    Unavailable,
    /// The values from here on did not fit in the hit's records.
    Omitted,
}

impl fmt::Display for MarkerValue {
    /// As the event lines of `dynprobe probe` show values: integers in decimal, pointers in
    /// hex, strings and chars quoted with escapes (a cut string followed by `...`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MarkerValue::Unsigned(v) => write!(f, "{v}"),
            MarkerValue::Signed(v) => write!(f, "{v}"),
            MarkerValue::Bool(v) => write!(f, "{v}"),
            MarkerValue::Char(code) => match char::from_u32(*code) {
                Some(c) => write!(f, "\"{}\"", c.escape_default()),
                None => write!(f, "(unavailable)"),
            },
            MarkerValue::Pointer(p) => write!(f, "{p:#x}"),
            MarkerValue::Float { bits: 32, raw } => write!(f, "{}", f32::from_bits(*raw as u32)),
            MarkerValue::Float { raw, .. } => write!(f, "{}", f64::from_bits(*raw)),
            MarkerValue::Str { bytes, cut } => {
                write!(f, "\"{}\"", bytes.escape_ascii())?;
                if *cut {
                    f.write_str("...")?;
                }
                Ok(())
            }
            MarkerValue::Unavailable => f.write_str("(unavailable)"),
            MarkerValue::Omitted => f.write_str("..."),
        }
    }
}

/// A traced function.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Function {
    /// Readable (demangled) name.
    pub name: String,
    /// The file name of its module (`demo`, `libc.so.6`).
    pub module: String,
    /// Its runtime address.
    pub addr: u64,
}

/// One thread's events.
#[derive(Debug, Clone, Default)]
pub struct ThreadTrace {
    /// The kernel thread id.
    pub tid: u32,
    /// Its events, in time order.
    pub events: Vec<Event>,
    /// Events lost because its ring was full (also present as [`EventKind::Lost`] events
    /// where they happened).
    pub lost: u64,
    /// The arguments of its marker hits: [`EventKind::Marker`]'s index points here.
    pub marker_args: Vec<Vec<MarkerValue>>,
    /// The values recorded with calls (`dynprobe record -a`), untyped: a call's arguments by
    /// (its entry's time, function id, `false`), its return value by (its exit's time,
    /// function id, `true`). The trace directory's `args` file says how to show them.
    pub call_values: std::collections::BTreeMap<(u64, u32, bool), Vec<MarkerValue>>,
}

/// One event of a thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub ns: u64,
    /// What happened.
    pub kind: EventKind,
    /// The call depth (0 for the outermost traced call).
    pub depth: u16,
    /// The function id (index into [`ProcessTrace::functions`]); 0 for [`EventKind::Lost`];
    /// for [`EventKind::Marker`], the marker site's id (index into
    /// [`ProcessTrace::markers`]).
    pub func: u32,
}

/// What an [`Event`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The function was entered.
    Entry,
    /// The function was already running when recording started in a running process
    /// (`record -p`): found on the thread's stack at the attach, which is `ns` (its real
    /// entry is unknown); its exit follows if it ends during the recording.
    EntryBeforeAttach,
    /// The function returned.
    Exit,
    /// The function was left without returning (`longjmp`, exception); `ns` is when this
    /// was noticed.
    Unwound,
    /// This many events were lost here (the ring buffer was full).
    Lost(u64),
    /// A static marker was hit (inside the calls of lower depth open then); its arguments
    /// are [`ThreadTrace::marker_args`] at this index.
    Marker(u32),
}

/// How many sites of each kind were found and patched, and why the others were refused:
/// the recorder's `dyn_ftrace_total_info`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SiteSummary {
    /// Per site kind (`mcount`, `patchable`, `entry`): (kind, found, patched).
    pub kinds: Vec<(String, u64, u64)>,
    /// The refused sites.
    pub refused: Vec<RefusedSite>,
    /// `-F` patterns naming a library that was never loaded (misspelt, or never
    /// `dlopen`ed): they matched nothing.
    pub pending: Vec<String>,
    /// How long turning the compiler sites into calls took, in ns (the one batch, its stop
    /// of the other threads included); `None` when not recorded.
    pub patch_ns: Option<u64>,
}

/// A site that was not patched.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RefusedSite {
    /// Site kind.
    pub kind: String,
    /// Address of the site.
    pub addr: u64,
    /// The function it belongs to.
    pub function: String,
    /// Why.
    pub reason: String,
}
