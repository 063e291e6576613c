//! File integrity (SPEC 5.1, 5.2): a signed baseline of the watched files, and a check
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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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
use crate::security::events::{self, Event};

const CACHE: &str = "security/integrity-cache.json";
const REPORTED: &str = "security/integrity-reported.json";
const LAST_CHECK: &str = "security/integrity-last-check.json";

/// One watched path's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `file`, `symlink` or `special`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub ino: u64,
    /// When the content was last hashed (for `full_rehash` and racy entries).
    pub hashed_at_ns: i128,
}

impl Entry {
    fn same_stat(&self, m: &Meta) -> bool {
        self.size == m.size
            && self.mtime_ns == m.mtime_ns
            && self.ctime_ns == m.ctime_ns
            && self.ino == m.ino
    }

    fn racy(&self) -> bool {
        self.kind == "file" && self.mtime_ns >= self.hashed_at_ns - 1_000_000_000
    }
}

/// The baseline as read: a hash map, so loading a large tree does not pay for ordered
/// insertion of long, similar paths (the written file is ordered; the HMAC covers its bytes).
#[derive(Debug, Deserialize)]
struct BodyRead {
    #[allow(dead_code)]
    version: u32,
    #[allow(dead_code)]
    created: DateTime<Utc>,
    files: HashMap<String, Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Body {
    version: u32,
    created: DateTime<Utc>,
    files: BTreeMap<String, Entry>,
}

/// The file: the baseline's exact bytes and their HMAC, so verifying needs no
/// re-serialization.
#[derive(Debug, Deserialize)]
struct Signed<'a> {
    hmac: String,
    #[serde(borrow)]
    baseline: &'a serde_json::value::RawValue,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// HMAC-SHA256 (RFC 2104).
fn hmac(key: &[u8], msg: &[u8]) -> String {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let (mut ipad, mut opad) = ([0x36u8; 64], [0x5cu8; 64]);
    for i in 0..64 {
        ipad[i] ^= k[i];
        opad[i] ^= k[i];
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(msg)
        .finalize();
    hex(&Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize())
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
    kind: &'static str,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i128,
    ctime_ns: i128,
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
        "symlink"
    } else if ft.is_file() {
        "file"
    } else {
        "special"
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
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
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

type Walked = (HashMap<String, Meta>, Vec<(String, String)>);

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
            out.1.push((start.display().to_string(), io_text(&e)));
            return;
        }
    };
    if !meta.is_dir() {
        match meta_from(start, meta) {
            Ok(m) => {
                out.0.insert(start.to_string_lossy().into_owned(), m);
            }
            Err(e) => out.1.push((start.display().to_string(), io_text(&e))),
        }
        return;
    }
    let mut dirs = vec![start.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                out.1.push((dir.display().to_string(), io_text(&e)));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    out.1.push((dir.display().to_string(), io_text(&e)));
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
                    Ok(meta) => {
                        out.0.insert(path.to_string_lossy().into_owned(), meta);
                    }
                    Err(e) => out.1.push((path.display().to_string(), io_text(&e))),
                },
                Err(e) => out.1.push((path.display().to_string(), io_text(&e))),
            }
        }
    }
}

/// The watched paths with their metadata; paths that cannot be read are returned apart.
/// The children of each watched directory are walked on every core at once.
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
    let mut out: Walked = (HashMap::new(), Vec::new());
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
                    let mut mine: Walked = (HashMap::new(), Vec::new());
                    while let Some((root, start)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                        walk_one(root, start, patterns, &mut mine);
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    for (files, bad) in parts {
        out.0.extend(files);
        out.1.extend(bad);
    }
    out
}

/// SHA-256 of a file, streamed with a large buffer.
fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Hashes `paths` on every core. Returns path -> hash or error text.
fn hash_all(paths: &[String]) -> BTreeMap<String, Result<String, String>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let next = AtomicUsize::new(0);
    let out = Mutex::new(BTreeMap::new());
    std::thread::scope(|scope| {
        for _ in 0..workers.min(paths.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = paths.get(i) else { break };
                    let r = sha256_file(Path::new(p)).map_err(|e| io_text(&e));
                    if let Ok(mut o) = out.lock() {
                        o.insert(p.clone(), r);
                    }
                }
            });
        }
    });
    out.into_inner().unwrap_or_default()
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn entry(m: &Meta, sha256: Option<String>, hashed_at_ns: i128) -> Entry {
    Entry {
        kind: m.kind.to_string(),
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

/// The current tree: entries built this run (new, changed, hashed), and the paths whose
/// previous entry still holds (same size, mtime, ctime and inode; not racy; not due).
struct Scan {
    fresh: BTreeMap<String, Entry>,
    reused: Vec<String>,
    unreadable: Vec<(String, String)>,
    hashed: usize,
}

/// Scans the tree. `previous` entries whose metadata is unchanged are reused without
/// reading the file (a chmod or chown changes the ctime, so a reused entry's mode and
/// owner are current too).
fn scan(walked: Walked, previous: &HashMap<&str, &Entry>, due: &HashSet<&str>) -> Scan {
    let (tree, mut unreadable) = walked;
    let stamp = now_ns();
    let mut fresh = BTreeMap::new();
    let mut reused = Vec::new();
    let mut to_hash = Vec::new();
    for (path, m) in &tree {
        match previous.get(path.as_str()) {
            Some(e)
                if e.kind == m.kind
                    && e.same_stat(m)
                    && e.target == m.target
                    && !(m.kind == "file" && (e.racy() || due.contains(path.as_str()))) =>
            {
                reused.push(path.clone());
            }
            _ if m.kind != "file" => {
                fresh.insert(path.clone(), entry(m, None, 0));
            }
            _ => to_hash.push(path.clone()),
        }
    }
    let hashed = to_hash.len();
    for (path, result) in hash_all(&to_hash) {
        match result {
            Ok(h) => {
                fresh.insert(path.clone(), entry(&tree[&path], Some(h), stamp));
            }
            Err(why) => unreadable.push((path, why)),
        }
    }
    Scan {
        fresh,
        reused,
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
    let files = match accept {
        None => {
            let Scan {
                fresh: files,
                unreadable,
                ..
            } = scan(walk(ctx), &HashMap::new(), &HashSet::new());
            write_baseline(ctx, &key, files.clone(), now)?;
            ctx.state.remove(REPORTED)?;
            ctx.state.remove(CACHE)?;
            return Ok((files.len(), unreadable));
        }
        Some(path) => {
            let mut files: BTreeMap<String, Entry> =
                load_baseline(ctx, &key)?.into_iter().collect();
            let p = std::path::absolute(path)?.to_string_lossy().into_owned();
            match meta_of(Path::new(&p)) {
                Ok(m) => {
                    let h = if m.kind == "file" {
                        Some(
                            sha256_file(Path::new(&p))
                                .map_err(|e| anyhow::anyhow!("cannot read {p}: {}", io_text(&e)))?,
                        )
                    } else {
                        None
                    };
                    files.insert(p.clone(), entry(&m, h, now_ns()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    files.remove(&p);
                }
                Err(e) => anyhow::bail!("cannot read {p}: {}", io_text(&e)),
            }
            let mut reported: BTreeSet<String> = ctx.state.load(REPORTED)?.unwrap_or_default();
            reported.retain(|f| !f.ends_with(&format!(" {p}")));
            ctx.state.save(REPORTED, &reported)?;
            files
        }
    };
    let n = files.len();
    write_baseline(ctx, &key, files, now)?;
    Ok((n, Vec::new()))
}

fn write_baseline(
    ctx: &Context,
    key: &[u8],
    files: BTreeMap<String, Entry>,
    now: DateTime<Utc>,
) -> Result<()> {
    let body = serde_json::to_string(&Body {
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
fn load_baseline(ctx: &Context, key: &[u8]) -> Result<HashMap<String, Entry>> {
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
        let _ = events::append(
            ctx,
            &[Event {
                time: crate::ops::clock::now(),
                kind: "integrity.baseline_untrusted".into(),
                path: Some(path.display().to_string()),
                detail: why.into(),
            }],
        );
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
    if hmac(key, signed.baseline.get().as_bytes()) != signed.hmac {
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

fn compare(
    base: &HashMap<String, Entry>,
    now: &HashMap<&str, &Entry>,
) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (path, b) in base {
        let Some(n) = now.get(path.as_str()) else {
            out.push((
                "removed".into(),
                path.clone(),
                format!("{} was in the baseline", b.kind),
            ));
            continue;
        };
        if b.kind != n.kind {
            out.push((
                "changed".into(),
                path.clone(),
                format!("{} became a {}", b.kind, n.kind),
            ));
        } else if b.sha256 != n.sha256 {
            out.push((
                "modified".into(),
                path.clone(),
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
            out.push(("changed".into(), path.clone(), what.join(", ")));
        }
    }
    for path in now.keys().filter(|p| !base.contains_key(**p as &str)) {
        out.push((
            "added".into(),
            path.to_string(),
            "not in the baseline".into(),
        ));
    }
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
    let mut previous: HashMap<&str, &Entry> = base.iter().map(|(p, e)| (p.as_str(), e)).collect();
    for (path, e) in &cache {
        match e {
            Some(e) => previous.insert(path.as_str(), e),
            None => previous.remove(path.as_str()),
        };
    }

    // A bounded share of the oldest hashes is redone each run.
    let rehash_ns = ctx.config.security.full_rehash.0.as_nanos() as i128;
    let interval = ctx.config.security.integrity_interval.0.as_nanos().max(1) as i128;
    let runs = (rehash_ns / interval).max(1) as usize;
    let now_at = now.timestamp_nanos_opt().map_or_else(now_ns, i128::from);
    let mut stale: Vec<(&str, i128)> = previous
        .iter()
        .filter(|(_, e)| e.kind == "file" && now_at - e.hashed_at_ns > rehash_ns)
        .map(|(p, e)| (*p, e.hashed_at_ns))
        .collect();
    let share = previous.len().div_ceil(runs).max(1);
    stale.sort_by_key(|(_, t)| *t);
    let due: HashSet<&str> = stale.into_iter().take(share).map(|(p, _)| p).collect();

    let scanned = scan(walked, &previous, &due);
    let mut current: HashMap<&str, &Entry> =
        scanned.fresh.iter().map(|(p, e)| (p.as_str(), e)).collect();
    for p in &scanned.reused {
        if let Some(e) = previous.get(p.as_str()) {
            current.insert(p.as_str(), e);
        }
    }
    let (unreadable, hashed) = (scanned.unreadable.clone(), scanned.hashed);
    let reported: BTreeSet<String> = ctx.state.load(REPORTED)?.unwrap_or_default();
    let mut findings: Vec<Finding> = compare(&base, &current)
        .into_iter()
        .map(|(kind, path, detail)| Finding {
            kind,
            path,
            detail,
            new: false,
        })
        .collect();
    findings.extend(unreadable.into_iter().map(|(path, why)| Finding {
        kind: "unreadable".into(),
        path,
        detail: why,
        new: false,
    }));
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
        // Only fresh entries can differ from the baseline, besides cache entries still
        // reused: no lookup of the whole tree in the baseline.
        let mut delta: BTreeMap<String, Option<Entry>> = scanned
            .fresh
            .iter()
            .filter(|(p, e)| base.get(*p) != Some(*e))
            .map(|(p, e)| (p.clone(), Some(e.clone())))
            .collect();
        for p in &scanned.reused {
            if let Some(Some(e)) = cache.get(p) {
                delta.insert(p.clone(), Some(e.clone()));
            }
        }
        delta.extend(
            base.keys()
                .filter(|p| !current.contains_key(p.as_str()))
                .map(|p| (p.clone(), None)),
        );
        if delta != cache {
            ctx.state.save(CACHE, &delta)?;
        }
        ctx.state.save(
            LAST_CHECK,
            &LastCheck {
                time: now,
                files: current.len(),
                open_findings: findings.len(),
            },
        )?;
    }
    Ok(Report {
        files: current.len(),
        hashed,
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
        assert_eq!(
            hmac(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
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
