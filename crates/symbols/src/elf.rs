//! Reading what we need from one ELF file: loadable segments, function symbols, the
//! names of the libraries it needs, and (on request) the compilers' tables of patchable
//! function-entry sites.
//!
//! Files are read through `object`'s `ReadCache`, which reads only the byte ranges asked
//! for: a Rust binary with debug info can be hundreds of megabytes, of which we need the
//! headers and two symbol tables. Symbol and string tables are each fetched in one read and
//! names are sliced out of the string table here, because `ReadCache` would otherwise issue
//! a seek and a read per symbol name.

use std::fs::File;
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{
    Dyn, ElfFile64, FileHeader, ProgramHeader, Rela, SectionHeader, SectionTable, Sym, VersionTable,
};
use object::read::{ReadCache, ReadRef};
use object::{Endianness, Object, U64};

use crate::SymbolError;

/// A `PT_LOAD` program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LoadSegment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
}

/// A function symbol as the file states it (link-time address, mangled name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawSymbol {
    pub mangled: String,
    pub value: u64,
    pub size: u64,
    /// `STB_GLOBAL` or `STB_WEAK`: the symbol is what the dynamic linker would bind a
    /// reference to, as opposed to a file-local helper that happens to share the name.
    pub global: bool,
    /// `STT_GNU_IFUNC`: the address is the resolver that picks an implementation.
    pub ifunc: bool,
}

/// What we keep of one ELF file.
#[derive(Debug, Clone, Default)]
pub(crate) struct ElfInfo {
    pub segments: Vec<LoadSegment>,
    pub symbols: Vec<RawSymbol>,
    /// `DT_NEEDED` entries, in order: the dynamic linker's search order follows them.
    pub needed: Vec<String>,
    pub soname: Option<String>,
    /// Whether the file has a `.symtab` (if not, a separate debug file may have one).
    pub has_symtab: bool,
    pub build_id: Option<Vec<u8>>,
    pub debuglink: Option<String>,
}

impl ElfInfo {
    /// The load bias, given that file offset `offset` is mapped at runtime address `start`.
    ///
    /// The mapping and the segment that contains the offset agree modulo the page size, so
    /// `start` corresponds to link-time address `p_vaddr - (p_offset - offset)`.
    pub fn bias_from_mapping(&self, start: u64, offset: u64) -> Option<u64> {
        let seg = self.segments.iter().find(|s| s.offset & !0xfff <= offset && offset < s.offset + s.filesz.max(1))?;
        let link = seg.vaddr.wrapping_sub(seg.offset.wrapping_sub(offset));
        Some(start.wrapping_sub(link))
    }
}

/// The file offset that holds link-time address `vaddr`, if a loadable segment maps it
/// from the file (not from the zero-filled `.bss` tail).
pub(crate) fn file_offset(segments: &[LoadSegment], vaddr: u64) -> Option<u64> {
    file_span(segments, vaddr).map(|(offset, _)| offset)
}

/// Like [`file_offset`], with the number of bytes from there to the end of the segment's
/// file-backed part: what follows in the file belongs to something else.
pub(crate) fn file_span(segments: &[LoadSegment], vaddr: u64) -> Option<(u64, u64)> {
    let s = segments.iter().find(|s| s.vaddr <= vaddr && vaddr < s.vaddr + s.filesz)?;
    Some((vaddr - s.vaddr + s.offset, s.vaddr + s.filesz - vaddr))
}

/// Reads an ELF file from disk.
pub(crate) fn read_path(path: &Path) -> Result<ElfInfo, SymbolError> {
    let file = File::open(path).map_err(|e| SymbolError::Io { path: path.to_path_buf(), reason: e.to_string() })?;
    let cache = ReadCache::new(file);
    parse(&cache).map_err(|reason| SymbolError::Parse { path: path.to_path_buf(), reason })
}

/// Parses an ELF image already in memory (the vdso).
pub(crate) fn read_bytes(data: &[u8]) -> Result<ElfInfo, String> {
    parse(data)
}

fn parse<'d, R: ReadRef<'d>>(data: R) -> Result<ElfInfo, String> {
    let file = ElfFile64::<Endianness, R>::parse(data).map_err(|e| e.to_string())?;
    let endian = file.endian();
    let header = file.elf_header();
    if header.e_machine(endian) != elf::EM_X86_64 {
        return Err(format!("it is built for machine {} rather than x86-64", header.e_machine(endian)));
    }

    let segments = file
        .elf_program_headers()
        .iter()
        .filter(|p| p.p_type(endian) == elf::PT_LOAD)
        .map(|p| LoadSegment {
            vaddr: p.p_vaddr(endian),
            memsz: p.p_memsz(endian),
            offset: p.p_offset(endian),
            filesz: p.p_filesz(endian),
        })
        .collect();

    let sections = file.elf_section_table();
    let mut info = ElfInfo { segments, ..ElfInfo::default() };
    for section in sections.iter() {
        match section.sh_type(endian) {
            elf::SHT_SYMTAB | elf::SHT_DYNSYM => {
                info.has_symtab |= section.sh_type(endian) == elf::SHT_SYMTAB;
                let syms: &[elf::Sym64<Endianness>] =
                    section.data_as_array(endian, data).map_err(|e| format!("bad symbol table: {e}"))?;
                let strings = linked_strings(&file, section, data)?;
                // Only `.dynsym` has versions; a broken version table costs the suffixes,
                // not the symbols.
                let versions = match section.sh_type(endian) {
                    elf::SHT_DYNSYM => sections.versions(endian, data).ok().flatten(),
                    _ => None,
                };
                info.symbols.extend(functions(syms, strings, versions.as_ref(), endian));
            }
            elf::SHT_DYNAMIC => {
                let dyns: &[elf::Dyn64<Endianness>] =
                    section.data_as_array(endian, data).map_err(|e| format!("bad dynamic section: {e}"))?;
                let strings = linked_strings(&file, section, data)?;
                for d in dyns {
                    let name = || cstr(strings, d.d_val(endian)).map(str::to_string);
                    match d.d_tag(endian) as u32 {
                        elf::DT_NEEDED => info.needed.extend(name()),
                        elf::DT_SONAME => info.soname = name(),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    // Both are only needed to find a separate debug file; a malformed note is no reason to
    // give up on the symbols we already have.
    info.build_id = file.build_id().ok().flatten().map(<[u8]>::to_vec);
    info.debuglink =
        file.gnu_debuglink().ok().flatten().and_then(|(name, _crc)| std::str::from_utf8(name).ok().map(str::to_string));
    Ok(info)
}

/// The string table a symbol table or dynamic section links to, in one read.
fn linked_strings<'d, R: ReadRef<'d>>(
    file: &ElfFile64<'d, Endianness, R>,
    section: &elf::SectionHeader64<Endianness>,
    data: R,
) -> Result<&'d [u8], String> {
    let endian = file.endian();
    let link = object::SectionIndex(section.sh_link(endian) as usize);
    file.elf_section_table()
        .section(link)
        .and_then(|s| s.data(endian, data))
        .map_err(|e| format!("bad string table: {e}"))
}

fn cstr(strings: &[u8], offset: u64) -> Option<&str> {
    let tail = strings.get(usize::try_from(offset).ok()?..)?;
    let len = tail.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&tail[..len]).ok()
}

/// The defined function symbols of one table.
///
/// `.dynsym` may define one name several times in different versions (glibc's `memcpy`
/// is `memcpy@@GLIBC_2.14` and the old `memcpy@GLIBC_2.2.5`); only the default version is
/// what a new reference binds to, so the others get their `@VERSION` suffix, as `.symtab`
/// spells them.
fn functions<'a>(
    syms: &'a [elf::Sym64<Endianness>],
    strings: &'a [u8],
    versions: Option<&'a VersionTable<'a, elf::FileHeader64<Endianness>>>,
    endian: Endianness,
) -> impl Iterator<Item = RawSymbol> + 'a {
    syms.iter().enumerate().filter_map(move |(index, s)| {
        let is_function = matches!(s.st_type(), elf::STT_FUNC | elf::STT_GNU_IFUNC);
        if !is_function || s.st_shndx(endian) == elf::SHN_UNDEF || s.st_value(endian) == 0 {
            return None;
        }
        let name = cstr(strings, s.st_name(endian).into())?;
        if name.is_empty() {
            return None;
        }
        let hidden_version = versions.and_then(|v| {
            let version = v.version_index(endian, object::SymbolIndex(index));
            if !version.is_hidden() {
                return None;
            }
            let name = v.version(version).ok()??.name();
            std::str::from_utf8(name).ok()
        });
        let mangled = match hidden_version {
            Some(version) => format!("{name}@{version}"),
            None => name.to_string(),
        };
        Some(RawSymbol {
            mangled,
            value: s.st_value(endian),
            size: s.st_size(endian),
            global: matches!(s.st_bind(), elf::STB_GLOBAL | elf::STB_WEAK),
            ifunc: s.st_type() == elf::STT_GNU_IFUNC,
        })
    })
}

/// The sections in which compilers list patchable function-entry sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SiteTable {
    /// `__mcount_loc`, from `-pg -mfentry -mrecord-mcount`: each entry is a `call __fentry__`,
    /// or the 5-byte NOP that `-mnop-mcount` puts there instead.
    Mcount,
    /// `__patchable_function_entries`, from `-fpatchable-function-entry=N[,M]`: each entry
    /// is the first of N one-byte NOPs.
    Patchable,
}

impl SiteTable {
    const ALL: [SiteTable; 2] = [SiteTable::Mcount, SiteTable::Patchable];

    pub(crate) fn section_name(self) -> &'static str {
        match self {
            SiteTable::Mcount => "__mcount_loc",
            SiteTable::Patchable => "__patchable_function_entries",
        }
    }
}

/// The link-time addresses the site tables of the file at `path` list, relocations applied,
/// in table order. Zero entries are left out: the linker leaves a zero where the function
/// was discarded (an overridden weak function, a duplicate COMDAT copy), as the kernel's
/// `ftrace_process_locs` knows.
///
/// Only the ELF header, the section headers and the sections involved are read (through
/// `ReadCache`): not the symbol tables, and the relocations only when a table exists.
pub(crate) fn read_site_tables(path: &Path) -> Result<Vec<(SiteTable, u64)>, SymbolError> {
    let file = File::open(path).map_err(|e| SymbolError::Io { path: path.to_path_buf(), reason: e.to_string() })?;
    let cache = ReadCache::new(file);
    site_tables(&cache).map_err(|reason| SymbolError::Parse { path: path.to_path_buf(), reason })
}

/// The `R_X86_64_IRELATIVE` relocations of the file at `path`, as (resolver, slot) link-time
/// addresses: the dynamic linker — in a static program, the C library's start-up
/// (`apply_irel`) — calls the resolver and writes the implementation it returns into the
/// slot (the x86-64 psABI, "Indirect functions").
pub(crate) fn read_irelative(path: &Path) -> Result<Vec<(u64, u64)>, SymbolError> {
    let file = File::open(path).map_err(|e| SymbolError::Io { path: path.to_path_buf(), reason: e.to_string() })?;
    let cache = ReadCache::new(file);
    irelative(&cache).map_err(|reason| SymbolError::Parse { path: path.to_path_buf(), reason })
}

fn irelative<'d, R: ReadRef<'d>>(data: R) -> Result<Vec<(u64, u64)>, String> {
    let header = elf::FileHeader64::<Endianness>::parse(data).map_err(|e| e.to_string())?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    let sections = header.sections(endian, data).map_err(|e| e.to_string())?;
    let mut found = Vec::new();
    // Applied at run time, so in allocated RELA sections (`.rela.dyn`, `.rela.plt`, a
    // static program's `.rela.iplt`).
    for section in sections
        .iter()
        .filter(|s| s.sh_type(endian) == elf::SHT_RELA && s.sh_flags(endian) & u64::from(elf::SHF_ALLOC) != 0)
    {
        let relas: &[elf::Rela64<Endianness>] =
            section.data_as_array(endian, data).map_err(|e| format!("bad relocation section: {e}"))?;
        found.extend(
            relas
                .iter()
                .filter(|r| r.r_type(endian, false) == elf::R_X86_64_IRELATIVE)
                .map(|r| (r.r_addend(endian) as u64, r.r_offset(endian))),
        );
    }
    Ok(found)
}

/// One site table section: which table, its link-time address, its entries.
struct TableSection {
    table: SiteTable,
    addr: u64,
    entries: Vec<u64>,
}

fn site_tables<'d, R: ReadRef<'d>>(data: R) -> Result<Vec<(SiteTable, u64)>, String> {
    let header = elf::FileHeader64::<Endianness>::parse(data).map_err(|e| e.to_string())?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    let sections = header.sections(endian, data).map_err(|e| e.to_string())?;

    // A final link merges each table into one section; an `ld -r` output may hold several.
    let mut tables = Vec::new();
    for section in sections.iter() {
        let name = sections.section_name(endian, section).unwrap_or_default();
        let Some(table) = SiteTable::ALL.into_iter().find(|t| t.section_name().as_bytes() == name) else {
            continue;
        };
        let size = section.sh_size(endian);
        if section.sh_type(endian) == elf::SHT_NOBITS || size % 8 != 0 {
            return Err(format!(
                "section `{}` is corrupt: its {size} bytes are not a whole number of 8-byte addresses",
                table.section_name()
            ));
        }
        let entries: &[U64<Endianness>] = section
            .data_as_array(endian, data)
            .map_err(|e| format!("cannot read section `{}`: {e}", table.section_name()))?;
        let entries = entries.iter().map(|e| e.get(endian)).collect();
        tables.push(TableSection { table, addr: section.sh_addr(endian), entries });
    }
    if !tables.is_empty() {
        apply_relative_relocations(&sections, endian, data, &mut tables)?;
    }
    Ok(tables.into_iter().flat_map(|t| t.entries.into_iter().filter(|&a| a != 0).map(move |a| (t.table, a))).collect())
}

/// In a PIE or shared library each table entry is the target of an `R_X86_64_RELATIVE`
/// dynamic relocation whose addend is the link-time address; what the file holds there may
/// be that same address (GNU ld) or zero (lld without `--apply-dynamic-relocs`), so the
/// addend is what counts. (With `DT_RELR` the file holds the address and there is no
/// addend to read.)
fn apply_relative_relocations<'d, R: ReadRef<'d>>(
    sections: &SectionTable<'d, elf::FileHeader64<Endianness>, R>,
    endian: Endianness,
    data: R,
    tables: &mut [TableSection],
) -> Result<(), String> {
    // Dynamic relocations live in allocated RELA sections; non-allocated ones
    // (`--emit-relocs`) describe the static link and are already applied.
    let dynamic = sections
        .iter()
        .filter(|s| s.sh_type(endian) == elf::SHT_RELA && s.sh_flags(endian) & u64::from(elf::SHF_ALLOC) != 0);
    for section in dynamic {
        let relas: &[elf::Rela64<Endianness>] =
            section.data_as_array(endian, data).map_err(|e| format!("bad relocation section: {e}"))?;
        for r in relas {
            let at = r.r_offset(endian);
            let Some(t) = tables.iter_mut().find(|t| at >= t.addr && at - t.addr < 8 * t.entries.len() as u64) else {
                continue;
            };
            let name = t.table.section_name();
            if (at - t.addr) % 8 != 0 {
                return Err(format!(
                    "section `{name}` is corrupt: a relocation at {at:#x} points into the middle of an entry"
                ));
            }
            match r.r_type(endian, false) {
                elf::R_X86_64_RELATIVE => t.entries[((at - t.addr) / 8) as usize] = r.r_addend(endian) as u64,
                elf::R_X86_64_NONE => {}
                other => {
                    return Err(format!(
                        "section `{name}` has a relocation of type {other} at {at:#x}; only \
                         R_X86_64_RELATIVE is understood there"
                    ))
                }
            }
        }
    }
    Ok(())
}

/// Where a separate debug file for `file` may be, per the GDB conventions: by build id
/// under `/usr/lib/debug/.build-id/`, then by `.gnu_debuglink` name next to the file, in
/// its `.debug/` directory, and under `/usr/lib/debug` + the file's directory.
pub(crate) fn debug_file_candidates(info: &ElfInfo, file: &Path) -> Vec<PathBuf> {
    let root = Path::new("/usr/lib/debug");
    let mut out = Vec::new();
    if let Some(id) = info.build_id.as_deref().filter(|id| id.len() >= 2) {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        out.push(root.join(format!(".build-id/{}/{}.debug", &hex[..2], &hex[2..])));
    }
    if let (Some(link), Some(dir)) = (&info.debuglink, file.parent()) {
        out.push(dir.join(link));
        out.push(dir.join(".debug").join(link));
        out.push(root.join(dir.strip_prefix("/").unwrap_or(dir)).join(link));
    }
    // The file itself may be the link target's name: never "find" the stripped file again.
    out.retain(|p| p != file);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(segments: &[(u64, u64, u64, u64)]) -> ElfInfo {
        ElfInfo {
            segments: segments
                .iter()
                .map(|&(vaddr, memsz, offset, filesz)| LoadSegment { vaddr, memsz, offset, filesz })
                .collect(),
            ..ElfInfo::default()
        }
    }

    #[test]
    fn bias_of_pie_non_pie_and_library() {
        // PIE: first segment at vaddr 0, mapped at 0x5555_5555_4000.
        let pie = info(&[(0, 0x1000, 0, 0x1000), (0x1000, 0x2000, 0x1000, 0x2000)]);
        assert_eq!(pie.bias_from_mapping(0x5555_5555_4000, 0), Some(0x5555_5555_4000));
        assert_eq!(
            pie.bias_from_mapping(0x5555_5555_5000, 0x1000),
            Some(0x5555_5555_4000),
            "any mapping gives the same bias"
        );
        // -no-pie: linked at 0x400000 and mapped there.
        let exe = info(&[(0x400000, 0x1000, 0, 0x1000)]);
        assert_eq!(exe.bias_from_mapping(0x400000, 0), Some(0));
        // A segment whose p_offset is not page aligned (typical for .data).
        let lib = info(&[(0, 0x1000, 0, 0x1000), (0x3de0, 0x300, 0x2de0, 0x220)]);
        assert_eq!(lib.bias_from_mapping(0x7f00_0000_3000, 0x2000), Some(0x7f00_0000_0000));
    }

    #[test]
    fn file_offset_follows_segments_and_excludes_bss() {
        let lib = info(&[(0, 0x1000, 0, 0x1000), (0x3de0, 0x300, 0x2de0, 0x220)]);
        assert_eq!(file_offset(&lib.segments, 0x10), Some(0x10));
        assert_eq!(file_offset(&lib.segments, 0x3de8), Some(0x2de8));
        assert_eq!(file_offset(&lib.segments, 0x3de0 + 0x220), None, ".bss is not in the file");
        assert_eq!(file_span(&lib.segments, 0x3de8), Some((0x2de8, 0x218)), "up to the end of the file-backed part");
    }

    #[test]
    fn reads_our_own_executable() {
        let exe = std::env::current_exe().unwrap();
        let info = read_path(&exe).unwrap();
        assert!(!info.segments.is_empty());
        assert!(info.symbols.iter().any(|s| s.mangled == "main"));
        assert!(info.needed.iter().any(|n| n.starts_with("libc.so")));
    }

    #[test]
    fn rejects_non_elf() {
        let err = read_bytes(b"#!/bin/sh\necho hello\n").unwrap_err();
        assert!(!err.is_empty());
    }

    #[test]
    fn debug_file_candidates_follow_gdb_conventions() {
        let mut i = info(&[]);
        i.build_id = Some(vec![0xab, 0xcd, 0xef]);
        i.debuglink = Some("libfoo.so.debug".into());
        let c = debug_file_candidates(&i, Path::new("/usr/lib/libfoo.so"));
        assert_eq!(
            c,
            [
                "/usr/lib/debug/.build-id/ab/cdef.debug",
                "/usr/lib/libfoo.so.debug",
                "/usr/lib/.debug/libfoo.so.debug",
                "/usr/lib/debug/usr/lib/libfoo.so.debug",
            ]
            .map(PathBuf::from)
        );
    }
}
