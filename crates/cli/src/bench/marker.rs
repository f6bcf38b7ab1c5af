//! The static-marker rows: the bench target's work behind a `dynprobe::marker!` site, with
//! nothing attached (`marker-disabled`: the cost the marker leaves in a program, which
//! should not be measurable) and with an empty handler attached (`marker-enabled`: the
//! NOP turned into a jump to a detour).
//!
//! The target is Rust, since the macro is: [`bench_marker`] does what `bench/target.c`'s
//! `dynprobe_bench_target` does, and compiles to the same instructions plus the marker's
//! (its argument already in `rdi`, a zeroing of `rsi` — the macro's second slot for one
//! argument — and the NOP), so `baseline-call` is the identical loop without the marker.

use std::ffi::c_long;

use dynprobe::marker::{Marker, MarkerHandle, NOP5};

use super::rows::Armed;

/// The marker the rows use.
const SPEC: &str = "dynprobe_bench:call";

/// `dynprobe_bench_target`'s work with a marker carrying the argument in front of it.
#[inline(never)]
pub extern "C" fn bench_marker(x: c_long) -> c_long {
    dynprobe::marker!(dynprobe_bench, call, x);
    let mut v = x as u64;
    v ^= v >> 31;
    v = v.wrapping_mul(0x7e37_79b9);
    v ^= v >> 29;
    v as c_long
}

/// The marker's one site, checked to hold its NOP: a number measured over a site someone
/// else had patched would not be the disabled cost.
fn site() -> Result<u64, String> {
    let sites = Marker::find(SPEC).map_err(|e| e.to_string())?;
    let [site] = sites.as_slice() else {
        return Err(format!("{SPEC} has {} sites, not one", sites.len()));
    };
    // SAFETY: the site is in this executable's mapped, readable text.
    let code = unsafe { std::ptr::read_volatile(site.addr as *const [u8; 5]) };
    if code != NOP5 {
        return Err(format!("{SPEC} at {:#x} holds {code:02x?}, not its NOP", site.addr));
    }
    Ok(site.addr)
}

/// `marker-disabled`'s setup: nothing to arm, only the NOP to check.
pub fn disabled(_target: super::target::Target) -> Result<Box<dyn Armed>, String> {
    site()?;
    Ok(Box::new(()))
}

/// `marker-enabled`'s setup: an empty handler on the marker, its site jump-optimized.
pub fn enabled(_target: super::target::Target) -> Result<Box<dyn Armed>, String> {
    site()?;
    let handle = Marker::attach(SPEC, |_hit| {}).map_err(|e| format!("attach: {e}"))?;
    if !handle.all_optimized() {
        return Err(format!("the marker's probe was not optimized: {handle:?}"));
    }
    Ok(Box::new(handle))
}

impl Armed for MarkerHandle {
    fn hits(&self) -> Result<Option<u64>, String> {
        Ok(Some(MarkerHandle::hits(self)))
    }

    fn disarm(self: Box<Self>) -> Result<(), String> {
        self.detach().map(|_final_counts| ()).map_err(|e| format!("detach: {e}"))?;
        site().map(|_| ())
    }
}
