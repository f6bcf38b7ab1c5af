//! The start-up rows: how long `dynprobe record` keeps a program from reaching `main`,
//! with 10,000, 40,000 and 80,000 functions traced and with the whole C library.
//!
//! The program is [`many`]'s, with 80,000 functions, built once into the temporary
//! directory (and reused while its source is the same); a glob chooses how many of them
//! are traced. Run as `PROGRAM clock`, it prints the `CLOCK_MONOTONIC` time at which `main`
//! began: a row's figure is the time from just before `dynprobe record` is spawned to then
//! (what the user waits for), and the `startup-plain` row, the same program spawned
//! without dynprobe, is the baseline: the difference is what recording adds — the
//! command's own start, loading the agent, reading the symbol tables, choosing, preparing
//! and patching the sites. The note adds the CPU time the program's process used before
//! `main` (the agent's work, all its threads), which a loaded machine does not inflate.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use super::many;
use super::measure::{Plan, Timing, BATCHES};
use super::program::{last_lines, Scratch};

/// Groups of [`many::GROUP`] functions in the program: 80,000.
const GROUPS: usize = 8;

/// What a start-up row runs.
#[derive(Clone, Copy, Debug)]
pub enum Startup {
    /// The program without dynprobe.
    Plain,
    /// `dynprobe record -F GLOB`, the glob choosing this many of its functions.
    Functions(usize),
    /// `dynprobe record -F 'libc:*'`: the program's C library.
    Libc,
}

impl Startup {
    /// The `-F` patterns of the row.
    fn filter(self) -> Vec<&'static str> {
        match self {
            Startup::Plain => Vec::new(),
            Startup::Functions(10_000) => vec!["-F", "g0_*"],
            Startup::Functions(40_000) => vec!["-F", "g[0-3]_*"],
            Startup::Functions(_) => vec!["-F", "g*"],
            Startup::Libc => vec!["-F", "libc:*"],
        }
    }
}

/// The program, built once per bench run.
pub(super) fn program() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = std::env::temp_dir().join("dynprobe-bench-many");
            std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let out = dir.join(format!("many-{GROUPS}"));
            let current = std::fs::read_to_string(out.with_extension("c")).ok();
            if !out.exists() || current.as_deref() != Some(&many::source(GROUPS)) {
                many::build(GROUPS, &out)?;
            }
            Ok(out)
        })
        .clone()
}

/// Spawns the program [`BATCHES`] times as `case` says — once with `--iterations`, which
/// asks for a quick run of fixed work (a start of 80,000 functions in a debug build takes
/// seconds) — each batch one start, its figure the nanoseconds from the spawn to `main`.
pub fn measure(case: Startup, plan: Plan) -> Result<Timing, String> {
    let starts = if plan.calls_per_batch.is_some() { 1 } else { BATCHES };
    let program = program()?;
    let me = std::env::current_exe().map_err(|err| format!("cannot find the dynprobe executable: {err}"))?;
    let mut timing = Timing { calls_per_batch: 1, batches: Vec::new(), total_calls: 0, remark: None };
    let mut patched = 0;
    let mut cpu_ms = Vec::new();
    for _ in 0..starts {
        let scratch = Scratch::new()?;
        let mut command = match case {
            Startup::Plain => Command::new(&program),
            _ => {
                let mut command = Command::new(&me);
                command.args(["record", "-o"]).arg(&scratch.path).args(case.filter()).arg("--").arg(&program);
                command
            }
        };
        command.arg("clock");
        let shown = format!("{command:?}");
        let spawned = dynprobe::monotonic_ns();
        let output = command.output().map_err(|err| format!("cannot run {shown}: {err}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(format!(
                "{shown} failed ({}): {}",
                output.status,
                last_lines(&String::from_utf8_lossy(&output.stderr))
            ));
        }
        let main_ns: u64 = stdout
            .lines()
            .find_map(|line| line.strip_prefix("main_ns ")?.trim().parse().ok())
            .ok_or_else(|| format!("{shown} printed no `main_ns` line: {}", last_lines(&stdout)))?;
        timing.batches.push(main_ns.saturating_sub(spawned) as f64);
        let cpu: Option<f64> = stdout.lines().find_map(|line| line.strip_prefix("cpu_ns ")?.trim().parse().ok());
        cpu_ms.push(cpu.map_or(f64::NAN, |ns| ns / 1e6));
        timing.total_calls += 1;
        if !matches!(case, Startup::Plain) {
            let trace = dynprobe_events::trace::read(&scratch.path).map_err(|err| format!("{shown}: {err}"))?;
            let process = trace.processes.first().ok_or_else(|| format!("{shown} recorded no process"))?;
            patched = process.sites.kinds.iter().map(|k| k.2).sum();
        }
    }
    let sites = if matches!(case, Startup::Plain) { String::new() } else { format!(", {patched} sites patched") };
    cpu_ms.sort_by(f64::total_cmp);
    // The wall time waits for a CPU on a loaded machine; the CPU time the process spent
    // before main does not.
    timing.remark = Some(format!(
        "spawn to main in {}{sites}; {:.1} ms of CPU in the process before main (median)",
        timing.ms_spread(),
        cpu_ms[cpu_ms.len() / 2]
    ));
    Ok(timing)
}
