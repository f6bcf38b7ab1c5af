//! Events out of a traced program: the 16-byte [`record::Record`], per-thread lock-free
//! ring buffers in shared memory that the traced threads write and the recorder drains
//! ([`ring`]), and the trace directory the recorder writes and the analyses read
//! ([`trace`], [`model`]).

pub mod model;
pub mod record;
