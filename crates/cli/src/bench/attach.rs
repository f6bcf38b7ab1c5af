//! The `attach-ms` row: how long `dynprobe probe -p PID` takes, from the command's start to
//! its probe being armed in a process that is already running (ptrace, loading the agent
//! with the target's own `dlopen`, its symbol tables, placing and optimizing the probe).
//! The `detach-ms` row: how long from Ctrl-C to every probed byte restored, in a process
//! whose threads hit the probe without a pause. The `record-attach-ms` row: how long
//! `dynprobe record -p PID` takes to start recording 10,000 functions of a running process.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

use super::measure::{Timing, BATCHES};
use super::program::last_lines;

/// The probe each attach places: a libc function every program has.
const SPEC: &str = "p:libc:malloc";

/// Attaches [`BATCHES`] times to a fresh `sleep` and times each attach; the batches are
/// nanoseconds per attach.
pub fn measure_attach() -> Result<Timing, String> {
    let me = std::env::current_exe().map_err(|err| format!("cannot find the dynprobe executable: {err}"))?;
    let mut timing = Timing { calls_per_batch: 1, batches: Vec::new(), total_calls: 0, remark: None };
    for _ in 0..BATCHES {
        let target = Target::start()?;
        let started = Instant::now();
        let (mut probe, mut stderr) = probe_pid(&me, target.0.id(), &["--duration", "0", SPEC])?;
        let mut seen = String::new();
        let attached = wait_attached(&mut stderr, &mut seen).then(|| started.elapsed());
        let status = probe.wait().map_err(|err| err.to_string())?;
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        match attached {
            Some(elapsed) if status.success() => {
                timing.batches.push(elapsed.as_nanos() as f64);
                timing.total_calls += 1;
            }
            _ => return Err(format!("dynprobe probe -p failed ({status}): {}", last_lines(&seen))),
        }
    }
    timing.remark = Some(format!("attached in {}; target ≤ 50 ms", timing.ms_spread()));
    Ok(timing)
}

/// [`BATCHES`] times: starts the start-up rows' program of 80,000 functions calling some of
/// group 0 in a loop, and times `dynprobe record -p PID -F 'g0_*'` from its start to its
/// saying it records (every one of the 10,000 sites patched: the looping program's next
/// call is recorded); the recording must then hold events. The batches are nanoseconds per
/// attach. With `--iterations` (a quick run) it attaches once.
pub fn measure_record_attach(plan: super::measure::Plan) -> Result<Timing, String> {
    let attaches = if plan.calls_per_batch.is_some() { 1 } else { BATCHES };
    let me = std::env::current_exe().map_err(|err| format!("cannot find the dynprobe executable: {err}"))?;
    let program = super::startup::program()?;
    let mut timing = Timing { calls_per_batch: 1, batches: Vec::new(), total_calls: 0, remark: None };
    let mut sites = String::new();
    for _ in 0..attaches {
        let target = Target::ready(Command::new(&program).arg("loop"))?;
        let scratch = super::program::Scratch::new()?;
        let dir = scratch.path.to_string_lossy().into_owned();
        let args = ["-F", "g0_*", "--duration", "0.2", "-o", &dir];
        let started = Instant::now();
        let (mut record, mut stderr) = dynprobe_pid(&me, "record", target.0.id(), &args)?;
        let mut seen = String::new();
        let attached = wait_attached(&mut stderr, &mut seen).then(|| started.elapsed());
        let _ = std::io::Read::read_to_string(&mut stderr, &mut seen);
        let status = record.wait().map_err(|err| err.to_string())?;
        let recorded = seen.lines().find_map(|l| l.strip_prefix("recorded ")?.split(' ').next()?.parse::<u64>().ok());
        match (attached, recorded) {
            (Some(elapsed), Some(1..)) if status.success() => {
                timing.batches.push(elapsed.as_nanos() as f64);
                timing.total_calls += 1;
            }
            _ => {
                return Err(format!("dynprobe record -p failed or recorded nothing ({status}): {}", last_lines(&seen)))
            }
        }
        sites =
            seen.lines().find_map(|l| Some(l.split_once("ms: ")?.1.split(';').next()?.to_string())).unwrap_or_default();
    }
    timing.remark = Some(format!("recording in {}: {sites}", timing.ms_spread()));
    Ok(timing)
}

/// Starts `dynprobe probe -p PID ARGS...` (this executable, `me`), its stdout discarded:
/// the child and its stderr.
fn probe_pid(me: &Path, pid: u32, args: &[&str]) -> Result<(Child, BufReader<ChildStderr>), String> {
    dynprobe_pid(me, "probe", pid, args)
}

/// Starts `dynprobe SUBCOMMAND -p PID ARGS...`, its stdout discarded: the child and its
/// stderr.
fn dynprobe_pid(
    me: &Path,
    subcommand: &str,
    pid: u32,
    args: &[&str],
) -> Result<(Child, BufReader<ChildStderr>), String> {
    let mut probe = Command::new(me)
        .args([subcommand, "-p", &pid.to_string()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot run dynprobe probe -p: {err}"))?;
    let stderr = BufReader::new(probe.stderr.take().expect("stderr is piped"));
    Ok((probe, stderr))
}

/// Reads dynprobe's stderr into `seen` until it says it attached (true) or ends (false).
fn wait_attached(stderr: &mut BufReader<ChildStderr>, seen: &mut String) -> bool {
    let mut line = String::new();
    loop {
        line.clear();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            return false;
        }
        seen.push_str(&line);
        if line.contains("attached to") {
            return true;
        }
    }
}

/// The detach row's program (`tests/targets/hot.c`, built by build.rs), and its threads
/// that call `work` without a pause.
const HOT: &str = env!("DYNPROBE_BENCH_HOT");
const HOT_THREADS: &str = "4";

/// The longest a detach may take before the row fails.
const DETACH_LIMIT: Duration = Duration::from_secs(30);

/// [`BATCHES`] times: attaches to a fresh hot program with a probe on `work`, lets the
/// hits flow, sends Ctrl-C and times until `work`'s bytes are the original ones again
/// (read from `/proc/PID/mem`, as another process sees them); the batches are nanoseconds
/// per detach.
pub fn measure_detach() -> Result<Timing, String> {
    let me = std::env::current_exe().map_err(|err| format!("cannot find the dynprobe executable: {err}"))?;
    let mut timing = Timing { calls_per_batch: 1, batches: Vec::new(), total_calls: 0, remark: None };
    for _ in 0..BATCHES {
        let target = Target::hot()?;
        let pid = target.0.id();
        let work = Code::of(pid, "work")?;
        let original = work.bytes()?;
        let (mut probe, mut stderr) = probe_pid(&me, pid, &["-o", "/dev/null", "p:work x=$arg1"])?;
        let mut seen = String::new();
        if !wait_attached(&mut stderr, &mut seen) {
            let status = probe.wait().map_err(|err| err.to_string())?;
            return Err(format!("dynprobe probe -p failed ({status}): {}", last_lines(&seen)));
        }
        // The hits flow for a while, as in a session someone ends.
        std::thread::sleep(Duration::from_millis(200));
        if work.bytes()? == original {
            let _ = probe.kill();
            return Err("`work` was not patched while attached".to_owned());
        }
        let started = Instant::now();
        // Our own child, `dynprobe probe -p`: Ctrl-C for it.
        if let Some(pid) = rustix::process::Pid::from_raw(probe.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        let restored = loop {
            if work.bytes()? == original {
                break Some(started.elapsed());
            }
            if started.elapsed() > DETACH_LIMIT {
                break None;
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        let status = probe.wait().map_err(|err| err.to_string())?;
        let _ = std::io::Read::read_to_string(&mut stderr, &mut seen);
        match restored {
            Some(elapsed) if status.success() => {
                timing.batches.push(elapsed.as_nanos() as f64);
                timing.total_calls += 1;
            }
            Some(_) => return Err(format!("dynprobe probe -p failed ({status}): {}", last_lines(&seen))),
            None => {
                return Err(format!("`work` was not restored {DETACH_LIMIT:?} after Ctrl-C: {}", last_lines(&seen)))
            }
        }
    }
    timing.remark = Some(format!("every byte restored {} after Ctrl-C", timing.ms_spread()));
    Ok(timing)
}

/// The first bytes of a function in a running process.
struct Code {
    mem: std::fs::File,
    addr: u64,
}

impl Code {
    /// `function` of process `pid`, found in its symbol tables.
    fn of(pid: u32, function: &str) -> Result<Code, String> {
        let table = dynprobe_symbols::SymbolTable::for_pid(pid as i32).map_err(|err| err.to_string())?;
        let addr = table.lookup(function).map_err(|err| err.to_string())?.addr;
        let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
            .map_err(|err| format!("cannot open /proc/{pid}/mem: {err}"))?;
        Ok(Code { mem, addr })
    }

    /// The 8 bytes at the function's start: what a jump-optimized probe changes.
    fn bytes(&self) -> Result<[u8; 8], String> {
        let mut bytes = [0u8; 8];
        self.mem.read_exact_at(&mut bytes, self.addr).map_err(|err| format!("cannot read the target's code: {err}"))?;
        Ok(bytes)
    }
}

/// A running target, killed when dropped.
struct Target(Child);

impl Target {
    /// The hot program, once it said it is ready (its threads running).
    fn hot() -> Result<Target, String> {
        Target::ready(Command::new(HOT).arg(HOT_THREADS))
    }

    /// `command`'s program, once it said it is ready (`ready` on its first line).
    fn ready(command: &mut Command) -> Result<Target, String> {
        let shown = format!("{command:?}");
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|err| format!("cannot start {shown}: {err}"))?;
        let mut line = String::new();
        let stdout = child.stdout.as_mut().expect("stdout is piped");
        BufReader::new(stdout).read_line(&mut line).map_err(|err| err.to_string())?;
        let target = Target(child);
        match line.starts_with("ready") {
            true => Ok(target),
            false => Err(format!("{shown} said {line:?} instead of `ready`")),
        }
    }

    fn start() -> Result<Target, String> {
        let child = Command::new("sleep")
            .arg("600")
            .spawn()
            .map_err(|err| format!("cannot start `sleep` as the attach target: {err}"))?;
        // Let it reach its sleep: attaching to a process still in the loader measures
        // something else.
        std::thread::sleep(std::time::Duration::from_millis(50));
        Ok(Target(child))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
