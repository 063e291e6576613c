//! The one connection a sync works through (central copy as `main`, the peer's snapshot
//! as `p`, the merge base as `b`), the second read-only one for large diffs, and the
//! exclusive lock on the central copy.

use std::path::Path;

use anyhow::{Context as _, Result};
use rusqlite::{Connection, TransactionBehavior};

use crate::db::apply::open_for_merge;
use crate::fsutil;

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
