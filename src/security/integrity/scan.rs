//! The scan of the watched tree: the walk (symlinks recorded, never followed; special
//! files by metadata only), the stat-based decision of which files to read, parallel
//! hashing, and the cache of entries that differ from the baseline.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::context::Context;
use crate::error::io_text;
use crate::output::Progress;
use crate::util::hex;
use crate::util::{matches_segments, segments};

use super::findings::join_current;
use super::{Entry, Files, Kind, join};

/// Metadata of one path, as the baseline records it.
#[derive(Debug, Clone)]
pub(super) struct Meta {
    pub(super) kind: Kind,
    pub(super) size: u64,
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mtime_ns: i64,
    pub(super) ctime_ns: i64,
    pub(super) ino: u64,
    pub(super) target: Option<String>,
}

pub(super) fn meta_of(path: &Path) -> std::io::Result<Meta> {
    meta_from(path, std::fs::symlink_metadata(path)?)
}

/// `m` is the path's own metadata (not followed).
pub(super) fn meta_from(path: &Path, m: std::fs::Metadata) -> std::io::Result<Meta> {
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_file() {
        Kind::File
    } else {
        Kind::Special
    };
    let target = if ft.is_symlink() {
        Some(std::fs::read_link(path)?.to_string_lossy().into_owned())
    } else {
        None
    };
    Ok(Meta {
        kind,
        size: m.len(),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        ino: m.ino(),
        target,
    })
}

/// Whether `rel` (a path relative to a watched root, `/`-separated) matches a pattern with
/// `**` (any number of directories), `*` and `?`.
#[cfg(test)]
fn excluded(pattern: &str, rel: &str) -> bool {
    let p = segments(pattern);
    let n = segments(rel);
    matches_segments(&p, &n)
}

pub(super) fn path_string(path: PathBuf) -> String {
    path.into_os_string()
        .into_string()
        .unwrap_or_else(|p| p.to_string_lossy().into_owned())
}

/// The watched tree: paths with their metadata, sorted by path, one entry per path; and
/// the paths that could not be read, with why.
#[derive(Default)]
pub(super) struct Walked {
    pub(super) files: Vec<(String, Meta)>,
    pub(super) unreadable: Vec<(String, String)>,
}

/// Walks `start` (a watched root or one of its children) below `root`. Entries are
/// stat'ed relative to their directory (`DirEntry::metadata` is `fstatat` on the open
/// directory), as `find` does, rather than by full path; links are never followed.
pub(super) fn walk_one(root: &Path, start: &Path, patterns: &[Vec<&str>], out: &mut Walked) {
    let skip = |p: &Path| {
        if patterns.is_empty() {
            return false;
        }
        let rel = p.strip_prefix(root).unwrap_or(p).to_string_lossy();
        let n = segments(&rel);
        !n.is_empty() && patterns.iter().any(|pat| matches_segments(pat, &n))
    };
    if skip(start) {
        return;
    }
    let meta = match std::fs::symlink_metadata(start) {
        Ok(m) => m,
        Err(e) => {
            out.unreadable
                .push((start.display().to_string(), io_text(&e)));
            return;
        }
    };
    if !meta.is_dir() {
        match meta_from(start, meta) {
            Ok(m) => out.files.push((path_string(start.to_path_buf()), m)),
            Err(e) => out
                .unreadable
                .push((start.display().to_string(), io_text(&e))),
        }
        return;
    }
    let mut dirs = vec![start.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                out.unreadable
                    .push((dir.display().to_string(), io_text(&e)));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    out.unreadable
                        .push((dir.display().to_string(), io_text(&e)));
                    continue;
                }
            };
            let path = entry.path();
            if skip(&path) {
                continue;
            }
            match entry.metadata() {
                Ok(m) if m.is_dir() => dirs.push(path),
                Ok(m) => match meta_from(&path, m) {
                    Ok(meta) => out.files.push((path_string(path), meta)),
                    Err(e) => out
                        .unreadable
                        .push((path.display().to_string(), io_text(&e))),
                },
                Err(e) => out
                    .unreadable
                    .push((path.display().to_string(), io_text(&e))),
            }
        }
    }
}

/// The watched paths with their metadata, sorted; paths that cannot be read are returned
/// apart. The children of each watched directory are walked on every core at once.
pub(super) fn walk(ctx: &Context) -> Walked {
    let patterns: Vec<Vec<&str>> = ctx
        .config
        .security
        .integrity_exclude
        .iter()
        .map(|p| segments(p))
        .collect();
    let patterns = &patterns;
    let mut jobs: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut out = Walked::default();
    for root in &ctx.config.security.integrity_paths {
        let root = ctx.resolve(root);
        let is_dir = match std::fs::symlink_metadata(&root) {
            Ok(m) => m.is_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Not there (yet): nothing to record; if the baseline had it, the check
                // reports it as removed.
                log::info!("integrity path {} does not exist", root.display());
                continue;
            }
            Err(_) => false,
        };
        match std::fs::read_dir(&root) {
            Ok(entries) if is_dir => {
                for e in entries.flatten() {
                    jobs.push((root.clone(), e.path()));
                }
            }
            _ => walk_one(&root, &root, patterns, &mut out),
        }
    }
    let parts = crate::util::parallel_map(&jobs, |(root, start)| {
        let mut mine = Walked::default();
        walk_one(root, start, patterns, &mut mine);
        mine
    });
    for part in parts.into_iter().flatten() {
        out.files.extend(part.files);
        out.unreadable.extend(part.unreadable);
    }
    // Overlapping watched paths find some paths twice.
    out.files.sort_by(|a, b| a.0.cmp(&b.0));
    out.files.dedup_by(|a, b| a.0 == b.0);
    out
}

/// SHA-256 of a file, streamed with a large buffer; each block read counts on `progress`.
pub(super) fn sha256_file(path: &Path, progress: &Progress) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&h.finalize()));
        }
        h.update(&buf[..n]);
        progress.add(n as u64);
    }
}

/// Hashes `paths` on every core. Returns each path's hash or error text, in order.
pub(super) fn hash_all(paths: &[&str], progress: &Progress) -> Vec<Result<String, String>> {
    crate::util::parallel_map(paths, |p| {
        sha256_file(Path::new(p), progress).map_err(|e| io_text(&e))
    })
    .into_iter()
    .map(|r| r.unwrap_or_else(|| Err("not hashed".into())))
    .collect()
}

pub(super) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(super) fn entry(m: &Meta, sha256: Option<String>, hashed_at_ns: i64) -> Entry {
    Entry {
        kind: m.kind,
        sha256,
        target: m.target.clone(),
        size: m.size,
        mode: m.mode,
        uid: m.uid,
        gid: m.gid,
        mtime_ns: m.mtime_ns,
        ctime_ns: m.ctime_ns,
        ino: m.ino,
        hashed_at_ns,
    }
}

/// A path's last known entry (the baseline's, or the cache's where they differ), and
/// whether its hash is due to be redone this run.
pub(super) struct Previous<'a> {
    pub(super) path: &'a str,
    pub(super) entry: &'a Entry,
    pub(super) due: bool,
}

/// The baseline overlaid with the cache (an entry replaces the baseline's, `None` removes
/// it), still sorted by path.
pub(super) fn overlay<'a>(
    base: &'a Files,
    cache: &'a BTreeMap<String, Option<Entry>>,
) -> Vec<Previous<'a>> {
    let mut out = Vec::with_capacity(base.len() + cache.len());
    let previous = |path: &'a str, entry: &'a Entry| Previous {
        path,
        entry,
        due: false,
    };
    let mut cached = cache.iter().peekable();
    for (path, e) in base {
        while let Some((p, c)) = cached.next_if(|(p, _)| *p < path) {
            out.extend(c.as_ref().map(|c| previous(p, c)));
        }
        match cached.next_if(|(p, _)| *p == path) {
            Some((_, c)) => out.extend(c.as_ref().map(|c| previous(path, c))),
            None => out.push(previous(path, e)),
        }
    }
    for (p, c) in cached {
        out.extend(c.as_ref().map(|c| previous(p, c)));
    }
    out
}

/// A path's entry in the current tree.
pub(super) enum Now<'a> {
    /// The previous entry still holds (same size, mtime, ctime and inode; not racy; not
    /// due).
    Reused(&'a Entry),
    /// Built this run.
    Fresh(Entry),
}

impl Now<'_> {
    pub(super) fn entry(&self) -> &Entry {
        match self {
            Now::Reused(e) => e,
            Now::Fresh(e) => e,
        }
    }
}

/// The current tree, sorted by path.
pub(super) struct Scan<'a> {
    pub(super) current: Vec<(&'a str, Now<'a>)>,
    pub(super) unreadable: Vec<(String, String)>,
    pub(super) hashed: usize,
}

/// Scans the walked tree against `previous` (both sorted by path). Previous entries whose
/// metadata is unchanged are reused without reading the file (a chmod or chown changes the
/// ctime, so a reused entry's mode and owner are current too).
pub(super) fn scan<'a>(walked: &'a Walked, previous: &[Previous<'a>]) -> Scan<'a> {
    enum Slot<'a> {
        Done(Now<'a>),
        Hash(&'a Meta),
    }
    let mut slots: Vec<(&'a str, Slot<'a>)> = Vec::with_capacity(walked.files.len());
    join(
        &walked.files,
        |w| w.0.as_str(),
        previous,
        |p| p.path,
        |w, p| {
            let Some((path, m)) = w else { return };
            let slot = match p {
                Some(p)
                    if p.entry.kind == m.kind
                        && p.entry.same_stat(m)
                        && p.entry.target == m.target
                        && !(m.kind == Kind::File && (p.entry.racy() || p.due)) =>
                {
                    Slot::Done(Now::Reused(p.entry))
                }
                _ if m.kind != Kind::File => Slot::Done(Now::Fresh(entry(m, None, 0))),
                _ => Slot::Hash(m),
            };
            slots.push((path.as_str(), slot));
        },
    );
    let stamp = now_ns();
    let (mut to_hash, mut bytes) = (Vec::new(), 0);
    for (path, slot) in &slots {
        if let Slot::Hash(m) = slot {
            to_hash.push(*path);
            bytes += m.size;
        }
    }
    let hashed = to_hash.len();
    let progress = Progress::new(format!("hashing {hashed} file(s)"), bytes);
    let mut results = hash_all(&to_hash, &progress).into_iter();
    drop(progress);
    let mut unreadable = walked.unreadable.clone();
    let mut current = Vec::with_capacity(slots.len());
    for (path, slot) in slots {
        match slot {
            Slot::Done(now) => current.push((path, now)),
            Slot::Hash(m) => match results.next() {
                Some(Ok(h)) => current.push((path, Now::Fresh(entry(m, Some(h), stamp)))),
                Some(Err(why)) => unreadable.push((path.to_string(), why)),
                None => unreadable.push((path.to_string(), "not hashed".into())),
            },
        }
    }
    Scan {
        current,
        unreadable,
        hashed,
    }
}

/// What the cache must hold after this check: every current entry that differs from the
/// baseline's, and `None` for each baseline path no longer in the tree.
pub(super) fn delta(base: &Files, scanned: &Scan) -> BTreeMap<String, Option<Entry>> {
    let mut out = BTreeMap::new();
    join_current(base, scanned, |b, c| match (b, c) {
        (Some((path, _)), None) => {
            out.insert(path.clone(), None);
        }
        (b, Some((path, n))) if b.map(|b| &b.1) != Some(n.entry()) => {
            out.insert(path.to_string(), Some(n.entry().clone()));
        }
        _ => {}
    });
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::file;
    use super::*;

    #[test]
    fn the_cache_replaces_removes_and_adds_baseline_entries_in_path_order() {
        let base: Files = vec![
            ("/w/a".into(), file(1)),
            ("/w/b".into(), file(2)),
            ("/w/c".into(), file(3)),
        ];
        let cache: BTreeMap<String, Option<Entry>> = [
            ("/w/0".to_string(), Some(file(10))),
            ("/w/b".to_string(), None),
            ("/w/c".to_string(), Some(file(30))),
            ("/w/d".to_string(), Some(file(40))),
        ]
        .into();
        let got: Vec<(&str, i64)> = overlay(&base, &cache)
            .iter()
            .map(|p| (p.path, p.entry.hashed_at_ns))
            .collect();
        assert_eq!(got, [("/w/0", 10), ("/w/a", 1), ("/w/c", 30), ("/w/d", 40)]);
    }

    #[test]
    fn exclude_patterns_with_double_star() {
        assert!(excluded("**/*.log", "a.log"));
        assert!(excluded("**/*.log", "x/y/a.log"));
        assert!(!excluded("**/*.log", "x/a.log.1"));
        assert!(excluded("**/cache/**", "cache/x"));
        assert!(excluded("**/cache/**", "a/cache/b/c"));
        assert!(excluded("**/cache/**", "a/cache"));
        assert!(!excluded("**/cache/**", "a/cached/b"));
        assert!(excluded("uploads/*", "uploads/f"));
        assert!(!excluded("uploads/*", "x/uploads/f"));
    }
}
