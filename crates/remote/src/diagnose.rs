//! Finding out why the kernel refused an attach, from `/proc`: the kernel only says `EPERM`
//! (or `ESRCH`), the user needs to know what to change.
//!
//! The checks follow the order of the kernel's own `ptrace_attach()`: a thread of our own
//! process, an existing tracer, then `__ptrace_may_access()` (uids/gids, dumpable), then
//! Yama's `ptrace_scope`.

use std::fs;

use crate::error::{AttachError, PermissionReason};
use crate::proc::{self, Status};

/// `CAP_SYS_PTRACE`'s bit in `CapEff`.
const CAP_SYS_PTRACE: u32 = 19;

/// What to report for an `ESRCH` from attaching to `tid` of process `pid`.
pub(crate) fn vanished(pid: i32, tid: i32) -> AttachError {
    match Status::read(pid, tid) {
        // A zombie is still listed: it exited, nobody has reaped it yet.
        Some(status) if status.state.starts_with('Z') || status.state.starts_with('X') => AttachError::Exited { pid },
        Some(_) => AttachError::Os { tid, op: "PTRACE_SEIZE", error: std::io::Error::from_raw_os_error(libc::ESRCH) },
        None if proc::exists(pid) => AttachError::NotAThreadOf { pid, tid },
        None => AttachError::NoSuchProcess { pid },
    }
}

/// The reason for an `EPERM` from attaching to `tid` of process `pid`.
pub(crate) fn not_permitted(pid: i32, tid: i32) -> AttachError {
    let Some(target) = Status::read(pid, tid) else {
        return vanished(pid, tid);
    };
    if target.state.starts_with('Z') || target.state.starts_with('X') {
        return AttachError::Exited { pid };
    }
    AttachError::NotPermitted { pid, reason: reason(pid, &target) }
}

fn reason(pid: i32, target: &Status) -> PermissionReason {
    let ours = Status::read_self();
    let our_pid = std::process::id() as i32;
    if target.tgid == our_pid {
        return PermissionReason::OwnProcess;
    }
    if target.tracer_pid != 0 {
        let tracer_name = fs::read_to_string(format!("/proc/{}/comm", target.tracer_pid)).unwrap_or_default();
        let tracer_tgid = Status::read(target.tracer_pid, target.tracer_pid).map(|s| s.tgid);
        return PermissionReason::AlreadyTraced {
            tracer_pid: target.tracer_pid,
            tracer_name: tracer_name.trim_end().to_string(),
            by_us: tracer_tgid == Some(our_pid),
        };
    }
    if target.is_kernel_thread {
        return PermissionReason::KernelThread;
    }
    let Some(ours) = ours else {
        return PermissionReason::Unknown;
    };
    let privileged = ours.cap_eff & (1 << CAP_SYS_PTRACE) != 0;
    if !privileged {
        // __ptrace_may_access: every one of the target's real/effective/saved uids (and
        // gids) must equal our real uid (gid).
        if target.uids.iter().any(|&u| u != ours.uids[0]) || target.gids.iter().any(|&g| g != ours.gids[0]) {
            return PermissionReason::DifferentUser { target_uid: target.uids[1], our_uid: ours.uids[1] };
        }
        // A non-dumpable process's /proc/PID files belong to root whatever its uid.
        if proc::owner_uid(pid) == Some(0) && target.uids[1] != 0 {
            return PermissionReason::NotDumpable;
        }
    }
    match ptrace_scope() {
        Some(3) => PermissionReason::PtraceScope { scope: 3 },
        Some(2) if !privileged => PermissionReason::PtraceScope { scope: 2 },
        Some(1) if !privileged && !proc::is_descendant(target.tgid, our_pid) => {
            PermissionReason::PtraceScope { scope: 1 }
        }
        _ => PermissionReason::Unknown,
    }
}

/// `kernel.yama.ptrace_scope`, `None` without Yama.
pub fn ptrace_scope() -> Option<u32> {
    fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok()?.trim().parse().ok()
}
