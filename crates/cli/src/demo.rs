//! `dynprobe demo`: the bundled demo program (`demo/demo.c`, built with
//! `-fpatchable-function-entry=5` so its functions carry compiler NOP sites) traced with
//! `dynprobe record` and shown with `dynprobe replay` — or, with `--probe`, run under
//! `dynprobe probe` with two argument-fetching probes. Each step prints the command a user
//! would type.

use crate::probe::{probe, OutputArgs};
use crate::EXIT_ERROR;
use std::ffi::OsString;
use std::process::{Command, ExitCode};

/// Arguments of `dynprobe demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Show `dynprobe probe` (one line per hit, with arguments) instead of the function
    /// tracer.
    #[arg(long)]
    probe: bool,
    #[command(flatten)]
    output: OutputArgs,
}

/// The probes `dynprobe demo --probe` places in the demo program.
const DEMO_SPECS: &[&str] = &["p:parse_record line=$arg1:x64 len=$arg2", "p:checksum seed=$arg1 n=$arg2"];

/// Runs `dynprobe demo`.
pub fn run(args: &DemoArgs) -> ExitCode {
    let program = env!("DYNPROBE_DEMO");
    if args.probe {
        let quoted: Vec<String> = DEMO_SPECS.iter().map(|s| format!("'{s}'")).collect();
        // On stderr: it is commentary, and stdout may be JSON lines.
        eprintln!("$ dynprobe probe {} -- {program}", quoted.join(" "));
        let specs: Vec<String> = DEMO_SPECS.iter().map(|s| s.to_string()).collect();
        return probe(&specs, &[OsString::from(program)], true, &args.output);
    }
    match record_and_replay(program) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("dynprobe: {message}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// `dynprobe record -o DIR -- demo`, then `dynprobe replay DIR` and `dynprobe report DIR`,
/// through this very executable, in a directory removed afterwards.
fn record_and_replay(program: &str) -> Result<ExitCode, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find the dynprobe executable: {e}"))?;
    // In a fresh directory of its own, removed with it: never at a name another user could
    // have made first.
    let scratch = dynprobe_events::files::PrivateDir::new_in(&std::env::temp_dir(), "dynprobe-demo-")
        .map_err(|e| e.to_string())?;
    let dir = scratch.path().join("trace");
    let dir_text = dir.display().to_string();
    let steps: [&[&str]; 3] =
        [&["record", "-o", &dir_text, "--", program], &["replay", &dir_text], &["report", &dir_text]];
    let mut code = ExitCode::SUCCESS;
    for step in steps {
        eprintln!("\n$ dynprobe {}", step.join(" "));
        let status = Command::new(&me).args(step).status().map_err(|e| format!("cannot run {}: {e}", me.display()))?;
        if !status.success() {
            code = ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8);
            break;
        }
    }
    // `record` named the trace directory, which goes away with the demo: say so, and what
    // to run instead.
    eprintln!(
        "\n(the demo's trace was in a scratch directory, removed now; `dynprobe record -o DIR -- PROGRAM` keeps \
         one of your own, then `dynprobe replay DIR`)"
    );
    Ok(code)
}
