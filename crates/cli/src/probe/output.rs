//! The agent's lines, parsed and printed as text or JSON lines.
//!
//! The protocol is the one of `dynprobe::line` (and of the `dynprobe-agent` crate):
//! control lines start with `!`; an event is `<mono_ns> <tid> <event> name=value...` where a
//! value is an integer (`5`, `-5`, `0x10`), a double-quoted string with `\"`, `\\`, `\n`,
//! `\t` and `\xNN` escapes (it may contain spaces), or `(fault)`.
//!
//! Text output shows the values as the agent wrote them. JSON output turns decimal values
//! into JSON numbers, keeps hex values as the strings `"0x..."` (exact for any 64-bit value,
//! and the type the user chose shows), decodes quoted strings into JSON strings (bytes that
//! are not UTF-8 become U+FFFD), and writes a fetch that faulted as `null`.

use std::io::{self, Write};

/// One line from the agent (see the protocol in the `dynprobe-agent` crate).
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// `!ready <n>`: every probe is placed and `main` runs next.
    Ready(usize),
    /// `!error <spec>: <message>`: the probes were refused and the program did not run.
    Error(&'a str),
    /// `!pending <spec>: <why>`: a probe is placed later, when its module loads (the text
    /// after `!pending `).
    Pending(&'a str),
    /// `!lost <n>`: n events were dropped so far (a full channel).
    Lost(u64),
    /// `!placed <spec>`: a pending probe was placed, its module loaded.
    Placed(&'a str),
    /// `!warning <text>`.
    Warning(&'a str),
    /// `!exited <status>` or `!killed <signal>`: the ptrace tracer's program ended (its
    /// status is the tracer's exit status).
    Ended(&'a str),
    /// `!detached <lost>[ <problem>]`: an attach session removed every probe (or says
    /// what it could not remove).
    Detached {
        /// Events dropped over the whole session.
        lost: u64,
        /// What went wrong while removing the probes, if anything.
        problem: &'a str,
    },
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
    /// The fetched values as the agent formatted them (a string with its quotes and
    /// escapes); [`Value::parse`] decodes one.
    pub args: Vec<(&'a str, &'a str)>,
}

impl<'a> Message<'a> {
    /// What to tell the user on stderr about a message that only informs (a probe
    /// waiting for its library, placed later, a warning); `None` for the others.
    pub fn note(&self) -> Option<String> {
        match self {
            Message::Pending(pending) => Some(format!("probe {pending}: it is placed when that library is loaded")),
            Message::Placed(spec) => Some(format!("probe `{spec}` placed: its library was loaded")),
            Message::Warning(text) => Some(format!("warning: {text}")),
            _ => None,
        }
    }

    /// Parses one line, without its `\n`.
    pub fn parse(line: &'a str) -> Message<'a> {
        if let Some(n) = line.strip_prefix("!ready ") {
            return n.parse().map_or(Message::Unknown(line), Message::Ready);
        }
        if let Some(rest) = line.strip_prefix("!error ") {
            return Message::Error(rest);
        }
        if let Some(rest) = line.strip_prefix("!pending ") {
            return Message::Pending(rest);
        }
        if let Some(n) = line.strip_prefix("!lost ") {
            return n.parse().map_or(Message::Unknown(line), Message::Lost);
        }
        if let Some(rest) = line.strip_prefix("!placed ") {
            return Message::Placed(rest);
        }
        if let Some(rest) = line.strip_prefix("!warning ") {
            return Message::Warning(rest);
        }
        if let Some(rest) = line.strip_prefix("!detached ") {
            // The agent's `!detached <lost>[ <problem>]`, or the ptrace tracer's
            // `!detached <why>` when the program exec'd and the probes were gone with it.
            let (lost, problem) = rest.split_once(' ').unwrap_or((rest, ""));
            return match lost.parse() {
                Ok(lost) => Message::Detached { lost, problem },
                Err(_) => Message::Detached { lost: 0, problem: rest },
            };
        }
        if line.starts_with("!exited ") || line.starts_with("!killed ") {
            return Message::Ended(&line[1..]);
        }
        Self::hit(line).map_or(Message::Unknown(line), Message::Hit)
    }

    fn hit(line: &'a str) -> Option<Hit<'a>> {
        let mut rest = line;
        let mut word = || -> Option<&'a str> {
            let (word, after) = rest.split_once(' ').unwrap_or((rest, ""));
            rest = after;
            Some(word).filter(|w| !w.is_empty())
        };
        let ns = word()?.parse().ok()?;
        let tid = word()?.parse().ok()?;
        let event = word()?;
        let mut args = Vec::new();
        while !rest.is_empty() {
            let (name, after) = rest.split_once('=')?;
            if name.is_empty() || name.contains([' ', '"']) {
                return None;
            }
            let len = value_len(after)?;
            args.push((name, &after[..len]));
            rest = match &after[len..] {
                "" => "",
                more => more.strip_prefix(' ')?,
            };
        }
        Some(Hit { ns, tid, event, args })
    }
}

/// The length of the value at the start of `text`: a quoted string up to its closing
/// quote, anything else up to the next space. `None` for a string without its end.
fn value_len(text: &str) -> Option<usize> {
    let Some(inside) = text.strip_prefix('"') else {
        return Some(text.find(' ').unwrap_or(text.len()));
    };
    let mut escaped = false;
    for (i, b) in inside.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'"' => return Some(i + 2),
            _ => {}
        }
    }
    None
}

/// A value of a hit, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// A decimal integer (`u` types, and a signed type's non-negative values).
    Unsigned(u64),
    /// A negative decimal integer (`s` types).
    Signed(i64),
    /// `0x...` (`x` types), as written.
    Hex(&'a str),
    /// A string, without its quotes and escapes.
    Str(Vec<u8>),
    /// `(fault)`: the memory could not be read.
    Fault,
    /// Anything else, as written.
    Other(&'a str),
}

impl<'a> Value<'a> {
    /// Decodes a value as the agent wrote it.
    pub fn parse(text: &'a str) -> Value<'a> {
        if text == "(fault)" {
            return Value::Fault;
        }
        if let Some(inside) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            return unescape(inside).map_or(Value::Other(text), Value::Str);
        }
        if text.strip_prefix("0x").is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Value::Hex(text);
        }
        match (text.parse::<u64>(), text.parse::<i64>()) {
            (Ok(v), _) => Value::Unsigned(v),
            (_, Ok(v)) => Value::Signed(v),
            _ => Value::Other(text),
        }
    }

    /// The value as JSON: a number, a string, or `null` for a fault.
    fn json(&self) -> String {
        let string = |s: &str| serde_json::Value::from(s).to_string();
        match self {
            Value::Unsigned(v) => v.to_string(),
            Value::Signed(v) => v.to_string(),
            Value::Hex(text) | Value::Other(text) => string(text),
            Value::Str(bytes) => string(&String::from_utf8_lossy(bytes)),
            Value::Fault => "null".to_string(),
        }
    }
}

/// The bytes a quoted string's inside stands for; `None` for a bad escape or a lone quote.
fn unescape(inside: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(inside.len());
    let mut bytes = inside.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'"' => return None,
            b'\\' => {}
            _ => {
                out.push(b);
                continue;
            }
        }
        out.push(match bytes.next()? {
            b'n' => b'\n',
            b't' => b'\t',
            b'x' => {
                let digits = [bytes.next()?, bytes.next()?];
                u8::from_str_radix(std::str::from_utf8(&digits).ok()?, 16).ok()?
            }
            c @ (b'"' | b'\\') => c,
            _ => return None,
        });
    }
    Some(out)
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

/// `    0.000123 [4242] checksum: seed=1 n=0x10 name="a b"`.
fn text_line(hit: &Hit, start_ns: u64) -> String {
    let mut line = format!("{:12.6} [{}] {}:", seconds(hit, start_ns), hit.tid, hit.event);
    for (name, value) in &hit.args {
        line.push_str(&format!(" {name}={value}"));
    }
    line
}

/// `{"time":0.000123,"ns":...,"tid":4242,"event":"checksum","args":{"seed":1,"n":"0x10"}}`,
/// each value as [`Value::json`] writes it. Written by hand to keep the fields, and the
/// arguments, in order.
fn json_line(hit: &Hit, start_ns: u64) -> String {
    let string = |s: &str| serde_json::Value::from(s).to_string();
    let args: Vec<String> =
        hit.args.iter().map(|(name, value)| format!("{}:{}", string(name), Value::parse(value).json())).collect();
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
            Message::parse("!pending p:libz:inflate: libz is not loaded yet"),
            Message::Pending("p:libz:inflate: libz is not loaded yet")
        );
        assert_eq!(Message::parse("!lost 17"), Message::Lost(17));
        assert_eq!(Message::parse("!lost many"), Message::Unknown("!lost many"));
        assert_eq!(
            Message::parse("1500 7 grp/ev a=1 b=0x10"),
            Message::Hit(Hit { ns: 1500, tid: 7, event: "grp/ev", args: vec![("a", "1"), ("b", "0x10")] })
        );
        assert_eq!(Message::parse("1500 7 ev"), Message::Hit(Hit { ns: 1500, tid: 7, event: "ev", args: vec![] }));
        assert_eq!(Message::parse("garbage"), Message::Unknown("garbage"));
        assert_eq!(Message::parse("1 2 ev novalue"), Message::Unknown("1 2 ev novalue"));
        assert_eq!(Message::parse("1 2 ev a=1  b=2"), Message::Unknown("1 2 ev a=1  b=2"));
    }

    #[test]
    fn quoted_values_may_hold_spaces_quotes_and_equals_signs() {
        let line = r#"9 1 ev s="a b=c \"d\" \\" n=-2 e="" f=(fault) t="x\ty""#;
        let Message::Hit(hit) = Message::parse(line) else { panic!("{line}") };
        assert_eq!(
            hit.args,
            [("s", r#""a b=c \"d\" \\""#), ("n", "-2"), ("e", r#""""#), ("f", "(fault)"), ("t", r#""x\ty""#)]
        );
        // A string cut before its closing quote, or followed by more than a space, is not
        // a hit.
        for line in [r#"9 1 ev s="abc"#, r#"9 1 ev s="abc\""#, r#"9 1 ev s="a"b"#] {
            assert_eq!(Message::parse(line), Message::Unknown(line));
        }
    }

    #[test]
    fn values_decode() {
        assert_eq!(Value::parse("42"), Value::Unsigned(42));
        assert_eq!(Value::parse("18446744073709551615"), Value::Unsigned(u64::MAX));
        assert_eq!(Value::parse("-9223372036854775808"), Value::Signed(i64::MIN));
        assert_eq!(Value::parse("0x1f"), Value::Hex("0x1f"));
        assert_eq!(Value::parse("(fault)"), Value::Fault);
        assert_eq!(
            Value::parse(r#""q\"b\\n\nt\tz\x00\x7f\xc3\xa9""#),
            Value::Str(b"q\"b\\n\nt\tz\x00\x7f\xc3\xa9".to_vec())
        );
        for bad in [r#""bad\q""#, r#""bad\x4""#, r#""a"b""#, "0x", "what"] {
            assert_eq!(Value::parse(bad), Value::Other(bad));
        }
    }

    #[test]
    fn text_and_json() {
        let hit = Hit {
            ns: 12_345_678_900,
            tid: 42,
            event: "checksum",
            args: vec![
                ("seed", "1"),
                ("d", "-5"),
                ("n", "0x10"),
                ("s", r#""a \"b\"\n\xc3\xa9\xff""#),
                ("f", "(fault)"),
            ],
        };
        assert_eq!(
            text_line(&hit, 1_000_000_000),
            r#"   11.345679 [42] checksum: seed=1 d=-5 n=0x10 s="a \"b\"\n\xc3\xa9\xff" f=(fault)"#
        );
        let json = json_line(&hit, 1_000_000_000);
        assert_eq!(
            json,
            r#"{"time":11.345679,"ns":12345678900,"tid":42,"event":"checksum","args":{"seed":1,"d":-5,"n":"0x10","s":"a \"b\"\né�","f":null}}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed["args"]["s"], "a \"b\"\n\u{e9}\u{fffd}");
        assert!(parsed["args"]["f"].is_null());
    }
}
