//! `dynprobe replay`: the call graph, one line per entry or exit, like the kernel's
//! function_graph tracer and `uftrace replay`.
//!
//! ```text
//! # DURATION     TID     FUNCTION
//! # pid 1234 (demo)
//!             [  1234] | main() {
//!             [  1234] |   parse_record() {
//!      512 ns [  1234] |     checksum();
//!    2.100 us [  1234] |   } /* parse_record */
//! ```
//!
//! Each process image has a `# pid` header (`, forked from P` for a forked child) and its
//! threads' lines interleaved by time. A call with no shown children is one line; a call
//! whose entry was not recorded shows only its closing `} /* name */`, one still running at
//! the end only its opening line; `unwound` marks calls left by `longjmp` or an exception,
//! `entered before attach` calls that were running when `record -p` attached (their time
//! and duration count from the attach).
//! Lost events are a line of their own, whatever the filters. A marker hit recorded with
//! `record -M` is a line in the call it happened in, as uftrace shows events:
//! `/* marker provider:name arg1=5 arg2="x" */`.
//!
//! A trace recorded with `record -a` shows each call's arguments and return value, typed:
//! `parse_record(line="alpha,12", len=8) {` … `} = 12; /* parse_record */`, or
//! `parse_record(line="alpha,12", len=8) = 12;` for a leaf.

use super::calls::{Call, End, Item, Visit};
use super::filter::{parse_duration, parse_globs, FunctionGlob};
use super::values::Descriptions;
use super::{check_tids, exit, file_name, load, process_threads, Error, ThreadCalls};
use dynprobe_events::model::Trace;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `dynprobe replay`.
#[derive(clap::Args)]
pub struct ReplayArgs {
    /// The trace directory written by `dynprobe record`.
    #[arg(value_name = "DIR", default_value = super::DEFAULT_DIR)]
    dir: PathBuf,
    /// Show only this thread (repeatable).
    #[arg(long = "tid", value_name = "TID")]
    tids: Vec<u32>,
    /// Hide calls shorter than DURATION (`500ns`, `1us`, `2ms`, `1s`), and the calls inside them.
    #[arg(short = 't', long, value_name = "DURATION")]
    time_filter: Option<String>,
    /// Show only the calls of functions matching GLOB (`*`, `?`; `MODULE:GLOB`) and the
    /// calls inside them (repeatable).
    #[arg(short = 'F', long = "filter", value_name = "GLOB")]
    filters: Vec<String>,
    /// Hide the calls of functions matching GLOB and the calls inside them (repeatable).
    #[arg(short = 'N', long = "notrace", value_name = "GLOB")]
    notrace: Vec<String>,
}

/// What `replay` shows.
#[derive(Debug, Default)]
pub struct Options {
    /// Threads to show; all when empty.
    pub tids: Vec<u32>,
    /// Calls shorter than this are hidden with their subtrees.
    pub min_ns: u64,
    /// When not empty, only the subtrees of calls of these functions are shown.
    pub show: Vec<FunctionGlob>,
    /// Calls of these functions are hidden with their subtrees.
    pub hide: Vec<FunctionGlob>,
}

/// Runs `dynprobe replay`.
pub fn run(args: &ReplayArgs) -> ExitCode {
    exit((|| {
        let trace = load(Some(&args.dir))?;
        check_tids(&trace, &args.tids)?;
        let options = Options {
            tids: args.tids.clone(),
            min_ns: args.time_filter.as_deref().map(parse_duration).transpose()?.unwrap_or(0),
            show: parse_globs(&args.filters, "-F", &trace)?,
            hide: parse_globs(&args.notrace, "-N", &trace)?,
        };
        let mut out = BufWriter::new(io::stdout().lock());
        replay(&trace, &options, &mut out)?;
        out.flush().map_err(Error::from)
    })())
}

/// Writes the call graph of `trace`.
pub fn replay(trace: &Trace, options: &Options, out: &mut dyn Write) -> io::Result<()> {
    let values = &Descriptions::load(&trace.dir).map_err(io::Error::other)?;
    writeln!(out, "# DURATION     TID     FUNCTION")?;
    for process in &trace.processes {
        let threads = process_threads(process, &options.tids);
        if threads.is_empty() {
            continue;
        }
        let forked = if process.parent != 0 { format!(", forked from {}", process.parent) } else { String::new() };
        writeln!(out, "# pid {} ({}){forked}", process.pid, file_name(&process.exe))?;
        let lines: Vec<Vec<Line>> = threads.iter().map(|t| thread_lines(t, options, values)).collect();
        // Interleave the threads by time; each thread's lines keep their order.
        let mut next = vec![0; lines.len()];
        let mut heads: BinaryHeap<Reverse<(u64, usize)>> =
            lines.iter().enumerate().filter(|(_, l)| !l.is_empty()).map(|(i, l)| Reverse((l[0].ns, i))).collect();
        while let Some(Reverse((_, i))) = heads.pop() {
            let line = &lines[i][next[i]];
            let duration = line.duration.map(super::duration).unwrap_or_default();
            let indent = 2 * line.depth;
            writeln!(out, "{duration:>11} [{:>6}] | {:indent$}{}", threads[i].thread.tid, "", line.text)?;
            next[i] += 1;
            if let Some(line) = lines[i].get(next[i]) {
                heads.push(Reverse((line.ns, i)));
            }
        }
    }
    Ok(())
}

/// One output line of a thread.
struct Line {
    /// When it happened, to interleave the threads.
    ns: u64,
    depth: usize,
    duration: Option<u64>,
    text: String,
}

/// A thread's lines, filtered.
fn thread_lines(thread: &ThreadCalls, options: &Options, values: &Descriptions) -> Vec<Line> {
    let tree = &thread.tree;
    let function = |call: &Call| &thread.process.functions[call.func as usize];
    let hidden = |call: &Call| {
        call.duration().is_some_and(|d| d < options.min_ns) || options.hide.iter().any(|g| g.matches(function(call)))
    };
    let visible = |id: usize| tree.call(id).is_none_or(|call| !hidden(call));
    let filtering = !options.show.is_empty();
    // While showing the subtree of a call matching -F: that call's depth in the tree.
    let mut base: Option<usize> = None;
    // Without -F, lines are indented by the depth the agent recorded: a root of the tree
    // is deeper than 0 when its callers' entries and exits were not recorded (a forked
    // child, or a thread killed inside main).
    let mut offset = 0;
    let mut lines = Vec::new();
    tree.walk(|visit| {
        let (Visit::Enter(id, depth) | Visit::Leave(id, depth)) = visit;
        if depth == 0 {
            offset = match &tree.nodes[id].item {
                Item::Call(Call { depth, .. }) | Item::Lost { depth, .. } | Item::Marker { depth, .. } => {
                    *depth as usize
                }
            };
        }
        let shown = |base: Option<usize>| match (filtering, base) {
            (false, _) => depth + offset,
            (true, Some(base)) => depth - base,
            (true, None) => 0,
        };
        let call = match &tree.nodes[id].item {
            Item::Lost { ns, count, .. } => {
                let text = format!("/* {count} events lost */");
                lines.push(Line { ns: *ns, depth: shown(base), duration: None, text });
                return false;
            }
            Item::Marker { ns, site, args, .. } => {
                if !filtering || base.is_some() {
                    let mut text = format!("/* marker {}", thread.marker_name(*site));
                    for (name, value) in thread.marker_args(*args) {
                        text.push_str(&format!(" {name}={value}"));
                    }
                    text.push_str(" */");
                    lines.push(Line { ns: *ns, depth: shown(base), duration: None, text });
                }
                return false;
            }
            Item::Call(call) => call,
        };
        let name = thread.name(call.func);
        let (process, recorded) = (thread.process, thread.thread);
        let retval = values.retval(process, recorded, call).map(|v| format!(" = {v}")).unwrap_or_default();
        match visit {
            Visit::Enter(..) => {
                if hidden(call) {
                    return false;
                }
                if filtering && base.is_none() {
                    if !options.show.iter().any(|g| g.matches(function(call))) {
                        // Not shown, but a call inside may be.
                        return true;
                    }
                    base = Some(depth);
                }
                let indent = shown(base);
                let leaf = !tree.nodes[id].children.iter().any(|&child| visible(child));
                match (call.begin, leaf) {
                    (Some(begin), true) if call.end != End::Missing => {
                        let note = match (call.before_attach, matches!(call.end, End::Unwound(_))) {
                            (true, true) => " /* entered before attach, unwound */",
                            (true, false) => BEFORE_ATTACH,
                            (false, true) => " /* unwound */",
                            (false, false) => "",
                        };
                        let signature = values.signature(process, recorded, call, name);
                        let text = format!("{signature}{retval};{note}");
                        lines.push(Line { ns: begin, depth: indent, duration: call.duration(), text });
                    }
                    (Some(begin), _) => lines.push(Line {
                        ns: begin,
                        depth: indent,
                        duration: None,
                        text: format!(
                            "{} {{{}",
                            values.signature(process, recorded, call, name),
                            if call.before_attach { BEFORE_ATTACH } else { "" }
                        ),
                    }),
                    (None, true) => lines.extend(closing_line(call, name, &retval, indent)),
                    (None, false) => {}
                }
                if leaf && base == Some(depth) {
                    base = None;
                }
                !leaf
            }
            Visit::Leave(..) => {
                if filtering && base.is_none() {
                    return true;
                }
                lines.extend(closing_line(call, name, &retval, shown(base)));
                if base == Some(depth) {
                    base = None;
                }
                true
            }
        }
    });
    lines
}

/// What marks a call that was already running at the attach (`record -p`): its line's
/// time, and the duration on its closing line, count from the attach.
const BEFORE_ATTACH: &str = " /* entered before attach */";

/// The `} /* name */` line of a call that ended (none for one that did not); with the
/// return value `retval` recorded (` = 12`): `} = 12; /* name */`.
fn closing_line(call: &Call, name: &str, retval: &str, depth: usize) -> Option<Line> {
    let (ns, unwound) = match call.end {
        End::Returned(ns) => (ns, ""),
        End::Unwound(ns) => (ns, ": unwound"),
        End::Missing => return None,
    };
    let before = if call.before_attach { ": entered before attach" } else { "" };
    let text = match retval {
        "" => format!("}} /* {name}{unwound}{before} */"),
        retval => format!("}}{retval}; /* {name}{unwound}{before} */"),
    };
    Some(Line { ns, depth, duration: call.duration(), text })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::tests::{process, trace};
    use dynprobe_events::model::EventKind::{Entry, EntryBeforeAttach, Exit, Lost, Unwound};

    fn render(trace: &Trace, options: &Options) -> String {
        let mut out = Vec::new();
        replay(trace, options, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    const NAMES: &[&str] = &["main", "parse_record", "checksum", "fib"];

    #[test]
    fn a_call_graph_with_recursion_and_leaves() {
        let t = trace(
            NAMES,
            &[(
                7,
                &[
                    (1_000, Entry, 0, 0),
                    (1_100, Entry, 1, 1),
                    (1_200, Entry, 2, 2),
                    (1_712, Exit, 2, 2),
                    (3_200, Exit, 1, 1),
                    (4_000, Entry, 1, 3),
                    (4_100, Entry, 2, 3),
                    (4_150, Exit, 2, 3),
                    (5_000, Exit, 1, 3),
                    (2_001_000, Exit, 0, 0),
                ],
            )],
        );
        assert_eq!(
            render(&t, &Options::default()),
            "\
# DURATION     TID     FUNCTION
# pid 100 (demo)
            [     7] | main() {
            [     7] |   parse_record() {
     512 ns [     7] |     checksum();
   2.100 us [     7] |   } /* parse_record */
            [     7] |   fib() {
      50 ns [     7] |     fib();
   1.000 us [     7] |   } /* fib */
   2.000 ms [     7] | } /* main */
"
        );
    }

    #[test]
    fn calls_entered_before_the_attach_are_marked_and_timed_from_it() {
        // record -p found main and fib in flight at 1_000: fib returned, then main made a
        // call and was still running at the end.
        let t = trace(
            NAMES,
            &[(
                7,
                &[
                    (1_000, EntryBeforeAttach, 0, 0),
                    (1_000, EntryBeforeAttach, 1, 3),
                    (1_300, Exit, 1, 3),
                    (1_400, Entry, 1, 2),
                    (1_450, Exit, 1, 2),
                ],
            )],
        );
        assert_eq!(
            render(&t, &Options::default()),
            "\
# DURATION     TID     FUNCTION
# pid 100 (demo)
            [     7] | main() { /* entered before attach */
     300 ns [     7] |   fib(); /* entered before attach */
      50 ns [     7] |   checksum();
"
        );
    }

    #[test]
    fn two_threads_interleave_by_time() {
        let t = trace(
            NAMES,
            &[
                (7, &[(10, Entry, 0, 0), (40, Entry, 1, 2), (45, Exit, 1, 2), (60, Exit, 0, 0)]),
                (8, &[(20, Entry, 0, 1), (50, Exit, 0, 1)]),
            ],
        );
        assert_eq!(
            render(&t, &Options::default()),
            "\
# DURATION     TID     FUNCTION
# pid 100 (demo)
            [     7] | main() {
      30 ns [     8] | parse_record();
       5 ns [     7] |   checksum();
      50 ns [     7] | } /* main */
"
        );
        let only8 = Options { tids: vec![8], ..Options::default() };
        assert_eq!(
            render(&t, &only8),
            "# DURATION     TID     FUNCTION\n# pid 100 (demo)\n      30 ns [     8] | parse_record();\n"
        );
    }

    #[test]
    fn unwound_lost_unclosed_and_unentered() {
        let t = trace(
            NAMES,
            &[(
                7,
                &[
                    // Entered before recording started: returns out of parse_record, then main.
                    (5, Entry, 2, 2),
                    (6, Exit, 2, 2),
                    (9, Exit, 1, 1),
                    (10, Entry, 1, 3),
                    (11, Entry, 2, 2),
                    (20, Unwound, 2, 2),
                    (20, Unwound, 1, 3),
                    (21, Lost(1234), 1, 0),
                    (30, Entry, 1, 1),
                    (31, Entry, 2, 2),
                ],
            )],
        );
        assert_eq!(
            render(&t, &Options::default()),
            "\
# DURATION     TID     FUNCTION
# pid 100 (demo)
       1 ns [     7] |     checksum();
            [     7] |   } /* parse_record */
            [     7] |   fib() {
       9 ns [     7] |     checksum(); /* unwound */
      10 ns [     7] |   } /* fib: unwound */
            [     7] |   /* 1234 events lost */
            [     7] |   parse_record() {
            [     7] |     checksum() {
"
        );
        // main never shows: its entry was before the recording and its exit after it. The
        // calls inside it keep the depth the agent recorded (1).
    }

    #[test]
    fn a_forked_child_returns_out_of_its_callers() {
        let t = Trace {
            processes: vec![
                process(100, NAMES, &[(100, &[(1, Entry, 0, 0), (2, Entry, 1, 1), (9, Exit, 1, 1), (10, Exit, 0, 0)])]),
                ProcessTraceExt::forked(process(101, NAMES, &[(101, &[(5, Exit, 1, 1), (6, Exit, 0, 0)])]), 100),
            ],
            ..trace(NAMES, &[])
        };
        assert_eq!(
            render(&t, &Options::default()),
            "\
# DURATION     TID     FUNCTION
# pid 100 (demo)
            [   100] | main() {
       7 ns [   100] |   parse_record();
       9 ns [   100] | } /* main */
# pid 101 (demo), forked from 100
            [   101] |   } /* parse_record */
            [   101] | } /* main */
"
        );
    }

    trait ProcessTraceExt {
        fn forked(self, parent: u32) -> Self;
    }

    impl ProcessTraceExt for dynprobe_events::model::ProcessTrace {
        fn forked(mut self, parent: u32) -> Self {
            self.parent = parent;
            self
        }
    }

    /// main { parse_record { checksum } checksum fib { fib { checksum } } }
    fn filtered_trace() -> Trace {
        trace(
            NAMES,
            &[(
                7,
                &[
                    (0, Entry, 0, 0),
                    (10, Entry, 1, 1),
                    (20, Entry, 2, 2),
                    (25, Exit, 2, 2),
                    (100, Exit, 1, 1),
                    (200, Entry, 1, 2),
                    (5_200, Exit, 1, 2),
                    (6_000, Entry, 1, 3),
                    (6_100, Entry, 2, 3),
                    (6_200, Entry, 3, 2),
                    (6_300, Exit, 3, 2),
                    (6_400, Exit, 2, 3),
                    (7_000, Exit, 1, 3),
                    (8_000, Exit, 0, 0),
                ],
            )],
        )
    }

    #[test]
    fn filters_show_subtrees_hide_subtrees_and_short_calls() {
        let t = filtered_trace();
        let globs = |g: &[&str]| g.iter().map(|g| FunctionGlob::new(g)).collect::<Vec<_>>();
        let show = Options { show: globs(&["parse_*", "fib"]), ..Options::default() };
        assert_eq!(
            render(&t, &show),
            "\
# DURATION     TID     FUNCTION
# pid 100 (demo)
            [     7] | parse_record() {
       5 ns [     7] |   checksum();
      90 ns [     7] | } /* parse_record */
            [     7] | fib() {
            [     7] |   fib() {
     100 ns [     7] |     checksum();
     300 ns [     7] |   } /* fib */
   1.000 us [     7] | } /* fib */
"
        );
        let hide = Options { hide: globs(&["fib", "demo:parse*"]), ..Options::default() };
        assert_eq!(
            render(&t, &hide),
            "\
# DURATION     TID     FUNCTION
# pid 100 (demo)
            [     7] | main() {
   5.000 us [     7] |   checksum();
   8.000 us [     7] | } /* main */
"
        );
        let short = Options { min_ns: 1_000, ..Options::default() };
        assert_eq!(
            render(&t, &short),
            "\
# DURATION     TID     FUNCTION
# pid 100 (demo)
            [     7] | main() {
   5.000 us [     7] |   checksum();
   1.000 us [     7] |   fib();
   8.000 us [     7] | } /* main */
"
        );
    }

    #[test]
    fn lost_events_show_through_filters() {
        let t = trace(NAMES, &[(7, &[(0, Entry, 0, 0), (1, Lost(3), 1, 0), (5, Entry, 1, 2), (6, Exit, 1, 2)])]);
        let show = Options { show: vec![FunctionGlob::new("checksum")], ..Options::default() };
        assert_eq!(
            render(&t, &show),
            "\
# DURATION     TID     FUNCTION
# pid 100 (demo)
            [     7] | /* 3 events lost */
       1 ns [     7] | checksum();
"
        );
    }
}
