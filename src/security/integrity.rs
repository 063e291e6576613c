//! File integrity: a signed baseline of the watched files, and a check
//! that reports what changed, each finding once.
//!
//! Invariants:
//! - The baseline (`shared_storage/file_hashes.json`) is written atomically and carries an
//!   HMAC-SHA256 of its body under `state/integrity.key`. A baseline whose HMAC does not
//!   verify is never trusted: the check stops with a security event and exit 4.
//! - Symlinks are recorded as links (their target), never followed; special files are
//!   recorded by metadata, never read.
//! - A file is read only if its size, mtime, ctime or inode differ from when it was last
//!   hashed, if it was modified within a second of being hashed ("racy"), or, for a bounded
//!   share of the oldest each run, if its last hash is older than `full_rehash`. A check
//!   of an unchanged tree reads no file contents.
//! - A finding is reported (event, exit 4, cron output) once, until it goes away or the
//!   baseline is updated.
//! - A path that exists but cannot be read (or lies in a directory that cannot be read) is
//!   `unreadable`, never `removed`.
//! - The baseline is written sorted by path; the check holds the baseline, the cache and
//!   the walked tree as lists sorted by path and joins them by merging, so its cost beyond
//!   the walk grows linearly with the tree and no path is hashed into a map.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::context::Context;
use crate::error::{Error, io_text};
use crate::fsutil;
use crate::logs::stream::glob_match;
use crate::output::Progress;
use crate::security::events::{self, Event};

use crate::ops::state::names::{
    INTEGRITY_CACHE as CACHE, INTEGRITY_LAST_CHECK as LAST_CHECK, INTEGRITY_REPORTED as REPORTED,
};

/// What a watched path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Symlink,
    Special,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::File => "file",
            Kind::Symlink => "symlink",
            Kind::Special => "special",
        })
    }
}

/// One watched path's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    /// When the content was last hashed (for `full_rehash` and racy entries).
    pub hashed_at_ns: i64,
}

impl Entry {
    fn same_stat(&self, m: &Meta) -> bool {
        self.size == m.size
            && self.mtime_ns == m.mtime_ns
            && self.ctime_ns == m.ctime_ns
            && self.ino == m.ino
    }

    fn racy(&self) -> bool {
        self.kind == Kind::File && self.mtime_ns >= self.hashed_at_ns - 1_000_000_000
    }
}

/// Entries by path, sorted by path (byte order) with one entry per path: the order the
/// baseline is written in, so the check joins the baseline, the cache and the walked tree
/// by merging sorted lists instead of hashing every path into maps.
type Files = Vec<(String, Entry)>;

/// The baseline as read.
#[derive(Debug, Deserialize)]
struct BodyRead {
    #[allow(dead_code)]
    version: u32,
    #[allow(dead_code)]
    created: DateTime<Utc>,
    #[serde(deserialize_with = "sorted_files")]
    files: Files,
}

/// The baseline as written: `files` is a JSON object keyed by path, in path order.
#[derive(Debug, Serialize)]
struct BodyWrite<'a> {
    version: u32,
    created: DateTime<Utc>,
    #[serde(serialize_with = "files_as_object")]
    files: &'a [(String, Entry)],
}

fn files_as_object<S: serde::Serializer>(
    files: &&[(String, Entry)],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_map(files.iter().map(|(p, e)| (p, e)))
}

/// Reads the `files` object in file order (written sorted; sorted here if it is not).
fn sorted_files<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Files, D::Error> {
    struct InOrder;
    impl<'de> serde::de::Visitor<'de> for InOrder {
        type Value = Files;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object of paths")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Files, A::Error> {
            let mut files = Vec::with_capacity(map.size_hint().unwrap_or(0));
            while let Some(pair) = map.next_entry()? {
                files.push(pair);
            }
            Ok(files)
        }
    }
    let mut files = d.deserialize_map(InOrder)?;
    if !files.windows(2).all(|w| w[0].0 < w[1].0) {
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files.dedup_by(|a, b| a.0 == b.0);
    }
    Ok(files)
}

/// Calls `f` once per key of two lists sorted by key, with the item of each list that has
/// it.
fn join<'x, 'y, A, B>(
    a: &'x [A],
    key_a: impl Fn(&A) -> &str,
    b: &'y [B],
    key_b: impl Fn(&B) -> &str,
    mut f: impl FnMut(Option<&'x A>, Option<&'y B>),
) {
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let order = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) => key_a(x).cmp(key_b(y)),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                f(a.get(i), None);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                f(None, b.get(j));
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                f(a.get(i), b.get(j));
                i += 1;
                j += 1;
            }
        }
    }
}

/// The file: the baseline's exact bytes and their HMAC, so verifying needs no
/// re-serialization.
#[derive(Debug, Deserialize)]
struct Signed<'a> {
    hmac: String,
    #[serde(borrow)]
    baseline: &'a serde_json::value::RawValue,
}

use crate::util::hex;

type HmacSha256 = hmac::Hmac<Sha256>;

/// HMAC-SHA256 (RFC 2104) of `msg` under `key`, through RustCrypto's `hmac` (the
/// companion of the `sha2` already used).
fn mac(key: &[u8], msg: &[u8]) -> HmacSha256 {
    use hmac::{KeyInit, Mac};
    // HMAC takes a key of any length: this never fails.
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| <HmacSha256 as KeyInit>::new(&Default::default()));
    m.update(msg);
    m
}

/// The HMAC of `msg` under `key`, in hex.
fn hmac(key: &[u8], msg: &[u8]) -> String {
    use hmac::Mac;
    hex(&mac(key, msg).finalize().into_bytes())
}

/// Whether `expected` (hex) is the HMAC of `msg` under `key`, compared in constant time.
fn hmac_verifies(key: &[u8], msg: &[u8], expected: &str) -> bool {
    use hmac::Mac;
    crate::util::unhex(expected).is_some_and(|bytes| mac(key, msg).verify_slice(&bytes).is_ok())
}

fn key(ctx: &Context) -> Result<Vec<u8>> {
    let path = ctx.layout.integrity_key();
    let key = std::fs::read(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the integrity key {}: {}. Try: cr0sync init",
            path.display(),
            io_text(&e)
        )
    })?;
    Ok(key.trim_ascii().to_vec())
}

/// Metadata of one path, as the baseline records it.
#[derive(Debug, Clone)]
struct Meta {
    kind: Kind,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    target: Option<String>,
}

fn meta_of(path: &Path) -> std::io::Result<Meta> {
    meta_from(path, std::fs::symlink_metadata(path)?)
}

/// `m` is the path's own metadata (not followed).
fn meta_from(path: &Path, m: std::fs::Metadata) -> std::io::Result<Meta> {
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
pub fn excluded(pattern: &str, rel: &str) -> bool {
    let p = segments(pattern);
    let n = segments(rel);
    matches_segments(&p, &n)
}

fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

fn matches_segments(p: &[&str], n: &[&str]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some(&"**") => {
            matches_segments(&p[1..], n) || (!n.is_empty() && matches_segments(p, &n[1..]))
        }
        Some(seg) => !n.is_empty() && glob_match(seg, n[0]) && matches_segments(&p[1..], &n[1..]),
    }
}

fn path_string(path: PathBuf) -> String {
    path.into_os_string()
        .into_string()
        .unwrap_or_else(|p| p.to_string_lossy().into_owned())
}

/// The watched tree: paths with their metadata, sorted by path, one entry per path; and
/// the paths that could not be read, with why.
#[derive(Default)]
struct Walked {
    files: Vec<(String, Meta)>,
    unreadable: Vec<(String, String)>,
}

/// Walks `start` (a watched root or one of its children) below `root`. Entries are
/// stat'ed relative to their directory (`DirEntry::metadata` is `fstatat` on the open
/// directory), as `find` does, rather than by full path; links are never followed.
fn walk_one(root: &Path, start: &Path, patterns: &[Vec<&str>], out: &mut Walked) {
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
fn walk(ctx: &Context) -> Walked {
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
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let next = AtomicUsize::new(0);
    let parts: Vec<Walked> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Walked::default();
                    while let Some((root, start)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                        walk_one(root, start, patterns, &mut mine);
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    for part in parts {
        out.files.extend(part.files);
        out.unreadable.extend(part.unreadable);
    }
    // Overlapping watched paths find some paths twice.
    out.files.sort_by(|a, b| a.0.cmp(&b.0));
    out.files.dedup_by(|a, b| a.0 == b.0);
    out
}

/// SHA-256 of a file, streamed with a large buffer; each block read counts on `progress`.
fn sha256_file(path: &Path, progress: &Progress) -> std::io::Result<String> {
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
fn hash_all(paths: &[&str], progress: &Progress) -> Vec<Result<String, String>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::with_capacity(paths.len()));
    std::thread::scope(|scope| {
        for _ in 0..workers.min(paths.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = paths.get(i) else { break };
                    let r = sha256_file(Path::new(p), progress).map_err(|e| io_text(&e));
                    if let Ok(mut d) = done.lock() {
                        d.push((i, r));
                    }
                }
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_default();
    done.sort_by_key(|(i, _)| *i);
    let mut results: Vec<Result<String, String>> = done.into_iter().map(|(_, r)| r).collect();
    // A worker that panicked left its paths without a result.
    results.resize(paths.len(), Err("not hashed".into()));
    results
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn entry(m: &Meta, sha256: Option<String>, hashed_at_ns: i64) -> Entry {
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
struct Previous<'a> {
    path: &'a str,
    entry: &'a Entry,
    due: bool,
}

/// The baseline overlaid with the cache (an entry replaces the baseline's, `None` removes
/// it), still sorted by path.
fn overlay<'a>(base: &'a Files, cache: &'a BTreeMap<String, Option<Entry>>) -> Vec<Previous<'a>> {
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
enum Now<'a> {
    /// The previous entry still holds (same size, mtime, ctime and inode; not racy; not
    /// due).
    Reused(&'a Entry),
    /// Built this run.
    Fresh(Entry),
}

impl Now<'_> {
    fn entry(&self) -> &Entry {
        match self {
            Now::Reused(e) => e,
            Now::Fresh(e) => e,
        }
    }
}

/// The current tree, sorted by path.
struct Scan<'a> {
    current: Vec<(&'a str, Now<'a>)>,
    unreadable: Vec<(String, String)>,
    hashed: usize,
}

/// Scans the walked tree against `previous` (both sorted by path). Previous entries whose
/// metadata is unchanged are reused without reading the file (a chmod or chown changes the
/// ctime, so a reused entry's mode and owner are current too).
fn scan<'a>(walked: &'a Walked, previous: &[Previous<'a>]) -> Scan<'a> {
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

/// Writes the baseline for the current tree (all files hashed). With `accept`, only that
/// path's entry is updated in the existing (verified) baseline.
pub fn baseline(
    ctx: &Context,
    accept: Option<&Path>,
    now: DateTime<Utc>,
) -> Result<(usize, Vec<(String, String)>)> {
    let key = key(ctx)?;
    let Some(path) = accept else {
        let walked = walk(ctx);
        let scanned = scan(&walked, &[]);
        let files: Files = scanned
            .current
            .into_iter()
            .map(|(p, now)| (p.to_string(), now.entry().clone()))
            .collect();
        write_baseline(ctx, &key, &files, now)?;
        ctx.state.remove(REPORTED)?;
        ctx.state.remove(CACHE)?;
        return Ok((files.len(), scanned.unreadable));
    };
    let mut files = load_baseline(ctx, &key)?;
    let p = std::path::absolute(path)?.to_string_lossy().into_owned();
    let at = files.binary_search_by(|(q, _)| q.as_str().cmp(&p));
    match meta_of(Path::new(&p)) {
        Ok(m) => {
            let h = if m.kind == Kind::File {
                let progress = Progress::new(format!("hashing {p}"), m.size);
                Some(
                    sha256_file(Path::new(&p), &progress)
                        .map_err(|e| anyhow::anyhow!("cannot read {p}: {}", io_text(&e)))?,
                )
            } else {
                None
            };
            let e = entry(&m, h, now_ns());
            match at {
                Ok(i) => files[i].1 = e,
                Err(i) => files.insert(i, (p.clone(), e)),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Ok(i) = at {
                files.remove(i);
            }
        }
        Err(e) => anyhow::bail!("cannot read {p}: {}", io_text(&e)),
    }
    let mut reported: BTreeSet<String> = ctx.state.load(REPORTED)?.unwrap_or_default();
    reported.retain(|f| !f.ends_with(&format!(" {p}")));
    ctx.state.save(REPORTED, &reported)?;
    write_baseline(ctx, &key, &files, now)?;
    Ok((files.len(), Vec::new()))
}

fn write_baseline(ctx: &Context, key: &[u8], files: &Files, now: DateTime<Utc>) -> Result<()> {
    let body = serde_json::to_string(&BodyWrite {
        version: 1,
        created: now,
        files,
    })?;
    let mac = hmac(key, body.as_bytes());
    // Compact: a large tree's baseline parses faster (`jq .` shows it indented).
    let mut bytes = format!("{{\"hmac\":\"{mac}\",\"baseline\":{body}}}").into_bytes();
    bytes.push(b'\n');
    let path = ctx.layout.file_hashes();
    fsutil::atomic_write(&path, &bytes, ctx.perms.file_mode, &ctx.perms)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads and verifies the baseline; an unsigned or edited one is an `Error::Security`.
fn load_baseline(ctx: &Context, key: &[u8]) -> Result<Files> {
    let path = ctx.layout.file_hashes();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "no integrity baseline yet ({}). Try: cr0sync security baseline",
            path.display()
        ),
        Err(e) => anyhow::bail!("cannot read {}: {}", path.display(), io_text(&e)),
    };
    let untrusted = |why: &str| -> anyhow::Error {
        let event = Event {
            time: crate::ops::clock::now(),
            kind: "integrity.baseline_untrusted".into(),
            path: Some(path.display().to_string()),
            detail: why.into(),
        };
        // The check fails with the error below whatever happens here; the event is the
        // second copy of the news.
        if let Err(e) = events::append(ctx, &[event]) {
            log::warn!("{e:#} (the untrusted baseline is reported by the failed check)");
        }
        Error::Security(format!(
            "the integrity baseline {} is {why}; it is not trusted. Try: find out who changed \
             it, then record a new one with cr0sync security baseline",
            path.display()
        ))
        .into()
    };
    let Ok(signed) = serde_json::from_slice::<Signed>(&bytes) else {
        return Err(untrusted("not a signed baseline"));
    };
    if !hmac_verifies(key, signed.baseline.get().as_bytes(), &signed.hmac) {
        return Err(untrusted("edited (its HMAC does not verify)"));
    }
    let body: BodyRead = serde_json::from_str(signed.baseline.get())
        .map_err(|_| untrusted("signed but unreadable"))?;
    Ok(body.files)
}

/// One finding of a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `added`, `removed`, `modified`, `changed` or `unreadable`.
    pub kind: String,
    pub path: String,
    pub detail: String,
    /// Not reported by an earlier check.
    pub new: bool,
}

impl Finding {
    fn new(kind: &str, path: &str, detail: String) -> Finding {
        Finding {
            kind: kind.into(),
            path: path.into(),
            detail,
            new: false,
        }
    }

    fn id(&self) -> String {
        format!("{} {}", self.kind, self.path)
    }
}

/// What a check found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub files: usize,
    pub hashed: usize,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn new_findings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.new)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastCheck {
    pub time: DateTime<Utc>,
    pub files: usize,
    pub open_findings: usize,
}

/// Calls `f` once per path of the baseline or the current tree.
fn join_current<'a>(
    base: &'a Files,
    scanned: &'a Scan,
    f: impl FnMut(Option<&'a (String, Entry)>, Option<&'a (&'a str, Now<'a>)>),
) {
    join(base, |b| b.0.as_str(), &scanned.current, |c| c.0, f);
}

/// The findings of the current tree against the baseline (both sorted by path). A path
/// that could not be read, or lies below a directory that could not be read, is reported
/// as unreadable (by the caller), not as removed.
fn compare(base: &Files, scanned: &Scan) -> Vec<Finding> {
    let hidden = |path: &str| {
        scanned.unreadable.iter().any(|(u, _)| {
            path.strip_prefix(u.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    };
    let mut out = Vec::new();
    join_current(base, scanned, |b, c| match (b, c) {
        (Some((path, b)), None) => {
            if !hidden(path) {
                out.push(Finding::new(
                    "removed",
                    path,
                    format!("{} was in the baseline", b.kind),
                ));
            }
        }
        (None, Some((path, _))) => {
            out.push(Finding::new("added", path, "not in the baseline".into()))
        }
        (Some((path, b)), Some((_, n))) => {
            let n = n.entry();
            if b.kind != n.kind {
                out.push(Finding::new(
                    "changed",
                    path,
                    format!("{} became a {}", b.kind, n.kind),
                ));
            } else if b.sha256 != n.sha256 {
                out.push(Finding::new(
                    "modified",
                    path,
                    "content differs from the baseline".into(),
                ));
            }
            let mut what = Vec::new();
            if b.mode != n.mode {
                what.push(format!("mode {:o} -> {:o}", b.mode, n.mode));
            }
            if (b.uid, b.gid) != (n.uid, n.gid) {
                what.push(format!("owner {}:{} -> {}:{}", b.uid, b.gid, n.uid, n.gid));
            }
            if b.kind == n.kind && b.target != n.target {
                what.push(format!(
                    "link target {} -> {}",
                    b.target.as_deref().unwrap_or("?"),
                    n.target.as_deref().unwrap_or("?")
                ));
            }
            if !what.is_empty() {
                out.push(Finding::new("changed", path, what.join(", ")));
            }
        }
        (None, None) => {}
    });
    out
}

/// What the cache must hold after this check: every current entry that differs from the
/// baseline's, and `None` for each baseline path no longer in the tree.
fn delta(base: &Files, scanned: &Scan) -> BTreeMap<String, Option<Entry>> {
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

/// Compares the tree with the baseline. New findings become security events. With
/// `dry_run`, nothing is written (no events, no state).
pub fn check(ctx: &Context, dry_run: bool, now: DateTime<Utc>) -> Result<Report> {
    let key = key(ctx)?;
    // The walk (on its own threads) and reading the baseline overlap.
    let (base, walked) = std::thread::scope(|scope| {
        let walker = scope.spawn(|| walk(ctx));
        let base = load_baseline(ctx, &key);
        (base, walker.join())
    });
    let base = base?;
    let walked = walked.map_err(|_| anyhow::anyhow!("the integrity walk panicked"))?;
    // The cache holds only what differs from the baseline (files hashed since, changed
    // ones, and those whose hash was redone), so an unchanged tree has an empty cache.
    let cache: BTreeMap<String, Option<Entry>> = ctx.state.load(CACHE)?.unwrap_or_default();
    let mut previous = overlay(&base, &cache);

    // A bounded share of the oldest hashes is redone each run.
    // (Durations are at most 100 years: these nanosecond counts fit in an i128.)
    let rehash_ns = ctx.config.security.full_rehash.0.as_nanos();
    let interval = ctx.config.security.integrity_interval.0.as_nanos().max(1);
    let runs = usize::try_from((rehash_ns / interval).max(1)).unwrap_or(usize::MAX);
    let now_at = now.timestamp_nanos_opt().unwrap_or_else(now_ns);
    let mut stale: Vec<usize> = (0..previous.len())
        .filter(|&i| {
            let e = previous[i].entry;
            e.kind == Kind::File
                && i128::from(now_at) - i128::from(e.hashed_at_ns) > rehash_ns as i128
        })
        .collect();
    stale.sort_by_key(|&i| previous[i].entry.hashed_at_ns);
    for i in stale.into_iter().take(previous.len().div_ceil(runs).max(1)) {
        previous[i].due = true;
    }

    let scanned = scan(&walked, &previous);
    let reported: BTreeSet<String> = ctx.state.load(REPORTED)?.unwrap_or_default();
    let mut findings = compare(&base, &scanned);
    findings.extend(
        scanned
            .unreadable
            .iter()
            .map(|(path, why)| Finding::new("unreadable", path, why.clone())),
    );
    findings.sort_by(|a, b| (&a.path, &a.kind).cmp(&(&b.path, &b.kind)));
    for f in &mut findings {
        f.new = !reported.contains(&f.id());
    }
    if !dry_run {
        let new_events: Vec<Event> = findings
            .iter()
            .filter(|f| f.new)
            .map(|f| Event {
                time: now,
                kind: format!("integrity.{}", f.kind),
                path: Some(f.path.clone()),
                detail: f.detail.clone(),
            })
            .collect();
        events::append(ctx, &new_events)?;
        let open: BTreeSet<String> = findings.iter().map(Finding::id).collect();
        if open != reported {
            ctx.state.save(REPORTED, &open)?;
        }
        let delta = delta(&base, &scanned);
        if delta != cache {
            ctx.state.save(CACHE, &delta)?;
        }
        ctx.state.save(
            LAST_CHECK,
            &LastCheck {
                time: now,
                files: scanned.current.len(),
                open_findings: findings.len(),
            },
        )?;
    }
    Ok(Report {
        files: scanned.current.len(),
        hashed: scanned.hashed,
        findings,
    })
}

/// How many findings the last check left open.
pub fn open_findings(ctx: &Context) -> Result<usize> {
    Ok(ctx
        .state
        .load::<BTreeSet<String>>(REPORTED)?
        .map_or(0, |s| s.len()))
}

pub fn last_check(ctx: &Context) -> Result<Option<LastCheck>> {
    ctx.state.load(LAST_CHECK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        let want = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        assert_eq!(hmac(b"Jefe", b"what do ya want for nothing?"), want);
        assert!(hmac_verifies(
            b"Jefe",
            b"what do ya want for nothing?",
            want
        ));
        assert!(!hmac_verifies(
            b"Jefe",
            b"what do ya want for nothing!",
            want
        ));
        assert!(!hmac_verifies(
            b"Jefe",
            b"what do ya want for nothing?",
            "5bdc"
        ));
        assert!(!hmac_verifies(
            b"Jefe",
            b"what do ya want for nothing?",
            "zz"
        ));
        // A key longer than a block (RFC 4231 test case 6).
        assert_eq!(
            hmac(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    fn file(hashed_at_ns: i64) -> Entry {
        Entry {
            kind: Kind::File,
            sha256: Some("0".repeat(64)),
            target: None,
            size: 1,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            ino: 1,
            hashed_at_ns,
        }
    }

    proptest::proptest! {
        #[test]
        fn join_visits_every_key_of_both_lists_once_in_order(
            a in proptest::collection::btree_set("[a-c/]{0,4}", 0..20),
            b in proptest::collection::btree_set("[a-c/]{0,4}", 0..20),
        ) {
            let (a, b): (Vec<String>, Vec<String>) = (a.into_iter().collect(), b.into_iter().collect());
            let mut seen = Vec::new();
            join(&a, |x| x.as_str(), &b, |y| y.as_str(), |x, y| {
                if let (Some(x), Some(y)) = (x, y) {
                    assert_eq!(x, y);
                }
                let key = x.or(y).cloned().unwrap_or_default();
                seen.push((key, x.is_some(), y.is_some()));
            });
            let union: BTreeSet<String> = a.iter().chain(&b).cloned().collect();
            let keys: Vec<String> = seen.iter().map(|s| s.0.clone()).collect();
            proptest::prop_assert_eq!(keys, union.into_iter().collect::<Vec<_>>());
            for (k, in_a, in_b) in seen {
                proptest::prop_assert_eq!(in_a, a.contains(&k));
                proptest::prop_assert_eq!(in_b, b.contains(&k));
            }
        }
    }

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
    fn a_baseline_with_unsorted_paths_is_read_sorted() {
        let e = serde_json::to_value(file(1)).unwrap();
        let text = format!(
            r#"{{"version":1,"created":"2026-01-01T00:00:00Z","files":{{"/w/b":{e},"/w/a":{e},"/w/c":{e}}}}}"#
        );
        let body: BodyRead = serde_json::from_str(&text).unwrap();
        let paths: Vec<&str> = body.files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["/w/a", "/w/b", "/w/c"]);
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
