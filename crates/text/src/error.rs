//! Errors of code modification.

use std::fmt;

/// Why a code read or write was refused. Nothing was written when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TextError {
    /// The bytes could not be read: the address is not mapped (`EFAULT`).
    Unreadable {
        /// First byte of the range.
        addr: u64,
        /// Length of the range.
        len: usize,
    },
    /// The bytes in place are not the ones the caller expected (`EINVAL`): someone else
    /// changed the code, or the caller's idea of it is wrong. Nothing is written.
    Unexpected {
        /// First byte of the range.
        addr: u64,
        /// What the caller expected.
        expected: Vec<u8>,
        /// What is there.
        found: Vec<u8>,
    },
    /// The code could not be written (`EPERM`), with the operating system's reason.
    Unwritable {
        /// First byte of the range.
        addr: u64,
        /// The reason.
        reason: String,
    },
    /// A range write failed or was cut short; what was written is restored. Carries
    /// numbers only, so that it can be made while other threads are stopped (nothing may
    /// allocate then).
    WriteFailed {
        /// First byte of the range.
        addr: u64,
        /// Bytes written before the failure (restored since).
        written: usize,
        /// Bytes of the range.
        len: usize,
        /// The `errno` of the failure; 0 for a short write.
        errno: i32,
    },
    /// No executable memory could be mapped within ±2 GiB of `target`.
    NoNearMemory {
        /// The address the memory must be near.
        target: u64,
        /// Bytes requested.
        size: usize,
    },
    /// The trap dispatcher's site table is full.
    TrapTableFull,
    /// Other threads could not be brought to a stop.
    StopFailed {
        /// Why.
        reason: String,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextError::Unreadable { addr, len } => {
                write!(f, "cannot read {len} byte(s) of code at {addr:#x}: address not mapped (EFAULT)")
            }
            TextError::Unexpected { addr, expected, found } => write!(
                f,
                "code at {addr:#x} is not what was expected (EINVAL): expected [{}], found [{}]; \
                 another tool may have patched it, nothing was written",
                hex(expected),
                hex(found)
            ),
            TextError::Unwritable { addr, reason } => {
                write!(f, "cannot write code at {addr:#x} (EPERM): {reason}")
            }
            TextError::WriteFailed { addr, written, len, errno } => {
                write!(f, "cannot write {len} byte(s) of code at {addr:#x}: ")?;
                match errno {
                    0 => write!(f, "only {written} could be written; restored"),
                    e => write!(f, "{}", std::io::Error::from_raw_os_error(*e)),
                }
            }
            TextError::NoNearMemory { target, size } => {
                write!(f, "no free address range for {size} bytes of executable memory within ±2 GiB of {target:#x}")
            }
            TextError::TrapTableFull => write!(f, "too many breakpoint sites: the trap table is full"),
            TextError::StopFailed { reason } => write!(f, "could not stop the other threads: {reason}"),
        }
    }
}

impl std::error::Error for TextError {}
