//! Instruction facts for dynprobe, the way the kernel's `arch/x86/kernel/kprobes/` keeps them
//! apart from the generic probe logic.
//!
//! This crate is *pure*: it reads byte strings and returns byte strings. It never touches
//! process memory, never makes a system call and contains no `unsafe`. Everything the probe
//! layer needs to know about an instruction — where instructions start, whether one can run
//! out of line, what it becomes at another address — is answered here and unit-tested on
//! byte strings.
//!
//! Only x86-64 exists today; an `aarch64` module will sit beside it, selected the same way.
#![forbid(unsafe_code)]

pub mod x86_64;

#[cfg(target_arch = "x86_64")]
pub use x86_64 as native;
