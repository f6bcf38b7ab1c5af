//! What `dynprobe record` says at the end, on stderr: per program image, the function
//! sites found, patched and refused by kind with the reasons (the kernel's
//! `dyn_ftrace_total_info`), then how many events went where. Lost events are never
//! passed over: they get a warning of their own.

use super::progress::count;
use dynprobe_events::model::{ProcessTrace, Trace};
use dynprobe_events::recorder::RecordStats;
use std::fmt::Write;
use std::path::Path;

/// How many refused sites are listed per image.
const REFUSED_SHOWN: usize = 10;

/// Prints the summary of the trace just recorded in `dir`.
pub fn print(dir: &Path, stats: &RecordStats) {
    // The site summaries are in the trace directory, beside the events (not read here: a
    // long recording's would take a while).
    match dynprobe_events::trace::read_summary(dir) {
        Ok(trace) => eprint!("{}", sites(&trace)),
        Err(err) => eprintln!("dynprobe: warning: the trace just written does not read back: {err}"),
    }
    eprint!("{}", totals(dir, stats));
}

/// Whether two processes ran the same program with the same outcome: the same sites found,
/// patched and refused for the same reasons. Where the sites were (address-space layout
/// randomization) and how long patching took do not count: a helper a shell script runs
/// 36 times is one table, not 36.
fn same_image(a: &ProcessTrace, b: &ProcessTrace) -> bool {
    fn refusals(p: &ProcessTrace) -> impl Iterator<Item = (&str, &str, &str)> {
        p.sites.refused.iter().map(|r| (r.kind.as_str(), r.function.as_str(), r.reason.as_str()))
    }
    a.exe == b.exe
        && a.sites.kinds == b.sites.kinds
        && a.sites.pending == b.sites.pending
        && refusals(a).eq(refusals(b))
}

/// The site tables, one per distinct image (forked children share their parent's); each
/// warning once.
fn sites(trace: &Trace) -> String {
    let mut out = String::new();
    let mut shown: Vec<&ProcessTrace> = Vec::new();
    let mut warned = std::collections::HashSet::new();
    for process in &trace.processes {
        // A forked child runs the image it was forked from, patched once: it is counted with
        // it, also when the process between them is not in the trace (it ended before its
        // fork handler gave it files of its own), where it used to get a table of no sites
        // "found" of its own.
        let forked = process.parent != 0;
        if forked || shown.iter().any(|p| same_image(p, process)) {
            continue;
        }
        shown.push(process);
        let same = trace
            .processes
            .iter()
            .filter(|p| same_image(p, process) || (p.exe == process.exe && p.parent == process.pid))
            .count();
        let others = match same - 1 {
            0 => String::new(),
            1 => ", and 1 more process".to_string(),
            n => format!(", and {n} more processes"),
        };
        for pattern in process.sites.pending.iter().filter(|p| warned.insert(p.as_str())) {
            let _ = writeln!(
                out,
                "dynprobe: WARNING: -F '{pattern}' matched nothing: no library of that name was loaded (misspelt? \
                 never dlopened?)"
            );
        }
        // The kinds with sites; the kinds the agent looked for in vain say nothing.
        let kinds: Vec<_> = process.sites.kinds.iter().filter(|(_, found, _)| *found > 0).collect();
        if kinds.is_empty() && process.sites.refused.is_empty() {
            if process.sites.pending.is_empty() {
                let _ = writeln!(
                    out,
                    "dynprobe: no function sites found in {} (pid {}{others}): none of its functions was traced \
                     (stripped, with neither a debug file nor unwind tables to find them by)",
                    process.exe, process.pid
                );
            }
            continue;
        }
        let took = match process.sites.patch_ns {
            // Only the compiler sites are one batch; entry probes are placed one by one.
            Some(ns) if kinds.iter().any(|(kind, _, _)| kind != "entry") => {
                format!(", NOPs patched in one batch in {:.2} ms", ns as f64 / 1e6)
            }
            _ => String::new(),
        };
        let _ = writeln!(out, "dynprobe: function sites in {} (pid {}{others}{took}):", process.exe, process.pid);
        let _ = writeln!(out, "  {:<12} {:>8} {:>8} {:>8}", "kind", "found", "patched", "refused");
        for (kind, found, patched) in kinds {
            let _ = writeln!(out, "  {kind:<12} {found:>8} {patched:>8} {:>8}", found.saturating_sub(*patched));
        }
        let refused = &process.sites.refused;
        for site in refused.iter().take(REFUSED_SHOWN) {
            let _ = writeln!(
                out,
                "    refused {} ({} site at {:#x}): {}",
                site.function, site.kind, site.addr, site.reason
            );
        }
        if refused.len() > REFUSED_SHOWN {
            let _ = writeln!(out, "    … and {} more refused", refused.len() - REFUSED_SHOWN);
        }
    }
    out
}

/// The last lines: what was recorded where, and a warning for lost events.
fn totals(dir: &Path, stats: &RecordStats) -> String {
    let mut out = String::new();
    if stats.lost > 0 {
        let _ = writeln!(
            out,
            "dynprobe: WARNING: {} events were LOST: the program filled the ring buffers faster than they \
             were drained. Give larger rings (--buffer-size), or trace fewer functions (-F, -N, --depth). \
             Replay shows where the losses are.",
            stats.lost
        );
    }
    if stats.missed > 0 {
        let _ = writeln!(
            out,
            "dynprobe: WARNING: {} calls were NOT TRACED: they came while their thread was inside the tracer \
             (a signal handler interrupting it) or {} traced calls deep already.",
            stats.missed,
            dynprobe::internals::MAX_DEPTH
        );
    }
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let dir = dir.display();
    let _ = writeln!(
        out,
        "recorded {} events ({} lost) from {} of {} into {dir}; see dynprobe replay {dir}",
        stats.events,
        count(stats.lost),
        plural(stats.threads, "thread", "threads"),
        plural(stats.processes, "process", "processes"),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynprobe_events::model::{RefusedSite, SiteSummary};

    fn image(pid: u32, exe: &str, refused: usize) -> ProcessTrace {
        ProcessTrace {
            pid,
            exe: exe.into(),
            sites: SiteSummary {
                kinds: vec![
                    ("mcount".into(), 40, 40),
                    ("patchable".into(), 0, 0),
                    ("entry".into(), 12, 12 - refused as u64),
                ],
                refused: (0..refused)
                    .map(|i| RefusedSite {
                        kind: "entry".into(),
                        addr: 0x401000 + i as u64,
                        function: format!("f{i}"),
                        reason: "a jump into the covered bytes".into(),
                    })
                    .collect(),
                patch_ns: None,
                pending: Vec::new(),
            },
            ..Default::default()
        }
    }

    #[test]
    fn sites_per_distinct_image_with_the_first_refusals() {
        let mut stripped = image(13, "/bin/dash", 0);
        stripped.sites.kinds = vec![("mcount".into(), 0, 0), ("entry".into(), 0, 0)];
        let trace = Trace {
            processes: vec![image(10, "/bin/demo", 12), image(11, "/bin/demo", 12), image(12, "/bin/sh", 1), stripped],
            ..Default::default()
        };
        let text = sites(&trace);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "dynprobe: function sites in /bin/demo (pid 10, and 1 more process):");
        assert_eq!(lines[1], "  kind            found  patched  refused");
        assert_eq!(lines[2], "  mcount             40       40        0");
        assert_eq!(lines[3], "  entry              12        0       12");
        assert_eq!(lines[4], "    refused f0 (entry site at 0x401000): a jump into the covered bytes");
        assert_eq!(lines[14], "    … and 2 more refused");
        assert_eq!(lines[15], "dynprobe: function sites in /bin/sh (pid 12):");
        assert!(lines[20].starts_with("dynprobe: no function sites found in /bin/dash (pid 13): "), "{}", lines[20]);
        assert_eq!(lines.len(), 21);
    }

    /// A forked child whose parent is not in the trace (it ended before its fork handler
    /// gave it files of its own) is counted with the image it was forked from, not given a
    /// table of no sites found of its own: its files name no sites, being a child's.
    #[test]
    fn a_forked_child_whose_parent_is_not_in_the_trace_has_no_table_of_its_own() {
        let mut grandchild = image(31, "/bin/demo", 0);
        grandchild.parent = 30;
        grandchild.sites.kinds = Vec::new();
        let trace = Trace { processes: vec![image(10, "/bin/demo", 0), grandchild], ..Default::default() };
        let text = sites(&trace);
        assert!(text.starts_with("dynprobe: function sites in /bin/demo (pid 10):"), "{text}");
        assert!(!text.contains("no function sites"), "{text}");
    }

    /// A helper a wrapper script runs again and again (a shell, `env`) is one table, however
    /// its sites moved (ASLR) and however long its patching took; a warning is given once.
    #[test]
    fn one_table_per_program_however_often_it_ran() {
        let run = |pid: u32, shift: u64| {
            let mut p = image(pid, "/bin/sh", 2);
            p.sites.refused.iter_mut().for_each(|r| r.addr += shift);
            p.sites.patch_ns = Some(1000 + shift);
            p.sites.pending = vec!["libfoo:*".into()];
            p
        };
        let mut stripped = image(40, "/usr/bin/env", 0);
        stripped.sites.kinds = vec![("entry".into(), 0, 0)];
        let mut processes: Vec<ProcessTrace> = (0..36).map(|i| run(20 + i, u64::from(i) << 12)).collect();
        processes.extend((0..3).map(|i| ProcessTrace { pid: 40 + i, ..stripped.clone() }));
        let text = sites(&Trace { processes, ..Default::default() });
        assert_eq!(text.matches("matched nothing").count(), 1, "{text}");
        assert_eq!(text.matches("function sites in /bin/sh (pid 20, and 35 more processes").count(), 1, "{text}");
        assert_eq!(
            text.matches("no function sites found in /usr/bin/env (pid 40, and 2 more processes)").count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn totals_and_loud_losses() {
        let stats = RecordStats { events: 1234, lost: 0, processes: 1, threads: 3, bytes: 0, missed: 0 };
        assert_eq!(
            totals(Path::new("d.data"), &stats),
            "recorded 1234 events (0 lost) from 3 threads of 1 process into d.data; see dynprobe replay d.data\n"
        );
        let lossy = RecordStats { events: 10, lost: 5, processes: 2, threads: 1, bytes: 0, missed: 7 };
        let text = totals(Path::new("d.data"), &lossy);
        assert!(text.starts_with("dynprobe: WARNING: 5 events were LOST"), "{text}");
        assert!(text.ends_with("(5 lost) from 1 thread of 2 processes into d.data; see dynprobe replay d.data\n"));
        assert!(text.contains("WARNING: 7 calls were NOT TRACED"), "{text}");
    }
}
