//! Rows that time a whole program, `bench/graph.c`, run plain and under a function tracer:
//! the traced calls happen in another process, where the bench's own loop cannot time them.
//!
//! The program times its loop itself and prints the figure, so process start-up, the
//! tracer's set-up and the writing of the trace at exit stay out of it. Each run is one
//! batch; the plain run is the baseline the traced runs are compared with.

use dynprobe_events::files::PrivateDir;
use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::measure::{spread, Plan, Timing, BATCHES};

/// The program: a loop of calls to small functions with compiler NOP sites at every entry,
/// built by build.rs.
const GRAPH: &str = env!("DYNPROBE_BENCH_GRAPH");

/// Traced calls per loop iteration of `graph.c` (its `CALLS_PER_ITERATION`): the outer
/// function and the leaf it calls.
const CALLS_PER_ITERATION: u64 = 2;

/// Traced calls per run unless `--iterations` says otherwise: a few tenths of a second
/// under a tracer that adds some tens of nanoseconds per call.
const DEFAULT_CALLS: u64 = 4_000_000;

/// Records a traced call leaves in dynprobe's ring: its entry and its exit.
const RECORDS_PER_CALL: u64 = 2;

/// Ring records beyond the loop's, for the few traced calls outside it (`main`, the clock
/// reads).
const RING_MARGIN: u64 = 1024;

/// What the row's answer is when uftrace is missing: a row, not a failure of the bench.
pub const UFTRACE_MISSING: &str = "not installed (apt-get install uftrace)";

/// What the program runs under.
#[derive(Clone, Copy, Debug)]
pub enum Tracer {
    /// Nothing: its NOP sites stay NOPs.
    None,
    /// `dynprobe record` of every function of the program.
    Dynprobe,
    /// `dynprobe record -a`: the same, each call's argument and return value too.
    DynprobeArgs,
    /// `uftrace record`, which patches the same NOP sites (its dynamic tracing).
    Uftrace,
    /// Nothing any more: `dynprobe record -p` recorded the running program (every NOP
    /// patched, then put back) before its timed loop starts.
    AfterDetach,
}

/// Runs the program [`BATCHES`] times under `tracer`; each run is one batch. With
/// `threads`, that many threads of the program run the loop at once, each timing its own
/// calls in CPU time (see `bench/graph.c`).
pub fn measure(tracer: Tracer, plan: Plan, threads: Option<usize>) -> Result<Timing, String> {
    let iterations = (plan.calls_per_batch.unwrap_or(DEFAULT_CALLS) / CALLS_PER_ITERATION).max(1);
    let command = TracedCommand::new(tracer, iterations, threads)?;
    let mut timing = Timing { calls_per_batch: 0, batches: Vec::new(), total_calls: 0, remark: None };
    let mut faults = Vec::new();
    for _ in 0..BATCHES {
        let run = command.run()?;
        timing.calls_per_batch = run.calls;
        timing.total_calls += run.calls;
        timing.batches.push(run.ns_per_call);
        faults.push(run.faults);
        // Every run's losses would say the same; the first is enough.
        timing.remark = timing.remark.or(run.remark);
    }
    // On a first lap every new page of a tracer's buffer is a fault unless the tracer made it
    // present ahead: what a host charges for them differs a lot (a microsecond or more a page
    // on some virtual machines), so the row says how many there were.
    let said = spread(faults.into_iter().map(|n| n as f64), 0, " page faults in the timed loop");
    timing.remark = Some(match timing.remark {
        Some(remark) => format!("{remark}; {said}"),
        None => said,
    });
    Ok(timing)
}

/// The program the `enable-sites` row records: many functions with compiler NOP sites,
/// built by build.rs.
const SITES: &str = env!("DYNPROBE_BENCH_SITES");

/// Records `bench_sites` [`BATCHES`] times and reads back, from each trace, how long its
/// one batch of NOP-to-call patches took: each run is one batch, its figure the batch's
/// nanoseconds per site (the note gives the whole batch in milliseconds).
pub fn measure_site_batch() -> Result<Timing, String> {
    let me = env::current_exe().map_err(|err| format!("cannot find the dynprobe executable: {err}"))?;
    let mut timing = Timing { calls_per_batch: 0, batches: Vec::new(), total_calls: 0, remark: None };
    let mut batch_ms = Vec::new();
    for _ in 0..BATCHES {
        let scratch = Scratch::new()?;
        let mut command = Command::new(&me);
        command.args(["record", "-o"]).arg(&scratch.path).arg("--").arg(SITES);
        let shown = format!("{command:?}");
        let output = command.output().map_err(|err| format!("cannot run {shown}: {err}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(format!("{shown} failed ({}): {}", output.status, last_lines(&stderr)));
        }
        let trace = dynprobe_events::trace::read(&scratch.path).map_err(|err| format!("{shown}: {err}"))?;
        let process = trace.processes.first().ok_or_else(|| format!("{shown} recorded no process"))?;
        let patched: u64 = process.sites.kinds.iter().filter(|(kind, _, _)| kind == "mcount").map(|k| k.2).sum();
        let ns = process.sites.patch_ns.ok_or_else(|| format!("{shown}: the trace says nothing of the patch time"))?;
        if patched == 0 {
            return Err(format!("{shown} patched no mcount site"));
        }
        timing.calls_per_batch = patched;
        timing.total_calls += patched;
        timing.batches.push(ns as f64 / patched as f64);
        batch_ms.push(ns as f64 / 1e6);
    }
    timing.remark = Some(format!("{} sites in {}", timing.calls_per_batch, spread(batch_ms, 2, " ms")));
    Ok(timing)
}

/// One run's figures.
struct Run {
    /// Traced calls the timed loop made.
    calls: u64,
    /// Nanoseconds per traced call of the loop.
    ns_per_call: f64,
    /// Page faults the loop's thread(s) took.
    faults: u64,
    /// What the run found that makes its number doubtful (lost events).
    remark: Option<String>,
}

/// How to start the program under a tracer.
struct TracedCommand {
    tracer: Tracer,
    /// The program that runs the others, when there is one.
    launcher: Option<PathBuf>,
    /// Loop iterations, of each thread.
    iterations: u64,
    threads: Option<usize>,
}

impl TracedCommand {
    /// Finds what `tracer` needs: an error when it is missing.
    fn new(tracer: Tracer, iterations: u64, threads: Option<usize>) -> Result<TracedCommand, String> {
        let launcher = match tracer {
            Tracer::None | Tracer::AfterDetach => None,
            Tracer::Dynprobe | Tracer::DynprobeArgs => {
                Some(env::current_exe().map_err(|err| format!("cannot find the dynprobe executable: {err}"))?)
            }
            Tracer::Uftrace => Some(find_on_path("uftrace").ok_or(UFTRACE_MISSING)?),
        };
        Ok(TracedCommand { tracer, launcher, iterations, threads })
    }

    /// Runs the program once, with a scratch trace directory that is removed afterwards.
    fn run(&self) -> Result<Run, String> {
        let scratch = Scratch::new()?;
        let dir = scratch.path.as_os_str();
        let iterations = OsString::from(self.iterations.to_string());
        let threads: Vec<OsString> = self.threads.iter().map(|n| OsString::from(n.to_string())).collect();
        let mut command = match &self.launcher {
            Some(launcher) => Command::new(launcher),
            None => Command::new(GRAPH),
        };
        match self.tracer {
            Tracer::None => command.arg(&iterations).args(&threads),
            Tracer::AfterDetach => return after_detach(command.arg(&iterations).arg("wait"), dir),
            Tracer::Dynprobe | Tracer::DynprobeArgs => {
                // A ring that holds the whole run: nothing can be lost however the drain
                // keeps pace, so every call pays for its records. The traced thread also
                // touches each ring page first (its page faults are in the figure), which a
                // ring that wraps pays once per lap only. Each thread has a ring of its own.
                // With -a each entry and exit carries one value: a data record more each.
                let per_call = match self.tracer {
                    Tracer::DynprobeArgs => 2 * RECORDS_PER_CALL,
                    _ => RECORDS_PER_CALL,
                };
                let records = (per_call * CALLS_PER_ITERATION * self.iterations + RING_MARGIN).next_power_of_two();
                let buffer = records.to_string();
                if matches!(self.tracer, Tracer::DynprobeArgs) {
                    command.arg("record").arg("-a");
                } else {
                    command.arg("record");
                }
                command
                    .args(["--buffer-size", &buffer, "-o"])
                    .arg(dir)
                    .arg("--")
                    .arg(GRAPH)
                    .arg(&iterations)
                    .args(&threads)
            }
            Tracer::Uftrace => {
                // -P .: every function through the NOP sites, as dynprobe patches them;
                // --no-libcall: the program's own functions only, as dynprobe records.
                command
                    .args(["record", "-P", ".", "--no-libcall", "-d"])
                    .arg(dir)
                    .arg(GRAPH)
                    .arg(&iterations)
                    .args(&threads)
            }
        };
        let shown = format!("{command:?}");
        let output = command.output().map_err(|err| format!("cannot run {shown}: {err}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            return Err(format!("{shown} failed ({}): {}", output.status, last_lines(&stderr)));
        }
        let (calls, ns_per_call, faults) = loop_figures(&shown, &stdout)?;
        let remark = match self.tracer {
            Tracer::None | Tracer::AfterDetach => None,
            Tracer::Dynprobe | Tracer::DynprobeArgs => dynprobe_losses(&stderr, calls)?,
            Tracer::Uftrace => uftrace_losses(&stderr),
        };
        Ok(Run { calls, ns_per_call, faults, remark })
    }
}

/// The `calls`, `ns_per_call` and `faults` lines the program printed.
fn loop_figures(shown: &str, stdout: &str) -> Result<(u64, f64, u64), String> {
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .ok_or_else(|| format!("{shown} printed no `{name}` line: {}", last_lines(stdout)))
    };
    let number_error = |name: &str| format!("{shown}: `{name}` is not a number");
    let calls: u64 = field("calls")?.trim().parse().map_err(|_| number_error("calls"))?;
    let ns_per_call: f64 = field("ns_per_call")?.trim().parse().map_err(|_| number_error("ns_per_call"))?;
    let faults: u64 = field("faults")?.trim().parse().map_err(|_| number_error("faults"))?;
    Ok((calls, ns_per_call, faults))
}

/// Starts the program `command` (`graph N wait`), has `dynprobe record -p` record it into
/// `dir` and detach while it waits, then lets its loop run: the loop's figures, after a
/// session that patched and restored every one of its sites.
fn after_detach(command: &mut Command, dir: &std::ffi::OsStr) -> Result<Run, String> {
    use std::io::{BufRead, Write};
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot run {shown}: {err}"))?;
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut line = String::new();
    let ready = stdout.read_line(&mut line).is_ok() && line.trim() == "ready";
    let me = env::current_exe().map_err(|err| format!("cannot find the dynprobe executable: {err}"))?;
    let record = ready.then(|| {
        Command::new(me).args(["record", "-p", &child.id().to_string(), "--duration", "0.1", "-o"]).arg(dir).output()
    });
    let detached = match record {
        Some(Ok(output)) if output.status.success() => Ok(()),
        Some(Ok(output)) => Err(format!(
            "dynprobe record -p failed ({}): {}",
            output.status,
            last_lines(&String::from_utf8_lossy(&output.stderr))
        )),
        Some(Err(err)) => Err(format!("cannot run dynprobe record -p: {err}")),
        None => Err(format!("{shown} said {line:?}, not `ready`")),
    };
    if let Err(err) = detached {
        let _ = child.kill();
        let _ = child.wait();
        return Err(err);
    }
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let _ = writeln!(stdin, "go");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
    let status = child.wait().map_err(|err| err.to_string())?;
    if !status.success() {
        return Err(format!("{shown} failed after the detach ({status})"));
    }
    let (calls, ns_per_call, faults) = loop_figures(&shown, &rest)?;
    Ok(Run { calls, ns_per_call, faults, remark: None })
}

/// Reads `dynprobe record`'s last line, `recorded E events (L lost) …`: lost events are a
/// remark (the figure then leaves their cost out); fewer events than the loop's calls
/// made, with none lost, mean calls went untraced and the number is no tracer's cost.
fn dynprobe_losses(stderr: &str, calls: u64) -> Result<Option<String>, String> {
    let line = stderr
        .lines()
        .find_map(|line| line.strip_prefix("recorded "))
        .ok_or_else(|| format!("dynprobe record did not say what it recorded: {}", last_lines(stderr)))?;
    let (events, rest) = line.split_once(" events (").ok_or_else(|| format!("unexpected summary `{line}`"))?;
    let events: u64 = events.parse().map_err(|_| format!("unexpected summary `{line}`"))?;
    let (lost, _) = rest.split_once(" lost)").ok_or_else(|| format!("unexpected summary `{line}`"))?;
    if lost != "0" {
        return Ok(Some(format!("{lost} events LOST (the ring overran): their cost is not in the figure")));
    }
    let expected = RECORDS_PER_CALL * calls;
    if events < expected {
        return Err(format!("recorded {events} events for {calls} calls ({RECORDS_PER_CALL} each) and lost none"));
    }
    Ok(None)
}

/// uftrace reports lost records on stderr (its buffers overran): a remark, as for dynprobe.
fn uftrace_losses(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .find(|line| line.to_ascii_lowercase().contains("lost"))
        .map(|line| format!("uftrace: {}", line.trim()))
}

/// The last few lines of a command's output, on one line, for an error message.
pub(super) fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|line| !line.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
    if tail.is_empty() {
        "no output".to_owned()
    } else {
        tail
    }
}

/// `name` in one of the `PATH` directories, if it is an executable file there.
fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|file| fs::metadata(file).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0))
}

/// A trace directory that does not exist yet, for one run, removed when dropped. On tmpfs
/// when there is one, so that neither tracer waits for a disk; inside a fresh directory of
/// its own (`mkdtemp`), never at a name another user could have made first.
pub(super) struct Scratch {
    /// The trace directory's path.
    pub(super) path: PathBuf,
    /// Holds it; removed with it.
    _parent: PrivateDir,
}

impl Scratch {
    pub(super) fn new() -> Result<Scratch, String> {
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() { shm.to_path_buf() } else { env::temp_dir() };
        let parent = PrivateDir::new_in(&parent, "dynprobe-bench-").map_err(|err| err.to_string())?;
        Ok(Scratch { path: parent.path().join("trace"), _parent: parent })
    }
}
