//! Whether a process's seccomp filters let the injection and dynprobe's agent make their
//! system calls — checked before anything is changed in it, because a sandboxed program
//! (a systemd unit's `SystemCallFilter=`, OpenSSH's pre-authentication child, a browser's
//! renderer) is killed by the kernel on the first system call its filter forbids: the
//! loader's `mmap`, the agent's `socket`, a probe's `process_vm_readv`. Nothing a tracer
//! does afterwards can bring it back, so the only safe answer is to not attach.
//!
//! The filters are read with `PTRACE_SECCOMP_GET_FILTER` from the thread the injection has
//! stopped (which needs `CAP_SYS_ADMIN`) and run, as the kernel would run them, over every
//! system call in [`calls::AGENT_CALLS`]. A call the filter allows (or only logs) is fine;
//! one it makes fail with an `errno` is fine where that failure is handled (a fallback);
//! anything else — kill, trap, an `errno` where none is handled, a supervisor's or a
//! tracer's decision — refuses the attach, naming the call and what the filter would do.
//! Filters that cannot be read refuse it too: dynprobe does not gamble with the program.

mod bpf;
mod calls;

use std::io;

use crate::inject::InjectError;
use crate::proc::{self, Status};
use crate::sys;

use bpf::{Insn, SyscallData};
use calls::{AgentCall, AGENT_CALLS, ARCH};

// The actions of `linux/seccomp.h` (`SECCOMP_RET_*`), the top 16 bits of a filter's result.
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0x0000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_USER_NOTIF: u32 = 0x7fc0_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ACTION: u32 = 0xffff_0000;

/// The most filters a thread is read for (the kernel caps their total length far below).
const MAX_FILTERS: usize = 1024;

/// Refuses (with the reason) an injection into process `pid` through its stopped thread
/// `tid` when a seccomp filter of the process could kill it, or fail a call the agent needs,
/// or cannot be read.
pub(crate) fn check(pid: i32, tid: i32) -> Result<(), InjectError> {
    let refuse = |why: String| Err(InjectError::Seccomp { pid, why });
    let threads = proc::threads(pid).unwrap_or_default();
    let statuses: Vec<(i32, Status)> = threads.into_iter().filter_map(|t| Some((t, Status::read(pid, t)?))).collect();
    if let Some((t, _)) = statuses.iter().find(|(_, s)| s.seccomp == 1) {
        return refuse(format!(
            "thread {t} runs in seccomp's strict mode, where any system call but read, write, exit and \
             sigreturn kills the process"
        ));
    }
    let Some(chosen) = statuses.iter().find(|(t, _)| *t == tid).map(|(_, s)| s) else {
        // The thread is stopped by us: it cannot have gone. Its status unreadable, nothing
        // can be known.
        return refuse(format!("the status of thread {tid} cannot be read"));
    };
    // Threads under filters other than the stopped thread's cannot be read (the kernel
    // hands out a thread's filters only while it is stopped); the same count is taken as the
    // same filters, which a sandbox installs on every thread at once (SECCOMP_FILTER_FLAG_TSYNC)
    // or before the threads are created.
    if let Some((t, s)) = statuses
        .iter()
        .find(|(_, s)| s.seccomp == 2 && (chosen.seccomp != 2 || s.seccomp_filters != chosen.seccomp_filters))
    {
        let count = |s: &Status| s.seccomp_filters.map_or("some".to_string(), |n| n.to_string());
        return refuse(format!(
            "thread {t} runs under {} seccomp filter(s) and thread {tid}, the one the agent would be loaded \
             from, under {}: dynprobe can read only that thread's filters and cannot tell whether thread {t}'s \
             would kill the process",
            count(s),
            if chosen.seccomp == 2 { count(chosen) } else { "none".to_string() }
        ));
    }
    if chosen.seccomp != 2 {
        return Ok(());
    }
    let filters = match read_filters(tid) {
        Ok(filters) => filters,
        Err(e) if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EPERM) => {
            return unreadable(chosen).map_or(Ok(()), refuse);
        }
        Err(e) => return refuse(format!("it runs under a seccomp filter that cannot be read: {e}")),
    };
    match forbidden(&filters) {
        Ok(None) => Ok(()),
        Ok(Some((call, ret))) => refuse(format!(
            "its seccomp filter would {} on {}(2), a system call the agent makes",
            action(ret),
            call.name
        )),
        Err((index, bad)) => refuse(format!(
            "its seccomp filter {index} cannot be run as the kernel runs it (instruction {}: {})",
            bad.at, bad.why
        )),
    }
}

/// Why a filter the kernel would not hand out (`EACCES`) refuses the attach — or `None` when
/// it need not: dynprobe itself runs under as many filters as the process (a container's
/// runtime filter, which the kernel gives every process of the container and refuses to
/// show to any filtered tracer, root or not — `seccomp_get_filter` in kernel/seccomp.c): the
/// process's are then taken to be that same filter, which lets dynprobe's own process make
/// the same kinds of calls, rather than refuse every attach inside a container.
fn unreadable(process: &Status) -> Option<String> {
    let own = Status::read_self();
    match own.as_ref().map(|own| (own.seccomp, own.seccomp_filters)) {
        Some((2, Some(n))) if process.seccomp_filters == Some(n) => None,
        Some((2, own_count)) => Some(format!(
            "it runs under {} seccomp filter(s) and dynprobe itself under {} (a container's?): the kernel shows \
             no filtered tracer another process's filter (PTRACE_SECCOMP_GET_FILTER, ptrace(2)), so dynprobe cannot \
             tell whether the agent's system calls would kill the process",
            process.seccomp_filters.map_or("some".to_string(), |n| n.to_string()),
            own_count.map_or("some".to_string(), |n| n.to_string()),
        )),
        _ => Some(
            "it runs under a seccomp filter, which only a tracer with CAP_SYS_ADMIN may read \
             (PTRACE_SECCOMP_GET_FILTER, ptrace(2)); without reading it dynprobe cannot tell whether the agent's \
             system calls would kill the process (as root, the filter is read and checked)"
                .to_string(),
        ),
    }
}

/// The filters of stopped thread `tid`, the one installed last first (the order the kernel
/// runs them in: `seccomp_run_filters`).
fn read_filters(tid: i32) -> io::Result<Vec<Vec<Insn>>> {
    let mut filters = Vec::new();
    for index in 0..MAX_FILTERS {
        match sys::seccomp_filter(tid, index) {
            Ok(insns) => filters.push(insns.into_iter().map(Insn::from_bytes).collect()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && index > 0 => break,
            Err(e) => return Err(e),
        }
    }
    // Read oldest first (see `sys::seccomp_filter`).
    filters.reverse();
    Ok(filters)
}

/// The first of the agent's calls `filters` (the one installed last first) would not let
/// through, with what they would return for it; or a filter (by index) that cannot be run.
fn forbidden(filters: &[Vec<Insn>]) -> Result<Option<(&'static AgentCall, u32)>, (usize, bpf::BadFilter)> {
    for call in AGENT_CALLS {
        let data = SyscallData { nr: call.nr as i32, arch: ARCH, instruction_pointer: 0, args: call.args };
        let mut ret = RET_ALLOW;
        for (index, filter) in filters.iter().enumerate() {
            let this = bpf::run(filter, &data).map_err(|bad| (index, bad))?;
            // The kernel keeps the result whose action, read as a signed number, is lowest
            // (kill before trap before errno … before allow: `seccomp_run_filters`); of equal
            // actions the newest filter's, whose data (an errno) then counts.
            if ((this & RET_ACTION) as i32) < ((ret & RET_ACTION) as i32) {
                ret = this;
            }
        }
        let fine = match ret & RET_ACTION {
            RET_ALLOW | RET_LOG => true,
            RET_ERRNO => call.may_fail.allows((ret & 0xffff) as i32),
            _ => false,
        };
        if !fine {
            return Ok(Some((call, ret)));
        }
    }
    Ok(None)
}

/// What a filter's result `ret` does to a system call, as a verb phrase.
fn action(ret: u32) -> String {
    match ret & RET_ACTION {
        RET_KILL_PROCESS => "kill the process (SIGSYS)".to_string(),
        RET_KILL_THREAD => "kill the calling thread (SIGSYS)".to_string(),
        RET_TRAP => "send the process SIGSYS".to_string(),
        RET_ERRNO => format!("fail the call with {}", io::Error::from_raw_os_error((ret & 0xffff) as i32)),
        RET_USER_NOTIF => "hold the call for a supervising process to decide".to_string(),
        RET_TRACE => "hand the call to a seccomp tracer (or fail it with ENOSYS)".to_string(),
        other => format!("return the unknown action {other:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A filter that returns `ret` for system call `nr` and allows every other.
    fn on(nr: i64, ret: u32) -> Vec<Insn> {
        vec![
            Insn { code: 0x20, jt: 0, jf: 0, k: 0 },
            Insn { code: 0x15, jt: 0, jf: 1, k: nr as u32 },
            Insn { code: 0x06, jt: 0, jf: 0, k: ret },
            Insn { code: 0x06, jt: 0, jf: 0, k: RET_ALLOW },
        ]
    }

    /// A filter that kills system call `nr` when the word at `offset` of `struct
    /// seccomp_data` has any of `bits`, and allows everything else.
    fn kill_on_bits(nr: i64, offset: u32, bits: u32) -> Vec<Insn> {
        vec![
            Insn { code: 0x20, jt: 0, jf: 0, k: 0 },
            Insn { code: 0x15, jt: 0, jf: 3, k: nr as u32 },
            Insn { code: 0x20, jt: 0, jf: 0, k: offset },
            Insn { code: 0x45, jt: 0, jf: 1, k: bits },
            Insn { code: 0x06, jt: 0, jf: 0, k: RET_KILL_PROCESS },
            Insn { code: 0x06, jt: 0, jf: 0, k: RET_ALLOW },
        ]
    }

    #[test]
    fn a_filter_that_kills_a_call_of_the_agent_refuses_and_names_it() {
        let (call, ret) = forbidden(&[on(libc::SYS_socket, RET_KILL_PROCESS)]).unwrap().unwrap();
        assert_eq!((call.name, ret), ("socket", RET_KILL_PROCESS));
        assert_eq!(action(ret), "kill the process (SIGSYS)");
    }

    #[test]
    fn a_filter_that_allows_or_logs_every_call_of_the_agent_lets_it_attach() {
        assert_eq!(forbidden(&[on(libc::SYS_socket, RET_LOG)]).unwrap().map(|(c, _)| c.name), None);
        // A call the agent never makes.
        assert_eq!(forbidden(&[on(libc::SYS_reboot, RET_KILL_PROCESS)]).unwrap().map(|(c, _)| c.name), None);
    }

    #[test]
    fn an_errno_is_fine_only_where_the_agent_has_a_fallback() {
        // glibc falls back from clone3 to clone on ENOSYS (what Docker's default profile
        // answers), on nothing else.
        let enosys = RET_ERRNO | libc::ENOSYS as u32;
        assert_eq!(forbidden(&[on(libc::SYS_clone3, enosys)]).unwrap().map(|(c, _)| c.name), None);
        let eperm = RET_ERRNO | libc::EPERM as u32;
        assert_eq!(forbidden(&[on(libc::SYS_clone3, eperm)]).unwrap().map(|(c, _)| c.name), Some("clone3"));
        // rseq's registration failing is ignored by glibc, whatever the errno.
        assert_eq!(forbidden(&[on(libc::SYS_rseq, eperm)]).unwrap().map(|(c, _)| c.name), None);
        let (call, ret) = forbidden(&[on(libc::SYS_mmap, RET_ERRNO | 1)]).unwrap().unwrap();
        assert_eq!(call.name, "mmap");
        assert!(action(ret).starts_with("fail the call with"), "{}", action(ret));
    }

    #[test]
    fn the_strictest_result_of_all_filters_counts() {
        // The last installed (first here) allows; an older one traps.
        let filters = [on(libc::SYS_connect, RET_ALLOW), on(libc::SYS_connect, RET_TRAP)];
        let (call, ret) = forbidden(&filters).unwrap().unwrap();
        assert_eq!((call.name, ret & RET_ACTION), ("connect", RET_TRAP));
        // A kill of the thread (action 0) wins over an errno.
        let filters = [on(libc::SYS_getpid, RET_ERRNO | 1), on(libc::SYS_getpid, RET_KILL_THREAD)];
        assert_eq!(forbidden(&filters).unwrap().unwrap().1, RET_KILL_THREAD);
    }

    #[test]
    fn of_two_errnos_the_newest_filter_s_counts() {
        // The newest filter (first) fails clone3 with EPERM, an older one with ENOSYS: glibc
        // gets EPERM, and does not fall back to clone.
        let eperm = RET_ERRNO | libc::EPERM as u32;
        let enosys = RET_ERRNO | libc::ENOSYS as u32;
        let filters = [on(libc::SYS_clone3, eperm), on(libc::SYS_clone3, enosys)];
        assert_eq!(forbidden(&filters).unwrap().map(|(c, r)| (c.name, r)), Some(("clone3", eperm)));
        let filters = [on(libc::SYS_clone3, enosys), on(libc::SYS_clone3, eperm)];
        assert_eq!(forbidden(&filters).unwrap().map(|(c, _)| c.name), None);
    }

    #[test]
    fn a_filter_on_the_socket_s_type_sees_the_control_socket_s() {
        // socket(…, SOCK_SEQPACKET (5)…) is killed by a test of bit 4 of its type, which a
        // stream socket (1) would pass.
        assert_eq!(forbidden(&[kill_on_bits(libc::SYS_socket, 24, 4)]).unwrap().unwrap().0.name, "socket");
    }

    #[test]
    fn a_filter_on_mmap_s_protection_is_run_with_the_loader_s_protections() {
        // mmap with PROT_EXEC (args[2], low word at offset 32) is killed.
        let filter = kill_on_bits(libc::SYS_mmap, 32, libc::PROT_EXEC as u32);
        assert_eq!(forbidden(&[filter]).unwrap().unwrap().0.name, "mmap");
    }

    #[test]
    fn a_broken_filter_is_named_by_its_index() {
        let broken = vec![Insn { code: 0x20, jt: 0, jf: 0, k: 0 }];
        let (index, bad) = forbidden(&[on(libc::SYS_reboot, RET_KILL_PROCESS), broken]).unwrap_err();
        assert_eq!((index, bad.why), (1, "the program runs past its end"));
    }
}
