//! `dynprobe bench --json` end to end: the shape of the JSON and that the reference rows
//! produce numbers. Timings are not asserted beyond being positive: benchmarks measure,
//! tests don't time.

use std::process::{Command, Output};

use serde_json::Value;

/// Whether the `int3-probe` row must produce a number.

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
    assert_eq!(object.keys().collect::<Vec<_>>(), ["rows"], "only `rows` at the top level");
    let rows = object["rows"].as_array().expect("`rows` is an array").clone();
    for row in &rows {
        assert!(row["name"].is_string(), "row without a name: {row}");
        match &row["ns_per_hit"] {
            Value::Number(_) => {}
            Value::Null => assert!(row["error"].is_string(), "null ns_per_hit without an error: {row}"),
            _ => panic!("ns_per_hit missing or not a number/null: {row}"),
        }
    }
    rows
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
    assert!(baseline["ns_per_call"].as_f64().is_some_and(|ns| ns > 0.0), "{baseline}");

    for trap_row in ["sigtrap-floor", "kernel-uprobe", "kernel-uretprobe"] {
        let ns = ns_per_hit(&rows, trap_row);
        assert!(ns > 0.0, "`{trap_row}` adds {ns} ns per hit");
    }

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
}

#[test]
fn rows_option_runs_the_named_rows_and_what_they_need() {
    let rows = rows(&["--iterations", "50", "--rows", "kernel-uprobe"]);
    let names: Vec<_> = rows.iter().map(|row| row["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["baseline-call", "kernel-uprobe"]);
}

#[test]
fn unknown_row_is_an_error_that_lists_the_rows() {
    let out = bench(&["--rows", "no-such-row"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-row") && stderr.contains("kernel-uprobe"), "{stderr}");
}
