//! The probes of one `dynprobe probe` run, launched or attached: placing every spec (or
//! none), keeping those whose library is not loaded yet until a `dlopen` brings it, and
//! removing them all.

use crate::channel::Channel;
use crate::dlopen::{self, ModuleWatch};
use crate::place::{place, Placed};
use dynprobe::spec::ProbeSpec;
use dynprobe::Location;
use std::sync::{Arc, Mutex};

/// Placed probes, and the specs waiting for their module.
pub struct ProbeSet {
    /// Each with the text of its spec.
    placed: Vec<(String, Placed)>,
    pending: Vec<ProbeSpec>,
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
        let mut set = ProbeSet { placed: Vec::new(), pending: Vec::new(), channel };
        for text in specs.into_iter().map(str::trim).filter(|l| !l.is_empty()) {
            let placed = ProbeSpec::parse(text).map_err(|e| e.to_string()).and_then(|spec| {
                if module_missing(&spec) {
                    set.pending.push(spec);
                    return Ok(None);
                }
                place(&spec, channel).map(Some)
            });
            match placed {
                Ok(Some(placed)) => set.placed.push((text.to_string(), placed)),
                Ok(None) => {}
                Err(why) => return Err(set.refuse(text, &why)),
            }
        }
        if let Err((spec, why)) = arm(&set.placed) {
            return Err(set.refuse(&spec, &why));
        }
        Ok(set)
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

    /// One `!pending <spec>: <why>` line (without its newline) per waiting spec.
    pub fn pending_lines(&self) -> Vec<String> {
        self.pending
            .iter()
            .map(|spec| {
                format!("!pending {}: module {} is not loaded yet", spec.text, spec_module(spec).unwrap_or("?"))
            })
            .collect()
    }

    /// Places the waiting specs whose module is loaded now, telling `report` about each.
    fn place_pending(&mut self, report: &Report) {
        let (ready, waiting): (Vec<ProbeSpec>, Vec<ProbeSpec>) =
            std::mem::take(&mut self.pending).into_iter().partition(|spec| !module_missing(spec));
        self.pending = waiting;
        if ready.is_empty() {
            return;
        }
        for spec in ready {
            let placed = place(&spec, self.channel).and_then(|placed| {
                let placed = [(spec.text.clone(), placed)];
                arm(&placed).map_err(|(_, why)| why)?;
                let [placed] = placed;
                Ok(placed)
            });
            match placed {
                Ok(placed) => {
                    self.placed.push(placed);
                    report(&format!("!placed {}", spec.text));
                }
                Err(why) => report(&format!("!error {}: {}", spec.text, why.replace('\n', " "))),
            }
        }
        // Still inside `dlopen`'s return: the program's first call into the library comes
        // after this, and finds a jump.
        let _ = dynprobe::wait_for_optimizer();
    }

    /// Unregisters every placed probe, restoring its bytes, and forgets the waiting ones;
    /// the problems, if some probe could not be removed, each naming the spec and where
    /// its probe is: `` `<spec>` at <symbol+offset> (<address>): <why> ``. A probe that
    /// could not be removed stays registered, and armed, as it was.
    pub fn remove_all(&mut self) -> Vec<String> {
        self.pending.clear();
        self.placed
            .drain(..)
            .filter_map(|(text, placed)| {
                let at = placed.location();
                placed.unregister().err().map(|why| format!("`{text}` at {at}: {}", why.replace('\n', " ")))
            })
            .collect()
    }

    /// Watches `dlopen` when specs wait for their module, so each is placed before the
    /// `dlopen` that loads it returns; `None` when nothing waits. `Err` if the watch
    /// cannot start (the waiting specs then never fire).
    pub fn watch_pending(set: &Arc<Mutex<ProbeSet>>, report: Report) -> Result<Option<ModuleWatch>, String> {
        if set.lock().unwrap_or_else(|e| e.into_inner()).pending.is_empty() {
            return Ok(None);
        }
        let shared = Arc::clone(set);
        let on_load = move || shared.lock().unwrap_or_else(|e| e.into_inner()).place_pending(&report);
        dlopen::watch(on_load).map(Some)
    }
}

/// Arms probes [`place`] registered disarmed, their jump optimization prepared first: the
/// agent's own calls (its symbol tables, the optimizer decoding a whole library) must not
/// trap on them, and a probe on `malloc` would make that thousands of traps. On an error,
/// the spec that failed and why.
fn arm(placed: &[(String, Placed)]) -> Result<(), (String, String)> {
    // Without the preparation the probes still work, as breakpoints until the optimizer's
    // pass: not a reason to refuse them.
    let _ = dynprobe::prepare_optimization();
    placed.iter().try_for_each(|(text, placed)| placed.enable().map_err(|why| (text.clone(), why)))
}

/// The module part of the spec's location (`libfoo` of `libfoo:f+8`; none in `ns::f`).
fn spec_module(spec: &ProbeSpec) -> Option<&str> {
    match spec.location.code()? {
        Location::Symbol(name) | Location::SymbolOffset(name, _) => dynprobe_symbols::split_module(name).0,
        Location::Address(_) => None,
    }
}

/// Whether the spec names a module that is not loaded (yet). Read from the memory map, not
/// a symbol table: placing builds the one it needs, and building two costs tens of
/// milliseconds of an attach.
fn module_missing(spec: &ProbeSpec) -> bool {
    spec_module(spec).is_some_and(|module| matches!(dynprobe_symbols::module_loaded(module), Ok(false)))
}
