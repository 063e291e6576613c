//! The one connection a sync works through (central copy as `main`, the peer's snapshot
//! as `p`, the merge base as `b`), the second read-only one for large diffs, and the
//! exclusive lock on the central copy.

use std::path::Path;

use anyhow::{Context as _, Result};
use rusqlite::{Connection, TransactionBehavior};

use super::Pair;
use crate::db::apply::open_for_merge;
use crate::db::journal;
use crate::fsutil;
use crate::ops::fault;

pub(super) fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path is not UTF-8: {}", p.display()))
}

/// Opens the central copy for writing (never creating it) in rollback-journal mode, which
/// the atomic commit with the base needs. The central copy is cr0sync's own file.
pub(super) fn open_central(path: &Path, busy: std::time::Duration) -> Result<Connection> {
    let conn = open_for_merge(path, busy)
        .with_context(|| format!("cannot open the central copy {}", path.display()))?;
    let mode: String = conn
        .query_row("PRAGMA main.journal_mode", [], |r| r.get(0))
        .with_context(|| {
            format!(
                "the central copy {} is damaged or not a database. Try: cr0sync db restore",
                path.display()
            )
        })?;
    if mode.eq_ignore_ascii_case("wal") {
        let _: String = conn.query_row("PRAGMA main.journal_mode = DELETE", [], |r| r.get(0))?;
    }
    Ok(conn)
}

/// Snapshots at least this large diff on two connections (below it, opening the second
/// costs more than it saves).
pub(super) const PARALLEL_DIFF_BYTES: u64 = 8 << 20;

/// A read-only connection to the same central copy, snapshot (`p`) and base (`b`) as
/// `conn`, for reading beside it on another thread.
pub(super) fn open_reader(conn: &Connection) -> Result<Connection> {
    let files: Vec<(String, String)> = conn
        .prepare("SELECT name, file FROM pragma_database_list WHERE name IN ('main', 'p', 'b')")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let main = files
        .iter()
        .find(|(n, _)| n == "main")
        .map(|(_, f)| f.clone())
        .unwrap_or_default();
    let reader = Connection::open_with_flags(
        &main,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    for (name, file) in files.iter().filter(|(n, _)| n != "main") {
        // An in-memory base (a dry run's) has no file: the reader gets an empty one too.
        let file = if file.is_empty() { ":memory:" } else { file };
        reader.execute(&format!("ATTACH ?1 AS {name}"), [file])?;
    }
    Ok(reader)
}

/// Takes the exclusive lock on the central copy and the base for one transaction. A copy
/// held busy past `busy_timeout` is one clear error naming it and who holds it.
pub(super) fn lock_central<'c>(
    conn: &'c Connection,
    path: &Path,
) -> Result<rusqlite::Transaction<'c>> {
    rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Exclusive).map_err(|e| {
        let busy = matches!(
            &e,
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DatabaseBusy
        );
        if busy {
            let holders = fsutil::lock_holders(path);
            let who = if holders.is_empty() {
                String::new()
            } else {
                format!(" (held by {})", holders.join(", "))
            };
            anyhow::anyhow!(
                "the central copy {} is busy{who}: it stayed locked past busy_timeout; nothing \
                 was written. Try: let the process holding it finish (the next run syncs), or \
                 raise [general] busy_timeout",
                path.display()
            )
        } else {
            anyhow::Error::new(e)
                .context(format!("cannot lock the central copy {}", path.display()))
        }
    })
}

impl Pair<'_> {
    /// Step 3: one connection with the central copy as `main`, the snapshot as `p` and
    /// the merge base as `b`. A base that is not a database is set aside (see below).
    pub(super) fn open(&self, snap: &Path) -> Result<Connection> {
        let (ctx, opts, busy, now) = (self.ctx, self.opts, self.busy, self.now);
        let (name, peer_name) = (self.name, self.peer_name);
        let base_path = &self.base_path;
        let mut conn = open_central(&self.central_path, busy)?;
        if fault::is_armed("during-central-commit") {
            conn.commit_hook(Some(|| fault::point("during-central-commit").is_err()))?;
        }
        conn.execute("ATTACH ?1 AS p", [path_str(snap)?])
            .with_context(|| format!("cannot open the snapshot {}", snap.display()))?;
        if opts.dry_run && !base_path.exists() {
            conn.execute_batch("ATTACH ':memory:' AS b")?;
        } else {
            if !base_path.exists() {
                // ATTACH inherits the central connection's no-create flag: create it here.
                if let Some(dir) = base_path.parent() {
                    fsutil::ensure_dir(dir, &ctx.perms)
                        .with_context(|| format!("cannot create directory {}", dir.display()))?;
                }
                Connection::open(base_path)?.close().map_err(|(_, e)| e)?;
                ctx.perms.apply_file(base_path)?;
            }
            let attached = conn.execute("ATTACH ?1 AS b", [path_str(base_path)?]);
            let not_a_database = matches!(
                &attached,
                Err(rusqlite::Error::SqliteFailure(f, _))
                    if f.code == rusqlite::ErrorCode::NotADatabase
                        || f.code == rusqlite::ErrorCode::DatabaseCorrupt
            );
            if !not_a_database {
                attached.with_context(|| {
                    format!("cannot open the merge base {}", base_path.display())
                })?;
            }
            // A merge base that is not a database (garbage, a damaged header) is set aside and
            // the pair merged as a first sync: every row of either side is kept, differing
            // rows are recorded as conflicts. (Never a reset to one side: that would delete
            // rows other peers already synced.) With a journal pending, its completion needs
            // the base's record of what committed, so the run stops instead.
            let readable = !not_a_database
                && conn
                    .query_row("SELECT count(*) FROM b.sqlite_schema", [], |r| {
                        r.get::<_, i64>(0)
                    })
                    .is_ok();
            if !readable && opts.dry_run {
                // A dry run changes nothing: it shows the merge the next run will make.
                if !not_a_database {
                    conn.execute_batch("DETACH b")?;
                }
                conn.execute_batch("ATTACH ':memory:' AS b")?;
                log::warn!(
                    "{name}/{peer_name}: the merge base is unreadable; the next run sets it aside \
                     and merges the pair as a first sync"
                );
            }
            if !readable && !opts.dry_run {
                let journal_pending = ctx.state.path(&journal::name(name, peer_name)).exists();
                let aside = base_path
                    .with_extension(format!("db.unreadable-{}", now.format("%Y%m%dT%H%M%SZ")));
                if journal_pending {
                    anyhow::bail!(
                        "the merge base {} is unreadable and an interrupted sync of this pair is \
                         waiting to be completed from it; nothing was written. Try: restore the \
                         base from a copy if you have one; otherwise move it aside (mv {} {}) and \
                         remove {} : the next run merges the pair as a first sync, keeping every \
                         row and recording differing ones as conflicts",
                        base_path.display(),
                        base_path.display(),
                        aside.display(),
                        ctx.state.path(&journal::name(name, peer_name)).display()
                    );
                }
                if !not_a_database {
                    conn.execute_batch("DETACH b")?;
                }
                std::fs::rename(base_path, &aside).with_context(|| {
                    format!(
                        "cannot move the unreadable merge base {} aside",
                        base_path.display()
                    )
                })?;
                Connection::open(base_path)?.close().map_err(|(_, e)| e)?;
                ctx.perms.apply_file(base_path)?;
                conn.execute("ATTACH ?1 AS b", [path_str(base_path)?])
                    .with_context(|| {
                        format!("cannot open the merge base {}", base_path.display())
                    })?;
                log::warn!(
                    "{name}/{peer_name}: the merge base was unreadable; it is kept as {} and the \
                     pair is merged as a first sync (rows on either side are kept, differing rows \
                     are recorded as conflicts)",
                    aside.display()
                );
            }
        }
        Ok(conn)
    }
}
