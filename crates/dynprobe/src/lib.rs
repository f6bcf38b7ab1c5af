//! dynprobe: dynamic instrumentation for Linux processes.
pub use dynprobe_probe::*;

pub mod fetch;
pub mod line;
pub mod marker;
pub use marker::{markers, Marker, MarkerHandle, MarkerHit};
pub mod spec;
