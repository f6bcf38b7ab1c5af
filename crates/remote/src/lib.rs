//! Another process under `ptrace`: attaching to it (with the reason when that is not
//! allowed), reading and writing its registers and memory, calling a function or making a
//! system call on one of its stopped threads, and loading the dynprobe agent into it.
//!
//! [`Tracee`] keeps track of every thread's state and polls them one by one; a tracer with
//! its own event loop takes the threads over with [`Tracee::into_threads`] and drives them
//! with the raw requests of [`sys`], reading and writing memory through [`Memory`].
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
mod memory;
mod proc;
mod seccomp;
pub mod sys;
mod tracee;
mod unload;

pub use call::{find_syscall_instruction, Arg, CallError};
pub use diagnose::ptrace_scope;
pub use error::{AttachError, Error, PermissionReason};
pub use inject::{inject_library, inject_library_timeout, InjectError, Injected, DEFAULT_CALL_TIMEOUT};
pub use memory::Memory;
pub use proc::{
    deliverable_signal_pending, signal_mask, thread_activity, thread_signal_pending, threads, ThreadActivity,
};
pub use tracee::{Event, Options, Regs, Stop, Tracee};
pub use unload::{unload_library, UnloadError};
