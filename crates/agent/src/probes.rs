//! The probes of one `dynprobe probe` run, launched or attached: placing every spec (or
//! none), keeping those whose library is not loaded yet until a `dlopen` brings it, taking
//! back those whose library a `dlclose` unloaded (to wait for it again), and removing them
//! all.

use crate::channel::Channel;
use crate::dlopen::{self, ModuleWatch};
use crate::place::{place, Placed};
use dynprobe::spec::{ProbeSpec, Target};
use dynprobe::{Location, ProbeHandle};
use dynprobe_ftrace::filter::glob_match;
use std::sync::{Arc, Mutex};

/// Placed probes, and the specs waiting for their module.
pub struct ProbeSet {
    /// Each with its spec (one of a module glob's: its own module, the glob's text).
    placed: Vec<(ProbeSpec, Placed)>,
    pending: Vec<ProbeSpec>,
    /// `!warning` lines about how specs were read (what a module glob matched).
    notes: Vec<String>,
    /// The specs taken back once when their module was unloaded: a library loaded and
    /// unloaded over and over is said to be followed once, not at every turn.
    followed: Vec<String>,
    /// Where hits go.
    channel: Channel,
}

/// How the CLI is told about probes placed (or refused) after the start: one status line
/// without its newline, `!placed <spec>` or `!error <spec>: <why>`.
pub type Report = Box<dyn Fn(&str) + Send + Sync>;

impl ProbeSet {
    /// Places every spec, hits going to `channel`; a spec naming a library that is not
    /// loaded yet waits for it. On the first refusal every probe placed so far is removed
    /// and the error is `<spec>: <why>` (one line).
    pub fn place_all<'s>(specs: impl IntoIterator<Item = &'s str>, channel: Channel) -> Result<ProbeSet, String> {
        let mut set = ProbeSet::place_disarmed(specs, channel)?;
        set.arm_all()?;
        Ok(set)
    }

    /// [`Self::place_all`]'s first half: every spec placed (its symbols looked up, its
    /// probes registered) but none armed yet — nothing of the program's code is patched
    /// until [`Self::arm_all`]. An attach session looks, in between, whether its CLI is
    /// still there.
    pub fn place_disarmed<'s>(specs: impl IntoIterator<Item = &'s str>, channel: Channel) -> Result<ProbeSet, String> {
        let mut set = ProbeSet::empty(channel);
        for text in specs.into_iter().map(str::trim).filter(|l| !l.is_empty()) {
            let expanded = ProbeSpec::parse(text).map_err(|e| e.to_string()).and_then(|spec| {
                let Some((specs, matched)) = expand_module_glob(&spec)? else { return Ok(vec![spec]) };
                set.notes.push(format!("!warning {text}: the module glob matched {matched}"));
                Ok(specs)
            });
            let specs = match expanded {
                Ok(specs) => specs,
                Err(why) => return Err(set.refuse(text, &why)),
            };
            for spec in specs {
                if module_missing(&spec) {
                    set.pending.push(spec);
                    continue;
                }
                match place(&spec, channel) {
                    Ok(placed) => {
                        set.notes.extend(placement_notes(text, &placed));
                        set.placed.push((spec, placed))
                    }
                    Err(why) => return Err(set.refuse(text, &why)),
                }
            }
        }
        Ok(set)
    }

    /// No probe yet, hits going to `channel`.
    fn empty(channel: Channel) -> ProbeSet {
        ProbeSet { placed: Vec::new(), pending: Vec::new(), notes: Vec::new(), followed: Vec::new(), channel }
    }

    /// [`Self::place_all`]'s second half: arms the probes [`Self::place_disarmed`] placed.
    /// On a refusal every probe is removed and the error is `<spec>: <why>` (one line).
    pub fn arm_all(&mut self) -> Result<(), String> {
        arm(&self.placed).map_err(|(spec, why)| self.refuse(&spec, &why))
    }

    /// Removes every probe and words the refusal of `spec`: `<spec>: <why>`, one line.
    fn refuse(&mut self, spec: &str, why: &str) -> String {
        // Best effort: an error here means a byte could not be restored, and the refusal
        // is what the user must hear about.
        let _ = self.remove_all();
        format!("{spec}: {}", why.replace('\n', " "))
    }

    /// How many probes are placed.
    pub fn placed(&self) -> usize {
        self.placed.len()
    }

    /// What to tell before `!ready` (lines without their newline): the notes on how specs
    /// were read (`!warning`), then one `!pending <spec>: <why>` per waiting spec.
    pub fn pending_lines(&self) -> Vec<String> {
        let pending = self.pending.iter().map(|spec| {
            format!("!pending {}: module {} is not loaded yet", spec.text, spec_module(spec).unwrap_or("?"))
        });
        self.notes.iter().cloned().chain(pending).collect()
    }

    /// Places what it can of `specs` (an image a probed program `exec`'d): each spec on
    /// its own, one naming a library not loaded yet waits for it, and one refused is
    /// handed to `refused` with why and left out, the others staying placed.
    pub fn place_each<'s>(
        specs: impl IntoIterator<Item = &'s str>,
        channel: Channel,
        refused: &dyn Fn(&str, &str),
    ) -> ProbeSet {
        let mut set = ProbeSet::empty(channel);
        for text in specs.into_iter().map(str::trim).filter(|l| !l.is_empty()) {
            // The CLI parsed every spec before it started the first image.
            match ProbeSpec::parse(text) {
                Ok(spec) => set.pending.push(spec),
                Err(e) => refused(text, &e.to_string()),
            }
        }
        set.place_loaded(&|_| {}, refused);
        set
    }

    /// After a `dlopen` or a `dlclose`: the probes whose library was unloaded go back to
    /// waiting for it, then the waiting specs whose module is loaded now are placed, telling
    /// `report` about each.
    fn follow_modules(&mut self, report: &Report) {
        self.take_back_unloaded(report);
        let followed = std::mem::take(&mut self.followed);
        self.place_loaded(
            &|spec| {
                if !followed.iter().any(|f| f == spec) {
                    report(&format!("!placed {spec}"))
                }
            },
            &|spec, why| report(&format!("!error {spec}: {}", why.replace('\n', " "))),
        );
        self.followed = followed;
    }

    /// Takes back the probes whose module is not loaded any more (a `dlclose`): their code
    /// is gone with it, so removing them writes nothing (see `dynprobe`'s unregistering of
    /// unloaded code), and their specs wait for the module to be loaded again, as the
    /// kernel's uprobes, bound to the file rather than the memory, come back with it.
    fn take_back_unloaded(&mut self, report: &Report) {
        let mut kept = Vec::with_capacity(self.placed.len());
        for (spec, mut placed) in std::mem::take(&mut self.placed) {
            if !module_missing(&spec) {
                kept.push((spec, placed));
                continue;
            }
            let at = placed.location();
            match placed.unregister() {
                Ok(()) => {
                    if !self.followed.contains(&spec.text) {
                        report(&format!(
                            "!warning {}: its library {} was unloaded: the probe waits for it to be loaded \
                             again (and follows it through every later unload and load, unsaid)",
                            spec.text,
                            spec_module(&spec).unwrap_or("?")
                        ));
                        self.followed.push(spec.text.clone());
                    }
                    self.pending.push(spec);
                }
                Err(why) => {
                    report(&format!("!warning {}: its library was unloaded, and at {at}: {}", spec.text, why));
                    if placed.is_registered() {
                        kept.push((spec, placed));
                    }
                }
            }
        }
        self.placed = kept;
    }

    /// Places the waiting specs whose module is loaded, each on its own: `placed` or
    /// `refused` (with why) is called with each spec's text.
    fn place_loaded(&mut self, placed: &dyn Fn(&str), refused: &dyn Fn(&str, &str)) {
        let (ready, waiting): (Vec<ProbeSpec>, Vec<ProbeSpec>) =
            std::mem::take(&mut self.pending).into_iter().partition(|spec| !module_missing(spec));
        self.pending = waiting;
        if ready.is_empty() {
            return;
        }
        for spec in ready {
            let done = place(&spec, self.channel).and_then(|done| {
                let done = [(spec.clone(), done)];
                arm(&done).map_err(|(_, why)| why)?;
                let [done] = done;
                Ok(done)
            });
            match done {
                Ok(done) => {
                    self.placed.push(done);
                    placed(&spec.text);
                }
                Err(why) => refused(&spec.text, &why),
            }
        }
        // Still inside `dlopen`'s return: the program's first call into the library comes
        // after this, and finds a jump.
        let _ = dynprobe::wait_for_optimizer();
    }

    /// Unregisters every placed probe, restoring its bytes, and forgets the waiting ones;
    /// the problems, if some probe could not be removed, each naming the spec and where
    /// its probe is: `` `<spec>` at <symbol+offset> (<address>): <why> ``. A probe that
    /// could not be removed stays registered, and armed, as it was, and stays in the set:
    /// calling this again retries it.
    pub fn remove_all(&mut self) -> Vec<String> {
        self.pending.clear();
        let mut problems = Vec::new();
        self.placed.retain_mut(|(spec, placed)| {
            let at = placed.location();
            let Err(why) = placed.unregister() else { return false };
            problems.push(format!("`{}` at {at}: {}", spec.text, why.replace('\n', " ")));
            placed.is_registered()
        });
        problems
    }

    /// Watches `dlopen` and `dlclose` when a spec names a module — waiting for it, or placed
    /// in it — so that each waiting spec is placed before the `dlopen` that loads its module
    /// returns, and each probe whose module a `dlclose` unloads is taken back before that
    /// `dlclose` returns, to wait for it again; `None` when no spec names a module. `Err` if
    /// the watch cannot start (the waiting specs then never fire).
    pub fn watch_pending(set: &Arc<Mutex<ProbeSet>>, report: Report) -> Result<Option<ModuleWatch>, String> {
        let names_a_module = {
            let set = set.lock().unwrap_or_else(|e| e.into_inner());
            !set.pending.is_empty() || set.placed.iter().any(|(spec, _)| spec_module(spec).is_some())
        };
        if !names_a_module {
            return Ok(None);
        }
        let shared = Arc::clone(set);
        let on_change = move || shared.lock().unwrap_or_else(|e| e.into_inner()).follow_modules(&report);
        dlopen::watch(on_change).map(Some)
    }
}

/// Arms probes [`place`] registered disarmed, their jump optimization prepared first: the
/// agent's own calls (its symbol tables, the optimizer decoding a whole library) must not
/// trap on them, and a probe on `malloc` would make that thousands of traps. Then they are
/// enabled in one batch, those that can be jump-optimized directly as jumps (one patching
/// transaction, no breakpoint phase: the program never traps on them), the others as
/// breakpoints. On an error, the spec that failed and why.
fn arm(placed: &[(ProbeSpec, Placed)]) -> Result<(), (String, String)> {
    // Without the preparation the probes still work, as breakpoints: not a reason to
    // refuse them.
    let _ = dynprobe::prepare_optimization();
    let entries: Vec<&ProbeHandle> = placed.iter().filter_map(|(_, placed)| placed.entry_probe()).collect();
    ProbeHandle::enable_each(&entries).map_err(|e| {
        // The probes that could not be armed stay disabled: name the first.
        let failed = placed.iter().find(|(_, placed)| placed.entry_probe().is_some_and(|p| !p.is_enabled()));
        (failed.map_or_else(String::new, |(spec, _)| spec.text.clone()), e.to_string())
    })
}

/// The module part of the spec's location (`libfoo` of `libfoo:f+8`; none in `ns::f`).
fn spec_module(spec: &ProbeSpec) -> Option<&str> {
    match spec.location.code()? {
        Location::Symbol(name) | Location::SymbolOffset(name, _) => dynprobe_symbols::split_module(name).0,
        Location::Address(_) => None,
    }
}

/// A spec whose module part is a glob (`p:*:malloc`, `p:libz*:inflate`) stands for the same
/// spec on each loaded module the glob matches (by file name, as `-F 'module:glob'` does)
/// that defines the symbol: those specs, and the matched modules' names to tell the user.
/// `None` for a spec without a module glob. A glob matches only what is loaded now: one
/// that matches no module defining the symbol is refused, naming the loaded modules,
/// rather than waiting for a library literally named `*`.
fn expand_module_glob(spec: &ProbeSpec) -> Result<Option<(Vec<ProbeSpec>, String)>, String> {
    let Some(glob) = spec_module(spec).filter(|m| m.contains(['*', '?'])) else { return Ok(None) };
    let (symbol, offset) = match spec.location.code() {
        Some(Location::Symbol(name)) => (dynprobe_symbols::split_module(name).1, None),
        Some(Location::SymbolOffset(name, offset)) => (dynprobe_symbols::split_module(name).1, Some(*offset)),
        _ => return Ok(None),
    };
    let table = dynprobe_symbols::SymbolTable::current_process().map_err(|e| e.to_string())?;
    let mut specs = Vec::new();
    let mut matched = Vec::new();
    for module in table.modules().iter().filter(|m| glob_match(glob.as_bytes(), m.name.as_bytes())) {
        let name = format!("{}:{symbol}", module.name);
        if table.lookup(&name).is_err() || matched.contains(&module.name) {
            continue;
        }
        let mut one = spec.clone();
        one.location = Target::Code(match offset {
            None => Location::Symbol(name),
            Some(offset) => Location::SymbolOffset(name, offset),
        });
        specs.push(one);
        matched.push(module.name.clone());
    }
    if specs.is_empty() {
        let loaded: Vec<&str> = table.modules().iter().map(|m| m.name.as_str()).collect();
        return Err(format!(
            "no loaded module matching `{glob}` defines `{symbol}` (a module glob matches the modules \
             loaded now: {}); name the library to wait for one loaded later",
            loaded.join(", ")
        ));
    }
    Ok(Some((specs, matched.join(", "))))
}

/// Whether the spec names a module that is not loaded (yet). Read from the memory map, not
/// a symbol table: placing builds the one it needs, and building two costs tens of
/// milliseconds of an attach.
fn module_missing(spec: &ProbeSpec) -> bool {
    spec_module(spec).is_some_and(|module| matches!(dynprobe_symbols::module_loaded(module), Ok(false)))
}

/// The `!warning`s about where a probe went that the user would not guess from its spec:
/// an indirect function whose implementation others share (glibc's `memcpy` with
/// `memmove`: their calls are its events too), and a marker whose gating semaphores were
/// raised too (`MarkerGate`: the program takes a slower path while it is attached).
fn placement_notes(text: &str, placed: &Placed) -> Vec<String> {
    let mut notes = Vec::new();
    let at = placed.location();
    if at.contains(" (shared with ") {
        notes.push(format!(
            "!warning {text}: placed at {at}: the calls of the functions it is shared with are its events too"
        ));
    }
    if let Placed::Marker(handle) = placed {
        let gates = handle.gates();
        if !gates.is_empty() {
            notes.push(format!(
                "!warning {text}: also raised the semaphore of {}: the program reaches this marker only on the path \
                 that one enables (CPython 3.11 runs function__entry/__return only on its tracing path), so it runs \
                 slower while attached",
                gates.join(", ")
            ));
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The function the test probes (an entry and a return probe, one site): long enough
    /// to be jump-optimized.
    #[no_mangle]
    #[inline(never)]
    extern "C" fn dynprobe_agent_test_armed(seed: u64) -> u64 {
        let mut h = std::hint::black_box(seed);
        for i in 0..std::hint::black_box(8) {
            h = h.wrapping_mul(33).wrapping_add(i);
        }
        h
    }

    /// `dynprobe probe` has no breakpoint phase: the probes it places that can be jumps are
    /// jumps as soon as they are armed, before any optimizer pass — no call of the program
    /// (a thread that blocks `SIGTRAP` behind dynprobe's back, a `posix_spawn` child) ever
    /// meets an `int3` there.
    #[test]
    fn placed_probes_are_armed_directly_as_jumps() {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 stores.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) }, 0);
        let channel = Channel::new(fds[1]).unwrap();
        // The background optimizer must not be what makes them jumps.
        dynprobe::stop_optimizer();
        let specs = ["p:dynprobe_agent_test_armed seed=$arg1", "r:dynprobe_agent_test_armed ret=$retval"];
        let mut set = ProbeSet::place_all(specs, channel).unwrap();
        assert_eq!(set.placed(), 2);
        for (spec, placed) in &set.placed {
            let text = &spec.text;
            let info = placed.entry_probe().unwrap().info();
            assert!(info.optimized, "`{text}` is not a jump once armed: {:?}", info.not_optimized);
            // SAFETY: the probed address is the start of a function of this test binary.
            let first = unsafe { std::ptr::read_volatile(info.addr as *const u8) };
            assert_eq!(first, 0xe9, "`{text}` begins with {first:#04x}, not its jump");
        }
        assert_eq!(dynprobe_agent_test_armed(1), dynprobe_agent_test_armed(1));
        assert!(set.remove_all().is_empty());
        // SAFETY: closes the two descriptors made above.
        unsafe { (libc::close(fds[0]), libc::close(fds[1])) };
    }
}
