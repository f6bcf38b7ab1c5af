//! End-to-end tests of `dynprobe record -p PID`: a server-like program whose four threads
//! serve requests (`targets/server.cpp`) is attached to mid-run, recorded and detached; it
//! must compute exactly what an untraced run computes, one thread's recorded calls must be
//! exactly the calls it logged in that window, and the process must be left as it was —
//! with recursion and C++ exceptions in flight whenever dynprobe attaches or detaches.
//!
//! Needs ptrace rights over the test's own children (root, or Yama's ptrace_scope ≤ 1) and
//! the agent built beside `dynprobe` (`cargo build --workspace` first).

mod common;

use common::attached::{mappings, thread_names, Session, Worker};
use dynprobe_events::ending::{self, Process};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `targets/server.cpp`, built once (not PIE: `Worker::code` reads its bytes by `nm`'s
/// addresses).
fn server_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        common::build_with("g++", "server.cpp", "record-attach-server", &os(&["-O1", "-g", "-fno-inline", "-no-pie"]))
    })
}

/// Compiler flags as `build_with` takes them.
fn os(flags: &[&'static str]) -> Vec<&'static OsStr> {
    flags.iter().copied().map(OsStr::new).collect()
}

/// The server, its log written to `<test>.log` in the scratch directory; `throw` makes its
/// innermost `srv_depth` of every other request throw through the recursion.
fn start_server(test: &str, throw: bool) -> Worker {
    start_server_exe(test, server_exe(), throw)
}

fn start_server_exe(test: &str, exe: &'static Path, throw: bool) -> Worker {
    let env: &[(&str, &str)] = if throw { &[("SERVER_THROW", "1")] } else { &[] };
    start_server_with(test, exe, env)
}

/// The server with this environment (`SERVER_THROW`, `SERVER_BACKTRACE`: see server.cpp).
fn start_server_with(test: &str, exe: &'static Path, env: &[(&str, &str)]) -> Worker {
    let log = common::scratch().join(format!("{test}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    Worker::start_with(exe, &log.clone().into_os_string(), log, env)
}

/// The server, statically linked: the agent cannot be loaded into it.
fn static_server_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        common::build_with(
            "g++",
            "server.cpp",
            "record-attach-server-static",
            &os(&["-O1", "-g", "-fno-inline", "-static"]),
        )
    })
}

/// A trace directory of this test binary's, empty.
fn trace_dir(name: &str) -> PathBuf {
    let dir = common::scratch().join(format!("{name}-{}.trace", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(dir.with_extension("trace.old"));
    dir
}

/// `dynprobe record -p PID OPTIONS -o DIR`, running.
fn record(pid: i32, dir: &Path, options: &[&str]) -> Session {
    record_with_env(pid, dir, options, &[])
}

/// [`record`] with these variables in dynprobe's environment.
fn record_with_env(pid: i32, dir: &Path, options: &[&str], env: &[(&str, &str)]) -> Session {
    let mut command = common::dynprobe();
    command.args(["record", "-p", &pid.to_string(), "-o"]).arg(dir).args(options);
    command.envs(env.iter().copied());
    Session::spawn(command, None)
}

/// Records `pid` for `duration` with `-F 'srv_*'`; dynprobe's whole stderr, after checking
/// that it attached, detached and exited 0.
fn record_for(pid: i32, dir: &Path, duration: &str) -> String {
    record_for_with(pid, dir, &["-F", "srv_*", "--duration", duration])
}

/// [`record_for`] with these options.
fn record_for_with(pid: i32, dir: &Path, options: &[&str]) -> String {
    let session = record(pid, dir, options);
    let (status, _, stderr) = session.end(None);
    assert_eq!(status, Some(0), "record -p failed:\n{stderr}");
    assert!(stderr.contains(&format!("attached to {pid} (")), "{stderr}");
    assert!(stderr.contains(&format!("detached from {pid} (")), "{stderr}");
    stderr
}

/// `stop`s the server's `go`: its checksum line, and the requests each thread served.
fn stop(server: &mut Worker) -> (String, String) {
    let line = server.ask("stop");
    let counts = line.split_once(' ').and_then(|(_, rest)| rest.split_once(' ')).expect("checksum line").1;
    (line.clone(), counts.to_string())
}

/// What an untraced server computes for those request counts (`run N1 N2 N3 N4`).
fn untraced(test: &str, counts: &str, throw: bool) -> String {
    let mut server = start_server(&format!("{test}-untraced"), throw);
    let line = server.ask(&format!("run {counts}"));
    server.quit();
    line
}

/// `dynprobe SUBCOMMAND ARGS…`, which must succeed: its stdout.
fn dynprobe_ok(args: &[&OsStr]) -> String {
    let out = common::dynprobe().args(args).output().unwrap();
    common::stdout_of(&out)
}

/// Calls as (name, depth), in order.
type Calls = Vec<(String, usize)>;

/// The calls whose entry `replay --tid TID` shows: those marked as entered before the
/// attach, and the others.
fn recorded_entries(dir: &Path, tid: &str) -> (Calls, Calls) {
    let replay = dynprobe_ok(&["replay".as_ref(), dir.as_os_str(), "--tid".as_ref(), tid.as_ref()]);
    thread_entries(&replay, tid)
}

/// [`recorded_entries`] of thread `tid`, from a whole trace's `replay`.
fn thread_entries(replay: &str, tid: &str) -> (Calls, Calls) {
    let (before, after): (Vec<_>, Vec<_>) = replay
        .lines()
        .filter_map(|line| line.split_once("] | "))
        .filter_map(|(head, call)| (head.rsplit_once('[')?.1.trim() == tid).then_some(call))
        .filter_map(|call| {
            let name = call.trim_start();
            let depth = (call.len() - name.len()) / 2;
            let before = call.contains("/* entered before attach");
            let name = name.split_once("()")?.0;
            (!name.starts_with('}')).then(|| (before, (name.to_string(), depth)))
        })
        .partition(|(before, _)| *before);
    let strip = |calls: Vec<(bool, (String, usize))>| calls.into_iter().map(|(_, call)| call).collect();
    (strip(before), strip(after))
}

/// The server's log of thread 1's calls: its tid and the calls as (name, depth).
fn logged_entries(server: &Worker) -> (String, Vec<(String, usize)>) {
    let lines = server.logged();
    let tid = lines.first().expect("thread 1 logged its calls")[0].clone();
    (tid, lines.iter().map(|l| (l[2].clone(), l[1].parse().unwrap())).collect())
}

#[test]
fn a_server_recorded_mid_run_computes_the_same_and_one_thread_s_calls_match_its_log() {
    let mut server = start_server("match", false);
    let before = server.code("srv_handle");
    writeln_go(&mut server);
    std::thread::sleep(Duration::from_millis(200));
    // A thread stopped inside dynprobe's own hook code at the attach (no call-frame
    // information there) has its walk end at once, and none of its calls in flight shown:
    // sessions go on until one found thread 1's, as the in-flight test's do.
    let mut sessions = 0;
    let dir = loop {
        let dir = trace_dir(&format!("match-{sessions}"));
        sessions += 1;
        let stderr = record_for(server.pid, &dir, "1");
        assert!(stderr.contains("(0 lost)"), "{stderr}");
        assert_eq!(server.code("srv_handle"), before, "srv_handle's bytes are restored");
        // Thread 1's id, from the log's first line (the server is still writing its last).
        let tid = server.logged().first().expect("thread 1 logged its calls")[0].clone();
        if !recorded_entries(&dir, &tid).0.is_empty() || sessions == 4 {
            break dir;
        }
    };
    let (line, counts) = stop(&mut server);
    assert_eq!(line, untraced("match", &counts, false), "the same result as an untraced run");

    // Thread 1's recorded calls are exactly a run of its logged calls, none missing, none
    // added: the calls it made between the attach and the detach, and before them the
    // calls it was inside at the attach, found on its stack.
    let window = assert_calls_match_the_log(&server, &dir);
    assert!(window > 0, "the calls before the attach are not in the trace");

    // The trace reads as one of a started program does.
    let report = dynprobe_ok(&["report".as_ref(), dir.as_os_str()]);
    for name in ["srv_handle", "srv_parse", "srv_field", "srv_depth", "srv_reply"] {
        assert!(report.contains(name), "{name} in the report:\n{report}");
    }
    let chrome = dir.with_extension("json");
    dynprobe_ok(&["export".as_ref(), "--chrome".as_ref(), chrome.as_os_str(), dir.as_os_str()]);
    assert_sane_chrome(&chrome);
    server.quit();
}

#[test]
fn recursion_and_exceptions_in_flight_at_the_attach_are_shown_entered_before_it_and_match_the_log() {
    // Every innermost srv_depth also checks a backtrace of its callers: through the calls
    // in flight at an attach (srv_serve's stays diverted from the first session on).
    let mut server = start_server_with("inflight", server_exe(), &[("SERVER_THROW", "1"), ("SERVER_BACKTRACE", "1")]);
    writeln_go(&mut server);
    std::thread::sleep(Duration::from_millis(200));
    // At each attach every thread is inside srv_serve, srv_handle and a srv_depth recursion
    // 1 to 6 deep, whose innermost call throws for every other request: sessions go on
    // until a call in flight at the attach was unwound by an exception (1 in 16 sessions
    // has none). Between sessions the calls the last one diverted are still in flight.
    let (mut dirs, mut unwound, mut deepest) = (Vec::new(), 0, 0);
    while unwound == 0 && dirs.len() < 8 {
        let dir = trace_dir(&format!("inflight-{}", dirs.len()));
        record_for(server.pid, &dir, "0.3");
        let replay = dynprobe_ok(&["replay".as_ref(), dir.as_os_str()]);
        assert_eq!(exit_without_entry(&replay), None, "every exit has its entry:\n{replay}");
        unwound += replay.matches("/* entered before attach, unwound */").count();
        let recursion = replay.lines().filter(|l| l.contains("srv_depth() { /* entered before attach */")).count();
        deepest = deepest.max(recursion);
        let chrome = dir.with_extension("json");
        dynprobe_ok(&["export".as_ref(), "--chrome".as_ref(), chrome.as_os_str(), dir.as_os_str()]);
        assert_sane_chrome(&chrome);
        let json = std::fs::read_to_string(&chrome).unwrap();
        assert!(json.contains("before the attach"), "the Chrome export marks the calls entered before it");
        dirs.push(dir);
    }
    assert!(unwound > 0, "an exception went through calls in flight at the attach in {} sessions", dirs.len());
    assert!(deepest > 0, "a recursion was in flight at an attach");
    let report = dynprobe_ok(&["report".as_ref(), dirs[0].as_os_str()]);
    assert!(report.contains("were entered before the attach"), "{report}");
    let (line, counts) = stop(&mut server);
    assert_eq!(line, untraced("inflight", &counts, true), "the same result as an untraced run");
    let backtraces = server.ask("backtraces");
    let fields: Vec<u64> = backtraces.split(' ').skip(1).filter_map(|n| n.parse().ok()).collect();
    assert!(fields.len() == 2 && fields[0] > 1000 && fields[1] == 0, "backtraces taken, wrong: {backtraces}");
    // The first session's calls in flight were not diverted before (later ones may find
    // srv_serve diverted still, from the session before: it is then not shown again).
    assert!(assert_calls_match_the_log(&server, &dirs[0]) > 0);
    server.quit();
}

/// An exception on its way at the attach: the C++ runtime has found the function that
/// catches it and is running a cleanup below it (blocked there) when dynprobe adopts the
/// calls in flight, which puts a sled frame under the catching function that the runtime's
/// search did not see. The exception must still be caught there (before the fix: libgcc
/// aborted the program in `_Unwind_Resume`).
/// `targets/unwinding.cpp`, built once.
fn unwinding_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        common::build_with(
            "g++",
            "unwinding.cpp",
            "record-attach-unwinding",
            &os(&["-O1", "-g", "-fno-inline", "-no-pie"]),
        )
    })
}

#[test]
fn an_exception_on_its_way_at_the_attach_is_caught_by_the_function_it_was_going_to() {
    let mut program = assert_caught_although_adopted_on_its_way(unwinding_exe(), "ex_*", "");
    // ex_catch's handler was found with _Unwind_Resume called from the return sled's resume
    // stub (ex_middle's diverted return): a backtrace taken then (in the program's
    // interposed personality routine) shows no frame of dynprobe's code.
    let frames = program.ask("frames");
    let counts: Vec<usize> = frames.split(' ').filter_map(|w| w.parse().ok()).collect();
    assert!(matches!(counts[..], [n, 0] if n > 3), "the handler frame's backtrace: {frames}");
    program.quit();
}

/// [`an_exception_on_its_way_at_the_attach_is_caught_by_the_function_it_was_going_to`] for
/// a Rust panic caught by `catch_unwind`: the same frames, another language's personality
/// routine (before the fix, one that re-reads the catching frame's own tables, as C++'s
/// does not: the program aborted).
#[test]
fn a_panic_on_its_way_at_the_attach_is_caught_by_the_function_it_was_going_to() {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    let exe = EXE.get_or_init(|| common::build_rust("unwinding_rs.rs", "record-attach-unwinding-rs"));
    assert_caught_although_adopted_on_its_way(exe, "unwinding_rs::*", "unwinding_rs::").quit();
}

/// Runs `targets/unwinding.cpp`'s protocol on `exe`: its thread stopped in a cleanup on the
/// way to `ex_catch`, `record -p -F FILTER` attached, the thread let go; the exception must
/// be caught where it was going, and the replay show `ex_catch` (named `PREFIX`ex_catch)
/// and `ex_middle` entered before the attach, `ex_middle` unwound. Returns the program, still
/// running.
fn assert_caught_although_adopted_on_its_way(exe: &'static Path, filter: &str, prefix: &str) -> Worker {
    let name = exe.file_name().unwrap().to_string_lossy();
    let log = common::scratch().join(format!("{name}-{}.log", std::process::id()));
    let mut program = Worker::start_with(exe, log.as_os_str(), log.clone(), &[]);
    assert_eq!(program.ask("throw"), "unwinding", "the thread stopped in the cleanup");
    let dir = trace_dir(&name);
    let mut session = record(program.pid, &dir, &["-F", filter]);
    session.wait_for("attached to");
    assert_eq!(program.ask("resume"), "caught 42", "the exception reached ex_catch's handler");
    let (status, _, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(status, Some(0), "record -p failed:\n{stderr}");
    let replay = dynprobe_ok(&["replay".as_ref(), dir.as_os_str()]);
    assert!(replay.contains(&format!("{prefix}ex_catch() {{ /* entered before attach */")), "{replay}");
    assert!(replay.contains(&format!("{prefix}ex_middle(); /* entered before attach, unwound */")), "{replay}");
    assert_eq!(exit_without_entry(&replay), None, "every exit has its entry:\n{replay}");
    program
}

/// A thread held inside `_Unwind_Resume` called from the return sled's resume stub (the
/// first session diverted ex_middle's return while the exception was on its way, and the
/// program holds its personality routine for ex_catch) at the next attach: the in-flight
/// walk steps through the stub into ex_catch, the function the exception is going to, and
/// adopts it (before: the walk ended at the stub, which is in no module, and ex_catch's
/// return went unrecorded).
#[test]
fn a_call_below_the_resume_stub_at_the_attach_is_adopted() {
    let exe = unwinding_exe();
    let log = common::scratch().join(format!("unwinding-held-{}.log", std::process::id()));
    let mut program = Worker::start_with(exe, log.as_os_str(), log.clone(), &[]);
    assert_eq!(program.ask("throw"), "unwinding", "the thread stopped in the cleanup");
    assert_eq!(program.ask("hold"), "holding");
    let mut first = record(program.pid, &trace_dir("unwinding-held-first"), &["-F", "ex_middle"]);
    first.wait_for("attached to");
    assert_eq!(program.ask("resume"), "handling", "ex_catch's handler found from the resume stub");
    let (status, _, stderr) = first.end(Some(libc::SIGINT));
    assert_eq!(status, Some(0), "the first record -p failed:\n{stderr}");
    let dir = trace_dir("unwinding-held-second");
    let mut second = record(program.pid, &dir, &["-F", "ex_*"]);
    second.wait_for("attached to");
    assert_eq!(program.ask("release"), "caught 42", "the exception reached ex_catch's handler");
    let (status, _, stderr) = second.end(Some(libc::SIGINT));
    assert_eq!(status, Some(0), "the second record -p failed:\n{stderr}");
    let replay = dynprobe_ok(&["replay".as_ref(), dir.as_os_str()]);
    assert!(replay.contains("ex_catch(); /* entered before attach */"), "{replay}\n{stderr}");
    assert_eq!(exit_without_entry(&replay), None, "every exit has its entry:\n{replay}");
    program.quit();
}

/// Starts the server's `go` (it answers only at `stop`).
fn writeln_go(server: &mut Worker) {
    use std::io::Write;
    writeln!(server.stdin, "go").unwrap();
}

/// Checks that thread 1's calls in the trace `dir` are exactly a run of the calls it
/// logged: those recorded as entered before the attach are the calls it was inside then,
/// outermost first at depths from 0, and the others follow them in the log with the
/// depths it logged. Returns where the run starts in the log; panics with the
/// difference otherwise.
fn assert_calls_match_the_log(server: &Worker, dir: &Path) -> usize {
    let (tid, logged) = logged_entries(server);
    let (before, recorded) = recorded_entries(dir, &tid);
    assert!(recorded.len() > 100, "only {} calls of thread {tid} were recorded", recorded.len());
    assert!(!before.is_empty(), "thread {tid} was inside srv_serve at the attach: {:?}", &recorded[..5]);
    find_window(&logged, &before, &recorded).unwrap_or_else(|| {
        panic!(
            "thread {tid}'s {} recorded calls, after {before:?} entered before the attach, are no run of its {} \
             logged calls",
            recorded.len(),
            logged.len()
        )
    })
}

/// Where `recorded` lies in `logged`: the index of a run of logged calls of the same names
/// and depths, just after calls whose chain of callers (the latest logged call of each
/// depth) starts with `before` — the calls in flight at the attach, which include every
/// caller of the first recorded call.
fn find_window(logged: &[(String, usize)], before: &[(String, usize)], recorded: &[(String, usize)]) -> Option<usize> {
    (1..=logged.len().checked_sub(recorded.len())?).find(|&start| {
        logged[start..start + recorded.len()] == *recorded && {
            let innermost = logged[start - 1].1;
            let chain: Vec<&(String, usize)> =
                (0..=innermost).filter_map(|depth| logged[..start].iter().rev().find(|(_, d)| *d == depth)).collect();
            let callers = recorded[0].1;
            before.len() >= callers
                && before.len() <= chain.len()
                && before.iter().zip(&chain).all(|(call, logged)| call == *logged)
        }
    })
}

/// Every complete event of a Chrome trace has a duration that is not negative, and the
/// calls are there.
fn assert_sane_chrome(path: &Path) {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let events = json.get("traceEvents").and_then(|e| e.as_array()).or_else(|| json.as_array()).expect("events");
    let calls: Vec<_> = events.iter().filter(|e| e["ph"] == "X").collect();
    assert!(!calls.is_empty(), "no calls in {}", path.display());
    for call in calls {
        assert!(call["dur"].as_f64().is_some_and(|d| d >= 0.0), "{call}");
    }
}

#[test]
fn exceptions_and_recursion_in_flight_at_attach_and_detach_over_twenty_sessions() {
    let mut server = start_server("sessions", true);
    let mut names_before = thread_names(server.pid);
    names_before.sort();
    writeln_go(&mut server);
    let mut unwound = 0;
    for round in 0..20 {
        let dir = trace_dir(&format!("sessions-{round}"));
        let stderr = record_for(server.pid, &dir, "0.2");
        assert!(!stderr.contains("already has a dynprobe session"), "session {round}:\n{stderr}");
        let replay = dynprobe_ok(&["replay".as_ref(), dir.as_os_str()]);
        unwound += replay.matches("unwound").count();
        assert_eq!(exit_without_entry(&replay), None, "session {round}:\n{stderr}");
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(unwound > 0, "exceptions thrown through recorded calls show them unwound");
    let (line, counts) = stop(&mut server);
    assert_eq!(line, untraced("sessions", &counts, true), "the same result as an untraced run");
    // The threads are back in their wait, out of every call a session diverted: a session
    // now leaves nothing, and the agent library goes.
    let dir = trace_dir("sessions-idle");
    let stderr = record_for(server.pid, &dir, "0.1");
    assert!(!stderr.contains("stays loaded"), "{stderr}");
    wait_until(|| !mappings(server.pid).iter().any(|m| m.contains("libdynprobe_agent")), "the agent unloaded");
    let mut names = thread_names(server.pid);
    names.sort();
    assert_eq!(names, names_before, "no thread of dynprobe's is left");
    server.quit();
}

/// The first line of `replay` output that closes a call whose entry is not in the trace
/// (no duration, a closing brace).
fn exit_without_entry(replay: &str) -> Option<&str> {
    replay.lines().find(|line| {
        let call = line.split_once("] | ").map(|(_, call)| call.trim_start());
        line.trim_start().starts_with('[') && call.is_some_and(|c| c.starts_with('}'))
    })
}

#[test]
fn a_call_entered_in_one_session_and_ended_in_the_next_ends_in_neither_trace() {
    let mut server = start_server("two", false);
    let (first, second) = (trace_dir("two-first"), trace_dir("two-second"));
    let mut session = record(server.pid, &first, &["-F", "srv_*"]);
    session.wait_for("attached to");
    // Every thread enters srv_serve while recording, and is still in it at the detach:
    // its return address stays diverted, the agent stays loaded for it.
    writeln_go(&mut server);
    std::thread::sleep(Duration::from_millis(300));
    let (status, _, stderr) = session.end(Some(libc::SIGINT));
    assert!(status == Some(0) && stderr.contains("stays loaded"), "{stderr}");
    let mut session = record(server.pid, &second, &["-F", "srv_*"]);
    session.wait_for("attached to");
    // Those srv_serve calls return now, through the trampoline, while the second session
    // records: they are the first session's calls, whose exit this trace must not show.
    let (line, counts) = stop(&mut server);
    std::thread::sleep(Duration::from_millis(100));
    let (status, _, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(status, Some(0), "{stderr}");
    let replay = dynprobe_ok(&["replay".as_ref(), first.as_os_str()]);
    assert_eq!(replay.matches("| srv_serve() {").count(), 4, "the first trace has their entries");
    let replay = dynprobe_ok(&["replay".as_ref(), second.as_os_str()]);
    assert_eq!(exit_without_entry(&replay), None, "the second trace has no exit of theirs:\n{replay}");
    assert!(!replay.contains("srv_serve"), "{replay}");
    assert_eq!(line, untraced("two", &counts, false), "the same result as an untraced run");
    server.quit();
}

#[test]
fn killing_the_controller_leaves_the_server_running_with_its_code_restored() {
    let mut server = start_server("kill", true);
    let before = server.code("srv_depth");
    writeln_go(&mut server);
    let dir = trace_dir("kill");
    let mut session = record(server.pid, &dir, &["-F", "srv_*"]);
    session.wait_for("attached to");
    assert_ne!(server.code("srv_depth"), before, "srv_depth is patched while recording");
    session.end(Some(libc::SIGKILL));
    wait_until(|| server.code("srv_depth") == before, "srv_depth's bytes restored");
    let (line, counts) = stop(&mut server);
    assert_eq!(line, untraced("kill", &counts, true), "the same result as an untraced run");
    server.quit();
}

#[test]
fn processes_that_cannot_be_recorded_are_refused_with_the_reason() {
    let dir = trace_dir("refused");
    let refused = |pid: i32, options: &[&str]| {
        let (status, _, stderr) = record(pid, &dir, options).end(None);
        assert_eq!(status, Some(2), "{stderr}");
        assert!(!dir.join("info.json").exists(), "no trace is left behind");
        stderr
    };
    assert!(refused(i32::MAX, &[]).contains("no process with pid"));

    // A static program cannot load the agent: what can be done instead is named.
    let mut static_server = start_server_exe("refused-static", static_server_exe(), false);
    let stderr = refused(static_server.pid, &[]);
    assert!(stderr.contains("cannot load libraries") && stderr.contains("--ptrace"), "{stderr}");
    assert_eq!(static_server.ask("run 3 3 3 3").split(' ').count(), 6, "it runs on");

    // A stopped process, and one that already has a session.
    let mut server = start_server("refused", false);
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(server.pid, libc::SIGSTOP) };
    wait_until(|| process_state(server.pid) == 'T', "the server stopped");
    assert!(refused(server.pid, &[]).contains("is stopped"));
    // SAFETY: as above.
    unsafe { libc::kill(server.pid, libc::SIGCONT) };
    let other = trace_dir("refused-first");
    let mut first = record(server.pid, &other, &["-F", "srv_*"]);
    first.wait_for("attached to");
    assert!(refused(server.pid, &[]).contains("already has a dynprobe session"));
    let (status, _, stderr) = first.end(Some(libc::SIGINT));
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(server.ask("run 5 5 5 5"), untraced("refused", "5 5 5 5", false));
    server.quit();
}

/// `targets/worker.c` (threads created and ended every round, a `dlopen` or a `fork` on
/// request; not PIE: `Worker::code` reads its bytes by `nm`'s addresses) and
/// `targets/plugin.c`, built once.
fn worker_and_plugin() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        // -g: `record -a` reads mix's parameters from its DWARF.
        let worker =
            common::build_c("worker.c", "record-attach-worker", &os(&["-O1", "-g", "-fno-inline", "-no-pie", "-ldl"]));
        let plugin = common::build_c("plugin.c", "libplugin-record-attach.so", &os(&["-shared", "-fPIC"]));
        (worker, plugin)
    })
}

/// `targets/worker.c`, its log written to `<test>-<pid>.log` in the scratch directory.
fn start_worker(test: &str) -> Worker {
    start_worker_with(test, &[])
}

/// [`start_worker`] with these variables in the worker's environment.
fn start_worker_with(test: &str, env: &[(&str, &str)]) -> Worker {
    let (worker_exe, _) = worker_and_plugin();
    let log = common::scratch().join(format!("{test}-{}.log", std::process::id()));
    Worker::start_with(worker_exe, log.as_os_str(), log.clone(), env)
}

/// Whether process `pid` runs the worker exec'd with this role (`child`, `image`: see
/// worker.c), its second argument.
fn runs_as(pid: i32, role: &str) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cmdline.split(|&b| b == 0).nth(2) == Some(role.as_bytes())
}

#[test]
fn threads_created_and_a_library_loaded_during_the_session_are_recorded() {
    let (_, plugin) = worker_and_plugin();
    let mut worker = start_worker("threads");
    let untraced = worker.round();
    let dir = trace_dir("threads");
    let mut session = record(worker.pid, &dir, &["-F", "mix", "-F", "libplugin-record-attach:*"]);
    session.wait_for("attached to");
    // Four threads are created, make their calls and end, all while recording; the
    // library comes with a dlopen during the session, its functions traced from then on.
    assert_eq!(worker.round(), untraced, "the same checksum while recorded");
    assert_eq!(worker.ask(&format!("load {}", plugin.display())), "plugin 77");
    let (status, _, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(status, Some(0), "{stderr}");
    assert!(stderr.contains("from 4 threads") || stderr.contains("from 5 threads"), "{stderr}");
    let report = dynprobe_ok(&["report".as_ref(), dir.as_os_str()]);
    let calls = |name: &str| -> u64 {
        let line = report.lines().find(|l| l.ends_with(&format!(" {name}"))).unwrap_or_else(|| panic!("{report}"));
        line.split_whitespace().nth_back(1).unwrap().parse().unwrap()
    };
    // worker.c: 4 threads × 300 rounds of mix; plugin_work(7) calls plugin_leaf twice.
    assert_eq!((calls("mix"), calls("plugin_work"), calls("plugin_leaf")), (1200, 1, 2), "{report}");
    assert_eq!(worker.round(), untraced, "and after");
    worker.quit();
}

/// What [`record_a_child`] saw.
struct ChildRun {
    worker: Worker,
    /// The first bytes of mix, untraced.
    untraced: Vec<u8>,
    child: i32,
    /// dynprobe's stderr.
    stderr: String,
    /// The child's part of the replay, from its pid's header on.
    section: String,
}

/// Records the worker with `options` (which trace mix) while it runs `command` (`fork`,
/// `forkexec`), whose child calls mix every 10 ms until the worker exits; `during` runs
/// before the session ends. Checks that dynprobe ended within a minute of its Ctrl-C,
/// exited 0, and that the child's calls were recorded.
fn record_a_child(test: &str, command: &str, options: &[&str], during: impl FnOnce(&Worker, i32, &[u8])) -> ChildRun {
    let mut worker = start_worker(test);
    let untraced = worker.code("mix");
    let dir = trace_dir(test);
    let mut session = record(worker.pid, &dir, options);
    session.wait_for("attached to");
    let forked = worker.ask(command);
    let child: i32 = forked.strip_prefix("forked ").and_then(|p| p.parse().ok()).expect("forked <pid>");
    std::thread::sleep(Duration::from_millis(300));
    during(&worker, child, &untraced);
    let (status, _, stderr) = session.end_within(Some(libc::SIGINT), Duration::from_secs(60));
    assert_eq!(status, Some(0), "{stderr}");
    let section = child_section(&dir, child);
    ChildRun { worker, untraced, child, stderr, section }
}

/// The part of the trace `dir`'s replay from process `child`'s header on, after checking
/// that it shows at least ten calls of mix.
fn child_section(dir: &Path, child: i32) -> String {
    let replay = dynprobe_ok(&["replay".as_ref(), dir.as_os_str()]);
    let section = replay.split_once(&format!("# pid {child} (")).map(|(_, rest)| rest).unwrap_or_default();
    assert!(section.matches("| mix();").count() >= 10, "the child's calls were recorded:\n{replay}");
    section.to_string()
}

/// Waits until process `pid` (a child of a worker that quit) has ended.
fn wait_for_the_end_of(pid: i32) {
    wait_until(|| process_state(pid) == 'Z' || !Path::new(&format!("/proc/{pid}")).exists(), "the child ended");
}

impl ChildRun {
    /// Ends the worker, and with it the child.
    fn quit(self) {
        let child = self.child;
        self.worker.quit();
        wait_for_the_end_of(child);
    }
}

#[test]
fn a_child_forked_during_the_session_is_recorded_and_left_without_patched_code() {
    // The child is recorded meanwhile as a started program's child is.
    let run = record_a_child("fork", "fork", &["-F", "mix"], |worker, child, untraced| {
        assert_ne!(worker.code_in(child, "mix")[..5], untraced[..5], "the child inherited the patched mix");
    });
    let (child, untraced, stderr) = (run.child, &run.untraced, &run.stderr);
    assert!(stderr.contains(&format!("process {child} (forked during the session): its code restored")), "{stderr}");
    assert_eq!(run.worker.code_in(child, "mix"), *untraced, "the child's mix has its bytes back");
    assert_eq!(run.worker.code("mix"), *untraced, "and the worker's");
    let parent = run.worker.pid;
    assert!(run.section.starts_with(&format!("record-attach-worker), forked from {parent}\n")), "{}", run.section);
    // The child runs on, its calls untraced, and ends with the worker.
    std::thread::sleep(Duration::from_millis(100));
    assert!(Path::new(&format!("/proc/{child}")).exists(), "the child runs on");
    run.quit();
}

/// A double fork's orphan — its parent ended at once, init adopted it — is no descendant of
/// the traced process, and is found and restored all the same (by the ring file it
/// inherited).
#[test]
fn an_orphan_a_double_fork_left_during_the_session_is_left_without_patched_code() {
    let run = record_a_child("orphan", "orphan", &["-F", "mix"], |worker, orphan, untraced| {
        assert_ne!(worker.code_in(orphan, "mix")[..5], untraced[..5], "the orphan inherited the patched mix");
        let stat = std::fs::read_to_string(format!("/proc/{orphan}/stat")).unwrap();
        let parent: i32 = stat.rsplit_once(") ").unwrap().1.split(' ').nth(1).unwrap().parse().unwrap();
        assert_ne!(parent, worker.pid, "an orphan");
    });
    let (orphan, untraced, stderr) = (run.child, &run.untraced, &run.stderr);
    assert!(stderr.contains(&format!("process {orphan} (forked during the session): its code restored")), "{stderr}");
    assert_eq!(run.worker.code_in(orphan, "mix"), *untraced, "the orphan's mix has its bytes back");
    assert_eq!(run.worker.code("mix"), *untraced, "and the worker's");
    run.quit();
}

/// A daemon that drops its privileges and then forks a worker (as root, to `nobody`): the
/// worker cannot make its trace files in the session's directory, so it is not traced. It
/// says nothing on the program's standard error (which is the program's: a log, a client's
/// socket), dynprobe says why at the end, and the worker gets its code back from its files.
/// (Before, the program's stderr got "the forked child is not traced", and the worker kept
/// dynprobe's patched code for its life.)
#[test]
fn a_child_forked_after_the_program_dropped_its_privileges_is_named_and_left_without_patched_code() {
    // SAFETY: getuid cannot fail.
    assert_eq!(unsafe { libc::getuid() }, 0, "this test's worker drops root's privileges to nobody's");
    let mut worker = start_worker("drop");
    let untraced = worker.code("mix");
    let dir = trace_dir("drop");
    let mut session = record(worker.pid, &dir, &["-F", "mix"]);
    session.wait_for("attached to");
    assert_eq!(worker.ask("drop"), "dropped");
    let forked = worker.ask("fork");
    let child: i32 = forked.strip_prefix("forked ").and_then(|p| p.parse().ok()).expect("forked <pid>");
    std::thread::sleep(Duration::from_millis(300));
    assert_ne!(worker.code_in(child, "mix")[..5], untraced[..5], "the child inherited the patched mix");
    let (status, _, stderr) = session.end_within(Some(libc::SIGINT), Duration::from_secs(60));
    assert_eq!(status, Some(0), "{stderr}");
    let said = format!("process {child} (forked during the session) was not traced: its trace files could not be made");
    assert!(stderr.contains(&said) && stderr.contains("dropped its privileges"), "{stderr}");
    assert!(stderr.contains("its code restored from its files"), "{stderr}");
    assert_eq!(worker.code_in(child, "mix"), untraced, "the child's mix has its bytes back");
    assert!(Path::new(&format!("/proc/{child}")).exists(), "the child runs on");
    worker.quit();
    wait_for_the_end_of(child);
}

#[test]
fn a_child_forked_during_a_session_that_watches_for_libraries_does_not_hold_up_its_end() {
    // A pattern naming a library starts the agent's dlopen watch, whose wake-up pipe the
    // child inherits: the session's end must not wait for that pipe to close.
    let options = ["-F", "mix", "-F", "libplugin-record-attach:*"];
    let run = record_a_child("fork-watch", "fork", &options, |_, _, _| {});
    let (child, untraced, stderr) = (run.child, &run.untraced, &run.stderr);
    assert!(stderr.contains(&format!("detached from {} (", run.worker.pid)), "{stderr}");
    assert!(stderr.contains(&format!("process {child} (forked during the session): its code restored")), "{stderr}");
    assert_eq!(run.worker.code_in(child, "mix"), *untraced, "the child's mix has its bytes back");
    run.quit();
}

/// Records the worker with these options while it `exec`s itself and makes a round of
/// calls in the new image (worker.c: `exec` runs /proc/self/exe again, whose `go` makes
/// 4 × 300 calls of mix, recorded as an image `record` follows through its exec is), which
/// must compute `untraced`; ends the session (dynprobe exits 0): the trace directory and
/// dynprobe's stderr.
fn record_through_an_exec(worker: &mut Worker, test: &str, options: &[&str], untraced: &str) -> (PathBuf, String) {
    record_through_an_exec_then(worker, test, options, untraced, |_| {})
}

/// [`record_through_an_exec`], `during` running in the new image's session before it ends.
fn record_through_an_exec_then(
    worker: &mut Worker,
    test: &str,
    options: &[&str],
    untraced: &str,
    during: impl FnOnce(&mut Worker),
) -> (PathBuf, String) {
    let (dir, session) = start_through_an_exec(worker, test, options, &[], untraced);
    during(worker);
    let (status, _, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(status, Some(0), "{stderr}");
    (dir, stderr)
}

/// The start of [`record_through_an_exec`], `env` in dynprobe's environment: the trace
/// directory and the session, running, after the new image's round.
fn start_through_an_exec(
    worker: &mut Worker,
    test: &str,
    options: &[&str],
    env: &[(&str, &str)],
    untraced: &str,
) -> (PathBuf, Session) {
    let dir = trace_dir(test);
    let mut session = record_with_env(worker.pid, &dir, options, env);
    session.wait_for("attached to");
    assert_eq!(worker.ask("exec"), format!("ready {}", worker.pid));
    session.wait_for("executed a new program");
    assert_eq!(worker.round(), untraced, "the same checksum in the new image, recorded");
    (dir, session)
}

/// The worker recorded with `-F mix` through an `exec` ([`start_through_an_exec`]), whose
/// new image forked a child that calls mix ([`fork_a_child`]): the worker, the session,
/// mix's untraced bytes and the child.
fn start_with_an_exec_d_image_s_child(test: &str) -> (Worker, Session, Vec<u8>, i32) {
    let (mut worker, session, untraced_code) = start_with_an_exec_d_image(test);
    let child = fork_a_child(&mut worker);
    (worker, session, untraced_code, child)
}

/// The worker recorded with `-F mix` through an `exec` ([`start_through_an_exec`]): the
/// worker, the session and mix's untraced bytes.
fn start_with_an_exec_d_image(test: &str) -> (Worker, Session, Vec<u8>) {
    let mut worker = start_worker(test);
    let untraced = worker.round();
    let untraced_code = worker.code("mix");
    let (_, session) = start_through_an_exec(&mut worker, test, &["-F", "mix"], &[], &untraced);
    (worker, session, untraced_code)
}

/// Asks the worker to fork a child that calls mix every 10 ms: its pid, once it has made
/// some calls.
fn fork_a_child(worker: &mut Worker) -> i32 {
    let forked = worker.ask("fork");
    let child = forked.strip_prefix("forked ").and_then(|p| p.parse().ok()).expect("forked <pid>");
    std::thread::sleep(Duration::from_millis(300));
    child
}

#[test]
fn an_image_exec_d_during_the_session_is_recorded_and_one_exec_d_after_it_is_not() {
    let mut worker = start_worker("exec");
    let untraced = worker.round();
    let untraced_code = worker.code("mix");
    let agent_loaded = |pid: i32| mappings(pid).iter().any(|m| m.contains("libdynprobe_agent"));
    let (dir, stderr) = record_through_an_exec(&mut worker, "exec", &["-F", "mix"], &untraced);
    assert!(stderr.contains("recorded 2400 events (0 lost) from 4 threads of 2 processes"), "{stderr}");
    let replay = dynprobe_ok(&["replay".as_ref(), dir.as_os_str()]);
    assert_eq!(replay.matches("| mix();").count(), 1200, "{replay}");
    // The session is over, for the image exec'd during it too: its recording ends, its
    // sites get their bytes back (it keeps its agent, preloaded), the next exec carries
    // nothing, and neither does an exec of a process attached to once and detached.
    wait_until(|| worker.code("mix") == untraced_code, "the exec'd image's mix restored after the session");
    assert_eq!(worker.ask("exec"), format!("ready {}", worker.pid));
    assert!(!agent_loaded(worker.pid), "an exec after the session is not traced: {:#?}", mappings(worker.pid));
    record_for_with(worker.pid, &trace_dir("exec-again"), &["-F", "mix", "--duration", "0.3"]);
    assert_eq!(worker.ask("exec"), format!("ready {}", worker.pid));
    assert!(!agent_loaded(worker.pid), "nor after a session that saw no exec: {:#?}", mappings(worker.pid));
    assert_eq!(worker.round(), untraced, "and it computes the same");
    worker.quit();
}

#[test]
fn an_image_exec_d_during_a_session_with_args_records_the_values_of_its_calls() {
    let mut worker = start_worker("exec-args");
    let untraced = worker.round();
    let (dir, _) = record_through_an_exec(&mut worker, "exec-args", &["-a", "-F", "mix"], &untraced);
    // The new image's calls carry their arguments and return values, as the first image's
    // would: `mix(seed=3, round=12) = 4567;`.
    let replay = dynprobe_ok(&["replay".as_ref(), dir.as_os_str()]);
    assert_eq!(replay.matches("| mix(seed=").count(), 1200, "{}", &replay[..replay.len().min(2000)]);
    assert_eq!(replay.matches("| mix();").count(), 0, "no call without its values");
    worker.quit();
}

#[test]
fn a_child_forked_by_an_image_exec_d_during_the_session_is_recorded_and_its_code_restored_at_the_end() {
    let mut worker = start_worker("exec-fork");
    let untraced = worker.round();
    let untraced_code = worker.code("mix");
    let mut child = 0;
    // The new image forks a child that calls mix every 10 ms: it inherits the image's
    // patched code and recording, but not the agent's thread that ends the image's.
    // With a library pattern the image watches its dlopen calls too, through a pipe the
    // child inherits: the image's end must not wait for it.
    let options = ["-F", "mix", "-F", "libplugin-record-attach:*"];
    let (dir, stderr) = record_through_an_exec_then(&mut worker, "exec-fork", &options, &untraced, |worker| {
        child = fork_a_child(worker);
        assert_ne!(worker.code_in(child, "mix")[..5], untraced_code[..5], "the child inherited the patched mix");
    });
    // Both the image and the child have their bytes back, and the child runs on.
    assert_restored_as_its_image(&worker, child, &stderr, &untraced_code);
    wait_until(|| worker.code("mix") == untraced_code, "the exec'd image's mix restored after the session");
    child_section(&dir, child);
    assert!(Path::new(&format!("/proc/{child}")).exists(), "the child runs on");
    worker.quit();
    wait_for_the_end_of(child);
}

/// The ring directory of the recording process `pid` takes part in (its `DYNPROBE_RECORD`).
fn ring_dir_of(pid: i32) -> PathBuf {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let entry = environ.split(|&b| b == 0).find_map(|e| e.strip_prefix(b"DYNPROBE_RECORD=")).expect("recording");
    PathBuf::from(std::ffi::OsStr::from_bytes(entry))
}

/// The worker started by `dynprobe record -F mix` (no `-p`), dynprobe's stderr going to a
/// file rather than a pipe (the worker's children hold it after dynprobe ended): the worker,
/// the trace directory and that file.
fn record_started(test: &str) -> (Worker, PathBuf, PathBuf) {
    let (worker_exe, _) = worker_and_plugin();
    let log = common::scratch().join(format!("{test}-{}.log", std::process::id()));
    let (dir, said) = (trace_dir(test), trace_dir(test).with_extension("stderr"));
    let mut command = common::dynprobe();
    command.args(["record", "-F", "mix", "-o"]).arg(&dir).arg("--").arg(worker_exe).arg(&log);
    command.stderr(std::fs::File::create(&said).unwrap());
    (Worker::start_by(command, worker_exe, log), dir, said)
}

/// The same end for a program `dynprobe record` starts (`record -- worker`, no `-p`): a
/// child of the worker `exec`s an image that forks a child of its own, and both outlive the
/// worker, whose exit ends the recording. The image restores its own code and the child gets
/// it, as under `record -p`: after the end it calls mix unpatched, unrecorded, and runs on.
#[test]
fn an_image_a_started_program_exec_d_and_its_child_outlive_it_with_their_code_restored() {
    let (worker_exe, _) = worker_and_plugin();
    let untraced_code = start_worker("started-plain").code("mix");
    let (mut worker, dir, said) = record_started("started-exec-fork");
    let forked = [worker.ask("spawn"), worker.ask("")];
    let pid_after = |word: &str| -> i32 {
        let line = forked.iter().find_map(|l| l.strip_prefix(word)).unwrap_or_else(|| panic!("{forked:?}"));
        line.parse().unwrap()
    };
    let (image, child) = (pid_after("forked "), pid_after("grandchild "));
    assert_ne!(worker.code_in(child, "mix")[..5], untraced_code[..5], "the child inherited the patched mix");
    std::thread::sleep(Duration::from_millis(300));
    worker.quit();
    let stderr = std::fs::read_to_string(&said).unwrap();
    assert!(stderr.contains(&restored_as_its_image(child, image)), "{stderr}");
    let code_in = |pid| common::attached::code_in(worker_exe, pid, "mix");
    assert_eq!(code_in(child), untraced_code, "the child's mix restored after the recording");
    assert_eq!(code_in(image), untraced_code, "and the image's, by its agent");
    child_section(&dir, child);
    std::thread::sleep(Duration::from_millis(100));
    assert!(Path::new(&format!("/proc/{child}")).exists(), "the child runs on");
    // SAFETY: kill sends a signal to a process of this test's.
    unsafe { libc::kill(image, libc::SIGTERM) };
    wait_for_the_end_of(child);
}

/// A child that the program `record` started forked, and that outlives it (a daemon's way),
/// has no process left to take its bytes from once the program has ended: it gets what
/// dynprobe patched back from the files its code is mapped from, and runs on.
#[test]
fn a_child_that_outlives_the_started_program_gets_its_code_back_from_its_files() {
    let (worker_exe, _) = worker_and_plugin();
    let untraced_code = start_worker("started-keep-plain").code("mix");
    let (mut worker, dir, said) = record_started("started-keep");
    let program = worker.pid;
    let child: i32 = worker.ask("keep").strip_prefix("forked ").and_then(|p| p.parse().ok()).expect("forked <pid>");
    let code_in = |pid| common::attached::code_in(worker_exe, pid, "mix");
    assert_ne!(code_in(child)[..5], untraced_code[..5], "the child inherited the patched mix");
    std::thread::sleep(Duration::from_millis(300));
    worker.quit();
    let stderr = std::fs::read_to_string(&said).unwrap();
    let said_so = format!(
        "process {child} (forked during the session from {program}, which has ended): its code restored from its files"
    );
    assert!(stderr.contains(&said_so), "{stderr}");
    assert_eq!(code_in(child), untraced_code, "the child's mix restored after the recording");
    child_section(&dir, child);
    std::thread::sleep(Duration::from_millis(100));
    assert!(Path::new(&format!("/proc/{child}")).exists(), "the child runs on");
    // SAFETY: kill sends a signal to a process of this test's.
    unsafe { libc::kill(child, libc::SIGTERM) };
    wait_for_the_end_of(child);
}

/// A child of a program `record` started that forks once the recording is over (the program
/// ended, and the recording's files with it) does not record that fork, and says nothing of
/// it on the program's stderr: its agent had no name for the grandchild's trace files, and
/// wrote so, into the user's program's output.
#[test]
fn a_fork_after_a_started_program_s_recording_ended_is_not_reported_on_its_stderr() {
    let (mut worker, _, said) = record_started("started-late-fork");
    let log = worker.log.clone();
    let child: i32 = worker.ask("late").strip_prefix("forked ").and_then(|p| p.parse().ok()).expect("forked <pid>");
    worker.quit();
    let forked_late = || std::fs::read_to_string(&log).is_ok_and(|text| text.contains("late fork done"));
    wait_until(forked_late, "the child forked after the recording's end");
    let stderr = std::fs::read_to_string(&said).unwrap();
    assert!(!stderr.contains("dynprobe agent"), "{stderr}");
    wait_for_the_end_of(child);
}

/// A child forked by an exec'd image whose pid had been an image's that ended during the
/// session (planted here: that image's announcement and word, of another start time) is
/// neither waited for nor taken for that image: it gets its own image's code back.
#[test]
fn the_files_of_an_ended_image_are_not_taken_for_a_later_process_with_its_pid() {
    let (worker, session, untraced_code, child) = start_with_an_exec_d_image_s_child("exec-fork-reused");
    let rings = ring_dir_of(worker.pid);
    let now = Process::live(child as u32).expect("the child runs");
    let ended = Process { pid: now.pid, start: now.start - 1 };
    ending::announce(&rings, ended).unwrap();
    ending::write_word(&rings, ended, Ok(())).unwrap();
    let (status, _, stderr) = session.end_within(Some(libc::SIGINT), Duration::from_secs(60));
    assert_eq!(status, Some(0), "{stderr}");
    assert!(!stderr.contains(&format!("process {child} (an image")), "{stderr}");
    assert_restored_as_its_image(&worker, child, &stderr, &untraced_code);
    worker.quit();
    wait_for_the_end_of(child);
}

/// What dynprobe says of `child`, forked by the image `pid` exec'd during the session, once
/// it gave it the image's restored code.
fn restored_as_its_image(child: i32, pid: i32) -> String {
    format!("process {child} (forked during the session by {pid}, an image exec'd during it): its code restored")
}

/// Checks that dynprobe said so of `child`, a child of the worker's exec'd image, and that
/// its mix has the `untraced` bytes again.
fn assert_restored_as_its_image(worker: &Worker, child: i32, stderr: &str, untraced: &[u8]) {
    assert!(stderr.contains(&restored_as_its_image(child, worker.pid)), "{stderr}");
    assert_eq!(worker.code_in(child, "mix"), untraced, "the child's mix restored after the session");
}

/// A child the exec'd image forks after the session was told to end, while the image still
/// records (dynprobe paused there for the test), is found and restored too: the children
/// are looked for once the images have ended their recording.
#[test]
fn a_child_forked_by_an_exec_d_image_as_the_session_ends_is_restored_too() {
    let mut worker = start_worker("exec-fork-late");
    let untraced = worker.round();
    let untraced_code = worker.code("mix");
    let pause = [("DYNPROBE_TEST_PAUSE_BEFORE_IMAGES_END_MS", "1500")];
    let (dir, mut session) = start_through_an_exec(&mut worker, "exec-fork-late", &["-F", "mix"], &pause, &untraced);
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(session.child.id() as i32, libc::SIGINT) };
    session.wait_for("pausing before the images' recording ends");
    let child = fork_a_child(&mut worker);
    assert_ne!(worker.code_in(child, "mix")[..5], untraced_code[..5], "the child inherited the patched mix");
    let (status, _, stderr) = session.end(None);
    assert_eq!(status, Some(0), "{stderr}");
    assert_restored_as_its_image(&worker, child, &stderr, &untraced_code);
    // What the child recorded meanwhile is in the trace: the recorder drains the rings last.
    child_section(&dir, child);
    worker.quit();
    wait_for_the_end_of(child);
}

/// An image exec'd just before the session ends, still starting (its code patched, its
/// agent's recording thread not there yet: paused for the test), is an image and not a
/// child of the image that forked it: its code is never overwritten with that image's
/// (which could land between two steps of its patching); its agent ends its recording and
/// restores its code itself, and the session waits for its word.
#[test]
fn an_image_exec_d_as_the_session_ends_is_not_taken_for_a_child_of_its_image() {
    let pause = [("DYNPROBE_TEST_PAUSE_BEFORE_IMAGE_THREAD_MS", "5000")];
    let mut worker = start_worker_with("exec-forkexec-late", &pause);
    let untraced = worker.round();
    let untraced_code = worker.code("mix");
    let (_, session) = start_through_an_exec(&mut worker, "exec-forkexec-late", &["-F", "mix"], &[], &untraced);
    let forked = worker.ask("forkexec");
    let child: i32 = forked.strip_prefix("forked ").and_then(|p| p.parse().ok()).expect("forked <pid>");
    let patched = || worker.code_in(child, "mix")[..5] != untraced_code[..5];
    wait_until(|| runs_as(child, "child") && patched(), "the new image patched mix");
    let (status, _, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(status, Some(0), "{stderr}");
    assert!(!stderr.contains(&format!("process {child} (")), "the new image is not a forked child: {stderr}");
    assert_eq!(worker.code_in(child, "mix"), untraced_code, "its agent restored its mix before its word");
    assert!(Path::new(&format!("/proc/{child}")).exists(), "the new image runs on");
    worker.quit();
    wait_for_the_end_of(child);
}

/// An image whose `exec` was under way as the session ended, and which announces itself once
/// dynprobe has looked for the images (made so for the test: its agent waits for the end,
/// and dynprobe keeps the ring directory a while after looking), finds the recording over
/// and patches nothing: the child it forks at once has mix as it should be — not the
/// patched code of an image nobody waited for, which restored its own but not the child's.
#[test]
fn an_image_that_announces_itself_after_the_images_were_looked_for_patches_nothing() {
    let late = [("DYNPROBE_TEST_ANNOUNCE_AFTER_THE_END", "1")];
    let mut worker = start_worker_with("exec-late", &late);
    let untraced_code = worker.code("mix");
    let hold = [("DYNPROBE_TEST_PAUSE_AFTER_IMAGES_END_MS", "2000")];
    let mut session = record_with_env(worker.pid, &trace_dir("exec-late"), &["-F", "mix"], &hold);
    session.wait_for("attached to");
    let forked = worker.ask("spawn");
    let image: i32 = forked.strip_prefix("forked ").and_then(|p| p.parse().ok()).expect("forked <pid>");
    // Its `exec` carried the recording: the new image has the agent, waiting for the end.
    let agent = || mappings(image).iter().any(|m| m.contains("libdynprobe_agent"));
    wait_until(|| runs_as(image, "image") && agent(), "the new image started with the agent");
    let (status, _, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(status, Some(0), "{stderr}");
    let said = worker.ask("");
    let child: i32 = said.strip_prefix("grandchild ").and_then(|p| p.parse().ok()).expect("grandchild <pid>");
    assert_eq!(worker.code_in(child, "mix"), untraced_code, "the late image's child has mix unpatched");
    assert_eq!(worker.code_in(image, "mix"), untraced_code, "and so has the late image");
    assert!(!stderr.contains(&format!("process {image} (")), "{stderr}");
    // SAFETY: kill sends a signal to a process of this test's.
    unsafe { libc::kill(image, libc::SIGTERM) };
    wait_for_the_end_of(child);
    worker.quit();
}

/// An exec'd image that renames the agent's threads and writes over the environment it
/// started with (worker.c's `disguise`: what a hostile program may do, and setproctitle-style
/// code does to the environment) is still waited for at the end, by the tid its agent said,
/// and the child it forks afterwards is still found, by the ring files it maps: the child gets
/// its image's restored code.
#[test]
fn an_image_that_renames_the_agent_s_thread_and_writes_over_its_environment_is_still_followed() {
    let (mut worker, session, untraced_code) = start_with_an_exec_d_image("exec-disguised");
    assert_eq!(worker.ask("disguise"), "disguised");
    assert!(!thread_names(worker.pid).iter().any(|t| t.starts_with("dynprobe")), "renamed");
    let child = fork_a_child(&mut worker);
    let (status, _, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(status, Some(0), "{stderr}");
    assert_restored_as_its_image(&worker, child, &stderr, &untraced_code);
    worker.quit();
    wait_for_the_end_of(child);
}

/// An exec'd image that cannot restore its own code (here its site's bytes were changed
/// under it, as a program rewriting its own code would) says so, and the child it forked
/// is left as it is and said to keep patched code, why included — never said restored.
#[test]
fn a_child_forked_by_an_image_that_cannot_restore_its_own_code_is_said_to_keep_patched_code() {
    let (worker, session, untraced_code, child) = start_with_an_exec_d_image_s_child("exec-fork-kept");
    let patched = worker.code_in(child, "mix");
    assert_ne!(patched[..5], untraced_code[..5], "the child inherited the patched mix");
    // The image's mix gets its first bytes back behind its agent's back: the agent finds
    // other bytes than it wrote there, and restores nothing.
    let mem = std::fs::OpenOptions::new().write(true).open(format!("/proc/{}/mem", worker.pid)).unwrap();
    let mix = common::attached::symbol_address(&worker_and_plugin().0, "mix");
    std::os::unix::fs::FileExt::write_all_at(&mem, &untraced_code[..5], mix).unwrap();
    let (status, _, stderr) = session.end(Some(libc::SIGINT));
    assert_eq!(status, Some(0), "{stderr}");
    let pid = worker.pid;
    let said = format!(
        "process {child} (forked during the session by {pid}, an image exec'd during it) keeps patched code: the \
         image it was forked from ({pid}) could not restore its own code: "
    );
    assert!(stderr.contains(&said), "{stderr}");
    let image = format!("process {pid} (an image exec'd during the session) keeps patched code: code at ");
    assert!(stderr.contains(&image), "{stderr}");
    assert!(!stderr.contains(&restored_as_its_image(child, pid)), "{stderr}");
    assert_eq!(worker.code_in(child, "mix"), patched, "the child's code left as it was");
    worker.quit();
    wait_for_the_end_of(child);
}

#[test]
fn a_child_forked_during_the_session_that_execs_is_recorded_and_its_recording_ends_with_the_session() {
    // The child executes the worker again (not PIE: mapped where the worker is), whose new
    // image makes the calls, recorded as an image `record` follows through an exec.
    let run = record_a_child("forkexec", "forkexec", &["-F", "mix"], |_, _, _| {});
    let (child, untraced, stderr) = (run.child, &run.untraced, &run.stderr);
    assert!(!stderr.contains(&format!("process {child}")), "the exec'd child is not the worker's to restore: {stderr}");
    // Its own agent ends its recording with the session: its mix gets its bytes back.
    wait_until(|| run.worker.code_in(child, "mix") == *untraced, "the exec'd child's mix restored after the session");
    assert_eq!(run.worker.code("mix"), *untraced, "the worker's mix has its bytes back");
    run.quit();
}

#[test]
fn a_controller_killed_before_it_unloads_the_agent_leaves_its_load_to_the_next_one() {
    let mut server = start_server("unload", false);
    let agent_loaded = |pid: i32| mappings(pid).iter().any(|m| m.contains("libdynprobe_agent"));
    // The first dynprobe is told `!unload` and killed before its `dlclose`: its load stays.
    let dir = trace_dir("unload-killed");
    let mut command = common::dynprobe();
    command.args(["record", "-p", &server.pid.to_string(), "-F", "srv_*", "--duration", "0.2", "-o"]).arg(&dir);
    command.env("DYNPROBE_TEST_PAUSE_BEFORE_UNLOAD_MS", "20000");
    let mut session = Session::spawn(command, None);
    session.wait_for("detached from");
    // The agent's session thread says `!unload` once it is done, then ends.
    wait_until(|| !thread_names(server.pid).iter().any(|t| t.starts_with("dynprobe")), "the agent's threads ended");
    session.end(Some(libc::SIGKILL));
    assert!(agent_loaded(server.pid), "the killed dynprobe unloaded nothing");
    // The next session undoes both loads: the library goes.
    record_for(server.pid, &trace_dir("unload-next"), "0.2");
    wait_until(|| !agent_loaded(server.pid), "the agent library unloaded by the next session");
    assert_eq!(server.ask("run 5 5 5 5"), untraced("unload", "5 5 5 5", false), "the server runs on");
    server.quit();
}

#[test]
fn blocking_calls_never_return_early_unreported_across_ten_sessions() {
    // targets/blocking.c: ten threads in blocking calls, each result checked; `work` is
    // called from the main thread every 20 ms.
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    let exe = EXE.get_or_init(|| common::build_c("blocking.c", "record-attach-blocking", &os(&["-O1", "-fno-inline"])));
    let mut program = Worker::start_with(exe, OsStr::new("-"), PathBuf::new(), &[]);
    let (mut reported, mut said) = (0, Vec::new());
    for session in 0..10 {
        let dir = trace_dir(&format!("blocking-{session}"));
        let stderr = record_for_with(program.pid, &dir, &["-F", "work", "--duration", "0.4"]);
        said.extend(stderr.lines().filter(|l| l.contains("EINTR")).map(|l| format!("session {session}: {l}")));
        reported += stderr
            .lines()
            .filter(|l| l.contains("EINTR"))
            .filter_map(|w| w.split("warning: ").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
            .sum::<u64>();
        assert!(stderr.contains("recorded ") && !stderr.contains("recorded 0 events"), "{stderr}");
    }
    let report = program.ask("quit");
    let eintr: u64 = report.split_whitespace().nth(3).and_then(|n| n.parse().ok()).expect("a report");
    // A thread blocked in its call is never disturbed; one seen running that entered its
    // call as the stop signal was on its way is the one way left, and is always said.
    assert_eq!(eintr, reported, "blocking calls returned early unreported: {report}\ndynprobe said: {said:#?}");
    assert!(eintr <= 5, "{eintr} blocking calls returned early in 10 sessions: {report}\ndynprobe said: {said:#?}");
}

/// Waits up to 30 s for `done`.
fn wait_until(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The state letter of `/proc/PID/stat`.
fn process_state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(") ").unwrap().1.chars().next().unwrap()
}

/// How busy.c's traced functions are entered: which hook code its threads spend their time in.
#[derive(Clone, Copy, Debug)]
enum Entry {
    /// Plain entries: jump-optimized probes, whose detours call the dispatcher.
    Detour,
    /// `-pg -mfentry -mnop-mcount -mrecord-mcount` NOPs, turned into calls of a stub and the
    /// ftrace caller (not PIE: GCC refuses these flags with -fPIC).
    Mcount,
    /// `-fpatchable-function-entry=5` NOPs, turned into the same calls.
    Patchable,
}

impl Entry {
    /// The site kind the summary names (`entry`, `mcount`, `patchable`).
    fn kind(self) -> &'static str {
        match self {
            Entry::Detour => "entry",
            Entry::Mcount => "mcount",
            Entry::Patchable => "patchable",
        }
    }
}

/// `targets/busy.c`, built once per [`Entry`]: four threads always inside traced calls that
/// call a traced leaf in a tight loop.
fn busy_exe(entry: Entry) -> &'static Path {
    static EXES: [OnceLock<PathBuf>; 3] = [const { OnceLock::new() }; 3];
    EXES[entry as usize].get_or_init(|| {
        let flags: &[&'static str] = match entry {
            Entry::Detour => &[],
            Entry::Mcount => &["-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-fno-pie", "-no-pie"],
            Entry::Patchable => &["-fpatchable-function-entry=5"],
        };
        let out = format!("record-attach-busy-{}", entry.kind());
        common::build_c("busy.c", &out, &os(&[&["-O1", "-fno-inline", "-pthread"], flags].concat()))
    })
}

#[test]
fn every_thread_s_calls_in_flight_are_adopted_when_the_stop_lands_in_the_tracer_s_own_code() {
    assert_every_thread_s_calls_in_flight_are_adopted(Entry::Detour);
}

#[test]
fn every_thread_s_calls_in_flight_are_adopted_when_the_stop_lands_in_an_mcount_site_s_caller() {
    assert_every_thread_s_calls_in_flight_are_adopted(Entry::Mcount);
}

#[test]
fn every_thread_s_calls_in_flight_are_adopted_when_the_stop_lands_in_a_patchable_site_s_caller() {
    assert_every_thread_s_calls_in_flight_are_adopted(Entry::Patchable);
}

#[test]
fn the_attach_says_how_many_threads_it_found_in_hook_code_and_stepped_through() {
    // busy.c's threads are mostly inside a compiler site's stub, the caller or its
    // dispatcher: sessions go on until a stop found one there (3 in 4 threads are, per stop).
    let log = common::scratch().join(format!("busy-note-{}.log", std::process::id()));
    let mut busy = Worker::start_with(busy_exe(Entry::Mcount), log.as_os_str(), log.clone(), &[]);
    assert_eq!(busy.ask("threads"), "threads 4");
    let mut sessions = 0;
    loop {
        let dir = trace_dir(&format!("busy-note-{sessions}"));
        sessions += 1;
        let stderr = record_for_with(busy.pid, &dir, &["-F", "busy_*", "--duration", "0.05"]);
        let _ = std::fs::remove_dir_all(&dir);
        let line = stderr.lines().find_map(|l| l.strip_prefix("dynprobe: calls in flight at the attach: "));
        let line = line.unwrap_or_else(|| panic!("no line about the calls in flight: {stderr}"));
        let numbers: Vec<usize> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
        if line.ends_with("; none was inside dynprobe's hook code") && sessions < 5 {
            continue;
        }
        // "C adopted on T thread(s); H thread(s) inside dynprobe's hook code (D in entry
        // detours, K in compiler-site callers), S stepped through into the program's frames"
        let [_calls, threads, in_hooks, in_detours, in_callers, stepped] = numbers[..] else {
            panic!("the line does not say how many threads were in hook code after {sessions} sessions: {line}")
        };
        assert!(threads >= 5 && in_hooks <= 4, "busy.c's 4 threads and its main one: {line}");
        assert_eq!(
            (in_detours, in_callers, stepped),
            (0, in_hooks, in_hooks),
            "all in callers, stepped through: {line}"
        );
        break;
    }
    busy.quit();
}

/// Records busy.c, built with `entry`'s sites, in three sessions, each on a fresh program,
/// and checks that every thread's calls in flight at the attach were adopted.
fn assert_every_thread_s_calls_in_flight_are_adopted(entry: Entry) {
    // busy.c's threads spend most of their time in the tracer's hook code (a detour and its
    // dispatcher, or a compiler site's stub, the caller and its dispatcher), so the
    // attach's stop often finds a thread there. Each session is on a fresh program: a
    // call an earlier session diverted stays diverted (busy_thread never returns), and is
    // not shown again.
    let depth_of = |name: &str| ["busy_thread", "busy_outer", "busy_leaf"].iter().position(|n| *n == name);
    let kind = entry.kind();
    for session in 0..3 {
        let log = common::scratch().join(format!("busy-{kind}-{session}-{}.log", std::process::id()));
        let mut busy = Worker::start_with(busy_exe(entry), log.as_os_str(), log.clone(), &[]);
        assert_eq!(busy.ask("threads"), "threads 4");
        let dir = trace_dir(&format!("busy-{kind}-{session}"));
        // Rings of 4 Mi records: a thread records ~25 M a second here, and an exit lost with
        // a full ring would nest the next calls deeper in the replay.
        let options = ["-F", "busy_*", "--duration", "0.05", "--buffer-size", "4194304"];
        let stderr = record_for_with(busy.pid, &dir, &options);
        let row = |l: &str| l.split_whitespace().collect::<Vec<_>>() == [kind, "3", "3", "0"];
        assert!(stderr.lines().any(row), "session {session}: busy.c's 3 functions have {kind} sites: {stderr}");
        assert!(!stderr.contains("could not be unwound"), "session {session}: {stderr}");
        assert!(stderr.contains("(0 lost)"), "session {session}: {stderr}");
        let replay = dynprobe_ok(&["replay".as_ref(), dir.as_os_str()]);
        assert_eq!(exit_without_entry(&replay), None, "session {session}: every exit has its entry");
        // Every thread is inside busy_thread, and inside busy_outer whenever it is inside
        // busy_leaf (its log says which threads): the calls entered before the attach are
        // the outermost of those, from depth 0, and every call recorded after them sits at
        // its own depth.
        for line in busy.logged() {
            let tid = &line[0];
            let (before, after) = thread_entries(&replay, tid);
            assert!(
                before.first().is_some_and(|(name, depth)| name == "busy_thread" && *depth == 0),
                "session {session}: thread {tid}'s calls in flight at the attach: {before:?}, then {:?}",
                &after[..after.len().min(3)]
            );
            for (k, (name, depth)) in before.iter().enumerate() {
                assert_eq!((depth_of(name), *depth), (Some(k), k), "session {session}: thread {tid}: {before:?}");
            }
            assert!(after.len() > 100, "session {session}: thread {tid}: {} calls recorded", after.len());
            let wrong = after.iter().find(|(name, depth)| depth_of(name) != Some(*depth));
            assert_eq!(wrong, None, "session {session}: thread {tid}, after {before:?} entered before the attach");
        }
        busy.quit();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
