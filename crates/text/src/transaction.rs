//! One patching transaction: the single place where live code changes.
//!
//! Every writer of code that other threads may be executing goes through [`Transaction`],
//! which carries out the protocol that keeps the program safe, in this order:
//!
//! 1. take the code writer (the kernel's `text_mutex`), so no other writer interleaves;
//! 2. bring the other threads to a safe state: stop those that could be inside the bytes
//!    about to change, leave alone those blocked in the kernel elsewhere
//!    ([`stop::stop_threads_touching`]) — their blocking calls never return early;
//! 3. verify every byte before writing it (verify-then-modify) and write, batched:
//!    * when every other thread is stopped, each edit is written at once;
//!    * when some were left running, multi-byte edits go int3-first, as the kernel's
//!      `text_poke_bp_batch()` does (arch/x86/kernel/alternative.c): every head becomes an
//!      `int3`, the cores are serialized, threads that could have slipped inside are
//!      stopped ([`StoppedWorld::settle`]), the tails are written, the cores serialized,
//!      then the heads;
//! 4. serialize every core ([`try_sync_core`]) and release the threads.
//!
//! ```text
//!   edit at a:   aa bb cc dd ee  →  11 22 33 44 55
//!   phase 1      cc bb cc dd ee     sync_core, settle, caller moves stopped threads
//!   phase 2      cc 22 33 44 55     sync_core
//!   phase 3      11 22 33 44 55     sync_core, release
//! ```
//!
//! A thread left running that reaches a transient `int3` (one that no trap owner registered)
//! waits in the trap dispatcher until its byte changes, then executes what is there
//! ([`crate::trap`]); one that reaches a site's own `int3` is handled by its owner.
//!
//! Nothing is allocated between the stop and the release (a stopped thread may hold the
//! allocator's lock): [`Edits`] are planned, and their buffers made, before [`Transaction::begin`].

use crate::memory::{self, CodeWriter};
use crate::raw;
use crate::stop::{self, InterruptedSet, StoppedWorld};
use crate::sync_core::try_sync_core;
use crate::TextError;
use std::ops::Range;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::time::Duration;

/// The `int3` opcode.
const INT3: u8 = 0xCC;
const INT3_BYTE: &[u8] = &[INT3];

/// Edits at most this far apart are read and written as one range...
const SPAN_GAP: u64 = 64 << 10;
/// ...of at most this many bytes.
const SPAN_MAX: u64 = 4 << 20;

/// Bumped when a transaction begins and when it ends (the code writer serializes them), so
/// it is odd while one is in progress: a sequence lock through which the trap dispatcher
/// tells a transient `int3` (seen while a transaction was in progress) from a foreign one
/// (seen with none in progress before, during and after the look).
static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// Threads waiting in the trap dispatcher for a transient head to change (their tids; 0 =
/// free entry). A stop leaves them alone: they hold nothing and will execute the head once
/// it is final, so they can be inside no instruction being replaced — and they could not
/// answer the stop signal, which the dispatcher blocks.
static WAITERS: [AtomicI32; 256] = [const { AtomicI32::new(0) }; 256];

/// Whether thread `tid` waits in the trap dispatcher for a transient head (see [`WAITERS`]).
pub(crate) fn is_waiting(tid: i32) -> bool {
    WAITERS.iter().any(|w| w.load(Ordering::Acquire) == tid)
}

/// Whether the `int3` at `addr`, which no owner registered, was a transient head of a
/// transaction: waits while a transaction is in progress and the byte is still an `int3`,
/// then answers whether it is gone — the thread should re-execute what is there now, as the
/// kernel does for a breakpoint "removed by another CPU". An `int3` that stays, or an
/// `int $3` (`cd 03`, whose last byte is not `cc`), is the program's own. Runs in the trap
/// dispatcher: allocates nothing, takes no lock; yields while it waits.
pub(crate) fn resolve_transient(addr: u64) -> bool {
    let me = raw::gettid();
    let mut entry = None;
    let mut bytes = [0u8; 2];
    let gone = loop {
        let before = SEQUENCE.load(Ordering::Acquire);
        let readable = raw::read(addr.wrapping_sub(1), &mut bytes)
            || raw::read(addr, &mut bytes[1..]) && {
                bytes[0] = 0;
                true
            };
        if !readable || bytes == [0xCD, 0x03] {
            break false;
        }
        if bytes[1] != INT3 {
            break true;
        }
        if before & 1 == 0 && SEQUENCE.load(Ordering::Acquire) == before {
            // No transaction wrote while we looked, and the int3 is there: not a transient.
            break false;
        }
        if entry.is_none() {
            // Announce the wait before the next look, so that a stop that sees us running
            // and signals us knows why we do not answer.
            entry = WAITERS.iter().find(|w| w.compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed).is_ok());
            continue;
        }
        // SAFETY: sched_yield takes no arguments.
        unsafe { raw::syscall4(libc::SYS_sched_yield, 0, 0, 0, 0) };
    };
    if let Some(entry) = entry {
        entry.store(0, Ordering::Release);
    }
    gone
}

/// Runs of `items` — sorted by address, non-overlapping, each covering the `(address,
/// length)` that `extent` gives — close enough to be read and written as one range: one
/// system call each way for a module's thousands of sites instead of one per site. Each run
/// is a range of indices into `items`; together they cover every item, in order. No run
/// crosses the start or end of a mapping of this process (/proc/self/maps): the bytes between
/// two sites may be a hole — node's text has an unmapped gap of two pages right below its
/// last executable page — and one unreadable byte fails the whole range.
pub fn spans<T>(items: &[T], extent: impl Fn(&T) -> (u64, usize)) -> Vec<Range<usize>> {
    spans_within(items, extent, &mapping_boundaries())
}

/// [`spans`], splitting between two items wherever one of `boundaries` (sorted) lies
/// between them.
fn spans_within<T>(items: &[T], extent: impl Fn(&T) -> (u64, usize), boundaries: &[u64]) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let mut first = 0;
    for i in 1..=items.len() {
        let split = i == items.len() || {
            let ((prev, prev_len), (next, next_len)) = (extent(&items[i - 1]), extent(&items[i]));
            let start = extent(&items[first]).0;
            let prev_end = prev + prev_len as u64;
            let crossing = boundaries.get(boundaries.partition_point(|&b| b < prev_end)).is_some_and(|&b| b <= next);
            crossing || next - prev_end > SPAN_GAP || next + next_len as u64 - start > SPAN_MAX
        };
        if split && i > first {
            spans.push(first..i);
            first = i;
        }
    }
    spans
}

/// Where this process's mappings start and end, sorted; empty when /proc/self/maps cannot
/// be read (the runs then only split at wide gaps).
fn mapping_boundaries() -> Vec<u64> {
    // Sorted by start and disjoint: the ends and starts come in order, a shared one twice.
    let mut boundaries: Vec<u64> = crate::pool::mappings().iter().flat_map(|m| [m.start, m.end]).collect();
    boundaries.dedup();
    boundaries
}

/// A batch of byte replacements, planned before the transaction so that writing it
/// allocates nothing. Build it with [`Edits::new`], then [`Transaction::write`] it.
pub struct Edits<'a> {
    /// `(addr, expected, new)`, sorted by address, non-overlapping.
    items: Vec<(u64, &'a [u8], &'a [u8])>,
    /// Ranges of `items` written with one system call each.
    spans: Vec<Range<usize>>,
    /// One buffer per span, as long as the span.
    scratch: Vec<Vec<u8>>,
    /// The edits of one phase of one span...
    phase: Vec<(u64, &'a [u8], &'a [u8])>,
    /// ...which item each is...
    phase_index: Vec<usize>,
    /// ...and whether its write happened.
    applied: Vec<bool>,
    /// Per edit: how far it got (see `Stage`).
    stage: Vec<Stage>,
}

/// How far an edit got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Planned,
    /// Its head is an `int3` (written by us, or the caller's own).
    HeadArmed,
    /// Its tail is the new one.
    TailWritten,
    /// Every byte is the new one.
    Done,
    /// Left out by the caller after its head was armed: the head is to be put back.
    Skipped,
    /// Its bytes were not what was expected, or a write failed: left as it was.
    Failed,
}

impl<'a> Edits<'a> {
    /// Plans `items` — `(addr, expected, new)` with `expected.len() == new.len()` — for one
    /// transaction. Items may come in any order but must not overlap.
    ///
    /// # Panics
    ///
    /// If an item's `expected` and `new` differ in length, or two items overlap.
    pub fn new(mut items: Vec<(u64, &'a [u8], &'a [u8])>) -> Edits<'a> {
        items.sort_by_key(|&(addr, _, _)| addr);
        for w in items.windows(2) {
            assert!(w[0].0 + w[0].1.len() as u64 <= w[1].0, "edits overlap at {:#x}", w[1].0);
        }
        for &(_, expected, new) in &items {
            assert_eq!(expected.len(), new.len(), "an edit's expected and new bytes differ in length");
        }
        let spans = spans(&items, |&(addr, expected, _)| (addr, expected.len()));
        let scratch = spans
            .iter()
            .map(|span| {
                let (start, last) = (items[span.start], items[span.end - 1]);
                vec![0u8; (last.0 + last.1.len() as u64 - start.0) as usize]
            })
            .collect();
        let n = items.len();
        Edits {
            items,
            spans,
            scratch,
            phase: Vec::with_capacity(n),
            phase_index: Vec::with_capacity(n),
            applied: vec![false; n],
            stage: vec![Stage::Planned; n],
        }
    }

    /// The code the edits change, one range per edit: what a stop must look at.
    pub fn ranges(&self) -> Vec<Range<u64>> {
        self.items.iter().map(|&(addr, expected, _)| addr..addr + expected.len() as u64).collect()
    }

    /// Leaves the edit at `addr` out (between [`Transaction::arm_heads`] and
    /// [`Transaction::finish`]): its bytes stay as they were — a transient head is put back.
    pub fn skip(&mut self, addr: u64) {
        if let Ok(i) = self.items.binary_search_by_key(&addr, |&(a, _, _)| a) {
            if self.stage[i] == Stage::HeadArmed {
                self.stage[i] = Stage::Skipped;
            } else if self.stage[i] == Stage::Planned {
                self.stage[i] = Stage::Failed;
            }
        }
    }

    /// The edits, sorted by address, each with whether it was written (after
    /// [`Transaction::write`]): an edit not written left its bytes as they were.
    pub fn outcomes(&self) -> impl Iterator<Item = (u64, bool)> + '_ {
        self.items.iter().zip(&self.stage).map(|(&(addr, _, _), &stage)| (addr, stage == Stage::Done))
    }

    /// Writes one phase: for every edit in stage `from`, the bytes `pick` chooses (none: the
    /// phase has nothing to do for it); edits whose write happened go to `to`, the others to
    /// `on_fail`. Returns the first write error. Allocates nothing.
    fn phase(
        &mut self,
        writer: &mut CodeWriter,
        from: Stage,
        to: Stage,
        on_fail: Stage,
        pick: impl Fn(u64, &'a [u8], &'a [u8]) -> Option<(u64, &'a [u8], &'a [u8])>,
    ) -> Option<TextError> {
        let mut first_error = None;
        for (span, scratch) in self.spans.iter().zip(&mut self.scratch) {
            self.phase.clear();
            self.phase_index.clear();
            for i in span.clone() {
                if self.stage[i] != from {
                    continue;
                }
                let (addr, expected, new) = self.items[i];
                match pick(addr, expected, new) {
                    Some(edit) => {
                        self.phase.push(edit);
                        self.phase_index.push(i);
                    }
                    None => self.stage[i] = to,
                }
            }
            if self.phase.is_empty() {
                continue;
            }
            let applied = &mut self.applied[..self.phase.len()];
            if let Err(e) = writer.write_span(self.items[span.start].0, scratch, &self.phase, applied) {
                first_error.get_or_insert(e);
            }
            for (&i, &ok) in self.phase_index.iter().zip(applied.iter()) {
                self.stage[i] = if ok { to } else { on_fail };
            }
        }
        first_error
    }
}

/// A patching transaction in progress: the code writer taken and the other threads brought
/// to a safe state, until [`Transaction::commit`] (or drop) serializes the cores and lets
/// them go. See the module's documentation for the protocol.
///
/// ```no_run
/// use dynprobe_text::transaction::{Edits, Transaction};
/// # let (site, nop, call) = (0x401000u64, [0x0f, 0x1f, 0x44, 0, 0], [0xe8, 0, 0, 0, 0]);
/// let mut edits = Edits::new(vec![(site, &nop[..], &call[..])]);
/// let mut txn = Transaction::begin(edits.ranges(), std::time::Duration::from_secs(5))?;
/// txn.write(&mut edits, |_world, _interrupted| {})?;
/// txn.commit()?;
/// # Ok::<(), dynprobe_text::TextError>(())
/// ```
#[must_use = "nothing is written until `.commit()`"]
pub struct Transaction {
    // Fields drop in order: the threads are released before the writer.
    world: StoppedWorld,
    writer: CodeWriter,
    ranges: Vec<Range<u64>>,
    timeout: Duration,
    /// An error of [`Self::arm_heads`] that did not stop the transaction, for [`Self::finish`].
    first_error: Option<TextError>,
    /// Whether [`Self::arm_heads`] armed int3 heads (some thread was left running): the
    /// write then goes on int3-first to its end, even once the settling has stopped every
    /// thread — the heads in the code are the int3s, no longer the expected bytes.
    int3_first: bool,
}

impl Transaction {
    /// Takes the code writer, then stops every other thread that could be executing in
    /// `ranges` — the bytes that will change, and any code (slots, detours) the caller will
    /// inspect threads for or free — leaving alone the threads blocked elsewhere.
    pub fn begin(ranges: Vec<Range<u64>>, timeout: Duration) -> Result<Transaction, TextError> {
        // A thread left running may meet a transient head: the dispatcher must be there.
        crate::trap::install()?;
        let writer = CodeWriter::lock()?;
        let world = stop::stop_threads_touching(&ranges, timeout)?;
        SEQUENCE.fetch_add(1, Ordering::AcqRel);
        Ok(Transaction { world, writer, ranges, timeout, first_error: None, int3_first: false })
    }

    /// The stopped threads (and how many were left running).
    pub fn world(&self) -> &StoppedWorld {
        &self.world
    }

    /// The stopped threads, to move one with [`StoppedWorld::set_ip`].
    pub fn world_mut(&mut self) -> &mut StoppedWorld {
        &mut self.world
    }

    /// Writes every edit (see [`Self::arm_heads`] and [`Self::finish`]); `move_threads` runs
    /// between the two, once every thread that could be inside the changing bytes is
    /// stopped: the caller moves such threads (and signal-interrupted code) with the
    /// [`StoppedWorld`] and the [`InterruptedSet`] given. Allocates nothing.
    ///
    /// Returns the first error; [`Edits::outcomes`] says which edits were written (an edit
    /// whose bytes were not the expected ones is left alone, and so is its part of a span a
    /// write failed in).
    pub fn write(
        &mut self,
        edits: &mut Edits<'_>,
        move_threads: impl FnOnce(&mut StoppedWorld, &InterruptedSet),
    ) -> Result<(), TextError> {
        let interrupted = self.arm_heads(edits)?;
        move_threads(&mut self.world, &interrupted);
        self.finish(edits)
    }

    /// The first half of writing `edits`. When other threads were left running, the heads
    /// of multi-byte edits become `int3`s (a head that already is one, the caller's own
    /// breakpoint, stays), the cores are serialized and the threads that could have slipped
    /// inside meanwhile are stopped ([`StoppedWorld::settle`]); from then on no thread can
    /// enter the changing bytes but through their heads. Returns the signal frames of every
    /// stopped thread, for the caller to find code interrupted inside the changing bytes.
    /// The caller then moves threads, may [`Edits::skip`] edits, and calls [`Self::finish`].
    /// On an error no tail was written and every head is back.
    pub fn arm_heads(&mut self, edits: &mut Edits<'_>) -> Result<InterruptedSet, TextError> {
        self.int3_first = self.world.left_running() > 0;
        if !self.int3_first {
            for stage in &mut edits.stage {
                if *stage == Stage::Planned {
                    *stage = Stage::HeadArmed;
                }
            }
            return Ok(self.world.all_interrupted_contexts());
        }
        let armed = edits.phase(&mut self.writer, Stage::Planned, Stage::HeadArmed, Stage::Failed, |a, e, n| {
            needs_transient_head(e, n).then_some((a, &e[..1], INT3_BYTE))
        });
        let settled = try_sync_core().and_then(|()| self.world.settle(&self.ranges, self.timeout));
        if let Err(e) = settled {
            // A thread may be inside: write no tail. Put the heads back.
            undo_heads(&mut self.writer, edits);
            let _ = try_sync_core();
            return Err(armed.unwrap_or(e));
        }
        self.first_error = armed;
        Ok(self.world.all_interrupted_contexts())
    }

    /// The second half of writing `edits` (after [`Self::arm_heads`]): when every other
    /// thread was stopped from the start, each edit is written whole; otherwise (the heads
    /// are `int3`s, however many threads the settling stopped since) the tails are written
    /// behind the `int3` heads, the cores serialized, then the heads. An edit whose tail could not
    /// be written gets its old head back. Returns the first error of either half.
    pub fn finish(&mut self, edits: &mut Edits<'_>) -> Result<(), TextError> {
        let mut first_error = self.first_error.take();
        if !self.int3_first {
            let e =
                edits.phase(&mut self.writer, Stage::HeadArmed, Stage::Done, Stage::Failed, |a, e, n| Some((a, e, n)));
            undo_heads(&mut self.writer, edits);
            return first_error.or(e).map_or(Ok(()), Err);
        }
        // Phase 2: the tails, behind int3 heads.
        let e = edits.phase(
            &mut self.writer,
            Stage::HeadArmed,
            Stage::TailWritten,
            Stage::HeadArmed,
            |addr, expected, new| (expected.len() > 1).then(|| (addr + 1, &expected[1..], &new[1..])),
        );
        first_error = first_error.or(e);
        if let Err(e) = try_sync_core() {
            first_error.get_or_insert(e);
        }
        // Phase 3: the heads.
        let e = edits.phase(
            &mut self.writer,
            Stage::TailWritten,
            Stage::Done,
            Stage::TailWritten,
            |addr, expected, new| {
                let head = if needs_transient_head(expected, new) { INT3_BYTE } else { &expected[..1] };
                Some((addr, head, &new[..1]))
            },
        );
        first_error = first_error.or(e);
        // An edit whose head could not be written gets its old tail back, then its old head.
        let mut rolled_back = false;
        for (i, stage) in edits.stage.iter_mut().enumerate() {
            if *stage == Stage::TailWritten {
                let (addr, expected, new) = edits.items[i];
                let _ = self.writer.write_verified(addr + 1, &new[1..], &expected[1..]);
                *stage = Stage::HeadArmed;
                rolled_back = true;
            }
        }
        if rolled_back {
            let _ = try_sync_core();
        }
        undo_heads(&mut self.writer, edits);
        first_error.map_or(Ok(()), Err)
    }

    /// Serializes every core and releases the threads.
    pub fn commit(self) -> Result<(), TextError> {
        let synced = try_sync_core();
        drop(self);
        synced
    }
}

/// Whether an edit changes more than its head, in bytes a thread may be fetching, and so
/// needs a transient `int3` head (unless its head already is one, the caller's own).
fn needs_transient_head(expected: &[u8], new: &[u8]) -> bool {
    expected.len() > 1 && expected[0] != INT3 && expected[1..] != new[1..]
}

/// Puts the original head back on every edit left with our transient `int3` (its tail was
/// not written, or was put back). A failed restore is tried once more: an `int3` left behind
/// with no owner would be passed on to the program as its own trap.
fn undo_heads(writer: &mut CodeWriter, edits: &mut Edits<'_>) {
    for (i, stage) in edits.stage.iter_mut().enumerate() {
        if matches!(*stage, Stage::HeadArmed | Stage::Skipped) {
            let (addr, expected, new) = edits.items[i];
            // Where no transient head was written (every thread was stopped) the verify
            // finds no int3 and nothing is written.
            if needs_transient_head(expected, new)
                && writer.write_verified(addr, INT3_BYTE, &expected[..1]).is_err()
                && memory::verify(addr, INT3_BYTE).is_ok()
            {
                let _ = writer.write_verified(addr, INT3_BYTE, &expected[..1]);
            }
            *stage = Stage::Failed;
        }
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        SEQUENCE.fetch_add(1, Ordering::AcqRel);
    }
}

/// Replaces `expected` at `addr` with `new` in one transaction of its own (see the module's
/// documentation): the simple way to change one instruction that threads may be running.
pub fn replace(addr: u64, expected: &[u8], new: &[u8], timeout: Duration) -> Result<(), TextError> {
    memory::verify(addr, expected)?;
    let mut edits = Edits::new(vec![(addr, expected, new)]);
    let mut txn = Transaction::begin(edits.ranges(), timeout)?;
    let written = txn.write(&mut edits, |world, interrupted| move_out_of(world, interrupted, addr, expected.len()));
    let synced = txn.commit();
    written?;
    synced?;
    let done = edits.outcomes().all(|(_, written)| written);
    if done {
        return Ok(());
    }
    Err(TextError::Unexpected { addr, expected: expected.to_vec(), found: memory::read_vec(addr, expected.len())? })
}

/// Moves every thread stopped, or code interrupted by a signal, strictly inside the `len`
/// bytes at `addr` to the first byte after them — for edits where skipping the old bytes is
/// equivalent to running them (NOPs). Allocates nothing.
pub fn move_out_of(world: &mut StoppedWorld, interrupted: &InterruptedSet, addr: u64, len: usize) {
    let inside = |ip: u64| ip > addr && ip < addr + len as u64;
    for i in 0..world.threads().len() {
        let thread = world.threads()[i];
        if inside(thread.ip) {
            world.set_ip(thread.tid, addr + len as u64);
        }
    }
    for context in interrupted.contexts() {
        if inside(context.rip) {
            // Fails only when the frame changed under us, which a stopped thread cannot do.
            let _ = world.set_interrupted_ip(context, addr + len as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_split_at_wide_gaps_and_at_the_size_limit() {
        let five = |&addr: &u64| (addr, 5);
        assert!(spans(&[] as &[u64], five).is_empty());
        // A gap of SPAN_GAP after an item's end stays in the span; one byte more splits it.
        let items = [0x1000, 0x1000 + 5 + SPAN_GAP, 0x1000 + 5 + SPAN_GAP + 5 + SPAN_GAP + 1];
        assert_eq!(spans(&items, five), [0..2, 2..3]);
        // Items a page apart: a new span once the next one would pass SPAN_MAX bytes.
        let items: Vec<u64> = (0..2 * SPAN_MAX / 4096).map(|i| 0x10_0000 + i * 4096).collect();
        let runs = spans(&items, five);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].end, runs[1].start);
        assert_eq!(runs[1].end, items.len());
        assert!(runs.iter().all(|r| items[r.end - 1] + 5 - items[r.start] <= SPAN_MAX));
    }

    #[test]
    fn spans_split_where_a_mapping_starts_or_ends_between_two_items() {
        let five = |&addr: &u64| (addr, 5);
        // Three sites of one text, the last beyond a two-page hole (node's layout).
        let items = [0x25f_d000, 0x25f_d800, 0x260_0000];
        let boundaries = [0xb7_2000, 0x25f_e000, 0x260_0000, 0x260_1000];
        assert_eq!(spans_within(&items, five, &boundaries), [0..2, 2..3]);
        // A boundary right at an item's end or start still splits; none between, none.
        assert_eq!(spans_within(&items, five, &[0x25f_d005]), [0..1, 1..3]);
        assert_eq!(spans_within(&items, five, &[0x25f_d800]), [0..1, 1..3]);
        assert_eq!(spans_within(&items, five, &[0x25f_d002, 0x300_0000]), vec![0..3]);
    }
}
