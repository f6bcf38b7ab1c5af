//! The machine a `dynprobe bench` run measured on. The same code costs very different
//! amounts on different x86-64 hosts — a return probe cost 62–91 ns on an AMD Zen 4 and
//! ~385 ns on an Intel Xeon before its detours kept the upper vector state clean — so every
//! report names its host, and figures from two hosts are never compared blindly.

use std::fmt;
use std::fs;
use std::hint::black_box;
use std::time::Duration;

use super::measure::thread_cpu_time;

use serde::Serialize;

/// What the report says of its host; its JSON form is part of the command's interface.
#[derive(Serialize, Debug)]
pub struct Host {
    /// `model name` of `/proc/cpuinfo`, e.g. `Intel(R) Xeon(R) Processor`.
    cpu_model: String,
    /// `vendor_id`: `GenuineIntel`, `AuthenticAMD`.
    cpu_vendor: String,
    /// `family/model/stepping` in decimal, as `/proc/cpuinfo` gives them: a VM's model name
    /// is often generic, these still tell the core apart.
    cpu_signature: String,
    /// The CPU reports a hypervisor: a virtual machine.
    virtualized: bool,
    /// CPUs this process may run on.
    cpus: usize,
    /// The vector state a detour saves around a handler not proven light: what the CPU and
    /// kernel have enabled (`AVX-512 (zmm0-31, k0-7, MXCSR)`, `AVX (…)`, `SSE (…)`); around
    /// a handler proven light, none.
    detour_vectors: String,
    /// The vector state the function-graph tracer's trampolines save (`none (handlers
    /// proven light)` when its hot paths are proven to leave it alone).
    graph_vectors: String,
    /// The kernel's release (`uname -r`).
    kernel: String,
    /// The one-minute load average when the run started: other work on the machine
    /// inflates every figure.
    load_average: Option<f64>,
    /// How steady the CPU's speed was just before the rows ran.
    steadiness: Steadiness,
}

/// A fixed loop timed in [`STEADINESS_WINDOWS`] windows of [`STEADINESS_WINDOW`] CPU time
/// each, nanoseconds per round of its loop: on a steady host the windows agree within a
/// few percent. A virtual machine whose core is shared with a busy neighbour slows down in
/// phases of tens to hundreds of milliseconds, which nothing in the guest shows (the load
/// average stays low, CPU time still runs): on one such AMD host a loop like it took 10.4 ns
/// in some windows and 15.6 in others, and a probe's hit twice as long. Measured before the
/// rows run: the phases come and go, so a steady start does not make every row steady.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct Steadiness {
    /// The fastest window.
    min_ns: f64,
    /// The median window.
    median_ns: f64,
    /// The slowest window.
    max_ns: f64,
}

/// Windows [`Steadiness`] times.
const STEADINESS_WINDOWS: usize = 20;
/// CPU time of each window.
const STEADINESS_WINDOW: Duration = Duration::from_millis(10);

impl Steadiness {
    /// Times the fixed loop: each round stores 16 words of a frame and loads them back
    /// through a call, the kind of work a detour does, which slows down when the core is
    /// shared (a loop of dependent adds barely does).
    fn measure() -> Steadiness {
        let mut frame = [0u64; 16];
        let mut windows: Vec<f64> = (0..STEADINESS_WINDOWS)
            .map(|_| {
                let start = thread_cpu_time();
                let mut rounds = 0u64;
                let mut elapsed = Duration::ZERO;
                while elapsed < STEADINESS_WINDOW {
                    for _ in 0..1000 {
                        black_box(steadiness_round(&mut frame, rounds));
                        rounds += 1;
                    }
                    elapsed = thread_cpu_time().saturating_sub(start);
                }
                elapsed.as_nanos() as f64 / rounds as f64
            })
            .collect();
        windows.sort_by(f64::total_cmp);
        let round = |ns: f64| (ns * 100.0).round() / 100.0;
        Steadiness {
            min_ns: round(windows[0]),
            median_ns: round(windows[windows.len() / 2]),
            max_ns: round(windows[windows.len() - 1]),
        }
    }
}

/// One round of [`Steadiness`]'s loop.
#[inline(never)]
fn steadiness_round(frame: &mut [u64; 16], round: u64) -> u64 {
    for (i, word) in frame.iter_mut().enumerate() {
        *word = black_box(round + i as u64);
    }
    frame.iter().fold(0, |sum, word| sum.wrapping_add(black_box(*word)))
}

impl Host {
    /// Reads the host's description; fields it cannot read say `unknown`.
    pub fn current() -> Host {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        // The first processor's block: all of them describe the same model.
        let field = |name: &str| {
            cpuinfo
                .lines()
                .take_while(|line| !line.is_empty())
                .find_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    (key.trim() == name).then(|| value.trim().to_owned())
                })
                .unwrap_or_else(|| "unknown".to_owned())
        };
        let first_line = |path: &str| fs::read_to_string(path).ok().map(|text| text.trim().to_owned());
        Host {
            cpu_model: field("model name"),
            cpu_vendor: field("vendor_id"),
            cpu_signature: format!("{}/{}/{}", field("cpu family"), field("model"), field("stepping")),
            virtualized: field("flags").split_whitespace().any(|flag| flag == "hypervisor"),
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            detour_vectors: dynprobe::internals::vector_width().to_string(),
            graph_vectors: dynprobe_ftrace::trampoline_width().to_string(),
            kernel: first_line("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".to_owned()),
            load_average: first_line("/proc/loadavg")
                .and_then(|line| line.split_whitespace().next().and_then(|load| load.parse().ok())),
            steadiness: Steadiness::measure(),
        }
    }
}

impl fmt::Display for Host {
    /// The table's first line: `host: MODEL (VENDOR, family/model/stepping F/M/S[, virtual
    /// machine]), N CPUs, kernel K, load L, steadiness …; detours save …, function-graph
    /// saves …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vm = if self.virtualized { ", virtual machine" } else { "" };
        let load = self.load_average.map_or_else(|| "unknown".to_owned(), |load| format!("{load:.2}"));
        let Steadiness { min_ns, median_ns, max_ns } = self.steadiness;
        write!(
            f,
            "host: {} ({}, family/model/stepping {}{vm}), {} CPUs, kernel {}, load {load}, steadiness before the \
             rows: a fixed loop took {min_ns:.1}–{max_ns:.1} ns a round (median {median_ns:.1}) in \
             {STEADINESS_WINDOWS} windows (×{:.2}); detours save {} (general registers only around handlers proven light), function-graph \
             saves {}",
            self.cpu_model,
            self.cpu_vendor,
            self.cpu_signature,
            self.cpus,
            self.kernel,
            max_ns / min_ns,
            self.detour_vectors,
            self.graph_vectors
        )
    }
}
