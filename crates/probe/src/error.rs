//! Why a probe operation was refused.

use dynprobe_arch::native::{DecodeError, Refusal, RelocError};
use dynprobe_symbols::SymbolError;
use dynprobe_text::TextError;
use std::fmt;

/// Why a probe could not be registered, changed or removed. A refused registration leaves
/// the process exactly as it was.
///
/// Its message is complete on its own; where it wraps the error of a lower layer (the
/// symbol tables, the decoder, the code writer), [`source`](std::error::Error::source) gives
/// that error too.
///
/// ```
/// # extern crate dynprobe_probe as dynprobe;
/// use std::error::Error;
/// let err = dynprobe::Probe::at("no_such_function_here").on_hit(|_| {}).register().unwrap_err();
/// assert!(err.to_string().contains("no_such_function_here"), "{err}");
/// assert!(matches!(err, dynprobe::ProbeError::Symbol(_)));
/// assert_eq!(err.source().map(|cause| cause.to_string()), Some(err.to_string()));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum ProbeError {
    /// The symbol or module is unknown, or the symbol tables could not be read.
    Symbol(SymbolError),
    /// The address is not the start of an instruction, or the bytes do not decode.
    Decode(DecodeError),
    /// The instruction at the probe point cannot be executed out of line.
    NotRelocatable(RelocError),
    /// A post-handler was asked for on an instruction whose successor is not known.
    PostHandlerRefused {
        /// The probe point.
        addr: u64,
        /// Why.
        reason: String,
    },
    /// The probe point is inside dynprobe's own machinery (the kernel's `__kprobes`
    /// blacklist): probing it would recurse into the trap handler.
    Blacklisted {
        /// The probe point.
        addr: u64,
        /// What is there.
        what: String,
    },
    /// An offset past the end of the function.
    OffsetOutsideFunction {
        /// The function.
        symbol: String,
        /// The requested offset.
        offset: u64,
        /// The function's size.
        size: u64,
    },
    /// The symbol is a GNU indirect function (its address is the resolver that runs once
    /// at load time, not the implementation calls reach) whose implementation could not be
    /// found.
    Ifunc {
        /// The symbol.
        symbol: String,
        /// Why its implementation is not known.
        reason: String,
    },
    /// Reading or writing code failed.
    Text(TextError),
    /// A probe was unregistered from inside a handler, which would wait for itself.
    InsideHandler,
    /// The probe point cannot be jump-optimized, and a breakpoint there could be hit while
    /// `SIGTRAP` is blocked, which the kernel turns into the death of the process.
    BreakpointUnsafe {
        /// The probe point.
        addr: u64,
        /// Why `SIGTRAP` may be blocked.
        hazard: String,
        /// Why it cannot be jump-optimized.
        not_optimized: String,
    },
    /// dynprobe's signal guards cannot be removed while other probes remain.
    SignalsInUse {
        /// How many probes remain.
        probes: usize,
    },
    /// A return probe must be at a function's first instruction, where the return address
    /// is at `rsp`.
    ReturnProbeNotAtEntry {
        /// The function.
        symbol: String,
        /// The requested offset.
        offset: u64,
    },
    /// A return probe on a function that returns more than once per call (`setjmp`,
    /// `vfork`, `getcontext`).
    ReturnsTwice {
        /// The function.
        symbol: String,
    },
    /// Every return-probe index is in use.
    TooManyReturnProbes {
        /// How many return probes may be registered at once.
        max: usize,
    },
    /// The return-probe machinery could not be set up or torn down.
    ReturnProbeSetup {
        /// Why.
        reason: String,
    },
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Symbol(e) => write!(f, "{e}"),
            ProbeError::Decode(e) => write!(f, "{e}"),
            ProbeError::NotRelocatable(e) => write!(f, "cannot probe here: {e}"),
            ProbeError::PostHandlerRefused { addr, reason } => {
                write!(f, "cannot put a post-handler on the probe at {addr:#x}: {reason}")
            }
            ProbeError::Blacklisted { addr, what } => write!(
                f,
                "refusing to probe {addr:#x} ({what}): it is part of dynprobe's own probe machinery, \
                 and a probe there would be hit again from inside its own hit, without end"
            ),
            ProbeError::OffsetOutsideFunction { symbol, offset, size } => {
                write!(f, "offset {offset:#x} is outside `{symbol}`, which is {size:#x} bytes long")
            }
            ProbeError::Ifunc { symbol, reason } => write!(
                f,
                "`{symbol}` is an IFUNC: its symbol is the resolver that picks an implementation when \
                 the program loads, so a probe there would never fire on calls, and the implementation \
                 chosen is not known: {reason}; probe the implementation by its name instead (e.g. \
                 `__memmove_avx_unaligned_erms` for memcpy, in the library's debug symbols: `nm` of \
                 /usr/lib/debug/.build-id/…)"
            ),
            ProbeError::Text(e) => write!(f, "{e}"),
            ProbeError::ReturnProbeNotAtEntry { symbol, offset } => write!(
                f,
                "a return probe goes on a function's entry, not `{symbol}+{offset:#x}`: use `{symbol}` (only at the \
                 first instruction is the return address where the probe can replace it)"
            ),
            ProbeError::ReturnsTwice { symbol } => write!(
                f,
                "`{symbol}` can return more than once per call, and its second return would find the \
                 return probe's instance gone: probe its callers instead"
            ),
            ProbeError::TooManyReturnProbes { max } => {
                write!(f, "{max} return probes are registered already; unregister one first")
            }
            ProbeError::ReturnProbeSetup { reason } => write!(f, "return probes: {reason}"),
            ProbeError::BreakpointUnsafe { addr, hazard, not_optimized } => write!(
                f,
                "refusing a breakpoint probe at {addr:#x}: {hazard}, and the kernel kills a process \
                 that hits an int3 with SIGTRAP blocked; it cannot be jump-optimized instead \
                 ({not_optimized})"
            ),
            ProbeError::SignalsInUse { probes } => write!(
                f,
                "SIGTRAP cannot be given back to the program while {probes} probe(s) remain (their int3s need dynprobe's handler)"
            ),
            ProbeError::InsideHandler => {
                write!(f, "a probe cannot be unregistered from inside a probe handler (it would wait for itself)")
            }
        }
    }
}

/// The error this one wraps, where it wraps one (its message is part of this one's
/// `Display` too, which is complete on its own).
impl std::error::Error for ProbeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProbeError::Symbol(e) => Some(e),
            ProbeError::Decode(e) => Some(e),
            ProbeError::NotRelocatable(e) => Some(e),
            ProbeError::Text(e) => Some(e),
            _ => None,
        }
    }
}

impl From<SymbolError> for ProbeError {
    fn from(e: SymbolError) -> Self {
        ProbeError::Symbol(e)
    }
}

impl From<DecodeError> for ProbeError {
    fn from(e: DecodeError) -> Self {
        ProbeError::Decode(e)
    }
}

impl From<TextError> for ProbeError {
    fn from(e: TextError) -> Self {
        ProbeError::Text(e)
    }
}

impl From<RelocError> for ProbeError {
    fn from(e: RelocError) -> Self {
        ProbeError::NotRelocatable(e)
    }
}

impl From<Refusal> for ProbeError {
    fn from(e: Refusal) -> Self {
        ProbeError::NotRelocatable(RelocError::Refused(e))
    }
}
