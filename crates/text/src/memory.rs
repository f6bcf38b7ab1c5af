//! Verify-then-modify reads and writes of code in this process.
//!
//! Reads go through `process_vm_readv` on our own pid, so an unmapped address is an error
//! (`Unreadable`), never a `SIGSEGV`. Writes go through `/proc/self/mem`, which writes into
//! read-only executable mappings the way `ptrace(POKETEXT)` does, without ever making a page
//! writable and executable at once and without racing another thread's `mprotect`.

use crate::TextError;
use std::fs::{File, OpenOptions};
use std::sync::{Mutex, MutexGuard};

/// Reads `buf.len()` bytes at `addr`.
pub fn read(addr: u64, buf: &mut [u8]) -> Result<(), TextError> {
    if buf.is_empty() {
        return Ok(());
    }
    let unreadable = TextError::Unreadable { addr, len: buf.len() };
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as usize as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: `local` describes `buf`, which we borrow mutably for the whole call; `remote` is
    // only an address the kernel checks against our own mappings (an unmapped range yields
    // EFAULT or a short count, never a fault in this process).
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    // A short count means the range runs into an unmapped page: the caller asked for all of it.
    if n < 0 || n as usize != buf.len() {
        return Err(unreadable);
    }
    Ok(())
}

/// Reads `len` bytes at `addr` into a new vector.
pub fn read_vec(addr: u64, len: usize) -> Result<Vec<u8>, TextError> {
    let mut v = vec![0u8; len];
    read(addr, &mut v)?;
    Ok(v)
}

/// Checks that the bytes at `addr` are `expected`.
///
/// Does not allocate unless it fails or `expected` is longer than 64 bytes, so it may run
/// while other threads are held stopped (one of them may hold the allocator's lock).
pub fn verify(addr: u64, expected: &[u8]) -> Result<(), TextError> {
    let mut small = [0u8; 64];
    let mut large = Vec::new();
    let found = if expected.len() <= small.len() {
        &mut small[..expected.len()]
    } else {
        large.resize(expected.len(), 0);
        &mut large[..]
    };
    read(addr, found)?;
    if found != expected {
        return Err(TextError::Unexpected { addr, expected: expected.to_vec(), found: found.to_vec() });
    }
    Ok(())
}

/// The `/proc/self/mem` handle and the pid it was opened by.
///
/// It is kept open (opening it per write would cost a path walk each time), but a file opened
/// as `/proc/self/mem` stays bound to the address space of the process that opened it: a
/// child created by `fork` inherits the descriptor and would write into its *parent's* code.
/// So the handle remembers its pid and is reopened when it differs. The mutex also makes
/// verify-then-write atomic with respect to other writers in this process.
///
/// The program may close the descriptor under us (a sandbox or a daemon closing every
/// descriptor it did not open: bubblewrap does) and reuse its number for a file of its own,
/// which a write of code would then go into. So the handle also remembers what it is (device
/// and inode) and is checked before each writer takes it: a number that no longer holds
/// `/proc/self/mem` is forgotten, never closed (it is not ours any more), and the file opened
/// again.
static PROC_MEM: Mutex<Option<ProcMem>> = Mutex::new(None);

/// The open `/proc/self/mem`: its opener's pid, the file, and its (device, inode).
struct ProcMem {
    pid: u32,
    file: File,
    id: (u64, u64),
}

impl ProcMem {
    fn open(pid: u32) -> std::io::Result<ProcMem> {
        let file = OpenOptions::new().read(true).write(true).open("/proc/self/mem")?;
        let id = identity(&file).ok_or_else(std::io::Error::last_os_error)?;
        Ok(ProcMem { pid, file, id })
    }

    /// Whether the descriptor still holds the file it was opened as, in process `pid`.
    fn still_ours(&self, pid: u32) -> bool {
        self.pid == pid && identity(&self.file) == Some(self.id)
    }
}

/// The (device, inode) the descriptor refers to now, if it is open. Through the `syscall`
/// instruction, as [`pwrite`] is: the C library's `fstat` may be the code being patched.
fn identity(file: &File) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    // SAFETY: all-zero is a valid `struct stat`; fstat writes only into it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat(fd, &st) writes one `struct stat` into `st`, live for the call.
    let r = unsafe {
        crate::raw::syscall4(libc::SYS_fstat, file.as_raw_fd() as u64, &mut st as *mut libc::stat as u64, 0, 0)
    };
    (r == 0).then_some((st.st_dev, st.st_ino))
}

/// Verify-then-modify in one raw write: checks that `addr` holds `expected`, then writes
/// `new` (same length). No cross-modification protocol: use it for a single byte, or for
/// memory no thread can be executing (a fresh slot). For live multi-byte code use
/// [`crate::transaction`].
///
/// # Panics
///
/// If `expected` and `new` differ in length (a caller bug, not a property of the target).
pub fn write_verified(addr: u64, expected: &[u8], new: &[u8]) -> Result<(), TextError> {
    let mut writer = CodeWriter::lock().map_err(|e| match e {
        TextError::Unwritable { reason, .. } => TextError::Unwritable { addr, reason },
        other => other,
    })?;
    writer.write_verified(addr, expected, new)
}

/// The process's code writer, held: what [`write_verified`] takes for one write.
///
/// Take it *before* stopping the other threads when writing while they are stopped: a
/// stopped thread may have been holding it, and the writer would then wait forever. Taking
/// it also opens `/proc/self/mem` if needed, so that writes under it allocate nothing.
pub struct CodeWriter {
    guard: MutexGuard<'static, Option<ProcMem>>,
}

impl CodeWriter {
    /// Takes the writer (waiting for another writer of this process to finish).
    pub fn lock() -> Result<CodeWriter, TextError> {
        // Never called from a signal handler, so a poisoned lock only means another writer
        // panicked; the handle itself is still sound.
        let mut guard = PROC_MEM.lock().unwrap_or_else(|e| e.into_inner());
        let pid = std::process::id();
        if !guard.as_ref().is_some_and(|mem| mem.still_ours(pid)) {
            // A forked child's copy of the parent's file is closed; a number the program
            // closed, and perhaps reused, is not ours to close.
            if let Some(old) = guard.take() {
                if identity(&old.file) != Some(old.id) {
                    std::mem::forget(old.file);
                }
            }
            let mem = ProcMem::open(pid)
                .map_err(|e| TextError::Unwritable { addr: 0, reason: format!("cannot open /proc/self/mem: {e}") })?;
            *guard = Some(mem);
        }
        Ok(CodeWriter { guard })
    }

    /// Many small edits of code in one range, with one read and one write of the range (the
    /// batch form of [`Self::write_verified`]): the range `[start, start + scratch.len())` is
    /// read into `scratch`; each edit `(addr, expected, new)` inside it whose bytes are
    /// `expected` is applied there, and `applied[i]` says whether edit `i` was; then the range
    /// is written back whole. Bytes outside the edits are written back as they were read, so
    /// use it only while no other writer can change them and no thread executes them (every
    /// other thread stopped). `scratch` is the caller's, so nothing allocates.
    ///
    /// # Panics
    ///
    /// If an edit lies outside the range, an edit's `expected` and `new` differ in length, or
    /// `applied` is shorter than `edits`.
    pub fn write_span(
        &mut self,
        start: u64,
        scratch: &mut [u8],
        edits: &[(u64, &[u8], &[u8])],
        applied: &mut [bool],
    ) -> Result<(), TextError> {
        read(start, scratch)?;
        let mut changed = false;
        for (i, &(addr, expected, new)) in edits.iter().enumerate() {
            assert_eq!(expected.len(), new.len(), "write_span: expected and new differ in length");
            let at = (addr - start) as usize;
            let bytes = &mut scratch[at..at + expected.len()];
            applied[i] = bytes == expected;
            if applied[i] {
                bytes.copy_from_slice(new);
                changed |= expected != new;
            }
        }
        if !changed {
            return Ok(());
        }
        let Some(mem) = self.guard.as_ref() else { unreachable!("opened by lock()") };
        let len = scratch.len();
        match pwrite(mem, scratch, start) {
            Ok(n) if n == len => Ok(()),
            result => {
                let written = *result.as_ref().unwrap_or(&0);
                // A short write changed a prefix: put the old bytes back so nothing is left
                // half-changed, as the error promises.
                for (i, &(addr, expected, _)) in edits.iter().enumerate() {
                    let at = (addr - start) as usize;
                    if applied[i] {
                        scratch[at..at + expected.len()].copy_from_slice(expected);
                    }
                    applied[i] = false;
                }
                let _ = pwrite(mem, &scratch[..written], start);
                let errno = result.err().and_then(|e| e.raw_os_error()).unwrap_or(0);
                Err(TextError::WriteFailed { addr: start, written, len, errno })
            }
        }
    }

    /// Writes `new` at `addr` whose bytes the caller has just checked itself, under this
    /// writer (the pool's fresh slots: it reads its own memory without a system call).
    pub(crate) fn write_checked(&mut self, addr: u64, expected: &[u8], new: &[u8]) -> Result<(), TextError> {
        let Some(mem) = self.guard.as_ref() else { unreachable!("opened by lock()") };
        match pwrite(mem, new, addr) {
            Ok(n) if n == new.len() => Ok(()),
            Ok(n) => {
                // A short write changed a prefix: put the old bytes back so nothing is left
                // half-changed, as the error promises.
                let _ = pwrite(mem, &expected[..n], addr);
                Err(TextError::Unwritable {
                    addr,
                    reason: format!("only {n} of {} byte(s) could be written; restored", new.len()),
                })
            }
            Err(e) => Err(TextError::Unwritable { addr, reason: e.to_string() }),
        }
    }

    /// [`write_verified`] with the writer already held.
    ///
    /// # Panics
    ///
    /// If `expected` and `new` differ in length.
    pub fn write_verified(&mut self, addr: u64, expected: &[u8], new: &[u8]) -> Result<(), TextError> {
        assert_eq!(expected.len(), new.len(), "write_verified: expected and new differ in length");
        verify(addr, expected)?;
        if expected == new {
            return Ok(());
        }
        self.write_checked(addr, expected, new)
    }
}
/// `pwrite(2)` through the `syscall` instruction rather than a C library function: the code
/// being patched may be that very function (a probe on `pwrite64`, or the probe layer's
/// signal guard on `syscall()`), which the writer must not run while the bytes it is made
/// of are half-written.
///
/// The descriptor is checked to be `/proc/self/mem` still right before (see [`PROC_MEM`]):
/// the writer is held across many writes while the program's threads run, and one of them
/// may close the number and open a file of its own under it meanwhile.
fn pwrite(mem: &ProcMem, bytes: &[u8], addr: u64) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    if identity(&mem.file) != Some(mem.id) {
        return Err(std::io::Error::other("the program closed dynprobe's /proc/self/mem descriptor"));
    }
    let mem = &mem.file;
    // SAFETY: writes `bytes.len()` bytes from a live slice to our own open descriptor.
    let n = unsafe {
        crate::raw::syscall4(
            libc::SYS_pwrite64,
            mem.as_raw_fd() as u64,
            bytes.as_ptr() as u64,
            bytes.len() as u64,
            addr,
        )
    };
    if n < 0 {
        return Err(std::io::Error::from_raw_os_error(-n as i32));
    }
    Ok(n as usize)
}
