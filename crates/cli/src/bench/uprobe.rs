//! The kernel's own uprobes, attached to this process through `perf_event_open`.
//!
//! The `uprobe` PMU takes the probe straight in the attribute — `config1` points at the
//! file's path, `config2` is the file offset, bit 0 of `config` asks for a return probe —
//! so no tracefs, no `perf` tool and no event names are involved. A counting event with
//! `pid = 0` and `cpu = -1` fires on every hit by this thread, on any CPU; the
//! thread-scaling rows open one per CPU with `pid = -1` instead ([`arm_every_cpu`]), which
//! counts the hits of every thread (an inherited per-thread event did not count the
//! threads created after it on the 6.18 kernel this was written on).

use std::ffi::{c_ulong, CString};
use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use perf_event_open_sys as sys;

use super::rows::Armed;
use super::target::{self, Target};

/// Where the PMU's dynamic type number is published.
const UPROBE_TYPE: &str = "/sys/bus/event_source/devices/uprobe/type";

/// Which kind of uprobe.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// Fires at the function's first instruction.
    Entry,
    /// Fires when the function returns (a uretprobe).
    Return,
}

/// Attaches a uprobe of `kind` to `target`: a row's setup.
pub fn arm(target: Target, kind: Kind) -> Result<Box<dyn Armed>, String> {
    Ok(Box::new(Uprobe::attach(target, kind)?))
}

/// [`arm`] counting every thread's hits: one event per CPU.
pub fn arm_every_cpu(target: Target, kind: Kind) -> Result<Box<dyn Armed>, String> {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as i32;
    let events = (0..cpus).map(|cpu| Uprobe::attach_on(target, kind, -1, cpu)).collect::<Result<Vec<_>, _>>()?;
    Ok(Box::new(EveryCpu(events)))
}

/// One uprobe event per CPU, for every thread's hits.
struct EveryCpu(Vec<Uprobe>);

impl Armed for EveryCpu {
    /// The sum of the CPUs' counts.
    fn hits(&self) -> Result<Option<u64>, String> {
        let mut total = 0;
        for event in &self.0 {
            total += event.hits()?.unwrap_or(0);
        }
        Ok(Some(total))
    }
}

/// A kernel uprobe, live while the perf event's file descriptor is open.
pub struct Uprobe {
    fd: OwnedFd,
}

impl Uprobe {
    /// Attaches a uprobe of `kind` to `target` in this process.
    ///
    /// Errors say why the kernel refused, e.g. missing privileges with the
    /// `perf_event_paranoid` setting that applied.
    pub fn attach(target: Target, kind: Kind) -> Result<Self, String> {
        Self::attach_on(target, kind, 0, -1)
    }

    /// [`Uprobe::attach`] for perf_event_open(2)'s `pid` and `cpu`.
    fn attach_on(target: Target, kind: Kind, pid: i32, cpu: i32) -> Result<Self, String> {
        let pmu_type =
            fs::read_to_string(UPROBE_TYPE).map_err(|err| format!("no uprobe PMU ({UPROBE_TYPE}: {err})"))?;
        let pmu_type: u32 = pmu_type.trim().parse().map_err(|err| format!("{UPROBE_TYPE}: {err}"))?;
        let (path, offset) = file_offset(target::address(target))?;
        let path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| format!("{}: path contains a NUL byte", path.display()))?;

        let mut attr = sys::bindings::perf_event_attr {
            type_: pmu_type,
            size: std::mem::size_of::<sys::bindings::perf_event_attr>() as u32,
            config: match kind {
                Kind::Entry => 0,
                Kind::Return => 1,
            },
            ..Default::default()
        };
        attr.__bindgen_anon_3.config1 = path.as_ptr() as u64;
        attr.__bindgen_anon_4.config2 = offset;
        // `disabled` stays 0: the probe is live from the moment the event is open.

        // SAFETY: `attr` is a valid attribute whose `size` is its own; the path it points
        // at outlives the call (the kernel copies it); pid 0 / cpu -1 / no group counts this
        // thread's hits on any CPU, pid -1 / one cpu every thread's on that CPU.
        let fd =
            unsafe { sys::perf_event_open(&mut attr, pid, cpu, -1, sys::bindings::PERF_FLAG_FD_CLOEXEC as c_ulong) };
        if fd < 0 {
            return Err(open_error(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }
}

impl Armed for Uprobe {
    /// The event's count: one per hit.
    fn hits(&self) -> Result<Option<u64>, String> {
        let mut count = [0u8; 8];
        match rustix::io::read(&self.fd, &mut count) {
            Ok(8) => Ok(Some(u64::from_ne_bytes(count))),
            Ok(short) => Err(format!("reading the uprobe's count: {short} bytes")),
            Err(e) => Err(format!("reading the uprobe's count: {e}")),
        }
    }

    /// Closing the last fd of the event unregisters the uprobe and restores the code.
    fn disarm(self: Box<Self>) -> Result<(), String> {
        drop(self.fd);
        Ok(())
    }
}

/// Explains a `perf_event_open` failure, naming the setting that decides permission.
fn open_error(err: io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => {
            let paranoid = fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "?".to_owned());
            // SAFETY: `geteuid` has no preconditions.
            let who = if rustix::process::geteuid().is_root() { "root" } else { "not root" };
            format!(
                "not permitted: perf_event_paranoid={paranoid} and {who} \
                 (the uprobe PMU needs CAP_PERFMON or CAP_SYS_ADMIN): {err}"
            )
        }
        _ => format!("perf_event_open(uprobe): {err}"),
    }
}

/// The file and file offset holding the code at `addr` in this process.
fn file_offset(addr: u64) -> Result<(PathBuf, u64), String> {
    let symbols = dynprobe_symbols::SymbolTable::current_process()
        .map_err(|err| format!("reading this process's modules: {err}"))?;
    symbols
        .file_offset(addr)
        .ok_or_else(|| format!("{} is not in a file mapping of this process", symbols.format_addr(addr)))
}
