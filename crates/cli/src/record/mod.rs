//! `dynprobe record`: run a program with the agent preloaded in recording mode and drain
//! its per-thread rings into a trace directory, like `uftrace record`.
//!
//! The agent finds and patches the selected functions' entries before `main` (`!ready
//! <sites>` on the event pipe, or `!error <message>` and no `main` at all), then every
//! entry and exit goes into a ring in shared memory under the ring directory; a
//! [`dynprobe_events::recorder::Recorder`] on a thread of ours drains them every 20 ms
//! ([`progress`]). At the end: the site summary and what was recorded ([`summary`]).
//!
//! `record -p PID` records a process that is already running: the agent is loaded into it
//! as for `probe -p` (the same attach, session and unload code, `crate::probe::attach`),
//! told to record instead of probing, and the same recorder drains the rings until Ctrl-C,
//! `--duration` or the process's exit; then every patched site gets its bytes back.

mod children;
mod progress;
mod summary;
mod values;

use crate::probe::output::Hit;
use crate::probe::session::{self, Hits, Placement};
use crate::probe::{agent_path, cannot_run, exit_code, warn_not_loaded};
use crate::EXIT_ERROR;
use clap::ArgMatches;
use dynprobe_events::ending;
use dynprobe_events::files::{self, PrivateDir};
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Arguments of `dynprobe record`.
#[derive(clap::Args)]
pub struct RecordArgs {
    /// Trace the functions matching GLOB (`*`, `?`; `MODULE:GLOB` for a shared library's,
    /// as in `libc:malloc`). Repeatable; without -F, every function of the executable.
    #[arg(short = 'F', long = "filter", value_name = "GLOB")]
    filters: Vec<String>,
    /// Do not trace the functions matching GLOB. Repeatable; -F and -N apply in the order given.
    #[arg(short = 'N', long = "notrace", value_name = "GLOB")]
    notrace: Vec<String>,
    /// Record the hits of the static markers PROVIDER:NAME (either part may be `*`, as in
    /// `app:*`) with their arguments, beside the function calls. Repeatable; an unknown
    /// marker stops the program before `main` (`dynprobe list-markers PROG` lists them).
    #[arg(short = 'M', long = "marker", value_name = "PROVIDER:NAME")]
    markers: Vec<String>,
    /// Record calls only down to this depth (1 = the outermost traced calls only).
    #[arg(short = 'D', long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    depth: Option<u16>,
    /// The trace directory to write; an older trace there is renamed to DIR.old.
    #[arg(short = 'o', long = "output", value_name = "DIR", default_value = crate::trace::DEFAULT_DIR)]
    dir: PathBuf,
    /// Records per thread's ring buffer: a power of two, at least 16. Larger rings lose
    /// fewer events when the program calls faster than dynprobe drains.
    #[arg(long, value_name = "RECORDS")]
    buffer_size: Option<u64>,
    /// Record each traced function's arguments at its entry and its return value at its exit,
    /// typed from the program's DWARF (uftrace's -a): `replay` shows
    /// `parse_record(line="alpha,12", len=8) { ... } = 12`. A shared library's functions
    /// get theirs from the library's own DWARF when a `-F LIB:GLOB` names the library (not
    /// `-F '*:…'`) and it is loaded at start-up. Functions without DWARF, and those of a
    /// library opened later with dlopen, are recorded as without -a.
    #[arg(short = 'a', long = "args")]
    args: bool,
    /// With -a: record these arguments of the functions matching FUNC (a glob) instead of
    /// the DWARF's, as a probe spec writes fields: `-A 'parse_record@line=+0($arg1):string
    /// len=$arg2:s32'`. Repeatable; the last matching wins.
    #[arg(short = 'A', long = "argument", value_name = "FUNC@FIELDS", requires = "args")]
    argument: Vec<String>,
    /// With -a: record this return value of the functions matching FUNC instead of the
    /// DWARF's: `-R 'parse_record@$retval:x32'`. Repeatable; the last matching wins.
    #[arg(short = 'R', long = "retval", value_name = "FUNC@FETCH", requires = "args")]
    retval: Vec<String>,
    /// Patch plain function entries with breakpoint probes only (no jump optimization).
    #[arg(long)]
    no_optimize: bool,
    /// Record the running process PID instead of starting one: until Ctrl-C, --duration or
    /// its exit; then every patched byte is restored and the process goes on.
    #[arg(short = 'p', long = "pid", value_name = "PID", conflicts_with = "command")]
    pid: Option<i32>,
    /// With -p: detach after this long (`10s`, `500ms`; a bare number is seconds).
    #[arg(long, value_name = "TIME", requires = "pid")]
    duration: Option<String>,
    /// The program to run and its arguments, after `--`.
    #[arg(last = true, value_name = "PROG")]
    command: Vec<OsString>,
}

/// Runs `dynprobe record`; `matches` are the subcommand's, for the order of -F and -N.
pub fn run(args: &RecordArgs, matches: &ArgMatches) -> ExitCode {
    match record(args, matches) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("dynprobe: {message}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn record(args: &RecordArgs, matches: &ArgMatches) -> Result<ExitCode, String> {
    if let Some(pid) = args.pid {
        return record_attached(args, matches, pid);
    }
    let Some(program) = args.command.first() else {
        return Err("no program to run; give it after `--`, as in `dynprobe record -- ./prog`".into());
    };
    if let Some(size) = args.buffer_size {
        check_buffer_size(size)?;
    }
    let filter = filter_lines(args, matches)?;
    let markers = marker_lines(&args.markers)?;
    let overrides = values::Overrides::parse(&args.argument, &args.retval)?;
    let agent = agent_path()?;
    let mut out = OutputDir::prepare(&args.dir)?;
    let rings = ring_dir(&args.dir).inspect_err(|_| out.restore())?;
    let mut env = vec![("DYNPROBE_RECORD", OsString::from(rings.path()))];
    if !filter.is_empty() {
        env.push(("DYNPROBE_FILTER", OsString::from(&filter)));
    }
    if let Some(depth) = args.depth {
        env.push(("DYNPROBE_DEPTH", depth.to_string().into()));
    }
    if !markers.is_empty() {
        env.push(("DYNPROBE_MARKERS", markers.into()));
    }
    if let Some(size) = args.buffer_size {
        env.push(("DYNPROBE_RING_RECORDS", size.to_string().into()));
    }
    if args.no_optimize {
        env.push(("DYNPROBE_OPTIMIZE", "0".into()));
    }
    if args.args {
        let program = crate::probe::source::program_path(program).unwrap_or_else(|| PathBuf::from(program));
        if let Some(path) = describe_values(&program, &filter, &overrides, rings.path(), &args.dir) {
            env.push(("DYNPROBE_ARGS", path.into()));
        }
    }
    let command: Vec<String> = args.command.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let recording = progress::Recording::start(rings.path(), &args.dir, &command)
        .map_err(|e| format!("cannot start recording: {e}"))?;
    let outcome = session::run(&args.command, &agent, &env, &mut UnexpectedHits);
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(err) => {
            recording.abandon();
            out.restore();
            return Err(cannot_run(program, &err));
        }
    };
    if let Placement::Refused(message) = &outcome.placement {
        recording.abandon();
        out.restore();
        return Err(format!("{message}; the program was not run"));
    }
    // The program has ended; the images it `exec`'d in processes that outlive it end their
    // recording now, and the children they forked get their code back.
    end_images(rings.path(), &agent_file_name(&agent));
    let stats = recording.finish(Some(i32::from(session::exit_code(outcome.status))))?;
    drop(rings);
    if outcome.placement == Placement::Silent {
        warn_not_loaded(program, "nothing was recorded");
    }
    summary::print(&args.dir, &stats);
    Ok(exit_code(program, outcome.status))
}

/// `dynprobe record -p PID`: attaches, records until the session ends, detaches, and
/// completes the trace (its exit code is unknown: the process goes on, or was not ours).
fn record_attached(args: &RecordArgs, matches: &ArgMatches, pid: i32) -> Result<ExitCode, String> {
    let started = std::time::Instant::now();
    if args.no_optimize {
        return Err("--no-optimize is for a program record starts: an attached process's threads run on while \
                    sites are patched, and a breakpoint there could meet a thread that blocks SIGTRAP"
            .into());
    }
    let duration = args.duration.as_deref().map(crate::probe::parse_duration).transpose()?;
    if let Some(size) = args.buffer_size {
        check_buffer_size(size)?;
    }
    let filter = filter_lines(args, matches)?;
    let markers = marker_lines(&args.markers)?;
    let overrides = values::Overrides::parse(&args.argument, &args.retval)?;
    let agent = agent_path()?;
    let command = attached_command(pid)?;
    let mut out = OutputDir::prepare(&args.dir)?;
    let rings = ring_dir(&args.dir).and_then(|rings| give_to_owner_of(pid, rings)).inspect_err(|_| out.restore())?;
    let mut lines = vec![format!("record {}", rings.path().display())];
    lines.extend(filter.lines().map(str::to_string));
    lines.extend(args.depth.map(|depth| format!("depth {depth}")));
    lines.extend(args.buffer_size.map(|size| format!("ring-records {size}")));
    lines.extend(markers.lines().map(|marker| format!("marker {marker}")));
    if args.args {
        let program = PathBuf::from(format!("/proc/{pid}/exe"));
        if let Some(path) = describe_values(&program, &filter, &overrides, rings.path(), &args.dir) {
            lines.push(format!("args {}", path.display()));
        }
    }
    // Blocked before the recorder's thread starts, which inherits the mask: the session
    // takes Ctrl-C from its signalfd (and detaches); the default action on a thread that
    // did not block it would kill this process mid-session.
    crate::probe::attach::mask_ending_signals(libc::SIG_BLOCK);
    let recording = progress::Recording::start(rings.path(), &args.dir, &command)
        .map_err(|e| format!("cannot start recording: {e}"))?;
    let request = crate::probe::attach::Request {
        pid,
        specs: &[],
        optimize: true,
        duration,
        agent: &agent,
        started,
        ptrace: false,
        record: Some(&lines),
    };
    let format = crate::probe::output::Format::new(false, dynprobe::monotonic_ns());
    let session = crate::probe::attach::run(&request, crate::probe::output::Outbox::stdout(), format);
    // The children forked meanwhile inherited the patched code; the process has its own
    // back now, they get the same (see `children`).
    let agent_name = agent_file_name(&agent);
    for child in children::restore_forked(pid, &agent_name, rings.path()) {
        match child.result {
            Ok(0) => {}
            Ok(runs) => eprintln!(
                "dynprobe: process {} (forked during the session): its code restored as {pid}'s ({runs} patched \
                 range(s))",
                child.pid
            ),
            Err(why) => eprintln!(
                "dynprobe: warning: process {} (forked during the session) keeps patched code: {why}",
                child.pid
            ),
        }
    }
    end_images(rings.path(), &agent_name);
    // Whatever reached the rings is kept, also after a session that ended badly (its
    // message says what is left in the process).
    let stats = match recording.finish(None) {
        Ok(stats) => stats,
        Err(e) if session.is_err() => {
            out.restore();
            return session.map(|()| ExitCode::SUCCESS).map_err(|s| format!("{s} ({e})"));
        }
        Err(e) => return Err(e),
    };
    // The words are read and the rings drained: the directory can go.
    drop(rings);
    if stats.events == 0 && session.is_err() {
        out.restore();
        return session.map(|()| ExitCode::SUCCESS);
    }
    summary::print(&args.dir, &stats);
    session.map(|()| ExitCode::SUCCESS)
}

/// Ends the recording of every image `exec`'d during it — in a process `record -p` attached
/// to or in one the started program forked — and restores the code of the children they
/// forked, which have no thread to do it (see `children`); says what could not be. The
/// recording file's removal ends it: each image restores its own sites and says so. The
/// children are looked for once they all have (none forked meanwhile is missed), and get
/// their image's bytes only if it restored them. All of this before the recorder's last
/// drain: the images and their children record until then, and what they recorded is
/// drained and counted like the rest. The children of a process that has ended (the program
/// itself, when its children outlive it) get what dynprobe patched back from their files,
/// first while the recording goes on, so that a child forked meanwhile is found too.
fn end_images(rings: &Path, agent_name: &str) {
    // For tests: the window in which an image exec'd during the session still records.
    pause_for_tests("DYNPROBE_TEST_PAUSE_BEFORE_IMAGES_END_MS", "before the images' recording ends");
    // While the recording goes on: a child such a process forks meanwhile makes its files,
    // and is found by the next look (one forked once the recording file is gone makes none).
    let mut restored = Vec::new();
    restore_children_of_ended(rings, agent_name, &mut restored);
    let _ = fs::remove_file(rings.join(ending::RECORDING_FILE));
    let images = children::images_ended(rings);
    for image in &images {
        if let children::Ended::Kept(why) = &image.ended {
            eprintln!(
                "dynprobe: warning: process {} (an image exec'd during the session) keeps patched code: {why}",
                image.pid
            );
        }
    }
    let forked_by_images = children::forked_by_images(agent_name, rings, &images);
    for child in children::restore_forked_by_images(&forked_by_images, &images, agent_name, rings) {
        let image = forked_by_images.iter().find(|f| f.pid == child.pid).map_or(0, |f| f.image);
        match child.result {
            Ok(0) => {}
            Ok(runs) => eprintln!(
                "dynprobe: process {} (forked during the session by {image}, an image exec'd during it): its code \
                 restored as {image}'s ({runs} patched range(s))",
                child.pid
            ),
            Err(why) => eprintln!(
                "dynprobe: warning: process {} (forked during the session by {image}, an image exec'd during it) \
                 keeps patched code: {why}",
                child.pid
            ),
        }
    }
    // Those of images that ended meanwhile.
    restore_children_of_ended(rings, agent_name, &mut restored);
    restore_untraced(rings, agent_name);
    // For tests: the window in which an image whose `exec` was under way as the recording
    // ended announces itself after the images were looked for, the ring directory still there.
    pause_for_tests("DYNPROBE_TEST_PAUSE_AFTER_IMAGES_END_MS", "after the images' recording ended");
}

/// Gives the processes forked from one that has ended — the program `record` started, which
/// forked them and exited (a daemon's way), or an image that did — the bytes dynprobe
/// patched, from their files (no process holds their code restored any more), and says so;
/// looks again while it finds new ones (a child forks while its parent is being restored),
/// a few times at most. `done`: the pids already restored.
fn restore_children_of_ended(rings: &Path, agent_name: &str, done: &mut Vec<i32>) {
    for _ in 0..3 {
        let found: Vec<(i32, i32)> =
            children::forked_from_ended(agent_name, rings).into_iter().filter(|(pid, _)| !done.contains(pid)).collect();
        if found.is_empty() {
            return;
        }
        for (pid, from) in found {
            done.push(pid);
            match children::restore_from_files(pid, agent_name, rings) {
                Ok(0) => {}
                Ok(runs) => eprintln!(
                    "dynprobe: process {pid} (forked during the session from {from}, which has ended): its code \
                     restored from its files ({runs} patched range(s))"
                ),
                Err(why) => eprintln!(
                    "dynprobe: warning: process {pid} (forked during the session from {from}, which has ended) keeps \
                     patched code: {why}"
                ),
            }
        }
    }
}

/// Gives the children forked during the session that could not be traced (their trace
/// files could not be made) the bytes dynprobe patched, from their files, and says why they
/// were not traced: they say nothing themselves, their standard error being the program's.
fn restore_untraced(rings: &Path, agent_name: &str) {
    for (pid, errno) in children::untraced(agent_name, rings) {
        let why = std::io::Error::from_raw_os_error(errno);
        let hint = match errno {
            libc::EACCES | libc::EPERM => " (a program that dropped its privileges before it forked)",
            _ => "",
        };
        let what = format!(
            "process {pid} (forked during the session) was not traced: its trace files could not be made ({why}){hint}"
        );
        match children::restore_from_files(pid, agent_name, rings) {
            Ok(0) => eprintln!("dynprobe: {what}"),
            Ok(runs) => eprintln!("dynprobe: {what}; its code restored from its files ({runs} patched range(s))"),
            Err(e) => eprintln!("dynprobe: warning: {what}, and it keeps patched code: {e}"),
        }
    }
}

/// For tests: says so and pauses `what` for the milliseconds in variable `name`, if set.
fn pause_for_tests(name: &str, what: &str) {
    if let Some(ms) = std::env::var(name).ok().and_then(|v| v.parse().ok()) {
        eprintln!("dynprobe: (test) pausing {what}");
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// The agent library's file name, as the maps of a process that loaded it show it.
fn agent_file_name(agent: &Path) -> String {
    agent.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// With `-a`: describes the values of `program`'s calls into the ring directory (for the
/// agent) and the trace directory (for replay); returns the agent's copy. Without DWARF the
/// program is recorded as without -a, and a warning says why.
fn describe_values(
    program: &Path,
    filter: &str,
    overrides: &values::Overrides,
    rings: &Path,
    trace: &Path,
) -> Option<PathBuf> {
    let written = values::write_args(program, filter, overrides, &[rings, trace]).and_then(|_| {
        // The agent runs as the process's user, who owns the ring directory (`record -p` of
        // another user's process): its copy is theirs too.
        let path = rings.join(values::ARGS_FILE);
        let owner = fs::metadata(rings).map_err(|e| format!("cannot read {}: {e}", rings.display()))?.uid();
        std::os::unix::fs::chown(&path, Some(owner), None)
            .map_err(|e| format!("cannot give {} to uid {owner}: {e}", path.display()))?;
        Ok(path)
    });
    match written {
        Ok(path) => Some(path),
        Err(e) => {
            eprintln!("dynprobe: -a: no argument is recorded: {e}");
            None
        }
    }
}

/// What the trace names as its command: the process's command line (proc(5)).
fn attached_command(pid: i32) -> Result<Vec<String>, String> {
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(bytes) => Ok(bytes
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!("no process with pid {pid}")),
        Err(e) => Err(format!("cannot read /proc/{pid}/cmdline: {e}")),
    }
}

/// As root recording another user's process, gives the ring directory to that user: the
/// agent, which runs as the process's user, makes its files there. Nobody else can enter
/// it either way (mode 0700).
fn give_to_owner_of(pid: i32, rings: PrivateDir) -> Result<PrivateDir, String> {
    let owner = fs::metadata(format!("/proc/{pid}")).map_err(|_| format!("no process with pid {pid}"))?.uid();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 && owner != 0 {
        std::os::unix::fs::chown(rings.path(), Some(owner), None)
            .map_err(|e| format!("cannot give the ring directory to uid {owner}: {e}"))?;
    }
    Ok(rings)
}

/// The agent's `DYNPROBE_FILTER`: one `F <glob>` or `N <glob>` line per flag, in the order
/// they were given.
fn filter_lines(args: &RecordArgs, matches: &ArgMatches) -> Result<String, String> {
    let mut lines: Vec<(usize, String)> = Vec::new();
    for (id, letter, globs) in [("filters", 'F', &args.filters), ("notrace", 'N', &args.notrace)] {
        let indices = matches.indices_of(id).into_iter().flatten();
        for (index, glob) in indices.zip(globs) {
            if glob.is_empty() || glob.contains('\n') {
                return Err(format!("bad -{letter} glob {glob:?}: it must be one line, not empty"));
            }
            lines.push((index, format!("{letter} {glob}")));
        }
    }
    lines.sort();
    Ok(lines.into_iter().map(|(_, line)| line).collect::<Vec<_>>().join("\n"))
}

/// The agent's `DYNPROBE_MARKERS`: one `provider:name` a line, each checked here as the
/// probe grammar checks an `m:` spec's marker (a bad one is named with its column).
fn marker_lines(markers: &[String]) -> Result<String, String> {
    for marker in markers {
        if marker.is_empty() || marker.contains(char::is_whitespace) {
            return Err(format!("bad -M marker `{marker}`: write PROVIDER:NAME, without spaces"));
        }
        dynprobe::spec::ProbeSpec::parse(&format!("m {marker}")).map_err(|e| {
            // The column in what the user wrote, not in the spec made of it.
            format!("bad -M marker `{marker}`: {} at column {}", e.message, e.column.saturating_sub(2).max(1))
        })?;
    }
    Ok(markers.join("\n"))
}

/// The agent's ring layout needs a power of two (index masks) and room for a few records.
fn check_buffer_size(records: u64) -> Result<(), String> {
    if records >= 16 && records.is_power_of_two() && records <= u32::MAX as u64 {
        Ok(())
    } else {
        Err(format!(
            "--buffer-size {records}: the records per ring must be a power of two from 16 to 2^31 \
             (as in --buffer-size 65536)"
        ))
    }
}

/// The agent's hit lines are `dynprobe probe`'s; in recording mode there are none.
struct UnexpectedHits;

impl Hits for UnexpectedHits {
    fn hit(&mut self, hit: &Hit) {
        eprintln!("dynprobe: unexpected probe hit from the agent while recording: {} {}", hit.tid, hit.event);
    }
}

/// The trace directory, and what was there before.
struct OutputDir {
    dir: PathBuf,
    /// Where an older trace in `dir` was moved.
    old: Option<PathBuf>,
    /// Whether `dir` existed (empty) before.
    existed: bool,
}

impl OutputDir {
    /// Makes `dir` an empty directory only its owner can enter (mode 0700, as `perf record`
    /// makes `perf.data` 0600: a trace holds the program's data): an older trace there moves
    /// to `DIR.old` (replacing an older `.old`), like `uftrace record`; an empty directory
    /// of the user's is used (and made 0700 when it is theirs); anything else that is not
    /// empty stays and is an error.
    fn prepare(dir: &Path) -> Result<OutputDir, String> {
        let shown = dir.display();
        let mut out = OutputDir { dir: dir.to_path_buf(), old: None, existed: false };
        match fs::symlink_metadata(dir) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(format!("cannot use `{shown}` for the trace: {err}")),
            Ok(meta) if !meta.is_dir() => {
                return Err(format!("`{shown}` exists and is not a directory; choose another with -o DIR"))
            }
            Ok(_) if dir.join("info.json").exists() => {
                let mut old = dir.as_os_str().to_os_string();
                old.push(".old");
                let old = PathBuf::from(old);
                if old.exists() {
                    fs::remove_dir_all(&old)
                        .map_err(|e| format!("cannot remove the older trace `{}`: {e}", old.display()))?;
                }
                fs::rename(dir, &old)
                    .map_err(|e| format!("cannot move the trace `{shown}` to `{}`: {e}", old.display()))?;
                out.old = Some(old);
            }
            Ok(meta) => {
                let mut entries = fs::read_dir(dir).map_err(|e| format!("cannot read `{shown}`: {e}"))?;
                if entries.next().is_some() {
                    return Err(format!(
                        "`{shown}` exists and holds something other than a dynprobe trace; remove it or \
                         choose another directory with -o DIR"
                    ));
                }
                if meta.uid() == rustix::process::geteuid().as_raw() {
                    fs::set_permissions(dir, fs::Permissions::from_mode(files::DIR_MODE))
                        .map_err(|e| format!("cannot make `{shown}` private: {e}"))?;
                }
                out.existed = true;
                return Ok(out);
            }
        }
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| format!("cannot create `{}`: {e}", parent.display()))?;
        }
        files::create_dir(dir).map_err(|e| format!("cannot create `{shown}`: {e}"))?;
        Ok(out)
    }

    /// Puts things back as they were (the program did not run): a directory made here goes
    /// (one that was there is emptied of what was written into it), the older trace comes
    /// back.
    fn restore(&mut self) {
        if self.existed {
            if let Ok(entries) = fs::read_dir(&self.dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let _ = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        fs::remove_dir_all(path)
                    } else {
                        fs::remove_file(path)
                    };
                }
            }
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
        if let Some(old) = self.old.take() {
            let _ = fs::rename(old, &self.dir);
        }
    }
}

/// The directory of the ring files, made for this recording and removed when dropped: in
/// `/dev/shm` (memory, never written back to disk) when there is one, else in the trace
/// directory `out_dir`. Its name is unpredictable and it is made exclusively (`mkdtemp`):
/// a fixed name (`dynprobe-<pid>`) could be made first by another user, for pids to come,
/// to make `record` fail, or be one of theirs that root's `record` would have removed. The
/// agent learns the name from `DYNPROBE_RECORD`.
///
/// Mode 0700: the agents that write into it run as the user that runs `record` (a program
/// `record` starts that switches to another user before it `exec`s is not traced: its
/// agent says it cannot write there), and the ring files inside are 0600.
///
///
/// It holds an [`OWNER_FILE`] this process keeps locked: a `record` killed before it could
/// remove its directory leaves it in memory (the ring pages the recorder populated, up to
/// the rings' size), and the next `record` removes it ([`remove_abandoned_ring_dirs`]).
fn ring_dir(out_dir: &Path) -> Result<PrivateDir, String> {
    let shm = Path::new("/dev/shm");
    let parent = if shm.is_dir() { shm } else { out_dir };
    remove_abandoned_ring_dirs(parent);
    let dir =
        PrivateDir::new_in(parent, RING_DIR_PREFIX).map_err(|e| format!("cannot create the ring directory: {e}"))?;
    // Best effort: without it the directory is only never removed by another `record`.
    let _ = lock_as_owner(dir.path());
    // The images a recording follows through an `exec` record while this file is there.
    let live = dir.path().join(ending::RECORDING_FILE);
    files::write_private(&live, b"").map_err(|e| format!("cannot create {}: {e}", live.display()))?;
    Ok(dir)
}

/// What ring directories' names start with.
const RING_DIR_PREFIX: &str = "dynprobe-";
/// The file in a ring directory whose lock (flock(2)) the `record` that made it holds for
/// as long as it runs: the kernel lets go of it when that process ends, however it ends,
/// and a lock is the same in every pid namespace (a pid in the file would not be). The
/// file says the pid, for a reader.
const OWNER_FILE: &str = "record.owner";

/// Makes `dir`'s [`OWNER_FILE`], locked by this process until it ends: made under another
/// name and locked first, then renamed, so that no other `record` ever sees it unlocked.
/// The descriptor is close-on-exec (a traced program would otherwise hold the lock) and
/// kept open for the process's life.
fn lock_as_owner(dir: &Path) -> std::io::Result<()> {
    let tmp = dir.join(format!("{OWNER_FILE}.tmp"));
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        let _ = fs::remove_file(&tmp);
        return Err(err);
    }
    std::io::Write::write_all(&mut file, format!("{}\n", std::process::id()).as_bytes())?;
    fs::rename(&tmp, dir.join(OWNER_FILE))?;
    // The lock is the process's for its life: the descriptor is never closed.
    std::mem::forget(file);
    Ok(())
}

/// Removes the ring directories in `parent` whose `record` is gone without removing them
/// (killed): each one this user owns whose [`OWNER_FILE`] nobody holds locked. A traced
/// program that still maps a ring file there keeps its memory (removing a file does not
/// unmap it) and frees it when it lets go; nothing of a live `record`'s is touched, nor a
/// directory without the file (an older dynprobe's, or one still being made).
fn remove_abandoned_ring_dirs(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        let is_ring_dir = entry.file_name().to_str().is_some_and(|name| name.starts_with(RING_DIR_PREFIX));
        // `symlink_metadata`: a link named like one of ours is not followed.
        let ours = fs::symlink_metadata(entry.path()).is_ok_and(|m| m.is_dir() && m.uid() == me);
        if !is_ring_dir || !ours {
            continue;
        }
        let Ok(owner) = fs::File::open(entry.path().join(OWNER_FILE)) else { continue };
        // SAFETY: flock on a descriptor we own; closing it (drop) lets go of the lock.
        let abandoned =
            unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&owner), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if abandoned {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        record: RecordArgs,
    }

    fn filters(argv: &[&str]) -> Result<String, String> {
        let matches = Cli::command().try_get_matches_from(argv).unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        filter_lines(&cli.record, &matches)
    }

    #[test]
    fn filters_keep_the_command_line_order() {
        assert_eq!(
            filters(&["record", "-F", "parse_*", "-N", "parse_header", "--filter", "libc:malloc", "--", "./p"]),
            Ok("F parse_*\nN parse_header\nF libc:malloc".into())
        );
        assert_eq!(filters(&["record", "--", "./p"]), Ok(String::new()));
        assert!(filters(&["record", "-N", "a\nb", "--", "./p"]).unwrap_err().contains("one line"));
    }

    #[test]
    fn buffer_sizes_are_powers_of_two() {
        assert!(check_buffer_size(16).is_ok());
        assert!(check_buffer_size(1 << 20).is_ok());
        for bad in [0, 8, 100, 1000, 1 << 40] {
            assert!(check_buffer_size(bad).unwrap_err().contains("power of two"), "{bad}");
        }
    }

    /// The uid of `nobody`.
    const NOBODY: u32 = 65534;

    #[test]
    fn an_older_trace_moves_aside_and_comes_back() {
        let tmp = PrivateDir::new_in(&std::env::temp_dir(), "dynprobe-outdir-").unwrap();
        let root = tmp.path();
        let dir = root.join("t.data");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("info.json"), "{}").unwrap();
        fs::create_dir(root.join("t.data.old")).unwrap();
        fs::write(root.join("t.data.old/info.json"), "older").unwrap();

        let mut out = OutputDir::prepare(&dir).unwrap();
        assert_eq!(fs::read_to_string(root.join("t.data.old/info.json")).unwrap(), "{}");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "a new, empty directory");
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700, "only its owner's");
        out.restore();
        assert_eq!(fs::read_to_string(dir.join("info.json")).unwrap(), "{}");

        let other = root.join("other");
        fs::create_dir(&other).unwrap();
        fs::write(other.join("notes.txt"), "mine").unwrap();
        let err = OutputDir::prepare(&other).err().unwrap();
        assert!(err.contains("holds something other than a dynprobe trace"), "{err}");
        assert_eq!(fs::read_to_string(other.join("notes.txt")).unwrap(), "mine");

        fs::write(root.join("file"), "").unwrap();
        assert!(OutputDir::prepare(&root.join("file")).err().unwrap().contains("is not a directory"));

        // An empty directory of the user's becomes theirs only; one of another user's (as
        // root) is used as it is, and given back empty, still theirs.
        let mine = root.join("mine");
        fs::create_dir(&mine).unwrap();
        fs::set_permissions(&mine, fs::Permissions::from_mode(0o755)).unwrap();
        OutputDir::prepare(&mine).unwrap();
        assert_eq!(fs::metadata(&mine).unwrap().mode() & 0o777, 0o700);
        let theirs = root.join("theirs");
        fs::create_dir(&theirs).unwrap();
        fs::set_permissions(&theirs, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).expect("chown (the tests run as root)");
        let mut out = OutputDir::prepare(&theirs).unwrap();
        fs::create_dir(theirs.join("1.0")).unwrap();
        fs::write(theirs.join("info.json"), "{}").unwrap();
        out.restore();
        let meta = fs::metadata(&theirs).unwrap();
        assert_eq!((fs::read_dir(&theirs).unwrap().count(), meta.uid(), meta.mode() & 0o777), (0, NOBODY, 0o755));
    }
}
