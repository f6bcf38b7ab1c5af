//! Events out of a traced program: the 16-byte [`record::Record`], per-thread lock-free
//! ring buffers in shared memory that the traced threads write and the recorder drains
//! ([`ring`]), the clock that stamps them ([`clock`]), and the trace directory the recorder
//! writes ([`recorder`]) and the analyses read ([`trace`], [`model`]).

pub mod clock;
pub mod ending;
pub mod error;
pub mod files;
pub mod marker;
pub mod model;
pub mod record;
pub mod recorder;
pub mod ring;
pub mod trace;

pub use error::EventsError;

#[cfg(test)]
mod testutil;
