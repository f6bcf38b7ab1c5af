//! Placing one parsed probe spec in this process: `@SYMBOL`s resolved, the event format
//! built, an entry probe (`p`) or a return probe (`r`) registered with the handlers of
//! [`Event`].

use crate::channel::Channel;
use crate::event::Event;
use dynprobe::spec::{ProbeKind, ProbeSpec};
use dynprobe::{Probe, ProbeHandle, ReturnProbe, ReturnProbeHandle, DEFAULT_MAXACTIVE};
use dynprobe_symbols::{SymbolError, SymbolTable};
use std::sync::Arc;

/// A placed probe of either kind.
#[derive(Debug)]
pub enum Placed {
    /// A `p` spec's probe.
    Entry(ProbeHandle),
    /// An `r` spec's return probe.
    Return(ReturnProbeHandle),
}

impl Placed {
    /// Removes the probe, restoring the patched bytes.
    pub fn unregister(self) -> Result<(), String> {
        match self {
            Placed::Entry(handle) => handle.unregister().map(drop),
            Placed::Return(handle) => handle.unregister().map(drop),
        }
        .map_err(|e| e.to_string())
    }

    /// Keeps the probe for the rest of the process's life.
    pub fn leak(self) {
        match self {
            Placed::Entry(handle) => handle.leak(),
            Placed::Return(handle) => handle.leak(),
        }
    }
}

/// Places `spec`, whose hits go to `channel` as event lines. Its `@SYMBOL`s are looked up
/// in the symbol table of the process as it is now (function symbols, then data symbols).
/// The probe starts as a breakpoint and is jump-optimized in the background; call
/// [`dynprobe::wait_for_optimizer`] to have that done.
pub fn place(spec: &ProbeSpec, channel: Channel) -> Result<Placed, String> {
    let mut spec = spec.clone();
    if spec.needs_symbols() {
        let table = SymbolTable::current_process().map_err(|e| e.to_string())?;
        spec.resolve_symbols(|name| lookup(&table, name))?;
    }
    let event = Arc::new(Event::new(&spec, channel)?);
    let placed = match spec.kind {
        ProbeKind::Entry => {
            Probe::at(spec.location.clone()).on_hit(move |regs| event.hit(regs)).register().map(Placed::Entry)
        }
        ProbeKind::Return => {
            let at_entry = event.clone();
            ReturnProbe::at(spec.location.clone())
                .maxactive(spec.maxactive.unwrap_or(DEFAULT_MAXACTIVE))
                .on_entry(move |regs, data| at_entry.enter(regs, data))
                .on_return(move |regs, data| event.returned(regs, data))
                .register()
                .map(Placed::Return)
        }
    };
    placed.map_err(|e| e.to_string())
}

/// The address of `[module:]name`: a function from the table, else a data object (a
/// global variable) from the module files' symbol tables, which the table leaves out.
fn lookup(table: &SymbolTable, spec: &str) -> Result<u64, String> {
    match table.lookup(spec) {
        Ok(symbol) => Ok(symbol.addr),
        Err(err @ SymbolError::UnknownSymbol { .. }) => data_symbol(table, spec).ok_or_else(|| err.to_string()),
        Err(err) => Err(err.to_string()),
    }
}

/// A data symbol's runtime address, searched in the module `spec` names (matched like the
/// table matches modules: its file name, its path, or a prefix of the name ending at `.`
/// or `-`) or in every module.
fn data_symbol(table: &SymbolTable, spec: &str) -> Option<u64> {
    use object::{Object, ObjectSymbol, SymbolKind};
    let (module, name) = match spec.split_once(':') {
        Some((module, name)) if !name.starts_with(':') && !module.is_empty() => (Some(module), name),
        _ => (None, spec),
    };
    let in_scope = |m: &dynprobe_symbols::Module| match module {
        None => true,
        Some(wanted) => {
            m.name == wanted
                || m.path.as_os_str() == wanted
                || m.name.strip_prefix(wanted).is_some_and(|rest| rest.starts_with(['.', '-']))
        }
    };
    table.modules().iter().filter(|m| in_scope(m)).find_map(|m| {
        let data = std::fs::read(&m.path).ok()?;
        let file = object::File::parse(&*data).ok()?;
        let found = file
            .symbols()
            .chain(file.dynamic_symbols())
            .find(|s| s.kind() == SymbolKind::Data && s.is_definition() && s.name() == Ok(name))?;
        Some(found.address().wrapping_add(m.bias))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A global of this test binary, found as a data symbol.
    #[no_mangle]
    static DYNPROBE_AGENT_TEST_GLOBAL: u64 = 0x5eed;

    #[test]
    fn data_symbols_resolve_to_their_runtime_address() {
        let table = SymbolTable::current_process().unwrap();
        let addr = lookup(&table, "DYNPROBE_AGENT_TEST_GLOBAL").unwrap();
        assert_eq!(addr, std::ptr::addr_of!(DYNPROBE_AGENT_TEST_GLOBAL) as u64);
        // Functions come from the table itself.
        assert_eq!(lookup(&table, "libc:malloc").unwrap(), table.lookup("libc:malloc").unwrap().addr);
        let err = lookup(&table, "no_such_symbol_anywhere").unwrap_err();
        assert!(err.contains("no_such_symbol_anywhere"), "{err}");
    }
}
