//! `dynprobe bench`: the added cost per hit of each kind of probe, measured in one run on
//! one function beside the raw SIGTRAP round trip and the kernel's own uprobes, and the
//! cost per call of function-graph tracing a program beside uftrace's.
//!
//! A probe row arms its instrumentation ([`rows::Measure::Call`]), the loop calls the row's
//! target ([`measure`]), the instrumentation is disarmed and must have seen every call. A
//! tracer row runs a program under the tracer, which times its own calls ([`program`]).
//! [`report`] turns the timings into added nanoseconds and ratios.

mod attach;
mod host;
mod many;
mod marker;
mod measure;
mod program;
mod ptrace;
mod report;
mod resolve;
mod rows;
mod startup;
mod target;
mod uprobe;

use std::collections::BTreeSet;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use measure::{Plan, Timing};
use rows::{Measure, Row, ROWS};

/// Arguments of `dynprobe bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Print `{"host":{…},"rows":[…]}` as JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,

    /// Calls per measured batch, for every row [default: calibrated to ~0.1 s per batch];
    /// the start-up rows then start their program once instead of five times.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    iterations: Option<u64>,

    /// Rows to run, comma-separated [default: all]. `baseline-call` and the rows a row is
    /// compared with run too.
    #[arg(long, value_name = "ROW,...", value_delimiter = ',')]
    rows: Vec<String>,

    /// Pin the process to the CPU it starts on, so migrations don't disturb the timing.
    #[arg(long)]
    pin: bool,
}

/// Runs the selected rows and prints the report.
pub fn run(args: &BenchArgs) -> Result<(), String> {
    let selected = select(&args.rows)?;
    if args.pin {
        pin_to_current_cpu().map_err(|err| format!("--pin: {err}"))?;
    }
    let plan = Plan { calls_per_batch: args.iterations };
    // Read before the rows run: the load average is the machine's, not the bench's own.
    let host = host::Host::current();
    let outcomes: Vec<_> = selected.into_iter().map(|row| (row, run_row(row, plan))).collect();
    let report = report::Report::new(host, &outcomes);
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// The rows named in `--rows` plus what they depend on (the rows they are compared with and
/// the baselines of all of them), in [`ROWS`] order.
fn select(names: &[String]) -> Result<Vec<&'static Row>, String> {
    if names.is_empty() {
        return Ok(ROWS.iter().collect());
    }
    let mut wanted = BTreeSet::new();
    for name in names {
        let row = rows::find(name).ok_or_else(|| {
            let known: Vec<_> = ROWS.iter().map(|row| row.name).collect();
            format!("unknown row `{name}`; rows are: {}", known.join(", "))
        })?;
        for needed in std::iter::once(row).chain(row.compare_to.iter().filter_map(|name| rows::find(name))) {
            wanted.insert(needed.name);
            wanted.extend(needed.baseline());
        }
    }
    Ok(ROWS.iter().filter(|row| wanted.contains(row.name)).collect())
}

/// Measures one row. Every failure, including a panic in code that is not written yet,
/// becomes the row's error so the other rows still run and print.
fn run_row(row: &Row, plan: Plan) -> Result<Timing, String> {
    catch_panic(|| match row.measure {
        Measure::Call { target, setup } => {
            let armed = setup(target)?;
            // SAFETY: `setup` succeeded, which is what makes calling the row's target sound
            // (the contract of `Measure::Call::target`), and it stays armed until after the
            // measurement.
            let timing = unsafe { measure::measure(target, plan) };
            all_calls_hit(armed, timing)
        }
        Measure::CallThreads { target, setup } => {
            let armed = setup(target)?;
            // SAFETY: as for `Measure::Call`, from every thread.
            let timing = unsafe { measure::measure_threads(target, plan) };
            all_calls_hit(armed, timing)
        }
        // One thread of the program, timed by its CPU time as every calling row is: the wall
        // clock counted the minutes a traced loop waited for a CPU on a shared machine
        // (30 ns of 75 in one row here, with one build beside it on two CPUs).
        Measure::Program(tracer) => program::measure(tracer, plan, Some(1)),
        Measure::ProgramThreads(tracer) => program::measure(tracer, plan, Some(measure::threads())),
        Measure::SiteBatch => program::measure_site_batch(),
        Measure::Attach => attach::measure_attach(),
        Measure::Resolve => resolve::measure_resolve(),
        Measure::Detach => attach::measure_detach(),
        Measure::RecordAttach => attach::measure_record_attach(plan),
        Measure::PtraceProbe => ptrace::measure_ptrace_probe(),
        Measure::Startup(case) => startup::measure(case, plan),
    })
}

/// Disarms `armed` and returns `timing`, unless the instrumentation counted fewer hits than
/// the calls made: the number would then not be its cost.
fn all_calls_hit(armed: Box<dyn rows::Armed>, timing: Timing) -> Result<Timing, String> {
    let hits = armed.hits();
    armed.disarm()?;
    match hits? {
        Some(hits) if hits < timing.total_calls => {
            Err(format!("fired {hits} times for {} calls: the number would not be a probe's cost", timing.total_calls))
        }
        _ => Ok(timing),
    }
}

/// Runs `f`, turning a panic into an error that says where and why, without the default
/// hook's message on stderr (the report shows it in the row instead).
fn catch_panic<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let message = Arc::new(Mutex::new(None));
    let previous_hook = panic::take_hook();
    panic::set_hook(Box::new({
        let message = Arc::clone(&message);
        move |info| *message.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.to_string())
    }));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    panic::set_hook(previous_hook);
    result.unwrap_or_else(|_| {
        let message = message.lock().unwrap_or_else(|e| e.into_inner()).take();
        Err(message.unwrap_or_else(|| "panicked".to_owned()).replace('\n', " "))
    })
}

/// Restricts this process to the CPU it is running on now.
fn pin_to_current_cpu() -> io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(rustix::thread::sched_getcpu());
    // `None`: this thread.
    Ok(rustix::thread::sched_setaffinity(None, &set)?)
}
