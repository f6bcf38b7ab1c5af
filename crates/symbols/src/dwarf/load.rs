//! Finding and loading a binary's DWARF.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fs;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use gimli::{EndianRcSlice, LittleEndian};
use object::{Object, ObjectSection};

use super::source::Function;
use super::DwarfError;
use crate::elf::{self, RawSymbol};

/// The reader every DWARF section is read through: a reference-counted slice of the
/// (decompressed) section bytes.
pub(crate) type R = EndianRcSlice<LittleEndian>;

/// The variable that replaces the debug root `/usr/lib/debug` by a `:`-separated list of
/// directories (GDB's `debug-file-directory`).
pub const DEBUG_DIRS_ENV: &str = "DYNPROBE_DEBUG_DIRS";

/// The directories separate debug files are looked for under: `$DYNPROBE_DEBUG_DIRS`
/// (`:`-separated), else `/usr/lib/debug`.
pub fn debug_roots() -> Vec<PathBuf> {
    match std::env::var_os(DEBUG_DIRS_ENV) {
        Some(dirs) if !dirs.is_empty() => std::env::split_paths(&dirs).collect(),
        _ => vec![PathBuf::from("/usr/lib/debug")],
    }
}

/// The DWARF of one binary, with what it takes to map it back to the binary's symbols.
pub struct DebugInfo {
    /// The binary the user named.
    pub binary: PathBuf,
    /// The file the DWARF was read from: the binary itself or its separate debug file.
    pub debug_file: PathBuf,
    pub(crate) dwarf: gimli::Dwarf<R>,
    pub(crate) units: Vec<gimli::Unit<R>>,
    /// Function symbols of the binary and the debug file, by address.
    pub(crate) symbols: Vec<RawSymbol>,
    /// `.eh_frame` of the binary (and its address), for the CFA at an address.
    pub(crate) eh_frame: Option<(Rc<[u8]>, u64)>,
    /// `.debug_frame` of the debug file, where `.eh_frame` says nothing.
    pub(crate) debug_frame: Option<Rc<[u8]>>,
    pub(crate) functions: OnceCell<Vec<Function>>,
}

impl std::fmt::Debug for DebugInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugInfo").field("binary", &self.binary).field("debug_file", &self.debug_file).finish()
    }
}

impl DebugInfo {
    /// The DWARF of `binary`, from the binary or a separate debug file under
    /// [`debug_roots`].
    pub fn open(binary: &Path) -> Result<DebugInfo, DwarfError> {
        DebugInfo::open_in(binary, &debug_roots())
    }

    /// The DWARF of `binary`, looking for separate debug files under `roots` (see the
    /// module documentation for the order).
    pub fn open_in(binary: &Path, roots: &[PathBuf]) -> Result<DebugInfo, DwarfError> {
        let file_error = |path: &Path, reason: String| DwarfError::File { path: path.to_path_buf(), reason };
        let data = fs::read(binary).map_err(|e| file_error(binary, e.to_string()))?;
        let object = object::File::parse(&*data).map_err(|e| file_error(binary, e.to_string()))?;
        let mut symbols = elf::read_bytes(&data).map(|info| info.symbols).unwrap_or_default();
        let eh_frame =
            object.section_by_name(".eh_frame").and_then(|s| Some((Rc::<[u8]>::from(s.data().ok()?), s.address())));
        if has_dwarf(&object) {
            let (dwarf, debug_frame) = load_dwarf(&object, binary)?;
            return DebugInfo::finish(binary, binary, dwarf, symbols, eh_frame, debug_frame);
        }
        let build_id = object.build_id().ok().flatten().map(<[u8]>::to_vec);
        let candidates = candidates(binary, build_id.as_deref(), debug_link(&object).as_deref(), roots);
        for candidate in &candidates {
            let Ok(debug_data) = fs::read(candidate) else { continue };
            let Ok(debug) = object::File::parse(&*debug_data) else { continue };
            // A debug file of another build would give wrong lines: the build ids must agree.
            if let (Some(want), Ok(Some(have))) = (&build_id, debug.build_id()) {
                if want.as_slice() != have {
                    continue;
                }
            }
            if !has_dwarf(&debug) {
                continue;
            }
            if let Ok(info) = elf::read_bytes(&debug_data) {
                symbols.extend(info.symbols);
            }
            let (dwarf, debug_frame) = load_dwarf(&debug, candidate)?;
            return DebugInfo::finish(binary, candidate, dwarf, symbols, eh_frame, debug_frame);
        }
        // MiniDebugInfo: an ELF file with a symbol table, rarely DWARF; said in the error
        // when it is readable (a damaged one counts as none).
        let mut minidebuginfo = false;
        if let Some(mini) = object.section_by_name(".gnu_debugdata").and_then(|s| mini_debuginfo(s.data().ok()?)) {
            if let Ok(inner) = object::File::parse(&*mini) {
                if has_dwarf(&inner) {
                    let (dwarf, debug_frame) = load_dwarf(&inner, binary)?;
                    symbols.extend(elf::read_bytes(&mini).map(|i| i.symbols).unwrap_or_default());
                    return DebugInfo::finish(binary, binary, dwarf, symbols, eh_frame, debug_frame);
                }
                minidebuginfo = true;
            }
        }
        Err(DwarfError::NoDebugInfo {
            binary: binary.to_path_buf(),
            searched: candidates,
            package: debian_package(binary),
            minidebuginfo,
        })
    }

    fn finish(
        binary: &Path,
        debug_file: &Path,
        dwarf: gimli::Dwarf<R>,
        mut symbols: Vec<RawSymbol>,
        eh_frame: Option<(Rc<[u8]>, u64)>,
        debug_frame: Option<Rc<[u8]>>,
    ) -> Result<DebugInfo, DwarfError> {
        let malformed =
            |e: gimli::Error| DwarfError::Malformed { path: debug_file.to_path_buf(), reason: e.to_string() };
        let mut units = Vec::new();
        let mut headers = dwarf.units();
        while let Some(header) = headers.next().map_err(malformed)? {
            units.push(dwarf.unit(header).map_err(malformed)?);
        }
        symbols.retain(|s| s.value != 0);
        symbols.sort_by(|a, b| a.value.cmp(&b.value).then(b.global.cmp(&a.global)));
        symbols.dedup_by_key(|s| s.value);
        Ok(DebugInfo {
            binary: binary.to_path_buf(),
            debug_file: debug_file.to_path_buf(),
            dwarf,
            units,
            symbols,
            eh_frame,
            debug_frame,
            functions: OnceCell::new(),
        })
    }

    /// The function symbol that contains the link-time address `addr`, and the offset
    /// into it.
    pub fn symbol_at(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.symbols.partition_point(|s| s.value <= addr).checked_sub(1)?;
        let s = &self.symbols[i];
        (addr < s.value + s.size.max(1)).then(|| (s.mangled.as_str(), addr - s.value))
    }

    /// The total size of the DWARF sections read, in bytes.
    pub fn dwarf_size(&self) -> usize {
        use gimli::{Reader, Section};
        let d = &self.dwarf;
        d.debug_info.reader().len()
            + d.debug_line.reader().len()
            + d.debug_abbrev.reader().len()
            + d.debug_str.reader().len()
            + d.debug_line_str.reader().len()
    }
}

/// Whether the file has a `.debug_info` with something in it (a stripped binary may keep
/// an empty one, or only `.debug_frame`).
fn has_dwarf(file: &object::File) -> bool {
    file.section_by_name(".debug_info").or_else(|| file.section_by_name(".zdebug_info")).is_some_and(|s| s.size() > 0)
}

/// A section's bytes, decompressed.
type Section = Rc<[u8]>;

/// The sections of `file` as gimli wants them, decompressed, and its `.debug_frame`.
fn load_dwarf(file: &object::File, path: &Path) -> Result<(gimli::Dwarf<R>, Option<Section>), DwarfError> {
    let bad = |reason: String| DwarfError::Malformed { path: path.to_path_buf(), reason };
    let section = |name: &str| -> Result<Option<Rc<[u8]>>, DwarfError> {
        let Some(section) = file.section_by_name(name) else { return Ok(None) };
        let data: Cow<[u8]> =
            section.uncompressed_data().map_err(|e| bad(format!("cannot decompress section {name}: {e}")))?;
        Ok(Some(Rc::from(&*data)))
    };
    let dwarf = gimli::Dwarf::load(|id: gimli::SectionId| -> Result<R, DwarfError> {
        let data = section(id.name())?.unwrap_or_else(|| Rc::from(&[][..]));
        Ok(EndianRcSlice::new(data, LittleEndian))
    })?;
    Ok((dwarf, section(".debug_frame")?))
}

/// The name `.gnu_debuglink` gives.
fn debug_link(file: &object::File) -> Option<String> {
    let (name, _crc) = file.gnu_debuglink().ok().flatten()?;
    std::str::from_utf8(name).ok().map(str::to_string)
}

/// Where a separate debug file may be, in GDB's order: by build id under each root, then
/// by `.gnu_debuglink` beside the binary, in its `.debug/`, and under each root + the
/// binary's directory.
fn candidates(binary: &Path, build_id: Option<&[u8]>, link: Option<&str>, roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(id) = build_id.filter(|id| id.len() >= 2) {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        for root in roots {
            out.push(root.join(format!(".build-id/{}/{}.debug", &hex[..2], &hex[2..])));
        }
    }
    if let Some(link) = link {
        let absolute = std::path::absolute(binary).unwrap_or_else(|_| binary.to_path_buf());
        if let Some(dir) = absolute.parent() {
            out.push(dir.join(link));
            out.push(dir.join(".debug").join(link));
            for root in roots {
                out.push(root.join(dir.strip_prefix("/").unwrap_or(dir)).join(link));
            }
        }
        out.retain(|p| p != &absolute);
    }
    out
}

/// The ELF image inside `.gnu_debugdata` (xz), if it decompresses.
fn mini_debuginfo(xz: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    lzma_rs::xz_decompress(&mut std::io::BufReader::new(xz), &mut out).ok()?;
    Some(out)
}

/// The Debian package that installed `binary`, from dpkg's file lists
/// (`/var/lib/dpkg/info/PACKAGE[:ARCH].list`, one installed path a line), for the hint of
/// a missing debug file. Only read when there is no debug information.
fn debian_package(binary: &Path) -> Option<String> {
    let path = fs::canonicalize(binary).ok()?;
    let wanted = path.to_str()?;
    // Debian's merged /usr: /usr/bin/x is listed as /bin/x by some packages.
    let alternative = wanted.strip_prefix("/usr").unwrap_or(wanted);
    for entry in fs::read_dir("/var/lib/dpkg/info").ok()?.flatten() {
        let name = entry.file_name();
        let Some(package) = name.to_str().and_then(|n| n.strip_suffix(".list")) else { continue };
        let Ok(list) = fs::read_to_string(entry.path()) else { continue };
        if list.lines().any(|line| line == wanted || line == alternative) {
            return Some(package.split(':').next().unwrap_or(package).to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_follow_gdb_conventions() {
        let c = candidates(
            Path::new("/opt/app/bin/server"),
            Some(&[0xab, 0xcd, 0xef]),
            Some("server.debug"),
            &[PathBuf::from("/usr/lib/debug"), PathBuf::from("/srv/dbg")],
        );
        let c: Vec<String> = c.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            c,
            [
                "/usr/lib/debug/.build-id/ab/cdef.debug",
                "/srv/dbg/.build-id/ab/cdef.debug",
                "/opt/app/bin/server.debug",
                "/opt/app/bin/.debug/server.debug",
                "/usr/lib/debug/opt/app/bin/server.debug",
                "/srv/dbg/opt/app/bin/server.debug",
            ]
        );
    }

    #[test]
    fn a_missing_debug_file_names_what_was_searched_and_how_to_get_it() {
        let e = DwarfError::NoDebugInfo {
            binary: "/usr/bin/xz".into(),
            searched: vec!["/usr/lib/debug/.build-id/ab/cd.debug".into()],
            package: Some("xz-utils".into()),
            minidebuginfo: false,
        };
        assert_eq!(
            e.to_string(),
            "`/usr/bin/xz` has no DWARF debugging information, nor is any in \
             /usr/lib/debug/.build-id/ab/cd.debug; install its debug symbols (`apt-get install \
             xz-utils-dbgsym`, from Debian's debug archive, or `xz-utils-dbg` where it exists)"
        );
    }
}
