//! Which handlers may run in a *light* detour, one that saves only the general registers and
//! the flags: those whose machine code, and everything it reaches by direct calls, is proven
//! by decoding to leave the vector, x87 and MXCSR state alone (the proof itself is
//! `dynprobe_arch`'s `vector_use`; this module reads the code and names the callees).
//!
//! A hit in a light detour runs the detour's dispatcher and then the handlers; both are
//! proven. The dispatcher reaches a handler through one gate, [`call_handler`] (an indirect
//! call: a handler is a `dyn Fn`), which the dispatcher's proof does not enter; instead
//! each handler is proven from its own code at registration ([`Probe::on_hit`](crate::Probe)
//! notes where that is), and the dispatcher checks, at every light hit, that every probe of
//! the site is light before it runs any — a heavy one sends the hit back through the full
//! save ([`crate::site::PatchSite::all_light`]).

use crate::arch::Regs;
use crate::InstanceData;
use dynprobe_arch::native::vector_use::{prove_light, Callee, Program, MAX_INSN_LEN};
use dynprobe_symbols::SymbolTable;
use std::collections::HashMap;
use std::sync::Mutex;

/// Why a handler is heavy (`Err`), or that it is light (`Ok`).
pub(crate) type Verdict = Result<(), String>;

/// Instructions a proof may decode before it gives up (dynprobe's own handlers reach a few
/// hundred; a handler that formats a string reaches thousands, and a heavy one soon).
const LIMIT: usize = 20_000;

/// The one place a probe's handler is called from, so that the dispatcher's proof can
/// leave it out (the handlers behind it are proven one by one). Never inlined: its address
/// is what the proof recognizes; were the compiler to make a copy of it, the proof would
/// walk into the copy and find its indirect call — heavy, never wrongly light.
#[inline(never)]
pub(crate) fn call_handler(handler: &(dyn Fn(&mut Regs) + Send + Sync), regs: &mut Regs) {
    handler(regs)
}

/// The code a handler of type `F` runs, for its proof: a call of `F` itself (the `dyn`
/// call's target is `F`'s `call`, which this calls or inlines).
pub(crate) fn code_of<F: Fn(&mut Regs)>(_handler: &F) -> u64 {
    fn invoke<F: Fn(&mut Regs)>(handler: &F, regs: &mut Regs) {
        handler(regs)
    }
    invoke::<F> as *const () as u64
}

/// [`code_of`] for a return probe's entry handler.
pub(crate) fn entry_code_of<F: Fn(&mut Regs, &mut InstanceData) -> bool>(_handler: &F) -> u64 {
    fn invoke<F: Fn(&mut Regs, &mut InstanceData) -> bool>(
        handler: &F,
        regs: &mut Regs,
        data: &mut InstanceData,
    ) -> bool {
        handler(regs, data)
    }
    invoke::<F> as *const () as u64
}

/// [`code_of`] for a return probe's return handler.
pub(crate) fn return_code_of<F: Fn(&mut Regs, &InstanceData)>(_handler: &F) -> u64 {
    fn invoke<F: Fn(&mut Regs, &InstanceData)>(handler: &F, regs: &mut Regs, data: &InstanceData) {
        handler(regs, data)
    }
    invoke::<F> as *const () as u64
}

/// The gates the dispatchers call handlers through (see [`call_handler`]), each with its
/// handlers proven on their own.
fn gates() -> [u64; 4] {
    [
        call_handler as *const () as u64,
        crate::retprobe::call_entry_handler as *const () as u64,
        crate::retprobe::call_graph_hook as *const () as u64,
        crate::retprobe::call_return_handler as *const () as u64,
    ]
}

/// Proves the code at `roots` light (cached per root set: a program traced whole registers
/// tens of thousands of probes with the same handler type). `table` names the callees;
/// without it every callee is walked.
pub(crate) fn prove(roots: &[u64], table: Option<&SymbolTable>) -> Verdict {
    // The hot paths' clock calls the vDSO once it is found: find it now, on this cold path.
    dynprobe_text::raw::vdso_clock_gettime();
    static CACHE: Mutex<Option<HashMap<Vec<u64>, Verdict>>> = Mutex::new(None);
    if let Some(known) = CACHE.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).get(roots) {
        return known.clone();
    }
    let mut program = Own { pages: HashMap::new(), read_only: read_only_ranges(), table, gates: gates() };
    let verdict = prove_light(roots, &mut program, LIMIT).map(|_| ()).map_err(|heavy| match (heavy.at, table) {
        (0, _) | (_, None) => heavy.to_string(),
        (at, Some(table)) => {
            let name = |addr: u64| table.resolve(addr).map_or_else(|| format!("{addr:#x}"), |(s, _)| s.name.clone());
            let through: Vec<String> = heavy.path.iter().map(|&f| name(f)).collect();
            format!("{} at {} (reached through {})", heavy.reason, table.format_addr(at), through.join(" -> "))
        }
    });
    CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(roots.to_vec(), verdict.clone());
    verdict
}

/// Whether the optimized probes' dispatcher, with everything it reaches but the handlers,
/// is light: without it no detour is.
pub(crate) fn dispatcher(table: Option<&SymbolTable>) -> Verdict {
    prove(&[crate::arch::detour_dispatch_code()], table).map_err(|why| format!("dynprobe's detour dispatcher: {why}"))
}

/// This process's mappings that nothing may write (`/proc/self/maps`: neither `w` now nor
/// `w` possible without an `mprotect`, which is all a read can tell).
fn read_only_ranges() -> Vec<std::ops::Range<u64>> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms) = (fields.next()?, fields.next()?);
            let (start, end) = range.split_once('-')?;
            let range = u64::from_str_radix(start, 16).ok()?..u64::from_str_radix(end, 16).ok()?;
            (perms.starts_with('r') && perms.as_bytes().get(1) == Some(&b'-')).then_some(range)
        })
        .collect()
}

/// What a direct call's target is, by its name.
fn callee_by_name(table: Option<&SymbolTable>, gates: &[u64], target: u64) -> Callee {
    if gates.contains(&target) {
        return Callee::Checked;
    }
    let Some((symbol, 0)) = table.and_then(|t| t.resolve(target)) else { return Callee::Follow };
    let name = symbol.name.as_str();
    // An abort: never returns, ends the process. The checks of a debug build (a failed
    // precondition, a null or misaligned pointer dereferenced) end in `panic_nounwind_fmt`,
    // which aborts (core/src/panicking.rs: `#[rustc_nounwind]`).
    const ENDS: [&str; 8] = [
        "core::panicking::panic_nounwind",
        "core::panicking::panic_null_pointer_dereference",
        "core::panicking::panic_misaligned_pointer_dereference",
        "core::panicking::panic_cannot_unwind",
        "core::panicking::panic_in_cleanup",
        "std::process::abort",
        "std::sys::pal::unix::abort_internal",
        "abort",
    ];
    if ENDS.iter().any(|end| name == *end || name.starts_with(&format!("{end}_"))) {
        return Callee::Ends;
    }
    // A panic unwinds, and the unwinder (libgcc) copies its register contexts with the C
    // library's vector `memcpy`; the handler's panic would then be contained with the
    // program's vector registers changed.
    let panics =
        ["core::panicking::", "std::panicking::", "core::option::unwrap_failed", "core::option::expect_failed"]
            .iter()
            .any(|p| name.starts_with(p))
            || name.starts_with("core::result::unwrap_failed")
            || name.starts_with("_Unwind_")
            || name == "rust_begin_unwind";
    if panics {
        return Callee::Heavy(format!("a call of {name}, which may unwind (the unwinder uses vector registers)"));
    }
    Callee::Follow
}

/// This process's own code, read from memory (`process_vm_readv`: an unmapped address is an
/// error, never a fault), a page at a time.
struct Own<'a> {
    pages: HashMap<u64, Option<Vec<u8>>>,
    read_only: Vec<std::ops::Range<u64>>,
    table: Option<&'a SymbolTable>,
    gates: [u64; 4],
}

const PAGE: u64 = 4096;

impl Own<'_> {
    fn page(&mut self, base: u64) -> Option<&[u8]> {
        self.pages.entry(base).or_insert_with(|| dynprobe_text::memory::read_vec(base, PAGE as usize).ok()).as_deref()
    }
}

impl Program for Own<'_> {
    fn code(&mut self, ip: u64) -> Option<Vec<u8>> {
        let base = ip & !(PAGE - 1);
        let mut bytes = self.page(base)?[(ip - base) as usize..].to_vec();
        if bytes.len() < MAX_INSN_LEN {
            if let Some(next) = self.page(base + PAGE) {
                bytes.extend_from_slice(&next[..MAX_INSN_LEN - bytes.len()]);
            }
        }
        bytes.truncate(MAX_INSN_LEN);
        Some(bytes)
    }

    fn constant(&mut self, addr: u64, len: usize) -> Option<Vec<u8>> {
        // Only memory nothing writes: a GOT made read-only after relocation (RELRO, with
        // `-z now` as Rust links), `.rodata`; a lazily bound GOT slot may still change.
        let end = addr.checked_add(len as u64)?;
        if !self.read_only.iter().any(|r| r.start <= addr && end <= r.end) {
            return None;
        }
        dynprobe_text::memory::read_vec(addr, len).ok()
    }

    fn function(&mut self, ip: u64) -> Option<(u64, u64)> {
        self.table?.function_bounds(ip)
    }

    fn callee(&mut self, target: u64) -> Callee {
        if target == dynprobe_text::raw::call_vdso_clock_gettime as *const () as u64 {
            // The clock's gate calls the vDSO, the kernel's code: proven on its own.
            return match dynprobe_text::raw::vdso_clock_gettime() {
                None => Callee::Checked,
                Some(vdso) => match prove(&[vdso as u64], None) {
                    Ok(()) => Callee::Checked,
                    Err(why) => Callee::Heavy(format!("the vDSO's clock_gettime: {why}")),
                },
            };
        }
        callee_by_name(self.table, &self.gates, target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// dynprobe's own hot paths must stay light: a change that makes one heavy (a struct
    /// copy compiled to vector moves, a possible panic, a call through a pointer) fails here
    /// with the instruction and function that did it.
    #[test]
    fn dynprobes_own_dispatchers_are_light() {
        let table = SymbolTable::current_process().unwrap();
        dispatcher(Some(&table)).unwrap();
        // The light return sled's path (the tracer's hook behind its gate is proven apart).
        prove(&[crate::arch::rethook::light_dispatch_code()], Some(&table)).unwrap();
        // The light return sled of return probes (their handlers behind their gate).
        prove(&[crate::arch::rethook::light_return_dispatch_code()], Some(&table)).unwrap();
    }
}
