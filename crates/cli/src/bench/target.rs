//! The C functions of `bench/target.c`, linked in by `build.rs`.

use std::ffi::c_long;

/// A function the bench loop calls: one signature for every row so one loop serves all.
///
/// It is `unsafe` because a target may need its row's setup first: `dynprobe_bench_int3`
/// kills the process unless a SIGTRAP handler is installed.
pub type Target = unsafe extern "C" fn(c_long) -> c_long;

extern "C" {
    /// The function every probe row instruments; its entry is a plain `mov %rdi,%rax`.
    /// Pure arithmetic on its argument: always sound to call.
    pub fn dynprobe_bench_target(x: c_long) -> c_long;
    /// The same work as [`dynprobe_bench_target`] after an `int3`: sound to call only while
    /// a SIGTRAP handler that resumes after the `int3` is installed.
    pub fn dynprobe_bench_int3(x: c_long) -> c_long;
    /// [`dynprobe_bench_target`] behind a 5-byte NOP (the kernel uprobe's best case).
    pub fn dynprobe_bench_nop5(x: c_long) -> c_long;
    /// Calls [`dynprobe_bench_target`], then runs one legacy SSE instruction that writes an
    /// xmm register. Always sound to call.
    pub fn dynprobe_bench_sse(x: c_long) -> c_long;
    /// The work of [`dynprobe_bench_target`] after a VEX write to ymm1 and one legacy SSE
    /// instruction; ends with `vzeroupper`. Sound to call only on a CPU with AVX.
    pub fn dynprobe_bench_upper_dirty(x: c_long) -> c_long;
    /// [`dynprobe_bench_target`]'s work behind a jump to a hand-built detour that only
    /// runs the covered instructions and jumps back (the floors are described in
    /// `bench/target.c`). Every `dynprobe_floor_*` function is sound to call.
    pub fn dynprobe_floor_jump(x: c_long) -> c_long;
    /// [`dynprobe_floor_jump`] + a detour's register frame.
    pub fn dynprobe_floor_gprs(x: c_long) -> c_long;
    /// [`dynprobe_floor_gprs`] + `pushfq`/`popfq`.
    pub fn dynprobe_floor_flags(x: c_long) -> c_long;
    /// [`dynprobe_floor_flags`] with the flags put back by `sahf` (no `popfq`).
    pub fn dynprobe_floor_sahf(x: c_long) -> c_long;
    /// [`dynprobe_floor_gprs`] + the call of a dispatcher that returns at once.
    pub fn dynprobe_floor_call(x: c_long) -> c_long;
    /// [`dynprobe_floor_call`] whose dispatcher finds the thread's slot, sets and clears a
    /// recursion guard, counts the hit per thread and calls an empty handler through a
    /// pointer. One thread at a time.
    pub fn dynprobe_floor_least(x: c_long) -> c_long;
    /// The work with its return address kept aside and written back unchanged. Calls from
    /// one thread at a time only (one static slot).
    pub fn dynprobe_floor_ret_swap(x: c_long) -> c_long;
    /// The work returning into a trampoline that jumps back to the caller: one
    /// mispredicted return. One thread at a time.
    pub fn dynprobe_floor_ret_miss(x: c_long) -> c_long;
    /// [`dynprobe_floor_ret_miss`] through the return sled's shape. One thread at a time.
    pub fn dynprobe_floor_ret_sled(x: c_long) -> c_long;
    /// [`dynprobe_floor_ret_sled`] + the general registers saved around the call of a
    /// dispatcher that only returns the address. One thread at a time.
    pub fn dynprobe_floor_ret_call(x: c_long) -> c_long;
    /// [`dynprobe_floor_call`] whose dispatcher diverts the return address into
    /// [`dynprobe_floor_ret_call`]'s sled: a return probe's two paths with nothing done in
    /// either. One thread at a time.
    pub fn dynprobe_floor_ret_probe(x: c_long) -> c_long;
    /// [`dynprobe_floor_ret_probe`] whose dispatchers do what a return probe's must with
    /// dynprobe's thread slots: at the entry, [`dynprobe_floor_least`]'s work, an empty entry handler and an
    /// instance pushed; at the return, the thread's slot found, the guard set and cleared,
    /// the instance popped and an empty return handler called. One thread at a time.
    pub fn dynprobe_floor_ret_least(x: c_long) -> c_long;
    /// The work after one `rdtsc`: the clock read every ring record pays.
    pub fn dynprobe_floor_rdtsc(x: c_long) -> c_long;
    /// The work behind the function-graph tracer's floor: an entry `call` to a caller that
    /// writes a timed record and diverts the return into a sled whose dispatcher writes
    /// another. One thread at a time.
    pub fn dynprobe_floor_graph(x: c_long) -> c_long;
    /// [`dynprobe_floor_graph`] with what a tracer of many threads must add with
    /// dynprobe's thread slots: at
    /// each end the thread's slot found and the recursion guard set and cleared, the record
    /// written at the thread's own head; the call pushed on, and popped off, the thread's
    /// stack of calls in flight. One thread at a time.
    pub fn dynprobe_floor_graph_least(x: c_long) -> c_long;
}

/// Where `target`'s code starts in this process: the address its probes go on.
pub fn address(target: Target) -> u64 {
    target as usize as u64
}

/// The address of the middle instruction of `target` (neither its first nor its `ret`), for
/// a probe "inside a function". Found by decoding the function from its symbol's bounds.
pub fn middle_instruction(target: Target) -> Result<u64, String> {
    let start = address(target);
    let table = dynprobe_symbols::SymbolTable::current_process().map_err(|e| e.to_string())?;
    let (symbol, _) = table.resolve(start).ok_or_else(|| format!("no symbol covers the bench target at {start:#x}"))?;
    // SAFETY: the symbol's bytes are the target's mapped, executable code.
    let bytes = unsafe { std::slice::from_raw_parts(start as *const u8, symbol.size as usize) };
    let insns = dynprobe_arch::native::decode_function(bytes, start).map_err(|e| e.to_string())?;
    insns.get(insns.len() / 2).map(|insn| insn.ip).ok_or_else(|| format!("{} has no instructions", symbol.name))
}
