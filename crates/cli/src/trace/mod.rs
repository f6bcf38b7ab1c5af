//! `dynprobe replay`, `report` and `export`: a recorded trace directory read back
//! (`dynprobe_events::trace::read`), each thread's events paired into a call tree
//! ([`calls`]), and shown as a call graph, a per-function table, or a file for Perfetto or
//! a flame graph.
//!
//! All three fail with exit status 2 and the reader's message when the directory is
//! missing, unreadable, not a trace or corrupt (the file, and the byte offset of a bad
//! record). A trace with files missing or cut short (a killed recorder, a full disk, a
//! copy that stopped) is shown when something is left of it, after a warning on stderr for
//! each file that says where its data stops; when nothing is left, that is the error.

pub mod calls;
pub mod export;
pub mod filter;
pub mod replay;
pub mod report;
pub mod values;

use calls::CallTree;
use dynprobe_events::model::{MarkerValue, ProcessTrace, ThreadTrace, Trace};
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where `dynprobe record` writes and the other commands read, unless told otherwise.
pub const DEFAULT_DIR: &str = "dynprobe.data";

/// Reads the trace in `dir` (the default one when `None`); what is missing or cut in it is
/// said on stderr (see the module documentation).
fn load(dir: Option<&Path>) -> Result<Trace, String> {
    let dir = dir.map_or_else(|| PathBuf::from(DEFAULT_DIR), Path::to_path_buf);
    let trace = dynprobe_events::trace::read(&dir).map_err(|e| e.to_string())?;
    eprint!("{}", damage_report(&trace)?);
    Ok(trace)
}

/// The warnings about `trace`'s missing and cut files, or the error when no event is left.
fn damage_report(trace: &Trace) -> Result<String, String> {
    if trace.damage.is_empty() {
        return Ok(String::new());
    }
    let list: Vec<String> = trace.damage.iter().map(ToString::to_string).collect();
    let events = trace.processes.iter().flat_map(|p| &p.threads).any(|t| !t.events.is_empty());
    if !events {
        return Err(format!("nothing left to show in {}: {}", trace.dir.display(), list.join("; ")));
    }
    let mut report: String = list.iter().map(|d| format!("dynprobe: warning: {d}\n")).collect();
    report.push_str(&format!(
        "dynprobe: warning: the trace is incomplete ({} file{} missing or cut): what follows shows only what was \
         read, and a call open where a thread's file stops has no exit\n",
        list.len(),
        if list.len() == 1 { "" } else { "s" }
    ));
    Ok(report)
}

/// The exit status of a trace command: success, or the message and status 2. A closed
/// output pipe (`dynprobe replay | head`) is success: the reader has seen enough.
fn exit(result: Result<(), Error>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Io(err)) if err.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dynprobe: {err}");
            ExitCode::from(crate::EXIT_ERROR)
        }
    }
}

/// What stops a trace command.
#[derive(Debug)]
enum Error {
    /// Bad input: the trace, a filter.
    Message(String),
    /// Writing the output failed.
    Io(io::Error),
}

impl From<String> for Error {
    fn from(message: String) -> Error {
        Error::Message(message)
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Error {
        Error::Io(err)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Message(message) => f.write_str(message),
            Error::Io(err) => write!(f, "cannot write the output: {err}"),
        }
    }
}

/// A thread of a trace with its call tree.
pub struct ThreadCalls<'t> {
    /// Its process image.
    pub process: &'t ProcessTrace,
    /// The thread.
    pub thread: &'t ThreadTrace,
    /// Its calls.
    pub tree: CallTree,
}

impl ThreadCalls<'_> {
    /// The name of function `func` of this thread's process.
    pub fn name(&self, func: u32) -> &str {
        self.process.functions.get(func as usize).map_or("<unknown function>", |f| f.name.as_str())
    }

    /// `provider:name` of marker site `site` of this thread's process.
    pub fn marker_name(&self, site: u32) -> String {
        match self.process.markers.get(site as usize) {
            Some(marker) => format!("{}:{}", marker.provider, marker.name),
            None => "<unknown marker>".to_string(),
        }
    }

    /// The arguments of this thread's marker hit `args` as `(arg1, value)`, ...
    pub fn marker_args(&self, args: u32) -> Vec<(String, &MarkerValue)> {
        let values = self.thread.marker_args.get(args as usize).map_or(&[][..], Vec::as_slice);
        values.iter().enumerate().map(|(i, value)| (format!("arg{}", i + 1), value)).collect()
    }
}

/// The threads of `process` that `tids` selects (all when it is empty), with their calls.
pub fn process_threads<'t>(process: &'t ProcessTrace, tids: &[u32]) -> Vec<ThreadCalls<'t>> {
    process
        .threads
        .iter()
        .filter(|t| tids.is_empty() || tids.contains(&t.tid))
        .map(|thread| ThreadCalls { process, thread, tree: CallTree::build(&thread.events) })
        .collect()
}

/// Checks that every thread id in `tids` is in the trace.
fn check_tids(trace: &Trace, tids: &[u32]) -> Result<(), String> {
    let all: Vec<u32> = trace.processes.iter().flat_map(|p| p.threads.iter().map(|t| t.tid)).collect();
    match tids.iter().find(|tid| !all.contains(tid)) {
        None => Ok(()),
        Some(tid) => {
            let list: Vec<String> = all.iter().map(u32::to_string).collect();
            Err(format!("thread {tid} is not in the trace; its threads are {}", list.join(", ")))
        }
    }
}

/// A duration with its unit, as the tables and the call graph show it: `512 ns`,
/// `2.100 us`, `12.345 ms`, `1.500 s`.
pub fn duration(ns: u64) -> String {
    match ns {
        0..=999 => format!("{ns} ns"),
        1_000..=999_999 => format!("{:.3} us", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.3} ms", ns as f64 / 1e6),
        _ => format!("{:.3} s", ns as f64 / 1e9),
    }
}

/// The file name of a path, for headers (`/usr/bin/ls` → `ls`).
fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use dynprobe_events::model::{Event, EventKind, Function};

    /// A thread's events as `(ns, kind, depth, func)`.
    pub(crate) type Events<'a> = &'a [(u64, EventKind, u16, u32)];

    /// A trace of one process `demo` (pid 100) with functions `names` and the threads
    /// `(tid, events as (ns, kind, depth, func))`.
    pub(crate) fn trace(names: &[&str], threads: &[(u32, Events)]) -> Trace {
        Trace {
            dir: PathBuf::from("t.data"),
            command: vec!["./demo".into()],
            start_ns: 0,
            end_ns: threads.iter().flat_map(|t| t.1.iter().map(|e| e.0)).max().unwrap_or(0),
            exit_code: Some(0),
            processes: vec![process(100, names, threads)],
            damage: Vec::new(),
        }
    }

    /// A process image `demo` with pid `pid`.
    pub(crate) fn process(pid: u32, names: &[&str], threads: &[(u32, Events)]) -> ProcessTrace {
        ProcessTrace {
            pid,
            parent: 0,
            exe: "/bin/demo".into(),
            functions: names
                .iter()
                .enumerate()
                .map(|(i, n)| Function { name: n.to_string(), module: "demo".into(), addr: 0x1000 + i as u64 })
                .collect(),
            sites: Default::default(),
            threads: threads
                .iter()
                .map(|(tid, events)| ThreadTrace {
                    tid: *tid,
                    lost: events.iter().map(|e| if let EventKind::Lost(n) = e.1 { n } else { 0 }).sum(),
                    events: events.iter().map(|&(ns, kind, depth, func)| Event { ns, kind, depth, func }).collect(),
                    ..ThreadTrace::default()
                })
                .collect(),
            markers: Vec::new(),
            described: Default::default(),
        }
    }

    #[test]
    fn durations_carry_units() {
        assert_eq!(duration(512), "512 ns");
        assert_eq!(duration(2_100), "2.100 us");
        assert_eq!(duration(12_345_678), "12.346 ms");
        assert_eq!(duration(1_500_000_000), "1.500 s");
    }

    #[test]
    fn unknown_tids_are_named() {
        let t = trace(&["main"], &[(7, &[]), (9, &[])]);
        assert_eq!(check_tids(&t, &[7]), Ok(()));
        assert_eq!(check_tids(&t, &[8]), Err("thread 8 is not in the trace; its threads are 7, 9".into()));
    }
}
