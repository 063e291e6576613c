//! Security events: `logs/security/events.jsonl`, one JSON object a line, and
//! their monthly archives `logs/security/archive/events-YYYY-MM.jsonl.gz`.
//!
//! Invariants:
//! - events.jsonl is written only by cr0sync, under the security job's lock: appends are
//!   whole lines, synced.
//! - Archiving loses no event and duplicates none, even if killed at any instant: before
//!   anything is appended, a journal in `state/` records each archive's length and the
//!   inode of events.jsonl. Old events are appended to their month's archive as a new
//!   gzip member (a `.gz` of several members is still one valid file), synced; then
//!   events.jsonl is replaced (temporary file, rename) by the events kept. The rename is
//!   the commit: a run that finds the journal and the same events.jsonl inode cuts the
//!   archives back to their recorded lengths and starts over; a different inode means the
//!   archiving completed.
//! - A line that does not parse (or has no readable `time`) is kept in events.jsonl.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};

use crate::context::Context;
use crate::fsutil;

use crate::ops::state::names::EVENT_ARCHIVE_JOURNAL as JOURNAL;

/// One security event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub time: DateTime<Utc>,
    pub kind: String,
    pub path: Option<String>,
    pub detail: String,
}

/// Appends events as whole lines and syncs the file.
pub fn append(ctx: &Context, events: &[Event]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let path = ctx.layout.security_events();
    if let Some(dir) = path.parent() {
        fsutil::ensure_dir(dir, &ctx.perms)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let mut text = Vec::new();
    for e in events {
        serde_json::to_writer(&mut text, e)?;
        text.push(b'\n');
    }
    fsutil::append_durable(&path, &text, &ctx.perms)
        .with_context(|| format!("cannot append to {}", path.display()))?;
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    /// events.jsonl's inode when archiving began.
    inode: u64,
    /// Each archive touched, with its length before.
    archives: BTreeMap<String, u64>,
}

/// What archiving did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Archived {
    pub moved: usize,
    pub kept: usize,
    pub months: Vec<String>,
}

/// Completes or undoes an interrupted archiving (see the module doc).
fn recover(ctx: &Context) -> Result<()> {
    let Some(j) = ctx.state.load::<Journal>(JOURNAL)? else {
        return Ok(());
    };
    let events = ctx.layout.security_events();
    let same = std::fs::metadata(&events)
        .map(|m| m.ino() == j.inode)
        .unwrap_or(false);
    if same {
        for (name, len) in &j.archives {
            let path = ctx.layout.security_archive_dir().join(name);
            match OpenOptions::new().write(true).open(&path) {
                Ok(f) => {
                    f.set_len(*len)?;
                    f.sync_all()?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot repair {}", path.display()));
                }
            }
            if *len == 0 {
                crate::fsutil::remove_if_exists(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
        log::warn!("archive-events: an interrupted run was undone; archiving again");
    }
    ctx.state.remove(JOURNAL)
}

/// Moves events older than `event_archive_after` to their month's archive.
pub fn archive(ctx: &Context, dry_run: bool, now: DateTime<Utc>) -> Result<Archived> {
    if !dry_run {
        recover(ctx)?;
    }
    let path = ctx.layout.security_events();
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Archived::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let inode = file.metadata()?.ino();
    let after = chrono::Duration::from_std(ctx.config.security.event_archive_after.0)
        .unwrap_or(chrono::Duration::MAX);
    let cutoff = now - after;
    let mut by_month: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut kept: Vec<u8> = Vec::new();
    let mut out = Archived::default();
    for line in BufReader::new(file).split(b'\n') {
        let mut line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.is_empty() {
            continue;
        }
        let time = serde_json::from_slice::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v.get("time")?.as_str().map(String::from))
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc));
        line.push(b'\n');
        match time {
            Some(t) if t < cutoff => {
                by_month
                    .entry(format!("events-{}.jsonl.gz", t.format("%Y-%m")))
                    .or_default()
                    .extend_from_slice(&line);
                out.moved += 1;
            }
            _ => {
                kept.extend_from_slice(&line);
                out.kept += 1;
            }
        }
    }
    out.months = by_month.keys().cloned().collect();
    if dry_run || by_month.is_empty() {
        return Ok(out);
    }
    let dir = ctx.layout.security_archive_dir();
    fsutil::ensure_dir(&dir, &ctx.perms)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    let archives = by_month
        .keys()
        .map(|n| {
            (
                n.clone(),
                std::fs::metadata(dir.join(n)).map(|m| m.len()).unwrap_or(0),
            )
        })
        .collect();
    ctx.state.save(JOURNAL, &Journal { inode, archives })?;
    for (name, lines) in &by_month {
        let p = dir.join(name);
        // One more gzip member: `zcat` reads the month whole.
        let mut gz = GzEncoder::new(Vec::new(), Compression::new(6));
        gz.write_all(lines)?;
        fsutil::append_durable(&p, &gz.finish()?, &ctx.perms)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    fsutil::fsync_dir(&dir)?;
    fsutil::atomic_write(&path, &kept, ctx.perms.file_mode, &ctx.perms)
        .with_context(|| format!("cannot rewrite {}", path.display()))?;
    ctx.state.remove(JOURNAL)?;
    Ok(out)
}
