//! End-to-end tests of the fetch-argument grammar and of return probes in `dynprobe probe`:
//! `targets/fetch.c` prints, from inside each probed function, what the probes must report
//! (struct fields, strings, globals, its return address and stack pointer, its return
//! value), and every event is compared with those lines exactly.
//!
//! The agent must be built beside the `dynprobe` binary first (`cargo test` only builds
//! it as part of the whole workspace): `cargo build -p dynprobe-cli -p dynprobe-agent`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The probes of the main tests: every kind of fetch argument.
const SPECS: &[&str] = &[
    "p:score id=+0($arg1):s64 sc=+8($arg1):s32 next=+0(+24($arg1)):s64 name=+0(+16($arg1)):string \
     nameptr=+16($arg1):x64 tag=$arg2:string g=@global_var:u32 t2=@table+8:s32 c=$comm ra=$stack0:x64 \
     sp=$stack:x64 ip=%rip:x64 prog=+0(@libc:program_invocation_short_name):string",
    "r:score ret=$retval:s32 t=$duration sc=+8($arg1):s32 id=+0($arg1)",
    "r:slow ret=$retval ms=$arg1 t=$duration",
    "p:name_len s=$arg1:string",
    "r:name_len ret=$retval:s32 s=$arg1:ustring",
];

/// The most bytes of a string an event shows (`dynprobe::spec::STRING_MAX`).
const STRING_MAX: usize = 256;

fn scratch() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fetch-args-test")
}

/// `targets/fetch.c`, compiled once per test run.
fn target() -> &'static Path {
    static TARGET: OnceLock<PathBuf> = OnceLock::new();
    TARGET.get_or_init(|| {
        let dir = scratch();
        std::fs::create_dir_all(&dir).unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/targets/fetch.c");
        let exe = dir.join(format!("fetch-{}", std::process::id()));
        let status = Command::new("gcc")
            .args(["-O1", "-g", "-fno-inline", "-fcf-protection=none", "-fno-omit-frame-pointer", "-o"])
            .arg(&exe)
            .arg(&source)
            .status()
            .expect("run gcc");
        assert!(status.success(), "gcc failed to compile {}", source.display());
        exe
    })
}

/// `dynprobe` with `args`, checking first that the agent it needs was built.
fn dynprobe(args: &[&str]) -> Output {
    let exe = Path::new(env!("CARGO_BIN_EXE_dynprobe"));
    let agent = exe.with_file_name("libdynprobe_agent.so");
    assert!(
        agent.is_file(),
        "{} is missing: run `cargo build -p dynprobe-cli -p dynprobe-agent` (with the same profile) before these tests",
        agent.display()
    );
    Command::new(exe).args(args).output().expect("run dynprobe")
}

/// `dynprobe probe SPECS... OPTIONS... -- target`.
fn probe(specs: &[&str], options: &[&str]) -> Output {
    let mut args = vec!["probe"];
    args.extend(specs);
    args.extend(options);
    args.extend(["--", target().to_str().unwrap()]);
    dynprobe(&args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What the program printed: the address of `run`, and per call of `score` its
/// `key=value` fields (strings hex-encoded).
struct Program {
    run: u64,
    scores: Vec<HashMap<String, String>>,
    slow: Vec<u64>,
}

fn parse_program(stdout: &str) -> Program {
    let mut program = Program { run: 0, scores: Vec::new(), slow: Vec::new() };
    for line in stdout.lines() {
        let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
        let fields: HashMap<String, String> =
            rest.split(' ').filter_map(|f| f.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match kind {
            "run" => program.run = hex(rest),
            "score" => program.scores.push(fields),
            "slow" => program.slow.push(fields["ms"].parse().unwrap()),
            _ => {}
        }
    }
    assert_eq!(program.scores.len(), 6, "{stdout}");
    assert_eq!(program.slow, [20, 1], "{stdout}");
    assert_ne!(program.run, 0, "{stdout}");
    program
}

/// `0x...` as a number.
fn hex(text: &str) -> u64 {
    u64::from_str_radix(text.strip_prefix("0x").unwrap_or_else(|| panic!("not hex: {text}")), 16).unwrap()
}

/// The bytes of a hex-encoded string as the program prints it.
fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

/// A string as an event shows it: cut at STRING_MAX bytes, quoted, escaped.
fn quoted(bytes: &[u8]) -> String {
    let mut out = String::from("\"");
    for &b in &bytes[..bytes.len().min(STRING_MAX)] {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push('"');
    out
}

/// The value of `name=` in a text event's fields, for fields that hold no spaces.
fn field<'a>(event: &'a str, name: &str) -> &'a str {
    let at = event.find(&format!(" {name}=")).unwrap_or_else(|| panic!("no {name} in {event}")) + name.len() + 2;
    event[at..].split(' ').next().unwrap()
}

/// A duration in an event, checked to be at least `min_ns` and plausible.
fn duration(event: &str, min_ns: u64) -> &str {
    let t = field(event, "t");
    let ns: u64 = t.parse().unwrap();
    assert!(ns >= min_ns && ns < min_ns + 5_000_000_000, "duration {ns} ns, expected at least {min_ns}: {event}");
    t
}

#[test]
fn every_event_shows_exactly_what_the_program_did() {
    let events_file = scratch().join(format!("events-{}.txt", std::process::id()));
    std::fs::create_dir_all(scratch()).unwrap();
    let out = probe(SPECS, &["-o", events_file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "stderr: {}", text(&out.stderr));
    let program = parse_program(&text(&out.stdout));
    let events = std::fs::read_to_string(&events_file).unwrap();

    // `   0.001234 [tid] event: fields`: one thread made every call.
    let mut tids = Vec::new();
    let events: Vec<&str> = events
        .lines()
        .map(|line| {
            let (time, rest) = line.trim_start().split_once(" [").unwrap();
            time.parse::<f64>().unwrap_or_else(|_| panic!("bad time in {line:?}"));
            let (tid, event) = rest.split_once("] ").unwrap();
            tids.push(tid.to_string());
            event
        })
        .collect();
    assert!(tids.iter().all(|t| *t == tids[0]), "{tids:?}");

    let mut expected = Vec::new();
    for (i, call) in program.scores.iter().enumerate() {
        let next = match call["next"].as_str() {
            // The last record's `next` is NULL: reading through it faults.
            "-1" => "(fault)".to_string(),
            id => id.to_string(),
        };
        // The function's own `__builtin_return_address` is the return probe's trampoline
        // (as under a kretprobe); $stack0, read before the return probe's entry handler
        // ran, is the real one: a call site inside `run`. (Without the return probe both
        // agree: see the test below.)
        let ra = field(events[2 * i], "ra");
        let ra_addr = hex(ra);
        assert!(
            ra_addr > program.run && ra_addr - program.run < 0x1000,
            "$stack0 {ra} is not inside run at {:#x}",
            program.run
        );
        let sp = hex(&call["sp"]);
        assert_eq!(sp % 16, 8, "$stack at a function's entry is 8 past a 16-byte boundary");
        expected.push(format!(
            "score: id={} sc={} next={next} name={} nameptr={} tag={} g={} t2={} c=\"fetch-main\" ra={} sp={} ip={} prog={}",
            call["id"],
            call["score"],
            quoted(&unhex(&call["name"])),
            call["nameptr"],
            quoted(&unhex(&call["tag"])),
            call["global"],
            call["table2"],
            ra,
            call["sp"],
            call["ip"],
            quoted(&unhex(&call["prog"])),
        ));
        // The return reads the struct through the pointer kept from the entry: the score
        // the function doubled.
        let ret = events[2 * i + 1];
        expected.push(format!(
            "score__return: ret={} t={} sc={} id={}",
            call["ret"],
            duration(ret, 1),
            call["after"],
            call["id"]
        ));
    }
    for (i, ms) in program.slow.iter().enumerate() {
        let event = events[12 + i];
        expected.push(format!("slow__return: ret={} ms={ms} t={}", ms * 3, duration(event, ms * 1_000_000)));
    }
    expected.extend(
        [
            "name_len: s=\"abc\"",
            "name_len__return: ret=3 s=\"abc\"",
            "name_len: s=(fault)",
            "name_len__return: ret=-1 s=(fault)",
        ]
        .map(String::from),
    );
    assert_eq!(events.len(), expected.len(), "{events:#?}");
    for (event, expected) in events.iter().zip(&expected) {
        assert_eq!(event, expected);
    }
    // The strings the test is about are there: escapes, bytes past ASCII, the cut.
    assert!(expected[4].contains(r#"name="quote\" back\\slash""#), "{}", expected[4]);
    assert!(expected[6].contains(r#"name="tab\tnew\nline""#), "{}", expected[6]);
    assert!(expected[8].contains(r#"tag="\x01\x7f\xff""#), "{}", expected[8]);
    assert!(expected[10].contains(&format!("name=\"{}\"", "x".repeat(STRING_MAX))), "{}", expected[10]);
}

#[test]
fn json_values_are_numbers_hex_strings_decoded_strings_and_null_for_a_fault() {
    let out = probe(SPECS, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let program = parse_program(&stdout);
    let events: Vec<serde_json::Value> =
        stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 18, "{stdout}");
    for (i, call) in program.scores.iter().enumerate() {
        let entry = &events[2 * i];
        assert_eq!(entry["event"], "score");
        let args = &entry["args"];
        assert_eq!(args["id"], call["id"].parse::<i64>().unwrap());
        assert_eq!(args["sc"], call["score"].parse::<i64>().unwrap());
        match call["next"].as_str() {
            "-1" => assert!(args["next"].is_null(), "{entry}"),
            id => assert_eq!(args["next"], id.parse::<i64>().unwrap()),
        }
        let name = unhex(&call["name"]);
        assert_eq!(args["name"], String::from_utf8_lossy(&name[..name.len().min(STRING_MAX)]).as_ref());
        assert_eq!(args["tag"], String::from_utf8_lossy(&unhex(&call["tag"])).as_ref());
        assert_eq!(args["nameptr"], call["nameptr"].as_str());
        assert_eq!(args["g"], call["global"].parse::<u64>().unwrap());
        assert_eq!(args["t2"], call["table2"].parse::<i64>().unwrap());
        assert_eq!(args["c"], "fetch-main");
        assert!(hex(args["ra"].as_str().unwrap()) > program.run, "{entry}");
        let ret = &events[2 * i + 1];
        assert_eq!(ret["event"], "score__return");
        assert_eq!(ret["args"]["ret"], call["ret"].parse::<i64>().unwrap());
        assert!(ret["args"]["t"].as_u64().unwrap() > 0, "{ret}");
        assert_eq!(ret["args"]["sc"], call["after"].parse::<i64>().unwrap());
    }
    // The name with `é`, as UTF-8 again.
    assert_eq!(events[8]["args"]["name"], "utf8 é");
    assert_eq!(events[12]["args"]["ms"], 20);
    assert!(events[12]["args"]["t"].as_u64().unwrap() >= 20_000_000);
    assert_eq!(events[14]["args"]["s"], "abc");
    assert!(events[16]["args"]["s"].is_null(), "{}", events[16]);
    assert!(events[17]["args"]["s"].is_null(), "{}", events[17]);
    assert_eq!(events[17]["args"]["ret"], -1);
}

#[test]
fn stack0_at_an_entry_is_the_return_address() {
    let out = probe(&["p:score ra=$stack0:x64 sp=$stack:x64"], &[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let program = parse_program(&stdout);
    let events: Vec<&str> = stdout.lines().filter_map(|l| l.split_once("] score: ").map(|(_, e)| e)).collect();
    let expected: Vec<String> =
        program.scores.iter().map(|call| format!("ra={} sp={}", call["ra"], call["sp"])).collect();
    assert_eq!(events, expected);
}

/// Runs a probe that must be refused and returns stderr, checking that dynprobe exited
/// with 2 and the program's `main` never ran.
fn refused(specs: &[&str]) -> String {
    let out = probe(specs, &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "the program ran: {}", text(&out.stdout));
    stderr
}

#[test]
fn fetches_a_probe_kind_cannot_have_are_refused_at_their_column() {
    assert_eq!(
        refused(&["p:score x=$retval"]),
        "dynprobe: bad probe spec: `$retval` is only available in return probes (r:) at column 12\n  \
         p:score x=$retval\n             ^\n"
    );
    assert_eq!(
        refused(&["r:score+4 x=$retval"]),
        "dynprobe: bad probe spec: a return probe goes on a function's entry: no offset is allowed (write \
         `r:SYMBOL`) at column 8\n  r:score+4 x=$retval\n         ^\n"
    );
    assert_eq!(
        refused(&["p:score x=+8(+0($arg1)"]),
        "dynprobe: bad probe spec: missing `)` to close the `(` at column 13 at column 23\n  \
         p:score x=+8(+0($arg1)\n                        ^\n"
    );
}

#[test]
fn an_unknown_variable_is_refused_before_main() {
    let stderr = refused(&["r:slow t=$duration", "p:score v=@no_such_variable:u32"]);
    assert!(
        stderr.starts_with(
            "dynprobe: cannot place probe `p:score v=@no_such_variable:u32`: field `v`: cannot resolve \
             `@no_such_variable`: unknown symbol `no_such_variable`"
        ),
        "{stderr}"
    );
    assert!(stderr.trim_end().ends_with("; the program was not run"), "{stderr}");
}
