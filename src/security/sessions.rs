//! Cleanup of expired API sessions and rate-limit windows in
//! `shared_storage/api_sessions.json`, a file the website (PHP) rewrites under `flock()`.
//!
//! Invariants:
//! - cr0sync takes the same exclusive `flock` on the file itself and rewrites it in place
//!   (write from 0, truncate, fsync) while holding it; it never renames a new file over
//!   it, which would orphan the inode a waiting PHP process is about to write.
//! - Only expired entries are removed; every other field, and the order of keys, stays.
//!   The inode, and so the mode and owner, never change.
//! - Before rewriting, a copy is saved in `state/sessions/api_sessions.json.copy`; its
//!   presence records that a rewrite is under way. A run that finds it and a file that no
//!   longer parses puts the copy back; the copy is removed once the rewrite is durable.
//! - A file that does not parse is left byte for byte as it is, with an error naming the
//!   file, line and column.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::context::Context;
use crate::error::io_text;

use crate::ops::state::names::SESSIONS_COPY as COPY;

/// What a cleanup found (and, unless a dry run, removed).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Counts {
    pub sessions_active: usize,
    pub sessions_expired: usize,
    pub rate_limits_active: usize,
    pub rate_limits_expired: usize,
}

fn parse_time(v: &Value) -> Option<DateTime<Utc>> {
    match v {
        Value::String(s) => DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&Utc)),
        Value::Number(n) => n
            .as_i64()
            .or_else(|| {
                // A fractional or huge timestamp: whole seconds, if it is a time at all.
                let f = n.as_f64()?.trunc();
                (f.abs() < 1e15).then(|| format!("{f:.0}").parse().ok())?
            })
            .and_then(|secs| DateTime::from_timestamp(secs, 0)),
        _ => None,
    }
}

fn session_expired(entry: &Value, now: DateTime<Utc>) -> Option<bool> {
    Some(parse_time(entry.get("expires_at")?)? <= now)
}

fn window_expired(entry: &Value, now: DateTime<Utc>) -> Option<bool> {
    let start = parse_time(entry.get("window_start")?)?;
    let secs = entry.get("window_seconds")?.as_i64()?;
    // A window too long to represent never ends; `None` (unreadable) keeps it too.
    let end = start.checked_add_signed(chrono::Duration::try_seconds(secs)?)?;
    Some(end <= now)
}

/// Removes expired entries from `doc` (in place); entries whose expiry cannot be read
/// are kept.
pub fn prune(doc: &mut Value, now: DateTime<Utc>) -> Counts {
    let mut c = Counts::default();
    type Expired = fn(&Value, DateTime<Utc>) -> Option<bool>;
    let sections: [(&str, Expired); 2] = [
        ("sessions", session_expired),
        ("rate_limits", window_expired),
    ];
    for (key, expired) in sections {
        let Some(map) = doc.get_mut(key).and_then(Value::as_object_mut) else {
            continue;
        };
        let before = map.len();
        map.retain(|id, entry| match expired(entry, now) {
            Some(gone) => !gone,
            None => {
                log::warn!("api_sessions.json: {key}.{id} has no readable expiry; kept");
                true
            }
        });
        let removed = before - map.len();
        if key == "sessions" {
            c.sessions_expired = removed;
            c.sessions_active = map.len();
        } else {
            c.rate_limits_expired = removed;
            c.rate_limits_active = map.len();
        }
    }
    c
}

/// Parses the file's bytes, naming line and column when it does not parse.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Value> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} does not parse (line {}, column {}: {}); left untouched. Try: fix the JSON \
             or let the website rewrite it",
            path.display(),
            e.line(),
            e.column(),
            e
        )
    })?;
    if !doc.is_object() {
        anyhow::bail!("{} is not a JSON object; left untouched", path.display());
    }
    Ok(doc)
}

/// Takes the exclusive flock on `file`, waiting up to `wait`.
fn lock(file: &File, path: &Path, wait: Duration) -> Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "{} stayed locked by another process for {:?}; not cleaned this run (retried \
                 next run)",
                path.display(),
                wait
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                anyhow::bail!("cannot lock {}: {}", path.display(), io_text(&e))
            }
        }
    }
}

fn read_all(file: &mut File) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Writes `bytes` over the file in place: from 0, then truncate, then fsync.
fn rewrite_in_place(file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    file.write_all(bytes)?;
    file.set_len(bytes.len() as u64)?;
    file.sync_all()
}

/// Cleans the sessions file. Returns what it found; writes nothing in a dry run.
pub fn cleanup(ctx: &Context, dry_run: bool, now: DateTime<Utc>) -> Result<Counts> {
    let path = ctx.layout.api_sessions();
    refuse_special(&path)?;
    let mut file = match OpenOptions::new().read(true).write(!dry_run).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            log::info!("{} does not exist; nothing to clean", path.display());
            return Ok(Counts::default());
        }
        Err(e) => anyhow::bail!("cannot open {}: {}", path.display(), io_text(&e)),
    };
    lock(&file, &path, ctx.config.general.busy_timeout.0)?;
    let bytes = read_all(&mut file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {}", path.display(), io_text(&e)))?;

    // A rewrite that was under way when a run died.
    let copy_path = ctx.state.path(COPY);
    if !dry_run && copy_path.exists() {
        if parse(&path, &bytes).is_err() {
            let copy = std::fs::read(&copy_path)
                .with_context(|| format!("cannot read {}", copy_path.display()))?;
            rewrite_in_place(&mut file, &copy)
                .with_context(|| format!("cannot restore {}", path.display()))?;
            log::warn!(
                "{}: an interrupted rewrite left it unreadable; restored from {}",
                path.display(),
                copy_path.display()
            );
            ctx.state.remove(COPY)?;
            return cleanup_locked(ctx, &path, &mut file, copy, dry_run, now);
        }
        ctx.state.remove(COPY)?;
    }
    cleanup_locked(ctx, &path, &mut file, bytes, dry_run, now)
}

fn cleanup_locked(
    ctx: &Context,
    path: &Path,
    file: &mut File,
    bytes: Vec<u8>,
    dry_run: bool,
    now: DateTime<Utc>,
) -> Result<Counts> {
    let mut doc = parse(path, &bytes)?;
    let counts = prune(&mut doc, now);
    if dry_run || counts.sessions_expired + counts.rate_limits_expired == 0 {
        return Ok(counts);
    }
    let mut out = serde_json::to_vec_pretty(&doc)?;
    out.push(b'\n');
    ctx.state.write_bytes(COPY, &bytes)?;
    rewrite_in_place(file, &out).with_context(|| format!("cannot rewrite {}", path.display()))?;
    ctx.state.remove(COPY)?;
    Ok(counts)
}

/// Counts without locking or writing, for `status`.
/// A sessions file that is a FIFO, device or directory is never opened (that could block).
fn refuse_special(path: &Path) -> Result<()> {
    if let Some(kind) = crate::fsutil::special_kind(path) {
        anyhow::bail!(
            "{} is {kind}, not the website's sessions file; nothing was read. Try: put the \
             JSON file the website writes there",
            path.display()
        );
    }
    Ok(())
}

pub fn peek(ctx: &Context, now: DateTime<Utc>) -> Result<Option<Counts>> {
    let path = ctx.layout.api_sessions();
    refuse_special(&path)?;
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("cannot read {}: {}", path.display(), io_text(&e)),
    };
    let mut doc = parse(&path, &bytes)?;
    Ok(Some(prune(&mut doc, now)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_removes_only_expired_entries_and_keeps_unknown_fields_in_order() {
        let now = DateTime::parse_from_rfc3339("2025-11-09T18:45:30Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut doc: Value = serde_json::from_str(
            r#"{"zeta": 1, "sessions": {
                 "b": {"user": "bob", "expires_at": "2025-11-09T18:00:00Z", "x": [1]},
                 "a": {"user": "alice", "expires_at": "2025-11-10T00:00:00Z", "x": [2]},
                 "n": {"user": "num", "expires_at": 1700000000},
                 "k": {"user": "keep", "expires_at": "soon"}},
               "rate_limits": {
                 "ip1": {"count": 3, "window_start": "2025-11-09T18:45:00Z", "window_seconds": 60},
                 "ip2": {"count": 9, "window_start": "2025-11-09T18:40:00Z", "window_seconds": 60}},
               "alpha": true}"#,
        )
        .unwrap();
        let c = prune(&mut doc, now);
        assert_eq!((c.sessions_expired, c.sessions_active), (2, 2));
        assert_eq!((c.rate_limits_expired, c.rate_limits_active), (1, 1));
        let text = serde_json::to_string(&doc).unwrap();
        assert!(text.starts_with(r#"{"zeta":1,"sessions":{"a""#), "{text}");
        assert!(text.ends_with(r#""alpha":true}"#), "{text}");
        assert!(text.contains(r#""k":{"user":"keep""#));
    }
}
