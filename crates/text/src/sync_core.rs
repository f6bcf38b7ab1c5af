//! Core serialization: the process-local "sync all CPUs" step between cross-modification
//! steps, by `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`.

/// Makes every thread of this process execute a serializing instruction before it next runs
/// user code, so none of them can still execute stale instruction bytes. Registers for the
/// command once on first use; where the kernel lacks it, falls back to a stop-the-world
/// round trip (signal delivery serializes).
pub fn sync_core() {
    todo!()
}
