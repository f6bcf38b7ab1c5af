//! `dynprobe record -a` end to end: each traced call's arguments and return value, typed
//! from the DWARF, in `replay` and in the Chrome export. The targets (`targets/args.c`,
//! `targets/args_cxx.cpp`) write every call as replay shows it into a log file; the replay
//! lines must be exactly those, at `-O0` and `-O2`, at each kind of entry site.
//!
//! The agent must be built beside the `dynprobe` binary first: `cargo build --workspace`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::attached::{Session, Worker};
use common::{build_c, build_cxx, dynprobe, scratch, stdout_of};

/// The functions of `args.c` that log their calls.
const C_FUNCTIONS: [&str; 9] =
    ["parse_record", "scale", "paint", "mix", "many", "sum_triple", "shift_point", "make_triple", "note"];

/// How a target's entries are traced: the compiler's NOPs, or probes on plain entries.
const MCOUNT: &[&str] = &["-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-fno-pie", "-no-pie"];
const PATCHABLE: &[&str] = &["-fpatchable-function-entry=5"];
const PLAIN: &[&str] = &[];

/// `source` built with `-g`, `opt` and `sites` as `name`, once per test run.
fn program(source: &str, name: &str, opt: &str, sites: &[&str]) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap();
    if let Some((_, path)) = built.iter().find(|(n, _)| n == name) {
        return path.clone();
    }
    let mut flags: Vec<&std::ffi::OsStr> = vec!["-g".as_ref(), opt.as_ref()];
    flags.extend(sites.iter().map(std::ffi::OsStr::new));
    let path = match source.ends_with(".cpp") {
        true => build_cxx(source, name, &flags),
        false => build_c(source, name, &flags),
    };
    built.push((name.to_string(), path.clone()));
    path
}

/// A recording of `program ROUNDS LOG` with `options`: the replay's call lines (without
/// durations and thread ids, indentation trimmed), the program's log, and the trace.
struct Recorded {
    calls: Vec<String>,
    log: Vec<String>,
    dir: PathBuf,
}

fn record(name: &str, options: &[&str], program: &Path, rounds: u32) -> Recorded {
    let dir = scratch().join(format!("args-trace-{name}"));
    let log = scratch().join(format!("args-log-{name}"));
    let out = dynprobe()
        .arg("record")
        .arg("-o")
        .arg(&dir)
        .args(options)
        .arg("--")
        .arg(program)
        .arg(rounds.to_string())
        .arg(&log)
        .output()
        .expect("run dynprobe record");
    stdout_of(&out);
    let calls = calls_of(&dir);
    let log = std::fs::read_to_string(&log).expect("the program's log").lines().map(str::to_string).collect();
    Recorded { calls, log, dir }
}

/// The call lines of `dynprobe replay DIR`, without durations and thread ids.
fn calls_of(dir: &Path) -> Vec<String> {
    let replay = stdout_of(&dynprobe().arg("replay").arg(dir).output().expect("run dynprobe replay"));
    replay
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| Some(l.split_once(" | ")?.1.trim().to_string()))
        .collect()
}

/// `-F` for each of `functions`.
fn filters(functions: &[&str]) -> Vec<String> {
    functions.iter().flat_map(|f| ["-F".to_string(), f.to_string()]).collect()
}

fn record_c(name: &str, opt: &str, sites: &[&str], with_args: bool) -> Recorded {
    let program = program("args.c", &format!("args-{name}"), opt, sites);
    let mut options = filters(&C_FUNCTIONS);
    if with_args {
        options.push("-a".into());
    }
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    record(name, &options, &program, 4)
}

#[test]
fn replay_shows_what_each_c_call_was_passed_and_returned_at_o0_and_o2() {
    for (name, opt, sites) in [("o0-mcount", "-O0", MCOUNT), ("o2-patchable", "-O2", PATCHABLE)] {
        let r = record_c(name, opt, sites, true);
        assert_eq!(r.calls.len(), 4 * C_FUNCTIONS.len(), "{name}: {:#?}", r.calls);
        assert_eq!(r.calls, r.log, "{name}");
        // What the log shows: a string cut at 64 bytes, negative ints, an enum, a char,
        // a pointer, doubles, the seventh and eighth arguments from the stack.
        let some = |prefix: &str| r.calls.iter().any(|c| c.starts_with(prefix));
        assert!(some("parse_record(line=\"a rather long line that the recorder cuts, being longer than 64 \"..."));
        assert!(some("paint(c=GREEN, tag='b', slot=0x"), "{name}");
        assert!(some("mix(x=2.5, k=0, y=0.25) = 0.25;"), "{name}");
        assert!(some("many(a1=1, a2=-2, a3=3, a4=-4, a5=5, a6=-6, a7=8, a8=-8) = -3;"), "{name}");
    }
}

#[test]
fn at_plain_entries_floating_point_arguments_come_from_the_probes_save_and_all_is_exact() {
    let r = record_c("o2-plain", "-O2", PLAIN, true);
    // The probe's dispatcher runs before the values are read; the vector registers are
    // read from where the probe's path saved them, before it, so floats are exact too.
    assert!(r.log.iter().any(|l| l.starts_with("mix(")), "{:?}", r.log);
    assert_eq!(r.calls, r.log);
}

#[test]
fn a_cxx_member_function_shows_its_this_and_arguments() {
    let program = program("args_cxx.cpp", "args-cxx", "-O2", MCOUNT);
    let r = record("cxx", &["-a", "-F", "Parser::*", "-F", "area*"], &program, 3);
    assert_eq!(r.calls, r.log);
    assert!(r.calls[0].starts_with("Parser::parse(this=0x"), "{:?}", r.calls);
    assert_eq!(r.calls[1], "area(w=0.5, h=4) = 2;");
}

#[test]
fn the_chrome_export_carries_the_arguments_and_the_return_value() {
    let r = record_c("export", "-O0", MCOUNT, true);
    let json = scratch().join("args-export.json");
    stdout_of(&dynprobe().arg("export").arg(&r.dir).arg("--chrome").arg(&json).output().expect("run export"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let calls: Vec<&serde_json::Value> =
        json["traceEvents"].as_array().unwrap().iter().filter(|e| e["name"] == "parse_record").collect();
    assert_eq!(calls.len(), 4);
    let args = &calls[0]["args"];
    assert_eq!((&args["line"], &args["len"], &args["retval"]), (&"\"alpha,12\"".into(), &"8".into(), &"12".into()));
    assert_eq!(calls[1]["args"]["retval"], "-7");
}

/// `report --args` gives each distinct call of a function a row of its own, named as replay
/// writes the call; without it a function is one row.
#[test]
fn report_args_has_a_row_for_each_distinct_call() {
    let r = record_c("report", "-O0", MCOUNT, true);
    let report = |extra: &[&str]| {
        let out = stdout_of(&dynprobe().arg("report").args(extra).arg(&r.dir).output().expect("run report"));
        // (calls, name) of each row.
        out.lines()
            .skip(2)
            .take_while(|l| !l.is_empty())
            .map(|l| {
                // Five right-aligned columns of 10 characters, two spaces before each.
                let calls: u64 = l[50..60].trim().parse().unwrap_or_else(|_| panic!("{l}"));
                (calls, l[62..].to_string())
            })
            .collect::<Vec<_>>()
    };
    let plain = report(&[]);
    assert!(plain.contains(&(4, "parse_record".to_string())), "{plain:?}");
    let by_args = report(&["--args"]);
    let parse: Vec<&(u64, String)> = by_args.iter().filter(|(_, n)| n.starts_with("parse_record(")).collect();
    assert_eq!(parse.iter().map(|(c, _)| c).sum::<u64>(), 4, "{by_args:?}");
    // Each row is a call the program logged, with its return value.
    for (_, row) in &parse {
        assert!(r.log.iter().any(|l| l.trim_end_matches(';') == row.as_str()), "{row} is not in {:#?}", r.log);
    }
    assert!(parse.iter().any(|(_, n)| n == "parse_record(line=\"alpha,12\", len=8) = 12"), "{parse:?}");
}

#[test]
fn a_trace_recorded_without_values_reads_as_before() {
    let r = record_c("plain-trace", "-O0", MCOUNT, false);
    assert!(!r.dir.join("args").exists());
    let want: Vec<String> = C_FUNCTIONS.iter().map(|f| format!("{f}();")).collect();
    assert_eq!(&r.calls[..C_FUNCTIONS.len()], want);
    // And a trace with values read by a replay that ignores them (its `args` file gone)
    // shows the same calls plainly: the values are records beside the calls, not in them.
    let with = record_c("values-dropped", "-O0", MCOUNT, true);
    std::fs::remove_file(with.dir.join("args")).unwrap();
    assert_eq!(calls_of(&with.dir), r.calls);
}

#[test]
fn record_p_records_the_values_of_a_running_process_s_calls() {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    let exe = EXE.get_or_init(|| program("worker.c", "args-worker", "-O2", &["-fno-pie", "-no-pie"]));
    let log = scratch().join(format!("args-worker-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let mut worker = Worker::start_with(exe, log.as_os_str(), log.clone(), &[]);
    let dir = scratch().join("args-trace-attached");
    let mut command = dynprobe();
    command.args(["record", "-a", "-F", "mix", "-p", &worker.pid.to_string(), "-o"]).arg(&dir);
    let mut session = Session::spawn(command, None);
    session.wait_for(&format!("attached to {} (", worker.pid));
    worker.round();
    let (status, _, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(status, Some(0), "record -p failed:\n{stderr}");
    // Every call of the round, as the worker logged it: `mix <tid> <seed> <round> <result>`.
    let mut want: Vec<String> = worker
        .logged()
        .iter()
        .filter(|f| f[0] == "mix")
        .map(|f| format!("mix(seed={}, round={}) = {};", f[2], f[3], f[4]))
        .collect();
    let mut got = calls_of(&dir);
    want.sort();
    got.sort();
    assert_eq!(got.len(), 4 * 300);
    assert_eq!(got, want);
    worker.quit();
}

#[test]
fn a_and_r_options_replace_what_the_dwarf_says() {
    let program = program("args.c", "args-o0-mcount", "-O0", MCOUNT);
    let options = [
        "-a",
        "-F",
        "parse_record",
        "-F",
        "scale",
        "-A",
        "parse_*@n=$arg2:x16 first=+0($arg1):u8",
        "-R",
        "scale@$retval:x64",
    ];
    let r = record("overrides", &options, &program, 2);
    let want = [
        "parse_record(n=0x8, first=97) = 12;".to_string(),
        format!("scale(value=-1000, factor=3, shift='\\x00', neg=false) = {:#x};", -3000i64 as u64),
        "parse_record(n=0x7, first=98) = -7;".to_string(),
        format!("scale(value=-1001, factor=2, shift='\\x01', neg=true) = {:#x};", 1001),
    ];
    assert_eq!(r.calls, want);
    // A bad one is refused before anything runs, naming it.
    let out = dynprobe().args(["record", "-a", "-A", "parse_record@x=line", "--"]).arg(&program).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`x=line`: name registers, `$argN` or `$stackN`"), "{stderr}");
}

/// `targets/argslib.c` built with `-g` as the shared library `libargslib-{name}.so`
/// (`sites` its entries).
fn library(name: &str, sites: &[&str]) -> PathBuf {
    let mut flags = vec!["-shared", "-fPIC"];
    flags.extend(sites);
    program("argslib.c", &format!("libargslib-{name}.so"), "-O2", &flags)
}

/// [`library`], and `targets/argslib_main.c` linked against it (found through its run path)
/// as `name`.
fn library_program(name: &str, sites: &[&str]) -> PathBuf {
    let library = library(name, sites);
    let dir = library.parent().unwrap().display().to_string();
    // The library comes before the program's source on the command line: without
    // `--no-as-needed` the linker would drop it as not needed yet.
    let link = ["-Wl,--no-as-needed", library.to_str().unwrap(), &format!("-Wl,-rpath,{dir}")];
    program("argslib_main.c", &format!("argslib-{name}"), "-O0", &link)
}

#[test]
fn a_shared_library_s_functions_named_by_f_module_record_their_values() {
    for (name, sites) in [("patchable", PATCHABLE), ("plain", PLAIN)] {
        let program = library_program(name, sites);
        let filter = format!("libargslib-{name}:lib_*");
        let r = record(&format!("library-{name}"), &["-a", "-F", &filter], &program, 4);
        assert_eq!(r.calls.len(), 4 * 3, "{name}: {:#?}", r.calls);
        assert_eq!(r.calls, r.log, "{name}");
        // Ints (a negative one), a string, a char and doubles, from the library's DWARF.
        assert_eq!(r.calls[..3], LIBRARY_FIRST_ROUND);
        assert!(r.calls.contains(&"lib_add(a=1, b=-7) = -6;".to_string()), "{name}: {:#?}", r.calls);
        let args = std::fs::read_to_string(r.dir.join("args")).unwrap();
        assert!(args.lines().any(|l| l.starts_with("l\t") && l.ends_with(&format!("libargslib-{name}.so"))), "{args}");
    }
}

/// [`library`], and `targets/argslib_main.c` built as `name` to `dlopen` it by its path
/// (after start: `ldd` does not list it); (program, library).
fn dlopen_program(name: &str, sites: &[&str]) -> (PathBuf, PathBuf) {
    let library = library(name, sites);
    let define = format!("-DARGSLIB_DLOPEN=\"{}\"", library.display());
    (program("argslib_main.c", &format!("argslib-{name}"), "-O0", &[&define, "-ldl"]), library)
}

/// The first round's calls, as `argslib_main.c` makes them and the library logs them.
const LIBRARY_FIRST_ROUND: [&str; 3] =
    ["lib_add(a=0, b=0) = 0;", "lib_count(text=\"banana\", c='a') = 3;", "lib_scale(x=0.5, n=3) = 1.5;"];

#[test]
fn a_library_the_program_dlopens_later_records_its_values_when_f_names_its_path() {
    let (program, library) = dlopen_program("dlopened", PATCHABLE);
    let filter = format!("{}:lib_*", library.display());
    let r = record("library-dlopened", &["-a", "-F", &filter], &program, 4);
    assert_eq!(r.calls.len(), 4 * 3, "{:#?}", r.calls);
    assert_eq!(r.calls, r.log);
    assert_eq!(r.calls[..3], LIBRARY_FIRST_ROUND);
}

#[test]
fn record_p_records_the_values_of_a_library_dlopened_during_the_session() {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
    let exe = EXE.get_or_init(|| {
        let (exe, library) = dlopen_program("dlopened-attached", PLAIN);
        LIBRARY.get_or_init(|| library);
        exe
    });
    let library = LIBRARY.get().unwrap();
    let log = scratch().join(format!("args-dlopened-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let mut worker = Worker::start_with(exe, log.as_os_str(), log.clone(), &[]);
    let dir = scratch().join("args-trace-dlopened-attached");
    let filter = format!("{}:lib_*", library.display());
    let mut command = dynprobe();
    command.args(["record", "-a", "-F", &filter, "-p", &worker.pid.to_string(), "-o"]).arg(&dir);
    let mut session = Session::spawn(command, None);
    session.wait_for(&format!("attached to {} (", worker.pid));
    // The library is loaded now, by the round's first call.
    assert!(worker.round().starts_with("total "));
    let (status, _, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(status, Some(0), "record -p failed:\n{stderr}");
    let log: Vec<String> = std::fs::read_to_string(&log).unwrap().lines().map(str::to_string).collect();
    let calls = calls_of(&dir);
    assert_eq!(calls.len(), 4 * 3, "{calls:#?}\n{stderr}");
    assert_eq!(calls, log);
    assert_eq!(calls[..3], LIBRARY_FIRST_ROUND);
    worker.quit();
}

/// `-F PATH:GLOB` traces the library of that file name wherever the program loads it from
/// (here a copy in another directory, as an installed copy of a library built elsewhere):
/// `-a` describes the library from PATH's DWARF and the copy's calls carry its values, as
/// the calls the filter selects do.
#[test]
fn a_library_named_by_its_path_records_its_values_also_where_a_copy_of_it_is_loaded() {
    let library = library("copied", PATCHABLE);
    let copy = scratch().join("copies").join(library.file_name().unwrap());
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::copy(&library, &copy).unwrap();
    let define = format!("-DARGSLIB_DLOPEN=\"{}\"", copy.display());
    let program = program("argslib_main.c", "argslib-copied", "-O0", &[&define, "-ldl"]);
    let filter = format!("{}:lib_*", library.display());
    let r = record("library-copied", &["-a", "-F", &filter], &program, 4);
    assert_eq!(r.calls.len(), 4 * 3, "{:#?}", r.calls);
    assert_eq!(r.calls[..3], LIBRARY_FIRST_ROUND, "{:#?}", r.calls);
    assert_eq!(r.calls, r.log);
}
