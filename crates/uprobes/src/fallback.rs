//! What the tracer leaves in the target so that the target survives the tracer's death:
//! the return trampoline, a `SIGTRAP` handler of its own and the tables that handler needs.
//!
//! The kernel cannot remove a dead debugger's breakpoints: when a tracer is killed, its
//! tracees are detached (`exit_ptrace`, `kernel/ptrace.c`) and the next `int3` they execute
//! is an ordinary `SIGTRAP`, fatal by default. So while probes are placed the tracer makes
//! its own handler ([`dynprobe_arch::native::trap_fallback`]) the target's `SIGTRAP` action,
//! remembering the program's. While the tracer lives that handler never runs for its traps:
//! it takes every `SIGTRAP` at the signal-delivery-stop and suppresses its own; a trap of the
//! program's own it delivers under the program's action (put back for that one delivery,
//! see `Tracer::deliver_foreign_trap`). Once the tracer is gone, the first trap of ours runs
//! the handler, which puts every hijacked return address back and resumes the thread in the
//! site's slot (or at the original return address); the original bytes follow at the first
//! trap half a second later (`RESTORE_DELAY_NS`: threads the tracer held at its traps
//! resume just past their `int3` when it dies, and must meet another `int3` there, not the
//! middle of the original instruction). At detach the
//! program's action is put back, unless the program installed one of its own meanwhile.
//!
//! ```text
//! code page (r-x)   +0   int3                     the return trampoline
//!                   +16  mov $15,%eax; syscall    sa_restorer (rt_sigreturn)
//!                   +24  the handler              sa_sigaction
//! data pages (rw-)  +0   the program's action     (struct sigaction of the syscall ABI, 32 bytes)
//!                   +32  our action
//!                   +64  a scratch action         (what rt_sigaction replaced, at detach)
//!                   +96  "/proc/self/mem"
//!                   +120 when the handler first ran (CLOCK_MONOTONIC ns; 0: never)
//!                   +128 sites                    (addr, slot, run length, page protection, original bytes)
//!                   ...  returns                  (stack slot, original return address); 0: free
//! ```
//!
//! Still impossible, or not done:
//! - a program that installs its own `SIGTRAP` action while probed replaces the fallback
//!   until the tracer next delivers one of the program's own traps (which re-arms it and
//!   keeps the program's action as the one to put back) or detaches;
//! - a thread that blocks `SIGTRAP` when it hits a probe makes the kernel reset the action's
//!   handler to the default (`force_sig_info_to_task` in `kernel/signal.c`), and unblock
//!   `SIGTRAP` in that thread: our action so reset is known by its restorer
//!   ([`Fallback::is_ours`]) and installed again right after that hit (the tracer sees
//!   `SIGTRAP` missing from `SigCgt`), and the program's is put back at detach — but the
//!   signal stays unblocked in that thread, and an action the program installed over ours
//!   since is lost to such a reset;
//! - signals the tracer held at a signal-delivery-stop when it died are lost (the kernel
//!   drops them), the program's own included;
//! - a thread held at the trap of a one-byte instruction whose successor is a branch target
//!   (so its run is that one byte) skips that instruction when the tracer dies, and one not
//!   scheduled within `RESTORE_DELAY_NS` of the first trap meets restored bytes mid-run;
//! - a thread returning from a signal handler into the second instruction of a run after
//!   the tracer died is sent to the run's start and runs the first instruction again;
//! - the tracer killed during one of its own system calls in the target (placing, detaching,
//!   delivering one of the program's traps: microseconds) leaves that thread at the
//!   `syscall` instruction it borrowed, with the call's registers;
//! - hijacked return addresses the program copied elsewhere, and more pending returns than
//!   the table holds ([`RETURN_CAPACITY`]: further return probes are not armed, and are
//!   counted as missed).

use dynprobe_arch::native::trap_fallback::{
    build_trap_fallback, Tables, RETURN_ENTRY, SITE_ENTRY, SITE_LEN, SITE_ORIG, SITE_PROT, SITE_SLOT,
};
use dynprobe_arch::native::INT3;

/// Return entries in the table: pending returns (over all threads) the handler can restore.
pub(crate) const RETURN_CAPACITY: usize = 8192;

const PAGE: u64 = 4096;
const RESTORER: u64 = 16;
const SAVED_ACTION: u64 = 0;
const OUR_ACTION: u64 = 32;
const REPLACED_ACTION: u64 = 64;
const PATH: u64 = 96;
const DEAD_SINCE: u64 = 120;
const SITES: u64 = 128;

/// `SA_RESTORER` of the x86-64 syscall ABI (`arch/x86/include/uapi/asm/signal.h`).
const SA_RESTORER: u64 = 0x0400_0000;

/// One probed run, as the handler's table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SiteEntry {
    /// The probed instruction.
    pub addr: u64,
    /// Its out-of-line slot.
    pub slot: u64,
    /// The bytes the `int3`s replaced (at most `SITE_MAX_RUN`).
    pub orig: Vec<u8>,
    /// The protection (`PROT_*`) of its page, for the handler's `mprotect` path.
    pub prot: u8,
}

/// The mapped fallback area.
#[derive(Debug)]
pub(crate) struct Fallback {
    /// The code page.
    pub code: u64,
    /// The first data page.
    pub data: u64,
    /// Length of the whole area.
    pub len: u64,
    site_count: usize,
    handler: u64,
    /// Free return entries.
    free: Vec<usize>,
    /// Whether our handler is the target's `SIGTRAP` action.
    pub installed: bool,
}

impl Fallback {
    /// The length of the area for `sites` sites.
    pub fn len_for(sites: usize) -> u64 {
        PAGE + Self::data_len(sites)
    }

    fn data_len(sites: usize) -> u64 {
        (SITES + sites as u64 * SITE_ENTRY + RETURN_CAPACITY as u64 * RETURN_ENTRY).next_multiple_of(PAGE)
    }

    /// The area mapped at `base` for `sites` sites (nothing written yet).
    pub fn at(base: u64, sites: usize) -> Fallback {
        Fallback {
            code: base,
            data: base + PAGE,
            len: Self::len_for(sites),
            site_count: sites,
            handler: 0,
            free: (0..RETURN_CAPACITY).rev().collect(),
            installed: false,
        }
    }

    /// The return trampoline's `int3`.
    pub fn trampoline(&self) -> u64 {
        self.code
    }

    fn tables(&self) -> Tables {
        Tables {
            trampoline: self.trampoline(),
            saved_action: self.data + SAVED_ACTION,
            proc_mem_path: self.data + PATH,
            dead_since: self.data + DEAD_SINCE,
            sites: self.data + SITES,
            site_count: self.site_count as u64,
            returns: self.returns(),
            return_count: RETURN_CAPACITY as u64,
        }
    }

    fn returns(&self) -> u64 {
        self.data + SITES + self.site_count as u64 * SITE_ENTRY
    }

    /// The code page's contents.
    pub fn code_image(&mut self) -> Result<Vec<u8>, String> {
        let built = build_trap_fallback(self.code + RESTORER, &self.tables()).map_err(|e| e.to_string())?;
        let mut page = vec![INT3; PAGE as usize];
        let at = RESTORER as usize;
        if at + built.code.len() > page.len() {
            return Err(format!("the fallback handler ({} bytes) does not fit its page", built.code.len()));
        }
        page[at..at + built.code.len()].copy_from_slice(&built.code);
        self.handler = self.code + RESTORER + built.handler;
        debug_assert_eq!(built.restorer, 0);
        Ok(page)
    }

    /// The head of the data pages (the actions, the path and the site table; the return
    /// table is all free, as mapped). Call after [`Fallback::code_image`].
    pub fn data_image(&self, sites: &[SiteEntry]) -> Vec<u8> {
        assert_eq!(sites.len(), self.site_count);
        let mut data = vec![0u8; (SITES + sites.len() as u64 * SITE_ENTRY) as usize];
        // Our action: every signal blocked while the handler runs, SA_SIGINFO for the
        // ucontext, our own restorer (a static program may have none to borrow).
        let action = [self.handler, libc::SA_SIGINFO as u64 | SA_RESTORER, self.code + RESTORER, u64::MAX];
        for (i, word) in action.iter().enumerate() {
            let at = OUR_ACTION as usize + 8 * i;
            data[at..at + 8].copy_from_slice(&word.to_le_bytes());
        }
        data[PATH as usize..PATH as usize + 14].copy_from_slice(b"/proc/self/mem");
        for (i, site) in sites.iter().enumerate() {
            let at = (SITES + i as u64 * SITE_ENTRY) as usize;
            data[at..at + 8].copy_from_slice(&site.addr.to_le_bytes());
            let slot = at + SITE_SLOT as usize;
            data[slot..slot + 8].copy_from_slice(&site.slot.to_le_bytes());
            data[at + SITE_LEN as usize] = site.orig.len() as u8;
            data[at + SITE_PROT as usize] = site.prot;
            let orig = at + SITE_ORIG as usize;
            data[orig..orig + site.orig.len()].copy_from_slice(&site.orig);
        }
        data
    }

    /// `rt_sigaction` arguments that make our handler the action and save the program's.
    pub fn install_args(&self) -> [u64; 6] {
        [libc::SIGTRAP as u64, self.data + OUR_ACTION, self.data + SAVED_ACTION, 8, 0, 0]
    }

    /// `rt_sigaction` arguments that put the program's action back and save what it
    /// replaced (ours, unless the program installed its own meanwhile).
    pub fn uninstall_args(&self) -> [u64; 6] {
        [libc::SIGTRAP as u64, self.data + SAVED_ACTION, self.data + REPLACED_ACTION, 8, 0, 0]
    }

    /// `rt_sigaction` arguments that put back what [`Fallback::uninstall_args`] replaced.
    pub fn reinstate_replaced_args(&self) -> [u64; 6] {
        [libc::SIGTRAP as u64, self.data + REPLACED_ACTION, 0, 8, 0, 0]
    }

    /// `rt_sigaction` arguments that read the current action into the scratch action.
    pub fn query_args(&self) -> [u64; 6] {
        [libc::SIGTRAP as u64, 0, self.data + REPLACED_ACTION, 8, 0, 0]
    }

    /// `rt_sigaction` arguments that make the saved program's action the current one.
    pub fn restore_saved_args(&self) -> [u64; 6] {
        [libc::SIGTRAP as u64, self.data + SAVED_ACTION, 0, 8, 0, 0]
    }

    /// Where the saved program's action is, and where the scratch action is (32 bytes each).
    pub fn saved_and_replaced(&self) -> (u64, u64) {
        (self.data + SAVED_ACTION, self.data + REPLACED_ACTION)
    }

    /// `rt_sigaction` arguments that make our handler the action again, after one delivery
    /// under the program's.
    pub fn reinstall_args(&self) -> [u64; 6] {
        [libc::SIGTRAP as u64, self.data + OUR_ACTION, 0, 8, 0, 0]
    }

    /// Where the handler address of what `uninstall_args` replaced is.
    pub fn replaced_handler_addr(&self) -> u64 {
        self.data + REPLACED_ACTION
    }

    /// Our handler's address (the `sa_sigaction` of our action).
    #[cfg(test)]
    pub fn handler(&self) -> u64 {
        self.handler
    }

    /// Whether `action` (a `struct sigaction` of the syscall ABI, as `rt_sigaction` wrote
    /// it) is ours — or was: a `SIGTRAP` forced on a thread that blocks it (our `int3` hit
    /// by a thread blocking every signal) resets the action's handler alone to `SIG_DFL`
    /// (`force_sig_info_to_task`, kernel/signal.c), and our restorer stays, which no action
    /// of the program's has. Taken for the program's, that reset lost the program's own
    /// handler: its next trap killed it.
    pub fn is_ours(&self, action: &[u8]) -> bool {
        let word = |i: usize| action.get(8 * i..8 * i + 8).map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")));
        word(0) == Some(self.handler) || (word(0) == Some(0) && word(2) == Some(self.code + RESTORER))
    }

    /// A free return entry, or `None` when the table is full.
    pub fn take_return(&mut self) -> Option<usize> {
        self.free.pop()
    }

    /// Gives back return entry `index` (the caller clears it in the target).
    pub fn give_back_return(&mut self, index: usize) {
        debug_assert!(!self.free.contains(&index));
        self.free.push(index);
    }

    /// The address of return entry `index` (slot, then original return address).
    pub fn return_entry(&self, index: usize) -> u64 {
        self.returns() + index as u64 * RETURN_ENTRY
    }
}

/// The protection (`PROT_*`) of the page holding each of `addrs` in process `pid`, from
/// `/proc/PID/maps`; read-execute where it cannot be told.
pub(crate) fn page_protections(pid: i32, addrs: &[u64]) -> Vec<u8> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let ranges: Vec<(u64, u64, u8)> = maps
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let perms = fields.next()?.as_bytes();
            let mut prot = 0u8;
            for (flag, bit) in [(b'r', libc::PROT_READ), (b'w', libc::PROT_WRITE), (b'x', libc::PROT_EXEC)] {
                if perms.contains(&flag) {
                    prot |= bit as u8;
                }
            }
            Some((u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?, prot))
        })
        .collect();
    let default = (libc::PROT_READ | libc::PROT_EXEC) as u8;
    addrs.iter().map(|&a| ranges.iter().find(|&&(s, e, _)| (s..e).contains(&a)).map_or(default, |r| r.2)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_follow_the_code_page() {
        let mut f = Fallback::at(0x10000, 3);
        assert_eq!(f.trampoline(), 0x10000);
        assert_eq!(f.data, 0x11000);
        let code = f.code_image().unwrap();
        assert_eq!(code.len(), 4096);
        assert_eq!(code[0], INT3, "the trampoline");
        assert_eq!(&code[16..23], &[0xb8, 15, 0, 0, 0, 0x0f, 0x05], "the restorer");
        assert!(f.handler() > 0x10010 && f.handler() < 0x11000);
        let sites = vec![SiteEntry { addr: 0x401000, slot: 0x20000, orig: vec![0x55, 0x48, 0x89], prot: 5 }; 3];
        let data = f.data_image(&sites);
        assert_eq!(&data[32..40], &f.handler().to_le_bytes(), "our action's handler");
        assert_eq!(&data[96..110], b"/proc/self/mem");
        let second = 128 + 40;
        assert_eq!(&data[second + 8..second + 16], &0x20000u64.to_le_bytes(), "the second site's slot");
        assert_eq!((data[second + 16], data[second + 17]), (3, 5), "the second site's run and protection");
        assert_eq!(&data[second + 24..second + 27], &[0x55, 0x48, 0x89]);
        assert_eq!(&data[120..128], &[0; 8], "the handler has not run");
        assert_eq!(f.return_entry(0), 0x11000 + 128 + 3 * 40);
        assert_eq!(f.len, 4096 + (128 + 120 + RETURN_CAPACITY as u64 * 16).next_multiple_of(4096));
    }

    #[test]
    fn return_entries_are_handed_out_and_given_back() {
        let mut f = Fallback::at(0x10000, 0);
        let a = f.take_return().unwrap();
        let b = f.take_return().unwrap();
        assert_ne!(a, b);
        f.give_back_return(a);
        assert_eq!(f.take_return(), Some(a));
        let mut taken = 2;
        while f.take_return().is_some() {
            taken += 1;
        }
        assert_eq!(taken, RETURN_CAPACITY);
    }

    #[test]
    fn page_protections_come_from_the_maps() {
        let code = page_protections as fn(i32, &[u64]) -> Vec<u8> as usize as u64;
        let prot = page_protections(std::process::id() as i32, &[code, 8]);
        assert_eq!(prot, vec![(libc::PROT_READ | libc::PROT_EXEC) as u8; 2]);
    }
}
