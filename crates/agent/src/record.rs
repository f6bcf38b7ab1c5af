//! Record mode (`dynprobe record`): trace the selected functions of this process image into
//! a ring file the recorder drains.
//!
//! In the ring directory (`DYNPROBE_RECORD`) each process image gets a name `<pid>.<n>`
//! (`n` counts the images of one pid: an `exec` starts a new one) and three files, made in
//! this order so that the recorder, which opens `*.ring` files only, finds the other two
//! complete:
//!
//! ```text
//! <pid>.<n>.funcs     id \t address (hex) \t module \t name      one line per traced function
//! <pid>.<n>.markers   id \t address (hex) \t provider \t name    the marker sites of -M
//! <pid>.<n>.sites     exe, parent, per-kind found/patched counts, refused sites with reasons
//! <pid>.<n>.ring      the ring file (made as `.pending`, renamed once the sites are written)
//! ```
//!
//! With `-M` patterns (`DYNPROBE_MARKERS`), the hits of those markers go into the rings too,
//! beside the calls (see `crate::marker`); the markers file is written only then.
//!
//! The environment stays set, so a program this one `exec`s is traced too (its agent makes
//! the next image). A forked child gets its own ring file from a `pthread_atfork` handler,
//! shares the parent's function list (a hard link) and records its own threads.

use crate::channel::Channel;
use crate::line::PathText;
use crate::marker::RecordedMarkers;
use crate::values::Values;
use dynprobe_events::clock::Clock;
use dynprobe_events::ending;
use dynprobe_events::files;
use dynprobe_events::model::SiteSummary;
use dynprobe_events::ring::RingFile;
use dynprobe_events::ring::UNTRACED_CHILD;
use dynprobe_ftrace::{Filter, FtraceError, Recording, Selection, TracedFunction, Tracer};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};

/// The ring directory; its presence selects record mode.
pub const RECORD_ENV: &str = "DYNPROBE_RECORD";
/// `-F`/`-N` patterns, `F <pattern>` or `N <pattern>` a line.
pub const FILTER_ENV: &str = "DYNPROBE_FILTER";
/// The deepest call recorded.
pub const DEPTH_ENV: &str = "DYNPROBE_DEPTH";
/// `-M` patterns, `provider:name` a line (either part may be `*`).
pub const MARKERS_ENV: &str = "DYNPROBE_MARKERS";
/// Records per thread ring (a power of two).
pub const RING_RECORDS_ENV: &str = "DYNPROBE_RING_RECORDS";

/// Default records per thread ring: 16 MiB each, in a sparse file where only the pages a
/// thread fills cost memory. A thread calling a trivial traced function in a tight loop
/// makes ~25 M records a second, faster than the recorder drains them; rings this size
/// absorb bursts of a fraction of a second (losses beyond are counted and reported).
const DEFAULT_RING_RECORDS: usize = 1 << 20;
/// Most images one pid can have (exec after exec).
const MAX_IMAGES: u32 = 1000;

/// Starts recording. With a `channel` (the first image, started by `dynprobe record`) an
/// error is reported on it and ends the process before `main`; without one (an image this
/// program `exec`ed) the image runs untraced and says why on stderr.
pub fn start(ring_dir: &str, channel: Option<Channel>) {
    // The agent's own calls (the C library's, when it is traced) are not the program's.
    dynprobe_probe::set_current_thread_traced(false);
    let first = channel.is_some();
    let dir = Path::new(ring_dir);
    // What an image exec'd during the recording says names its process by its start time
    // (`dynprobe_events::ending`): without it, it says nothing and patches nothing.
    let me = ending::Process::this().map_err(|e| format!("cannot read its own start time: {e}"));
    let started = Settings::from_env().map_err(NotTraced::from).and_then(|settings| {
        if !first {
            announce(dir, me.clone()?)?;
        }
        try_start(dir, first, false, &settings)
    });
    let started = started.map(|started| {
        let patched = started.patched;
        match (first, &me) {
            (false, Ok(me)) => started.keep_while_recording(*me),
            _ => started.keep(),
        }
        patched
    });
    dynprobe_probe::set_current_thread_traced(true);
    match started {
        Ok(patched) => {
            if let Some(channel) = channel {
                channel.send(format!("!ready {patched}\n").as_bytes());
            }
        }
        Err(refused) => {
            let message = refused.message.replace('\n', " ");
            match channel {
                Some(channel) => {
                    channel.send(format!("!error {message}\n").as_bytes());
                    // SAFETY: _exit ends the process before main ran: the user asked for a
                    // trace, not for an untraced run.
                    unsafe { libc::_exit(crate::EXIT_NOT_RUN) };
                }
                None => {
                    // Another program this one ran: patterns meant for the first rarely
                    // match it, and one run after the recording ended is not recorded,
                    // which is no news. Nothing was patched: its code is its own.
                    if !refused.no_news {
                        eprintln!("dynprobe agent: this program is not traced: {message}");
                    }
                    if let Ok(me) = &me {
                        let _ = ending::write_word(dir, *me, Ok(()));
                    }
                }
            }
        }
    }
}

/// Says in ring directory `dir` that this process, `me`, runs an image `exec`'d during the
/// recording, before anything is patched (`dynprobe_events::ending`): until its recording
/// thread runs, this says that the process is an image, which gives its word, and not a
/// child another image forked, whose code the CLI would overwrite. An image that could not
/// say so, or finds the recording over once it has (its `exec` under way as the recording
/// ended), patches nothing: the CLI looks for images once it has ended the recording, and
/// need not have seen this one.
fn announce(dir: &Path, me: ending::Process) -> Result<(), NotTraced> {
    // For tests: an image whose `exec` was under way as the recording ended, announcing
    // itself once the CLI has looked for images.
    // Bounded: set by hand, it only delays this image's start.
    if std::env::var_os("DYNPROBE_TEST_ANNOUNCE_AFTER_THE_END").is_some() {
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while ending::still_recording(dir) && std::time::Instant::now() < give_up {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let announced = ending::announce(dir, me);
    if !ending::still_recording(dir) {
        return Err(NotTraced { no_news: true, message: "the recording is over".into() });
    }
    announced.map_err(|e| NotTraced::from(format!("cannot say in {} that it records: {e}", dir.display())))
}

/// A recording of a process that was already running (`dynprobe record -p`, through the
/// `attach` module), which ends with the session: [`Attached::end`].
pub(crate) struct Attached {
    tracer: Arc<Mutex<Option<Tracer>>>,
    watch: Option<crate::dlopen::ModuleWatch>,
    markers: Option<dynprobe::MarkerHandle>,
    /// Sites patched at the start.
    pub(crate) patched: u64,
    /// The calls found in flight at the start, or why none could be looked for.
    pub(crate) in_flight: Result<dynprobe_ftrace::InFlight, String>,
    /// Whether the session's `exec`s carry the agent and its settings (until its end).
    carrying: bool,
}

/// Starts recording this running process into the ring directory `dir`, as `settings`
/// say: the message is the `!error` text when nothing could start (nothing is left then).
pub(crate) fn attach(dir: &Path, settings: &Settings) -> Result<Attached, String> {
    let started = try_start(dir, true, true, settings).map_err(|e| e.message)?;
    let patched = started.patched;
    // A child forked during the session gets its own ring file (see `in_child`).
    remember_for_fork(&started.dir, &started.funcs, started.markers_path.as_deref(), &started.exe);
    let tracer = Arc::new(Mutex::new(Some(started.tracer)));
    let watch = match started.libraries {
        Some(libraries) => match libraries.watch(Arc::clone(&tracer)) {
            Ok(watch) => Some(watch),
            Err(e) => {
                let in_flight = Ok(Default::default());
                let mut attached =
                    Attached { tracer, watch: None, markers: started.markers, patched, in_flight, carrying: false };
                let _ = attached.end_tracing();
                return Err(format!("cannot watch for libraries loaded later: {e}"));
            }
        },
        None => None,
    };
    let _ = dynprobe_probe::wait_for_optimizer();
    // Every site is live now (the entry probes jumps): the calls in flight are taken up and
    // the recording starts, in one stop of the threads.
    let in_flight = tracer.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(Tracer::adopt_in_flight);
    let in_flight = in_flight.unwrap_or(Ok(Default::default()));
    let carrying = carry_session_into_exec(&started.dir, settings);
    Ok(Attached { tracer, watch, markers: started.markers, patched, in_flight, carrying })
}

/// Makes every `exec` of the process (and of the children it forks) during the session
/// carry the agent and the session's settings, as a program `dynprobe record` started
/// carries its own (`crate::carry_environment`): the new image is recorded into the same
/// ring directory, as an `exec`'d image of a started program is. Until [`Attached::end`].
/// `false` when nothing could be carried (the agent's path unknown, the `execve` guard not
/// in place, or a carried environment already there): the `exec`s then run untraced.
fn carry_session_into_exec(dir: &Path, settings: &Settings) -> bool {
    if !dynprobe_probe::signal_guards_placed() || dynprobe_probe::guard_failure().is_some() {
        return false;
    }
    let Some(agent) = crate::own_path() else { return false };
    let mut entries = vec![(b"LD_PRELOAD".as_slice(), agent.to_vec())];
    entries.push((RECORD_ENV.as_bytes(), dir.as_os_str().as_encoded_bytes().to_vec()));
    entries.extend(settings.environment.iter().map(|(name, value)| (name.as_bytes(), value.clone().into_bytes())));
    let entries: Option<Vec<std::ffi::CString>> =
        entries.into_iter().map(|(name, value)| std::ffi::CString::new([name, b"=", &value].concat()).ok()).collect();
    match (entries, std::ffi::CString::new(agent)) {
        (Some(entries), Ok(agent)) => {
            // A child forked during the session keeps what is carried: the recording file's
            // removal at the end of the recording ends it there too.
            let live = dir.join(ending::RECORDING_FILE);
            let alive_while = std::ffi::CString::new(live.as_os_str().as_encoded_bytes()).ok();
            dynprobe_probe::carry_into_exec(entries, agent, alive_while)
        }
        _ => false,
    }
}

impl Attached {
    /// Ends the recording: the `dlopen` watch and the marker handlers go, every patched site
    /// gets its bytes back, and nothing more is recorded (calls in flight return to their
    /// callers through the return trampoline, unrecorded). `Err` says what could not be
    /// restored.
    pub(crate) fn end(mut self) -> Result<(), String> {
        if self.carrying {
            // An image exec'd from now on is not the session's: it runs untraced.
            dynprobe_probe::stop_carrying_into_exec();
        }
        if let Some(watch) = self.watch.take() {
            watch.stop();
        }
        self.end_tracing()
    }

    fn end_tracing(&mut self) -> Result<(), String> {
        let mut problems = Vec::new();
        if let Some(markers) = self.markers.take() {
            if let Err(e) = markers.detach() {
                problems.push(format!("a marker site: {e}"));
            }
        }
        let tracer = self.tracer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Err(e)) = tracer.map(Tracer::end) {
            problems.push(e.to_string());
        }
        forget_fork_paths();
        match problems.is_empty() {
            true => Ok(()),
            false => Err(problems.join("; ")),
        }
    }
}

/// What `dynprobe record` asked for: from the environment of a program it starts, or from
/// the attach message of `record -p`.
pub(crate) struct Settings {
    filter: Filter,
    /// The deepest call recorded.
    depth: usize,
    /// Records per thread ring.
    records: usize,
    /// `-M` patterns, `provider:name` a line.
    markers: String,
    /// With `record -a`: the `args` file describing the calls' values (see `crate::values`).
    values: Option<PathBuf>,
    /// The settings as the variables of a started program's environment (`DYNPROBE_FILTER`
    /// …), for the images an attach session `exec`s.
    environment: Vec<(&'static str, String)>,
}

impl Settings {
    fn from_env() -> Result<Settings, String> {
        let var = |name| std::env::var(name).ok();
        let settings = Settings::new(
            &var(FILTER_ENV).unwrap_or_default(),
            var(DEPTH_ENV),
            var(RING_RECORDS_ENV),
            var(MARKERS_ENV),
        );
        settings.map(|s| Settings { values: var(crate::values::ARGS_ENV).map(PathBuf::from), ..s })
    }

    /// The settings of an attach message's lines: `F <glob>` / `N <glob>` (the filter, in
    /// order), `depth <n>`, `ring-records <n>`, `marker <provider:name>`, `args <path>`.
    pub(crate) fn from_lines<'a>(lines: impl Iterator<Item = &'a str>) -> Result<Settings, String> {
        let (mut filter, mut depth, mut records, mut markers) = (Vec::new(), None, None, Vec::new());
        let mut values = None;
        for line in lines {
            match line.split_once(' ') {
                Some(("args", path)) => values = Some(PathBuf::from(path)),
                Some(("F" | "N", _)) => filter.push(line),
                Some(("depth", n)) => depth = Some(n.to_string()),
                Some(("ring-records", n)) => records = Some(n.to_string()),
                Some(("marker", m)) => markers.push(m),
                _ => return Err(format!("unknown record setting `{line}`")),
            }
        }
        let mut settings = Settings::new(&filter.join("\n"), depth, records, Some(markers.join("\n")))?;
        // An image the session `exec`s reads the same description (it names the program it
        // describes: another program gets none), as an `exec`'d image of a started program.
        if let Some(path) = &values {
            settings.environment.push((crate::values::ARGS_ENV, path.to_string_lossy().into_owned()));
        }
        Ok(Settings { values, ..settings })
    }

    fn new(
        filter: &str,
        depth: Option<String>,
        records: Option<String>,
        markers: Option<String>,
    ) -> Result<Settings, String> {
        let environment =
            [(FILTER_ENV, Some(filter)), (DEPTH_ENV, depth.as_deref()), (RING_RECORDS_ENV, records.as_deref())]
                .into_iter()
                .chain([(MARKERS_ENV, markers.as_deref())])
                .filter_map(|(name, value)| Some((name, value.filter(|v| !v.is_empty())?.to_string())))
                .collect();
        let filter = Filter::from_lines(filter)?;
        let depth = match depth {
            Some(v) => v.parse::<usize>().map_err(|_| format!("{DEPTH_ENV}={v} is not a number"))?,
            None => usize::MAX,
        };
        let records = match records {
            Some(v) => v.parse::<usize>().map_err(|_| format!("{RING_RECORDS_ENV}={v} is not a number"))?,
            None => DEFAULT_RING_RECORDS,
        };
        Ok(Settings { filter, depth, records, markers: markers.unwrap_or_default(), values: None, environment })
    }
}

/// Why an image is not traced.
struct NotTraced {
    message: String,
    /// Nothing a user needs to hear of an image `exec`'d during the recording: an `-F`
    /// pattern matched none of its functions, or the recording was over when it started.
    no_news: bool,
}

impl From<String> for NotTraced {
    fn from(message: String) -> Self {
        NotTraced { message, no_news: false }
    }
}

/// A recording that started: what a started program keeps for its life
/// ([`Started::keep`]) and an attach session until its end.
struct Started {
    tracer: Tracer,
    /// The ring directory.
    dir: PathBuf,
    patched: u64,
    funcs: PathBuf,
    markers_path: Option<PathBuf>,
    markers: Option<dynprobe::MarkerHandle>,
    exe: PathBuf,
    /// When patterns name libraries: what the `dlopen` watch needs.
    libraries: Option<Libraries>,
}

impl Started {
    /// Keeps recording for the rest of the process's life: forked children get their own
    /// ring files, libraries `dlopen`ed later are traced too.
    fn keep(self) {
        remember_for_fork(&self.dir, &self.funcs, self.markers_path.as_deref(), &self.exe);
        // Recording lasts as long as the process, as the tracer's own probes do.
        std::mem::forget(self.markers);
        let (tracer, watch) = shared_and_watched(self.tracer, self.libraries);
        if let Some(watch) = watch {
            watch.keep();
        }
        // Tracing lasts as long as the process: no path may drop the tracer and unregister
        // the program's probes.
        std::mem::forget(tracer);
        // Every probe placed so far (the watcher's on `dlopen` too) becomes a jump before
        // `main`, while this is the only thread: a program that blocks every signal later
        // could not be stopped for it, and a breakpoint hit with SIGTRAP blocked kills.
        let _ = dynprobe_probe::wait_for_optimizer();
    }
}

impl Started {
    /// Keeps recording an image `exec`'d during a recording for as long as that recording
    /// lasts, then ends it as an attach session's ends ([`Attached::end`]: every patched site
    /// restored, nothing recorded, no child forked afterwards recorded): a process that
    /// outlives the recording (`dynprobe record -p` detached from it) runs on untraced. The
    /// recording lasts as long as its ring directory's recording file, which the CLI removes
    /// at its end (the `exec`s carried from this image stop then too: see
    /// `carry_environment`); the image then says whether it restored its code
    /// (`dynprobe_events::ending`).
    fn keep_while_recording(self, me: ending::Process) {
        remember_for_fork(&self.dir, &self.funcs, self.markers_path.as_deref(), &self.exe);
        let (tracer, watch) = shared_and_watched(self.tracer, self.libraries);
        // As in `keep`: every probe becomes a jump while this is the only thread.
        let _ = dynprobe_probe::wait_for_optimizer();
        let in_flight = Ok(Default::default());
        let attached =
            Attached { tracer, watch, markers: self.markers, patched: self.patched, in_flight, carrying: false };
        let attached = Arc::new(Mutex::new(Some(attached)));
        let ends = Arc::clone(&attached);
        let dir = self.dir;
        let word_dir = dir.clone();
        // For tests: the window in which this image has patched its code but has no thread
        // yet to show what it is (the CLI knows it from its announcement).
        if let Some(ms) = std::env::var("DYNPROBE_TEST_PAUSE_BEFORE_IMAGE_THREAD_MS").ok().and_then(|v| v.parse().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let spawned = dynprobe_probe::own_thread::spawn(c"dynprobe-record", move || {
            // The CLI waits for the word while this thread lives (`dynprobe_events::ending`).
            let _ = ending::say_recording_thread(&dir, me, dynprobe::fetch::gettid());
            while ending::still_recording(&dir) {
                std::thread::sleep(RECORDING_POLL);
            }
            let Some(attached) = ends.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
            let ended = attached.end();
            match &ended {
                Err(e) => eprintln!("dynprobe agent: the recording ended, but {e}"),
                Ok(()) => {
                    // Nothing of the recording runs any more, as at an attach session's end
                    // (the agent stays loaded: the loader preloaded it).
                    dynprobe::stop_optimizer();
                    if dynprobe::release_all().is_ok() {
                        Tracer::free_ended();
                    }
                }
            }
            // The word the CLI waits for before it gives the children this image forked its
            // code (gone with the directory if the CLI is: then nobody waits).
            let _ = ending::write_word(&dir, me, ended.as_ref().map(|_| ()).map_err(String::as_str));
        });
        match spawned {
            Ok(thread) => thread.keep(),
            // Without the watch the image records for its life, as a started program does,
            // and says so: the CLI waits for its word.
            Err(e) => {
                std::mem::forget(attached.lock().unwrap_or_else(|e| e.into_inner()).take());
                let why = format!("its agent could not start the thread that ends its recording: {e}");
                let _ = ending::write_word(&word_dir, me, Err(&why));
            }
        }
    }
}

/// `tracer`, shared with the `dlopen` watch that adds the libraries loaded later to it (no
/// watch when no pattern names a library, or when it cannot be started: said, and the
/// recording goes on without them).
fn shared_and_watched(
    tracer: Tracer,
    libraries: Option<Libraries>,
) -> (Arc<Mutex<Option<Tracer>>>, Option<crate::dlopen::ModuleWatch>) {
    let tracer = Arc::new(Mutex::new(Some(tracer)));
    let watch = libraries.and_then(|libraries| {
        libraries
            .watch(Arc::clone(&tracer))
            .map_err(|e| eprintln!("dynprobe agent: libraries loaded later will not be traced: {e}"))
            .ok()
    });
    (tracer, watch)
}

/// How often an `exec`'d image looks whether its recording is over.
const RECORDING_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Selects, writes the function list, starts the tracer, writes the summary and publishes
/// the ring file. The first image (and an attach session) refuses `-M` patterns that name
/// no marker; an image it `exec`s records the markers it has of them. An `attached`
/// session's tracer records nothing until [`Tracer::adopt_in_flight`].
fn try_start(dir: &Path, first: bool, attached: bool, settings: &Settings) -> Result<Started, NotTraced> {
    let filter = &settings.filter;
    let table = dynprobe_symbols::SymbolTable::current_process().map_err(|e| e.to_string())?;
    let selection = Selection::new(&table, filter)
        .map_err(|e| NotTraced { no_news: matches!(e, FtraceError::NoMatch { .. }), message: e.to_string() })?;
    let markers = match RecordedMarkers::find(&settings.markers) {
        Ok(markers) => markers,
        Err(e) if first => return Err(e.into()),
        Err(_) => RecordedMarkers::default(),
    };

    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() };
    let (base, funcs) = claim_image(dir, pid, &function_list(&selection.functions))?;
    let path = |ext: &str| PathBuf::from(format!("{}.{ext}", base.display()));
    let pending = path("pending");
    let watch = !selection.pending.is_empty() || filter.include.iter().any(|p| p.module.is_some());
    // Libraries `dlopen`ed later are told from these; the probe layer places the entry
    // probes with the same table rather than reading every module's symbols again.
    let known = watch.then(|| Selection::module_paths(&table));
    let values = call_values(settings, &table, &selection.functions).inspect_err(|_| {
        let _ = std::fs::remove_file(&funcs);
    })?;
    dynprobe_probe::adopt_symbols(table);
    let ring = RingFile::create(&pending, dynprobe_probe::MAX_THREADS, settings.records, Clock::detect())
        .map_err(|e| format!("cannot create the ring file {}: {e}", pending.display()))?;
    let markers_path = (!markers.is_empty()).then(|| path("markers"));
    // With `record -a`: which functions' calls carry values, before the ring is published.
    let values = match values {
        Some((values, list)) => {
            write_file(&path("values"), &list).inspect_err(|_| {
                let _ = std::fs::remove_file(&funcs);
            })?;
            Some((values, path("values")))
        }
        None => None,
    };
    let values_listed = values.is_some();
    let calls = values.as_ref().map(|(v, _)| Box::new(v.clone()) as Box<dyn dynprobe_ftrace::CallValues>);
    let recording = if attached { Recording::AfterAdoption } else { Recording::Now };
    let started = Tracer::start_with_values(selection, ring, Clock::detect(), settings.depth, calls, recording)
        .map_err(|e| e.to_string())
        .and_then(|tracer| {
            let Some(markers_path) = &markers_path else { return Ok((tracer, None)) };
            let attached = write_file(markers_path, &markers.list()).and_then(|()| markers.attach());
            match attached {
                Ok(handle) => Ok((tracer, Some(handle))),
                Err(e) => {
                    let _ = tracer.end();
                    Err(e)
                }
            }
        });
    let (tracer, marker_handle) = match started {
        Ok(started) => started,
        Err(e) => {
            let values_path = values_listed.then(|| path("values"));
            for file in
                [Some(&pending), Some(&funcs), markers_path.as_ref(), values_path.as_ref()].into_iter().flatten()
            {
                let _ = std::fs::remove_file(file);
            }
            return Err(e.into());
        }
    };
    let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
    let sites = site_list(&exe, tracer.summary());
    let published = write_file(&path("sites"), &sites).and_then(|()| {
        std::fs::rename(&pending, path("ring"))
            .map_err(|e| format!("cannot publish the ring file {}: {e}", pending.display()))
    });
    if let Err(e) = published {
        // Nothing is left recording (an attach session goes on without it).
        if let Some(handle) = marker_handle {
            let _ = handle.detach();
        }
        let _ = tracer.end();
        return Err(e.into());
    }
    let patched = tracer.summary().kinds.iter().map(|(_, _, patched)| patched).sum();
    let libraries = known.map(|known| Libraries {
        filter: filter.clone(),
        known,
        funcs: funcs.clone(),
        sites: path("sites"),
        exe: exe.clone(),
        values,
    });
    Ok(Started { tracer, dir: dir.to_path_buf(), patched, funcs, markers_path, markers: marker_handle, exe, libraries })
}

/// With `record -a`: the values the calls of `functions` carry, from the `args` file the
/// settings name (see `crate::values`), and the lines of the `.values` companion.
fn call_values(
    settings: &Settings,
    table: &dynprobe_symbols::SymbolTable,
    functions: &[TracedFunction],
) -> Result<Option<(Values, String)>, String> {
    let Some(path) = &settings.values else { return Ok(None) };
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let values = Values::new(&text)?;
    let list = values.describe(functions, table.modules());
    Ok(Some((values, list)))
}

/// Takes the first free `<pid>.<n>` by creating its `.funcs` file (exclusively) with
/// `content`; returns `dir/<pid>.<n>` and the `.funcs` path.
fn claim_image(dir: &Path, pid: i32, content: &str) -> Result<(PathBuf, PathBuf), String> {
    use std::io::Write;
    for n in 0..MAX_IMAGES {
        let base = dir.join(format!("{pid}.{n}"));
        let funcs = dir.join(format!("{pid}.{n}.funcs"));
        // Owner-only, as every file of the trace (the ring directory is too).
        match files::create_private(&funcs) {
            Ok(mut file) => {
                file.write_all(content.as_bytes())
                    .map_err(|e| format!("cannot write the function list {}: {e}", funcs.display()))?;
                return Ok((base, funcs));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot write into the ring directory {}: {e}", dir.display())),
        }
    }
    Err(format!("more than {MAX_IMAGES} images of process {pid} in {}", dir.display()))
}

fn write_file(path: &Path, content: &str) -> Result<(), String> {
    files::write_private(path, content.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The `.funcs` lines of `functions`.
pub(crate) fn function_list(functions: &[TracedFunction]) -> String {
    let mut out = String::new();
    for f in functions {
        let _ = writeln!(out, "{}\t{:x}\t{}\t{}", f.id, f.addr, field(&f.module), field(&f.name));
    }
    out
}

/// The `.sites` content of an image this process started (a forked child's is written by
/// [`in_child`]).
pub(crate) fn site_list(exe: &Path, summary: &SiteSummary) -> String {
    let mut out = format!("exe\t{}\nparent\t0\n", field(&exe.to_string_lossy()));
    if let Some(ns) = summary.patch_ns {
        let _ = writeln!(out, "patch_ns\t{ns}");
    }
    for pattern in &summary.pending {
        let _ = writeln!(out, "pending\t{}", field(pattern));
    }
    for (kind, found, patched) in &summary.kinds {
        let _ = writeln!(out, "kind\t{kind}\t{found}\t{patched}");
    }
    for r in &summary.refused {
        let _ = writeln!(out, "refused\t{}\t{:x}\t{}\t{}", r.kind, r.addr, field(&r.function), field(&r.reason));
    }
    out
}

/// A field without the separators of the line formats.
fn field(text: &str) -> String {
    text.replace(['\t', '\n'], " ")
}

/// What a forked child needs to start its own image, prepared while allocation is allowed.
struct ForkPaths {
    dir: PathText,
    funcs: PathText,
    /// The `.markers` file, with `-M`: a child's hits have the same sites.
    markers: Option<PathText>,
    exe: PathText,
}

/// The current recording's [`ForkPaths`] (a leaked `Box`), or null when there is none: a
/// child forked then is not recorded. Replaced only by this process's threads outside fork
/// handlers; read, and changed, by the fork child handler, in a child that has a single
/// thread and its own copy of the memory.
static FORK: AtomicPtr<ForkPaths> = AtomicPtr::new(std::ptr::null_mut());

fn remember_for_fork(dir: &Path, funcs: &Path, markers: Option<&Path>, exe: &Path) {
    let text = |p: &Path| {
        let mut t = PathText::new();
        t.bytes(p.as_os_str().as_encoded_bytes());
        t
    };
    let paths = ForkPaths { dir: text(dir), funcs: text(funcs), markers: markers.map(text), exe: text(exe) };
    set_fork_paths(Box::into_raw(Box::new(paths)));
    // The handlers are registered once per load of this library (an attach session after
    // another finds them there); dlclose unregisters them (glibc's __cxa_finalize).
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    if !REGISTERED.swap(true, Ordering::Relaxed) {
        // SAFETY: registers plain functions; pthread_atfork copies the pointers.
        unsafe { libc::pthread_atfork(Some(before_fork), Some(in_parent), Some(in_child)) };
    }
}

/// The end of an attach session's recording: a child forked from now on is not recorded.
fn forget_fork_paths() {
    set_fork_paths(std::ptr::null_mut());
}

fn set_fork_paths(paths: *mut ForkPaths) {
    let old = FORK.swap(paths, Ordering::AcqRel);
    if !old.is_null() {
        // SAFETY: a Box leaked by `remember_for_fork` and just taken out of FORK. Only a fork
        // child's handler uses it otherwise, on the child's own copy of the memory.
        drop(unsafe { Box::from_raw(old) });
    }
}

/// The `pthread_atfork` prepare handler: this thread's records wait until the fork is
/// over (see `Tracer::fork_prepare`).
extern "C" fn before_fork() {
    Tracer::fork_prepare();
}

/// The `pthread_atfork` parent handler.
extern "C" fn in_parent() {
    Tracer::fork_done();
}

/// The `pthread_atfork` child handler: the child gets image `<pid>.<n>` with the parent's
/// function list (a hard link), a site list naming its parent, and a fresh ring file mapped
/// where the parent's was. System calls only, no allocation: the parent may have forked
/// while another of its threads held the allocator's lock.
extern "C" fn in_child() {
    give_child_its_ring();
    // From here on the child's records go to its own ring (or nowhere, detached).
    Tracer::fork_done();
}

fn give_child_its_ring() {
    let Some(ring) = Tracer::ring() else { return };
    // SAFETY: this thread is the child's only one, and the memory the child's own (see FORK).
    let Some(paths) = (unsafe { FORK.load(Ordering::Acquire).as_mut() }) else {
        // Recording, but not for children (an attach session's end is under way): the
        // child must not write into its parent's rings.
        ring.detach_in_child();
        return;
    };
    // The process it was forked from is the ring's, still the parent's file here: not
    // getppid(), which says 1 (or a subreaper) once a parent that forked and exited at once
    // (a daemon's way, a shell's `( … ) &`) has gone, and the child's line of forks would
    // then end nowhere.
    // SAFETY: getpid and getppid cannot fail.
    let (pid, ppid) = unsafe { (libc::getpid() as u64, libc::getppid() as u32) };
    let ppid = match ring.pid() {
        0 => ppid,
        forker => forker,
    };
    let dir = &paths.dir;
    let name = |n: u32, ext: &[u8]| {
        let mut t = PathText::new();
        t.bytes(dir.as_bytes()).byte(b'/').dec(pid).byte(b'.').dec(u64::from(n)).byte(b'.').bytes(ext);
        t
    };
    for n in 0..MAX_IMAGES {
        let mut funcs = name(n, b"funcs");
        let (Some(from), Some(to)) = (paths.funcs.c_str(), funcs.c_str()) else { break };
        // SAFETY: both are NUL-terminated paths on the stack.
        if unsafe { libc::link(from.as_ptr(), to.as_ptr()) } != 0 {
            // SAFETY: reading this thread's errno.
            match unsafe { *libc::__errno_location() } {
                libc::EEXIST => continue,
                // The recording is over and its files are gone (the program `record`
                // started has ended, and the directory with it): the child is not recorded,
                // and nothing need be said of it on the program's stderr.
                libc::ENOENT => {
                    ring.detach_in_child();
                    return;
                }
                _ => break,
            }
        }
        if let Some(markers) = &mut paths.markers {
            let mut link = name(n, b"markers");
            if let (Some(from), Some(to)) = (markers.c_str(), link.c_str()) {
                // SAFETY: both are NUL-terminated paths on the stack. A failure leaves the
                // child's marker hits without names, which the reader reports.
                unsafe { libc::link(from.as_ptr(), to.as_ptr()) };
            }
            *markers = link;
        }
        let mut sites = PathText::new();
        sites.bytes(b"exe\t").bytes(paths.exe.as_bytes()).bytes(b"\nparent\t").dec(u64::from(ppid)).byte(b'\n');
        if let Some(path) = name(n, b"sites").c_str() {
            write_small_file(path, sites.as_bytes());
        }
        if let Some(path) = name(n, b"ring").c_str() {
            if let Err(errno) = ring.reopen_in_child(path, ppid) {
                detach_untraced(ring, dir, errno);
            }
        }
        paths.funcs = funcs;
        return;
    }
    // No image of its own (its files could not be made: a program that dropped its
    // privileges before it forked cannot write into the session's directory): the child must
    // not write into its parent's rings.
    // SAFETY: reading this thread's errno, which the failed `link` set.
    detach_untraced(ring, dir, unsafe { *libc::__errno_location() });
}

/// Detaches a forked child that cannot be traced (`errno`: why) from its parent's rings,
/// onto memory named as [`UNTRACED_CHILD`] says, for the CLI to find at its end. The child
/// says nothing itself: its standard error is the program's, not dynprobe's (a daemon's
/// log, a client's socket). System calls only.
fn detach_untraced(ring: &dynprobe_events::ring::RingFile, dir: &PathText, errno: i32) {
    let mut name = PathText::new();
    name.bytes(UNTRACED_CHILD.as_bytes()).byte(b' ').dec(errno.unsigned_abs() as u64).byte(b' ').bytes(dir.as_bytes());
    match name.c_str() {
        Some(name) => ring.detach_in_child_named(name),
        None => ring.detach_in_child(),
    }
}

/// Creates `path` with `content`, with system calls only.
fn write_small_file(path: &std::ffi::CStr, content: &[u8]) {
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd =
        unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC, 0o600) };
    if fd >= 0 {
        // SAFETY: `content` is a live slice; `fd` is ours.
        unsafe {
            libc::write(fd, content.as_ptr().cast(), content.len());
            libc::close(fd);
        }
    }
}

/// What tracing the libraries `dlopen`ed later that the patterns match needs.
struct Libraries {
    filter: Filter,
    /// The modules seen so far.
    known: HashSet<PathBuf>,
    funcs: PathBuf,
    sites: PathBuf,
    exe: PathBuf,
    /// With `record -a`: the calls' values, and their `.values` companion.
    values: Option<(Values, PathBuf)>,
}

impl Libraries {
    /// Starts the `dlopen` watch that adds the new libraries' functions to `tracer` (while
    /// it is there: an ended recording's is taken).
    fn watch(mut self, tracer: Arc<Mutex<Option<Tracer>>>) -> Result<crate::dlopen::ModuleWatch, String> {
        crate::dlopen::watch(move || {
            let mut tracer = tracer.lock().unwrap_or_else(|e| e.into_inner());
            let Some(tracer) = tracer.as_mut() else { return };
            let Libraries { filter, known, funcs, sites, exe, values } = &mut self;
            if let Err(e) = add_new_modules(tracer, filter, known, funcs, sites, exe, values.as_ref()) {
                eprintln!("dynprobe agent: a library loaded later is not traced: {e}");
            }
        })
    }
}

/// Forgets the modules unloaded since the last look, then chooses the functions of modules
/// not seen before (or loaded again) and traces them.
fn add_new_modules(
    tracer: &mut Tracer,
    filter: &Filter,
    known: &mut HashSet<PathBuf>,
    funcs: &Path,
    sites: &Path,
    exe: &Path,
    values: Option<&(Values, PathBuf)>,
) -> Result<(), String> {
    // Most dlopens load nothing new (a library already there, a reference count bumped):
    // seen in the memory map alone, before any symbol table is built.
    let paths = dynprobe_symbols::loaded_code_paths().map_err(|e| e.to_string())?;
    // A library `dlclose` unloaded: its sites are forgotten (their code is gone), and its
    // next load is a new one, traced again.
    if known.iter().any(|p| !paths.contains(p)) {
        tracer.forget_unloaded();
        known.retain(|p| paths.contains(p));
    }
    if paths.iter().all(|p| known.contains(p)) {
        return Ok(());
    }
    let table = dynprobe_symbols::SymbolTable::current_process().map_err(|e| e.to_string())?;
    let first_id = tracer.functions().len() as u32;
    let mut selection = Selection::new_modules(&table, filter, known, first_id).map_err(|e| e.to_string())?;
    selection.pending = Selection::pending_patterns(&table, filter);
    *known = Selection::module_paths(&table);
    if selection.functions.is_empty() {
        return Ok(());
    }
    // Their values (`record -a`) are set before their sites are armed: the first call
    // carries them. The companion is extended before the function list, which the
    // recorder watches to copy both.
    if let Some((values, path)) = values {
        let list = values.describe(&selection.functions, table.modules());
        append(path, &list)?;
    }
    // The names first: a record of a new function must never come before its name.
    let lines = function_list(&selection.functions);
    append(funcs, &lines)?;
    tracer.add(selection).map_err(|e| e.to_string())?;
    let tmp = sites.with_extension("sites.tmp");
    files::write_private(&tmp, site_list(exe, tracer.summary()).as_bytes())
        .and_then(|()| std::fs::rename(&tmp, sites))
        .map_err(|e| format!("cannot update {}: {e}", sites.display()))
}

/// Appends `lines` to the file at `path`.
fn append(path: &Path, lines: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(lines.as_bytes()))
        .map_err(|e| format!("cannot extend {}: {e}", path.display()))
}
