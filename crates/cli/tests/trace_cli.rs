//! Command-line tests: the `--help` of every subcommand and the exit-status convention
//! they share; `dynprobe record`, `replay`, `report` and `export`'s error paths, and the
//! three readers on a trace written by the real recorder from ring files made here the way
//! the agent makes them (so no agent is needed).

use dynprobe_events::clock::Clock;
use dynprobe_events::record::{Kind, Record};
use dynprobe_events::recorder::Recorder;
use dynprobe_events::ring::RingFile;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("trace-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `dynprobe ARGS`, with `DYNPROBE_AGENT` pointing at an existing file: the tests that get
/// as far as looking for the agent fail before it would be loaded.
fn dynprobe(args: &[&str]) -> Output {
    let exe = env!("CARGO_BIN_EXE_dynprobe");
    Command::new(exe).args(args).env("DYNPROBE_AGENT", exe).output().expect("run dynprobe")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks that `out` failed with status 2 and returns its stderr.
fn failed(out: &Output) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
    stderr
}

/// The readers' failures, with the same message for all three.
fn readers_fail(dir: &Path, expected: &str) {
    let dir = dir.to_str().unwrap();
    let chrome = format!("{dir}-out.json");
    for args in [vec!["replay", dir], vec!["report", dir], vec!["export", "--chrome", &chrome, dir]] {
        let stderr = failed(&dynprobe(&args));
        assert!(stderr.starts_with("dynprobe: ") && stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    assert!(!Path::new(&chrome).exists(), "nothing is written for a bad trace");
}

#[test]
fn a_missing_directory_is_named() {
    readers_fail(Path::new("/nonexistent/dynprobe.data"), "/nonexistent/dynprobe.data");
}

#[test]
fn a_directory_that_is_not_a_trace_says_so() {
    let dir = scratch("not-a-trace");
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    readers_fail(&dir, "is not a trace directory");
}

#[test]
fn a_corrupt_info_json_is_named() {
    let dir = scratch("corrupt");
    std::fs::write(dir.join("info.json"), "{\"format\": \"dynprobe-trace\", \"vers").unwrap();
    readers_fail(&dir, "info.json");
}

#[test]
fn record_without_a_program_or_with_a_missing_one() {
    let dir = scratch("record-missing");
    let out_dir = dir.join("t.data");
    let out_str = out_dir.to_str().unwrap();
    let stderr = failed(&dynprobe(&["record", "-o", out_str]));
    assert!(stderr.contains("no program to run; give it after `--`"), "{stderr}");

    let stderr = failed(&dynprobe(&["record", "-o", out_str, "--", "/nonexistent/program"]));
    assert_eq!(stderr, "dynprobe: cannot run `/nonexistent/program`: no such program (check the path, or PATH)\n");
    assert!(!out_dir.exists(), "no trace is left for a program that did not run");
}

#[test]
fn record_refuses_a_bad_buffer_size_before_running_anything() {
    let dir = scratch("record-buffer");
    let marker = dir.join("ran");
    let script = format!("touch {}", marker.display());
    let stderr = failed(&dynprobe(&["record", "--buffer-size", "100", "--", "/bin/sh", "-c", &script]));
    assert!(stderr.starts_with("dynprobe: --buffer-size 100: the records per ring must be a power of two"), "{stderr}");
    assert!(!marker.exists(), "the program ran");
}

#[test]
fn record_keeps_a_directory_that_is_not_a_trace() {
    let dir = scratch("record-other");
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    let stderr = failed(&dynprobe(&["record", "-o", dir.to_str().unwrap(), "--", "/bin/true"]));
    assert!(stderr.contains("holds something other than a dynprobe trace"), "{stderr}");
    assert_eq!(std::fs::read_to_string(dir.join("notes.txt")).unwrap(), "mine");
}

#[test]
fn export_needs_an_output() {
    let stderr = failed(&dynprobe(&["export", "/nonexistent"]));
    assert!(stderr.contains("nothing to export: give --chrome OUT.json and/or --folded OUT.txt"), "{stderr}");
}

/// The functions of the made-up image.
const FUNCS: &str = "0\t401000\tdemo\tmain\n1\t401100\tdemo\tparse_record\n2\t401200\tdemo\tchecksum\n";
const SITES: &str = "exe\t/bin/demo\nparent\t0\nkind\tmcount\t3\t3\n";
/// Threads of the made-up image.
const TID_A: u32 = 4242;
const TID_B: u32 = 4243;

/// A trace recorded by the real recorder: thread A runs main { parse_record { checksum }
/// checksum }, then thread B runs checksum.
fn recorded() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("recorded");
        let (rings, out) = (dir.join("rings"), dir.join("t.data"));
        let mut recorder = Recorder::new(&rings, &out, &["/bin/demo".to_string()]).unwrap();
        std::fs::create_dir_all(&rings).unwrap();
        let name = format!("{}.0", std::process::id());
        std::fs::write(rings.join(format!("{name}.funcs")), FUNCS).unwrap();
        std::fs::write(rings.join(format!("{name}.sites")), SITES).unwrap();
        let file = RingFile::create(&rings.join(format!("{name}.ring")), 2, 64, Clock::detect()).unwrap();
        let calls: [(usize, u32, Kind, u16, u64); 10] = [
            (0, TID_A, Kind::Entry, 0, 0),
            (0, TID_A, Kind::Entry, 1, 1),
            (0, TID_A, Kind::Entry, 2, 2),
            (0, TID_A, Kind::Exit, 2, 2),
            (0, TID_A, Kind::Exit, 1, 1),
            (0, TID_A, Kind::Entry, 1, 2),
            (0, TID_A, Kind::Exit, 1, 2),
            (0, TID_A, Kind::Exit, 0, 0),
            (1, TID_B, Kind::Entry, 0, 2),
            (1, TID_B, Kind::Exit, 0, 2),
        ];
        for (ring, tid, kind, depth, func) in calls {
            // A little time apart, so that every call lasts.
            std::thread::sleep(std::time::Duration::from_micros(20));
            file.push(ring, tid, Record::new(kind, file.clock().now(), depth, func));
        }
        recorder.poll().unwrap();
        let stats = recorder.finish(Some(0)).unwrap();
        assert_eq!((stats.events, stats.threads), (10, 2));
        out
    })
}

/// The replay with each line's duration column replaced by `D` when it has one.
fn masked(replay: &str) -> String {
    replay
        .lines()
        .map(|line| match line.split_at_checked(11) {
            Some((duration, rest)) if !line.starts_with('#') && !duration.trim().is_empty() => format!("D{rest}"),
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn replay_of_a_recorded_trace() {
    let dir = recorded().to_str().unwrap();
    let out = dynprobe(&["replay", dir]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let pid = std::process::id();
    assert_eq!(
        masked(&text(&out.stdout)),
        format!(
            "\
# DURATION     TID     FUNCTION
# pid {pid} (demo)
            [  4242] | main() {{
            [  4242] |   parse_record() {{
D [  4242] |     checksum();
D [  4242] |   }} /* parse_record */
D [  4242] |   checksum();
D [  4242] | }} /* main */
D [  4243] | checksum();"
        )
    );
    let filtered = dynprobe(&["replay", dir, "-F", "parse_*", "--tid", "4242"]);
    assert_eq!(
        masked(&text(&filtered.stdout)),
        format!(
            "\
# DURATION     TID     FUNCTION
# pid {pid} (demo)
            [  4242] | parse_record() {{
D [  4242] |   checksum();
D [  4242] | }} /* parse_record */"
        )
    );
    let hidden = dynprobe(&["replay", dir, "-N", "demo:parse_*", "--time-filter", "1ns"]);
    assert_eq!(hidden.status.code(), Some(0), "stderr: {}", text(&hidden.stderr));
    assert!(!text(&hidden.stdout).contains("parse_record"), "{}", text(&hidden.stdout));
    assert_eq!(text(&hidden.stdout).matches("checksum();").count(), 2);
}

#[test]
fn replay_filters_that_match_nothing_are_errors() {
    let dir = recorded().to_str().unwrap();
    let stderr = failed(&dynprobe(&["replay", dir, "-F", "parse_recrd"]));
    assert_eq!(stderr, "dynprobe: no function in the trace matches -F 'parse_recrd' (nearest: parse_record)\n");
    let stderr = failed(&dynprobe(&["replay", dir, "--tid", "1"]));
    assert_eq!(stderr, "dynprobe: thread 1 is not in the trace; its threads are 4242, 4243\n");
    let stderr = failed(&dynprobe(&["replay", dir, "--time-filter", "1 fortnight"]));
    assert!(stderr.contains("unknown unit `fortnight`"), "{stderr}");
}

#[test]
fn report_of_a_recorded_trace() {
    let dir = recorded().to_str().unwrap();
    let out = dynprobe(&["report", dir, "-s", "calls"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "  Total time   Self time    Avg time    Max time       Calls  Function");
    let rows: Vec<(&str, &str)> = lines[2..]
        .iter()
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            (words[words.len() - 2], words[words.len() - 1])
        })
        .collect();
    assert_eq!(rows, [("3", "checksum"), ("1", "main"), ("1", "parse_record")]);
}

#[test]
fn export_of_a_recorded_trace() {
    let dir = recorded();
    let json_path = dir.with_extension("json");
    let out = dynprobe(&["export", "--chrome", json_path.to_str().unwrap(), "--folded", "-", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let folded = text(&out.stdout);
    let stacks: Vec<&str> = folded.lines().map(|l| l.rsplit_once(' ').unwrap().0).collect();
    assert_eq!(stacks, ["checksum", "main", "main;checksum", "main;parse_record", "main;parse_record;checksum"]);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let names: Vec<&str> = json["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ph"] == "X")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["main", "parse_record", "checksum", "checksum", "checksum"]);
}

/// A copy of the recorded trace, to damage.
fn damaged(name: &str) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = scratch(name).join("t.data");
    copy(recorded(), &dir);
    dir
}

/// The `.dat` files of threads A and B in the trace `dir`.
fn thread_files(dir: &Path) -> (PathBuf, PathBuf) {
    let image = dir.join(format!("{}.0", std::process::id()));
    (image.join(format!("{TID_A}.dat")), image.join(format!("{TID_B}.dat")))
}

/// A 4 GiB `.dat` file of a valid start and then zeros (a hole of a sparse file) is
/// refused at its first zero record: read and checked a record at a time, never read whole
/// (reading it whole took 26 s and 8.4 GB). The readers run with 1 GiB of address space.
#[test]
fn a_sparse_multi_gib_thread_file_is_refused_at_once_in_bounded_memory() {
    use std::os::unix::process::CommandExt;
    let dir = damaged("sparse");
    let (dat, _) = thread_files(&dir);
    let valid = std::fs::metadata(&dat).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&dat).unwrap().set_len(4 << 30).unwrap();
    let chrome = dir.with_extension("json");
    let (dir, chrome) = (dir.to_str().unwrap(), chrome.to_str().unwrap());
    for args in [vec!["replay", dir], vec!["report", dir], vec!["export", "--chrome", chrome, dir]] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dynprobe"));
        command.args(&args);
        // SAFETY: setrlimit is async-signal-safe and only limits the child.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit { rlim_cur: 1 << 30, rlim_max: 1 << 30 };
                match libc::setrlimit(libc::RLIMIT_AS, &limit) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            })
        };
        let stderr = failed(&command.output().expect("run dynprobe"));
        assert_eq!(
            stderr,
            format!(
                "dynprobe: {}: corrupt record at byte {valid}: an all-zero record, never written (a hole or zeros in \
                 the file)\n",
                dat.display()
            ),
            "{args:?}"
        );
    }
    assert!(!Path::new(chrome).exists(), "nothing is written for a corrupt trace");
}

/// A `.dat` file cut short (inside a record, or at a record boundary: `info.json` says how
/// much the recorder wrote) or missing is named with the byte where its data stops, on
/// stderr, by each reader, which shows the rest; when nothing is left, that is the error.
#[test]
fn a_cut_or_missing_thread_file_is_said_loudly_and_the_rest_shown() {
    let dir = damaged("cut");
    let dir_text = dir.to_str().unwrap();
    let (a, b) = thread_files(&dir);
    let whole = std::fs::read(&a).unwrap();
    let (len, b_len) = (whole.len(), std::fs::metadata(&b).unwrap().len());
    let chrome = dir.with_extension("json");
    let readers = [
        vec!["replay", dir_text],
        vec!["report", dir_text],
        vec!["export", "--chrome", chrome.to_str().unwrap(), dir_text],
    ];
    let warned = |expected: &[String]| {
        for args in &readers {
            let out = dynprobe(args);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
            let mut lines: Vec<&str> = stderr.lines().collect();
            let last = lines.pop().unwrap();
            assert_eq!(
                lines,
                expected.iter().map(|e| format!("dynprobe: warning: {e}")).collect::<Vec<_>>(),
                "{args:?}"
            );
            assert!(last.starts_with("dynprobe: warning: the trace is incomplete ("), "{last}");
        }
    };

    std::fs::write(&a, &whole[..len - 8]).unwrap();
    warned(&[format!(
        "{}: at byte {}: cut: the recorder wrote {len} bytes, the file has {}; the last record is cut: the file ends 8 \
         bytes into it; thread {TID_A}'s events after it are lost",
        a.display(),
        len - 16,
        len - 8
    )]);
    let replay = text(&dynprobe(&["replay", dir_text]).stdout);
    assert!(replay.contains("main() {") && !replay.contains("/* main */"), "main's exit was cut: {replay}");

    std::fs::write(&a, &whole[..len - 16]).unwrap();
    std::fs::remove_file(&b).unwrap();
    warned(&[
        format!(
            "{}: at byte {}: cut: the recorder wrote {len} bytes, the file has {}; thread {TID_A}'s events after it are lost",
            a.display(),
            len - 16,
            len - 16
        ),
        format!("{}: missing: the recorder wrote {b_len} bytes of thread {TID_B}'s events here", b.display()),
    ]);

    std::fs::remove_file(&a).unwrap();
    readers_fail(&dir, &format!("nothing left to show in {dir_text}: "));
}

/// The subcommands, as `dynprobe --help` lists them.
const SUBCOMMANDS: [&str; 8] = ["bench", "probe", "demo", "record", "replay", "report", "export", "list-markers"];

#[test]
fn every_subcommand_help_has_examples_and_the_exit_statuses() {
    let top = dynprobe(&["--help"]);
    assert_eq!(top.status.code(), Some(0));
    let listed = text(&top.stdout);
    for sub in SUBCOMMANDS {
        assert!(listed.contains(&format!("  {sub} ")), "`dynprobe --help` lists {sub}:\n{listed}");
        for flag in ["-h", "--help"] {
            let out = dynprobe(&[sub, flag]);
            let help = text(&out.stdout);
            assert_eq!(out.status.code(), Some(0), "{sub} {flag}: {}", text(&out.stderr));
            let examples = help.split("Examples:\n").nth(1).unwrap_or_else(|| panic!("{sub} {flag}:\n{help}"));
            assert!(examples.starts_with(&format!("  dynprobe {sub}")), "{sub} {flag}:\n{help}");
            assert!(help.contains("Exit status:\n  0 "), "{sub} {flag}:\n{help}");
            assert!(help.contains("\n  2    dynprobe's own error"), "{sub} {flag}:\n{help}");
        }
    }
}

#[test]
fn probe_help_documents_every_keyword_of_the_spec_grammar() {
    let out = dynprobe(&["probe", "--help"]);
    let help = text(&out.stdout);
    let keywords = dynprobe::spec::keywords();
    // The list is the parser's: these are among the keywords it knows.
    for known in ["$retval", "$stackN", "$comm", "$duration", "@[MODULE:]SYMBOL", "+OFF(FETCHARG)", "r[N][:", "string"]
    {
        assert!(keywords.iter().any(|k| k == known), "{known} in {keywords:?}");
    }
    let missing: Vec<&String> = keywords.iter().filter(|k| !help.contains(k.as_str())).collect();
    assert!(missing.is_empty(), "`probe --help` does not name {missing:?}:\n{help}");
    // `-h` is the summary, and says where the grammar is.
    let short = text(&dynprobe(&["probe", "-h"]).stdout);
    assert!(!short.contains("$duration   nanoseconds") && short.contains("`--help` shows the whole spec grammar"));
}

#[test]
fn dynprobe_errors_exit_with_2_in_every_subcommand() {
    let missing = scratch("exit-2").join("no-such-file");
    let missing = missing.to_str().unwrap();
    // A command line clap refuses.
    let stderr = failed(&dynprobe(&["replay", "--no-such-option"]));
    assert!(stderr.contains("--no-such-option"), "{stderr}");
    // Each subcommand's own error.
    let stderr = failed(&dynprobe(&["list-markers", missing]));
    assert!(stderr.contains("no-such-file"), "{stderr}");
    let stderr = failed(&dynprobe(&["bench", "--rows", "no-such-row"]));
    assert!(stderr.contains("no-such-row"), "{stderr}");
    let stderr = failed(&dynprobe(&["probe", "p:work x=%rdz", "--", "true"]));
    assert!(stderr.contains("unknown register `rdz`"), "{stderr}");
    let stderr = failed(&dynprobe(&["record", "--", missing]));
    assert!(stderr.contains("no such program"), "{stderr}");
    for reader in ["replay", "report"] {
        let stderr = failed(&dynprobe(&[reader, missing]));
        assert!(stderr.contains("no-such-file"), "{reader}: {stderr}");
    }
}
