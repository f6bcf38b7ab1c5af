//! Prints how long building a symbol table takes, for this process or a given pid:
//! `cargo run --release --example load_time -p dynprobe-symbols [-- PID]`.

use std::time::Instant;

use dynprobe_symbols::SymbolTable;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pid: Option<i32> = std::env::args().nth(1).map(|a| a.parse()).transpose()?;
    // The best of several runs: on a busy machine single runs mostly measure the others.
    let mut best = None;
    let mut table = None;
    for _ in 0..10 {
        let start = Instant::now();
        table = Some(match pid {
            Some(pid) => SymbolTable::for_pid(pid)?,
            None => SymbolTable::current_process()?,
        });
        let elapsed = start.elapsed();
        best = Some(best.map_or(elapsed, |b: std::time::Duration| b.min(elapsed)));
    }
    let (table, elapsed) = (table.expect("loaded"), best.expect("timed"));
    println!(
        "{} modules, {} function symbols in {:.2} ms (best of 10)",
        table.modules().len(),
        table.symbols().len(),
        elapsed.as_secs_f64() * 1e3
    );
    for m in table.modules() {
        println!("  {:#014x} {}", m.bias, m.path.display());
    }
    for w in table.warnings() {
        println!("  warning: {w}");
    }
    Ok(())
}
