//! x86-64 probe machinery.

mod detour;
mod regs;
pub(crate) mod rethook;

pub use rethook::light_width;
mod thread;
mod trap;

pub(crate) use detour::detour_dispatch_code;
pub use detour::vector_width;
pub(crate) use detour::{bytes_under_jump, disown_detour, move_into_copy, prepare_detour, Island, SiteDetour};
pub(crate) use regs::VectorSave;
pub use regs::{hit_xmm, Regs};
pub(crate) use thread::{blocked_start_trampoline, current_tid, stack_pointer, thread_pointer, StartRoutine};
pub(crate) use trap::{on_post_trap, on_site_trap, prepare_post, prepare_slots, PreparedSlots};
