//! The trace directory `dynprobe record` writes, and reading it back as a [`Trace`].
//!
//! ```text
//!   info.json              the command, start and end, exit status, clock calibration,
//!                          the processes with the bytes written into each thread's
//!                          `.dat` (rewritten while recording, so always readable)
//!   <pid>.<n>/             one process image (n counts the images of a pid: `exec`)
//!       functions.txt      id \t addr_hex \t module \t name     (ids 0, 1, 2... in order)
//!       sites.txt          exe \t path | parent \t pid | kind \t kind \t found \t patched
//!                          | refused \t kind \t addr_hex \t function \t reason
//!       markers.txt        id \t addr_hex \t provider \t name      the marker sites recorded
//!                          (`record -M`; ids 0, 1, 2... in order)
//!       values.txt         id \t key_hex   the functions whose calls carry values
//!                          (`record -a`), each with its description's key (its link-time
//!                          address) in the trace's `args` file, which the CLI reads
//!       <tid>.dat          "DYNPTRC1", u32 pid, u32 tid (little-endian), then 16-byte
//!                          records (`Record::to_bytes`) with raw clock ticks
//! ```
//!
//! A `.dat` file holds its thread's records as they came out of the rings, including the
//! `Thread` records that routed them. A trailing partial record (a recorder killed
//! mid-write), a file shorter than `info.json` says, or one missing, is read up to where it
//! stops and noted in [`Trace::damage`]. Everything is 0700/0600 ([`crate::files`]).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::clock::Calibration;
use crate::error::EventsError;
use crate::marker;
use crate::model::{
    Damage, Event, EventKind, Function, MarkerSite, MarkerValue, ProcessTrace, RefusedSite, SiteSummary, ThreadTrace,
    Trace,
};
use crate::record::{Kind, Record};

/// The first 8 bytes of a `.dat` file.
pub const DAT_MAGIC: [u8; 8] = *b"DYNPTRC1";
/// Bytes of a `.dat` file's header: magic, pid, tid.
pub(crate) const DAT_HEADER_BYTES: usize = 16;
/// The `format` of `info.json`.
const FORMAT: &str = "dynprobe-trace";
/// The `version` of `info.json` and of the layout above.
const VERSION: u32 = 1;

/// `info.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Info {
    pub format: String,
    pub version: u32,
    pub command: Vec<String>,
    pub start_ns: u64,
    /// `None` until the recorder finishes.
    pub end_ns: Option<u64>,
    pub exit_code: Option<i32>,
    pub clock: Calibration,
    pub processes: Vec<InfoProcess>,
}

impl Info {
    /// The info of a trace that starts now.
    pub fn new(command: Vec<String>, start_ns: u64, clock: Calibration) -> Info {
        let format = FORMAT.to_owned();
        Info { format, version: VERSION, command, start_ns, end_ns: None, exit_code: None, clock, processes: vec![] }
    }
}

/// A process image as `info.json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InfoProcess {
    /// Its directory's name, `<pid>.<n>`.
    pub dir: String,
    pub pid: u32,
    pub parent: u32,
    pub exe: String,
    /// The bytes the recorder wrote into each thread's `.dat` file (by thread id), when it
    /// last wrote `info.json`: what tells a `.dat` file cut short, or missing, from a
    /// complete one. Absent from traces of older recorders.
    #[serde(default)]
    pub threads: BTreeMap<u32, u64>,
}

/// The header of thread `tid`'s `.dat` file in process `pid`.
pub(crate) fn dat_header(pid: u32, tid: u32) -> [u8; DAT_HEADER_BYTES] {
    let mut header = [0; DAT_HEADER_BYTES];
    header[..8].copy_from_slice(&DAT_MAGIC);
    header[8..12].copy_from_slice(&pid.to_le_bytes());
    header[12..].copy_from_slice(&tid.to_le_bytes());
    header
}

/// `(pid, n)` of a process image's name `<pid>.<n>`.
pub(crate) fn parse_image_name(name: &str) -> Option<(u32, u32)> {
    let (pid, n) = name.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) {
        return None;
    }
    Some((pid.parse().ok()?, n.parse().ok()?))
}

/// The lines of a tab-separated text file, numbered from 1, without empty ones.
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, l)| (i + 1, l)).filter(|(_, l)| !l.is_empty())
}

fn malformed(path: &Path, line: usize, what: impl Into<String>) -> EventsError {
    EventsError::Malformed { path: path.to_owned(), line: Some(line), what: what.into() }
}

fn parse_hex(path: &Path, line: usize, field: &str, text: &str) -> Result<u64, EventsError> {
    u64::from_str_radix(text, 16).map_err(|_| malformed(path, line, format!("{field} {text:?} is not hexadecimal")))
}

fn parse_number<T: std::str::FromStr>(path: &Path, line: usize, field: &str, text: &str) -> Result<T, EventsError> {
    text.parse().map_err(|_| malformed(path, line, format!("{field} {text:?} is not a number")))
}

/// A text file of a trace (`functions.txt`, `markers.txt`, `sites.txt`), parsed a line at
/// a time: as it is read, so that a damaged one is refused at its first bad line.
trait LineFile: Default {
    /// Parses line number `line`, `l` (not empty), of the file `path`.
    fn line(&mut self, path: &Path, line: usize, l: &str) -> Result<(), EventsError>;
}

fn parse<T: LineFile>(path: &Path, text: &str) -> Result<T, EventsError> {
    let mut parsed = T::default();
    for (line, l) in lines(text) {
        parsed.line(path, line, l)?;
    }
    Ok(parsed)
}

/// A `functions.txt`.
impl LineFile for Vec<Function> {
    fn line(&mut self, path: &Path, line: usize, l: &str) -> Result<(), EventsError> {
        let fields: Vec<&str> = l.splitn(4, '\t').collect();
        let [id, addr, module, name] = fields[..] else {
            return Err(malformed(path, line, "expected id, address, module and name separated by tabs"));
        };
        let id: usize = parse_number(path, line, "function id", id)?;
        if id != self.len() {
            return Err(malformed(path, line, format!("function id {id} where {} was expected", self.len())));
        }
        let addr = parse_hex(path, line, "address", addr)?;
        self.push(Function { name: name.to_owned(), module: module.to_owned(), addr });
        Ok(())
    }
}

/// A `markers.txt`.
impl LineFile for Vec<MarkerSite> {
    fn line(&mut self, path: &Path, line: usize, l: &str) -> Result<(), EventsError> {
        let fields: Vec<&str> = l.splitn(4, '\t').collect();
        let [id, addr, provider, name] = fields[..] else {
            return Err(malformed(path, line, "expected id, address, provider and name separated by tabs"));
        };
        let id: usize = parse_number(path, line, "marker id", id)?;
        if id != self.len() {
            return Err(malformed(path, line, format!("marker id {id} where {} was expected", self.len())));
        }
        let addr = parse_hex(path, line, "address", addr)?;
        self.push(MarkerSite { provider: provider.to_owned(), name: name.to_owned(), addr });
        Ok(())
    }
}

/// A `values.txt`.
impl LineFile for BTreeMap<u32, u64> {
    fn line(&mut self, path: &Path, line: usize, l: &str) -> Result<(), EventsError> {
        let Some((id, key)) = l.split_once('\t') else {
            return Err(malformed(path, line, "expected a function id and a key separated by a tab"));
        };
        let id: u32 = parse_number(path, line, "function id", id)?;
        self.insert(id, parse_hex(path, line, "key", key)?);
        Ok(())
    }
}

/// The functions of a `functions.txt` (or an agent's `.funcs`) named `path`.
#[cfg(test)]
pub(crate) fn parse_functions(path: &Path, text: &str) -> Result<Vec<Function>, EventsError> {
    parse(path, text)
}

/// What a `sites.txt` (or an agent's `.sites`) says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Sites {
    pub exe: String,
    pub parent: u32,
    pub summary: SiteSummary,
}

impl LineFile for Sites {
    fn line(&mut self, path: &Path, line: usize, l: &str) -> Result<(), EventsError> {
        let fields: Vec<&str> = l.split('\t').collect();
        match fields[..] {
            ["exe", exe] => self.exe = exe.to_owned(),
            ["parent", parent] => self.parent = parse_number(path, line, "parent pid", parent)?,
            ["pending", pattern] => self.summary.pending.push(pattern.to_owned()),
            ["patch_ns", ns] => self.summary.patch_ns = Some(parse_number(path, line, "patch time", ns)?),
            ["kind", kind, found, patched] => self.summary.kinds.push((
                kind.to_owned(),
                parse_number(path, line, "found count", found)?,
                parse_number(path, line, "patched count", patched)?,
            )),
            ["refused", kind, addr, function, ref reason @ ..] if !reason.is_empty() => {
                self.summary.refused.push(RefusedSite {
                    kind: kind.to_owned(),
                    addr: parse_hex(path, line, "address", addr)?,
                    function: function.to_owned(),
                    reason: reason.join("\t"),
                })
            }
            _ => {
                return Err(malformed(
                    path,
                    line,
                    format!(
                        "{:?} is not one of: exe, parent, patch_ns, pending, kind (kind found patched), refused (kind \
                         address function reason), with tab-separated fields",
                        fields[0]
                    ),
                ))
            }
        }
        Ok(())
    }
}

/// Parses the `sites.txt` named `path`.
pub(crate) fn parse_sites(path: &Path, text: &str) -> Result<Sites, EventsError> {
    parse(path, text)
}

/// The most bytes of an `info.json`: the command line and a few lines per process image,
/// far below this even for a program that forks a million times.
const MAX_INFO_BYTES: u64 = 256 << 20;
/// The longest line of a trace's text files: a demangled C++ name can take tens of kilobytes.
const MAX_LINE_BYTES: usize = 1 << 20;
/// Bytes read from a `.dat` file at a time.
const DAT_BUFFER_BYTES: usize = 1 << 16;

/// Opens `path` for reading if it exists.
fn open_optional(path: &Path) -> Result<Option<File>, EventsError> {
    match File::open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EventsError::io("read", path)(e)),
    }
}

/// Reads and parses the text file `path` if it exists, a line at a time: never more than
/// one line ([`MAX_LINE_BYTES`] at most) is held, whatever the file's size.
fn read_lines<T: LineFile>(path: &Path) -> Result<Option<T>, EventsError> {
    let Some(file) = open_optional(path)? else { return Ok(None) };
    let mut reader = BufReader::new(file);
    let mut parsed = T::default();
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        let limit = MAX_LINE_BYTES as u64 + 1;
        let n = (&mut reader).take(limit).read_until(b'\n', &mut buf).map_err(EventsError::io("read", path))?;
        if n == 0 {
            return Ok(Some(parsed));
        }
        line += 1;
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        } else if buf.len() > MAX_LINE_BYTES {
            return Err(malformed(path, line, format!("the line is longer than {MAX_LINE_BYTES} bytes")));
        }
        let l = std::str::from_utf8(&buf)
            .map_err(|e| malformed(path, line, format!("not UTF-8 text (byte {} of the line)", e.valid_up_to() + 1)))?;
        if !l.is_empty() {
            parsed.line(path, line, l)?;
        }
    }
}

/// Reads and checks the `info.json` of trace directory `dir`.
pub(crate) fn read_info(dir: &Path) -> Result<Info, EventsError> {
    let path = dir.join("info.json");
    let Some(file) = open_optional(&path)? else { return Err(EventsError::NotATrace(dir.to_owned())) };
    let bad = |what: String| EventsError::Malformed { path: path.clone(), line: None, what };
    let len = file.metadata().map_err(EventsError::io("stat", &path))?.len();
    if len > MAX_INFO_BYTES {
        return Err(bad(format!("it has {len} bytes, more than the {MAX_INFO_BYTES} of any trace's info.json")));
    }
    // Parsed as it is read: a damaged file is refused at its first bad byte.
    let info: Info = serde_json::from_reader(BufReader::new(file)).map_err(|e| EventsError::Malformed {
        path: path.clone(),
        line: Some(e.line()),
        what: e.to_string(),
    })?;
    if info.format != FORMAT {
        return Err(bad(format!("format {:?}, not {FORMAT:?}", info.format)));
    }
    if info.version != VERSION {
        return Err(bad(format!("trace version {}, this dynprobe reads version {VERSION}", info.version)));
    }
    if let Some(p) = info.processes.iter().find(|p| parse_image_name(&p.dir).map(|(pid, _)| pid) != Some(p.pid)) {
        return Err(bad(format!("process {} is listed in the directory {:?}, not in {}.<n>", p.pid, p.dir, p.pid)));
    }
    Ok(info)
}

/// Reads the trace directory `dir`: every process image, its functions, sites and threads,
/// with the record times converted to `CLOCK_MONOTONIC` nanoseconds.
///
/// Files are validated as they are read, and nothing is allocated by a size read from a
/// file. A corrupt file is an error that names it and the cause (with the byte offset of a
/// bad record). What is missing or cut short while the rest reads — a `.dat` file that ends
/// inside a record or before the bytes `info.json` says were written into it, one that is
/// gone, a process directory that is gone — is listed in [`Trace::damage`]: a directory
/// whose recorder was killed reads too (its `info.json` has no end, the last event's time
/// stands for it), and says where its files stop.
pub fn read(dir: &Path) -> Result<Trace, EventsError> {
    read_trace(dir, true)
}

/// [`read`] without the events: the processes with their functions and site summaries
/// only (no thread), read without touching the `.dat` files — what `dynprobe record` says
/// at the end of a long recording, at once.
pub fn read_summary(dir: &Path) -> Result<Trace, EventsError> {
    read_trace(dir, false)
}

fn read_trace(dir: &Path, with_events: bool) -> Result<Trace, EventsError> {
    let entries = fs::read_dir(dir).map_err(EventsError::io("read trace directory", dir))?;
    let info = read_info(dir)?;
    let mut images = Vec::new();
    for entry in entries {
        let entry = entry.map_err(EventsError::io("read trace directory", dir))?;
        let name = entry.file_name();
        let Some((pid, n)) = name.to_str().and_then(parse_image_name) else { continue };
        if entry.path().is_dir() {
            images.push((pid, n, entry.path()));
        }
    }
    images.sort();

    let mut damage = Vec::new();
    if with_events {
        for listed in &info.processes {
            if !images.iter().any(|(_, _, path)| path.file_name() == Some(listed.dir.as_ref())) {
                damage.push(Damage {
                    path: dir.join(&listed.dir),
                    offset: None,
                    what: format!(
                        "missing: info.json lists process {} ({}) here, with {} recorded threads",
                        listed.pid,
                        listed.exe,
                        listed.threads.len()
                    ),
                });
            }
        }
    }
    let mut processes = Vec::new();
    for (pid, _, path) in images {
        let listed = info.processes.iter().find(|p| Some(p.dir.as_str()) == path.file_name().and_then(|n| n.to_str()));
        let events = with_events.then_some(&mut damage);
        processes.push(read_process(&path, pid, listed, &info.clock, events)?);
    }
    // In start order; processes without events after the others, in pid order.
    let first = |p: &ProcessTrace| p.threads.iter().filter_map(|t| t.events.first()).map(|e| e.ns).min();
    processes.sort_by_key(|p| first(p).unwrap_or(u64::MAX));

    let last_event = processes.iter().flat_map(|p| &p.threads).filter_map(|t| t.events.last()).map(|e| e.ns).max();
    let end_ns = info.end_ns.unwrap_or_else(|| last_event.unwrap_or(0).max(info.start_ns));
    Ok(Trace {
        dir: dir.to_owned(),
        command: info.command,
        start_ns: info.start_ns,
        end_ns,
        exit_code: info.exit_code,
        processes,
        damage,
    })
}

/// Reads the process image directory `dir` of process `pid`, and its threads' events when
/// given where to note what is missing or cut.
fn read_process(
    dir: &Path,
    pid: u32,
    listed: Option<&InfoProcess>,
    clock: &Calibration,
    events: Option<&mut Vec<Damage>>,
) -> Result<ProcessTrace, EventsError> {
    let functions: Vec<Function> = read_lines(&dir.join("functions.txt"))?.unwrap_or_default();
    let markers: Vec<MarkerSite> = read_lines(&dir.join("markers.txt"))?.unwrap_or_default();
    let described: BTreeMap<u32, u64> = read_lines(&dir.join("values.txt"))?.unwrap_or_default();
    let mut sites: Sites = read_lines(&dir.join("sites.txt"))?.unwrap_or_default();
    if let Some(listed) = listed {
        if sites.exe.is_empty() {
            sites.exe.clone_from(&listed.exe);
        }
        if sites.parent == 0 {
            sites.parent = listed.parent;
        }
    }

    let mut threads = Vec::new();
    if let Some(damage) = events {
        let no_threads = BTreeMap::new();
        let written = listed.map_or(&no_threads, |l| &l.threads);
        let mut found = Vec::new();
        let entries = fs::read_dir(dir).map_err(EventsError::io("read process directory", dir))?;
        for entry in entries {
            let path = entry.map_err(EventsError::io("read process directory", dir))?.path();
            if path.extension().is_none_or(|e| e != "dat") {
                continue;
            }
            let tid = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u32>().ok());
            found.extend(tid);
            let expected = tid.and_then(|tid| written.get(&tid).copied());
            let thread = read_thread(&path, pid, (functions.len(), markers.len()), clock, expected, damage)?;
            if !thread.events.is_empty() {
                threads.push(thread);
            }
        }
        for (tid, bytes) in written.iter().filter(|(tid, _)| !found.contains(tid)) {
            damage.push(Damage {
                path: dir.join(format!("{tid}.dat")),
                offset: None,
                what: format!("missing: the recorder wrote {bytes} bytes of thread {tid}'s events here"),
            });
        }
    }
    threads.sort_by_key(|t| (t.events[0].ns, t.tid));
    Ok(ProcessTrace {
        pid,
        parent: sites.parent,
        exe: sites.exe,
        functions,
        sites: sites.summary,
        threads,
        markers,
        described,
    })
}

/// Fills `buf` from `reader`; fewer bytes (the count is returned) only at the end of the file.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads the `.dat` file `path` of process `pid`, which has `functions` functions and
/// `markers` marker sites, record by record (each checked as it is read), into its
/// thread's events. The recorder wrote `expected` bytes into it, when known. A file that
/// ends inside a record, or before `expected` bytes, has its complete records read and is
/// noted in `damage`.
fn read_thread(
    path: &Path,
    pid: u32,
    (functions, markers): (usize, usize),
    clock: &Calibration,
    expected: Option<u64>,
    damage: &mut Vec<Damage>,
) -> Result<ThreadTrace, EventsError> {
    let file = File::open(path).map_err(EventsError::io("read", path))?;
    let mut reader = BufReader::with_capacity(DAT_BUFFER_BYTES, file);
    let read_err = EventsError::io("read", path);
    let corrupt = |offset: u64, what: String| EventsError::CorruptRecord { path: path.to_owned(), offset, what };

    let mut header = [0u8; DAT_HEADER_BYTES];
    let got = read_full(&mut reader, &mut header).map_err(read_err)?;
    if got < 8 || header[..8] != DAT_MAGIC {
        return Err(EventsError::BadMagic { path: path.to_owned() });
    }
    if got < DAT_HEADER_BYTES {
        return Err(corrupt(8, "the header ends before its pid and tid".into()));
    }
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let (file_pid, tid) = (u32_at(8), u32_at(12));
    if file_pid != pid {
        return Err(corrupt(8, format!("pid {file_pid} in the directory of process {pid}")));
    }

    let mut thread = ThreadTrace { tid, ..ThreadTrace::default() };
    let mut offset = DAT_HEADER_BYTES as u64;
    // Reads the next record: `Ok(None)` at the end of the file, `Err(n)` when it ends
    // after `n` bytes of the record.
    let mut next = |offset: &mut u64| -> Result<Result<Option<Record>, usize>, EventsError> {
        let mut bytes = [0u8; 16];
        let got = read_full(&mut reader, &mut bytes).map_err(EventsError::io("read", path))?;
        *offset += got as u64;
        Ok(match got {
            0 => Ok(None),
            16 => Ok(Some(Record::from_bytes(&bytes))),
            partial => Err(partial),
        })
    };
    // Where the complete records end, and why they end there when the file goes on.
    let mut cut: Option<(u64, String)> = None;
    loop {
        let at = offset;
        let rec = match next(&mut offset)? {
            Ok(Some(rec)) => rec,
            Ok(None) => break,
            Err(got) => {
                cut = Some((at, format!("the last record is cut: the file ends {got} bytes into it")));
                break;
            }
        };
        let kind = match rec.kind() {
            Some(Kind::Thread) => continue,
            Some(Kind::Marker) => {
                let (site, count) = marker::marker_header(&rec);
                if site as usize >= markers {
                    return Err(corrupt(
                        at,
                        format!("marker site id {site} out of range (the process has {markers} marker sites)"),
                    ));
                }
                let values = match data_after(&mut next, &corrupt, at, count, "marker hit", &mut offset)? {
                    Ok(values) => values,
                    Err(what) => {
                        cut = Some((at, what));
                        break;
                    }
                };
                thread.marker_args.push(values);
                let ns = clock.to_ns(rec.time);
                let index = thread.marker_args.len() as u32 - 1;
                thread.events.push(Event { ns, kind: EventKind::Marker(index), depth: rec.depth(), func: site });
                continue;
            }
            Some(Kind::MarkerData) => return Err(corrupt(at, "marker data without its marker record".into())),
            Some(Kind::Entry) => EventKind::Entry,
            Some(Kind::EntryBeforeAttach) => EventKind::EntryBeforeAttach,
            Some(Kind::Exit) => EventKind::Exit,
            Some(Kind::Unwound) => EventKind::Unwound,
            Some(Kind::Lost) => {
                thread.lost += rec.payload();
                EventKind::Lost(rec.payload())
            }
            None if rec == Record::default() => {
                return Err(corrupt(at, "an all-zero record, never written (a hole or zeros in the file)".into()))
            }
            None => return Err(corrupt(at, format!("invalid record kind {}", rec.word & 0xf))),
        };
        let (depth, func) = match kind {
            EventKind::Lost(_) => (0, 0),
            _ => {
                // With `record -a`, an entry's arguments or an exit's return value follow.
                let (id, count) = marker::marker_header(&rec);
                let func = match kind {
                    EventKind::Entry | EventKind::Exit => u64::from(id),
                    _ => rec.payload(),
                };
                if count > 0 && func < functions as u64 {
                    let what = if kind == EventKind::Entry { "call's entry" } else { "call's exit" };
                    match data_after(&mut next, &corrupt, at, count, what, &mut offset)? {
                        Ok(values) => {
                            let key = (clock.to_ns(rec.time), func as u32, kind == EventKind::Exit);
                            thread.call_values.insert(key, values);
                        }
                        Err(what) => {
                            cut = Some((at, what));
                            break;
                        }
                    }
                }
                if func >= functions as u64 {
                    return Err(corrupt(
                        at,
                        format!("function id {func} out of range (the process has {functions} functions)"),
                    ));
                }
                (rec.depth(), func as u32)
            }
        };
        thread.events.push(Event { ns: clock.to_ns(rec.time), kind, depth, func });
    }
    match (expected, cut) {
        (Some(expected), cut) if offset < expected => {
            let at = cut.as_ref().map_or(offset, |(at, _)| *at);
            let detail = cut.map_or(String::new(), |(_, what)| format!("; {what}"));
            damage.push(Damage {
                path: path.to_owned(),
                offset: Some(at),
                what: format!(
                    "cut: the recorder wrote {expected} bytes, the file has {offset}{detail}; thread {tid}'s events \
                     after it are lost"
                ),
            });
        }
        (_, Some((at, what))) => damage.push(Damage {
            path: path.to_owned(),
            offset: Some(at),
            what: format!("{what} (the recording stopped while writing it?); ignored"),
        }),
        _ => {}
    }
    thread.events.sort_by_key(|e| e.ns);
    Ok(thread)
}

/// The values in the `count` data records after the record at `at` (a marker hit's, a
/// call's with `record -a`), read with `next` (`corrupt` makes the error of bad ones): `Ok(Err(what))` when the file ends before
/// them.
fn data_after(
    next: &mut impl FnMut(&mut u64) -> Result<Result<Option<Record>, usize>, EventsError>,
    corrupt: &impl Fn(u64, String) -> EventsError,
    at: u64,
    count: usize,
    what: &str,
    offset: &mut u64,
) -> Result<Result<Vec<MarkerValue>, String>, EventsError> {
    if count > marker::MAX_DATA_RECORDS {
        return Err(corrupt(
            at,
            format!("{what} with {count} data records (at most {} can follow one)", marker::MAX_DATA_RECORDS),
        ));
    }
    let mut data = Vec::with_capacity(count);
    while data.len() < count {
        match next(offset)? {
            Ok(Some(rec)) => data.push(rec),
            _ => break,
        }
    }
    if data.len() < count {
        return Ok(Err(format!("the file ends inside the {what} there ({} of its {count} data records)", data.len())));
    }
    marker::data_bytes(&data)
        .and_then(|bytes| marker::decode(&bytes))
        .map(Ok)
        .map_err(|e| corrupt(at, format!("{what} with {count} data records: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::marker::MarkerRecords;
    use crate::model::MarkerValue;
    use crate::testutil::TempDir;

    /// A trace directory by hand: times are ns, process 10 has functions f0..f2 and thread
    /// files with `records` (raw bytes after the header).
    struct Fixture {
        dir: TempDir,
    }

    impl Fixture {
        fn new(name: &str) -> Fixture {
            let fixture = Fixture { dir: TempDir::new(name) };
            let clock = Calibration::start(Clock::MonotonicNs, (0, 0));
            let mut info = Info::new(vec!["demo".into()], 100, clock);
            info.processes.push(InfoProcess {
                dir: "10.0".into(),
                pid: 10,
                parent: 0,
                exe: "/from/info".into(),
                threads: BTreeMap::new(),
            });
            fixture.write("info.json", serde_json::to_string(&info).unwrap().as_bytes());
            fixture.write("10.0/functions.txt", b"0\t1000\tdemo\tf0\n1\t1100\tdemo\tf1\n2\t1200\tdemo\tf2\n");
            fixture
        }

        fn write(&self, rel: &str, bytes: &[u8]) {
            let path = self.dir.path().join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, bytes).unwrap();
        }

        fn thread(&self, pid: u32, n: u32, tid: u32, records: &[Record]) -> Vec<u8> {
            let mut bytes = dat_header(pid, tid).to_vec();
            bytes.extend(records.iter().flat_map(|r| r.to_bytes()));
            self.write(&format!("{pid}.{n}/{tid}.dat"), &bytes);
            bytes
        }

        fn read_err(&self) -> String {
            read(self.dir.path()).unwrap_err().to_string()
        }
    }

    fn rec(kind: Kind, time: u64, depth: u16, payload: u64) -> Record {
        Record::new(kind, time, depth, payload)
    }

    #[test]
    fn events_come_out_sorted_with_losses_counted() {
        let f = Fixture::new("trace-read");
        // Thread 11 starts later than thread 12; a Lost record sits between its events.
        f.thread(
            10,
            0,
            11,
            &[
                rec(Kind::Thread, 500, 0, 11),
                rec(Kind::Entry, 500, 0, 2),
                rec(Kind::Lost, 510, 0, 4),
                rec(Kind::Exit, 520, 0, 2),
                rec(Kind::Lost, 530, 0, 1),
            ],
        );
        f.thread(
            10,
            0,
            12,
            &[rec(Kind::Thread, 200, 0, 12), rec(Kind::Unwound, 250, 3, 1), rec(Kind::Entry, 210, 2, 0)],
        );
        // A process with no events, and one that started earlier.
        f.write("11.0/functions.txt", b"");
        f.write("9.1/functions.txt", b"0\t10\tm\tg\n");
        f.write("9.1/sites.txt", b"exe\t/bin/nine\nparent\t3\n");
        f.thread(9, 1, 9, &[rec(Kind::Entry, 150, 0, 0)]);

        let trace = read(f.dir.path()).unwrap();
        assert_eq!((trace.start_ns, trace.end_ns, trace.exit_code), (100, 530, None));
        let order: Vec<_> = trace.processes.iter().map(|p| (p.pid, p.parent, p.exe.as_str())).collect();
        assert_eq!(order, [(9, 3, "/bin/nine"), (10, 0, "/from/info"), (11, 0, "")]);
        let p = &trace.processes[1];
        assert_eq!(p.threads.iter().map(|t| (t.tid, t.lost)).collect::<Vec<_>>(), [(12, 0), (11, 5)]);
        let ev = |ns, kind, depth, func| Event { ns, kind, depth, func };
        assert_eq!(p.threads[0].events, [ev(210, EventKind::Entry, 2, 0), ev(250, EventKind::Unwound, 3, 1)]);
        assert_eq!(
            p.threads[1].events,
            [
                ev(500, EventKind::Entry, 0, 2),
                ev(510, EventKind::Lost(4), 0, 0),
                ev(520, EventKind::Exit, 0, 2),
                ev(530, EventKind::Lost(1), 0, 0)
            ]
        );
        assert!(trace.processes[2].threads.is_empty());
    }

    #[test]
    fn a_partial_last_record_is_read_up_to_and_noted() {
        let f = Fixture::new("trace-partial");
        let mut bytes = f.thread(10, 0, 11, &[rec(Kind::Entry, 500, 0, 1)]);
        bytes.extend_from_slice(&rec(Kind::Exit, 600, 0, 1).to_bytes()[..9]);
        f.write("10.0/11.dat", &bytes);
        let trace = read(f.dir.path()).unwrap();
        assert_eq!(trace.processes[0].threads[0].events.len(), 1);
        let dat = f.dir.path().join("10.0/11.dat");
        assert_eq!(
            trace.damage.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [format!(
                "{}: at byte 32: the last record is cut: the file ends 9 bytes into it (the recording stopped while \
                 writing it?); ignored",
                dat.display()
            )]
        );
    }

    /// Sets what `info.json` says the recorder wrote of each thread of process 10.
    fn written(f: &Fixture, threads: &[(u32, u64)]) {
        let path = f.dir.path().join("info.json");
        let mut info: Info = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        info.processes[0].threads = threads.iter().copied().collect();
        f.write("info.json", serde_json::to_string(&info).unwrap().as_bytes());
    }

    #[test]
    fn files_cut_short_or_missing_are_noted_with_what_they_cost() {
        let f = Fixture::new("trace-cut");
        let records = [rec(Kind::Entry, 500, 0, 1), rec(Kind::Exit, 600, 0, 1), rec(Kind::Entry, 700, 0, 2)];
        let whole = f.thread(10, 0, 11, &records);
        f.thread(10, 0, 12, &records[..1]);
        // Thread 11's file lost its last record at a record boundary: only info.json can tell.
        f.write("10.0/11.dat", &whole[..48]);
        written(&f, &[(11, 64), (12, 32), (13, 80)]);
        let trace = read(f.dir.path()).unwrap();
        let p = &trace.processes[0];
        assert_eq!(p.threads.iter().map(|t| (t.tid, t.events.len())).collect::<Vec<_>>(), [(11, 2), (12, 1)]);
        let dir = f.dir.path().join("10.0");
        assert_eq!(
            trace.damage.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                format!(
                    "{}: at byte 48: cut: the recorder wrote 64 bytes, the file has 48; thread 11's events after it \
                     are lost",
                    dir.join("11.dat").display()
                ),
                format!(
                    "{}: missing: the recorder wrote 80 bytes of thread 13's events here",
                    dir.join("13.dat").display()
                ),
            ]
        );
        // Cut inside a record too: one note, at the last complete record.
        f.write("10.0/11.dat", &whole[..40]);
        let trace = read(f.dir.path()).unwrap();
        assert!(trace.damage[0].to_string().contains("at byte 32: cut: the recorder wrote 64 bytes, the file has 40; the last record is cut: the file ends 8 bytes into it"), "{}", trace.damage[0]);
        // A process directory that is gone.
        fs::remove_dir_all(&dir).unwrap();
        let trace = read(f.dir.path()).unwrap();
        assert_eq!(
            trace.damage.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [format!(
                "{}: missing: info.json lists process 10 (/from/info) here, with 3 recorded threads",
                dir.display()
            )]
        );
        assert!(read_summary(f.dir.path()).unwrap().damage.is_empty(), "the summary reads no event file");
    }

    #[test]
    fn huge_sparse_files_are_refused_at_their_first_bad_bytes() {
        // Each is 4 GiB of zeros after a valid start, as a hole in a sparse file reads: the
        // reader stops at the first zeros, long before it could have read the rest.
        const HUGE: u64 = 4 << 30;
        let f = Fixture::new("trace-sparse");
        f.thread(10, 0, 11, &[rec(Kind::Entry, 500, 0, 1)]);
        let dat = f.dir.path().join("10.0/11.dat");
        fs::OpenOptions::new().write(true).open(&dat).unwrap().set_len(HUGE).unwrap();
        assert_eq!(
            f.read_err(),
            format!(
                "{}: corrupt record at byte 32: an all-zero record, never written (a hole or zeros in the file)",
                dat.display()
            )
        );
        fs::remove_file(&dat).unwrap();
        let functions = f.dir.path().join("10.0/functions.txt");
        fs::OpenOptions::new().write(true).open(&functions).unwrap().set_len(HUGE).unwrap();
        assert_eq!(f.read_err(), format!("{}:4: the line is longer than {MAX_LINE_BYTES} bytes", functions.display()));
        f.write("10.0/functions.txt", b"0\t1000\tdemo\tf0\n\xff\n");
        assert_eq!(f.read_err(), format!("{}:2: not UTF-8 text (byte 1 of the line)", functions.display()));
        fs::remove_file(&functions).unwrap();
        let info = f.dir.path().join("info.json");
        fs::OpenOptions::new().write(true).open(&info).unwrap().set_len(HUGE).unwrap();
        assert_eq!(
            f.read_err(),
            format!("{}: it has {HUGE} bytes, more than the {MAX_INFO_BYTES} of any trace's info.json", info.display())
        );
    }

    #[test]
    fn a_marker_hit_announcing_too_many_data_records_is_corrupt() {
        let f = Fixture::new("trace-marker-count");
        f.write("10.0/markers.txt", b"0\t1500\tapp\ttick\n");
        let hit = Record::new(Kind::Marker, 5, 0, 60_000 << 32);
        f.thread(10, 0, 11, &[hit]);
        assert_eq!(
            f.read_err(),
            format!(
                "{}: corrupt record at byte 16: marker hit with 60000 data records (at most 64 can follow one)",
                f.dir.path().join("10.0/11.dat").display()
            )
        );
    }

    #[test]
    fn info_json_must_name_image_directories() {
        let f = Fixture::new("trace-info-dirs");
        let path = f.dir.path().join("info.json");
        let mut info: Info = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        info.processes[0].dir = "../../etc".into();
        f.write("info.json", serde_json::to_string(&info).unwrap().as_bytes());
        assert_eq!(
            f.read_err(),
            format!("{}: process 10 is listed in the directory \"../../etc\", not in 10.<n>", path.display())
        );
    }

    #[test]
    fn the_summary_reads_no_event() {
        let f = Fixture::new("trace-summary");
        let mut bytes = f.thread(10, 0, 11, &[rec(Kind::Entry, 500, 0, 1)]);
        // A corrupt record: read fails on it, read_summary never looks.
        bytes.extend_from_slice(&Record { time: 600, word: 0xf }.to_bytes());
        f.write("10.0/11.dat", &bytes);
        assert!(read(f.dir.path()).is_err());
        let trace = read_summary(f.dir.path()).unwrap();
        assert_eq!(trace.processes.len(), 1);
        assert!(trace.processes[0].threads.is_empty());
        assert!(!trace.processes[0].functions.is_empty());
    }

    #[test]
    fn missing_and_foreign_directories_say_so() {
        let tmp = TempDir::new("trace-missing");
        let none = tmp.path().join("none");
        let err = read(&none).unwrap_err().to_string();
        assert!(err.starts_with(&format!("cannot read trace directory {}: ", none.display())), "{err}");
        let err = read(tmp.path()).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{} is not a trace directory (it has no info.json; `dynprobe record` writes one)",
                tmp.path().display()
            )
        );
    }

    #[test]
    fn a_bad_info_json_is_named() {
        let f = Fixture::new("trace-info");
        let path = f.dir.path().join("info.json");
        f.write("info.json", b"{\n\"format\": ");
        let err = f.read_err();
        assert!(err.starts_with(&format!("{}:2: ", path.display())), "{err}");
        f.write("info.json", br#"{"format":"other"}"#);
        assert!(f.read_err().contains("missing field"), "{}", f.read_err());
        let mut info = Info::new(vec![], 0, Calibration::start(Clock::Tsc, (0, 0)));
        info.format = "chrome".into();
        f.write("info.json", serde_json::to_string(&info).unwrap().as_bytes());
        assert_eq!(f.read_err(), format!("{}: format \"chrome\", not \"dynprobe-trace\"", path.display()));
        info.format = FORMAT.into();
        info.version = 9;
        f.write("info.json", serde_json::to_string(&info).unwrap().as_bytes());
        assert_eq!(f.read_err(), format!("{}: trace version 9, this dynprobe reads version 1", path.display()));
    }

    #[test]
    fn marker_hits_read_with_their_sites_and_arguments() {
        let f = Fixture::new("trace-markers");
        f.write("10.0/markers.txt", b"0\t1500\tapp\ttick\n1\t1600\tapp\tdone\n");
        let mut records = vec![rec(Kind::Entry, 10, 0, 1)];
        records.extend_from_slice(
            MarkerRecords::new().unsigned(7).string(b"hello, world: a longer text").finish(20, 1, 0),
        );
        records.extend_from_slice(MarkerRecords::new().finish(25, 1, 1));
        records.push(rec(Kind::Exit, 30, 0, 1));
        // A hit cut by the end of the file (a recorder killed mid-write) is left out.
        let cut = MarkerRecords::new().string(&[b'z'; 40]).finish(40, 0, 0).to_vec();
        records.extend_from_slice(&cut[..2]);
        f.thread(10, 0, 11, &records);
        let trace = read(f.dir.path()).unwrap();
        assert!(
            trace.damage[0].to_string().ends_with(
                "at byte 128: the file ends inside the marker hit there (1 of its 3 data records) (the recording \
                 stopped while writing it?); ignored"
            ),
            "{:?}",
            trace.damage
        );
        let p = &trace.processes[0];
        assert_eq!(
            p.markers,
            [
                MarkerSite { provider: "app".into(), name: "tick".into(), addr: 0x1500 },
                MarkerSite { provider: "app".into(), name: "done".into(), addr: 0x1600 }
            ]
        );
        let t = &p.threads[0];
        let kinds: Vec<(u64, EventKind, u16, u32)> = t.events.iter().map(|e| (e.ns, e.kind, e.depth, e.func)).collect();
        assert_eq!(
            kinds,
            [
                (10, EventKind::Entry, 0, 1),
                (20, EventKind::Marker(0), 1, 0),
                (25, EventKind::Marker(1), 1, 1),
                (30, EventKind::Exit, 0, 1)
            ]
        );
        let hello = MarkerValue::Str { bytes: b"hello, world: a longer text".to_vec(), cut: false };
        assert_eq!(t.marker_args, [vec![MarkerValue::Unsigned(7), hello], vec![]]);
    }

    #[test]
    fn call_values_read_with_their_calls_and_plain_calls_as_before() {
        let f = Fixture::new("trace-call-values");
        let mut records = MarkerRecords::new().string(b"alpha,12").signed(-8).finish_as(Kind::Entry, 10, 0, 1).to_vec();
        records.push(rec(Kind::Entry, 15, 1, 2));
        records.push(rec(Kind::Exit, 18, 1, 2));
        records.extend_from_slice(MarkerRecords::new().unsigned(12).finish_as(Kind::Exit, 20, 0, 1));
        // An entry whose values the file cuts is left out, as a marker hit's.
        let cut = MarkerRecords::new().string(&[b'z'; 40]).finish_as(Kind::Entry, 30, 0, 0).to_vec();
        records.extend_from_slice(&cut[..2]);
        f.thread(10, 0, 11, &records);
        let trace = read(f.dir.path()).unwrap();
        assert!(
            trace.damage[0]
                .to_string()
                .contains("the file ends inside the call's entry there (1 of its 3 data records)"),
            "{:?}",
            trace.damage
        );
        let t = &trace.processes[0].threads[0];
        let kinds: Vec<(u64, EventKind, u16, u32)> = t.events.iter().map(|e| (e.ns, e.kind, e.depth, e.func)).collect();
        assert_eq!(
            kinds,
            [
                (10, EventKind::Entry, 0, 1),
                (15, EventKind::Entry, 1, 2),
                (18, EventKind::Exit, 1, 2),
                (20, EventKind::Exit, 0, 1)
            ]
        );
        let line = MarkerValue::Str { bytes: b"alpha,12".to_vec(), cut: false };
        assert_eq!(t.call_values[&(10, 1, false)], [line, MarkerValue::Signed(-8)]);
        assert_eq!(t.call_values[&(20, 1, true)], [MarkerValue::Unsigned(12)]);
        assert_eq!(t.call_values.len(), 2);
    }

    #[test]
    fn corrupt_thread_files_are_named_with_the_offset() {
        let f = Fixture::new("trace-corrupt");
        let dat = f.dir.path().join("10.0/11.dat");
        f.write("10.0/11.dat", b"NOTATRACEFILE...");
        assert_eq!(
            f.read_err(),
            format!("{}: not a dynprobe thread trace (it does not start with DYNPTRC1)", dat.display())
        );
        f.write("10.0/11.dat", b"DYNPTRC1\x0a\0\0");
        assert_eq!(
            f.read_err(),
            format!("{}: corrupt record at byte 8: the header ends before its pid and tid", dat.display())
        );
        f.thread(10, 0, 11, &[rec(Kind::Entry, 1, 0, 0), Record { time: 2, word: 0x9 }]);
        assert_eq!(f.read_err(), format!("{}: corrupt record at byte 32: invalid record kind 9", dat.display()));
        // Marker hits: a site the process does not have, data without a hit, a hit whose
        // data records are not data, bad argument bytes.
        f.write("10.0/markers.txt", b"0\t1500\tapp\ttick\n");
        let hit = |hit: &mut MarkerRecords, site| hit.finish(2, 0, site).to_vec();
        f.thread(10, 0, 11, &hit(MarkerRecords::new().unsigned(1), 1));
        assert_eq!(
            f.read_err(),
            format!(
                "{}: corrupt record at byte 16: marker site id 1 out of range (the process has 1 marker sites)",
                dat.display()
            )
        );
        let records = hit(MarkerRecords::new().unsigned(1), 0);
        f.thread(10, 0, 11, &records[1..]);
        assert_eq!(
            f.read_err(),
            format!("{}: corrupt record at byte 16: marker data without its marker record", dat.display())
        );
        f.thread(10, 0, 11, &[records[0], rec(Kind::Entry, 3, 0, 0)]);
        assert_eq!(
            f.read_err(),
            format!(
                "{}: corrupt record at byte 16: marker hit with 1 data records: data record 1 of 1 is not marker data",
                dat.display()
            )
        );
        let mut bad = records.clone();
        bad[1].time = (bad[1].time & !0xff) | 0x2a;
        f.thread(10, 0, 11, &bad);
        assert_eq!(
            f.read_err(),
            format!(
                "{}: corrupt record at byte 16: marker hit with 1 data records: argument 1 has the unknown tag 42",
                dat.display()
            )
        );
        fs::remove_file(f.dir.path().join("10.0/markers.txt")).unwrap();
        f.thread(10, 0, 11, &[rec(Kind::Entry, 1, 0, 0), rec(Kind::Entry, 2, 1, 1), rec(Kind::Exit, 3, 1, 3)]);
        assert_eq!(
            f.read_err(),
            format!(
                "{}: corrupt record at byte 48: function id 3 out of range (the process has 3 functions)",
                dat.display()
            )
        );
        f.thread(10, 0, 11, &[]);
        f.thread(77, 0, 11, &[]);
        fs::rename(f.dir.path().join("77.0/11.dat"), &dat).unwrap();
        assert_eq!(
            f.read_err(),
            format!("{}: corrupt record at byte 8: pid 77 in the directory of process 10", dat.display())
        );
    }

    #[test]
    fn bad_companion_files_are_named_with_the_line() {
        let f = Fixture::new("trace-companions");
        f.write("10.0/sites.txt", b"exe\t/bin/demo\nkind\tmcount\t1\n");
        let sites = f.dir.path().join("10.0/sites.txt");
        assert!(
            f.read_err().starts_with(&format!("{}:2: \"kind\" is not one of", sites.display())),
            "{}",
            f.read_err()
        );
        f.write("10.0/sites.txt", b"");
        f.write("10.0/functions.txt", b"zero\t0\tm\tf\n");
        let functions = f.dir.path().join("10.0/functions.txt");
        assert_eq!(f.read_err(), format!("{}:1: function id \"zero\" is not a number", functions.display()));
    }

    #[test]
    fn image_names() {
        assert_eq!(parse_image_name("123.0"), Some((123, 0)));
        assert_eq!(parse_image_name("7.12"), Some((7, 12)));
        for bad in ["123", "123.", ".0", "a.0", "1.0.ring", "1.-1", "+1.0"] {
            assert_eq!(parse_image_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn functions_parse_in_order() {
        let path = Path::new("f.txt");
        let text = "0\t401000\tdemo\tmain\n1\t7f00aa\tlibc.so.6\tstd::vector<int>::push_back(int const&)\n";
        let functions = parse_functions(path, text).unwrap();
        assert_eq!(
            functions,
            [
                Function { name: "main".into(), module: "demo".into(), addr: 0x401000 },
                Function {
                    name: "std::vector<int>::push_back(int const&)".into(),
                    module: "libc.so.6".into(),
                    addr: 0x7f00aa
                },
            ]
        );
        let err = parse_functions(path, "0\t1\tm\ta\n2\t2\tm\tb\n").unwrap_err().to_string();
        assert_eq!(err, "f.txt:2: function id 2 where 1 was expected");
        let err = parse_functions(path, "0\t0x10\tm\ta\n").unwrap_err().to_string();
        assert_eq!(err, "f.txt:1: address \"0x10\" is not hexadecimal");
        let err = parse_functions(path, "0\t10\tm\n").unwrap_err().to_string();
        assert_eq!(err, "f.txt:1: expected id, address, module and name separated by tabs");
    }

    #[test]
    fn sites_parse_every_line_kind() {
        let path = Path::new("s.txt");
        let text = "exe\t/bin/demo\nparent\t41\nkind\tmcount\t10\t9\nkind\tentry\t3\t3\n\
                    refused\tmcount\t401200\tspin\tbranch\tinto the patched bytes\n";
        let sites = parse_sites(path, text).unwrap();
        assert_eq!(sites.exe, "/bin/demo");
        assert_eq!(sites.parent, 41);
        assert_eq!(sites.summary.kinds, [("mcount".into(), 10, 9), ("entry".into(), 3, 3)]);
        assert_eq!(
            sites.summary.refused,
            [RefusedSite {
                kind: "mcount".into(),
                addr: 0x401200,
                function: "spin".into(),
                reason: "branch\tinto the patched bytes".into()
            }]
        );
        let err = parse_sites(path, "exe\t/a\nwhat\tever\n").unwrap_err().to_string();
        assert!(err.starts_with("s.txt:2: \"what\" is not one of"), "{err}");
        let err = parse_sites(path, "kind\tmcount\tten\t9\n").unwrap_err().to_string();
        assert_eq!(err, "s.txt:1: found count \"ten\" is not a number");
    }
}
