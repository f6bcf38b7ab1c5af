//! The probe-spec grammar of `dynprobe probe`, modelled on the kernel's `kprobe_events`.
//!
//! ```text
//! p[:[GROUP/]EVENT] SYMBOL[+OFFSET]|MODULE:SYMBOL[+OFFSET]|0xADDR [NAME=FETCHARG[:TYPE]]...
//!
//! FETCHARG  %REG      a register: %rax..%r15, %rip (%ip), %rsp, %rflags; kernel names
//!                     such as %ax or %di work too
//!           $argN     the Nth integer argument of a function (1-based, N = 1..6)
//! TYPE      u8 u16 u32 u64 (decimal, the default), s8..s64 (signed), x8..x64 (hex)
//! ```
//!
//! As a shorthand, `p:SYMBOL NAME=...` probes SYMBOL: the kernel's `p:EVENT SYMBOL` names
//! an event and then a location, so the word after `p:` is an event name only when a
//! location follows it (a location never contains `=`, a fetch argument always does).
//!
//! The CLI parses every spec before it starts the program, so syntax errors are reported
//! with their column and nothing runs; the agent parses the same text again inside the
//! program. Both use this module, so they cannot disagree.
//!
//! ```
//! use dynprobe::spec::{Fetch, ProbeSpec, Reg};
//! let spec = ProbeSpec::parse("p:checksum seed=$arg1 acc=%rax:x64").unwrap();
//! assert_eq!(spec.event, "checksum");
//! assert_eq!(spec.args[0].fetch, Fetch::Arg(1));
//! assert_eq!(spec.args[1].fetch, Fetch::Reg(Reg::Rax));
//!
//! let err = ProbeSpec::parse("p:work x=%rdz").unwrap_err();
//! assert_eq!(err.to_string(), "unknown register `rdz` at column 11");
//! ```
//!
//! The parser is a small recursive descent over byte offsets into the spec, so every
//! error can point at its column; [`Fetch`] grows the kernel's other forms (`+OFF(ARG)`,
//! `$retval`, `$stackN`) as new variants of the same parser.

use crate::Location;
use std::fmt;

/// One parsed probe spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// The spec as the user wrote it (trimmed).
    pub text: String,
    /// What kind of probe.
    pub kind: ProbeKind,
    /// The event's group, when `p:GROUP/EVENT` named one.
    pub group: Option<String>,
    /// The event's name: as given, or derived from the location like the kernel does.
    pub event: String,
    /// Where the probe goes.
    pub location: Location,
    /// The values recorded at each hit, in order.
    pub args: Vec<FetchArg>,
}

/// The kind of a probe, the first letter of its spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// `p`: a probe at an instruction.
    Entry,
}

/// `NAME=FETCHARG[:TYPE]`: one value recorded at each hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchArg {
    /// The field's name in the event.
    pub name: String,
    /// Where the value comes from.
    pub fetch: Fetch,
    /// How the value is sized and printed.
    pub ty: FetchType,
}

/// Where a fetched value comes from.
///
/// Deliberately not `#[non_exhaustive]`: whoever reads values (the agent) must fail to
/// compile until it handles a new form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// `%REG`.
    Reg(Reg),
    /// `$argN`: the Nth SysV ABI integer argument, 1-based as in the kernel (1..=6).
    Arg(u8),
}

/// A register that `%REG` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)] // the variants are the architectural registers of the same name
pub enum Reg {
    Rax,
    Rbx,
    Rcx,
    Rdx,
    Rsi,
    Rdi,
    Rbp,
    Rsp,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
    Rip,
    Rflags,
}

/// Register names, the x86-64 ones first and then the kernel's `pt_regs` spellings
/// (`%ax`, `%ip`, `%flags`) so that kprobe_events specs work unchanged.
const REG_NAMES: &[(&str, Reg)] = &[
    ("rax", Reg::Rax),
    ("rbx", Reg::Rbx),
    ("rcx", Reg::Rcx),
    ("rdx", Reg::Rdx),
    ("rsi", Reg::Rsi),
    ("rdi", Reg::Rdi),
    ("rbp", Reg::Rbp),
    ("rsp", Reg::Rsp),
    ("r8", Reg::R8),
    ("r9", Reg::R9),
    ("r10", Reg::R10),
    ("r11", Reg::R11),
    ("r12", Reg::R12),
    ("r13", Reg::R13),
    ("r14", Reg::R14),
    ("r15", Reg::R15),
    ("rip", Reg::Rip),
    ("rflags", Reg::Rflags),
    ("ax", Reg::Rax),
    ("bx", Reg::Rbx),
    ("cx", Reg::Rcx),
    ("dx", Reg::Rdx),
    ("si", Reg::Rsi),
    ("di", Reg::Rdi),
    ("bp", Reg::Rbp),
    ("sp", Reg::Rsp),
    ("ip", Reg::Rip),
    ("flags", Reg::Rflags),
];

/// The highest `$argN`: arguments past the sixth are on the stack, which `$stackN` will
/// reach.
pub const MAX_ARG: u8 = 6;

/// How a fetched value is sized and printed: the kernel's `u8`..`u64`, `s8`..`s64`,
/// `x8`..`x64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchType {
    /// Decimal, signed decimal or hex.
    pub format: Format,
    /// The width in bits: 8, 16, 32 or 64. The value is truncated to it (and sign-extended
    /// from it for signed types).
    pub bits: u8,
}

/// How a value is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Unsigned decimal (`u`).
    Unsigned,
    /// Signed decimal (`s`).
    Signed,
    /// Hexadecimal with a `0x` prefix (`x`).
    Hex,
}

impl FetchType {
    /// `u64`, used when no type is given.
    pub const DEFAULT: FetchType = FetchType { format: Format::Unsigned, bits: 64 };

    /// The raw 64-bit value truncated to the type's width, as the bits to print: for a
    /// signed type, sign-extended to 64 bits (read the result as an `i64`).
    pub fn apply(self, raw: u64) -> u64 {
        let shift = 64 - u32::from(self.bits);
        match self.format {
            Format::Signed => (((raw << shift) as i64) >> shift) as u64,
            Format::Unsigned | Format::Hex => (raw << shift) >> shift,
        }
    }
}

impl fmt::Display for FetchType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let letter = match self.format {
            Format::Unsigned => 'u',
            Format::Signed => 's',
            Format::Hex => 'x',
        };
        write!(f, "{letter}{}", self.bits)
    }
}

/// A syntax error in a probe spec, with the column it was found at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The spec.
    pub spec: String,
    /// 1-based column (in characters) of the offending text.
    pub column: usize,
    /// What is wrong, without the column.
    pub message: String,
}

impl SpecError {
    /// The spec with a caret under the offending column, two lines indented by two
    /// spaces, to print under the error message.
    pub fn caret(&self) -> String {
        format!("  {}\n  {}^", self.spec, " ".repeat(self.column - 1))
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at column {}", self.message, self.column)
    }
}

impl std::error::Error for SpecError {}

impl ProbeSpec {
    /// Parses one spec.
    pub fn parse(text: &str) -> Result<ProbeSpec, SpecError> {
        Parser { spec: text }.spec()
    }

    /// The event name as printed: `GROUP/EVENT`, or `EVENT` without a group.
    pub fn full_event_name(&self) -> String {
        match &self.group {
            Some(group) => format!("{group}/{}", self.event),
            None => self.event.clone(),
        }
    }
}

/// A piece of the spec and the byte offset where it starts, so errors inside it can name
/// their column.
#[derive(Debug, Clone, Copy)]
struct Span<'a> {
    text: &'a str,
    start: usize,
}

impl<'a> Span<'a> {
    /// The part from byte `from` of this span on.
    fn from(self, from: usize) -> Span<'a> {
        Span { text: &self.text[from..], start: self.start + from }
    }

    /// The part before byte `to` of this span.
    fn to(self, to: usize) -> Span<'a> {
        Span { text: &self.text[..to], start: self.start }
    }

    /// Splits at the first `sep`: the part before and the part after it.
    fn split_once(self, sep: char) -> Option<(Span<'a>, Span<'a>)> {
        let at = self.text.find(sep)?;
        Some((self.to(at), self.from(at + sep.len_utf8())))
    }

    /// Splits at the last `sep`.
    fn rsplit_once(self, sep: char) -> Option<(Span<'a>, Span<'a>)> {
        let at = self.text.rfind(sep)?;
        Some((self.to(at), self.from(at + sep.len_utf8())))
    }

    /// The leading run of identifier characters and the rest.
    fn split_ident(self) -> (Span<'a>, Span<'a>) {
        let end = self.text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(self.text.len());
        (self.to(end), self.from(end))
    }
}

struct Parser<'a> {
    spec: &'a str,
}

impl<'a> Parser<'a> {
    fn error(&self, at: usize, message: impl Into<String>) -> SpecError {
        SpecError {
            spec: self.spec.to_string(),
            column: self.spec[..at.min(self.spec.len())].chars().count() + 1,
            message: message.into(),
        }
    }

    fn words(&self) -> Vec<Span<'a>> {
        let mut words = Vec::new();
        let mut start = None;
        for (i, c) in self.spec.char_indices().chain([(self.spec.len(), ' ')]) {
            match (c.is_whitespace(), start) {
                (false, None) => start = Some(i),
                (true, Some(s)) => {
                    words.push(Span { text: &self.spec[s..i], start: s });
                    start = None;
                }
                _ => {}
            }
        }
        words
    }

    fn spec(self) -> Result<ProbeSpec, SpecError> {
        let words = self.words();
        let Some(&head) = words.first() else {
            return Err(self.error(0, "empty probe spec; expected e.g. `p:work x=$arg1`"));
        };
        let kind = match head.text.as_bytes()[0] {
            b'p' => ProbeKind::Entry,
            b'r' => return Err(self.error(head.start, "return probes (`r`) are not implemented yet; use `p` for now")),
            _ => return Err(self.error(head.start, "a probe spec starts with `p`, as in `p:work x=$arg1`")),
        };
        let after_kind = head.from(1);
        // Which word is the location, and what names the event (if anything).
        let (event_span, location, rest) = match after_kind.text.strip_prefix(':') {
            None if !after_kind.text.is_empty() => {
                return Err(self.error(after_kind.start, "expected `:EVENT` or a space after the probe kind `p`"))
            }
            None => match words.get(1) {
                Some(&location) => (None, location, &words[2..]),
                None => return Err(self.error(self.spec.len(), "missing probe location")),
            },
            Some(_) => {
                let name = after_kind.from(1);
                if name.text.is_empty() {
                    return Err(self.error(name.start, "missing event name or location after `p:`"));
                }
                match words.get(1) {
                    Some(&location) if !location.text.contains('=') => (Some(name), location, &words[2..]),
                    _ => (None, name, &words[1..]),
                }
            }
        };
        let location_parsed = self.location(location)?;
        let (group, event) = match event_span {
            Some(span) => {
                let (group, event) = match span.split_once('/') {
                    Some((group, event)) => (Some(self.ident(group, "group name")?), event),
                    None => (None, span),
                };
                (group, self.ident(event, "event name")?)
            }
            None => (None, default_event_name(&location_parsed)),
        };
        let mut args: Vec<FetchArg> = Vec::new();
        for &word in rest {
            let arg = self.fetch_arg(word)?;
            if args.iter().any(|a| a.name == arg.name) {
                return Err(self.error(word.start, format!("duplicate field name `{}`", arg.name)));
            }
            args.push(arg);
        }
        Ok(ProbeSpec { text: self.spec.trim().to_string(), kind, group, event, location: location_parsed, args })
    }

    /// A name as the kernel allows for events, groups and fields: `[A-Za-z_][A-Za-z0-9_]*`.
    fn ident(&self, span: Span<'a>, what: &str) -> Result<String, SpecError> {
        if span.text.is_empty() {
            return Err(self.error(span.start, format!("empty {what}")));
        }
        let (ident, rest) = span.split_ident();
        if let Some(c) = rest.text.chars().next() {
            return Err(
                self.error(rest.start, format!("invalid character `{c}` in {what} (use letters, digits and `_`)"))
            );
        }
        if ident.text.as_bytes()[0].is_ascii_digit() {
            return Err(self.error(span.start, format!("{what} must not start with a digit")));
        }
        Ok(ident.text.to_string())
    }

    fn location(&self, span: Span<'a>) -> Result<Location, SpecError> {
        if let Some(hex) = span.text.strip_prefix("0x") {
            return u64::from_str_radix(hex, 16)
                .map(Location::Address)
                .map_err(|_| self.error(span.start, format!("bad address `{}`", span.text)));
        }
        let (symbol, offset) = match span.rsplit_once('+') {
            Some((symbol, offset)) => {
                let value = parse_number(offset.text).ok_or_else(|| {
                    self.error(offset.start, format!("bad offset `{}`; expected a number like 8 or 0x8", offset.text))
                })?;
                (symbol, value)
            }
            None => (span, 0),
        };
        if symbol.text.is_empty() {
            return Err(self.error(symbol.start, "missing symbol before `+OFFSET`"));
        }
        if let Some((module, name)) = symbol.split_once(':') {
            if module.text.is_empty() {
                return Err(self.error(module.start, "empty module name before `:`"));
            }
            if name.text.is_empty() {
                return Err(self.error(name.start, "missing symbol after `MODULE:`"));
            }
        }
        let name = symbol.text.to_string();
        Ok(match offset {
            0 => Location::Symbol(name),
            offset => Location::SymbolOffset(name, offset),
        })
    }

    fn fetch_arg(&self, word: Span<'a>) -> Result<FetchArg, SpecError> {
        let Some((name, value)) = word.split_once('=') else {
            return Err(
                self.error(word.start, format!("expected NAME=FETCHARG (e.g. `x=$arg1`), found `{}`", word.text))
            );
        };
        let name = self.ident(name, "field name")?;
        if value.text.is_empty() {
            return Err(self.error(value.start, "missing fetch argument after `=`"));
        }
        let (fetch, rest) = self.fetch(value)?;
        let ty = match rest.text.strip_prefix(':') {
            Some(_) => self.fetch_type(rest.from(1))?,
            None if rest.text.is_empty() => FetchType::DEFAULT,
            None => return Err(self.error(rest.start, format!("unexpected `{}` after the fetch argument", rest.text))),
        };
        Ok(FetchArg { name, fetch, ty })
    }

    /// One fetch argument at the start of `span`: the value and the unparsed rest.
    fn fetch(&self, span: Span<'a>) -> Result<(Fetch, Span<'a>), SpecError> {
        let first = span.text.chars().next().unwrap_or(' ');
        let (word, rest) = span.from(first.len_utf8()).split_ident();
        match first {
            '%' => {
                let reg = REG_NAMES
                    .iter()
                    .find(|(name, _)| *name == word.text)
                    .map(|&(_, reg)| reg)
                    .ok_or_else(|| self.error(word.start, format!("unknown register `{}`", word.text)))?;
                Ok((Fetch::Reg(reg), rest))
            }
            '$' => Ok((self.variable(word)?, rest)),
            '+' | '-' | '0'..='9' => {
                Err(self.error(span.start, "memory fetches `+OFFSET(FETCHARG)` are not implemented yet"))
            }
            '@' => Err(self.error(span.start, "`@ADDR` fetches are not implemented yet")),
            _ => Err(self.error(span.start, format!("unknown fetch argument `{}`; expected %REG or $argN", span.text))),
        }
    }

    /// `$NAME`, without the `$`.
    fn variable(&self, word: Span<'a>) -> Result<Fetch, SpecError> {
        if let Some(n) = word.text.strip_prefix("arg") {
            return match n.parse::<u8>() {
                Ok(n @ 1..=MAX_ARG) => Ok(Fetch::Arg(n)),
                Ok(0) => Err(self.error(word.start, "arguments count from 1: `$arg1` is the first")),
                Ok(_) => Err(self.error(
                    word.start,
                    format!("`${}` is not passed in a register; $arg1..$arg{MAX_ARG} are", word.text),
                )),
                Err(_) => Err(self.error(word.start, format!("unknown variable `${}`", word.text))),
            };
        }
        match word.text {
            "retval" => {
                Err(self.error(word.start, "`$retval` needs a return probe (`r`), which is not implemented yet"))
            }
            "comm" | "stack" => Err(self.error(word.start, format!("`${}` is not implemented yet", word.text))),
            _ if word.text.starts_with("stack") => {
                Err(self.error(word.start, format!("`${}` is not implemented yet", word.text)))
            }
            _ => {
                Err(self.error(word.start, format!("unknown variable `${}`; expected $arg1..$arg{MAX_ARG}", word.text)))
            }
        }
    }

    /// The `TYPE` after `:`.
    fn fetch_type(&self, span: Span<'a>) -> Result<FetchType, SpecError> {
        let mut chars = span.text.chars();
        let format = match chars.next() {
            Some('u') => Some(Format::Unsigned),
            Some('s') => Some(Format::Signed),
            Some('x') => Some(Format::Hex),
            _ => None,
        };
        let bits = chars.as_str().parse::<u8>().ok().filter(|b| [8, 16, 32, 64].contains(b));
        match (format, bits) {
            (Some(format), Some(bits)) => Ok(FetchType { format, bits }),
            _ if matches!(span.text, "string" | "ustring" | "symbol" | "symstr") => {
                Err(self.error(span.start, format!("type `{}` is not implemented yet", span.text)))
            }
            _ => Err(self.error(
                span.start,
                format!("unknown type `{}`; expected u64, s64 or x64 (or 8, 16, 32 bits)", span.text),
            )),
        }
    }
}

/// The kernel's default event name: the symbol for an offset of 0, `p_SYMBOL_OFFSET`
/// otherwise, `p_0xADDR` for an address; characters that are not allowed in an event name
/// (the `:` of `MODULE:SYMBOL`, the `.` of `foo.cold`) become `_`.
fn default_event_name(location: &Location) -> String {
    let sanitize = |s: &str| -> String { s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect() };
    match location {
        Location::Symbol(symbol) => sanitize(symbol),
        Location::SymbolOffset(symbol, offset) => format!("p_{}_{offset}", sanitize(symbol)),
        Location::Address(addr) => format!("p_0x{addr:x}"),
    }
}

fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg(name: &str, fetch: Fetch, ty: FetchType) -> FetchArg {
        FetchArg { name: name.into(), fetch, ty }
    }

    const X64: FetchType = FetchType { format: Format::Hex, bits: 64 };

    #[test]
    fn accepted_specs() {
        let sym = |s: &str| Location::Symbol(s.into());
        type Case = (&'static str, Option<&'static str>, &'static str, Location, Vec<FetchArg>);
        // (spec, group, event, location, args)
        let cases: Vec<Case> = vec![
            ("p work", None, "work", sym("work"), vec![]),
            ("p:work", None, "work", sym("work"), vec![]),
            ("p work+0", None, "work", sym("work"), vec![]),
            ("p work+0x8", None, "p_work_8", Location::SymbolOffset("work".into(), 8), vec![]),
            ("p 0x401126", None, "p_0x401126", Location::Address(0x401126), vec![]),
            ("p:myev work", None, "myev", sym("work"), vec![]),
            ("p:grp/myev work+4", Some("grp"), "myev", Location::SymbolOffset("work".into(), 4), vec![]),
            ("p:libc:malloc", None, "libc_malloc", sym("libc:malloc"), vec![]),
            ("p:ev libc:malloc", None, "ev", sym("libc:malloc"), vec![]),
            (
                "p:libc:malloc size=%rdi",
                None,
                "libc_malloc",
                sym("libc:malloc"),
                vec![arg("size", Fetch::Reg(Reg::Rdi), FetchType::DEFAULT)],
            ),
            (
                "  p:checksum   seed=$arg1 n=$arg2:s32 ip=%ip:x64  ",
                None,
                "checksum",
                sym("checksum"),
                vec![
                    arg("seed", Fetch::Arg(1), FetchType::DEFAULT),
                    arg("n", Fetch::Arg(2), FetchType { format: Format::Signed, bits: 32 }),
                    arg("ip", Fetch::Reg(Reg::Rip), X64),
                ],
            ),
        ];
        for (text, group, event, location, args) in cases {
            let spec = ProbeSpec::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(spec.group.as_deref(), group, "{text}");
            assert_eq!(spec.event, event, "{text}");
            assert_eq!(spec.location, location, "{text}");
            assert_eq!(spec.args, args, "{text}");
            assert_eq!(spec.text, text.trim());
        }
    }

    #[test]
    fn every_register_name_parses() {
        for &(name, reg) in REG_NAMES {
            let spec = ProbeSpec::parse(&format!("p work v=%{name}")).unwrap();
            assert_eq!(spec.args[0].fetch, Fetch::Reg(reg), "{name}");
        }
    }

    #[test]
    fn errors_name_the_column() {
        // (spec, message, column)
        let cases = [
            ("p:work x=%rdz", "unknown register `rdz`", 11),
            ("", "empty probe spec; expected e.g. `p:work x=$arg1`", 1),
            ("q work", "a probe spec starts with `p`, as in `p:work x=$arg1`", 1),
            ("r:work", "return probes (`r`) are not implemented yet; use `p` for now", 1),
            ("px work", "expected `:EVENT` or a space after the probe kind `p`", 2),
            ("p", "missing probe location", 2),
            ("p:", "missing event name or location after `p:`", 3),
            ("p:my-ev work", "invalid character `-` in event name (use letters, digits and `_`)", 5),
            ("p:g/ work", "empty event name", 5),
            ("p work+zz", "bad offset `zz`; expected a number like 8 or 0x8", 8),
            ("p 0xzz", "bad address `0xzz`", 3),
            ("p +4", "missing symbol before `+OFFSET`", 3),
            ("p :malloc", "empty module name before `:`", 3),
            ("p work x", "expected NAME=FETCHARG (e.g. `x=$arg1`), found `x`", 8),
            ("p work 1x=%rax", "field name must not start with a digit", 8),
            ("p work x=", "missing fetch argument after `=`", 10),
            ("p work x=$arg7", "`$arg7` is not passed in a register; $arg1..$arg6 are", 11),
            ("p work x=$arg0", "arguments count from 1: `$arg1` is the first", 11),
            ("p work x=$retval", "`$retval` needs a return probe (`r`), which is not implemented yet", 11),
            ("p work x=$foo", "unknown variable `$foo`; expected $arg1..$arg6", 11),
            ("p work x=+8(%rdi)", "memory fetches `+OFFSET(FETCHARG)` are not implemented yet", 10),
            ("p work x=rdi", "unknown fetch argument `rdi`; expected %REG or $argN", 10),
            ("p work x=%rdi:u65", "unknown type `u65`; expected u64, s64 or x64 (or 8, 16, 32 bits)", 15),
            ("p work x=%rdi:string", "type `string` is not implemented yet", 15),
            ("p work x=%rdi+1", "unexpected `+1` after the fetch argument", 14),
            ("p work x=%rdi x=%rsi", "duplicate field name `x`", 15),
        ];
        for (text, message, column) in cases {
            let err = ProbeSpec::parse(text).expect_err(text);
            assert_eq!((err.message.as_str(), err.column), (message, column), "{text}");
        }
    }

    #[test]
    fn caret_points_at_the_column() {
        let err = ProbeSpec::parse("p:work x=%rdz").unwrap_err();
        assert_eq!(err.to_string(), "unknown register `rdz` at column 11");
        assert_eq!(err.caret(), "  p:work x=%rdz\n            ^");
    }

    #[test]
    fn types_truncate_and_sign_extend() {
        let t = |format, bits| FetchType { format, bits };
        let cases = [
            (t(Format::Unsigned, 64), u64::MAX, u64::MAX),
            (t(Format::Unsigned, 8), 0x1ff, 0xff),
            (t(Format::Hex, 16), 0x12345, 0x2345),
            (t(Format::Signed, 32), 0xffff_ffff, -1i64 as u64),
            (t(Format::Signed, 32), 0x1_7fff_ffff, 0x7fff_ffff),
            (t(Format::Signed, 8), 0x80, -128i64 as u64),
            (t(Format::Signed, 64), -5i64 as u64, -5i64 as u64),
        ];
        for (ty, raw, want) in cases {
            assert_eq!(ty.apply(raw), want, "{ty} {raw:#x}");
        }
    }

    #[test]
    fn full_event_name_includes_the_group() {
        let spec = ProbeSpec::parse("p:grp/ev work").unwrap();
        assert_eq!(spec.full_event_name(), "grp/ev");
        assert_eq!(ProbeSpec::parse("p work").unwrap().full_event_name(), "work");
    }
}
