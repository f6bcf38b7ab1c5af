//! End-to-end tests of `dynprobe probe -p PID`: attaching to a multi-threaded C program that
//! is already running (`targets/worker.c`), checking every event against the program's own
//! log of its calls, detaching (by Ctrl-C, `--duration`, or the controller being killed)
//! and checking that the program goes on with the same checksum and its original bytes.
//!
//! Needs ptrace rights over the test's own children (root, or Yama's ptrace_scope ≤ 1) and
//! the agent built beside `dynprobe` (`cargo build --workspace` first).

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
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

fn plugin_lib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    build(&LIB, "plugin.c", "libplugin.so", &["-O1", "-shared", "-fPIC"])
}

fn dynprobe_exe() -> &'static Path {
    let exe = Path::new(env!("CARGO_BIN_EXE_dynprobe"));
    let agent = exe.with_file_name("libdynprobe_agent.so");
    assert!(agent.is_file(), "{} is missing: run `cargo build --workspace` before these tests", agent.display());
    exe
}

/// A running worker, driven through its stdin and stdout.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    log: PathBuf,
    pid: i32,
    exe: &'static Path,
}

impl Worker {
    fn start(test: &str) -> Worker {
        Worker::start_exe(test, worker_exe())
    }

    fn start_exe(test: &str, exe: &'static Path) -> Worker {
        let log = scratch().join(format!("{test}-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let mut child =
            Command::new(exe).arg(&log).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("start the worker");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let pid = line.trim().strip_prefix("ready ").unwrap_or_else(|| panic!("worker said {line:?}")).parse().unwrap();
        Worker { child, stdin, stdout, log, pid, exe }
    }

    /// Sends a command and returns the worker's answer line.
    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the worker ended instead of answering {command:?}");
        line.trim().to_string()
    }

    /// Runs one round of work: its checksum.
    fn round(&mut self) -> String {
        self.ask("go")
    }

    /// The bytes at the start of `symbol` in the running worker.
    fn code(&self, symbol: &str) -> Vec<u8> {
        let addr = symbol_address(self.exe, symbol);
        let mut bytes = vec![0u8; 8];
        let mem = std::fs::File::open(format!("/proc/{}/mem", self.pid)).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut bytes, addr).unwrap();
        bytes
    }

    /// The calls logged so far, as (kind, tid, fields).
    fn logged(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(|l| l.split(' ').map(str::to_string).collect())
            .collect()
    }

    fn quit(mut self) {
        writeln!(self.stdin, "quit").unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the worker failed: {status}");
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A (non-PIE) worker's symbol address, from `nm`.
fn symbol_address(exe: &Path, symbol: &str) -> u64 {
    let out = Command::new("nm").arg(exe).output().expect("run nm (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.ends_with(&format!(" T {symbol}"))).expect("symbol in nm");
    u64::from_str_radix(line.split(' ').next().unwrap(), 16).unwrap()
}

/// A `dynprobe probe -p` running, its stderr lines arriving on a channel and its stdout
/// read all along (a full pipe would stall dynprobe, and with ptrace probes the program).
struct Session {
    child: Child,
    stdout: std::thread::JoinHandle<String>,
    stderr: Receiver<String>,
    seen: Vec<String>,
}

impl Session {
    fn start(pid: i32, specs: &[&str], options: &[&str]) -> Session {
        let mut child = Command::new(dynprobe_exe())
            .arg("probe")
            .arg("-p")
            .arg(pid.to_string())
            .args(options)
            .args(specs)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run dynprobe");
        let mut stdout = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            stdout.read_to_string(&mut text).unwrap();
            text
        });
        let stderr = child.stderr.take().unwrap();
        let (send, receive) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Session { child, stdout, stderr: receive, seen: Vec::new() }
    }

    /// Waits for a stderr line containing `text` (panics, with all stderr, on timeout or exit).
    fn wait_for(&mut self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("dynprobe never said {text:?}; its stderr:\n{}", self.seen.join("\n"));
    }

    /// Sends `signal`, waits for dynprobe to end; (status code, stdout, whole stderr).
    fn end(mut self, signal: Option<i32>) -> (Option<i32>, String, String) {
        if let Some(signal) = signal {
            // SAFETY: kill sends a signal to our own child.
            unsafe { libc::kill(self.child.id() as i32, signal) };
        }
        let status = self.child.wait().unwrap();
        let stdout = self.stdout.join().unwrap();
        self.seen.extend(self.stderr.iter());
        (status.code(), stdout, self.seen.join("\n"))
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
    let mut worker = Worker::start_exe(&format!("kill-{}", exe.file_name().unwrap().to_string_lossy()), exe);
    let before = worker.code("mix");
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

/// `dynprobe probe --json SPECS -- EXE LOG` with `input` on the worker's stdin: (the
/// JSON events, the worker's own lines, stderr), after checking dynprobe succeeded.
fn start_under_dynprobe(test: &str, specs: &[&str], exe: &Path, input: &str) -> (String, String, String) {
    let log = scratch().join(format!("{test}-{}.log", std::process::id()));
    let mut child = Command::new(dynprobe_exe())
        .args(["probe", "--json"])
        .args(specs)
        .arg("--")
        .arg(exe)
        .arg(&log)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dynprobe");
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

/// Twenty sessions on a program whose threads sit in nanosleep, clock_nanosleep, poll,
/// ppoll, select, epoll_wait, sigtimedwait, a timed futex wait, read and accept, checking
/// each call's result: attaching, placing and optimizing the probe, and detaching never make
/// one of them return early (EINTR), and each session sees the probed calls.
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
        let probe = Session::start(pid, &["p:work n=$arg1:s64"], &["--duration", "150ms"]);
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
    assert!(
        report.contains(" eintr 0 "),
        "blocking calls returned early:\n{report}\ndynprobe said:\n{}",
        warnings.join("\n")
    );
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
