//! Files and directories that hold a traced program's data (its function names, call
//! times, marker arguments, fetched strings): owner-only, as `perf record` makes
//! `perf.data`, whatever the umask, and never at a name another user could guess.
//!
//! * [`PrivateDir`]: a fresh directory under a shared one (`/dev/shm`, `/tmp`), named by
//!   `mkdtemp(3)` — created exclusively (`mkdir` fails on anything already there, a
//!   symbolic link included), mode 0700, and removed when dropped: dynprobe only ever
//!   removes what it made itself.
//! * [`create_dir`]: a directory of a trace, mode 0700.
//! * [`create_private`] / [`open_private`] / [`write_private`]: a file inside a directory
//!   of dynprobe's own,
//!   mode 0600, never through a symbolic link.
//! * [`read_regular`]: a file in a directory another user may own (the ring directory of
//!   `record -p` as root): never through a symbolic link, never a FIFO or a device, and at
//!   most a given size — the directory's owner chooses what is there.
//! * [`create_output`]: a file the user named (`probe -o`, `export --chrome`): it may be a
//!   device or a link the user means (`/dev/null`, `/dev/stdout`); a new one is made 0600,
//!   and an existing regular file of ours loses the group and other bits before anything
//!   is written into it.
//!
//! The modes are set with `fchmod`/`chmod` after creation because `open(2)` and `mkdir(2)`
//! apply the umask, which can only take bits away — also the owner's (`umask 0277` would
//! leave a trace the recorder itself cannot append to).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The mode of every file dynprobe writes a trace or events into.
pub const FILE_MODE: u32 = 0o600;
/// The mode of every directory dynprobe makes for a trace or its rings.
pub const DIR_MODE: u32 = 0o700;

/// A directory made by `mkdtemp(3)` (see the module documentation), removed with what it
/// holds when dropped.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// A new directory in `parent` named `prefix` and six random characters, mode 0700.
    pub fn new_in(parent: &Path, prefix: &str) -> io::Result<PrivateDir> {
        let mut template = parent.join(format!("{prefix}XXXXXX")).into_os_string().into_vec();
        template.push(0);
        // SAFETY: `template` is NUL-terminated and ends in XXXXXX, which mkdtemp rewrites in
        // place; it creates the directory with mode 0700 or fails (EEXIST is retried inside).
        if unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) }.is_null() {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(err.kind(), format!("cannot make a directory in {}: {err}", parent.display())));
        }
        template.pop();
        let dir = PrivateDir { path: PathBuf::from(OsString::from_vec(template)) };
        // mkdtemp's 0700 went through the umask.
        fs::set_permissions(&dir.path, Permissions::from_mode(DIR_MODE))?;
        Ok(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory past this value: its path, for an owner that removes it itself.
    pub fn into_path(self) -> PathBuf {
        std::mem::take(&mut std::mem::ManuallyDrop::new(self).path)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // `remove_dir_all` removes symbolic links inside, never what they point to.
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Creates the directory `path` (its parent must exist), mode 0700 whatever the umask. An
/// existing one is an error (`AlreadyExists`), as is a symbolic link there.
pub fn create_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(DIR_MODE).create(path)?;
    fs::set_permissions(path, Permissions::from_mode(DIR_MODE))
}

/// Creates the directory `path` like [`create_dir`] unless a directory is already there
/// (left as it is: its maker chose its mode).
pub fn ensure_dir(path: &Path) -> io::Result<()> {
    match create_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && fs::symlink_metadata(path)?.is_dir() => Ok(()),
        other => other,
    }
}

/// Creates the file `path` for writing, mode 0600 whatever the umask; anything already
/// there (a symbolic link included) is an error (`AlreadyExists`).
pub fn create_private(path: &Path) -> io::Result<File> {
    let file = private_options().create_new(true).open(path)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Opens `path` for writing, appending when `append` and else from an empty file: a new
/// file is made as [`create_private`] makes it; a symbolic link there is refused (`ELOOP`).
pub fn open_private(path: &Path, append: bool) -> io::Result<File> {
    match create_private(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            private_options().append(append).truncate(!append).open(path)
        }
        other => other,
    }
}

fn private_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.write(true).mode(FILE_MODE).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    options
}

/// Writes `content` as the whole of `path` (see [`open_private`]).
pub fn write_private(path: &Path, content: &[u8]) -> io::Result<()> {
    open_private(path, false)?.write_all(content)
}

/// The content of the regular file `path`, at most `limit` bytes. A symbolic link there is
/// refused (`O_NOFOLLOW`), as is anything but a regular file (checked with `fstat` on what was
/// opened; `O_NONBLOCK` makes the open of a FIFO return at once instead of waiting for a
/// writer, open(2)) and a file longer than `limit`: each with an error that says which.
pub fn read_regular(path: &Path, limit: usize) -> io::Result<Vec<u8>> {
    let refused = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{} {what}", path.display()));
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refused("is a symbolic link, not a file"),
            _ => e,
        })?;
    if !file.metadata()?.is_file() {
        return Err(refused("is not a regular file"));
    }
    let mut content = Vec::new();
    file.take(limit as u64 + 1).read_to_end(&mut content)?;
    if content.len() > limit {
        return Err(refused(&format!("is larger than {limit} bytes")));
    }
    Ok(content)
}

/// Opens the output file `path` the user named, emptied (see the module documentation).
pub fn create_output(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).mode(FILE_MODE).custom_flags(libc::O_CLOEXEC);
    match options.clone().create_new(true).open(path) {
        Ok(file) => {
            file.set_permissions(Permissions::from_mode(FILE_MODE))?;
            Ok(file)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let file = options.truncate(true).open(path)?;
            let meta = file.metadata()?;
            // SAFETY: geteuid cannot fail.
            let ours = meta.uid() == unsafe { libc::geteuid() };
            // Another user's file (root writing where it was told) keeps the mode its owner
            // chose, as does anything that is not a regular file (`/dev/null`, a pipe).
            if meta.is_file() && ours && meta.mode() & 0o077 != 0 {
                file.set_permissions(Permissions::from_mode(meta.mode() & 0o7700))?;
            }
            Ok(file)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    /// Runs `f` with the process umask set to `mask` (the tests of this module are the
    /// only ones that create files with a changed umask, and they do it under this lock).
    fn with_umask<T>(mask: libc::mode_t, f: impl FnOnce() -> T) -> T {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = LOCK.lock().unwrap();
        // SAFETY: umask only sets the process's mask.
        let old = unsafe { libc::umask(mask) };
        let result = f();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        result
    }

    #[test]
    fn private_dirs_are_fresh_owner_only_and_removed() {
        let tmp = TempDir::new("files-private-dir");
        let (a, b) = with_umask(0o277, || {
            (PrivateDir::new_in(tmp.path(), "x-").unwrap(), PrivateDir::new_in(tmp.path(), "x-").unwrap())
        });
        assert_ne!(a.path(), b.path());
        assert!(a.path().file_name().unwrap().to_str().unwrap().starts_with("x-"));
        assert_eq!(mode(a.path()), 0o700);
        fs::write(a.path().join("f"), "").unwrap();
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
        let err = PrivateDir::new_in(&tmp.path().join("none"), "x-").unwrap_err().to_string();
        assert!(err.contains("cannot make a directory in") && err.contains("none"), "{err}");
    }

    #[test]
    fn files_and_dirs_are_owner_only_whatever_the_umask() {
        let tmp = TempDir::new("files-modes");
        for (n, mask) in [0o000, 0o022, 0o277].into_iter().enumerate() {
            let dir = tmp.path().join(format!("d{n}"));
            with_umask(mask, || {
                create_dir(&dir).unwrap();
                write_private(&dir.join("f"), b"one").unwrap();
                create_output(&dir.join("out")).unwrap();
            });
            assert_eq!((mode(&dir), mode(&dir.join("f")), mode(&dir.join("out"))), (0o700, 0o600, 0o600), "{mask:o}");
            open_private(&dir.join("f"), true).unwrap().write_all(b"two").unwrap();
            assert_eq!(fs::read_to_string(dir.join("f")).unwrap(), "onetwo");
            write_private(&dir.join("f"), b"three").unwrap();
            assert_eq!(fs::read_to_string(dir.join("f")).unwrap(), "three");
        }
        assert_eq!(create_dir(&tmp.path().join("d0")).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        ensure_dir(&tmp.path().join("d0")).unwrap();
    }

    #[test]
    fn links_are_refused_inside_and_followed_for_outputs() {
        let tmp = TempDir::new("files-links");
        let target = tmp.path().join("target");
        fs::write(&target, "theirs").unwrap();
        fs::set_permissions(&target, Permissions::from_mode(0o644)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_private(&link, true).is_err());
        assert!(write_private(&link, b"x").is_err());
        assert!(ensure_dir(&link).is_err());
        assert_eq!(fs::read_to_string(&target).unwrap(), "theirs");
        // An output the user named through a link is written, and made owner-only.
        create_output(&link).unwrap().write_all(b"mine").unwrap();
        assert_eq!((fs::read_to_string(&target).unwrap().as_str(), mode(&target)), ("mine", 0o600));
        // A device stays as it is.
        let before = mode(Path::new("/dev/null"));
        create_output(Path::new("/dev/null")).unwrap();
        assert_eq!(mode(Path::new("/dev/null")), before);
    }

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let tmp = TempDir::new("files-read-regular");
        let file = tmp.path().join("file");
        fs::write(&file, "four").unwrap();
        assert_eq!(read_regular(&file, 4).unwrap(), b"four");
        let err = read_regular(&file, 3).unwrap_err().to_string();
        assert!(err.ends_with("file is larger than 3 bytes"), "{err}");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let err = read_regular(&link, 4).unwrap_err().to_string();
        assert!(err.ends_with("link is a symbolic link, not a file"), "{err}");
        // A FIFO without a writer: refused at once, not waited on.
        let fifo = tmp.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let err = read_regular(&fifo, 4).unwrap_err().to_string();
        assert!(err.ends_with("fifo is not a regular file"), "{err}");
        assert_eq!(read_regular(&tmp.path().join("none"), 4).unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
