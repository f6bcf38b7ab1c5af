//! dynprobe.
