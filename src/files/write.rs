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
//!   A large local file is copied by the kernel (`copy_file_range`), and what landed in
//!   the copy is read back and hashed on a second core.
//! - Durable before visible: a temporary file is synced before it is renamed into place,
//!   either by its own `fsync` ([`Dir::put`]) or, for a batch, by one sync of each
//!   filesystem after every temporary of the batch is written ([`Dir::prepare`], then
//!   [`fsutil::sync_filesystems`], then [`Dir::place`]). In a batch [`Dir`], renames,
//!   removals and in-place rewrites are not synced one by one: the caller syncs the
//!   filesystems once before it records them as done.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use sha2::{Digest, Sha256};

use crate::config::WriteMode;
use crate::files::list::Stat;
use crate::files::store::Seen;
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
    let (sha, content) = hash_reader(&mut file, meta.len(), meta.len() <= keep_max)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Current {
        stat: Some(Stat::of(&meta)),
        sha256: Some(sha),
        content,
    })
}

/// The SHA-256 of everything `r` yields, and the bytes when `keep` is set. `size`: what
/// the reader is expected to yield (it sizes the buffer; any length is read whole).
pub fn hash_reader(
    r: &mut (impl Read + ?Sized),
    size: u64,
    keep: bool,
) -> std::io::Result<(String, Option<Vec<u8>>)> {
    let mut kept = keep.then(|| Vec::with_capacity(usize::try_from(size).unwrap_or(0)));
    let sha = pump(r, size, |chunk| {
        if let Some(k) = kept.as_mut() {
            k.extend_from_slice(chunk);
        }
        Ok(())
    })?;
    Ok((sha, kept))
}

/// Reads `r` to its end through one buffer, handing each chunk to `each`; returns the
/// SHA-256 of everything read.
fn pump(
    r: &mut (impl Read + ?Sized),
    size: u64,
    mut each: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = buffer(size);
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        each(&buf[..n])?;
    }
    Ok(hex(&h.finalize()))
}

/// A copy buffer for a file of `size` bytes: the file and one more byte (to see its end in
/// one read), at least 8 KiB and at most [`BUF`]. A small file does not pay for zeroing
/// and mapping a large buffer.
fn buffer(size: u64) -> Vec<u8> {
    let n = usize::try_from(size.saturating_add(1)).unwrap_or(BUF);
    vec![0u8; n.clamp(8 << 10, BUF)]
}

pub fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The content a write puts in place.
#[derive(Clone, Copy)]
pub enum Content<'a> {
    Bytes(&'a [u8]),
    /// Copied from another side's file, which must still hash to `sha256`.
    File {
        path: &'a Path,
        sha256: &'a str,
    },
    /// Copied from a reader (a file on another host) of about `size` bytes, which must
    /// hash to `sha256`.
    Stream {
        src: &'a std::cell::RefCell<dyn Read + 'a>,
        size: u64,
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

/// What a target must still hold for a write to go ahead.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub sha256: &'a str,
    /// Metadata known to go with that content (recorded by an earlier sync and trusted
    /// under the racy-entry rule): a target that still has it, checked under the lock, is
    /// not read again. `None`: the target is hashed.
    pub seen: Option<Seen>,
}

impl<'a> Expect<'a> {
    /// A target checked by its hash.
    pub fn hash(sha256: &'a str) -> Self {
        Expect { sha256, seen: None }
    }
}

/// One side's tree and how it is written.
#[derive(Debug, Clone, Copy)]
pub struct Dir<'a> {
    pub root: &'a Path,
    pub mode: WriteMode,
    pub perms: &'a Perms,
    pub busy: Duration,
    /// The caller syncs this side's filesystem once before it records the writes as done
    /// (see the module doc); otherwise each change is synced at once.
    pub batch: bool,
}

/// Content written ahead to a temporary file beside its target ([`Dir::prepare`]); the
/// file is removed if it is dropped before [`Dir::place`] puts it in place.
#[derive(Debug)]
pub struct Prepared {
    tmp: fsutil::Scratch,
}

impl Prepared {
    /// A temporary file already written (and synced, if it must be) by the caller.
    pub fn from_scratch(tmp: fsutil::Scratch) -> Prepared {
        Prepared { tmp }
    }
}

impl Dir<'_> {
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        if self.batch {
            return Ok(());
        }
        fsutil::fsync_dir(dir)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Makes `rel` hold `content` if it still holds `expect` (`None`: no file).
    /// `mode` is used for a file that is created.
    pub fn put(
        &self,
        rel: &str,
        expect: Option<Expect>,
        content: Content,
        mode: u32,
    ) -> Result<Outcome> {
        let target = self.path(rel);
        let ctx = || format!("cannot write {}", target.display());
        match (expect, content) {
            (None, Content::Absent) => Ok(Outcome::Done(None)),
            (Some(expect), Content::Absent) => self.remove(&target, expect).with_context(ctx),
            (Some(expect), content) if self.mode == WriteMode::Flock => {
                self.rewrite(&target, expect, content).with_context(ctx)
            }
            (expect, content) => {
                if expect.is_none() && fs::symlink_metadata(&target).is_ok() {
                    return Ok(Outcome::Changed);
                }
                match self
                    .fill_temp(&target, content, mode, true)
                    .with_context(ctx)?
                {
                    Some(prepared) => self.place(rel, expect, prepared),
                    None => Ok(Outcome::SourceChanged),
                }
            }
        }
    }

    /// Writes `content` to a temporary file beside `rel`, not synced (the caller syncs
    /// the filesystem for the whole batch before [`Dir::place`]). `None`: the source of a
    /// copy no longer hashes to what was expected. Only for content [`Dir::place`] can
    /// take: a creation or a replacement in an `atomic` tree.
    pub fn prepare(&self, rel: &str, content: Content, mode: u32) -> Result<Option<Prepared>> {
        let target = self.path(rel);
        self.fill_temp(&target, content, mode, false)
            .with_context(|| format!("cannot write {}", target.display()))
    }

    fn fill_temp(
        &self,
        target: &Path,
        content: Content,
        mode: u32,
        sync: bool,
    ) -> Result<Option<Prepared>> {
        if let Some(dir) = target.parent()
            && !dir.exists()
        {
            fsutil::ensure_dir(dir, self.perms)?;
        }
        let tmp = fsutil::temp_beside(target);
        Ok(fill(&tmp, content, mode, sync)?.then_some(Prepared { tmp }))
    }

    /// Puts a prepared (and synced) content in place at `rel` if it still holds `expect`
    /// (a hash; `None`: no file).
    pub fn place(&self, rel: &str, expect: Option<Expect>, prepared: Prepared) -> Result<Outcome> {
        let target = self.path(rel);
        let ctx = || format!("cannot write {}", target.display());
        match expect {
            None => self.create(&target, prepared.tmp).with_context(ctx),
            Some(expect) => self
                .replace(&target, expect, prepared.tmp)
                .with_context(ctx),
        }
    }

    /// A new file, linked into place only if the name is still free.
    fn create(&self, target: &Path, tmp: fsutil::Scratch) -> Result<Outcome> {
        if fs::symlink_metadata(target).is_ok() {
            return Ok(Outcome::Changed);
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

    /// The temporary file renamed over the target while holding its lock, if it still
    /// holds `expect`; it gets the target's mode and owner first.
    fn replace(&self, target: &Path, expect: Expect, tmp: fsutil::Scratch) -> Result<Outcome> {
        let Ok(meta) = fs::metadata(target) else {
            return Ok(Outcome::Changed);
        };
        fs::set_permissions(&tmp, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
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
    fn rewrite(&self, target: &Path, expect: Expect, content: Content) -> Result<Outcome> {
        let Some(mut file) = self.lock(target, true)? else {
            return Ok(Outcome::Busy);
        };
        if !holds(&mut file, target, expect)? {
            return Ok(Outcome::Changed);
        }
        let bytes: Vec<u8> = match content {
            Content::Bytes(b) => b.to_vec(),
            Content::File { path, sha256 } => {
                let Some(mut src) = open_source(path)? else {
                    return Ok(Outcome::SourceChanged);
                };
                let size = src.metadata()?.len();
                let (sha, bytes) = hash_reader(&mut src, size, true)?;
                if sha != sha256 {
                    return Ok(Outcome::SourceChanged);
                }
                bytes.unwrap_or_default()
            }
            Content::Stream { src, size, sha256 } => {
                let mut src = src.borrow_mut();
                let (sha, bytes) = match hash_reader(&mut *src, size, true) {
                    Ok(r) => r,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Ok(Outcome::SourceChanged);
                    }
                    Err(e) => return Err(e.into()),
                };
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
        if !self.batch {
            file.sync_all()?;
        }
        Ok(Outcome::Done(Some(Stat::of(&file.metadata()?))))
    }

    /// Removes the target while holding its lock, if it still holds `expect`.
    fn remove(&self, target: &Path, expect: Expect) -> Result<Outcome> {
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
fn holds(file: &mut File, path: &Path, expect: Expect) -> Result<bool> {
    let (Ok(open), Ok(now)) = (file.metadata(), fs::metadata(path)) else {
        return Ok(false);
    };
    if (open.dev(), open.ino()) != (now.dev(), now.ino()) {
        // Replaced while we waited for the lock.
        return Ok(false);
    }
    if expect.seen.is_some_and(|s| s.matches(&Stat::of(&open))) {
        return Ok(true);
    }
    file.seek(SeekFrom::Start(0))?;
    let (sha, _) = hash_reader(file, open.len(), false)?;
    Ok(sha == expect.sha256)
}

/// Writes `content` into the new file `tmp` with `mode`, synced if `sync`. `false`: the
/// source of a copy no longer hashes to what was expected.
fn fill(tmp: &Path, content: Content, mode: u32, sync: bool) -> Result<bool> {
    let mut out = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)?;
    match content {
        Content::Bytes(b) => out.write_all(b)?,
        Content::File { path, sha256 } => {
            let Some(mut src) = open_source(path)? else {
                return Ok(false);
            };
            let size = src.metadata()?.len();
            let same = if size > KERNEL_COPY_MIN {
                copy_file_hashed(&src, &out, sha256)?
            } else {
                copy_hashed(&mut src, size, &mut out, sha256)?
            };
            if !same {
                return Ok(false);
            }
        }
        Content::Stream { src, size, sha256 } => {
            let src = &mut *src.borrow_mut();
            match pump(src, size, |chunk| out.write_all(chunk)) {
                Ok(sha) if sha == sha256 => {}
                Ok(_) => return Ok(false),
                // The source is gone since the decision: as a source that changed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        Content::Absent => {}
    }
    if sync {
        out.sync_all()?;
    }
    // The umask may have narrowed the mode given at creation.
    fs::set_permissions(tmp, fs::Permissions::from_mode(mode))?;
    Ok(true)
}

/// Copies `src` into `out` through a buffer; whether what was copied hashes to `sha256`.
fn copy_hashed(src: &mut dyn Read, size: u64, out: &mut File, sha256: &str) -> Result<bool> {
    Ok(pump(src, size, |chunk| out.write_all(chunk))? == sha256)
}

/// Opens the source of a copy. `None`: it is gone since the decision, which a write
/// takes as a source that changed (nothing is written; the next run decides again).
pub fn open_source(path: &Path) -> std::io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Files larger than this are copied by the kernel ([`copy_file_hashed`]).
const KERNEL_COPY_MIN: u64 = 4 << 20;

/// Copies the local file `src` into `out` (both at their start) with `copy_file_range`, a
/// step at a time, while a second thread reads each copied step back from `out` (from the
/// page cache) and hashes it; whether what `out` holds hashes to `sha256`. Copying
/// through the kernel saves a copy into and out of user memory: on the machines measured,
/// writing from a buffer took 2.5 times as long as the kernel's copy.
fn copy_file_hashed(src: &File, out: &File, sha256: &str) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    const STEP: u64 = 8 << 20;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, u64)>(4);
    std::thread::scope(|scope| {
        let hasher = scope.spawn(move || -> std::io::Result<String> {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; BUF];
            for (at, len) in rx {
                let mut done = 0u64;
                while done < len {
                    let n = usize::try_from(len - done).unwrap_or(BUF).min(BUF);
                    out.read_exact_at(&mut buf[..n], at + done)?;
                    h.update(&buf[..n]);
                    done += n as u64;
                }
            }
            Ok(hex(&h.finalize()))
        });
        let mut at = 0u64;
        let copied = loop {
            match std::io::copy(&mut src.take(STEP), &mut &*out) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if tx.send((at, n)).is_err() {
                        // The hasher stopped (a read failed): its error is returned below.
                        break Ok(());
                    }
                    at += n;
                }
                Err(e) => break Err(e),
            }
        };
        drop(tx);
        let sha = hasher
            .join()
            .map_err(|_| anyhow::anyhow!("the hashing of a copy stopped unexpectedly"))??;
        copied?;
        Ok(sha == sha256)
    })
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
    use super::*;

    #[test]
    fn a_large_file_copied_by_the_kernel_is_whole_and_checked_against_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.bin");
        // Past the kernel-copy threshold, and not a whole number of steps.
        let bytes: Vec<u8> = (0..(KERNEL_COPY_MIN as usize * 3 + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&src, &bytes).unwrap();
        let sha = sha256(&bytes);
        let content = |sha256| Content::File { path: &src, sha256 };
        let good = dir.path().join("good.bin");
        assert!(fill(&good, content(&sha), 0o640, false).unwrap());
        assert_eq!(std::fs::read(&good).unwrap(), bytes);
        // A source that no longer hashes to what the plan saw is refused.
        let other = dir.path().join("other.bin");
        assert!(!fill(&other, content(&sha256(b"something else")), 0o640, false).unwrap());
        let mode = std::fs::metadata(&good).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }
}
