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
//!
//! Layout: [`format`] is the signed baseline on disk, [`scan`] walks and hashes the tree,
//! [`findings`] compares the two; this file runs a check and writes a baseline.

mod findings;
mod format;
mod scan;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::context::Context;
use crate::error::io_text;
use crate::ops::state::names::{
    INTEGRITY_CACHE as CACHE, INTEGRITY_LAST_CHECK as LAST_CHECK, INTEGRITY_REPORTED as REPORTED,
};
use crate::output::Progress;
use crate::security::events::{self, Event};

pub use findings::{Finding, FindingId, FindingKind, Report};

use findings::compare;
use format::{key, load_baseline, write_baseline};
use scan::Meta;
use scan::{delta, entry, meta_of, now_ns, overlay, scan, sha256_file, walk};

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
    let mut reported: BTreeSet<FindingId> = ctx.state.load(REPORTED)?.unwrap_or_default();
    reported.retain(|f| f.path != p);
    ctx.state.save(REPORTED, &reported)?;
    write_baseline(ctx, &key, &files, now)?;
    Ok((files.len(), Vec::new()))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastCheck {
    pub time: DateTime<Utc>,
    pub files: usize,
    pub open_findings: usize,
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
    let reported: BTreeSet<FindingId> = ctx.state.load(REPORTED)?.unwrap_or_default();
    let mut findings = compare(&base, &scanned);
    findings.extend(
        scanned
            .unreadable
            .iter()
            .map(|(path, why)| Finding::new(FindingKind::Unreadable, path, why.clone())),
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
        let open: BTreeSet<FindingId> = findings.iter().map(Finding::id).collect();
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
        .load::<BTreeSet<FindingId>>(REPORTED)?
        .map_or(0, |s| s.len()))
}

pub fn last_check(ctx: &Context) -> Result<Option<LastCheck>> {
    ctx.state.load(LAST_CHECK)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn file(hashed_at_ns: i64) -> Entry {
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
}
