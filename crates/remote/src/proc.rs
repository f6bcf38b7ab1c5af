//! What `/proc` says about a process and its threads.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;

/// The fields of `/proc/PID/task/TID/status` the attach diagnostics need.
#[derive(Debug, Clone)]
pub(crate) struct Status {
    /// `State:`, e.g. `S (sleeping)`, `Z (zombie)`.
    pub state: String,
    pub tgid: i32,
    pub ppid: i32,
    pub tracer_pid: i32,
    /// Real, effective, saved, filesystem.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub cap_eff: u64,
    pub is_kernel_thread: bool,
    /// `Seccomp:`: 0 none, 1 strict, 2 filters (0 when the kernel does not say).
    pub seccomp: u8,
    /// `Seccomp_filters:` (Linux 5.9 on): how many filters the thread runs under.
    pub seccomp_filters: Option<u32>,
}

impl Status {
    /// The status of thread `tid` of process `pid`; `None` if it does not exist (or is
    /// unreadable).
    pub fn read(pid: i32, tid: i32) -> Option<Status> {
        Self::parse(&fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?)
    }

    pub fn read_self() -> Option<Status> {
        Self::parse(&fs::read_to_string("/proc/self/status").ok()?)
    }

    fn parse(text: &str) -> Option<Status> {
        let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim);
        let ids = |name: &str| -> Option<[u32; 4]> {
            let v: Vec<u32> = field(name)?.split_whitespace().filter_map(|s| s.parse().ok()).collect();
            v.try_into().ok()
        };
        Some(Status {
            state: field("State")?.to_string(),
            tgid: field("Tgid")?.parse().ok()?,
            ppid: field("PPid")?.parse().ok()?,
            tracer_pid: field("TracerPid")?.parse().ok()?,
            uids: ids("Uid")?,
            gids: ids("Gid")?,
            cap_eff: u64::from_str_radix(field("CapEff")?, 16).ok()?,
            // `Kthread:` exists since Linux 6.2; before, kthreadd's children are the kernel's.
            is_kernel_thread: match field("Kthread") {
                Some(v) => v == "1",
                None => field("PPid") == Some("2") || field("Pid") == Some("2"),
            },
            seccomp: field("Seccomp").and_then(|v| v.parse().ok()).unwrap_or(0),
            seccomp_filters: field("Seccomp_filters").and_then(|v| v.parse().ok()),
        })
    }
}

/// Whether process `pid` exists (a zombie counts).
pub(crate) fn exists(pid: i32) -> bool {
    pid > 0 && fs::metadata(format!("/proc/{pid}")).is_ok()
}

/// The owner of `/proc/PID/status`: the process's euid, or root when it is not dumpable
/// (the directory `/proc/PID` itself keeps the euid on current kernels).
pub(crate) fn owner_uid(pid: i32) -> Option<u32> {
    fs::metadata(format!("/proc/{pid}/status")).ok().map(|m| m.uid())
}

/// Whether process `pid` descends from process `ancestor` (Yama scope 1 allows those).
pub(crate) fn is_descendant(pid: i32, ancestor: i32) -> bool {
    let mut current = pid;
    // A bounded walk: the chain ends at init (ppid 0) long before this.
    for _ in 0..4096 {
        if current == ancestor {
            return true;
        }
        match Status::read(current, current) {
            Some(s) if s.ppid > 0 => current = s.ppid,
            _ => return false,
        }
    }
    false
}

/// Whether a mapping of process `pid` is of the file `path` (`/proc/PID/maps`).
pub(crate) fn maps_name(pid: i32, path: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|maps| maps.lines().any(|l| l.ends_with(path)))
}

/// The thread ids of process `pid` (`/proc/PID/task`), sorted, the main thread first.
pub fn threads(pid: i32) -> io::Result<Vec<i32>> {
    let mut tids: Vec<i32> =
        fs::read_dir(format!("/proc/{pid}/task"))?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    tids.sort_unstable();
    Ok(tids)
}

/// Whether `signal` is pending for thread `tid` of process `pid` alone (`SigPnd` of its
/// status file; the process-wide `ShdPnd` is not looked at). False if it cannot be read.
pub fn thread_signal_pending(pid: i32, tid: i32, signal: i32) -> bool {
    let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    signal_mask(&status, "SigPnd").is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// The signal mask `field` (`SigPnd`, `ShdPnd`, `SigBlk`, `SigIgn`, `SigCgt`) of a
/// `/proc/PID[/task/TID]/status` text: bit `n - 1` for signal `n`.
pub fn signal_mask(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
}

/// Whether a signal is pending that thread `tid` of process `pid` does not block: one for
/// it (`SigPnd`) or for the process (`ShdPnd`), not in its `SigBlk`. True if it cannot be
/// read (the careful answer for a caller about to assume there is none).
pub fn deliverable_signal_pending(pid: i32, tid: i32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else { return true };
    let mask = |field| signal_mask(&status, field);
    match (mask("SigPnd"), mask("ShdPnd"), mask("SigBlk")) {
        (Some(own), Some(shared), Some(blocked)) => (own | shared) & !blocked != 0,
        _ => true,
    }
}

/// What a thread is doing, from `/proc/PID/task/TID/syscall`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadActivity {
    /// Running (or runnable) in user space or the kernel.
    Running,
    /// Blocked, but not in a system call (e.g. a page fault or a stop).
    Blocked,
    /// Blocked in system call `nr` (`libc::SYS_*`); `pc` is the user address after the
    /// `syscall` instruction.
    InSyscall {
        /// The system call number.
        nr: i64,
        /// The user-space instruction pointer.
        pc: u64,
    },
}

/// What thread `tid` of process `pid` is doing right now (it may change at once); needs
/// the same permission as attaching.
pub fn thread_activity(pid: i32, tid: i32) -> io::Result<ThreadActivity> {
    let text = fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall"))?;
    let fields: Vec<&str> = text.split_whitespace().collect();
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    Ok(match fields.as_slice() {
        ["running", ..] => ThreadActivity::Running,
        ["-1", ..] => ThreadActivity::Blocked,
        [nr, .., pc] => match (nr.parse(), hex(pc)) {
            (Ok(nr), Some(pc)) => ThreadActivity::InSyscall { nr, pc },
            _ => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected syscall file: {text}"))),
        },
        _ => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected syscall file: {text}"))),
    })
}
