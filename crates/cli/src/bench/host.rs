//! The machine a `dynprobe bench` run measured on. The same code costs very different
//! amounts on different x86-64 hosts — a return probe cost 62–91 ns on an AMD Zen 4 and
//! ~385 ns on an Intel Xeon before its detours kept the upper vector state clean — so every
//! report names its host, and figures from two hosts are never compared blindly.

use std::fmt;
use std::fs;

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
        }
    }
}

impl fmt::Display for Host {
    /// The table's first line: `host: MODEL (VENDOR, family/model/stepping F/M/S[, virtual
    /// machine]), N CPUs, kernel K, load L; detours save …, function-graph saves …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vm = if self.virtualized { ", virtual machine" } else { "" };
        let load = self.load_average.map_or_else(|| "unknown".to_owned(), |load| format!("{load:.2}"));
        write!(
            f,
            "host: {} ({}, family/model/stepping {}{vm}), {} CPUs, kernel {}, load {load}; detours save {} \
             (general registers only around handlers proven light), function-graph saves {}",
            self.cpu_model,
            self.cpu_vendor,
            self.cpu_signature,
            self.cpus,
            self.kernel,
            self.detour_vectors,
            self.graph_vectors
        )
    }
}
