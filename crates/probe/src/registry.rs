//! The probe registry: the generic half of register / enable / disable / unregister (the
//! kernel's `kernel/kprobes.c`). All changes are serialized by one lock that the trap path
//! never takes; the trap path reads sites and probe lists that are freed only after a grace
//! period ([`dynprobe_text::stop::synchronize`]).

use crate::arch::{
    bytes_under_jump, disown_detour, move_into_copy, on_post_trap, on_site_trap, prepare_detour, prepare_post,
    prepare_slots,
};
use crate::guard::HandlerGuard;
use crate::light;
use crate::point::{self, ProbePoint};
use crate::probe::{ProbeInfo, ProbeShared};
use crate::site::{PatchSite, ProbeList};
use crate::{optimizer, signals, thread_slot};
use crate::{Location, Probe, ProbeError};
use dynprobe_arch::native::jump_table::TableMemory;
use dynprobe_arch::native::optimize::{branches_out, island_before, CoveredRun, MAX_ISLAND_GAP};
use dynprobe_arch::native::{check_out_of_line, decode_one, instruction_at, Insn, INT3, JMP_REL32_LEN};
use dynprobe_symbols::{SymbolError, SymbolTable};
use dynprobe_text::pool::ExecSlot;
use dynprobe_text::transaction::{move_out_of, Edits, Transaction};
use dynprobe_text::{memory, pool, stop, sync_core::try_sync_core, trap, TextError};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Demangled-name prefixes of dynprobe's own code, on which probes are refused: the crates
/// whose code runs on the way from a probe hit to its handler and back — the `SIGTRAP`
/// dispatcher and out-of-line execution (text), the site lookup and handler calls (probe),
/// detours and trampolines (arch), the function-graph tracer's entry and exit (ftrace) and
/// the event writers (events). A probe there would be hit again from inside its own hit,
/// before the handler guard that counts a nested hit as missed is taken: the dispatcher runs
/// with `SA_NODEFER` (text/src/trap.rs), so it would be entered again at the same probe, and
/// again, until the thread's stack overflows. The test
/// `every_crate_on_the_trap_path_is_blacklisted` (tests/breakpoint.rs) walks that path.
#[doc(hidden)]
pub const BLACKLISTED_CODE: &[&str] =
    &["dynprobe_probe::", "dynprobe_text::", "dynprobe_arch::", "dynprobe_ftrace::", "dynprobe_events::"];
/// C library functions on the signal path itself (the `sigreturn` trampoline), and the
/// C library's internal cancellation switches, which every cancellable system-call
/// wrapper of the stop path (`open`, `read`, `close`) runs.
const BLACKLISTED_SYMBOLS: &[&str] = &["__restore_rt", "__pthread_enable_asynccancel", "__pthread_disable_asynccancel"];
/// C library functions the compiler calls for copies, fills and comparisons, in dynprobe's
/// code and in the standard library's: a probe hit, the stop signal's handler and the trap
/// path make such calls. (Its system calls are raw, its clock is the vDSO's and it leaves
/// `errno` alone, so `write`, `read`, `clock_gettime`, `__errno_location` are never called
/// on those paths.) Where these calls land is a fact of the link, checked at run time by
/// [`machinery_functions`]: the agent library has its own hidden copies, a program that
/// links dynprobe itself calls the C library's.
fn machinery_references() -> [(u64, &'static str); 5] {
    extern "C" {
        // Not declared by the libc crate; the compiler emits calls to it for `==` on slices.
        fn bcmp(a: *const libc::c_void, b: *const libc::c_void, n: libc::size_t) -> libc::c_int;
    }
    [
        (libc::memcpy as *const () as usize as u64, "memcpy"),
        (libc::memmove as *const () as usize as u64, "memmove"),
        (libc::memset as *const () as usize as u64, "memset"),
        (libc::memcmp as *const () as usize as u64, "memcmp"),
        (bcmp as *const () as usize as u64, "bcmp"),
    ]
}

/// Of [`machinery_references`], the functions outside dynprobe's own code that its calls
/// reach in this process, with their names: none when dynprobe runs from the agent library
/// (its references bind to its own copies), the C library's implementations — an indirect
/// function's chosen one — when dynprobe is linked into the program. A breakpoint there
/// could be hit while the stop signal's handler blocks every signal, which makes the kernel
/// kill the process rather than nest: such probes are refused.
fn machinery_functions() -> &'static [(u64, &'static str)] {
    static RESOLVED: OnceLock<Vec<(u64, &'static str)>> = OnceLock::new();
    RESOLVED.get_or_init(|| {
        let ours = object_base(machinery_functions as *const () as usize as u64);
        machinery_references()
            .into_iter()
            .filter_map(|(bound, name)| {
                if object_base(bound) != ours {
                    // Bound into another module: the address a PIE's GOT holds is where the
                    // calls go (for an indirect function, the implementation chosen).
                    return Some((bound, name));
                }
                // In dynprobe's own module: its own copy, or the canonical PLT entry a
                // non-PIE executable gives an imported function, whose GOT slot says where
                // the calls go.
                let target = plt_target(bound)?;
                if object_base(target) != ours {
                    return Some((target, name));
                }
                // A lazily bound slot points back into the PLT: ask the loader.
                let c = std::ffi::CString::new(name).expect("no NUL in the names");
                // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks it up.
                let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) } as u64;
                (addr != 0).then_some((addr, name))
            })
            .collect()
    })
}

/// The load address of the object containing `addr` (`dladdr(3)`'s `dli_fbase`).
fn object_base(addr: u64) -> Option<usize> {
    // SAFETY: Dl_info is plain data; dladdr only fills it in.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr accepts any address and reports whether an object contains it.
    let found = unsafe { libc::dladdr(addr as *const libc::c_void, &mut info) } != 0;
    (found && !info.dli_fbase.is_null()).then_some(info.dli_fbase as usize)
}

/// When `addr` is a PLT entry (`[endbr64;] [bnd] jmp *disp(%rip)`), the address in the GOT
/// slot it jumps through.
fn plt_target(addr: u64) -> Option<u64> {
    let mut code = [0u8; 16];
    memory::read(addr, &mut code).ok()?;
    let mut at = if code.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) { 4 } else { 0 };
    if code[at] == 0xf2 {
        at += 1;
    }
    if code[at..at + 2] != [0xff, 0x25] {
        return None;
    }
    let disp = i32::from_le_bytes(code[at + 2..at + 6].try_into().expect("4 bytes"));
    let slot = (addr + at as u64 + 6).wrapping_add_signed(i64::from(disp));
    let mut word = [0u8; 8];
    memory::read(slot, &mut word).ok()?;
    Some(u64::from_le_bytes(word))
}

/// How long unregistering waits for threads to leave a slot before giving up.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a removed site's slot stays unused before it is reused.
const SLOT_QUARANTINE: Duration = Duration::from_secs(2);

/// The longest run a detour jump covers: instructions up to 4 bytes past the jump's 5
/// (x86 instructions are at most 15 bytes long).
const MAX_COVERED_RUN: u64 = JMP_REL32_LEN as u64 - 1 + 15;

/// Jump optimization on or off for the whole process (the kernel's
/// `debug.kprobes_optimization`).
static OPTIMIZATION: AtomicBool = AtomicBool::new(true);

struct Registry {
    sites: BTreeMap<u64, Box<PatchSite>>,
    /// Removed sites, with the time they were retired. A thread interrupted by an unrelated
    /// signal while inside a slot or detour reports its handler's `rip` to a stop, not the
    /// slot's, and a thread entering a detour holds the site's address for a few
    /// instructions before it marks itself; so a site's memory is reused only after a delay
    /// no signal handler should outlast.
    quarantined: Vec<(Box<PatchSite>, Instant)>,
    /// Replaced probe lists and their sites' addresses, freed at the next grace period
    /// once no thread runs those sites' handlers.
    retired: Vec<(u64, *mut ProbeList)>,
    symbols: Option<SymbolTable>,
    /// Per module (path, load bias): where its code jumps into the middle of a function.
    foreign: BTreeMap<(std::path::PathBuf, u64), Arc<ModuleBranches>>,
    /// While [`prepare_optimization`] runs: each module's code as [`Registry::foreign_entries`]
    /// read it whole (start address, original bytes), so that preparing thousands of its
    /// probes reads none of their functions again.
    code: Option<Vec<(u64, Vec<u8>)>>,
}

// SAFETY: the retired pointers are owned leaked boxes only touched under the lock.
unsafe impl Send for Registry {}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    sites: BTreeMap::new(),
    quarantined: Vec::new(),
    retired: Vec::new(),
    symbols: None,
    foreign: BTreeMap::new(),
    code: None,
});

fn lock() -> Result<MutexGuard<'static, Registry>, ProbeError> {
    // Taking the lock inside a handler could wait for the very thread the handler
    // interrupted.
    if HandlerGuard::current_thread_inside() {
        return Err(ProbeError::InsideHandler);
    }
    Ok(REGISTRY.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The detour buffers of the optimized probes now placed, sorted by address: for an
/// unwinder that meets a thread stopped in one (`dynprobe record -p` at the attach). Takes
/// the registry's lock (not from inside a handler: empty then).
pub fn detours() -> Vec<crate::DetourSpan> {
    let Ok(registry) = lock() else { return Vec::new() };
    let mut spans: Vec<crate::DetourSpan> = registry
        .sites
        .values()
        .filter(|site| site.optimized.load(Ordering::Acquire))
        .filter_map(|site| site.detour().map(|d| d.span()))
        .collect();
    spans.sort_unstable_by_key(|span| span.start);
    spans
}

/// Drops what the registry keeps for placing probes — the process's symbol table, each
/// module's branch targets: megabytes for the C library — when no probe is left, and the
/// backtrace filter of return probes when no call can still return through their
/// trampoline. An attach session ends with it, so that the process it leaves does not keep
/// them and runs none of dynprobe's code; the next probe builds them again. Does nothing
/// inside a handler.
pub fn release_caches() {
    crate::retprobe::release_backtrace_filter();
    if let Ok(mut registry) = lock() {
        if registry.sites.is_empty() {
            registry.symbols = None;
            registry.foreign.clear();
        }
    }
}

/// Waits (up to `timeout`) until the memory of every removed site is freed: once its
/// quarantine is over and no thread is in it or will return into it (checked as
/// [`Registry::quarantine`] does, with the threads that could be there stopped). True when
/// none is left.
pub(crate) fn drain_quarantine(timeout: Duration) -> Result<bool, ProbeError> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut registry = lock()?;
        registry.free_expired();
        if registry.quarantined.is_empty() {
            return Ok(true);
        }
        let next = registry.quarantined.iter().map(|(_, since)| *since + SLOT_QUARANTINE).min();
        drop(registry);
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        let wait = next.map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
        std::thread::sleep(wait.max(Duration::from_millis(20)).min(deadline - now));
    }
}

/// Whether no thread of the process is in `ranges`, nor will return into them from a signal
/// handler it runs, nor is on its way there by what `coming` says (asked in the same stop,
/// allocating nothing): checked with the threads that could be there stopped, as before a
/// removed site's memory is freed.
pub(crate) fn memory_unused(ranges: Vec<Range<u64>>, coming: impl Fn() -> bool) -> Result<bool, ProbeError> {
    let _registry = lock()?;
    let stopped = begin(ranges.clone())?;
    let world = stopped.txn.world();
    let interrupted = world.all_interrupted_contexts();
    let inside = |ip: u64| ranges.iter().any(|r| r.contains(&ip));
    Ok(interrupted.complete()
        && !world.threads().iter().any(|t| inside(t.ip))
        && !interrupted.contexts().iter().any(|c| inside(c.rip))
        && !coming())
}

/// Gives the registry a symbol table of this process that the caller has just read, for
/// the probes it is about to place, unless the registry has one already: reading every
/// module's symbols again costs tens of milliseconds for a large program. (A name the table
/// does not know makes the registry read the modules again, as always.)
pub fn adopt_symbols(table: SymbolTable) {
    if let Ok(mut registry) = lock() {
        registry.symbols.get_or_insert(table);
    }
}

/// When dynprobe runs from a shared library of its own (the agent), and `addr` lies in
/// it, that library's path. The whole library is dynprobe's, whatever name or path it was
/// loaded under, so it is found by address (`dladdr(3)`), not by name. When dynprobe is
/// linked into the program itself, only its own code is refused (by name, above).
fn own_library_at(addr: u64) -> Option<String> {
    /// dynprobe's own library, when it is not the main program: its loaded segments and
    /// path. Looked up once (this runs once per probe, 80,000 times when a large program is
    /// traced whole, and `dladdr` searches the symbols of the object it finds).
    static OURS: OnceLock<Option<(Vec<Range<u64>>, String)>> = OnceLock::new();
    let (segments, path) = OURS.get_or_init(own_library).as_ref()?;
    segments.iter().any(|s| s.contains(&addr)).then(|| path.clone())
}

/// The loaded segments and path of the shared object dynprobe's code is in, unless that is
/// the main program (`dl_iterate_phdr(3)`).
fn own_library() -> Option<(Vec<Range<u64>>, String)> {
    struct Search {
        code: u64,
        segments: Vec<Range<u64>>,
        path: String,
        main: bool,
    }
    extern "C" fn visit(info: *mut libc::dl_phdr_info, _size: usize, data: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `data` is the Search passed below, and `info` the loader's description of
        // one object, valid during this call.
        let (search, info) = unsafe { (&mut *data.cast::<Search>(), &*info) };
        // SAFETY: dlpi_phdr points at dlpi_phnum program headers of the object.
        let headers = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
        let segments: Vec<Range<u64>> = headers
            .iter()
            .filter(|h| h.p_type == libc::PT_LOAD)
            .map(|h| info.dlpi_addr + h.p_vaddr..info.dlpi_addr + h.p_vaddr + h.p_memsz)
            .collect();
        if !segments.iter().any(|s| s.contains(&search.code)) {
            return 0;
        }
        // The main program comes first, with an empty name.
        // SAFETY: dlpi_name is a NUL-terminated string (empty for the main program).
        let name = unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }.to_string_lossy().into_owned();
        search.main = name.is_empty();
        search.segments = segments;
        search.path = name;
        1
    }
    let mut search =
        Search { code: own_library as *const () as u64, segments: Vec::new(), path: String::new(), main: false };
    // SAFETY: `visit` matches the callback type and only reads what the loader hands it;
    // `search` outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&mut search as *mut Search).cast()) };
    (!search.main && !search.segments.is_empty()).then_some((search.segments, search.path))
}

/// A resolved probe point.
struct Target {
    addr: u64,
    /// `symbol+offset` for messages and the listing.
    label: String,
    /// The containing function's name, start and size, when known.
    function: Option<(String, u64, u64)>,
}

pub(crate) fn register(probe: Probe) -> Result<Arc<ProbeShared>, ProbeError> {
    let mut guard = lock()?;
    let registry = &mut *guard;
    let target = registry.resolve(&probe.location, probe.return_entry.is_some())?;
    registry.check_blacklist(&target, probe.internal)?;
    let wants_post = probe.post.is_some();
    let light = match probe.reads_vectors {
        // Only the full save puts them where `hit_xmm` finds them.
        true => Err("it reads the vector registers (Probe::reads_vectors)".to_string()),
        false => registry.light_verdict(&probe.code_roots),
    };
    let shared = Arc::new(probe.into_shared(target.addr, light));

    if wants_post {
        registry.prepare_post(target.addr)?;
    }
    if let Some(site) = registry.sites.get(&target.addr) {
        if let (true, Some(Err(reason))) = (wants_post, site.slots.post.get()) {
            return Err(ProbeError::PostHandlerRefused { addr: target.addr, reason: reason.clone() });
        }
        let before = site.probes().clone();
        let mut list = before.to_vec();
        // dynprobe's own guards run last: they rewrite the call's arguments, which the
        // program's probes at the same place must see as the program passed them.
        let at = if shared.internal { list.len() } else { list.iter().position(|p| p.internal).unwrap_or(list.len()) };
        list.insert(at, shared.clone());
        if shared.entry_filter.is_empty() {
            // A probe for every call: a filtered detour must stop skipping any.
            if let Some(detour) = site.detour() {
                detour.open_filter()?;
            }
        }
        if shared.light.is_err() {
            // A heavy handler: the detour saves the vector state from now on.
            if let Some(detour) = site.detour() {
                detour.make_heavy()?;
            }
        }
        registry.retired.push((target.addr, site.publish(ProbeList::new(list))));
        if let Err(e) = registry.update_arming(target.addr) {
            // Leave the site exactly as it was: without the new probe.
            registry.retired.push((target.addr, site.publish(before)));
            return Err(e);
        }
        optimizer::kick();
        return Ok(shared);
    }

    let (insn, bytes) = registry.decode(&target)?;
    check_out_of_line(&bytes, insn.ip)?;
    let slots = prepare_slots(insn.ip, &bytes, wants_post)?;
    if let (true, Some(Err(reason))) = (wants_post, slots.post.get()) {
        let reason = reason.clone();
        pool::free(slots.slot);
        return Err(ProbeError::PostHandlerRefused { addr: target.addr, reason });
    }
    // The new int3 may go where another site's detour jump lies: that site becomes a
    // breakpoint probe again (and stays one while this site exists).
    registry.unoptimize_covering(target.addr)?;
    let function = target.function.clone().filter(|f| f.2 > 0);
    let c_runtime = registry.symbols(false)?.module_of(insn.ip).is_some_and(|m| m.is_c_runtime());
    let mut site = PatchSite::new(
        insn.ip,
        bytes[0],
        insn.text,
        target.label,
        function,
        slots,
        ProbeList::new(vec![shared.clone()]),
    );
    site.c_runtime = c_runtime;
    if let Err(e) = own_post_exits(&site) {
        disown_traps(&site);
        pool::free(site.slots.slot);
        return Err(e.into());
    }
    registry.sites.insert(target.addr, site);
    if let Some(refusal) = registry.breakpoint_refusal(target.addr) {
        let site = registry.sites.remove(&target.addr).expect("just inserted");
        disown_traps(&site);
        if let Some(detour) = site.detour() {
            pool::free(detour.slot);
        }
        pool::free(site.slots.slot);
        return Err(refusal);
    }
    if let Err(e) = registry.update_arming(target.addr) {
        let site = registry.sites.remove(&target.addr).expect("just inserted");
        if site.armed.load(Ordering::Relaxed) {
            // The int3 went in but the cores could not be serialized: take it out again.
            memory::write_verified(site.addr, &[INT3], &[site.orig_byte])?;
        }
        disown_traps(&site);
        pool::free(site.slots.slot);
        return Err(e);
    }
    // A disabled probe has nothing to optimize yet: its enabling kicks the optimizer.
    if registry.sites.get(&target.addr).is_some_and(|site| site.armed.load(Ordering::Relaxed)) {
        optimizer::kick();
    }
    Ok(shared)
}

pub(crate) fn set_enabled(probe: &Arc<ProbeShared>, on: bool) -> Result<(), ProbeError> {
    let registry = lock()?;
    let was = probe.enabled();
    probe.set_enabled(on);
    registry.update_arming(probe.addr).inspect_err(|_| probe.set_enabled(was))?;
    optimizer::kick();
    Ok(())
}

/// Enables or disables every probe of `probes` in one batch: the `int3`s that must come or
/// go are all written under one stop of the other threads, with one serialization of the
/// cores after (the kernel's batched `text_poke`). On an error the probes whose site could
/// not be changed keep their previous state; the others are changed.
pub(crate) fn set_enabled_all(probes: &[&Arc<ProbeShared>], on: bool) -> Result<(), ProbeError> {
    let registry = lock()?;
    let was: Vec<bool> = probes.iter().map(|p| p.enabled()).collect();
    probes.iter().for_each(|p| p.set_enabled(on));
    let addrs: Vec<u64> = probes.iter().map(|p| p.addr).collect();
    let failed = registry.update_arming_all(&addrs);
    if let Err((addrs, _)) = &failed {
        let addrs: std::collections::BTreeSet<u64> = addrs.iter().copied().collect();
        for (probe, was) in probes.iter().zip(was) {
            if addrs.contains(&probe.addr) {
                probe.set_enabled(was);
            }
        }
    }
    optimizer::kick();
    failed.map_err(|(_, e)| e)
}

pub(crate) fn unregister(probe: &Arc<ProbeShared>) -> Result<(), ProbeError> {
    let mut registry = lock()?;
    let Some(site) = registry.sites.get(&probe.addr) else {
        return Ok(());
    };
    let gone = code_unloaded(site);
    let remaining = ProbeList::new(site.probes().iter().filter(|p| !Arc::ptr_eq(p, probe)).cloned().collect());
    if !remaining.is_empty() {
        let old = site.publish(remaining);
        registry.retired.push((probe.addr, old));
        if !gone {
            registry.update_arming(probe.addr)?;
        }
        // Returns once no thread can still be running this probe's handlers.
        return registry.grace_period(&[probe.addr]);
    }

    // The last probe: restore the byte, then wait until no thread is in the handler or slot.
    // Code that was unloaded has none of our bytes left to restore: the site is only
    // forgotten, and nothing is written where it was (another library may be there now).
    let was_enabled = probe.enabled();
    probe.set_enabled(false);
    let site = registry.sites.get(&probe.addr).expect("checked above");
    if gone {
        site.optimized.store(false, Ordering::Relaxed);
        site.armed.store(false, Ordering::Relaxed);
    }
    let slot = site.slots.slot;
    let detour = site.detour().map(|d| d.slot);
    let quiesced = registry.update_arming(probe.addr).and_then(|()| {
        // An island left written by a failed transaction goes before its detour does.
        let site = registry.sites.get(&probe.addr).expect("checked above");
        if !gone {
            write_islands(&[&**site], Islands::Restore)?;
        }
        trap::unregister_site(probe.addr);
        registry.grace_period(&[probe.addr])?;
        wait_until_no_thread_in(slot.addr, slot.size as u64)?;
        detour.map_or(Ok(()), |d| wait_until_no_thread_in(d.addr, d.size as u64))
    });
    if let Err(e) = quiesced {
        // The handle goes back to the caller: leave the probe as it was.
        probe.set_enabled(was_enabled);
        let _ = registry.update_arming(probe.addr);
        return Err(e);
    }
    let site = registry.sites.remove(&probe.addr).expect("checked above");
    disown_traps(&site);
    registry.quarantine(site);
    Ok(())
}

/// Whether an armed site's code was unloaded under it (its library `dlclose`d): its address
/// is not mapped any more, so nothing of ours is there to take out. Only that: the bytes at
/// a mapped address never decide it — a function that begins with a jump has the first byte
/// of an optimized site's jump as its own, and a library mapped anew at the address may
/// hold anything. (Whoever knows a library is gone takes its probes out at once: the
/// agent's `dlclose` watch does, before any other `dlopen` can map something there.)
fn code_unloaded(site: &PatchSite) -> bool {
    site.armed.load(Ordering::Relaxed) && !dynprobe_text::raw::read(site.addr, &mut [0u8])
}

/// [`unregister`] for many probes at once, each the only probe at its address and all of
/// them disabled already (their bytes restored by one `set_enabled_all`): one grace period
/// and one stop of the threads that could be in any of their slots or detours, instead of
/// one each — ten thousand function-entry probes come out in one pass, and a thread seen
/// running is signalled once, not once per probe. Any other probe of `probes` (sharing its
/// site, or still enabled) is left to the caller. Returns the probes removed; on an error
/// none is removed, each left as it was.
pub(crate) fn unregister_all<'a>(probes: &[&'a Arc<ProbeShared>]) -> Result<Vec<&'a Arc<ProbeShared>>, ProbeError> {
    let mut registry = lock()?;
    let alone = |p: &Arc<ProbeShared>| {
        registry.sites.get(&p.addr).is_some_and(|site| {
            let list = site.probes();
            list.len() == 1 && Arc::ptr_eq(&list[0], p) && !site.armed.load(Ordering::Relaxed)
        })
    };
    let batch: Vec<&Arc<ProbeShared>> = probes.iter().copied().filter(|p| !p.enabled() && alone(p)).collect();
    let mut ranges = Vec::new();
    for p in &batch {
        let site = registry.sites.get(&p.addr).expect("checked above");
        let slot = site.slots.slot;
        ranges.push(slot.addr..slot.addr + slot.size as u64);
        if let Some(detour) = site.detour().map(|d| d.slot) {
            ranges.push(detour.addr..detour.addr + detour.size as u64);
        }
    }
    batch.iter().for_each(|p| trap::unregister_site(p.addr));
    let addrs: Vec<u64> = batch.iter().map(|p| p.addr).collect();
    let quiesced = registry.grace_period(&addrs).and_then(|()| wait_until_no_thread_in_any(&ranges));
    // On an error they stay registered and disabled (no byte of theirs in the code), as
    // `unregister` leaves a probe it could not remove: the caller removes them one by one.
    quiesced?;
    let sites: Vec<_> = batch.iter().map(|p| registry.sites.remove(&p.addr).expect("checked above")).collect();
    sites.iter().for_each(|site| disown_traps(site));
    registry.quarantine_all(sites);
    Ok(batch)
}

/// [`wait_until_no_thread_in`] for several ranges, under one stop each round.
fn wait_until_no_thread_in_any(ranges: &[std::ops::Range<u64>]) -> Result<(), ProbeError> {
    if ranges.is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + QUIESCE_TIMEOUT;
    loop {
        let world = stop::stop_threads_touching(ranges, STOP_TIMEOUT)?;
        let busy = ranges.iter().find(|r| world.threads().iter().any(|t| r.contains(&t.ip))).cloned();
        drop(world);
        let Some(busy) = busy else { return Ok(()) };
        if Instant::now() > deadline {
            return Err(TextError::StopFailed {
                reason: format!("a thread stayed inside the probe's slot at {:#x} for {QUIESCE_TIMEOUT:?}", busy.start),
            }
            .into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// How many probes are registered (dynprobe's own guards included).
pub(crate) fn probe_count() -> Result<usize, ProbeError> {
    Ok(lock()?.sites.values().map(|site| site.probes().len()).sum())
}

/// Proves the code at `roots` light (see [`light::prove`]), naming callees with the
/// registry's symbol table.
pub(crate) fn prove_light(roots: &[u64]) -> light::Verdict {
    let mut registry = lock().map_err(|e| e.to_string())?;
    let table = registry.symbols(false).ok();
    light::prove(roots, table)
}

pub(crate) fn info(probe: &Arc<ProbeShared>) -> Option<ProbeInfo> {
    let registry = lock().ok()?;
    let site = registry.sites.get(&probe.addr)?;
    Some(describe(site, probe))
}

/// Every registered probe, in address order, like the kernel's `kprobes/list`. Empty when
/// called from inside a probe handler (the registry lock may be held by the interrupted
/// thread).
///
/// ```
/// # extern crate dynprobe_probe as dynprobe;
/// for probe in dynprobe::list() {
///     println!("{probe}");
/// }
/// ```
pub fn list() -> Vec<ProbeInfo> {
    let Ok(registry) = lock() else { return Vec::new() };
    registry
        .sites
        .values()
        .flat_map(|site| site.probes().iter().filter(|p| !p.internal).map(|p| describe(site, p)))
        .collect()
}

fn describe(site: &PatchSite, probe: &ProbeShared) -> ProbeInfo {
    ProbeInfo {
        addr: site.addr,
        symbol: site.symbol.clone(),
        insn: site.insn_text.clone(),
        enabled: probe.enabled(),
        has_post_handler: probe.post.is_some(),
        hits: probe.hits(),
        nmissed: probe.nmissed(),
        optimized: site.optimized.load(Ordering::Relaxed),
        light: site.detour().is_some_and(|d| d.is_light()),
        heavy: match probe.light.clone().err() {
            Some(why) => Some(why),
            None => site.heavy_reason().map(|why| format!("a probe sharing its site: {why}")),
        },
        not_optimized: site.not_optimized.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        return_probe: probe.return_entry.is_some(),
    }
}

/// Registers the post-slot exits' `int3`s with the trap dispatcher. The site's own `int3` is
/// owned by [`Registry::update_arming`], just before it is written, so no `int3` of ours is
/// ever without an owner.
fn own_post_exits(site: &PatchSite) -> Result<(), TextError> {
    if let Some(Ok(exits)) = site.slots.post.get() {
        for exit in exits.iter() {
            trap::register_site(exit.addr, on_post_trap, exit as *const _ as usize)?;
        }
    }
    Ok(())
}

fn disown_traps(site: &PatchSite) {
    trap::unregister_site(site.addr);
    if let Some(Ok(exits)) = site.slots.post.get() {
        exits.iter().for_each(|exit| trap::unregister_site(exit.addr));
    }
    if let Some(detour) = site.detour() {
        disown_detour(detour);
    }
}

/// Polls, with every other thread stopped each time, until none is executing in
/// `[start, start + len)`.
fn wait_until_no_thread_in(start: u64, len: u64) -> Result<(), ProbeError> {
    wait_until_no_thread_in_any(std::slice::from_ref(&(start..start + len)))
}

impl Registry {
    /// Whether a probe whose handlers run the code at `roots` may run in a light detour,
    /// or why not (see [`light`]).
    fn light_verdict(&mut self, roots: &[u64]) -> light::Verdict {
        let table = self.symbols(false).ok();
        light::dispatcher(table)?;
        light::prove(roots, table)
    }

    fn symbols(&mut self, reload: bool) -> Result<&SymbolTable, ProbeError> {
        if reload || self.symbols.is_none() {
            self.symbols = Some(SymbolTable::current_process()?);
        }
        Ok(self.symbols.as_ref().expect("just loaded"))
    }

    /// Why the new site at `addr` must not be a breakpoint, if so: `SIGTRAP` may be blocked
    /// when it is hit ([`signals::breakpoint_hazard`]) and it cannot be jump-optimized.
    fn breakpoint_refusal(&mut self, addr: u64) -> Option<ProbeError> {
        let hazard = signals::breakpoint_hazard(self.symbols(false).ok()?)?;
        match self.prepare(addr) {
            Ok(true) => None,
            Ok(false) => {
                let site = self.sites.get(&addr)?;
                let reason = site.not_optimized.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let not_optimized = reason.unwrap_or_else(|| "jump optimization is switched off".into());
                Some(ProbeError::BreakpointUnsafe { addr, hazard, not_optimized })
            }
            Err(e) => Some(e),
        }
    }

    /// Resolves and checks a probe point ([`point::resolve`]), re-reading the process's
    /// modules once if it names a symbol or address the table does not know (a library may
    /// have been loaded since it was read). An indirect function is probed at the
    /// implementation the dynamic linker chose for this process.
    fn resolve(&mut self, location: &Location, return_probe: bool) -> Result<Target, ProbeError> {
        for reload in [false, true] {
            let table = self.symbols(reload)?;
            let implementation = |sym: &dynprobe_symbols::Symbol| {
                crate::ifunc::chosen_implementation(table, sym)
                    .ok_or_else(|| "the dynamic linker gives no implementation for it in this process (dlsym)".into())
            };
            let point = match point::resolve(table, location, return_probe, &implementation) {
                Err(ProbeError::Symbol(SymbolError::UnknownSymbol { .. } | SymbolError::UnknownModule { .. }))
                    if !reload =>
                {
                    continue
                }
                Ok(ProbePoint { function: None, .. }) if !reload => continue,
                point => point?,
            };
            let ProbePoint { addr, function, offset, ifunc } = point;
            let Some(function) = function else {
                return Ok(Target { addr, label: format!("{addr:#x}"), function: None });
            };
            let name = &function.name;
            let label = match ifunc {
                None => format!("{name}+{offset:#x}"),
                Some(public) => match crate::ifunc::sharing_implementation(table, &public, function.start) {
                    shared if shared.is_empty() => format!("{} → {name}+{offset:#x}", public.name),
                    shared => format!("{} → {name}+{offset:#x} (shared with {})", public.name, shared.join(", ")),
                },
            };
            return Ok(Target { addr, label, function: Some((function.name, function.start, function.size)) });
        }
        unreachable!("the second round returns")
    }

    /// Whether a probe may go at `target`. dynprobe's own signal guards (`internal`) may go
    /// on the C library functions its trap path calls (`syscall`): a hit from inside a
    /// handler is only counted as missed, and a guard has nothing to do for dynprobe.
    fn check_blacklist(&self, target: &Target, internal: bool) -> Result<(), ProbeError> {
        if pool::contains(target.addr) {
            let what = "an out-of-line slot of another probe".to_string();
            return Err(ProbeError::Blacklisted { addr: target.addr, what });
        }
        if let Some(library) = own_library_at(target.addr) {
            let what = format!("inside {library}, the library dynprobe itself runs from");
            return Err(ProbeError::Blacklisted { addr: target.addr, what });
        }
        if let Some((name, start, size)) = &target.function {
            // `dynprobe_text::…` or `<dynprobe_text::… as Trait>::…`, found without allocating:
            // this runs once per probe, 80,000 times when a large program is traced whole.
            let ours = BLACKLISTED_CODE.iter().any(|prefix| {
                name.starts_with(prefix) || name.match_indices('<').any(|(i, _)| name[i + 1..].starts_with(prefix))
            });
            if ours || BLACKLISTED_SYMBOLS.contains(&name.as_str()) {
                return Err(ProbeError::Blacklisted { addr: target.addr, what: name.clone() });
            }
            let inside = |addr: u64| addr == *start || addr.wrapping_sub(*start) < *size;
            if let Some((_, called)) = machinery_functions().iter().find(|(addr, _)| !internal && inside(*addr)) {
                let what = format!(
                    "{}: the `{called}` dynprobe's trap handler calls here, being linked into this program \
                     (the agent library, which `dynprobe probe` and `record` load, has its own)",
                    target.label
                );
                return Err(ProbeError::Blacklisted { addr: target.addr, what });
            }
        }
        Ok(())
    }

    /// Writes the post path of the site at `addr`, if there is one and it has none yet
    /// (see [`prepare_post`]).
    fn prepare_post(&self, addr: u64) -> Result<(), ProbeError> {
        let Some(site) = self.sites.get(&addr) else { return Ok(()) };
        if site.slots.post.get().is_some() {
            return Ok(());
        }
        let insn = self.original_bytes(addr, (site.slots.boost_resume - addr) as usize)?;
        prepare_post(site, &insn)
    }

    /// Reads `len` bytes at `addr` as they were before any of our `int3`s and jumps.
    fn original_bytes(&self, addr: u64, len: usize) -> Result<Vec<u8>, ProbeError> {
        let end = addr + len as u64;
        let cached =
            self.code.iter().flatten().find(|(start, code)| *start <= addr && end <= start + code.len() as u64);
        let mut bytes = match cached {
            Some((start, code)) => code[(addr - start) as usize..][..len].to_vec(),
            None => memory::read_vec(addr, len)?,
        };
        // A site's island lies in the padding before it, up to MAX_ISLAND_GAP bytes back.
        for (&site_addr, site) in
            self.sites.range(addr.saturating_sub(JMP_REL32_LEN as u64 - 1)..end + MAX_ISLAND_GAP as u64)
        {
            let (original, island): (&[u8], _) = match site.detour() {
                Some(detour) if site.optimized.load(Ordering::Relaxed) => {
                    (detour.original_head(), detour.island.as_ref().map(|i| (i.addr, &i.original[..])))
                }
                _ => (std::slice::from_ref(&site.orig_byte), None),
            };
            for (start, original) in std::iter::once((site_addr, original)).chain(island) {
                for (i, &byte) in original.iter().enumerate() {
                    let at = start + i as u64;
                    if (addr..end).contains(&at) {
                        bytes[(at - addr) as usize] = byte;
                    }
                }
            }
        }
        Ok(bytes)
    }

    /// The instruction at the target, decoded from its function's start so that an address
    /// inside an instruction is refused, with its original bytes.
    fn decode(&self, target: &Target) -> Result<(Insn, Vec<u8>), ProbeError> {
        let (insn, code, code_start) = match target.function {
            Some((_, start, size)) if size > 0 => {
                let function = self.original_bytes(start, size as usize)?;
                (instruction_at(&function, start, target.addr)?, function, start)
            }
            // No known function bounds: the caller vouches for the boundary.
            _ => {
                let bytes = self.original_bytes(target.addr, 15)?;
                (decode_one(&bytes, target.addr)?, bytes, target.addr)
            }
        };
        // The instruction's bytes are in what was read already.
        let at = (insn.ip - code_start) as usize;
        let bytes = match code.get(at..at + insn.len) {
            Some(bytes) => bytes.to_vec(),
            None => self.original_bytes(insn.ip, insn.len)?,
        };
        Ok((insn, bytes))
    }

    /// Writes or removes the site's `int3` so that it is armed exactly when some probe there
    /// is enabled — or, when its detour is prepared already, writes its jump directly
    /// ([`Self::update_arming_all`] for one site): a probe registered disabled, prepared and
    /// then enabled never has a breakpoint phase (`dynprobe probe` arms its probes so). A
    /// single-byte write is atomic for instruction fetch, so no thread can see a torn
    /// instruction; `sync_core` makes every thread see the new byte before we return.
    fn update_arming(&self, addr: u64) -> Result<(), ProbeError> {
        self.update_arming_all(&[addr]).map_err(|(_, e)| e)
    }

    /// [`Self::update_arming`] for many sites at once: the jumps of those to disarm are taken
    /// out first (one batch), then every byte is written and the cores are serialized once. On failure returns the sites left as they were, and the first error.
    ///
    /// A site to arm whose detour is prepared already (see [`prepare_optimization`]) is armed
    /// directly as its jump ([`Self::arm_as_jumps`], one transaction for all of them), so
    /// that no thread ever traps there and no optimizer pass has to stop anyone again. Each site succeeds or fails on its own:
    /// one that cannot be owned (a full trap table) or written is left as it was, the others
    /// are changed.
    fn update_arming_all(&self, addrs: &[u64]) -> Result<(), (Vec<u64>, ProbeError)> {
        let mut changes: Vec<(u64, bool)> = Vec::new();
        // A BTreeSet, not a HashSet: its RandomState would touch the agent's thread-local
        // storage, which the C library allocates with malloc on a thread of dynprobe's
        // (see the agent's `heap` module).
        let mut seen = std::collections::BTreeSet::new();
        for &addr in addrs {
            if let Some(site) = self.sites.get(&addr) {
                let want = site.any_enabled();
                if want != site.armed.load(Ordering::Relaxed) && seen.insert(addr) {
                    changes.push((addr, want));
                }
            }
        }
        if changes.is_empty() {
            // Nothing to write (a probe registered disabled): no writer, no serialization.
            return Ok(());
        }
        let every: Vec<u64> = changes.iter().map(|&(a, _)| a).collect();
        let all = |e: ProbeError| (every.clone(), e);
        let disarm: Vec<u64> = changes.iter().filter(|&&(_, want)| !want).map(|&(a, _)| a).collect();
        if !disarm.is_empty() {
            // The int3s are under the jumps: the jumps go first.
            self.unoptimize_all(&disarm).map_err(all)?;
        }
        // Room for the outcome made first: nothing may allocate while threads are stopped.
        let mut failed: Vec<u64> = Vec::with_capacity(changes.len());
        let mut first_error = None;
        changes.retain(|&(addr, want)| {
            if !want {
                return true;
            }
            let site = self.sites.get(&addr).expect("collected above");
            // Every int3 we write has an owner first (see update_arming).
            match trap::register_site(addr, on_site_trap, &**site as *const PatchSite as usize) {
                Ok(()) => true,
                Err(e) => {
                    failed.push(addr);
                    first_error.get_or_insert(e);
                    false
                }
            }
        });
        // Sites armed directly as their jumps, in one transaction: no thread ever traps there
        // and no optimizer pass has to stop anyone again. One left out (a thread in the
        // middle of its breakpoint slot) or not written falls back to a breakpoint below, and
        // the optimizer tries its jump again.
        let direct: Vec<u64> =
            changes.iter().filter(|&&(addr, want)| want && self.jump_ready(addr)).map(|c| c.0).collect();
        let jumped = match direct.is_empty() {
            true => Vec::new(),
            false => self.arm_as_jumps(&direct).map_err(all)?,
        };
        // The rest is one byte per site, fetched whole by any thread, old or new: no thread
        // needs stopping (stopping them would only risk cutting their blocking calls short),
        // the writer lock and one core serialization at the end suffice.
        let mut writer = memory::CodeWriter::lock().map_err(|e| all(e.into()))?;
        // `jumped` is in address order (see arm_as_jumps): a binary search keeps this linear
        // in the sites, not quadratic (80,000 sites made it most of the start-up).
        for &(addr, want) in changes.iter().filter(|(addr, _)| jumped.binary_search(addr).is_err()) {
            let site = self.sites.get(&addr).expect("collected above");
            let (from, to) = if want { (site.orig_byte, INT3) } else { (INT3, site.orig_byte) };
            match writer.write_verified(addr, &[from], &[to]) {
                Ok(()) => site.armed.store(want, Ordering::Relaxed),
                Err(e) => {
                    failed.push(addr);
                    first_error.get_or_insert(e);
                }
            }
        }
        let synced = try_sync_core();
        drop(writer);
        match (first_error, synced) {
            (Some(e), _) => Err((failed, e.into())),
            (None, Err(e)) => Err((Vec::new(), e.into())),
            (None, Ok(())) => Ok(()),
        }
    }

    /// Whether the disarmed site at `addr` can be armed directly as its jump: its detour
    /// is prepared, optimization is on, and no other site lies inside its covered run.
    fn jump_ready(&self, addr: u64) -> bool {
        let Some(site) = self.sites.get(&addr) else { return false };
        let Some(detour) = site.detour() else { return false };
        OPTIMIZATION.load(Ordering::Relaxed)
            && !site.optimized.load(Ordering::Relaxed)
            && self.no_other_site_under(addr, detour)
    }

    /// Arms the disarmed sites at `addrs` (each [`Self::jump_ready`], owner registered)
    /// directly as their jumps, in one patching transaction: the original bytes become the
    /// jump, int3-first when threads were left running (the head's `int3` is the site's own,
    /// so a thread meeting it runs the probe and goes on in the detour's copy). Returns the
    /// sites armed that way, in address order; the others are left as they were.
    fn arm_as_jumps(&self, addrs: &[u64]) -> Result<Vec<u64>, ProbeError> {
        let mut sites: Vec<&PatchSite> =
            addrs.iter().map(|addr| &**self.sites.get(addr).expect("registered")).collect();
        // In address order, as the edits' outcomes come, to pair each outcome with its site.
        sites.sort_by_key(|site| site.addr);
        let mut edits = Edits::new(
            sites
                .iter()
                .map(|site| {
                    let detour = site.detour().expect("jump_ready checked it");
                    (site.addr, detour.original_head(), detour.jump_head())
                })
                .collect(),
        );
        let mut busy = Vec::with_capacity(sites.len());
        let (written, synced) = write_jumps(&sites, &mut edits, &mut busy)?;
        let mut jumped = Vec::with_capacity(sites.len());
        for ((addr, done), site) in edits.outcomes().zip(&sites) {
            site.optimized.store(done, Ordering::Release);
            site.armed.store(done, Ordering::Relaxed);
            if done {
                jumped.push(addr);
            }
        }
        if let Err(e @ TextError::StopFailed { .. }) = written {
            return Err(e.into());
        }
        synced?;
        Ok(jumped)
    }

    /// Retires a removed site; frees those whose quarantine is over.
    fn quarantine(&mut self, site: Box<PatchSite>) {
        self.quarantine_all([site]);
    }

    /// [`Self::quarantine`] for many sites: one look for expired memory (a stop of the
    /// threads when there is some), not one per site — 70,000 sites removed at the end of a
    /// `record -p` of node each stopped every thread.
    fn quarantine_all(&mut self, sites: impl IntoIterator<Item = Box<PatchSite>>) {
        self.free_expired();
        let now = Instant::now();
        self.quarantined.extend(sites.into_iter().map(|site| (site, now)));
    }

    /// Frees the memory of the removed sites whose quarantine is over and that no thread
    /// can come back to.
    fn free_expired(&mut self) {
        let now = Instant::now();
        let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.quarantined)
            .into_iter()
            .partition(|(_, since)| now.duration_since(*since) >= SLOT_QUARANTINE);
        self.quarantined = kept;
        // A thread may still come back to a slot or detour long after: from a signal handler
        // whose frame holds a `rip` in it (the jump writer may even have put it there). Free
        // only what no thread and no such frame refers to; the rest waits for the next round.
        let memory: Vec<Range<u64>> =
            expired.iter().flat_map(|(old, _)| site_memory(old)).map(|(start, size)| start..start + size).collect();
        let (free, still_used): (Vec<_>, Vec<_>) = match (!expired.is_empty()).then(|| begin(memory)) {
            None => (Vec::new(), Vec::new()),
            Some(Ok(stopped)) => {
                // An incomplete set could miss a frame that returns into a site: free none.
                let world = stopped.txn.world();
                let interrupted = world.all_interrupted_contexts();
                expired.into_iter().partition(|(old, _)| {
                    let inside = |ip: u64| site_memory(old).any(|(start, size)| ip.wrapping_sub(start) < size);
                    interrupted.complete()
                        && !world.threads().iter().any(|t| inside(t.ip))
                        && !interrupted.contexts().iter().any(|c| inside(c.rip))
                })
            }
            Some(Err(_)) => (Vec::new(), expired),
        };
        // Looked at again only after another quarantine: each look stops every thread.
        self.quarantined.extend(still_used.into_iter().map(|(old, _)| (old, now)));
        for (old, _) in free {
            site_memory(&old).for_each(|(start, size)| pool::free(ExecSlot { addr: start, size: size as usize }));
        }
    }

    /// Waits until no thread can hold a pointer handed out by the trap path before now, nor
    /// run the handlers of the sites at `sites` through their detours, nor of any site whose
    /// replaced probe list waits here (a detour's hit reads its site's list only once it has
    /// marked itself, see `HandlerGuard`), then frees those lists. One deadline for all.
    fn grace_period(&mut self, sites: &[u64]) -> Result<(), ProbeError> {
        let mut sites: Vec<u64> = self.retired.iter().map(|&(at, _)| at).chain(sites.iter().copied()).collect();
        sites.sort_unstable();
        sites.dedup();
        if !sites.is_empty() {
            try_sync_core()?;
            let deadline = Instant::now() + QUIESCE_TIMEOUT;
            for at in sites {
                let left = deadline.saturating_duration_since(Instant::now());
                if !thread_slot::wait_while_active(at as usize, left) {
                    return Err(TextError::StopFailed {
                        reason: format!(
                            "a thread stayed inside the handlers of the probe at {at:#x} for {QUIESCE_TIMEOUT:?}"
                        ),
                    }
                    .into());
                }
            }
        }
        stop::synchronize()?;
        for (_, list) in self.retired.drain(..) {
            // SAFETY: retired lists were leaked boxes replaced before this grace period.
            drop(unsafe { Box::from_raw(list) });
        }
        Ok(())
    }
}

/// A patching transaction about `ranges` (the text layer's one protocol: the code writer
/// taken, every thread that could be in `ranges` stopped). Until it is dropped, probes this
/// thread hits count as missed instead of running their handlers: a handler could wait for
/// a lock one of the stopped threads holds.
struct Stopped {
    // Fields drop in order: the threads are released before the guard.
    txn: Transaction,
    _own_hits_missed: Option<HandlerGuard>,
}

fn begin(ranges: Vec<Range<u64>>) -> Result<Stopped, ProbeError> {
    let guard = HandlerGuard::enter();
    let txn = Transaction::begin(ranges, STOP_TIMEOUT)?;
    Ok(Stopped { txn, _own_hits_missed: guard })
}

/// What [`write_jumps`] gives back: the writes' outcome, then the core serialization's.
type JumpsWritten = (Result<(), TextError>, Result<(), TextError>);

/// Writes the jumps of `sites` (`edits`, in the same order) in one patching transaction.
/// From its start a thread trapping on one of the sites goes on in the detour's copy, never
/// back through the breakpoint slot into the bytes the jump covers; threads that went that
/// way before are stopped by the time the heads are armed, and moved into the copy. A site
/// with a thread in the middle of its slot's instruction is left out and listed in `busy`.
/// Returns the writes' outcome and the final core serialization's; the sites' `optimized`
/// flags are the caller's to settle from [`Edits::outcomes`]. Allocates nothing while
/// threads are stopped (`busy` has room for every site).
fn write_jumps(sites: &[&PatchSite], edits: &mut Edits<'_>, busy: &mut Vec<u64>) -> Result<JumpsWritten, ProbeError> {
    // Islands first, while their entries do not jump there yet: a thread falling through
    // the padding then goes where the entry would have taken it. A site whose island was
    // not written keeps its breakpoint this time.
    for (addr, written) in write_islands(sites, Islands::Write)? {
        if !written {
            busy.push(addr);
            edits.skip(addr);
        }
    }
    let written = write_entry_jumps(sites, edits, busy);
    // An island whose entry jump was not written goes again: it would be a way into the
    // detour that the site's state does not account for.
    let jumped: BTreeSet<u64> = edits.outcomes().filter(|&(_, done)| done).map(|(addr, _)| addr).collect();
    let unjumped: Vec<&PatchSite> = sites.iter().copied().filter(|site| !jumped.contains(&site.addr)).collect();
    let restored = write_islands(&unjumped, Islands::Restore);
    let written = written?;
    restored?;
    Ok(written)
}

/// Whether [`write_islands`] writes the islands' jumps or puts their padding back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Islands {
    Write,
    Restore,
}

/// Writes the islands of those `sites` that have one (or puts their padding back) in one
/// patching transaction, unless they already are that way; returns, per such site (entry
/// address), whether its island now is. A thread stopped in the padding before an island
/// being written moves on to the entry, where the padding would have taken it.
fn write_islands(sites: &[&PatchSite], what: Islands) -> Result<Vec<(u64, bool)>, ProbeError> {
    let mut islands: Vec<(u64, crate::arch::Island)> = sites
        .iter()
        .filter_map(|site| site.detour().and_then(|d| d.island).map(|island| (site.addr, island)))
        .filter(|(_, island)| {
            let want: &[u8] = if what == Islands::Write { &island.jump } else { &island.original };
            memory::verify(island.addr, want).is_err()
        })
        .collect();
    if islands.is_empty() {
        return Ok(Vec::new());
    }
    islands.sort_by_key(|(addr, _)| *addr);
    let mut edits = Edits::new(
        islands
            .iter()
            .map(|(_, i)| match what {
                Islands::Write => (i.addr, &i.original[..], &i.jump[..]),
                Islands::Restore => (i.addr, &i.jump[..], &i.original[..]),
            })
            .collect(),
    );
    let ranges = islands.iter().map(|(entry, island)| island.range(*entry)).collect();
    let mut stopped = begin(ranges)?;
    let written = stopped.txn.write(&mut edits, |world, interrupted| {
        for (entry, island) in &islands {
            move_out_of(world, interrupted, island.addr, (entry - island.addr) as usize);
        }
    });
    let synced = stopped.txn.commit();
    written?;
    synced?;
    // Islands precede their entries and do not interleave: the outcomes come in the same order.
    Ok(islands.iter().zip(edits.outcomes()).map(|((entry, _), (_, done))| (*entry, done)).collect())
}

/// [`write_jumps`] without the islands: the probe points' own jumps, in one transaction.
fn write_entry_jumps(
    sites: &[&PatchSite],
    edits: &mut Edits<'_>,
    busy: &mut Vec<u64>,
) -> Result<JumpsWritten, ProbeError> {
    let ranges = sites.iter().flat_map(|site| jump_ranges(site, site.detour().expect("ready"))).collect();
    let mut stopped = begin(ranges)?;
    for site in sites {
        site.optimized.store(true, Ordering::Release);
    }
    let written = stopped.txn.arm_heads(edits).and_then(|interrupted| {
        for site in sites {
            if move_into_copy(stopped.txn.world_mut(), &interrupted, site, site.detour().expect("ready")).is_err() {
                busy.push(site.addr);
                edits.skip(site.addr);
            }
        }
        stopped.txn.finish(edits)
    });
    Ok((written, stopped.txn.commit()))
}

/// What [`Registry::foreign_entries`] knows of a module's branches.
#[derive(Default)]
struct ModuleBranches {
    /// Where its code jumps into the middle of a function (target → branch).
    entries: BTreeMap<u64, u64>,
    /// The span of its functions: a jump table's entries point into it.
    code: Range<u64>,
    /// Where its functions start...
    starts: BTreeSet<u64>,
    /// ...and end: the padding before a function starts at the end of the one before.
    ends: BTreeSet<u64>,
}

/// The code a jump at `site` changes or sends threads back into: the covered run, and the
/// breakpoint slot, which jumps back into the run.
fn jump_ranges(site: &PatchSite, detour: &crate::arch::SiteDetour) -> [Range<u64>; 2] {
    let slot = site.slots.slot;
    [site.addr..site.addr + detour.run.len as u64, slot.addr..slot.addr + slot.size as u64]
}

/// The executable memory of a site: its breakpoint slot, and its detour if it has one.
fn site_memory(site: &PatchSite) -> impl Iterator<Item = (u64, u64)> + '_ {
    let slot = site.slots.slot;
    std::iter::once((slot.addr, slot.size as u64)).chain(site.detour().map(|d| (d.slot.addr, d.slot.size as u64)))
}

impl Registry {
    /// Tries to optimize every armed site that is not yet optimized. Returns true when some
    /// site should be tried again shortly.
    ///
    /// The jumps are written in one batch, under one stop of the other threads (the
    /// kernel's optimizer does the same with one `text_poke` batch).
    fn optimize_all(&mut self) -> Result<bool, ProbeError> {
        let addrs: Vec<u64> = self.sites.keys().copied().collect();
        let mut ready = Vec::new();
        for addr in addrs {
            if self.ready_to_jump(addr)? {
                ready.push(addr);
            }
        }
        if ready.is_empty() {
            return Ok(false);
        }
        let mut retry = false;
        // Room made before the transaction: nothing may allocate while threads are stopped.
        let sites: Vec<&PatchSite> = ready.iter().map(|addr| &**self.sites.get(addr).expect("ready")).collect();
        let under: Vec<[u8; 5]> = sites.iter().map(|site| bytes_under_jump(site.detour().expect("ready"))).collect();
        let mut edits = Edits::new(
            sites
                .iter()
                .zip(&under)
                .map(|(site, under)| {
                    let detour = site.detour().expect("ready");
                    (site.addr, &under[..detour.jump_len], detour.jump_head())
                })
                .collect(),
        );
        let mut busy = Vec::with_capacity(ready.len());
        let (written, synced) = write_jumps(&sites, &mut edits, &mut busy)?;
        let mut failed = Vec::new();
        for ((addr, done), (site, under)) in edits.outcomes().zip(sites.iter().zip(&under)) {
            if done {
                continue;
            }
            site.optimized.store(false, Ordering::Release);
            if busy.contains(&addr) {
                retry = true;
                continue;
            }
            let reason = match &written {
                // No stop, no verdict on the site: the optimizer tries again.
                Err(TextError::StopFailed { .. }) => {
                    retry = true;
                    continue;
                }
                Err(e) => e.clone(),
                Ok(()) => {
                    let len = site.detour().expect("ready").jump_len;
                    TextError::Unexpected {
                        addr,
                        expected: under[..len].to_vec(),
                        found: memory::read_vec(addr, len).unwrap_or_default(),
                    }
                }
            };
            failed.push((addr, reason));
        }
        for (addr, e) in failed {
            let site = self.sites.get(&addr).expect("ready sites are registered");
            *site.not_optimized.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
        }
        if let Err(e @ TextError::StopFailed { .. }) = written {
            return Err(e.into());
        }
        synced?;
        Ok(retry)
    }

    /// Whether the site at `addr` should get its jump now: armed, not yet optimized,
    /// optimizable (its detour is prepared here, once) and with no other site inside its run.
    fn ready_to_jump(&mut self, addr: u64) -> Result<bool, ProbeError> {
        let Some(site) = self.sites.get(&addr) else { return Ok(false) };
        if !site.armed.load(Ordering::Relaxed) || !self.prepare(addr)? {
            return Ok(false);
        }
        let site = self.sites.get(&addr).expect("prepared above");
        let detour = site.detour().expect("prepared above");
        Ok(self.no_other_site_under(addr, detour))
    }

    /// Whether no other site lies inside the covered run or the island of the site at
    /// `addr`: one there keeps it a breakpoint probe while it exists (its int3 would be
    /// overwritten by the jump, or skipped by the copy).
    fn no_other_site_under(&self, addr: u64, detour: &crate::arch::SiteDetour) -> bool {
        self.sites.range(addr + 1..addr + detour.run.len as u64).next().is_none()
            && detour.island.is_none_or(|island| self.sites.range(island.range(addr)).next().is_none())
    }

    /// Prepares the detour of the site at `addr` unless it has one, is optimized or is
    /// known not to be optimizable; whether it has a detour now. Armed or not: preparing
    /// decodes every function of the module once, which allocates a lot, and the caller
    /// may want that done before its probes (on `malloc`, say) are armed.
    fn prepare(&mut self, addr: u64) -> Result<bool, ProbeError> {
        let Some(site) = self.sites.get(&addr) else { return Ok(false) };
        if !(OPTIMIZATION.load(Ordering::Relaxed) || site.jumps_regardless())
            || site.optimized.load(Ordering::Relaxed)
            || site.not_optimized.lock().unwrap_or_else(|e| e.into_inner()).is_some()
        {
            return Ok(false);
        }
        if site.detour().is_some() {
            return Ok(true);
        }
        let function = site.function.clone();
        let foreign = self.foreign_entries(addr)?;
        let site = self.sites.get(&addr).expect("looked up above");
        // Jump tables are read from the live process: they are data, never patched.
        let read = |at: u64, buf: &mut [u8]| memory::read(at, buf).is_ok();
        let tables = TableMemory { code: foreign.code.clone(), read: &read };
        let landing = |run: &CoveredRun, from: u64| match foreign.entries.range(from..run.addr + run.len as u64).next()
        {
            Some((&to, &branch)) => Err(format!(
                "{} jumps to {to:#x}, inside the bytes the jump would cover",
                self.symbols.as_ref().map_or_else(|| format!("{branch:#x}"), |t| t.format_addr(branch))
            )),
            None => Ok(()),
        };
        let light = PatchSite::all_light(site.probes()) && light::dispatcher(self.symbols.as_ref()).is_ok();
        let prepared = match &function {
            None => Err("no function bounds are known for the probe point (no symbol with a size)".to_string()),
            Some((_, start, size)) => {
                let function = self.original_bytes(*start, *size as usize)?;
                let direct =
                    prepare_detour(site, &function, *start, &tables, None, light, |run| landing(run, run.addr + 1));
                // A function whose first five bytes cannot all be covered may still be
                // entered by a short jump to the padding before it.
                match (direct, self.island_for(&foreign, addr, *start)) {
                    (Err(why), Some(island)) => {
                        prepare_detour(site, &function, *start, &tables, Some(island), light, |run| {
                            // Nothing may land inside the island either (its start is fine:
                            // it goes where the entry goes).
                            landing(run, island.0 + 1)
                        })
                        .map_err(|also| format!("{why}; with a short jump to the padding before it: {also}"))
                    }
                    (direct, _) => direct,
                }
            }
        };
        match prepared {
            Ok(detour) => {
                site.set_detour(detour);
                Ok(true)
            }
            Err(reason) => {
                *site.not_optimized.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                Ok(false)
            }
        }
    }

    /// The island for a site at `addr` when it is its function's entry (`start`): the
    /// padding between the function before and this one, and where in it a `jmp rel32`
    /// fits (see [`island_before`]) — its address and original bytes.
    fn island_for(&self, module: &ModuleBranches, addr: u64, start: u64) -> Option<(u64, [u8; 5])> {
        if addr != start {
            return None;
        }
        let gap_start = *module.ends.range(..=start).next_back()?;
        // Another function (an alias without a size, say) starting in the gap: not padding.
        if gap_start == start || module.starts.range(gap_start..start).next().is_some() {
            return None;
        }
        if start - gap_start > MAX_ISLAND_GAP as u64 {
            return None;
        }
        let gap = self.original_bytes(gap_start, (start - gap_start) as usize).ok()?;
        let island = island_before(&gap, gap_start)?;
        // A site of any kind inside the padding keeps it.
        if self.sites.range(island..start).next().is_some() {
            return None;
        }
        let at = (island - gap_start) as usize;
        Some((island, gap[at..at + JMP_REL32_LEN].try_into().expect("5 bytes")))
    }

    /// The places other code of `addr`'s module jumps to inside some function (target →
    /// branch), gathered once per module by decoding each of its functions.
    fn foreign_entries(&mut self, addr: u64) -> Result<Arc<ModuleBranches>, ProbeError> {
        self.symbols(false)?;
        let table = self.symbols.as_ref().expect("loaded just above");
        let Some(module) = table.module_of(addr).map(|m| (m.path.clone(), m.bias)) else {
            return Ok(Arc::default());
        };
        if let Some(known) = self.foreign.get(&module) {
            return Ok(known.clone());
        }
        let index = table.modules().iter().position(|m| (m.path.clone(), m.bias) == module);
        let mut functions: Vec<(u64, u64)> = table
            .symbols()
            .iter()
            .filter(|s| Some(s.module) == index && s.size > 0)
            .map(|s| (s.addr, s.size))
            .collect();
        functions.sort_unstable();
        functions.dedup();
        let starts: BTreeSet<u64> = functions.iter().map(|f| f.0).collect();
        let functions_ends: BTreeSet<u64> = functions.iter().map(|f| f.0 + f.1).collect();
        // The module's code in one read (a library has thousands of functions), else one
        // read per function when the span has a hole.
        let span = functions.first().map(|f| f.0).zip(functions.iter().map(|f| f.0 + f.1).max());
        let whole =
            span.and_then(|(first, end)| Some((first, self.original_bytes(first, (end - first) as usize).ok()?)));
        let mut entries = BTreeMap::new();
        for (start, size) in functions {
            let bytes = match &whole {
                Some((first, code)) => std::borrow::Cow::Borrowed(&code[(start - first) as usize..][..size as usize]),
                // Code that cannot be read is skipped: its branches are unknown either way.
                None => match self.original_bytes(start, size as usize) {
                    Ok(bytes) => std::borrow::Cow::Owned(bytes),
                    Err(_) => continue,
                },
            };
            // Code that does not decode (data in a text symbol) is skipped likewise.
            let Ok(branches) = branches_out(&bytes, start) else { continue };
            for (from, to) in branches.into_iter().filter(|(_, to)| !starts.contains(to)) {
                entries.entry(to).or_insert(from);
            }
        }
        if let (Some(code), Some(whole)) = (&mut self.code, whole) {
            code.push(whole);
        }
        let code = span.map_or(0..0, |(first, end)| first..end);
        let ends = functions_ends;
        let entries = Arc::new(ModuleBranches { entries, code, starts, ends });
        self.foreign.insert(module, entries.clone());
        Ok(entries)
    }

    /// Puts the int3s back in place of the jumps of the sites at `addrs` that have one,
    /// under one stop of the other threads. Stops at the first failure, leaving the sites
    /// not yet done optimized.
    fn unoptimize_all(&self, addrs: &[u64]) -> Result<(), ProbeError> {
        let optimized: Vec<&PatchSite> = addrs
            .iter()
            .filter_map(|addr| self.sites.get(addr))
            .filter(|site| site.detour().is_some() && site.optimized.load(Ordering::Relaxed))
            .map(|site| &**site)
            .collect();
        if optimized.is_empty() {
            return Ok(());
        }
        // The jump goes, the int3 and the rest of the covered run's bytes come back. A
        // thread cannot be inside a jump; one in the detour finishes in its copy, which
        // jumps past the covered run.
        let restored: Vec<[u8; 5]> =
            optimized.iter().map(|site| bytes_under_jump(site.detour().expect("filtered above"))).collect();
        let mut edits = Edits::new(
            optimized
                .iter()
                .zip(&restored)
                .map(|(site, under)| {
                    let detour = site.detour().expect("filtered above");
                    (site.addr, detour.jump_head(), &under[..detour.jump_len])
                })
                .collect(),
        );
        let ranges = optimized
            .iter()
            .map(|site| site.addr..site.addr + site.detour().expect("filtered above").jump_len as u64)
            .collect();
        let mut stopped = begin(ranges)?;
        let written = stopped.txn.write(&mut edits, |_, _| {});
        let synced = stopped.txn.commit();
        // The sites are walked in address order, as the edits are.
        let mut by_addr = optimized.clone();
        by_addr.sort_by_key(|site| site.addr);
        let mut first_failed = None;
        let mut unjumped = Vec::with_capacity(by_addr.len());
        for ((addr, done), site) in edits.outcomes().zip(by_addr) {
            if done {
                site.optimized.store(false, Ordering::Release);
                unjumped.push(site);
            } else {
                first_failed.get_or_insert(addr);
            }
        }
        // Only now that no entry jumps to them: the islands' padding back.
        let islands = write_islands(&unjumped, Islands::Restore);
        written?;
        synced?;
        islands?;
        if let Some(addr) = first_failed {
            let detour = self.sites[&addr].detour().expect("optimized");
            return Err(TextError::Unexpected {
                addr,
                expected: detour.jump_head().to_vec(),
                found: memory::read_vec(addr, detour.jump_len).unwrap_or_default(),
            }
            .into());
        }
        Ok(())
    }

    /// Unoptimizes any site whose jump covers `addr` past its first byte.
    fn unoptimize_covering(&self, addr: u64) -> Result<(), ProbeError> {
        // The whole covered run counts, not only the jump's 5 bytes: threads run the
        // detour's copy of the rest, so an int3 there would never be reached.
        let covering: Vec<u64> = self
            .sites
            .range(addr.saturating_sub(MAX_COVERED_RUN)..addr)
            .filter(|(_, site)| site.optimized.load(Ordering::Relaxed))
            .filter(|(_, site)| site.detour().is_some_and(|d| d.run.strictly_inside(addr)))
            .map(|(&a, _)| a)
            // A site in the padding an island takes.
            .chain(
                self.sites
                    .range(addr + 1..addr + 1 + MAX_ISLAND_GAP as u64)
                    .filter(|(_, site)| site.optimized.load(Ordering::Relaxed))
                    .filter(|(&a, site)| {
                        site.detour().and_then(|d| d.island).is_some_and(|i| i.range(a).contains(&addr))
                    })
                    .map(|(&a, _)| a),
            )
            .collect();
        self.unoptimize_all(&covering)
    }
}

/// Runs the optimizer's pass now (it otherwise runs in the background shortly after a
/// probe is armed). Returns true when some site should be tried again shortly.
pub(crate) fn optimize_pending() -> Result<bool, ProbeError> {
    lock()?.optimize_all()
}

/// Switches jump optimization on or off for every probe, like the kernel's
/// `debug.kprobes_optimization` sysctl. Off, every optimized probe becomes a breakpoint
/// probe again; on, they are optimized again (in the background; see
/// [`wait_for_optimizer`]).
///
/// ```no_run
/// # extern crate dynprobe_probe as dynprobe;
/// dynprobe::set_optimization(false)?; // every probe traps from now on
/// dynprobe::set_optimization(true)?;
/// dynprobe::wait_for_optimizer()?;    // ... and is optimized again
/// # Ok::<(), dynprobe::ProbeError>(())
/// ```
pub fn set_optimization(on: bool) -> Result<(), ProbeError> {
    let registry = lock()?;
    OPTIMIZATION.store(on, Ordering::Relaxed);
    if on {
        drop(registry);
        optimizer::kick();
        return Ok(());
    }
    // dynprobe's own guards stay jumps: the switch is about the user's probes, and a guard
    // on `syscall()` would otherwise trap on dynprobe's own system calls. So do probes in
    // the C library, which vfork-like children and threads being created run with every
    // signal blocked: a breakpoint there would kill them.
    let addrs: Vec<u64> = registry.sites.iter().filter(|(_, site)| !site.jumps_regardless()).map(|(&a, _)| a).collect();
    registry.unoptimize_all(&addrs)
}

/// Whether jump optimization is on (see [`set_optimization`]).
pub fn optimization_enabled() -> bool {
    OPTIMIZATION.load(Ordering::Relaxed)
}

/// Prepares, now, the jump optimization of every registered probe that can have one —
/// armed or not (a probe registered [`disabled`](crate::Probe::disabled)) — so that a
/// disabled one is armed directly as its jump by
/// [`ProbeHandle::enable_all`](crate::ProbeHandle::enable_all) (never trapping meanwhile),
/// and an armed one only needs [`wait_for_optimizer`] to write its jump.
///
/// Preparing decodes every function of the probed module once, allocating as it goes; done
/// before the probes are armed, none of that work hits them. Code that places probes on
/// functions it calls itself (`malloc`, say) registers them disabled, prepares, and enables them
/// (directly as jumps where they can be): its own calls never trap on a breakpoint.
pub fn prepare_optimization() -> Result<(), ProbeError> {
    let mut registry = lock()?;
    let addrs: Vec<u64> = registry.sites.keys().copied().collect();
    // The code of the modules decoded for this pass is kept for its length only: read
    // afresh at the next, it can never be stale by more than this call.
    registry.code = Some(Vec::new());
    let prepared = addrs.into_iter().try_for_each(|addr| registry.prepare(addr).map(drop));
    registry.code = None;
    prepared
}

/// Optimizes every probe that can be, now, instead of waiting for the background
/// optimizer (the kernel's `wait_for_kprobe_optimizer`). Returns once each armed probe is
/// optimized or known not to be optimizable (see [`ProbeInfo::not_optimized`]).
pub fn wait_for_optimizer() -> Result<(), ProbeError> {
    let deadline = Instant::now() + QUIESCE_TIMEOUT;
    while optimize_pending()? {
        if Instant::now() > deadline {
            return Err(TextError::StopFailed {
                reason: format!("a thread stayed inside a probe's breakpoint slot for {QUIESCE_TIMEOUT:?}"),
            }
            .into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}
