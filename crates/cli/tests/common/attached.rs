//! The attach tests' pieces (`attach.rs`, `record_attach.rs`): a program already running,
//! driven through its stdin and stdout, and a `dynprobe … -p` session on it.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A running worker, driven through its stdin and stdout.
pub struct Worker {
    pub child: Child,
    pub stdin: ChildStdin,
    pub stdout: BufReader<ChildStdout>,
    pub log: PathBuf,
    pub pid: i32,
    pub exe: &'static Path,
}

impl Worker {
    pub fn start_with(exe: &'static Path, arg: &std::ffi::OsStr, log: PathBuf, env: &[(&str, &str)]) -> Worker {
        let mut command = Command::new(exe);
        command.arg(arg).envs(env.iter().copied());
        Worker::start_by(command, exe, log)
    }

    /// The worker `exe` as `command` starts it (`dynprobe record -- exe …`, whose program has
    /// its stdin and stdout).
    pub fn start_by(mut command: Command, exe: &'static Path, log: PathBuf) -> Worker {
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("start the worker");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let pid = line.trim().strip_prefix("ready ").unwrap_or_else(|| panic!("worker said {line:?}")).parse().unwrap();
        Worker { child, stdin, stdout, log, pid, exe }
    }

    /// Sends a command and returns the worker's answer line.
    pub fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the worker ended instead of answering {command:?}");
        line.trim().to_string()
    }

    /// Runs one round of work: its checksum.
    pub fn round(&mut self) -> String {
        self.ask("go")
    }

    /// The bytes at the start of `symbol` in the running worker.
    pub fn code(&self, symbol: &str) -> Vec<u8> {
        self.code_in(self.pid, symbol)
    }

    /// The bytes at the start of `symbol` in process `pid`, a child the worker forked.
    pub fn code_in(&self, pid: i32, symbol: &str) -> Vec<u8> {
        code_in(self.exe, pid, symbol)
    }

    /// The calls logged so far, as (kind, tid, fields).
    pub fn logged(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(|l| l.split(' ').map(str::to_string).collect())
            .collect()
    }

    pub fn quit(mut self) {
        writeln!(self.stdin, "quit").unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the worker failed: {status}");
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bytes at the start of `symbol` in process `pid`, which runs the (non-PIE) `exe`.
pub fn code_in(exe: &Path, pid: i32, symbol: &str) -> Vec<u8> {
    let addr = symbol_address(exe, symbol);
    let mut bytes = vec![0u8; 8];
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut bytes, addr).unwrap();
    bytes
}

/// A (non-PIE) worker's symbol address, from `nm`.
pub fn symbol_address(exe: &Path, symbol: &str) -> u64 {
    let out = Command::new("nm").arg(exe).output().expect("run nm (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.ends_with(&format!(" T {symbol}"))).expect("symbol in nm");
    u64::from_str_radix(line.split(' ').next().unwrap(), 16).unwrap()
}

/// A `dynprobe probe -p` (or `record -p`) running, its stderr lines arriving on a channel and its stdout
/// read all along (a full pipe would stall dynprobe, and with ptrace probes the program).
pub struct Session {
    pub child: Child,
    pub stdout: std::thread::JoinHandle<String>,
    pub stderr: Receiver<String>,
    pub seen: Vec<String>,
    /// Set once dynprobe ended: a paced reader reads the rest at once.
    pub ended: Arc<AtomicBool>,
}

impl Session {
    /// Runs `command` (a `dynprobe` command line), its standard output read `pace` at a
    /// time when given: a reader slower than the hits.
    pub fn spawn(mut command: Command, pace: Option<(usize, Duration)>) -> Session {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run dynprobe");
        let mut stdout = child.stdout.take().unwrap();
        let ended = Arc::new(AtomicBool::new(false));
        let hurry = Arc::clone(&ended);
        let stdout = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            match pace {
                None => {
                    stdout.read_to_end(&mut bytes).unwrap();
                }
                Some((size, pause)) => {
                    let mut chunk = vec![0u8; size];
                    while let Ok(n @ 1..) = stdout.read(&mut chunk) {
                        bytes.extend_from_slice(&chunk[..n]);
                        if !hurry.load(Ordering::Relaxed) {
                            std::thread::sleep(pause);
                        }
                    }
                }
            }
            // Lossy: what a hostile target writes may not be UTF-8.
            String::from_utf8_lossy(&bytes).into_owned()
        });
        let stderr = child.stderr.take().unwrap();
        let (send, receive) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Session { child, stdout, stderr: receive, seen: Vec::new(), ended }
    }

    /// Waits for a stderr line containing `text` (panics, with all stderr, on timeout or exit).
    pub fn wait_for(&mut self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("dynprobe never said {text:?}; its stderr:\n{}", self.seen.join("\n"));
    }

    /// Sends `signal`, waits for dynprobe to end; (status code, stdout, whole stderr).
    pub fn end(self, signal: Option<i32>) -> (Option<i32>, String, String) {
        self.end_within(signal, Duration::from_secs(600))
    }

    /// [`Session::end`], failing if dynprobe has not ended `limit` after the signal.
    pub fn end_within(mut self, signal: Option<i32>, limit: Duration) -> (Option<i32>, String, String) {
        if let Some(signal) = signal {
            // SAFETY: kill sends a signal to our own child.
            unsafe { libc::kill(self.child.id() as i32, signal) };
        }
        let deadline = Instant::now() + limit;
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.child.try_wait().unwrap().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.seen.extend(self.stderr.try_iter());
            panic!("dynprobe still ran {limit:?} after it was told to end; its stderr:\n{}", self.seen.join("\n"));
        }
        let status = self.child.wait().unwrap();
        self.ended.store(true, Ordering::Relaxed);
        let stdout = self.stdout.join().unwrap();
        self.seen.extend(self.stderr.iter());
        (status.code(), stdout, self.seen.join("\n"))
    }
}

/// The process's thread names (`/proc/PID/task/*/comm`).
pub fn thread_names(pid: i32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks.filter_map(Result::ok).filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok()).collect()
}

/// The lines of `/proc/PID/maps`.
pub fn mappings(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap().lines().map(str::to_string).collect()
}
