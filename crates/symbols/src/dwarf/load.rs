//! Finding and loading a binary's DWARF.

use std::cell::OnceCell;
use std::fs;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use gimli::{LittleEndian, Reader as _};
use object::{Object, ObjectSection};

use super::source::Function;
use super::DwarfError;
use crate::elf::{self, RawSymbol};

/// The reader every DWARF section is read through: a slice of a mapped file (the debug
/// file itself, or a section inflated once into the cache, see [`CACHE_DIR_ENV`]) or of
/// memory.
pub(crate) type R = gimli::EndianReader<LittleEndian, Bytes>;

/// Where bytes are kept: a file mapped read-only, or memory.
enum Backing {
    Map(memmap2::Mmap),
    Heap(Box<[u8]>),
}

/// A range of bytes of a mapped file or of memory, shared: what a section is read from.
/// Mapping the files instead of reading them makes opening a debug file of hundreds of
/// megabytes cost only the pages of the units a lookup reads.
#[derive(Clone)]
pub(crate) struct Bytes {
    backing: Rc<Backing>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.len)
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        let all: &[u8] = match &*self.backing {
            Backing::Map(map) => map,
            Backing::Heap(heap) => heap,
        };
        &all[self.start..self.start + self.len]
    }
}

// SAFETY: the bytes are owned by the `Rc`'d backing, which neither moves nor changes while
// any clone of it lives (a mapping stays at its address until dropped; a boxed slice's heap
// block does not move): every clone derefs to the same address (stable_deref_trait's contract).
unsafe impl stable_deref_trait::StableDeref for Bytes {}
// SAFETY: as above; a clone shares the backing and the range.
unsafe impl stable_deref_trait::CloneStableDeref for Bytes {}

impl Bytes {
    fn heap(data: Vec<u8>) -> Bytes {
        let len = data.len();
        Bytes { backing: Rc::new(Backing::Heap(data.into_boxed_slice())), start: 0, len }
    }

    /// The whole of `path`, mapped read-only.
    fn map(path: &Path) -> std::io::Result<Bytes> {
        let file = fs::File::open(path)?;
        // SAFETY: the mapping is private and read-only; the files mapped are binaries, their
        // debug files and this module's cache files, which are written under another name
        // and renamed into place, never rewritten. A binary rewritten in place while it is
        // being read could show torn bytes (which DWARF parsing reports as malformed) or,
        // truncated, fault this process (dynprobe's own, never the traced program) — as
        // for gdb and perf, which map them too.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        let len = map.len();
        Ok(Bytes { backing: Rc::new(Backing::Map(map)), start: 0, len })
    }

    /// The bytes `start..start + len` of these (clamped to them).
    fn slice(&self, start: u64, len: u64) -> Bytes {
        let start = (start as usize).min(self.len);
        let len = (len as usize).min(self.len - start);
        Bytes { backing: self.backing.clone(), start: self.start + start, len }
    }
}

/// The variable naming the directory where compressed debug sections are kept inflated
/// (else `$XDG_CACHE_HOME/dynprobe`, else `~/.cache/dynprobe`; an empty value turns the
/// cache off). Debian's debug files are zlib-compressed: inflating the 275 MB of DWARF of a
/// large C++ library takes over a second, every time, where mapping an inflated copy takes
/// microseconds (gdb's `index-cache` and debuginfod's client keep such copies too).
pub const CACHE_DIR_ENV: &str = "DYNPROBE_CACHE_DIR";

/// Sections smaller than this inflated are not worth a cache file.
const CACHE_MIN: u64 = 1 << 20;

/// The cache directory, if there is one.
fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os(CACHE_DIR_ENV) {
        Some(dir) if dir.is_empty() => None,
        Some(dir) => Some(PathBuf::from(dir)),
        None => match std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            Some(dir) => Some(PathBuf::from(dir).join("dynprobe")),
            None => {
                std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|h| PathBuf::from(h).join(".cache/dynprobe"))
            }
        },
    }
}

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
    /// The header of each unit, in `.debug_info` order: read when the file is opened (a
    /// few bytes a unit), the unit itself parsed only when asked for ([`DebugInfo::unit`]).
    pub(crate) headers: Vec<gimli::UnitHeader<R>>,
    units: Vec<OnceCell<Option<Loaded>>>,
    /// The split units read so far (`-gsplit-dwarf`), by DWO id: the index of their
    /// skeleton's unit.
    dwo_units: std::cell::RefCell<std::collections::HashMap<u64, usize>>,
    /// The DWARF package (`.dwp`) beside the debug file, if there is one (looked for once).
    dwp: OnceCell<Option<gimli::DwarfPackage<R>>>,
    /// Function symbols of the binary and the debug file, by address.
    pub(crate) symbols: Vec<RawSymbol>,
    /// `.eh_frame` of the binary (and its address), for the CFA at an address.
    pub(crate) eh_frame: Option<(Bytes, u64)>,
    /// `.debug_frame` of the debug file, where `.eh_frame` says nothing.
    pub(crate) debug_frame: Option<Bytes>,
    /// Every function, once [`DebugInfo::functions`] has been asked for.
    pub(crate) functions: OnceCell<Vec<Function>>,
    /// The functions whose code (or an inlined copy) is in each unit, indexed unit by unit
    /// as lookups need them.
    pub(crate) unit_functions: Vec<OnceCell<Vec<Function>>>,
    /// The C++/Rust scope (`ns::Class`) of each subprogram DIE declared inside namespaces,
    /// classes or structs, unit by unit, read as names are asked for.
    pub(crate) scopes: Vec<OnceCell<std::collections::HashMap<gimli::UnitOffset, String>>>,
    /// The addresses of the binary's executable sections: a line-table row elsewhere is code
    /// the linker discarded (`--gc-sections`), whose addresses GNU ld resolves near 0.
    pub(crate) code: Vec<(u64, u64)>,
    /// `.debug_aranges`: address ranges and the offset of the unit each is in, by address
    /// (read on first use).
    pub(crate) aranges: OnceCell<Vec<(u64, u64, gimli::DebugInfoOffset)>>,
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
        let data = Bytes::map(binary).map_err(|e| file_error(binary, e.to_string()))?;
        let object = object::File::parse(&*data).map_err(|e| file_error(binary, e.to_string()))?;
        let mut symbols = elf::read_bytes(&data).map(|info| info.symbols).unwrap_or_default();
        let code: Vec<(u64, u64)> = object
            .sections()
            .filter(|s| matches!(s.kind(), object::SectionKind::Text) && s.size() > 0)
            .map(|s| (s.address(), s.address() + s.size()))
            .collect();
        let with_code = |info: DebugInfo| DebugInfo { code: code.clone(), ..info };
        let eh_frame = object.section_by_name(".eh_frame").and_then(|s| {
            let (offset, size) = s.file_range()?;
            Some((data.slice(offset, size), s.address()))
        });
        if has_dwarf(&object) {
            let (dwarf, debug_frame) = load_dwarf(&object, &data, binary)?;
            return DebugInfo::finish(binary, binary, dwarf, symbols, eh_frame, debug_frame).map(with_code);
        }
        let build_id = object.build_id().ok().flatten().map(<[u8]>::to_vec);
        let candidates = candidates(binary, build_id.as_deref(), debug_link(&object).as_deref(), roots);
        for candidate in &candidates {
            let Ok(debug_data) = Bytes::map(candidate) else { continue };
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
            let (dwarf, debug_frame) = load_dwarf(&debug, &debug_data, candidate)?;
            return DebugInfo::finish(binary, candidate, dwarf, symbols, eh_frame, debug_frame).map(with_code);
        }
        // MiniDebugInfo: an ELF file with a symbol table, rarely DWARF; said in the error
        // when it is readable (a damaged one counts as none).
        let mut minidebuginfo = false;
        if let Some(mini) = object.section_by_name(".gnu_debugdata").and_then(|s| mini_debuginfo(s.data().ok()?)) {
            if let Ok(inner) = object::File::parse(&*mini) {
                if has_dwarf(&inner) {
                    let (dwarf, debug_frame) = load_dwarf(&inner, &Bytes::heap(mini.clone()), binary)?;
                    symbols.extend(elf::read_bytes(&mini).map(|i| i.symbols).unwrap_or_default());
                    return DebugInfo::finish(binary, binary, dwarf, symbols, eh_frame, debug_frame).map(with_code);
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
        eh_frame: Option<(Bytes, u64)>,
        debug_frame: Option<Bytes>,
    ) -> Result<DebugInfo, DwarfError> {
        let malformed =
            |e: gimli::Error| DwarfError::Malformed { path: debug_file.to_path_buf(), reason: e.to_string() };
        let mut headers = Vec::new();
        let mut iter = dwarf.units();
        while let Some(header) = iter.next().map_err(malformed)? {
            headers.push(header);
        }
        symbols.retain(|s| s.value != 0);
        symbols.sort_by(|a, b| a.value.cmp(&b.value).then(b.global.cmp(&a.global)));
        symbols.dedup_by_key(|s| s.value);
        Ok(DebugInfo {
            binary: binary.to_path_buf(),
            debug_file: debug_file.to_path_buf(),
            dwarf,
            units: headers.iter().map(|_| OnceCell::new()).collect(),
            dwo_units: Default::default(),
            dwp: OnceCell::new(),
            unit_functions: headers.iter().map(|_| OnceCell::new()).collect(),
            scopes: headers.iter().map(|_| OnceCell::new()).collect(),
            headers,
            symbols,
            eh_frame,
            debug_frame,
            functions: OnceCell::new(),
            aranges: OnceCell::new(),
            code: Vec::new(),
        })
    }

    /// Unit `u`, parsed on first use (its abbreviations, root and line-program header);
    /// `None` when it is malformed (its functions are then not found, as if it had none).
    ///
    /// A skeleton unit (`-gsplit-dwarf`) is replaced by its split unit, from the DWARF
    /// package `FILE.dwp` beside the debug file, else from its `.dwo` file (named by
    /// `DW_AT_dwo_name`, relative to its compilation directory, else beside the binary), as
    /// gdb looks for them; without either, the skeleton stays: lines without functions.
    pub(crate) fn unit(&self, u: usize) -> Option<&gimli::Unit<R>> {
        self.units.get(u)?.get_or_init(|| self.load_unit(u)).as_ref().map(|l| &l.unit)
    }

    fn load_unit(&self, u: usize) -> Option<Loaded> {
        let unit = self.dwarf.unit(self.headers[u].clone()).ok()?;
        let skeleton = !matches!(unit.header.type_(), gimli::UnitType::SplitCompilation(_));
        if let (Some(id), true) = (unit.dwo_id, skeleton) {
            if let Some(split) = self.split_dwarf(&unit, id) {
                if let Some(loaded) = split_unit(&unit, split) {
                    self.dwo_units.borrow_mut().insert(id.0, u);
                    return Some(loaded);
                }
            }
        }
        Some(Loaded { unit, split: None })
    }

    /// The DWARF of the split unit `id` of `skeleton`: from the package, else its `.dwo`.
    fn split_dwarf(&self, skeleton: &gimli::Unit<R>, id: gimli::DwoId) -> Option<gimli::Dwarf<R>> {
        let dwp = self.dwp.get_or_init(|| {
            let mut path = self.debug_file.clone().into_os_string();
            path.push(".dwp");
            let mut binary_dwp = self.binary.clone().into_os_string();
            binary_dwp.push(".dwp");
            [PathBuf::from(path), PathBuf::from(binary_dwp)].iter().find_map(|p| load_dwp(p))
        });
        if let Some(dwp) = dwp {
            if let Ok(Some(dwarf)) = dwp.find_cu(id, &self.dwarf) {
                return Some(dwarf);
            }
        }
        let name = skeleton.dwo_name().ok().flatten().and_then(|v| self.dwarf.attr_string(skeleton, v).ok())?;
        let name = PathBuf::from(name.to_string_lossy().ok()?.into_owned());
        let comp_dir = skeleton.comp_dir.as_ref().and_then(|d| d.to_string_lossy().ok()).map(|d| PathBuf::from(&*d));
        let mut candidates = vec![match &comp_dir {
            Some(dir) => dir.join(&name),
            None => name.clone(),
        }];
        if let (Some(dir), Some(file)) = (self.binary.parent(), name.file_name()) {
            candidates.push(dir.join(file));
        }
        candidates.iter().find_map(|path| {
            let data = Bytes::map(path).ok()?;
            let file = object::File::parse(&*data).ok()?;
            let mut dwarf = gimli::Dwarf::load(|id: gimli::SectionId| -> Result<R, ()> {
                let section = id.dwo_name().and_then(|name| file.section_by_name(name)).and_then(|s| s.file_range());
                let bytes = section.map_or_else(|| Bytes::heap(Vec::new()), |(offset, size)| data.slice(offset, size));
                Ok(gimli::EndianReader::new(bytes, LittleEndian))
            })
            .ok()?;
            dwarf.make_dwo(&self.dwarf);
            Some(dwarf)
        })
    }

    /// The sections attributes of `unit`'s DIEs are read from: its split DWARF's for a
    /// split unit, else the file's.
    pub(crate) fn dwarf_for(&self, unit: &gimli::Unit<R>) -> &gimli::Dwarf<R> {
        // A DWARF 4 (GNU) split unit's header does not say it is one: the unit is the one
        // read in place of the skeleton of its DWO id, or is that skeleton.
        if let Some(id) = unit.dwo_id {
            let u = self.dwo_units.borrow().get(&id.0).copied();
            if let Some(Some(Loaded { unit: split, split: Some(dwarf) })) = u.and_then(|u| self.units[u].get()) {
                if std::ptr::eq(split, unit) {
                    return dwarf;
                }
            }
        }
        &self.dwarf
    }

    /// How many compilation units the DWARF has.
    pub fn unit_count(&self) -> usize {
        self.headers.len()
    }

    /// How many units' DIEs have been read so far: lookups read only those of the units
    /// that hold what they look for (a measure of that, for tests and the bench).
    pub fn units_indexed(&self) -> usize {
        if self.functions.get().is_some() {
            // The whole index was built (`functions`): every unit was read.
            return self.unit_count();
        }
        self.unit_functions.iter().filter(|cell| cell.get().is_some()).count()
    }

    /// The function symbol that contains the link-time address `addr`, and the offset
    /// into it.
    pub fn symbol_at(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.symbols.partition_point(|s| s.value <= addr).checked_sub(1)?;
        let s = &self.symbols[i];
        (addr < s.value + s.size.max(1)).then(|| (s.mangled.as_str(), addr - s.value))
    }

    /// The total size of the DWARF sections read (inflated, when they are compressed), in
    /// bytes.
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

/// A unit as read: a skeleton's split unit comes with the DWARF it was read from.
struct Loaded {
    unit: gimli::Unit<R>,
    split: Option<Box<gimli::Dwarf<R>>>,
}

/// The split unit of `skeleton` in `dwarf` (a `.dwo` file's or a package's), with what the
/// skeleton holds for it: its base address and address table (`copy_relocated_attributes`),
/// its compilation directory, and the line table, whose rows only the skeleton has (the
/// split unit's is a header for the files its DIEs name, the same file list GCC writes in
/// both).
fn split_unit(skeleton: &gimli::Unit<R>, dwarf: gimli::Dwarf<R>) -> Option<Loaded> {
    let header = dwarf.units().next().ok()??;
    let mut unit = dwarf.unit(header).ok()?;
    unit.copy_relocated_attributes(skeleton);
    if unit.comp_dir.is_none() {
        unit.comp_dir = skeleton.comp_dir.clone();
    }
    if skeleton.line_program.is_some() {
        unit.line_program = skeleton.line_program.clone();
    }
    Some(Loaded { unit, split: Some(Box::new(dwarf)) })
}

/// The DWARF package at `path`, if there is one.
fn load_dwp(path: &Path) -> Option<gimli::DwarfPackage<R>> {
    let data = Bytes::map(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let empty = gimli::EndianReader::new(Bytes::heap(Vec::new()), LittleEndian);
    gimli::DwarfPackage::load(
        |id: gimli::SectionId| -> Result<R, gimli::Error> {
            let section = id.dwo_name().and_then(|name| file.section_by_name(name)).and_then(|s| s.file_range());
            let bytes = section.map_or_else(|| Bytes::heap(Vec::new()), |(offset, size)| data.slice(offset, size));
            Ok(gimli::EndianReader::new(bytes, LittleEndian))
        },
        empty,
    )
    .ok()
}

/// Whether the file has a `.debug_info` with something in it (a stripped binary may keep
/// an empty one, or only `.debug_frame`).
fn has_dwarf(file: &object::File) -> bool {
    file.section_by_name(".debug_info").or_else(|| file.section_by_name(".zdebug_info")).is_some_and(|s| s.size() > 0)
}

/// The sections of `file` (whose bytes are `data`) as gimli wants them, and its
/// `.debug_frame`: slices of the mapped file, or, compressed, inflated (through the cache
/// when they are large and the file has a build id to name them by).
fn load_dwarf(file: &object::File, data: &Bytes, path: &Path) -> Result<(gimli::Dwarf<R>, Option<Bytes>), DwarfError> {
    let bad = |reason: String| DwarfError::Malformed { path: path.to_path_buf(), reason };
    let cache = cache_dir().zip(file.build_id().ok().flatten()).map(|(dir, id)| {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        dir.join("dwarf").join(format!("{hex}-{}", data.len()))
    });
    let section = |name: &str| -> Result<Option<Bytes>, DwarfError> {
        let Some(section) = file.section_by_name(name) else { return Ok(None) };
        let compressed = section.compressed_data().map_err(|e| bad(format!("section {name}: {e}")))?;
        if compressed.format == object::CompressionFormat::None {
            let Some((offset, size)) = section.file_range() else { return Ok(Some(Bytes::heap(Vec::new()))) };
            return Ok(Some(data.slice(offset, size)));
        }
        let cached = cache.as_ref().filter(|_| compressed.uncompressed_size >= CACHE_MIN).map(|dir| dir.join(name));
        if let Some(bytes) = cached.as_ref().and_then(|file| Bytes::map(file).ok()) {
            if bytes.len() as u64 == compressed.uncompressed_size {
                return Ok(Some(bytes));
            }
        }
        let inflated =
            compressed.decompress().map_err(|e| bad(format!("cannot decompress section {name}: {e}")))?.into_owned();
        if let Some(file) = &cached {
            // The cache is only a speed-up: a directory that cannot be written is no error.
            if store(file, &inflated).is_ok() {
                if let Ok(bytes) = Bytes::map(file) {
                    return Ok(Some(bytes));
                }
            }
        }
        Ok(Some(Bytes::heap(inflated)))
    };
    let dwarf = gimli::Dwarf::load(|id: gimli::SectionId| -> Result<R, DwarfError> {
        let data = section(id.name())?.unwrap_or_else(|| Bytes::heap(Vec::new()));
        Ok(gimli::EndianReader::new(data, LittleEndian))
    })?;
    Ok((dwarf, section(".debug_frame")?))
}

/// Writes `bytes` to `file` under another name first, then renames it into place: a reader
/// maps either nothing or the whole file.
fn store(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = file.parent().ok_or(std::io::ErrorKind::NotFound)?;
    fs::create_dir_all(dir)?;
    let partial = file.with_extension(format!("partial-{}", std::process::id()));
    let result = fs::write(&partial, bytes).and_then(|()| fs::rename(&partial, file));
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result
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
