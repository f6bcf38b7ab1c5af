//! Timing one row: warm-up, batches, median.
//!
//! The clock is the calling thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`, see
//! clock_gettime(2)), user and system: what the calls cost, kernel work for a trap or a
//! uprobe included, without the time the thread waited for a CPU. The machines this runs on
//! are shared, and under a load of several runnable threads per CPU the wall clock made
//! the same row two to five times dearer from one run to the next.

use std::ffi::c_long;
use std::hint::black_box;
use std::time::Duration;

use super::target::Target;

/// How many batches a row of whole operations (a program's run, an attach, a start)
/// measures; the median of them is reported, so one batch disturbed by an interrupt or a
/// migration does not move the result.
pub const BATCHES: usize = 5;

/// How many batches a row of calls measures. Many short ones rather than a few long: a
/// virtual machine's CPU slows down in phases of tens to hundreds of milliseconds (a
/// neighbour on the same core; see the host's `steadiness`), in which a probe's hit costs
/// up to twice as much while a plain call does not change. The median of 15 batches of
/// 30 ms is less often a slow phase's than that of five of 100 ms, and the fastest batch
/// is the host's steady figure (the report's `best_ns_per_hit`).
pub const CALL_BATCHES: usize = 15;

/// CPU time a calibrated batch of calls aims at: with [`CALL_BATCHES`] batches and the
/// warm-up, a row takes about half a second whether a call costs 2 ns or 20 µs.
const BATCH_TIME: Duration = Duration::from_millis(30);

/// The warm-up doubles its call count until one round takes this long; the last round then
/// gives the per-call estimate that sizes the batches.
const WARM_UP_TIME: Duration = Duration::from_millis(20);

/// How many calls a row makes.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Calls per batch; `None` calibrates each row to [`BATCH_TIME`] per batch.
    pub calls_per_batch: Option<u64>,
}

/// What one row measured.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Calls in each measured batch.
    pub calls_per_batch: u64,
    /// Nanoseconds per call of each batch, in the order they ran.
    pub batches: Vec<f64>,
    /// Every call made, warm-up included: what a probe that counts its hits must have seen.
    pub total_calls: u64,
    /// What the measurement found that makes its number doubtful (a tracer's lost events).
    pub remark: Option<String>,
}

/// `values` as `MEDIAN{unit} (median; MIN–MAX)`, each with `decimals` decimals: how the rows'
/// notes give a figure measured once per batch.
pub fn spread(values: impl IntoIterator<Item = f64>, decimals: usize, unit: &str) -> String {
    let mut sorted: Vec<f64> = values.into_iter().collect();
    sorted.sort_by(f64::total_cmp);
    let (median, min, max) = (sorted[sorted.len() / 2], sorted[0], sorted[sorted.len() - 1]);
    format!("{median:.decimals$}{unit} (median; {min:.decimals$}–{max:.decimals$})")
}

impl Timing {
    /// The batches as milliseconds, `M ms (median; MIN–MAX)`: for rows whose batch is one
    /// operation (an attach, a start).
    pub fn ms_spread(&self) -> String {
        spread(self.batches.iter().map(|ns| ns / 1e6), 1, " ms")
    }

    /// Median nanoseconds per call over the batches.
    pub fn ns_per_call(&self) -> f64 {
        let mut sorted = self.batches.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }

    /// Nanoseconds per call of the fastest batch: the figure of the host's steady phases,
    /// as interference only ever adds time.
    pub fn best_ns_per_call(&self) -> f64 {
        self.batches.iter().copied().fold(f64::INFINITY, f64::min)
    }
}

/// Warms `target` up, then times [`CALL_BATCHES`] batches of calls to it.
///
/// # Safety
///
/// Calling `target` must be sound for the whole measurement (see [`Target`]).
pub unsafe fn measure(target: Target, plan: Plan) -> Timing {
    let mut total_calls = 0;
    let calls_per_batch = match plan.calls_per_batch {
        Some(calls) => {
            // SAFETY: forwarded from the caller.
            unsafe { time_calls(target, calls) };
            total_calls += calls;
            calls
        }
        None => {
            let mut calls = 1;
            loop {
                // SAFETY: forwarded from the caller.
                let elapsed = unsafe { time_calls(target, calls) };
                total_calls += calls;
                if elapsed >= WARM_UP_TIME {
                    let ns_per_call = elapsed.as_nanos() as f64 / calls as f64;
                    break ((BATCH_TIME.as_nanos() as f64 / ns_per_call) as u64).max(1);
                }
                calls *= 2;
            }
        }
    };
    let batches = (0..CALL_BATCHES)
        .map(|_| {
            // SAFETY: forwarded from the caller.
            let elapsed = unsafe { time_calls(target, calls_per_batch) };
            total_calls += calls_per_batch;
            elapsed.as_nanos() as f64 / calls_per_batch as f64
        })
        .collect();
    Timing { calls_per_batch, batches, total_calls, remark: None }
}

/// How many threads the thread-scaling rows run: one per CPU (`nproc`).
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// [`measure`] from [`threads`] threads at once: each batch starts every thread at one
/// barrier, each times its own calls in its own CPU time, and the batch's figure is their
/// mean per call. Per-hit cost that grows with the threads (a cache line every hit of every
/// thread writes) shows here against the one-thread row.
///
/// # Safety
///
/// As for [`measure`], from any thread.
pub unsafe fn measure_threads(target: Target, plan: Plan) -> Timing {
    // Calibrated (and warmed up) on this thread: the batch then takes each thread about
    // BATCH_TIME of CPU.
    // SAFETY: forwarded from the caller.
    let single = unsafe { measure(target, plan) };
    let calls_per_batch = single.calls_per_batch;
    let n = threads();
    let mut total_calls = single.total_calls;
    let batches = (0..CALL_BATCHES)
        .map(|_| {
            let barrier = std::sync::Barrier::new(n);
            let times: Vec<Duration> = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..n)
                    .map(|_| {
                        let barrier = &barrier;
                        scope.spawn(move || {
                            barrier.wait();
                            // SAFETY: forwarded from the caller, sound from any thread.
                            unsafe { time_calls(target, calls_per_batch) }
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().unwrap_or_default()).collect()
            });
            total_calls += calls_per_batch * n as u64;
            times.iter().map(|t| t.as_nanos() as f64).sum::<f64>() / n as f64 / calls_per_batch as f64
        })
        .collect();
    Timing { calls_per_batch, batches, total_calls, remark: Some(format!("{n} threads at once")) }
}

/// Calls `target` `calls` times and returns the CPU time that took.
///
/// The pointer and each argument go through `black_box`, so the compiler can neither
/// inline the target nor drop calls whose result it could predict; the results are summed
/// without feeding back into the next argument, so calls don't wait on each other.
///
/// # Safety
///
/// As for [`measure`].
#[inline(never)]
unsafe fn time_calls(target: Target, calls: u64) -> Duration {
    let target = black_box(target);
    let mut sum: c_long = 0;
    let start = thread_cpu_time();
    for i in 0..calls {
        // SAFETY: forwarded from the caller.
        sum = sum.wrapping_add(unsafe { target(black_box(i as c_long)) });
    }
    let elapsed = thread_cpu_time().saturating_sub(start);
    black_box(sum);
    elapsed
}

/// The CPU time the calling thread has used so far.
pub fn thread_cpu_time() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
