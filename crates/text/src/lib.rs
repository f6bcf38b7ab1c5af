//! Writing code safely into the running process — the layer the kernel calls `text_poke`.
//!
//! * [`memory`]: verify-then-modify. Every write first compares the bytes in place with what
//!   the caller expects; unreadable, unexpected and unwritable each give their own error
//!   (as the kernel's dynamic ftrace reports them: `EFAULT` / `EINVAL` / `EPERM`, see
//!   `ftrace_bug()` in kernel/trace/ftrace.c).
//! * [`transaction`]: the one protocol every writer of live code uses — take the writer,
//!   bring the other threads to a safe state, verify and write (int3-first when some threads
//!   were left running), serialize the cores ([`sync_core`]), release.
//! * [`pool`]: executable memory within ±2 GiB of a given address, for slots and detours.
//! * [`stop`]: bringing every other thread to a stop (to inspect or move their `rip`), and
//!   the grace period that proves no thread is still inside the trap handler.
//! * [`trap`]: the process's one `SIGTRAP` dispatcher, which maps an `int3` address to its
//!   owner and passes every other trap on to the handler that was installed before.
//!
//! This layer does not know what a probe is.

pub mod error;
pub mod memory;
pub mod pool;
pub mod raw;
pub mod stop;
pub mod sync_core;
pub mod transaction;
pub mod trap;

pub use error::TextError;
