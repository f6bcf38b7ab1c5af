//! Marker specs (`m:PROVIDER:NAME`) driven from outside: every site of the marker in every
//! module of the target gets a breakpoint probe of its own, and a site whose SDT note names
//! a semaphore has it raised while the probes are in, and lowered at detach — as the
//! kernel's uprobes do through their reference counter (`update_ref_ctr` in
//! `kernel/events/uprobes.c`), one count per site. Without it a program built with
//! `_SDT_HAS_SEMAPHORES` (CPython's markers) skips the marker and the probe never fires.
//!
//! The counter is changed by a read-modify-write through the tracee's memory while every
//! thread is stopped, so none of the program's threads sees it half done.

use dynprobe::line::EventFormat;
use dynprobe::marker::{check_semaphore, spec_for_site, ArgKind, ArgLocation, Marker, MarkerSite};
use dynprobe::spec::{Fetch, FetchArg, FetchType, Format, IntType, ProbeKind, ProbeSpec, Reg, Target};
use dynprobe::Location;
use dynprobe_remote::Memory;
use dynprobe_symbols::SymbolTable;

use crate::place::{self, Point, ReadCode};

/// One site of a marker spec, resolved.
pub(crate) struct MarkerPoint {
    /// Where the breakpoint goes.
    pub point: Point,
    /// How its hits are written.
    pub format: EventFormat,
    /// The semaphore's address (0: none).
    pub semaphore: u64,
    /// The semaphores of other markers that gate the site (see `MarkerSite::gates`).
    pub gates: Vec<u64>,
}

/// The sites of the marker `spec` names in the process `table` describes, each with its
/// event format: the spec's fields with `$argN` turned into where the site keeps argument
/// N, or without fields one `argN` field per argument typed by the note (one whose place
/// cannot be read, a constant, is left out; a Bool shows as 0 or 1).
pub(crate) fn resolve(table: &SymbolTable, spec: &ProbeSpec, read: ReadCode) -> Result<Vec<MarkerPoint>, String> {
    let Target::Marker(pattern) = &spec.location else { unreachable!("called for marker specs") };
    let sites = Marker::find_in(table, pattern).map_err(|e| e.to_string())?;
    sites
        .iter()
        .map(|site| {
            let mut code = spec.clone();
            code.kind = ProbeKind::Entry;
            code.location = Target::Code(Location::Address(site.addr));
            let point = place::resolve(table, &code, read)?;
            let mut fields = spec_for_site(spec, site)?;
            if fields.args.is_empty() {
                fields.args = default_fields(site);
            }
            fields.resolve_symbols(|name| place::lookup_address(table, name))?;
            let format = EventFormat::new(&fields)?;
            Ok(MarkerPoint {
                point,
                format,
                semaphore: site.semaphore,
                gates: site.gates.iter().map(|g| g.semaphore).collect(),
            })
        })
        .collect()
}

/// `arg1=… argN=…`: every argument of `site` whose place can be read, typed by its kind.
fn default_fields(site: &MarkerSite) -> Vec<FetchArg> {
    site.args
        .iter()
        .enumerate()
        .filter_map(|(i, arg)| {
            let fetch = match &arg.location {
                ArgLocation::Register { name, .. } => Fetch::Reg(Reg::from_name(name)?),
                ArgLocation::Memory { base, offset } => {
                    Fetch::Deref { offset: *offset, base: Box::new(Fetch::Reg(Reg::from_name(base)?)) }
                }
                ArgLocation::Immediate(_) | ArgLocation::Other(_) => return None,
            };
            let int = |format, size: u8| FetchType::Int(IntType { format, bits: size * 8 });
            let ty = match arg.kind {
                ArgKind::CStr => FetchType::String,
                // A `&str`/`&[u8]` is a pointer and a length: its pointer is shown.
                ArgKind::Pointer | ArgKind::Str | ArgKind::Bytes => int(Format::Hex, 8),
                // Read from the FP state when in a vector register (`8f@%xmm1`).
                kind if kind.is_float() => FetchType::Float(kind.size() * 8),
                kind if kind.is_signed() => int(Format::Signed, kind.size()),
                kind => int(Format::Unsigned, kind.size()),
            };
            Some(FetchArg { name: format!("arg{}", i + 1), fetch, ty })
        })
        .collect()
}

/// Raises the semaphore at `addr` of process `pid` by one (every thread stopped), after
/// checking it is writable memory of the process: a write through `/proc/PID/mem` would
/// succeed even into its code.
pub(crate) fn raise_semaphore(mem: &Memory, pid: i32, addr: u64) -> Result<(), String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("cannot read /proc/{pid}/maps to check its semaphore at {addr:#x}: {e}"))?;
    check_semaphore(&maps, addr)?;
    let value = read_u16(mem, addr)?;
    let raised = value.checked_add(1).ok_or_else(|| format!("its semaphore at {addr:#x} is at its maximum"))?;
    mem.write(addr, &raised.to_le_bytes()).map_err(|e| format!("cannot write its semaphore at {addr:#x}: {e}"))
}

/// Lowers the semaphore at `addr` that [`raise_semaphore`] raised (every thread stopped);
/// never below zero.
pub(crate) fn lower_semaphore(mem: &Memory, addr: u64) -> Result<(), String> {
    let value = read_u16(mem, addr)?;
    match value.checked_sub(1) {
        Some(lowered) => {
            mem.write(addr, &lowered.to_le_bytes()).map_err(|e| format!("cannot lower the semaphore at {addr:#x}: {e}"))
        }
        None => Ok(()),
    }
}

fn read_u16(mem: &Memory, addr: u64) -> Result<u16, String> {
    let mut bytes = [0u8; 2];
    mem.read(addr, &mut bytes).map_err(|e| format!("cannot read its semaphore at {addr:#x}: {e}"))?;
    Ok(u16::from_le_bytes(bytes))
}
