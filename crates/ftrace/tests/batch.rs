//! The tracer in its own process: a library with `-fpatchable-function-entry=5` sites is
//! loaded, its NOPs become calls in one batch, every call is recorded with its depth, and
//! `Tracer::stop` puts every NOP back in one batch. One test: a process has one tracer.

use dynprobe_events::clock::Clock;
use dynprobe_events::record::Kind;
use dynprobe_events::ring::RingFile;
use dynprobe_ftrace::{Filter, Selection, SiteMethod, Tracer};
use dynprobe_symbols::SymbolTable;

mod common;

fn read(addr: u64) -> [u8; 5] {
    let mut b = [0; 5];
    dynprobe_text::memory::read(addr, &mut b).unwrap();
    b
}

#[test]
fn nops_become_calls_in_one_batch_and_come_back() {
    let outer = common::outer(common::load_library());
    assert_eq!(outer(1), 4 + 7);

    let table = SymbolTable::current_process().unwrap();
    let filter = Filter::from_lines("F libftrace_sites:*").unwrap();
    let selection = Selection::new(&table, &filter).unwrap();
    let names: Vec<&str> = selection.functions.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["leaf", "outer"]);
    let sites: Vec<u64> = selection
        .functions
        .iter()
        .map(|f| match f.method {
            SiteMethod::Compiler(site) => site.addr,
            SiteMethod::Entry => panic!("{} has a patchable NOP site", f.name),
        })
        .collect();
    for &site in &sites {
        assert_eq!(read(site), [0x90; 5]);
    }

    let dir = common::tempdir("batch");
    let ring_path = dir.join("test.ring");
    let ring = RingFile::create(&ring_path, dynprobe_probe::MAX_THREADS, 1024, Clock::detect()).unwrap();
    let tracer = Tracer::start(selection, ring, Clock::detect(), usize::MAX).unwrap();
    assert_eq!(tracer.summary().kinds.iter().find(|k| k.0 == "patchable").map(|k| (k.1, k.2)), Some((2, 2)));
    for &site in &sites {
        assert_eq!(read(site)[0], 0xe8, "a call now");
    }
    assert_eq!(outer(1), 4 + 7);
    assert_eq!(outer(2), 7 + 10);
    tracer.stop().unwrap();
    for &site in &sites {
        assert_eq!(read(site), [0x90; 5], "the NOPs are back");
    }
    assert_eq!(outer(3), 10 + 13);

    // Two calls of outer, each with two leaves, and nothing after the stop.
    let reader = RingFile::open(&ring_path).unwrap();
    let mut records = Vec::new();
    for r in 0..reader.rings() {
        reader.drain(r, &mut records);
    }
    let events: Vec<(Kind, u16, u64)> = records
        .iter()
        .filter(|r| r.kind() != Some(Kind::Thread))
        .map(|r| (r.kind().unwrap(), r.depth(), r.payload()))
        .collect();
    let (leaf, outer_id) = (0, 1);
    let one_call = [
        (Kind::Entry, 0, outer_id),
        (Kind::Entry, 1, leaf),
        (Kind::Exit, 1, leaf),
        (Kind::Entry, 1, leaf),
        (Kind::Exit, 1, leaf),
        (Kind::Exit, 0, outer_id),
    ];
    assert_eq!(events, [one_call, one_call].concat());
    let _ = std::fs::remove_dir_all(&dir);
}
