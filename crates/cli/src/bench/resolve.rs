//! The `resolve-ms` row: how long a source-level spec takes to resolve — finding the
//! program's debug file, reading its DWARF, the function's line, the variable at that site
//! and its member — on the largest program with DWARF installed here: Debian's `python3.11`
//! with its `python3.11-dbg` debug file (found by build id).

use std::path::Path;
use std::time::Instant;

use dynprobe_symbols::dwarf::{Access, DebugInfo, SourcePoint};

use super::measure::{Timing, BATCHES};

/// The program, and the spec resolved in it: `PyList_Append:1 op->ob_type`.
const PROGRAM: &str = "/usr/bin/python3.11";
const FUNCTION: &str = "PyList_Append";

/// Resolves the spec [`BATCHES`] times, each from scratch; the batches are nanoseconds per
/// resolution.
pub fn measure_resolve() -> Result<Timing, String> {
    let mut timing = Timing { calls_per_batch: 1, batches: Vec::new(), total_calls: 0, remark: None };
    let mut size = 0;
    for _ in 0..BATCHES {
        let started = Instant::now();
        let info = DebugInfo::open(Path::new(PROGRAM)).map_err(|e| format!("{e} (scripts/setup installs it)"))?;
        let point = SourcePoint::FunctionLine { name: FUNCTION.into(), file: None, line: 1 };
        let sites = info.resolve(&point).map_err(|e| e.to_string())?;
        let site = sites.first().ok_or("no site")?;
        info.resolve_variable(site, "op", &[Access::Arrow("ob_type".into())]).map_err(|e| e.to_string())?;
        timing.batches.push(started.elapsed().as_nanos() as f64);
        timing.total_calls += 1;
        size = info.dwarf_size();
    }
    timing.remark = Some(format!(
        "`{FUNCTION}:1 op->ob_type` in {PROGRAM} ({} MB of DWARF, python3.11-dbg) in {}; target ≤ 200 ms per 100 MB",
        size / 1_000_000,
        timing.ms_spread()
    ));
    Ok(timing)
}
