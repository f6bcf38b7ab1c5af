//! The function-entry sites compilers prepare for tracers, as the kernel's dynamic ftrace
//! finds them: `__mcount_loc` (`-pg -mfentry -mnop-mcount -mrecord-mcount`) and
//! `__patchable_function_entries` (`-fpatchable-function-entry=N[,M]`).
//!
//! The tables are read from the module's file, and so are the code bytes that tell how many
//! NOPs a patchable site has: this crate reads files, never the process's memory. A tracer
//! must still check the bytes in memory before it writes (dynamic ftrace's `EINVAL`: the
//! bytes are not the expected NOP; `ftrace_bug()` in kernel/trace/ftrace.c).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::elf::{self, SiteTable};
use crate::{SymbolError, SymbolTable};

/// No more NOPs than this are counted at a patchable site: enough for any call or jump a
/// tracer writes, and a bound on what a run of padding can make us read.
const MAX_NOPS: u8 = 16;

/// The one-byte NOP `-fpatchable-function-entry` emits.
const NOP1: u8 = 0x90;

/// Code is read in windows this large, so that the many sites of one `.text` cost a few
/// reads rather than one each.
const WINDOW: usize = 64 * 1024;

/// What the compiler put at a [`CompilerSite`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SiteKind {
    /// An `__mcount_loc` entry: the 5-byte `call __fentry__`, or with `-mnop-mcount` the
    /// 5-byte NOP `0f 1f 44 00 00` in its place — one instruction, patchable in one step
    /// once the int3-first protocol guards it.
    Mcount,
    /// A `__patchable_function_entries` entry: a run of one-byte `0x90` NOPs. A thread may be
    /// stopped between two of them, so turning them into one instruction needs the
    /// stopped-thread check of a jump-optimized probe.
    Patchable {
        /// How many `0x90` bytes the file holds from the site on (at most 16). For
        /// `-fpatchable-function-entry=N,M` that is normally N: the M NOPs before the
        /// function symbol and the N − M after it are one run.
        nops: u8,
    },
}

/// A patchable function-entry site a compiler recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompilerSite {
    /// Runtime address of the site's first byte: the function's entry, 4 bytes after it
    /// when the function starts with `endbr64` (`-fcf-protection`), or before it when
    /// `-fpatchable-function-entry=N,M` put M NOPs in front.
    pub addr: u64,
    /// Which table listed the site, and what is there.
    pub kind: SiteKind,
    /// The function the site belongs to, as an index into [`SymbolTable::symbols`]: the one
    /// containing `addr`, or for NOPs placed before a function the one they run into.
    /// `None` when no known function symbol fits; a tracer should refuse such a site.
    pub function: Option<usize>,
}

impl SymbolTable {
    /// The function-entry sites the compiler recorded in module `module` (an index into
    /// [`modules`](Self::modules)), sorted by address, each address once.
    ///
    /// A module built without `-mrecord-mcount` or `-fpatchable-function-entry` (or one
    /// without a file, the vdso) has none: the result is an empty `Vec`. A table that is
    /// corrupt — a size that is not a whole number of 8-byte entries, a relocation into the
    /// middle of an entry or of a type other than `R_X86_64_RELATIVE`, an entry outside
    /// every loadable segment — is a [`SymbolError::Parse`] naming the module's file.
    ///
    /// # Panics
    ///
    /// If `module` is not an index into [`modules`](Self::modules).
    ///
    /// ```no_run
    /// use dynprobe_symbols::{SiteKind, SymbolTable};
    ///
    /// let table = SymbolTable::for_pid(4242)?;
    /// let main = table.modules().iter().position(|m| m.is_main).unwrap();
    /// for site in table.compiler_sites(main)? {
    ///     let name = site.function.map_or("?", |f| table.symbols()[f].name.as_str());
    ///     println!("{:#x} {name} {:?}", site.addr, site.kind);
    /// }
    /// # Ok::<(), dynprobe_symbols::SymbolError>(())
    /// ```
    pub fn compiler_sites(&self, module: usize) -> Result<Vec<CompilerSite>, SymbolError> {
        let bias = self.modules[module].bias;
        let file = &self.files[module];
        let Some(path) = file.readable.as_deref() else {
            return Ok(Vec::new());
        };
        let corrupt = |reason: String| SymbolError::Parse { path: path.to_path_buf(), reason };

        let mut placed = Vec::new();
        for (table, link) in elf::read_site_tables(path)? {
            let (offset, in_segment) = elf::file_span(&file.segments, link).ok_or_else(|| {
                corrupt(format!(
                    "section `{}` is corrupt: it lists address {link:#x}, which no loadable segment of the file holds",
                    table.section_name()
                ))
            })?;
            placed.push(Placed { table, runtime: link.wrapping_add(bias), offset, in_segment });
        }
        // An address listed twice (both tables, or two `ld -r` pieces) is one site; should
        // both tables list it, the mcount entry is kept, its 5-byte NOP being one instruction.
        placed.sort_unstable_by_key(|p| (p.runtime, p.table != SiteTable::Mcount));
        placed.dedup_by_key(|p| p.runtime);

        let io_error = |e: io::Error| SymbolError::Io { path: path.to_path_buf(), reason: e.to_string() };
        let mut code = CodeReader::open(path).map_err(io_error)?;
        placed
            .into_iter()
            .map(|p| {
                let kind = match p.table {
                    SiteTable::Mcount => SiteKind::Mcount,
                    SiteTable::Patchable => SiteKind::Patchable { nops: code.nops_at(&p).map_err(io_error)? },
                };
                Ok(CompilerSite { addr: p.runtime, kind, function: self.site_function(p.runtime, kind) })
            })
            .collect()
    }

    /// The function a site at `addr` belongs to: the one containing it, else (NOPs placed
    /// before the symbol by `-fpatchable-function-entry=N,M`) the one starting inside its run
    /// of NOPs or right after it.
    fn site_function(&self, addr: u64, kind: SiteKind) -> Option<usize> {
        self.resolve_index(addr).or_else(|| {
            let SiteKind::Patchable { nops } = kind else {
                return None;
            };
            let next = self.symbols.partition_point(|s| s.addr <= addr);
            self.symbols.get(next).filter(|s| s.addr <= addr + u64::from(nops)).map(|_| next)
        })
    }
}

/// A site table entry located in the module's file.
struct Placed {
    table: SiteTable,
    runtime: u64,
    /// File offset of the site's first byte.
    offset: u64,
    /// Bytes from `offset` to the end of the segment's file-backed part.
    in_segment: u64,
}

/// Reads code bytes of one file through a window, since sites come in address order and
/// are close together.
struct CodeReader {
    file: File,
    start: u64,
    bytes: Vec<u8>,
}

impl CodeReader {
    fn open(path: &Path) -> io::Result<CodeReader> {
        Ok(CodeReader { file: File::open(path)?, start: 0, bytes: Vec::new() })
    }

    /// How many one-byte NOPs the file holds at the site, up to [`MAX_NOPS`].
    fn nops_at(&mut self, site: &Placed) -> io::Result<u8> {
        let len = site.in_segment.min(u64::from(MAX_NOPS)) as usize;
        let code = self.read(site.offset, len)?;
        Ok(code.iter().take_while(|&&b| b == NOP1).count() as u8)
    }

    /// Up to `len` bytes at `offset` (fewer only at the end of the file).
    fn read(&mut self, offset: u64, len: usize) -> io::Result<&[u8]> {
        let window_end = self.start + self.bytes.len() as u64;
        if offset < self.start || offset + len as u64 > window_end {
            self.bytes.resize(WINDOW.max(len), 0);
            let mut filled = 0;
            while filled < self.bytes.len() {
                match self.file.read_at(&mut self.bytes[filled..], offset + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.bytes.truncate(filled);
            self.start = offset;
        }
        let from = (offset - self.start) as usize;
        Ok(&self.bytes[from..(from + len).min(self.bytes.len())])
    }
}
