//! End-to-end tests of `dynprobe record` and `replay`/`report` on real programs: the C
//! target `targets/traced.c` built with each kind of function site (compiler NOPs from
//! `-pg -mfentry -mnop-mcount -mrecord-mcount`, `-fpatchable-function-entry=5`, and none:
//! plain entries), a C++ target throwing through traced frames, and a Rust target. Each
//! checks the exact call graph and that the program's own output is unchanged.
//!
//! The agent must be built beside the `dynprobe` binary first: `cargo build --workspace &&
//! cargo test --workspace`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// How a target's function entries are made traceable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sites {
    Mcount,
    Patchable,
    Plain,
}

const ALL_SITES: [Sites; 3] = [Sites::Mcount, Sites::Patchable, Sites::Plain];

impl Sites {
    fn flags(self) -> &'static [&'static str] {
        match self {
            // -mrecord-mcount refuses PIC: the target is a non-PIE executable.
            Sites::Mcount => &["-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-fno-pie", "-no-pie"],
            Sites::Patchable => &["-fpatchable-function-entry=5"],
            Sites::Plain => &[],
        }
    }

    /// The kind's name in the recorder's site summary.
    fn kind(self) -> &'static str {
        match self {
            Sites::Mcount => "mcount",
            Sites::Patchable => "patchable",
            Sites::Plain => "entry",
        }
    }
}

fn scratch() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("record-test");
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}

fn targets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/targets")
}

/// Compiles `source` with `compiler` and `flags` into the scratch directory as `name`.
fn build(compiler: &str, source: &str, name: &str, flags: &[&str]) -> PathBuf {
    let out = scratch().join(name);
    let status = Command::new(compiler)
        .args(["-O1", "-fno-inline", "-fcf-protection=none"])
        .args(flags)
        .arg(targets().join(source))
        .args(["-pthread", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {compiler} (scripts/setup installs it): {e}"));
    assert!(status.success(), "{compiler} {source} {flags:?} failed");
    out
}

/// `targets/traced.c` built with `sites`, once per test run.
fn traced_c(sites: Sites) -> &'static Path {
    static BUILT: [OnceLock<PathBuf>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let i = ALL_SITES.iter().position(|&s| s == sites).unwrap();
    BUILT[i].get_or_init(|| build("gcc", "traced.c", &format!("traced-{}", sites.kind()), sites.flags()))
}

fn dynprobe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dynprobe"))
}

/// Runs `program args` in the scratch directory (a `-pg` program leaves a `gmon.out`).
fn run_plain(program: &Path, args: &[&str]) -> Output {
    Command::new(program).args(args).current_dir(scratch()).output().expect("run the target")
}

/// A recording: the program's output through `dynprobe record`, and the trace directory.
struct Recorded {
    output: Output,
    dir: PathBuf,
}

impl Recorded {
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// `dynprobe replay DIR extra…`: stdout, failing the test on an error.
    fn replay(&self, extra: &[&str]) -> String {
        let out = dynprobe().arg("replay").arg(&self.dir).args(extra).output().expect("run dynprobe replay");
        assert!(out.status.success(), "replay failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("replay prints UTF-8")
    }

    /// The call graph of the replay without durations and thread ids: one `(tid, text)`
    /// per line, the text indented as replay indents it.
    fn graph(&self, extra: &[&str]) -> Vec<(String, String)> {
        graph_of(&self.replay(extra))
    }

    /// The files `file` (`sites.txt`, `functions.txt`) of every process image traced, one
    /// after the other.
    fn per_image(&self, file: &str) -> String {
        std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join(file)).ok())
            .collect()
    }
}

fn graph_of(replay: &str) -> Vec<(String, String)> {
    replay
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (head, text) = l.split_once(" | ")?;
            let tid = head.rsplit_once('[')?.1.trim_end_matches(']').trim().to_string();
            Some((tid, text.to_string()))
        })
        .collect()
}

fn texts(graph: &[(String, String)]) -> Vec<String> {
    graph.iter().map(|(_, t)| t.clone()).collect()
}

/// `dynprobe record -o <scratch>/<name> extra… -- program args…`.
fn record(name: &str, extra: &[&str], program: &Path, args: &[&str]) -> Recorded {
    record_with(name, extra, program, args, &[], |_| {})
}

/// [`record`] run by the command `launcher` (`unshare …`; none when empty), with `setup`
/// applied to the command.
fn record_with(
    name: &str,
    extra: &[&str],
    program: &Path,
    args: &[&str],
    launcher: &[&str],
    setup: impl FnOnce(&mut Command),
) -> Recorded {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(dir.with_extension("old"));
    let mut command = match launcher {
        [] => dynprobe(),
        [first, rest @ ..] => {
            let mut command = Command::new(first);
            command.args(rest).arg(env!("CARGO_BIN_EXE_dynprobe"));
            command
        }
    };
    setup(&mut command);
    let output = command
        .arg("record")
        .arg("-o")
        .arg(&dir)
        .args(extra)
        .arg("--")
        .arg(program)
        .args(args)
        .current_dir(scratch())
        .output()
        .expect("run dynprobe record");
    Recorded { output, dir }
}

/// Records `program args`, and checks the program's stdout and exit status are what they
/// are without dynprobe.
fn record_unchanged(name: &str, extra: &[&str], program: &Path, args: &[&str]) -> Recorded {
    let plain = run_plain(program, args);
    let recorded = record(name, extra, program, args);
    assert_eq!(
        String::from_utf8_lossy(&recorded.output.stdout),
        String::from_utf8_lossy(&plain.stdout),
        "the program's output changed under tracing; dynprobe said:\n{}",
        recorded.stderr()
    );
    assert_eq!(recorded.output.status.code(), plain.status.code(), "{}", recorded.stderr());
    recorded
}

const FIB_GRAPH: &[&str] = &[
    "main() {",
    "  fib() {",
    "    fib() {",
    "      fib() {",
    "        fib();",
    "        fib();",
    "      } /* fib */",
    "      fib();",
    "    } /* fib */",
    "    fib() {",
    "      fib();",
    "      fib();",
    "    } /* fib */",
    "  } /* fib */",
    "} /* main */",
];

#[test]
fn recursion_gives_the_exact_call_graph_with_each_kind_of_site() {
    for sites in ALL_SITES {
        let r = record_unchanged(&format!("fib-{}", sites.kind()), &[], traced_c(sites), &["fib"]);
        assert_eq!(texts(&r.graph(&[])), FIB_GRAPH, "{sites:?}");
        // Every function of the executable was found through the expected kind of site
        // and patched.
        let summary = r.stderr();
        let row = summary
            .lines()
            .find(|l| l.trim_start().starts_with(sites.kind()))
            .unwrap_or_else(|| panic!("no `{}` row in the summary:\n{summary}", sites.kind()));
        let numbers: Vec<u64> = row.split_whitespace().skip(1).map(|n| n.parse().unwrap()).collect();
        assert!(numbers[0] >= 7 && numbers[0] == numbers[1] && numbers[2] == 0, "{sites:?}: {row}");
        assert!(summary.contains("recorded 20 events (0 lost) from 1 thread"), "{summary}");
    }
}

#[test]
fn a_stripped_executable_is_traced_by_its_unwind_entries() {
    // Debian's executables have no symbol table; their functions are found by their
    // `.eh_frame` entries and named by address, like a disassembler's `sub_…`.
    let named = traced_c(Sites::Plain);
    let stripped = build("gcc", "traced.c", "traced-stripped", &["-s"]);
    let nm = Command::new("nm").arg(named).output().expect("run nm (binutils, installed with gcc)");
    let address = |name: &str| {
        let listing = String::from_utf8_lossy(&nm.stdout);
        let line = listing.lines().find(|l| l.ends_with(&format!(" T {name}"))).unwrap_or_else(|| panic!("no {name}"));
        u64::from_str_radix(line.split(' ').next().unwrap(), 16).unwrap()
    };
    let (main, fib) = (format!("sub_{:x}", address("main")), format!("sub_{:x}", address("fib")));
    let r = record_unchanged("stripped", &[], &stripped, &["fib"]);
    let expected: Vec<String> = FIB_GRAPH.iter().map(|l| l.replace("main", &main).replace("fib", &fib)).collect();
    assert_eq!(texts(&r.graph(&[])), expected, "{}", r.stderr());
}

#[test]
fn a_function_called_from_two_threads_is_recorded_per_thread() {
    for sites in ALL_SITES {
        let r = record_unchanged(&format!("threads-{}", sites.kind()), &[], traced_c(sites), &["threads"]);
        let graph = r.graph(&[]);
        let mut tids: Vec<&str> = graph.iter().map(|(tid, _)| tid.as_str()).collect();
        tids.sort();
        tids.dedup();
        assert_eq!(tids.len(), 3, "{sites:?}: main and two workers\n{graph:?}");
        let workers: Vec<Vec<&str>> = tids
            .iter()
            .map(|tid| graph.iter().filter(|(t, _)| t == tid).map(|(_, text)| text.as_str()).collect::<Vec<_>>())
            .filter(|lines| lines[0].starts_with("worker"))
            .collect();
        assert_eq!(workers.len(), 2, "{sites:?}: {graph:?}");
        for lines in workers {
            assert_eq!(lines, ["worker() {", "  step();", "  step();", "  step();", "} /* worker */"], "{sites:?}");
        }
        // `report` counts the same calls.
        let report = dynprobe().arg("report").arg(&r.dir).output().unwrap();
        let report = String::from_utf8_lossy(&report.stdout);
        let calls = |name: &str| {
            report
                .lines()
                .find(|l| l.split_whitespace().last() == Some(name))
                .and_then(|l| l.split_whitespace().rev().nth(1)?.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no `{name}` row in:\n{report}"))
        };
        assert_eq!((calls("main"), calls("worker"), calls("step")), (1, 2, 6), "{sites:?}\n{report}");
    }
}

#[test]
fn longjmp_ends_the_calls_it_leaves() {
    for sites in ALL_SITES {
        let r = record_unchanged(&format!("longjmp-{}", sites.kind()), &[], traced_c(sites), &["longjmp"]);
        assert_eq!(
            texts(&r.graph(&[])),
            [
                "main() {",
                "  leap() {",
                "    jump_back() {",
                "      jump_back() {",
                "        jump_back(); /* unwound */",
                "      } /* jump_back: unwound */",
                "    } /* jump_back: unwound */",
                "    step();",
                "  } /* leap */",
                "  step();",
                "} /* main */",
            ],
            "{sites:?}"
        );
    }
}

/// A longjmp out of frames larger than the red zone, 200 times from a loop: every call left
/// is ended (none piles up until the depth limit), and the calls after are at the right
/// depth.
#[test]
fn longjmp_from_a_loop_out_of_large_frames_ends_every_call() {
    for sites in ALL_SITES {
        let r = record_unchanged(&format!("longjmp-loop-{}", sites.kind()), &[], traced_c(sites), &["longjmp-loop"]);
        let graph = texts(&r.graph(&[]));
        assert_eq!(graph.iter().filter(|l| l.as_str() == "  run_big() {").count(), 200, "{sites:?}");
        assert_eq!(graph.iter().filter(|l| l.contains("jump_back_big") && l.contains("unwound")).count(), 600);
        assert_eq!(graph[graph.len() - 2..], ["  step();", "} /* main */"], "{sites:?}");
    }
}

#[test]
fn a_forked_child_and_an_exec_ed_image_are_traced_too() {
    for sites in ALL_SITES {
        let r = record_unchanged(&format!("fork-{}", sites.kind()), &[], traced_c(sites), &["fork"]);
        let replay = r.replay(&[]);
        let graph = texts(&graph_of(&replay)).join("\n");
        assert_eq!(
            graph, "main() {\n  step();\n} /* main */\n  child_work() {\n    step();\n  } /* child_work */",
            "{sites:?}:\n{replay}"
        );
        assert!(replay.contains(", forked from "), "{replay}");

        let r = record_unchanged(&format!("exec-{}", sites.kind()), &[], traced_c(sites), &["exec"]);
        let replay = r.replay(&[]);
        let graph = texts(&graph_of(&replay));
        // The first image never returns from main: it became the second.
        assert_eq!(graph[..2], ["main() {", "  step();"], "{sites:?}:\n{replay}");
        assert_eq!(graph[2..], *FIB_GRAPH, "{sites:?}:\n{replay}");
        assert_eq!(replay.matches("# pid ").count(), 2, "{replay}");
    }
}

/// The handler (entered by the kernel, returning to the C library's restorer) and its
/// callee nest inside the call the signal interrupted, on the thread's stack and on an
/// alternate signal stack alike.
#[test]
fn a_signal_handler_s_calls_nest_where_the_signal_arrived() {
    for sites in ALL_SITES {
        let r = record_unchanged(&format!("signal-{}", sites.kind()), &[], traced_c(sites), &["signal"]);
        assert_eq!(
            texts(&r.graph(&[])),
            [
                "main() {",
                "  wait_signal() {",
                "    on_signal() {",
                "      in_handler();",
                "    } /* on_signal */",
                "  } /* wait_signal */",
                "  on_altstack() {",
                "    wait_signal() {",
                "      on_signal() {",
                "        in_handler();",
                "      } /* on_signal */",
                "    } /* wait_signal */",
                "  } /* on_altstack */",
                "} /* main */",
            ],
            "{sites:?}"
        );
    }
}

#[test]
fn a_crash_keeps_what_was_recorded_up_to_it() {
    let r = record("crash", &[], traced_c(Sites::Mcount), &["crash"]);
    assert_eq!(r.output.status.code(), Some(128 + libc::SIGSEGV), "{}", r.stderr());
    assert!(r.stderr().contains("killed by signal"), "{}", r.stderr());
    let graph = texts(&r.graph(&[])).join("\n");
    assert!(graph.starts_with("main() {\n  step();\n  fib() {"), "{graph}");
    assert!(graph.ends_with("  } /* fib */"), "main never returned: {graph}");
}

#[test]
fn a_cxx_exception_unwinds_through_traced_frames() {
    for sites in [Sites::Mcount, Sites::Plain] {
        let program = build("g++", "traced_cxx.cpp", &format!("traced-cxx-{}", sites.kind()), sites.flags());
        let r = record_unchanged(&format!("cxx-{}", sites.kind()), &[], &program, &[]);
        assert_eq!(
            texts(&r.graph(&[])),
            [
                "main() {",
                "  catcher(int) {",
                "    middle(int) {",
                "      thrower(int); /* unwound */",
                "    } /* middle(int): unwound */",
                "  } /* catcher(int) */",
                "  after(int);",
                "} /* main */",
            ],
            "{sites:?}"
        );
    }
}

#[test]
fn a_rust_program_is_traced_at_plain_entries_through_a_panic() {
    let program = common::build_rust("traced_rs.rs", "traced-rs");
    let r = record_unchanged("rust", &["-F", "traced_rs::*"], &program, &[]);
    let graph = texts(&r.graph(&[]));
    assert_eq!(graph[0], "traced_rs::main() {");
    assert_eq!(graph[1], "  traced_rs::fib() {");
    let guarded = graph.iter().position(|l| l == "  traced_rs::guarded() {").expect("guarded is traced");
    assert_eq!(graph[guarded + 1], "    traced_rs::explode() {");
    // The panic hook runs inside explode; then the panic unwinds explode into catch_unwind.
    assert!(graph.iter().any(|l| l == "    } /* traced_rs::explode: unwound */"), "{graph:?}");
    assert_eq!(graph[graph.len() - 2..], ["  } /* traced_rs::guarded */", "} /* traced_rs::main */"]);
}

#[test]
fn filters_select_functions_and_a_typo_names_the_nearest() {
    let program = traced_c(Sites::Mcount);
    let r = record_unchanged("filter", &["-F", "fib", "-N", "main"], program, &["fib"]);
    let graph = texts(&r.graph(&[]));
    assert_eq!(graph, FIB_GRAPH[1..FIB_GRAPH.len() - 1].iter().map(|l| &l[2..]).collect::<Vec<_>>());

    let r = record("typo", &["-F", "fibb"], program, &["fib"]);
    assert_eq!(r.output.status.code(), Some(2));
    assert!(r.output.stdout.is_empty(), "the program must not run");
    let err = r.stderr();
    assert!(err.contains("no function matches -F 'fibb'") && err.contains("nearest: fib"), "{err}");

    // --depth keeps the outer calls only.
    let r = record_unchanged("depth", &["--depth", "2"], program, &["fib"]);
    assert_eq!(texts(&r.graph(&[])), ["main() {", "  fib();", "} /* main */"]);
}

/// Recursion deeper than the tracer's 128-call stacks: the calls beyond are counted and
/// reported, never dropped silently.
#[test]
fn calls_deeper_than_the_tracer_goes_are_counted_not_dropped() {
    let r = record_unchanged("deep", &[], traced_c(Sites::Mcount), &["deep"]);
    let err = r.stderr();
    // main and down(200)…down(0): 202 calls, 128 of them traced.
    assert!(err.contains("WARNING: 74 calls were NOT TRACED"), "{err}");
    assert!(err.contains("recorded 256 events (0 lost)"), "{err}");
}

#[test]
fn a_full_ring_loses_events_and_says_how_many() {
    let n = 200_000u64;
    let r = record_unchanged("lost", &["--buffer-size", "16"], traced_c(Sites::Mcount), &["loop", &n.to_string()]);
    let err = r.stderr();
    let line = err.lines().find(|l| l.starts_with("recorded ")).unwrap_or_else(|| panic!("{err}"));
    let recorded: u64 = line.split_whitespace().nth(1).and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("{line}"));
    let warning = err.lines().find(|l| l.contains("WARNING")).unwrap_or_else(|| panic!("losses must be loud: {err}"));
    let lost: u64 = warning
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("the warning gives the exact count: {warning}"));
    assert!(lost > 0, "a 16-record ring cannot keep up: {line}");
    // Every entry and exit of main and of each step is either recorded or counted lost.
    assert_eq!(recorded + lost, 2 * (n + 1), "{line}\n{warning}");
    assert!(r.replay(&[]).contains("events lost */"));
}

/// A program sandboxed by a seccomp filter that traps `madvise` — a call it never makes
/// itself — is traced to its end, and its filter never sees a system call of dynprobe's on
/// its thread: the ring's pages are mapped ahead of the thread by the recorder, from its own
/// process, not by the thread (a filter that killed instead of trapping would end such a
/// program at the first). The program's own result is unchanged.
#[test]
fn a_sandbox_trapping_madvise_never_sees_one_of_ours_and_the_trace_is_whole() {
    let program = build("gcc", "seccomp_madvise.c", "seccomp-madvise", Sites::Mcount.flags());
    // 200,000 calls: 400,000 records, some 1,600 pages of ring.
    let n = 200_000u64;
    let r = record("seccomp-madvise-trace", &["--buffer-size", "1048576"], &program, &[&n.to_string()]);
    let stdout = String::from_utf8_lossy(&r.output.stdout).into_owned();
    let sum: u64 = (0..n).map(|i| i * 3 + 1).sum();
    assert!(r.output.status.success() && stdout.starts_with(&format!("sum {sum}\n")), "{stdout}{}", r.stderr());
    let trapped: u64 =
        stdout.lines().find_map(|l| l.strip_prefix("sigsys ")?.parse().ok()).unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(trapped, 0, "the program's filter saw madvise {trapped} times: {stdout}");
    // main and every step.
    let err = r.stderr();
    assert!(err.contains(&format!("recorded {} events (0 lost)", 2 * (n + 1))), "{err}");
}

/// Every function of the C library at once, through plain-entry probes: the program runs
/// as before and its calls into the library are in the trace. None is refused for being
/// called by dynprobe's trap handler: the agent has its own copies and fills.
#[test]
fn tracing_the_whole_c_library_keeps_the_program_working() {
    let r = record_unchanged("libc", &["-F", "libc:*", "-F", "main"], traced_c(Sites::Plain), &["fib"]);
    let summary = r.stderr();
    assert!(!summary.contains("dynprobe's trap handler calls"), "{summary}");
    let graph = texts(&r.graph(&[]));
    let main = graph.iter().position(|l| l.trim_start().starts_with("main() {")).expect("main is traced");
    // printf's first call allocates stdout's buffer.
    assert!(graph[main..].iter().any(|l| l.contains("malloc")), "{graph:?}");
    // dynprobe's dlopen watcher calls the C library from its first instruction
    // (start_thread, pthread_setname_np): none of it is the program's.
    assert!(summary.contains("from 1 thread of 1 process"), "dynprobe's own thread was traced: {summary}");
    assert!(!graph.iter().any(|l| l.contains("start_thread")), "{graph:?}");

    // system and posix_spawn run a child in this process's memory with every signal
    // handler reset: no breakpoint may be left in the C library for it to hit.
    let r = record_unchanged("libc-spawn", &["-F", "libc:*", "-F", "main"], traced_c(Sites::Plain), &["spawn"]);
    assert!(String::from_utf8_lossy(&r.output.stdout).contains("system = 0, posix_spawn = 0, status = 0"));
    let sites = r.per_image("sites.txt");
    assert!(sites.contains("would kill a posix_spawn/vfork child"), "{sites}");
}

/// glibc's indirect functions (`strlen`, `memset`, `memcpy`, each reached through the
/// implementation the dynamic linker chose for this CPU) are traced under their public
/// names, in real programs traced with the whole C library, with optimization and
/// without; the programs run as before.
#[test]
fn the_c_library_s_indirect_functions_are_traced_under_their_public_names() {
    let sql =
        "create table t(x text); insert into t values('abc'),('defgh'); select group_concat(x), sum(length(x)) from t;";
    let programs: [(&str, &[&str]); 3] = [
        ("/usr/bin/sqlite3", &[":memory:", sql]),
        ("/usr/bin/python3.11", &["-S", "-c", "import sys; print(len(sys.argv), 'x' * 10)"]),
        ("/bin/sh", &["-c", "echo hello | tr a-z A-Z; printf '%s %d\\n' abc 42"]),
    ];
    let mut memset_seen = false;
    for (program, args) in programs {
        for options in [&[][..], &["--no-optimize"]] {
            let name = format!("ifunc-{}-{}", Path::new(program).file_name().unwrap().to_str().unwrap(), options.len());
            let r = record_unchanged(&name, &[options, &["-F", "libc:*"]].concat(), Path::new(program), args);
            let graph = texts(&r.graph(&[]));
            let called = |f: &str| graph.iter().any(|l| l.trim_start().starts_with(&format!("{f}()")));
            assert!(called("strlen"), "{name}: {graph:?}");
            memset_seen |= called("memset");
            // Under the public names, not the chosen implementations' (`__strlen_evex`);
            // memcpy too, traced or refused with its reason.
            let functions = r.per_image("functions.txt");
            for f in ["strlen", "memset", "memcpy"] {
                assert!(functions.lines().any(|l| l.ends_with(&format!("\t{f}"))), "{name}: {f}: {functions}");
            }
        }
    }
    assert!(memset_seen, "no program's memset was traced");
}

/// `--no-optimize` makes the program's functions breakpoints, but the C library's entries
/// keep their jumps: the child `system`/`posix_spawn` run in the parent's memory with every
/// handler reset, and a thread being created (every signal blocked), would die on a
/// breakpoint there. The whole C library traced that way leaves the program working.
#[test]
fn tracing_the_whole_c_library_without_optimization_keeps_the_program_working() {
    for (name, args) in [("libc-no-opt", &["fib"][..]), ("libc-spawn-no-opt", &["spawn"])] {
        let r = record_unchanged(name, &["--no-optimize", "-F", "libc:*", "-F", "main"], traced_c(Sites::Plain), args);
        let graph = texts(&r.graph(&[]));
        assert!(graph.iter().any(|l| l.contains("malloc")), "{name}: {graph:?}");
    }
}

/// A library the program `dlopen`s after recording began: the pattern naming it waits for
/// it (no error), and its functions are patched — its NOP sites in one batch — before
/// `dlopen` returns, so the program's first call into it is traced.
#[test]
fn a_library_loaded_later_is_traced_from_its_first_call() {
    let plugin = scratch().join("libplugin.so");
    let status = Command::new("gcc")
        .args(["-O1", "-fno-inline", "-shared", "-fPIC", "-fpatchable-function-entry=5", "-fcf-protection=none"])
        .arg(targets().join("plugin.c"))
        .arg("-o")
        .arg(&plugin)
        .status()
        .expect("run gcc");
    assert!(status.success());
    let program = build("gcc", "traced_dlopen.c", "traced-dlopen", &["-ldl"]);
    let plugin_arg = plugin.to_str().unwrap();
    let traced = ["-F", "libplugin:*", "-F", "call_plugin", "-F", "main"];
    let graph = [
        "main() {",
        "  call_plugin() {",
        "    plugin_work() {",
        "      plugin_leaf();",
        "      plugin_leaf();",
        "    } /* plugin_work */",
        "  } /* call_plugin */",
        "} /* main */",
    ];
    let r = record_unchanged("dlopen", &traced, &program, &[plugin_arg]);
    assert_eq!(texts(&r.graph(&[])), graph);
    let summary = r.stderr();
    assert!(summary.lines().any(|l| l.trim_start().starts_with("patchable") && l.contains(" 2 ")), "{summary}");

    // A program that closes every descriptor it did not open (bubblewrap, a daemon) and
    // fills their numbers with a file of its own: the watch on dlopen goes on, and nothing
    // of dynprobe's reads the program's file or writes into it. (With a wake-up pipe, its
    // byte went into the file; the recording of the debug build aborted on the closed
    // descriptor.)
    let file = scratch().join(format!("dlopen-closefrom-{}.file", std::process::id()));
    let args = [plugin_arg, "closefrom", file.to_str().unwrap()];
    let r = record_unchanged("dlopen-closefrom", &traced, &program, &args);
    assert!(String::from_utf8_lossy(&r.output.stdout).contains("file bytes = 0\n"), "{}", r.stderr());
    assert_eq!(texts(&r.graph(&[])), graph);

    // A library unloaded (dlclose) and loaded again, three times: each load is traced, and
    // the end of the recording writes nothing where an unloaded one was.
    let r = record_unchanged("dlopen-reload", &traced, &program, &[plugin_arg, "reload", "3"]);
    let calls = texts(&r.graph(&[])).iter().filter(|l| l.trim_start().starts_with("plugin_work() {")).count();
    assert_eq!(calls, 3, "{}", r.stderr());
    assert!(!r.stderr().contains("could not"), "{}", r.stderr());

    // A misspelt library waits in vain, and the end of the recording says so.
    let r = record_unchanged("dlopen-typo", &["-F", "libplugn:*", "-F", "main"], &program, &[plugin_arg]);
    assert!(r.stderr().contains("WARNING: -F 'libplugn:*' matched nothing"), "{}", r.stderr());
}

/// The uid and gid of `nobody`.
const NOBODY: u32 = 65534;
/// A uid and gid no one else on the machine has: another user than `nobody`.
const USER: u32 = 65533;
const USER_TEXT: &str = "65533";

/// Makes `command` run with the umask `mask`.
fn with_umask(command: &mut Command, mask: libc::mode_t) {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask is async-signal-safe and only sets the child's mask.
    unsafe {
        command.pre_exec(move || {
            libc::umask(mask);
            Ok(())
        })
    };
}

/// The `dir PATH MODE` and `file EXT MODE` lines of `traced ringdir`: the ring directory's
/// path and mode, and the files the agent made in it.
fn ring_dir_listing(r: &Recorded) -> (String, String, Vec<String>) {
    let stdout = String::from_utf8_lossy(&r.output.stdout).into_owned();
    let dir = stdout.lines().find_map(|l| l.strip_prefix("dir ")).unwrap_or_else(|| panic!("{stdout}{}", r.stderr()));
    let (path, mode) = dir.rsplit_once(' ').unwrap();
    let mut files: Vec<String> = stdout.lines().filter_map(|l| l.strip_prefix("file ")).map(String::from).collect();
    files.sort();
    (path.to_string(), mode.to_string(), files)
}

/// A ring directory left behind by a `record` that was killed (nobody holds its owner file
/// locked any more) is removed by the next `record`; one whose owner holds the lock, or one
/// without an owner file, is left alone.
#[test]
fn the_ring_directory_of_a_killed_record_is_removed_by_the_next() {
    use std::os::fd::AsRawFd;
    assert!(Path::new("/dev/shm").is_dir(), "the test needs /dev/shm");
    let make = |name: &str, owner: bool| {
        let dir = Path::new("/dev/shm").join(format!("dynprobe-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("4242.0.ring"), "rings").unwrap();
        let file = owner.then(|| {
            std::fs::write(dir.join("record.owner"), "4242\n").unwrap();
            std::fs::File::open(dir.join("record.owner")).unwrap()
        });
        (dir, file)
    };
    let (killed, _) = make("killed", true);
    let (live, held) = make("live", true);
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(held.as_ref().unwrap().as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    let (unowned, _) = make("unowned", false);
    let r = record("sweep", &[], traced_c(Sites::Mcount), &["fib"]);
    assert!(r.output.status.success(), "{}", r.stderr());
    let left = (killed.exists(), live.exists(), unowned.exists());
    for dir in [&killed, &live, &unowned] {
        let _ = std::fs::remove_dir_all(dir);
    }
    assert_eq!(left, (false, true, true), "(killed record's, live record's, without owner) still there");
}

/// The ring directory's name is fresh and unpredictable: a directory of another user's
/// at the name it had before, `/dev/shm/dynprobe-<pid of dynprobe>` (made for pids to come),
/// neither stops `record` (it could not remove it) nor is removed by root's. Run in a new
/// pid namespace, `record` is pid 1 there: the name it would have taken is known beforehand.
#[test]
fn another_user_s_directory_at_the_old_ring_path_is_left_alone() {
    use std::os::unix::fs::MetadataExt;
    assert!(Path::new("/dev/shm").is_dir(), "the test needs /dev/shm");
    let squatted = Path::new("/dev/shm/dynprobe-1");
    // Only this test makes it (a run killed before its end leaves it behind).
    let _ = std::fs::remove_dir_all(squatted);
    std::fs::create_dir(squatted).unwrap();
    let theirs = squatted.join("theirs.txt");
    std::fs::write(&theirs, "keep").unwrap();
    for path in [squatted, &theirs] {
        std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown (the tests run as root)");
    }
    // Recorded by root, and by a user with no rights on the squatter's directory (its trace
    // in a directory of its own; a target without -pg, which would write gmon.out here).
    let user = scratch().join("squatted-user");
    let _ = std::fs::remove_dir_all(&user);
    std::fs::create_dir(&user).unwrap();
    std::os::unix::fs::chown(&user, Some(USER), Some(USER)).unwrap();
    let pid_namespace = ["unshare", "--pid", "--fork", "--mount-proc"];
    let as_user =
        [&pid_namespace[..], &["setpriv", "--reuid", USER_TEXT, "--regid", USER_TEXT, "--clear-groups"]].concat();
    for (name, launcher) in [("squatted", &pid_namespace[..]), ("squatted-user/t.data", &as_user[..])] {
        let r = record_with(name, &[], traced_c(Sites::Patchable), &["ringdir"], launcher, |_| {});
        assert!(r.output.status.success(), "{name}: {}", r.stderr());
        let (ring_dir, mode, _) = ring_dir_listing(&r);
        assert!(ring_dir.starts_with("/dev/shm/dynprobe-") && ring_dir != "/dev/shm/dynprobe-1", "{ring_dir}");
        assert_eq!(mode, "700");
        assert!(!Path::new(&ring_dir).exists(), "the ring directory is removed at the end");
        assert_eq!(texts(&r.graph(&[])), ["main();"]);
        assert_eq!(std::fs::read_to_string(&theirs).expect("their file is still there"), "keep");
        assert_eq!(std::fs::metadata(squatted).unwrap().uid(), NOBODY);
    }
    std::fs::remove_dir_all(squatted).unwrap();
    std::fs::remove_dir_all(&user).unwrap();
}

/// A trace holds the program's data: its directories are 0700 and its files 0600 whatever
/// the umask, as `perf record` makes `perf.data`, and so are the ring directory and the
/// files the agent makes in it, a `probe -o` file and an export.
#[test]
fn traces_rings_and_outputs_are_their_owner_s_only_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path| std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777;
    let program = traced_c(Sites::Mcount);
    let r = record_with("private", &[], program, &["ringdir"], &[], |c| with_umask(c, 0));
    assert!(r.output.status.success(), "{}", r.stderr());
    let (_, ring_mode, ring_files) = ring_dir_listing(&r);
    assert_eq!(
        (ring_mode.as_str(), ring_files),
        ("700", vec!["funcs 600".into(), "live 600".into(), "owner 600".into(), "ring 600".into(), "sites 600".into()])
    );
    let mut seen = 0;
    let mut dirs = vec![r.dir.clone()];
    while let Some(dir) = dirs.pop() {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                assert_eq!(mode(&path), 0o600, "{}", path.display());
                seen += 1;
            }
        }
    }
    assert!(seen >= 4, "info.json, functions.txt, sites.txt and a .dat: {seen} files");

    let chrome = scratch().join("private.json");
    let probed = scratch().join("private.probe");
    for path in [&chrome, &probed] {
        let _ = std::fs::remove_file(path);
    }
    let mut export = dynprobe();
    export.arg("export").arg("--chrome").arg(&chrome).arg(&r.dir);
    let mut probe = dynprobe();
    probe.arg("probe").arg("-o").arg(&probed).args(["p:fib", "--"]).arg(program).current_dir(scratch());
    for command in [&mut export, &mut probe] {
        with_umask(command, 0);
        let out = command.output().unwrap();
        assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(std::fs::read_to_string(&probed).unwrap().contains("fib"), "the probe's events are in the file");
    assert_eq!((mode(&chrome), mode(&probed)), (0o600, 0o600));
}

/// The generated program of `dynprobe bench`'s start-up rows (its `g<G>_<NNNN>` functions).
#[path = "../src/bench/many.rs"]
mod many;

/// The site summaries of every image of a recording, by kind: (found, patched), and the
/// refused sites' lines.
fn site_counts(r: &Recorded) -> (Vec<(String, u64, u64)>, Vec<String>) {
    let mut kinds = Vec::new();
    let mut refused = Vec::new();
    for entry in std::fs::read_dir(&r.dir).unwrap().filter_map(Result::ok) {
        let Ok(sites) = std::fs::read_to_string(entry.path().join("sites.txt")) else { continue };
        for line in sites.lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            match fields[..] {
                ["kind", kind, found, patched] => {
                    kinds.push((kind.to_string(), found.parse().unwrap(), patched.parse().unwrap()))
                }
                ["refused", ..] => refused.push(line.to_string()),
                _ => {}
            }
        }
    }
    (kinds, refused)
}

/// A program of 40,000 functions, as many as cargo has, traced whole: every function is
/// patched (at its plain entry, armed directly as a jump) or refused with its own reason,
/// never all or nothing; a function's `.cold` part is not counted as a function, and glob
/// character classes select a known share of them.
#[test]
fn every_function_of_a_40k_function_program_is_patched_or_refused_on_its_own() {
    let program = scratch().join("many-40k");
    many::build(4, &program).unwrap();
    let r = record_unchanged("many", &[], &program, &[]);
    let (kinds, refused) = site_counts(&r);
    let entry = kinds.iter().find(|k| k.0 == "entry").unwrap_or_else(|| panic!("{kinds:?}"));
    let (found, patched) = (entry.1, entry.2);
    assert!(patched >= 4 * many::GROUP as u64, "{kinds:?}\n{}", r.stderr());
    assert_eq!(found - patched, refused.len() as u64, "every refused site is listed: {refused:?}");
    assert!(refused.iter().all(|l| l.split('\t').nth(4).is_some_and(|why| !why.trim().is_empty())), "{refused:?}");
    let functions: String = std::fs::read_dir(&r.dir)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("functions.txt")).ok())
        .collect();
    let names: Vec<&str> = functions.lines().filter_map(|l| l.split('\t').nth(3)).collect();
    assert!(names.contains(&"hot") && !names.iter().any(|n| n.contains(".cold")), "hot.cold is part of hot");
    // The generated functions, main and hot: nothing else of the executable is a function.
    assert_eq!(found, 4 * many::GROUP as u64 + 2, "{kinds:?}");
    let graph = texts(&r.graph(&[]));
    assert!(graph.contains(&"  g3_9999();".to_string()) && graph.contains(&"  hot();".to_string()), "{graph:?}");

    let r = record_unchanged("many-class", &["-F", "g[!0-2]_[0-4]*"], &program, &[]);
    let (kinds, _) = site_counts(&r);
    assert_eq!(kinds.iter().map(|k| k.1).sum::<u64>(), many::GROUP as u64 / 2, "{kinds:?}");
}

/// A C++ function's part that GCC moved out of it (`… [clone .cold]`, as a demangler spells
/// it) is entered by a jump, with the hot part's locals at `rsp`: traced as a function, its
/// "return address" would be one of them, replaced — node's compiler threads crashed so.
/// It is not a function: not listed, not patched, and the program computes what it does
/// untraced, its exceptions thrown from that part included.
#[test]
fn a_cxx_function_s_cold_part_is_not_traced_as_a_function() {
    let program = build("g++", "cold_cxx.cpp", "cold_cxx", &["-O2"]);
    let r = record_unchanged("cold-cxx", &[], &program, &[]);
    let functions: String = std::fs::read_dir(&r.dir)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("functions.txt")).ok())
        .collect();
    let names: Vec<&str> = functions.lines().filter_map(|l| l.split('\t').nth(3)).collect();
    assert!(names.iter().any(|n| n.starts_with("work::Parser::parse")), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("cold")), "a cold part is traced as a function: {names:?}");
    let graph = texts(&r.graph(&[]));
    let calls = graph.iter().filter(|l| l.trim_start().starts_with("work::Parser::parse")).count();
    assert_eq!(calls, 2000, "each call of parse is recorded once");
}

/// A real large binary traced whole: the cargo running this test (about 40,000
/// functions) prints its version as without dynprobe, with most of its functions patched
/// (each refused one listed with its reason) and its calls recorded.
#[test]
fn cargo_traced_whole_patches_most_of_its_functions() {
    let cargo = std::env::var("CARGO").expect("cargo test sets CARGO");
    let r = record_unchanged("cargo", &[], Path::new(&cargo), &["--version"]);
    let (kinds, refused) = site_counts(&r);
    let (found, patched) = kinds.iter().fold((0, 0), |(f, p), k| (f + k.1, p + k.2));
    assert!(found > 10_000 && patched * 10 >= found * 9, "{kinds:?}\n{}", r.stderr());
    assert_eq!(found - patched, refused.len() as u64, "every refused site is listed");
    let err = r.stderr();
    let events: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("recorded ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(events > 1000, "{err}");
}
