//! `dynprobe report`: per function, its calls, total, self, average and longest time, like
//! `uftrace report`.
//!
//! ```text
//!   Total time   Self time    Avg time    Max time       Calls  Function
//!   ==========  ==========  ==========  ==========  ==========  ====================
//!     2.000 ms    1.994 ms    2.000 ms    2.000 ms           1  main
//!     2.100 us    1.588 us    2.100 us    2.100 us           1  parse_record
//! ```
//!
//! - **Calls** counts every call seen, including those whose entry or exit was not
//!   recorded; the times only use calls with both (a footnote says how many lack one).
//! - **Total** is the time inside the function, counted once per outermost activation: a
//!   recursive call inside another call of the same function adds nothing more.
//! - **Self** is each call's time minus the time of the traced calls made inside it,
//!   summed over every call (recursive ones included), so the self times add up to the
//!   traced time.
//! - **Avg** and **Max** are over the calls with a time.
//! - Calls **entered before the attach** (`record -p`) count in Calls only: their time
//!   from the attach is not the call's (a footnote says how many).
//!
//! Functions of the same name and module in several process images (a `fork`) are one row.
//! With `--args` (a trace recorded with `record -a`) a function has a row for each
//! distinct arguments and return value its calls had: `parse_record(line="alpha,12",
//! len=8) = 12`, as replay writes them.

use super::calls::Visit;
use super::values::Descriptions;
use super::{check_tids, exit, load, process_threads, Error};
use dynprobe_events::model::Trace;
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `dynprobe report`.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// The trace directory written by `dynprobe record`.
    #[arg(value_name = "DIR", default_value = super::DEFAULT_DIR)]
    dir: PathBuf,
    /// Sort by this column (`name` ascending, the others descending).
    #[arg(short = 's', long = "sort", value_enum, default_value_t = SortKey::Total)]
    sort: SortKey,
    /// Only count this thread's calls (repeatable).
    #[arg(long = "tid", value_name = "TID")]
    tids: Vec<u32>,
    /// A row for each distinct arguments and return value of a function (a trace recorded
    /// with `record -a`), written as replay writes them.
    #[arg(long = "args")]
    by_args: bool,
}

/// The column `report` sorts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    /// Total time.
    Total,
    /// Self time.
    #[value(name = "self")]
    SelfTime,
    /// Number of calls.
    Calls,
    /// Average time.
    Avg,
    /// Longest call.
    Max,
    /// Function name.
    Name,
}

/// One function's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    /// The function's name (`module:name` when two modules have a function of that name).
    pub name: String,
    /// Calls seen.
    pub calls: u64,
    /// Calls with both an entry and an exit.
    pub timed: u64,
    /// Time in the outermost activations, in ns.
    pub total: u64,
    /// Time in the function itself, in ns.
    pub self_ns: u64,
    /// Sum of every timed call's duration, for the average.
    pub sum: u64,
    /// Longest call, in ns.
    pub max: u64,
}

impl Row {
    /// The average duration of the timed calls.
    pub fn avg(&self) -> u64 {
        self.sum.checked_div(self.timed).unwrap_or(0)
    }
}

/// The figures of every function in `trace` (the threads in `tids`, all when empty),
/// sorted by `key`, how many calls had no time, and how many of those were entered before
/// the attach (`record -p`: their time from the attach is counted in no column). With
/// `values`, a row for each distinct call signature and return value of a function.
pub fn rows(trace: &Trace, tids: &[u32], key: SortKey, values: Option<&Descriptions>) -> (Vec<Row>, u64, u64) {
    let mut rows: HashMap<(&str, Cow<str>), Row> = HashMap::new();
    let mut untimed = 0;
    let mut before_attach = 0;
    for process in &trace.processes {
        for thread in process_threads(process, tids) {
            let tree = &thread.tree;
            // How many calls of each function are open on the path being walked.
            let mut active: HashMap<(&str, Cow<str>), u32> = HashMap::new();
            tree.walk(|visit| {
                let (Visit::Enter(id, _) | Visit::Leave(id, _)) = visit;
                let Some(call) = tree.call(id) else { return false };
                let f = &process.functions[call.func as usize];
                let name = match values {
                    Some(values) => {
                        let retval = values.retval(process, thread.thread, call).map(|v| format!(" = {v}"));
                        let signature = values.signature(process, thread.thread, call, &f.name);
                        Cow::Owned(signature + retval.as_deref().unwrap_or(""))
                    }
                    None => Cow::Borrowed(f.name.as_str()),
                };
                let key = (f.module.as_str(), name);
                let depth = active.entry(key.clone()).or_default();
                match visit {
                    Visit::Enter(..) => {
                        let row = rows.entry(key).or_default();
                        row.calls += 1;
                        match call.duration() {
                            // Its time counts from the attach: not the call's.
                            Some(_) if call.before_attach => before_attach += 1,
                            Some(duration) => {
                                let inside: u64 = tree.nodes[id]
                                    .children
                                    .iter()
                                    .filter_map(|&child| tree.call(child).filter(|c| !c.before_attach)?.duration())
                                    .sum();
                                row.timed += 1;
                                row.sum += duration;
                                row.max = row.max.max(duration);
                                row.self_ns += duration.saturating_sub(inside);
                                if *depth == 0 {
                                    row.total += duration;
                                }
                            }
                            None => untimed += 1,
                        }
                        *depth += 1;
                    }
                    Visit::Leave(..) => *depth -= 1,
                }
                true
            });
        }
    }
    // A name in two modules is shown with its module.
    let mut modules: HashMap<String, u32> = HashMap::new();
    for (_, name) in rows.keys() {
        *modules.entry(name.to_string()).or_default() += 1;
    }
    let mut rows: Vec<Row> = rows
        .into_iter()
        .map(|((module, name), row)| {
            let name = if modules[name.as_ref()] > 1 { format!("{module}:{name}") } else { name.into_owned() };
            Row { name, ..row }
        })
        .collect();
    rows.sort_by(|a, b| {
        let by_key = match key {
            SortKey::Total => b.total.cmp(&a.total),
            SortKey::SelfTime => b.self_ns.cmp(&a.self_ns),
            SortKey::Calls => b.calls.cmp(&a.calls),
            SortKey::Avg => b.avg().cmp(&a.avg()),
            SortKey::Max => b.max.cmp(&a.max),
            SortKey::Name => std::cmp::Ordering::Equal,
        };
        by_key.then_with(|| a.name.cmp(&b.name))
    });
    (rows, untimed + before_attach, before_attach)
}

/// Runs `dynprobe report`.
pub fn run(args: &ReportArgs) -> ExitCode {
    exit((|| {
        let trace = load(Some(&args.dir))?;
        check_tids(&trace, &args.tids)?;
        let values = match args.by_args {
            true => Some(Descriptions::load(&trace.dir)?),
            false => None,
        };
        let mut out = BufWriter::new(io::stdout().lock());
        report(&trace, &args.tids, args.sort, values.as_ref(), &mut out)?;
        out.flush().map_err(Error::from)
    })())
}

/// Writes the table (a row per distinct call with `values`, see [`rows`]).
pub fn report(
    trace: &Trace,
    tids: &[u32],
    key: SortKey,
    values: Option<&Descriptions>,
    out: &mut dyn Write,
) -> io::Result<()> {
    let (rows, untimed, before_attach) = rows(trace, tids, key, values);
    let rule = "==========";
    writeln!(out, "  Total time   Self time    Avg time    Max time       Calls  Function")?;
    writeln!(out, "  {rule}  {rule}  {rule}  {rule}  {rule}  {rule}{rule}")?;
    let time = |ns: u64, timed: u64| if timed == 0 { "-".to_string() } else { super::duration(ns) };
    for row in &rows {
        writeln!(
            out,
            "  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {}",
            time(row.total, row.timed),
            time(row.self_ns, row.timed),
            time(row.avg(), row.timed),
            time(row.max, row.timed),
            row.calls,
            row.name
        )?;
    }
    if untimed > before_attach {
        writeln!(
            out,
            "\n# {} call(s) have no time: their entry or exit was not recorded (running when \
             recording started or ended, or lost)",
            untimed - before_attach
        )?;
    }
    if before_attach > 0 {
        writeln!(
            out,
            "\n# {before_attach} call(s) were entered before the attach: counted in Calls, their time from the \
             attach in no column"
        )?;
    }
    let lost: u64 = trace
        .processes
        .iter()
        .flat_map(|p| &p.threads)
        .filter(|t| tids.is_empty() || tids.contains(&t.tid))
        .map(|t| t.lost)
        .sum();
    if lost > 0 {
        writeln!(
            out,
            "\n# WARNING: {lost} events were lost: the figures of the calls around the losses are incomplete"
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::tests::trace;
    use dynprobe_events::model::EventKind::{Entry, Exit, Lost};

    const NAMES: &[&str] = &["main", "fib", "leaf"];

    /// main(0..1000) { fib(10..510) { fib(20..220) { fib(30..80) leaf(100..110) } leaf(300..400) } }
    fn recursive() -> Trace {
        trace(
            NAMES,
            &[(
                7,
                &[
                    (0, Entry, 0, 0),
                    (10, Entry, 1, 1),
                    (20, Entry, 2, 1),
                    (30, Entry, 3, 1),
                    (80, Exit, 3, 1),
                    (100, Entry, 3, 2),
                    (110, Exit, 3, 2),
                    (220, Exit, 2, 1),
                    (300, Entry, 2, 2),
                    (400, Exit, 2, 2),
                    (510, Exit, 1, 1),
                    (1000, Exit, 0, 0),
                ],
            )],
        )
    }

    #[test]
    fn recursion_counts_total_once_and_self_in_every_call() {
        let (rows, untimed, _) = rows(&recursive(), &[], SortKey::Total, None);
        assert_eq!(untimed, 0);
        let row = |name: &str| rows.iter().find(|r| r.name == name).unwrap().clone();
        assert_eq!(
            row("main"),
            Row { name: "main".into(), calls: 1, timed: 1, total: 1000, self_ns: 500, sum: 1000, max: 1000 }
        );
        // fib: outermost 500; self = (500 - 200 - 100) + (200 - 50 - 10) + 50 = 390.
        assert_eq!(
            row("fib"),
            Row { name: "fib".into(), calls: 3, timed: 3, total: 500, self_ns: 390, sum: 750, max: 500 }
        );
        assert_eq!(row("fib").avg(), 250);
        assert_eq!(
            row("leaf"),
            Row { name: "leaf".into(), calls: 2, timed: 2, total: 110, self_ns: 110, sum: 110, max: 100 }
        );
        // The self times add up to the traced time.
        assert_eq!(rows.iter().map(|r| r.self_ns).sum::<u64>(), 1000);
        let order: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(order, ["main", "fib", "leaf"]);
    }

    #[test]
    fn sort_keys() {
        let t = recursive();
        let order = |key| rows(&t, &[], key, None).0.into_iter().map(|r| r.name).collect::<Vec<_>>();
        assert_eq!(order(SortKey::SelfTime), ["main", "fib", "leaf"]);
        assert_eq!(order(SortKey::Calls), ["fib", "leaf", "main"]);
        assert_eq!(order(SortKey::Avg), ["main", "fib", "leaf"]);
        assert_eq!(order(SortKey::Max), ["main", "fib", "leaf"]);
        assert_eq!(order(SortKey::Name), ["fib", "leaf", "main"]);
    }

    #[test]
    fn the_table_with_untimed_calls_and_losses() {
        let t = trace(
            NAMES,
            &[
                (7, &[(0, Entry, 0, 0), (10, Entry, 1, 2), (2_110, Exit, 1, 2)]),
                (8, &[(5, Exit, 1, 2), (6, Lost(4), 0, 0)]),
            ],
        );
        let mut out = Vec::new();
        report(&t, &[], SortKey::Total, None, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "  Total time   Self time    Avg time    Max time       Calls  Function
  ==========  ==========  ==========  ==========  ==========  ====================
    2.100 us    2.100 us    2.100 us    2.100 us           2  leaf
           -           -           -           -           1  main

# 2 call(s) have no time: their entry or exit was not recorded (running when recording started or ended, or lost)

# WARNING: 4 events were lost: the figures of the calls around the losses are incomplete
"
        );
        let (only7, _, _) = rows(&t, &[7], SortKey::Total, None);
        assert_eq!(only7.iter().map(|r| r.calls).collect::<Vec<_>>(), [1, 1]);
    }
}
