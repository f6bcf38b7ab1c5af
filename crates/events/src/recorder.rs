//! The recorder: drains the ring files of the traced processes into a trace directory.
//!
//! The agent in each traced process image writes, in the *ring dir*, `<pid>.<n>.funcs` (its
//! functions, as `functions.txt` lists them), `<pid>.<n>.sites` (as `sites.txt`), and only
//! then `<pid>.<n>.ring` (a [`RingFile`]). The recorder, in the `dynprobe record` process,
//! finds the ring files as they appear, copies the companions into `<out>/<pid>.<n>/`, and
//! routes each ring's records to the `.dat` file of the thread they belong to (see
//! [`crate::trace`] for the layout). It keeps the rings drained while the program runs, so a
//! crash of the program loses nothing it had published, and rewrites `info.json` now and then,
//! so a crash of the recorder leaves a readable directory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::clock::{self, Calibration, Clock};
use crate::error::EventsError;
use crate::files;
use crate::record::{Kind, Record};
use crate::ring::RingFile;
use crate::trace::{self, Info, InfoProcess};

/// How often `info.json` is rewritten while recording, at most.
const INFO_EVERY: Duration = Duration::from_secs(1);
/// How far apart the two calibration samples of the first `info.json` are.
const FIRST_RATE_SPAN: Duration = Duration::from_millis(10);

/// Totals so far, for a progress line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordStats {
    /// Entry, exit and unwound records written.
    pub events: u64,
    /// Records the rings lost (full ring, or pushed by a signal handler during a push).
    pub lost: u64,
    /// Process images seen.
    pub processes: u64,
    /// Threads that wrote records.
    pub threads: u64,
    /// Bytes of `.dat` files written.
    pub bytes: u64,
    /// Calls the traced processes could not record at all (see `RingFile::count_missed`).
    pub missed: u64,
}

/// Records of a ring whose pages the recorder keeps present ahead of its thread (4 MiB), at
/// least: more when the thread writes faster than that in [`LOOK_GAP`] (see
/// `RingFile::populate`).
const POPULATE_AHEAD: u64 = 1 << 18;

/// The longest the recorder expects to go between two looks at a ring's pages: a poll whose
/// drain found little is followed by the next one after 20 ms (`dynprobe record`'s pace),
/// and the thread may speed up meanwhile. The pages kept present ahead of a thread cover
/// what it writes in this time at the pace it last went, so that it does not run into page
/// faults between two looks.
const LOOK_GAP: Duration = Duration::from_millis(50);

/// Records drained from a ring before its pages are looked at again (1 MiB): on a fast
/// thread's first lap, populating ahead of it must not wait for a drain of its whole
/// backlog (and the backlog's writing into the trace), which can take tens of
/// milliseconds while the thread runs past the populated pages into page faults.
const DRAIN_CHUNK: usize = 1 << 16;

/// What the recorder keeps of one ring between polls.
#[derive(Debug, Clone, Copy, Default)]
struct RingState {
    /// The thread of the last `Thread` record: the owner of the records that follow.
    tid: u32,
    /// The sum of the `Lost` records seen.
    lost_seen: u64,
    /// The ring's own count of lost records, last time it was read.
    lost_total: u64,
    /// The time of the last record seen.
    last_time: u64,
    /// Records of the ring whose pages this process made present (see
    /// `RingFile::populate`).
    populated: u64,
    /// The ring's head at the previous look at its pages, and when that was.
    written: u64,
    looked: Option<Instant>,
}

/// One process image.
struct Image {
    /// `<pid>.<n>`.
    name: String,
    pid: u32,
    n: u32,
    parent: u32,
    exe: String,
    /// `None` once the image is gone and drained.
    ring: Option<RingFile>,
    rings: Vec<RingState>,
    /// The threads that have a `.dat` file, with the bytes written into it.
    threads: BTreeMap<u32, u64>,
    /// Where its `.dat` files go.
    out: PathBuf,
    /// The ring file's count of missed calls, last time it was read.
    missed: u64,
    /// What its `.funcs` and `.sites` files were when last copied (see
    /// `companion_identity`).
    companions: (u64, u64),
}

/// Drains ring files into a trace directory; see the module documentation.
pub struct Recorder {
    ring_dir: PathBuf,
    out_dir: PathBuf,
    clock: Clock,
    info: Info,
    info_written: Instant,
    images: Vec<Image>,
    /// The ring files seen, open or not (so that a bad one is reported once).
    seen: HashSet<String>,
    events: u64,
    bytes: u64,
    scratch: Vec<Record>,
}

impl Recorder {
    /// A recorder of the ring files that will appear in `ring_dir` into the trace directory
    /// `out_dir` (created if needed; it should be empty), for the program `command`.
    ///
    /// Takes the first clock calibration samples (10 ms apart, so that even the first
    /// `info.json` converts times well) and writes a first `info.json`.
    pub fn new(ring_dir: &Path, out_dir: &Path, command: &[String]) -> Result<Recorder, EventsError> {
        if let Some(parent) = out_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(EventsError::io("create directory", parent))?;
        }
        files::ensure_dir(out_dir).map_err(EventsError::io("create directory", out_dir))?;
        let clock = Clock::detect();
        let start = clock::sample(clock);
        // A second sample a little later gives the rate to a few parts per million at once,
        // for a recorder killed before it takes the samples far apart.
        std::thread::sleep(FIRST_RATE_SPAN);
        let calibration = Calibration::start(clock, start).with_end(clock::sample(clock));
        let info = Info::new(command.to_vec(), start.1, calibration);
        let mut recorder = Recorder {
            ring_dir: ring_dir.to_owned(),
            out_dir: out_dir.to_owned(),
            clock,
            info,
            info_written: Instant::now(),
            images: Vec::new(),
            seen: HashSet::new(),
            events: 0,
            bytes: 0,
            scratch: Vec::new(),
        };
        recorder.write_info()?;
        Ok(recorder)
    }

    /// Opens the ring files that appeared since the last poll, drains every ring, appends the
    /// records to their threads' `.dat` files, and closes the images that are gone (their
    /// process died or `exec`ed).
    ///
    /// An error about one ring file (not a ring file, its companions unreadable) is returned
    /// once and that file is left alone afterwards: the caller may report it and go on
    /// polling.
    pub fn poll(&mut self) -> Result<RecordStats, EventsError> {
        self.poll_rings(false)?;
        self.info.clock = self.info.clock.with_end(clock::sample(self.clock));
        if self.info_written.elapsed() >= INFO_EVERY {
            self.write_info()?;
        }
        Ok(self.stats())
    }

    /// Ends the recording of a program that exited with `exit_code` (as a shell shows it):
    /// a last poll, the last calibration sample, the final `info.json`, and the ring dir's
    /// files removed (and the ring dir, if that leaves it empty).
    pub fn finish(mut self, exit_code: Option<i32>) -> Result<RecordStats, EventsError> {
        self.poll_rings(true)?;
        let end = clock::sample(self.clock);
        self.info.clock = self.info.clock.with_end(end);
        self.info.end_ns = Some(clock::monotonic_ns().max(end.1));
        self.info.exit_code = exit_code;
        self.write_info()?;
        for image in &self.images {
            for ext in ["ring", "funcs", "sites"] {
                let path = self.ring_dir.join(format!("{}.{ext}", image.name));
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(EventsError::io("remove", path)(e));
                    }
                    _ => {}
                }
            }
        }
        // Not empty means something else lives there: leave it.
        let _ = fs::remove_dir(&self.ring_dir);
        Ok(self.stats())
    }

    /// Totals so far.
    pub fn stats(&self) -> RecordStats {
        let lost = self.images.iter().flat_map(|i| &i.rings).map(|r| r.lost_total).sum();
        RecordStats {
            events: self.events,
            lost,
            processes: self.images.len() as u64,
            threads: self.images.iter().map(|i| i.threads.len() as u64).sum(),
            bytes: self.bytes,
            missed: self.images.iter().map(|i| i.missed).sum(),
        }
    }

    /// A poll; on the `last` one every image is closed, and ring files are taken even when
    /// their companions are missing.
    fn poll_rings(&mut self, last: bool) -> Result<(), EventsError> {
        let opened = self.open_new(last);
        let mut newest: HashMap<u32, u32> = HashMap::new();
        for image in &self.images {
            let n = newest.entry(image.pid).or_default();
            *n = (*n).max(image.n);
        }
        let mut result = Ok(());
        for i in 0..self.images.len() {
            let image = &self.images[i];
            if image.ring.is_none() {
                continue;
            }
            // Decided before the drain, so that the drain takes everything a dead process
            // wrote.
            let gone = last || newest[&image.pid] > image.n || !process_exists(image.pid);
            // The names before the records that need them.
            let refreshed = self.refresh_companions(i);
            let drained = refreshed.and_then(|()| self.drain_image(i, gone));
            if gone {
                let ring_path = self.ring_dir.join(format!("{}.ring", self.images[i].name));
                // Its memory is the big part: free it now, not at the end.
                let _ = fs::remove_file(ring_path);
                self.images[i].ring = None;
            }
            if result.is_ok() {
                result = drained;
            }
        }
        opened.and(result)
    }

    /// Opens the ring files of `ring_dir` not seen yet, whose companions are there (or all of
    /// them on the `last` poll).
    fn open_new(&mut self, last: bool) -> Result<(), EventsError> {
        let entries = match fs::read_dir(&self.ring_dir) {
            Ok(entries) => entries,
            // The agent has not made it yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(EventsError::io("read ring directory", &self.ring_dir)(e)),
        };
        let mut new = Vec::new();
        for entry in entries {
            let entry = entry.map_err(EventsError::io("read ring directory", &self.ring_dir))?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".ring")) else { continue };
            let Some((pid, n)) = trace::parse_image_name(name) else { continue };
            if !self.seen.contains(name) {
                new.push((pid, n, name.to_owned()));
            }
        }
        new.sort();
        let mut result = Ok(());
        for (pid, n, name) in new {
            let companions = ["funcs", "sites"].map(|ext| self.ring_dir.join(format!("{name}.{ext}")));
            if !last && !companions.iter().all(|p| p.exists()) {
                continue;
            }
            self.seen.insert(name.clone());
            match self.open_image(pid, n, &name) {
                Ok(image) => self.images.push(image),
                Err(e) if result.is_ok() => result = Err(e),
                Err(_) => {}
            }
        }
        result
    }

    fn open_image(&self, pid: u32, n: u32, name: &str) -> Result<Image, EventsError> {
        let ring = RingFile::open(&self.ring_dir.join(format!("{name}.ring")))?;
        if ring.clock() != self.clock {
            return Err(EventsError::BadRingFile {
                path: self.ring_dir.join(format!("{name}.ring")),
                what: format!(
                    "its times are in clock {:?}, the recorder's calibration is for {:?}",
                    ring.clock().name(),
                    self.clock.name()
                ),
            });
        }
        let out = self.out_dir.join(name);
        files::ensure_dir(&out).map_err(EventsError::io("create directory", &out))?;
        let mut exe = String::new();
        let mut parent = ring.parent_pid();
        // Missing only on the last poll: an agent that died before writing them.
        if let Some(text) = copy_companions(&self.ring_dir, name, &out)? {
            let sites = trace::parse_sites(&self.ring_dir.join(format!("{name}.sites")), &text)?;
            exe = sites.exe;
            parent = parent.max(sites.parent);
        }
        let rings = vec![RingState::default(); ring.rings()];
        Ok(Image {
            name: name.to_owned(),
            pid,
            n,
            parent,
            exe,
            ring: Some(ring),
            rings,
            threads: BTreeMap::new(),
            out,
            missed: 0,
            companions: companion_identity(&self.ring_dir, name),
        })
    }

    /// Copies image `i`'s function list and site summary again when the agent changed them
    /// (a library loaded later): a record of a new function must find its name.
    fn refresh_companions(&mut self, i: usize) -> Result<(), EventsError> {
        let image = &mut self.images[i];
        let lens = companion_identity(&self.ring_dir, &image.name);
        if lens == image.companions {
            return Ok(());
        }
        copy_companions(&self.ring_dir, &image.name, &image.out)?;
        image.companions = lens;
        Ok(())
    }

    /// Drains every used ring of image `i` into its threads' `.dat` files; when the image is
    /// `gone`, also writes the `Lost` records its rings never got to write.
    fn drain_image(&mut self, i: usize, gone: bool) -> Result<(), EventsError> {
        let image = &mut self.images[i];
        let Some(ring) = &image.ring else { return Ok(()) };
        let missed = ring.missed();
        let mut out: HashMap<u32, Vec<u8>> = HashMap::new();
        for (r, state) in image.rings.iter_mut().enumerate() {
            if !ring.in_use(r) {
                continue;
            }
            // Chunk by chunk, the pages the thread is about to fill made present ahead of it
            // before each: a fast thread writes on while its records are copied out.
            // At most a ring's worth per poll, as one drain took before: a thread writing
            // as fast as the drain goes must not hold the other rings and images waiting.
            let limit = if gone { usize::MAX } else { DRAIN_CHUNK };
            let mut budget = ring.capacity();
            loop {
                if !gone {
                    keep_ahead(ring, r, state);
                }
                self.scratch.clear();
                let drained = ring.drain_up_to(r, &mut self.scratch, limit.min(budget));
                budget -= drained;
                // Records go to their thread's file a run at a time: a fast program fills a
                // ring in milliseconds, and a lookup per record would make the drain fall
                // behind.
                let mut run_start = 0;
                for (k, rec) in self.scratch.iter().enumerate() {
                    match rec.kind() {
                        Some(Kind::Thread) => {
                            append(&mut out, state.tid, &self.scratch[run_start..k]);
                            run_start = k;
                            state.tid = rec.payload() as u32;
                        }
                        Some(Kind::Lost) => state.lost_seen += rec.payload(),
                        // Part of the marker hit before it, already counted.
                        Some(Kind::MarkerData) => {}
                        Some(_) => self.events += 1,
                        // Written by a program that scribbled over its ring: kept, for the
                        // reader to report where.
                        None => {}
                    }
                    state.last_time = rec.time;
                }
                append(&mut out, state.tid, &self.scratch[run_start..]);
                if drained < limit || budget == 0 {
                    break;
                }
                // Out before the next chunk, so that the next look at the pages follows soon.
                write_threads(&image.out, image.pid, &mut image.threads, &mut self.bytes, &mut out)?;
            }
            state.lost_total = ring.lost(r);
            // Losses at the very end of a ring have no record after them to carry their
            // `Lost` record: nothing is dropped silently, so write it for them.
            if gone && state.lost_total > state.lost_seen {
                let lost = Record::new(Kind::Lost, state.last_time, 0, state.lost_total - state.lost_seen);
                state.lost_seen = state.lost_total;
                out.entry(state.tid).or_default().extend_from_slice(&lost.to_bytes());
            }
        }
        image.missed = missed;
        write_threads(&image.out, image.pid, &mut image.threads, &mut self.bytes, &mut out)
    }

    /// Writes `info.json` whole under a temporary name and renames it, so that a reader (or a
    /// killed recorder) never sees half of one.
    fn write_info(&mut self) -> Result<(), EventsError> {
        self.info.processes = self
            .images
            .iter()
            .map(|i| InfoProcess {
                dir: i.name.clone(),
                pid: i.pid,
                parent: i.parent,
                exe: i.exe.clone(),
                threads: i.threads.clone(),
            })
            .collect();
        let path = self.out_dir.join("info.json");
        let tmp = self.out_dir.join("info.json.tmp");
        let mut json = serde_json::to_string_pretty(&self.info).expect("info serializes");
        json.push('\n');
        files::write_private(&tmp, json.as_bytes()).map_err(EventsError::io("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(EventsError::io("write", &path))?;
        self.info_written = Instant::now();
        Ok(())
    }
}

/// Whether process `pid` exists (a zombie does: it may still be drained).
fn process_exists(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        // kill would mean a process group (or fail): no process has such an id.
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists; it sends nothing.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Keeps the pages of records ring `r` of `ring` is about to get present ahead of its thread
/// (see [`POPULATE_AHEAD`]).
fn keep_ahead(ring: &RingFile, r: usize, state: &mut RingState) {
    let written = ring.written(r);
    let now = Instant::now();
    let span = state.looked.map(|then| now.duration_since(then));
    let ahead = populate_to(written, state.written, span);
    (state.written, state.looked) = (written, Some(now));
    if state.populated < ahead && state.populated < ring.capacity() as u64 {
        ring.populate(r, state.populated.max(written), ahead);
        state.populated = ahead;
    }
}

/// How far a ring's pages should be present: [`POPULATE_AHEAD`] records past its head
/// `written`, or what its thread writes in [`LOOK_GAP`] at the pace it went from `before`
/// over `span` (the time since the previous look, if any), when that is more.
fn populate_to(written: u64, before: u64, span: Option<Duration>) -> u64 {
    let pace = written.saturating_sub(before);
    // Over at least a millisecond: two looks a few microseconds apart say little of a pace.
    let span = span.unwrap_or(LOOK_GAP).max(Duration::from_millis(1));
    let in_gap = (u128::from(pace) * LOOK_GAP.as_nanos() / span.as_nanos()).min(u128::from(u64::MAX)) as u64;
    written.saturating_add(POPULATE_AHEAD.max(in_gap))
}

/// Appends each thread's bytes in `out` (emptied) to its `.dat` file in `dir`, the file's
/// header first when it is new; `threads` and `bytes` count what was written.
fn write_threads(
    dir: &Path,
    pid: u32,
    threads: &mut BTreeMap<u32, u64>,
    bytes: &mut u64,
    out: &mut HashMap<u32, Vec<u8>>,
) -> Result<(), EventsError> {
    for (tid, records) in out.drain() {
        let path = dir.join(format!("{tid}.dat"));
        let mut file = files::open_private(&path, true).map_err(EventsError::io("open", &path))?;
        let written = threads.entry(tid).or_insert(0);
        if *written == 0 {
            file.write_all(&trace::dat_header(pid, tid)).map_err(EventsError::io("write", &path))?;
            *written += trace::DAT_HEADER_BYTES as u64;
            *bytes += trace::DAT_HEADER_BYTES as u64;
        }
        file.write_all(&records).map_err(EventsError::io("write", &path))?;
        *written += records.len() as u64;
        *bytes += records.len() as u64;
    }
    Ok(())
}

/// Appends `records` as stored in a `.dat` file.
fn append(out: &mut HashMap<u32, Vec<u8>>, tid: u32, records: &[Record]) {
    if records.is_empty() {
        return;
    }
    let out = out.entry(tid).or_default();
    out.reserve(records.len() * 16);
    for rec in records {
        out.extend_from_slice(&rec.to_bytes());
    }
}

/// The largest companion file copied: a function list of a million functions is some
/// 100 MiB.
const COMPANION_LIMIT: usize = 256 << 20;

/// Copies image `name`'s function list and site summary from the ring directory into its
/// trace directory `out` (either may be missing); returns the summary's text, if any.
fn copy_companions(ring_dir: &Path, name: &str, out: &Path) -> Result<Option<String>, EventsError> {
    let mut sites = None;
    let companions =
        [("funcs", "functions.txt"), ("sites", "sites.txt"), ("markers", "markers.txt"), ("values", "values.txt")];
    for (ext, to) in companions {
        let from = ring_dir.join(format!("{name}.{ext}"));
        let to = out.join(to);
        // The ring directory may be another user's (`record -p` as root): what is there is
        // read only if it is a regular file of a sane size.
        let text = match files::read_regular(&from, COMPANION_LIMIT).and_then(|bytes| {
            String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        }) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(EventsError::io("read", &from)(e)),
        };
        files::write_private(&to, text.as_bytes()).map_err(EventsError::io("write", &to))?;
        if ext == "sites" {
            sites = Some(text);
        }
    }
    Ok(sites)
}

/// What tells whether image `name`'s companions changed: the function list's length (the
/// agent only appends to it) and the site summary's inode (the agent replaces it whole,
/// through a rename, often with the same length).
fn companion_identity(ring_dir: &Path, name: &str) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = |ext: &str| fs::metadata(ring_dir.join(format!("{name}.{ext}")));
    (meta("funcs").map_or(0, |m| m.len()), meta("sites").map_or(0, |m| m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EventKind, Trace};
    use crate::testutil::TempDir;

    const FUNCS: &str = "0\t401000\tdemo\tmain\n1\t401100\tdemo\tparse\n";
    const SITES: &str =
        "exe\t/bin/demo\nparent\t0\nkind\tmcount\t3\t2\nrefused\tmcount\t401200\tspin\tloops into its first bytes\n";

    /// What an agent makes for image `name` (`<pid>.<n>`) in `ring_dir`.
    fn agent_image(ring_dir: &Path, name: &str, capacity: usize) -> RingFile {
        fs::create_dir_all(ring_dir).unwrap();
        fs::write(ring_dir.join(format!("{name}.funcs")), FUNCS).unwrap();
        fs::write(ring_dir.join(format!("{name}.sites")), SITES).unwrap();
        RingFile::create(&ring_dir.join(format!("{name}.ring")), 4, capacity, Clock::detect()).unwrap()
    }

    fn gettid() -> u32 {
        // SAFETY: gettid cannot fail.
        unsafe { libc::gettid() as u32 }
    }

    /// Pushes a call of main calling parse into `ring` from a new thread; returns the thread's
    /// tid and the records it pushed.
    fn call_from_new_thread(file: &RingFile, ring: usize) -> (u32, Vec<Record>) {
        std::thread::scope(|s| {
            s.spawn(|| {
                let (tid, clock) = (gettid(), file.clock());
                let records: Vec<Record> =
                    [(Kind::Entry, 0, 0), (Kind::Entry, 1, 1), (Kind::Exit, 1, 1), (Kind::Exit, 0, 0)]
                        .into_iter()
                        .map(|(kind, depth, func)| {
                            let rec = Record::new(kind, clock.now(), depth, func);
                            file.push(ring, tid, rec);
                            rec
                        })
                        .collect();
                (tid, records)
            })
            .join()
            .unwrap()
        })
    }

    fn event_kind(kind: Kind) -> EventKind {
        match kind {
            Kind::Entry => EventKind::Entry,
            Kind::Exit => EventKind::Exit,
            other => panic!("no plain event for {other:?}"),
        }
    }

    /// Checks that `trace` has thread `tid` with exactly `records`, converted with the trace's
    /// calibration.
    fn assert_thread(trace: &Trace, tid: u32, records: &[Record]) {
        let info = trace::read_info(&trace.dir).unwrap();
        let thread = trace.processes[0].threads.iter().find(|t| t.tid == tid).expect("the thread is in the trace");
        let expected: Vec<_> = records
            .iter()
            .map(|r| crate::model::Event {
                ns: info.clock.to_ns(r.time),
                kind: event_kind(r.kind().unwrap()),
                depth: r.depth(),
                func: r.payload() as u32,
            })
            .collect();
        assert_eq!(thread.events, expected);
        assert_eq!(thread.lost, 0);
    }

    #[test]
    fn pages_are_kept_present_for_what_a_thread_writes_between_two_looks() {
        let ms = Duration::from_millis;
        // A slow thread, or the first look: the fixed margin.
        assert_eq!(populate_to(1000, 0, None), 1000 + POPULATE_AHEAD);
        assert_eq!(populate_to(1000, 900, Some(ms(10))), 1000 + POPULATE_AHEAD);
        // A fast one: what it writes in LOOK_GAP at its pace (1M records in 10 ms, 5M in 50).
        assert_eq!(populate_to(2_000_000, 1_000_000, Some(ms(10))), 2_000_000 + 5_000_000);
        // Looks microseconds apart are taken as a millisecond apart.
        assert_eq!(populate_to(100_000, 0, Some(Duration::from_micros(5))), 100_000 + 5_000_000);
        // A head that went back (a program that scribbled over it) is no pace.
        assert_eq!(populate_to(10, 1_000_000, Some(ms(1))), 10 + POPULATE_AHEAD);
    }

    #[test]
    fn a_backlog_longer_than_a_drain_chunk_is_drained_in_one_poll_in_order() {
        let tmp = TempDir::new("recorder-chunks");
        let (ring_dir, out_dir) = (tmp.path().join("rings"), tmp.path().join("trace"));
        let mut recorder = Recorder::new(&ring_dir, &out_dir, &["demo".to_owned()]).unwrap();
        let name = format!("{}.0", std::process::id());
        let file = agent_image(&ring_dir, &name, 1 << 18);
        let calls = DRAIN_CHUNK * 3 / 2;
        let (tid, records) = std::thread::scope(|s| {
            s.spawn(|| {
                let tid = gettid();
                let records: Vec<Record> = (0..calls)
                    .flat_map(|k| [(Kind::Entry, k), (Kind::Exit, k)])
                    .map(|(kind, k)| {
                        let rec = Record::new(kind, file.clock().now(), 0, (k % 2) as u64);
                        file.push(0, tid, rec);
                        rec
                    })
                    .collect();
                (tid, records)
            })
            .join()
            .unwrap()
        });
        let stats = recorder.poll().unwrap();
        assert_eq!(stats.events, 2 * calls as u64, "every record of the backlog, in one poll");
        drop(file);
        recorder.finish(Some(0)).unwrap();
        assert_thread(&trace::read(&out_dir).unwrap(), tid, &records);
    }

    #[test]
    fn records_of_two_threads_round_trip() {
        let tmp = TempDir::new("recorder-round-trip");
        let (ring_dir, out_dir) = (tmp.path().join("rings"), tmp.path().join("trace"));
        let command = vec!["demo".to_owned(), "--fast".to_owned()];
        let mut recorder = Recorder::new(&ring_dir, &out_dir, &command).unwrap();
        assert_eq!(recorder.poll().unwrap(), RecordStats::default(), "no ring dir yet is no error");

        let name = format!("{}.0", std::process::id());
        let file = agent_image(&ring_dir, &name, 64);
        let (tid_a, records_a) = call_from_new_thread(&file, 0);
        let (tid_b, records_b) = call_from_new_thread(&file, 1);
        let stats = recorder.poll().unwrap();
        assert_eq!((stats.events, stats.lost, stats.processes, stats.threads), (8, 0, 1, 2));
        // Ring 0 again, by a third thread: its records go to its own file.
        let (tid_c, records_c) = call_from_new_thread(&file, 0);
        let stats = recorder.finish(Some(3)).unwrap();
        assert_eq!((stats.events, stats.lost, stats.processes, stats.threads), (12, 0, 1, 3));
        // 3 headers, 12 events and 3 Thread records.
        assert_eq!(stats.bytes, 3 * 16 + 15 * 16);
        assert!(!ring_dir.exists(), "the ring dir is cleaned up");

        let trace = trace::read(&out_dir).unwrap();
        assert_eq!((trace.command.clone(), trace.exit_code), (command, Some(3)));
        assert_eq!(trace.processes.len(), 1);
        let process = &trace.processes[0];
        assert_eq!((process.pid, process.parent, process.exe.as_str()), (std::process::id(), 0, "/bin/demo"));
        assert_eq!(process.functions.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["main", "parse"]);
        assert_eq!(process.sites.kinds, [("mcount".to_owned(), 3, 2)]);
        assert_eq!(process.sites.refused[0].reason, "loops into its first bytes");
        assert_eq!(process.threads.iter().map(|t| t.tid).collect::<Vec<_>>(), [tid_a, tid_b, tid_c]);
        assert_thread(&trace, tid_a, &records_a);
        assert_thread(&trace, tid_b, &records_b);
        assert_thread(&trace, tid_c, &records_c);

        let times: Vec<u64> = process.threads.iter().flat_map(|t| &t.events).map(|e| e.ns).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "times in order across threads: {times:?}");
        assert!(trace.start_ns <= times[0] && times[times.len() - 1] <= trace.end_ns);

        // info.json says what each `.dat` holds (what tells a file cut short), and the whole
        // trace is its owner's only.
        use std::os::unix::fs::MetadataExt;
        let info = trace::read_info(&out_dir).unwrap();
        let image = out_dir.join(&name);
        for (tid, bytes) in &info.processes[0].threads {
            assert_eq!(fs::metadata(image.join(format!("{tid}.dat"))).unwrap().len(), *bytes, "thread {tid}");
        }
        assert_eq!(info.processes[0].threads.len(), 3);
        assert!(trace.damage.is_empty(), "{:?}", trace.damage);
        for path in [&out_dir, &image] {
            assert_eq!(fs::metadata(path).unwrap().mode() & 0o777, 0o700, "{}", path.display());
        }
        for entry in fs::read_dir(&image).unwrap().chain(fs::read_dir(&out_dir).unwrap()) {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                assert_eq!(entry.metadata().unwrap().mode() & 0o777, 0o600, "{}", entry.path().display());
            }
        }
    }

    #[test]
    fn losses_at_the_end_of_a_ring_get_their_record() {
        let tmp = TempDir::new("recorder-loss");
        let (ring_dir, out_dir) = (tmp.path().join("rings"), tmp.path().join("trace"));
        let mut recorder = Recorder::new(&ring_dir, &out_dir, &[]).unwrap();
        let file = agent_image(&ring_dir, &format!("{}.0", std::process::id()), 8);
        let tid = gettid();
        // The Thread record and 7 entries fit; 13 are lost with no record after them.
        for _ in 0..20 {
            file.push(2, tid, Record::new(Kind::Entry, file.clock().now(), 0, 1));
        }
        assert_eq!(recorder.poll().unwrap().lost, 13);
        let stats = recorder.finish(None).unwrap();
        assert_eq!((stats.events, stats.lost), (7, 13));

        let trace = trace::read(&out_dir).unwrap();
        let thread = &trace.processes[0].threads[0];
        assert_eq!((thread.tid, thread.events.len(), thread.lost), (tid, 8, 13));
        assert_eq!(thread.events[7].kind, EventKind::Lost(13));
        assert_eq!(thread.events[7].ns, thread.events[6].ns, "at the last record's time");
    }

    #[test]
    fn images_that_are_gone_are_drained_and_closed() {
        let tmp = TempDir::new("recorder-gone");
        let (ring_dir, out_dir) = (tmp.path().join("rings"), tmp.path().join("trace"));
        let mut recorder = Recorder::new(&ring_dir, &out_dir, &[]).unwrap();
        let me = std::process::id();
        // An image replaced by exec, a process that died, and the living image.
        let images = [format!("{me}.0"), "2147483000.0".to_owned(), format!("{me}.1")];
        let files: Vec<_> = images.iter().map(|name| agent_image(&ring_dir, name, 16)).collect();
        for file in &files {
            file.push(0, 7, Record::new(Kind::Entry, file.clock().now(), 0, 0));
        }
        // A ring file whose companions are not written yet is left for a later poll.
        let late = RingFile::create(&ring_dir.join(format!("{me}.2.ring")), 1, 2, Clock::detect()).unwrap();
        let stats = recorder.poll().unwrap();
        assert_eq!((stats.events, stats.processes), (3, 3));
        let exists = |name: &str| ring_dir.join(format!("{name}.ring")).exists();
        assert_eq!(images.iter().map(|n| exists(n)).collect::<Vec<_>>(), [false, false, true]);
        for name in &images {
            assert!(out_dir.join(name).join("7.dat").exists(), "{name}");
        }
        drop(late);
        let stats = recorder.finish(Some(0)).unwrap();
        assert_eq!(stats.processes, 4, "the last poll takes the ring file without companions too");
        let trace = trace::read(&out_dir).unwrap();
        assert_eq!(trace.processes.len(), 4);
        assert_eq!(trace.processes[3].pid, me, "no events: last");
        assert!(trace.processes[3].functions.is_empty());
    }

    #[test]
    fn a_killed_recorder_leaves_a_readable_trace() {
        let tmp = TempDir::new("recorder-killed");
        let (ring_dir, out_dir) = (tmp.path().join("rings"), tmp.path().join("trace"));
        let mut recorder = Recorder::new(&ring_dir, &out_dir, &["x".to_owned()]).unwrap();
        let file = agent_image(&ring_dir, &format!("{}.0", std::process::id()), 16);
        let (tid, records) = call_from_new_thread(&file, 3);
        recorder.poll().unwrap();
        // Killed: no finish, and the last info.json is the first one.
        drop(recorder);
        let trace = trace::read(&out_dir).unwrap();
        assert_eq!((trace.exit_code, trace.command.as_slice()), (None, ["x".to_owned()].as_slice()));
        assert_thread(&trace, tid, &records);
        let last = trace.processes[0].threads[0].events[3].ns;
        assert_eq!(trace.end_ns, last, "the last event stands for the end");
        // The first calibration already has a rate: the times are close to the real ones.
        let info = trace::read_info(&out_dir).unwrap();
        assert!(info.clock.t1 > info.clock.t0);
        assert!(last.abs_diff(clock::monotonic_ns()) < 1_000_000_000);
    }
}
