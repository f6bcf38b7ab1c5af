//! The `dynprobe` command.
//!
//! Each subcommand lives in its own module and owns its arguments; `main` only parses
//! and dispatches.

mod bench;
mod demo;
mod markers;
mod probe;
mod record;
mod trace;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Subcommand};

/// Dynamic instrumentation for Linux processes.
#[derive(clap::Parser)]
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
    /// Trace a small bundled program with `dynprobe record` and show its call graph
    /// (`--probe`: run it under `dynprobe probe` instead).
    Demo(demo::DemoArgs),
    /// Run a program and record every call of its functions into a trace directory.
    ///
    /// Example: `dynprobe record -F 'parse_*' -- ./server --port 8080`.
    Record(record::RecordArgs),
    /// Show a recorded trace as a call graph with durations, like the kernel's function_graph.
    Replay(trace::replay::ReplayArgs),
    /// Show per function of a recorded trace: calls, total, self, average and longest time.
    Report(trace::report::ReportArgs),
    /// Write a recorded trace as Chrome trace-event JSON (Perfetto) or folded stacks (flame graphs).
    Export(trace::export::ExportArgs),
    /// List the static markers (dynprobe's and SDT/USDT probes) of a program or a process.
    ///
    /// Example: `dynprobe list-markers ./server` or `dynprobe list-markers -p 4242`.
    ListMarkers(markers::ListMarkersArgs),
}

fn main() -> ExitCode {
    // Parsed in two steps: `record` needs the matches too, for the order of -F and -N.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args),
        Command::ListMarkers(args) => markers::run(&args),
        // These report their own errors: their exit status is the program's.
        Command::Probe(args) => return probe::run(&args),
        Command::Demo(args) => return demo::run(&args),
        Command::Record(args) => {
            let record = matches.subcommand_matches("record").expect("the record subcommand was parsed");
            return record::run(&args, record);
        }
        // These fail with status 2, like `probe` with a bad spec.
        Command::Replay(args) => return trace::replay::run(&args),
        Command::Report(args) => return trace::report::run(&args),
        Command::Export(args) => return trace::export::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dynprobe: {err}");
            ExitCode::FAILURE
        }
    }
}
