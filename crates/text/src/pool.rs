//! Executable memory near a target, for out-of-line slots and detour buffers.
//!
//! A `jmp rel32` and a RIP-relative operand reach ±2 GiB, so slots are mapped within that
//! distance of the code they serve. Fresh memory is filled with `int3`; slots are written
//! with [`crate::memory::write_verified`] expecting those `int3` bytes.
//!
//! The pool maps *chunks* of at least [`CHUNK_SIZE`] bytes (larger as the pool grows) into free gaps of the address space, as
//! close to the target as it can, and carves them into slots with a first-fit allocator in
//! units of [`SLOT_ALIGN`] bytes. A process needs several chunks: a non-PIE executable at
//! `0x400000` and the libraries near `0x7f…` are far more than 2 GiB apart. A chunk is only
//! unmapped when none of its slots is in use, at the end of a session
//! ([`release_unused`]); until then a stale pointer into one hits `int3`, not an unmapped
//! page.

use crate::memory;
use crate::TextError;
use std::sync::Mutex;

/// Bytes mapped at a time (more when a single request is larger).
pub const CHUNK_SIZE: usize = 64 * 1024;
/// The largest chunk the pool's growth maps at a time (a single larger request gets its
/// own size).
const MAX_GROWN_CHUNK: u64 = 8 << 20;
/// Slot sizes and addresses are multiples of this (a cache-line half: keeps slot starts
/// aligned for the decoder and leaves room for small alignment needs of relocated code).
pub const SLOT_ALIGN: usize = 16;

const PAGE: u64 = 4096;
/// The `int3` opcode.
const INT3: u8 = 0xCC;
/// Largest distance a rel32 can cover, less one page, so that a slot near the edge stays in
/// reach of every byte of the target's page.
const REACH: u64 = (1 << 31) - PAGE;
/// User address space ends here on x86-64 with 4-level paging.
const USER_END: u64 = 1 << 47;
/// Address space left free above a program break (heap) so `brk` can still grow: a chunk
/// right after the heap would make `malloc` fall back to `mmap` for good.
const HEAP_ROOM: u64 = 256 << 20;
/// Address space left free below a stack, which grows down into the gap below it.
const STACK_ROOM: u64 = 64 << 20;

/// A run of executable memory handed out by the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecSlot {
    /// First byte.
    pub addr: u64,
    /// Size in bytes (at least what was asked).
    pub size: usize,
}

/// One mapped chunk and its free ranges.
struct Chunk {
    base: u64,
    size: u64,
    /// Free `(start, end)` ranges, sorted and never adjacent (merged on free).
    free: Vec<(u64, u64)>,
}

impl Chunk {
    /// Takes the first free run of `size` bytes that starts at or after `lo` and ends at or
    /// before `hi`.
    fn take(&mut self, size: u64, lo: u64, hi: u64) -> Option<u64> {
        let (i, start) = self.free.iter().enumerate().find_map(|(i, &(s, e))| {
            let start = s.max(lo);
            (start + size <= e.min(hi)).then_some((i, start))
        })?;
        let (s, e) = self.free[i];
        // Split the free range around the taken run; `start` is SLOT_ALIGN-aligned because
        // every range bound and `lo` are.
        let mut rest = Vec::with_capacity(2);
        if s < start {
            rest.push((s, start));
        }
        if start + size < e {
            rest.push((start + size, e));
        }
        self.free.splice(i..=i, rest);
        Some(start)
    }

    /// Returns `[start, end)` to the free list, merging with its neighbours.
    fn give_back(&mut self, start: u64, end: u64) {
        let i = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(i, (start, end));
        if i + 1 < self.free.len() && self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 = self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 = self.free[i].1;
            self.free.remove(i);
        }
    }

    fn contains(&self, addr: u64) -> bool {
        (self.base..self.base + self.size).contains(&addr)
    }
}

/// Every chunk mapped so far. Never used from a signal handler, so a mutex is fine.
static CHUNKS: Mutex<Vec<Chunk>> = Mutex::new(Vec::new());

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// The addresses a slot of `size` bytes may start at so that every byte of it is within
/// reach of every byte of `target .. target + PAGE`: `[lo, hi)` bounds the slot's bytes.
fn window(target: u64, size: u64) -> (u64, u64) {
    let lo = round_up((target + PAGE).saturating_sub(REACH), SLOT_ALIGN as u64);
    let hi = target.saturating_add(REACH).min(USER_END);
    debug_assert!(size <= hi.saturating_sub(lo));
    (lo, hi)
}

/// Hands out `size` bytes of executable memory (filled with `int3`) whose every byte is
/// within ±2 GiB of every byte of `target .. target + 4096`.
pub fn alloc_near(target: u64, size: usize) -> Result<ExecSlot, TextError> {
    let no_memory = TextError::NoNearMemory { target, size };
    let size = round_up(size.max(1) as u64, SLOT_ALIGN as u64);
    let (lo, hi) = window(target, size);
    let mut chunks = CHUNKS.lock().unwrap_or_else(|e| e.into_inner());
    // Newest first: older chunks are the ones most likely full.
    for chunk in chunks.iter_mut().rev() {
        if let Some(addr) = chunk.take(size, lo, hi) {
            return Ok(ExecSlot { addr, size: size as usize });
        }
    }
    // Chunks grow with the pool (half of what is mapped, up to MAX_GROWN_CHUNK): tracing
    // every function of a large program asks for a hundred megabytes of slots and detours,
    // which in 64 KiB chunks would be thousands of mappings, each placed after a read of
    // the memory map and each scanned by every later allocation.
    let needed = round_up(size, CHUNK_SIZE as u64);
    let mapped: u64 = chunks.iter().map(|c| c.size).sum();
    let grown = round_up((mapped / 2).min(MAX_GROWN_CHUNK), CHUNK_SIZE as u64).max(needed);
    let (base, chunk_size) = match map_chunk_near(target, grown, lo, hi) {
        Some(base) => (base, grown),
        None if grown > needed => (map_chunk_near(target, needed, lo, hi).ok_or(no_memory)?, needed),
        None => return Err(no_memory),
    };
    let mut chunk = Chunk { base, size: chunk_size, free: vec![(base, base + chunk_size)] };
    let addr = chunk.take(size, lo, hi).expect("a fresh chunk inside the window has room");
    chunks.push(chunk);
    Ok(ExecSlot { addr, size: size as usize })
}

/// Returns a slot to the pool, refilled with `int3`. The caller guarantees no thread can be
/// executing it any more (after [`crate::stop::synchronize`]).
///
/// A slot that is not the pool's, or whose bytes cannot be refilled, is not reused (the
/// memory is leaked rather than handed out again with stale code in it).
pub fn free(slot: ExecSlot) {
    let mut chunks = CHUNKS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(chunk) = chunks.iter_mut().find(|c| c.contains(slot.addr)) else {
        debug_assert!(false, "pool::free of a slot the pool never handed out: {slot:?}");
        return;
    };
    let int3s = vec![INT3; slot.size];
    let refilled =
        memory::read_vec(slot.addr, slot.size).and_then(|old| memory::write_verified(slot.addr, &old, &int3s));
    if refilled.is_ok() {
        chunk.give_back(slot.addr, slot.addr + slot.size as u64);
    }
}

/// Unmaps every chunk none of whose slots is handed out, so that a process dynprobe is done
/// with keeps no executable memory of it (the end of an attach session). Every slot was
/// given back through [`free`], which the caller may only do once no thread can execute
/// it, so no thread can be in an unmapped chunk. Returns the bytes still mapped: those of
/// chunks with a slot in use.
pub fn release_unused() -> usize {
    let mut chunks = CHUNKS.lock().unwrap_or_else(|e| e.into_inner());
    chunks.retain(|chunk| {
        let unused = chunk.free == [(chunk.base, chunk.base + chunk.size)];
        if unused {
            // SAFETY: the chunk is one this pool mapped, and none of its slots is handed out.
            unsafe { libc::munmap(chunk.base as usize as *mut libc::c_void, chunk.size as usize) };
        }
        !unused
    });
    chunks.iter().map(|c| c.size as usize).sum()
}

/// Gives the end of `slot` back to the pool, keeping its first `size` bytes (rounded up to
/// [`SLOT_ALIGN`]): for code whose length is known only once it is built for its address
/// (a detour), allocated with room for the worst case. The bytes given back must be
/// untouched (`int3`). Returns the slot kept.
pub fn shrink(slot: ExecSlot, size: usize) -> ExecSlot {
    let size = round_up(size.max(1) as u64, SLOT_ALIGN as u64) as usize;
    if size >= slot.size {
        return slot;
    }
    let mut chunks = CHUNKS.lock().unwrap_or_else(|e| e.into_inner());
    match chunks.iter_mut().find(|c| c.contains(slot.addr)) {
        Some(chunk) => {
            chunk.give_back(slot.addr + size as u64, slot.addr + slot.size as u64);
            ExecSlot { addr: slot.addr, size }
        }
        None => slot,
    }
}

/// Writes `code` at `addr`, in a slot this pool handed out that no code was written into
/// yet (every byte still `int3`, as mapped or as [`free`] refilled it): verify-then-modify
/// as [`memory::write_verified`] does, but the check reads the pool's memory directly —
/// mapped readable, and never unmapped while one of its slots is handed out (see
/// [`release_unused`]) — instead of with a system call, and nothing
/// is allocated for the expected bytes. Tracing a large program whole writes two fresh
/// slots per function.
pub fn write_fresh(addr: u64, code: &[u8]) -> Result<(), TextError> {
    let end = addr + code.len() as u64;
    let ours =
        CHUNKS.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|c| c.contains(addr) && end <= c.base + c.size);
    if !ours {
        return Err(TextError::Unwritable { addr, reason: "not a slot of the executable-memory pool".into() });
    }
    // The writer after the pool's lock, never both: `free` takes them the other way round.
    let mut writer = memory::CodeWriter::lock()?;
    // SAFETY: `addr .. end` lies inside one chunk, mapped readable as long as the caller
    // holds its slot; other writers are excluded by `writer`, and the bytes are only read.
    let now = unsafe { std::slice::from_raw_parts(addr as usize as *const u8, code.len()) };
    // Compared a word at a time (a detour is about a kilobyte, and there is one per
    // function of a program traced whole).
    let int3s = u64::from_ne_bytes([INT3; 8]);
    let (words, rest) = now.split_at(now.len() / 8 * 8);
    let fresh =
        words.chunks_exact(8).fold(0, |acc, w| acc | (u64::from_ne_bytes(w.try_into().expect("8 bytes")) ^ int3s)) == 0
            && rest.iter().all(|&b| b == INT3);
    if !fresh {
        return Err(TextError::Unexpected { addr, expected: vec![INT3; code.len()], found: now.to_vec() });
    }
    writer.write_checked(addr, now, code)
}

/// True when `addr` lies in memory this pool mapped (used to refuse probes on slots).
pub fn contains(addr: u64) -> bool {
    CHUNKS.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|c| c.contains(addr))
}

/// One line of `/proc/self/maps`, reduced to what placement (and a transaction's runs of
/// edits, which must not cross one's start or end) needs.
pub(crate) struct Mapping {
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// `[heap]`, or the main executable's own mapping (the break starts after it).
    heap_like: bool,
    /// `[stack]`, or a mapping that grows down.
    stack: bool,
}

/// Reads the current mappings, sorted by address.
pub(crate) fn mappings() -> Vec<Mapping> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let exe = std::fs::read_link("/proc/self/exe").ok();
    let mut out: Vec<Mapping> = maps
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            // perms, offset, dev, inode, then the optional path.
            let path = fields.nth(4).unwrap_or("");
            let is_exe = exe.as_deref().is_some_and(|e| e.as_os_str() == path);
            Some(Mapping { start, end, heap_like: path == "[heap]" || is_exe, stack: path.starts_with("[stack") })
        })
        .collect();
    out.sort_by_key(|m| m.start);
    out
}

/// The lowest address `mmap` may use (`vm.mmap_min_addr`).
fn mmap_min_addr() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65536)
        .max(PAGE)
}

/// Candidate chunk addresses: in every gap that meets the window, the top of the gap (just
/// below the next mapping) and the bottom (just above the previous one), nearest the target
/// first.
fn candidates(target: u64, size: u64, lo: u64, hi: u64) -> Vec<u64> {
    let maps = mappings();
    let floor = round_up(mmap_min_addr(), PAGE);
    let mut gaps = Vec::new();
    let mut prev_end = floor;
    let mut prev_heap = false;
    for m in maps.iter().filter(|m| m.end > floor && m.start < USER_END) {
        if m.start > prev_end {
            gaps.push((prev_end, m.start, prev_heap, m.stack));
        }
        prev_end = prev_end.max(m.end);
        prev_heap = m.heap_like;
    }
    if prev_end < USER_END {
        gaps.push((prev_end, USER_END, prev_heap, false));
    }
    let mut out = Vec::new();
    for (start, end, after_heap, before_stack) in gaps {
        let start = round_up(start + if after_heap { HEAP_ROOM } else { 0 }, PAGE).max(round_up(lo, PAGE));
        let end = (end.saturating_sub(if before_stack { STACK_ROOM } else { 0 }) & !(PAGE - 1)).min(hi & !(PAGE - 1));
        if start + size > end {
            continue;
        }
        out.push(end - size);
        out.push(start);
    }
    out.sort_by_key(|&a| a.abs_diff(target));
    out.dedup();
    out
}

/// Maps `size` bytes of `int3`-filled read+execute memory in `[lo, hi)`, near `target`.
fn map_chunk_near(target: u64, size: u64, lo: u64, hi: u64) -> Option<u64> {
    candidates(target, size, lo, hi).into_iter().find_map(|addr| map_chunk_at(addr, size))
}

/// Maps a chunk at exactly `addr`, or nothing.
fn map_chunk_at(addr: u64, size: u64) -> Option<u64> {
    let len = size as usize;
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping: it fails with EEXIST
    // when the range is taken (another thread may have mapped it since we read the maps).
    let p = unsafe {
        libc::mmap(
            addr as usize as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    if p as u64 != addr {
        // Kernels before 4.17 treat the flag as a hint and may map elsewhere.
        // SAFETY: `p` is the mapping we just made and nothing refers to it yet.
        unsafe { libc::munmap(p, len) };
        return None;
    }
    // The chunk is filled while it is still writable and no thread can know of it, then
    // turned read+execute: never writable and executable at once. Later writes go through
    // /proc/self/mem.
    // SAFETY: `p .. p + len` is our fresh, writable mapping.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), INT3, len) };
    // SAFETY: changes the protection of our own fresh mapping only.
    if unsafe { libc::mprotect(p, len, libc::PROT_READ | libc::PROT_EXEC) } != 0 {
        // SAFETY: as above, nothing refers to the mapping yet.
        unsafe { libc::munmap(p, len) };
        return None;
    }
    Some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> Chunk {
        Chunk { base: 0x1000, size: 0x100, free: vec![(0x1000, 0x1100)] }
    }

    #[test]
    fn take_respects_the_window_and_splits() {
        let mut c = chunk();
        assert_eq!(c.take(0x20, 0x1040, 0x2000), Some(0x1040));
        assert_eq!(c.free, vec![(0x1000, 0x1040), (0x1060, 0x1100)]);
        assert_eq!(c.take(0x40, 0, 0x1050), Some(0x1000));
        assert_eq!(c.take(0x10, 0, 0x1050), None);
        assert_eq!(c.free, vec![(0x1060, 0x1100)]);
    }

    #[test]
    fn give_back_merges_neighbours() {
        let mut c = chunk();
        let a = c.take(0x10, 0, u64::MAX).unwrap();
        let b = c.take(0x10, 0, u64::MAX).unwrap();
        let d = c.take(0x10, 0, u64::MAX).unwrap();
        c.give_back(a, a + 0x10);
        c.give_back(d, d + 0x10);
        assert_eq!(c.free, vec![(0x1000, 0x1010), (0x1020, 0x1100)]);
        c.give_back(b, b + 0x10);
        assert_eq!(c.free, vec![(0x1000, 0x1100)]);
    }

    #[test]
    fn write_fresh_writes_only_untouched_slots_of_the_pool() {
        let slot = alloc_near(write_fresh_writes_only_untouched_slots_of_the_pool as *const () as u64, 32).unwrap();
        let code = [0x90, 0x90, 0xc3];
        write_fresh(slot.addr, &code).unwrap();
        assert_eq!(memory::read_vec(slot.addr, 4).unwrap(), [0x90, 0x90, 0xc3, INT3]);
        // Written once: not fresh any more, and left as it is.
        let again = write_fresh(slot.addr, &[0xc3]).unwrap_err();
        assert!(matches!(again, TextError::Unexpected { .. }), "{again}");
        let longer = write_fresh(slot.addr, &[0x90; 24]).unwrap_err();
        assert!(matches!(longer, TextError::Unexpected { .. }), "{longer}");
        assert_eq!(memory::read_vec(slot.addr, 3).unwrap(), code);
        // Memory that is not the pool's is refused, whatever it holds.
        let stack = [INT3; 4];
        let foreign = write_fresh(stack.as_ptr() as u64, &[0x90]).unwrap_err();
        assert!(matches!(foreign, TextError::Unwritable { .. }), "{foreign}");
        free(slot);
        // Given back refilled with int3: fresh again for its next owner.
        let reused = alloc_near(slot.addr, 32).unwrap();
        write_fresh(reused.addr, &code).unwrap();
        free(reused);
    }

    #[test]
    fn a_shrunk_slot_gives_its_end_back() {
        let near = a_shrunk_slot_gives_its_end_back as *const () as u64;
        let slot = alloc_near(near, 1536).unwrap();
        let kept = shrink(slot, 1041);
        assert_eq!(kept, ExecSlot { addr: slot.addr, size: 1056 });
        // The end is free again; nothing else can be handed out inside what is kept.
        let next = alloc_near(near, 480).unwrap();
        assert!(next.addr >= kept.addr + kept.size as u64 || next.addr + next.size as u64 <= kept.addr, "{next:?}");
        assert_eq!(shrink(kept, 4096), kept, "a slot never grows");
        free(next);
        free(kept);
    }

    #[test]
    fn window_keeps_every_byte_in_reach() {
        let target = 0x40_0000;
        let (lo, hi) = window(target, 64);
        assert_eq!(lo % SLOT_ALIGN as u64, 0);
        assert!(hi - (target) < 1 << 31);
        assert!(target + PAGE - lo <= 1 << 31);
    }
}
