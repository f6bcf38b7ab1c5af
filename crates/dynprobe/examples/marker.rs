//! A static marker: one 5-byte NOP in the code while nobody listens; a handler attached by
//! name sees every hit with its typed arguments, and the NOP is back after the detach.
//!
//! `cargo run --example marker` (and, built, `readelf -n` shows the site as an SDT note)

use dynprobe::marker::{markers, ArgValue, Marker, MarkerError};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[inline(never)]
fn handle_request(id: u32, size: u64, path: &str) {
    dynprobe::marker!(example_server, request, id, size, path);
}

static BYTES: AtomicU64 = AtomicU64::new(0);
static LONG_PATHS: AtomicU64 = AtomicU64::new(0);

fn serve() {
    for (id, path) in ["/", "/index.html", "/images/logo.png"].iter().enumerate() {
        handle_request(id as u32, 100 * (id as u64 + 1), path);
    }
}

fn main() -> Result<(), MarkerError> {
    for site in markers()?.iter().filter(|s| s.provider == "example_server") {
        let args: Vec<String> = site.args.iter().map(|a| a.to_string()).collect();
        println!("{:#x}  {}({})", site.addr, site.spec(), args.join(", "));
    }
    serve(); // nothing attached: the marker costs a NOP
    let handle = Marker::attach("example_server:request", |hit| {
        if let Some(ArgValue::Unsigned(size)) = hit.arg(1) {
            BYTES.fetch_add(size, Relaxed);
        }
        if let Some(ArgValue::Str(path)) = hit.arg(2) {
            LONG_PATHS.fetch_add(u64::from(path.len() > 1), Relaxed);
        }
    })?;
    serve();
    let stats = handle.detach()?;
    serve(); // detached: a NOP again
    println!(
        "{} hits, {} bytes requested, {} paths longer than /",
        stats.hits,
        BYTES.load(Relaxed),
        LONG_PATHS.load(Relaxed)
    );
    assert_eq!((stats.hits, BYTES.load(Relaxed), LONG_PATHS.load(Relaxed)), (3, 600, 2));
    Ok(())
}
