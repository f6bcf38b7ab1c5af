//! Where a probe goes: the one resolver of probe points, for both backends — this crate's
//! registry (probes inside the process) and the ptrace backend (`dynprobe-uprobes`, probes
//! from outside) — which differ only in how they learn what an indirect function resolved
//! to. It makes every check a symbol table can answer, before any code is read or written:
//! the symbol exists, an offset stays inside its function, an indirect function is probed
//! at its implementation, a return probe is at a function's entry and on a function that
//! returns once per call. (Whether the address starts an instruction that can run out of
//! line needs the code, which each backend reads its own way.)

use crate::{Location, ProbeError};
use dynprobe_symbols::{Symbol, SymbolTable};

/// Functions that return more than once from one call: a return probe's second return
/// would go through an instance the first one consumed (`setjmp` saves its return address,
/// which by then is the trampoline's; a `vfork` child returns on the parent's stack).
pub const RETURNS_TWICE: &[&str] =
    &["setjmp", "_setjmp", "__sigsetjmp", "sigsetjmp", "savectx", "vfork", "__vfork", "getcontext", "__getcontext"];

/// The function a probe point is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    /// Its name: for an indirect function, its implementation's (or its address, when no
    /// symbol names the implementation).
    pub name: String,
    /// Its first byte.
    pub start: u64,
    /// Its size; 0 when unknown.
    pub size: u64,
}

impl Function {
    fn of(sym: &Symbol) -> Function {
        Function { name: sym.name.clone(), start: sym.addr, size: sym.size }
    }
}

/// A probe point, resolved and checked against the symbol table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbePoint {
    /// The address of the probed instruction.
    pub addr: u64,
    /// The function it is in, when a symbol covers it (a raw address may have none).
    pub function: Option<Function>,
    /// The offset of `addr` into `function` (0 without one).
    pub offset: u64,
    /// For a location that named an indirect function (`STT_GNU_IFUNC`): that symbol, whose
    /// implementation `function` is.
    pub ifunc: Option<Symbol>,
}

/// What the indirect function (one of the table's symbols) resolved to in the probed
/// process: its implementation's address, or why that is not known.
pub type Implementation<'a> = &'a dyn Fn(&Symbol) -> Result<u64, String>;

/// Resolves `location` in `table` — a return probe's entry when `return_probe` — and makes
/// the checks a symbol table can answer (see the module documentation); `implementation`
/// says where an indirect function's calls go.
pub fn resolve(
    table: &SymbolTable,
    location: &Location,
    return_probe: bool,
    implementation: Implementation,
) -> Result<ProbePoint, ProbeError> {
    let (name, offset) = match location {
        Location::Symbol(name) => (name.as_str(), 0),
        Location::SymbolOffset(name, offset) => (name.as_str(), *offset),
        Location::Address(addr) => {
            let point = match table.resolve(*addr) {
                Some((sym, offset)) => {
                    ProbePoint { addr: *addr, function: Some(Function::of(sym)), offset, ifunc: None }
                }
                None => ProbePoint { addr: *addr, function: None, offset: 0, ifunc: None },
            };
            return checked(point, return_probe);
        }
    };
    let sym = table.lookup(name)?;
    let (function, ifunc) = match table.is_ifunc(sym) {
        false => (Function::of(sym), None),
        true => {
            let start = implementation(sym).map_err(|reason| ProbeError::Ifunc { symbol: sym.name.clone(), reason })?;
            let function = match table.resolve(start) {
                Some((implementation, 0)) => Function::of(implementation),
                // A stripped library without its debug symbols names no implementation.
                _ => Function { name: format!("{start:#x}"), start, size: 0 },
            };
            (function, Some(sym.clone()))
        }
    };
    if function.size > 0 && offset >= function.size {
        return Err(ProbeError::OffsetOutsideFunction { symbol: function.name, offset, size: function.size });
    }
    checked(ProbePoint { addr: function.start + offset, function: Some(function), offset, ifunc }, return_probe)
}

/// Refuses a return probe away from its function's entry (only there is the return
/// address at `rsp`, where the probe replaces it) or on a function that returns twice.
fn checked(point: ProbePoint, return_probe: bool) -> Result<ProbePoint, ProbeError> {
    if let (true, Some(function)) = (return_probe, &point.function) {
        if point.offset != 0 {
            return Err(ProbeError::ReturnProbeNotAtEntry { symbol: function.name.clone(), offset: point.offset });
        }
        if RETURNS_TWICE.contains(&function.name.as_str()) {
            return Err(ProbeError::ReturnsTwice { symbol: function.name.clone() });
        }
    }
    Ok(point)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test binary's own table; `implementation` is never asked (no indirect function
    /// is named).
    fn resolve_here(location: Location, return_probe: bool) -> Result<ProbePoint, ProbeError> {
        let table = SymbolTable::current_process().unwrap();
        resolve(&table, &location, return_probe, &|sym| panic!("asked for the implementation of {}", sym.name))
    }

    #[no_mangle]
    #[inline(never)]
    extern "C" fn point_test_function(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(3) ^ 5
    }

    #[test]
    fn a_symbol_resolves_to_its_function_and_checks_offsets_and_return_probes() {
        assert_eq!(point_test_function(1), 6);
        let start = point_test_function as *const () as u64;
        let point = resolve_here(Location::Symbol("point_test_function".into()), true).unwrap();
        assert_eq!((point.addr, point.offset, point.ifunc), (start, 0, None));
        let function = point.function.unwrap();
        assert_eq!((function.name.as_str(), function.start), ("point_test_function", start));

        let size = function.size;
        let inside = resolve_here(Location::SymbolOffset("point_test_function".into(), size - 1), false).unwrap();
        assert_eq!(inside.addr, start + size - 1);
        let outside = resolve_here(Location::SymbolOffset("point_test_function".into(), size), false);
        assert!(matches!(outside, Err(ProbeError::OffsetOutsideFunction { offset, .. }) if offset == size));

        // A return probe only at the entry, by name or by address.
        let by_name = resolve_here(Location::SymbolOffset("point_test_function".into(), 1), true);
        assert!(matches!(by_name, Err(ProbeError::ReturnProbeNotAtEntry { offset: 1, .. })), "{by_name:?}");
        let by_address = resolve_here(Location::Address(start + 1), true);
        assert!(matches!(by_address, Err(ProbeError::ReturnProbeNotAtEntry { offset: 1, .. })), "{by_address:?}");
        assert_eq!(resolve_here(Location::Address(start), true).unwrap().offset, 0);
    }

    #[test]
    fn return_probes_on_functions_that_return_twice_are_refused() {
        for name in ["setjmp", "_setjmp", "vfork"] {
            let err = resolve_here(Location::Symbol(name.into()), true).unwrap_err();
            assert!(matches!(&err, ProbeError::ReturnsTwice { symbol } if symbol == name), "{name}: {err}");
            // An entry probe there is fine.
            assert!(resolve_here(Location::Symbol(name.into()), false).is_ok(), "{name}");
        }
    }

    #[test]
    fn an_unknown_symbol_is_the_symbol_tables_error() {
        let err = resolve_here(Location::Symbol("point_test_no_such_function".into()), false).unwrap_err();
        assert!(matches!(err, ProbeError::Symbol(_)), "{err}");
    }
}
