//! One probe's event: what its handlers record at each hit.

use crate::channel::Channel;
use dynprobe::fetch::{gettid, HitContext, SelfMemory};
use dynprobe::line::{EventFormat, Line};
use dynprobe::spec::ProbeSpec;
use dynprobe::{monotonic_ns, InstanceData, Regs};

/// The pre-built state of one probe's handlers: everything is allocated when the probe is
/// registered, so a hit only reads it.
pub struct Event {
    format: EventFormat,
    channel: Channel,
    /// A fetch reads a vector register: the probe saves them at each hit (`hit_xmm`).
    reads_vectors: bool,
}

/// A return probe's data area: the entry time, then the `$argN` values fetched at the entry.
const ENTRY_NS: usize = 0;
const ENTRY_VALUES_AT: usize = 1;

impl Event {
    /// The event of `spec` (its `@SYMBOL`s resolved), sent to `channel`.
    pub fn new(spec: &ProbeSpec, channel: Channel) -> Result<Event, String> {
        Ok(Event { format: EventFormat::new(spec)?, channel, reads_vectors: spec.reads_vectors() })
    }

    /// Whether a fetch reads a vector register (see [`dynprobe::Probe::reads_vectors`]).
    pub fn reads_vectors(&self) -> bool {
        self.reads_vectors
    }

    /// The hit's vector registers, when a fetch reads them.
    fn xmm(&self) -> Option<[u64; 16]> {
        self.reads_vectors.then(dynprobe::hit_xmm).flatten()
    }

    /// An entry probe's pre-handler: formats `<mono_ns> <tid> <event> name=value...` and
    /// sends it. No allocation, no locks: it runs on the probed thread, in a detour or a
    /// `SIGTRAP` handler.
    pub fn hit(&self, regs: &Regs) {
        let mut line = Line::new();
        // The clock the CLI reads at start, so it can print times relative to it.
        let xmm = self.xmm();
        let ctx = HitContext { xmm: xmm.as_ref(), ..HitContext::entry(regs, &SelfMemory, gettid()) };
        self.format.write(&mut line, monotonic_ns(), &ctx);
        self.channel.send(line.finish());
    }

    /// A return probe's entry handler: keeps the entry time and the `$argN`s the spec
    /// prints at the return. Every call is tracked.
    pub fn enter(&self, regs: &Regs, data: &mut InstanceData) -> bool {
        self.format.save_entry(&HitContext::entry(regs, &SelfMemory, 0), &mut data[ENTRY_VALUES_AT..]);
        // Last, so the time spent saving is not part of the call's duration.
        data[ENTRY_NS] = monotonic_ns();
        true
    }

    /// A return probe's return handler: the line, stamped with the return's time.
    pub fn returned(&self, regs: &Regs, data: &InstanceData) {
        let now = monotonic_ns();
        let mut line = Line::new();
        self.format_return(&mut line, now, gettid(), regs, data);
        self.channel.send(line.finish());
    }

    fn format_return(&self, line: &mut Line, now: u64, tid: u64, regs: &Regs, data: &InstanceData) {
        let entry = &data[ENTRY_VALUES_AT..ENTRY_VALUES_AT + self.format.entry_count()];
        let xmm = self.xmm();
        let ctx = HitContext {
            xmm: xmm.as_ref(),
            regs,
            target: &SelfMemory,
            tid,
            retval: Some(regs.retval()),
            entry,
            duration_ns: Some(now.saturating_sub(data[ENTRY_NS])),
        };
        self.format.write(line, now, &ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_hit_is_one_line_with_every_field() {
        let spec = ProbeSpec::parse("p:grp/ev work a=$arg1 b=%rsi:x64 c=$arg3:s32").unwrap();
        let event = Event::new(&spec, Channel::closed()).unwrap();
        let regs = Regs { rdi: 5, rsi: 16, rdx: 0xffff_ffff, ..Regs::default() };
        let mut line = Line::new();
        event.format.write(&mut line, 123456789, &HitContext::entry(&regs, &SelfMemory, 42));
        assert_eq!(line.finish(), b"123456789 42 grp/ev a=5 b=0x10 c=-1\n");
    }

    #[test]
    fn a_return_prints_the_entry_arguments_the_return_value_and_the_duration() {
        let spec = ProbeSpec::parse("r:work ret=$retval:s64 first=$arg2 again=$arg2:x8 t=$duration").unwrap();
        let event = Event::new(&spec, Channel::closed()).unwrap();
        let mut data = InstanceData::default();
        let at_entry = Regs { rdi: 1, rsi: 0x1ff, ..Regs::default() };
        assert!(event.enter(&at_entry, &mut data));
        // `$arg2` is kept once, however often it is printed.
        assert_eq!(data[1..3], [0x1ff, 0]);
        let entered = data[ENTRY_NS];
        assert!(entered > 0);
        let at_return = Regs { rax: -7i64 as u64, rsi: 99, ..Regs::default() };
        let mut line = Line::new();
        event.format_return(&mut line, entered + 1500, 7, &at_return, &data);
        assert_eq!(
            line.finish(),
            format!("{} 7 work__return ret=-7 first=511 again=0xff t=1500\n", entered + 1500).as_bytes()
        );
    }
}
