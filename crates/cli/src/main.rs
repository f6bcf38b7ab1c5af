//! The `dynprobe` command.
fn main() {}
