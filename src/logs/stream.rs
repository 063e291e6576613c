//! Copying one stream's source logs into the central store exactly once.
//!
//! Invariants:
//! - Only complete lines are copied (up to the last `\n`), byte for byte; a partial last
//!   line waits for the next run.
//! - A destination never holds bytes its checkpoint does not account for: before
//!   appending, a destination longer than the checkpoint's `dest_len` (a run died after
//!   appending, before recording) is cut back to it. Appended bytes are fdatasync'ed
//!   before the stream's checkpoints are saved (atomically, `state/logs/<stream>.json`).
//! - A source rotated by rename is finished from its old inode among its siblings before
//!   the new file is copied from 0; a source truncated in place (copytruncate, `>`) is
//!   finished from the copy whose first bytes match the checkpoint's fingerprint. What
//!   cannot be finished (the old file was compressed or removed) is said in the log with
//!   the byte count.
//! - Copies stream through the kernel (`copy_file_range` via `std::io::copy`); memory
//!   does not depend on file size.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::io_text;

/// How many leading bytes identify a file (fewer while it is shorter).
const FINGERPRINT_LEN: u64 = 1024;
/// How long a vanished source keeps its checkpoint.
pub const FORGET_AFTER_DAYS: i64 = 7;

/// Where copying of one source file stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub dev: u64,
    pub ino: u64,
    /// SHA-256 (hex) of the first `fp_len` bytes of the source.
    pub fp: String,
    pub fp_len: u64,
    /// Source bytes copied.
    pub offset: u64,
    /// Length of the destination once those bytes were appended.
    pub dest_len: u64,
    /// Size and mtime when last looked at: the fast path.
    pub size: u64,
    pub mtime_ns: i128,
    /// Set when the source is not found; the checkpoint is dropped after 7 days.
    #[serde(default)]
    pub missing_since: Option<DateTime<Utc>>,
}

/// All checkpoints of a stream, by source file name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamState {
    pub files: BTreeMap<String, Checkpoint>,
}

pub fn state_name(stream: &str) -> String {
    format!("logs/{stream}.json")
}

/// What syncing one source did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileReport {
    pub copied: u64,
    /// Rotated or truncated old files that could not be found to be finished.
    pub unfinished: usize,
    pub skipped: bool,
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

fn read_err(path: &Path) -> impl Fn(std::io::Error) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("cannot read {}: {}", path.display(), io_text(&e))
}

/// SHA-256 of the first `len` bytes of `file`, or `None` if it is shorter.
fn fingerprint(file: &mut File, len: u64) -> std::io::Result<Option<String>> {
    let Ok(len) = usize::try_from(len) else {
        return Ok(None);
    };
    let mut buf = vec![0u8; len];
    file.seek(SeekFrom::Start(0))?;
    let mut got = 0;
    while got < buf.len() {
        let n = file.read(&mut buf[got..])?;
        if n == 0 {
            return Ok(None);
        }
        got += n;
    }
    let digest = Sha256::digest(&buf);
    Ok(Some(digest.iter().map(|b| format!("{b:02x}")).collect()))
}

/// The position just after the last `\n` in `[from, size)`, or `from` if there is none.
/// Reads backwards in blocks, so memory stays bounded whatever the line length.
fn complete_end(file: &mut File, from: u64, size: u64) -> std::io::Result<u64> {
    const BLOCK: usize = 64 * 1024;
    let mut buf = vec![0u8; BLOCK];
    let mut end = size;
    while end > from {
        let start = end.saturating_sub(BLOCK as u64).max(from);
        let len = usize::try_from(end - start).unwrap_or(BLOCK);
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..len])?;
        if let Some(i) = buf[..len].iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(from)
}

/// Appends `[from, to)` of `src` to `dest` (positioned at its end). Returns bytes copied.
fn append_range(src: &mut File, from: u64, to: u64, dest: &mut File) -> std::io::Result<u64> {
    if to <= from {
        return Ok(0);
    }
    src.seek(SeekFrom::Start(from))?;
    let copied = std::io::copy(&mut Read::by_ref(src).take(to - from), dest)?;
    if copied != to - from {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the source shrank while it was copied",
        ));
    }
    Ok(copied)
}

/// Copies the complete lines of `path` from `from` to `dest`; returns (new offset, bytes).
fn copy_lines(path: &Path, from: u64, dest: &mut File) -> Result<(u64, u64)> {
    let mut src = File::open(path).map_err(read_err(path))?;
    let size = src.metadata().map_err(read_err(path))?.len();
    let end = complete_end(&mut src, from, size).map_err(read_err(path))?;
    let n = append_range(&mut src, from, end, dest)
        .with_context(|| format!("cannot copy {}", path.display()))?;
    Ok((end, n))
}

/// Siblings of `name` in `dir` that rotation may have produced (`name.1`, `name-2025…`),
/// excluding compressed ones, which cannot be finished.
fn siblings(dir: &Path, name: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n != name
                && n.starts_with(name)
                && !n.ends_with(".gz")
                && !n.ends_with(".xz")
                && !n.ends_with(".bz2")
                && !n.ends_with(".zst")
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Finds the old file of a checkpoint among the siblings: by inode after a rename, or by
/// fingerprint after copytruncate.
/// Among several copies that match (older rotations may start alike), the newest wins.
fn find_old(dir: &Path, name: &str, cp: &Checkpoint, by_inode: bool) -> Option<PathBuf> {
    let matching = siblings(dir, name).into_iter().filter(|p| {
        let Ok(m) = std::fs::metadata(p) else {
            return false;
        };
        if !m.is_file() {
            return false;
        }
        if by_inode {
            return m.ino() == cp.ino && m.dev() == cp.dev;
        }
        m.len() >= cp.offset
            && File::open(p)
                .and_then(|mut f| fingerprint(&mut f, cp.fp_len))
                .ok()
                .flatten()
                .as_deref()
                == Some(cp.fp.as_str())
    });
    matching.max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// Opens the destination, cut back to what the checkpoint accounts for, positioned at its
/// end. Returns the file and its length.
fn open_dest(dest: &Path, recorded: Option<u64>) -> Result<(File, u64)> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dest)
        .with_context(|| format!("cannot open {}", dest.display()))?;
    let len = f.metadata()?.len();
    let len = match recorded {
        Some(r) if len > r => {
            log::warn!(
                "{}: {} byte(s) beyond the checkpoint (an interrupted run); cut back before \
                 copying again",
                dest.display(),
                len - r
            );
            f.set_len(r)
                .with_context(|| format!("cannot cut back {}", dest.display()))?;
            f.sync_data()?;
            r
        }
        Some(r) if len < r => {
            log::info!(
                "{}: shorter than recorded ({len} < {r} bytes): it was rotated; continuing",
                dest.display()
            );
            len
        }
        _ => len,
    };
    f.seek(SeekFrom::Start(len))?;
    Ok((f, len))
}

/// Whether the first `len` bytes of `dest` are the first `len` bytes of `src`. Leaves
/// `dest` positioned at its end.
fn is_prefix(dest: &mut File, len: u64, src: &Path) -> Result<bool> {
    let mut s = File::open(src).map_err(read_err(src))?;
    if s.metadata().map_err(read_err(src))?.len() < len {
        return Ok(false);
    }
    dest.seek(SeekFrom::Start(0))?;
    let (mut a, mut b) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    let mut left = len;
    let mut same = true;
    while left > 0 && same {
        let n = usize::try_from(left).map_or(a.len(), |left| left.min(a.len()));
        dest.read_exact(&mut a[..n])?;
        s.read_exact(&mut b[..n]).map_err(read_err(src))?;
        same = a[..n] == b[..n];
        left -= n as u64;
    }
    dest.seek(SeekFrom::End(0))?;
    Ok(same)
}

/// Syncs one source file into `dest`. `cp` is its checkpoint (updated in place; created
/// if `None`). With `fast`, a source whose inode, size and mtime are unchanged is not
/// opened.
pub fn sync_file(
    src: &Path,
    dest: &Path,
    cp: &mut Option<Checkpoint>,
    fast: bool,
) -> Result<FileReport> {
    let meta = std::fs::metadata(src).map_err(read_err(src))?;
    if fast
        && let Some(c) = cp.as_ref()
        && c.ino == meta.ino()
        && c.dev == meta.dev()
        && c.size == meta.len()
        && c.mtime_ns == mtime_ns(&meta)
    {
        return Ok(FileReport {
            skipped: true,
            ..FileReport::default()
        });
    }
    let dir = src.parent().unwrap_or(Path::new("."));
    let name = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut report = FileReport::default();

    // Where the live file starts being copied from, after finishing an old one.
    let (mut out, mut dest_len) = open_dest(dest, cp.as_ref().map(|c| c.dest_len))?;
    let mut offset = match cp.as_ref() {
        // No checkpoint (first run, or the state was lost): a destination that already
        // holds the start of the source continues after it rather than repeating it.
        None if dest_len > 0 && is_prefix(&mut out, dest_len, src)? => {
            log::info!(
                "{}: no checkpoint, but {} already holds its first {dest_len} bytes; \
                 continuing from there",
                src.display(),
                dest.display()
            );
            dest_len
        }
        None => 0,
        Some(c) if c.ino != meta.ino() || c.dev != meta.dev() => {
            finish_old(dir, &name, c, true, &mut out, &mut report)?;
            0
        }
        Some(c) => {
            let mut f = File::open(src).map_err(read_err(src))?;
            let same_start = fingerprint(&mut f, c.fp_len)
                .map_err(read_err(src))?
                .as_deref()
                == Some(&c.fp);
            if meta.len() < c.offset || !same_start {
                log::info!("{}: truncated in place since the last run", src.display());
                finish_old(dir, &name, c, false, &mut out, &mut report)?;
                0
            } else {
                c.offset
            }
        }
    };
    let (end, n) = copy_lines(src, offset, &mut out)?;
    report.copied += n;
    offset = end;
    out.sync_data()
        .with_context(|| format!("cannot write {}", dest.display()))?;
    dest_len = out.metadata().map(|m| m.len()).unwrap_or(dest_len + n);

    // The checkpoint describes the file as it was copied.
    let mut f = File::open(src).map_err(read_err(src))?;
    let fp_len = offset.min(FINGERPRINT_LEN);
    let fp = fingerprint(&mut f, fp_len)
        .map_err(read_err(src))?
        .unwrap_or_default();
    let m = f.metadata().map_err(read_err(src))?;
    *cp = Some(Checkpoint {
        dev: m.dev(),
        ino: m.ino(),
        fp,
        fp_len,
        offset,
        dest_len,
        size: m.len(),
        mtime_ns: mtime_ns(&m),
        missing_since: None,
    });
    Ok(report)
}

/// Copies the rest of an old file (renamed, or the copy copytruncate made) if it can be
/// found; otherwise says in the log what could not be copied.
fn finish_old(
    dir: &Path,
    name: &str,
    cp: &Checkpoint,
    renamed: bool,
    out: &mut File,
    report: &mut FileReport,
) -> Result<()> {
    match find_old(dir, name, cp, renamed) {
        Some(old) => {
            let (end, n) = copy_lines(&old, cp.offset, out)?;
            report.copied += n;
            log::info!(
                "{name}: finished the rotated file {} ({n} byte(s) from offset {})",
                old.display(),
                cp.offset
            );
            let size = std::fs::metadata(&old).map(|m| m.len()).unwrap_or(end);
            if size > end {
                log::warn!(
                    "{name}: the rotated file {} ends with a partial line ({} byte(s)) that \
                     was not copied",
                    old.display(),
                    size - end
                );
            }
        }
        None => {
            report.unfinished += 1;
            log::warn!(
                "{name}: rotated, and the old file is gone or compressed, so it cannot be \
                 finished: what it got after offset {} (at least {} byte(s) when last seen, \
                 plus anything written since) was not copied. Check {} for a compressed \
                 rotation",
                cp.offset,
                cp.size.saturating_sub(cp.offset),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Whether `name` matches a glob of `*` and `?`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*.log", "#cr0.log"));
        assert!(!glob_match("*.log", "#cr0.log.1"));
        assert!(glob_match("a?c*", "abcdef"));
        assert!(!glob_match("a?c", "ac"));
    }

    #[test]
    fn complete_end_finds_the_last_newline_across_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        let mut text = vec![b'a'; 200_000];
        text[10] = b'\n';
        text[150_000] = b'\n';
        std::fs::write(&p, &text).unwrap();
        let mut f = File::open(&p).unwrap();
        assert_eq!(complete_end(&mut f, 0, 200_000).unwrap(), 150_001);
        assert_eq!(complete_end(&mut f, 150_001, 200_000).unwrap(), 150_001);
        assert_eq!(complete_end(&mut f, 0, 100_000).unwrap(), 11);
    }
}
