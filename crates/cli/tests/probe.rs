//! End-to-end tests of `dynprobe probe`: a C program compiled here runs under the CLI
//! with the agent preloaded.
//!
//! The agent must be built beside the `dynprobe` binary first (`cargo test` only builds
//! it as part of the whole workspace): `cargo build --workspace && cargo test --workspace`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The target program. `main` first creates the marker file named by `argv[1]`, so a test
/// can tell whether the program ran at all; then `checksum` is called with known
/// arguments: (i, 10 i) for i < 50 on the main thread, and (1000 t + i, i) for i < 100 on
/// each of threads t = 1, 2. `wide` starts with a 10-byte instruction, to probe inside it.
const TARGET_C: &str = r#"
#include <pthread.h>
#include <stdio.h>

__attribute__((noinline)) long checksum(long seed, long n)
{
	unsigned long h = seed;
	for (long i = 0; i < n; i++)
		h = h * 31 + i;
	return (long)h;
}

__attribute__((naked, noinline)) long wide(void)
{
	__asm__("movabs $0x1122334455667788, %rax\n\tret");
}

static void *thread(void *arg)
{
	long t = (long)arg, sum = 0;
	for (long i = 0; i < 100; i++)
		sum += checksum(1000 * t + i, i);
	return (void *)sum;
}

int main(int argc, char **argv)
{
	if (argc > 1)
		fclose(fopen(argv[1], "w"));
	long sum = 0;
	for (long i = 0; i < 50; i++)
		sum += checksum(i, 10 * i);
	printf("main %ld\n", sum);
	pthread_t threads[2];
	for (long t = 1; t <= 2; t++)
		pthread_create(&threads[t - 1], NULL, thread, (void *)t);
	for (long t = 1; t <= 2; t++) {
		void *result;
		pthread_join(threads[t - 1], &result);
		printf("thread %ld %ld\n", t, (long)result);
	}
	printf("wide %lx\n", wide());
	return 3;
}
"#;

/// The program's exit status, passed through by dynprobe.
const TARGET_STATUS: i32 = 3;

/// Every (seed, n) `checksum` is called with, once each.
fn expected_calls() -> Vec<(u64, u64)> {
    let mut calls: Vec<(u64, u64)> = (0..50).map(|i| (i, 10 * i)).collect();
    for t in 1..=2 {
        calls.extend((0..100).map(|i| (1000 * t + i, i)));
    }
    calls.sort();
    calls
}

fn scratch() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("probe-test");
    // Made here, not only by the first test to build the target: any test may come first.
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}

/// The target, compiled once per test run.
fn target() -> &'static Path {
    static TARGET: OnceLock<PathBuf> = OnceLock::new();
    TARGET.get_or_init(|| {
        let dir = scratch();
        let source = dir.join("target.c");
        std::fs::write(&source, TARGET_C).unwrap();
        let exe = dir.join(format!("target-{}", std::process::id()));
        let status = Command::new("gcc")
            .args(["-O1", "-g", "-fno-inline", "-fcf-protection=none", "-pthread", "-o"])
            .arg(&exe)
            .arg(&source)
            .status()
            .expect("run gcc");
        assert!(status.success(), "gcc failed to compile the test target");
        exe
    })
}

/// A marker path unique to `test`, absent.
fn marker(test: &str) -> PathBuf {
    let path = scratch().join(format!("marker-{test}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// `dynprobe` with `args`, checking first that the agent it needs was built.
fn dynprobe(args: &[&str]) -> Output {
    let exe = Path::new(env!("CARGO_BIN_EXE_dynprobe"));
    let agent = exe.with_file_name("libdynprobe_agent.so");
    assert!(
        agent.is_file(),
        "{} is missing: run `cargo build --workspace` (with the same profile) before these tests",
        agent.display()
    );
    Command::new(exe).args(args).output().expect("run dynprobe")
}

/// `dynprobe probe SPECS... [OPTIONS...] -- target MARKER`.
fn probe(specs: &[&str], options: &[&str], marker: &Path) -> Output {
    probe_through(&[], specs, options, marker)
}

/// `dynprobe probe SPECS... [OPTIONS...] -- WRAPPER... target MARKER`: the target run by
/// the programs of `wrapper` (`env`, `bash -c '...'`).
fn probe_through(wrapper: &[&str], specs: &[&str], options: &[&str], marker: &Path) -> Output {
    let target = target().to_str().unwrap();
    let marker = marker.to_str().unwrap();
    let mut args = vec!["probe"];
    args.extend(specs);
    args.extend(options);
    args.push("--");
    args.extend(wrapper);
    args.extend([target, marker]);
    dynprobe(&args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `(tid, seed, n)` of a text event line `   0.000123 [4242] checksum: seed=1 n=10`.
fn parse_text_event(line: &str) -> (u64, u64, u64) {
    let (time, rest) = line.trim_start().split_once(" [").unwrap();
    time.parse::<f64>().unwrap_or_else(|_| panic!("bad time in {line:?}"));
    let (tid, rest) = rest.split_once("] checksum: ").unwrap();
    let fields: HashMap<&str, &str> = rest.split(' ').map(|f| f.split_once('=').unwrap()).collect();
    (tid.parse().unwrap(), fields["seed"].parse().unwrap(), fields["n"].parse().unwrap())
}

#[test]
fn every_call_is_one_event_with_its_arguments_and_the_program_is_unchanged() {
    every_call_is_one_event(&[], "optimized");
}

#[test]
fn breakpoint_probes_only_with_no_optimize_give_the_same_events() {
    every_call_is_one_event(&["--no-optimize"], "breakpoints");
}

fn every_call_is_one_event(options: &[&str], name: &str) {
    let unprobed_marker = marker(&format!("unprobed-{name}"));
    let unprobed = Command::new(target()).arg(&unprobed_marker).output().unwrap();
    assert_eq!(unprobed.status.code(), Some(TARGET_STATUS));

    let marker = marker(&format!("events-{name}"));
    let events = scratch().join(format!("events-{name}-{}.txt", std::process::id()));
    let options: Vec<&str> = options.iter().copied().chain(["-o", events.to_str().unwrap()]).collect();
    let out = probe(&["p:checksum seed=$arg1 n=$arg2"], &options, &marker);
    assert_eq!(out.status.code(), Some(TARGET_STATUS), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), text(&unprobed.stdout), "the program's output changed");
    assert!(out.stderr.is_empty(), "stderr: {}", text(&out.stderr));

    let lines = std::fs::read_to_string(&events).unwrap();
    let events: Vec<(u64, u64, u64)> = lines.lines().map(parse_text_event).collect();
    let mut calls: Vec<(u64, u64)> = events.iter().map(|&(_, seed, n)| (seed, n)).collect();
    calls.sort();
    assert_eq!(calls, expected_calls());
    // Each thread's calls carry that thread's id: main's seeds are below 1000, thread t's
    // are 1000 t + i.
    let mut tids_by_thread: HashMap<u64, Vec<u64>> = HashMap::new();
    for (tid, seed, _) in events {
        tids_by_thread.entry(seed / 1000).or_default().push(tid);
    }
    let tids: Vec<u64> = (0..=2)
        .map(|t| {
            let tids = &tids_by_thread[&t];
            assert!(tids.iter().all(|&tid| tid == tids[0]), "thread {t} has several tids");
            tids[0]
        })
        .collect();
    assert!(tids[0] != tids[1] && tids[1] != tids[2] && tids[0] != tids[2], "{tids:?}");
}

/// The target's `checksum` calls among the text events in `path`, sorted.
fn calls_in(path: &Path) -> Vec<(u64, u64)> {
    let lines = std::fs::read_to_string(path).unwrap();
    let mut calls: Vec<(u64, u64)> = lines.lines().map(parse_text_event).map(|(_, seed, n)| (seed, n)).collect();
    calls.sort();
    calls
}

/// The program, and every program it runs, sees the environment it would have untraced:
/// dynprobe's variables (`LD_PRELOAD` naming the agent, `DYNPROBE_*`) are taken out of it,
/// and a user's own `LD_PRELOAD` stays.
#[test]
fn the_traced_program_sees_the_environment_it_was_started_with() {
    let preload = "/lib/x86_64-linux-gnu/libm.so.6";
    let environment = |out: &Output| {
        let mut vars: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
        vars.sort();
        vars
    };
    let events = scratch().join(format!("events-environment-{}.txt", std::process::id()));
    let trace = scratch().join(format!("trace-environment-{}", std::process::id()));
    let (events, trace) = (events.to_str().unwrap(), trace.to_str().unwrap());
    let runs: [(&[&str], &[&str]); 3] = [
        (&["probe", "p:libc:getenv", "-o", events, "--"], &["/usr/bin/env"]),
        (&["record", "-F", "libc:*", "-o", trace, "--"], &["/usr/bin/env"]),
        // Through a shell, which runs env as its child with its own copy of the environment.
        (&["record", "-o", trace, "--"], &["sh", "-c", "/usr/bin/env; true"]),
    ];
    for (dynprobe, program) in runs {
        let run = |command: &mut Command| {
            let out = command.env("LD_PRELOAD", preload).env("TRACED_TEST", "1").output().unwrap();
            assert!(out.status.success(), "{dynprobe:?} {program:?}: {}", text(&out.stderr));
            environment(&out)
        };
        let untraced = run(Command::new(program[0]).args(&program[1..]));
        assert!(untraced.contains(&format!("LD_PRELOAD={preload}")), "{untraced:?}");
        assert_eq!(run(common::dynprobe().args(dynprobe).args(program)), untraced, "{dynprobe:?} {program:?}");
    }
}

#[test]
fn probes_follow_exec_through_wrappers_and_their_children() {
    // `p:MODULE:checksum` waits in the wrappers (their images lack the module) and is
    // placed in each image of the target, however it was reached.
    let module = target().file_name().unwrap().to_str().unwrap();
    let spec = format!("p:checksum {module}:checksum seed=$arg1 n=$arg2");
    let cases: [(&str, &[&str], usize); 6] = [
        ("exec", &["bash", "-c", "exec \"$0\" \"$@\""], 1),
        ("env", &["env"], 1),
        // Programs exec'd with an environment of their caller's making, without dynprobe's
        // variables: the execve guard gives them back.
        ("env-i", &["env", "-i"], 1),
        ("clean", &["bash", "-c", "env -i PATH=/usr/bin \"$0\" \"$@\"; exec env -i \"$0\" \"$@\""], 2),
        // A child of the started shell, then an exec chain through env, nice and timeout
        // (which runs the program as its child).
        ("chain", &["bash", "-c", "\"$0\" \"$@\"; exec env nice timeout 600 \"$0\" \"$@\""], 2),
        ("nice", &["nice", "-n", "1"], 1),
    ];
    for (name, wrapper, runs) in cases {
        let marker = marker(&format!("exec-{name}"));
        let events = scratch().join(format!("events-exec-{name}-{}.txt", std::process::id()));
        let out = probe_through(wrapper, &[&spec], &["-o", events.to_str().unwrap()], &marker);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(TARGET_STATUS), "{name}: {stderr}");
        assert!(marker.exists(), "{name}: the target did not run");
        let expected: Vec<(u64, u64)> =
            expected_calls().into_iter().flat_map(|call| std::iter::repeat_n(call, runs)).collect();
        assert_eq!(calls_in(&events), expected, "{name}: {stderr}");
        assert!(!stderr.contains("warning"), "{name}: {stderr}");
    }
}

#[test]
fn a_probe_an_execd_image_lacks_is_a_warning_once_and_the_rest_keep_working() {
    // bash's `execute_command` is not in the target, which bash runs twice.
    let marker = marker("exec-missing");
    let events = scratch().join(format!("events-exec-missing-{}.txt", std::process::id()));
    let module = target().file_name().unwrap().to_str().unwrap();
    let spec = format!("p:checksum {module}:checksum seed=$arg1 n=$arg2");
    let wrapper = ["bash", "-c", "\"$0\" \"$@\"; exec \"$0\" \"$@\""];
    let out = probe_through(&wrapper, &["p:execute_command", &spec], &["-o", events.to_str().unwrap()], &marker);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(TARGET_STATUS), "{stderr}");
    let warning = format!(
        "dynprobe: warning: probe `p:execute_command` is not placed in `{}` (exec'd): unknown symbol",
        target().display()
    );
    assert_eq!(stderr.matches(&warning).count(), 1, "{stderr}");
    let lines = std::fs::read_to_string(&events).unwrap();
    let (shell, checksum): (Vec<&str>, Vec<&str>) = lines.lines().partition(|l| l.contains("] execute_command:"));
    assert!(!shell.is_empty(), "bash's own probe never fired: {lines}");
    let mut calls: Vec<(u64, u64)> =
        checksum.iter().map(|l| parse_text_event(l)).map(|(_, seed, n)| (seed, n)).collect();
    calls.sort();
    let twice: Vec<(u64, u64)> = expected_calls().into_iter().flat_map(|c| [c, c]).collect();
    assert_eq!(calls, twice);
}

#[test]
fn probes_driven_by_ptrace_follow_exec_too() {
    // Placed in bash first (where `execute_command` is), then again in the target bash
    // execs, which lacks that one: a warning, while libc's `pthread_create` fires for the
    // target's two threads. The target bash runs first as a child is not followed (ptrace
    // follows no fork), but inherits the breakpoints until its own exec and must survive
    // them.
    let marker = marker("exec-ptrace");
    let events = scratch().join(format!("events-exec-ptrace-{}.txt", std::process::id()));
    let wrapper = ["bash", "-c", "\"$0\" \"$@\"; echo child $?; exec \"$0\" \"$@\""];
    // The refused spec between two others: each event keeps its own spec's name.
    let specs = ["p:libc:pthread_create", "p:execute_command", "p:libc:pthread_join"];
    let out = probe_through(&wrapper, &specs, &["--ptrace", "-o", events.to_str().unwrap()], &marker);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(TARGET_STATUS), "{stderr}");
    assert!(marker.exists(), "the target did not run: {stderr}");
    assert!(text(&out.stdout).contains(&format!("child {TARGET_STATUS}\n")), "{}", text(&out.stdout));
    let warning = format!(
        "dynprobe: warning: probe `p:execute_command` is not placed in `{}` (exec'd): unknown symbol",
        target().display()
    );
    assert_eq!(stderr.matches(&warning).count(), 1, "{stderr}");
    let lines = std::fs::read_to_string(&events).unwrap();
    let shell = lines.lines().filter(|l| l.contains("] execute_command:")).count();
    let created = lines.lines().filter(|l| l.contains("] libc_pthread_create:")).count();
    let joined = lines.lines().filter(|l| l.contains("] libc_pthread_join:")).count();
    assert!(shell > 0, "bash's own probe never fired: {lines}");
    assert_eq!((created, joined), (2, 2), "{lines}\n{stderr}");
}

#[test]
fn a_probed_program_that_outlives_dynprobe_is_not_killed_by_its_probes() {
    // The shell exits at once and dynprobe with it; a second later its background child
    // runs the target, still probed, whose hits find no reader any more.
    let marker = marker("outlives");
    let status = scratch().join(format!("outlives-status-{}", std::process::id()));
    let _ = std::fs::remove_file(&status);
    let module = target().file_name().unwrap().to_str().unwrap();
    let spec = format!("p:checksum {module}:checksum seed=$arg1 n=$arg2");
    let script = "(sleep 1; \"$0\" \"$1\"; echo $? > \"$2\") </dev/null >/dev/null 2>&1 &";
    let target = target().to_str().unwrap();
    let args = ["probe", &spec, "--", "bash", "-c", script, target, marker.to_str().unwrap(), status.to_str().unwrap()];
    let out = dynprobe(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !status.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let code = std::fs::read_to_string(&status).expect("the background target never finished");
    // 141 would be 128 + SIGPIPE.
    assert_eq!(code.trim(), TARGET_STATUS.to_string(), "the target died");
    assert!(marker.exists());
}

#[test]
fn a_probe_refused_in_a_wrapper_script_says_the_script_was_probed_first() {
    let script = scratch().join(format!("wrapper-{}.sh", std::process::id()));
    std::fs::write(&script, "#!/bin/sh\nexec \"$@\"\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let marker = marker("wrapper-script");
    let out = probe_through(&[script.to_str().unwrap()], &["p:checksum"], &[], &marker);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!marker.exists(), "the program ran");
    assert!(stderr.contains("unknown symbol `checksum`"), "{stderr}");
    let hint = format!("`{}` is a script run by `/bin/sh`, which is probed first", script.display());
    assert!(stderr.contains(&hint), "{stderr}");
}

#[test]
fn json_lines_have_every_field() {
    let marker = marker("json");
    let out = probe(&["p:grp/sum checksum+0 seed=$arg1 n=$arg2:x64 ip=%rip:x64"], &["--json"], &marker);
    assert_eq!(out.status.code(), Some(TARGET_STATUS), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // The program's own lines are on the same stdout; events are the JSON objects.
    let events: Vec<serde_json::Value> =
        stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), expected_calls().len());
    let mut calls = Vec::new();
    for event in &events {
        assert!(event["time"].as_f64().unwrap() >= 0.0, "{event}");
        assert!(event["ns"].as_u64().is_some(), "{event}");
        assert!(event["tid"].as_u64().unwrap() > 0, "{event}");
        assert_eq!(event["event"], "grp/sum");
        let args = &event["args"];
        let n = args["n"].as_str().unwrap().strip_prefix("0x").unwrap();
        calls.push((args["seed"].as_u64().unwrap(), u64::from_str_radix(n, 16).unwrap()));
        assert!(args["ip"].as_str().unwrap().starts_with("0x"), "{event}");
    }
    calls.sort();
    assert_eq!(calls, expected_calls());
    // Every hit is at the same address, the probed one.
    let ips: std::collections::HashSet<_> = events.iter().map(|e| e["args"]["ip"].clone()).collect();
    assert_eq!(ips.len(), 1);
}

/// Runs a probe that must be refused and returns stderr, checking that dynprobe exited
/// with 2 and the program's `main` never ran.
fn refused(test: &str, specs: &[&str]) -> String {
    let marker = marker(test);
    let out = probe(specs, &[], &marker);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(!marker.exists(), "the program ran despite the refused probe");
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
    stderr
}

#[test]
fn bad_syntax_points_at_the_column_and_nothing_runs() {
    let stderr = refused("syntax", &["p:checksum x=%rdz"]);
    assert_eq!(
        stderr,
        "dynprobe: bad probe spec: unknown register `rdz` at column 15\n  p:checksum x=%rdz\n                ^\n"
    );
}

#[test]
fn unknown_symbol_is_refused_before_main() {
    // The first probe is placed and must be taken out again.
    let stderr = refused("symbol", &["p:checksum", "p:no_such_function n=$arg1"]);
    assert!(
        stderr.starts_with(
            "dynprobe: cannot place probe `p:no_such_function n=$arg1`: unknown symbol `no_such_function`"
        ),
        "{stderr}"
    );
    assert!(stderr.trim_end().ends_with("; the program was not run"), "{stderr}");
}

#[test]
fn offset_inside_an_instruction_is_refused_before_main() {
    let stderr = refused("mid", &["p:wide+2"]);
    assert!(stderr.starts_with("dynprobe: cannot place probe `p:wide+2`: "), "{stderr}");
    assert!(stderr.contains("is inside the instruction"), "{stderr}");
    assert!(stderr.contains("the program was not run"), "{stderr}");
}

#[test]
fn a_missing_program_is_a_clear_error() {
    let out = dynprobe(&["probe", "p:main", "--", "/nonexistent/program"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "dynprobe: cannot run `/nonexistent/program`: no such program (check the path, or PATH)\n"
    );
}

#[test]
fn a_pid_and_a_program_together_are_refused() {
    let out = dynprobe(&["probe", "-p", "1", "p:main", "--", "/bin/true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot be used with"), "{}", text(&out.stderr));
}

#[test]
fn demo_probe_shows_its_command_and_events() {
    let out = dynprobe(&["demo", "--probe"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).starts_with("$ dynprobe probe 'p:parse_record"), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.matches("] parse_record: line=0x").count(), 4, "{stdout}");
    assert_eq!(stdout.matches("] checksum: seed=").count(), 3, "{stdout}");
    assert!(stdout.contains("] checksum: seed=12 n=1\n"), "{stdout}");
}

#[test]
fn demo_records_the_demo_and_replays_its_call_graph() {
    let out = dynprobe(&["demo"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("$ dynprobe record -o "), "{stderr}");
    assert!(stderr.contains("$ dynprobe replay "), "{stderr}");
    // The trace's directory is gone with the demo: the last word says so, and what to run.
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(last.contains("removed now") && last.contains("dynprobe record -o DIR"), "{stderr}");
    let stdout = text(&out.stdout);
    // The program's own output, then the call graph: main calls parse_record for each of
    // the 4 records and checksum for the 3 well-formed ones.
    assert!(stdout.contains("total 0x"), "{stdout}");
    assert!(stdout.contains("| main() {"), "{stdout}");
    assert_eq!(stdout.matches("|   parse_record();").count(), 4, "{stdout}");
    assert_eq!(stdout.matches("|   checksum();").count(), 3, "{stdout}");
    assert!(stdout.contains("| } /* main */"), "{stdout}");
}

/// The agent places the probes from the loader's constructor, on the program's main thread,
/// before `main`: its own allocations are not the program's, and no probe sees them. (Run
/// without the marker argument, the target allocates nothing before its first `checksum`.)
#[test]
fn the_agent_setting_up_is_never_seen_by_a_probe() {
    let target = target().to_str().unwrap();
    let out = dynprobe(&["probe", "p:libc:malloc", "p:libc:free", "p:checksum", "--", target]);
    assert_eq!(out.status.code(), Some(TARGET_STATUS), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let first = stdout.lines().find(|l| l.contains("] libc_") || l.contains("] checksum"));
    assert!(first.is_some_and(|l| l.contains("] checksum")), "a hit before main's first call: {first:?}\n{stdout}");
}

/// libc's `write` and `syscall` can be probed, with and without optimization: the events are
/// exactly the program's own calls — dynprobe's event writer makes raw system calls, so its
/// writes are neither events nor misses.
#[test]
fn write_and_syscall_are_probed_and_only_the_programs_own_calls_are_seen() {
    let exe = common::build_c("writes.c", "writes", &[]);
    for options in [&[][..], &["--no-optimize"]] {
        let specs = ["p:libc:write fd=$arg1:s32 n=$arg3:u64", "p:libc:syscall nr=$arg1:s64"];
        let (out, events) = probe_into_file(&exe, "writes", options, &specs, "300");
        let program_lines = text(&out.stdout).lines().count();
        assert_eq!(program_lines, 300, "{options:?}: the program's output changed");
        let writes: Vec<&str> = events.lines().filter(|l| l.contains("libc_write:")).collect();
        assert_eq!(writes.len(), 300, "{options:?}: {} write events for 300 calls:\n{events}", writes.len());
        for (i, line) in writes.iter().enumerate() {
            assert!(line.ends_with(&format!("fd=1 n={}", 1 + i % 40)), "{options:?}: call {i}: {line}");
        }
        assert!(!text(&out.stderr).contains("missed"), "{options:?}: {}", text(&out.stderr));
    }
}

/// Runs `exe arg` under `dynprobe probe OPTIONS -o FILE SPECS`, checks that it succeeded, and
/// returns its output and the events written to the file.
fn probe_into_file(exe: &Path, name: &str, options: &[&str], specs: &[&str], arg: &str) -> (Output, String) {
    let (out, events) = common::probe_to_file(&format!("{name}-{}", options.len()), options, specs, exe, arg);
    assert!(out.status.success(), "{options:?}: {}: {}", out.status, text(&out.stderr));
    (out, events)
}

/// glibc's memcpy, memset and strlen (indirect functions: the probes go on the
/// implementations the dynamic linker chose), clock_gettime and __errno_location are
/// probed with and without optimization, and the events are exactly the program's own
/// calls, with the sizes it logged: the agent's copies and fills are its own, its clock
/// the vDSO's, and it leaves errno alone.
#[test]
fn memcpy_memset_and_strlen_are_probed_and_only_the_programs_own_calls_are_seen() {
    let exe = common::build_c("memfuncs.c", "memfuncs", &["-fno-builtin".as_ref()]);
    let specs = [
        "p:libc:memcpy n=$arg3:u64",
        "p:libc:memset n=$arg3:u64",
        "p:libc:strlen",
        "r:libc:strlen len=$retval:u64",
        "p:libc:clock_gettime clock=$arg1:s32",
        "p:libc:__errno_location",
    ];
    for options in [&[][..], &["--no-optimize"]] {
        let (out, events) = probe_into_file(&exe, "memfuncs", options, &specs, "200");
        // The program's log: "<memset n> <memcpy n> <strlen result>" a round.
        let mut expected = Vec::new();
        for line in text(&out.stdout).lines() {
            let n: Vec<&str> = line.split(' ').collect();
            expected.extend([
                format!("libc_memset: n={}", n[0]),
                format!("libc_memcpy: n={}", n[1]),
                "libc_strlen:".to_string(),
                format!("libc_strlen__return: len={}", n[2]),
                format!("libc_clock_gettime: clock={}", libc::CLOCK_MONOTONIC),
                "libc___errno_location:".to_string(),
            ]);
        }
        assert_eq!(expected.len(), 6 * 200, "{options:?}: the program's output changed");
        // "   0.458570 [18728] libc_memset: n=100": the event after the thread.
        let seen: Vec<&str> =
            events.lines().map(|l| l.split_once("] ").unwrap_or_else(|| panic!("{l}")).1.trim_end()).collect();
        assert_eq!(seen, expected, "{options:?}");
        assert!(!text(&out.stderr).contains("missed"), "{options:?}: {}", text(&out.stderr));
        // glibc's memcpy and memmove share their implementation: the user is told.
        assert!(text(&out.stderr).contains("memcpy → __mem"), "{options:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("(shared with memmove)"), "{options:?}: {}", text(&out.stderr));
    }
}
