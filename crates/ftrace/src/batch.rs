//! Turning compiler-recorded NOPs into calls of the tracer, and back, in one batch (the
//! kernel's `ftrace_replace_code` under `stop_machine`).
//!
//! Every site's bytes are compared with the NOP the compiler records before anything is
//! written: a site that holds something else is reported and never touched. Then every
//! other thread of the process is stopped once, each site is rewritten, all cores are
//! serialized, and the threads go on. A five-byte NOP is one instruction, but
//! `-fpatchable-function-entry=5` emits five one-byte NOPs and a thread may be stopped
//! between them (or a signal handler may have interrupted it there): such a thread is moved
//! past the run, which skips nothing but NOPs.

use crate::select::TracedFunction;
use dynprobe_arch::native::ftrace::{build_caller, stub, MCOUNT_NOP, PATCHABLE_NOPS, STUB_SIZE};
use dynprobe_arch::native::{call_rel32, INT3};
use dynprobe_events::model::RefusedSite;
use dynprobe_symbols::SiteKind;
use dynprobe_text::memory::{self, CodeWriter};
use dynprobe_text::stop::{self, InterruptedSet, StoppedWorld};
use dynprobe_text::sync_core::try_sync_core;
use dynprobe_text::{pool, TextError};
use std::time::Duration;

/// How long other threads get to acknowledge the stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Sites farther apart than this get separate stub blocks, so that one block near the
/// first site is in `rel32` reach of all of them.
const GROUP_SPAN: u64 = 256 << 20;

/// A site turned into a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PatchedSite {
    pub(crate) addr: u64,
    pub(crate) nop: [u8; 5],
    pub(crate) call: [u8; 5],
}

/// What one batch did.
#[derive(Debug, Default)]
pub(crate) struct BatchResult {
    pub(crate) patched: Vec<PatchedSite>,
    pub(crate) refused: Vec<RefusedSite>,
}

/// One site to patch: where, what must be there, what goes there.
struct Planned {
    addr: u64,
    nop: [u8; 5],
    call: [u8; 5],
    function: usize,
}

/// Patches the compiler sites of `functions` (those with [`SiteMethod::Compiler`]) to call
/// `dispatch` (`extern "C" fn(id: u64, ra_slot: u64)`) through per-function stubs.
///
/// [`SiteMethod::Compiler`]: crate::select::SiteMethod::Compiler
pub(crate) fn enable(functions: &[TracedFunction], dispatch: u64) -> Result<BatchResult, TextError> {
    let mut result = BatchResult::default();
    let mut sites: Vec<(usize, u64, [u8; 5])> = Vec::new();
    for (i, f) in functions.iter().enumerate() {
        let crate::select::SiteMethod::Compiler(site) = f.method else { continue };
        let nop = match site.kind {
            SiteKind::Mcount => MCOUNT_NOP,
            SiteKind::Patchable { .. } => PATCHABLE_NOPS,
        };
        let mut now = [0u8; 5];
        match memory::read(site.addr, &mut now) {
            Ok(()) if now == nop => sites.push((i, site.addr, nop)),
            Ok(()) => result.refused.push(refusal(f, site.addr, format!(
                "the site holds {} instead of the compiler's NOP {} (already patched, or changed by someone else); left alone",
                hex(&now),
                hex(&nop)
            ))),
            Err(e) => result.refused.push(refusal(f, site.addr, format!("the site cannot be read: {e}"))),
        }
    }
    sites.sort_by_key(|&(_, addr, _)| addr);

    let caller_len = build_caller(0, dispatch).map_err(|e| build_error(&e))?.len() as u64;
    let mut planned = Vec::with_capacity(sites.len());
    for group in sites.chunk_by(|a, b| b.1 - a.1 < GROUP_SPAN) {
        let block_len = caller_len.next_multiple_of(STUB_SIZE) + STUB_SIZE * group.len() as u64;
        let block = pool::alloc_near(group[0].1, block_len as usize)?;
        let caller = build_caller(block.addr, dispatch).map_err(|e| build_error(&e))?;
        let mut code = caller;
        code.resize(caller_len.next_multiple_of(STUB_SIZE) as usize, INT3);
        for &(i, addr, nop) in group {
            let stub_ip = block.addr + code.len() as u64;
            let f = &functions[i];
            match (stub(stub_ip, f.id, block.addr), call_rel32(addr, stub_ip)) {
                (Some(stub), Some(call)) => {
                    code.extend_from_slice(&stub);
                    planned.push(Planned { addr, nop, call, function: i });
                }
                _ => {
                    code.extend_from_slice(&[INT3; STUB_SIZE as usize]);
                    result.refused.push(refusal(f, addr, "no executable memory within ±2 GiB of the site".into()));
                }
            }
        }
        memory::write_verified(block.addr, &vec![INT3; code.len()], &code)?;
    }

    // Room for every outcome is made before the stop: nothing may allocate while other
    // threads are held (one of them may hold the allocator's lock).
    let mut failed: Vec<(usize, TextError)> = Vec::with_capacity(planned.len());
    result.patched.reserve(planned.len());
    let mut writer = CodeWriter::lock()?;
    let mut world = stop::stop_other_threads(STOP_TIMEOUT)?;
    let interrupted = world.all_interrupted_contexts();
    for site in &planned {
        move_out_of(&mut world, &interrupted, site.addr);
        match writer.write_verified(site.addr, &site.nop, &site.call) {
            Ok(()) => result.patched.push(PatchedSite { addr: site.addr, nop: site.nop, call: site.call }),
            Err(e) => failed.push((site.function, e)),
        }
    }
    let synced = try_sync_core();
    drop(world);
    drop(writer);
    for (i, e) in failed {
        let f = &functions[i];
        let crate::select::SiteMethod::Compiler(site) = f.method else { continue };
        result.refused.push(refusal(f, site.addr, format!("the site could not be written: {e}")));
    }
    synced?;
    Ok(result)
}

/// Puts the NOPs back, in one batch. A thread inside a stub or the caller finishes its
/// trip: stubs are never freed.
pub(crate) fn disable(sites: &[PatchedSite]) -> Result<(), TextError> {
    let mut first_error = None;
    let mut writer = CodeWriter::lock()?;
    let world = stop::stop_other_threads(STOP_TIMEOUT)?;
    for site in sites {
        // A thread cannot be stopped inside a call instruction: nobody to move.
        if let Err(e) = writer.write_verified(site.addr, &site.call, &site.nop) {
            first_error.get_or_insert(e);
        }
    }
    let synced = try_sync_core();
    drop(world);
    drop(writer);
    match first_error {
        Some(e) => Err(e),
        None => synced,
    }
}

/// Moves every thread stopped, or interrupted by a signal, strictly inside the 5 bytes at
/// `addr` to the instruction after them. Allocates nothing.
fn move_out_of(world: &mut StoppedWorld, interrupted: &InterruptedSet, addr: u64) {
    let inside = |ip: u64| ip > addr && ip < addr + 5;
    let mut moved = [0i32; 16];
    let mut n = 0;
    for thread in world.threads() {
        if inside(thread.ip) && n < moved.len() {
            moved[n] = thread.tid;
            n += 1;
        }
    }
    for &tid in &moved[..n] {
        world.set_ip(tid, addr + 5);
    }
    for context in interrupted.contexts() {
        if inside(context.rip) {
            // Fails only when the frame changed under us, which a stopped thread cannot do.
            let _ = world.set_interrupted_ip(context, addr + 5);
        }
    }
}

fn refusal(f: &TracedFunction, addr: u64, reason: String) -> RefusedSite {
    RefusedSite { kind: f.method.kind_name().into(), addr, function: f.name.clone(), reason }
}

fn build_error(e: &dynprobe_arch::native::RelocError) -> TextError {
    TextError::Unwritable { addr: 0, reason: format!("the ftrace caller could not be encoded: {e}") }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}
