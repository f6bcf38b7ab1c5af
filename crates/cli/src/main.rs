//! The `dynprobe` command.
//!
//! Each subcommand lives in its own module and owns its arguments; `main` only parses
//! and dispatches.

mod bench;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dynprobe: {err}");
            ExitCode::FAILURE
        }
    }
}
