//! One probe's event: what its handler records at each hit.

use crate::channel::Channel;
use crate::fetch::fetch;
use crate::line::Line;
use dynprobe::spec::{FetchArg, ProbeSpec};
use dynprobe::Regs;

/// The pre-built state of one probe's handler: everything is allocated when the probe is
/// registered, so a hit only reads it.
pub struct Event {
    name: Box<str>,
    args: Box<[FetchArg]>,
    channel: Channel,
}

impl Event {
    /// The event of `spec`, sent to `channel`.
    pub fn new(spec: &ProbeSpec, channel: Channel) -> Event {
        Event { name: spec.full_event_name().into(), args: spec.args.clone().into(), channel }
    }

    /// The probe's pre-handler: formats `<mono_ns> <tid> <event> name=value...` and sends it.
    /// No allocation, no locks: it runs on the probed thread, in a detour or a `SIGTRAP` handler.
    pub fn hit(&self, regs: &Regs) {
        let mut line = Line::new();
        // The clock the CLI reads at start, so it can print times relative to it.
        self.format(&mut line, dynprobe::monotonic_ns(), gettid(), regs);
        self.channel.send(line.finish());
    }

    /// The line of a hit at `ns` by thread `tid`.
    fn format(&self, line: &mut Line, ns: u64, tid: u64, regs: &Regs) {
        line.dec(ns).byte(b' ').dec(tid).byte(b' ').bytes(self.name.as_bytes());
        for arg in self.args.iter() {
            line.byte(b' ').bytes(arg.name.as_bytes()).byte(b'=');
            line.value(arg.ty, fetch(arg.fetch, regs));
        }
    }
}

/// The calling thread's id (the `gettid` system call is async-signal-safe).
fn gettid() -> u64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hit_is_one_line_with_every_field() {
        let spec = ProbeSpec::parse("p:grp/ev work a=$arg1 b=%rsi:x64 c=$arg3:s32").unwrap();
        let event = Event::new(&spec, Channel::closed());
        let regs = Regs { rdi: 5, rsi: 16, rdx: 0xffff_ffff, ..Regs::default() };
        let mut line = Line::new();
        event.format(&mut line, 123456789, 42, &regs);
        assert_eq!(line.finish(), b"123456789 42 grp/ev a=5 b=0x10 c=-1\n");
    }
}
