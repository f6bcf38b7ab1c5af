//! What the remote tests share: compiling the C targets, running them, and waiting for
//! their threads to block where a test wants them.

#![allow(dead_code)] // each test binary uses its own part

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dynprobe_remote::{thread_activity, ThreadActivity};

/// This test binary's scratch directory.
pub fn scratch() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("remote-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Compiles `tests/targets/<source>` with `args` into the scratch directory as `output`,
/// once per test binary.
pub fn compile(source: &str, output: &str, args: &[&str]) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(output) {
        return path.clone();
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/targets").join(source);
    // A per-process name, so that concurrently running test binaries do not overwrite a
    // file another one is executing.
    let out = scratch().join(format!("{output}-{}", std::process::id()));
    let status = Command::new("cc")
        .args(["-O1", "-g", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .args(args)
        .status()
        .expect("running cc");
    assert!(status.success(), "cc failed for {}", src.display());
    built.insert(output.to_string(), out.clone());
    out
}

/// The multi-threaded target `worker.c`.
pub fn worker_program() -> PathBuf {
    compile("worker.c", "worker", &[])
}

/// A running target whose first output line was `ready ...`.
pub struct Target {
    pub child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// The words of the ready line after `ready`.
    pub ready: Vec<String>,
}

impl Target {
    /// Starts `program` with `env` and reads its ready line.
    pub fn start(program: &Path, env: &[(&str, &Path)]) -> Target {
        let mut command = Command::new(program);
        for (k, v) in env {
            command.env(k, v);
        }
        Target::start_command(command)
    }

    /// Starts `command` (which must run a program printing a ready line) and reads that line.
    pub fn start_command(mut command: Command) -> Target {
        command.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = command.spawn().expect("starting the target");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        assert_eq!(words.first().map(String::as_str), Some("ready"), "unexpected first line {line:?}");
        Target { stdin: child.stdin.take(), child, stdout, ready: words[1..].to_vec() }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The ready line's word `i` as a number (decimal or 0x-hex).
    pub fn number(&self, i: usize) -> u64 {
        let w = &self.ready[i];
        match w.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
            None => w.parse().unwrap(),
        }
    }

    /// Writes `input` to the target's stdin, closes it, and returns the rest of its
    /// output once it has exited successfully.
    pub fn finish(mut self, input: &str) -> String {
        let mut stdin = self.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).unwrap();
        drop(stdin);
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "target failed: {status:?}; output:\n{rest}");
        rest
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until thread `tid` of `pid` is blocked in system call `nr`.
pub fn wait_in_syscall(pid: i32, tid: i32, nr: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match thread_activity(pid, tid) {
            Ok(ThreadActivity::InSyscall { nr: now, .. }) if now == nr => return,
            other => assert!(Instant::now() < deadline, "thread {tid} never blocked in syscall {nr}: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The output of an undisturbed run of `worker.c` after its ready line, given "hi\n".
pub fn undisturbed_worker_output() -> String {
    let target = Target::start(&worker_program(), &[]);
    target.finish("hi\n")
}
