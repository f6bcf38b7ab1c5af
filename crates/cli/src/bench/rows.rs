//! The rows of `dynprobe bench`: what each one instruments and calls.
//!
//! Adding a row is adding an entry to [`ROWS`]: a name, what to time — a function to call
//! with a setup that arms the instrumentation and returns an [`Armed`] guard, or the
//! function-graph program under a tracer — and the reference rows its added cost is
//! compared with. The runner does the timing, the hit check and the output.

use std::ffi::{c_int, c_void};
use std::io;
use std::mem::MaybeUninit;

use super::marker;
use super::program::Tracer;
use super::startup::Startup;
use super::target::{
    self, dynprobe_bench_int3, dynprobe_bench_nop5, dynprobe_bench_sse, dynprobe_bench_target,
    dynprobe_bench_upper_dirty, dynprobe_floor_call, dynprobe_floor_flags, dynprobe_floor_gprs, dynprobe_floor_graph,
    dynprobe_floor_graph_least, dynprobe_floor_jump, dynprobe_floor_least, dynprobe_floor_rdtsc,
    dynprobe_floor_ret_call, dynprobe_floor_ret_least, dynprobe_floor_ret_miss, dynprobe_floor_ret_probe,
    dynprobe_floor_ret_sled, dynprobe_floor_ret_swap, dynprobe_floor_sahf, Target,
};
use super::uprobe;

/// The unprobed call: every other row's added cost is measured against it.
pub const BASELINE: &str = "baseline-call";
/// The unprobed call from a caller that then runs a legacy SSE instruction: the baseline of
/// the `-sse` rows.
pub const BASELINE_SSE: &str = "baseline-sse";
/// The C library's `syscall()` without dynprobe's guard on it.
pub const SYSCALL_PLAIN: &str = "syscall-plain";
/// The raw `int3` + SIGTRAP round trip: the floor of any breakpoint probe.
pub const SIGTRAP_FLOOR: &str = "sigtrap-floor";
/// The cost of legacy SSE code run with the upper halves of the vector registers dirty.
pub const UPPER_STATE_PENALTY: &str = "upper-state-penalty";
/// The kernel's uprobe on the same function.
pub const KERNEL_UPROBE: &str = "kernel-uprobe";
/// The kernel's uprobe on a 5-byte NOP, its fastest kind of site.
pub const KERNEL_UPROBE_NOP5: &str = "kernel-uprobe-nop5";
/// The kernel's uretprobe on the same function.
pub const KERNEL_URETPROBE: &str = "kernel-uretprobe";
/// `bench/graph.c` untraced: the baseline of the function-graph rows.
pub const GRAPH_PLAIN: &str = "graph-plain";
/// The start-up rows' program without dynprobe: their baseline.
pub const STARTUP_PLAIN: &str = "startup-plain";
/// `bench/graph.c` under uftrace, the function tracer a user would compare with.
pub const UFTRACE: &str = "uftrace";
/// A hand-built detour's jump out and back, nothing else: the floor of any optimized probe.
pub const FLOOR_JUMP: &str = "floor-jump";
/// The hand-built detour with the entry detour's register frame.
pub const FLOOR_GPRS: &str = "floor-gprs";
/// The same with the flags saved too, as mid-function.
pub const FLOOR_FLAGS: &str = "floor-flags";
/// floor-flags with the flags put back by `sahf`, as a mid-function detour does.
pub const FLOOR_SAHF: &str = "floor-sahf";
/// The hand-built entry detour calling a dispatcher that returns at once.
pub const FLOOR_CALL: &str = "floor-call";
/// floor-call with a dispatcher doing only what any in-process probe's must.
pub const FLOOR_DISPATCH: &str = "floor-dispatch";
/// A return address kept aside and written back unchanged.
pub const FLOOR_RET_SWAP: &str = "floor-ret-swap";
/// One mispredicted return into a trampoline and the jump back: the floor of any return hook.
pub const FLOOR_RET_MISS: &str = "floor-ret-miss";
/// The same through the return sled's shape (its call, frame and ret, and jump back).
pub const FLOOR_RET_SLED: &str = "floor-ret-sled";
/// The sled's shape with its registers saved around an empty dispatcher's call.
pub const FLOOR_RET_CALL: &str = "floor-ret-call";
/// floor-call diverting the return into floor-ret-call's sled: the floor of a return probe.
pub const FLOOR_RET_PROBE: &str = "floor-ret-probe";
/// floor-ret-probe with dispatchers doing only what a return probe's must with dynprobe's thread slots.
pub const FLOOR_RET_DISPATCH: &str = "floor-ret-dispatch";
/// One `rdtsc`: the clock read of every ring record.
pub const FLOOR_RDTSC: &str = "floor-rdtsc";
/// Two clock reads, two ring records, one diverted return: the floor of function-graph.
pub const FLOOR_GRAPH: &str = "floor-graph";
/// floor-graph with what a tracer of many threads must add with dynprobe's thread slots.
pub const FLOOR_GRAPH_DISPATCH: &str = "floor-graph-dispatch";
/// The unprobed call from every CPU at once: the thread-scaling rows' baseline.
pub const BASELINE_THREADS: &str = "baseline-call-threads";
/// The kernel's uprobe hit from every CPU at once.
pub const KERNEL_UPROBE_THREADS: &str = "kernel-uprobe-threads";
/// `bench/graph.c` untraced, its loop run by every CPU at once.
pub const GRAPH_PLAIN_THREADS: &str = "graph-plain-threads";

/// Instrumentation a row has armed; it stays armed until [`Armed::disarm`].
pub trait Armed {
    /// How many times the instrumentation has fired, if it counts: the runner checks it
    /// against the calls made, so a probe that silently never fired is an error, not a
    /// suspiciously cheap number. `Ok(None)`: it does not count.
    fn hits(&self) -> Result<Option<u64>, String> {
        Ok(None)
    }

    /// Removes the instrumentation, restoring the process as it was before the setup.
    fn disarm(self: Box<Self>) -> Result<(), String> {
        Ok(())
    }
}

/// Nothing armed (the baseline).
impl Armed for () {}

/// One benchmark row.
pub struct Row {
    /// Name used by `--rows`, in the table and in the JSON.
    pub name: &'static str,
    /// One line on what the row measures.
    pub about: &'static str,
    /// What is timed.
    pub measure: Measure,
    /// Reference rows whose added cost this row's is divided by; they run whenever this
    /// row does.
    pub compare_to: &'static [&'static str],
}

/// What a row times.
pub enum Measure {
    /// The bench's own loop calls `target` in this process.
    Call {
        /// The function the loop calls. Calling it must be sound once `setup` has succeeded.
        target: Target,
        /// Arms the instrumentation on `target`.
        setup: fn(Target) -> Result<Box<dyn Armed>, String>,
    },
    /// As `Call`, from every CPU at once (`nproc` threads on the one site).
    CallThreads {
        /// As for `Call`, called from every thread.
        target: Target,
        /// As for `Call`.
        setup: fn(Target) -> Result<Box<dyn Armed>, String>,
    },
    /// `bench/graph.c` runs under a tracer and times its own calls, on one thread, by its CPU
    /// time (page faults included).
    Program(Tracer),
    /// As `Program`, the loop run by `nproc` threads of the program at once.
    ProgramThreads(Tracer),
    /// `dynprobe record` of a program with 10,000 NOP sites: the time of their one batch
    /// of patches, per site.
    SiteBatch,
    /// `dynprobe probe -p` attaching to a running process: nanoseconds per attach.
    Attach,
    /// Ctrl-C of `dynprobe probe -p` to every probed byte restored: nanoseconds per detach.
    Detach,
    /// `dynprobe record -p` of a running process with 10,000 functions traced: nanoseconds
    /// from the command's start to recording.
    RecordAttach,
    /// Resolving a source-level spec from a program's DWARF: nanoseconds per resolution.
    Resolve,
    /// A statically linked program under `dynprobe probe` (ptrace-driven probes), timing
    /// its own probed and unprobed calls: nanoseconds added per hit.
    PtraceProbe,
    /// A program of many functions started under `dynprobe record`, or without it (the
    /// baseline): nanoseconds from the spawn to `main`.
    Startup(Startup),
}

impl Row {
    /// The row whose nanoseconds per call are subtracted from this one's: the same calls
    /// without instrumentation.
    /// `None` for a row whose figure is a cost of its own (nothing to subtract).
    pub fn baseline(&self) -> Option<&'static str> {
        match self.measure {
            Measure::Call { target, .. } if target::address(target) == target::address(dynprobe_bench_sse) => {
                Some(BASELINE_SSE)
            }
            Measure::Call { .. } => Some(BASELINE),
            Measure::CallThreads { .. } => Some(BASELINE_THREADS),
            Measure::Program(_) => Some(GRAPH_PLAIN),
            Measure::ProgramThreads(_) => Some(GRAPH_PLAIN_THREADS),
            Measure::Startup(_) => Some(STARTUP_PLAIN),
            Measure::SiteBatch
            | Measure::Attach
            | Measure::Detach
            | Measure::RecordAttach
            | Measure::PtraceProbe
            | Measure::Resolve => None,
        }
    }
}

/// The row named `name`.
pub fn find(name: &str) -> Option<&'static Row> {
    ROWS.iter().find(|row| row.name == name)
}

/// Every row, in the order they run and print. The kernel's uprobes run before dynprobe's
/// probes so each finds the target's code as the compiler left it.
pub static ROWS: &[Row] = &[
    Row {
        name: BASELINE,
        about: "the target function, unprobed",
        measure: Measure::Call { target: dynprobe_bench_target, setup: |_| Ok(Box::new(())) },
        compare_to: &[],
    },
    Row {
        name: BASELINE_SSE,
        about: "baseline-call's function called from one that then runs a legacy SSE instruction, unprobed",
        measure: Measure::Call { target: dynprobe_bench_sse, setup: |_| Ok(Box::new(())) },
        compare_to: &[],
    },
    Row {
        name: UPPER_STATE_PENALTY,
        about: "no probe: a VEX write to ymm1, then one legacy SSE instruction — what this CPU charges SSE code \
                run while the upper halves of ymm/zmm0-15 are dirty (what a detour's restore must not leave)",
        measure: Measure::Call { target: dynprobe_bench_upper_dirty, setup: |_| needs_avx() },
        compare_to: &[],
    },
    Row {
        name: SIGTRAP_FLOOR,
        // Before the syscall rows: once dynprobe's signal guards are placed, a SIGTRAP
        // handler the program installs is reached through dynprobe's dispatcher.
        about: "int3 + empty SA_SIGINFO SIGTRAP handler",
        measure: Measure::Call {
            target: dynprobe_bench_int3,
            setup: |_| Ok(Box::new(EmptySigtrapHandler::install()?)),
        },
        compare_to: &[KERNEL_UPROBE],
    },
    Row {
        name: SYSCALL_PLAIN,
        about: "the C library's syscall() of getppid, before dynprobe's signal guards are placed (run before any probe row)",
        measure: Measure::Call { target: bench_syscall, setup: |_| unguarded() },
        compare_to: &[],
    },
    Row {
        name: "syscall-guarded",
        about: "the same call through the guard on syscall() (a non-signal number: its common path); \
                minus syscall-plain = the guard's cost per call",
        measure: Measure::Call {
            target: bench_syscall,
            setup: |_| dynprobe::internals::place_signal_guards().map(|()| Box::new(()) as Box<dyn Armed>),
        },
        compare_to: &[SYSCALL_PLAIN],
    },
    Row {
        name: KERNEL_UPROBE,
        about: "kernel uprobe (perf_event_open, uprobe PMU)",
        measure: Measure::Call {
            target: dynprobe_bench_target,
            setup: |target| uprobe::arm(target, uprobe::Kind::Entry),
        },
        compare_to: &[],
    },
    Row {
        name: KERNEL_UPROBE_NOP5,
        about: "kernel uprobe on a 5-byte NOP (its best case: no single-step)",
        measure: Measure::Call {
            target: dynprobe_bench_nop5,
            setup: |target| uprobe::arm(target, uprobe::Kind::Entry),
        },
        compare_to: &[],
    },
    Row {
        name: KERNEL_URETPROBE,
        about: "kernel uretprobe (perf_event_open, uprobe PMU)",
        measure: Measure::Call {
            target: dynprobe_bench_target,
            setup: |target| uprobe::arm(target, uprobe::Kind::Return),
        },
        compare_to: &[],
    },
    floor(FLOOR_JUMP, "hand-built detour: the probe point's jmp, the covered instructions, the jmp back", dynprobe_floor_jump),
    floor(FLOOR_GPRS, "floor-jump + the entry detour's register frame (15 registers stored, caller-saved reloaded, \
                       callee-saved compared)", dynprobe_floor_gprs),
    floor(FLOOR_FLAGS, "floor-gprs + pushfq/cld/popfq, as mid-function (pushfq and popfq are microcoded)", dynprobe_floor_flags),
    floor(
        FLOOR_SAHF,
        "floor-flags with the flags put back by sahf and an add for OF, as mid-function detours do when only \
         arithmetic flags are set (no popfq)",
        dynprobe_floor_sahf,
    ),
    floor(FLOOR_CALL, "floor-gprs + the light path's aligned call of a dispatcher that returns at once: \
                       optimized-probe minus this is dynprobe's dispatch", dynprobe_floor_call),
    floor(
        FLOOR_DISPATCH,
        "floor-call whose dispatcher does only what any in-process probe's must: the thread's slot found by its \
         thread pointer, a recursion guard set and cleared, the hit counted per thread, an empty handler called \
         through a pointer (optimized-probe's floor on this host)",
        dynprobe_floor_least,
    ),
    floor(FLOOR_RET_SWAP, "a return address kept aside and written back unchanged (a return hook's bookkeeping, no hook)",
          dynprobe_floor_ret_swap),
    floor(FLOOR_RET_MISS, "the return address replaced: one mispredicted ret into a trampoline, its indirect jmp back \
                           (the floor of any return hook)", dynprobe_floor_ret_miss),
    floor(FLOOR_RET_SLED, "floor-ret-miss through the sled's shape: call common, its frame, ret, jmp *-16(%rsp)",
          dynprobe_floor_ret_sled),
    floor(FLOOR_RET_CALL, "floor-ret-sled + nine registers saved around an empty dispatcher's call: return-probe \
                           minus return-probe-entry minus this is dynprobe's return dispatch", dynprobe_floor_ret_call),
    floor(FLOOR_RET_PROBE, "floor-call whose dispatcher diverts the return into floor-ret-call's sled: a return \
                            probe's entry and return with nothing done in either (return-probe's floor on this host)",
          dynprobe_floor_ret_probe),
    floor(
        FLOOR_RET_DISPATCH,
        "floor-ret-probe whose dispatchers do only what a return probe with dynprobe's thread slots must: at the \
         entry floor-dispatch's work (slot, guard, hit counted, an empty handler called through a pointer) and an \
         instance pushed on the thread's stack; at the return the slot found, the guard set and cleared, the \
         instance popped, an empty return handler called through a pointer (return-probe's floor with handlers)",
        dynprobe_floor_ret_least,
    ),
    floor(FLOOR_RDTSC, "one rdtsc in the call: the clock read each ring record pays (function-graph's target is \
                        2 x this + 10)", dynprobe_floor_rdtsc),
    floor(FLOOR_GRAPH, "an mcount site's call to the tracer's caller (nine registers), an entry dispatcher that \
                        writes a timed 16-byte record and diverts the return into a sled (nine registers) whose \
                        dispatcher writes another: two rdtsc, two ring records, one diverted return \
                        (function-graph's floor on this host)", dynprobe_floor_graph),
    floor(
        FLOOR_GRAPH_DISPATCH,
        "floor-graph with what a tracer of many threads with dynprobe's thread slots must add: at each end the thread's slot \
         found by its thread pointer and a recursion guard set and cleared, the record written at the thread's \
         own head; the call pushed on the thread's stack of calls in flight at the entry and popped at the exit",
        dynprobe_floor_graph_least,
    ),
    Row {
        name: "int3-probe",
        about: "dynprobe breakpoint probe, empty handler",
        measure: Measure::Call { target: dynprobe_bench_target, setup: register_int3_probe },
        compare_to: &[SIGTRAP_FLOOR, KERNEL_UPROBE],
    },
    Row {
        name: "optimized-probe",
        about: "dynprobe jump-optimized probe at the entry, empty handler",
        measure: Measure::Call {
            target: dynprobe_bench_target,
            setup: |target| register_optimized_probe(target, ProbePoint::Entry),
        },
        compare_to: &[KERNEL_UPROBE, KERNEL_UPROBE_NOP5, KERNEL_URETPROBE, FLOOR_JUMP, FLOOR_CALL, FLOOR_DISPATCH],
    },
    Row {
        name: "optimized-probe-mid",
        about: "dynprobe jump-optimized probe mid-function (flags read by lahf/seto where the function never sets DF, else pushfq; put back by sahf)",
        measure: Measure::Call {
            target: dynprobe_bench_target,
            setup: |target| register_optimized_probe(target, ProbePoint::Middle),
        },
        compare_to: &[KERNEL_UPROBE, KERNEL_UPROBE_NOP5, KERNEL_URETPROBE, FLOOR_FLAGS, FLOOR_SAHF],
    },
    Row {
        name: "return-probe",
        about: "dynprobe return probe, empty entry and return handlers (entry optimized)",
        measure: Measure::Call { target: dynprobe_bench_target, setup: register_return_probe },
        compare_to: &[KERNEL_URETPROBE, KERNEL_UPROBE, FLOOR_RET_MISS, FLOOR_RET_CALL, FLOOR_RET_PROBE, FLOOR_RET_DISPATCH],
    },
    Row {
        name: "return-probe-entry",
        about: "the return probe's entry alone: its detour, an instance taken and its data zeroed, an empty entry \
                handler that declines the call (no return diverted)",
        measure: Measure::Call { target: dynprobe_bench_target, setup: register_return_probe_entry_only },
        compare_to: &["optimized-probe", "return-probe"],
    },
    Row {
        name: "optimized-probe-sse",
        about: "optimized-probe on the function, called from one that then runs a legacy SSE instruction \
                (pays upper-state-penalty if the detour leaves the upper state dirty)",
        measure: Measure::Call { target: dynprobe_bench_sse, setup: |_| register_optimized_probe(dynprobe_bench_target, ProbePoint::Entry) },
        compare_to: &["optimized-probe", UPPER_STATE_PENALTY],
    },
    Row {
        name: "return-probe-sse",
        about: "return-probe on the function, called from one that then runs a legacy SSE instruction \
                (pays upper-state-penalty if the return path leaves the upper state dirty)",
        measure: Measure::Call { target: dynprobe_bench_sse, setup: |_| register_return_probe(dynprobe_bench_target) },
        compare_to: &["return-probe", UPPER_STATE_PENALTY],
    },
    Row {
        name: "marker-disabled",
        about: "the same work behind a dynprobe::marker! with nothing attached: its NOP and argument moves \
                (within baseline-call's batch spread = not measurable)",
        measure: Measure::Call { target: marker::bench_marker, setup: marker::disabled },
        compare_to: &[],
    },
    Row {
        name: "marker-enabled",
        about: "the same marker with an empty handler attached (its NOP a jump to a detour)",
        measure: Measure::Call { target: marker::bench_marker, setup: marker::enabled },
        compare_to: &[KERNEL_UPROBE_NOP5, "optimized-probe", FLOOR_CALL],
    },
    Row {
        name: GRAPH_PLAIN,
        about: "bench/graph.c's loop of calls, untraced (its mcount NOP sites left alone)",
        measure: Measure::Program(Tracer::None),
        compare_to: &[],
    },
    Row {
        name: "function-graph",
        about: "dynprobe record of every function of the same program: entry and exit into a ring that holds the run",
        measure: Measure::Program(Tracer::Dynprobe),
        compare_to: &[UFTRACE, FLOOR_GRAPH, FLOOR_GRAPH_DISPATCH, FLOOR_RDTSC],
    },
    Row {
        name: "function-graph-args",
        about: "function-graph with record -a: each call's argument and return value fetched by DWARF type into \
                the ring too",
        measure: Measure::Program(Tracer::DynprobeArgs),
        compare_to: &["function-graph", UFTRACE],
    },
    Row {
        name: BASELINE_THREADS,
        about: "baseline-call from nproc threads at once (CPU time per call, mean of the threads)",
        measure: Measure::CallThreads { target: dynprobe_bench_target, setup: |_| Ok(Box::new(())) },
        compare_to: &[],
    },
    Row {
        name: KERNEL_UPROBE_THREADS,
        about: "kernel-uprobe hit from nproc threads at once on the one site",
        measure: Measure::CallThreads {
            target: dynprobe_bench_target,
            setup: |target| uprobe::arm_every_cpu(target, uprobe::Kind::Entry),
        },
        compare_to: &[KERNEL_UPROBE],
    },
    Row {
        name: "optimized-probe-threads",
        about: "optimized-probe hit from nproc threads at once on the one site: flat against optimized-probe \
                unless every hit writes a cache line all threads share",
        measure: Measure::CallThreads {
            target: dynprobe_bench_target,
            setup: |target| register_optimized_probe(target, ProbePoint::Entry),
        },
        compare_to: &["optimized-probe", KERNEL_UPROBE_THREADS],
    },
    Row {
        name: "return-probe-threads",
        about: "return-probe hit from nproc threads at once on the one function",
        measure: Measure::CallThreads { target: dynprobe_bench_target, setup: register_return_probe },
        compare_to: &["return-probe", KERNEL_UPROBE_THREADS],
    },
    Row {
        name: GRAPH_PLAIN_THREADS,
        about: "graph-plain's loop run by nproc threads of the program at once (CPU time per call)",
        measure: Measure::ProgramThreads(Tracer::None),
        compare_to: &[],
    },
    Row {
        name: "function-graph-threads",
        about: "function-graph with nproc threads of the program calling at once, each into its own ring",
        measure: Measure::ProgramThreads(Tracer::Dynprobe),
        compare_to: &["function-graph", KERNEL_UPROBE_THREADS],
    },
    Row {
        name: "enable-sites",
        about: "dynprobe record turning 10,000 mcount NOPs into calls in one batch (one stop), ns per site",
        measure: Measure::SiteBatch,
        compare_to: &[],
    },
    Row {
        name: "after-detach",
        about: "the same program's loop after dynprobe record -p recorded it and detached (0 within graph-plain's spread)",
        measure: Measure::Program(Tracer::AfterDetach),
        compare_to: &[],
    },
    Row {
        name: "ptrace-probe",
        about: "dynprobe's fallback for static programs: int3 handled by the ptrace tracer, boosted out-of-line copy, event printed",
        measure: Measure::PtraceProbe,
        compare_to: &[KERNEL_UPROBE],
    },
    Row {
        name: "attach-ms",
        about: "dynprobe probe -p of a running process: command start to probe armed (ns per attach)",
        measure: Measure::Attach,
        compare_to: &[],
    },
    Row {
        name: "record-attach-ms",
        about: "dynprobe record -p -F 'g0_*' of a running program (10,000 functions): command start to recording",
        measure: Measure::RecordAttach,
        compare_to: &[],
    },
    Row {
        name: "resolve-ms",
        about: "a source-level spec (FUNC:LINE var->field) resolved from libceph-common.so.2's DWARF, librados2-dbg (ns per resolution)",
        measure: Measure::Resolve,
        compare_to: &[],
    },
    Row {
        name: STARTUP_PLAIN,
        about: "a program of 80,000 functions started without dynprobe: spawn to main (the start-up rows' baseline)",
        measure: Measure::Startup(Startup::Plain),
        compare_to: &[],
    },
    Row {
        name: "startup-10k",
        about: "dynprobe record -F 'g0_*' of it (10,000 functions at plain entries): start-up added before main",
        measure: Measure::Startup(Startup::Functions(10_000)),
        compare_to: &[],
    },
    Row {
        name: "startup-40k",
        about: "dynprobe record -F 'g[0-3]_*' (40,000 functions): start-up added before main",
        measure: Measure::Startup(Startup::Functions(40_000)),
        compare_to: &[],
    },
    Row {
        name: "startup-80k",
        about: "dynprobe record of all 80,000: start-up added before main; target ≤ 1 s",
        measure: Measure::Startup(Startup::Functions(80_000)),
        compare_to: &[],
    },
    Row {
        name: "startup-libc",
        about: "dynprobe record -F 'libc:*' of it (the C library's functions): start-up added before main",
        measure: Measure::Startup(Startup::Libc),
        compare_to: &[],
    },
    Row {
        name: "detach-ms",
        about: "Ctrl-C of dynprobe probe -p to every probed byte restored, 4 threads hitting the probe (ns per detach)",
        measure: Measure::Detach,
        compare_to: &[],
    },
    Row {
        name: UFTRACE,
        about: "uftrace record -P . --no-libcall of the same program (its dynamic patching of the same NOPs)",
        measure: Measure::Program(Tracer::Uftrace),
        compare_to: &[],
    },
];

/// A floor row: `target`, one of the hand-built copies of a part of dynprobe's paths in
/// `bench/target.c`, called with nothing armed.
const fn floor(name: &'static str, about: &'static str, target: Target) -> Row {
    Row { name, about, measure: Measure::Call { target, setup: computes_the_same }, compare_to: &[] }
}

/// A floor's setup: the hand-built copy must compute what [`dynprobe_bench_target`] does
/// (a copy that went wrong would time something else).
fn computes_the_same(floor: Target) -> Result<Box<dyn Armed>, String> {
    for x in [0, 1, -1, 0x1234_5678_9abc, std::ffi::c_long::MIN] {
        // SAFETY: the floors and the target are pure arithmetic on their argument (see
        // `target`), sound to call at any time from one thread.
        let (got, want) = unsafe { (floor(x), dynprobe_bench_target(x)) };
        if got != want {
            return Err(format!("the floor returned {got:#x} for {x:#x}, the target {want:#x}"));
        }
    }
    Ok(Box::new(()))
}

/// `syscall(SYS_getppid) + x`: a system call through the C library's `syscall()`, which
/// carries one of dynprobe's signal guards once a probe exists (see `dynprobe::signals`).
unsafe extern "C" fn bench_syscall(x: std::ffi::c_long) -> std::ffi::c_long {
    // SAFETY: getppid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_getppid) + x }
}

/// Nothing to arm, but the guards must not be in place yet.
fn unguarded() -> Result<Box<dyn Armed>, String> {
    if dynprobe::internals::signal_guards_placed() {
        return Err("the signal guards are already placed in this process (a probe row ran first)".into());
    }
    Ok(Box::new(()))
}

/// dynprobe's return probe with empty handlers on `target`, its entry jump-optimized.
fn register_return_probe(target: Target) -> Result<Box<dyn Armed>, String> {
    let handle = dynprobe::ReturnProbe::at(dynprobe::Location::Address(target::address(target)))
        .on_entry(|_regs, _data| true)
        .on_return(|_regs, _data| {})
        .register()
        .map_err(|err| format!("register: {err}"))?;
    optimized(|| handle.info())?;
    if !handle.returns_light() {
        return Err("the empty return handler's calls do not return through the light trampoline".to_owned());
    }
    Ok(Box::new(handle))
}

/// [`register_return_probe`] with an entry handler that declines every call: the entry
/// detour and the instance bookkeeping without the return path.
fn register_return_probe_entry_only(target: Target) -> Result<Box<dyn Armed>, String> {
    // Counted by the probes' own per-thread counters, not by the handler: an atomic add in
    // it is a locked instruction, a full barrier that in a detour waits for the frame's
    // register stores to drain (see dynprobe_probe's counter module), and was timed as the
    // entry's cost.
    let handle = dynprobe::ReturnProbe::at(dynprobe::Location::Address(target::address(target)))
        .on_entry(|_regs, _data| false)
        .register()
        .map_err(|err| format!("register: {err}"))?;
    optimized(|| handle.info())?;
    Ok(Box::new(EntryOnly(handle)))
}

/// A return probe whose entry handler declines every call.
struct EntryOnly(dynprobe::ReturnProbeHandle);

impl Armed for EntryOnly {
    /// Entry handler runs: the entry probe's hits but those the return probe missed before
    /// calling the handler (its misses beyond the entry probe's own); a call tracked all the
    /// same is an error.
    fn hits(&self) -> Result<Option<u64>, String> {
        let (handle, entry) = (&self.0, self.0.entry_probe());
        match handle.hits() {
            0 => Ok(Some(entry.hits().saturating_sub(handle.nmissed().saturating_sub(entry.nmissed())))),
            tracked => Err(format!("{tracked} calls tracked though the entry handler declined them all")),
        }
    }

    fn disarm(self: Box<Self>) -> Result<(), String> {
        Box::new(self.0).disarm()
    }
}

/// The setup of a row whose target needs AVX: an error on a CPU without it.
fn needs_avx() -> Result<Box<dyn Armed>, String> {
    match std::arch::is_x86_feature_detected!("avx") {
        true => Ok(Box::new(())),
        false => Err("this CPU has no AVX, so no upper state to be dirty".to_owned()),
    }
}

/// Runs the optimizer and checks that the probe whose listing `info` gives was optimized:
/// a row must not report a breakpoint's cost under an optimized probe's name.
/// The rows' handlers are empty, so their detours must be light (no vector state saved):
/// a handler or dispatcher that stopped being proven so is an error with the reason, not a
/// slower figure under the same name.
fn optimized(info: impl FnOnce() -> dynprobe::ProbeInfo) -> Result<(), String> {
    dynprobe::wait_for_optimizer().map_err(|err| format!("optimizer: {err}"))?;
    let info = info();
    if !info.optimized {
        return Err(format!("the probe was not optimized: {info}"));
    }
    if !info.light {
        return Err(format!("the empty handler's detour is not light: {info}"));
    }
    Ok(())
}

impl Armed for dynprobe::ReturnProbeHandle {
    /// Calls that went all the way round: tracked at the entry and returned through the
    /// trampoline.
    fn hits(&self) -> Result<Option<u64>, String> {
        let (hits, returns) = (dynprobe::ReturnProbeHandle::hits(self), self.returns());
        if hits != returns {
            return Err(format!("{hits} calls tracked but {returns} returned through the trampoline"));
        }
        Ok(Some(returns))
    }

    fn disarm(self: Box<Self>) -> Result<(), String> {
        self.unregister().map(|_final_counts| ()).map_err(|err| format!("unregister: {err}"))
    }
}

/// dynprobe's breakpoint probe with an empty pre-handler on `target`'s entry: jump
/// optimization is off while it is armed.
fn register_int3_probe(target: Target) -> Result<Box<dyn Armed>, String> {
    dynprobe::set_optimization(false).map_err(|err| format!("switching optimization off: {err}"))?;
    let handle = dynprobe::Probe::at(dynprobe::Location::Address(target::address(target)))
        .on_hit(|_regs| {})
        .register()
        .map_err(|err| format!("register: {err}"));
    Ok(Box::new(BreakpointOnly(handle?)))
}

/// A probe armed with optimization switched off, switched on again when it is disarmed.
struct BreakpointOnly(dynprobe::ProbeHandle);

impl Armed for BreakpointOnly {
    fn hits(&self) -> Result<Option<u64>, String> {
        Armed::hits(&self.0)
    }

    fn disarm(self: Box<Self>) -> Result<(), String> {
        let unregistered = Box::new(self.0).disarm();
        dynprobe::set_optimization(true).map_err(|err| format!("switching optimization on: {err}"))?;
        unregistered
    }
}

/// Where in the target an optimized probe goes.
enum ProbePoint {
    /// The entry: the detour saves the general registers and xmm0-7.
    Entry,
    /// The middle instruction: the detour saves the flags and the XSAVE state too.
    Middle,
}

/// dynprobe's probe with an empty pre-handler, jump-optimized before the row runs.
fn register_optimized_probe(target: Target, point: ProbePoint) -> Result<Box<dyn Armed>, String> {
    let entry = target::address(target);
    let addr = match point {
        ProbePoint::Entry => entry,
        ProbePoint::Middle => target::middle_instruction(target)?,
    };
    let handle = dynprobe::Probe::at(dynprobe::Location::Address(addr))
        .on_hit(|_regs| {})
        .register()
        .map_err(|err| format!("register: {err}"))?;
    optimized(|| handle.info())?;
    Ok(Box::new(handle))
}

impl Armed for dynprobe::ProbeHandle {
    fn hits(&self) -> Result<Option<u64>, String> {
        Ok(Some(dynprobe::ProbeHandle::hits(self)))
    }

    fn disarm(self: Box<Self>) -> Result<(), String> {
        self.unregister().map(|_final_counts| ()).map_err(|err| format!("unregister: {err}"))
    }
}

/// A SIGTRAP handler that does nothing, installed in place of whatever was there.
///
/// Doing nothing is enough: the kernel reports an `int3` trap with `rip` already past it.
/// `SA_SIGINFO` makes the kernel build the same frame (siginfo + ucontext) as for the
/// probe layer's handler, so the floor is the one a breakpoint probe actually stands on.
struct EmptySigtrapHandler {
    previous: libc::sigaction,
}

impl EmptySigtrapHandler {
    fn install() -> Result<Self, String> {
        extern "C" fn resume(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {}

        // SAFETY: `sigaction` is plain data (integers, a mask, pointers) for which all
        // zeroes is valid: no flags, an empty mask, no restorer (libc adds its own).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = resume as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        let mut previous = MaybeUninit::<libc::sigaction>::uninit();
        // SAFETY: both pointers are valid for the call; `resume` touches nothing, so it is
        // async-signal-safe, and it stays valid for the life of the process.
        if unsafe { libc::sigaction(libc::SIGTRAP, &action, previous.as_mut_ptr()) } != 0 {
            return Err(format!("sigaction(SIGTRAP): {}", io::Error::last_os_error()));
        }
        Ok(Self {
            // SAFETY: the successful `sigaction` call wrote the previous action.
            previous: unsafe { previous.assume_init() },
        })
    }
}

impl Armed for EmptySigtrapHandler {
    fn disarm(self: Box<Self>) -> Result<(), String> {
        // SAFETY: `previous` is the action the kernel gave us, so reinstating it is
        // exactly the state before `install`.
        if unsafe { libc::sigaction(libc::SIGTRAP, &self.previous, std::ptr::null_mut()) } != 0 {
            return Err(format!("restoring SIGTRAP: {}", io::Error::last_os_error()));
        }
        Ok(())
    }
}
