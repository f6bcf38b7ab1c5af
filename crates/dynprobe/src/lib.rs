//! dynprobe: dynamic instrumentation for Linux processes.
pub use dynprobe_probe::*;

pub mod spec;
