//! The event line: an allocation-free writer ([`Text`], [`Line`]) and the format of one
//! probe's events ([`EventFormat`]).
//!
//! A line is formatted inside the probe handler, that is inside a `SIGTRAP` handler or a
//! detour of whatever thread hit the probe, possibly in the middle of `malloc`: so nothing
//! here allocates or uses `core::fmt` (whose machinery may, through `Display` impls), it
//! only copies bytes into a buffer on the stack.
//!
//! The protocol every backend speaks to the CLI:
//!
//! ```text
//! <mono_ns> <tid> <event> name=value name="string" ...
//! ```
//!
//! Integers print as their type says (`u`: decimal, `s`: signed decimal, `x`: `0x` hex).
//! Strings are double-quoted, with `\"`, `\\`, `\n`, `\t` and `\xNN` (any other byte
//! outside printable ASCII) escaped, so one event stays one line and the words can be split
//! again at spaces outside quotes. A memory fetch that faults prints `(fault)`, as the
//! kernel's does.
//!
//! ```
//! use dynprobe::fetch::{HitContext, SelfMemory};
//! use dynprobe::line::{EventFormat, Line};
//! use dynprobe::spec::ProbeSpec;
//! use dynprobe::Regs;
//!
//! let spec = ProbeSpec::parse("p:grp/ev work a=$arg1 b=%rsi:x64 s=$arg3:string").unwrap();
//! let format = EventFormat::new(&spec).unwrap();
//! let text = b"say \"hi\"\n\0";
//! let regs = Regs { rdi: 5, rsi: 16, rdx: text.as_ptr() as u64, ..Regs::default() };
//! let mut line = Line::new();
//! format.write(&mut line, 123, &HitContext::entry(&regs, &SelfMemory, 42));
//! assert_eq!(line.finish(), b"123 42 grp/ev a=5 b=0x10 s=\"say \\\"hi\\\"\\n\"\n");
//! ```

use crate::fetch::{EntryValues, FetchProgram, HitContext, Value};
use crate::spec::{FetchType, Format, IntType, ProbeKind, ProbeSpec, STRING_MAX};

/// The longest line. Pipe writes of at most `PIPE_BUF` (4096) bytes are atomic, so one
/// `write` of a whole line never interleaves with another thread's; a [`STRING_MAX`]-byte
/// string of escaped bytes fits.
pub const LINE_MAX: usize = 1280;

/// Text of at most `N - 1` bytes being written (the last byte is kept for a final `\n` or
/// NUL). Text past that is cut.
pub struct Text<const N: usize> {
    buf: [u8; N],
    len: usize,
}

/// One event line. Text past [`LINE_MAX`] is cut, and the line still ends with `\n` (the
/// CLI would rather show a cut line than none).
pub type Line = Text<LINE_MAX>;

/// A path for a system call, built where nothing may allocate (a `fork` child handler).
pub type PathText = Text<{ libc::PATH_MAX as usize }>;

/// What a fault prints.
pub const FAULT: &str = "(fault)";

impl<const N: usize> Text<N> {
    /// Empty text.
    pub const fn new() -> Self {
        Text { buf: [0; N], len: 0 }
    }

    /// Bytes that can still be appended.
    fn room(&self) -> usize {
        N - 1 - self.len
    }

    /// Appends bytes, as many as fit while leaving room for the final byte.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        let n = bytes.len().min(self.room());
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    /// Appends one byte.
    pub fn byte(&mut self, byte: u8) -> &mut Self {
        self.bytes(&[byte])
    }

    /// Appends an unsigned decimal number.
    pub fn dec(&mut self, mut value: u64) -> &mut Self {
        let mut digits = [0u8; 20]; // u64::MAX has 20 digits
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.bytes(&digits[at..])
    }

    /// Appends a signed decimal number.
    pub fn signed(&mut self, value: i64) -> &mut Self {
        if value < 0 {
            self.byte(b'-');
        }
        self.dec(value.unsigned_abs())
    }

    /// Appends `0x` and the number in lowercase hex, without leading zeros.
    pub fn hex(&mut self, mut value: u64) -> &mut Self {
        let mut digits = [0u8; 16];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b"0123456789abcdef"[(value & 0xf) as usize];
            value >>= 4;
            if value == 0 {
                break;
            }
        }
        self.bytes(b"0x").bytes(&digits[at..])
    }

    /// Appends an integer as its type says.
    pub fn value(&mut self, ty: IntType, raw: u64) -> &mut Self {
        let value = ty.apply(raw);
        match ty.format {
            Format::Unsigned => self.dec(value),
            Format::Signed => self.signed(value as i64),
            Format::Hex => self.hex(value),
        }
    }

    /// Appends the `float` (`bits` 32: the low 32 bits of `raw`) or `double` whose bits are
    /// `raw`, as Rust's `Display` writes it: the shortest decimal that reads back the same
    /// value (`0.1`, `119.5625`, `inf`, `NaN`). Formatting into the line allocates nothing.
    pub fn float(&mut self, bits: u8, raw: u64) -> &mut Self {
        use std::fmt::Write;
        /// The line as a `fmt::Write` sink: what does not fit is cut, as everywhere.
        struct Sink<'l, const M: usize>(&'l mut Text<M>);
        impl<const M: usize> Write for Sink<'_, M> {
            fn write_str(&mut self, s: &str) -> std::fmt::Result {
                self.0.bytes(s.as_bytes());
                Ok(())
            }
        }
        let _ = match bits {
            32 => write!(Sink(self), "{}", f32::from_bits(raw as u32)),
            _ => write!(Sink(self), "{}", f64::from_bits(raw)),
        };
        self
    }

    /// Appends `bytes` double-quoted and escaped (see the module documentation). When the
    /// text is nearly full the string is cut, but its closing quote is always written.
    pub fn quoted(&mut self, bytes: &[u8]) -> &mut Self {
        if self.room() < 2 {
            return self;
        }
        self.byte(b'"');
        for &b in bytes {
            let mut escaped = [b'\\', b, 0, 0];
            let len = match b {
                b'"' | b'\\' => 2,
                b'\n' => {
                    escaped[1] = b'n';
                    2
                }
                b'\t' => {
                    escaped[1] = b't';
                    2
                }
                0x20..=0x7e => {
                    escaped[0] = b;
                    1
                }
                _ => {
                    escaped[1] = b'x';
                    escaped[2] = b"0123456789abcdef"[usize::from(b >> 4)];
                    escaped[3] = b"0123456789abcdef"[usize::from(b & 0xf)];
                    4
                }
            };
            if self.room() < len + 1 {
                break;
            }
            self.bytes(&escaped[..len]);
        }
        self.byte(b'"')
    }

    /// Appends a fetched value of type `ty`.
    pub fn fetched(&mut self, ty: FetchType, value: Value) -> &mut Self {
        match (value, ty) {
            (Value::Int(raw), FetchType::Int(int)) => self.value(int, raw),
            (Value::Int(raw), FetchType::Float(bits)) => self.float(bits, raw),
            // A program compiled for a string type yields strings; should an integer reach
            // a string type, it is printed rather than lost.
            (Value::Int(raw), _) => self.hex(raw),
            (Value::Str(bytes), _) => self.quoted(bytes),
            (Value::Fault, _) => self.bytes(FAULT.as_bytes()),
        }
    }

    /// The finished line, ending with `\n`.
    pub fn finish(&mut self) -> &[u8] {
        self.buf[self.len] = b'\n';
        &self.buf[..=self.len]
    }

    /// The text so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The text as a C string (NUL-terminated); `None` if it holds a NUL itself.
    pub fn c_str(&mut self) -> Option<&std::ffi::CStr> {
        self.buf[self.len] = 0;
        std::ffi::CStr::from_bytes_with_nul(&self.buf[..=self.len]).ok()
    }
}

impl<const N: usize> Default for Text<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// One field of an event: its name and how its value is fetched.
#[derive(Debug, Clone)]
struct Field {
    name: Box<str>,
    program: FetchProgram,
}

/// How one probe's hits are written: the event name and every field's compiled fetch.
/// Built once from a spec when the probe is placed; [`write`](Self::write) only reads it.
#[derive(Debug, Clone)]
pub struct EventFormat {
    name: Box<str>,
    kind: ProbeKind,
    fields: Box<[Field]>,
    entry: EntryValues,
    /// A field reads a vector register ([`ProbeSpec::reads_vectors`]).
    reads_vectors: bool,
}

impl EventFormat {
    /// The format of `spec`'s events. Errors if an `@SYMBOL` is not resolved
    /// ([`ProbeSpec::resolve_symbols`]) or a fetch does not fit the probe's kind.
    pub fn new(spec: &ProbeSpec) -> Result<EventFormat, String> {
        let mut entry = EntryValues::default();
        let fields = spec
            .args
            .iter()
            .map(|arg| {
                let program = FetchProgram::new(&arg.fetch, arg.ty, spec.kind, &mut entry)
                    .map_err(|e| format!("field `{}`: {e}", arg.name))?;
                Ok(Field { name: arg.name.as_str().into(), program })
            })
            .collect::<Result<_, String>>()?;
        let reads_vectors = spec.reads_vectors();
        Ok(EventFormat { name: spec.full_event_name().into(), kind: spec.kind, fields, entry, reads_vectors })
    }

    /// Whether a field reads a vector register: [`write`](Self::write)'s context needs its
    /// [`xmm`](HitContext::xmm) then.
    pub fn reads_vectors(&self) -> bool {
        self.reads_vectors
    }

    /// The probe's kind.
    pub fn kind(&self) -> ProbeKind {
        self.kind
    }

    /// How many `u64` a return spec keeps from the entry to the return (its `$argN`s), at
    /// most [`ENTRY_VALUES`](crate::fetch::ENTRY_VALUES); 0 for an entry spec.
    pub fn entry_count(&self) -> usize {
        self.entry.len()
    }

    /// At a return spec's entry: fills `out[..entry_count()]` (as far as `out` reaches).
    pub fn save_entry(&self, ctx: &HitContext, out: &mut [u64]) {
        self.entry.save(ctx.regs, out);
    }

    /// Writes `<ns> <tid> <event> name=value...` into `line` (end it with
    /// [`Line::finish`]).
    pub fn write(&self, line: &mut Line, ns: u64, ctx: &HitContext) {
        line.dec(ns).byte(b' ').dec(ctx.tid).byte(b' ').bytes(self.name.as_bytes());
        let mut buf = [0u8; STRING_MAX];
        for field in self.fields.iter() {
            line.byte(b' ').bytes(field.name.as_bytes()).byte(b'=');
            let value = field.program.eval(ctx, &mut buf);
            line.fetched(field.program.ty(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::SelfMemory;
    use crate::Regs;

    fn text(line: &mut Line) -> String {
        String::from_utf8(line.finish().to_vec()).unwrap()
    }

    fn int(spec_type: &str) -> IntType {
        match ProbeSpec::parse(&format!("p f v=%rax:{spec_type}")).unwrap().args[0].ty {
            FetchType::Int(int) => int,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn floats_print_their_shortest_exact_form_from_their_bits() {
        let mut line = Line::new();
        line.fetched(FetchType::Float(64), Value::Int(119.5625f64.to_bits())).byte(b' ');
        // A float is the low 32 bits: what is above them (the rest of an xmm register) is not its.
        line.fetched(FetchType::Float(32), Value::Int(0xdead_beef_0000_0000 | u64::from(0.1f32.to_bits()))).byte(b' ');
        line.float(64, f64::NEG_INFINITY.to_bits()).byte(b' ').float(64, f64::NAN.to_bits());
        assert_eq!(text(&mut line), "119.5625 0.1 -inf NaN\n");
    }

    #[test]
    fn numbers() {
        let mut line = Line::new();
        line.dec(0).byte(b' ').dec(u64::MAX).byte(b' ').signed(i64::MIN);
        line.byte(b' ').signed(42).byte(b' ').hex(0).byte(b' ').hex(u64::MAX);
        assert_eq!(text(&mut line), "0 18446744073709551615 -9223372036854775808 42 0x0 0xffffffffffffffff\n");
    }

    #[test]
    fn values_follow_their_type() {
        let mut line = Line::new();
        line.value(int("u64"), -1i64 as u64).byte(b' ');
        line.value(int("s64"), -1i64 as u64).byte(b' ');
        line.value(int("x32"), 0x1234_5678_9abc).byte(b' ');
        line.value(int("s8"), 0xfe).byte(b' ');
        line.fetched(FetchType::String, Value::Str(b"a b")).byte(b' ');
        line.fetched(FetchType::DEFAULT, Value::Fault);
        assert_eq!(text(&mut line), "18446744073709551615 -1 0x56789abc -2 \"a b\" (fault)\n");
    }

    #[test]
    fn strings_are_quoted_and_escaped() {
        let mut line = Line::new();
        line.quoted(b"plain text").byte(b' ').quoted(b"").byte(b' ');
        line.quoted(b"q\"b\\n\nt\tz\x00\x7f\xc3\xa9\x1b~");
        assert_eq!(text(&mut line), r#""plain text" "" "q\"b\\n\nt\tz\x00\x7f\xc3\xa9\x1b~""#.to_string() + "\n");
    }

    #[test]
    fn a_cut_string_keeps_its_closing_quote() {
        // The room left fits the opening quote, three bytes and the closing quote; the
        // escape of the fourth byte would not fit with the quote.
        let mut text = Text::<16>::new();
        text.bytes(b"0123456789").quoted(b"abc\x01");
        assert_eq!(text.as_bytes(), b"0123456789\"abc\"");
        // No room for even `""`: nothing is written.
        let mut text = Text::<4>::new();
        text.bytes(b"12").quoted(b"x");
        assert_eq!(text.as_bytes(), b"12");
    }

    #[test]
    fn long_lines_are_cut_but_end_with_a_newline() {
        let mut line = Line::new();
        for _ in 0..200 {
            line.bytes(b"0123456789");
        }
        let out = line.finish();
        assert_eq!(out.len(), LINE_MAX);
        assert_eq!(out.last(), Some(&b'\n'));
    }

    #[test]
    fn the_longest_string_of_escapes_fits_a_line() {
        let mut line = Line::new();
        line.bytes(b"18446744073709551615 4294967295 group_name/event_name field=");
        line.quoted(&[0xff; STRING_MAX]);
        let out = line.finish();
        assert!(out.ends_with(b"\\xff\"\n"), "{}", String::from_utf8_lossy(out));
    }

    #[test]
    fn an_event_is_one_line_with_every_field() {
        let spec =
            ProbeSpec::parse("p:grp/ev work a=$arg1 b=%rsi:x64 c=$arg3:s32 bad=+0($arg4) s=$arg5:string").unwrap();
        let format = EventFormat::new(&spec).unwrap();
        assert_eq!((format.kind(), format.entry_count()), (ProbeKind::Entry, 0));
        let name = b"tab\there\0";
        let regs = Regs { rdi: 5, rsi: 16, rdx: 0xffff_ffff, rcx: 8, r8: name.as_ptr() as u64, ..Regs::default() };
        let mut line = Line::new();
        format.write(&mut line, 123456789, &HitContext::entry(&regs, &SelfMemory, 42));
        assert_eq!(text(&mut line), "123456789 42 grp/ev a=5 b=0x10 c=-1 bad=(fault) s=\"tab\\there\"\n");
    }

    #[test]
    fn a_return_event_keeps_its_arguments_from_the_entry() {
        let spec = ProbeSpec::parse("r:work ret=$retval:s64 p=$arg2:x64 v=+0($arg2):u32 t=$duration").unwrap();
        let format = EventFormat::new(&spec).unwrap();
        assert_eq!((format.kind(), format.entry_count()), (ProbeKind::Return, 1));
        // What the function wrote through its pointer argument is read at the return.
        let mut out = 0u32;
        let at_entry = Regs { rsi: std::ptr::addr_of_mut!(out) as u64, ..Regs::default() };
        let mut kept = [0u64; 1];
        format.save_entry(&HitContext::entry(&at_entry, &SelfMemory, 1), &mut kept);
        out = 77;
        let at_return = Regs { rax: -2i64 as u64, ..Regs::default() };
        let ctx = HitContext {
            regs: &at_return,
            target: &SelfMemory,
            tid: 3,
            retval: Some(at_return.rax),
            entry: &kept,
            duration_ns: Some(250),
            xmm: None,
        };
        let mut line = Line::new();
        format.write(&mut line, 1000, &ctx);
        let want = format!("1000 3 work__return ret=-2 p={:#x} v={out} t=250\n", kept[0]);
        assert_eq!(text(&mut line), want);
    }

    #[test]
    fn unresolved_symbols_are_refused() {
        let spec = ProbeSpec::parse("p work v=@counter").unwrap();
        let err = EventFormat::new(&spec).unwrap_err();
        assert!(err.starts_with("field `v`: `@counter` is not resolved"), "{err}");
    }
}
