//! `dynprobe probe 'm:PROVIDER:NAME'`: the markers of `targets/markers.c` (the C header)
//! and `targets/markers_rs.rs` (the Rust macro) probed in a program dynprobe starts. Every
//! hit is one event with the marker's arguments, typed by its record; the program's output
//! is unchanged; an unknown marker is refused before `main` with the nearest names; marker
//! and code probes run side by side. A USDT probe guarded by its semaphore
//! (`targets/usdt.c`, `sys/sdt.h`) fires because the semaphore is raised while it is
//! probed, and so does CPython's `python:function__entry`.

mod common;

use common::{
    c_program, dynprobe, expected_output, expected_sum, rust_program, scratch, stdout_of, usdt_floats_events,
    usdt_floats_program, usdt_program, NAMES,
};
use std::path::Path;
use std::process::Output;

/// `dynprobe probe [OPTIONS] SPECS... -- PROGRAM ROUNDS` with the events written to a file:
/// the run's output and the event lines.
fn probe(test: &str, options: &[&str], specs: &[&str], program: &Path, rounds: u64) -> (Output, Vec<String>) {
    let (out, events) = common::probe_to_file(test, options, specs, program, &rounds.to_string());
    (out, events.lines().map(str::to_string).collect())
}

/// `(event, fields)` of a text event line `   0.000123 [4242] grp/ev: a=1 b="x y"` (the
/// tests' strings hold no space).
fn parse(line: &str) -> (String, String) {
    let (_, rest) = line.split_once("] ").unwrap_or_else(|| panic!("not an event line: {line:?}"));
    let (event, fields) = rest.split_once(':').unwrap_or_else(|| panic!("no event name in {line:?}"));
    (event.to_string(), fields.trim_start().to_string())
}

/// The pointer argument of the tick lines: one address (the program's `cell`), not null.
fn pointer_of(fields: &str) -> &str {
    let pointer = fields.split(' ').find_map(|f| f.strip_prefix("arg3=")).unwrap();
    assert!(pointer.starts_with("0x") && pointer != "0x0", "{fields}");
    pointer
}

#[test]
fn every_marker_of_the_c_program_is_seen_with_its_arguments() {
    let rounds = 50;
    let (out, lines) = probe("c-all", &[], &["m:cmarkers:*"], c_program(), rounds);
    assert_eq!(stdout_of(&out), expected_output(rounds), "the program's output is unchanged");
    let events: Vec<(String, String)> = lines.iter().map(|l| parse(l)).collect();
    assert_eq!(events.len() as u64, rounds + 1, "{lines:#?}");
    let pointer = pointer_of(&events[0].1).to_string();
    for (i, (event, fields)) in events[..rounds as usize].iter().enumerate() {
        assert_eq!(event, "cmarkers/tick");
        let name = NAMES[i % 3];
        assert_eq!(fields, &format!("arg1={i} arg2={} arg3={pointer} arg4=\"{name}\"", -(i as i64)));
    }
    let (event, fields) = &events[rounds as usize];
    assert_eq!(event, "cmarkers/done");
    assert_eq!(fields, &format!("arg1={} arg2=7 arg3=-3 arg4=true", expected_sum(rounds)));
}

#[test]
fn the_rust_program_markers_show_typed_arguments_and_fields() {
    let rounds = 30;
    let specs = ["m:rmarkers:tick", "m:rs/step rmarkers:tick i=$arg1:u32 neg=$arg2:s64 ptr=$arg3:x64", "m:*:done"];
    let (out, lines) = probe("rs", &[], &specs, rust_program(), rounds);
    assert_eq!(stdout_of(&out), expected_output(rounds), "the program's output is unchanged");
    let events: Vec<(String, String)> = lines.iter().map(|l| parse(l)).collect();
    let ticks: Vec<&String> = events.iter().filter(|(e, _)| e == "rmarkers/tick").map(|(_, f)| f).collect();
    let steps: Vec<&String> = events.iter().filter(|(e, _)| e == "rs/step").map(|(_, f)| f).collect();
    assert_eq!((ticks.len() as u64, steps.len() as u64), (rounds, rounds), "{lines:#?}");
    let pointer = pointer_of(ticks[0]).to_string();
    for i in 0..rounds as usize {
        let name = NAMES[i % 3];
        let neg = -(i as i64);
        assert_eq!(ticks[i], &format!("arg1={i} arg2={neg} arg3={pointer} arg4=\"{name}\""));
        assert_eq!(steps[i], &format!("i={i} neg={neg} ptr={pointer}"));
    }
    // `*:done` found the Rust program's only `done` marker.
    let done: Vec<&(String, String)> = events.iter().filter(|(e, _)| e == "rmarkers/done").collect();
    assert_eq!(done.len(), 1, "{lines:#?}");
    assert_eq!(done[0].1, format!("arg1={}", expected_sum(rounds)));
    assert_eq!(events.len() as u64, 2 * rounds + 1, "{lines:#?}");
}

#[test]
fn json_events_keep_the_argument_types() {
    let (out, lines) = probe("json", &["--json"], &["m:cmarkers:tick"], c_program(), 4);
    assert_eq!(stdout_of(&out), expected_output(4));
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let json: serde_json::Value = serde_json::from_str(&lines[3]).unwrap();
    assert_eq!(json["event"], "cmarkers/tick");
    let args = &json["args"];
    assert_eq!(
        (args["arg1"].as_u64(), args["arg2"].as_i64(), args["arg4"].as_str()),
        (Some(3), Some(-3), Some("alpha"))
    );
    assert!(args["arg3"].as_str().is_some_and(|p| p.starts_with("0x")), "{json}");
}

#[test]
fn an_unknown_marker_is_refused_before_main_with_the_nearest_names() {
    let (out, lines) = probe("unknown", &[], &["m:cmarkers:tock"], c_program(), 5);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty(), "the program ran: {}", String::from_utf8_lossy(&out.stdout));
    assert!(lines.is_empty(), "{lines:?}");
    assert!(
        stderr.contains("cannot place probe `m:cmarkers:tock`: no marker `cmarkers:tock` in any module of the process"),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean") && stderr.contains("`cmarkers:tick`"), "{stderr}");
    assert!(stderr.trim_end().ends_with("; the program was not run"), "{stderr}");
}

#[test]
fn a_bad_marker_spec_points_at_its_column() {
    let (out, _) = probe("syntax", &[], &["m:cmarkers:ti-ck"], c_program(), 5);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid character `-` in marker name"), "{stderr}");
    assert!(stderr.contains("at column 14"), "{stderr}");
}

#[test]
fn a_marker_probe_runs_alongside_a_code_probe() {
    let rounds = 20;
    let specs = ["p:markers_run rounds=$arg1:s64", "m:cmarkers:done"];
    let (out, lines) = probe("mixed", &[], &specs, c_program(), rounds);
    assert_eq!(stdout_of(&out), expected_output(rounds));
    let events: Vec<(String, String)> = lines.iter().map(|l| parse(l)).collect();
    assert_eq!(
        events,
        [
            ("markers_run".to_string(), format!("rounds={rounds}")),
            ("cmarkers/done".to_string(), format!("arg1={} arg2=7 arg3=-3 arg4=true", expected_sum(rounds))),
        ]
    );
}

#[test]
fn a_usdt_probe_guarded_by_its_semaphore_fires_at_every_round() {
    a_usdt_probe_fires_at_every_round("usdt", &[]);
}

#[test]
fn a_usdt_probe_driven_through_ptrace_fires_at_every_round_too() {
    a_usdt_probe_fires_at_every_round("usdt-ptrace", &["--ptrace"]);
}

fn a_usdt_probe_fires_at_every_round(test: &str, options: &[&str]) {
    let rounds = 100;
    let unprobed = std::process::Command::new(usdt_program()).arg(rounds.to_string()).output().unwrap();
    assert_eq!(stdout_of(&unprobed), "enabled 0 semaphore 0\n", "nobody raised the semaphore");
    let (out, lines) = probe(test, options, &["m:usdt_app:work"], usdt_program(), rounds);
    // The program sees the semaphore raised (one count, for the one site) at every round.
    assert_eq!(stdout_of(&out), format!("enabled {rounds} semaphore 1\n"));
    let events: Vec<(String, String)> = lines.iter().map(|l| parse(l)).collect();
    let expected: Vec<(String, String)> =
        (0..rounds).map(|i| ("usdt_app/work".to_string(), format!("arg1={i} arg2={}", i + 1))).collect();
    assert_eq!(events, expected);
}

/// A USDT argument in a vector register (`8f@%xmm2`) is read from the probe's save of
/// them, in process and through ptrace, and every `f` argument prints as a float (before:
/// the `%xmm` ones `(unavailable)`, the others their bits as an integer).
#[test]
fn usdt_floating_point_arguments_in_vector_and_general_registers_print_as_passed() {
    let rounds = 20;
    for opt in ["-O0", "-O2"] {
        for options in [&[][..], &["--ptrace"]] {
            let test = format!("usdt-floats{opt}{}", options.len());
            let (out, lines) = probe(&test, options, &["m:floats:*"], &usdt_floats_program(opt), rounds);
            let want = usdt_floats_events(&stdout_of(&out));
            assert_eq!(want.len() as u64, 2 * rounds, "{opt} {options:?}");
            let events: Vec<(String, String)> = lines.iter().map(|l| parse(l)).collect();
            assert_eq!(events, want, "{opt} {options:?}");
        }
    }
}

#[test]
fn python_function_entry_fires_at_every_call() {
    // Debian's interpreter, whose notes carry semaphores (`dynprobe list-markers`).
    let python = Path::new("/usr/bin/python3.11");
    assert!(python.is_file(), "{} is missing: scripts/setup installs python3.11-minimal", python.display());
    let calls = 150;
    let events = scratch().join("events-python");
    let _ = std::fs::remove_file(&events);
    // Calls from C (`map`) and calls from Python code. CPython 3.11 fires function__entry
    // of a Python-to-Python call only on its tracing path, which the `line` marker's
    // semaphore turns on (`DTRACE_FUNCTION_ENTRY()` sits under `DO_TRACING` in its
    // Python/ceval.c): dynprobe raises that one too, and says so.
    let script = "def probed(x): return x\nlist(map(probed, range(100)))\nfor i in range(50): probed(i)\nprint('done')";
    let out = dynprobe()
        .args(["probe", "-o"])
        .arg(&events)
        .arg("m:python:function__entry file=$arg1:string fn=$arg2:string line=$arg3:s32")
        .arg("--")
        .arg(python)
        .args(["-c", script])
        .output()
        .expect("run dynprobe");
    assert_eq!(stdout_of(&out), "done\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("also raised the semaphore of python:line"), "no word of the gating semaphore:\n{stderr}");
    let lines = std::fs::read_to_string(&events).unwrap();
    let entries: Vec<&str> = lines.lines().filter(|l| l.contains("python/function__entry:")).collect();
    let probed = entries.iter().filter(|l| l.ends_with(r#"file="<string>" fn="probed" line=1"#)).count();
    assert_eq!(probed, calls, "{} entries, {probed} of `probed`", entries.len());
}
