//! The `attach-ms` row: how long `dynprobe probe -p PID` takes, from the command's start to
//! its probe being armed in a process that is already running (ptrace, loading the agent
//! with the target's own `dlopen`, its symbol tables, placing and optimizing the probe).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

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
        let mut probe = Command::new(&me)
            .args(["probe", "-p", &target.0.id().to_string(), "--duration", "0", SPEC])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| format!("cannot run dynprobe probe -p: {err}"))?;
        let mut stderr = BufReader::new(probe.stderr.take().expect("stderr is piped"));
        let mut seen = String::new();
        let mut line = String::new();
        let attached = loop {
            line.clear();
            if stderr.read_line(&mut line).unwrap_or(0) == 0 {
                break None;
            }
            seen.push_str(&line);
            if line.contains("attached to") {
                break Some(started.elapsed());
            }
        };
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

/// A running `sleep`, killed when dropped.
struct Target(Child);

impl Target {
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
