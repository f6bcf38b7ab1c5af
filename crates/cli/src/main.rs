//! The `dynprobe` command.
//!
//! Each subcommand lives in its own module and owns its arguments; `main` only parses
//! and dispatches.

mod bench;
mod probe;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Dynamic instrumentation for Linux processes.
#[derive(Parser)]
#[command(name = "dynprobe", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure the per-hit cost of dynprobe's probes beside the kernel's uprobes.
    Bench(bench::BenchArgs),
    /// Run a program with probes, printing every hit with the values asked for.
    ///
    /// Example: `dynprobe probe 'p:work x=$arg1' -- ./prog`.
    Probe(probe::ProbeArgs),
    /// Run a small bundled program under `dynprobe probe` to show what it does.
    Demo(probe::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args),
        // These report their own errors: their exit status is the program's.
        Command::Probe(args) => return probe::run(&args),
        Command::Demo(args) => return probe::demo(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dynprobe: {err}");
            ExitCode::FAILURE
        }
    }
}
