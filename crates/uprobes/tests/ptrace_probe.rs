//! The ptrace fallback against a statically linked, multi-threaded C program
//! (`targets/static_work.c`), driven through the crate's `dynprobe-uprobes` binary, which
//! runs the tracer in its own process as the CLI does.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const TRACER: &str = env!("CARGO_BIN_EXE_dynprobe-uprobes");

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dynprobe-uprobes-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Compiles `source` statically, once per test run.
fn build(source: &str, name: &str) -> PathBuf {
    let out = scratch().join(name);
    let status = Command::new("cc")
        .args(["-static", "-O1", "-fno-inline", "-fcf-protection=none", "-pthread", "-o"])
        .arg(&out)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(source))
        .status()
        .expect("cannot run cc");
    assert!(status.success(), "cc -static {source} failed (is the static glibc, libc6-dev, installed?)");
    out
}

fn target() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build("tests/targets/static_work.c", "static_work"))
}

fn mix(a: u64, b: u64) -> u64 {
    a.wrapping_mul(31).wrapping_add(b ^ 0x5bd1e995)
}

fn fold(x: u64, k: u64) -> u64 {
    ((x >> 3).wrapping_add(k.wrapping_mul(7))) ^ mix(x, k)
}

/// Every (x, k) one run passes to fold (and fold to mix).
fn calls(threads: u64, rounds: u64) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> =
        (0..threads).flat_map(|t| (0..rounds).map(move |i| (t * 1000003 + i, i & 7))).collect();
    all.sort_unstable();
    all
}

/// How long any one wait of these tests lasts before the test fails, saying what it waited
/// for: a stuck tracer or program must fail its test, never hang CI.
const PATIENCE: Duration = Duration::from_secs(120);

/// The lines a child writes, read on a thread of their own (a full pipe would stall the
/// child, and with a tracer the program it holds).
struct Lines {
    lines: Receiver<String>,
    /// Who writes them, for a failure message.
    who: String,
}

impl Lines {
    fn read(from: impl Read + Send + 'static, who: &str) -> Lines {
        let (send, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { lines, who: who.to_string() }
    }

    /// The next line, `None` once the output ended; fails the test after [`PATIENCE`].
    fn next(&mut self) -> Option<String> {
        match self.lines.recv_timeout(PATIENCE) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("{} wrote no line for {PATIENCE:?}", self.who),
        }
    }
}

/// Waits for `child` to end; after [`PATIENCE`] kills it and fails the test.
fn wait_within(child: &mut Child, who: &str) -> ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{who} still ran {PATIENCE:?} after it should have ended");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The checksum line of an unprobed run.
fn unprobed(threads: u64, rounds: u64, wait: u8) -> String {
    let mut child = Command::new(target())
        .args([threads.to_string(), rounds.to_string(), wait.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut stdout = child.stdout.take().unwrap();
    assert!(wait_within(&mut child, "the unprobed program").success());
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    out.lines().last().unwrap().to_string()
}

/// A target started and waiting for "go" (it printed `waiting PID`), with its pid; killed
/// if the test ends without finishing it.
struct Program {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines,
    pid: i32,
}

impl Program {
    fn start(threads: u64, rounds: u64, wait: u8) -> Program {
        Program::start_exe(target(), &[threads.to_string(), rounds.to_string(), wait.to_string()])
    }

    fn start_exe(exe: &Path, args: &[String]) -> Program {
        let mut child = Command::new(exe).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let stdin = child.stdin.take();
        let mut stdout = Lines::read(child.stdout.take().unwrap(), &exe.display().to_string());
        let line = stdout.next().unwrap_or_default();
        let pid = line.trim().strip_prefix("waiting ").unwrap_or_else(|| panic!("{line:?}")).parse().unwrap();
        Program { child, stdin, stdout, pid }
    }

    /// Sends "go" and ends its stdin.
    fn go(&mut self) {
        self.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }

    /// Its checksum line, once it finished with status 0.
    fn finish(self) -> String {
        self.output().lines().last().unwrap_or_default().trim().to_string()
    }

    /// Everything it printed after `waiting PID`, once it finished with status 0.
    fn output(mut self) -> String {
        let mut text = String::new();
        while let Some(line) = self.stdout.next() {
            text.push_str(&line);
            text.push('\n');
        }
        let status = wait_within(&mut self.child, &self.stdout.who);
        assert!(status.success(), "the program ended with {status} after printing {text:?}");
        text
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tracer process: protocol lines from its stdout, control through its stdin; killed
/// if the test ends before it did.
struct Tracer {
    child: Child,
    control: Option<ChildStdin>,
    lines: Lines,
}

impl Tracer {
    fn start(args: &[&str]) -> Tracer {
        let mut child = Command::new(TRACER).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let control = child.stdin.take();
        let lines = Lines::read(child.stdout.take().unwrap(), &format!("the tracer ({args:?})"));
        Tracer { child, control, lines }
    }

    fn attach(pid: i32, specs: &[&str]) -> Tracer {
        let pid = pid.to_string();
        let mut args = vec!["-p", pid.as_str()];
        args.extend(specs);
        Tracer::start(&args)
    }

    fn line(&mut self) -> Option<String> {
        self.lines.next().map(|line| line.trim_end().to_string())
    }

    /// Every line until the tracer's output ends, and whether it exited successfully.
    fn rest(mut self) -> (Vec<String>, bool) {
        let mut all = Vec::new();
        while let Some(line) = self.line() {
            all.push(line);
        }
        drop(self.control.take());
        let status = wait_within(&mut self.child, &self.lines.who);
        (all, status.success())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name=value` fields of a hit line, by event.
fn hits<'a>(lines: &'a [String], event: &str) -> Vec<HashMap<&'a str, &'a str>> {
    lines
        .iter()
        .filter(|l| l.split(' ').nth(2) == Some(event))
        .map(|l| l.split(' ').skip(3).map(|w| w.split_once('=').unwrap()).collect())
        .collect()
}

fn num(text: &str) -> u64 {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
        None => text.parse().unwrap(),
    }
}

const SPECS: [&str; 4] = ["p:mix a=$arg1 b=$arg2", "r:mix r=$retval:x64", "p:fold x=$arg1 k=$arg2", "r:fold r=$retval"];

/// Checks the four probes' events against what a run of `threads` × `rounds` did.
fn check_events(lines: &[String], threads: u64, rounds: u64) {
    let expected = calls(threads, rounds);
    let pairs = |event: &str, a: &str, b: &str| {
        let mut got: Vec<(u64, u64)> = hits(lines, event).iter().map(|h| (num(h[a]), num(h[b]))).collect();
        got.sort_unstable();
        got
    };
    assert_eq!(pairs("mix", "a", "b"), expected, "mix's arguments");
    assert_eq!(pairs("fold", "x", "k"), expected, "fold's arguments");
    let returns = |event: &str, f: fn(u64, u64) -> u64| {
        let mut got: Vec<u64> = hits(lines, event).iter().map(|h| num(h["r"])).collect();
        got.sort_unstable();
        let mut want: Vec<u64> = expected.iter().map(|&(x, k)| f(x, k)).collect();
        want.sort_unstable();
        assert_eq!(got, want, "{event}'s return values");
    };
    returns("mix__return", mix);
    returns("fold__return", fold);
}

#[test]
fn attached_probes_see_every_call_with_its_arguments_and_return_value() {
    let (threads, rounds) = (4, 300);
    let reference = unprobed(threads, rounds, 1);
    let mut program = Program::start(threads, rounds, 1);
    let mut tracer = Tracer::attach(program.pid, &SPECS);
    assert_eq!(tracer.line().as_deref(), Some("!ready 4"));
    program.go();
    // Read the events meanwhile: a full pipe would hold the tracer, and the program with it.
    let events = std::thread::spawn(move || tracer.rest());
    let checksum = program.finish();
    let (lines, ok) = events.join().unwrap();
    assert!(ok);
    assert_eq!(lines.last().map(String::as_str), Some("!exited 0"));
    check_events(&lines, threads, rounds);
    // Same work, same signals delivered (every 64th round raises SIGUSR1).
    assert_eq!(checksum, reference);
    assert!(checksum.contains(&format!("signals={}", threads * (rounds / 64))), "{checksum}");
}

#[test]
fn a_started_program_is_probed_from_its_first_instruction() {
    let (threads, rounds) = (3, 100);
    let out = scratch().join("command.txt");
    let reference = unprobed(threads, rounds, 0);
    let mut args: Vec<&str> = SPECS.to_vec();
    let (t, r) = (threads.to_string(), rounds.to_string());
    args.extend(["--", target().to_str().unwrap(), &t, &r, "0", out.to_str().unwrap()]);
    let mut tracer = Tracer::start(&args);
    assert_eq!(tracer.line().as_deref(), Some("!ready 4"));
    let (lines, ok) = tracer.rest();
    assert!(ok);
    assert_eq!(lines.last().map(String::as_str), Some("!exited 0"));
    check_events(&lines, threads, rounds);
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), reference);
}

/// Attaches to a long run, lets `hits` events come, then ends control with `end`; the
/// program must finish with the unprobed checksum.
fn detach_midway(end: fn(&mut Tracer)) {
    let (threads, rounds) = (4, 2000);
    let reference = unprobed(threads, rounds, 2);
    let mut program = Program::start(threads, rounds, 2);
    let mut tracer = Tracer::attach(program.pid, &SPECS);
    assert_eq!(tracer.line().as_deref(), Some("!ready 4"));
    program.go();
    for _ in 0..400 {
        let line = tracer.line().expect("events");
        assert!(!line.starts_with('!'), "{line}");
    }
    end(&mut tracer);
    let events = std::thread::spawn(move || tracer.rest());
    assert_eq!(program.finish(), reference);
    let (lines, ok) = events.join().unwrap();
    assert!(ok);
    assert!(lines.iter().all(|l| !l.starts_with("!exited")), "the program ended before detaching");
}

#[test]
fn detaching_midway_leaves_the_program_unharmed() {
    detach_midway(|t| t.control.as_mut().unwrap().write_all(b"detach\n").unwrap());
}

#[test]
fn a_dead_controller_closing_the_control_pipe_detaches_cleanly() {
    detach_midway(|t| drop(t.control.take()));
}

/// A refused spec gives one `!error` line and a failing tracer, and the program runs on
/// untouched; returns the message.
fn refused(spec: &str) -> String {
    let (threads, rounds) = (2, 100);
    let reference = unprobed(threads, rounds, 1);
    let mut program = Program::start(threads, rounds, 1);
    // A valid probe first: it must be taken back too.
    let tracer = Tracer::attach(program.pid, &["p:fold", spec]);
    let (lines, ok) = tracer.rest();
    assert!(!ok);
    program.go();
    assert_eq!(program.finish(), reference);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let prefix = format!("!error {spec}: ");
    lines[0].strip_prefix(&prefix).unwrap_or_else(|| panic!("{lines:?}")).to_string()
}

#[test]
fn an_unknown_symbol_is_refused_with_suggestions() {
    assert_eq!(refused("p:mxi"), "unknown symbol `mxi`; did you mean `mix`?");
}

#[test]
fn an_offset_inside_an_instruction_is_refused() {
    // mix starts with `mov %rdi,%rax` (3 bytes) at -O1.
    let message = refused("p:mix+1");
    assert!(message.contains("is inside the instruction at") && message.contains("mov"), "{message}");
}

#[test]
fn a_missing_process_is_a_clear_error() {
    let out = Command::new(TRACER).args(["-p", "999999999", "p:mix"]).stdin(Stdio::piped()).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no process with pid 999999999") || stderr.contains("999999999"), "{stderr}");
}

#[test]
fn a_failed_benchmark_leaves_no_scratch_directory() {
    // The result file's directory is a fresh mkdtemp one, removed however the run ends:
    // here a program that cannot be started.
    let tmp = scratch().join(format!("bench-tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let out =
        Command::new(TRACER).args(["--bench", "/nonexistent/program", "10"]).env("TMPDIR", &tmp).output().unwrap();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn the_benchmark_counts_every_hit() {
    let program = build("bench/ptrace_probe.c", "ptrace_probe");
    let out = Command::new(TRACER).arg("--bench").arg(&program).arg("20000").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("hits=20000"), "{text}");
    eprintln!("ptrace-probe: {text}");
}

#[test]
fn a_usdt_semaphore_is_raised_while_attached_and_lowered_at_detach() {
    // The CLI's USDT target (sys/sdt.h, a semaphore-guarded probe), statically linked:
    // the ptrace backend's own case. It answers each number of rounds on stdin with
    // `enabled E semaphore S`.
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let exe = BUILT.get_or_init(|| build("../cli/tests/targets/usdt.c", "usdt"));
    let mut child = Command::new(exe).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert_eq!(first.trim(), format!("ready {}", child.id()));
    let pid = child.id() as i32;
    let mut ask = |rounds: u32| {
        writeln!(stdin, "{rounds}").unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    assert_eq!(ask(10), "enabled 0 semaphore 0", "nobody listens");
    let mut tracer = Tracer::attach(pid, &["m:usdt_app:work"]);
    assert_eq!(tracer.line().as_deref(), Some("!ready 1"));
    assert_eq!(ask(10), "enabled 10 semaphore 1", "raised while attached");
    let events: Vec<String> = (0..10).map(|_| tracer.line().expect("an event")).collect();
    let fields: Vec<(u64, u64)> =
        hits(&events, "usdt_app/work").iter().map(|h| (num(h["arg1"]), num(h["arg2"]))).collect();
    assert_eq!(fields, (0..10).map(|i| (i, i + 1)).collect::<Vec<_>>(), "{events:#?}");
    tracer.control.as_mut().unwrap().write_all(b"detach\n").unwrap();
    let (rest, ok) = tracer.rest();
    assert!(ok, "{rest:?}");
    assert_eq!(ask(10), "enabled 0 semaphore 0", "lowered at detach");
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

/// The first bytes of `symbol` in process `pid` (the target is static and not PIE: its
/// addresses are `nm`'s).
fn code(pid: i32, symbol: &str) -> Vec<u8> {
    let out = Command::new("nm").arg(target()).output().expect("run nm (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.ends_with(&format!(" T {symbol}"))).expect("the symbol in nm's list");
    let addr = u64::from_str_radix(line.split(' ').next().unwrap(), 16).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut bytes = vec![0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut bytes, addr).unwrap();
    bytes
}

/// Polls until `mix` and `fold` of `pid` hold `before` again (the fallback handler left in
/// the target restores them at its first trap half a second after the tracer's death).
fn wait_restored(pid: i32, before: &[Vec<u8>; 2]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let now = || [code(pid, "mix"), code(pid, "fold")];
    while &now() != before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(&now(), before, "the probed bytes were not restored after the tracer died");
}

/// Kills the tracer with SIGKILL once `lines` hit lines came, with hits in flight.
fn kill_after(mut tracer: Tracer, lines: usize) {
    for _ in 0..lines {
        let line = tracer.line().expect("events");
        assert!(!line.starts_with('!'), "{line}");
    }
    tracer.child.kill().unwrap();
    tracer.child.wait().unwrap();
}

/// `checksum=… signals=… calls=…` of a run whose tracer was killed equals the unprobed
/// one's, but for SIGUSR1s the tracer held at that moment: the kernel drops the signal of a
/// signal-delivery-stop whose tracer dies (at most one per thread).
fn assert_same_run(got: &str, reference: &str, threads: u64) {
    let field = |line: &str, name: &str| -> u64 {
        let value = line.split(' ').find_map(|w| w.strip_prefix(name)).unwrap_or_else(|| panic!("{line:?}"));
        u64::from_str_radix(value, if name == "checksum=" { 16 } else { 10 }).unwrap()
    };
    assert_eq!(field(got, "checksum="), field(reference, "checksum="), "{got} vs {reference}");
    assert_eq!(field(got, "calls="), field(reference, "calls="), "{got} vs {reference}");
    let (signals, expected) = (field(got, "signals="), field(reference, "signals="));
    assert!(signals <= expected && signals + threads >= expected, "{got} vs {reference}");
}

/// The original first bytes of `mix` and `fold`, from a run nobody probes.
fn original_code() -> [Vec<u8>; 2] {
    let mut program = Program::start(1, 1, 1);
    let code = [code(program.pid, "mix"), code(program.pid, "fold")];
    program.go();
    program.finish();
    code
}

#[test]
fn killing_the_tracer_leaves_an_attached_program_running_with_its_original_code() {
    let (threads, rounds) = (4, 32000);
    let reference = unprobed(threads, rounds, 2);
    let mut program = Program::start(threads, rounds, 2);
    let before = [code(program.pid, "mix"), code(program.pid, "fold")];
    let mut tracer = Tracer::attach(program.pid, &SPECS);
    assert_eq!(tracer.line().as_deref(), Some("!ready 4"));
    assert_ne!(code(program.pid, "mix"), before[0], "mix is not patched");
    program.go();
    kill_after(tracer, 400);
    wait_restored(program.pid, &before);
    assert_same_run(&program.finish(), &reference, threads);
}

#[test]
fn killing_the_tracer_leaves_a_started_program_running_with_its_original_code() {
    let (threads, rounds) = (4, 32000);
    let out = scratch().join("killed-tracer.txt");
    let _ = std::fs::remove_file(&out);
    let reference = unprobed(threads, rounds, 0);
    let mut args: Vec<&str> = SPECS.to_vec();
    let (t, r) = (threads.to_string(), rounds.to_string());
    args.extend(["--", target().to_str().unwrap(), &t, &r, "3", out.to_str().unwrap()]);
    let mut tracer = Tracer::start(&args);
    assert_eq!(tracer.line().as_deref(), Some("!ready 4"));
    // The program is the tracer's child.
    let tracer_pid = tracer.child.id();
    let children = std::fs::read_to_string(format!("/proc/{tracer_pid}/task/{tracer_pid}/children")).unwrap();
    let pid: i32 = children.split_whitespace().next().expect("the started program").parse().unwrap();
    let before = original_code();
    assert_ne!(code(pid, "mix"), before[0], "mix is not patched");
    kill_after(tracer, 400);
    wait_restored(pid, &before);
    // It is not our child: its result file tells when it is done.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_same_run(std::fs::read_to_string(&out).unwrap_or_default().trim(), &reference, threads);
}

fn traps_target() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build("tests/targets/static_traps.c", "static_traps"))
}

#[test]
fn the_programs_own_traps_reach_its_own_handler_while_probed() {
    let target = traps_target().to_str().unwrap();
    let plain = Command::new(target).arg("200").output().unwrap();
    let reference = String::from_utf8(plain.stdout).unwrap();
    assert!(reference.starts_with("traps=40 bad=0 "), "{reference}");
    let tracer = Tracer::start(&["p:work i=$arg1", "r:work r=$retval", "--", target, "200"]);
    let child = tracer.child.id();
    let (lines, ok) = tracer.rest();
    assert!(ok, "tracer {child} failed: {lines:?}");
    assert_eq!(lines.last().map(String::as_str), Some("!exited 0"));
    // The program shares the tracer's stdout: its own line is among the events.
    assert!(lines.contains(&reference.trim().to_string()), "every trap handled by the program: {lines:?}");
    assert_eq!(hits(&lines, "work").len(), 200);
    assert_eq!(hits(&lines, "work__return").len(), 200);
}

#[test]
fn a_thread_blocking_every_signal_leaves_the_programs_own_trap_handler_in_place() {
    // Attached once the program's SIGTRAP handler is in place; the probe's int3s are all hit
    // by a thread that blocks every signal, which makes the kernel reset the action each
    // time; the program's own traps come after, while still attached, to its own handler.
    let (reference, mut program, tracer) = blocked_traps_attached();
    assert!(reference.starts_with("traps=40 bad=0 "), "{reference}");
    program.go();
    assert_eq!(program.output(), reference, "every trap handled by the program");
    let (lines, ok) = tracer.rest();
    assert!(ok, "{lines:?}");
    assert_eq!(lines.last().map(String::as_str), Some("!exited 0"));
    assert_eq!(hits(&lines, "work").len(), 200);
}

#[test]
fn killing_the_tracer_after_a_thread_blocking_every_signal_hit_a_probe_leaves_the_program_running() {
    // Each hit of the blocking thread resets the SIGTRAP action; the tracer dies among them,
    // and the rest of the hits must find the fallback handler in place, not SIG_DFL.
    let (reference, mut program, tracer) = blocked_traps_attached();
    program.go();
    kill_after(tracer, 50);
    assert_eq!(program.output(), reference);
}

/// The traps target in its `blocked` mode (its probed calls made by a thread that blocks
/// every signal, its own traps after): the output of an untraced run, and a second run
/// waiting for "go" with a tracer attached (`p:work`, ready).
fn blocked_traps_attached() -> (String, Program, Tracer) {
    let target = traps_target();
    let args = ["200".to_string(), "blocked".to_string()];
    let mut plain = Program::start_exe(target, &args);
    plain.go();
    let reference = plain.output();
    let program = Program::start_exe(target, &args);
    let mut tracer = Tracer::attach(program.pid, &["p:work i=$arg1"]);
    assert_eq!(tracer.line().as_deref(), Some("!ready 1"));
    (reference, program, tracer)
}

#[test]
fn a_trap_the_program_does_not_handle_kills_it_as_untraced() {
    let target = traps_target().to_str().unwrap();
    let tracer = Tracer::start(&["p:work", "--", target, "200", "nohandler"]);
    let (lines, _) = tracer.rest();
    assert_eq!(lines.last().map(String::as_str), Some("!killed 5"), "{lines:?}");
    assert_eq!(hits(&lines, "work").len(), 10, "it died at its first int3, after 10 calls");
}

fn sleepers_target() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build("tests/targets/static_sleepers.c", "static_sleepers"))
}

/// What `static_sleepers` prints when every blocking call returned as it would untraced
/// and every thread it created started once.
const SLEEPERS_OK: &str = "clock_nanosleep ok\nnanosleep ok\nfutex ok\nepoll_wait ok\nread ok\nthreads ok\n";

#[test]
fn blocked_calls_and_threads_being_created_come_through_many_sessions_unharmed() {
    // Each session stops every thread (some asleep in their calls, the spawner often inside
    // clone3), makes system calls on one of them to map the slots and install the fallback
    // SIGTRAP action, lets hits come, and stops them all again to put the action back.
    const SESSIONS: usize = 30;
    let mut program = Program::start_exe(sleepers_target(), &[]);
    let specs = ["p:tick kind=$arg1", "r:tick r=$retval", "p:spawned seq=$arg1"];
    let mut created = 0;
    for session in 0..SESSIONS {
        let mut tracer = Tracer::attach(program.pid, &specs);
        assert_eq!(tracer.line().as_deref(), Some("!ready 3"), "session {session}");
        for _ in 0..20 {
            let line = tracer.line().unwrap_or_else(|| panic!("session {session}: the tracer ended"));
            assert!(!line.starts_with('!'), "session {session}: {line}");
        }
        tracer.control.as_mut().unwrap().write_all(b"detach\n").unwrap();
        let (lines, ok) = tracer.rest();
        assert!(ok, "session {session}: {lines:?}");
        assert!(lines.iter().all(|l| !l.starts_with('!')), "session {session}: {lines:?}");
        created += hits(&lines, "spawned").len();
    }
    assert!(created > 0, "no thread was created while probed");
    program.go();
    assert_eq!(program.output(), SLEEPERS_OK);
}
