//! `dynprobe export`: a trace as Chrome trace-event JSON (Perfetto, chrome://tracing) or as
//! folded stacks for flame graphs (inferno, flamegraph.pl).
//!
//! Both are timelines and need a time span for every call: a call whose entry was not
//! recorded starts with its thread's first event, one whose exit was not recorded ends
//! with its thread's last event (or its caller's end), as [`CallTree::spans`] gives them.
//!
//! - Chrome: `{"traceEvents":[...],"displayTimeUnit":"ns"}` with one complete event
//!   (`"ph":"X"`) per call, `ts`/`dur` in microseconds (fractions carry the nanoseconds)
//!   from the start of the recording; `args` says when the entry or exit is not recorded
//!   or the call was unwound, and, in a trace recorded with `record -a`, the call's arguments
//!   and `retval` as `replay` shows them. Lost events are instant events (`"ph":"i"`) named
//!   `N events lost`, marker hits (`record -M`) instant events named `provider:name` with
//!   their arguments; process and thread names are metadata events (`"ph":"M"`).
//! - Folded: one line per distinct stack, `main;parse_record;checksum 512`: the
//!   nanoseconds spent in the last function itself with that stack, summed; stacks with
//!   no time are left out.
//!
//! [`CallTree::spans`]: super::calls::CallTree::spans

use super::calls::{End, Item, Visit};
use super::{check_tids, exit, file_name, load, process_threads, Error};
use dynprobe_events::model::{MarkerValue, Trace};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Arguments of `dynprobe export`.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// Write Chrome trace-event JSON to this file (`-` for standard output); open it in
    /// Perfetto (ui.perfetto.dev) or chrome://tracing.
    #[arg(long, value_name = "OUT.json")]
    chrome: Option<PathBuf>,
    /// Write folded stacks to this file (`-` for standard output), for `inferno-flamegraph`
    /// or `flamegraph.pl`.
    #[arg(long, value_name = "OUT.txt")]
    folded: Option<PathBuf>,
    /// The trace directory written by `dynprobe record`.
    #[arg(value_name = "DIR", default_value = super::DEFAULT_DIR)]
    dir: PathBuf,
    /// Only export this thread (repeatable).
    #[arg(long = "tid", value_name = "TID")]
    tids: Vec<u32>,
}

/// Runs `dynprobe export`.
pub fn run(args: &ExportArgs) -> ExitCode {
    exit((|| {
        if args.chrome.is_none() && args.folded.is_none() {
            return Err(Error::from("nothing to export: give --chrome OUT.json and/or --folded OUT.txt".to_string()));
        }
        let trace = load(Some(&args.dir))?;
        check_tids(&trace, &args.tids)?;
        if let Some(path) = &args.chrome {
            write_to(path, |out| chrome(&trace, &args.tids, out))?;
        }
        if let Some(path) = &args.folded {
            write_to(path, |out| folded(&trace, &args.tids, out))?;
        }
        Ok(())
    })())
}

/// Runs `write` on the file `path` (standard output for `-`).
fn write_to(path: &Path, write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<(), Error> {
    let named = |e: io::Error| Error::from(format!("cannot write `{}`: {e}", path.display()));
    if path == Path::new("-") {
        let mut out = BufWriter::new(io::stdout().lock());
        write(&mut out)?;
        return out.flush().map_err(Error::from);
    }
    // Owner-only, as the trace it comes from.
    let file = dynprobe_events::files::create_output(path)
        .map_err(|e| Error::from(format!("cannot create `{}`: {e}", path.display())))?;
    let mut out = BufWriter::new(file);
    write(&mut out).map_err(named)?;
    out.flush().map_err(named)
}

/// Writes `trace` as Chrome trace-event JSON.
pub fn chrome(trace: &Trace, tids: &[u32], out: &mut dyn Write) -> io::Result<()> {
    let values = super::values::Descriptions::load(&trace.dir).map_err(io::Error::other)?;
    let micros = |ns: u64| Value::from(ns.saturating_sub(trace.start_ns) as f64 / 1e3);
    out.write_all(b"{\"traceEvents\":[")?;
    let mut first = true;
    let mut event = |out: &mut dyn Write, value: Value| -> io::Result<()> {
        out.write_all(if first { b"\n" } else { b",\n" })?;
        first = false;
        serde_json::to_writer(&mut *out, &value).map_err(io::Error::from)
    };
    for process in &trace.processes {
        let threads = process_threads(process, tids);
        if threads.is_empty() {
            continue;
        }
        let (pid, exe) = (process.pid, file_name(&process.exe));
        event(out, json!({"name": "process_name", "ph": "M", "pid": pid, "tid": pid, "args": {"name": exe}}))?;
        for thread in &threads {
            let tid = thread.thread.tid;
            let name = if tid == pid { exe.to_string() } else { format!("thread {tid}") };
            event(out, json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}))?;
            let tree = &thread.tree;
            let spans = tree.spans();
            let mut result = Ok(());
            tree.walk(|visit| {
                let Visit::Enter(id, _) = visit else { return true };
                let (begin, end) = spans[id];
                let value = match &tree.nodes[id].item {
                    Item::Lost { count, .. } => json!({
                        "name": format!("{count} events lost"), "cat": "lost", "ph": "i", "s": "t",
                        "ts": micros(begin), "pid": pid, "tid": tid,
                    }),
                    Item::Marker { site, args, .. } => {
                        let args: serde_json::Map<String, Value> = thread
                            .marker_args(*args)
                            .into_iter()
                            .map(|(name, value)| (name, marker_json(value)))
                            .collect();
                        json!({
                            "name": thread.marker_name(*site), "cat": "marker", "ph": "i", "s": "t",
                            "ts": micros(begin), "pid": pid, "tid": tid, "args": args,
                        })
                    }
                    Item::Call(call) => {
                        let function = &process.functions[call.func as usize];
                        let mut args = json!({"module": function.module});
                        if call.begin.is_none() {
                            args["entry"] = "not recorded (running when recording started)".into();
                        }
                        if call.before_attach {
                            args["entry"] = "before the attach (record -p): the span starts at the attach".into();
                        }
                        match call.end {
                            End::Missing => args["exit"] = "not recorded".into(),
                            End::Unwound(_) => args["exit"] = "unwound".into(),
                            End::Returned(_) => {}
                        }
                        // With `record -a`: the call's arguments and return value, as replay
                        // shows them.
                        for (name, value) in values.args(process, thread.thread, call).unwrap_or_default() {
                            args[name] = value.into();
                        }
                        if let Some(retval) = values.retval(process, thread.thread, call) {
                            args["retval"] = retval.into();
                        }
                        json!({
                            "name": function.name, "cat": "function", "ph": "X",
                            "ts": micros(begin), "dur": Value::from((end - begin) as f64 / 1e3),
                            "pid": pid, "tid": tid, "args": args,
                        })
                    }
                };
                result = event(out, value);
                result.is_ok()
            });
            result?;
        }
    }
    out.write_all(b"\n],\"displayTimeUnit\":\"ns\"}\n")
}

/// A marker argument in JSON: a number, or a string as `replay` shows it (pointers in hex,
/// strings unquoted).
fn marker_json(value: &MarkerValue) -> Value {
    match value {
        MarkerValue::Unsigned(v) => Value::from(*v),
        MarkerValue::Signed(v) => Value::from(*v),
        MarkerValue::Bool(v) => Value::from(*v),
        MarkerValue::Str { bytes, .. } => Value::from(String::from_utf8_lossy(bytes)),
        other => Value::from(other.to_string()),
    }
}

/// Writes `trace` as folded stacks.
pub fn folded(trace: &Trace, tids: &[u32], out: &mut dyn Write) -> io::Result<()> {
    let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
    for process in &trace.processes {
        for thread in process_threads(process, tids) {
            let tree = &thread.tree;
            let spans = tree.spans();
            let length = |id: usize| spans[id].1 - spans[id].0;
            let mut stack: Vec<String> = Vec::new();
            tree.walk(|visit| match visit {
                Visit::Enter(id, _) => {
                    let Some(call) = tree.call(id) else { return false };
                    // `;` separates frames and the last space the count.
                    stack.push(thread.name(call.func).replace(';', ":"));
                    let inside: u64 =
                        tree.nodes[id].children.iter().filter(|&&c| tree.call(c).is_some()).map(|&c| length(c)).sum();
                    *stacks.entry(stack.join(";")).or_default() += length(id).saturating_sub(inside);
                    true
                }
                Visit::Leave(..) => {
                    stack.pop();
                    true
                }
            });
        }
    }
    for (stack, ns) in stacks {
        if ns > 0 {
            writeln!(out, "{stack} {ns}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::tests::{process, trace};
    use dynprobe_events::model::EventKind::{Entry, Exit, Lost, Unwound};

    const NAMES: &[&str] = &["main", "parse_record", "checksum", "fib"];

    /// Two threads: 7 runs main { parse_record { checksum checksum } fib { fib~ } } and is
    /// killed inside a second parse_record; 8 returns out of parse_record it was in when
    /// recording started, and loses events.
    fn two_threads() -> Trace {
        trace(
            NAMES,
            &[
                (
                    7,
                    &[
                        (1_000, Entry, 0, 0),
                        (1_100, Entry, 1, 1),
                        (1_200, Entry, 2, 2),
                        (1_712, Exit, 2, 2),
                        (1_800, Entry, 2, 2),
                        (2_000, Exit, 2, 2),
                        (3_200, Exit, 1, 1),
                        (4_000, Entry, 1, 3),
                        (4_100, Entry, 2, 3),
                        (4_500, Unwound, 2, 3),
                        (5_000, Exit, 1, 3),
                        (9_000, Exit, 0, 0),
                        (9_500, Entry, 0, 1),
                        (9_600, Entry, 1, 2),
                    ],
                ),
                (8, &[(2_000, Entry, 1, 2), (2_500, Exit, 1, 2), (2_600, Lost(5), 0, 0), (3_000, Exit, 0, 1)]),
            ],
        )
    }

    fn chrome_json(trace: &Trace) -> Value {
        let mut out = Vec::new();
        chrome(trace, &[], &mut out).unwrap();
        serde_json::from_slice(&out).expect("valid JSON")
    }

    #[test]
    fn chrome_events_nest_per_thread_and_every_call_is_there() {
        let json = chrome_json(&two_threads());
        assert_eq!(json["displayTimeUnit"], "ns");
        let events = json["traceEvents"].as_array().unwrap();
        let meta: Vec<(&str, u64, &str)> = events
            .iter()
            .filter(|e| e["ph"] == "M")
            .map(|e| (e["name"].as_str().unwrap(), e["tid"].as_u64().unwrap(), e["args"]["name"].as_str().unwrap()))
            .collect();
        assert_eq!(
            meta,
            [("process_name", 100, "demo"), ("thread_name", 7, "thread 7"), ("thread_name", 8, "thread 8")]
        );
        for tid in [7, 8] {
            // Sorted as a viewer does (by start, longest first), each call must lie inside
            // every call still open: that is what "properly nested" means for X events.
            let mut calls: Vec<(f64, f64, &str)> = events
                .iter()
                .filter(|e| e["ph"] == "X" && e["tid"] == tid)
                .map(|e| {
                    assert_eq!((e["cat"].as_str(), e["pid"].as_u64()), (Some("function"), Some(100)));
                    let ts = e["ts"].as_f64().unwrap();
                    (ts, ts + e["dur"].as_f64().unwrap(), e["name"].as_str().unwrap())
                })
                .collect();
            calls.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
            let mut open: Vec<(f64, f64, &str)> = Vec::new();
            for call in &calls {
                while open.last().is_some_and(|o| o.1 <= call.0 && o.1 < call.1) {
                    open.pop();
                }
                if let Some(parent) = open.last() {
                    assert!(parent.0 <= call.0 && call.1 <= parent.1, "{call:?} overlaps {parent:?}");
                }
                open.push(*call);
            }
            let names: Vec<&str> = calls.iter().map(|c| c.2).collect();
            let expected: &[&str] = if tid == 7 {
                &["main", "parse_record", "checksum", "checksum", "fib", "fib", "parse_record", "checksum"]
            } else {
                &["parse_record", "checksum"]
            };
            assert_eq!(names, expected);
        }
        // Microseconds from the start (0), nanoseconds in the fraction.
        let ns = |micros: &Value| (micros.as_f64().unwrap() * 1e3).round() as u64;
        let find = |name: &str, tid: u64, ts: u64| {
            events.iter().find(|e| e["name"] == name && e["tid"] == tid && ns(&e["ts"]) == ts).unwrap()
        };
        assert_eq!(ns(&find("checksum", 7, 1_200)["dur"]), 512);
        assert_eq!(find("fib", 7, 4_100)["args"]["exit"], "unwound");
        // Killed inside: closed with the thread's last event.
        let killed = find("parse_record", 7, 9_500);
        assert_eq!((ns(&killed["dur"]), &killed["args"]["exit"]), (100, &json!("not recorded")));
        // Running when recording started: opened with the thread's first event.
        let unentered = find("parse_record", 8, 2_000);
        assert_eq!(ns(&unentered["dur"]), 1_000);
        assert!(unentered["args"]["entry"].as_str().unwrap().starts_with("not recorded"));
        let lost = events.iter().find(|e| e["ph"] == "i").unwrap();
        assert_eq!(
            (lost["name"].as_str(), ns(&lost["ts"]), lost["tid"].as_u64()),
            (Some("5 events lost"), 2_600, Some(8))
        );
    }

    #[test]
    fn chrome_names_processes_and_filters_threads() {
        let mut t = two_threads();
        let mut child = process(101, NAMES, &[(101, &[(10_000, Entry, 0, 2), (10_050, Exit, 0, 2)])]);
        child.parent = 100;
        t.processes.push(child);
        let mut out = Vec::new();
        chrome(&t, &[101], &mut out).unwrap();
        let json: Value = serde_json::from_slice(&out).unwrap();
        let events = json["traceEvents"].as_array().unwrap();
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(events[1]["args"]["name"], "demo", "the main thread is named after the program");
        assert_eq!((events[2]["name"].as_str(), events[2]["pid"].as_u64()), (Some("checksum"), Some(101)));
    }

    #[test]
    fn an_empty_trace_is_valid_json() {
        let json = chrome_json(&trace(NAMES, &[]));
        assert_eq!(json["traceEvents"], json!([]));
    }

    #[test]
    fn folded_stacks_sum_self_time() {
        let mut out = Vec::new();
        folded(&two_threads(), &[], &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\
main 4900
main;fib 600
main;fib;fib 400
main;parse_record 1388
main;parse_record;checksum 712
parse_record 600
parse_record;checksum 500
"
        );
    }

    #[test]
    fn folded_stacks_add_up_recursion() {
        // fib { fib { fib } }: each level's self time under its own stack.
        let t = trace(
            NAMES,
            &[(
                7,
                &[
                    (0, Entry, 0, 3),
                    (10, Entry, 1, 3),
                    (20, Entry, 2, 3),
                    (25, Exit, 2, 3),
                    (40, Exit, 1, 3),
                    (100, Exit, 0, 3),
                ],
            )],
        );
        let mut out = Vec::new();
        folded(&t, &[], &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "fib 70\nfib;fib 25\nfib;fib;fib 5\n");
    }
}
