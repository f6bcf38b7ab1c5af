//! Static markers of this very test binary, end to end: the macro's sites as the ELF file
//! describes them (dynprobe's records, SystemTap's notes as `readelf -n` shows them), an
//! unchanged program with nothing attached, every hit seen with the right arguments while
//! a handler is attached (from several threads too), and the exact NOP bytes back after
//! detach.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use dynprobe::marker::{ArgKind, ArgValue, Marker, MarkerSite, NOP5};

/// Attaching tests take turns: a marker has one set of sites, and two tests' handlers on
/// it would see each other's hits.
static ATTACH: Mutex<()> = Mutex::new(());

const NAMES: [&str; 3] = ["alpha", "beta", "gamma-δ"];

/// The program under test: a loop with markers carrying integers, a pointer and a string.
/// Returns what it computed, which must not depend on whether anything is attached.
#[inline(never)]
fn workload(rounds: u32) -> u64 {
    let mut sum = 0u64;
    let cell = 0x5eed_u64;
    for i in 0..rounds {
        let name = NAMES[i as usize % NAMES.len()];
        let delta = -(i64::from(i) * 3);
        dynprobe::marker!(dynprobe_test, tick, i, delta, &cell as *const u64, name);
        sum = sum.wrapping_mul(31).wrapping_add(u64::from(i) ^ name.len() as u64);
        dynprobe::marker!(dynprobe_test, six, 1u8, -2i16, 3u32, -4i64, true, 'x');
    }
    sum
}

fn sites(spec: &str) -> Vec<MarkerSite> {
    Marker::find(spec).unwrap_or_else(|e| panic!("{spec}: {e}"))
}

/// The 5 code bytes at `addr` in this process.
fn code_at(addr: u64) -> [u8; 5] {
    // SAFETY: `addr` is a marker site of this binary's mapped, readable text.
    unsafe { std::ptr::read_volatile(addr as *const [u8; 5]) }
}

#[test]
fn the_file_describes_each_site_with_typed_arguments() {
    let exe = std::env::current_exe().unwrap();
    let in_file = dynprobe::marker::read_markers(&exe).unwrap();
    let tick = in_file.iter().find(|s| s.spec() == "dynprobe_test:tick").expect("the tick marker is in the file");
    assert!(tick.dynprobe, "a record describes the macro's site");
    let kinds: Vec<ArgKind> = tick.args.iter().map(|a| a.kind).collect();
    assert_eq!(kinds, [ArgKind::U32, ArgKind::I64, ArgKind::Pointer, ArgKind::Str]);
    let args: Vec<String> = tick.args.iter().map(|a| a.to_string()).collect();
    assert_eq!(args, ["u32 %edi", "i64 %rsi", "ptr %rdx", "&str %rcx,%r8"]);
    assert_eq!(tick.sdt_args, "4@%edi -8@%rsi 8@%rdx 8@%rcx 8@%r8");
    assert_eq!(tick.semaphore, 0);

    // At runtime the same site, moved by the load bias, holding the NOP (no test has a
    // handler on it meanwhile).
    let _turn = ATTACH.lock().unwrap_or_else(|e| e.into_inner());
    let live = sites("dynprobe_test:tick");
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].file_offset, tick.file_offset);
    assert_eq!(code_at(live[0].addr), NOP5);

    let six = in_file.iter().find(|s| s.spec() == "dynprobe_test:six").unwrap();
    assert_eq!(six.sdt_args, "1@%dil -2@%si 4@%edx -8@%rcx 1@%r8b 4@%r9d");
}

#[test]
fn readelf_lists_the_sites_as_stapsdt_notes() {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("readelf")
        .arg("-n")
        .arg(&exe)
        .output()
        .expect("run readelf (binutils; scripts/setup installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let note = text.split("stapsdt ").find(|n| n.contains("Name: tick")).expect("a stapsdt note for tick");
    assert!(note.contains("NT_STAPSDT (SystemTap probe descriptors)"), "{note}");
    assert!(note.contains("Provider: dynprobe_test"), "{note}");
    assert!(note.contains("Arguments: 4@%edi -8@%rsi 8@%rdx 8@%rcx 8@%r8"), "{note}");
    assert!(note.contains("Semaphore: 0x0000000000000000"), "{note}");
    let site = dynprobe::marker::read_markers(&exe).unwrap().into_iter().find(|s| s.name == "tick").unwrap();
    assert!(note.contains(&format!("Location: {:#018x}", site.addr)), "{note} / {:#x}", site.addr);
}

#[test]
fn an_attached_handler_sees_every_hit_with_its_arguments_and_detach_restores_the_nops() {
    let _turn = ATTACH.lock().unwrap_or_else(|e| e.into_inner());
    const ROUNDS: u32 = 1000;
    let plain = workload(ROUNDS);

    static HITS: AtomicU64 = AtomicU64::new(0);
    static SUM_I: AtomicU64 = AtomicU64::new(0);
    static WRONG: AtomicU64 = AtomicU64::new(0);
    static CELL: AtomicU64 = AtomicU64::new(0);
    let handle = Marker::attach("dynprobe_test:tick", |hit| {
        HITS.fetch_add(1, Ordering::Relaxed);
        let (Some(ArgValue::Unsigned(i)), Some(ArgValue::Signed(delta)), Some(ArgValue::Pointer(p)), Some(s)) =
            (hit.arg(0), hit.arg(1), hit.arg(2), hit.arg(3))
        else {
            WRONG.fetch_add(1, Ordering::Relaxed);
            return;
        };
        SUM_I.fetch_add(i, Ordering::Relaxed);
        // SAFETY: the marker passes a pointer to a live local of the loop.
        CELL.store(unsafe { *(p as *const u64) }, Ordering::Relaxed);
        let name = NAMES[i as usize % NAMES.len()];
        if delta != -(i as i64 * 3) || s != ArgValue::Str(name) || hit.arg(4).is_some() {
            WRONG.fetch_add(1, Ordering::Relaxed);
        }
    })
    .unwrap();
    let site = handle.sites().next().unwrap().addr;
    assert!(handle.all_optimized(), "the NOP5 became a jump to a detour");
    assert_eq!(code_at(site)[0], 0xe9, "a jmp rel32 is on the site while attached");

    assert_eq!(workload(ROUNDS), plain, "the program computes the same with a handler attached");
    assert_eq!(HITS.load(Ordering::Relaxed), u64::from(ROUNDS));
    assert_eq!(SUM_I.load(Ordering::Relaxed), u64::from(ROUNDS) * u64::from(ROUNDS - 1) / 2);
    assert_eq!(WRONG.load(Ordering::Relaxed), 0);
    assert_eq!(CELL.load(Ordering::Relaxed), 0x5eed);

    let stats = handle.detach().unwrap();
    assert_eq!((stats.hits, stats.nmissed), (u64::from(ROUNDS), 0));
    assert_eq!(code_at(site), NOP5, "detach puts the exact NOP back");
    assert_eq!(workload(ROUNDS), plain);
    assert_eq!(HITS.load(Ordering::Relaxed), u64::from(ROUNDS), "no hit after detach");
}

#[test]
fn every_argument_type_decodes() {
    let _turn = ATTACH.lock().unwrap_or_else(|e| e.into_inner());
    static RIGHT: AtomicU64 = AtomicU64::new(0);
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let handle = Marker::attach("dynprobe_test:six", |hit| {
        SEEN.fetch_add(1, Ordering::Relaxed);
        let want = [
            ArgValue::Unsigned(1),
            ArgValue::Signed(-2),
            ArgValue::Unsigned(3),
            ArgValue::Signed(-4),
            ArgValue::Bool(true),
            ArgValue::Char(Some('x')),
        ];
        if hit.arg_count() == 6 && hit.args().zip(want).all(|(got, want)| got == want) {
            RIGHT.fetch_add(1, Ordering::Relaxed);
        }
    })
    .unwrap();
    workload(10);
    handle.detach().unwrap();
    assert_eq!((SEEN.load(Ordering::Relaxed), RIGHT.load(Ordering::Relaxed)), (10, 10));
}

#[test]
fn hits_from_several_threads_all_count() {
    let _turn = ATTACH.lock().unwrap_or_else(|e| e.into_inner());
    const THREADS: u64 = 4;
    const ROUNDS: u32 = 5000;
    let handle = Marker::attach("dynprobe_test:tick", |_| {}).unwrap();
    let plain: Vec<u64> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..THREADS).map(|_| s.spawn(|| workload(ROUNDS))).collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let stats = handle.detach().unwrap();
    assert_eq!(stats.hits + stats.nmissed, THREADS * u64::from(ROUNDS));
    assert_eq!(stats.nmissed, 0);
    assert!(plain.iter().all(|&p| p == plain[0]));
}

#[test]
fn an_unknown_marker_is_refused_naming_the_nearest() {
    let e = Marker::attach("dynprobe_test:tikc", |_| {}).unwrap_err();
    let dynprobe::marker::MarkerError::Unknown { suggestions, .. } = &e else { panic!("{e}") };
    assert_eq!(suggestions[0], "dynprobe_test:tick", "the nearest comes first: {e}");
    assert!(
        e.to_string().starts_with("no marker `dynprobe_test:tikc` in any module of the process; did you mean"),
        "{e}"
    );
    let e = Marker::attach("dynprobe_test", |_| {}).unwrap_err();
    assert!(e.to_string().contains("write `provider:name`"), "{e}");
    // `*` takes every name of a provider.
    let all = sites("dynprobe_test:*");
    let mut names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["six", "tick"]);
}
