//! The recorder's thread: it drains the rings every 20 ms while the program runs and shows
//! how the recording goes on stderr.
//!
//! On a terminal the progress line is rewritten in place (`\r`) from half a second on;
//! otherwise (a log file) a line is printed every 5 seconds, and none for a short run.

use dynprobe_events::recorder::{RecordStats, Recorder};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often the rings are drained.
const POLL: Duration = Duration::from_millis(20);
/// How often the ring directory is looked at until the first ring file appears: the recorder
/// populates a ring's pages ahead of its thread only once it has found the file, and a fast
/// program's first milliseconds otherwise run into page faults (see `RingFile::populate`).
const FIRST_POLL: Duration = Duration::from_millis(1);
/// For how long, at most: a program that makes no ring file (nothing of it traced) is then
/// looked at every [`POLL`] like any other.
const FIRST_POLLS_FOR: Duration = Duration::from_secs(2);
/// How soon the next poll follows one that drained a few events after a quiet spell: a
/// program that wrote some may be starting a thread that writes fast, whose ring's pages are
/// populated ahead of it only from the first poll that sees it in use — after a 20 ms sleep,
/// a thread making 20 million traced calls a second had run some 800,000 records into page
/// faults.
const ACTIVE_POLL: Duration = Duration::from_millis(2);
/// How many polls in a row [`ACTIVE_POLL`] is kept up while only a few events come: a
/// program writing a trickle is then polled at [`POLL`] like an idle one, not 500 times a
/// second for its whole run.
const ACTIVE_POLLS: u32 = 10;
/// Events drained by one poll above which the next poll follows at once.
const BUSY: u64 = 4096;

/// What the main thread tells the recorder's thread.
enum Stop {
    /// The program exited with this status: drain what is left and complete the trace.
    Finish(Option<i32>),
}

/// A recording in progress on its own thread (the recorder never leaves it).
pub struct Recording {
    stop: Sender<Stop>,
    thread: JoinHandle<Result<RecordStats, String>>,
}

impl Recording {
    /// Starts a recorder draining the rings in `ring_dir` into the trace `out_dir`.
    pub fn start(ring_dir: &Path, out_dir: &Path, command: &[String]) -> Result<Recording, String> {
        let (ring_dir, out_dir, command) = (ring_dir.to_path_buf(), out_dir.to_path_buf(), command.to_vec());
        let (started_tx, started_rx) = mpsc::channel();
        let (stop, stop_rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("dynprobe-recorder".into())
            .spawn(move || {
                let mut recorder = match Recorder::new(&ring_dir, &out_dir, &command) {
                    Ok(recorder) => {
                        let _ = started_tx.send(Ok(()));
                        recorder
                    }
                    Err(err) => {
                        let _ = started_tx.send(Err(err.to_string()));
                        return Err(String::new());
                    }
                };
                let mut progress = Progress::new(std::io::stderr().is_terminal());
                let started = Instant::now();
                let mut wait = FIRST_POLL;
                let mut few_in_a_row = 0;
                let mut drained = 0;
                loop {
                    match stop_rx.recv_timeout(wait) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(Stop::Finish(code)) => {
                            progress.clear();
                            return recorder.finish(code).map_err(|e| format!("recording failed: {e}"));
                        }
                        // Abandoned: the program did not run.
                        Err(RecvTimeoutError::Disconnected) => {
                            progress.clear();
                            return Err("the recording was abandoned".into());
                        }
                    }
                    // The recorder reports a bad ring file once and leaves it alone
                    // afterwards: say so and go on with the others.
                    match recorder.poll() {
                        Ok(stats) => {
                            // While the program fills its rings fast, drain again at once
                            // rather than let them overflow while we sleep.
                            let new = stats.events - drained;
                            few_in_a_row = if new == 0 || new >= BUSY { 0 } else { few_in_a_row + 1 };
                            wait = match (stats.processes, new) {
                                (0, _) if started.elapsed() < FIRST_POLLS_FOR => FIRST_POLL,
                                (_, new) if new >= BUSY => Duration::ZERO,
                                (_, 0) => POLL,
                                _ if few_in_a_row <= ACTIVE_POLLS => ACTIVE_POLL,
                                _ => POLL,
                            };
                            drained = stats.events;
                            progress.show(&stats)
                        }
                        Err(err) => {
                            progress.clear();
                            eprintln!("dynprobe: warning: while recording: {err}");
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the recorder thread: {e}"))?;
        match started_rx.recv() {
            Ok(Ok(())) => Ok(Recording { stop, thread }),
            Ok(Err(message)) => {
                let _ = thread.join();
                Err(message)
            }
            Err(_) => Err("the recorder thread died while starting".into()),
        }
    }

    /// Drains what is left, completes the trace with the program's `exit_code` and says
    /// what was recorded.
    pub fn finish(self, exit_code: Option<i32>) -> Result<RecordStats, String> {
        let _ = self.stop.send(Stop::Finish(exit_code));
        self.thread.join().unwrap_or_else(|_| Err("the recorder thread panicked".into()))
    }

    /// Stops without completing the trace (the program did not run).
    pub fn abandon(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// The progress line.
struct Progress {
    terminal: bool,
    started: Instant,
    /// When the last line was shown.
    shown: Option<Instant>,
    /// The last line shown.
    last: String,
    /// When the events counted last were counted, and how many there were then: the rate
    /// the line shows is since then.
    counted: Option<(Instant, u64)>,
}

impl Progress {
    fn new(terminal: bool) -> Progress {
        Progress { terminal, started: Instant::now(), shown: None, last: String::new(), counted: None }
    }

    fn show(&mut self, stats: &RecordStats) {
        let now = Instant::now();
        let (first, every) = if self.terminal {
            (Duration::from_millis(500), Duration::from_millis(100))
        } else {
            (Duration::from_secs(5), Duration::from_secs(5))
        };
        let due = match self.shown {
            None => now.duration_since(self.started) >= first,
            Some(shown) => now.duration_since(shown) >= every,
        };
        if !due {
            return;
        }
        let (since, before) = self.counted.unwrap_or((self.started, 0));
        let seconds = now.duration_since(since).as_secs_f64();
        let rate = if seconds > 0.0 { (stats.events.saturating_sub(before)) as f64 / seconds } else { 0.0 };
        self.counted = Some((now, stats.events));
        let line = line(stats, rate as u64);
        // A terminal's line is only rewritten when it changes.
        if self.terminal && self.shown.is_some() && line == self.last {
            return;
        }
        self.shown = Some(now);
        let mut err = std::io::stderr().lock();
        let _ = if self.terminal { write!(err, "\r{line}\x1b[K") } else { writeln!(err, "{line}") };
        let _ = err.flush();
        self.last = line;
    }

    /// Takes a terminal's line away before the summary.
    fn clear(&mut self) {
        if self.terminal && self.shown.is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
        self.shown = None;
    }
}

/// `recording: 1.2 M events (350.0 k/s), 0 lost, 3 threads, 19 MB`: `rate` events a second
/// lately.
fn line(stats: &RecordStats, rate: u64) -> String {
    format!(
        "recording: {} events ({}/s), {} lost, {} thread{}, {}",
        count(stats.events),
        count(rate),
        count(stats.lost),
        stats.threads,
        if stats.threads == 1 { "" } else { "s" },
        bytes(stats.bytes)
    )
}

/// A count, short: `950`, `12.3 k`, `1.2 M`, `3.4 G`.
pub fn count(n: u64) -> String {
    match n {
        0..=999 => n.to_string(),
        1_000..=999_999 => format!("{:.1} k", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} M", n as f64 / 1e6),
        _ => format!("{:.1} G", n as f64 / 1e9),
    }
}

/// A size, short: `512 B`, `12 kB`, `19 MB`, `1.5 GB`.
pub fn bytes(n: u64) -> String {
    match n {
        0..=999 => format!("{n} B"),
        1_000..=999_999 => format!("{} kB", n / 1_000),
        1_000_000..=999_999_999 => format!("{} MB", n / 1_000_000),
        _ => format!("{:.1} GB", n as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line() {
        let stats = RecordStats { events: 1_234_567, lost: 0, processes: 1, threads: 3, bytes: 19_753_072, missed: 0 };
        assert_eq!(line(&stats, 350_000), "recording: 1.2 M events (350.0 k/s), 0 lost, 3 threads, 19 MB");
        let one = RecordStats { events: 950, lost: 12_345, processes: 1, threads: 1, bytes: 15_200, missed: 0 };
        assert_eq!(line(&one, 12), "recording: 950 events (12/s), 12.3 k lost, 1 thread, 15 kB");
        assert_eq!(count(3_400_000_000), "3.4 G");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1_500_000_000), "1.5 GB");
    }
}
