//! What the symbol tests share.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// `len` bytes of process `pid`'s memory at `addr`.
pub fn read_memory(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    let mem = File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0; len];
    mem.read_exact_at(&mut buf, addr).unwrap();
    buf
}

/// A fresh-enough directory for test `name`'s build products, under cargo's test scratch
/// directory.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
