//! The real-program compatibility suite: programs from Debian packages that nobody here wrote
//! (`scripts/setup` installs them), each run untraced, then recorded (`dynprobe record`),
//! probed as dynprobe starts it (`dynprobe probe … -- PROG`) and probed attached while it
//! runs (`dynprobe probe -p PID`). Each traced run's standard output and exit status must
//! equal the untraced run's, byte for byte, and each traced run must have seen something.
//!
//! The table of what ran, with wall times untraced and traced, is printed (`--nocapture`
//! shows it) and is the one in the README.
//!
//! Needs root (or ptrace and perf rights) like the other end-to-end tests, and the agent
//! built beside `dynprobe` (`cargo build --workspace` first).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One program of the suite.
struct Program {
    /// What the table calls it.
    name: &'static str,
    /// What it stands for in the suite.
    role: &'static str,
    /// The command line.
    argv: &'static [&'static str],
    /// Its standard input, fed in `chunks` pieces with a pause between them (attach
    /// sessions happen during the pauses).
    input: fn() -> Vec<u8>,
    /// `record`'s filters (none: the whole executable).
    record: &'static [&'static str],
    /// `probe`'s specs.
    probe: &'static [&'static str],
}

/// What the attached sessions probe: the program reading its paced input (and the C
/// library's `read` is itself a function dynprobe's own machinery used to keep from being
/// probed).
const ATTACH_PROBES: &[&str] = &["p:libc:read fd=$arg1:s32 n=$arg3:u64", "r:libc:read got=$retval:s64"];

/// The programs: a multi-threaded compressor whose workers block every signal, two
/// interpreters, a database, a C++ program that installs its own signal handlers, a binary
/// of 78,000 functions, a program sleeping in `select` while attached, and more.
const PROGRAMS: &[Program] = &[
    Program {
        name: "xz -T2",
        role: "compressor, worker threads block every signal",
        argv: &["xz", "-T2", "-1", "-c", "--block-size=200000"],
        input: text_input,
        record: &["-F", "liblzma:lzma_*"],
        probe: &["p:liblzma:lzma_properties_size", "r:liblzma:lzma_block_uncomp_encode ret=$retval:u64"],
    },
    Program {
        name: "zstd -T2",
        role: "compressor, worker threads",
        argv: &["zstd", "-T2", "-3", "-c", "-q"],
        input: text_input,
        // A stripped executable, traced whole: its functions are found by their unwind
        // entries (named `sub_…`).
        record: &[],
        probe: &["p:libc:malloc size=$arg1:u64"],
    },
    Program {
        name: "python3.11",
        role: "interpreter",
        argv: &["/usr/bin/python3.11", "-S", "-c", PYTHON_SCRIPT],
        input: text_input,
        record: &[],
        probe: &["p:libc:malloc size=$arg1:u64", "r:libc:malloc ptr=$retval:x64"],
    },
    Program {
        name: "perl",
        role: "interpreter, sleeps in select() and checks it",
        argv: &["perl", "-e", PERL_SCRIPT],
        input: text_input,
        record: &["-F", "Perl_pp_*"],
        probe: &["p:libc:malloc size=$arg1:u64"],
    },
    Program {
        name: "sqlite3",
        role: "database",
        argv: &["sqlite3", ":memory:"],
        input: sql_input,
        record: &["-F", "libsqlite3:sqlite3_*"],
        probe: &["p:libsqlite3:sqlite3_step", "r:libsqlite3:sqlite3_prepare_v2 rc=$retval:s32"],
    },
    Program {
        name: "opt-14",
        role: "C++, installs its own signal handlers (SIGTRAP included)",
        argv: &["opt-14", "-O2", "-S", "-"],
        input: llvm_input,
        record: &[],
        probe: &["p:libc:sigaction sig=$arg1:s32", "p:libc:malloc size=$arg1:u64"],
    },
    Program {
        name: "node",
        role: "large binary (78,000 functions)",
        argv: &["node", "-e", NODE_SCRIPT],
        input: text_input,
        record: &[],
        probe: &["p:libc:malloc size=$arg1:u64"],
    },
    Program {
        name: "jq",
        role: "C program, JSON",
        argv: &["jq", "-c", ".n * 2"],
        input: json_input,
        // A stripped executable: the library does the work.
        record: &["-F", "libjq:jv_*"],
        probe: &["p:libc:malloc size=$arg1:u64"],
    },
];

/// Reads lines, counts words and bytes, and prints a digest: the same output whatever the
/// timing of its input.
const PYTHON_SCRIPT: &str = "import sys, hashlib\n\
h = hashlib.sha256(); n = 0\n\
for line in sys.stdin.buffer:\n    h.update(line); n += len(line.split())\n\
print(n, h.hexdigest())\n";

/// Sleeps in `select` between lines and says if one ever returned early (perl does not
/// retry `select` on EINTR).
const PERL_SCRIPT: &str = "my ($n, $w, $cut) = (0, 0, 0);\n\
while (my $line = <STDIN>) { $n++; $w += () = $line =~ /\\S+/g;\n\
  if ($n % 2000 == 0) { my $left = select(undef, undef, undef, 0.05); $cut++ if $left < 0; } }\n\
print \"$n lines, $w words, $cut sleeps cut short\\n\";\n";

/// Counts lines and bytes as they arrive.
const NODE_SCRIPT: &str = "let n = 0, b = 0;\n\
process.stdin.on('data', d => { b += d.length; for (const c of d) if (c === 10) n++; });\n\
process.stdin.on('end', () => console.log(n + ' lines ' + b + ' bytes'));\n";

fn text_input() -> Vec<u8> {
    let mut text = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        writeln!(text, "line {i} {x:x} the quick brown fox {} jumps", x % 977).unwrap();
    }
    text
}

fn sql_input() -> Vec<u8> {
    let mut sql = b"create table t(a integer, b text);\nbegin;\n".to_vec();
    for i in 0..3000 {
        writeln!(sql, "insert into t values({i}, 'row {}');", i * 7 % 101).unwrap();
    }
    sql.extend_from_slice(b"commit;\nselect count(*), sum(a), max(b) from t;\nselect b, count(*) from t group by b order by 2 desc, 1 limit 5;\n");
    sql
}

fn json_input() -> Vec<u8> {
    let mut json = Vec::new();
    for i in 0..5000 {
        writeln!(json, "{{\"n\": {i}, \"s\": \"v{i}\"}}").unwrap();
    }
    json
}

fn llvm_input() -> Vec<u8> {
    let mut ir = Vec::new();
    for f in 0..60 {
        writeln!(
            ir,
            "define i64 @f{f}(i64 %n) {{\nentry:\n  br label %loop\nloop:\n  %i = phi i64 [0, %entry], [%i1, %loop]\n  \
             %s = phi i64 [0, %entry], [%s1, %loop]\n  %m = mul i64 %i, {f}\n  %s1 = add i64 %s, %m\n  %i1 = add i64 %i, 1\n  \
             %c = icmp slt i64 %i1, %n\n  br i1 %c, label %loop, label %done\ndone:\n  ret i64 %s1\n}}\n"
        )
        .unwrap();
    }
    ir
}

/// What one run gave.
struct Run {
    status: ExitStatus,
    stdout: Vec<u8>,
    wall: Duration,
}

/// How the other runs feed their input: all at once.
const AT_ONCE: (usize, Duration) = (1, Duration::ZERO);
/// How the attached run feeds its input: ten pieces 200 ms apart, so that the program is
/// still working while dynprobe attaches, places its probes and detaches.
const PACED: (usize, Duration) = (10, Duration::from_millis(200));

/// Starts `argv` (through `prefix`, a dynprobe command, if any) with `input` fed in
/// `pace.0` pieces `pace.1` apart; `during` runs with the program's pid after the first.
fn run(prefix: &[String], argv: &[&str], input: &[u8], pace: (usize, Duration), during: impl FnOnce(i32)) -> Run {
    let started = Instant::now();
    let (exe, args) = match prefix.split_first() {
        Some((exe, rest)) => (exe.as_str(), rest.iter().map(String::as_str).chain(argv.iter().copied()).collect()),
        None => (argv[0], argv[1..].to_vec()),
    };
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {exe} (scripts/setup installs the suite's programs): {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stdout.read_to_end(&mut bytes).unwrap();
        bytes
    });
    let err = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stderr.read_to_end(&mut bytes).unwrap();
        bytes
    });
    let chunk = input.len().div_ceil(pace.0);
    let mut pieces = input.chunks(chunk.max(1));
    if let Some(first) = pieces.next() {
        let _ = stdin.write_all(first);
    }
    let pid = child.id() as i32;
    let feeder = std::thread::spawn({
        let rest: Vec<Vec<u8>> = pieces.map(<[u8]>::to_vec).collect();
        move || {
            for piece in rest {
                std::thread::sleep(pace.1);
                if stdin.write_all(&piece).is_err() {
                    break;
                }
            }
        }
    });
    during(pid);
    feeder.join().unwrap();
    let status = child.wait().unwrap();
    let stdout = out.join().unwrap();
    let stderr = err.join().unwrap();
    if !prefix.is_empty() {
        // dynprobe's own diagnostics, for the failure messages.
        LAST_STDERR.lock().unwrap().clone_from(&String::from_utf8_lossy(&stderr).into_owned());
    }
    Run { status, stdout, wall: started.elapsed() }
}

static LAST_STDERR: Mutex<String> = Mutex::new(String::new());

fn last_stderr() -> String {
    LAST_STDERR.lock().unwrap().clone()
}

fn dynprobe_path() -> String {
    env!("CARGO_BIN_EXE_dynprobe").to_string()
}

fn scratch(name: &str) -> PathBuf {
    let dir = common::scratch().join(name.replace([' ', '/'], "_"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Checks a traced run against the untraced one.
fn same(program: &Program, mode: &str, plain: &Run, traced: &Run, extra: &str) {
    assert_eq!(
        traced.status.code(),
        plain.status.code(),
        "{} under {mode}: exit status {:?} instead of {:?}\n{extra}\ndynprobe said:\n{}",
        program.name,
        traced.status,
        plain.status,
        last_stderr()
    );
    assert!(
        traced.stdout == plain.stdout,
        "{} under {mode}: its output differs from the untraced run ({} bytes instead of {}; first difference at \
         byte {:?})\n{extra}\ndynprobe said:\n{}",
        program.name,
        traced.stdout.len(),
        plain.stdout.len(),
        traced.stdout.iter().zip(&plain.stdout).position(|(a, b)| a != b),
        last_stderr()
    );
}

/// The lines of an events file.
fn events(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

/// One program through the four runs; its table row.
fn check(program: &Program) -> String {
    let input = (program.input)();
    let plain = run(&[], program.argv, &input, AT_ONCE, |_| {});
    assert!(!plain.stdout.is_empty() || program.name.starts_with("xz"), "{}: no output untraced", program.name);
    let dir = scratch(program.name);
    let mut row = format!("| {} | {} | {:.2} s", program.name, program.role, plain.wall.as_secs_f64());

    // record, started
    let trace = dir.join("trace");
    let mut prefix = vec![dynprobe_path(), "record".into(), "-o".into(), trace.display().to_string()];
    prefix.extend(program.record.iter().map(|s| s.to_string()));
    prefix.push("--".into());
    let recorded = run(&prefix, program.argv, &input, AT_ONCE, |_| {});
    same(program, "record", &plain, &recorded, "");
    let replay = Command::new(dynprobe_path()).arg("report").arg(&trace).output().unwrap();
    assert!(replay.status.success(), "{}: report failed: {}", program.name, String::from_utf8_lossy(&replay.stderr));
    let calls = String::from_utf8_lossy(&replay.stdout).lines().count();
    assert!(calls > 2, "{}: the trace holds no call\n{}", program.name, last_stderr());
    row += &format!(" | {:.2} s", recorded.wall.as_secs_f64());

    // probe, started
    let started_events = dir.join("started.txt");
    let mut prefix = vec![dynprobe_path(), "probe".into(), "-o".into(), started_events.display().to_string()];
    prefix.extend(program.probe.iter().map(|s| s.to_string()));
    prefix.push("--".into());
    let probed = run(&prefix, program.argv, &input, AT_ONCE, |_| {});
    same(program, "probe (started)", &plain, &probed, "");
    let seen = events(&started_events);
    assert!(seen > 0, "{}: probe (started) saw no event\n{}", program.name, last_stderr());
    row += &format!(" | {:.2} s", probed.wall.as_secs_f64());

    // probe, attached while it runs
    // Attached while its input arrives in pieces: every one of these programs reads it then.
    let attached_events = dir.join("attached.txt");
    let mut session = String::new();
    let attached = run(&[], program.argv, &input, PACED, |pid| {
        let out = Command::new(dynprobe_path())
            .arg("probe")
            .arg("-p")
            .arg(pid.to_string())
            .arg("-o")
            .arg(&attached_events)
            .arg("--duration")
            .arg("800ms")
            .args(ATTACH_PROBES)
            .output()
            .unwrap();
        session = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // A program that finished before dynprobe got to it is no failure of dynprobe's.
        assert!(
            out.status.success() || session.contains("exited") || session.contains("No such process"),
            "{}: probe -p failed: {session}",
            program.name
        );
    });
    same(program, "probe -p (attached)", &plain, &attached, &session);
    let seen_attached = events(&attached_events);
    assert!(
        seen_attached > 0 || !session.contains("attached to"),
        "{}: probe -p attached but saw no event\n{session}",
        program.name
    );
    row += &format!(" | {:.2} s | {seen} / {seen_attached} |", attached.wall.as_secs_f64());
    row
}

/// The table's header, for the rows the tests print.
pub const HEADER: &str =
    "| program | what it stands for | untraced | record | probe (started) | probe -p (paced input) | \
                          events started / attached |";

/// One test per program, so that each failure names its program; the rows go to stderr.
macro_rules! compat {
    ($($test:ident => $index:expr,)*) => {$(
        #[test]
        fn $test() {
            let row = check(&PROGRAMS[$index]);
            eprintln!("{row}");
        }
    )*};
}

compat! {
    xz_with_workers_that_block_every_signal => 0,
    zstd_with_worker_threads => 1,
    python_interpreter => 2,
    perl_sleeping_in_select => 3,
    sqlite3_database => 4,
    opt14_with_its_own_signal_handlers => 5,
    node_with_78000_functions => 6,
    jq_json => 7,
}
