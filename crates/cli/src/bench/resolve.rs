//! The `resolve-ms` row: how long a source-level spec takes to resolve — finding the
//! program's debug file, opening its DWARF, the function's line, the variable at that site
//! and its member — on the largest program with DWARF installed here: Debian's
//! `libceph-common.so.2` (from librados2, a C++ library) with its `librados2-dbg` debug
//! file (found by build id; scripts/setup installs both), 275 MB of DWARF once inflated.
//!
//! Debian compresses debug files (zlib): the first opening inflates the sections into the
//! cache (`DYNPROBE_CACHE_DIR`), the later ones map them. The row times the later ones, and
//! its note gives the first's time; the cache is a fresh directory removed afterwards.

use std::path::Path;
use std::time::Instant;

use dynprobe_symbols::dwarf::{Access, DebugInfo, SourcePoint, CACHE_DIR_ENV};

use super::measure::{Timing, BATCHES};
use super::program::Scratch;

/// The library, and the spec resolved in it: `crush_do_rule:1 map->max_buckets`.
const PROGRAM: &str = "/usr/lib/x86_64-linux-gnu/ceph/libceph-common.so.2";
const FUNCTION: &str = "crush_do_rule";

/// One resolution from scratch: its time, the DWARF's size and how many of its units were read.
fn resolve_once() -> Result<(f64, usize, usize, usize), String> {
    let started = Instant::now();
    let info =
        DebugInfo::open(Path::new(PROGRAM)).map_err(|e| format!("{e} (scripts/setup installs librados2-dbg)"))?;
    let point = SourcePoint::FunctionLine { name: FUNCTION.into(), file: None, line: 1 };
    let sites = info.resolve(&point).map_err(|e| e.to_string())?;
    let site = sites.first().ok_or("no site")?;
    info.resolve_variable(site, "map", &[Access::Arrow("max_buckets".into())]).map_err(|e| e.to_string())?;
    let elapsed = started.elapsed().as_nanos() as f64;
    Ok((elapsed, info.dwarf_size(), info.units_indexed(), info.unit_count()))
}

/// Resolves the spec once into an empty cache, then [`BATCHES`] times, each from scratch;
/// the batches are nanoseconds per resolution.
pub fn measure_resolve() -> Result<Timing, String> {
    let cache = Scratch::new()?;
    // The bench runs its rows one after another on one thread: no other thread reads the
    // environment meanwhile.
    std::env::set_var(CACHE_DIR_ENV, &cache.path);
    let result = (|| {
        let mut timing = Timing { calls_per_batch: 1, batches: Vec::new(), total_calls: 0, remark: None };
        let (cold, size, indexed, units) = resolve_once()?;
        for _ in 0..BATCHES {
            timing.batches.push(resolve_once()?.0);
            timing.total_calls += 1;
        }
        timing.remark = Some(format!(
            "`{FUNCTION}:1 map->max_buckets` in {PROGRAM} ({} MB of DWARF inflated, {units} units, {indexed} \
             read; librados2-dbg) in {}, the first {:.0} ms (inflating it into the cache); target ≤ 200 ms per \
             100 MB",
            size / 1_000_000,
            timing.ms_spread(),
            cold / 1e6
        ));
        Ok(timing)
    })();
    std::env::remove_var(CACHE_DIR_ENV);
    result
}
