//! kprobes for a Linux process.
//!
//! Generic probe logic lives here (`registry`, `probe`); what depends on the instruction set
//! lives under `arch/` (the kernel's `kernel/kprobes.c` versus `arch/x86/kernel/kprobes/`).

mod api;
pub use api::*;
