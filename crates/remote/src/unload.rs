//! Unloading a library [`crate::inject_library`] loaded: one thread of the process, chosen
//! and stopped as for the load (see the `inject` module), calls the process's own
//! `dlclose` on the handle `dlopen` returned, as many times as it was loaded.
//!
//! The caller makes sure that nothing of the library is in use any more: no thread runs
//! its code or has a frame of it on its stack, and nothing the process keeps (a signal
//! action, a patched instruction, a registered callback) points into it. The dynamic loader
//! then runs its destructors and unmaps it (`dlclose(3)`; it keeps it, silently, while a
//! thread-local destructor of it is pending on some thread).

use std::fmt;
use std::time::Duration;

use dynprobe_symbols::{SymbolError, SymbolTable};

use crate::call::Arg;
use crate::error::AttachError;
use crate::inject::{seize_safe_thread, InjectError};

/// Why a library could not be unloaded.
#[derive(Debug)]
#[non_exhaustive]
pub enum UnloadError {
    /// No thread could make the call, or the call failed (as for a load).
    Call(InjectError),
    /// The process has no `dlclose`.
    NoDlclose,
    /// The stack of the library's last thread could not be unmapped (nothing was unloaded).
    Stack {
        /// Its address.
        addr: u64,
    },
    /// `dlclose` returned an error.
    Refused {
        /// `dlerror()`'s message.
        message: String,
    },
}

impl fmt::Display for UnloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnloadError::Call(e) => e.fmt(f),
            UnloadError::NoDlclose => write!(f, "no loaded library exports dlclose"),
            UnloadError::Stack { addr } => write!(f, "munmap of the agent's last thread stack at {addr:#x} failed"),
            UnloadError::Refused { message } => write!(f, "dlclose failed: {message}"),
        }
    }
}

/// The error this one wraps, where it wraps one (its message is part of this one's
/// `Display` too, which is complete on its own).
impl std::error::Error for UnloadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UnloadError::Call(e) => Some(e),
            _ => None,
        }
    }
}

impl<E: Into<InjectError>> From<E> for UnloadError {
    fn from(e: E) -> UnloadError {
        UnloadError::Call(e.into())
    }
}

/// Calls `dlclose(handle)` `times` times in process `pid`, each call allowed `timeout`,
/// after unmapping `stack` (`(address, length)`: the stack of the library's last thread,
/// ended, which nothing inside the process can free once the library is gone).
/// `Err` when no thread could make the call, the call failed, or `dlclose` returned an
/// error (with `dlerror()`'s reason when the process has one).
pub fn unload_library(
    pid: i32,
    handle: u64,
    times: u64,
    stack: Option<(u64, u64)>,
    timeout: Duration,
) -> Result<(), UnloadError> {
    let table = SymbolTable::for_pid(pid).map_err(|e| match e {
        SymbolError::NoSuchProcess { pid } => InjectError::Attach(AttachError::NoSuchProcess { pid }),
        e => InjectError::Symbols(e),
    })?;
    let find = |names: &[&str]| {
        names.iter().find_map(|n| table.lookup(n).ok().filter(|s| !table.modules()[s.module].is_main).map(|s| s.addr))
    };
    let Some(dlclose) = find(&["libc:dlclose", "libdl:dlclose", "dlclose"]) else {
        return Err(UnloadError::NoDlclose);
    };
    let dlerror = find(&["libc:dlerror", "libdl:dlerror", "dlerror"]);
    let munmap = find(&["libc:munmap", "munmap"]);
    let (mut tracee, tid) = seize_safe_thread(pid, &table)?;
    // The calls return through a stub written at the end of some module's code (see the
    // `call` module): not into the library, or one it loaded, which `dlclose` unmaps before
    // it returns, but into a module that lives as long as the process.
    let lasting = table.modules().iter().filter(|m| m.is_main || m.is_c_runtime());
    tracee.keep_stub_in(lasting.map(|m| m.path.to_string_lossy().into_owned()).collect())?;
    let call = |tracee: &mut crate::Tracee, function: &str, addr: u64, args: &[Arg]| {
        tracee.call_with(tid, addr, args, timeout).map_err(|error| InjectError::Call {
            function: function.to_string(),
            tid,
            location: None,
            error,
        })
    };
    // Through the C library's `munmap`, a call that returns through the return stub: a
    // system call made by single-stepping a `syscall` instruction would leave the thread
    // with the trap flag set, and killed by its SIGTRAP, were this process killed meanwhile
    // (the kernel does not clear it when the tracer dies).
    if let Some((addr, len)) = stack {
        let unmapped = match munmap {
            Some(munmap) => call(&mut tracee, "munmap", munmap, &[Arg::Value(addr), Arg::Value(len)])? as i32 == 0,
            None => tracee.munmap(tid, addr, len, timeout).is_ok(),
        };
        if !unmapped {
            tracee.detach()?;
            return Err(UnloadError::Stack { addr });
        }
    }
    // The library's path, from its `struct link_map` (`l_addr`, then `l_name`; <link.h>):
    // the agent counts loads a killed CLI left undone, so `times` may be one more than the
    // loads left should an earlier CLI have been killed between two `dlclose` calls, and a
    // `dlclose` of a library already unloaded would use a freed handle. Each call after the
    // first is made only while the library is still mapped.
    let mut name_at = [0u8; 8];
    tracee.read_memory(handle + 8, &mut name_at)?;
    let path = tracee.read_c_string(u64::from_le_bytes(name_at), 4096)?;
    let path = String::from_utf8_lossy(&path).into_owned();
    for n in 0..times {
        if n > 0 && !path.is_empty() && !crate::proc::maps_name(pid, &path) {
            break;
        }
        if call(&mut tracee, "dlclose", dlclose, &[Arg::Value(handle)])? as u32 != 0 {
            let message = match dlerror {
                Some(dlerror) => match call(&mut tracee, "dlerror", dlerror, &[])? {
                    0 => "no reason given".to_string(),
                    text => String::from_utf8_lossy(&tracee.read_c_string(text, 4096)?).into_owned(),
                },
                None => "no reason given".to_string(),
            };
            tracee.detach()?;
            return Err(UnloadError::Refused { message });
        }
    }
    tracee.detach()?;
    Ok(())
}
