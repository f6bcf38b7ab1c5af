//! Static markers in real programs: `targets/markers.c` (the C header) and
//! `targets/markers_rs.rs` (the Rust macro, built against the `dynprobe` library). Each
//! computes the right thing with nothing attached, `readelf -n` shows its markers as stapsdt
//! notes, `dynprobe list-markers` lists them from the file and from the running process,
//! and a USDT probe attached through the kernel (`perf_event_open` on the uprobe PMU at the
//! note's file offset) fires once per hit without changing the output.

mod common;

use std::ffi::{c_ulong, CString};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{c_program, dynprobe, expected_output, rust_program, stdout_of};
use perf_event_open_sys as sys;

/// The program started with `--wait`: it runs its loop after a line on stdin.
fn start_waiting(program: &Path, rounds: u64) -> Child {
    Command::new(program)
        .args([&rounds.to_string(), "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the target")
}

/// Lets a waiting program run to its end; returns its output.
fn release(mut child: Child) -> String {
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    stdout_of(&child.wait_with_output().unwrap())
}

/// `dynprobe list-markers ARGS`: the table's lines.
fn list_markers(args: &[&str]) -> Vec<String> {
    let out = dynprobe().arg("list-markers").args(args).output().unwrap();
    stdout_of(&out).lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect()
}

/// `provider:name`'s file offset as `list-markers PROG` shows it.
fn file_offset(program: &Path, spec: &str) -> u64 {
    let lines = list_markers(&[program.to_str().unwrap()]);
    let line = lines.iter().find(|l| l.starts_with(&format!("{spec} "))).unwrap_or_else(|| panic!("{spec}: {lines:?}"));
    let offset = line.split(' ').nth(2).unwrap();
    u64::from_str_radix(offset.trim_start_matches("0x"), 16).unwrap()
}

/// A kernel uprobe counting hits of process `pid` at `offset` of `path` (the USDT way:
/// `perf_event_open` on the uprobe PMU, `config1` the path, `config2` the file offset).
fn kernel_uprobe(pid: u32, path: &Path, offset: u64) -> OwnedFd {
    const UPROBE_TYPE: &str = "/sys/bus/event_source/devices/uprobe/type";
    let pmu: u32 = std::fs::read_to_string(UPROBE_TYPE)
        .unwrap_or_else(|e| panic!("no uprobe PMU ({UPROBE_TYPE}: {e})"))
        .trim()
        .parse()
        .unwrap();
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut attr = sys::bindings::perf_event_attr {
        type_: pmu,
        size: std::mem::size_of::<sys::bindings::perf_event_attr>() as u32,
        ..Default::default()
    };
    attr.__bindgen_anon_3.config1 = path.as_ptr() as u64;
    attr.__bindgen_anon_4.config2 = offset;
    // SAFETY: `attr` is valid with its own size; the path outlives the call (the kernel
    // copies it); a counting event for one process on any CPU, no group.
    let fd =
        unsafe { sys::perf_event_open(&mut attr, pid as i32, -1, -1, sys::bindings::PERF_FLAG_FD_CLOEXEC as c_ulong) };
    assert!(fd >= 0, "perf_event_open(uprobe): {} (needs root or CAP_PERFMON)", std::io::Error::last_os_error());
    // SAFETY: a fresh fd nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn count(event: &OwnedFd) -> u64 {
    let mut count = 0u64;
    // SAFETY: reads 8 bytes into a u64 we own from an open perf event.
    let read = unsafe { libc::read(event.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
    assert_eq!(read, 8, "read the uprobe's count: {}", std::io::Error::last_os_error());
    count
}

/// The stapsdt note of `name` in `readelf -n`'s output for `program`.
fn readelf_note(program: &Path, name: &str) -> String {
    let out = Command::new("readelf").arg("-n").arg(program).output().expect("run readelf (binutils)");
    let text = stdout_of(&out);
    let note = text.split("stapsdt ").find(|n| n.contains(&format!("Name: {name}\n")));
    note.unwrap_or_else(|| panic!("no stapsdt note named {name} in {text}")).to_string()
}

#[test]
fn the_c_program_runs_unchanged_and_its_markers_are_stapsdt_notes() {
    let program = c_program();
    let out = Command::new(program).arg("1000").output().unwrap();
    assert_eq!(stdout_of(&out), expected_output(1000));

    let tick = readelf_note(program, "tick");
    assert!(tick.contains("NT_STAPSDT (SystemTap probe descriptors)"), "{tick}");
    assert!(tick.contains("Provider: cmarkers"), "{tick}");
    assert!(tick.contains("Arguments: -4@%edi -8@%rsi 8@%rdx 8@%rcx"), "{tick}");
    let done = readelf_note(program, "done");
    assert!(done.contains("Arguments: 8@%rdi 1@%sil -2@%dx 1@%cl"), "{done}");
}

#[test]
fn the_rust_program_runs_unchanged_and_its_markers_are_stapsdt_notes() {
    let program = rust_program();
    let out = Command::new(program).arg("1000").output().unwrap();
    assert_eq!(stdout_of(&out), expected_output(1000));
    let tick = readelf_note(program, "tick");
    assert!(tick.contains("Provider: rmarkers"), "{tick}");
    assert!(tick.contains("Arguments: 4@%edi -8@%rsi 8@%rdx 8@%rcx 8@%r8"), "{tick}");
    assert!(readelf_note(program, "done").contains("Arguments: 8@%rdi"));
}

#[test]
fn list_markers_reads_the_program_files() {
    let c = c_program().to_str().unwrap();
    let lines = list_markers(&[c]);
    assert_eq!(lines[0], "MARKER ADDRESS OFFSET KIND ARGUMENTS FILE");
    let tick = lines.iter().find(|l| l.starts_with("cmarkers:tick ")).expect("cmarkers:tick listed");
    assert!(tick.ends_with(&format!("dynprobe i32 %edi, i64 %rsi, ptr %rdx, char* %rcx {c}")), "{tick}");
    let done = lines.iter().find(|l| l.starts_with("cmarkers:done ")).expect("cmarkers:done listed");
    assert!(done.contains("u64 %rdi, u8 %sil, i16 %dx, bool %cl"), "{done}");

    let rust = rust_program().to_str().unwrap();
    let lines = list_markers(&[rust]);
    let tick = lines.iter().find(|l| l.starts_with("rmarkers:tick ")).expect("rmarkers:tick listed");
    assert!(tick.ends_with(&format!("dynprobe u32 %edi, i64 %rsi, ptr %rdx, &str %rcx,%r8 {rust}")), "{tick}");

    let out = dynprobe().args(["list-markers", "/no/such/program"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/program"));
}

#[test]
fn list_markers_of_a_running_process_shows_runtime_addresses() {
    for program in [c_program(), rust_program()] {
        let in_file = list_markers(&[program.to_str().unwrap()]);
        let child = start_waiting(program, 10);
        let pid = child.id().to_string();
        let live = list_markers(&["-p", &pid]);
        assert_eq!(release(child), expected_output(10));
        for line in &in_file[1..] {
            let fields: Vec<&str> = line.split(' ').collect();
            let (spec, link, offset) = (fields[0], fields[1], fields[2]);
            let running = live
                .iter()
                .find(|l| l.starts_with(&format!("{spec} ")))
                .unwrap_or_else(|| panic!("{spec} not listed for pid {pid}: {live:?}"));
            let running: Vec<&str> = running.split(' ').collect();
            // A PIE is loaded at a bias: the address moves, the file offset and the rest do not.
            assert_ne!(running[1], link, "{running:?}");
            assert_eq!(running[2..], fields[2..], "{spec} at offset {offset}");
        }
    }
}

#[test]
fn a_kernel_usdt_probe_fires_once_per_hit() {
    for (program, spec) in [(c_program(), "cmarkers:tick"), (rust_program(), "rmarkers:tick")] {
        let offset = file_offset(program, spec);
        let child = start_waiting(program, 500);
        let event = kernel_uprobe(child.id(), program, offset);
        assert_eq!(release(child), expected_output(500), "{spec}: the output is unchanged under the uprobe");
        assert_eq!(count(&event), 500, "{spec}: one hit per round");
    }
}

#[test]
fn the_marker_bench_rows_measure() {
    let out = dynprobe()
        .args(["bench", "--json", "--iterations", "200", "--rows", "marker-disabled,marker-enabled"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&stdout_of(&out)).expect("JSON on stdout");
    let rows = json["rows"].as_array().unwrap();
    let row = |name: &str| rows.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no {name}: {rows:?}"));
    // Each row found its one site holding the NOP, and the enabled row's handler saw every
    // call through a jump-optimized probe (otherwise the row carries an error, no number).
    for name in ["marker-disabled", "marker-enabled"] {
        let r = row(name);
        assert!(r["ns_per_hit"].is_number(), "{r}");
        // A row of calls is timed in 15 short batches (the bench's CALL_BATCHES).
        assert_eq!(r["batches_ns_per_call"].as_array().map(Vec::len), Some(15), "{r}");
    }
    let enabled = row("marker-enabled");
    assert!(enabled["ns_per_hit"].as_f64().unwrap() > 0.0, "{enabled}");
    assert!(enabled["x_kernel_uprobe_nop5"].is_number() && enabled["x_optimized_probe"].is_number(), "{enabled}");
}
