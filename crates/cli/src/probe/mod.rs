//! `dynprobe probe` and `dynprobe demo`: run a program with probes placed by the agent, or
//! attach to a running one, printing one line per hit.
//!
//! The CLI parses every spec first (a syntax error stops here, with its column), then
//! starts the program with `libdynprobe_agent.so` preloaded — the agent places the probes
//! before `main` and sends its lines over a pipe (protocol in the `dynprobe-agent` crate) —
//! or loads the agent into a running process (`attach`).

pub(crate) mod attach;
mod exec;
pub(crate) mod output;
mod ptrace;
pub(crate) mod session;
pub(crate) mod source;

use dynprobe::spec::ProbeSpec;
use output::Printer;
use session::Placement;
use std::ffi::OsString;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::EXIT_ERROR;

/// The examples of `probe --help`.
pub(crate) const EXAMPLES: &str = "  dynprobe probe 'p:checksum seed=$arg1 n=$arg2:x64' -- ./prog
  dynprobe probe 'r:parse ret=$retval:s32 name=+8($arg1):string t=$duration' -- ./prog
  dynprobe probe -p 4242 --duration 10s 'p:libc:malloc size=%rdi:u64' 'r:libc:malloc ptr=$retval:x64'
  dynprobe probe 'm:app:request' -- ./server";

/// The spec grammar for `probe --help`: the parser's own ([`dynprobe::spec::GRAMMAR`]).
pub(crate) fn grammar_help() -> String {
    let indented = |line: &str| if line.is_empty() { "\n".to_string() } else { format!("  {line}\n") };
    format!("Spec grammar:\n{}", dynprobe::spec::GRAMMAR.lines().map(indented).collect::<String>().trim_end())
}

/// Arguments of `dynprobe probe`.
#[derive(clap::Args)]
pub struct ProbeArgs {
    /// Probe specs, as the kernel's kprobe_events: `p` at an instruction, `r` at a
    /// function's return, `m` at a static marker's sites (without fields, a marker's hit
    /// shows its arguments arg1..argN, typed by its record: `dynprobe list-markers` lists
    /// them). `--help` shows the whole grammar.
    #[arg(value_name = "SPEC", required_unless_present_any = ["funcs", "lines", "vars"])]
    specs: Vec<String>,
    #[command(flatten)]
    discovery: source::DiscoveryArgs,
    /// Attach to the running process PID instead of starting one; Ctrl-C (or --duration)
    /// detaches, and the process goes on with every probed byte restored.
    #[arg(short = 'p', long = "pid", value_name = "PID", conflicts_with = "command")]
    pid: Option<i32>,
    /// Detach after this long (`10s`, `500ms`; a bare number is seconds). With a program
    /// started by dynprobe this is not allowed: it runs to its end.
    #[arg(long, value_name = "TIME", requires = "pid")]
    duration: Option<String>,
    /// Keep every probe a breakpoint probe (no jump optimization), like setting the kernel's
    /// `debug.kprobes_optimization` to 0.
    #[arg(long)]
    no_optimize: bool,
    /// Drive the probes from outside with ptrace (int3 traps handled by dynprobe, tens of
    /// microseconds a hit), as for a statically linked program, instead of loading the
    /// agent into the process.
    #[arg(long)]
    ptrace: bool,
    #[command(flatten)]
    output: OutputArgs,
    /// The program to run and its arguments, after `--`.
    #[arg(last = true, value_name = "PROG")]
    command: Vec<OsString>,
}

/// Where and how events are printed; shared by `probe` and `demo`.
#[derive(clap::Args)]
pub(crate) struct OutputArgs {
    /// Print events as JSON lines.
    #[arg(long)]
    json: bool,
    /// Write events to FILE instead of standard output.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    file: Option<PathBuf>,
}

/// Runs `dynprobe probe`.
pub fn run(args: &ProbeArgs) -> ExitCode {
    if let Some(result) = source::discover(&args.discovery, &args.specs, args.pid, &args.command) {
        return match result {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("dynprobe: {message}");
                ExitCode::from(EXIT_ERROR)
            }
        };
    }
    if let Some(pid) = args.pid {
        return match try_attach(args, pid) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("dynprobe: {message}");
                ExitCode::from(EXIT_ERROR)
            }
        };
    }
    if args.command.is_empty() {
        eprintln!("dynprobe: no program to run; give it after `--`, as in `dynprobe probe 'p:main' -- ./prog`");
        return ExitCode::from(EXIT_ERROR);
    }
    match try_probe(&args.specs, &args.command, !args.no_optimize, args.ptrace, &args.output) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("dynprobe: {message}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Runs `command` with the probes `specs`, printing hits as `output` says.
pub(crate) fn probe(specs: &[String], command: &[OsString], optimize: bool, output: &OutputArgs) -> ExitCode {
    match try_probe(specs, command, optimize, false, output) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("dynprobe: {message}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// `dynprobe probe -p PID`.
fn try_attach(args: &ProbeArgs, pid: i32) -> Result<(), String> {
    let started = std::time::Instant::now();
    let duration = args.duration.as_deref().map(parse_duration).transpose()?;
    let lines = spec_lines(&args.specs, Some(&PathBuf::from(format!("/proc/{pid}/exe"))))?;
    let agent = agent_path()?;
    let out = match &args.output.file {
        Some(path) => output::Outbox::file(create_output(path)?),
        None => output::Outbox::stdout(),
    };
    let format = output::Format::new(args.output.json, dynprobe::monotonic_ns());
    let request = attach::Request {
        pid,
        specs: &lines,
        optimize: !args.no_optimize,
        duration,
        agent: &agent,
        started,
        ptrace: args.ptrace,
        record: None,
    };
    attach::run(&request, out, format)
}

/// `--duration`: a duration with a unit, or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let with_unit = match text.trim().ends_with(|c: char| c.is_ascii_digit()) {
        true => format!("{}s", text.trim()),
        false => text.trim().to_string(),
    };
    crate::trace::filter::parse_duration(&with_unit)
        .map(std::time::Duration::from_nanos)
        .map_err(|e| format!("--duration: {e}"))
}

/// Parses every spec (a syntax error stops here, with its column) and gives each as one
/// line: a spec from the command line could hold a newline, which is only white space to
/// the grammar but would split it in two for the agent.
/// Source-level specs are lowered first, for `program` ([`source::lower`]).
fn spec_lines(specs: &[String], program: Option<&std::path::Path>) -> Result<Vec<String>, String> {
    let parsed = specs
        .iter()
        .map(|text| ProbeSpec::parse(text))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad probe spec: {e}\n{}", e.caret()))?;
    let (parsed, notes) = source::lower(parsed, program)?;
    for note in notes {
        eprintln!("dynprobe: {note}");
    }
    Ok(parsed.iter().map(|spec| spec.text.split_whitespace().collect::<Vec<_>>().join(" ")).collect())
}

/// The printer `output` asks for.
fn printer(output: &OutputArgs) -> Result<Printer, String> {
    let out: Box<dyn Write> = match &output.file {
        Some(path) => Box::new(BufWriter::new(create_output(path)?)),
        None => Box::new(BufWriter::new(io::stdout())),
    };
    Ok(Printer::new(out, output.json, dynprobe::monotonic_ns()))
}

/// The file of `-o`: owner-only, the events carry the program's arguments and strings.
fn create_output(path: &std::path::Path) -> Result<std::fs::File, String> {
    dynprobe_events::files::create_output(path).map_err(|e| format!("cannot create `{}`: {e}", path.display()))
}

fn try_probe(
    specs: &[String],
    command: &[OsString],
    optimize: bool,
    force_ptrace: bool,
    output: &OutputArgs,
) -> Result<ExitCode, String> {
    let lines = spec_lines(specs, source::program_path(&command[0]).as_deref())?;
    let mut printer = printer(output)?;
    let static_program = ptrace::static_program(&command[0]);
    if force_ptrace || static_program.is_some() {
        if let Some(why) = static_program {
            eprintln!("{}", ptrace::fallback_note(&format!("`{}`", command[0].to_string_lossy()), &why));
        }
        let result = probe_with_ptrace(&lines, command, &mut printer);
        let _ = printer.flush();
        return result;
    }
    let agent = agent_path()?;
    let mut env = vec![("DYNPROBE_PROBES", OsString::from(lines.join("\n")))];
    if !optimize {
        env.push(("DYNPROBE_OPTIMIZE", OsString::from("0")));
    }
    let outcome = session::run(command, &agent, &env, &mut session::PrintHits::new(&mut printer))
        .map_err(|e| cannot_run(&command[0], &e))?;
    match outcome.placement {
        Placement::Refused(error) => {
            let (spec, why) = split_error(&error, &lines);
            let hint = script_hint(&command[0]).unwrap_or_default();
            return Err(format!("cannot place probe `{spec}`: {why}; the program was not run{hint}"));
        }
        Placement::Silent => warn_not_loaded(&command[0], "no probe was placed"),
        Placement::Ready(_) => {}
    }
    Ok(exit_code(&command[0], outcome.status))
}

/// When `program` is a `#!` script (a wrapper such as a pyenv shim), a second line saying
/// that its interpreter was probed first and how to reach the program it runs.
fn script_hint(program: &std::ffi::OsStr) -> Option<String> {
    let path = std::path::Path::new(program);
    let path = match program.as_encoded_bytes().contains(&b'/') {
        true => path.to_path_buf(),
        false => std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(path)).find(|p| p.is_file())?,
    };
    let mut head = [0u8; 256];
    let n = std::io::Read::read(&mut std::fs::File::open(&path).ok()?, &mut head).ok()?;
    let line = head[..n].strip_prefix(b"#!")?.split(|&b| b == b'\n').next()?;
    let interpreter = String::from_utf8_lossy(line).trim().to_string();
    Some(format!(
        "\n`{}` is a script run by `{interpreter}`, which is probed first: name the module of a probe meant \
         for the program the script runs (`p:MODULE:SYMBOL` waits for it), or run that program directly",
        program.to_string_lossy()
    ))
}

/// `dynprobe probe SPEC -- PROG` with the ptrace-driven probes: the tracer child starts the
/// program and its exit status is the program's.
fn probe_with_ptrace(lines: &[String], command: &[OsString], printer: &mut Printer) -> Result<ExitCode, String> {
    let specs = lines.iter().map(|line| ProbeSpec::parse(line).map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
    let (tracer, out) = ptrace::Tracer::start(ptrace::command(command), specs)
        .map_err(|e| format!("cannot start the ptrace tracer: {e}"))?;
    // As with the agent: Ctrl-C is the program's to handle; dynprobe stays to relay its
    // last events and its exit status.
    // SAFETY: setting a signal to SIG_IGN installs no handler code.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let placement = session::relay(&out, tracer.pid() as u32, &mut session::PrintHits::new(printer))
        .map_err(|e| format!("cannot read the ptrace tracer's events: {e}"))?;
    let end = tracer.wait().map_err(|e| format!("cannot wait for the ptrace tracer: {e}"))?;
    if let Some(death) = end.death(&format!("`{}`", command[0].to_string_lossy())) {
        return Err(death);
    }
    let ptrace::TracerEnd::Exited(status) = end else { unreachable!("a killed tracer has its message") };
    match placement {
        Placement::Refused(error) => {
            let (spec, why) = split_error(&error, lines);
            Err(format!("cannot place probe `{spec}`: {why}; the program was not run"))
        }
        // The tracer said why on stderr.
        Placement::Silent => Ok(ExitCode::from(EXIT_ERROR)),
        Placement::Ready(_) => Ok(ExitCode::from(status as u8)),
    }
}

/// The message for a program that could not be started.
pub(crate) fn cannot_run(program: &std::ffi::OsStr, err: &io::Error) -> String {
    let program = program.to_string_lossy();
    match err.kind() {
        io::ErrorKind::NotFound => format!("cannot run `{program}`: no such program (check the path, or PATH)"),
        io::ErrorKind::PermissionDenied => format!("cannot run `{program}`: permission denied (is it executable?)"),
        _ => format!("cannot run `{program}`: {err}"),
    }
}

/// Warns that the agent never reported from `program`, so `consequence`.
pub(crate) fn warn_not_loaded(program: &std::ffi::OsStr, consequence: &str) {
    eprintln!(
        "dynprobe: warning: the agent was not loaded into `{}` (statically linked? setuid?), so {consequence}",
        program.to_string_lossy()
    );
}

/// dynprobe's exit status for the program's `status` (see [`session::exit_code`]), saying
/// so when a signal killed it.
pub(crate) fn exit_code(program: &std::ffi::OsStr, status: std::process::ExitStatus) -> ExitCode {
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
        eprintln!("dynprobe: `{}` was killed by signal {signal} ({})", program.to_string_lossy(), signal_name(signal));
    }
    ExitCode::from(session::exit_code(status))
}

/// Splits `<spec>: <message>` of an `!error` line; specs hold `:` too, so the known specs
/// are tried first.
fn split_error<'a>(error: &'a str, specs: &[String]) -> (&'a str, &'a str) {
    specs
        .iter()
        .find_map(|spec| {
            let why = error.strip_prefix(spec.as_str())?.strip_prefix(": ")?;
            Some((&error[..spec.len()], why))
        })
        .or_else(|| error.split_once(": "))
        .unwrap_or((error, "refused"))
}

/// `libdynprobe_agent.so`: `$DYNPROBE_AGENT`, or the one beside this executable (where
/// cargo builds both).
pub(crate) fn agent_path() -> Result<PathBuf, String> {
    let path = match std::env::var_os("DYNPROBE_AGENT") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find the dynprobe executable: {e}"))?
            .with_file_name("libdynprobe_agent.so"),
    };
    if !path.is_file() {
        return Err(format!(
            "the agent library `{}` does not exist; build it with `cargo build --release --workspace` \
             (or set DYNPROBE_AGENT to its path)",
            path.display()
        ));
    }
    // The loader resolves a relative LD_PRELOAD against the program's working directory.
    std::path::absolute(&path).map_err(|e| format!("cannot use `{}`: {e}", path.display()))
}

/// The description of a signal, like a shell prints it ("Segmentation fault").
fn signal_name(signal: i32) -> String {
    // SAFETY: strsignal returns a NUL-terminated string valid until the next call on this
    // thread; it is copied at once.
    let name = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(signal)) };
    name.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_split_at_the_known_spec() {
        let specs = vec!["p:ev libc:malloc".to_string()];
        assert_eq!(
            split_error("p:ev libc:malloc: unknown symbol `malloc`", &specs),
            ("p:ev libc:malloc", "unknown symbol `malloc`")
        );
        assert_eq!(split_error("p:x: why", &[]), ("p:x", "why"));
    }
}
