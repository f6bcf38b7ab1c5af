//! The `ptrace-probe` row: the cost of a hit of the fallback probes, driven from outside
//! by ptrace, for the programs the agent cannot be loaded into. A statically linked
//! program runs under `dynprobe probe 'p:bench_probed'` and times, in the same run, a loop
//! of calls to an unprobed function and one to an identical probed one.

use dynprobe_events::files::PrivateDir;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use super::measure::{Timing, BATCHES};
use super::program::last_lines;

/// The program (`crates/uprobes/bench/ptrace_probe.c`, built static by build.rs).
const PROGRAM: &str = env!("DYNPROBE_BENCH_PTRACE");

/// Calls of each loop: a hit costs tens of microseconds, so a batch takes about a second.
const CALLS: u64 = 20_000;

/// Runs the program [`BATCHES`] times under `dynprobe probe`; each run is one batch of
/// nanoseconds added per call of the probed function.
pub fn measure_ptrace_probe() -> Result<Timing, String> {
    let me = std::env::current_exe().map_err(|err| format!("cannot find the dynprobe executable: {err}"))?;
    let mut timing = Timing { calls_per_batch: CALLS, batches: Vec::new(), total_calls: 0, remark: None };
    let mut plain = Vec::new();
    for _ in 0..BATCHES {
        // In a fresh directory of its own: the program writes it, and a fixed name in /tmp
        // could be another user's link to a file of ours.
        let scratch = PrivateDir::new_in(&std::env::temp_dir(), "dynprobe-bench-ptrace-").map_err(|e| e.to_string())?;
        let result = scratch.path().join("result");
        let mut command = Command::new(&me);
        command.args(["probe", "p:bench_probed", "--", PROGRAM, &CALLS.to_string()]).arg(&result);
        let shown = format!("{command:?}");
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| format!("cannot run {shown}: {err}"))?;
        let hits = BufReader::new(child.stdout.take().expect("stdout is piped")).lines().count() as u64;
        let output = child.wait_with_output().map_err(|err| format!("{shown}: {err}"))?;
        let text = std::fs::read_to_string(&result).unwrap_or_default();
        let field = |name: &str| {
            text.split_whitespace().find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse::<f64>().ok())
        };
        let (Some(plain_ns), Some(probed_ns)) = (field("plain_ns"), field("probed_ns")) else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(format!("{shown} failed ({}): {}", output.status, last_lines(&stderr)));
        };
        if hits != CALLS {
            return Err(format!("{shown} printed {hits} events for {CALLS} calls"));
        }
        timing.batches.push((probed_ns - plain_ns) / CALLS as f64);
        timing.total_calls += CALLS;
        plain.push(plain_ns / CALLS as f64);
    }
    plain.sort_by(f64::total_cmp);
    timing.remark = Some(format!(
        "{CALLS} hits a run, every one printed; the unprobed call {:.1} ns in the same runs",
        plain[plain.len() / 2]
    ));
    Ok(timing)
}
