//! Where each spec's probe goes, checked before anything is written: the symbol exists, the
//! address starts an instruction (decoded from the function's start), and that instruction
//! can run out of line. The refusals are the probe layer's own [`ProbeError`]s, so the
//! fallback mode and the agent word them alike.

use dynprobe::internals::point;
use dynprobe::spec::{ProbeKind, ProbeSpec, Target};
use dynprobe::{Location, ProbeError};
use dynprobe_arch::native::optimize::covered_run_of;
use dynprobe_arch::native::{check_out_of_line, decode_one, instruction_at};
use dynprobe_symbols::{Symbol, SymbolError, SymbolTable};

/// The longest x86-64 instruction.
const MAX_INSN_LEN: usize = 15;

/// A resolved probe point: the instruction there, as it was before any `int3`.
#[derive(Debug, Clone)]
pub(crate) struct Point {
    /// Its address.
    pub addr: u64,
    /// The original bytes of the run the breakpoint covers: the instruction, and the next
    /// one too when the instruction is a single byte (see [`RUN`]).
    pub bytes: Vec<u8>,
    /// The length of the probed instruction itself.
    pub insn_len: usize,
}

impl Point {
    /// Gives up the instructions after the first when another probe point is among them:
    /// that one gets its own breakpoint.
    pub fn yield_to(&mut self, others: &[u64]) {
        let end = self.addr + self.bytes.len() as u64;
        if others.iter().any(|&o| o > self.addr && o < end) {
            self.bytes.truncate(self.insn_len);
        }
    }
}

/// The fewest bytes a breakpoint covers, all of them `int3`: a thread the tracer held at
/// the first one when it died resumes at the second (the kernel drops the trap of a tracee
/// whose tracer exits), traps again, and the fallback handler left in the target (see
/// `crate::fallback`) sends it back to the probed instruction. A one-byte instruction
/// (`push %rbx`) takes the next instruction with it, when the function's code shows that
/// nothing jumps there (the checks of a jump-optimized probe's covered run); otherwise the
/// run is that one byte, and a thread held there when the tracer dies would skip it.
pub(crate) const RUN: usize = 2;

/// Reads the target's memory: `addr`, `len` bytes, or an error naming what failed.
pub(crate) type ReadCode<'a> = &'a dyn Fn(u64, usize) -> Result<Vec<u8>, String>;

/// Resolves `spec`'s location in `table` and checks the instruction there, reading code
/// through `read`. Nothing is written.
pub(crate) fn resolve(table: &SymbolTable, spec: &ProbeSpec, read: ReadCode) -> Result<Point, String> {
    let (addr, function) = locate(table, spec, read)?;
    let unreadable = |e: String| format!("cannot read the code at {addr:#x}: {e}");
    let mut run = 0;
    let insn = match function {
        Some((start, size)) if size > 0 => {
            let code = read(start, size as usize).map_err(unreadable)?;
            let insn = instruction_at(&code, start, addr).map_err(|e| ProbeError::from(e).to_string())?;
            if insn.len < RUN {
                run = covered_run_of(&code, start, addr, RUN).map_or(0, |r| r.len);
            }
            insn
        }
        // No known bounds (a raw address outside any sized function): the user vouches for
        // the boundary, as the agent's probe layer does.
        _ => {
            let code = read_up_to(read, addr, MAX_INSN_LEN).map_err(unreadable)?;
            decode_one(&code, addr).map_err(|e| ProbeError::from(e).to_string())?
        }
    };
    let bytes = read(addr, insn.len.max(run)).map_err(unreadable)?;
    if bytes.first() == Some(&dynprobe_arch::native::INT3) {
        return Err(format!(
            "the instruction at {addr:#x} is an int3 already (another debugger's breakpoint?); \
             detach that debugger first"
        ));
    }
    check_out_of_line(&bytes[..insn.len], addr).map_err(|e| ProbeError::from(e).to_string())?;
    Ok(Point { addr, bytes, insn_len: insn.len })
}

/// The probe address and the bounds of its function (start, size) when known.
fn locate(table: &SymbolTable, spec: &ProbeSpec, read: ReadCode) -> Result<(u64, Option<(u64, u64)>), String> {
    let location = match &spec.location {
        Target::Code(location) => location,
        // A marker has no one location: `crate::marker` resolves each of its sites.
        Target::Marker(marker) => return Err(format!("marker `{marker}` has one probe per site, not one location")),
    };
    locate_code(table, spec, location, read).map_err(|e| e.to_string())
}

/// [`locate`] for a code location: the probe layer's own resolver and checks
/// ([`point::resolve`]), with an indirect function's implementation read from the target.
fn locate_code(
    table: &SymbolTable,
    spec: &ProbeSpec,
    location: &Location,
    read: ReadCode,
) -> Result<(u64, Option<(u64, u64)>), ProbeError> {
    let point =
        point::resolve(table, location, spec.kind == ProbeKind::Return, &|sym| implementation(table, sym, read))?;
    Ok((point.addr, point.function.map(|f| (f.start, f.size))))
}

/// The implementation the indirect function `sym` (glibc's `strlen`, …) resolved to in the
/// target: what its module's `R_X86_64_IRELATIVE` relocation wrote into its GOT slot — a
/// static program's C library applies those at start-up, before `main`. The probe goes
/// there, where the calls go.
fn implementation(table: &SymbolTable, sym: &Symbol, read: ReadCode) -> Result<u64, String> {
    let slot = table
        .ifunc_slot(sym)
        .map_err(|e| format!("its module's relocations cannot be read ({e})"))?
        .ok_or_else(|| "no IRELATIVE relocation of its module says where its implementation goes".to_string())?;
    let word = read(slot, 8).map_err(|e| format!("its GOT slot at {slot:#x} cannot be read ({e})"))?;
    let addr = u64::from_le_bytes(word.get(..8).and_then(|w| w.try_into().ok()).unwrap_or_default());
    match table.resolve(addr) {
        Some((implementation, 0)) if implementation.addr != sym.addr => Ok(addr),
        _ => Err(format!(
            "its GOT slot at {slot:#x} holds {addr:#x}, the start of no function: the program has not applied \
             its relocations yet (a static program dynprobe starts is probed before its start-up runs; attach \
             with -p once it runs)"
        )),
    }
}

/// Reads up to `len` bytes at `addr`, fewer when the mapping ends sooner (an instruction at
/// the end of a mapping is shorter than 15 bytes).
fn read_up_to(read: ReadCode, addr: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut first_error = None;
    for n in (1..=len).rev() {
        match read(addr, n) {
            Ok(bytes) => return Ok(bytes),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_default())
}

/// An unknown-symbol error of the table, for callers that look names up themselves (the
/// `@SYMBOL` fetches).
pub(crate) fn lookup_address(table: &SymbolTable, name: &str) -> Result<u64, String> {
    table.lookup(name).map(|s| s.addr).map_err(|e: SymbolError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_gives_way_to_another_probe_inside_it() {
        // push %rbx; mov %rdi,%rbx: one run, unless the mov is probed too.
        let point = Point { addr: 0x1000, bytes: vec![0x53, 0x48, 0x89, 0xfb], insn_len: 1 };
        let mut alone = point.clone();
        alone.yield_to(&[0x1000, 0x2000, 0x1004]);
        assert_eq!(alone.bytes.len(), 4);
        let mut shared = point;
        shared.yield_to(&[0x1000, 0x1001]);
        assert_eq!(shared.bytes, vec![0x53]);
    }

    #[test]
    fn marker_specs_are_refused_with_the_reason() {
        let table = SymbolTable::current_process().unwrap();
        let spec = ProbeSpec::parse("m:app:tick").unwrap();
        let read: ReadCode = &|_, _| panic!("nothing is read for a marker spec");
        let err = resolve(&table, &spec, read).unwrap_err();
        assert_eq!(err, "marker `app:tick` has one probe per site, not one location");
    }
}
