//! Reading a database without harming it: a consistent snapshot through
//! SQLite's online backup API, then schema and rows read from the snapshot.
//!
//! Invariants:
//! - A live database is never copied as a file: the backup API copies every page in one
//!   step (`sqlite3_backup_step(-1)`), under one read lock, including commits still in the
//!   `-wal`. The source is opened read-only, so its journal mode and schema are never
//!   changed, and the read lock is held only for the copy, not for the diff. The one
//!   exception is SQLite's own recovery: a hot journal left by a writer that died must be
//!   rolled back by a read-write connection before anyone can read (no create, no write).
//! - A copy is scratch and written without fsync (a crash loses only scratch); whoever
//!   keeps one as a file syncs it before renaming it into place.
//! - A busy source is retried until `busy_timeout`, then reported naming the file.
//! - A missing file is an error naming it; it is never created (read-only open).
//! - SQLite's own tables (`sqlite_%`) are never listed.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use crate::db::merge::TableSpec;
use crate::db::value::{Cell, Row};

/// A table's shape as SQLite reports it: what must agree on every side for it to merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    pub name: String,
    /// `(name, declared type)` in column order.
    pub columns: Vec<(String, String)>,
    /// Primary-key column indices in key order; empty if none is declared.
    pub pk: Vec<usize>,
}

impl Schema {
    pub fn spec(&self, counters: &[String], updated_at: &str) -> TableSpec {
        let index = |name: &str| self.columns.iter().position(|(c, _)| c == name);
        TableSpec {
            name: self.name.clone(),
            columns: self.columns.iter().map(|(c, _)| c.clone()).collect(),
            pk: self.pk.clone(),
            counters: counters.iter().filter_map(|c| index(c)).collect(),
            updated_at: index(updated_at),
        }
    }
}

/// Copies the database at `path` into a new file at `dest` (replaced if present) in one
/// step. `dest` is scratch space the caller removes; it is never a live database. It is
/// written without fsync: a caller that keeps it syncs it (`fsutil::atomic_replace_with`).
pub fn snapshot_to(path: &Path, dest: &Path, busy_timeout: Duration) -> Result<()> {
    snapshot_with(path, dest, busy_timeout, false)
}

/// [`snapshot_to`] into a copy kept between runs (`kept`, any content, or none): a
/// database in rollback-journal mode is compared with it block by block and only the
/// blocks that differ are written, so an unchanged region costs two reads and no new
/// file, disk block or page-cache page. Every byte is compared, so a copy torn by a stop
/// or edited by a sync is repaired like any other difference. Other databases are copied
/// afresh, as by `snapshot_to`.
pub fn snapshot_kept(path: &Path, kept: &Path, busy_timeout: Duration) -> Result<()> {
    snapshot_with(path, kept, busy_timeout, true)
}

fn snapshot_with(path: &Path, dest: &Path, busy_timeout: Duration, keep: bool) -> Result<()> {
    // A journal beside the copy (left by a stopped run that edited it) would be rolled
    // back into the new copy when SQLite opens it: it goes first.
    let dest_files = |with_main: bool| {
        let mut files: Vec<std::path::PathBuf> = ["-journal", "-wal", "-shm"]
            .iter()
            .map(|s| crate::util::with_suffix(dest, s))
            .collect();
        if with_main {
            files.push(dest.to_path_buf());
        }
        files
    };
    for file in dest_files(!keep) {
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", file.display()));
            }
            _ => {}
        }
    }
    let copied = copy_file_locked(path, dest, busy_timeout).unwrap_or(false);
    if !copied {
        let _ = std::fs::remove_file(dest);
    }
    let mut out = Connection::open(dest)
        .with_context(|| format!("cannot create snapshot {}", dest.display()))?;
    // The copy is a private file: exclusive locking (so a WAL header copied from the
    // source never needs a `-shm` file), then rollback-journal mode for its readers.
    let _: String = out
        .query_row("PRAGMA locking_mode = EXCLUSIVE", [], |r| r.get(0))
        .with_context(|| format!("cannot create snapshot {}", dest.display()))?;
    out.pragma_update(None, "synchronous", "OFF")?;
    if !copied {
        copy_into(path, &mut out, busy_timeout)?;
    }
    // The copy is read here for the first time: a malformed schema or page is the source's.
    let mode = out.query_row("PRAGMA journal_mode = DELETE", [], |r| {
        r.get::<_, String>(0)
    });
    if let Err(rusqlite::Error::SqliteFailure(f, m)) = &mode
        && matches!(
            f.code,
            rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
        )
    {
        anyhow::bail!(
            "cannot read database {}: {} (damaged: its copy cannot be read). Try: check it \
             with sqlite3 (PRAGMA integrity_check); restore it from backups/ with cr0sync db \
             restore if it is damaged",
            path.display(),
            m.clone().unwrap_or_else(|| f.to_string())
        );
    }
    mode.with_context(|| format!("cannot write snapshot {}", dest.display()))?;
    out.close().map_err(|(_, e)| e)?;
    Ok(())
}

/// The fast route of `snapshot_to` for a database in rollback-journal mode: its file
/// copied by the kernel (`copy_file_range`) while a read transaction holds SQLite's shared
/// lock, under which no writer can change the file. Returns `false` (nothing copied; the
/// caller uses the backup API, which also names any error) for a database in WAL mode,
/// whose commits may still be in the `-wal`, or one whose header disagrees with its size.
fn copy_file_locked(path: &Path, dest: &Path, busy_timeout: Duration) -> Result<bool> {
    use std::os::unix::fs::FileExt as _;
    if crate::fsutil::special_kind(path).is_some() {
        return Ok(false);
    }
    // Never closed: closing a descriptor would drop SQLite's lock (see `fsutil::pinned`).
    let file = crate::fsutil::pinned(path)?;
    let src = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    src.busy_timeout(busy_timeout)?;
    src.execute_batch("BEGIN")?;
    src.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
        r.get::<_, i64>(0)
    })?;
    let mut header = [0u8; 100];
    file.read_exact_at(&mut header, 0)?;
    let page_size = crate::db::pages::page_size(&header)?;
    let pages = u32::from_be_bytes([header[28], header[29], header[30], header[31]]);
    // Bytes 18 and 19: 1 is rollback-journal mode, 2 is WAL. The page count is valid when
    // the change counter (bytes 24..28) matches bytes 92..96.
    let legacy = header[18] == 1 && header[19] == 1;
    let size_valid = header[24..28] == header[92..96];
    let len = file.metadata()?.len();
    if !legacy || !size_valid || u64::from(pages) * u64::from(page_size) != len {
        return Ok(false);
    }
    let out = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dest)?
    };
    if out.metadata()?.len() == 0 {
        crate::fsutil::copy_prefix(&file, &out, len)?;
    } else {
        crate::fsutil::patch_prefix(&file, &out, len)?;
    }
    src.execute_batch("COMMIT")?;
    Ok(true)
}

/// Copies attached database `schema` of `conn` into a new file at `dest`, through the
/// connection itself: it works while `conn` holds that database locked.
pub fn copy_schema_to(conn: &Connection, schema: &str, dest: &Path) -> Result<()> {
    match std::fs::remove_file(dest) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", dest.display()));
        }
        _ => {}
    }
    let mut out =
        Connection::open(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    // Scratch for a backup, which is compressed into a synced file of its own.
    out.pragma_update(None, "synchronous", "OFF")?;
    let backup = Backup::new_with_names(conn, schema, &mut out, "main")?;
    // The source is locked by `conn` itself, so one step copies everything.
    match backup.step(-1)? {
        StepResult::Done => {}
        other => anyhow::bail!("the copy did not complete in one step ({other:?})"),
    }
    drop(backup);
    out.close().map_err(|(_, e)| e)?;
    Ok(())
}

/// Copies the database at `path` into memory in one step (for tests).
#[cfg(test)]
pub fn snapshot(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    let mut mem = Connection::open_in_memory()?;
    copy_into(path, &mut mem, busy_timeout)?;
    Ok(mem)
}

fn copy_into(path: &Path, dest: &mut Connection, busy_timeout: Duration) -> Result<()> {
    match copy_once(path, dest, busy_timeout) {
        Err(e) if needs_rollback(&e) => {
            // A writer died mid-transaction (a hot journal). A read-only connection may not
            // roll it back; the first reader with write access must, as the bot itself
            // would. That is SQLite's own recovery: it restores the last committed state
            // and changes nothing else. Then copy again.
            log::warn!(
                "{}: an interrupted transaction left a hot journal; letting SQLite roll it back",
                path.display()
            );
            let rw = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
                .with_context(|| format!("cannot open database {}", path.display()))?;
            rw.busy_timeout(busy_timeout)?;
            rw.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
                r.get::<_, i64>(0)
            })
            .with_context(|| format!("cannot recover database {}", path.display()))?;
            drop(rw);
            copy_once(path, dest, busy_timeout)
        }
        other => other,
    }
}

/// SQLITE_READONLY_ROLLBACK: a hot journal that a read-only connection cannot roll back.
fn needs_rollback(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<rusqlite::Error>(),
            Some(rusqlite::Error::SqliteFailure(f, _)) if f.extended_code == 776
        )
    })
}

fn copy_once(path: &Path, dest: &mut Connection, busy_timeout: Duration) -> Result<()> {
    if !path.exists() {
        anyhow::bail!(
            "database not found: {} (it is never created; check the peer's path)",
            path.display()
        );
    }
    if let Some(kind) = crate::fsutil::special_kind(path) {
        anyhow::bail!(
            "{} is {kind}, not an SQLite database file; nothing was read. Try: point the \
             path at the database file itself",
            path.display()
        );
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        anyhow::bail!(
            "{} is an empty file (0 bytes), not an SQLite database; nothing was read. Try: \
             point the path at the application's database, or restore it from backups/",
            path.display()
        );
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let src = Connection::open_with_flags(path, flags)
        .with_context(|| format!("cannot open database {}", path.display()))?;
    src.busy_timeout(busy_timeout)?;
    let deadline = Instant::now() + busy_timeout;
    let dest_name = dest.path().unwrap_or("memory").to_string();
    let backup = Backup::new(&src, dest)
        .with_context(|| format!("cannot read database {}", path.display()))?;
    loop {
        match backup.step(-1) {
            Ok(StepResult::Done) => return Ok(()),
            Ok(StepResult::More) => continue,
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(_) => anyhow::bail!(
                "database is busy: {} (still locked after busy_timeout {:?}). Try: raise \
                 [general] busy_timeout",
                path.display(),
                busy_timeout
            ),
            // The copy's own disk is full: the source is fine, and must not be blamed.
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::DiskFull =>
            {
                anyhow::bail!(
                    "cannot copy database {} into {dest_name}: No space left on device (the disk \
                     holding the copy is full; the database itself is fine). Try: free space \
                     on that filesystem; nothing was written",
                    path.display()
                );
            }
            // Damaged: only what SQLite itself calls damaged is blamed on the file.
            Err(rusqlite::Error::SqliteFailure(f, m))
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt
                ) =>
            {
                anyhow::bail!(
                    "cannot read database {}: {} (damaged, or not an SQLite database). Try: \
                     check it with sqlite3 (PRAGMA integrity_check); restore it from backups/ \
                     with cr0sync db restore if it is damaged",
                    path.display(),
                    m.unwrap_or_else(|| f.to_string())
                );
            }
            Err(e) => {
                let dir = path.parent().unwrap_or(Path::new("."));
                return Err(e).with_context(|| {
                    format!(
                        "cannot read database {} (the file itself may be fine: a database in \
                         WAL mode needs its -shm file, which SQLite creates in {} if this user \
                         may write there). Try: let the user running cr0sync write {} or read \
                         the -wal and -shm files, or run cr0sync as the database's owner",
                        path.display(),
                        dir.display(),
                        dir.display()
                    )
                });
            }
        }
    }
}

/// `SELECT` of one row of `db.<spec.name>` by primary key (cells compared with `IS`, so
/// a NULL key cell matches), for [`lookup`].
pub fn lookup_sql(spec: &TableSpec, db: &str) -> String {
    let cols: Vec<String> = spec.columns.iter().map(|c| quote(c)).collect();
    let key: Vec<String> = spec
        .pk
        .iter()
        .enumerate()
        .map(|(i, &c)| format!("{} IS ?{}", cols[c], i + 1))
        .collect();
    format!(
        "SELECT {} FROM {db}.{} WHERE {}",
        cols.join(", "),
        quote(&spec.name),
        key.join(" AND ")
    )
}

/// The row with primary key `key`, through a statement from [`lookup_sql`].
pub fn lookup(conn: &Connection, sql: &str, key: &[Cell]) -> Result<Option<Row>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(key.iter()))?;
    let Some(r) = rows.next()? else {
        return Ok(None);
    };
    let n = r.as_ref().column_count();
    Ok(Some(
        (0..n)
            .map(|i| r.get::<_, Cell>(i))
            .collect::<Result<Row, _>>()?,
    ))
}

/// The ordinary tables of attached database `db` (`main`, or an ATTACH name), with
/// schemas. SQLite's own tables, cr0sync's (`_cr0sync%`), virtual tables and their shadow
/// tables (the storage of an FTS or R*Tree index, which is never merged row by row) are
/// not listed.
pub fn schemas(conn: &Connection, db: &str) -> Result<Vec<Schema>> {
    let mut stmt = conn.prepare(
        "SELECT name FROM pragma_table_list WHERE schema = ?1 AND type = 'table' AND name NOT \
         LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE '\\_cr0sync%' ESCAPE '\\' ORDER BY name",
    )?;
    let names: Vec<String> = stmt
        .query_map([db], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    names
        .into_iter()
        .map(|name| schema_of(conn, db, &name))
        .collect()
}

/// A virtual table (FTS, R*Tree, ...) of a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualTable {
    pub name: String,
    /// The module: `fts5`, `rtree`, ...
    pub module: String,
    /// For an external-content FTS index, its content table.
    pub content: Option<String>,
    /// An FTS index without a `content=` option, or an R*Tree: it holds its own rows,
    /// which merge through the virtual table by rowid (see [`virtual_schema`]).
    pub own_content: bool,
}

/// The virtual tables of attached database `db`.
pub fn virtual_tables(conn: &Connection, db: &str) -> Result<Vec<VirtualTable>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT l.name, s.sql FROM pragma_table_list AS l JOIN {db}.sqlite_schema AS s \
         ON s.name = l.name WHERE l.schema = ?1 AND l.type = 'virtual' ORDER BY l.name"
    ))?;
    let rows = stmt.query_map([db], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (name, sql) = row?;
        let module = module_of(&sql);
        let own_content = matches!(
            module.as_str(),
            "fts3" | "fts4" | "fts5" | "rtree" | "rtree_i32"
        ) && content_value(&sql).is_none();
        out.push(VirtualTable {
            name,
            module,
            content: content_option(&sql),
            own_content,
        });
    }
    Ok(out)
}

/// `fts5` of `CREATE VIRTUAL TABLE x USING fts5(...)`.
fn module_of(sql: &str) -> String {
    let lower = sql.to_ascii_lowercase();
    lower
        .find(" using ")
        .map(|i| {
            lower[i + 7..]
                .trim_start()
                .split(|c: char| c == '(' || c.is_whitespace())
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
}

/// The shape of a virtual table that holds its own rows, as a keyed table: an FTS index
/// is keyed by its rowid (a leading `rowid` column, which SQLite resolves to the rowid in
/// every statement), an R*Tree by its first column, which is its rowid.
pub fn virtual_schema(conn: &Connection, db: &str, v: &VirtualTable) -> Result<Schema> {
    let mut s = schema_of(conn, db, &v.name)?;
    if v.module.starts_with("fts") {
        s.columns.insert(0, ("rowid".into(), "INTEGER".into()));
    }
    s.pk = vec![0];
    Ok(s)
}

/// The table named by an FTS `content=` option, if it names one (`content=''` is a
/// contentless index, not an external-content one).
fn content_option(sql: &str) -> Option<String> {
    content_value(sql).filter(|v| !v.is_empty())
}

/// The value of a `content=` option, if there is one (`""` for a contentless index).
fn content_value(sql: &str) -> Option<String> {
    let lower = sql.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let mut from = 0;
    while let Some(at) = lower[from..].find("content") {
        let start = from + at;
        let end = start + "content".len();
        from = end;
        let word_start =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let rest = sql[end..].trim_start();
        if !word_start || !rest.starts_with('=') {
            continue;
        }
        let value = rest[1..].trim_start();
        let value = value
            .trim_start_matches(['\'', '"', '`', '['])
            .split(['\'', '"', '`', ']', ',', ')'])
            .next()
            .unwrap_or_default()
            .trim();
        return Some(value.to_string());
    }
    None
}

fn schema_of(conn: &Connection, db: &str, table: &str) -> Result<Schema> {
    let mut stmt = conn.prepare(&format!("PRAGMA {db}.table_info({})", quote(table)))?;
    let mut columns = Vec::new();
    let mut pk: Vec<(i64, usize)> = Vec::new();
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(5)?,
        ))
    })?;
    for (i, row) in rows.enumerate() {
        let (name, ty, pk_pos) = row?;
        if pk_pos > 0 {
            pk.push((pk_pos, i));
        }
        columns.push((name, ty));
    }
    pk.sort();
    Ok(Schema {
        name: table.to_string(),
        columns,
        pk: pk.into_iter().map(|(_, i)| i).collect(),
    })
}

/// Every row of a table, all columns in table order.
pub fn rows(conn: &Connection, db: &str, schema: &Schema) -> Result<Vec<Row>> {
    let cols: Vec<String> = schema.columns.iter().map(|(c, _)| quote(c)).collect();
    let sql = format!(
        "SELECT {} FROM {db}.{}",
        cols.join(", "),
        quote(&schema.name)
    );
    let mut stmt = conn.prepare(&sql)?;
    let n = cols.len();
    let rows = stmt.query_map([], |r| {
        (0..n)
            .map(|i| r.get::<_, Cell>(i))
            .collect::<Result<Row, _>>()
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// An SQL identifier, quoted.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fts_content_options_are_read() {
        assert_eq!(
            content_option(
                "CREATE VIRTUAL TABLE f USING fts5(a, content='posts', content_rowid='id')"
            ),
            Some("posts".into())
        );
        assert_eq!(
            content_option("CREATE VIRTUAL TABLE f USING fts4(a, content=\"posts\")"),
            Some("posts".into())
        );
        assert_eq!(
            content_option("CREATE VIRTUAL TABLE f USING fts5(a, content='')"),
            None
        );
        assert_eq!(
            content_option("CREATE VIRTUAL TABLE f USING fts5(a, b)"),
            None
        );
        assert_eq!(
            module_of("CREATE VIRTUAL TABLE r USING rtree(id, x0, x1)"),
            "rtree"
        );
    }

    fn make_db(path: &Path, journal: &str) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", journal).unwrap();
        conn.execute_batch(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, nick TEXT, data BLOB);
             CREATE TABLE scores (net TEXT, nick TEXT, score INTEGER, PRIMARY KEY (nick, net));
             CREATE TABLE seen (nick TEXT);
             INSERT INTO users VALUES (1, 'alice', x'00ff'), (2, NULL, NULL);
             INSERT INTO seen VALUES ('a'), ('a');",
        )
        .unwrap();
        conn
    }

    #[test]
    fn snapshot_sees_uncheckpointed_wal_commits_and_keeps_journal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bot.db");
        let writer = make_db(&path, "wal");
        // Disable checkpoints so the commit stays in the -wal only.
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        writer
            .execute("INSERT INTO users VALUES (3, 'carol', NULL)", [])
            .unwrap();
        let snap = snapshot(&path, Duration::from_secs(1)).unwrap();
        let users = schemas(&snap, "main")
            .unwrap()
            .into_iter()
            .find(|s| s.name == "users")
            .unwrap();
        assert_eq!(rows(&snap, "main", &users).unwrap().len(), 3);
        let mode: String = writer
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    /// A kept copy becomes the source byte for byte whatever it held (longer, shorter,
    /// garbage, a journal beside it), and only the blocks that differ are written.
    #[test]
    fn a_kept_copy_is_patched_to_the_source_whatever_it_held() {
        let dir = tempfile::tempdir().unwrap();
        let busy = Duration::from_secs(1);
        let src = dir.path().join("bot.db");
        let conn = make_db(&src, "delete");
        conn.execute_batch(
            "CREATE TABLE big (id INTEGER PRIMARY KEY, v TEXT);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)
             INSERT INTO big SELECT i, printf('%0100d', i) FROM n;",
        )
        .unwrap();
        let kept = dir.path().join("bot.snapshot.db");
        let journal = crate::util::with_suffix(&kept, "-journal");
        let same = |kept: &Path| std::fs::read(&src).unwrap() == std::fs::read(kept).unwrap();
        let len = std::fs::metadata(&src).unwrap().len();
        for held in [
            Vec::new(),
            vec![7u8; usize::try_from(len).unwrap() * 2],
            vec![0u8; 5000],
        ] {
            std::fs::write(&kept, &held).unwrap();
            std::fs::write(&journal, b"not a journal of this copy").unwrap();
            snapshot_kept(&src, &kept, busy).unwrap();
            assert!(same(&kept));
            assert!(!journal.exists());
        }
        // One row changed: one page differs, and the copy follows.
        conn.execute("UPDATE big SET v = 'x' WHERE id = 1500", [])
            .unwrap();
        let file = std::fs::File::open(&src).unwrap();
        let out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&kept)
            .unwrap();
        let written = crate::fsutil::patch_prefix(&file, &out, len).unwrap();
        assert!(
            written > 0 && written <= 3 * 4096,
            "{written} bytes written"
        );
        assert!(same(&kept));
        snapshot_kept(&src, &kept, busy).unwrap();
        assert!(same(&kept));
    }

    #[test]
    fn a_rollback_journal_database_is_copied_as_a_file_and_a_wal_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let busy = Duration::from_secs(1);
        let legacy = dir.path().join("legacy.db");
        drop(make_db(&legacy, "delete"));
        let copy = dir.path().join("legacy.copy.db");
        assert!(copy_file_locked(&legacy, &copy, busy).unwrap());
        assert_eq!(
            std::fs::read(&legacy).unwrap(),
            std::fs::read(&copy).unwrap()
        );
        // While a writer holds the file locked for its commit, the copy waits, then gives up
        // (the backup route names the busy file).
        let writer = Connection::open(&legacy).unwrap();
        writer.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let again = dir.path().join("legacy.again.db");
        assert!(copy_file_locked(&legacy, &again, Duration::from_millis(50)).is_err());
        assert!(!again.exists());
        writer.execute_batch("ROLLBACK").unwrap();

        let wal = dir.path().join("wal.db");
        let writer = make_db(&wal, "wal");
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        writer
            .execute("INSERT INTO users VALUES (3, 'carol', NULL)", [])
            .unwrap();
        let copy = dir.path().join("wal.copy.db");
        assert!(!copy_file_locked(&wal, &copy, busy).unwrap());
        assert!(!copy.exists());
        // Through `snapshot_to` both hold every committed row.
        for (src, dest) in [(&legacy, "a.db"), (&wal, "b.db")] {
            let dest = dir.path().join(dest);
            snapshot_to(src, &dest, busy).unwrap();
            let n: i64 = Connection::open(&dest)
                .unwrap()
                .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, if src == &wal { 3 } else { 2 });
        }
    }

    #[test]
    fn schemas_list_columns_and_composite_keys_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        drop(make_db(&path, "delete"));
        let snap = snapshot(&path, Duration::from_secs(1)).unwrap();
        let s = schemas(&snap, "main").unwrap();
        let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["scores", "seen", "users"]);
        assert_eq!(s[0].pk, vec![1, 0], "PRIMARY KEY (nick, net)");
        assert!(s[1].pk.is_empty());
        assert_eq!(s[2].pk, vec![0]);
        let users = rows(&snap, "main", &s[2]).unwrap();
        assert_eq!(
            users[0][2],
            Cell::Sql(rusqlite::types::Value::Blob(vec![0, 0xff]))
        );
        assert!(users[1][1].is_null());
    }

    #[test]
    fn missing_and_garbage_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.db");
        let err = format!("{:#}", snapshot(&missing, Duration::ZERO).unwrap_err());
        assert!(
            err.contains("not found") && err.contains("nope.db"),
            "{err}"
        );
        assert!(!missing.exists(), "never created");
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0xA5u8; 8192]).unwrap();
        let err = format!("{:#}", snapshot(&garbage, Duration::ZERO).unwrap_err());
        assert!(err.contains("garbage.db"), "{err}");
        assert_eq!(
            std::fs::read(&garbage).unwrap(),
            vec![0xA5u8; 8192],
            "left untouched"
        );
    }

    #[test]
    fn busy_rollback_journal_database_times_out_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.db");
        let writer = make_db(&path, "delete");
        // An exclusive transaction blocks readers in rollback-journal mode.
        writer
            .execute_batch("BEGIN EXCLUSIVE; INSERT INTO seen VALUES ('b');")
            .unwrap();
        let err = format!(
            "{:#}",
            snapshot(&path, Duration::from_millis(200)).unwrap_err()
        );
        assert!(err.contains("busy.db"), "{err}");
        writer.execute_batch("COMMIT").unwrap();
        let snap = snapshot(&path, Duration::from_millis(200)).unwrap();
        let seen = schemas(&snap, "main")
            .unwrap()
            .into_iter()
            .find(|s| s.name == "seen")
            .unwrap();
        assert_eq!(rows(&snap, "main", &seen).unwrap().len(), 3);
    }

    #[test]
    fn spec_maps_configured_columns() {
        let s = Schema {
            name: "users".into(),
            columns: vec![
                ("id".into(), "INTEGER".into()),
                ("coins".into(), "INTEGER".into()),
            ],
            pk: vec![0],
        };
        let spec = s.spec(&["coins".into(), "nope".into()], "updated_at");
        assert_eq!(spec.counters, vec![1]);
        assert_eq!(spec.updated_at, None);
    }
}
