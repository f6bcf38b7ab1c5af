//! Marker hits: an `m:` spec's event lines ([`MarkerEvent`], `dynprobe probe`), and the
//! records of `dynprobe record -M` ([`RecordedMarkers`]).

use crate::channel::Channel;
use dynprobe::fetch::{gettid, HitContext, SelfMemory};
use dynprobe::line::{EventFormat, Line};
use dynprobe::marker::{spec_for_site, ArgValue, MarkerHit, MarkerSite};
use dynprobe::spec::ProbeSpec;
use dynprobe::{monotonic_ns, Marker, MarkerHandle};
use dynprobe_events::marker::MarkerRecords;
use dynprobe_ftrace::Tracer;
use std::fmt::Write as _;

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
            let ctx = HitContext { xmm: hit.xmm(), ..HitContext::entry(hit.regs(), &SelfMemory, tid) };
            return format.write(line, ns, &ctx);
        }
        line.dec(ns).byte(b' ').dec(tid).byte(b' ').bytes(site.name.as_bytes());
        for (i, value) in hit.args().enumerate() {
            line.bytes(b" arg").dec(i as u64 + 1).byte(b'=');
            value.write_to(line);
        }
    }
}

/// The marker sites `dynprobe record -M` records, in id order (the `.markers` file's).
#[derive(Default)]
pub struct RecordedMarkers {
    sites: Vec<MarkerSite>,
}

impl RecordedMarkers {
    /// The sites of every `provider:name` pattern (one a line of `patterns`), each once.
    /// An unknown marker is an error naming the nearest ones.
    pub fn find(patterns: &str) -> Result<RecordedMarkers, String> {
        let mut sites: Vec<MarkerSite> = Vec::new();
        for pattern in patterns.lines().map(str::trim).filter(|p| !p.is_empty()) {
            let found = Marker::find(pattern).map_err(|e| format!("-M {pattern}: {e}"))?;
            for site in found {
                if !sites.iter().any(|s| s.addr == site.addr) {
                    sites.push(site);
                }
            }
        }
        sites.sort_by_key(|s| s.addr);
        Ok(RecordedMarkers { sites })
    }

    /// Whether no site was asked for.
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// The `.markers` lines: `id \t address (hex) \t provider \t name`.
    pub fn list(&self) -> String {
        let mut out = String::new();
        for (id, site) in self.sites.iter().enumerate() {
            let _ = writeln!(out, "{id}\t{:x}\t{}\t{}", site.addr, site.provider, site.name);
        }
        out
    }

    /// Attaches the recording handler to every site, until the handle is detached (or
    /// forgotten, for the rest of the process's life): each hit goes into its thread's
    /// ring, beside its calls (see [`record_hit`]).
    pub fn attach(self) -> Result<MarkerHandle, String> {
        let addrs: Box<[u64]> = self.sites.iter().map(|s| s.addr).collect();
        Marker::attach_sites(self.sites, move |hit| record_hit(&addrs, hit)).map_err(|e| e.to_string())
    }
}

/// A marker hit into the thread's ring: a `Marker` record with the site's id (its index in
/// `addrs`) and the call depth, and the arguments in the data records after it. No
/// allocation, no lock: it runs in the marker's probe detour.
fn record_hit(addrs: &[u64], hit: &MarkerHit<'_>) {
    let Ok(site) = addrs.binary_search(&hit.site().addr) else { return };
    // Used in place: moving the position out of its `Option` is a 16-byte vector copy.
    let position = Tracer::event_position();
    let Some(at) = &position else { return };
    let mut records = MarkerRecords::new();
    for value in hit.args() {
        encode_arg(&mut records, &value);
    }
    Tracer::push_event(at, records.finish(at.time, at.depth, site as u32));
}

/// One argument into a hit's records. Apart, so that its light proof (no vector register,
/// as a light detour requires: see `dynprobe_probe::light_verdict`) is checked by a test.
#[inline(never)]
fn encode_arg(records: &mut MarkerRecords, value: &ArgValue<'_>) {
    match *value {
        ArgValue::Unsigned(v) => records.unsigned(v),
        ArgValue::Signed(v) => records.signed(v),
        ArgValue::Bool(v) => records.bool(v),
        ArgValue::Char(c) => match c {
            Some(c) => records.char(u32::from(c)),
            None => records.unavailable(),
        },
        ArgValue::Pointer(p) => records.pointer(p),
        ArgValue::Str(s) => records.string(s.as_bytes()),
        ArgValue::Bytes(b) | ArgValue::CStr(b) => records.string(b),
        ArgValue::Float { bits, raw } => records.float(bits, raw),
        ArgValue::Unavailable => records.unavailable(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hit of every kind of argument encoded and finished, as [`record_hit`] does.
    #[inline(never)]
    fn encode_every_kind(bytes: &[u8], v: u64) -> usize {
        let mut records = MarkerRecords::new();
        for value in [
            ArgValue::Unsigned(v),
            ArgValue::Signed(v as i64),
            ArgValue::Bool(v != 0),
            ArgValue::Char(char::from_u32(v as u32)),
            ArgValue::Pointer(v),
            ArgValue::Bytes(bytes),
            ArgValue::Float { bits: 64, raw: v },
            ArgValue::Unavailable,
        ] {
            encode_arg(&mut records, &value);
        }
        records.finish(v, 1, 2).len()
    }

    /// `record -M`'s marker writer runs in the marker's detour: it must stay light (no
    /// vector register, no call of the C library's vector routines), or every marker site
    /// recorded pays the full vector save. Fails with the instruction that made it heavy.
    #[test]
    fn the_marker_record_writer_is_light() {
        // 49 data bytes: four data records after the marker record.
        assert_eq!(encode_every_kind(b"abc", 7), 5);
        let gate = encode_every_kind as fn(&[u8], u64) -> usize;
        dynprobe_probe::function_light_verdict(gate as *const () as u64).unwrap();
        // The whole handler: the site's lookup, the arguments read from the registers and
        // memory, the ring's position and push.
        let handler = record_hit as fn(&[u64], &MarkerHit<'_>);
        dynprobe_probe::function_light_verdict(handler as *const () as u64).unwrap();
    }
}
