//! The agent's lines, parsed and printed as text or JSON lines.

use std::io::{self, Write};

/// One line from the agent (see the protocol in the `dynprobe-agent` crate).
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// `!ready <n>`: every probe is placed and `main` runs next.
    Ready(usize),
    /// `!error <spec>: <message>`: the probes were refused and the program did not run.
    Error(&'a str),
    /// One hit.
    Hit(Hit<'a>),
    /// A line this CLI does not understand (an agent of another version?).
    Unknown(&'a str),
}

/// A hit: `<mono_ns> <tid> <event> name=value...`.
#[derive(Debug, PartialEq, Eq)]
pub struct Hit<'a> {
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub ns: u64,
    /// The thread that hit the probe.
    pub tid: u64,
    /// `EVENT` or `GROUP/EVENT`.
    pub event: &'a str,
    /// The fetched values as the agent formatted them.
    pub args: Vec<(&'a str, &'a str)>,
}

impl<'a> Message<'a> {
    /// Parses one line, without its `\n`.
    pub fn parse(line: &'a str) -> Message<'a> {
        if let Some(n) = line.strip_prefix("!ready ") {
            return n.parse().map_or(Message::Unknown(line), Message::Ready);
        }
        if let Some(rest) = line.strip_prefix("!error ") {
            return Message::Error(rest);
        }
        Self::hit(line).map_or(Message::Unknown(line), Message::Hit)
    }

    fn hit(line: &'a str) -> Option<Hit<'a>> {
        let mut words = line.split(' ');
        let ns = words.next()?.parse().ok()?;
        let tid = words.next()?.parse().ok()?;
        let event = words.next()?;
        let args = words.map(|w| w.split_once('=')).collect::<Option<_>>()?;
        Some(Hit { ns, tid, event, args })
    }
}

/// Writes hits as text or JSON lines, with times relative to the start of the run.
pub struct Printer {
    out: Box<dyn Write>,
    json: bool,
    start_ns: u64,
}

impl Printer {
    /// A printer to `out`; `start_ns` is `CLOCK_MONOTONIC` when the program was started.
    pub fn new(out: Box<dyn Write>, json: bool, start_ns: u64) -> Printer {
        Printer { out, json, start_ns }
    }

    /// Writes one hit.
    pub fn hit(&mut self, hit: &Hit) -> io::Result<()> {
        let line = if self.json { json_line(hit, self.start_ns) } else { text_line(hit, self.start_ns) };
        writeln!(self.out, "{line}")
    }

    /// Flushes what was written so far (after each batch read from the pipe, so output
    /// follows the program live).
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Seconds since the start, with microseconds, as `ftrace` prints timestamps.
fn seconds(hit: &Hit, start_ns: u64) -> f64 {
    hit.ns.saturating_sub(start_ns) as f64 / 1e9
}

/// `    0.000123 [4242] checksum: seed=1 n=0x10`.
fn text_line(hit: &Hit, start_ns: u64) -> String {
    let mut line = format!("{:12.6} [{}] {}:", seconds(hit, start_ns), hit.tid, hit.event);
    for (name, value) in &hit.args {
        line.push_str(&format!(" {name}={value}"));
    }
    line
}

/// `{"time":0.000123,"ns":...,"tid":4242,"event":"checksum","args":{"seed":1,"n":"0x10"}}`:
/// decimal values become JSON numbers, hex values strings (as printed, `0x...`). Written
/// by hand to keep the fields, and the arguments, in order.
fn json_line(hit: &Hit, start_ns: u64) -> String {
    let string = |s: &str| serde_json::Value::from(s).to_string();
    let args: Vec<String> = hit
        .args
        .iter()
        .map(|(name, value)| {
            let value = match (value.parse::<u64>(), value.parse::<i64>()) {
                (Ok(v), _) => v.to_string(),
                (_, Ok(v)) => v.to_string(),
                _ => string(value),
            };
            format!("{}:{value}", string(name))
        })
        .collect();
    format!(
        r#"{{"time":{:.6},"ns":{},"tid":{},"event":{},"args":{{{}}}}}"#,
        seconds(hit, start_ns),
        hit.ns,
        hit.tid,
        string(hit.event),
        args.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(Message::parse("!ready 3"), Message::Ready(3));
        assert_eq!(Message::parse("!error p:x: unknown symbol `x`"), Message::Error("p:x: unknown symbol `x`"));
        assert_eq!(
            Message::parse("1500 7 grp/ev a=1 b=0x10"),
            Message::Hit(Hit { ns: 1500, tid: 7, event: "grp/ev", args: vec![("a", "1"), ("b", "0x10")] })
        );
        assert_eq!(Message::parse("1500 7 ev"), Message::Hit(Hit { ns: 1500, tid: 7, event: "ev", args: vec![] }));
        assert_eq!(Message::parse("garbage"), Message::Unknown("garbage"));
        assert_eq!(Message::parse("1 2 ev novalue"), Message::Unknown("1 2 ev novalue"));
    }

    #[test]
    fn text_and_json() {
        let hit = Hit {
            ns: 12_345_678_900,
            tid: 42,
            event: "checksum",
            args: vec![("seed", "1"), ("d", "-5"), ("n", "0x10")],
        };
        assert_eq!(text_line(&hit, 1_000_000_000), "   11.345679 [42] checksum: seed=1 d=-5 n=0x10");
        let json = json_line(&hit, 1_000_000_000);
        assert_eq!(
            json,
            r#"{"time":11.345679,"ns":12345678900,"tid":42,"event":"checksum","args":{"seed":1,"d":-5,"n":"0x10"}}"#
        );
        serde_json::from_str::<serde_json::Value>(&json).unwrap();
    }
}
