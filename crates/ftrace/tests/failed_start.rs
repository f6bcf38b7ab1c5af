//! A tracer that fails to start leaves nothing of its recording behind: its ring file is let
//! go of (not kept mapped, 64 GiB of address space, in the process it was to record) and a
//! later start in the same process is not refused as "already running". One test: a process
//! has one tracer.

use dynprobe_events::clock::Clock;
use dynprobe_events::ring::RingFile;
use dynprobe_ftrace::{Filter, Selection, Tracer};
use dynprobe_symbols::SymbolTable;
use std::path::Path;
use std::sync::Mutex;

/// Whether this process maps the file `path`.
fn mapped(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().any(|l| l.contains(path.to_str().unwrap()))
}

fn selection() -> Selection {
    let table = SymbolTable::current_process().unwrap();
    Selection::new(&table, &Filter::from_lines("F libftrace_sites:*").unwrap()).unwrap()
}

mod common;

#[test]
fn a_tracer_that_fails_to_start_lets_go_of_its_ring_and_a_later_one_starts() {
    let outer = common::outer(common::load_library());
    let dir = common::tempdir("failed-start");
    let (first, second) = (dir.join("first.ring"), dir.join("second.ring"));
    let ring = RingFile::create(&first, dynprobe_probe::MAX_THREADS, 1024, Clock::detect()).unwrap();
    assert!(mapped(&first));
    // Started from inside a probe's handler, where the tracer's set-up is refused once its
    // output is set (the return trampoline cannot be installed from a handler).
    static ATTEMPT: Mutex<Option<(Selection, RingFile)>> = Mutex::new(None);
    static OUTCOME: Mutex<Option<String>> = Mutex::new(None);
    *ATTEMPT.lock().unwrap() = Some((selection(), ring));
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
    let labs = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"labs".as_ptr()) } as u64;
    // SAFETY: labs(3)'s own type.
    let call: extern "C" fn(libc::c_long) -> libc::c_long = unsafe { std::mem::transmute(labs as usize) };
    let probe = dynprobe_probe::Probe::at(labs)
        .on_hit(|_| {
            if let Some((selection, ring)) = ATTEMPT.lock().unwrap().take() {
                let started = Tracer::start(selection, ring, Clock::detect(), usize::MAX);
                *OUTCOME.lock().unwrap() = Some(started.err().map_or("started".to_string(), |e| e.to_string()));
            }
        })
        .register()
        .unwrap();
    assert_eq!(call(std::hint::black_box(-5)), 5);
    probe.unregister().unwrap();
    let outcome = OUTCOME.lock().unwrap().take().expect("the handler ran");
    assert!(outcome.contains("inside a probe handler"), "{outcome}");
    assert!(!mapped(&first), "the failed tracer's ring is let go of");

    let ring = RingFile::create(&second, dynprobe_probe::MAX_THREADS, 1024, Clock::detect()).unwrap();
    let tracer = Tracer::start(selection(), ring, Clock::detect(), usize::MAX).expect("a later start is not refused");
    assert_eq!(outer(1), 4 + 7);
    tracer.end().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
