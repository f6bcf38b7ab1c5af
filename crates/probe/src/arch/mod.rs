//! The instruction-set-specific half of the probe layer: register sets, the thread pointer,
//! and what happens on a trap at a probe site (the kernel's `arch/x86/kernel/kprobes/`).

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::*;
