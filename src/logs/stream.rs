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
//!   the new file is copied from 0, and that old file is followed on later runs while it
//!   still grows (a writer that keeps its descriptor open and reopens late) until it is
//!   compressed or removed. A rotated file already compressed is finished from the `.gz`
//!   whose decompressed start matches the checkpoint's fingerprint. A source truncated in
//!   place (copytruncate, `>`) is finished from the copy whose first bytes match.
//!   Rotations no run saw (changed since a run last looked at the source, and not the file
//!   being finished or followed) are copied whole, oldest first, before the new file. What
//!   cannot be finished is lost: said in the log with the byte count, added to the
//!   stream's `lost_bytes` (a `status` problem) and to the metrics.
//! - Copies stream through the kernel (`copy_file_range` via `std::io::copy`); memory
//!   does not depend on file size.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::io_text;
use crate::logs::source::{Meta, SourceFs};

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
    /// The file this source was renamed from, still followed while a writer appends to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated: Option<Rotated>,
}

/// A rotated (renamed) source file that is still followed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rotated {
    pub dev: u64,
    pub ino: u64,
    pub fp: String,
    pub fp_len: u64,
    /// Bytes of it copied.
    pub offset: u64,
    /// Its size when last looked at.
    pub size: u64,
}

/// All checkpoints of a stream, by source file name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamState {
    pub files: BTreeMap<String, Checkpoint>,
    /// Bytes copied over the stream's life.
    #[serde(default)]
    pub copied_total: u64,
    /// Bytes that vanished before they could be copied, over the stream's life ...
    #[serde(default)]
    pub lost_bytes: u64,
    /// ... and when that last happened.
    #[serde(default)]
    pub last_loss: Option<DateTime<Utc>>,
}

pub fn state_name(stream: &str) -> String {
    crate::ops::state::names::log_stream(stream)
}

/// What syncing one source did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileReport {
    pub copied: u64,
    /// Rotated or truncated old files that could not be found to be finished.
    pub unfinished: usize,
    /// Bytes known to have been in such files and not copied.
    pub lost: u64,
    pub skipped: bool,
    /// The rotated files this run finished or followed (never copied again as unseen).
    pub used: Vec<PathBuf>,
}

fn read_err(path: &Path) -> impl Fn(std::io::Error) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("cannot read {}: {}", path.display(), io_text(&e))
}

/// SHA-256 of the first `len` bytes of `file`, or `None` if it is shorter.
fn fingerprint(file: &mut (impl Read + Seek), len: u64) -> std::io::Result<Option<String>> {
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
    Ok(Some(crate::util::hex(&digest)))
}

/// The position just after the last `\n` in `[from, size)`, or `from` if there is none.
/// Reads backwards in blocks, so memory stays bounded whatever the line length.
fn complete_end(file: &mut (impl Read + Seek), from: u64, size: u64) -> std::io::Result<u64> {
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
fn append_range<R: Read + Seek>(
    src: &mut R,
    from: u64,
    to: u64,
    dest: &mut File,
) -> std::io::Result<u64> {
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
fn copy_lines<F: SourceFs>(fs: &F, path: &Path, from: u64, dest: &mut File) -> Result<(u64, u64)> {
    let (mut src, meta) = fs.open(path).map_err(read_err(path))?;
    let size = meta.size;
    let end = complete_end(&mut src, from, size).map_err(read_err(path))?;
    let n = append_range(&mut src, from, end, dest)
        .with_context(|| format!("cannot copy {}", path.display()))?;
    Ok((end, n))
}

/// Siblings of `name` in `dir` that rotation may have produced (`name.1`, `name-2025…`),
/// excluding compressed ones, which cannot be finished.
fn siblings<F: SourceFs>(fs: &F, dir: &Path, name: &str) -> Vec<(PathBuf, Meta)> {
    let Ok(entries) = fs.read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Meta)> = entries
        .into_iter()
        .filter(|(n, _)| {
            n != name
                && n.starts_with(name)
                && !n.ends_with(".gz")
                && !n.ends_with(".xz")
                && !n.ends_with(".bz2")
                && !n.ends_with(".zst")
        })
        .map(|(n, m)| (dir.join(n), m))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Finds the old file of a checkpoint among the siblings: by inode after a rename, or by
/// fingerprint after copytruncate.
/// Among several copies that match (older rotations may start alike), the newest wins.
fn find_old<F: SourceFs>(
    fs: &F,
    dir: &Path,
    name: &str,
    cp: &Checkpoint,
    by_inode: bool,
) -> Option<(PathBuf, Meta)> {
    let matching = siblings(fs, dir, name).into_iter().filter(|(p, m)| {
        if !m.is_file {
            return false;
        }
        if by_inode {
            return m.ino == cp.ino && m.dev == cp.dev;
        }
        m.size >= cp.offset
            && fs
                .open(p)
                .and_then(|(mut f, _)| fingerprint(&mut f, cp.fp_len))
                .ok()
                .flatten()
                .as_deref()
                == Some(cp.fp.as_str())
    });
    matching.max_by_key(|(_, m)| m.mtime_ns)
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
fn is_prefix<F: SourceFs>(fs: &F, dest: &mut File, len: u64, src: &Path) -> Result<bool> {
    let (mut s, meta) = fs.open(src).map_err(read_err(src))?;
    if meta.size < len {
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

/// Syncs one source file (read through `fs`) into `dest`. `cp` is its checkpoint (updated
/// in place; created if `None`). With `fast`, a source whose inode, size and mtime are
/// unchanged is not opened.
pub fn sync_file<F: SourceFs>(
    fs: &F,
    src: &Path,
    dest: &Path,
    cp: &mut Option<Checkpoint>,
    fast: bool,
    since: Option<DateTime<Utc>>,
) -> Result<FileReport> {
    let meta = fs.metadata(src).map_err(read_err(src))?;
    if fast
        && let Some(c) = cp.as_ref()
        && c.rotated.is_none()
        && c.ino == meta.ino
        && c.dev == meta.dev
        && c.size == meta.size
        && c.mtime_ns == meta.mtime_ns
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
    // A rotated file still followed: what its writer appended since the last run.
    let mut rotated = cp.as_mut().and_then(|c| c.rotated.take());
    if let Some(r) = rotated.take() {
        rotated = follow(fs, dir, &name, r, &mut out, &mut report)?;
    }
    let mut offset = match cp.as_ref() {
        // No checkpoint (first run, or the state was lost): a destination that already
        // holds the start of the source continues after it rather than repeating it.
        None if dest_len > 0 && is_prefix(fs, &mut out, dest_len, src)? => {
            log::info!(
                "{}: no checkpoint, but {} already holds its first {dest_len} bytes; \
                 continuing from there",
                src.display(),
                dest.display()
            );
            dest_len
        }
        None => {
            // A new source on a stream that ran before: a file created and rotated away
            // since then is copied first.
            if let Some(t) = since.and_then(|t| t.timestamp_nanos_opt()) {
                copy_unseen(fs, dir, &name, i128::from(t), &[], &mut out, &mut report)?;
            }
            0
        }
        Some(c) if c.ino != meta.ino || c.dev != meta.dev => {
            // (An older rotation, followed above this run, is followed no longer: the
            // newest one is.)
            let followed = rotated.as_ref().map(|r| (r.fp.clone(), r.fp_len));
            rotated = finish_old(fs, dir, &name, c, true, &mut out, &mut report)?;
            let known: Vec<(&str, u64)> = std::iter::once((c.fp.as_str(), c.fp_len))
                .chain(followed.as_ref().map(|(fp, len)| (fp.as_str(), *len)))
                .collect();
            copy_unseen(fs, dir, &name, c.mtime_ns, &known, &mut out, &mut report)?;
            0
        }
        Some(c) => {
            let (mut f, _) = fs.open(src).map_err(read_err(src))?;
            let same_start = fingerprint(&mut f, c.fp_len)
                .map_err(read_err(src))?
                .as_deref()
                == Some(&c.fp);
            if meta.size < c.offset || !same_start {
                log::info!("{}: truncated in place since the last run", src.display());
                finish_old(fs, dir, &name, c, false, &mut out, &mut report)?;
                let known: Vec<(&str, u64)> = std::iter::once((c.fp.as_str(), c.fp_len))
                    .chain(rotated.as_ref().map(|r| (r.fp.as_str(), r.fp_len)))
                    .collect();
                copy_unseen(fs, dir, &name, c.mtime_ns, &known, &mut out, &mut report)?;
                0
            } else {
                c.offset
            }
        }
    };
    let (end, n) = copy_lines(fs, src, offset, &mut out)?;
    report.copied += n;
    offset = end;
    out.sync_data()
        .with_context(|| format!("cannot write {}", dest.display()))?;
    dest_len = out.metadata().map(|m| m.len()).unwrap_or(dest_len + n);

    // The checkpoint describes the file as it was copied.
    let (mut f, m) = fs.open(src).map_err(read_err(src))?;
    let fp_len = offset.min(FINGERPRINT_LEN);
    let fp = fingerprint(&mut f, fp_len)
        .map_err(read_err(src))?
        .unwrap_or_default();
    *cp = Some(Checkpoint {
        dev: m.dev,
        ino: m.ino,
        fp,
        fp_len,
        offset,
        dest_len,
        size: m.size,
        mtime_ns: m.mtime_ns,
        missing_since: None,
        rotated,
    });
    Ok(report)
}

/// Copies what a followed rotated file got since the last run. Returns it (to follow on)
/// while it is there uncompressed; once it is compressed its rest comes from the `.gz`,
/// and once it is gone, what it held beyond the copied part is counted as lost.
fn follow<F: SourceFs>(
    fs: &F,
    dir: &Path,
    name: &str,
    mut r: Rotated,
    out: &mut File,
    report: &mut FileReport,
) -> Result<Option<Rotated>> {
    let by_inode = siblings(fs, dir, name)
        .into_iter()
        .find(|(_, m)| m.is_file && m.ino == r.ino && m.dev == r.dev);
    if let Some((path, m)) = by_inode {
        report.used.push(path.clone());
        let (end, n) = copy_lines(fs, &path, r.offset, out)?;
        if n > 0 {
            log::info!(
                "{name}: the rotated file {} grew; {n} more byte(s) copied",
                path.display()
            );
        }
        report.copied += n;
        r.offset = end;
        r.size = m.size.max(end);
        return Ok(Some(r));
    }
    let cp = Checkpoint {
        dev: r.dev,
        ino: r.ino,
        fp: r.fp.clone(),
        fp_len: r.fp_len,
        offset: r.offset,
        dest_len: 0,
        size: r.size,
        mtime_ns: 0,
        missing_since: None,
        rotated: None,
    };
    if !finish_from_gz(fs, dir, name, &cp, out, report)? && r.size > r.offset {
        lose(name, dir, &cp, report);
    }
    Ok(None)
}

/// Rotations of `name` no run has seen: files changed after `after` (ns since the epoch:
/// when a run last looked at the source) that are neither a file this run already
/// finished or followed (`report.used`) nor start like one of `known` (fingerprint, its
/// length). That is content written into a source which was then rotated away before the
/// next run. Each is copied whole (complete lines), oldest first, compressed or not.
fn copy_unseen<F: SourceFs>(
    fs: &F,
    dir: &Path,
    name: &str,
    after: i128,
    known: &[(&str, u64)],
    out: &mut File,
    report: &mut FileReport,
) -> Result<()> {
    let Ok(entries) = fs.read_dir(dir) else {
        return Ok(());
    };
    let mut found: Vec<(i128, PathBuf)> = entries
        .into_iter()
        .filter(|(n, _)| n != name && n.starts_with(name))
        .filter_map(|(n, m)| (m.is_file && m.mtime_ns > after).then(|| (m.mtime_ns, dir.join(n))))
        .filter(|(_, p)| !report.used.contains(p))
        .collect();
    found.sort();
    for (_, path) in found {
        let gz = path.extension().is_some_and(|x| x == "gz");
        let is_known = known.iter().any(|&(fp, len)| {
            len > 0 && file_fingerprint(fs, &path, gz, len).as_deref() == Some(fp)
        });
        if is_known {
            continue;
        }
        let n = if gz {
            copy_gz_lines(fs, &path, 0, out)?
        } else {
            copy_lines(fs, &path, 0, out)?.1
        };
        report.copied += n;
        report.used.push(path.clone());
        log::warn!(
            "{name}: {} was rotated away before any run saw it; its {n} byte(s) are copied \
             now",
            path.display()
        );
    }
    Ok(())
}

/// SHA-256 (hex) of the first `len` bytes of a file, decompressed if `gz`; `None` if it
/// is shorter or unreadable.
fn file_fingerprint<F: SourceFs>(fs: &F, path: &Path, gz: bool, len: u64) -> Option<String> {
    let (mut f, _) = fs.open(path).ok()?;
    if !gz {
        return fingerprint(&mut f, len).ok()?;
    }
    let mut d = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(f));
    let mut head = vec![0u8; usize::try_from(len).ok()?];
    d.read_exact(&mut head).ok()?;
    Some(crate::util::hex(&Sha256::digest(&head)))
}

/// Appends the complete lines of a gzip file's decompressed bytes from `from` to `out`.
/// Memory is bounded by the longest line. Returns the bytes copied.
fn copy_gz_lines<F: SourceFs>(fs: &F, gz: &Path, from: u64, out: &mut File) -> Result<u64> {
    use std::io::Write;
    let read = |e: std::io::Error| anyhow::anyhow!("cannot read {}: {}", gz.display(), io_text(&e));
    let (f, _) = fs.open(gz).map_err(read)?;
    let mut d = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(f));
    let skipped =
        std::io::copy(&mut Read::by_ref(&mut d).take(from), &mut std::io::sink()).map_err(read)?;
    if skipped < from {
        return Ok(0);
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    loop {
        let n = d.read(&mut buf).map_err(read)?;
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        if let Some(i) = pending.iter().rposition(|&b| b == b'\n') {
            out.write_all(&pending[..=i])
                .with_context(|| "cannot write the destination".to_string())?;
            copied += (i + 1) as u64;
            pending.drain(..=i);
        }
    }
    Ok(copied)
}

/// Counts and reports what a rotated file held beyond the copied part, gone for good.
fn lose(name: &str, dir: &Path, cp: &Checkpoint, report: &mut FileReport) {
    let lost = cp.size.saturating_sub(cp.offset);
    report.unfinished += 1;
    report.lost += lost;
    log::warn!(
        "{name}: rotated, and the old file is gone before it could be finished: what it got \
         after offset {} (at least {lost} byte(s) when last seen, plus anything written since) \
         was not copied. Check {} for a rotation cr0sync could not recognise",
        cp.offset,
        dir.display()
    );
}

/// Finishes a rotated file from its compressed copy: the newest `.gz` sibling whose
/// decompressed start matches the checkpoint's fingerprint, from the checkpoint's offset,
/// complete lines only. Returns whether one was found.
fn finish_from_gz<F: SourceFs>(
    fs: &F,
    dir: &Path,
    name: &str,
    cp: &Checkpoint,
    out: &mut File,
    report: &mut FileReport,
) -> Result<bool> {
    let Ok(entries) = fs.read_dir(dir) else {
        return Ok(false);
    };
    let mut candidates: Vec<(i128, PathBuf)> = entries
        .into_iter()
        .filter(|(n, _)| n.starts_with(name) && n.ends_with(".gz"))
        .map(|(n, m)| (m.mtime_ns, dir.join(n)))
        .collect();
    candidates.sort();
    for (_, gz) in candidates.into_iter().rev() {
        if file_fingerprint(fs, &gz, true, cp.fp_len).as_deref() != Some(cp.fp.as_str()) {
            continue;
        }
        let n = copy_gz_lines(fs, &gz, cp.offset, out)?;
        report.copied += n;
        report.used.push(gz.clone());
        log::info!(
            "{name}: finished the rotated file from its compressed copy {} ({n} byte(s) \
             from offset {})",
            gz.display(),
            cp.offset
        );
        return Ok(true);
    }
    Ok(false)
}

/// Copies the rest of an old file (renamed, or the copy copytruncate made) if it can be
/// found, else from its compressed copy; otherwise counts it as lost. Returns a renamed
/// file to follow on later runs (its writer may still append to it).
fn finish_old<F: SourceFs>(
    fs: &F,
    dir: &Path,
    name: &str,
    cp: &Checkpoint,
    renamed: bool,
    out: &mut File,
    report: &mut FileReport,
) -> Result<Option<Rotated>> {
    match find_old(fs, dir, name, cp, renamed) {
        Some((old, m)) => {
            report.used.push(old.clone());
            let (end, n) = copy_lines(fs, &old, cp.offset, out)?;
            report.copied += n;
            log::info!(
                "{name}: finished the rotated file {} ({n} byte(s) from offset {}); it is \
                 followed while it grows",
                old.display(),
                cp.offset
            );
            Ok(renamed.then(|| Rotated {
                dev: m.dev,
                ino: m.ino,
                fp: cp.fp.clone(),
                fp_len: cp.fp_len,
                offset: end,
                size: m.size.max(end),
            }))
        }
        None => {
            if !finish_from_gz(fs, dir, name, cp, out, report)? {
                lose(name, dir, cp, report);
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
