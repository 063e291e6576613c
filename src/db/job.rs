//! The database job as commands see it: which pairs, syncing them as tasks of one run,
//! the recovery commands (`sync-from-bot`, `restore`), backup cleanup and the status
//! section.
//!
//! Invariants:
//! - Every writing operation runs inside a database-job run (`jobs::runner`), so it holds
//!   the job lock and leaves a run record.
//! - Each pair is its own task: one pair's failure (missing, damaged or busy peer, the
//!   mass-delete guard) is reported and the other pairs still sync.
//! - Recovery commands back up the target first, always, and write a database only
//!   through SQLite's backup API (never by replacing a file a bot may hold open).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;
use serde_json::json;

use crate::config::{DbConfig, PeerConfig};
use crate::conflicts;
use crate::context::Context;
use crate::db::apply::{apply, open_for_merge};
use crate::db::backup::{self, Backup};
use crate::db::merge;
use crate::db::snapshot;
use crate::db::sync::{self, Options, PairReport, PairState};
use crate::db::value::row_from_json;
use crate::error::Error;
use crate::ops::section::Section;
use crate::ops::state::names;
use crate::ops::task::{JobRun, RunRecord, RunResult, Task, TaskDone};
use crate::output::{Table, Tone, paint};

/// `--db NAME... --peer NAME` from the command line; empty means all.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub databases: Vec<String>,
    pub peer: Option<String>,
}

/// The (database, peer) pairs selected, in configuration order; unknown names are a
/// usage error listing the configured ones.
pub fn pairs<'a>(ctx: &'a Context, sel: &Selection) -> Result<Vec<(&'a DbConfig, &'a PeerConfig)>> {
    let dbs = &ctx.config.database.db;
    for name in &sel.databases {
        if !dbs.iter().any(|d| d.name.get_ref() == name) {
            let known: Vec<&str> = dbs.iter().map(|d| d.name.get_ref().as_str()).collect();
            return Err(Error::Usage(format!(
                "no database named `{name}` in {} (configured: {})",
                ctx.config_path.display(),
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            ))
            .into());
        }
    }
    let mut out = Vec::new();
    for db in dbs {
        if !sel.databases.is_empty() && !sel.databases.contains(db.name.get_ref()) {
            continue;
        }
        for peer in &db.peers {
            if sel.peer.as_ref().is_none_or(|p| p == peer.name.get_ref()) {
                out.push((db, peer));
            }
        }
    }
    if let Some(p) = &sel.peer
        && out.is_empty()
    {
        return Err(Error::Usage(format!(
            "no peer named `{p}` in the selected database(s) of {}",
            ctx.config_path.display()
        ))
        .into());
    }
    Ok(out)
}

fn is_remote(peer: &PeerConfig) -> bool {
    peer.path.get_ref().to_string_lossy().starts_with("ssh://")
}

/// Commands that write a peer's file directly do not reach peers on other hosts yet.
fn refuse_remote(peer: &PeerConfig, what: &str) -> Result<()> {
    if is_remote(peer) {
        anyhow::bail!(
            "{what} does not reach peers on other hosts yet ({}). Try: run it on that host \
             with a local configuration, or use a backup under backups/",
            peer.path.get_ref().display()
        );
    }
    Ok(())
}

pub fn task_name(db: &DbConfig, peer: &PeerConfig) -> String {
    format!("sync {}/{}", db.name.get_ref(), peer.name.get_ref())
}

/// Syncs the selected pairs, one task each; returns the reports of those that succeeded.
pub fn sync_pairs(run: &mut JobRun, sel: &Selection, force: bool) -> Result<Vec<PairReport>> {
    let ctx = run.ctx;
    let opts = Options {
        dry_run: run.dry_run,
        force,
    };
    let mut reports = Vec::new();
    // One connection per host for the whole run, shared by its pairs.
    let hosts = crate::remote::client::Hosts::new(&ctx.config.remote);
    let selected = pairs(ctx, sel)?;
    hosts.open_all(selected.iter().map(|(_, p)| p.path.get_ref().as_path()));
    for (db, peer) in selected {
        let now = run.now;
        run.task(&task_name(db, peer), |run| {
            let report = sync::sync_pair(ctx, db, peer, opts, now, &hosts)?;
            let (c, p, k) = report.changes();
            run.gauge("cr0sync_db_rows_changed", (c + p) as f64);
            run.gauge("cr0sync_db_conflicts_recorded", k as f64);
            let done = TaskDone::new(report.summary());
            reports.push(report);
            Ok(done)
        });
    }
    crate::remote::client::record_hosts(&ctx.state, &hosts, run.now, run.dry_run)?;
    Ok(reports)
}

/// The job's name: its lock, its run records (the registry lists it under this name).
pub const JOB: &str = "database";

/// The periodic task that removes expired backups and the copies of peers no longer
/// configured.
pub const CLEAN_BACKUPS: Task = Task::new("clean-backups");

/// The cron job's tasks: sync every pair, then the weekly cleanup.
pub fn cron_tasks(run: &mut JobRun) -> Result<()> {
    let reports = sync_pairs(run, &Selection::default(), false)?;
    // One stderr line per new conflict, so cron mails it.
    if !run.ctx.config.database.quiet_conflicts {
        for line in reports.iter().flat_map(|r| &r.new_conflicts) {
            eprintln!("cr0sync: {line}");
        }
    }
    run.periodic(CLEAN_BACKUPS, |run| {
        let removed = clean_backups(run.ctx, run.dry_run, run.now)?;
        let copies = clean_stale_copies(run.ctx, run.dry_run)?;
        Ok(TaskDone::new(format!(
            "{} expired backup(s) and {} copy(ies) of peers no longer configured removed",
            removed.len(),
            copies.len()
        )))
    });
    Ok(())
}

/// Removes expired backups (or lists them in a dry run).
pub fn clean_backups(ctx: &Context, dry_run: bool, now: DateTime<Utc>) -> Result<Vec<Backup>> {
    let expired = backup::expired(ctx, now)?;
    if !dry_run {
        for b in &expired {
            std::fs::remove_file(&b.path)
                .with_context(|| format!("cannot remove backup {}", b.path.display()))?;
            log::info!("removed expired backup {}", b.path.display());
        }
        if let Some(dir) = expired.first().and_then(|b| b.path.parent()) {
            crate::fsutil::fsync_dir(dir)?;
        }
    }
    Ok(expired)
}

/// The copies of peers kept in `state/` that no configured pair uses any more: a local
/// peer's snapshot (`db/<db>/<peer>.snapshot.db`) and a remote peer's transfer copy
/// (`remote/db/<db>/<peer>.db`), each the size of its peer, with any SQLite file beside it.
/// They are caches: the pair's base and fingerprint stay, so a pair configured again
/// merges on from its base, and its next sync copies its peer afresh.
pub fn stale_copies(ctx: &Context) -> Result<Vec<PathBuf>> {
    let used = |db: &str, peer: &str, remote: bool| {
        ctx.config.database.db.iter().any(|d| {
            d.name.get_ref() == db
                && d.peers
                    .iter()
                    .any(|p| p.name.get_ref() == peer && is_remote(p) == remote)
        })
    };
    let mut out = Vec::new();
    for (dir, suffix, remote) in [("db", ".snapshot.db", false), ("remote/db", ".db", true)] {
        let top = ctx.state.path(dir);
        let dbs = match std::fs::read_dir(&top) {
            Ok(dbs) => dbs,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", top.display())),
        };
        for db in dbs {
            let db = db.with_context(|| format!("cannot read {}", top.display()))?;
            let Some(db_name) = db.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !db.file_type()?.is_dir() {
                continue;
            }
            let files = std::fs::read_dir(db.path())
                .with_context(|| format!("cannot read {}", db.path().display()))?;
            for f in files {
                let f = f.with_context(|| format!("cannot read {}", db.path().display()))?;
                let name = f.file_name();
                let Some(name) = name.to_str() else { continue };
                let file = ["-journal", "-wal", "-shm"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                if let Some(peer) = file.strip_suffix(suffix)
                    && f.file_type()?.is_file()
                    && !used(&db_name, peer, remote)
                {
                    out.push(f.path());
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Removes [`stale_copies`] (or lists them in a dry run).
pub fn clean_stale_copies(ctx: &Context, dry_run: bool) -> Result<Vec<PathBuf>> {
    let stale = stale_copies(ctx)?;
    if !dry_run {
        for path in &stale {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
            log::info!(
                "removed {}: a copy of a peer no longer configured",
                path.display()
            );
        }
    }
    Ok(stale)
}

/// Copies the database file `src` into the database at `dest` through the backup API, so
/// connections others hold on `dest` see the new content. `dest` is created only if
/// `create` (the central copy).
fn copy_into_live(src: &Path, dest: &Path, busy: std::time::Duration, create: bool) -> Result<()> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let mut to = Connection::open_with_flags(dest, flags)
        .with_context(|| format!("cannot open {}", dest.display()))?;
    to.busy_timeout(busy)?;
    let from = Connection::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    // SQLite cannot change the page size of a database in WAL mode in place.
    let page_size =
        |c: &Connection| -> Result<i64> { Ok(c.query_row("PRAGMA page_size", [], |r| r.get(0))?) };
    let mode: String = to
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .with_context(|| format!("cannot read {}", dest.display()))?;
    let (have, want) = (page_size(&to)?, page_size(&from)?);
    if mode.eq_ignore_ascii_case("wal") && have != want {
        anyhow::bail!(
            "cannot restore into {}: it is in WAL mode with pages of {have} bytes and the \
             backup has pages of {want}, which SQLite cannot change in place; nothing was \
             written. Try: stop the application using it, run sqlite3 {} 'PRAGMA \
             journal_mode=DELETE', restore again, then set journal_mode=WAL back",
            dest.display(),
            dest.display()
        );
    }
    let backup = rusqlite::backup::Backup::new(&from, &mut to)?;
    backup
        .run_to_completion(i32::MAX, std::time::Duration::from_millis(50), None)
        .with_context(|| format!("cannot write {}", dest.display()))?;
    drop(backup);
    to.close().map_err(|(_, e)| e)?;
    Ok(())
}

/// Forgets a pair's merge base and fingerprint: its next sync is a first sync (a union:
/// nothing is deleted, differing rows are conflicts resolved by policy and recorded).
fn forget_pair(ctx: &Context, db: &str, peer: &str) -> Result<()> {
    // Conflict records still in the base's outbox are appended before it goes.
    crate::db::journal::flush_outbox_of(ctx, &ctx.state.path(&crate::db::base::name(db, peer)))?;
    ctx.state.remove(&crate::db::journal::name(db, peer))?;
    ctx.state.remove(&crate::db::base::name(db, peer))?;
    ctx.state
        .remove(&crate::ops::state::names::db_snapshot(db, peer))?;
    ctx.state.remove(&sync::state_name(db, peer))?;
    Ok(())
}

/// The peer `sync-from-bot` copies from: `--peer`, else `bot`, else the only peer.
pub fn recovery_peer<'a>(db: &'a DbConfig, peer: Option<&str>) -> Result<&'a PeerConfig> {
    let name = db.name.get_ref();
    let found = match peer {
        Some(p) => db.peers.iter().find(|x| x.name.get_ref() == p),
        None => db
            .peers
            .iter()
            .find(|x| x.name.get_ref() == "bot")
            .or(if db.peers.len() == 1 {
                db.peers.first()
            } else {
                None
            }),
    };
    found.ok_or_else(|| {
        Error::Usage(format!(
            "database `{name}`: say which peer to copy from with --peer (no peer named `bot`, \
             and more than one peer)"
        ))
        .into()
    })
}

/// `sync-from-bot` for one database: back up the central copy, replace it with the peer's
/// snapshot, reset the pair's base to it.
pub fn sync_from_peer(run: &mut JobRun, db: &DbConfig, peer: &PeerConfig) -> Result<String> {
    let ctx = run.ctx;
    let name = db.name.get_ref().as_str();
    let peer_name = peer.name.get_ref().as_str();
    refuse_remote(peer, "sync-from-bot")?;
    let peer_path = ctx.resolve(peer.path.get_ref());
    let central = ctx.layout.central_db(name);
    let busy = ctx.config.general.busy_timeout.0;
    let scratch = crate::fsutil::Scratch::new(
        backup::scratch_dir(ctx)?.join(format!("{name}.{peer_name}.recovery.db")),
    );
    snapshot::snapshot_to(&peer_path, &scratch, busy)
        .with_context(|| format!("{name}: cannot read peer {peer_name}"))?;
    (|| -> Result<String> {
        if run.dry_run {
            return Ok(format!(
                "{name}: would replace the central copy with peer {peer_name} ({})",
                peer_path.display()
            ));
        }
        let mut saved = String::new();
        if central.exists() {
            let b = backup::take(ctx, name, "central", &central, run.now)?;
            saved = format!(" (previous central copy saved as {})", b.display());
        }
        copy_into_live(&scratch, &central, busy, true)?;
        // The pair starts over: conflict records still in its base are appended first, and
        // the journal of an interrupted sync goes (the peer's copy is the new truth).
        let base = ctx.state.path(&crate::db::base::name(name, peer_name));
        crate::db::journal::flush_outbox_of(ctx, &base)?;
        ctx.state
            .remove(&crate::db::journal::name(name, peer_name))?;
        ctx.state
            .replace_with(&crate::db::base::name(name, peer_name), |tmp| {
                snapshot::snapshot_to(&scratch, tmp, busy)
            })?;
        ctx.state.remove(&sync::state_name(name, peer_name))?;
        Ok(format!(
            "{name}: central copy replaced by peer {peer_name}{saved}; base reset"
        ))
    })()
}

/// `db restore`: which database and target a backup file belongs to.
pub fn backup_owner<'a>(ctx: &'a Context, file: &Path) -> Result<(&'a DbConfig, String)> {
    let fname = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let mut best: Option<(&DbConfig, String)> = None;
    for db in &ctx.config.database.db {
        let name = db.name.get_ref();
        if let Some(b) = backup::parse_name(name, fname)
            && best
                .as_ref()
                .is_none_or(|(d, _)| d.name.get_ref().len() < name.len())
        {
            best = Some((db, b.0));
        }
    }
    best.ok_or_else(|| {
        Error::Usage(format!(
            "{}: not a backup of a configured database (expected <name>.<target>.<stamp>.db.gz)",
            file.display()
        ))
        .into()
    })
}

/// Restores `file` into `to` (`central` or a peer's name) of `db`: backup of the current
/// state first, then the backup's pages written through SQLite, then the affected pairs
/// forgotten so their next sync is a first sync.
pub fn restore(run: &mut JobRun, db: &DbConfig, file: &Path, to: &str) -> Result<String> {
    let ctx = run.ctx;
    let name = db.name.get_ref().as_str();
    let busy = ctx.config.general.busy_timeout.0;
    let (dest, pairs): (PathBuf, Vec<&str>) = if to == "central" {
        (
            ctx.layout.central_db(name),
            db.peers.iter().map(|p| p.name.get_ref().as_str()).collect(),
        )
    } else {
        let peer = db
            .peers
            .iter()
            .find(|p| p.name.get_ref() == to)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "--to {to}: database `{name}` has no such peer (use central or a peer name)"
                ))
            })?;
        refuse_remote(peer, "db restore --to")?;
        (ctx.resolve(peer.path.get_ref()), vec![to])
    };
    if to != "central" && !dest.exists() {
        anyhow::bail!(
            "peer database not found: {} (never created)",
            dest.display()
        );
    }
    let unpacked = backup::unpack(ctx, file)?;
    (|| -> Result<String> {
        if run.dry_run {
            return Ok(format!(
                "{name}: would restore {} into {}",
                file.display(),
                dest.display()
            ));
        }
        let mut saved = String::new();
        if dest.exists() {
            let b = backup::take(ctx, name, to, &dest, run.now)?;
            saved = format!(" (its previous state saved as {})", b.display());
        }
        copy_into_live(&unpacked, &dest, busy, to == "central")?;
        for peer in pairs {
            forget_pair(ctx, name, peer)?;
        }
        Ok(format!(
            "{name}: {} restored into {}{saved}",
            file.display(),
            dest.display()
        ))
    })()
}

/// One pair in `db status` and the `databases` status section.
#[derive(Debug, Clone, Serialize)]
pub struct PairStatus {
    pub database: String,
    pub peer: String,
    pub direction: String,
    pub path: String,
    pub last_sync: Option<String>,
    pub last_changes: Option<serde_json::Value>,
    pub skipped_tables: Vec<sync::SkippedTable>,
    /// Rows the last sync left for the next run (changed meanwhile, or refused).
    pub unapplied: usize,
    /// Open conflicts (recorded, not yet reviewed with `db resolve`).
    pub conflicts: usize,
    pub last_error: Option<String>,
    pub newest_backup: Option<String>,
}

pub fn pair_statuses(ctx: &Context) -> Result<Vec<PairStatus>> {
    let record: Option<RunRecord> = ctx.state.load(&names::run_record(JOB))?;
    let all_conflicts = conflicts::open(ctx)?;
    let mut out = Vec::new();
    for db in &ctx.config.database.db {
        let name = db.name.get_ref();
        let backups = backup::list(ctx, name)?;
        for peer in &db.peers {
            let peer_name = peer.name.get_ref();
            let state: Option<PairState> = ctx.state.load(&sync::state_name(name, peer_name))?;
            let task = task_name(db, peer);
            let last_error = record.as_ref().and_then(|r| {
                r.tasks
                    .iter()
                    .find(|t| t.name == task && t.result == RunResult::Error)
                    .map(|t| t.detail.clone())
            });
            out.push(PairStatus {
                database: name.clone(),
                peer: peer_name.clone(),
                direction: format!("{:?}", peer.direction).to_lowercase(),
                path: if is_remote(peer) {
                    peer.path.get_ref().display().to_string()
                } else {
                    ctx.resolve(peer.path.get_ref()).display().to_string()
                },
                last_sync: state
                    .as_ref()
                    .map(|s| crate::ops::clock::rfc3339(s.last_sync)),
                last_changes: state.as_ref().map(|s| {
                    let (c, p, k) = s.report.changes();
                    json!({"central": c, "peer": p, "conflicts": k})
                }),
                unapplied: state
                    .as_ref()
                    .map_or(0, |s| s.report.tables.iter().map(|t| t.deferred).sum()),
                skipped_tables: state.map(|s| s.report.skipped_tables).unwrap_or_default(),
                conflicts: all_conflicts
                    .iter()
                    .filter(|c| {
                        &c.database == name
                            && &c.peer == peer_name
                            && !matches!(
                                c.kind,
                                crate::conflicts::ConflictKind::File
                                    | crate::conflicts::ConflictKind::Json
                            )
                    })
                    .count(),
                last_error,
                newest_backup: backups
                    .iter()
                    .rfind(|b| b.target == "central")
                    .map(|b| crate::ops::clock::rfc3339(b.time)),
            });
        }
    }
    Ok(out)
}

/// Closes conflict `id` by writing one of its row images (`central`, `peer` or `base`)
/// into the central copy (backup first), from where the next sync carries it to every
/// peer; or, with `side` `None`, closes it without changing data.
pub fn resolve(run: &mut JobRun, id: &str, side: Option<&str>) -> Result<String> {
    let ctx = run.ctx;
    let record = conflicts::find_open(ctx, id)?;
    if record.new_key.is_some() && side.is_some() {
        anyhow::bail!(
            "conflict {id} is a rekey: both rows were kept (the peer's under key {}), so there \
             is no side to keep. Try: update anything outside the database that holds the old \
             id, then cr0sync db resolve {id} --ack",
            record
                .new_key
                .as_ref()
                .map(|k| k.to_string())
                .unwrap_or_default()
        );
    }
    if matches!(
        record.kind,
        crate::conflicts::ConflictKind::File | crate::conflicts::ConflictKind::Json
    ) && side.is_some()
    {
        anyhow::bail!(
            "conflict {id} is in file tree {} (file {}): --keep writes database rows only. \
             Try: copy the content you want into the central directory's file (a losing file \
             is kept at the path in the record's result), let the next sync carry it to every \
             side, then cr0sync db resolve {id} --ack",
            record.database,
            record.key
        );
    }
    let Some(side) = side else {
        if !run.dry_run {
            conflicts::close(ctx, &[closing(id, "ack", run.now)])?;
        }
        return Ok(format!("conflict {id} closed; no data changed"));
    };
    let image = match side {
        "central" => &record.rows.central,
        "peer" => &record.rows.peer,
        _ => &record.rows.base,
    };
    let name = &record.database;
    let central = ctx.layout.central_db(name);
    let what = match image {
        Some(row) => format!("row {row}"),
        None => "deletion".to_string(),
    };
    if run.dry_run {
        return Ok(format!(
            "conflict {id}: would write the {side} {what} into table {} of {}",
            record.table,
            central.display()
        ));
    }
    let want = match image {
        Some(v) => {
            Some(row_from_json(v).with_context(|| format!("conflict {id}: row {v} is not a row"))?)
        }
        None => None,
    };
    let key = row_from_json(&record.key)
        .with_context(|| format!("conflict {id}: key {} is not a primary key", record.key))?;
    let taken = backup::take(ctx, name, "central", &central, run.now)?;
    let conn = open_for_merge(&central, ctx.config.general.busy_timeout.0)?;
    let schema = snapshot::schemas(&conn, "main")?
        .into_iter()
        .find(|s| s.name == record.table)
        .with_context(|| {
            format!(
                "table {} no longer exists in {}",
                record.table,
                central.display()
            )
        })?;
    let spec = schema.spec(&[], "");
    if want.as_ref().is_some_and(|r| r.len() != spec.columns.len()) || !spec.keyed() {
        anyhow::bail!(
            "conflict {id}: table {} of {} has changed shape since it was recorded; the row \
             cannot be put back as it is. Try: write it by hand from cr0sync db conflicts \
             --json, then cr0sync db resolve {id} --ack",
            record.table,
            central.display()
        );
    }
    let now = snapshot::lookup(&conn, &snapshot::lookup_sql(&spec, "main"), &key)?;
    if let Some(change) = merge::change(&key, now.as_ref(), want.as_ref()) {
        let tx =
            rusqlite::Transaction::new_unchecked(&conn, rusqlite::TransactionBehavior::Immediate)?;
        let applied = apply(&tx, "main", &spec, &[change])
            .with_context(|| format!("cannot write {}", central.display()))?;
        if !applied.skipped.is_empty() {
            anyhow::bail!(
                "conflict {id}: the central copy {} refused the {side} row (a constraint of the \
                 table, see the log); nothing changed. Try: resolve it by hand, then --ack",
                central.display()
            );
        }
        tx.commit()?;
    }
    conflicts::close(ctx, &[closing(id, &format!("keep-{side}"), run.now)])?;
    Ok(format!(
        "conflict {id}: the {side} {what} is in table {} of {} (backup {}); the next sync \
         carries it to every peer",
        record.table,
        central.display(),
        taken.display()
    ))
}

/// Closes every open conflict without changing data.
pub fn ack_all(run: &mut JobRun) -> Result<String> {
    let open = conflicts::open(run.ctx)?;
    if !run.dry_run {
        let closings: Vec<_> = open
            .iter()
            .map(|r| closing(&r.id, "ack", run.now))
            .collect();
        conflicts::close(run.ctx, &closings)?;
    }
    Ok(format!(
        "{} open conflict(s) closed; no data changed",
        open.len()
    ))
}

fn closing(id: &str, action: &str, now: DateTime<Utc>) -> conflicts::Closing {
    conflicts::Closing {
        id: id.to_string(),
        time: now,
        action: action.to_string(),
    }
}

/// The `databases` section of `status`.
pub fn section(ctx: &Context) -> Result<Section> {
    let pairs = pair_statuses(ctx)?;
    let mut table = Table::new(["DATABASE", "PEER", "LAST SYNC", "CONFLICTS", "STATE"]);
    let mut problems = Vec::new();
    for p in &pairs {
        let state = if let Some(e) = &p.last_error {
            problems.push(format!("database {}/{}: {e}", p.database, p.peer));
            paint("error", Tone::Bad)
        } else if p.last_sync.is_none() {
            paint("never synced", Tone::Warn)
        } else if p.unapplied > 0 {
            problems.push(format!(
                "database {}/{}: the last sync left {} row(s) unapplied (changed meanwhile, \
                 or refused by the database: see logs/cron_database_sync.log); the sides \
                 differ until they apply. Try: cr0sync db sync --db {} --peer {}",
                p.database, p.peer, p.unapplied, p.database, p.peer
            ));
            paint(&format!("{} row(s) unapplied", p.unapplied), Tone::Warn)
        } else if !p.skipped_tables.is_empty() {
            for t in &p.skipped_tables {
                problems.push(format!(
                    "database {}/{}: table {} is not synced: {}",
                    p.database, p.peer, t.table, t.reason
                ));
            }
            paint(
                &format!("{} table(s) skipped", p.skipped_tables.len()),
                Tone::Warn,
            )
        } else {
            paint("ok", Tone::Good)
        };
        table.row([
            p.database.clone(),
            p.peer.clone(),
            p.last_sync.clone().unwrap_or_else(|| "-".into()),
            p.conflicts.to_string(),
            state,
        ]);
    }
    let open: usize = pairs.iter().map(|p| p.conflicts).sum();
    if open > 0 {
        problems.push(format!(
            "database: {open} open conflict(s): a policy chose a winner and the losing values \
             are recorded. Try: cr0sync db conflicts, then cr0sync db resolve ID --keep \
             central|peer|base (or --ack to keep what the policy chose)"
        ));
    }
    Ok(Section {
        key: "databases",
        title: "Databases",
        json: serde_json::to_value(&pairs)?,
        table,
        problems,
    })
}

/// The per-table lines of `db sync`.
pub fn sync_table(reports: &[PairReport]) -> Table {
    let mut t = Table::new([
        "DATABASE",
        "PEER",
        "TABLE",
        "CENTRAL",
        "PEER",
        "CONFLICTS",
        "NOTE",
    ]);
    for r in reports {
        // A line about the pair as a whole.
        let mut note = |text: &str| {
            t.row([r.database.as_str(), r.peer.as_str(), "-", "", "", "", text]);
        };
        if r.unchanged {
            note("unchanged since the last sync");
            continue;
        }
        if r.created_central {
            note("central copy created from this peer");
        }
        let busy: Vec<_> = r
            .tables
            .iter()
            .filter(|t| {
                t.central != Default::default()
                    || t.peer != Default::default()
                    || t.conflicts + t.counter_merges + t.deferred > 0
            })
            .collect();
        if busy.is_empty() && !r.created_central {
            note("in sync");
        }
        for tr in busy {
            let note = if tr.deferred > 0 {
                format!(
                    "{} row(s) changed meanwhile, left for the next run",
                    tr.deferred
                )
            } else if tr.counter_merges > 0 {
                format!("{} counter merge(s)", tr.counter_merges)
            } else {
                String::new()
            };
            t.row([
                r.database.clone(),
                r.peer.clone(),
                tr.table.clone(),
                counts(&tr.central),
                counts(&tr.peer),
                tr.conflicts.to_string(),
                note,
            ]);
        }
        for s in &r.skipped_tables {
            t.row([
                &r.database,
                &r.peer,
                &s.table,
                "",
                "",
                "",
                &format!("skipped: {}", s.reason),
            ]);
        }
        for b in &r.backups {
            t.row([
                r.database.clone(),
                r.peer.clone(),
                "-".into(),
                String::new(),
                String::new(),
                String::new(),
                format!("backup {}", b.display()),
            ]);
        }
    }
    t
}

fn counts(c: &crate::db::merge::Counts) -> String {
    format!("+{} ~{} -{}", c.inserts, c.updates, c.deletes)
}
