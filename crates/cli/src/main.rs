//! The `dynprobe` command.
//!
//! Each subcommand lives in its own module and owns its arguments; `main` only parses
//! and dispatches, and owns the exit-status convention every subcommand follows
//! ([`EXIT_STATUS`]): 0 success; a program dynprobe ran, its own status passed through as
//! `time` and `strace` do (128+N when signal N killed it); 2 dynprobe's own errors, as for
//! a command line clap refuses.

mod bench;
mod demo;
mod markers;
mod probe;
mod record;
mod trace;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Subcommand};

/// The exit status of every dynprobe error — a bad spec or option, a refused probe, a
/// program that cannot be run or attached to, an unreadable trace — the status clap gives a
/// command line it refuses. A program dynprobe runs exits with its own status instead.
pub(crate) const EXIT_ERROR: u8 = 2;

/// The exit statuses, as `--help` of a subcommand that runs a program shows them.
const EXIT_STATUS: &str = "Exit status:
  0    success (with -p: detached, the process runs on)
  N    the status of the program dynprobe ran, passed through as `time` and `strace` do;
       128+N when signal N killed it
  2    dynprobe's own error (bad spec or option, refused probe, program not found, process
       not traceable); a program's own status 2 cannot be told from it";

/// The exit statuses of a subcommand that runs no program.
const EXIT_STATUS_OWN: &str = "Exit status:
  0    success
  2    dynprobe's own error (bad option, unreadable input), with the reason on stderr";

/// `--help` text after the options: `examples`, then the exit statuses.
fn after_help(examples: &str, exit_status: &str) -> String {
    format!("Examples:\n{examples}\n\n{exit_status}")
}

/// Dynamic instrumentation for Linux processes: kprobes, return probes, function tracing
/// and static markers, for programs dynprobe starts or attaches to.
#[derive(clap::Parser)]
#[command(name = "dynprobe", version)]
#[command(after_help = after_help(
    "  dynprobe record -F 'parse_*' -- ./server --port 8080 && dynprobe replay
  dynprobe probe -p 4242 'p:libc:malloc size=%rdi:u64' 'r:libc:malloc ptr=$retval:x64'",
    &format!("{EXIT_STATUS}\n(for `replay`, `report`, `export`, `list-markers` and `bench`: 0 or 2)"),
))]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure the per-hit cost of dynprobe's probes beside the kernel's uprobes.
    #[command(after_help = after_help(
        "  dynprobe bench                               every row, as a table
  dynprobe bench --rows optimized-probe --json  one row (and its baselines), as JSON",
        EXIT_STATUS_OWN,
    ))]
    Bench(bench::BenchArgs),
    /// Run a program with probes, printing every hit with the values asked for.
    #[command(after_help = after_help(probe::EXAMPLES, &format!("{EXIT_STATUS}\n\n`--help` shows the whole spec grammar.")))]
    #[command(after_long_help = after_help(probe::EXAMPLES, &format!("{}\n\n{EXIT_STATUS}", probe::grammar_help())))]
    Probe(probe::ProbeArgs),
    /// Trace a small bundled program with `dynprobe record` and show its call graph
    /// (`--probe`: run it under `dynprobe probe` instead).
    #[command(after_help = after_help("  dynprobe demo\n  dynprobe demo --probe --json", EXIT_STATUS))]
    Demo(demo::DemoArgs),
    /// Run a program and record every call of its functions into a trace directory.
    #[command(after_help = after_help(
        "  dynprobe record -- ./prog args               every function of ./prog
  dynprobe record -M 'app:*' --depth 8 -- ./prog  markers too, calls 8 deep
  dynprobe record -F 'parse_*' -N parse_header -F 'libc:malloc' -o trace.d -- ./server --port 8080",
        EXIT_STATUS,
    ))]
    Record(record::RecordArgs),
    /// Show a recorded trace as a call graph with durations, like the kernel's function_graph.
    #[command(after_help = after_help(
        "  dynprobe replay            the trace in ./dynprobe.data
  dynprobe replay trace.d --tid 4242 --time-filter 1us -F 'parse_*'",
        EXIT_STATUS_OWN,
    ))]
    Replay(trace::replay::ReplayArgs),
    /// Show per function of a recorded trace: calls, total, self, average and longest time.
    #[command(after_help = after_help("  dynprobe report\n  dynprobe report trace.d -s self", EXIT_STATUS_OWN))]
    Report(trace::report::ReportArgs),
    /// Write a recorded trace as Chrome trace-event JSON (Perfetto) or folded stacks (flame graphs).
    #[command(after_help = after_help(
        "  dynprobe export --chrome out.json trace.d  open in ui.perfetto.dev
  dynprobe export --folded - trace.d | flamegraph.pl > calls.svg",
        EXIT_STATUS_OWN,
    ))]
    Export(trace::export::ExportArgs),
    /// List the static markers (dynprobe's and SDT/USDT probes) of a program or a process.
    #[command(after_help = after_help(
        "  dynprobe list-markers ./server   link-time addresses
  dynprobe list-markers -p 4242    every module of a running process",
        EXIT_STATUS_OWN,
    ))]
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
        Command::Replay(args) => return trace::replay::run(&args),
        Command::Report(args) => return trace::report::run(&args),
        Command::Export(args) => return trace::export::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dynprobe: {err}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
