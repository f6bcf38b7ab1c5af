//! Source-level probes end to end: `dynprobe probe` on `source.c` (the symbols crate's
//! DWARF target) at `-O0` and `-O2`, by function line, file line and `FUNC@FILE`, with
//! variables, members through pointers, enums, chars, bools, strings, inlined copies,
//! optimized-out values and `$retval` typed from the DWARF. Each event is compared with
//! what the program prints for that round.
//!
//! The agent must be built beside the `dynprobe` binary first: `cargo build --workspace`.

mod common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{build_c, dynprobe, probe_to_file};

/// `source.c` built with `-g` and `opt` (after the harness's `-O2`).
fn program(opt: &'static str) -> &'static Path {
    static BUILT: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
    let (slot, out) = match opt {
        "-O0" => (&BUILT[0], "source-o0"),
        _ => (&BUILT[1], "source-o2"),
    };
    slot.get_or_init(|| build_c("../../../symbols/tests/targets/source.c", out, &["-g".as_ref(), opt.as_ref()]))
}

/// The events of a run (their text after `EVENT:`), checking that it succeeded.
fn events(name: &str, specs: &[&str], opt: &'static str, rounds: u64) -> Vec<String> {
    let (out, events) = probe_to_file(name, &[], specs, program(opt), &rounds.to_string());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dynprobe failed: {stderr}");
    events.lines().map(|l| l.split_once("] ").map_or(l, |(_, e)| e).to_string()).collect()
}

#[test]
fn a_function_line_fetches_what_the_program_prints_at_o0_and_o2() {
    let spec = "p:handle:3 total round req->path req->color req->urgent req->tag req->limits[2].hard";
    for opt in ["-O0", "-O2"] {
        let got = events(&format!("line{opt}"), &[spec], opt, 3);
        // At line 31 `total` is `req->len + round`; `len` is 11 and grows by one a round.
        let want: Vec<String> = (0..3)
            .map(|i| {
                format!(
                    "handle_L3: total={} round={i} req_path=\"/index.html\" req_color=GREEN req_urgent=true \
                     req_tag='x' req_limits_2_hard=6",
                    11 + 2 * i
                )
            })
            .collect();
        assert_eq!(got, want, "{opt}");
    }
}

#[test]
fn a_file_line_a_function_in_a_file_and_a_blank_line_moved_to_the_next() {
    let (out, text) =
        probe_to_file("file-line", &[], &["p source.c:29 req->len", "p:handle:2 round"], program("-O0"), "2");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`p:handle:2 round`: line 30 has no code; probed at line 31"), "{stderr}");
    let got: Vec<&str> = text.lines().map(|l| l.split_once("] ").unwrap().1).collect();
    assert_eq!(got, ["source_c_29: req_len=11", "handle_L2: round=0", "source_c_29: req_len=12", "handle_L2: round=1"]);

    let got = events("func-at-file", &["p count_up@source.c step *count"], "-O2", 3);
    // At the entry `*count` is the sum of the steps before: 0, 1, 1 + 2.
    assert_eq!(got, ["count_up: step=1 count=0", "count_up: step=2 count=1", "count_up: step=3 count=3"]);
}

#[test]
fn every_inlined_copy_is_probed_and_the_listing_says_so() {
    // At -O0 `scale` (always_inline) has a copy in handle, count_up and main: three calls a
    // round, with the arguments round, step (round + 1) and the loop index.
    let (out, text) = probe_to_file("inline", &[], &["p scale v"], program("-O0"), "2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("is an inlined copy of scale").count(), 3, "{stderr}");
    let got: Vec<&str> = text.lines().map(|l| l.split_once("] ").unwrap().1).collect();
    assert_eq!(got, ["scale: v=0", "scale: v=1", "scale: v=0", "scale: v=1", "scale: v=2", "scale: v=1"]);
}

#[test]
fn retval_takes_the_return_type_and_parameters_are_kept_from_the_entry() {
    for opt in ["-O0", "-O2"] {
        let got = events(&format!("retval{opt}"), &["r:count_up ret=$retval step"], opt, 3);
        // count_up returns count * scale(step) = count * (2 * step + 1); count is 1, 3, 6.
        assert_eq!(
            got,
            ["count_up__return: ret=3 step=1", "count_up__return: ret=15 step=2", "count_up__return: ret=42 step=3"],
            "{opt}"
        );
    }
}

#[test]
fn an_optimized_out_variable_says_so() {
    // At -O2 GCC folds the inlined copy's `v` into its caller's arithmetic.
    let got = events("optimized-out", &["p scale v"], "-O2", 1);
    assert!(!got.is_empty());
    assert!(got.iter().all(|e| e == "scale: v=(optimized out)"), "{got:?}");
}

#[test]
fn bad_source_specs_are_refused_with_the_reason_and_nothing_runs() {
    let refused = |specs: &[&str], program: &Path| {
        let out = dynprobe().arg("probe").args(specs).arg("--").arg(program).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(out.stdout.is_empty(), "the program ran");
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    };
    assert_eq!(
        refused(&["p:handle:3 nope"], program("-O0")),
        "dynprobe: probe `p:handle:3 nope`: field `nope` (`nope`): no variable `nope` at this point (visible: req, \
         round, total)"
    );
    assert_eq!(
        refused(&["p:handle:3 req->size"], program("-O0")),
        "dynprobe: probe `p:handle:3 req->size`: field `req_size` (`req->size`): `struct request *` has no member \
         `size` (members: path, len, color, urgent, tag, limits)"
    );
    assert_eq!(
        refused(&["p:hadle:3"], program("-O0")),
        "dynprobe: probe `p:hadle:3`: no function `hadle` in the debugging information (nearest: handle)"
    );
    assert_eq!(
        refused(&["r:handle:3"], program("-O0")),
        "dynprobe: probe `r:handle:3`: a return probe goes on a function: write `r:FUNC` (or `r:FUNC@FILE`)"
    );
    let stripped = common::scratch().join("source-stripped");
    std::fs::copy(program("-O2"), &stripped).unwrap();
    assert!(std::process::Command::new("strip").arg("-g").arg(&stripped).status().unwrap().success());
    let message = refused(&["p:handle:3 total"], &stripped);
    assert!(
        message.starts_with(&format!(
            "dynprobe: cannot place probe `p:handle:3 total`: `{}` has no DWARF",
            stripped.display()
        )),
        "{message}"
    );
    assert!(message.ends_with("rebuild it with `-g` (or install its separate debug file)"), "{message}");
}

/// `targets/floats.c` built with `-g` and `opt`.
fn floats_program(opt: &str) -> PathBuf {
    build_c("floats.c", &format!("floats{opt}"), &["-g".as_ref(), opt.as_ref()])
}

/// The events `floats.c`'s output says each probe of
/// [`float_and_double_values_come_from_the_vector_registers_on_both_probe_kinds`] must
/// see: its `mix …` and `round …` lines turned into what `p mix x y k`, `p:mix:3 scaled x`,
/// `r mix` and `r halve` print.
fn floats_events_printed(stdout: &str) -> Vec<String> {
    let mut want = Vec::new();
    for line in stdout.lines() {
        let fields: HashMap<&str, &str> = line.split(' ').filter_map(|f| f.split_once('=')).collect();
        if line.starts_with("mix ") {
            want.push(format!("mix: x={} y={} k={}", fields["x"], fields["y"], fields["k"]));
            want.push(format!("mix_L3: scaled={} x={}", fields["scaled"], fields["x"]));
        } else if line.starts_with("round ") {
            want.push(format!("mix__return: ret={}", fields["mix"]));
            want.push(format!("halve__return: ret={}", fields["halve"]));
        }
    }
    want
}

/// Probes `floats.c` built as `program` (`name` for its files) with `options`: the
/// `float`/`double` values its DWARF names, and the same by register and type, must be
/// what the program prints.
fn floats_probed_as_printed(name: &str, program: &Path, options: &[&str]) {
    // At -O2 every value here lives in an xmm register at its probe point (x in xmm0 and y
    // in xmm1 at the entry, `scaled` in xmm2 at the printf); at -O0 the parameters are in
    // xmm0-1 at the entry and the locals on the stack. The return values are xmm0's.
    let specs = ["p mix x y k", "p:mix:3 scaled x", "r mix ret=$retval", "r halve ret=$retval"];
    let (out, text) = probe_to_file(name, options, &specs, program, "3");
    assert!(out.status.success(), "{name} {options:?}: {}", String::from_utf8_lossy(&out.stderr));
    let want = floats_events_printed(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(want.len(), 12, "{name}: three rounds of four events");
    let got: Vec<&str> = text.lines().map(|l| l.split_once("] ").map_or(l, |(_, e)| e)).collect();
    assert_eq!(got, want, "{name} {options:?}");
    // The same values named by register and type, without the DWARF: the ABI's argument
    // and return registers at the entry and the return.
    let by_register = ["p mix x=%xmm0:f64 y=%xmm1:f32 k=%di:s32", "r mix ret=%xmm0:f64", "r halve ret=%xmm0:f32"];
    let (out, text) = probe_to_file(&format!("{name}-typed"), options, &by_register, program, "3");
    assert!(out.status.success(), "{name} {options:?}: {}", String::from_utf8_lossy(&out.stderr));
    let typed: Vec<&str> = text.lines().map(|l| l.split_once("] ").map_or(l, |(_, e)| e)).collect();
    let at_entry_and_return: Vec<&str> = got.iter().filter(|e| !e.starts_with("mix_L3")).copied().collect();
    assert_eq!(typed, at_entry_and_return, "{name} {options:?}: f64/f32 of xmm registers");
}

#[test]
fn float_and_double_values_come_from_the_vector_registers_on_both_probe_kinds() {
    for opt in ["-O0", "-O2"] {
        let program = floats_program(opt);
        for options in [&[][..], &["--no-optimize"]] {
            floats_probed_as_printed(&format!("floats{opt}"), &program, options);
        }
    }
    // A `long double` is x87 state, not a vector register's: refused by name, not garbage.
    for spec in ["r widen ret=$retval", "p widen v"] {
        let out = dynprobe().arg("probe").arg(spec).arg("--").arg(floats_program("-O0")).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{spec}");
        assert!(out.stdout.is_empty(), "the program ran");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("`long double` (16 bytes, x87 extended precision) is not supported"), "{stderr}");
    }
}

/// The ptrace fallback (a static program) reads the vector registers with
/// `PTRACE_GETFPREGS`: the same specs print the same values (before, each read `(fault)`).
#[test]
fn on_a_static_program_the_ptrace_fallback_reads_float_and_double_values_too() {
    for opt in ["-O0", "-O2"] {
        let program = build_c("floats.c", &format!("floats-static{opt}"), &["-g", opt, "-static"].map(OsStr::new));
        floats_probed_as_printed(&format!("floats-static{opt}"), &program, &["--ptrace"]);
    }
}

/// `dynprobe probe ARGS -x PROGRAM`'s standard output, checking that it succeeded.
fn discover(args: &[&str], program: &Path) -> String {
    let out = dynprobe().arg("probe").args(args).arg("-x").arg(program).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn funcs_lines_vars_and_dry_run_show_the_source_without_running_it() {
    let o0 = program("-O0");
    assert_eq!(discover(&["--funcs"], o0), "count_up\nhandle\nmain\nscale\n");
    // At -O2 glibc's inline `atoi` (a wrapper of strtol in <stdlib.h>) is inlined into main.
    assert_eq!(discover(&["--funcs", "a*"], program("-O2")), "atoi\n");
    assert_eq!(discover(&["--funcs", "*u*"], o0), "count_up\n");

    let lines = discover(&["--lines", "handle"], o0);
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../symbols/tests/targets/source.c");
    let first = lines.lines().next().unwrap();
    assert!(first.starts_with("<handle@") && first.ends_with("source.c:0>"), "{first}");
    let text = std::fs::read_to_string(source).unwrap();
    let body: Vec<&str> = text.lines().skip(27).take(9).collect();
    let want: Vec<String> = [Some(0), Some(1), None, Some(3), Some(4), Some(5), Some(6), Some(7), Some(8)]
        .iter()
        .zip(&body)
        .map(|(n, b)| match n {
            Some(n) => format!("{n:>7}  {b}"),
            None => format!("         {b}"),
        })
        .collect();
    assert_eq!(lines.lines().skip(1).collect::<Vec<_>>(), want);

    assert_eq!(
        discover(&["--vars", "count_up:2"], o0),
        "Available variables at count_up:2 (count_up+0x24, line 40)\n        long int * count\t-24(%rbp)\n        \
         short int step\t-28(%rbp)\n        long int seen\t-8(%rbp)\n"
    );
    let o2 = discover(&["--vars", "scale"], program("-O2"));
    assert!(o2.contains(", inlined copy of scale)\n"), "{o2}");
    assert!(o2.contains("        int v\t(optimized out"), "{o2}");

    assert_eq!(
        discover(&["--dry-run", "r:count_up ret=$retval step", "p:handle:3 req->path req->color"], o0),
        "r:count_up__return count_up ret=$retval:s64 step=$arg2:s16\n\
         p:handle_L3 handle+0x1e req_path=+0(+0(-24(%rbp))):string req_color=+12(-24(%rbp)):u32\n"
    );
}

/// `targets/source_rs.rs` built with rustc `-g -O`, once.
fn rust_program() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = common::scratch().join("source-rs");
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        let status = std::process::Command::new(rustc)
            .args(["--edition", "2021", "-g", "-O", "-o"])
            .arg(&out)
            .arg(common::targets().join("source_rs.rs"))
            .status()
            .expect("run rustc");
        assert!(status.success(), "rustc source_rs.rs failed");
        out
    })
}

#[test]
fn rust_str_slices_string_vec_and_option() {
    let (out, text) =
        probe_to_file("rust", &[], &["p weigh:1 name count list", "r:weigh ret=$retval"], rust_program(), "3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        "weigh name=apple count=0 len=1 first=7 total=6\npack label=box0 sizes=[0] limit=None n=5\n\
         weigh name=kiwi count=1 len=2 first=7 total=7\npack label=box1 sizes=[0, 3] limit=Some(7) n=13\n\
         weigh name=banana count=2 len=3 first=7 total=11\npack label=box2 sizes=[0, 3, 6] limit=None n=7\n"
    );
    let got: Vec<&str> = text.lines().map(|l| l.split_once("] ").unwrap().1).collect();
    // A `&str` is its bytes up to its length (the program's strings are not NUL-terminated).
    assert_eq!(
        got,
        [
            "weigh_L1: name=\"apple\" count=0 list_len=1 list_0=7",
            "weigh__return: ret=6",
            "weigh_L1: name=\"kiwi\" count=1 list_len=2 list_0=7",
            "weigh__return: ret=7",
            "weigh_L1: name=\"banana\" count=2 list_len=3 list_0=7",
            "weigh__return: ret=11",
        ]
    );
    // A `String` as its text, a `Vec` as its length and the elements below it, an `Option`
    // of a scalar as `Some(v)` or `None` (line 2: rustc stores the payload after line 1's
    // first instruction, though its DWARF places it there from the start).
    let (out, text) = probe_to_file("rust-owned", &[], &["p pack:2 label sizes limit"], rust_program(), "3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<&str> = text.lines().map(|l| l.split_once("] ").unwrap().1).collect();
    assert_eq!(
        got,
        [
            "pack_L2: label=\"box0\" sizes_len=1 sizes_0=0 limit=None",
            "pack_L2: label=\"box1\" sizes_len=2 sizes_0=0 sizes_1=3 limit=Some(7)",
            "pack_L2: label=\"box2\" sizes_len=3 sizes_0=0 sizes_1=3 sizes_2=6 limit=None",
        ]
    );
    // At the entry rustc's frame (based on rsp) is not made yet: the reason, not a wrong value.
    let err = dynprobe().args(["probe", "p weigh name", "--"]).arg(rust_program()).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&err.stderr).trim(),
        "dynprobe: probe `p weigh name`: field `name` (`name`): its frame is not made yet at the function's entry; \
         probe a line of the function (FUNC:1)"
    );
}

/// `targets/source_cxx.cpp` built with `-g` and `opt`.
fn cxx_program(opt: &str) -> PathBuf {
    common::build_cxx("source_cxx.cpp", &format!("source-cxx{opt}"), &["-g".as_ref(), opt.as_ref()])
}

/// The events of one run of a spec on `program`, which must print what the first calls see.
fn cxx_events(name: &str, spec: &str, program: &Path) -> Vec<String> {
    let (out, text) = probe_to_file(name, &[], &[spec], program, "x");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // `items` is argc + 2 = 4 (the program and one argument), `boxes` argc + 4.
    assert!(stdout.starts_with("weigh items=4 extra=0 total=40\ncrate boxes=6 extra=0 total=600\n"), "{stdout}");
    text.lines().map(|l| l.split_once("] ").unwrap().1.to_string()).collect::<Vec<_>>()
}

#[test]
fn a_cxx_member_function_by_its_lines_with_this() {
    for opt in ["-O0", "-O2"] {
        let got =
            cxx_events(&format!("cxx{opt}"), "p:weigh_L1 shop::Basket::weigh:1 this->items extra", &cxx_program(opt));
        assert_eq!(
            got,
            ["weigh_L1: this_items=4 extra=0", "weigh_L1: this_items=4 extra=1", "weigh_L1: this_items=4 extra=2"],
            "{opt}"
        );
    }
    // At -O2, past the call of printf, GCC describes `this` only by its value at the entry
    // (DW_OP_entry_value): rdi, reused since, and the value left only in the caller's frame.
    // Optimized out there, and `--vars` says where it can be read.
    let got = cxx_events("cxx-entry-value", "p:weigh_L2 shop::Basket::weigh:2 extra this->items", &cxx_program("-O2"));
    assert_eq!(got[0], "weigh_L2: extra=0 this_items=(optimized out)");
    let vars = discover(&["--vars", "shop::Basket::weigh:2"], &cxx_program("-O2"));
    let this = vars.lines().find(|l| l.contains(" this\t")).unwrap();
    assert!(this.contains("\t(optimized out; available at 0x"), "{vars}");
}

#[test]
fn cxx_names_by_their_namespace_and_class_and_a_site_for_each_overload() {
    let program = cxx_program("-O2");
    // Listed as a spec names them; the bare name matches too.
    assert_eq!(discover(&["--funcs", "weigh"], &program), "shop::Basket::weigh\nshop::Crate::weigh\nshop::weigh\n");
    // The bare name: a site in each class and for each overload (the first line of each).
    let dry = discover(&["--dry-run", "p weigh:1"], &program);
    let mut symbols: Vec<&str> = dry.lines().map(|l| l.rsplit(' ').next().unwrap()).collect();
    symbols.sort();
    assert_eq!(
        symbols,
        ["_ZN4shop5weighEdf", "_ZN4shop5weighEl", "_ZNK4shop5Crate5weighEi", "_ZNK4shop6Basket5weighEi"]
    );
    // The qualified name: that class's only.
    let got = cxx_events("cxx-crate", "p:crate shop::Crate::weigh:1 this->boxes extra", &program);
    assert_eq!(got, ["crate: this_boxes=6 extra=0", "crate: this_boxes=6 extra=1", "crate: this_boxes=6 extra=2"]);
    let out = dynprobe().args(["probe", "p shop::Sack::weigh:1", "--"]).arg(&program).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "dynprobe: probe `p shop::Sack::weigh:1`: no function `shop::Sack::weigh` in the debugging information \
         (nearest: shop::Basket::weigh, shop::Crate::weigh)"
    );
}

#[test]
fn debian_python_by_its_debug_package() {
    // python3.11's DWARF is in python3.11-dbg's build-id file (scripts/setup installs it),
    // link-time optimized: PyLong_FromLong is out of line and inlined at dozens of places.
    // The sections dynprobe inflates go to the scratch directory, not the user's cache (set
    // for this test binary's children: none of its tests compares their environment).
    std::env::set_var("DYNPROBE_CACHE_DIR", common::scratch().join("dwarf-cache"));
    let python = Path::new("/usr/bin/python3.11");
    let script = common::scratch().join("long.py");
    std::fs::write(&script, "x = 123456789\nprint(x * 10 + 7)\n").unwrap();
    let (out, events) =
        probe_to_file("python", &[], &["p:ev PyLong_FromLong@longobject.c ival"], python, script.to_str().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1234567897\n");
    let inlined = stderr.matches("is an inlined copy of PyLong_FromLong").count();
    assert!(inlined > 10, "{inlined} inlined copies: {stderr}");
    // The multiplication's operand is made from the constant 123456789 by PyLong_FromLong.
    assert!(events.lines().any(|l| l.ends_with("] ev: ival=123456789")), "{events}");
    // Its copies are in several units (each read on its own): the listing shows it once.
    let lines = discover(&["--lines", "PyLong_FromLong"], python);
    assert_eq!(lines.matches("<PyLong_FromLong@").count(), 1, "{lines}");
}

/// `source.c` built as a shared library (`-g`, its `main` with it) and a program of nothing
/// but that library, whose `main` the C runtime then calls: the same code, in a library.
fn library_program() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let flags = ["-g", "-O0", "-shared", "-fPIC"].map(std::ffi::OsStr::new);
        let library = build_c("../../../symbols/tests/targets/source.c", "libsrcdwarf.so", &flags);
        let out = common::scratch().join("source-in-lib");
        let rpath = format!("-Wl,-rpath,{}", library.parent().unwrap().display());
        let status = std::process::Command::new("gcc").arg(&library).arg(rpath).arg("-o").arg(&out).status().unwrap();
        assert!(status.success(), "linking the program of libsrcdwarf.so failed");
        out
    })
}

#[test]
fn source_locations_in_a_shared_library() {
    // The library by its name as probe specs take them (`libsrcdwarf` → libsrcdwarf.so),
    // found among those the program loads; its symbols named with it in the lowered spec.
    let specs = ["p:libsrcdwarf:handle:3 total req->path", "p libsrcdwarf:source.c:29 req->len"];
    let (out, text) = probe_to_file("library", &[], &specs, library_program(), "2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let got: Vec<&str> = text.lines().map(|l| l.split_once("] ").unwrap().1).collect();
    assert_eq!(
        got,
        [
            "libsrcdwarf_source_c_29: req_len=11",
            "libsrcdwarf_handle_L3: total=11 req_path=\"/index.html\"",
            "libsrcdwarf_source_c_29: req_len=12",
            "libsrcdwarf_handle_L3: total=13 req_path=\"/index.html\"",
        ]
    );
    let dry = dynprobe()
        .args(["probe", "--dry-run", "p:libsrcdwarf:handle:3 round", "--"])
        .arg(library_program())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&dry.stdout),
        "p:libsrcdwarf_handle_L3 libsrcdwarf:handle+0x1e round=-28(%rbp):s32\n"
    );
    // Debian's C library, by libc6-dbg's build-id file (scripts/setup installs it).
    let libc = dynprobe()
        .args(["probe", "--dry-run", "p:libc:__libc_free mem"])
        .arg("--")
        .arg(library_program())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&libc.stdout), "p:libc___libc_free libc:__libc_free mem=%rdi:x64\n");
    // In a running process, the library it has mapped: Debian's C library in `sleep`, which
    // has no DWARF of its own.
    let mut sleeper = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    // `spawn` returns once `sleep` is exec'd, before its loader has mapped the C library.
    let maps = format!("/proc/{}/maps", sleeper.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&maps).is_ok_and(|m| m.contains("/libc.so")) {
        assert!(std::time::Instant::now() < deadline, "sleep did not map the C library within 10 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let vars =
        dynprobe().args(["probe", "--vars", "libc:__libc_free", "-p", &sleeper.id().to_string()]).output().unwrap();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(vars.status.success(), "{}", String::from_utf8_lossy(&vars.stderr));
    let listing = String::from_utf8_lossy(&vars.stdout);
    assert!(listing.starts_with("Available variables at libc:__libc_free (__libc_free+0x0, line "), "{listing}");
    assert!(listing.contains("        void * mem\t%rdi\n"), "{listing}");
    // A library the program does not load is named in the refusal.
    let refused =
        dynprobe().args(["probe", "p:libnothere:handle:3 round", "--"]).arg(library_program()).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("loads no library named `libnothere`"), "{stderr}");
}
