//! Backups of databases: `backups/<name>/<name>.<target>.<UTC stamp>.db.gz`.
//!
//! Invariants:
//! - A backup is read through SQLite's online backup API (never a file copy of a live
//!   database) into scratch space, compressed to a temporary name, synced and renamed: a
//!   listed backup is always whole.
//! - Two backups of one target never share a name: the stamp moves to the next free second.
//! - `clean` never removes the newest `backup_keep_min` backups of a database and target.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use chrono::{DateTime, NaiveDateTime, Utc};
use flate2::Compression;
use flate2::write::GzEncoder;

use crate::context::Context;
use crate::db::snapshot;
use crate::fsutil::{self, Scratch};

const STAMP: &str = "%Y%m%dT%H%M%SZ";

/// One backup file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub path: PathBuf,
    pub database: String,
    /// `central` or a peer's name.
    pub target: String,
    pub time: DateTime<Utc>,
    pub size: u64,
}

pub fn file_name(database: &str, target: &str, time: DateTime<Utc>) -> String {
    format!("{database}.{target}.{}.db.gz", time.format(STAMP))
}

/// The target and time of backup file `name` of `database`.
pub fn parse_name(database: &str, name: &str) -> Option<(String, DateTime<Utc>)> {
    let rest = name.strip_prefix(database)?.strip_prefix('.')?;
    let rest = rest.strip_suffix(".db.gz")?;
    let (target, stamp) = rest.rsplit_once('.')?;
    let time = NaiveDateTime::parse_from_str(stamp, STAMP).ok()?.and_utc();
    (!target.is_empty()).then(|| (target.to_string(), time))
}

/// The backups of `database`, oldest first.
pub fn list(ctx: &Context, database: &str) -> Result<Vec<Backup>> {
    let dir = ctx.layout.backups_dir(database);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some((target, time)) = name.to_str().and_then(|n| parse_name(database, n)) else {
            continue;
        };
        out.push(Backup {
            path: entry.path(),
            database: database.to_string(),
            target,
            time,
            size: entry.metadata().map(|m| m.len()).unwrap_or(0),
        });
    }
    out.sort_by(|a, b| (a.time, &a.target).cmp(&(b.time, &b.target)));
    Ok(out)
}

/// Whether a routine backup of `target` is due: none younger than `interval`.
pub fn due(
    ctx: &Context,
    database: &str,
    target: &str,
    interval: Duration,
    now: DateTime<Utc>,
) -> Result<bool> {
    let newest = list(ctx, database)?
        .into_iter()
        .filter(|b| b.target == target)
        .map(|b| b.time)
        .max();
    let interval = chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::MAX);
    Ok(match newest {
        Some(t) => interval.is_zero() || now - t >= interval,
        None => true,
    })
}

/// Backs up the live database at `live` as `target` of `database`; returns the file.
pub fn take(
    ctx: &Context,
    database: &str,
    target: &str,
    live: &Path,
    now: DateTime<Utc>,
) -> Result<PathBuf> {
    let scratch = Scratch::new(scratch_dir(ctx)?.join(format!("{database}.{target}.backup.db")));
    let busy = ctx.config.general.busy_timeout.0;
    snapshot::snapshot_to(live, &scratch, busy)?;
    store(ctx, database, target, &scratch, now)
}

/// Backs up attached database `schema` of `conn` (the sync's own connection, which may
/// hold the database locked) as `target` of `database`; returns the file.
pub fn take_from(
    ctx: &Context,
    database: &str,
    target: &str,
    conn: &rusqlite::Connection,
    schema: &str,
    now: DateTime<Utc>,
) -> Result<PathBuf> {
    let scratch = Scratch::new(scratch_dir(ctx)?.join(format!("{database}.{target}.backup.db")));
    snapshot::copy_schema_to(conn, schema, &scratch).with_context(|| {
        format!(
            "cannot back up {database} ({target}) into {}",
            scratch.display()
        )
    })?;
    store(ctx, database, target, &scratch, now)
}

/// Compresses the database copy at `scratch` into the next free backup name, then
/// removes the copy.
fn store(
    ctx: &Context,
    database: &str,
    target: &str,
    scratch: &Path,
    now: DateTime<Utc>,
) -> Result<PathBuf> {
    let dir = ctx.layout.backups_dir(database);
    fsutil::ensure_dir(&dir, &ctx.perms)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let mut time = now;
    let mut dest = dir.join(file_name(database, target, time));
    while dest.exists() {
        time += chrono::Duration::seconds(1);
        dest = dir.join(file_name(database, target, time));
    }
    let written = fsutil::atomic_replace_with(&dest, &ctx.perms, |tmp| {
        let mut input = BufReader::with_capacity(1 << 20, File::open(scratch)?);
        let out = BufWriter::with_capacity(1 << 20, File::create(tmp)?);
        let mut gz = GzEncoder::new(out, Compression::default());
        std::io::copy(&mut input, &mut gz)?;
        gz.finish()?.flush()?;
        Ok(())
    });
    written.with_context(|| format!("cannot write backup {}", dest.display()))?;
    log::info!("backup of {database} ({target}): {}", dest.display());
    Ok(dest)
}

/// Decompresses a backup into a scratch file and checks it is a whole database.
pub fn unpack(ctx: &Context, backup: &Path) -> Result<Scratch> {
    let scratch = Scratch::new(scratch_dir(ctx)?.join("restore.db"));
    let unpacked = (|| -> Result<()> {
        let input = BufReader::new(File::open(backup)?);
        let mut gz = flate2::read::MultiGzDecoder::new(input);
        let mut out = BufWriter::new(File::create(&scratch)?);
        std::io::copy(&mut gz, &mut out)?;
        out.flush()?;
        Ok(())
    })();
    unpacked.with_context(|| {
        format!(
            "cannot read backup {} (is it a .db.gz backup?)",
            backup.display()
        )
    })?;
    let conn = rusqlite::Connection::open_with_flags(
        &scratch,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .with_context(|| {
            format!(
                "backup {} does not hold an SQLite database",
                backup.display()
            )
        })?;
    if check != "ok" {
        anyhow::bail!("backup {} is damaged: {check}", backup.display());
    }
    Ok(scratch)
}

/// Backups `clean` would remove: older than `backup_keep`, except the newest
/// `backup_keep_min` of each database and target.
pub fn expired(ctx: &Context, now: DateTime<Utc>) -> Result<Vec<Backup>> {
    let keep = chrono::Duration::from_std(ctx.config.database.backup_keep.0)
        .unwrap_or(chrono::Duration::MAX);
    let keep_min = ctx.config.database.backup_keep_min as usize;
    let mut out = Vec::new();
    for db in &ctx.config.database.db {
        let all = list(ctx, db.name.get_ref())?;
        let mut targets: Vec<&str> = all.iter().map(|b| b.target.as_str()).collect();
        targets.sort();
        targets.dedup();
        for target in targets {
            let mine: Vec<&Backup> = all.iter().filter(|b| b.target == target).collect();
            let protected = mine.len().saturating_sub(keep_min);
            out.extend(
                mine[..protected]
                    .iter()
                    .filter(|b| now - b.time > keep)
                    .map(|b| (*b).clone()),
            );
        }
    }
    Ok(out)
}

/// Scratch space for snapshots and unpacked backups: `state/tmp`.
pub fn scratch_dir(ctx: &Context) -> Result<PathBuf> {
    let dir = ctx.state.path(crate::ops::state::names::TMP_DIR);
    fsutil::ensure_dir(&dir, &ctx.perms)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip_with_dotted_targets() {
        let t = DateTime::parse_from_rfc3339("2026-11-22T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc);
        let name = file_name("users", "bot.eu", t);
        assert_eq!(name, "users.bot.eu.20261122T030405Z.db.gz");
        assert_eq!(parse_name("users", &name), Some(("bot.eu".into(), t)));
        assert_eq!(parse_name("user", &name), None);
        assert_eq!(parse_name("users", "users.central.garbage.db.gz"), None);
    }
}
