//! File-system primitives every writer in cr0sync goes through.
//!
//! Invariants:
//! - [`atomic_write`] is the only way a whole file is replaced: a temporary file in the
//!   same directory, `fsync`, `rename`, then `fsync` of the directory. A reader sees the
//!   old file or the new one, never a torn one, and after return the new one survives a
//!   power cut.
//! - [`append_durable`] is the one append: synced, and a new file's directory entry too
//!   (conflict records, security events, their monthly archives).
//! - [`Scratch`] is the one scratch-file guard: a temporary or scratch file is removed on
//!   every path out of the code that made it, error or not.
//! - [`create_new`] never overwrites: it links a complete temporary file to its name, which
//!   fails if the name exists (so `init` is idempotent even against a concurrent `init`).
//! - Every file and directory cr0sync creates gets the configured [`Perms`]; ownership is
//!   applied only when running as root.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Modes and ownership applied to what cr0sync creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    pub dir_mode: u32,
    pub file_mode: u32,
    /// `(uid, gid)` to apply, each optional; only honoured when running as root.
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

/// Mode of secret files (the integrity HMAC key, saved session copies).
pub const SECRET_MODE: u32 = 0o600;

impl Default for Perms {
    fn default() -> Self {
        Perms {
            dir_mode: 0o775,
            file_mode: 0o664,
            owner: None,
            group: None,
        }
    }
}

impl Perms {
    /// Sets mode and (as root) ownership of a file cr0sync created.
    pub fn apply_file(&self, path: &Path) -> io::Result<()> {
        self.apply(path, self.file_mode)
    }

    pub fn apply_dir(&self, path: &Path) -> io::Result<()> {
        self.apply(path, self.dir_mode)
    }

    pub fn apply_secret(&self, path: &Path) -> io::Result<()> {
        self.apply(path, SECRET_MODE)
    }

    fn apply(&self, path: &Path, mode: u32) -> io::Result<()> {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        if running_as_root() && (self.owner.is_some() || self.group.is_some()) {
            std::os::unix::fs::lchown(path, self.owner, self.group)?;
        }
        Ok(())
    }

    /// The process umask matching these modes, so files made by libraries (SQLite's
    /// `-wal`, log4rs's rolled logs) get the same permissions as our own.
    pub fn umask(&self) -> u32 {
        !self.dir_mode & 0o777
    }
}

pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Sets the process umask (see [`Perms::umask`]).
pub fn set_umask(mask: u32) {
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe {
        libc::umask(mask as libc::mode_t);
    }
}

/// Looks up a user name (or a numeric id) in the user database.
pub fn lookup_user(name: &str) -> Option<u32> {
    if let Ok(id) = name.parse() {
        return Some(id);
    }
    let cname = CString::new(name).ok()?;
    // SAFETY: getpwnam returns NULL or a pointer to static storage; we copy out at once.
    // cr0sync is single-threaded while it reads its configuration.
    unsafe {
        let pw = libc::getpwnam(cname.as_ptr());
        if pw.is_null() {
            None
        } else {
            Some((*pw).pw_uid)
        }
    }
}

/// Looks up a group name (or a numeric id) in the group database.
pub fn lookup_group(name: &str) -> Option<u32> {
    if let Ok(id) = name.parse() {
        return Some(id);
    }
    let cname = CString::new(name).ok()?;
    // SAFETY: as in lookup_user.
    unsafe {
        let gr = libc::getgrnam(cname.as_ptr());
        if gr.is_null() {
            None
        } else {
            Some((*gr).gr_gid)
        }
    }
}

/// `fsync` of a directory, making a rename or a new entry in it durable.
/// What `path` is when it is not a regular file (following symlinks): a directory, a
/// named pipe, a device or a socket. Checked from its metadata, without opening it:
/// opening a FIFO blocks until a writer comes, and a job must never hang on a path.
pub fn special_kind(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = std::fs::metadata(path).ok()?.file_type();
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a named pipe (FIFO)")
    } else if t.is_char_device() || t.is_block_device() {
        Some("a device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    }
}

/// The one durable append: `bytes` at the end of `path` (created if absent, with the
/// configured mode and owner), synced; a new file's directory entry is synced too. After
/// return the bytes survive a power cut. (A reader may see a torn last line after a crash
/// mid-write: readers of appended files skip a line that does not parse.)
pub fn append_durable(path: &Path, bytes: &[u8], perms: &Perms) -> io::Result<()> {
    let existed = path.exists();
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(perms.file_mode)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    if !existed {
        perms.apply_file(path)?;
        if let Some(dir) = path.parent() {
            fsync_dir(dir)?;
        }
    }
    Ok(())
}

/// A scratch file (a snapshot, an unpacked backup, a temporary beside its target) removed
/// when the guard is dropped, on every path. A removal that fails is logged: the file is
/// scratch, named per process or overwritten by the next run, so nothing depends on it.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    armed: bool,
}

impl Scratch {
    pub fn new(path: PathBuf) -> Self {
        Scratch { path, armed: true }
    }

    /// The file was renamed into place: nothing to remove.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!(
                "cannot remove scratch file {}: {e} (harmless; remove it by hand)",
                self.path.display()
            ),
        }
    }
}

/// Removes `path`; a file that is already gone is not an error.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes everything written so far to the filesystems holding `paths` durable: one
/// `syncfs` per filesystem, for a batch of writes that would otherwise take one `fsync`
/// per file and per directory (each a journal commit). It also flushes what other
/// processes wrote there, which is why single writes keep their own `fsync`.
pub fn sync_filesystems(paths: &[&Path]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let mut done = Vec::new();
    for path in paths {
        let file = File::open(path)?;
        let dev = file.metadata()?.dev();
        if done.contains(&dev) {
            continue;
        }
        // SAFETY: `file` is open for the whole call; syncfs only reads the descriptor.
        if unsafe { libc::syncfs(file.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        done.push(dev);
    }
    Ok(())
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Whether a file name is one of cr0sync's temporary names (see [`temp_beside`]): skipped
/// by every listing.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp.")
}

/// Whether a temporary name was left by a process that is gone (killed mid-write): its pid
/// is no longer running. Such a file is garbage; a live process's is in use.
pub fn is_stale_temp(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    let (_n, pid) = (parts.next(), parts.next());
    is_temp_name(name)
        && pid.and_then(|p| p.parse::<u32>().ok()).is_some_and(|pid| {
            pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
        })
}

/// A scratch file name beside `path` (same directory, so a rename is atomic).
pub fn temp_beside(path: &Path) -> Scratch {
    Scratch::new(temp_path(path))
}

/// A temporary name beside `path`, unique to this process and call.
fn temp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(path).join(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

/// Writes `bytes` to a new temporary file beside `path` with `mode`, synced to disk.
fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> io::Result<Scratch> {
    let tmp = Scratch::new(temp_path(path));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(tmp)
}

/// Replaces `path` with `bytes` atomically and durably (see the module doc).
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32, perms: &Perms) -> io::Result<()> {
    let tmp = write_temp(path, bytes, mode)?;
    install(tmp, path, mode, perms)
}

/// Replaces `path` with a file that `build` writes at the temporary path it is given (an
/// SQLite database, a gzip stream...). The result is synced, given the configured mode,
/// renamed over `path`, and the directory synced. On any error nothing is left behind.
pub fn atomic_replace_with(
    path: &Path,
    perms: &Perms,
    build: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tmp = Scratch::new(temp_path(path));
    build(&tmp)?;
    File::open(&tmp)?.sync_all()?;
    Ok(install(tmp, path, perms.file_mode, perms)?)
}

/// Gives a complete, synced temporary file its mode and renames it over `path`.
fn install(tmp: Scratch, path: &Path, mode: u32, perms: &Perms) -> io::Result<()> {
    perms.apply(&tmp, mode)?;
    fs::rename(&tmp, path)?;
    tmp.disarm();
    fsync_dir(parent_of(path))
}

/// Creates `path` with `bytes` only if nothing exists there. Returns whether it created it.
pub fn create_new(path: &Path, bytes: &[u8], mode: u32, perms: &Perms) -> io::Result<bool> {
    if fs::symlink_metadata(path).is_ok() {
        return Ok(false);
    }
    let tmp = write_temp(path, bytes, mode)?;
    let linked = perms
        .apply(&tmp, mode)
        .and_then(|()| fs::hard_link(&tmp, path));
    drop(tmp);
    match linked {
        Ok(()) => {
            fsync_dir(parent_of(path))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// A read-only descriptor of `path` that stays open until the process exits, for reading
/// an SQLite file's bytes beside SQLite itself (by offset: the descriptor may be shared).
/// Closing any descriptor of a file drops every POSIX lock the process holds on it,
/// SQLite's included, so such a descriptor is never closed; one is kept per file.
pub fn pinned(path: &Path) -> io::Result<std::sync::Arc<File>> {
    use std::os::unix::fs::MetadataExt as _;
    use std::sync::{Arc, Mutex};
    static OPEN: Mutex<Vec<(u64, u64, Arc<File>)>> = Mutex::new(Vec::new());
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    let meta = fs::metadata(path)?;
    if let Some((_, _, f)) = open
        .iter()
        .find(|(dev, ino, _)| *dev == meta.dev() && *ino == meta.ino())
    {
        return Ok(f.clone());
    }
    let f = Arc::new(File::open(path)?);
    let meta = f.metadata()?;
    open.push((meta.dev(), meta.ino(), f.clone()));
    Ok(f)
}

/// Copies the first `len` bytes of `src` (from its start, whatever its offset; a
/// [`pinned`] descriptor is shared) to the end of `out` through the kernel
/// (`copy_file_range`).
pub fn copy_prefix(src: &File, out: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut at: libc::loff_t = 0;
    while at.cast_unsigned() < len {
        let want = usize::try_from(len - at.cast_unsigned())
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        // SAFETY: both descriptors are open for the call; `at` outlives it.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut at,
                out.as_raw_fd(),
                std::ptr::null_mut(),
                want,
                0,
            )
        };
        match n {
            n if n > 0 => {}
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Makes the first `len` bytes of `out` those of `src` (also `len` bytes, or more) and
/// cuts `out` there, writing only the 4 KiB blocks that differ: a file rewritten in
/// place this way gets no new blocks and no new page-cache pages where it already held
/// the same bytes. Returns the number of bytes written. Like [`copy_prefix`], it reads
/// `src` at explicit offsets (the descriptor's own offset is left alone).
pub fn patch_prefix(src: &File, out: &File, len: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt as _;
    const CHUNK: usize = 256 << 10;
    const BLOCK: usize = 4 << 10;
    let (mut want, mut have) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut written = 0u64;
    let mut at = 0u64;
    while at < len {
        let n = usize::try_from(len - at).unwrap_or(CHUNK).min(CHUNK);
        src.read_exact_at(&mut want[..n], at)?;
        // `out` may be shorter: what it lacks counts as differing.
        let mut got = 0;
        while got < n {
            match out.read_at(&mut have[got..n], at + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut i = 0;
        while i < n {
            let same = |i: usize| {
                let e = (i + BLOCK).min(n);
                e <= got && want[i..e] == have[i..e]
            };
            if same(i) {
                i += BLOCK;
                continue;
            }
            let mut j = i + BLOCK;
            while j < n && !same(j) {
                j += BLOCK;
            }
            let j = j.min(n);
            out.write_all_at(&want[i..j], at + i as u64)?;
            written += (j - i) as u64;
            i = j;
        }
        at += n as u64;
    }
    if out.metadata()?.len() != len {
        out.set_len(len)?;
    }
    Ok(written)
}

/// Creates a directory (and missing parents) with the configured mode. Returns whether
/// `path` itself was created; an existing directory is left exactly as it is.
pub fn ensure_dir(path: &Path, perms: &Perms) -> io::Result<bool> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => return Ok(false),
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        ensure_dir(parent, perms)?;
    }
    match fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    }
    perms.apply_dir(path)?;
    fsync_dir(parent_of(path))?;
    Ok(true)
}

/// Whether a failure was a full disk: ENOSPC anywhere in the chain, or SQLite's "database
/// or disk is full".
pub fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.raw_os_error() == Some(libc::ENOSPC))
            || matches!(
                c.downcast_ref::<rusqlite::Error>(),
                Some(rusqlite::Error::SqliteFailure(f, _))
                    // SQLITE_FULL, or SQLITE_IOERR_SHMSIZE: no room to grow a `-shm` file.
                    if f.code == rusqlite::ErrorCode::DiskFull || f.extended_code == 4874
            )
    }) || e.to_string().contains("No space left on device")
}

/// The other processes holding a lock on `path`, as `pid N (command)`, from
/// `/proc/locks` (Linux); empty where that cannot be found out.
pub fn lock_holders(path: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(path) else {
        return Vec::new();
    };
    let Ok(locks) = fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut pids: Vec<u32> = locks
        .lines()
        .filter_map(|line| {
            // "1: POSIX  ADVISORY  READ 1234 08:01:5678 1073741824 1073741824"
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (pid, dev_ino) = (fields.get(4)?, fields.get(5)?);
            let ino: u64 = dev_ino.rsplit(':').next()?.parse().ok()?;
            let pid: u32 = pid.parse().ok()?;
            (ino == meta.ino() && pid != me).then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .map(|pid| {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("pid {pid} ({})", comm.trim())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let perms = Perms::default();
        atomic_write(&path, b"one", 0o664, &perms).unwrap();
        atomic_write(&path, b"two", 0o664, &perms).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o664);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn create_new_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cr0sync.toml");
        let perms = Perms::default();
        assert!(create_new(&path, b"first", 0o664, &perms).unwrap());
        assert!(!create_new(&path, b"second", 0o664, &perms).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"first");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn secret_mode_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        create_new(&path, b"k", SECRET_MODE, &Perms::default()).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn ensure_dir_creates_parents_with_mode() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        assert!(ensure_dir(&deep, &Perms::default()).unwrap());
        assert!(!ensure_dir(&deep, &Perms::default()).unwrap());
        for p in ["a", "a/b", "a/b/c"] {
            assert_eq!(
                fs::metadata(dir.path().join(p)).unwrap().mode() & 0o777,
                0o775
            );
        }
    }

    #[test]
    fn ensure_dir_refuses_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"").unwrap();
        assert!(ensure_dir(&file, &Perms::default()).is_err());
    }

    #[test]
    fn umask_matches_modes() {
        assert_eq!(Perms::default().umask(), 0o002);
        let p = Perms {
            dir_mode: 0o750,
            file_mode: 0o640,
            owner: None,
            group: None,
        };
        assert_eq!(p.umask(), 0o027);
    }
}
