//! Parsing `/proc/PID/maps` into one entry per mapped file.
//!
//! The kernel lists every mapping separately (an ELF file usually shows up as four or five
//! lines: headers, text, rodata, relro, data). We want each file once, so lines are grouped
//! by path, keeping their order of first appearance.

use std::path::PathBuf;

/// One line of `/proc/PID/maps` (proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// The address after the last.
    pub end: u64,
    /// Whether it is executable (`x` in the permissions).
    pub exec: bool,
    /// File offset of `start`.
    pub offset: u64,
    /// The path column, or `None` for anonymous mappings. Pseudo files such as `[vdso]`
    /// are kept verbatim.
    pub path: Option<String>,
    /// The kernel appends " (deleted)" when the file was unlinked after mapping; the suffix
    /// is removed from `path` and remembered here.
    pub deleted: bool,
    /// The mapped file's inode number (0 for anonymous memory): tells whether the file at
    /// `path` now is the one mapped.
    pub inode: u64,
}

/// Every mapping of one path, in address order.
#[derive(Debug, Clone)]
pub(crate) struct MappedFile {
    pub path: String,
    pub deleted: bool,
    pub mappings: Vec<Mapping>,
}

impl MappedFile {
    /// Whether any mapping of the file is executable: files without code (locale archives,
    /// caches, fonts) are never modules, and skipping them avoids opening them at all.
    pub fn has_code(&self) -> bool {
        self.mappings.iter().any(|m| m.exec)
    }

    /// `[start,end)` of every mapping, in address order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.mappings.iter().map(|m| (m.start, m.end)).collect()
    }
}

/// Parses one line; `None` for lines that do not have the documented shape.
pub fn parse_line(line: &str) -> Option<Mapping> {
    // address perms offset dev inode [path]; the path may itself contain spaces, so split
    // off the five fixed columns and keep the rest whole.
    let mut rest = line;
    let mut field = || {
        rest = rest.trim_start();
        let end = rest.find(' ').unwrap_or(rest.len());
        let (head, tail) = rest.split_at(end);
        rest = tail;
        head
    };
    let range = field();
    let perms = field();
    let offset = field();
    let _dev = field();
    let inode = field();
    let path = rest.trim_start();

    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let offset = u64::from_str_radix(offset, 16).ok()?;
    let exec = perms.as_bytes().get(2) == Some(&b'x');

    let (path, deleted) = match path {
        "" => (None, false),
        p => match p.strip_suffix(" (deleted)") {
            Some(p) => (Some(p.to_string()), true),
            None => (Some(p.to_string()), false),
        },
    };
    let inode = inode.parse().ok()?;
    Some(Mapping { start, end, exec, offset, path, deleted, inode })
}

/// Groups the file-backed mappings of a maps text by path, in order of first appearance.
/// Anonymous mappings and kernel pseudo files (`[heap]`, `[stack]`, `[vdso]`, …) are left
/// out; the vdso is found separately with [`find_vdso`].
pub(crate) fn mapped_files(maps: &str) -> Vec<MappedFile> {
    let mut files: Vec<MappedFile> = Vec::new();
    for m in maps.lines().filter_map(parse_line) {
        let Some(path) = m.path.clone() else { continue };
        if !path.starts_with('/') {
            continue;
        }
        // Few files are mapped, so a linear search beats building a map.
        match files.iter_mut().find(|f| f.path == path) {
            Some(f) => f.mappings.push(m),
            None => files.push(MappedFile { path, deleted: m.deleted, mappings: vec![m] }),
        }
    }
    files
}

/// The `[vdso]` mapping, if the process has one.
pub(crate) fn find_vdso(maps: &str) -> Option<Mapping> {
    maps.lines().filter_map(parse_line).find(|m| m.path.as_deref() == Some("[vdso]"))
}

/// Where to read a mapped file from, in our own mount namespace.
///
/// `/proc/PID/maps` shows paths as the target sees them; a process in a container sees a
/// different root, and a file may have been deleted (upgraded) since it was mapped.
pub(crate) fn readable_path(root: &RootView, file: &MappedFile) -> PathBuf {
    if file.deleted {
        // The kernel keeps the mapped inode alive and exposes it here (needs privileges).
        if let (Some(pid), Some(m)) = (root.pid, file.mappings.first()) {
            return PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
        }
    }
    match (root.pid, root.same_as_ours) {
        (Some(pid), false) => PathBuf::from(format!("/proc/{pid}/root{}", file.path)),
        _ => PathBuf::from(&file.path),
    }
}

/// How the target's file system relates to ours.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RootView {
    /// `None` for the current process.
    pub pid: Option<i32>,
    /// The target's `/` is our `/`, so its paths can be used as they are (and handed to the
    /// kernel's uprobe PMU without a `/proc/PID/root` prefix that dies with the process).
    pub same_as_ours: bool,
}

impl RootView {
    pub fn current() -> Self {
        RootView { pid: None, same_as_ours: true }
    }

    pub fn for_pid(pid: i32) -> Self {
        use std::os::unix::fs::MetadataExt;
        let theirs = std::fs::metadata(format!("/proc/{pid}/root"));
        let ours = std::fs::metadata("/");
        // If we may not look at their root we cannot read through it either: fall back to
        // the plain paths, which is right for the common case of a shared root.
        let same_as_ours = match (theirs, ours) {
            (Ok(t), Ok(o)) => t.dev() == o.dev() && t.ino() == o.ino(),
            _ => true,
        };
        RootView { pid: Some(pid), same_as_ours }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
564cd96b3000-564cd96b5000 r--p 00000000 fe:00 247030                     /usr/bin/cat
564cd96b5000-564cd96ba000 r-xp 00002000 fe:00 247030                     /usr/bin/cat
564cf83af000-564cf83d0000 rw-p 00000000 00:00 0                          [heap]
7fed1d492000-7fed1d4b4000 rw-p 00000000 00:00 0 
7fed1d4b4000-7fed1d50b000 r--p 00000000 fe:00 316534                     /usr/lib/locale/C.utf8/LC_CTYPE
7fed1d517000-7fed1d53d000 r--p 00000000 fe:00 326279                     /opt/my lib/libx.so (deleted)
7fed1d53d000-7fed1d693000 r-xp 00026000 fe:00 326279                     /opt/my lib/libx.so (deleted)
7ffd3c5f1000-7ffd3c5f3000 r-xp 00000000 00:00 0                          [vdso]
";

    #[test]
    fn parses_fixed_columns_and_paths_with_spaces() {
        let m =
            parse_line("7fed1d53d000-7fed1d693000 r-xp 00026000 fe:00 326279   /opt/my lib/libx.so (deleted)").unwrap();
        assert_eq!((m.start, m.end, m.offset), (0x7fed1d53d000, 0x7fed1d693000, 0x26000));
        assert!(m.exec);
        assert!(m.deleted);
        assert_eq!(m.path.as_deref(), Some("/opt/my lib/libx.so"));
        let anon = parse_line("7fed1d492000-7fed1d4b4000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(anon.path, None);
        assert!(!anon.exec);
        assert_eq!(parse_line("garbage"), None);
    }

    #[test]
    fn groups_by_path_and_skips_pseudo_files() {
        let files = mapped_files(MAPS);
        let names: Vec<_> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["/usr/bin/cat", "/usr/lib/locale/C.utf8/LC_CTYPE", "/opt/my lib/libx.so"]);
        assert_eq!(files[0].mappings.len(), 2);
        assert!(files[0].has_code());
        assert!(!files[1].has_code(), "a locale file has no code");
        assert!(files[2].deleted);
        assert_eq!(find_vdso(MAPS).unwrap().start, 0x7ffd3c5f1000);
    }

    #[test]
    fn deleted_files_are_read_through_map_files() {
        let files = mapped_files(MAPS);
        let view = RootView { pid: Some(42), same_as_ours: true };
        assert_eq!(readable_path(&view, &files[2]), PathBuf::from("/proc/42/map_files/7fed1d517000-7fed1d53d000"));
        assert_eq!(readable_path(&view, &files[0]), PathBuf::from("/usr/bin/cat"));
        let container = RootView { pid: Some(42), same_as_ours: false };
        assert_eq!(readable_path(&container, &files[0]), PathBuf::from("/proc/42/root/usr/bin/cat"));
    }
}
