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

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};

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
    /// `!note <text>`: something the user is told once, not a warning (what a `record -p`
    /// attach found in flight).
    Note(&'a str),
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
            Message::Note(text) => Some(text.to_string()),
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
        if let Some(rest) = line.strip_prefix("!note ") {
            return Message::Note(rest);
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

/// The longest line read from the agent (or the ptrace tracer): far above any real one
/// (event lines are at most `dynprobe::line::LINE_MAX` bytes), and a bound on what a
/// program writing into the event pipe without a newline can make dynprobe keep.
pub const READ_LINE_MAX: usize = 64 * 1024;

/// A line (or message) from the agent, made safe to print: what is not UTF-8 becomes
/// U+FFFD, and every control character — ESC starting a terminal's escape sequence, a
/// carriage return, the C1 controls — becomes `\xNN` per byte, as `strace` shows
/// non-printable bytes. The agent runs inside the traced program, which can write anything
/// into its channels: nothing it writes may reach the terminal raw (see strace(1), `-x`).
/// Printable text, and with it the protocol's own `\xNN` escapes, is left as it is.
pub fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if !text.chars().any(char::is_control) {
        return text.into_owned();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_control() {
            let mut utf8 = [0u8; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits what is read from a pipe into lines, each [`sanitize`]d; a line longer than
/// [`READ_LINE_MAX`] is dropped whole (and counted) rather than kept growing.
#[derive(Default)]
pub struct LineBuf {
    pending: Vec<u8>,
    /// Inside an over-long line: its bytes are dropped up to its end.
    skipping: bool,
    /// Lines dropped for their length.
    pub overlong: u64,
}

impl LineBuf {
    /// Takes `bytes` (the continuation of what came before) and hands every line they
    /// complete to `each`, without its `\n`; empty lines are skipped.
    pub fn push(&mut self, bytes: &[u8], each: &mut dyn FnMut(&str)) {
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let part = &rest[..end];
            rest = &rest[end + 1..];
            if std::mem::take(&mut self.skipping) {
                continue;
            }
            if self.pending.len() + part.len() > READ_LINE_MAX {
                self.overlong += 1;
                self.pending.clear();
                continue;
            }
            let line = match self.pending.is_empty() {
                true => part,
                false => {
                    self.pending.extend_from_slice(part);
                    &self.pending[..]
                }
            };
            if !line.is_empty() {
                each(&sanitize(line));
            }
            self.pending.clear();
        }
        if self.skipping {
            return;
        }
        self.pending.extend_from_slice(rest);
        if self.pending.len() > READ_LINE_MAX {
            self.overlong += 1;
            self.pending.clear();
            self.skipping = true;
        }
    }
}

/// Where an attach session's lines go (standard output or `-o FILE`), written only as far
/// as the destination takes them without blocking, so that a reader slower than the hits
/// (a pipe into another program, a terminal on hold) never keeps the session from seeing
/// Ctrl-C, `--duration` or the agent's messages. What the reader has not taken yet waits in
/// a queue of at most [`OUTBOX_MAX`] bytes; while it is full, the event pipe is left
/// unread and the agent counts the hits that do not fit as lost, as `perf` does when its
/// reader falls behind.
pub struct Outbox {
    /// Standard output, or the file of `-o`.
    destination: Destination,
    queue: Vec<u8>,
    /// Bytes at the front of `queue` already written.
    done: usize,
    /// A write failed (a closed `| head`): lines are dropped from then on, and the event
    /// pipe is still read, so that the agent's pipe drains.
    broken: bool,
}

/// Where an [`Outbox`] writes.
enum Destination {
    Stdout(io::Stdout),
    File(File),
}

/// The most an [`Outbox`] keeps for a slow reader.
pub const OUTBOX_MAX: usize = 1 << 20;

impl Outbox {
    /// Lines to standard output.
    pub fn stdout() -> Outbox {
        Outbox { destination: Destination::Stdout(io::stdout()), queue: Vec::new(), done: 0, broken: false }
    }

    /// Lines to `file`.
    pub fn file(file: File) -> Outbox {
        Outbox { destination: Destination::File(file), queue: Vec::new(), done: 0, broken: false }
    }

    /// The destination, for `poll`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match &self.destination {
            Destination::Stdout(stdout) => stdout.as_fd(),
            Destination::File(file) => file.as_fd(),
        }
    }

    /// Queues one line (without its newline).
    pub fn push(&mut self, line: &str) {
        if !self.broken {
            self.queue.extend_from_slice(line.as_bytes());
            self.queue.push(b'\n');
        }
    }

    /// Whether lines wait for the destination.
    pub fn waiting(&self) -> bool {
        self.done < self.queue.len()
    }

    /// Whether the queue is full: read no more events until the reader takes some.
    pub fn full(&self) -> bool {
        self.queue.len() - self.done >= OUTBOX_MAX
    }

    /// Writes what the destination takes now: chunks of at most `PIPE_BUF` bytes while
    /// `poll` says it is writable (a pipe that polls writable takes `PIPE_BUF` bytes
    /// without blocking, pipe(7)), at most 64 KiB a call.
    pub fn write_some(&mut self) {
        for _ in 0..16 {
            if !self.waiting() || !poll_one(self.fd(), PollFlags::OUT, 0) {
                break;
            }
            if !self.write_chunk(libc::PIPE_BUF) {
                break;
            }
        }
        self.compact();
    }

    /// Writes everything queued, waiting for the reader (the session is over by then),
    /// unless `interrupt` (a signalfd) becomes readable first: a reader far behind could
    /// make that minutes, and the user asked for the end. Says so on stderr when the
    /// reader keeps it waiting, and what was dropped. The signal is left to read.
    pub fn finish(&mut self, interrupt: BorrowedFd<'_>) {
        let mut told = false;
        while self.waiting() {
            let mut fds = [
                PollFd::from_borrowed_fd(self.fd(), PollFlags::OUT),
                PollFd::from_borrowed_fd(interrupt, PollFlags::IN),
            ];
            let ready = poll(&mut fds, Some(&Timespec { tv_sec: 1, tv_nsec: 0 })).unwrap_or(1);
            let (writable, interrupted) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
            if interrupted {
                let lines = self.queue[self.done..].iter().filter(|&&b| b == b'\n').count();
                eprintln!("dynprobe: interrupted: {lines} event lines the reader had not taken were dropped");
                self.queue.clear();
                self.done = 0;
                return;
            }
            if ready == 0 && !told {
                let kib = (self.queue.len() - self.done).div_ceil(1024);
                eprintln!("dynprobe: the reader is behind: writing the last {kib} KiB of events (Ctrl-C drops them)");
                told = true;
            }
            if writable && !self.write_chunk(libc::PIPE_BUF) {
                break;
            }
        }
        self.compact();
    }

    /// One `write` of at most `max` bytes; false when nothing more can be written now.
    fn write_chunk(&mut self, max: usize) -> bool {
        let end = self.queue.len().min(self.done + max);
        let chunk = &self.queue[self.done..end];
        match rustix::io::write(self.fd(), chunk) {
            Ok(n) => {
                self.done += n;
                n > 0
            }
            Err(Errno::INTR) => true,
            Err(Errno::WOULDBLOCK) => false,
            Err(_) => {
                // EPIPE and the like: the reader is gone for good.
                self.broken = true;
                self.queue.clear();
                self.done = 0;
                false
            }
        }
    }

    fn compact(&mut self) {
        if self.done == self.queue.len() {
            self.queue.clear();
            self.done = 0;
        } else if self.done >= 64 * 1024 && self.done * 2 >= self.queue.len() {
            self.queue.drain(..self.done);
            self.done = 0;
        }
    }
}

/// Whether `fd` polls ready for `events` within `ms` milliseconds. An error or a hang-up
/// counts as ready: the next `read` or `write` says which.
pub fn poll_one(fd: BorrowedFd<'_>, events: PollFlags, ms: u64) -> bool {
    let timeout = Timespec { tv_sec: (ms / 1000) as i64, tv_nsec: (ms % 1000 * 1_000_000) as i64 };
    poll(&mut [PollFd::from_borrowed_fd(fd, events)], Some(&timeout)) == Ok(1)
}

/// How hits are written: text or JSON lines, times relative to the start of the run.
#[derive(Debug, Clone, Copy)]
pub struct Format {
    json: bool,
    start_ns: u64,
}

impl Format {
    /// JSON lines or text; `start_ns` is `CLOCK_MONOTONIC` when the run started.
    pub fn new(json: bool, start_ns: u64) -> Format {
        Format { json, start_ns }
    }

    /// One hit's line, without its newline.
    pub fn line(&self, hit: &Hit) -> String {
        if self.json {
            json_line(hit, self.start_ns)
        } else {
            text_line(hit, self.start_ns)
        }
    }
}

/// Writes hits as text or JSON lines, with times relative to the start of the run.
pub struct Printer {
    out: Box<dyn Write>,
    format: Format,
}

impl Printer {
    /// A printer to `out`; `start_ns` is `CLOCK_MONOTONIC` when the program was started.
    pub fn new(out: Box<dyn Write>, json: bool, start_ns: u64) -> Printer {
        Printer { out, format: Format::new(json, start_ns) }
    }

    /// Writes one hit.
    pub fn hit(&mut self, hit: &Hit) -> io::Result<()> {
        writeln!(self.out, "{}", self.format.line(hit))
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
    for (name, value) in super::source::shown(hit.event, &hit.args) {
        line.push_str(&format!(" {name}={}", value.text()));
    }
    line
}

/// `{"time":0.000123,"ns":...,"tid":4242,"event":"checksum","args":{"seed":1,"n":"0x10"}}`,
/// each value as [`Value::json`] writes it. Written by hand to keep the fields, and the
/// arguments, in order.
fn json_line(hit: &Hit, start_ns: u64) -> String {
    let string = |s: &str| serde_json::Value::from(s).to_string();
    // A value typed by DWARF (an enumerator's name, `true`, `'x'`) is a JSON string.
    let json = |value: &super::source::Shown| match value {
        super::source::Shown::Raw(raw) => Value::parse(raw).json(),
        super::source::Shown::Typed(text) => string(text),
        super::source::Shown::Str(bytes) => string(&String::from_utf8_lossy(bytes)),
    };
    let args: Vec<String> = super::source::shown(hit.event, &hit.args)
        .iter()
        .map(|(name, value)| format!("{}:{}", string(name), json(value)))
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
            Message::parse("!pending p:libz:inflate: libz is not loaded yet"),
            Message::Pending("p:libz:inflate: libz is not loaded yet")
        );
        assert_eq!(Message::parse("!lost 17"), Message::Lost(17));
        let note = Message::parse("!note calls in flight at the attach: 3 adopted on 5 thread(s)");
        assert_eq!(note.note().as_deref(), Some("calls in flight at the attach: 3 adopted on 5 thread(s)"));
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

    #[test]
    fn control_characters_are_escaped_and_printable_text_kept() {
        assert_eq!(sanitize(b"1 2 ev s=\"a\\x1b\""), "1 2 ev s=\"a\\x1b\"");
        assert_eq!(sanitize(b"\x1b]0;t\x07\r\x7f"), r"\x1b]0;t\x07\x0d\x7f");
        // A C1 control (CSI, U+009B) and bytes that are not UTF-8.
        assert_eq!(sanitize("a\u{9b}2J é".as_bytes()), r"a\xc2\x9b2J é");
        assert_eq!(sanitize(b"\xff"), "\u{fffd}");
    }

    #[test]
    fn lines_are_split_across_reads_and_over_long_ones_dropped() {
        let mut split = LineBuf::default();
        let mut got = Vec::new();
        split.push(b"one\ntw", &mut |l| got.push(l.to_string()));
        split.push(b"o\n\nthree\n", &mut |l| got.push(l.to_string()));
        assert_eq!(got, ["one", "two", "three"]);
        // Longer than READ_LINE_MAX, in one read and across reads: dropped whole, counted.
        got.clear();
        let long = vec![b'A'; READ_LINE_MAX + 1];
        split.push(&long, &mut |l| got.push(l.to_string()));
        split.push(b"AAA\nafter\n", &mut |l| got.push(l.to_string()));
        split.push(&[&long[..], b"\nlast\n"].concat(), &mut |l| got.push(l.to_string()));
        assert_eq!((got, split.overlong), (vec!["after".to_string(), "last".to_string()], 2));
    }
}
