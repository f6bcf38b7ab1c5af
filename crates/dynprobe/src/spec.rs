//! The probe-spec grammar of `dynprobe probe`, modelled on the kernel's `kprobe_events` and
//! `uprobe_events`.
//!
#![doc = concat!("```text\n", include_str!("spec_grammar.txt"), "```")]
//!
//!
//! What the kernel does, this does:
//!
//! - A memory fetch reads as many bytes as its type has (`+4($arg1):u16` reads two bytes);
//!   the reads it nests through are 8-byte pointers.
//! - `:string` on a memory fetch reads the string *at* the address the fetch would read
//!   (`+0(%rdi):string` and `@name:string` are the characters there); on a register or an
//!   argument the value is the string's address (`$arg2:string` is `char *` argument 2).
//! - In a return probe, `$argN` is fetched when the function is entered and kept until it
//!   returns (as the kernel does since 6.9): `+0($arg1)` reads, at the return, what the
//!   pointer passed at the entry points to — a struct the function filled in, say. Of the
//!   registers, only those known at a return can be named there: `%rax`, `%rdx` (the
//!   return value), `%rsp` and `%rip` (the address returned to).
//! - `r` probes a function's entry to catch its return, so a return spec takes no offset;
//!   `rN` allows N calls in flight per thread (recursion, the kernel's `maxactive`).
//! - An event is named after its location unless named: `SYMBOL` for `p` and
//!   `SYMBOL__return` for `r` (as `perf probe` names them), `p_SYMBOL_OFFSET` for an offset,
//!   `p_0xADDR` / `r_0xADDR` for an address.
//! - `m` probes a static marker ([`crate::marker`](mod@crate::marker)): every site of `PROVIDER:NAME`, where
//!   either part may be `*` (every provider, every name). Without fields, an event shows
//!   every argument of the marker, `arg1`..`argN`, typed by the site's record; with fields,
//!   `$argN` is the marker's Nth argument where the site keeps it (a register or a stack
//!   slot, read as the field's type), and the rest is as for `p` at the site. An unnamed
//!   marker event is named `PROVIDER/NAME` (its group is the provider, as `perf` names SDT
//!   events `sdt_PROVIDER:NAME`); a `*` there stands for the name of the marker hit.
//!
//! As a shorthand, `p:SYMBOL NAME=...` probes SYMBOL: the kernel's `p:EVENT SYMBOL` names
//! an event and then a location, so the word after `p:` is an event name only when a
//! location follows it (a location never contains `=`, a fetch argument always does).
//!
//! `@MODULE:SYMBOL` and `@SYMBOL:TYPE` share a colon: with a single colon, the part after it
//! is a type when it is a type's name (`@count:u32`), a symbol otherwise
//! (`@libc:environ`). Write `@MODULE:SYMBOL:TYPE` when a symbol is called like a type.
//!
//! The CLI parses every spec before it starts the program, so syntax errors are reported
//! with their column and nothing runs; the agent parses the same text again inside the
//! program. Both use this module, so they cannot disagree. `@SYMBOL`s are resolved where
//! the symbols are, with [`ProbeSpec::resolve_symbols`].
//!
//! ```
//! use dynprobe::spec::{Fetch, ProbeSpec, Reg};
//! let spec = ProbeSpec::parse("p:checksum seed=$arg1 acc=%rax:x64").unwrap();
//! assert_eq!(spec.event, "checksum");
//! assert_eq!(spec.args[0].fetch, Fetch::Arg(1));
//! assert_eq!(spec.args[1].fetch, Fetch::Reg(Reg::Rax));
//!
//! let spec = ProbeSpec::parse("r:parse ret=$retval:s32 name=+8($arg1):string").unwrap();
//! assert_eq!(spec.event, "parse__return");
//! assert_eq!(spec.args[1].fetch, Fetch::Deref { offset: 8, base: Box::new(Fetch::Arg(1)) });
//!
//! let err = ProbeSpec::parse("p:work x=%rdz").unwrap_err();
//! assert_eq!(err.to_string(), "unknown register `rdz` at column 11");
//! let err = ProbeSpec::parse("p:work x=$retval").unwrap_err();
//! assert_eq!(err.to_string(), "`$retval` is only available in return probes (r:) at column 11");
//! ```

use crate::internals::MAX_DEPTH;
use crate::Location;
use std::fmt;

/// One parsed probe spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// The spec as the user wrote it (trimmed).
    pub text: String,
    /// What kind of probe.
    pub kind: ProbeKind,
    /// `rN`: the most calls per thread a return probe tracks at once; `None` for the
    /// default (and always for `p`).
    pub maxactive: Option<usize>,
    /// The event's group, when `p:GROUP/EVENT` named one.
    pub group: Option<String>,
    /// The event's name: as given, or derived from the location like the kernel does.
    pub event: String,
    /// Where the probe goes (for `r`, the function whose calls are probed; for `m`, the
    /// marker).
    pub location: Target,
    /// The values recorded at each hit, in order.
    pub args: Vec<FetchArg>,
}

/// The kind of a probe, the first letter of its spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// `p`: a probe at an instruction.
    Entry,
    /// `r`: a probe on a function's return.
    Return,
    /// `m`: a probe on every site of a static marker.
    Marker,
}

impl ProbeKind {
    /// The spec's first letter: `p`, `r` or `m`.
    pub fn letter(self) -> char {
        match self {
            ProbeKind::Entry => 'p',
            ProbeKind::Return => 'r',
            ProbeKind::Marker => 'm',
        }
    }
}

/// What a spec probes: a place in the code (`p`, `r`) or a static marker (`m`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An instruction or a function.
    Code(Location),
    /// `PROVIDER:NAME` of a marker, either part possibly `*`, as
    /// [`Marker::find`](crate::marker::Marker::find) takes it.
    Marker(String),
}

impl Target {
    /// The code location, `None` for a marker.
    pub fn code(&self) -> Option<&Location> {
        match self {
            Target::Code(location) => Some(location),
            Target::Marker(_) => None,
        }
    }
}

/// `NAME=FETCHARG[:TYPE]`: one value recorded at each hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchArg {
    /// The field's name in the event.
    pub name: String,
    /// Where the value comes from.
    pub fetch: Fetch,
    /// How the value is sized and printed. A source variable (and `$retval` of a function
    /// with DWARF) left at the default `u64` takes its type from the DWARF.
    pub ty: FetchType,
}

/// Where a fetched value comes from.
///
/// Deliberately not `#[non_exhaustive]`: whoever reads values must fail to compile until
/// it handles a new form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetch {
    /// `%REG`.
    Reg(Reg),
    /// `$argN`: the Nth SysV ABI integer argument, 1-based as in the kernel (1..=6). In a
    /// return probe, its value at the function's entry.
    Arg(u8),
    /// `$retval`: the return value (`rax`), in a return probe.
    Retval,
    /// `$stackN`: the 8 bytes at `rsp + 8 * N`.
    Stack(u32),
    /// `$stack`: `rsp`.
    StackPointer,
    /// `$comm`: the thread's name.
    Comm,
    /// `$duration`: nanoseconds from the function's entry to its return, in a return probe.
    Duration,
    /// `@ADDR`, `@SYMBOL+OFF`: the memory at a fixed address.
    Memory(Address),
    /// `NAME`, `req->path`, `cfg.limits[2]`, `*count`: a variable of the program's source,
    /// read from its DWARF (see [`VarExpr`]). The CLI lowers it to the other forms before a
    /// probe is placed.
    Var(VarExpr),
    /// `+OFF(FETCHARG)`: the memory at `base + offset`.
    Deref {
        /// Added to the base's value (wrapping).
        offset: i64,
        /// The fetch giving the address.
        base: Box<Fetch>,
    },
}

/// The address of an `@` fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `@0x...`, or a symbol after [`ProbeSpec::resolve_symbols`].
    Absolute(u64),
    /// `@[MODULE:]SYMBOL[+|-OFF]`, not resolved yet.
    Symbol {
        /// `SYMBOL` or `MODULE:SYMBOL`, as [`ProbeSpec::resolve_symbols`]'s lookup takes it.
        symbol: String,
        /// Bytes past the symbol.
        offset: i64,
    },
}

/// A source variable with member accesses, as `perf probe` takes them:
/// `*`… `NAME` ( `.MEMBER` | `->MEMBER` | `[N]` )….
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarExpr {
    /// How many `*` precede the name.
    pub derefs: usize,
    /// The variable's name.
    pub name: String,
    /// What follows it, in order.
    pub steps: Vec<VarStep>,
}

/// One access after a variable's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VarStep {
    /// `.MEMBER`.
    Field(String),
    /// `->MEMBER`.
    Arrow(String),
    /// `[N]`.
    Index(u64),
}

impl VarExpr {
    /// The field name an unnamed variable gets: `req->path` → `req_path`, `*count` →
    /// `count`, `cfg.limits[2]` → `cfg_limits_2`.
    pub fn field_name(&self) -> String {
        let mut name = self.name.clone();
        for step in &self.steps {
            match step {
                VarStep::Field(m) | VarStep::Arrow(m) => name.push_str(&format!("_{m}")),
                VarStep::Index(i) => name.push_str(&format!("_{i}")),
            }
        }
        name
    }
}

impl fmt::Display for VarExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", "*".repeat(self.derefs), self.name)?;
        for step in &self.steps {
            match step {
                VarStep::Field(m) => write!(f, ".{m}")?,
                VarStep::Arrow(m) => write!(f, "->{m}")?,
                VarStep::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

/// The forms of a probe location and fetch argument that read the program's DWARF, for
/// `probe --help` and its test that every form is documented.
pub const SOURCE_FORMS: &[&str] = &["FUNC:RELLINE", "FILE:LINE", "FUNC@FILE", "VAR", "->", "[N]"];

/// A probe location that names the source (`FUNC:RELLINE`, `FILE:LINE`, `FUNC@FILE`), as
/// the symbols crate's DWARF reader resolves it.
pub use dynprobe_symbols::dwarf::SourcePoint;

/// The source location a location's text names, if it names one: a symbol with `@`, or
/// ending in `:DIGITS` (a file when the part before has a `.` or `/`, else a function).
/// `MODULE:SYMBOL` and `SYMBOL+OFF` are not source locations.
pub fn source_point(location: &Location) -> Option<SourcePoint> {
    let Location::Symbol(text) = location else { return None };
    let (head, line) = match text.rsplit_once(':') {
        Some((head, line)) if !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit()) => {
            (head, Some(line.parse::<u64>().ok()?))
        }
        _ => (text.as_str(), None),
    };
    let (name, file) = match head.split_once('@') {
        Some((name, file)) => (name, Some(file.to_string())),
        None => (head, None),
    };
    match (line, file) {
        (None, None) => None,
        (None, Some(file)) => Some(SourcePoint::Function { name: name.to_string(), file: Some(file) }),
        (Some(line), None) if name.contains(['.', '/']) => Some(SourcePoint::FileLine { file: name.to_string(), line }),
        (Some(line), file) => Some(SourcePoint::FunctionLine { name: name.to_string(), file, line }),
    }
}

/// The event name a probe at a source location gets by default: `FUNC`, `FUNC_L3`,
/// `source_c_31`.
fn source_event_name(point: &SourcePoint) -> String {
    let sanitize = |s: &str| -> String { s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect() };
    match point {
        SourcePoint::Function { name, .. } => sanitize(name),
        SourcePoint::FunctionLine { name, line, .. } => format!("{}_L{line}", sanitize(name)),
        SourcePoint::FileLine { file, line } => {
            let base = file.rsplit('/').next().unwrap_or(file);
            format!("{}_{line}", sanitize(base))
        }
    }
}

impl Fetch {
    /// Calls `each` on this fetch and on every fetch it is built on, outermost first.
    pub fn walk(&self, each: &mut impl FnMut(&Fetch)) {
        each(self);
        if let Fetch::Deref { base, .. } = self {
            base.walk(each);
        }
    }

    /// Whether reading the value reads memory (so `:string` reads the string there).
    pub fn reads_memory(&self) -> bool {
        matches!(self, Fetch::Stack(_) | Fetch::Memory(_) | Fetch::Deref { .. })
    }
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
    Xmm0,
    Xmm1,
    Xmm2,
    Xmm3,
    Xmm4,
    Xmm5,
    Xmm6,
    Xmm7,
    Xmm8,
    Xmm9,
    Xmm10,
    Xmm11,
    Xmm12,
    Xmm13,
    Xmm14,
    Xmm15,
}

impl Reg {
    /// The vector registers, `%xmm0`..`%xmm15`: a fetch reads the low 64 bits (a
    /// `double`; a `float` is the low 32, `:x32`).
    pub const XMM: [Reg; 16] = [
        Reg::Xmm0,
        Reg::Xmm1,
        Reg::Xmm2,
        Reg::Xmm3,
        Reg::Xmm4,
        Reg::Xmm5,
        Reg::Xmm6,
        Reg::Xmm7,
        Reg::Xmm8,
        Reg::Xmm9,
        Reg::Xmm10,
        Reg::Xmm11,
        Reg::Xmm12,
        Reg::Xmm13,
        Reg::Xmm14,
        Reg::Xmm15,
    ];

    /// `n` for `%xmmN`, `None` for a general register.
    pub fn xmm(self) -> Option<usize> {
        Reg::XMM.iter().position(|&r| r == self)
    }

    /// The register of a name as `%NAME` takes it (`rdi`, or the kernel's `di`).
    pub fn from_name(name: &str) -> Option<Reg> {
        REG_NAMES.iter().find(|(n, _)| *n == name).map(|&(_, reg)| reg)
    }

    /// Whether a return probe's return handler knows the register: the return value's
    /// `rax` and `rdx` (`xmm0` and `xmm1` for floating point), the caller's `rsp` and the
    /// return address `rip`.
    pub fn known_at_return(self) -> bool {
        matches!(self, Reg::Rax | Reg::Rdx | Reg::Rsp | Reg::Rip | Reg::Xmm0 | Reg::Xmm1)
    }
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
    ("xmm0", Reg::Xmm0),
    ("xmm1", Reg::Xmm1),
    ("xmm2", Reg::Xmm2),
    ("xmm3", Reg::Xmm3),
    ("xmm4", Reg::Xmm4),
    ("xmm5", Reg::Xmm5),
    ("xmm6", Reg::Xmm6),
    ("xmm7", Reg::Xmm7),
    ("xmm8", Reg::Xmm8),
    ("xmm9", Reg::Xmm9),
    ("xmm10", Reg::Xmm10),
    ("xmm11", Reg::Xmm11),
    ("xmm12", Reg::Xmm12),
    ("xmm13", Reg::Xmm13),
    ("xmm14", Reg::Xmm14),
    ("xmm15", Reg::Xmm15),
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

/// The highest `$argN`: arguments past the sixth are on the stack, which `$stackN` reaches.
pub const MAX_ARG: u8 = 6;

/// The most memory reads one fetch argument makes (nested `+OFF(...)`, `@`, `$stackN`):
/// its evaluation is a fixed array of steps, built once.
pub const MAX_DEREF: usize = 8;

/// The most bytes of a `string` printed; a longer string is cut there, as the kernel cuts
/// at its `MAX_STRING_SIZE`.
pub const STRING_MAX: usize = 256;

/// The grammar as `dynprobe probe --help` shows it (and this module's documentation).
/// [`keywords`] lists what it must name.
pub const GRAMMAR: &str = include_str!("spec_grammar.txt");

/// Every type a fetch argument may name: the parser reads a type by finding its name here.
pub const TYPES: [FetchType; 16] = [
    FetchType::Int(IntType { format: Format::Unsigned, bits: 8 }),
    FetchType::Int(IntType { format: Format::Unsigned, bits: 16 }),
    FetchType::Int(IntType { format: Format::Unsigned, bits: 32 }),
    FetchType::Int(IntType::U64),
    FetchType::Int(IntType { format: Format::Signed, bits: 8 }),
    FetchType::Int(IntType { format: Format::Signed, bits: 16 }),
    FetchType::Int(IntType { format: Format::Signed, bits: 32 }),
    FetchType::Int(IntType { format: Format::Signed, bits: 64 }),
    FetchType::Int(IntType { format: Format::Hex, bits: 8 }),
    FetchType::Int(IntType { format: Format::Hex, bits: 16 }),
    FetchType::Int(IntType { format: Format::Hex, bits: 32 }),
    FetchType::Int(IntType { format: Format::Hex, bits: 64 }),
    FetchType::Float(32),
    FetchType::Float(64),
    FetchType::String,
    FetchType::UString,
];

/// The `$` variables with a fixed name, as the parser knows them: the name after `$`, what
/// it fetches, and whether only a return probe has it.
const NAMED_VARIABLES: [(&str, Fetch, bool); 4] = [
    ("retval", Fetch::Retval, true),
    ("duration", Fetch::Duration, true),
    ("comm", Fetch::Comm, false),
    ("stack", Fetch::StackPointer, false),
];

/// The `$` variables that take a number after their name (`$arg1`, `$stack0`).
const NUMBERED_VARIABLES: [&str; 2] = ["arg", "stack"];

/// What a fetch argument may start with, as the parser dispatches on its first character:
/// a register, a variable, a memory fetch at an address or a symbol, a memory fetch
/// relative to another fetch argument.
const FETCH_FORMS: [&str; 6] = ["%REG", "$", "@ADDR", "@[MODULE:]SYMBOL", "+OFF(FETCHARG)", "-OFF("];

/// The start of each probe kind as [`GRAMMAR`] writes it (`r[N]`: the `maxactive` N).
const KINDS: [&str; 3] = ["p[:", "r[N][:", "m[:"];

/// Every keyword of the grammar the parser accepts, as a user writes it — each probe kind,
/// each form of a fetch argument, each `$` variable, each type — for documentation to be
/// checked against, so that it cannot fall behind the parser. [`GRAMMAR`] names them all.
///
/// ```
/// for keyword in dynprobe::spec::keywords() {
///     assert!(dynprobe::spec::GRAMMAR.contains(&keyword), "{keyword}");
/// }
/// ```
pub fn keywords() -> Vec<String> {
    let kinds = KINDS.iter().map(|k| k.to_string());
    let forms = FETCH_FORMS.iter().filter(|f| **f != "$").map(|f| f.to_string());
    let named = NAMED_VARIABLES.iter().map(|(name, ..)| format!("${name}"));
    let numbered = NUMBERED_VARIABLES.iter().map(|name| format!("${name}N"));
    let types = TYPES.iter().map(|t| t.to_string());
    let source = SOURCE_FORMS.iter().map(|f| f.to_string());
    kinds.chain(forms).chain(named).chain(numbered).chain(types).chain(source).chain(["+uOFF(".to_string()]).collect()
}

/// How a fetched value is read and printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchType {
    /// `u8`..`u64`, `s8`..`s64`, `x8`..`x64`.
    Int(IntType),
    /// `string`: a NUL-terminated string, printed quoted.
    String,
    /// `ustring`: the same (the kernel's user-space string; here everything is user space).
    UString,
    /// `f32`, `f64`: an IEEE 754 `float` or `double` (its width in bits), from the low bits
    /// of a register (`%xmm0`'s for a `double` argument) or from memory — which the kernel's
    /// types leave out and `bpftrace` users expect.
    Float(u8),
}

impl FetchType {
    /// `u64`, used when no type is given.
    pub const DEFAULT: FetchType = FetchType::Int(IntType::U64);

    /// Whether the value is a string.
    pub fn is_string(self) -> bool {
        matches!(self, FetchType::String | FetchType::UString)
    }
}

impl fmt::Display for FetchType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchType::Int(int) => int.fmt(f),
            FetchType::String => f.write_str("string"),
            FetchType::UString => f.write_str("ustring"),
            FetchType::Float(bits) => write!(f, "f{bits}"),
        }
    }
}

/// An integer type: the kernel's `u8`..`u64`, `s8`..`s64`, `x8`..`x64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntType {
    /// Decimal, signed decimal or hex.
    pub format: Format,
    /// The width in bits: 8, 16, 32 or 64. The value is truncated to it (and sign-extended
    /// from it for signed types); a memory fetch reads this many bits.
    pub bits: u8,
}

/// How an integer is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Unsigned decimal (`u`).
    Unsigned,
    /// Signed decimal (`s`).
    Signed,
    /// Hexadecimal with a `0x` prefix (`x`).
    Hex,
}

impl IntType {
    /// `u64`.
    pub const U64: IntType = IntType { format: Format::Unsigned, bits: 64 };

    /// The raw 64-bit value truncated to the type's width, as the bits to print: for a
    /// signed type, sign-extended to 64 bits (read the result as an `i64`).
    pub fn apply(self, raw: u64) -> u64 {
        let shift = 64 - u32::from(self.bits);
        match self.format {
            Format::Signed => (((raw << shift) as i64) >> shift) as u64,
            Format::Unsigned | Format::Hex => (raw << shift) >> shift,
        }
    }

    /// The width in bytes.
    pub fn bytes(self) -> usize {
        usize::from(self.bits / 8)
    }
}

impl fmt::Display for IntType {
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
#[non_exhaustive]
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
        Parser { spec: text, kind: ProbeKind::Entry }.spec()
    }

    /// The event name as printed: `GROUP/EVENT`, or `EVENT` without a group.
    pub fn full_event_name(&self) -> String {
        match &self.group {
            Some(group) => format!("{group}/{}", self.event),
            None => self.event.clone(),
        }
    }

    /// Whether some `@SYMBOL` fetch is still to be resolved.
    pub fn needs_symbols(&self) -> bool {
        let mut found = false;
        for arg in &self.args {
            arg.fetch.walk(&mut |f| found |= matches!(f, Fetch::Memory(Address::Symbol { .. })));
        }
        found
    }

    /// Whether some fetch reads a vector register (`%xmmN`): its probe must be built with
    /// [`crate::Probe::reads_vectors`].
    pub fn reads_vectors(&self) -> bool {
        let mut found = false;
        for arg in &self.args {
            arg.fetch.walk(&mut |f| found |= matches!(f, Fetch::Reg(r) if r.xmm().is_some()));
        }
        found
    }

    /// Replaces every `@SYMBOL` fetch by its address, via `lookup("[module:]symbol")`; the
    /// error names the field and the symbol.
    pub fn resolve_symbols(&mut self, mut lookup: impl FnMut(&str) -> Result<u64, String>) -> Result<(), String> {
        fn resolve(
            fetch: &mut Fetch,
            field: &str,
            lookup: &mut dyn FnMut(&str) -> Result<u64, String>,
        ) -> Result<(), String> {
            match fetch {
                Fetch::Memory(address) => {
                    if let Address::Symbol { symbol, offset } = address {
                        let addr =
                            lookup(symbol).map_err(|e| format!("field `{field}`: cannot resolve `@{symbol}`: {e}"))?;
                        let resolved = addr.wrapping_add_signed(*offset);
                        *address = Address::Absolute(resolved);
                    }
                    Ok(())
                }
                Fetch::Deref { base, .. } => resolve(base, field, lookup),
                _ => Ok(()),
            }
        }
        for arg in &mut self.args {
            resolve(&mut arg.fetch, &arg.name, &mut lookup)?;
        }
        Ok(())
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

    /// The byte just past the span.
    fn end(self) -> usize {
        self.start + self.text.len()
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

    /// The leading run of characters that satisfy `keep`, and the rest.
    fn split_while(self, keep: impl Fn(char) -> bool) -> (Span<'a>, Span<'a>) {
        let end = self.text.find(|c: char| !keep(c)).unwrap_or(self.text.len());
        (self.to(end), self.from(end))
    }

    /// The leading run of identifier characters and the rest.
    fn split_ident(self) -> (Span<'a>, Span<'a>) {
        self.split_while(|c| c.is_ascii_alphanumeric() || c == '_')
    }
}

struct Parser<'a> {
    spec: &'a str,
    /// The probe's kind, once the first word is read: what a fetch may name depends on it.
    kind: ProbeKind,
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

    fn spec(mut self) -> Result<ProbeSpec, SpecError> {
        let words = self.words();
        let Some(&head) = words.first() else {
            return Err(self.error(0, "empty probe spec; expected e.g. `p:work x=$arg1`"));
        };
        self.kind = match head.text.as_bytes()[0] {
            b'p' => ProbeKind::Entry,
            b'r' => ProbeKind::Return,
            b'm' => ProbeKind::Marker,
            _ => return Err(self.error(head.start, "a probe spec starts with `p`, `r` or `m`, as in `p:work x=$arg1`")),
        };
        let letter = self.kind.letter();
        let (maxactive, after_kind) = self.maxactive(head.from(1))?;
        // Which word is the location, and what names the event (if anything).
        let (event_span, location, rest) = match after_kind.text.strip_prefix(':') {
            None if !after_kind.text.is_empty() => {
                return Err(self
                    .error(after_kind.start, format!("expected `:EVENT` or a space after the probe kind `{letter}`")))
            }
            None => match words.get(1) {
                Some(&location) => (None, location, &words[2..]),
                None => return Err(self.error(self.spec.len(), "missing probe location")),
            },
            Some(_) => {
                let name = after_kind.from(1);
                if name.text.is_empty() {
                    return Err(self.error(name.start, format!("missing event name or location after `{letter}:`")));
                }
                // `p:handle:3 total` probes a source line: a word that cannot be an event
                // name (`[GROUP/]EVENT`) is the location.
                let is_event = !name.text.contains([':', '@', '.']);
                match words.get(1) {
                    Some(&location) if !location.text.contains('=') && is_event => (Some(name), location, &words[2..]),
                    _ => (None, name, &words[1..]),
                }
            }
        };
        let location_parsed = match self.kind {
            ProbeKind::Marker => self.marker(location)?,
            ProbeKind::Entry | ProbeKind::Return => Target::Code(self.location(location)?),
        };
        let (group, event) = match event_span {
            Some(span) => {
                let (group, event) = match span.split_once('/') {
                    Some((group, event)) => (Some(self.ident(group, "group name")?), event),
                    None => (None, span),
                };
                (group, self.ident(event, "event name")?)
            }
            None => default_event_name(self.kind, &location_parsed),
        };
        let mut args: Vec<FetchArg> = Vec::new();
        for &word in rest {
            let arg = self.fetch_arg(word)?;
            if args.iter().any(|a| a.name == arg.name) {
                return Err(self.error(word.start, format!("duplicate field name `{}`", arg.name)));
            }
            args.push(arg);
        }
        Ok(ProbeSpec {
            text: self.spec.trim().to_string(),
            kind: self.kind,
            maxactive,
            group,
            event,
            location: location_parsed,
            args,
        })
    }

    /// `rN`'s N (the span is what follows the kind letter) and what follows it.
    fn maxactive(&self, span: Span<'a>) -> Result<(Option<usize>, Span<'a>), SpecError> {
        let (digits, rest) = span.split_while(|c| c.is_ascii_digit());
        if digits.text.is_empty() || self.kind != ProbeKind::Return {
            return Ok((None, span));
        }
        match digits.text.parse::<usize>() {
            Ok(n @ 1..=MAX_DEPTH) => Ok((Some(n), rest)),
            _ => Err(self.error(
                digits.start,
                format!("maxactive `{}` is out of range; a return probe tracks 1..={MAX_DEPTH} calls", digits.text),
            )),
        }
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
                if value != 0 && self.kind == ProbeKind::Return {
                    return Err(self.error(
                        offset.start - 1,
                        "a return probe goes on a function's entry: no offset is allowed (write `r:SYMBOL`)",
                    ));
                }
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

    /// A marker's `PROVIDER:NAME`, either part an identifier or `*`.
    fn marker(&self, span: Span<'a>) -> Result<Target, SpecError> {
        let Some((provider, name)) = span.split_once(':') else {
            return Err(self.error(
                span.start,
                format!("expected a marker `PROVIDER:NAME` (either part may be `*`), found `{}`", span.text),
            ));
        };
        for (part, what) in [(provider, "marker provider"), (name, "marker name")] {
            if part.text.is_empty() {
                return Err(self.error(part.start, format!("empty {what} in `PROVIDER:NAME`")));
            }
            let (ident, rest) = part.split_ident();
            if part.text != "*" {
                if let Some(c) = rest.text.chars().next() {
                    return Err(self.error(
                        rest.start,
                        format!("invalid character `{c}` in {what} (use letters, digits and `_`, or `*` alone)"),
                    ));
                }
                debug_assert_eq!(ident.text, part.text);
            }
        }
        Ok(Target::Marker(span.text.to_string()))
    }

    fn fetch_arg(&self, word: Span<'a>) -> Result<FetchArg, SpecError> {
        // A bare source variable, as `perf probe` takes it: named after itself.
        if !word.text.contains('=') && word.text.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == '*')
        {
            let (var, rest) = self.var(word)?;
            let ty = match rest.text.strip_prefix(':') {
                Some(_) => self.fetch_type(rest.from(1))?,
                None if rest.text.is_empty() => FetchType::DEFAULT,
                None => return Err(self.error(rest.start, format!("unexpected `{}` after the variable", rest.text))),
            };
            return Ok(FetchArg { name: var.field_name(), fetch: Fetch::Var(var), ty });
        }
        let Some((name, value)) = word.split_once('=') else {
            return Err(
                self.error(word.start, format!("expected NAME=FETCHARG (e.g. `x=$arg1`), found `{}`", word.text))
            );
        };
        let name = self.ident(name, "field name")?;
        if value.text.is_empty() {
            return Err(self.error(value.start, "missing fetch argument after `=`"));
        }
        let (fetch, rest) = self.fetch(value, 0)?;
        let ty = match rest.text.strip_prefix(':') {
            Some(_) => Some((self.fetch_type(rest.from(1))?, rest.from(1))),
            None if rest.text.is_empty() => None,
            None if rest.text.starts_with(')') => {
                return Err(self.error(rest.start, "unmatched `)`"));
            }
            None => return Err(self.error(rest.start, format!("unexpected `{}` after the fetch argument", rest.text))),
        };
        let ty = match (&fetch, ty) {
            (Fetch::Comm, None) => FetchType::String,
            (Fetch::Comm, Some((ty, span))) if !ty.is_string() => {
                return Err(self.error(span.start, "`$comm` is a string; its type can only be `string`"))
            }
            (Fetch::Duration, Some((ty, span))) if ty.is_string() => {
                return Err(self.error(span.start, "`$duration` is a number of nanoseconds, not a string"))
            }
            (_, Some((ty, _))) => ty,
            (_, None) => FetchType::DEFAULT,
        };
        Ok(FetchArg { name, fetch, ty })
    }

    /// One fetch argument at the start of `span`, inside `reads` memory fetches: the value
    /// and the unparsed rest.
    fn fetch(&self, span: Span<'a>, reads: usize) -> Result<(Fetch, Span<'a>), SpecError> {
        let first = span.text.chars().next().unwrap_or(' ');
        let after = span.from(first.len_utf8());
        let (word, rest) = after.split_ident();
        match first {
            '%' => Ok((Fetch::Reg(self.register(word)?), rest)),
            '$' => {
                let fetch = self.variable(word)?;
                if reads > 0 && matches!(fetch, Fetch::Comm | Fetch::Duration) {
                    return Err(self.error(word.start, format!("`${}` is not an address to read from", word.text)));
                }
                if fetch.reads_memory() {
                    self.check_depth(span, reads)?;
                }
                Ok((fetch, rest))
            }
            '+' | '-' => self.deref(span, reads),
            'a'..='z' | 'A'..='Z' | '_' | '*' if reads == 0 => {
                let (var, rest) = self.var(span)?;
                Ok((Fetch::Var(var), rest))
            }
            '@' => {
                self.check_depth(span, reads)?;
                self.memory(after)
            }
            '0'..='9' => Err(self.error(
                span.start,
                format!(
                    "a memory fetch starts with `+` or `-`, as in `+{}`",
                    span.text.split(':').next().unwrap_or("")
                ),
            )),
            _ => Err(self.error(
                span.start,
                format!(
                    "unknown fetch argument `{}`; expected %REG, $argN, $retval, $stackN, $stack, $comm, \
                     $duration, @ADDR, @SYMBOL, +OFF(FETCHARG) or a source variable (NAME, NAME->MEMBER, ...)",
                    span.text
                ),
            )),
        }
    }

    /// A source variable at the start of `span` (see [`VarExpr`]) and the rest.
    fn var(&self, span: Span<'a>) -> Result<(VarExpr, Span<'a>), SpecError> {
        let (stars, after) = span.split_while(|c| c == '*');
        let (name, mut rest) = after.split_ident();
        if name.text.is_empty() || name.text.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(self.error(after.start, "expected a variable name after `*`"));
        }
        let mut steps = Vec::new();
        loop {
            let (member, arrow) = match () {
                _ if rest.text.starts_with("->") => (rest.from(2), true),
                _ if rest.text.starts_with('.') => (rest.from(1), false),
                _ if rest.text.starts_with('[') => {
                    let Some((digits, after)) = rest.from(1).split_once(']') else {
                        return Err(self.error(rest.start, "missing `]`"));
                    };
                    let index = parse_number(digits.text).ok_or_else(|| {
                        self.error(digits.start, format!("bad index `{}`; expected a number", digits.text))
                    })?;
                    steps.push(VarStep::Index(index));
                    rest = after;
                    continue;
                }
                _ => break,
            };
            let (ident, after) = member.split_ident();
            if ident.text.is_empty() {
                return Err(self.error(member.start, "expected a member name"));
            }
            steps.push(match arrow {
                true => VarStep::Arrow(ident.text.to_string()),
                false => VarStep::Field(ident.text.to_string()),
            });
            rest = after;
        }
        Ok((VarExpr { derefs: stars.text.len(), name: name.text.to_string(), steps }, rest))
    }

    /// Refuses one more memory read at `span` when `reads` are already nested.
    fn check_depth(&self, span: Span<'a>, reads: usize) -> Result<(), SpecError> {
        if reads >= MAX_DEREF {
            return Err(self.error(span.start, format!("memory fetches nest at most {MAX_DEREF} deep")));
        }
        Ok(())
    }

    /// `%NAME`, without the `%`.
    fn register(&self, word: Span<'a>) -> Result<Reg, SpecError> {
        let reg = Reg::from_name(word.text)
            .ok_or_else(|| self.error(word.start, format!("unknown register `{}`", word.text)))?;
        if self.kind == ProbeKind::Return && !reg.known_at_return() {
            return Err(self.error(
                word.start,
                format!(
                    "`%{}` is not known at a return; a return probe has %rax, %rdx, %xmm0, %xmm1, %rsp and \
                     %rip (and $argN from the entry)",
                    word.text
                ),
            ));
        }
        Ok(reg)
    }

    /// `$NAME`, without the `$`.
    fn variable(&self, word: Span<'a>) -> Result<Fetch, SpecError> {
        let return_only = |fetch: Fetch| match self.kind {
            ProbeKind::Return => Ok(fetch),
            ProbeKind::Entry | ProbeKind::Marker => {
                Err(self.error(word.start, format!("`${}` is only available in return probes (r:)", word.text)))
            }
        };
        if let Some((_, fetch, only_at_return)) = NAMED_VARIABLES.iter().find(|(name, ..)| *name == word.text) {
            return if *only_at_return { return_only(fetch.clone()) } else { Ok(fetch.clone()) };
        }
        let [arg, stack] = NUMBERED_VARIABLES;
        if let Some(n) = word.text.strip_prefix(stack).filter(|n| n.bytes().all(|b| b.is_ascii_digit())) {
            return n
                .parse::<u32>()
                .map(Fetch::Stack)
                .map_err(|_| self.error(word.start, format!("stack slot `{n}` is too large")));
        }
        if let Some(n) = word.text.strip_prefix(arg).filter(|n| !n.is_empty()) {
            return match n.parse::<u8>() {
                Ok(n @ 1..=MAX_ARG) => Ok(Fetch::Arg(n)),
                Ok(0) => Err(self.error(word.start, "arguments count from 1: `$arg1` is the first")),
                _ if n.bytes().all(|b| b.is_ascii_digit()) => Err(self.error(
                    word.start,
                    format!(
                        "`${}` is not passed in a register; $arg1..$arg{MAX_ARG} are (read the others with \
                         $stackN)",
                        word.text
                    ),
                )),
                _ => Err(self.error(word.start, format!("unknown variable `${}`", word.text))),
            };
        }
        Err(self.error(
            word.start,
            format!(
                "unknown variable `${}`; expected $arg1..$arg{MAX_ARG}, $retval, $stackN, $stack, $comm or $duration",
                word.text
            ),
        ))
    }

    /// `+OFF(FETCHARG)` or `-OFF(FETCHARG)` (`span` starts at the sign), inside `reads`
    /// memory fetches.
    fn deref(&self, span: Span<'a>, reads: usize) -> Result<(Fetch, Span<'a>), SpecError> {
        self.check_depth(span, reads)?;
        let negative = span.text.starts_with('-');
        let mut number = span.from(1);
        // `+u8(...)`: the kernel's user-space dereference; all memory here is the user's.
        if number.text.starts_with('u') {
            number = number.from(1);
        }
        let Some((digits, inner)) = number.split_once('(') else {
            return Err(self.error(span.start, "expected `+OFF(FETCHARG)`, as in `+8(%rdi)`"));
        };
        let magnitude = parse_number(digits.text).filter(|&n| n <= i64::MAX as u64).ok_or_else(|| {
            self.error(digits.start, format!("bad offset `{}`; expected a number like 8 or 0x8", digits.text))
        })?;
        let offset = if negative { -(magnitude as i64) } else { magnitude as i64 };
        if inner.text.is_empty() || inner.text.starts_with(')') {
            return Err(self.error(inner.start, "missing fetch argument inside `(...)`"));
        }
        let (base, rest) = self.fetch(inner, reads + 1)?;
        match rest.text.strip_prefix(')') {
            Some(_) => Ok((Fetch::Deref { offset, base: Box::new(base) }, rest.from(1))),
            None if rest.text.is_empty() || rest.text.starts_with(':') => {
                Err(self.error(rest.start, format!("missing `)` to close the `(` at column {}", self.column(inner))))
            }
            None => Err(self.error(rest.start, format!("unexpected `{}` inside `(...)`", rest.text))),
        }
    }

    /// The column where `span` starts, for messages that point back at it.
    fn column(&self, span: Span<'a>) -> usize {
        self.spec[..span.start - 1].chars().count() + 1
    }

    /// What follows `@`: `ADDR` or `[MODULE:]SYMBOL[+|-OFF]`, up to a `)` or the end.
    fn memory(&self, body: Span<'a>) -> Result<(Fetch, Span<'a>), SpecError> {
        if body.text.starts_with(|c: char| c.is_ascii_digit()) {
            let (number, rest) = body.split_while(|c| c.is_ascii_alphanumeric());
            let addr = parse_number(number.text).ok_or_else(|| {
                self.error(number.start, format!("bad address `{}`; expected e.g. @0x601040", number.text))
            })?;
            return Ok((Fetch::Memory(Address::Absolute(addr)), rest));
        }
        let whole = body.to(body.text.find(')').unwrap_or(body.text.len()));
        // With one colon the part after it is a type if it is a type's name, else the
        // symbol of `MODULE:SYMBOL` (see the module documentation).
        let colons: Vec<usize> = whole.text.match_indices(':').map(|(i, _)| i).collect();
        let (module, symbol) = match colons.as_slice() {
            [] => (None, whole),
            [one] if parse_type(&whole.text[one + 1..]).is_some() => (None, whole.to(*one)),
            [first, ..] => {
                let module = whole.to(*first);
                let after = whole.from(first + 1);
                (Some(module), after.to(after.text.find(':').unwrap_or(after.text.len())))
            }
        };
        if let Some(module) = module {
            if module.text.is_empty() {
                return Err(self.error(module.start, "empty module name before `:`"));
            }
        }
        let (name, rest) = symbol.split_while(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if name.text.is_empty() {
            return Err(self.error(name.start, "expected @ADDR or @SYMBOL, as in `@counter` or `@0x601040`"));
        }
        let offset = match rest.text.chars().next() {
            None => 0,
            Some(sign @ ('+' | '-')) => {
                let digits = rest.from(1);
                let magnitude = parse_number(digits.text).filter(|&n| n <= i64::MAX as u64).ok_or_else(|| {
                    self.error(digits.start, format!("bad offset `{}`; expected a number like 8 or 0x8", digits.text))
                })?;
                if sign == '-' {
                    -(magnitude as i64)
                } else {
                    magnitude as i64
                }
            }
            Some(c) => return Err(self.error(rest.start, format!("invalid character `{c}` in a symbol name"))),
        };
        let symbol_text = match module {
            Some(module) => &self.spec[module.start..name.end()],
            None => name.text,
        };
        let fetch = Fetch::Memory(Address::Symbol { symbol: symbol_text.to_string(), offset });
        Ok((fetch, body.from(symbol.end() - body.start)))
    }

    /// The `TYPE` after `:`.
    fn fetch_type(&self, span: Span<'a>) -> Result<FetchType, SpecError> {
        if let Some(ty) = parse_type(span.text) {
            return Ok(ty);
        }
        let message = match span.text {
            "symbol" | "symstr" => format!("type `{}` is not supported; print the address with x64", span.text),
            t if t.contains('[') => "array types (`TYPE[N]`) are not supported".to_string(),
            t if t.starts_with('b') => "bitfield types are not supported; use u8..u64 and mask the value".to_string(),
            t => format!("unknown type `{t}`; expected u64, s64, x64 (or 8, 16, 32 bits), f32, f64, string or ustring"),
        };
        Err(self.error(span.start, message))
    }
}

/// A type's name: `u8`..`x64`, `f32`, `f64`, `string`, `ustring` ([`TYPES`]).
fn parse_type(text: &str) -> Option<FetchType> {
    TYPES.into_iter().find(|ty| ty.to_string() == text)
}

/// The kernel's default event name and group: the symbol for an offset of 0
/// (`SYMBOL__return` for a return probe, as `perf probe` names it), `p_SYMBOL_OFFSET`
/// otherwise, `p_0xADDR` for an address; characters that are not allowed in an event name
/// (the `:` of `MODULE:SYMBOL`, the `.` of `foo.cold`) become `_`. A marker's event is
/// `PROVIDER/NAME` (a part may be `*`, see the module documentation).
fn default_event_name(kind: ProbeKind, target: &Target) -> (Option<String>, String) {
    let sanitize = |s: &str| -> String { s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect() };
    let letter = kind.letter();
    let location = match target {
        Target::Marker(spec) => {
            let (provider, name) = spec.split_once(':').unwrap_or(("*", spec));
            return (Some(provider.to_string()), name.to_string());
        }
        Target::Code(location) => location,
    };
    if let Some(source) = source_point(location) {
        let event = source_event_name(&source);
        return (None, if kind == ProbeKind::Return { format!("{event}__return") } else { event });
    }
    let event = match (kind, location) {
        (ProbeKind::Return, Location::Symbol(symbol)) => format!("{}__return", sanitize(symbol)),
        (_, Location::Symbol(symbol)) => sanitize(symbol),
        (_, Location::SymbolOffset(symbol, offset)) => format!("{letter}_{}_{offset}", sanitize(symbol)),
        (_, Location::Address(addr)) => format!("{letter}_0x{addr:x}"),
    };
    (None, event)
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

    fn int(format: Format, bits: u8) -> FetchType {
        FetchType::Int(IntType { format, bits })
    }

    fn deref(offset: i64, base: Fetch) -> Fetch {
        Fetch::Deref { offset, base: Box::new(base) }
    }

    fn symbol(symbol: &str, offset: i64) -> Fetch {
        Fetch::Memory(Address::Symbol { symbol: symbol.into(), offset })
    }

    const U64: FetchType = FetchType::DEFAULT;

    #[test]
    fn accepted_specs() {
        let sym = |s: &str| Location::Symbol(s.into());
        type Case = (&'static str, ProbeKind, Option<&'static str>, &'static str, Location, Vec<FetchArg>);
        use ProbeKind::{Entry, Return};
        // (spec, kind, group, event, location, args)
        let cases: Vec<Case> = vec![
            ("p work", Entry, None, "work", sym("work"), vec![]),
            ("p:work", Entry, None, "work", sym("work"), vec![]),
            ("p work+0", Entry, None, "work", sym("work"), vec![]),
            ("p work+0x8", Entry, None, "p_work_8", Location::SymbolOffset("work".into(), 8), vec![]),
            ("p 0x401126", Entry, None, "p_0x401126", Location::Address(0x401126), vec![]),
            ("p:myev work", Entry, None, "myev", sym("work"), vec![]),
            ("p:grp/myev work+4", Entry, Some("grp"), "myev", Location::SymbolOffset("work".into(), 4), vec![]),
            ("p:libc:malloc", Entry, None, "libc_malloc", sym("libc:malloc"), vec![]),
            ("p:ev libc:malloc", Entry, None, "ev", sym("libc:malloc"), vec![]),
            (
                "p:libc:malloc size=%rdi",
                Entry,
                None,
                "libc_malloc",
                sym("libc:malloc"),
                vec![arg("size", Fetch::Reg(Reg::Rdi), U64)],
            ),
            (
                "  p:checksum   seed=$arg1 n=$arg2:s32 ip=%ip:x64  ",
                Entry,
                None,
                "checksum",
                sym("checksum"),
                vec![
                    arg("seed", Fetch::Arg(1), U64),
                    arg("n", Fetch::Arg(2), int(Format::Signed, 32)),
                    arg("ip", Fetch::Reg(Reg::Rip), int(Format::Hex, 64)),
                ],
            ),
            ("r work", Return, None, "work__return", sym("work"), vec![]),
            ("r:work", Return, None, "work__return", sym("work"), vec![]),
            ("r:work+0", Return, None, "work__return", sym("work"), vec![]),
            ("r:libc:malloc", Return, None, "libc_malloc__return", sym("libc:malloc"), vec![]),
            ("r 0x401126", Return, None, "r_0x401126", Location::Address(0x401126), vec![]),
            ("r:g/ev libc:malloc", Return, Some("g"), "ev", sym("libc:malloc"), vec![]),
            (
                "r:libc:malloc ptr=$retval:x64 size=$arg1 t=$duration rdx=%dx",
                Return,
                None,
                "libc_malloc__return",
                sym("libc:malloc"),
                vec![
                    arg("ptr", Fetch::Retval, int(Format::Hex, 64)),
                    arg("size", Fetch::Arg(1), U64),
                    arg("t", Fetch::Duration, U64),
                    arg("rdx", Fetch::Reg(Reg::Rdx), U64),
                ],
            ),
            (
                "p work ra=$stack0:x64 s=$stack12 sp=$stack c=$comm c2=$comm:string",
                Entry,
                None,
                "work",
                sym("work"),
                vec![
                    arg("ra", Fetch::Stack(0), int(Format::Hex, 64)),
                    arg("s", Fetch::Stack(12), U64),
                    arg("sp", Fetch::StackPointer, U64),
                    arg("c", Fetch::Comm, FetchType::String),
                    arg("c2", Fetch::Comm, FetchType::String),
                ],
            ),
            (
                "p work a=+8($arg1):s32 b=-0x10(%rsp) c=+8(+0($arg1)) d=+u4(%rdi):u8 e=+0(+0(+0(%rax))):string",
                Entry,
                None,
                "work",
                sym("work"),
                vec![
                    arg("a", deref(8, Fetch::Arg(1)), int(Format::Signed, 32)),
                    arg("b", deref(-16, Fetch::Reg(Reg::Rsp)), U64),
                    arg("c", deref(8, deref(0, Fetch::Arg(1))), U64),
                    arg("d", deref(4, Fetch::Reg(Reg::Rdi)), int(Format::Unsigned, 8)),
                    arg("e", deref(0, deref(0, deref(0, Fetch::Reg(Reg::Rax)))), FetchType::String),
                ],
            ),
            (
                "p work s=$arg2:string u=$arg3:ustring",
                Entry,
                None,
                "work",
                sym("work"),
                vec![arg("s", Fetch::Arg(2), FetchType::String), arg("u", Fetch::Arg(3), FetchType::UString)],
            ),
            (
                "p work a=@0x601040 b=@4096:u32 c=@counter:u32 d=@libc:environ e=@libc.so.6:environ:x64 \
                 f=@table+16:s16 g=@table-8 h=+4(@ptr) i=@mod:u32:u8 j=@foo.cold",
                Entry,
                None,
                "work",
                sym("work"),
                vec![
                    arg("a", Fetch::Memory(Address::Absolute(0x601040)), U64),
                    arg("b", Fetch::Memory(Address::Absolute(4096)), int(Format::Unsigned, 32)),
                    arg("c", symbol("counter", 0), int(Format::Unsigned, 32)),
                    arg("d", symbol("libc:environ", 0), U64),
                    arg("e", symbol("libc.so.6:environ", 0), int(Format::Hex, 64)),
                    arg("f", symbol("table", 16), int(Format::Signed, 16)),
                    arg("g", symbol("table", -8), U64),
                    arg("h", deref(4, symbol("ptr", 0)), U64),
                    arg("i", symbol("mod:u32", 0), int(Format::Unsigned, 8)),
                    arg("j", symbol("foo.cold", 0), U64),
                ],
            ),
            (
                "r:work out=+4($arg1):u32 sp=$stack1 ip=%ip:x64",
                Return,
                None,
                "work__return",
                sym("work"),
                vec![
                    arg("out", deref(4, Fetch::Arg(1)), int(Format::Unsigned, 32)),
                    arg("sp", Fetch::Stack(1), U64),
                    arg("ip", Fetch::Reg(Reg::Rip), int(Format::Hex, 64)),
                ],
            ),
        ];
        for (text, kind, group, event, location, args) in cases {
            let spec = ProbeSpec::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(spec.kind, kind, "{text}");
            assert_eq!(spec.group.as_deref(), group, "{text}");
            assert_eq!(spec.event, event, "{text}");
            assert_eq!(spec.location, Target::Code(location), "{text}");
            assert_eq!(spec.args, args, "{text}");
            assert_eq!(spec.text, text.trim());
            assert_eq!(spec.maxactive, None);
        }
    }

    #[test]
    fn source_locations_and_variables() {
        let spec = ProbeSpec::parse("p:handle:3 total req->path cfg.limits[2] *count n=*p->q:s32").unwrap();
        assert_eq!(spec.event, "handle_L3");
        let location = spec.location.code().unwrap();
        assert_eq!(
            source_point(location),
            Some(SourcePoint::FunctionLine { name: "handle".into(), file: None, line: 3 })
        );
        let var = |derefs, name: &str, steps: Vec<VarStep>| Fetch::Var(VarExpr { derefs, name: name.into(), steps });
        let names: Vec<&str> = spec.args.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["total", "req_path", "cfg_limits_2", "count", "n"]);
        assert_eq!(spec.args[1].fetch, var(0, "req", vec![VarStep::Arrow("path".into())]));
        assert_eq!(spec.args[2].fetch, var(0, "cfg", vec![VarStep::Field("limits".into()), VarStep::Index(2)]));
        assert_eq!(spec.args[3].fetch, var(1, "count", vec![]));
        assert_eq!(spec.args[4].fetch, var(1, "p", vec![VarStep::Arrow("q".into())]));
        assert_eq!(spec.args[4].ty, int(Format::Signed, 32));

        let of = |text: &str| source_point(ProbeSpec::parse(text).unwrap().location.code().unwrap());
        assert_eq!(of("p src/main.c:42"), Some(SourcePoint::FileLine { file: "src/main.c".into(), line: 42 }));
        assert_eq!(
            of("p:ev parse@a.c x=$arg1"),
            Some(SourcePoint::Function { name: "parse".into(), file: Some("a.c".into()) })
        );
        assert_eq!(
            of("p parse@a.c:2"),
            Some(SourcePoint::FunctionLine { name: "parse".into(), file: Some("a.c".into()), line: 2 })
        );
        assert_eq!(of("p libc:malloc"), None);
        assert_eq!(of("p work+8"), None);
        assert_eq!(ProbeSpec::parse("p a.c:7").unwrap().event, "a_c_7");
        assert_eq!(ProbeSpec::parse("r:parse@a.c").unwrap().event, "parse__return");
        // `p:EVENT LOCATION` keeps the kernel's meaning.
        assert_eq!(ProbeSpec::parse("p:ev work").unwrap().event, "ev");
        let err = ProbeSpec::parse("p work x=req->").unwrap_err();
        assert_eq!(err.to_string(), "expected a member name at column 15");
        let err = ProbeSpec::parse("p work x=a[b]").unwrap_err();
        assert_eq!(err.to_string(), "bad index `b`; expected a number at column 12");
    }

    #[test]
    fn marker_specs() {
        let marker = |s: &str| Target::Marker(s.into());
        // (spec, group, event, marker, fields)
        let cases = [
            ("m:app:tick", Some("app"), "tick", "app:tick", 0),
            ("m app:tick", Some("app"), "tick", "app:tick", 0),
            ("m:app:*", Some("app"), "*", "app:*", 0),
            ("m *:tick", Some("*"), "tick", "*:tick", 0),
            ("m:ev app:tick", None, "ev", "app:tick", 0),
            ("m:grp/ev *:*", Some("grp"), "ev", "*:*", 0),
            ("m:app:tick n=$arg1:s32 s=+0($arg2):string", Some("app"), "tick", "app:tick", 2),
        ];
        for (text, group, event, target, fields) in cases {
            let spec = ProbeSpec::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(spec.kind, ProbeKind::Marker, "{text}");
            assert_eq!((spec.group.as_deref(), spec.event.as_str()), (group, event), "{text}");
            assert_eq!(spec.location, marker(target), "{text}");
            assert_eq!(spec.location.code(), None);
            assert_eq!(spec.args.len(), fields, "{text}");
        }
        let spec = ProbeSpec::parse("m:app:tick n=$arg1:s32").unwrap();
        assert_eq!(spec.args[0].fetch, Fetch::Arg(1));
        assert_eq!(spec.full_event_name(), "app/tick");
    }

    #[test]
    fn maxactive_of_a_return_probe() {
        let spec = ProbeSpec::parse("r16:ev work").unwrap();
        assert_eq!((spec.kind, spec.maxactive, spec.event.as_str()), (ProbeKind::Return, Some(16), "ev"));
        let spec = ProbeSpec::parse("r4 work").unwrap();
        assert_eq!((spec.maxactive, spec.event.as_str()), (Some(4), "work__return"));
    }

    #[test]
    fn every_register_name_parses() {
        for &(name, reg) in REG_NAMES {
            let spec = ProbeSpec::parse(&format!("p work v=%{name}")).unwrap();
            assert_eq!(spec.args[0].fetch, Fetch::Reg(reg), "{name}");
        }
    }

    #[test]
    fn nesting_is_limited() {
        let nested = |n: usize| format!("p f v={}%rdi{}", "+0(".repeat(n), ")".repeat(n));
        let spec = ProbeSpec::parse(&nested(MAX_DEREF)).unwrap();
        let mut depth = 0;
        spec.args[0].fetch.walk(&mut |f| depth += usize::from(f.reads_memory()));
        assert_eq!(depth, MAX_DEREF);
        let err = ProbeSpec::parse(&nested(MAX_DEREF + 1)).unwrap_err();
        assert_eq!((err.message.as_str(), err.column), ("memory fetches nest at most 8 deep", 7 + 3 * MAX_DEREF));
        // `@` and `$stackN` are reads too.
        let err = ProbeSpec::parse(&format!("p f v={}@x{}", "+0(".repeat(8), ")".repeat(8))).unwrap_err();
        assert_eq!(err.column, 31);
        let err = ProbeSpec::parse(&format!("p f v={}$stack1{}", "+0(".repeat(8), ")".repeat(8))).unwrap_err();
        assert_eq!(err.column, 31);
    }

    #[test]
    fn errors_name_the_column() {
        // (spec, message, column)
        let cases = [
            ("p:work x=%rdz", "unknown register `rdz`", 11),
            ("", "empty probe spec; expected e.g. `p:work x=$arg1`", 1),
            ("q work", "a probe spec starts with `p`, `r` or `m`, as in `p:work x=$arg1`", 1),
            ("m", "missing probe location", 2),
            ("m4:app:tick", "expected `:EVENT` or a space after the probe kind `m`", 2),
            ("m:tick", "expected a marker `PROVIDER:NAME` (either part may be `*`), found `tick`", 3),
            ("m:ev tick", "expected a marker `PROVIDER:NAME` (either part may be `*`), found `tick`", 6),
            ("m::tick", "empty marker provider in `PROVIDER:NAME`", 3),
            ("m app:", "empty marker name in `PROVIDER:NAME`", 7),
            ("m app:ti-ck", "invalid character `-` in marker name (use letters, digits and `_`, or `*` alone)", 9),
            ("m app*:tick", "invalid character `*` in marker provider (use letters, digits and `_`, or `*` alone)", 6),
            ("m app:tick:x", "invalid character `:` in marker name (use letters, digits and `_`, or `*` alone)", 11),
            ("m app:tick x=$retval", "`$retval` is only available in return probes (r:)", 15),
            ("px work", "expected `:EVENT` or a space after the probe kind `p`", 2),
            ("p5 work", "expected `:EVENT` or a space after the probe kind `p`", 2),
            ("rx work", "expected `:EVENT` or a space after the probe kind `r`", 2),
            ("r0 work", "maxactive `0` is out of range; a return probe tracks 1..=128 calls", 2),
            ("r999:e work", "maxactive `999` is out of range; a return probe tracks 1..=128 calls", 2),
            ("p", "missing probe location", 2),
            ("p:", "missing event name or location after `p:`", 3),
            ("r:", "missing event name or location after `r:`", 3),
            ("p:my-ev work", "invalid character `-` in event name (use letters, digits and `_`)", 5),
            ("p:g/ work", "empty event name", 5),
            ("p work+zz", "bad offset `zz`; expected a number like 8 or 0x8", 8),
            ("p 0xzz", "bad address `0xzz`", 3),
            ("p +4", "missing symbol before `+OFFSET`", 3),
            ("p :malloc", "empty module name before `:`", 3),
            ("r:work+4", "a return probe goes on a function's entry: no offset is allowed (write `r:SYMBOL`)", 7),
            ("r:ev libc:malloc+0x10", "a return probe goes on a function's entry: no offset is allowed (write `r:SYMBOL`)", 17),
            ("p work 5x", "expected NAME=FETCHARG (e.g. `x=$arg1`), found `5x`", 8),
            ("p work 1x=%rax", "field name must not start with a digit", 8),
            ("p work x=", "missing fetch argument after `=`", 10),
            ("p work x=$arg7", "`$arg7` is not passed in a register; $arg1..$arg6 are (read the others with $stackN)", 11),
            ("p work x=$arg0", "arguments count from 1: `$arg1` is the first", 11),
            ("p work x=$argx", "unknown variable `$argx`", 11),
            ("p work x=$retval", "`$retval` is only available in return probes (r:)", 11),
            ("p work x=$duration", "`$duration` is only available in return probes (r:)", 11),
            ("p work x=+0($retval)", "`$retval` is only available in return probes (r:)", 14),
            (
                "p work x=$foo",
                "unknown variable `$foo`; expected $arg1..$arg6, $retval, $stackN, $stack, $comm or $duration",
                11,
            ),
            ("p work x=$stack99999999999", "stack slot `99999999999` is too large", 11),
            (
                "r work x=%rdi",
                "`%rdi` is not known at a return; a return probe has %rax, %rdx, %xmm0, %xmm1, %rsp and %rip (and $argN from the entry)",
                11,
            ),
            ("p work x=8(%rdi)", "a memory fetch starts with `+` or `-`, as in `+8(%rdi)`", 10),
            ("p work x=+8%rdi", "expected `+OFF(FETCHARG)`, as in `+8(%rdi)`", 10),
            ("p work x=+z(%rdi)", "bad offset `z`; expected a number like 8 or 0x8", 11),
            ("p work x=+8()", "missing fetch argument inside `(...)`", 13),
            ("p work x=+8(%rdi", "missing `)` to close the `(` at column 12", 17),
            ("p work x=+8(%rdi:u32", "missing `)` to close the `(` at column 12", 17),
            ("p work x=+8(+0(%rdi)", "missing `)` to close the `(` at column 12", 21),
            ("p work x=+8(%rdi))", "unmatched `)`", 18),
            ("p work x=+8(%rdi?)", "unexpected `?)` inside `(...)`", 17),
            ("p work x=+8(%rdz)", "unknown register `rdz`", 14),
            ("p work x=+0($comm)", "`$comm` is not an address to read from", 14),
            ("p work x=@", "expected @ADDR or @SYMBOL, as in `@counter` or `@0x601040`", 11),
            ("p work x=@0xzz", "bad address `0xzz`; expected e.g. @0x601040", 11),
            ("p work x=@sym+q", "bad offset `q`; expected a number like 8 or 0x8", 15),
            ("p work x=@sym*2", "invalid character `*` in a symbol name", 14),
            ("p work x=@:sym:u8", "empty module name before `:`", 11),
            ("p work x=#rdi", "unknown fetch argument `#rdi`; expected %REG, $argN, $retval, $stackN, $stack, $comm, $duration, @ADDR, @SYMBOL, +OFF(FETCHARG) or a source variable (NAME, NAME->MEMBER, ...)", 10),
            ("p work x=%rdi:u65", "unknown type `u65`; expected u64, s64, x64 (or 8, 16, 32 bits), f32, f64, string or ustring", 15),
            ("p work x=%rdi:symbol", "type `symbol` is not supported; print the address with x64", 15),
            ("p work x=%rdi:u8[4]", "array types (`TYPE[N]`) are not supported", 15),
            ("p work x=%rdi:b4@2/32", "bitfield types are not supported; use u8..u64 and mask the value", 15),
            ("p work x=$comm:u32", "`$comm` is a string; its type can only be `string`", 16),
            ("r work x=$duration:string", "`$duration` is a number of nanoseconds, not a string", 20),
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
        // Columns count characters, not bytes.
        let err = ProbeSpec::parse("p:work é=%rdi").unwrap_err();
        assert_eq!(err.column, 8);
    }

    #[test]
    fn types_truncate_and_sign_extend() {
        let t = |format, bits| IntType { format, bits };
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
        assert_eq!(t(Format::Signed, 16).bytes(), 2);
        assert_eq!(FetchType::UString.to_string(), "ustring");
        assert_eq!(int(Format::Hex, 8).to_string(), "x8");
    }

    #[test]
    fn full_event_name_includes_the_group() {
        let spec = ProbeSpec::parse("p:grp/ev work").unwrap();
        assert_eq!(spec.full_event_name(), "grp/ev");
        assert_eq!(ProbeSpec::parse("p work").unwrap().full_event_name(), "work");
    }

    #[test]
    fn symbols_resolve_to_addresses_plus_offsets() {
        let mut spec = ProbeSpec::parse("p work a=@counter:u32 b=+8(@libc:table-16) c=@0x10 d=$arg1").unwrap();
        assert!(spec.needs_symbols());
        let mut asked = Vec::new();
        spec.resolve_symbols(|name| {
            asked.push(name.to_string());
            Ok(0x1000)
        })
        .unwrap();
        assert_eq!(asked, ["counter", "libc:table"]);
        assert!(!spec.needs_symbols());
        assert_eq!(spec.args[0].fetch, Fetch::Memory(Address::Absolute(0x1000)));
        assert_eq!(spec.args[1].fetch, deref(8, Fetch::Memory(Address::Absolute(0x1000 - 16))));
        assert_eq!(spec.args[2].fetch, Fetch::Memory(Address::Absolute(0x10)));

        let mut spec = ProbeSpec::parse("p work ok=@0x10 bad=@nope").unwrap();
        let err = spec.resolve_symbols(|name| Err(format!("unknown symbol `{name}`"))).unwrap_err();
        assert_eq!(err, "field `bad`: cannot resolve `@nope`: unknown symbol `nope`");
        assert!(!ProbeSpec::parse("p work a=$arg1").unwrap().needs_symbols());
    }
}
