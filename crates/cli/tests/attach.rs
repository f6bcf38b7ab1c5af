//! End-to-end tests of `dynprobe probe -p PID`: attaching to a multi-threaded C program that
//! is already running (`targets/worker.c`), checking every event against the program's own
//! log of its calls, detaching (by Ctrl-C, `--duration`, or the controller being killed)
//! and checking that the program goes on with the same checksum and its original bytes.
//!
//! Needs ptrace rights over the test's own children (root, or Yama's ptrace_scope ≤ 1) and
//! the agent built beside `dynprobe` (`cargo build --workspace` first).

mod common;

use common::attached::{mappings, symbol_address, thread_names, Session, Worker};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The specs every session places: entry and return of both functions, with arguments,
/// a string, a dereference, return values and the duration.
const SPECS: &[&str] = &[
    "p:mix_in mix seed=$arg1:s64 round=$arg2:s32",
    "r:mix_out mix seed=$arg1:s64 ret=$retval:s64",
    "p:label_in label name=$arg1:string weight=+8($arg2):s32",
    "r:label_out label ret=$retval:s32 took=$duration",
];

fn scratch() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("attach-test");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn targets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/targets")
}

/// Compiles `source` (in tests/targets) with gcc and `flags`, once per test run.
fn build(cell: &'static OnceLock<PathBuf>, source: &str, output: &str, flags: &[&str]) -> &'static Path {
    cell.get_or_init(|| {
        let exe = scratch().join(format!("{output}-{}", std::process::id()));
        let status = Command::new("gcc")
            .args(flags)
            .arg("-o")
            .arg(&exe)
            .arg(targets().join(source))
            .status()
            .expect("run gcc (scripts/setup installs it)");
        assert!(status.success(), "gcc failed to build {source}");
        exe
    })
}

fn worker_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    build(&EXE, "worker.c", "worker", &["-O1", "-g", "-fno-inline", "-pthread", "-no-pie", "-ldl"])
}

/// The same worker, statically linked: the agent cannot be loaded into it, so dynprobe
/// falls back to probes driven from outside with ptrace.
fn static_worker_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    build(&EXE, "worker.c", "worker-static", &["-O1", "-g", "-fno-inline", "-pthread", "-static"])
}

fn blocking_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    build(&EXE, "blocking.c", "blocking", &["-O1", "-g", "-fno-inline", "-pthread", "-no-pie"])
}

/// A program that uses SIGTRAP itself and blocks every signal in its threads.
fn signals_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    build(&EXE, "signals.c", "signals", &["-O2", "-pthread"])
}

/// The worker with 8 MiB of static TLS (`-DBIG_TLS`).
fn big_tls_worker_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    build(&EXE, "worker.c", "worker-big-tls", &["-O1", "-g", "-fno-inline", "-pthread", "-no-pie", "-DBIG_TLS"])
}

/// `targets/hot.c`: threads calling `work` without a pause, and commands that misbehave
/// around a session.
fn hot_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    build(&EXE, "hot.c", "hot", &["-O1", "-g", "-fno-inline", "-pthread", "-no-pie"])
}

fn plugin_lib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    build(&LIB, "plugin.c", "libplugin.so", &["-O1", "-shared", "-fPIC"])
}

/// `targets/plugin.c` with its DWARF (`-g`), for source-level specs in an attached session.
fn plugin_lib_with_dwarf() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    build(&LIB, "plugin.c", "libplugdwarf.so", &["-O1", "-g", "-shared", "-fPIC"])
}

fn dynprobe_exe() -> &'static Path {
    let exe = Path::new(env!("CARGO_BIN_EXE_dynprobe"));
    let agent = exe.with_file_name("libdynprobe_agent.so");
    assert!(agent.is_file(), "{} is missing: run `cargo build --workspace` before these tests", agent.display());
    exe
}

impl Worker {
    fn start(test: &str) -> Worker {
        Worker::start_exe(test, worker_exe())
    }

    fn start_exe(test: &str, exe: &'static Path) -> Worker {
        Worker::start_with_env(test, exe, &[])
    }

    /// A worker built as `exe` with `env` added to its environment.
    fn start_with_env(test: &str, exe: &'static Path, env: &[(&str, &str)]) -> Worker {
        let log = scratch().join(format!("{test}-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        Worker::start_with(exe, &log.clone().into_os_string(), log, env)
    }

    /// `targets/hot.c` with `threads` hot threads (it keeps no log).
    fn start_hot(threads: u32) -> Worker {
        Worker::start_with(hot_exe(), threads.to_string().as_ref(), PathBuf::new(), &[])
    }
}

impl Session {
    fn start(pid: i32, specs: &[&str], options: &[&str]) -> Session {
        Session::start_with(pid, specs, options, |_| {}, None)
    }

    /// [`Session::start`] with the command set up by `setup` (a user, an environment), and
    /// its standard output read `pace` at a time when given: a reader slower than the hits.
    fn start_with(
        pid: i32,
        specs: &[&str],
        options: &[&str],
        setup: impl FnOnce(&mut Command),
        pace: Option<(usize, Duration)>,
    ) -> Session {
        let mut command = Command::new(dynprobe_exe());
        command.arg("probe").arg("-p").arg(pid.to_string()).args(options).args(specs);
        setup(&mut command);
        Session::spawn(command, pace)
    }
}

/// Each event's fields, in the order the expected tuples list them (JSON objects do not
/// keep an order).
const FIELDS: &[(&str, &[&str])] = &[
    ("mix_in", &["seed", "round"]),
    ("mix_out", &["seed", "ret"]),
    ("label_in", &["name", "weight"]),
    ("label_out", &["ret", "took"]),
    ("pw", &["x"]),
    ("pr", &["ret"]),
    ("us", &["t"]),
    ("sl", &["s"]),
];

/// The events of `--json` output, grouped by event name, each as (tid, fields...), sorted.
fn events(stdout: &str) -> BTreeMap<String, Vec<Vec<String>>> {
    let mut by_event: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    for line in stdout.lines() {
        let event: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"));
        let name = event["event"].as_str().unwrap().to_string();
        let names = FIELDS.iter().find(|(event, _)| *event == name).unwrap_or_else(|| panic!("unknown event {line}")).1;
        let mut fields = vec![event["tid"].to_string()];
        for field in names {
            fields.push(match &event["args"][field] {
                Value::String(s) => s.clone(),
                Value::Null => panic!("no field {field} in {line}"),
                other => other.to_string(),
            });
        }
        by_event.entry(name).or_default().push(fields);
    }
    by_event.values_mut().for_each(|v| v.sort());
    by_event
}

/// Asserts that `got` equals `want`, showing only the first difference (there may be
/// thousands of events).
fn assert_same_events(got: &BTreeMap<String, Vec<Vec<String>>>, want: &BTreeMap<String, Vec<Vec<String>>>) {
    for (event, calls) in want {
        let seen = got.get(event).map_or(&[][..], Vec::as_slice);
        let first_difference = calls.iter().zip(seen).find(|(want, got)| want != got);
        assert!(
            seen.len() == calls.len() && first_difference.is_none(),
            "{event}: {} events for {} logged calls; first difference (logged, seen): {first_difference:?}",
            seen.len(),
            calls.len()
        );
    }
}

/// What the events of SPECS must be, from the worker's log of its calls (the field order
/// of each spec; `took` is checked separately).
fn expected(logged: &[Vec<String>]) -> BTreeMap<String, Vec<Vec<String>>> {
    let mut by_event: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    for call in logged {
        let [kind, tid, a, b, result] = &call[..] else { panic!("bad log line {call:?}") };
        let mut push = |name: &str, fields: Vec<String>| by_event.entry(name.to_string()).or_default().push(fields);
        match kind.as_str() {
            "mix" => {
                push("mix_in", vec![tid.clone(), a.clone(), b.clone()]);
                push("mix_out", vec![tid.clone(), a.clone(), result.clone()]);
            }
            "label" => {
                push("label_in", vec![tid.clone(), a.clone(), b.clone()]);
                push("label_out", vec![tid.clone(), result.clone()]);
            }
            other => panic!("unknown call {other}"),
        }
    }
    by_event.values_mut().for_each(|v| v.sort());
    by_event
}

/// An unprobed worker's checksum for one round.
fn unprobed_checksum() -> String {
    static SUM: OnceLock<String> = OnceLock::new();
    SUM.get_or_init(|| {
        let mut worker = Worker::start("unprobed");
        let sum = worker.round();
        worker.quit();
        sum
    })
    .clone()
}

#[test]
fn every_call_is_seen_with_its_values_and_detach_restores_the_program() {
    every_call_is_seen(worker_exe(), &[]);
}

#[test]
fn a_static_program_is_probed_through_ptrace_with_the_same_results() {
    every_call_is_seen(static_worker_exe(), &["driven from outside with ptrace"]);
}

/// Attaches with SPECS to a worker built as `exe`, runs a round, detaches, and checks the
/// events against the worker's log, the checksum, and the code bytes; `notes` must be on
/// stderr.
fn every_call_is_seen(exe: &'static Path, notes: &[&str]) {
    let expected_sum = unprobed_checksum();
    let mut worker = Worker::start_exe(&format!("detach-{}", exe.file_name().unwrap().to_string_lossy()), exe);
    let before = (worker.code("mix"), worker.code("label"));
    let mut session = Session::start(worker.pid, SPECS, &["--json"]);
    for note in notes {
        session.wait_for(note);
    }
    let attached = session.wait_for("attached to");
    assert!(attached.contains("4 probes placed"), "{attached}");
    assert_ne!(worker.code("mix")[..5], before.0[..5], "mix is not patched while attached");
    assert_eq!(worker.round(), expected_sum, "the probed round's checksum differs");
    let (code, stdout, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("detached from"), "{stderr}");
    assert!(!stderr.contains("lost"), "events were lost: {stderr}");

    let mut got = events(&stdout);
    // The durations: present, positive, and then left out of the comparison.
    for fields in got.get_mut("label_out").expect("label_out events") {
        let took: u64 = fields.pop().unwrap().parse().expect("took is a number");
        assert!(took > 0 && took < 1_000_000_000, "implausible duration {took} ns");
    }
    let want = expected(&worker.logged());
    assert_eq!(want["mix_in"].len(), 4 * 300);
    assert_same_events(&got, &want);

    assert_eq!((worker.code("mix"), worker.code("label")), before, "bytes not restored");
    assert_eq!(worker.round(), expected_sum, "the round after detach differs");
    worker.quit();
}

/// Attached, a probe on glibc's `strlen` (an indirect function) goes on the implementation
/// the worker's dynamic linker chose — for a static worker, probed through ptrace, the one
/// its start-up wrote into the GOT slot of its IRELATIVE relocation: every call of its
/// `label()` is seen with its string (its `fprintf`s measure strings too), and the worker
/// computes as before, during and after the session.
#[test]
fn an_attached_session_probes_the_strlen_the_program_uses() {
    attached_strlen(worker_exe(), "strlen");
}

#[test]
fn a_static_program_s_strlen_is_probed_through_ptrace_where_its_relocation_points() {
    attached_strlen(static_worker_exe(), "strlen-static");
}

fn attached_strlen(exe: &'static Path, test: &str) {
    let expected_sum = unprobed_checksum();
    let mut worker = Worker::start_exe(test, exe);
    let mut session = Session::start(worker.pid, &["p:sl strlen s=+0($arg1):string"], &["--json"]);
    session.wait_for("attached to");
    assert_eq!(worker.round(), expected_sum, "the probed round's checksum differs");
    let (code, stdout, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("detached from"), "{stderr}");
    let seen: std::collections::HashSet<Vec<String>> =
        events(&stdout).remove("sl").unwrap_or_default().into_iter().collect();
    let labels: Vec<Vec<String>> = worker.logged().into_iter().filter(|call| call[0] == "label").collect();
    assert_eq!(labels.len(), 4 * 300);
    for call in labels {
        let (tid, name) = (&call[1], &call[2]);
        assert!(seen.contains(&vec![tid.clone(), name.clone()]), "label({name}) on thread {tid} was not seen");
    }
    assert_eq!(worker.round(), expected_sum, "the round after detach differs");
    worker.quit();
}

#[test]
fn killing_the_controller_restores_the_program() {
    killing_the_controller_restores(worker_exe());
}

#[test]
fn killing_the_controller_of_ptrace_probes_restores_the_program() {
    killing_the_controller_restores(static_worker_exe());
}

/// Kills `dynprobe probe -p` mid-round (SIGKILL): the agent, or the ptrace tracer (a
/// child of dynprobe's that outlives it), must restore every byte, and the round finish
/// with the unprobed checksum. Then a second session attaches and ends by `--duration`.
fn killing_the_controller_restores(exe: &'static Path) {
    let expected_sum = unprobed_checksum();
    let _cpu = cpu_hungry();
    let mut worker = Worker::start_exe(&format!("kill-{}", exe.file_name().unwrap().to_string_lossy()), exe);
    let before = worker.code("mix");
    let threads = thread_names(worker.pid).len();
    let mut session = Session::start(worker.pid, SPECS, &[]);
    session.wait_for("attached to");
    writeln!(worker.stdin, "go").unwrap();
    // Mid-round: the controller dies with hits flowing.
    std::thread::sleep(Duration::from_millis(30));
    let (_, stdout, _) = session.end(Some(libc::SIGKILL));
    assert!(stdout.contains("mix_in"), "no event before the kill: {stdout:?}");
    let mut line = String::new();
    worker.stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), expected_sum, "the round during which the controller died differs");
    // The agent notices the closed socket and removes the probes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while worker.code("mix") != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(worker.code("mix"), before, "bytes not restored after the controller died");
    // And no thread of dynprobe's is left in it.
    wait_for_thread_count(worker.pid, threads);
    assert_eq!(worker.round(), expected_sum);

    // The agent is still loaded: a second attach reuses it, and --duration detaches.
    let mut again = Session::start(worker.pid, &["p:mix_in mix seed=$arg1"], &["--duration", "1"]);
    again.wait_for("attached to");
    let (code, _, stderr) = again.end(None);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("detached from"), "{stderr}");
    assert_eq!(worker.code("mix"), before);
    worker.quit();
}

#[test]
fn settings_a_started_program_left_in_the_environment_do_not_apply_to_an_attach() {
    // What a program run under `dynprobe probe` passes on to the programs it runs: the
    // agent's settings (here naming stdout, a pipe, as the event descriptor). An attach
    // loads the agent by a dlopen, which must not act on them (it used to place these
    // probes and, refused, end the process with status 127).
    let env =
        [("DYNPROBE_PROBES", "p:no_such_function_anywhere"), ("DYNPROBE_EVENT_FD", "1"), ("DYNPROBE_FIRST_IMAGE", "1")];
    let mut worker = Worker::start_with_env("inherited-env", worker_exe(), &env);
    let mut session = Session::start(worker.pid, &["p:mix"], &[]);
    session.wait_for("attached to");
    assert_eq!(worker.round(), unprobed_checksum(), "the worker's output changed");
    let (code, _, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(code, Some(0), "{stderr}");
    worker.quit();
}

#[test]
fn a_second_session_is_refused_while_the_first_runs() {
    let worker = Worker::start("twice");
    let mut first = Session::start(worker.pid, &["p:mix"], &[]);
    first.wait_for("attached to");
    let (code, _, stderr) = Session::start(worker.pid, &["p:label"], &[]).end(None);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("already has a dynprobe session"), "{stderr}");
    let (code, _, stderr) = first.end(Some(libc::SIGINT));
    assert_eq!(code, Some(0), "{stderr}");
    worker.quit();
}

#[test]
fn a_probe_on_a_library_loaded_later_fires_once_it_is_loaded() {
    let mut worker = Worker::start("pending");
    let mut session = Session::start(worker.pid, &["p:pw libplugin:plugin_work x=$arg1:s32"], &["--json"]);
    session.wait_for("waiting for their library");
    let answer = worker.ask(&format!("load {}", plugin_lib().display()));
    assert_eq!(answer, "plugin 77");
    session.wait_for("placed: its library was loaded");
    let (code, stdout, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(code, Some(0), "{stderr}");
    let got = events(&stdout);
    assert_eq!(got["pw"], vec![vec![worker.pid.to_string(), "7".to_string()]], "{stdout}");
    worker.quit();
}

/// A library unloaded by `dlclose` takes its probes' code with it: they go back to waiting
/// for it (said once), and are placed again at each later `dlopen` of it, as the kernel's
/// uprobes follow their file. Every load's calls are seen, and the detach is complete. (Before,
/// the probes fired on the first load only, and the detach failed on the unmapped code and
/// left the agent retrying forever.)
#[test]
fn a_probe_follows_its_library_through_dlclose_and_dlopen_again() {
    let mut worker = Worker::start("reload");
    let lib = plugin_lib().display().to_string();
    let specs = ["p:pw libplugin:plugin_work x=$arg1:s32", "r:pr libplugin:plugin_work ret=$retval:s32"];
    let mut session = Session::start(worker.pid, &specs, &["--json"]);
    session.wait_for("waiting for their library");
    for _ in 0..3 {
        assert_eq!(worker.ask(&format!("load {lib}")), "plugin 77");
        assert_eq!(worker.ask(&format!("unload {lib}")), "unloaded");
    }
    assert_eq!(worker.ask(&format!("load {lib}")), "plugin 77");
    let (code, stdout, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("every probed byte is restored"), "{stderr}");
    assert_eq!(stderr.matches("was unloaded: the probe waits for it").count(), 2, "{stderr}");
    let got = events(&stdout);
    let pid = worker.pid.to_string();
    assert_eq!(got["pw"], vec![vec![pid.clone(), "7".to_string()]; 4], "{stdout}");
    assert_eq!(got["pr"], vec![vec![pid, "77".to_string()]; 4], "{stdout}");
    worker.quit();
}

#[test]
fn a_source_level_spec_in_a_library_the_process_has_loaded() {
    // The library is found among the process's mappings, its DWARF read for the variable.
    let mut worker = Worker::start("source-lib");
    assert_eq!(worker.ask(&format!("load {}", plugin_lib_with_dwarf().display())), "plugin 77");
    let mut session = Session::start(worker.pid, &["p:pl libplugdwarf:plugin_leaf x"], &["--json"]);
    session.wait_for("attached to");
    assert_eq!(worker.ask(&format!("load {}", plugin_lib_with_dwarf().display())), "plugin 77");
    let (code, stdout, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(code, Some(0), "{stderr}");
    let values: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("\"pl\""))
        .map(|l| l.split("\"x\":").nth(1).unwrap().trim_end_matches('}'))
        .collect();
    // plugin_work(7) calls plugin_leaf(7) and plugin_leaf(8).
    assert_eq!(values, ["7", "8"], "{stdout}");
    worker.quit();
}

#[test]
fn the_process_exiting_ends_the_session() {
    let mut worker = Worker::start("exit");
    let mut session = Session::start(worker.pid, &["p:mix"], &[]);
    session.wait_for("attached to");
    writeln!(worker.stdin, "quit").unwrap();
    let (code, _, stderr) = session.end(None);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("exited"), "{stderr}");
    assert!(worker.child.wait().unwrap().success());
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let expected_sum = unprobed_checksum();
    let mut worker = Worker::start("refused");
    let before = worker.code("mix");

    let (code, _, stderr) = Session::start(worker.pid, &["p:mix", "p:no_such_function"], &[]).end(None);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no_such_function") && stderr.contains("nothing was left"), "{stderr}");
    assert_eq!(worker.code("mix"), before);

    let (code, _, stderr) = Session::start(worker.pid, &["p:mix+1"], &[]).end(None);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("mix+1"), "{stderr}");

    let (code, _, stderr) = Session::start(worker.pid, &["p:mix x=%rdz"], &[]).end(None);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unknown register `rdz` at column"), "{stderr}");

    let (code, _, stderr) = Session::start(999_999_999, &["p:mix"], &[]).end(None);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no process with pid 999999999"), "{stderr}");

    assert_eq!(worker.round(), expected_sum);
    worker.quit();
}

/// `dynprobe probe ARGS -- EXE LOG` started, its three standard streams piped (the worker,
/// started by it, shares them).
fn probe_command(test: &str, args: &[&str], exe: &Path) -> Child {
    let log = scratch().join(format!("{test}-{}.log", std::process::id()));
    Command::new(dynprobe_exe())
        .arg("probe")
        .args(args)
        .arg("--")
        .arg(exe)
        .arg(&log)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dynprobe")
}

/// `dynprobe probe --json SPECS -- EXE LOG` with `input` on the worker's stdin: (the
/// JSON events, the worker's own lines, stderr), after checking dynprobe succeeded.
fn start_under_dynprobe(test: &str, specs: &[&str], exe: &Path, input: &str) -> (String, String, String) {
    let mut child = probe_command(test, &[&["--json"], specs].concat(), exe);
    child.stdin.as_mut().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let (events, own): (Vec<&str>, Vec<&str>) = stdout.lines().partition(|l| l.starts_with('{'));
    (events.join("\n"), own.join("\n"), stderr.into_owned())
}

#[test]
fn a_started_program_gets_its_probes_on_a_library_loaded_later_too() {
    let specs = ["p:pw libplugin:plugin_work x=$arg1:s32"];
    let input = format!("load {}\nquit\n", plugin_lib().display());
    let (events, own, stderr) = start_under_dynprobe("launched", &specs, worker_exe(), &input);
    assert!(stderr.contains("it is placed when that library is loaded"), "{stderr}");
    assert!(stderr.contains("placed: its library was loaded"), "{stderr}");
    assert!(own.contains("plugin 77"), "{own}");
    let event: Value = serde_json::from_str(&events).unwrap_or_else(|e| panic!("not one event: {events} ({e})"));
    assert_eq!((event["event"].as_str(), event["args"]["x"].as_i64()), (Some("pw"), Some(7)), "{events}");
}

#[test]
fn a_static_program_started_by_dynprobe_runs_under_ptrace_probes() {
    let specs = [SPECS[0], SPECS[3]];
    let (lines, own, stderr) = start_under_dynprobe("static-launch", &specs, static_worker_exe(), "go\nquit\n");
    assert!(stderr.contains("statically linked") && stderr.contains("ptrace"), "{stderr}");
    assert!(own.contains(&unprobed_checksum()), "{own}");
    let got = events(&lines);
    assert_eq!(got["mix_in"].len(), 4 * 300, "{stderr}");
    assert_eq!(got["label_out"].len(), 4 * 300, "{stderr}");
}

/// A static program dynprobe starts is probed before its start-up has filled in the GOT
/// slots of its indirect functions: a probe on `strlen` is refused with that reason (and
/// what to do), and the program is not run.
#[test]
fn a_static_program_s_strlen_before_its_start_up_is_refused_with_the_reason() {
    let child = probe_command("static-strlen", &["p:sl strlen"], static_worker_exe());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("has not applied its relocations yet") && stderr.contains("attach with -p"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ready"), "the program ran");
}

/// Twenty sessions on a program whose threads sit in nanosleep, clock_nanosleep, poll,
/// ppoll, select, epoll_wait, sigtimedwait, a timed futex wait, read and accept, checking
/// each call's result: attaching, placing and optimizing the probe, and detaching never make
/// a blocked one return early (EINTR); the rare call a running thread entered just as it
/// was stopped is reported; each session sees the probed calls.
#[test]
fn blocking_calls_of_the_program_never_return_early_across_twenty_sessions() {
    let mut child = Command::new(blocking_exe())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the blocking program");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let pid: i32 = line.trim().strip_prefix("ready ").unwrap_or_else(|| panic!("it said {line:?}")).parse().unwrap();
    let mut warnings = Vec::new();
    for session in 0..20 {
        // Long enough for the main thread's next call (every 20 ms) on a loaded machine.
        let probe = Session::start(pid, &["p:work n=$arg1:s64"], &["--duration", "400ms"]);
        let (status, events, stderr) = probe.end(None);
        assert_eq!(status, Some(0), "session {session}: {stderr}");
        warnings.extend(stderr.lines().filter(|l| l.contains("EINTR")).map(str::to_string));
        assert!(
            events.lines().any(|l| l.contains("work: n=100")),
            "session {session} saw no call:\n{events}\n{stderr}"
        );
    }
    writeln!(stdin, "quit").unwrap();
    let mut report = String::new();
    stdout.read_to_string(&mut report).unwrap();
    assert!(child.wait().unwrap().success(), "the program failed: {report}");
    let calls: u64 = report.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a report");
    assert!(calls > 100, "only {calls} blocking calls were made: {report}");
    // A thread blocked in its call is never disturbed. One that dynprobe saw running, and
    // that entered its call in the microseconds before the stop signal landed, has its call
    // put back by the stop's handler (the old stop gave ~40 EINTRs a session here). A call
    // that could not be put back would be reported; none may be silent, and here, where
    // every call is made through the C library's wrappers, none may happen at all.
    let eintr: u64 = report.split_whitespace().nth(3).and_then(|n| n.parse().ok()).expect("a report");
    let reported: u64 = warnings
        .iter()
        .filter_map(|w| w.split("warning: ").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(eintr, reported, "blocking calls returned early unreported:\n{report}\ndynprobe said:\n{warnings:?}");
    assert_eq!(eintr, 0, "{eintr} blocking calls returned early in 20 sessions:\n{report}");
}

#[test]
fn a_program_using_sigtrap_and_blocking_every_signal_works_attached_and_after() {
    let mut worker = Worker::start_exe("signals", signals_exe());
    let alone = worker.round();
    assert!(alone.contains("traps=3 reset=1"), "{alone}");
    for options in [&["--no-optimize"][..], &[]] {
        let mut session = Session::start(worker.pid, &["p:work"], options);
        session.wait_for("attached to");
        assert_eq!(worker.round(), alone, "{options:?}: attached");
        let (code, stdout, stderr) = session.end(Some(libc::SIGINT));
        assert_eq!(code, Some(0), "{stderr}");
        assert!(!stderr.contains("while removing"), "{stderr}");
        // Three workers of 200 calls and one call from the main thread.
        assert_eq!(stdout.lines().filter(|l| l.contains("work")).count(), 601, "{options:?}: {stdout}");
        assert_eq!(worker.round(), alone, "{options:?}: after detach");
    }
    worker.quit();
}

/// The process's resident set (`VmRSS`), in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Waits until the process has `count` threads again (a session's threads end just after
/// dynprobe has exited); panics with their names if they do not.
fn wait_for_thread_count(pid: i32, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while thread_names(pid).len() != count {
        assert!(Instant::now() < deadline, "threads left after the session: {:?}", thread_names(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The signal masks of `/proc/PID/status` (blocked, ignored, caught: proc(5)).
fn signal_masks(pid: i32) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter(|l| l.starts_with("SigBlk") || l.starts_with("SigIgn") || l.starts_with("SigCgt"))
        .map(str::to_string)
        .collect()
}

/// Twenty sessions in a row on one process — placed, refused, with a probe waiting for a
/// library (the dlopen watcher), return probes, the C library probed — leave its thread
/// count, its memory map and its signal actions exactly as before the first (the agent
/// library unloaded, its code pools, trampoline, heap and signal handlers gone), and its
/// resident set within 1 MiB of what it was. The worker has run a round first: its threads
/// exited, leaving their malloc arenas on the C library's free list, and dynprobe's threads
/// take one of those for what the C library allocates for them (their thread-local storage)
/// rather than making one (which a process that never had a thread end gets, once: two
/// lines of its map, reused by every later session).
#[test]
fn twenty_sessions_leave_no_thread_and_nothing_growing() {
    let expected_sum = unprobed_checksum();
    let mut worker = Worker::start("twenty");
    let pid = worker.pid;
    assert_eq!(worker.round(), expected_sum);
    let threads = thread_names(pid).len();
    let (maps, masks, rss) = (mappings(pid), signal_masks(pid), rss_kib(pid));
    let specs: [&[&str]; 3] = [
        &["p:mix_in mix seed=$arg1", "r:mix_out mix ret=$retval", "p:libc:malloc", "p:libnothere:f"],
        &["p:mix", "p:no_such_function"],
        &["p:label", "r:libc:free"],
    ];
    for round in 0..20 {
        let specs = specs[round % specs.len()];
        let (code, _, stderr) = Session::start(pid, specs, &["--duration", "0.2"]).end(None);
        let refused = specs.contains(&"p:no_such_function");
        assert_eq!(code, Some(if refused { 2 } else { 0 }), "session {round}: {stderr}");
        let kept = ["stays loaded", "cannot unload", "did not end", "did not say", "without saying"];
        assert!(!kept.iter().any(|k| stderr.contains(k)), "session {round}: the agent was not unloaded: {stderr}");
        wait_for_thread_count(pid, threads);
        let now = mappings(pid);
        let new: Vec<&String> = now.iter().filter(|m| !maps.contains(m)).collect();
        let gone: Vec<&String> = maps.iter().filter(|m| !now.contains(m)).collect();
        assert!(new.is_empty() && gone.is_empty(), "session {round}: new mappings {new:#?}, gone {gone:#?}");
        assert_eq!(signal_masks(pid), masks, "session {round}: the signal actions changed");
        // The pages the C library's malloc touched for dynprobe's threads (their
        // thread-local storage, a few small blocks), and the code pages of the C library
        // the agent ran, stay resident.
        let now = rss_kib(pid);
        assert!(now <= rss + 1024, "session {round}: VmRSS {now} KiB, {rss} KiB before the first");
    }
    assert!(!thread_names(pid).iter().any(|t| t.starts_with("dynprobe")), "{:?}", thread_names(pid));
    // Return probes hide their trampoline from backtraces with a probe on libgcc's
    // `_Unwind_Backtrace`: gone too, so that no code of dynprobe's runs between sessions
    // (and libgcc, which the agent loaded, went with it unless the worker had it already).
    if !mappings(pid).iter().any(|l| l.contains("/libgcc_s")) {
        assert_eq!(worker.round(), expected_sum);
        return worker.quit();
    }
    let (ours, theirs) = (module_base(std::process::id() as i32, "libgcc_s"), module_base(pid, "libgcc_s"));
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
    let unwind = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"_Unwind_Backtrace".as_ptr()) } as u64;
    assert_ne!(unwind, 0, "this test's own process has libgcc's unwinder");
    let mut bytes = [0u8; 8];
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut bytes, unwind - ours + theirs).unwrap();
    // SAFETY: reads 8 bytes of code of a function of this process.
    assert_eq!(bytes, unsafe { *(unwind as *const [u8; 8]) }, "_Unwind_Backtrace is still probed");
    assert_eq!(worker.round(), expected_sum);
    worker.quit();
}

/// A call still to return through the return trampoline when the session ends (the
/// worker's main thread waits in a `read` a return probe diverted) keeps the agent loaded,
/// unused, and dynprobe says why; the call then returns through the trampoline as it
/// should, and the next session unloads everything.
#[test]
fn a_return_still_in_flight_keeps_the_agent_until_a_later_session() {
    let expected_sum = unprobed_checksum();
    let mut worker = Worker::start("in-flight");
    assert_eq!(worker.round(), expected_sum);
    let threads = thread_names(worker.pid).len();
    let before = mappings(worker.pid);
    let mut session = Session::start(worker.pid, &["r:libc:read n=$retval"], &[]);
    session.wait_for("attached to");
    // The worker answers, then reads its next command through the probed `read`.
    assert_eq!(worker.round(), expected_sum);
    std::thread::sleep(Duration::from_millis(200));
    let (code, _, stderr) = session.end_within(Some(libc::SIGINT), Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("every probed byte is restored"), "{stderr}");
    assert!(stderr.contains("the agent library stays loaded in") && stderr.contains("return trampoline"), "{stderr}");
    wait_for_thread_count(worker.pid, threads);
    assert!(mappings(worker.pid).iter().any(|l| l.contains("libdynprobe_agent")), "the agent was unloaded");
    // The diverted read returns through the trampoline, which is still there.
    assert_eq!(worker.round(), expected_sum);
    let (code, _, stderr) = Session::start(worker.pid, &["p:mix"], &["--duration", "0.2"]).end(None);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("stays loaded"), "{stderr}");
    wait_for_thread_count(worker.pid, threads);
    assert_eq!(mappings(worker.pid), before, "the second session did not unload what the first kept");
    assert_eq!(worker.round(), expected_sum);
    worker.quit();
}

/// Where the module whose file name starts with `name` is loaded in process `pid`.
fn module_base(pid: i32, name: &str) -> u64 {
    let maps = mappings(pid);
    let line = maps
        .iter()
        .find(|l| l.rsplit('/').next().is_some_and(|file| file.starts_with(name)))
        .unwrap_or_else(|| panic!("{name} is not loaded in {pid}"));
    u64::from_str_radix(line.split('-').next().unwrap(), 16).unwrap()
}

/// dynprobe's own threads (the session, the optimizer, the dlopen watcher) call malloc and
/// free, and start with the C library's start_thread: a probe on them sees only the
/// program's threads — here none, the worker being idle in `read`.
#[test]
fn dynprobe_threads_never_hit_a_probe() {
    let worker = Worker::start("invisible");
    let specs = ["p:libc:malloc", "p:libc:free", "r:libc:calloc", "p:libnothere:f"];
    let (code, stdout, stderr) = Session::start(worker.pid, &specs, &["--duration", "1"]).end(None);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "", "hits of an idle program: dynprobe's own threads were seen");
    worker.quit();
}

#[test]
fn probes_on_the_agent_are_refused_and_module_globs_match_loaded_modules() {
    let mut worker = Worker::start("globs");
    let refusals = [
        ("p:libdynprobe_agent:dynprobe_attach", "libdynprobe_agent.so, the library dynprobe itself runs from"),
        ("p:*:no_such_function", "no loaded module matching `*` defines `no_such_function`"),
    ];
    for (spec, why) in refusals {
        let (code, _, stderr) = Session::start(worker.pid, &[spec], &[]).end(None);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(why) && stderr.contains("nothing was left"), "{stderr}");
    }

    let mut session = Session::start(worker.pid, &["p:mix_in *:mix seed=$arg1:s64 round=$arg2:s32"], &["--json"]);
    let worker_name = worker.exe.file_name().unwrap().to_string_lossy().into_owned();
    session.wait_for(&format!("the module glob matched {worker_name}"));
    session.wait_for("attached to");
    worker.round();
    let (code, stdout, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(events(&stdout)["mix_in"].len(), 4 * 300, "{stderr}");
    worker.quit();
}

/// dynprobe's threads get their stack from dynprobe, and the C library takes a program's
/// static TLS from its top: with 8 MiB of `__thread` data, sessions still run, and leave
/// no thread behind and the memory map as it was (the stack of the agent's last thread,
/// which nothing in the process can join once the library is unloaded, is unmapped by
/// dynprobe before the `dlclose`).
#[test]
fn a_program_with_large_static_tls_is_attached_and_left_as_it_was() {
    let expected_sum = unprobed_checksum();
    let mut worker = Worker::start_exe("big-tls", big_tls_worker_exe());
    // A round first, as in `twenty_sessions_leave_no_thread_and_nothing_growing`.
    assert_eq!(worker.round(), expected_sum);
    let threads = thread_names(worker.pid).len();
    let before = mappings(worker.pid);
    for round in 0..4 {
        let (code, _, stderr) = Session::start(worker.pid, &["p:mix", "r:label"], &["--duration", "0.2"]).end(None);
        assert_eq!(code, Some(0), "{stderr}");
        wait_for_thread_count(worker.pid, threads);
        assert_eq!(mappings(worker.pid), before, "session {round} left its memory map changed: {stderr}");
    }
    assert_eq!(worker.round(), expected_sum);
    worker.quit();
}

/// The first child process of `pid` (dynprobe's ptrace tracer, the tracer's program).
fn child_of(pid: u32) -> i32 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    children.split_whitespace().next().unwrap_or_else(|| panic!("{pid} has no child")).parse().unwrap()
}

/// Waits until `symbol`'s bytes in `worker` are `before` again, running rounds meanwhile:
/// the handler a killed tracer leaves in the program restores them at a hit half a second
/// after its first.
fn wait_restored(worker: &mut Worker, symbol: &str, before: &[u8], expected_sum: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while worker.code(symbol) != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(worker.round(), expected_sum, "a round after the tracer died differs");
    }
    assert_eq!(worker.code(symbol), before, "{symbol}'s bytes not restored after the tracer died");
}

#[test]
fn killing_the_ptrace_tracer_leaves_the_program_running_and_says_so() {
    let (tracer, code, stderr) = kill_mid_round("kill-tracer", "mix", false);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(&format!("the ptrace tracer (pid {tracer}) was killed by signal 9")), "{stderr}");
    assert!(stderr.contains("runs on"), "{stderr}");
}

#[test]
fn killing_dynprobe_and_its_ptrace_tracer_at_once_leaves_the_program_running() {
    kill_mid_round("kill-both", "label", true);
}

/// Attaches to the static worker (ptrace probes), kills the tracer (and dynprobe too, with
/// `and_dynprobe`) mid-round, and checks that the round ends with the unprobed checksum and
/// that `symbol`'s bytes come back; (the tracer's pid, dynprobe's exit code, its stderr).
fn kill_mid_round(test: &str, symbol: &str, and_dynprobe: bool) -> (i32, Option<i32>, String) {
    let expected_sum = unprobed_checksum();
    let mut worker = Worker::start_exe(test, static_worker_exe());
    let before = worker.code(symbol);
    let mut session = Session::start(worker.pid, SPECS, &[]);
    session.wait_for("attached to");
    let tracer = child_of(session.child.id());
    writeln!(worker.stdin, "go").unwrap();
    // Mid-round: the tracer dies with hits flowing.
    std::thread::sleep(Duration::from_millis(30));
    // SAFETY: kills of our child dynprobe and of its child, the tracer.
    unsafe {
        if and_dynprobe {
            libc::kill(session.child.id() as i32, libc::SIGKILL);
        }
        libc::kill(tracer, libc::SIGKILL);
    }
    let (code, _, stderr) = session.end(None);
    let mut line = String::new();
    worker.stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), expected_sum, "the round during which the tracer died differs");
    wait_restored(&mut worker, symbol, &before, &expected_sum);
    worker.quit();
    (tracer, code, stderr)
}

#[test]
fn killing_the_ptrace_tracer_of_a_started_program_says_so() {
    let mut child = probe_command("kill-tracer-started", &[SPECS[0]], static_worker_exe());
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("ready "), "{line}");
    let tracer = child_of(child.id());
    let program = child_of(tracer as u32);
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    stdout.read_line(&mut line).unwrap();
    // SAFETY: kill of dynprobe's child, the tracer.
    unsafe { libc::kill(tracer, libc::SIGKILL) };
    let status = child.wait().unwrap();
    // The program holds dynprobe's stderr too: read up to the message, not to the end.
    let mut stderr = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok) {
        stderr.push_str(&line);
        if line.contains("killed by signal") {
            break;
        }
    }
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("was killed by signal 9") && stderr.contains("runs on"), "{stderr}");
    // The program (the tracer's child, now an orphan) still answers, with its pipes.
    writeln!(stdin, "go").unwrap();
    let mut rest = String::new();
    let sum = loop {
        rest.clear();
        stdout.read_line(&mut rest).unwrap();
        assert!(!rest.is_empty(), "the program ended");
        if rest.starts_with("checksum") {
            break rest.trim().to_string();
        }
    };
    assert_eq!(sum, unprobed_checksum());
    writeln!(stdin, "quit").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{program}/exe")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_executable_and_libc_are_probed_together_under_ptrace_when_attached() {
    let expected_sum = unprobed_checksum();
    let mut worker = Worker::start("ptrace-libc");
    let specs = [SPECS[0], "p:us libc:usleep t=$arg1"];
    let mut session = Session::start(worker.pid, &specs, &["--json", "--ptrace"]);
    let attached = session.wait_for("attached to");
    assert!(attached.contains("2 probes placed"), "{attached}");
    assert_eq!(worker.round(), expected_sum);
    let (code, stdout, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(code, Some(0), "{stderr}");
    let got = events(&stdout);
    assert_eq!(got["mix_in"].len(), 4 * 300, "{stderr}");
    assert!(got["us"].len() == 4 * 300 && got["us"].iter().all(|e| e[1] == "200"), "{:?}", got["us"]);
    worker.quit();
}

#[test]
fn the_executable_and_libc_are_probed_together_under_ptrace_when_started() {
    let specs = ["--ptrace", SPECS[0], "p:us libc:usleep t=$arg1"];
    let (lines, own, stderr) = start_under_dynprobe("ptrace-libc-started", &specs, worker_exe(), "go\nquit\n");
    assert!(own.contains(&unprobed_checksum()), "{own}");
    let got = events(&lines);
    assert_eq!(got["mix_in"].len(), 4 * 300, "{stderr}");
    assert_eq!(got["us"].len(), 4 * 300, "{stderr}");
}

/// Attaches with `options`, has the worker built as `exe` execute itself, and checks that
/// the session ends cleanly (exit 0) saying why, and that the new image works.
fn exec_ends_the_session(exe: &'static Path, options: &[&str]) {
    let expected_sum = unprobed_checksum();
    let mut worker = Worker::start_exe(&format!("exec-{}", exe.file_name().unwrap().to_string_lossy()), exe);
    let mut session = Session::start(worker.pid, &[SPECS[0]], options);
    session.wait_for("attached to");
    assert_eq!(worker.ask("exec"), format!("ready {}", worker.pid));
    let (code, _, stderr) = session.end(None);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("executed a new program") && stderr.contains("probes went with the old image"), "{stderr}");
    assert_eq!(worker.round(), expected_sum);
    worker.quit();
}

#[test]
fn an_exec_ends_an_agent_session_cleanly() {
    exec_ends_the_session(worker_exe(), &[]);
}

#[test]
fn an_exec_ends_a_ptrace_session_cleanly() {
    exec_ends_the_session(static_worker_exe(), &[]);
}

/// The probe every session on `targets/hot.c` places: a steady stream of hits.
const HOT_SPEC: &str = "p:work x=$arg1";

/// Held by the tests whose threads take every CPU they can get (`targets/hot.c` with its
/// hot threads), and by those that need their worker to run within a few milliseconds:
/// on a machine of two cores, one of each at once starves the other.
fn cpu_hungry() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits (up to 10 s) until `work`'s first bytes are `before` again: the agent removes the
/// probes on its own thread, after the CLI may have gone.
fn assert_restored(worker: &Worker, before: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while worker.code("work") != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(worker.code("work"), before, "work's bytes were not restored");
}

/// Checks that `targets/hot.c`'s threads still call `work` (over 200 ms: on a loaded
/// machine they may not run between two quick questions).
fn assert_still_working(worker: &mut Worker) {
    let calls = worker.ask("calls");
    std::thread::sleep(Duration::from_millis(200));
    assert_ne!(worker.ask("calls"), calls, "the threads stopped calling work");
}

#[test]
fn a_hot_probe_with_a_slow_reader_still_ends_on_time() {
    let _cpu = cpu_hungry();
    let mut worker = Worker::start_hot(2);
    let before = worker.code("work");
    // A reader far slower than two threads' hits: --duration must still end the session.
    let slow = Some((4096, Duration::from_millis(5)));
    let session = Session::start_with(worker.pid, &[HOT_SPEC], &["--duration", "1"], |_| {}, slow);
    let (code, stdout, stderr) = session.end_within(None, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("attached to") && stderr.contains("detached from"), "{stderr}");
    assert!(stdout.contains(" work: x="), "no hit printed: {stderr}");
    assert_restored(&worker, &before);

    // Output to /dev/null, which takes everything at once: Ctrl-C ends the session.
    let to_null = ["-o", "/dev/null"];
    let mut session = Session::start(worker.pid, &[HOT_SPEC], &to_null);
    session.wait_for("attached to");
    std::thread::sleep(Duration::from_millis(500));
    let (code, _, stderr) = session.end_within(Some(libc::SIGINT), Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("detached from"), "{stderr}");
    assert_restored(&worker, &before);
    assert_still_working(&mut worker);
    worker.quit();
}

#[test]
fn a_reader_that_hardly_reads_never_holds_dynprobe_past_a_second_ctrl_c() {
    let _cpu = cpu_hungry();
    let worker = Worker::start_hot(2);
    let before = worker.code("work");
    let crawl = Some((64, Duration::from_millis(200)));
    let mut session = Session::start_with(worker.pid, &[HOT_SPEC], &["--duration", "1"], |_| {}, crawl);
    session.wait_for("detached from");
    // Detached: the target has its bytes back while dynprobe still has events to write.
    assert_restored(&worker, &before);
    session.wait_for("the reader is behind");
    let (code, _, stderr) = session.end_within(Some(libc::SIGINT), Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("interrupted: ") && stderr.contains("were dropped"), "{stderr}");
}

/// Attaches to a `targets/hot.c` of two hot threads, has it start a thread that blocks the
/// stop signal and spins (`spin` is its command: `spin` or `spin MS`), and detaches with
/// Ctrl-C: the detach fails (the jump cannot come out, as no thread may be inside the bytes
/// it covers and this one cannot be stopped), and says so. The worker, `work`'s original
/// bytes, and dynprobe's stderr.
fn failed_detach(spin: &str) -> (Worker, Vec<u8>, String) {
    let worker = Worker::start_hot(2);
    let before = worker.code("work");
    let mut session = Session::start(worker.pid, &[HOT_SPEC], &[]);
    session.wait_for("attached to");
    let mut worker = worker;
    assert_ne!(worker.code("work")[..5], before[..5], "work is not patched while attached");
    assert_eq!(worker.ask(spin), "spinning");
    let (code, _, stderr) = session.end_within(Some(libc::SIGINT), Duration::from_secs(120));
    assert_eq!(code, Some(2), "a detach that left probes behind must fail: {stderr}");
    assert!(stderr.contains("could not restore: `p:work x=$arg1` at work+0x0 (0x"), "{stderr}");
    assert!(!stderr.contains("every probed byte is restored"), "{stderr}");
    (worker, before, stderr)
}

/// Checks that the program's next file gets a descriptor no probe handler writes into.
fn assert_next_file_is_the_programs(worker: &mut Worker) {
    let file = scratch().join(format!("reused-{}", std::process::id()));
    let fd = worker.ask(&format!("open {}", file.display()));
    assert!(fd.starts_with("fd "), "{fd}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(worker.ask("again"), "wrote");
    let written = std::fs::read_to_string(&file).unwrap();
    assert_eq!(written, "mine\nmine\n", "the program's file (its {fd}) got more than it wrote");
}

#[test]
fn a_failed_detach_says_what_it_left_and_never_writes_into_a_reused_descriptor() {
    let _cpu = cpu_hungry();
    let (mut worker, _, _) = failed_detach("spin");
    assert_next_file_is_the_programs(&mut worker);
    assert_still_working(&mut worker);
    worker.quit();
}

/// A detach that failed is tried again by the agent: once the thread that blocked the stop
/// signal lets it in, the probe comes out whole, and another session can attach.
#[test]
fn a_failed_detach_is_retried_until_the_probe_comes_out() {
    let _cpu = cpu_hungry();
    // The first removal waits 5 s for the spinning thread to stop; it unblocks at 7 s.
    let (mut worker, before, stderr) = failed_detach("spin 7000");
    assert!(stderr.contains("tries again to remove them"), "{stderr}");
    // Meanwhile the probe's events go nowhere the program owns.
    assert_next_file_is_the_programs(&mut worker);
    let deadline = Instant::now() + Duration::from_secs(60);
    while worker.code("work") != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(worker.code("work"), before, "the agent never removed the probe it had left");
    assert_still_working(&mut worker);
    // The retrying session ends (its thread frees what the session left, then ends): a new
    // one attaches, and detaches cleanly.
    let deadline = Instant::now() + Duration::from_secs(30);
    while thread_names(worker.pid).iter().any(|t| t.starts_with("dynprobe")) {
        assert!(Instant::now() < deadline, "the retrying session never ended: {:?}", thread_names(worker.pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut session = Session::start(worker.pid, &[HOT_SPEC], &[]);
    session.wait_for("attached to");
    let (code, _, stderr) = session.end_within(Some(libc::SIGINT), Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("every probed byte is restored"), "{stderr}");
    assert_restored(&worker, &before);
    worker.quit();
}

#[test]
fn what_the_program_writes_into_the_event_pipe_is_never_status_nor_raw_escapes() {
    let _cpu = cpu_hungry();
    let mut worker = Worker::start_hot(1);
    for options in [&[][..], &["--json"][..]] {
        let mut session = Session::start(worker.pid, &[HOT_SPEC], options);
        session.wait_for("attached to");
        let forged = worker.ask("forge");
        assert!(forged.starts_with("forged ") && forged != "forged 0", "{forged}");
        // A forged `!detached` or `!error` must not have ended the session.
        std::thread::sleep(Duration::from_millis(300));
        assert!(session.child.try_wait().unwrap().is_none(), "a forged line ended the session");
        let (code, stdout, stderr) = session.end(Some(libc::SIGINT));
        assert_eq!(code, Some(0), "{stderr}");
        for (what, text) in [("stdout", &stdout), ("stderr", &stderr)] {
            assert!(!text.contains('\x1b') && !text.contains('\x07'), "a raw control character on {what}");
        }
        assert!(!stderr.contains("forged warning") && !stderr.contains("99 probes"), "{stderr}");
        assert_eq!(stderr.matches("detached from").count(), 1, "{stderr}");
        assert!(stderr.contains("were not events: the program wrote into the agent's pipe"), "{stderr}");
        match options {
            [] => assert!(stdout.contains(r"ev\x1b[31m: x=\x1b]0;t\x07"), "not escaped: {stdout}"),
            _ => {
                for line in stdout.lines() {
                    serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                }
            }
        }
    }
    worker.quit();

    // A program dynprobe starts writes into its agent's pipe too (here with no hot thread:
    // the log argument is no number). Its status lines cannot be told from the agent's, the
    // two being one process, but nothing reaches the terminal raw and JSON stays JSON.
    let (events, own, stderr) = start_under_dynprobe("forged", &[HOT_SPEC], hot_exe(), "forge\nquit\n");
    assert_eq!(own, "ready ".to_string() + own[6..].split('\n').next().unwrap() + "\nforged 1", "{stderr}");
    for text in [&events, &stderr] {
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "a raw control character: {text}");
    }
    for line in events.lines() {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    assert!(stderr.contains("over-long lines"), "{stderr}");
}

/// /proc/PID/stat's state letter.
fn state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(") ").unwrap().1.chars().next().unwrap()
}

#[test]
fn a_stopped_process_is_named_as_such_at_once() {
    let mut worker = Worker::start_hot(1);
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(worker.pid, libc::SIGSTOP) };
    while state(worker.pid) != 'T' {
        std::thread::sleep(Duration::from_millis(5));
    }
    let session = Session::start(worker.pid, &[HOT_SPEC], &[]);
    let (code, _, stderr) = session.end_within(None, Duration::from_secs(10));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is stopped (state T") && stderr.contains("kill -CONT"), "{stderr}");
    // SAFETY: as above.
    unsafe { libc::kill(worker.pid, libc::SIGCONT) };
    assert!(worker.ask("calls").starts_with("calls "));
    worker.quit();
}

#[test]
fn ctrl_c_at_any_moment_of_the_attach_leaves_the_program_whole_and_no_file_behind() {
    let _cpu = cpu_hungry();
    let mut worker = Worker::start_hot(2);
    let before = worker.code("work");
    let tmp = scratch().join(format!("interrupted-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for round in 0..20u64 {
        let env = |command: &mut Command| {
            command.env("TMPDIR", &tmp);
        };
        let session = Session::start_with(worker.pid, &[HOT_SPEC], &["-o", "/dev/null"], env, None);
        // From dynprobe's start, through the injection, to the agent's answer, 4 ms apart.
        std::thread::sleep(Duration::from_millis(4 * round));
        let (code, _, stderr) = session.end_within(Some(libc::SIGINT), Duration::from_secs(60));
        // Ended by the signal, silent, only if it came before dynprobe blocked it, which it
        // does before it touches anything.
        assert!(code == Some(0) || (code.is_none() && stderr.is_empty()), "round {round}: {code:?} {stderr}");
        assert_restored(&worker, &before);
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(left.is_empty(), "round {round} left {left:?}");
        assert!(worker.ask("calls").starts_with("calls "), "round {round}");
    }
    worker.quit();
}

#[test]
fn another_users_process_is_refused_with_that_reason() {
    // SAFETY: getuid cannot fail.
    assert_eq!(unsafe { libc::getuid() }, 0, "this test runs dynprobe as `nobody` against root's process");
    let worker = Worker::start_hot(1);
    let session = Session::start_with(worker.pid, &[HOT_SPEC], &[], as_nobody, None);
    let (code, _, stderr) = session.end_within(None, Duration::from_secs(30));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("another user's process"), "{stderr}");
    assert!(!stderr.contains("/maps"), "{stderr}");
}

/// `targets/sandboxed.c`: a program under a seccomp filter on one system call.
fn sandboxed_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    build(&EXE, "sandboxed.c", "sandboxed", &["-O1", "-g", "-fno-inline", "-no-pie"])
}

/// The spec the sandbox tests place.
const SANDBOXED_SPEC: &str = "p:step x=$arg1:s64";

/// A sandboxed program started as `filter` (`NR:kill`, `NR:eperm`, `NR:enosys`), through `wrap` (a
/// user), and its first round's checksum and `step`'s first bytes.
fn sandboxed(filter: &str, wrap: impl FnOnce(&mut Command)) -> (Worker, (String, Vec<u8>)) {
    let mut command = Command::new(sandboxed_exe());
    command.arg(filter);
    wrap(&mut command);
    let mut worker = Worker::start_by(command, sandboxed_exe(), PathBuf::new());
    let sum = worker.round();
    assert!(sum.starts_with("sum "), "{sum}");
    let code = worker.code("step");
    (worker, (sum, code))
}

/// `command` run as `nobody` (by `setpriv`).
fn as_nobody(command: &mut Command) {
    let program = command.get_program().to_owned();
    let args: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
    *command = Command::new("setpriv");
    command.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(program).args(args);
}

/// The checks after an attach that must have been refused for `why`: dynprobe said so
/// and failed, the program runs on with its result, its code and no agent in it.
fn assert_refused_and_untouched(
    worker: &mut Worker,
    (sum, step): &(String, Vec<u8>),
    code: Option<i32>,
    stderr: &str,
    why: &[&str],
) {
    assert_eq!(code, Some(2), "{stderr}");
    for part in why {
        assert!(stderr.contains(part), "no {part:?} in: {stderr}");
    }
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert_eq!(&worker.round(), sum, "the program's result changed");
    assert_eq!(&worker.code("step"), step, "step's code changed");
    let agent = mappings(worker.pid).into_iter().find(|m| m.contains("libdynprobe_agent"));
    assert_eq!(agent, None, "the agent was loaded all the same");
}

/// A sandbox whose seccomp filter kills the process on a system call the injection or the
/// agent makes — the loader's `mmap` and `openat`, the control channel's `socket`, a
/// probe's `process_vm_readv` — or fails one it cannot do without: the attach is refused
/// before anything is changed, naming the call and what the filter would do, and the
/// program runs on. (Before, the kernel killed the program with SIGSYS mid-injection.)
#[test]
fn a_sandbox_whose_filter_would_kill_the_agent_refuses_the_attach_and_runs_on() {
    for (nr, action, call, verdict) in [
        (libc::SYS_socket, "kill", "socket(2)", "kill the process (SIGSYS)"),
        (libc::SYS_mmap, "kill", "mmap(2)", "kill the process (SIGSYS)"),
        (libc::SYS_openat, "kill", "openat(2)", "kill the process (SIGSYS)"),
        (libc::SYS_process_vm_readv, "kill", "process_vm_readv(2)", "kill the process (SIGSYS)"),
        (libc::SYS_connect, "eperm", "connect(2)", "fail the call with Operation not permitted"),
        // glibc falls back to clone on ENOSYS only: EPERM would fail the agent's threads.
        (libc::SYS_clone3, "eperm", "clone3(2)", "fail the call with Operation not permitted"),
    ] {
        let (mut worker, before) = sandboxed(&format!("{nr}:{action}"), |_| {});
        let session = Session::start(worker.pid, &[SANDBOXED_SPEC], &["--duration", "5"]);
        let (code, _, stderr) = session.end_within(None, Duration::from_secs(30));
        assert_refused_and_untouched(&mut worker, &before, code, &stderr, &["sandboxed by seccomp", call, verdict]);
        worker.quit();
    }
}

/// A filter on calls the agent never makes (`reboot`), or one whose only refusal it has a
/// fallback for (`clone3`'s ENOSYS, as Docker's default profile answers: glibc then uses
/// `clone`), lets the attach go on: the calls are seen and the detach restores the program.
#[test]
fn a_sandbox_whose_filter_allows_the_agent_s_calls_is_probed_as_any_program() {
    for filter in [format!("{}:kill", libc::SYS_reboot), format!("{}:enosys", libc::SYS_clone3)] {
        let (mut worker, (sum, before)) = sandboxed(&filter, |_| {});
        let mut session = Session::start(worker.pid, &[SANDBOXED_SPEC], &["--json"]);
        session.wait_for("1 probe placed");
        assert_eq!(worker.round(), sum);
        let (code, stdout, stderr) = session.end(Some(libc::SIGINT));
        assert_eq!(code, Some(0), "{filter}: {stderr}");
        let hits = stdout.lines().filter(|l| l.contains("\"step\"")).count();
        assert_eq!(hits, 1000, "{filter}: {stdout}");
        assert_eq!(worker.code("step"), before, "{filter}");
        assert_eq!(worker.round(), sum);
        worker.quit();
    }
}

/// Without CAP_SYS_ADMIN the filter cannot be read (PTRACE_SECCOMP_GET_FILTER): a user
/// attaching to their own sandboxed process is refused with that reason rather than have
/// it killed, even by a filter that would have let the agent be.
#[test]
fn a_sandbox_whose_filter_cannot_be_read_is_refused_with_that_reason() {
    // SAFETY: getuid cannot fail.
    assert_eq!(unsafe { libc::getuid() }, 0, "this test runs the program and dynprobe as `nobody`");
    let (mut worker, before) = sandboxed(&format!("{}:kill", libc::SYS_reboot), as_nobody);
    let session = Session::start_with(worker.pid, &[SANDBOXED_SPEC], &["--duration", "5"], as_nobody, None);
    let (code, _, stderr) = session.end_within(None, Duration::from_secs(30));
    assert_refused_and_untouched(&mut worker, &before, code, &stderr, &["sandboxed by seccomp", "CAP_SYS_ADMIN"]);
    worker.quit();
}

/// Fault injection: fifty sessions on one worker, each ended at a pseudo-random moment of
/// its attach, steady state or detach — by `kill -9` of dynprobe or by Ctrl-C (SIGINT), in
/// turn — while the worker runs rounds. After each, the worker's code bytes come back
/// unchanged and its rounds keep the unprobed checksum.
#[test]
fn dynprobe_killed_at_random_moments_leaves_the_program_running_with_its_code() {
    let expected_sum = unprobed_checksum();
    let mut worker = Worker::start("faults");
    let before = (worker.code("mix"), worker.code("label"));
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut endings = BTreeMap::new();
    for round in 0..50 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // 0 to 1.2 s: during the injection, the placing, the optimizing, the steady state.
        let delay = Duration::from_millis(x % 1200);
        let signal = if round % 2 == 0 { libc::SIGKILL } else { libc::SIGINT };
        let session = Session::start(worker.pid, SPECS, &["--duration", "2"]);
        writeln!(worker.stdin, "go").unwrap();
        std::thread::sleep(delay);
        let (code, _, stderr) = session.end(Some(signal));
        *endings.entry(format!("{signal}:{code:?}")).or_insert(0) += 1;
        let mut line = String::new();
        worker.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), expected_sum, "round {round} ({delay:?}, signal {signal}) differs\n{stderr}");
        // Whatever moment it died at, the agent (or nothing, if it was never loaded) puts
        // every byte back.
        let deadline = Instant::now() + Duration::from_secs(10);
        while (worker.code("mix"), worker.code("label")) != before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            (worker.code("mix"), worker.code("label")),
            before,
            "round {round} ({delay:?}, signal {signal}): bytes not restored\n{stderr}"
        );
        assert_eq!(worker.round(), expected_sum, "round {round}: the worker changed after the session");
    }
    eprintln!("endings (signal:exit code → count): {endings:?}");
    worker.quit();
}

/// A `dynprobe probe -p` killed while its agent is still placing the probes (made to take
/// 1.5 s here by a pause before the arming; symbol tables and the decoding of whole modules
/// take seconds on a loaded machine): nothing is patched for the dead CLI — the worker's
/// code, read without a pause from the kill until the agent's threads have ended, never
/// changes — and the worker goes on with the same checksum. An agent that armed its probes
/// regardless kept them patched, for nobody, until its optimizer pass and its removal were
/// done; the random kills of the test above found that window.
#[test]
fn a_cli_killed_while_its_agent_places_the_probes_has_nothing_patched_after_its_death() {
    let expected_sum = unprobed_checksum();
    let pause = [("DYNPROBE_TEST_PAUSE_BEFORE_ARMING_MS", "1500")];
    let mut worker = Worker::start_with_env("killed-placing", worker_exe(), &pause);
    let addrs = [symbol_address(worker_exe(), "mix"), symbol_address(worker_exe(), "label")];
    let mem = std::fs::File::open(format!("/proc/{}/mem", worker.pid)).unwrap();
    let code = || {
        addrs.map(|addr| {
            let mut bytes = [0u8; 8];
            std::os::unix::fs::FileExt::read_exact_at(&mem, &mut bytes, addr).unwrap();
            bytes
        })
    };
    let before = code();
    // Some pipes every process of the test holds (cargo's jobserver): not the event pipe.
    let inherited = pipes(worker.pid);
    let session = Session::start(worker.pid, SPECS, &[]);
    // The agent has the specs once the worker holds a new pipe that dynprobe holds too: the
    // event pipe, whose two ends come with them.
    let cli = session.child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(30);
    while pipes(worker.pid).difference(&inherited).all(|pipe| !pipes(cli).contains(pipe)) {
        assert!(Instant::now() < deadline, "the agent never received the specs");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (_, _, stderr) = session.end(Some(libc::SIGKILL));
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(30);
    // Until the pause is over and the agent's session has ended (its threads are named
    // dynprobe-…).
    while killed.elapsed() < Duration::from_secs(2)
        || thread_names(worker.pid).iter().any(|n| n.starts_with("dynprobe-"))
    {
        assert!(Instant::now() < deadline, "the agent's session did not end");
        for _ in 0..1000 {
            assert_eq!(code(), before, "{:?} after the kill: patched for a dead CLI\n{stderr}", killed.elapsed());
        }
    }
    assert_eq!(worker.round(), expected_sum);
    worker.quit();
}

/// The pipes `pid` holds (`pipe:[inode]` of `/proc/PID/fd`).
fn pipes(pid: i32) -> std::collections::BTreeSet<String> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Default::default() };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .map(|link| link.to_string_lossy().into_owned())
        .filter(|link| link.starts_with("pipe:"))
        .collect()
}

/// Whether a thread of `pid` is traced now (`TracerPid` in `/proc/PID/task/*/status`): the
/// injection holds one while it makes the target call `dlopen` and the agent's entry.
fn traced(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.filter_map(Result::ok).any(|task| {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        status.lines().any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
    })
}

/// `kill -9` of `dynprobe probe -p` while its injection runs a call in the target: sessions
/// until twenty kills landed there, each killed a pseudo-random 0–6 ms after the worker's
/// thread became traced (on this machine the injection holds it 8–12 ms, 100–800 ms after
/// dynprobe starts under load, so the moment is taken from the worker rather than from dynprobe's start). The
/// worker must survive every one — a round with the unprobed checksum, its original code —
/// and no control socket directory may outlive the next session's start-up.
#[test]
fn kill_9_during_the_injection_never_crashes_the_program() {
    let expected_sum = unprobed_checksum();
    let _cpu = cpu_hungry();
    let tmp = scratch().join(format!("kill-injecting-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let env = |command: &mut Command| {
        command.env("TMPDIR", &tmp);
    };
    let mut worker = Worker::start("kill-injecting");
    let before = (worker.code("mix"), worker.code("label"));
    let (mut x, mut crashed, mut while_traced) = (0x9e37_79b9_7f4a_7c15u64, Vec::new(), 0);
    // Until twenty kills have landed while a thread of the worker was held (a loaded
    // machine makes more of them miss the injection), or this tested little.
    let mut rounds = 0;
    while while_traced < 20 {
        assert!(rounds < 150, "only {while_traced} of {rounds} kills landed during the injection");
        let round = rounds;
        rounds += 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay = Duration::from_micros(x % 6_000);
        let mut session = Session::start_with(worker.pid, SPECS, &["-o", "/dev/null"], env, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !traced(worker.pid) && session.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(delay);
        while_traced += traced(worker.pid) as u32;
        let (_, _, stderr) = session.end(Some(libc::SIGKILL));
        // A worker that died makes the write fail (EPIPE) or the read come back empty.
        let mut line = String::new();
        if writeln!(worker.stdin, "go").is_ok() {
            worker.stdout.read_line(&mut line).unwrap();
        }
        if line.is_empty() {
            let status = worker.child.wait().unwrap();
            crashed.push(format!("round {round} ({delay:?}): {status}; dynprobe said {stderr:?}"));
            worker = Worker::start("kill-injecting");
            continue;
        }
        assert_eq!(line.trim(), expected_sum, "round {round} ({delay:?}): the round differs\n{stderr}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while (worker.code("mix"), worker.code("label")) != before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!((worker.code("mix"), worker.code("label")), before, "round {round} ({delay:?}): bytes\n{stderr}");
    }
    assert!(crashed.is_empty(), "{} of {rounds} kills crashed the worker:\n{}", crashed.len(), crashed.join("\n"));
    // A session run to its end sweeps the directories the killed ones left (an empty one
    // once it has stood unchanged for two seconds: a live dynprobe may be filling it).
    std::thread::sleep(Duration::from_millis(2500));
    let (code, _, stderr) = Session::start_with(worker.pid, &["p:mix"], &["--duration", "0.2"], env, None).end(None);
    assert_eq!(code, Some(0), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(worker.round(), expected_sum);
    worker.quit();
}

/// Seconds since the epoch.
fn unix_now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A `SOCK_SEQPACKET` socket listening at `path`, as dynprobe's control socket; `full`:
/// with its backlog filled by connections nobody accepts, as a session busy injecting.
fn seqpacket_listener(path: &Path, full: bool) -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: socket creation, then bind and listen on it with an initialized sockaddr_un;
    // the descriptor is owned right after its creation.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (dst, &src) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *dst = src as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        assert_eq!(libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len), 0);
        assert_eq!(libc::listen(fd, 1), 0);
        let mut fds = vec![owned];
        // Connections until the backlog takes no more (EAGAIN).
        let mut room = full;
        while room {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            fds.push(std::os::fd::OwnedFd::from_raw_fd(fd));
            room = libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) == 0;
            if !room {
                assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EAGAIN));
            }
        }
        fds
    }
}

/// The start-up sweep of control socket directories left by killed runs removes exactly
/// those: ours, real directories, holding only a socket nobody listens on. Everything that
/// merely looks like one stays, and no symbolic link is followed.
#[test]
fn only_stale_control_directories_of_ours_are_swept() {
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::os::unix::net::UnixListener;
    // SAFETY: getuid cannot fail.
    assert_eq!(unsafe { libc::getuid() }, 0, "this test gives a directory to `nobody`");
    let tmp = scratch().join(format!("sweep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    // A directory as a killed dynprobe leaves it: 0700, its socket's listener gone.
    let stale = |name: &str, extra: bool| {
        let dir = tmp.join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        drop(UnixListener::bind(dir.join("control")).unwrap());
        if extra {
            std::fs::write(dir.join("notes"), "mine").unwrap();
        }
        dir
    };
    let swept = stale("dynprobe-Ab12Cd", false);
    let with_more = stale("dynprobe-More01", true);
    let others = stale("dynprobe-Nobody", false);
    std::os::unix::fs::chown(&others, Some(65534), None).unwrap();
    let wrong_name = stale("dynprobe-toolong1", false);
    // A link named like ours, to a directory that looks stale: neither is touched.
    let target = stale("elsewhere", false);
    symlink(&target, tmp.join("dynprobe-Link01")).unwrap();
    // Live ones: a session's listening socket, which accepts, and one busy injecting, whose
    // backlog is full (a blocking connect would wait for it).
    let listening = |name: &str, full: bool| {
        let dir = tmp.join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        (seqpacket_listener(&dir.join("control"), full), dir)
    };
    let (_live_socket, live) = listening("dynprobe-Live01", false);
    let (_busy_socket, busy) = listening("dynprobe-Busy01", true);
    let file = tmp.join("dynprobe-File01");
    std::fs::write(&file, "not a directory").unwrap();
    // Empty, as a dynprobe killed between making the directory and binding its socket
    // leaves it: swept once it has stood for a while, never while a live one may fill it.
    let empty = |name: &str, age_s: i64| {
        let dir = tmp.join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let then = libc::timespec { tv_sec: unix_now_s() - age_s, tv_nsec: 0 };
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path and two valid timespecs.
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [then, then].as_ptr(), 0) }, 0);
        dir
    };
    let old_empty = empty("dynprobe-Empty1", 60);
    let fresh_empty = empty("dynprobe-Empty2", 0);

    let worker = Worker::start_hot(1);
    let session = Session::start_with(
        worker.pid,
        &[HOT_SPEC],
        &["--duration", "0.2", "-o", "/dev/null"],
        |command| {
            command.env("TMPDIR", &tmp);
        },
        None,
    );
    let (code, _, stderr) = session.end_within(None, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!swept.exists(), "the stale directory is still there");
    assert!(!old_empty.exists(), "the stale empty directory is still there");
    for kept in [&with_more, &others, &wrong_name, &target, &live, &busy, &file, &fresh_empty] {
        assert!(kept.exists(), "{} was removed", kept.display());
    }
    assert!(target.join("control").exists(), "the link was followed");
    assert!(tmp.join("dynprobe-Link01").symlink_metadata().unwrap().file_type().is_symlink());
    assert!(live.join("control").exists() && with_more.join("control").exists());
    // Nothing of the session itself is left either.
    let mut left: Vec<String> =
        std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    let expected = [
        "dynprobe-Busy01",
        "dynprobe-Empty2",
        "dynprobe-File01",
        "dynprobe-Link01",
        "dynprobe-Live01",
        "dynprobe-More01",
        "dynprobe-Nobody",
        "dynprobe-toolong1",
        "elsewhere",
    ];
    assert_eq!(left, expected);
    worker.quit();
}
