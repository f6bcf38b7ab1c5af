//! [`Memory`]: another process's memory, read and written from outside while its threads
//! run or are stopped.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

use crate::sys;

/// The memory of process `pid`: reads by `process_vm_readv` (one system call, no file
/// offset), with `/proc/PID/mem` for what that cannot read, and writes through
/// `/proc/PID/mem`, which writes even to read-only mappings (the text of a program: the
/// kernel makes a private copy of the page, as for a debugger's breakpoints).
///
/// Opening `/proc/PID/mem` takes the same permission check as `ptrace` attaching. The
/// handle belongs to the process image it was opened on: after an `execve` it reads and
/// writes nothing, and a new one must be opened.
///
/// Writes are not atomic for running threads: patching code that other threads may be
/// executing needs the int3-first protocol (crate `text`).
#[derive(Debug)]
pub struct Memory {
    pid: i32,
    file: File,
}

impl Memory {
    /// Opens the memory of process `pid` for reading and writing.
    pub fn open(pid: i32) -> io::Result<Memory> {
        let file = OpenOptions::new().read(true).write(true).open(format!("/proc/{pid}/mem"))?;
        Ok(Memory { pid, file })
    }

    /// The process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Fills `buf` with the bytes at `addr`; fails if any of them cannot be read.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        // process_vm_readv stops at a page it may not read (no PROT_READ), which
        // /proc/PID/mem reads like a debugger: it gets the rest.
        let done = sys::read_vm(self.pid, addr, buf).unwrap_or(0);
        if done == buf.len() {
            return Ok(());
        }
        self.file.read_exact_at(&mut buf[done..], addr + done as u64)
    }

    /// The `len` bytes at `addr`.
    pub fn read_vec(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.read(addr, &mut buf)?;
        Ok(buf)
    }

    /// The little-endian 64-bit word at `addr`.
    pub fn read_u64(&self, addr: u64) -> io::Result<u64> {
        let mut buf = [0; 8];
        self.read(addr, &mut buf)?;
        Ok(u64::from_le_bytes(buf))
    }

    /// Writes `data` at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, addr)
    }

    /// Writes `new` at `addr` only if `expected` is there, else fails naming what was
    /// found: the "verify, then modify" rule of the text layer.
    pub fn replace(&self, addr: u64, expected: &[u8], new: &[u8]) -> io::Result<()> {
        let found = self.read_vec(addr, expected.len())?;
        if found != expected {
            return Err(io::Error::other(format!(
                "expected {expected:02x?} at {addr:#x} but found {found:02x?}; leaving it alone"
            )));
        }
        self.write(addr, new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_writes_and_verifies_before_replacing() {
        // Our own memory is another process's for the system calls involved.
        let mut cell = Box::new([1u8, 2, 3, 4, 5, 6, 7, 8]);
        let addr = cell.as_mut_ptr() as u64;
        let mem = Memory::open(std::process::id() as i32).expect("opening /proc/self/mem");
        assert_eq!(mem.read_vec(addr, 3).unwrap(), [1, 2, 3]);
        assert_eq!(mem.read_u64(addr).unwrap(), u64::from_le_bytes([1, 2, 3, 4, 5, 6, 7, 8]));
        mem.replace(addr, &[1, 2], &[9, 9]).unwrap();
        let e = mem.replace(addr, &[1, 2], &[0, 0]).unwrap_err();
        assert!(e.to_string().contains("found [09, 09]"), "{e}");
        mem.write(addr + 7, &[0x42]).unwrap();
        // SAFETY: the kernel wrote through /proc/self/mem; read it back through a
        // volatile load so the compiler does not reuse the values it knows.
        let now = unsafe { std::ptr::read_volatile(cell.as_ptr().cast::<[u8; 8]>()) };
        assert_eq!(now, [9, 9, 3, 4, 5, 6, 7, 0x42]);
        // An unmapped page fails instead of reading zeros.
        assert!(mem.read_vec(8, 4).is_err());
    }
}
