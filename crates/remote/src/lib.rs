//! Another process under `ptrace`: attaching to it (with the reason when that is not
//! allowed), reading and writing its registers and memory, calling a function or making a
//! system call on one of its stopped threads, and loading the dynprobe agent into it.
//!
//! x86-64 Linux only.
//!
//! ```no_run
//! use std::time::Duration;
//! use dynprobe_remote::{Options, Tracee};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pid = 4242;
//! let mut tracee = Tracee::seize(pid, Options::NONE)?; // every thread; they keep running
//! tracee.stop(pid, Duration::from_secs(1))?;
//! let regs = tracee.regs(pid)?;
//! let mut word = [0u8; 8];
//! tracee.read_memory(regs.rsp, &mut word)?;
//! tracee.cont(pid, 0)?;
//! tracee.detach()?; // or drop it
//! # Ok(()) }
//! ```

mod call;
mod diagnose;
mod error;
mod inject;
mod proc;
mod sys;
mod tracee;

pub use call::{Arg, CallError};
pub use diagnose::ptrace_scope;
pub use error::{AttachError, Error, PermissionReason};
pub use inject::{inject_library, inject_library_timeout, InjectError, Injected, DEFAULT_CALL_TIMEOUT};
pub use proc::{thread_activity, threads, ThreadActivity};
pub use tracee::{Event, Options, Regs, Stop, Tracee};
