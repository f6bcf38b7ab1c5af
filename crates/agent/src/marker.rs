//! An `m:` spec's events: one line per marker hit, from whichever of its sites was reached.

use crate::channel::Channel;
use dynprobe::fetch::{gettid, HitContext, SelfMemory};
use dynprobe::line::{EventFormat, Line};
use dynprobe::marker::{spec_for_site, MarkerHit, MarkerSite};
use dynprobe::monotonic_ns;
use dynprobe::spec::ProbeSpec;

/// The pre-built state of an `m:` spec's handler, one entry per site (sorted by address):
/// built when the probes are placed, only read at a hit.
pub struct MarkerEvent {
    sites: Box<[SiteEvent]>,
    channel: Channel,
}

/// How the hits of one site are written.
struct SiteEvent {
    addr: u64,
    /// `GROUP/EVENT` (or `EVENT`), its `*`s replaced by the site's provider and name.
    name: Box<str>,
    /// The spec's fields compiled for this site; `None` without fields: every argument of
    /// the marker, typed by its record.
    fields: Option<EventFormat>,
}

impl MarkerEvent {
    /// The events of `spec` (its `@SYMBOL`s resolved) at `sites`, sent to `channel`.
    pub fn new(spec: &ProbeSpec, sites: &[MarkerSite], channel: Channel) -> Result<MarkerEvent, String> {
        let mut events = sites
            .iter()
            .map(|site| {
                let spec = spec_for_site(spec, site)?;
                let fields = match spec.args.is_empty() {
                    true => None,
                    false => Some(EventFormat::new(&spec)?),
                };
                Ok(SiteEvent { addr: site.addr, name: spec.full_event_name().into(), fields })
            })
            .collect::<Result<Vec<_>, String>>()?;
        events.sort_by_key(|e| e.addr);
        Ok(MarkerEvent { sites: events.into(), channel })
    }

    /// The handler: `<mono_ns> <tid> <event> arg1=... argN=...` (or the spec's fields).
    /// No allocation, no lock: it runs on the thread at the marker, in the probe's detour.
    pub fn hit(&self, hit: &MarkerHit<'_>) {
        let mut line = Line::new();
        self.write(&mut line, monotonic_ns(), gettid(), hit);
        self.channel.send(line.finish());
    }

    fn write(&self, line: &mut Line, ns: u64, tid: u64, hit: &MarkerHit<'_>) {
        let Ok(at) = self.sites.binary_search_by_key(&hit.site().addr, |s| s.addr) else { return };
        let site = &self.sites[at];
        if let Some(format) = &site.fields {
            return format.write(line, ns, &HitContext::entry(hit.regs(), &SelfMemory, tid));
        }
        line.dec(ns).byte(b' ').dec(tid).byte(b' ').bytes(site.name.as_bytes());
        for (i, value) in hit.args().enumerate() {
            line.bytes(b" arg").dec(i as u64 + 1).byte(b'=');
            value.write_to(line);
        }
    }
}
