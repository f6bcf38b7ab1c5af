//! `dynprobe record -M PROVIDER:NAME`: the marker hits of `targets/markers.c` and
//! `targets/markers_rs.rs` recorded beside their function calls, shown by `replay` inside
//! the call they happened in with their arguments, and exported to Chrome JSON as instant
//! events with their arguments.

mod common;

use common::{
    c_program, dynprobe, expected_output, expected_sum, rust_program, scratch, stdout_of, usdt_floats_events,
    usdt_floats_program, NAMES,
};
use std::path::{Path, PathBuf};

/// `dynprobe record -o DIR ARGS... -- PROGRAM ROUNDS`, which must succeed with the
/// program's output unchanged; returns the trace directory.
fn record(test: &str, args: &[&str], program: &Path, rounds: u64) -> PathBuf {
    let (dir, stdout) = record_output(test, args, program, rounds);
    assert_eq!(stdout, expected_output(rounds), "the program's output is unchanged");
    dir
}

/// `dynprobe record -o DIR ARGS... -- PROGRAM ROUNDS`, which must succeed: the trace
/// directory and the program's output.
fn record_output(test: &str, args: &[&str], program: &Path, rounds: u64) -> (PathBuf, String) {
    let dir = scratch().join(format!("{test}.data"));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dynprobe()
        .arg("record")
        .arg("-o")
        .arg(&dir)
        .args(args)
        .arg("--")
        .arg(program)
        .arg(rounds.to_string())
        .output()
        .expect("run dynprobe record");
    (dir, stdout_of(&out))
}

/// `dynprobe replay DIR`'s call graph: each line's text after the `|`, indentation kept.
fn replay(dir: &Path) -> Vec<String> {
    let out = dynprobe().arg("replay").arg(dir).output().unwrap();
    let text = stdout_of(&out);
    text.lines().filter_map(|l| l.split_once("| ")).map(|(_, graph)| graph.to_string()).collect()
}

/// `dynprobe export --chrome -`'s events.
fn chrome(dir: &Path) -> Vec<serde_json::Value> {
    let out = dynprobe().args(["export", "--chrome", "-"]).arg(dir).output().unwrap();
    let json: serde_json::Value = serde_json::from_str(&stdout_of(&out)).expect("Chrome JSON");
    json["traceEvents"].as_array().unwrap().clone()
}

/// The replay lines of the tick markers of `provider` for `rounds` rounds (pointer `cell`),
/// then its done marker, with `done`'s other arguments, at `indent`.
fn marker_lines(provider: &str, rounds: u64, cell: &str, done: &str, indent: &str) -> Vec<String> {
    let mut lines: Vec<String> = (0..rounds as usize)
        .map(|i| {
            let name = NAMES[i % 3];
            format!("{indent}/* marker {provider}:tick arg1={i} arg2={} arg3={cell} arg4=\"{name}\" */", -(i as i64))
        })
        .collect();
    lines.push(format!("{indent}/* marker {provider}:done arg1={}{done} */", expected_sum(rounds)));
    lines
}

/// The pointer the first tick line passes (the program's `cell`).
fn cell_of(lines: &[String]) -> String {
    let tick = lines.iter().find(|l| l.contains(":tick ")).unwrap_or_else(|| panic!("no tick: {lines:#?}"));
    let cell = tick.split(' ').find_map(|f| f.strip_prefix("arg3=")).unwrap();
    assert!(cell.starts_with("0x") && cell != "0x0", "{tick}");
    cell.to_string()
}

#[test]
fn markers_of_the_c_program_are_recorded_inside_the_traced_function() {
    let rounds = 12;
    let dir = record("c-function", &["-M", "cmarkers:*", "-F", "markers_run"], c_program(), rounds);
    let lines = replay(&dir);
    let cell = cell_of(&lines);
    let mut want = vec!["markers_run() {".to_string()];
    want.extend(marker_lines("cmarkers", rounds, &cell, " arg2=7 arg3=-3 arg4=true", "  "));
    want.push("} /* markers_run */".to_string());
    assert_eq!(lines, want);

    // Chrome: one instant event per hit, with the arguments, inside markers_run's span.
    let events = chrome(&dir);
    let run = events.iter().find(|e| e["name"] == "markers_run" && e["ph"] == "X").expect("markers_run");
    let (begin, end) = (run["ts"].as_f64().unwrap(), run["ts"].as_f64().unwrap() + run["dur"].as_f64().unwrap());
    let hits: Vec<&serde_json::Value> = events.iter().filter(|e| e["cat"] == "marker").collect();
    assert_eq!(hits.len() as u64, rounds + 1);
    for (i, hit) in hits[..rounds as usize].iter().enumerate() {
        assert_eq!(
            (hit["name"].as_str(), hit["ph"].as_str(), hit["s"].as_str()),
            (Some("cmarkers:tick"), Some("i"), Some("t"))
        );
        let ts = hit["ts"].as_f64().unwrap();
        assert!(begin <= ts && ts <= end, "{hit} outside {run}");
        let args = &hit["args"];
        assert_eq!(args["arg1"].as_u64(), Some(i as u64), "{hit}");
        assert_eq!(args["arg2"].as_i64(), Some(-(i as i64)), "{hit}");
        assert_eq!(args["arg3"].as_str(), Some(cell.as_str()), "{hit}");
        assert_eq!(args["arg4"].as_str(), Some(NAMES[i % 3]), "{hit}");
    }
    let done = &hits[rounds as usize];
    assert_eq!(done["name"], "cmarkers:done");
    let want = serde_json::json!({"arg1": expected_sum(rounds), "arg2": 7, "arg3": -3, "arg4": true});
    assert_eq!(done["args"], want);
}

#[test]
fn markers_alone_are_recorded_inside_the_calls_of_the_whole_program() {
    // Without -F every function of the executable is traced: main calls markers_run.
    let rounds = 5;
    let dir = record("c-all", &["-M", "cmarkers:tick", "-M", "cmarkers:done"], c_program(), rounds);
    let lines = replay(&dir);
    let cell = cell_of(&lines);
    let run = lines.iter().position(|l| l == "  markers_run() {").unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(lines[run - 1], "main() {");
    let markers = marker_lines("cmarkers", rounds, &cell, " arg2=7 arg3=-3 arg4=true", "    ");
    assert_eq!(lines[run + 1..run + 1 + markers.len()], markers[..], "{lines:#?}");
    assert_eq!(lines[run + 1 + markers.len()], "  } /* markers_run */");
}

#[test]
fn markers_of_the_rust_program_are_recorded_with_its_functions() {
    let rounds = 7;
    let dir = record("rs", &["-F", "markers_rs::run", "-M", "rmarkers:*"], rust_program(), rounds);
    let lines = replay(&dir);
    let cell = cell_of(&lines);
    let mut want = vec!["markers_rs::run() {".to_string()];
    want.extend(marker_lines("rmarkers", rounds, &cell, "", "  "));
    want.push("} /* markers_rs::run */".to_string());
    assert_eq!(lines, want);
    let hits = chrome(&dir).into_iter().filter(|e| e["cat"] == "marker").count();
    assert_eq!(hits as u64, rounds + 1);
}

/// `float`/`double` arguments of USDT probes (`8f@%xmm2`, `8f@%rax`, `4f@-28(%rbp)`) are
/// recorded as floats and replayed as passed (before: their bits as integers, or
/// unavailable in a vector register).
#[test]
fn usdt_floating_point_arguments_are_recorded_as_passed() {
    let rounds = 6;
    for opt in ["-O0", "-O2"] {
        let test = format!("usdt-floats{opt}");
        let (dir, stdout) = record_output(&test, &["-M", "floats:*", "-F", "work"], &usdt_floats_program(opt), rounds);
        let mut want = Vec::new();
        for pair in usdt_floats_events(&stdout).chunks(2) {
            want.push("work() {".to_string());
            for (event, args) in pair {
                want.push(format!("  /* marker {} {args} */", event.replace('/', ":")));
            }
            want.push("} /* work */".to_string());
        }
        assert_eq!(want.len() as u64, 4 * rounds, "{opt}");
        assert_eq!(replay(&dir), want, "{opt}");
    }
}

#[test]
fn an_unknown_marker_is_refused_before_main() {
    let dir = scratch().join("unknown.data");
    let out = dynprobe()
        .arg("record")
        .arg("-o")
        .arg(&dir)
        .args(["-M", "cmarkers:tock", "--"])
        .arg(c_program())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty(), "the program ran: {}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("-M cmarkers:tock: no marker `cmarkers:tock` in any module of the process"), "{stderr}");
    assert!(stderr.contains("`cmarkers:tick`") && stderr.trim_end().ends_with("the program was not run"), "{stderr}");

    // Refused before anything is made: no trace directory.
    let dir = scratch().join("syntax.data");
    let out = dynprobe()
        .arg("record")
        .arg("-o")
        .arg(&dir)
        .args(["-M", "cmarkers:ti-ck", "--"])
        .arg(c_program())
        .output()
        .unwrap();
    assert!(!dir.exists(), "{} was made", dir.display());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad -M marker `cmarkers:ti-ck`: invalid character `-` in marker name"), "{stderr}");
    assert!(stderr.contains("at column 12"), "{stderr}");
}
