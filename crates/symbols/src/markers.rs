//! Static markers a module's file describes: SystemTap's SDT notes (`.note.stapsdt`, what
//! `readelf -n`, perf, bpftrace and gdb read as USDT probes) and dynprobe's own records
//! (section `dynprobe_markers`), which add each argument's exact type.
//!
//! Both are read from the file, never from memory: the notes are not even loaded (they
//! are not an allocated section), and reading the file covers a shared library the same
//! way as the executable, in this process or another one.
//!
//! A dynprobe record (written by `dynprobe::marker!` and the C header
//! `dynprobe/marker.h`), 4-byte aligned, all fields little-endian:
//!
//! ```text
//!  0  u8   version (1)
//!  1  u8   number of arguments
//!  2  u16  size of the record in bytes, padding included (a multiple of 4)
//!  4  i32  site address minus the address of this field (position-independent: no
//!          dynamic relocation, so the file holds the final value)
//!  8  u8   argument kinds [6] (ArgKind codes, 0 past the last argument)
//! 14       provider NUL name NUL, then zero padding to a multiple of 4
//! ```
//!
//! The arguments sit in the SysV argument registers in order (rdi, rsi, rdx, rcx, r8,
//! r9), a `&str` or `&[u8]` taking two (pointer, length).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{FileHeader, SectionHeader, SectionTable};
use object::read::{ReadCache, ReadRef};
use object::Endianness;

use crate::{SymbolError, SymbolTable};

/// The section holding dynprobe's marker records.
pub const MARKER_RECORD_SECTION: &str = "dynprobe_markers";
/// The record layout this crate reads (the first byte of each record).
pub const MARKER_RECORD_VERSION: u8 = 1;
/// The section of SystemTap's SDT notes.
const NOTE_SECTION: &str = ".note.stapsdt";
/// The section whose address lets readers undo a prelink-style move of the file.
const BASE_SECTION: &str = ".stapsdt.base";
/// `NT_STAPSDT`, the note type of an SDT probe (owner "stapsdt").
const NT_STAPSDT: u32 = 3;
/// Bytes of a record before its strings.
const RECORD_HEADER: usize = 14;
/// The SysV integer argument registers, in order: where a marker's slots are.
pub const ARG_REGISTERS: [&str; 6] = ["rdi", "rsi", "rdx", "rcx", "r8", "r9"];

/// The type of a marker argument. The code (`as u8`) is what records hold: the low nibble
/// is the size in bytes of the value (of the pointer, for the two-slot kinds), the high
/// nibble the class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ArgKind {
    /// `u8`.
    U8 = 0x01,
    /// `u16`.
    U16 = 0x02,
    /// `u32`.
    U32 = 0x04,
    /// `u64`, `usize`.
    U64 = 0x08,
    /// `i8` (and C's plain `char`).
    I8 = 0x11,
    /// `i16`.
    I16 = 0x12,
    /// `i32`.
    I32 = 0x14,
    /// `i64`, `isize`.
    I64 = 0x18,
    /// `bool`, one byte, 0 or 1.
    Bool = 0x21,
    /// Rust `char`: a Unicode scalar value in 4 bytes.
    Char = 0x24,
    /// A pointer, shown as an address.
    Pointer = 0x38,
    /// `&str`: two slots, pointer then length in bytes.
    Str = 0x48,
    /// `&[u8]`: two slots, pointer then length.
    Bytes = 0x58,
    /// C's `char *`: one slot, a NUL-terminated string.
    CStr = 0x68,
    /// `float`: an SDT argument `4f@…` (only SDT notes have floating-point arguments).
    F32 = 0x74,
    /// `double`: an SDT argument `8f@…`.
    F64 = 0x78,
}

impl ArgKind {
    const ALL: [ArgKind; 14] = [
        ArgKind::U8,
        ArgKind::U16,
        ArgKind::U32,
        ArgKind::U64,
        ArgKind::I8,
        ArgKind::I16,
        ArgKind::I32,
        ArgKind::I64,
        ArgKind::Bool,
        ArgKind::Char,
        ArgKind::Pointer,
        ArgKind::Str,
        ArgKind::Bytes,
        ArgKind::CStr,
    ];

    /// The kind a record's code stands for.
    pub fn from_code(code: u8) -> Option<ArgKind> {
        ArgKind::ALL.into_iter().find(|k| *k as u8 == code)
    }

    /// Registers the argument takes: 2 for [`ArgKind::Str`] and [`ArgKind::Bytes`], else 1.
    pub fn slots(self) -> usize {
        match self {
            ArgKind::Str | ArgKind::Bytes => 2,
            _ => 1,
        }
    }

    /// Size in bytes of the (first) register's value.
    pub fn size(self) -> u8 {
        self as u8 & 0x0f
    }

    /// Whether the value is a signed integer (sign-extended from [`size`](Self::size)).
    pub fn is_signed(self) -> bool {
        self as u8 >> 4 == 1
    }

    /// Whether the value is a `float` or `double` ([`size`](Self::size) 4 or 8).
    pub fn is_float(self) -> bool {
        self as u8 >> 4 == 7
    }

    /// The kind an SDT argument's `[-]N[f]@` prefix describes: an integer of `size` bytes,
    /// or with `f` (how `sys/sdt.h` marks a floating-point argument: its `_SDT_ARGFMT`) a
    /// `float` or `double`.
    fn from_sdt(size: u8, signed: bool, float: bool) -> Option<ArgKind> {
        match (float, size) {
            (true, 4) => Some(ArgKind::F32),
            (true, 8) => Some(ArgKind::F64),
            (true, _) => None,
            (false, _) => {
                let code = size | if signed { 0x10 } else { 0 };
                ArgKind::ALL[..8].iter().copied().find(|k| *k as u8 == code)
            }
        }
    }
}

impl fmt::Display for ArgKind {
    /// The type as the Rust macro or C header user wrote it: `u32`, `i64`, `&str`, `char*`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ArgKind::U8 => "u8",
            ArgKind::U16 => "u16",
            ArgKind::U32 => "u32",
            ArgKind::U64 => "u64",
            ArgKind::I8 => "i8",
            ArgKind::I16 => "i16",
            ArgKind::I32 => "i32",
            ArgKind::I64 => "i64",
            ArgKind::Bool => "bool",
            ArgKind::Char => "char",
            ArgKind::Pointer => "ptr",
            ArgKind::Str => "&str",
            ArgKind::Bytes => "&[u8]",
            ArgKind::CStr => "char*",
            ArgKind::F32 => "f32",
            ArgKind::F64 => "f64",
        })
    }
}

/// Where an argument's value is when a thread is at the marker site, as an SDT argument
/// string states it (`8@%rdi`, `4@$5`, `-4@-20(%rbp)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgLocation {
    /// In a general register, named by its 64-bit name (`rdi`), or in a vector register
    /// (`xmm0` … `xmm15`), of which the low `size` bytes are the value.
    Register {
        /// The 64-bit register (`rax` … `r15`) or the vector register.
        name: &'static str,
        /// How many low bytes hold the value.
        size: u8,
    },
    /// A constant.
    Immediate(i64),
    /// In memory at `base + offset`.
    Memory {
        /// The 64-bit base register.
        base: &'static str,
        /// The displacement.
        offset: i64,
    },
    /// An operand form this reader does not understand (a symbol, an index register),
    /// kept verbatim.
    Other(String),
}

impl ArgLocation {
    /// The vector register `N` (`xmmN`) the value is in, if it is in one: a reader needs the
    /// thread's vector state then, not only its general registers.
    pub fn vector(&self) -> Option<usize> {
        match self {
            ArgLocation::Register { name, .. } => XMM.iter().position(|x| x == name),
            _ => None,
        }
    }
}

impl fmt::Display for ArgLocation {
    /// AT&T syntax, as in SDT notes: `%rdi`, `%edi`, `$5`, `-20(%rbp)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgLocation::Register { name, size } => write!(f, "%{}", register_name(name, *size)),
            ArgLocation::Immediate(value) => write!(f, "${value}"),
            ArgLocation::Memory { base, offset: 0 } => write!(f, "(%{base})"),
            ArgLocation::Memory { base, offset } => write!(f, "{offset}(%{base})"),
            ArgLocation::Other(text) => f.write_str(text),
        }
    }
}

/// One argument of a marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkerArg {
    /// Its type: exact from a dynprobe record, an integer of the stated size and sign
    /// from a plain SDT note.
    pub kind: ArgKind,
    /// Where its value (the pointer, for a two-slot kind) is.
    pub location: ArgLocation,
    /// Where the length is, for [`ArgKind::Str`] and [`ArgKind::Bytes`].
    pub length: Option<ArgLocation>,
}

impl fmt::Display for MarkerArg {
    /// `u32 %edi`, `&str %rsi,%rdx`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.location)?;
        if let Some(length) = &self.length {
            write!(f, ",{length}")?;
        }
        Ok(())
    }
}

/// A static marker site: one place in the code where `provider:name` fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkerSite {
    /// The provider (SystemTap's and perf's "provider", bpftrace's `usdt:PATH:provider:name`).
    pub provider: String,
    /// The marker's name.
    pub name: String,
    /// The site's address: at runtime for [`SymbolTable::markers`], as linked for
    /// [`read_markers`].
    pub addr: u64,
    /// The site's offset in [`path`](Self::path): what the kernel's uprobe PMU wants.
    pub file_offset: u64,
    /// The file the site is in, as readable from this process.
    pub path: PathBuf,
    /// The address of the marker's semaphore (a counter tools increment while attached),
    /// like [`addr`](Self::addr); 0 when it has none (dynprobe's markers have none).
    pub semaphore: u64,
    /// The arguments, in order.
    pub args: Vec<MarkerArg>,
    /// Whether a dynprobe record describes the site: its instruction is the 5-byte NOP
    /// `0f 1f 44 00 00` and [`args`](Self::args) have their exact types. Otherwise only a
    /// plain SDT note does (e.g. `sys/sdt.h` in the C library), usually over a 1-byte NOP.
    pub dynprobe: bool,
    /// The SDT argument string of the note (`-4@%edi 8@%rsi`), empty without one.
    pub sdt_args: String,
    /// Semaphores of *other* markers of the same file that the program must also see
    /// raised before it ever reaches this one (see [`MarkerGate`]); usually none.
    pub gates: Vec<MarkerGate>,
}

impl MarkerSite {
    /// `provider:name`.
    pub fn spec(&self) -> String {
        format!("{}:{}", self.provider, self.name)
    }
}

/// Another marker's semaphore that gates a site: the program takes the path that holds
/// the site only while that semaphore is raised too.
///
/// Known case: CPython 3.11 (`Python/ceval.c`) reaches `function__entry` and
/// `function__return` of a Python-to-Python call only on its tracing path
/// (`DTRACE_FUNCTION_ENTRY()` sits in the `DO_TRACING` instruction), and its dispatch
/// switches to that path for every instruction while `PyDTrace_LINE_ENABLED()` — the `line`
/// marker's semaphore — is raised (`OR_DTRACE_LINE` in `DISPATCH()`). Without it those
/// markers fire only for frames entered from C. Raising it makes the interpreter slower
/// while attached (each instruction checks for a new line), which is the price of the
/// events: a tool attached to `function__entry` must say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkerGate {
    /// `provider:name` of the marker whose semaphore it is.
    pub marker: String,
    /// The semaphore's address, like [`MarkerSite::semaphore`].
    pub semaphore: u64,
}

/// Fills in [`MarkerSite::gates`] of the sites of the file at `path`.
fn find_gates(path: &Path, sites: &mut [MarkerSite]) {
    let file = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    // The interpreter's file: `python3.11`, `python3.11d`, `libpython3.11.so.1.0`, … (the
    // path of a mapping is the file itself, so a `python3` symlink resolves to it).
    let cpython_3_11 = file.starts_with("python3.11") || file.starts_with("libpython3.11");
    if !cpython_3_11 {
        return;
    }
    let Some(line) = sites.iter().find(|s| s.provider == "python" && s.name == "line" && s.semaphore != 0) else {
        return;
    };
    let gate = MarkerGate { marker: line.spec(), semaphore: line.semaphore };
    for site in sites {
        if site.provider == "python" && matches!(site.name.as_str(), "function__entry" | "function__return") {
            site.gates.push(gate.clone());
        }
    }
}

/// Every marker the ELF file at `path` describes, at link-time addresses, sorted by address.
///
/// A file without markers gives an empty `Vec`; a malformed note or record is a
/// [`SymbolError::Parse`] naming the file.
///
/// ```no_run
/// for site in dynprobe_symbols::read_markers("./server".as_ref())? {
///     let args: Vec<String> = site.args.iter().map(|a| a.to_string()).collect();
///     println!("{} {:#x} {}", site.spec(), site.addr, args.join(", "));
/// }
/// # Ok::<(), dynprobe_symbols::SymbolError>(())
/// ```
pub fn read_markers(path: &Path) -> Result<Vec<MarkerSite>, SymbolError> {
    let file = File::open(path).map_err(|e| SymbolError::Io { path: path.to_path_buf(), reason: e.to_string() })?;
    let cache = ReadCache::new(file);
    let found = parse(&cache).map_err(|reason| SymbolError::Parse { path: path.to_path_buf(), reason })?;
    let mut sites: Vec<MarkerSite> = found.into_iter().map(|m| m.into_site(path)).collect();
    find_gates(path, &mut sites);
    Ok(sites)
}

/// Markers whose `provider:name` is close to `wanted` (a typo), best first, at most three:
/// for an error message's "did you mean".
pub fn nearest_markers<'a>(wanted: &str, sites: impl IntoIterator<Item = &'a MarkerSite>) -> Vec<String> {
    let specs: Vec<String> = sites.into_iter().map(MarkerSite::spec).collect();
    crate::error::suggest(wanted, specs.iter().map(String::as_str))
}

impl SymbolTable {
    /// The markers of module `module` (an index into [`modules`](Self::modules)) at their
    /// runtime addresses, sorted by address. The vdso has none.
    ///
    /// # Panics
    ///
    /// If `module` is not an index into [`modules`](Self::modules).
    ///
    /// ```no_run
    /// use dynprobe_symbols::SymbolTable;
    /// let table = SymbolTable::for_pid(4242)?;
    /// for module in 0..table.modules().len() {
    ///     for site in table.markers(module)? {
    ///         println!("{} at {:#x}", site.spec(), site.addr);
    ///     }
    /// }
    /// # Ok::<(), dynprobe_symbols::SymbolError>(())
    /// ```
    pub fn markers(&self, module: usize) -> Result<Vec<MarkerSite>, SymbolError> {
        let bias = self.modules[module].bias;
        let Some(path) = self.files[module].readable.as_deref() else {
            return Ok(Vec::new());
        };
        let mut sites = read_markers(path)?;
        for site in &mut sites {
            site.addr = site.addr.wrapping_add(bias);
            if site.semaphore != 0 {
                site.semaphore = site.semaphore.wrapping_add(bias);
            }
            for gate in &mut site.gates {
                gate.semaphore = gate.semaphore.wrapping_add(bias);
            }
        }
        Ok(sites)
    }
}

/// A marker as found in the file, before it is given its path.
struct Found {
    provider: String,
    name: String,
    addr: u64,
    file_offset: u64,
    semaphore: u64,
    args: Vec<MarkerArg>,
    dynprobe: bool,
    sdt_args: String,
}

impl Found {
    fn into_site(self, path: &Path) -> MarkerSite {
        MarkerSite {
            provider: self.provider,
            name: self.name,
            addr: self.addr,
            file_offset: self.file_offset,
            path: path.to_path_buf(),
            semaphore: self.semaphore,
            args: self.args,
            dynprobe: self.dynprobe,
            sdt_args: self.sdt_args,
            gates: Vec::new(),
        }
    }
}

/// A dynprobe record, decoded.
struct Record {
    provider: String,
    name: String,
    kinds: Vec<ArgKind>,
}

fn parse<'d, R: ReadRef<'d>>(data: R) -> Result<Vec<Found>, String> {
    let header = elf::FileHeader64::<Endianness>::parse(data).map_err(|e| e.to_string())?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    let sections = header.sections(endian, data).map_err(|e| e.to_string())?;
    let named =
        |name: &str| sections.iter().find(|s| sections.section_name(endian, s).is_ok_and(|n| n == name.as_bytes()));

    let mut records: BTreeMap<u64, Record> = BTreeMap::new();
    if let Some(section) = named(MARKER_RECORD_SECTION) {
        let bytes = section.data(endian, data).map_err(|e| format!("cannot read `{MARKER_RECORD_SECTION}`: {e}"))?;
        read_records(bytes, section.sh_addr(endian), &mut records)
            .map_err(|e| format!("section `{MARKER_RECORD_SECTION}` is corrupt: {e}"))?;
    }

    let mut found = Vec::new();
    if let Some(section) = named(NOTE_SECTION) {
        // Where `.stapsdt.base` is now, against where each note says it was: the shift a
        // prelink-style relocation of the file applied (normally none).
        let base = named(BASE_SECTION).map(|s| s.sh_addr(endian));
        let mut notes = section
            .notes(endian, data)
            .map_err(|e| format!("cannot read `{NOTE_SECTION}`: {e}"))?
            .ok_or_else(|| format!("`{NOTE_SECTION}` is not a note section"))?;
        while let Some(note) = notes.next().map_err(|e| format!("`{NOTE_SECTION}` is corrupt: {e}"))? {
            if note.name() != b"stapsdt" || note.n_type(endian) != NT_STAPSDT {
                continue;
            }
            let mut note = read_note(note.desc()).map_err(|e| format!("a note of `{NOTE_SECTION}` is corrupt: {e}"))?;
            if let (Some(now), true) = (base, note.base != 0) {
                let shift = now.wrapping_sub(note.base);
                note.pc = note.pc.wrapping_add(shift);
                if note.semaphore != 0 {
                    note.semaphore = note.semaphore.wrapping_add(shift);
                }
            }
            let record = records.remove(&note.pc).filter(|r| r.provider == note.provider && r.name == note.name);
            let (args, dynprobe) = match &record {
                Some(record) => (typed_args(&record.kinds), true),
                None => (sdt_args(&note.args), false),
            };
            found.push(Found {
                provider: note.provider,
                name: note.name,
                addr: note.pc,
                file_offset: 0,
                semaphore: note.semaphore,
                args,
                dynprobe,
                sdt_args: note.args,
            });
        }
    }
    // A record without a note (the note section stripped): still a site dynprobe can use.
    for (addr, record) in records {
        found.push(Found {
            provider: record.provider,
            name: record.name,
            addr,
            file_offset: 0,
            semaphore: 0,
            args: typed_args(&record.kinds),
            dynprobe: true,
            sdt_args: String::new(),
        });
    }
    for site in &mut found {
        site.file_offset = file_offset(&sections, endian, site.addr).ok_or_else(|| {
            format!(
                "marker `{}:{}` is at {:#x}, which no section of the file holds",
                site.provider, site.name, site.addr
            )
        })?;
    }
    found.sort_by_key(|f| f.addr);
    Ok(found)
}

/// The file offset of link-time address `addr`: through the allocated section that holds
/// it in the file.
fn file_offset<'d, R: ReadRef<'d>>(
    sections: &SectionTable<'d, elf::FileHeader64<Endianness>, R>,
    endian: Endianness,
    addr: u64,
) -> Option<u64> {
    sections
        .iter()
        .filter(|s| s.sh_flags(endian) & u64::from(elf::SHF_ALLOC) != 0 && s.sh_type(endian) != elf::SHT_NOBITS)
        .find(|s| s.sh_addr(endian) <= addr && addr - s.sh_addr(endian) < s.sh_size(endian))
        .map(|s| s.sh_offset(endian) + (addr - s.sh_addr(endian)))
}

/// Decodes the records of a `dynprobe_markers` section at link-time address `addr`.
fn read_records(bytes: &[u8], addr: u64, out: &mut BTreeMap<u64, Record>) -> Result<(), String> {
    let mut at = 0;
    while at + 4 <= bytes.len() {
        let version = bytes[at];
        if version == 0 {
            // Zero fill a linker may leave between two objects' pieces.
            at += 4;
            continue;
        }
        if version != MARKER_RECORD_VERSION {
            return Err(format!(
                "the record at offset {at:#x} has version {version}, not {MARKER_RECORD_VERSION} \
                 (built by a newer dynprobe?)"
            ));
        }
        let size = usize::from(u16::from_le_bytes([bytes[at + 2], bytes[at + 3]]));
        if size < RECORD_HEADER + 2 || size % 4 != 0 || at + size > bytes.len() {
            return Err(format!("the record at offset {at:#x} claims a size of {size} bytes"));
        }
        let record = &bytes[at..at + size];
        let nargs = usize::from(record[1]);
        let rel = i32::from_le_bytes(record[4..8].try_into().expect("4 bytes"));
        let site = (addr + at as u64 + 4).wrapping_add(rel as i64 as u64);
        let kinds = record[8..8 + nargs.min(6)]
            .iter()
            .map(|&code| {
                ArgKind::from_code(code).ok_or_else(|| format!("unknown argument kind {code:#x} at offset {at:#x}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if nargs > 6 || kinds.iter().map(|k| k.slots()).sum::<usize>() > 6 {
            return Err(format!("the record at offset {at:#x} has more arguments than registers"));
        }
        let mut strings = record[RECORD_HEADER..].split(|&b| b == 0);
        let mut string = || {
            let s = strings.next().filter(|s| !s.is_empty());
            s.and_then(|s| std::str::from_utf8(s).ok()).map(str::to_string)
        };
        let (Some(provider), Some(name)) = (string(), string()) else {
            return Err(format!("the record at offset {at:#x} lacks its provider or name"));
        };
        out.insert(site, Record { provider, name, kinds });
        at += size;
    }
    Ok(())
}

/// The arguments of a record: consecutive argument registers.
fn typed_args(kinds: &[ArgKind]) -> Vec<MarkerArg> {
    let mut slot = 0;
    kinds
        .iter()
        .map(|&kind| {
            let location = ArgLocation::Register { name: ARG_REGISTERS[slot], size: kind.size() };
            let length = (kind.slots() == 2).then(|| ArgLocation::Register { name: ARG_REGISTERS[slot + 1], size: 8 });
            slot += kind.slots();
            MarkerArg { kind, location, length }
        })
        .collect()
}

/// An SDT note's descriptor, decoded.
struct Note {
    pc: u64,
    base: u64,
    semaphore: u64,
    provider: String,
    name: String,
    args: String,
}

fn read_note(desc: &[u8]) -> Result<Note, String> {
    if desc.len() < 24 {
        return Err(format!("{} bytes, fewer than its three addresses", desc.len()));
    }
    let word = |i: usize| u64::from_le_bytes(desc[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let mut strings = desc[24..].split(|&b| b == 0).map(|s| String::from_utf8_lossy(s).into_owned());
    let provider = strings.next().filter(|s| !s.is_empty()).ok_or("no provider")?;
    let name = strings.next().filter(|s| !s.is_empty()).ok_or("no name")?;
    let args = strings.next().unwrap_or_default();
    Ok(Note { pc: word(0), base: word(1), semaphore: word(2), provider, name, args })
}

/// The arguments an SDT argument string describes: `[-]N[f]@OPERAND` separated by spaces.
/// An argument whose size is not 1, 2, 4 or 8 (or a floating-point one not 4 or 8: an x87
/// `long double`) is taken as an 8-byte integer, as SystemTap does.
fn sdt_args(text: &str) -> Vec<MarkerArg> {
    text.split_whitespace()
        .map(|arg| {
            let (size, operand) = arg.split_once('@').unwrap_or(("8", arg));
            let signed = size.starts_with('-');
            let size = size.trim_start_matches('-');
            let (size, float) = match size.strip_suffix('f') {
                Some(size) => (size, true),
                None => (size, false),
            };
            let size: u8 = size.parse().unwrap_or(8);
            let kind = ArgKind::from_sdt(size, signed, float).unwrap_or(ArgKind::U64);
            MarkerArg { kind, location: parse_operand(operand), length: None }
        })
        .collect()
}

/// `%reg`, `%xmmN`, `$imm`, `disp(%reg)` or `(%reg)`; anything else is
/// [`ArgLocation::Other`].
fn parse_operand(text: &str) -> ArgLocation {
    let other = || ArgLocation::Other(text.to_string());
    if let Some(name) = text.strip_prefix('%').and_then(|reg| XMM.iter().find(|x| **x == reg)) {
        // Its low 8 bytes at most: what a `double` or an integer argument takes.
        return ArgLocation::Register { name, size: 8 };
    }
    if let Some(reg) = text.strip_prefix('%') {
        return register(reg).map_or_else(other, |(name, size)| ArgLocation::Register { name, size });
    }
    if let Some(value) = text.strip_prefix('$') {
        return parse_int(value).map_or_else(other, ArgLocation::Immediate);
    }
    if let Some((disp, rest)) = text.split_once("(%") {
        let Some(reg) = rest.strip_suffix(')') else { return other() };
        let offset = if disp.is_empty() { Some(0) } else { parse_int(disp) };
        return match (register(reg), offset) {
            (Some((base, 8)), Some(offset)) => ArgLocation::Memory { base, offset },
            _ => other(),
        };
    }
    other()
}

fn parse_int(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let value = match digits.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).ok()?,
        None => digits.parse().ok()?,
    };
    Some(if negative { -value } else { value })
}

/// The general registers: 64-, 32-, 16- and 8-bit names.
const REGISTERS: [[&str; 4]; 16] = [
    ["rax", "eax", "ax", "al"],
    ["rbx", "ebx", "bx", "bl"],
    ["rcx", "ecx", "cx", "cl"],
    ["rdx", "edx", "dx", "dl"],
    ["rsi", "esi", "si", "sil"],
    ["rdi", "edi", "di", "dil"],
    ["rbp", "ebp", "bp", "bpl"],
    ["rsp", "esp", "sp", "spl"],
    ["r8", "r8d", "r8w", "r8b"],
    ["r9", "r9d", "r9w", "r9b"],
    ["r10", "r10d", "r10w", "r10b"],
    ["r11", "r11d", "r11w", "r11b"],
    ["r12", "r12d", "r12w", "r12b"],
    ["r13", "r13d", "r13w", "r13b"],
    ["r14", "r14d", "r14w", "r14b"],
    ["r15", "r15d", "r15w", "r15b"],
];

/// The vector registers an SDT operand may name (`8f@%xmm1`, `-8@%xmm0`).
const XMM: [&str; 16] = [
    "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13",
    "xmm14", "xmm15",
];

/// Sizes of the names in each row of [`REGISTERS`].
const SIZES: [u8; 4] = [8, 4, 2, 1];

/// A register name's 64-bit register and size.
fn register(name: &str) -> Option<(&'static str, u8)> {
    REGISTERS.iter().find_map(|row| row.iter().position(|n| *n == name).map(|i| (row[0], SIZES[i])))
}

/// The name of the low `size` bytes of 64-bit register `name`.
fn register_name(name: &'static str, size: u8) -> &'static str {
    let row = REGISTERS.iter().find(|row| row[0] == name);
    match (row, SIZES.iter().position(|&s| s == size)) {
        (Some(row), Some(i)) => row[i],
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdt_argument_strings_parse_like_systemtap() {
        let args = sdt_args("-4@%edi 8@%rsi 4@$5 -8@-24(%rbp) 1@%r8b 8@foo(%rip)");
        let kinds: Vec<ArgKind> = args.iter().map(|a| a.kind).collect();
        assert_eq!(kinds, [ArgKind::I32, ArgKind::U64, ArgKind::U32, ArgKind::I64, ArgKind::U8, ArgKind::U64]);
        assert_eq!(args[0].location, ArgLocation::Register { name: "rdi", size: 4 });
        assert_eq!(args[2].location, ArgLocation::Immediate(5));
        assert_eq!(args[3].location, ArgLocation::Memory { base: "rbp", offset: -24 });
        assert_eq!(args[4].location, ArgLocation::Register { name: "r8", size: 1 });
        assert_eq!(args[5].location, ArgLocation::Other("foo(%rip)".into()));
        let shown: Vec<String> = args.iter().map(|a| a.location.to_string()).collect();
        assert_eq!(shown, ["%edi", "%rsi", "$5", "-24(%rbp)", "%r8b", "foo(%rip)"]);
        // Floating-point arguments (sdt.h marks them `f`), in vector or general registers.
        let args = sdt_args("8f@%xmm1 -8@%xmm0 4f@%edx 8f@-8(%rbp) 16f@%xmm2");
        let kinds: Vec<ArgKind> = args.iter().map(|a| a.kind).collect();
        assert_eq!(kinds, [ArgKind::F64, ArgKind::I64, ArgKind::F32, ArgKind::F64, ArgKind::U64]);
        let vectors: Vec<Option<usize>> = args.iter().map(|a| a.location.vector()).collect();
        assert_eq!(vectors, [Some(1), Some(0), None, None, Some(2)]);
        assert_eq!(args[0].location.to_string(), "%xmm1");
    }

    #[test]
    fn record_args_fill_the_argument_registers_in_order() {
        let args = typed_args(&[ArgKind::U32, ArgKind::Str, ArgKind::Pointer]);
        let shown: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        assert_eq!(shown, ["u32 %edi", "&str %rsi,%rdx", "ptr %rcx"]);
    }

    /// One record as the macro lays it out, at section offset `at` of a section at `addr`.
    fn record(site_rel: i32, kinds: &[u8], provider: &str, name: &str) -> Vec<u8> {
        let mut r = vec![MARKER_RECORD_VERSION, kinds.len() as u8, 0, 0];
        r.extend(site_rel.to_le_bytes());
        let mut k = [0u8; 6];
        k[..kinds.len()].copy_from_slice(kinds);
        r.extend(k);
        r.extend(provider.bytes().chain([0]).chain(name.bytes()).chain([0]));
        while r.len() % 4 != 0 {
            r.push(0);
        }
        let size = (r.len() as u16).to_le_bytes();
        r[2..4].copy_from_slice(&size);
        r
    }

    #[test]
    fn records_decode_with_their_position_independent_sites() {
        let mut bytes = record(-0x104, &[0x04, 0x48], "app", "tick");
        let second_at = bytes.len() as u64;
        bytes.extend([0, 0, 0, 0]); // linker padding
        bytes.extend(record(0x20, &[], "app", "idle"));
        let mut out = BTreeMap::new();
        read_records(&bytes, 0x5000, &mut out).unwrap();
        let tick = &out[&(0x5000 + 4 - 0x104)];
        assert_eq!((tick.provider.as_str(), tick.name.as_str()), ("app", "tick"));
        assert_eq!(tick.kinds, [ArgKind::U32, ArgKind::Str]);
        let idle = &out[&(0x5000 + second_at + 4 + 4 + 0x20)];
        assert_eq!(idle.name, "idle");
        assert!(idle.kinds.is_empty());
    }

    #[test]
    fn corrupt_records_are_refused_with_their_offset() {
        let mut bytes = record(0, &[0x04], "app", "tick");
        bytes[8] = 0x77;
        let e = read_records(&bytes, 0, &mut BTreeMap::new()).unwrap_err();
        assert!(e.contains("unknown argument kind 0x77 at offset 0x0"), "{e}");
        let mut bytes = record(0, &[], "app", "tick");
        bytes[2] = 200;
        let e = read_records(&bytes, 0, &mut BTreeMap::new()).unwrap_err();
        assert!(e.contains("claims a size of 200"), "{e}");
    }
}
