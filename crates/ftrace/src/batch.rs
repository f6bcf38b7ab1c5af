//! Turning compiler-recorded NOPs into calls of the tracer, and back, in one batch (the
//! kernel's `ftrace_replace_code` under `stop_machine`).
//!
//! Every site's bytes are compared with the NOP the compiler records before anything is
//! written: a site that holds something else is reported and never touched. Then one
//! patching transaction of the text layer rewrites them all (the threads that could be at
//! a site stopped once, the others left in their blocking calls, int3-first while any runs),
//! serializes the cores, and lets the threads go on. A five-byte NOP is one instruction, but
//! `-fpatchable-function-entry=5` emits five one-byte NOPs and a thread may be stopped
//! between them (or a signal handler may have interrupted it there): such a thread is moved
//! past the run, which skips nothing but NOPs.

use crate::select::TracedFunction;
use dynprobe_arch::native::ftrace::{build_caller, stub, MCOUNT_NOP, PATCHABLE_NOPS, STUB_SIZE};
use dynprobe_arch::native::{call_rel32, INT3};
use dynprobe_events::model::RefusedSite;
use dynprobe_symbols::SiteKind;
use dynprobe_text::memory;
use dynprobe_text::transaction::{self, move_out_of, Edits, Transaction};
use dynprobe_text::{pool, TextError};
use std::sync::Mutex;
use std::time::Duration;

/// How long other threads get to acknowledge the stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Sites farther apart than this get separate stub blocks, so that one block near the
/// first site is in `rel32` reach of all of them.
const GROUP_SPAN: u64 = 256 << 20;

/// A block of executable memory holding the caller and, after it, the stubs of a group of
/// sites: where a thread between a site's call and its return is (see `dynprobe_arch`'s
/// `ftrace` module for the layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallerBlock {
    /// The caller's first instruction.
    pub(crate) start: u64,
    /// The caller's code (the stubs start at its length rounded up to [`STUB_SIZE`]).
    pub(crate) caller_len: u64,
    /// The end of the last stub.
    pub(crate) end: u64,
}

/// Every block placed in this process, for the unwinding of the calls in flight at an
/// attach (`crate::inflight`): blocks are never freed (a thread may be inside one at any
/// time), so the list only grows.
static BLOCKS: Mutex<Vec<CallerBlock>> = Mutex::new(Vec::new());

/// The blocks placed so far, by address.
pub(crate) fn caller_blocks() -> Vec<CallerBlock> {
    let mut blocks = BLOCKS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    blocks.sort_unstable_by_key(|b| b.start);
    blocks
}

/// A site turned into a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PatchedSite {
    pub(crate) addr: u64,
    pub(crate) nop: [u8; 5],
    pub(crate) call: [u8; 5],
    /// The site's kind as summaries name it (`mcount`, `patchable`).
    pub(crate) kind: &'static str,
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
    let mut sites: Vec<(usize, u64, [u8; 5])> = functions
        .iter()
        .enumerate()
        .filter_map(|(i, f)| match f.method {
            crate::select::SiteMethod::Compiler(site) => Some((
                i,
                site.addr,
                match site.kind {
                    SiteKind::Mcount => MCOUNT_NOP,
                    SiteKind::Patchable { .. } => PATCHABLE_NOPS,
                },
            )),
            crate::select::SiteMethod::Entry => None,
        })
        .collect();
    sites.sort_by_key(|&(_, addr, _)| addr);
    // A first look, before anything is allocated for them: sites that do not hold their
    // NOP are reported and left out.
    let mut looked = Vec::with_capacity(sites.len());
    for run in transaction::spans(&sites, |s| (s.1, s.2.len())) {
        let span = &sites[run];
        let start = span[0].1;
        let bytes = match memory::read_vec(start, (span[span.len() - 1].1 + 5 - start) as usize) {
            Ok(bytes) => bytes,
            Err(e) => {
                for &(i, addr, _) in span {
                    result.refused.push(refusal(&functions[i], addr, format!("the site cannot be read: {e}")));
                }
                continue;
            }
        };
        for &(i, addr, nop) in span {
            let at = (addr - start) as usize;
            let now = &bytes[at..at + 5];
            if now == nop {
                looked.push((i, addr, nop));
            } else {
                result.refused.push(refusal(&functions[i], addr, format!(
                    "the site holds {} instead of the compiler's NOP {} (already patched, or changed by someone else); left alone",
                    hex(now),
                    hex(&nop)
                )));
            }
        }
    }
    let sites = looked;

    // Nothing of the vector state is saved when the dispatcher is proven to leave it alone.
    let width = dynprobe_probe::graph_width(dispatch);
    let caller_len = build_caller(0, dispatch, width).map_err(|e| build_error(&e))?.len() as u64;
    let mut planned = Vec::with_capacity(sites.len());
    for group in sites.chunk_by(|a, b| b.1 - a.1 < GROUP_SPAN) {
        let block_len = caller_len.next_multiple_of(STUB_SIZE) + STUB_SIZE * group.len() as u64;
        let block = pool::alloc_near(group[0].1, block_len as usize)?;
        let caller = build_caller(block.addr, dispatch, width).map_err(|e| build_error(&e))?;
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
        let end = block.addr + code.len() as u64;
        BLOCKS.lock().unwrap_or_else(|e| e.into_inner()).push(CallerBlock { start: block.addr, caller_len, end });
    }

    // The transaction plans every edit before it stops anyone: nothing may allocate while
    // other threads are held (one of them may hold the allocator's lock). A thread between
    // the five 1-byte NOPs of a patchable entry — or code a signal interrupted there — is
    // moved past them; if not every signal frame could be looked at, one may resume there,
    // so such sites are left alone (reported below).
    let mut edits = Edits::new(planned.iter().map(|p| (p.addr, &p.nop[..], &p.call[..])).collect());
    let mut txn = Transaction::begin(edits.ranges(), STOP_TIMEOUT)?;
    let mut unsure = false;
    let written = txn.arm_heads(&mut edits).and_then(|interrupted| {
        unsure = !interrupted.complete();
        for site in &planned {
            if unsure && site.nop == PATCHABLE_NOPS {
                edits.skip(site.addr);
            } else {
                move_out_of(txn.world_mut(), &interrupted, site.addr, site.nop.len());
            }
        }
        txn.finish(&mut edits)
    });
    let synced = txn.commit();
    if let Err(e @ TextError::StopFailed { .. }) = written {
        return Err(e);
    }
    let mut by_addr: Vec<&Planned> = planned.iter().collect();
    by_addr.sort_by_key(|p| p.addr);
    for ((_, done), site) in edits.outcomes().zip(by_addr) {
        let reason = match (&written, done) {
            (_, true) => {
                let kind = functions[site.function].method.kind_name();
                result.patched.push(PatchedSite { addr: site.addr, nop: site.nop, call: site.call, kind });
                continue;
            }
            _ if unsure && site.nop == PATCHABLE_NOPS => {
                "more signal frames than could be checked for a thread between its NOPs; left alone".to_string()
            }
            (Err(e), false) => format!("the site could not be written: {e}"),
            (Ok(()), false) => "the site changed between the first look and the write; left alone".to_string(),
        };
        result.refused.push(refusal(&functions[site.function], site.addr, reason));
    }
    synced?;
    Ok(result)
}

/// Puts the NOPs back, in one batch. A thread inside a stub or the caller finishes its
/// trip: stubs are never freed.
pub(crate) fn disable(sites: &[PatchedSite]) -> Result<(), TextError> {
    // A thread cannot be stopped inside a call instruction: nobody to move.
    let mut edits = Edits::new(sites.iter().map(|p| (p.addr, &p.call[..], &p.nop[..])).collect());
    let mut txn = Transaction::begin(edits.ranges(), STOP_TIMEOUT)?;
    let written = txn.write(&mut edits, |_, _| {});
    let synced = txn.commit();
    written?;
    if let Some((addr, _)) = edits.outcomes().find(|&(_, done)| !done) {
        let site = sites.iter().find(|p| p.addr == addr).expect("an edit per site");
        let found = memory::read_vec(addr, 5).unwrap_or_default();
        return Err(TextError::Unexpected { addr, expected: site.call.to_vec(), found });
    }
    synced
}

/// A site of `f` at `addr` left alone, and why.
pub(crate) fn refusal(f: &TracedFunction, addr: u64, reason: String) -> RefusedSite {
    RefusedSite { kind: f.method.kind_name().into(), addr, function: f.name.clone(), reason }
}

fn build_error(e: &dynprobe_arch::native::RelocError) -> TextError {
    TextError::Unwritable { addr: 0, reason: format!("the ftrace caller could not be encoded: {e}") }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}
