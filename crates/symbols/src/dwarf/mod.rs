//! A program's source, from its DWARF debugging information: functions, lines, inlined
//! copies, variables and their types, for source-level probes (`perf probe`'s job).
//!
//! Reading only: nothing here touches a process. The debugging information is found where
//! distributions put it (see [`DebugInfo::open`]), through the same GDB conventions
//! `gdb` and `perf` follow ("Debugging Information in Separate Files" in the GDB manual):
//!
//! - in the binary itself (`gcc -g`), its sections possibly compressed (`SHF_COMPRESSED`,
//!   zlib from `-gz=zlib`, zstd from `objcopy --compress-debug-sections=zstd`; `object`
//!   inflates them);
//! - in `ROOT/.build-id/xx/yyyy….debug`, named by the binary's `NT_GNU_BUILD_ID` note
//!   (Debian's `-dbgsym` packages install there, `ROOT` being `/usr/lib/debug`);
//! - through `.gnu_debuglink`: the named file beside the binary, in its `.debug/`
//!   directory, or under `ROOT` + the binary's directory;
//! - `.gnu_debugdata` (MiniDebugInfo, an xz-compressed ELF file, as Fedora ships) holds a
//!   symbol table but no DWARF: it is looked into, and the error says so.
//!
//! DWARF 4 and 5 are read by `gimli`, from the files mapped into memory (compressed
//! sections inflated once into a cache, see [`CACHE_DIR_ENV`]). Nothing reads all of it
//! up front: a function is found through the symbol table and `.debug_aranges` (else the
//! units' own address ranges), and only the units holding its code — and those whose line
//! tables name its file, where copies of it may be inlined — are read
//! ([`DebugInfo::find_functions`]); `--funcs` alone reads every unit. Split DWARF
//! (`-gsplit-dwarf`, DWARF 4 and 5): a skeleton unit is read from the package `FILE.dwp`
//! beside it, else from its `.dwo`.

mod load;
mod source;
mod vars;

use std::fmt;
use std::path::PathBuf;

pub use load::{debug_roots, DebugInfo, CACHE_DIR_ENV, DEBUG_DIRS_ENV};
pub use source::{Function, SourcePoint, SourceSite};
pub use vars::{Access, Member, Piece, Place, Type, TypeKind, TypeRef, VarError, Variable, Variant, Variants};

/// Why debugging information could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DwarfError {
    /// A file could not be read or parsed.
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Neither the binary nor any separate debug file has DWARF.
    NoDebugInfo {
        /// The binary.
        binary: PathBuf,
        /// Every separate debug file looked for, in order.
        searched: Vec<PathBuf>,
        /// The Debian package the binary belongs to, when `dpkg` knows it.
        package: Option<String>,
        /// Whether the binary has MiniDebugInfo (`.gnu_debugdata`): symbols, no DWARF.
        minidebuginfo: bool,
    },
    /// The DWARF is malformed.
    Malformed {
        /// The file holding it.
        path: PathBuf,
        /// What `gimli` said.
        reason: String,
    },
    /// No function has this name.
    UnknownFunction {
        /// The name as given (with its `@FILE`, if any).
        name: String,
        /// Close names that exist.
        suggestions: Vec<String>,
    },
    /// No compilation unit has a source file of this name.
    UnknownFile {
        /// The name as given.
        name: String,
    },
    /// The line has no code, and neither has any later line of the function or file.
    NoCode {
        /// What was asked for, as the user wrote it.
        what: String,
        /// Why, in words.
        reason: String,
    },
}

impl fmt::Display for DwarfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DwarfError::File { path, reason } => write!(f, "cannot read `{}`: {reason}", path.display()),
            DwarfError::NoDebugInfo { binary, searched, package, minidebuginfo } => {
                write!(f, "`{}` has no DWARF debugging information", binary.display())?;
                if *minidebuginfo {
                    write!(f, " (its .gnu_debugdata, MiniDebugInfo, has symbols but no lines or variables)")?;
                }
                match searched.as_slice() {
                    [] => write!(f, ", and it names no separate debug file (no build id, no .gnu_debuglink)")?,
                    files => {
                        let list: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
                        write!(f, ", nor is any in {}", list.join(", "))?
                    }
                }
                match package {
                    Some(package) => write!(
                        f,
                        "; install its debug symbols (`apt-get install {package}-dbgsym`, from Debian's \
                         debug archive, or `{package}-dbg` where it exists)"
                    ),
                    None => write!(f, "; rebuild it with `-g` (or install its separate debug file)"),
                }
            }
            DwarfError::Malformed { path, reason } => {
                write!(f, "the DWARF of `{}` is malformed: {reason}", path.display())
            }
            DwarfError::UnknownFunction { name, suggestions } => {
                write!(f, "no function `{name}` in the debugging information")?;
                match suggestions.as_slice() {
                    [] => Ok(()),
                    names => write!(f, " (nearest: {})", names.join(", ")),
                }
            }
            DwarfError::UnknownFile { name } => {
                write!(f, "no source file `{name}` in the debugging information (`--funcs` lists what there is)")
            }
            DwarfError::NoCode { what, reason } => write!(f, "`{what}` has no code: {reason}"),
        }
    }
}

impl std::error::Error for DwarfError {}

/// The System V x86-64 ABI's DWARF register numbers ("DWARF Register Number Mapping",
/// figure 3.36): 0..=15 the general registers, 16 the return address, 17..=32 `xmm0`..`xmm15`.
pub const DWARF_REGISTER_NAMES: [&str; 17] = [
    "rax", "rdx", "rcx", "rbx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip",
];

/// The DWARF numbers of the registers that carry the first six integer arguments (System V
/// x86-64 ABI, 3.2.3): `rdi`, `rsi`, `rdx`, `rcx`, `r8`, `r9`.
pub const ARGUMENT_REGISTERS: [u16; 6] = [5, 4, 1, 2, 8, 9];
