//! `dynprobe-uprobes`: the ptrace fallback on its own, speaking the line protocol on
//! stdout and taking `detach` (or end of file) on stdin — what `dynprobe probe` runs in a
//! child process, usable by hand and by the tests.
//!
//! ```text
//! dynprobe-uprobes -p PID SPEC...
//! dynprobe-uprobes SPEC... -- PROGRAM ARGS...
//! dynprobe-uprobes --bench PROGRAM CALLS      (PROGRAM built from the crate's BENCH_SOURCE)
//! ```

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::process::ExitCode;

use dynprobe::spec::ProbeSpec;
use dynprobe_uprobes::{measure_hit_ns, run, Target};

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match main_with(args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("dynprobe-uprobes: {message}");
            ExitCode::from(2)
        }
    }
}

fn main_with(args: Vec<OsString>) -> Result<ExitCode, String> {
    if args.first().is_some_and(|a| a == "--bench") {
        let program = args.get(1).ok_or("--bench needs PROGRAM CALLS")?;
        let calls = args.get(2).and_then(|c| c.to_str()?.parse().ok()).ok_or("--bench needs a number of calls")?;
        let cost = measure_hit_ns(program.as_ref(), calls).map_err(|e| e.to_string())?;
        println!(
            "ns_per_hit={:.0} plain_ns_per_call={:.1} hits={}",
            cost.ns_per_hit, cost.plain_ns_per_call, cost.hits
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (target, spec_args) = if args.first().is_some_and(|a| a == "-p") {
        let pid = args.get(1).and_then(|p| p.to_str()?.parse().ok()).ok_or("-p needs a process id")?;
        (Target::Pid(pid), &args[2..])
    } else {
        let dash = args.iter().position(|a| a == "--").ok_or("give -p PID, or a program after --")?;
        (Target::Command(args[dash + 1..].to_vec()), &args[..dash])
    };
    let specs = spec_args
        .iter()
        .map(|s| ProbeSpec::parse(&s.to_string_lossy()).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let info = run(target, &specs, std::io::stdout().as_fd(), std::io::stdin().as_fd()).map_err(|e| e.to_string())?;
    eprintln!(
        "dynprobe-uprobes: {:?}, {} hits, {} missed returns, {} abandoned returns",
        info.outcome, info.hits, info.missed_returns, info.abandoned_returns
    );
    Ok(ExitCode::SUCCESS)
}
