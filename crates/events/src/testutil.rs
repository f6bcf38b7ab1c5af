//! Helpers for this crate's tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh directory under the system's temporary directory, removed with what it holds when
/// dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory whose name contains `name`.
    pub fn new(name: &str) -> TempDir {
        TempDir::under(&std::env::temp_dir(), name)
    }

    /// A new empty directory in `/dev/shm`, where `dynprobe record` puts its ring files
    /// (shared memory: a file there behaves as the recorder's ring files do).
    pub fn in_memory(name: &str) -> TempDir {
        let shm = Path::new("/dev/shm");
        assert!(shm.is_dir(), "this test needs /dev/shm, as dynprobe record uses it");
        TempDir::under(shm, name)
    }

    fn under(parent: &Path, name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!("dynprobe-events-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
