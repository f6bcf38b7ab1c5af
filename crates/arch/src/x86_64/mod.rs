//! x86-64 instruction layer.
//!
//! * [`decode`]: instruction boundaries and control-flow facts of a function's bytes.
//! * [`classify`]: may this instruction run out of line, and if not, why not.
//! * [`relocate`](mod@relocate): the bytes of a run of instructions moved to a new address, with the map
//!   from old to new offsets, and the out-of-line "slots" the probe layer executes.
//! * [`optimize`]: may a probe point be covered by a detour jump (the kernel's "Safety Check",
//!   Documentation/trace/kprobes.rst), with [`jump_table`] telling where indirect jumps go.
//! * [`detour`]: the detour buffer a jump-optimized probe jumps to.
//! * [`trampoline`]: the code a return probe's trampoline runs.
//! * [`ftrace`]: the code a traced function's entry site calls.
//! * [`hook_frame`]: where the program's stack pointer is while a thread runs that code.
//! * [`trap_fallback`]: the `SIGTRAP` handler a ptrace tracer leaves in its target, which
//!   restores the original bytes if the tracer dies.
//! * [`return_stub`]: where a function a ptrace tracer calls in another process returns to,
//!   which puts the thread's registers back itself if the tracer died during the call.
//! * [`encode`]: the few fixed encodings dynprobe writes (int3, jmp/call rel32, NOP5).
//! * [`vector_use`]: the proof, by decoding, that a handler leaves the vector state alone.

pub mod classify;
pub mod decode;
pub mod detour;
pub mod encode;
pub mod ftrace;
pub mod hook_frame;
pub mod jump_table;
pub mod optimize;
pub mod relocate;
pub mod return_stub;
pub mod trampoline;
pub mod trap_fallback;
pub mod vector_use;

pub use classify::{check_out_of_line, Refusal};
pub use decode::{decode_function, decode_one, instruction_at, signal_syscalls, DecodeError, Flow, Insn};
pub use encode::{
    call_rel32, jmp_abs, jmp_any, jmp_rel32, jmp_rel8, rel32_reaches, INT3, JMP_ABS_LEN, JMP_REL32_LEN, JMP_REL8_LEN,
    NOP5,
};
pub use relocate::{build_post_slot, build_slot, relocate, PostSlot, RelocError, Relocated};

/// The red zone: the 128 bytes below `rsp` that a function may use without moving `rsp`
/// (System V AMD64 ABI, §3.2.2 "The Stack Frame"), so a leaf function's data may be there at
/// any instruction. Whatever dynprobe pushes on a thread's stack — a detour's frame, a return
/// probe's bookkeeping, a call made into another process — goes below it.
pub const RED_ZONE: u64 = 128;
