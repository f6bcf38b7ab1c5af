//! The environment a traced program's `exec`s carry so that dynprobe follows them.
//!
//! A program dynprobe starts finds the agent through `LD_PRELOAD` and its settings in
//! `DYNPROBE_*` variables; every image it (or a child) `exec`s must find them too. Passing
//! them down in the program's own environment has two faults: the program sees them
//! (`env` prints them, a program checking `LD_PRELOAD` behaves otherwise), and an `exec`
//! given an environment of the program's making (`env -i`, a `subprocess` with `env=`, a
//! service manager's clean environment) loses them, and with them the trace. So the agent
//! hands them here and takes them out of the program's environment, and the `execve`
//! guard ([`crate::signals`]) puts them into the environment of every `exec`: each one the
//! new environment lacks is added, and `LD_PRELOAD` gets the agent in front of the
//! program's own preloads.
//!
//! The guard runs in a probe handler (and in a `vfork` child: `posix_spawn`, `system`),
//! so the new environment is built without allocating, on the stack: at most
//! [`MAX_ENTRIES`] variables. A larger environment is passed on as the program made it.

use std::ffi::CString;
use std::sync::atomic::{AtomicPtr, Ordering};

/// The most variables an environment rebuilt on the stack holds.
pub(crate) const MAX_ENTRIES: usize = 384;
/// Room for the merged `LD_PRELOAD=…` string.
const PRELOAD_MAX: usize = 1024;
/// The longest variable name compared (ours are shorter).
const NAME_MAX: usize = 64;

/// What every `exec` must carry: set by the agent before a program it was preloaded into
/// runs (for the process's life), or for the length of an attach session.
struct Carried {
    /// `NAME=value`, as the program was started with them.
    entries: Vec<CString>,
    /// The agent's path, which `LD_PRELOAD` must name.
    agent: CString,
    /// A path that exists as long as the session does (a recording's ring directory's
    /// recording file, which the CLI removes at its end): once it is gone, nothing is
    /// carried.
    alive_while: Option<CString>,
}

/// The `execve` guard reads this in a handler (and in a `vfork` child), where it may take
/// no lock and allocate nothing: so a plain pointer to a value that is never freed. A value
/// replaced or cleared stays allocated (leaked), as a guard may still be reading it; one
/// attach session leaks one, a few hundred bytes.
static CARRIED: AtomicPtr<Carried> = AtomicPtr::new(std::ptr::null_mut());

/// Makes every `exec` of this process carry `entries` (`NAME=value` strings, `LD_PRELOAD`
/// among them, naming `agent` first) from now on, whatever environment the program gives
/// it; see the module's documentation. With `alive_while`, only while that path exists:
/// the session they are for lasts as long (a process that outlives it, a child forked
/// during an attach session, `exec`s untraced afterwards). Only when nothing is carried
/// yet: `false` (and no change) when something is, as for a program started with the agent
/// preloaded, whose environment lasts its life.
pub fn carry_into_exec(entries: Vec<CString>, agent: CString, alive_while: Option<CString>) -> bool {
    let carried = Box::into_raw(Box::new(Carried { entries, agent, alive_while }));
    let set = CARRIED.compare_exchange(std::ptr::null_mut(), carried, Ordering::AcqRel, Ordering::Acquire);
    if set.is_err() {
        // SAFETY: made by Box::into_raw above and published nowhere.
        drop(unsafe { Box::from_raw(carried) });
    }
    set.is_ok()
}

/// Makes the `exec`s from now on carry nothing (an attach session ended): they get the
/// environment the program gives them. What was carried stays allocated, as a guard running
/// on another thread may still be reading it.
pub fn stop_carrying_into_exec() {
    CARRIED.store(std::ptr::null_mut(), Ordering::Release);
}

/// Whether something is carried into the `exec`s now ([`carry_into_exec`]).
pub fn exec_environment_carried() -> bool {
    !CARRIED.load(Ordering::Acquire).is_null()
}

/// What is carried now, if anything.
fn carried() -> Option<&'static Carried> {
    // SAFETY: a non-null value came from Box::into_raw in carry_into_exec and is never freed
    // once published (see CARRIED).
    unsafe { CARRIED.load(Ordering::Acquire).as_ref() }
}

impl Carried {
    /// Whether the session is on: its path (if it has one) exists. A raw
    /// `faccessat` (access(2)), as the guard calls nothing of the C library.
    fn alive(&self) -> bool {
        let Some(dir) = &self.alive_while else { return true };
        // SAFETY: a NUL-terminated path that lives as long as `self`.
        let result = unsafe {
            crate::raw::syscall4(libc::SYS_faccessat, libc::AT_FDCWD as u64, dir.as_ptr() as u64, libc::F_OK as u64, 0)
        };
        result == 0
    }
}

/// An environment rebuilt for one `execve`, on the caller's stack.
pub(crate) struct ExecEnvironment {
    pointers: [u64; MAX_ENTRIES + 1],
    preload: [u8; PRELOAD_MAX],
}

impl ExecEnvironment {
    /// Room for a rebuilt environment (uninitialized contents are never read).
    pub(crate) const fn new() -> Self {
        ExecEnvironment { pointers: [0; MAX_ENTRIES + 1], preload: [0; PRELOAD_MAX] }
    }

    /// The environment to `execve` with instead of the program's `envp`: `None` when
    /// nothing is carried, `envp` already has everything, or it cannot be rebuilt (too many
    /// variables, unreadable memory — the call then fails as it would have, or runs
    /// untraced). Reads the program's strings with `process_vm_readv`, so a bad pointer is
    /// never a fault here. Allocates nothing.
    pub(crate) fn build(&mut self, envp: u64) -> Option<u64> {
        let carried = carried()?;
        if envp == 0 || !carried.alive() {
            return None;
        }
        // The program's variables, then ours that it lacks.
        let mut n = 0;
        let mut has = [false; 32];
        let mut preload_merged = false;
        loop {
            let mut word = [0u8; 8];
            if !crate::raw::read(envp + 8 * n as u64, &mut word) {
                return None;
            }
            let entry = u64::from_le_bytes(word);
            if entry == 0 {
                break;
            }
            if n == MAX_ENTRIES {
                return None;
            }
            let mut name = [0u8; NAME_MAX];
            let name = read_name(entry, &mut name)?;
            let mut pointer = entry;
            for (i, ours) in carried.entries.iter().enumerate().take(has.len()) {
                if name_of(ours.to_bytes()) != name {
                    continue;
                }
                has[i] = true;
                if name == b"LD_PRELOAD" {
                    // The program's preloads stay, behind the agent unless they name it.
                    match self.merge_preload(entry, carried.agent.to_bytes()) {
                        Merge::AlreadyThere => {}
                        Merge::Merged(at) => {
                            pointer = at;
                            preload_merged = true;
                        }
                        Merge::TooLong => return None,
                    }
                }
            }
            self.pointers[n] = pointer;
            n += 1;
        }
        let missing = carried.entries.iter().enumerate().filter(|(i, _)| !has.get(*i).copied().unwrap_or(true));
        let before = n;
        for (_, entry) in missing {
            if n == MAX_ENTRIES {
                return None;
            }
            self.pointers[n] = entry.as_ptr() as u64;
            n += 1;
        }
        if n == before && !preload_merged {
            return None;
        }
        self.pointers[n] = 0;
        Some(self.pointers.as_ptr() as u64)
    }

    /// `LD_PRELOAD=<agent>:<the program's>` in `self.preload`, unless the program's value
    /// (the string at `entry`) names the agent already.
    fn merge_preload(&mut self, entry: u64, agent: &[u8]) -> Merge {
        const NAME: &[u8] = b"LD_PRELOAD=";
        let head = NAME.len() + agent.len() + 1;
        if head >= PRELOAD_MAX {
            return Merge::TooLong;
        }
        // The program's value goes straight to where it ends up, behind the agent's path.
        let Some(len) = read_string(entry + NAME.len() as u64, &mut self.preload[head..PRELOAD_MAX - 1]) else {
            return Merge::TooLong;
        };
        let value = &self.preload[head..head + len];
        // The loader splits LD_PRELOAD at colons and spaces (ld.so(8)).
        if value.split(|&b| b == b':' || b == b' ').any(|path| path == agent) {
            return Merge::AlreadyThere;
        }
        self.preload[..NAME.len()].copy_from_slice(NAME);
        self.preload[NAME.len()..NAME.len() + agent.len()].copy_from_slice(agent);
        self.preload[head - 1] = b':';
        self.preload[head + len] = 0;
        Merge::Merged(self.preload.as_ptr() as u64)
    }
}

enum Merge {
    AlreadyThere,
    Merged(u64),
    TooLong,
}

/// The name of a `NAME=value` string.
fn name_of(entry: &[u8]) -> &[u8] {
    &entry[..entry.iter().position(|&b| b == b'=').unwrap_or(entry.len())]
}

/// The name of the variable whose `NAME=value` string is at `addr`, read into `buf` (a
/// name longer than `buf` is returned cut, which matches none of ours).
fn read_name(addr: u64, buf: &mut [u8; NAME_MAX]) -> Option<&[u8]> {
    let len = read_string(addr, buf).unwrap_or(NAME_MAX);
    Some(name_of(&buf[..len]))
}

/// Reads the NUL-terminated string at `addr` into `buf`; its length, or `None` when it is
/// unreadable or longer than `buf` (whose bytes then hold its start). Reads at most up to
/// each page's end at once, so a string ending just before an unmapped page is read whole.
fn read_string(addr: u64, buf: &mut [u8]) -> Option<usize> {
    const PAGE: u64 = 4096;
    let mut done = 0;
    while done < buf.len() {
        let at = addr + done as u64;
        let chunk = ((PAGE - at % PAGE) as usize).min(buf.len() - done);
        if !crate::raw::read(at, &mut buf[done..done + chunk]) {
            return None;
        }
        if let Some(nul) = buf[done..done + chunk].iter().position(|&b| b == 0) {
            return Some(done + nul);
        }
        done += chunk;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_read_up_to_their_nul_and_names_cut_at_the_equals_sign() {
        let s = c"DYNPROBE_EVENT_FD=5";
        let mut buf = [0u8; 64];
        assert_eq!(read_string(s.as_ptr() as u64, &mut buf), Some(19));
        let mut name = [0u8; NAME_MAX];
        assert_eq!(read_name(s.as_ptr() as u64, &mut name), Some(&b"DYNPROBE_EVENT_FD"[..]));
        assert_eq!(read_string(s.as_ptr() as u64, &mut buf[..4]), None);
        assert_eq!(read_string(8, &mut buf), None);
    }
}
