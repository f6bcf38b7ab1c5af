//! What can go wrong while setting up tracing.

use std::fmt;

/// An error of the function tracer.
#[derive(Debug)]
#[non_exhaustive]
pub enum FtraceError {
    /// An `-F` pattern matched no function.
    NoMatch {
        /// The pattern as given.
        pattern: String,
        /// The closest function names, best first.
        nearest: Vec<String>,
    },
    /// Reading the process's symbols failed.
    Symbols(dynprobe_symbols::SymbolError),
    /// Writing code failed.
    Text(dynprobe_text::TextError),
    /// The probe layer refused (return hooks, plain-entry probes).
    Probe(dynprobe_probe::ProbeError),
    /// The tracer is already running in this process.
    AlreadyRunning,
    /// The ring file has fewer rings than there are thread slots.
    TooFewRings {
        /// Rings in the file.
        rings: usize,
        /// Rings needed: one per thread slot.
        needed: usize,
    },
}

impl fmt::Display for FtraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FtraceError::NoMatch { pattern, nearest } if nearest.is_empty() => {
                write!(f, "no function matches -F '{pattern}'")
            }
            FtraceError::NoMatch { pattern, nearest } => {
                write!(f, "no function matches -F '{pattern}' (nearest: {})", nearest.join(", "))
            }
            FtraceError::Symbols(e) => write!(f, "cannot read the program's symbols: {e}"),
            FtraceError::Text(e) => write!(f, "cannot patch the function sites: {e}"),
            FtraceError::Probe(e) => write!(f, "{e}"),
            FtraceError::AlreadyRunning => write!(f, "the function tracer is already running in this process"),
            FtraceError::TooFewRings { rings, needed } => {
                write!(f, "the ring file has {rings} rings; one per thread slot, {needed}, are needed")
            }
        }
    }
}

/// The error this one wraps, where it wraps one (its message is part of this one's
/// `Display` too, which is complete on its own).
impl std::error::Error for FtraceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FtraceError::Symbols(e) => Some(e),
            FtraceError::Text(e) => Some(e),
            FtraceError::Probe(e) => Some(e),
            _ => None,
        }
    }
}

impl From<dynprobe_symbols::SymbolError> for FtraceError {
    fn from(e: dynprobe_symbols::SymbolError) -> Self {
        FtraceError::Symbols(e)
    }
}

impl From<dynprobe_text::TextError> for FtraceError {
    fn from(e: dynprobe_text::TextError) -> Self {
        FtraceError::Text(e)
    }
}

impl From<dynprobe_probe::ProbeError> for FtraceError {
    fn from(e: dynprobe_probe::ProbeError) -> Self {
        FtraceError::Probe(e)
    }
}
