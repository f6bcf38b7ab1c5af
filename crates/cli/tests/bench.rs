//! `dynprobe bench --json` end to end: the shape of the JSON and that the reference rows
//! produce numbers. Timings are not asserted beyond being positive: benchmarks measure,
//! tests don't time.
//!
//! The `function-graph` row runs `dynprobe record`, which needs the agent built beside the
//! `dynprobe` binary (`cargo build --workspace` with the same profile first).

use std::process::{Command, Output};

use serde_json::Value;

/// What the `uftrace` row says when uftrace is not on `PATH`.
const UFTRACE_MISSING: &str = "not installed (apt-get install uftrace)";

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynprobe")).arg("bench").args(args).output().expect("runs the dynprobe binary")
}

/// Runs `bench --json` with `args` and returns its rows, checking the common shape.
fn rows(args: &[&str]) -> Vec<Value> {
    let out = bench(&[&["--json"], args].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dynprobe bench failed: {stderr}");
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
        panic!("stdout is not one JSON value ({err}):\n{}", String::from_utf8_lossy(&out.stdout))
    });
    let object = json.as_object().expect("top level is an object");
    assert_eq!(object.keys().collect::<Vec<_>>(), ["host", "rows"], "`host` and `rows` at the top level");
    check_host(&object["host"]);
    let rows = object["rows"].as_array().expect("`rows` is an array").clone();
    for row in &rows {
        assert!(row["name"].is_string(), "row without a name: {row}");
        match &row["ns_per_hit"] {
            // The fastest batch's figure beside the median's.
            Value::Number(_) => assert!(row["best_ns_per_hit"].is_number(), "no best_ns_per_hit: {row}"),
            Value::Null => assert!(row["error"].is_string(), "null ns_per_hit without an error: {row}"),
            _ => panic!("ns_per_hit missing or not a number/null: {row}"),
        }
    }
    rows
}

/// The host a run names: the CPU as `/proc/cpuinfo` has it, what the detours save, the
/// kernel, the load.
fn check_host(host: &Value) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    for (key, cpuinfo_key) in [("cpu_model", "model name"), ("cpu_vendor", "vendor_id")] {
        let value = host[key].as_str().unwrap_or_else(|| panic!("host.{key} missing: {host}"));
        let line = cpuinfo.lines().find(|line| line.starts_with(cpuinfo_key)).unwrap();
        assert!(line.ends_with(value) && !value.is_empty(), "host.{key} is `{value}`, /proc/cpuinfo says `{line}`");
    }
    assert!(host["cpu_signature"].as_str().is_some_and(|s| s.split('/').count() == 3), "{host}");
    assert!(host["virtualized"].is_boolean() && host["cpus"].as_u64().is_some_and(|n| n > 0), "{host}");
    let vectors = host["detour_vectors"].as_str().unwrap_or_default();
    let expected = match (std::arch::is_x86_feature_detected!("avx512f"), std::arch::is_x86_feature_detected!("avx")) {
        (true, _) => "AVX-512",
        (false, true) => "AVX",
        _ => "SSE",
    };
    assert!(vectors.starts_with(expected), "host.detour_vectors is `{vectors}` on a CPU with {expected}");
    assert!(host["graph_vectors"].is_string(), "{host}");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(host["kernel"], kernel.trim(), "{host}");
    assert!(host["load_average"].as_f64().is_some_and(|load| load >= 0.0), "{host}");
    // The fixed loop's windows, fastest to slowest: positive, ordered.
    let steadiness = &host["steadiness"];
    let ns = |key: &str| steadiness[key].as_f64().unwrap_or_else(|| panic!("host.steadiness.{key} missing: {host}"));
    assert!(0.0 < ns("min_ns") && ns("min_ns") <= ns("median_ns") && ns("median_ns") <= ns("max_ns"), "{host}");
}

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter().find(|row| row["name"] == name).unwrap_or_else(|| panic!("no `{name}` row in {rows:?}"))
}

/// The row's added ns per hit, failing the test with the row's error if it has none.
fn ns_per_hit(rows: &[Value], name: &str) -> f64 {
    let row = row(rows, name);
    row["ns_per_hit"].as_f64().unwrap_or_else(|| panic!("`{name}` has no number: {}", row["error"]))
}

#[test]
fn all_rows_have_the_documented_shape_and_reference_rows_measure() {
    let rows = rows(&["--iterations", "200"]);

    let baseline = row(&rows, "baseline-call");
    assert_eq!(ns_per_hit(&rows, "baseline-call"), 0.0, "the baseline adds nothing");
    assert_eq!(baseline["best_ns_per_hit"].as_f64(), Some(0.0), "nor in its fastest batch: {baseline}");
    assert!(baseline["ns_per_call"].as_f64().is_some_and(|ns| ns > 0.0), "{baseline}");

    for trap_row in ["sigtrap-floor", "kernel-uprobe", "kernel-uretprobe"] {
        let ns = ns_per_hit(&rows, trap_row);
        assert!(ns > 0.0, "`{trap_row}` adds {ns} ns per hit");
    }

    // The guard on syscall(): measured against the same call before the guards exist.
    let guarded = row(&rows, "syscall-guarded");
    assert!(ns_per_hit(&rows, "syscall-plain") > 0.0 && guarded["x_syscall_plain"].is_number(), "{guarded}");

    let int3_probe = row(&rows, "int3-probe");
    assert!(ns_per_hit(&rows, "int3-probe") > 0.0, "{int3_probe}");
    assert!(int3_probe["x_sigtrap_floor"].is_number(), "{int3_probe}");
    assert!(int3_probe["x_kernel_uprobe"].is_number(), "{int3_probe}");

    // The optimized and return probes must have been optimized (a row that is not says so
    // in `error` and has no number) and are compared with the kernel's probes.
    for fast_row in ["optimized-probe", "optimized-probe-mid", "return-probe"] {
        let fast = row(&rows, fast_row);
        assert!(ns_per_hit(&rows, fast_row) > 0.0, "{fast}");
        assert!(fast["x_kernel_uprobe"].is_number() && fast["x_kernel_uretprobe"].is_number(), "{fast}");
    }

    // The parts of the return path, and a caller running SSE code after the probed call.
    for part in ["return-probe-entry", "optimized-probe-sse", "return-probe-sse"] {
        assert!(ns_per_hit(&rows, part) > 0.0, "{}", row(&rows, part));
    }
    assert!(row(&rows, "return-probe-entry")["x_return_probe"].is_number(), "{}", row(&rows, "return-probe-entry"));
    check_floors(&rows);
    assert_eq!(ns_per_hit(&rows, "baseline-sse"), 0.0, "the -sse rows' baseline adds nothing");
    let penalty = row(&rows, "upper-state-penalty");
    match std::arch::is_x86_feature_detected!("avx") {
        true => assert!(penalty["ns_per_hit"].is_number(), "{penalty}"),
        false => assert!(penalty["error"].as_str().unwrap().contains("no AVX"), "{penalty}"),
    }

    // The tracer rows time a program against its untraced run; dynprobe's ring holds the
    // whole run, so nothing may be lost (a loss would make the figure too low).
    assert_eq!(ns_per_hit(&rows, "graph-plain"), 0.0, "the program's baseline adds nothing");
    let graph = row(&rows, "function-graph");
    assert!(ns_per_hit(&rows, "function-graph") > 0.0, "{graph}");
    assert_eq!(graph["calls_per_batch"], 200, "the program made the calls asked for: {graph}");
    assert!(!graph["note"].as_str().unwrap().contains("LOST"), "{graph}");
    // The faults of the tracer's first-lap pages are counted, whatever the host charges.
    assert!(graph["note"].as_str().unwrap().contains(" page faults in the timed loop (median; "), "{graph}");
    // With -a, beside it: the same calls, each carrying its argument and return value.
    let with_args = row(&rows, "function-graph-args");
    assert!(ns_per_hit(&rows, "function-graph-args") > 0.0, "{with_args}");
    assert_eq!(with_args["calls_per_batch"], 200, "{with_args}");
    assert!(!with_args["note"].as_str().unwrap().contains("LOST"), "{with_args}");
    assert!(with_args["x_function_graph"].is_number(), "{with_args}");
    let uftrace = row(&rows, "uftrace");
    match uftrace["ns_per_hit"].as_f64() {
        Some(ns) => {
            assert!(ns > 0.0, "{uftrace}");
            assert!(graph["x_uftrace"].is_number(), "{graph}");
        }
        None => assert_eq!(uftrace["error"], UFTRACE_MISSING, "{uftrace}"),
    }

    // The thread-scaling rows: every thread's hits counted (the row checks), from nproc
    // threads at once, beside their one-thread rows and the kernel uprobe doing the same.
    let threads = std::thread::available_parallelism().unwrap().get();
    for name in ["kernel-uprobe-threads", "optimized-probe-threads", "return-probe-threads", "function-graph-threads"] {
        let scaled = row(&rows, name);
        assert!(ns_per_hit(&rows, name) > 0.0, "{scaled}");
    }
    assert!(row(&rows, "optimized-probe-threads")["x_kernel_uprobe_threads"].is_number());
    assert!(row(&rows, "optimized-probe-threads")["note"]
        .as_str()
        .unwrap()
        .contains(&format!("{threads} threads at once")));
    let graph_threads = row(&rows, "function-graph-threads");
    assert_eq!(graph_threads["calls_per_batch"], 200 * threads as u64, "each thread made the calls: {graph_threads}");
    assert!(!graph_threads["note"].as_str().unwrap().contains("LOST"), "{graph_threads}");

    // The batch row patched every one of its program's 10,000 functions (and `main`).
    let sites = row(&rows, "enable-sites");
    assert!(ns_per_hit(&rows, "enable-sites") > 0.0, "{sites}");
    assert_eq!(sites["calls_per_batch"], 10_001, "{sites}");
    assert!(sites["note"].as_str().unwrap().contains("10001 sites in "), "{sites}");

    // Attaching to a running process: a duration, in milliseconds too.
    let attach = row(&rows, "attach-ms");
    assert!(ns_per_hit(&rows, "attach-ms") > 0.0, "{attach}");
    assert!(attach["ms"].as_f64().is_some_and(|ms| ms > 0.0), "{attach}");
    // And detaching from one whose threads hit the probe: Ctrl-C to every byte restored.
    let detach = row(&rows, "detach-ms");
    assert!(detach["ms"].as_f64().is_some_and(|ms| ms > 0.0), "{detach}");
    assert!(detach["note"].as_str().unwrap().contains("every byte restored"), "{detach}");
    // Recording a running process: 10,000 sites patched, in milliseconds; and the loop of a
    // program recorded and detached from costs what it cost untraced (a figure, not
    // compared here: timing is the bench's business, not a test's).
    let record = row(&rows, "record-attach-ms");
    assert!(record["ms"].as_f64().is_some_and(|ms| ms > 0.0), "{record}");
    assert!(record["note"].as_str().unwrap().contains("10000 sites patched"), "{record}");
    assert!(ns_per_hit(&rows, "after-detach").is_finite(), "{}", row(&rows, "after-detach"));

    // Start-up under record: a duration beside the untraced start, with every site of
    // the row's share of the generated program patched.
    assert_eq!(ns_per_hit(&rows, "startup-plain"), 0.0);
    for (name, sites) in [("startup-10k", 10_000), ("startup-40k", 40_000), ("startup-80k", 80_000)] {
        let startup = row(&rows, name);
        assert!(ns_per_hit(&rows, name) > 0.0 && startup["ms"].as_f64().is_some(), "{startup}");
        assert!(startup["note"].as_str().unwrap().contains(&format!(", {sites} sites patched")), "{startup}");
    }
    assert!(ns_per_hit(&rows, "startup-libc") > 0.0, "{}", row(&rows, "startup-libc"));

    // The ptrace fallback: every hit was printed (the row checks), and it costs more than
    // the in-process probes.
    let ptrace = row(&rows, "ptrace-probe");
    assert!(ns_per_hit(&rows, "ptrace-probe") > ns_per_hit(&rows, "optimized-probe"), "{ptrace}");
    assert!(ptrace["x_kernel_uprobe"].as_f64().is_some(), "{ptrace}");
}

/// The floors of the optimized and return paths: hand-built copies of each part, which
/// compute what the target does (their setup checks) and are what the real rows are
/// divided by. (Checked within the all-rows run: two bench processes at once would see each
/// other's kernel uprobes on their common binary.)
fn check_floors(rows: &[Value]) {
    const FLOORS: [&str; 15] = [
        "floor-jump",
        "floor-gprs",
        "floor-flags",
        "floor-sahf",
        "floor-call",
        "floor-dispatch",
        "floor-ret-swap",
        "floor-ret-miss",
        "floor-ret-sled",
        "floor-ret-call",
        "floor-ret-probe",
        "floor-ret-dispatch",
        "floor-rdtsc",
        "floor-graph",
        "floor-graph-dispatch",
    ];
    for floor in FLOORS {
        assert!(ns_per_hit(rows, floor).is_finite(), "{}", row(rows, floor));
    }
    // The real rows are divided by the floors they stand on.
    for (real, floors) in [
        ("optimized-probe", &["x_floor_jump", "x_floor_call", "x_floor_dispatch"][..]),
        ("optimized-probe-mid", &["x_floor_flags", "x_floor_sahf"]),
        ("return-probe", &["x_floor_ret_miss", "x_floor_ret_call", "x_floor_ret_probe", "x_floor_ret_dispatch"]),
        ("function-graph", &["x_floor_graph", "x_floor_graph_dispatch", "x_floor_rdtsc", "x_uftrace"]),
    ] {
        let real = row(rows, real).as_object().unwrap();
        assert!(floors.iter().all(|ratio| real.contains_key(*ratio)), "{real:?}");
    }
}

#[test]
fn the_uftrace_row_says_when_uftrace_is_not_installed() {
    // A PATH with nothing on it: the program rows run their programs by absolute path.
    let empty = std::env::temp_dir().join(format!("dynprobe-bench-empty-path-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dynprobe"))
        .args(["bench", "--json", "--iterations", "200", "--rows", "uftrace"])
        .env("PATH", &empty)
        .output()
        .expect("runs the dynprobe binary");
    std::fs::remove_dir(&empty).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let rows = json["rows"].as_array().unwrap();
    let names: Vec<_> = rows.iter().map(|row| row["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["graph-plain", "uftrace"]);
    let uftrace = row(rows, "uftrace");
    assert!(uftrace["ns_per_hit"].is_null(), "{uftrace}");
    assert_eq!(uftrace["error"], UFTRACE_MISSING, "{uftrace}");
}

#[test]
fn rows_option_runs_the_named_rows_and_what_they_need() {
    let names = |args: &[&str]| -> Vec<String> {
        rows(args).iter().map(|row| row["name"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(names(&["--iterations", "50", "--rows", "kernel-uprobe"]), ["baseline-call", "kernel-uprobe"]);
    // An -sse row is measured against its own caller's baseline.
    assert_eq!(
        names(&["--iterations", "50", "--rows", "return-probe-sse"]),
        ["baseline-call", "baseline-sse", "upper-state-penalty", "return-probe", "return-probe-sse"]
    );
    // A tracer row brings its program's baseline, the tracer it is compared with and its
    // floors (with theirs).
    assert_eq!(
        names(&["--iterations", "50", "--rows", "function-graph"]),
        [
            "baseline-call",
            "floor-rdtsc",
            "floor-graph",
            "floor-graph-dispatch",
            "graph-plain",
            "function-graph",
            "uftrace"
        ]
    );
}

/// The floors of a whole probe run alone: an optimized entry whose dispatcher does the least
/// any probe must (thread slot, recursion guard, per-thread count, handler call), an
/// optimized entry diverting the return into a sled, nothing done in either or the least any
/// return probe must do in both (an instance pushed and popped, a handler at each end), and
/// the function-graph tracer's (a timed record at the entry and at the return, bare or with
/// the thread's slot, guard and stack of calls). Their setup calls each beside the target
/// and refuses one that computes something else; the loop's calls come back through the
/// detour and the sled to their caller.
#[test]
fn the_floors_of_whole_probes_compute_what_the_target_does() {
    const FLOORS: [&str; 5] =
        ["floor-dispatch", "floor-ret-probe", "floor-ret-dispatch", "floor-graph", "floor-graph-dispatch"];
    let rows = rows(&["--iterations", "1000", "--rows", &FLOORS.join(",")]);
    let names: Vec<_> = rows.iter().map(|row| row["name"].as_str().unwrap()).collect();
    assert_eq!(names[0], "baseline-call");
    assert_eq!(names[1..], FLOORS);
    for name in FLOORS {
        let floor = row(&rows, name);
        assert!(floor["error"].is_null() && ns_per_hit(&rows, name).is_finite(), "{floor}");
        assert_eq!(floor["calls_per_batch"], 1000, "{floor}");
    }
}

#[test]
fn unknown_row_is_an_error_that_lists_the_rows() {
    let out = bench(&["--rows", "no-such-row"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-row") && stderr.contains("kernel-uprobe"), "{stderr}");
}
