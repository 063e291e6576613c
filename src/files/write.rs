//! Writing one file of a side, safely for the site that also writes it.
//!
//! Invariants:
//! - Optimistic: a file is replaced or removed only while it still holds what the plan saw
//!   (its SHA-256, or its absence); the check and the change happen under an exclusive
//!   `flock` on the target, so a site that locks before it writes never loses an update.
//!   A file that changed meanwhile is [`Outcome::Changed`], never overwritten.
//! - `atomic`: the new content goes to a temporary file in the same directory, is synced,
//!   given the original's mode (and owner, as root) and renamed over the target: no
//!   partial file is ever visible under a real name. A new file is linked into place only
//!   if the name is still free.
//! - `flock`: the file is rewritten in place (truncate, write, fsync) under its own lock,
//!   for sites that rewrite in place under `flock()`; a rename would orphan the inode a
//!   waiting site process is about to write. Creations and removals are as `atomic`.
//! - Contents stream through a fixed buffer and are hashed as they are copied: memory does
//!   not grow with file size, and a source that changed while it was copied is noticed.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use sha2::{Digest, Sha256};

use crate::config::WriteMode;
use crate::files::list::Stat;
use crate::fsutil::{self, Perms};
use crate::util::hex;

/// Size of the copy buffer.
const BUF: usize = 1 << 20;

/// What a side's file holds now.
#[derive(Debug, Clone, Default)]
pub struct Current {
    /// `None`: no file there.
    pub stat: Option<Stat>,
    pub sha256: Option<String>,
    /// The bytes, for files up to `merge_max`.
    pub content: Option<Vec<u8>>,
}

/// Reads the file at `path`: its metadata, its hash, and its bytes if it is no larger
/// than `keep_max`. With `lock` (trees of sites that rewrite in place), the read holds a
/// shared `flock`, waiting up to that long, so it never sees a half-rewritten file.
pub fn read_current(path: &Path, keep_max: u64, lock: Option<Duration>) -> Result<Current> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Current::default()),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read {}", path.display()));
        }
    };
    if let Some(wait) = lock {
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock_shared() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                    "{} stayed locked by another process past busy_timeout; the next run \
                     tries again",
                    path.display()
                ),
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()));
                }
            }
        }
    }
    let meta = file.metadata()?;
    if !meta.is_file() {
        anyhow::bail!("{} is not a regular file", path.display());
    }
    let (sha, content) = hash_reader(&mut file, meta.len() <= keep_max)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Current {
        stat: Some(Stat::of(&meta)),
        sha256: Some(sha),
        content,
    })
}

/// The SHA-256 of everything `r` yields, and the bytes when `keep` is set.
pub fn hash_reader(r: &mut impl Read, keep: bool) -> std::io::Result<(String, Option<Vec<u8>>)> {
    let mut h = Sha256::new();
    let mut kept = keep.then(Vec::new);
    let mut buf = vec![0u8; BUF];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        if let Some(k) = kept.as_mut() {
            k.extend_from_slice(&buf[..n]);
        }
    }
    Ok((hex(&h.finalize()), kept))
}

pub fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The content a write puts in place.
#[derive(Debug, Clone, Copy)]
pub enum Content<'a> {
    Bytes(&'a [u8]),
    /// Copied from another side's file, which must still hash to `sha256`.
    File {
        path: &'a Path,
        sha256: &'a str,
    },
    Absent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Written: the file's metadata as this write left it (`None`: removed), taken while
    /// the file was still locked.
    Done(Option<Stat>),
    /// The target no longer holds what was expected: left alone.
    Changed,
    /// The source of a copy changed while it was copied: nothing was written.
    SourceChanged,
    /// The target stayed locked by another process past `busy_timeout`: left alone.
    Busy,
}

/// One side's tree and how it is written.
#[derive(Debug, Clone, Copy)]
pub struct Dir<'a> {
    pub root: &'a Path,
    pub mode: WriteMode,
    pub perms: &'a Perms,
    pub busy: Duration,
    /// Directories whose entries changed, to be synced once by the caller before it
    /// records the writes as done; `None`: each is synced at once.
    pub dirs: Option<&'a std::sync::Mutex<std::collections::BTreeSet<PathBuf>>>,
}

impl Dir<'_> {
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        match self.dirs {
            Some(set) => {
                if let Ok(mut set) = set.lock() {
                    set.insert(dir.to_path_buf());
                    return Ok(());
                }
                fsutil::fsync_dir(dir)
            }
            None => fsutil::fsync_dir(dir),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Makes `rel` hold `content` if it still holds `expect` (a hash; `None`: no file).
    /// `mode` is used for a file that is created.
    pub fn put(
        &self,
        rel: &str,
        expect: Option<&str>,
        content: Content,
        mode: u32,
    ) -> Result<Outcome> {
        let target = self.path(rel);
        let ctx = || format!("cannot write {}", target.display());
        match (expect, content) {
            (None, Content::Absent) => Ok(Outcome::Done(None)),
            (None, content) => self.create(&target, content, mode).with_context(ctx),
            (Some(expect), Content::Absent) => self.remove(&target, expect).with_context(ctx),
            (Some(expect), content) => match self.mode {
                WriteMode::Atomic => self.replace(&target, expect, content).with_context(ctx),
                WriteMode::Flock => self.rewrite(&target, expect, content).with_context(ctx),
            },
        }
    }

    /// A new file, linked into place only if the name is still free.
    fn create(&self, target: &Path, content: Content, mode: u32) -> Result<Outcome> {
        if let Some(dir) = target.parent()
            && !dir.exists()
        {
            fsutil::ensure_dir(dir, self.perms)?;
        }
        if fs::symlink_metadata(target).is_ok() {
            return Ok(Outcome::Changed);
        }
        let tmp = fsutil::temp_beside(target);
        if !fill(&tmp, content, mode)? {
            return Ok(Outcome::SourceChanged);
        }
        if let Some(dir) = target.parent()
            && let Ok(m) = fs::metadata(dir)
        {
            apply_owner(&tmp, m.uid(), m.gid());
        }
        match fs::hard_link(&tmp, target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(Outcome::Changed),
            Err(e) => return Err(e.into()),
        }
        drop(tmp);
        self.sync_dir(target.parent().unwrap_or(self.root))?;
        Ok(Outcome::Done(
            fs::metadata(target).ok().map(|m| Stat::of(&m)),
        ))
    }

    /// Temporary file, then a rename over the target while holding its lock, if it still
    /// holds `expect`.
    fn replace(&self, target: &Path, expect: &str, content: Content) -> Result<Outcome> {
        let Ok(meta) = fs::metadata(target) else {
            return Ok(Outcome::Changed);
        };
        let tmp = fsutil::temp_beside(target);
        if !fill(&tmp, content, meta.mode() & 0o7777)? {
            return Ok(Outcome::SourceChanged);
        }
        apply_owner(&tmp, meta.uid(), meta.gid());
        let Some(mut locked) = self.lock(target, false)? else {
            return Ok(Outcome::Busy);
        };
        if !holds(&mut locked, target, expect)? {
            return Ok(Outcome::Changed);
        }
        fs::rename(&tmp, target)?;
        tmp.disarm();
        let stat = fs::metadata(target).ok().map(|m| Stat::of(&m));
        self.sync_dir(target.parent().unwrap_or(self.root))?;
        drop(locked);
        Ok(Outcome::Done(stat))
    }

    /// In place under the file's own lock, if it still holds `expect`.
    fn rewrite(&self, target: &Path, expect: &str, content: Content) -> Result<Outcome> {
        let Some(mut file) = self.lock(target, true)? else {
            return Ok(Outcome::Busy);
        };
        if !holds(&mut file, target, expect)? {
            return Ok(Outcome::Changed);
        }
        let bytes: Vec<u8> = match content {
            Content::Bytes(b) => b.to_vec(),
            Content::File { path, sha256 } => {
                let (sha, bytes) = hash_reader(&mut File::open(path)?, true)?;
                if sha != sha256 {
                    return Ok(Outcome::SourceChanged);
                }
                bytes.unwrap_or_default()
            }
            Content::Absent => return Ok(Outcome::Done(None)),
        };
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        Ok(Outcome::Done(Some(Stat::of(&file.metadata()?))))
    }

    /// Removes the target while holding its lock, if it still holds `expect`.
    fn remove(&self, target: &Path, expect: &str) -> Result<Outcome> {
        if fs::symlink_metadata(target).is_err() {
            return Ok(Outcome::Changed);
        }
        let Some(mut locked) = self.lock(target, false)? else {
            return Ok(Outcome::Busy);
        };
        if !holds(&mut locked, target, expect)? {
            return Ok(Outcome::Changed);
        }
        fs::remove_file(target)?;
        self.sync_dir(target.parent().unwrap_or(self.root))?;
        Ok(Outcome::Done(None))
    }

    /// The target opened and locked exclusively (waiting up to `busy`); `None` if another
    /// process held it all that time.
    fn lock(&self, target: &Path, write: bool) -> Result<Option<File>> {
        let file = OpenOptions::new().read(true).write(write).open(target)?;
        let deadline = Instant::now() + self.busy;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Some(file)),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
            }
        }
    }
}

/// Whether the locked file is still the one at `path` and holds `expect`.
fn holds(file: &mut File, path: &Path, expect: &str) -> Result<bool> {
    let (Ok(open), Ok(now)) = (file.metadata(), fs::metadata(path)) else {
        return Ok(false);
    };
    if (open.dev(), open.ino()) != (now.dev(), now.ino()) {
        // Replaced while we waited for the lock.
        return Ok(false);
    }
    file.seek(SeekFrom::Start(0))?;
    let (sha, _) = hash_reader(file, false)?;
    Ok(sha == expect)
}

/// Writes `content` into the new file `tmp` with `mode`, synced. `false`: the source of a
/// copy no longer hashes to what was expected.
fn fill(tmp: &Path, content: Content, mode: u32) -> Result<bool> {
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)?;
    match content {
        Content::Bytes(b) => out.write_all(b)?,
        Content::File { path, sha256 } => {
            let mut src = File::open(path)?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; BUF];
            loop {
                let n = src.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                out.write_all(&buf[..n])?;
            }
            if hex(&h.finalize()) != sha256 {
                return Ok(false);
            }
        }
        Content::Absent => {}
    }
    out.sync_all()?;
    // The umask may have narrowed the mode given at creation.
    fs::set_permissions(tmp, fs::Permissions::from_mode(mode))?;
    Ok(true)
}

/// As root, gives `path` the owner of the file it replaces (or of its directory).
fn apply_owner(path: &Path, uid: u32, gid: u32) {
    if !fsutil::running_as_root() {
        return;
    }
    if let Err(e) = std::os::unix::fs::chown(path, Some(uid), Some(gid)) {
        log::warn!(
            "cannot give {} the owner {uid}:{gid}: {e} (it keeps root's)",
            path.display()
        );
    }
}
