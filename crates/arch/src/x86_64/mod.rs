//! x86-64 instruction layer.
//!
//! * [`decode`]: instruction boundaries and control-flow facts of a function's bytes.
//! * [`classify`]: may this instruction run out of line, and if not, why not.
//! * [`relocate`](mod@relocate): the bytes of a run of instructions moved to a new address, with the map
//!   from old to new offsets, and the out-of-line "slots" the probe layer executes.
//! * [`optimize`]: may a probe point be covered by a detour jump (the checks of seed 004 §1.4.2).
//! * [`detour`]: the detour buffer a jump-optimized probe jumps to.
//! * [`trampoline`]: the code a return probe's trampoline runs.
//! * [`ftrace`]: the code a traced function's entry site calls.
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
pub mod optimize;
pub mod relocate;
pub mod return_stub;
pub mod trampoline;
pub mod trap_fallback;
pub mod vector_use;

pub use classify::{check_out_of_line, Refusal};
pub use decode::{decode_function, decode_one, instruction_at, signal_syscalls, DecodeError, Flow, Insn};
pub use encode::{call_rel32, jmp_abs, jmp_any, jmp_rel32, rel32_reaches, INT3, JMP_ABS_LEN, JMP_REL32_LEN, NOP5};
pub use relocate::{build_post_slot, build_slot, relocate, PostSlot, RelocError, Relocated};
