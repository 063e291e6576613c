//! The state of one tree: `state/files/<tree>.db`, an SQLite database changed only in
//! transactions, so each step of a sync is recorded whole or not at all.
//!
//! - `base`: per (peer, path), the content both sides agreed on at the last sync (its
//!   SHA-256) and each side's file metadata as seen then (the fast path).
//! - `objects`: content by SHA-256, for files up to `merge_max`: the bases a three-way
//!   merge needs, merge results, and the pre-images a journal refers to.
//! - `journal`: writes decided but not yet known to be done, per (peer, path): for each
//!   side the content it held when the write was decided (`pre`) and what it is to hold
//!   (`res`), and the base once both sides hold their result. Written before any file is
//!   touched; an entry leaves the journal in the same transaction that sets its base.
//! - Contents are dropped when the last reference to them goes: each transaction that
//!   changes the base or the journal of some paths releases, at its end, the contents
//!   those paths referred to before and nothing refers to now.
//! - `outbox`: conflict records decided with the journal, appended to
//!   `state/conflicts.jsonl` afterwards (once: records whose id is there are skipped).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context as _, Result};
use rusqlite::{Connection, OptionalExtension, params};

use crate::files::list::Stat;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS base(
  peer TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL,
  c_size INTEGER, c_mtime INTEGER, c_ctime INTEGER, c_ino INTEGER,
  p_size INTEGER, p_mtime INTEGER, p_ctime INTEGER, p_ino INTEGER,
  seen_ns INTEGER NOT NULL,
  PRIMARY KEY(peer, path)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS objects(sha256 TEXT PRIMARY KEY, content BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS journal(
  peer TEXT NOT NULL, path TEXT NOT NULL, base_after TEXT,
  c_pre TEXT, c_res TEXT, p_pre TEXT, p_res TEXT, source TEXT,
  c_unwritten INTEGER NOT NULL DEFAULT 0, p_unwritten INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY(peer, path)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS base_sha256 ON base(sha256);
CREATE TABLE IF NOT EXISTS outbox(id TEXT PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID;
";

/// A side's file as the base remembers it (size, mtime, ctime, inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub ino: u64,
}

impl Seen {
    pub fn matches(&self, s: &Stat) -> bool {
        (self.size, self.mtime_ns, self.ctime_ns, self.ino)
            == (s.size, s.mtime_ns, s.ctime_ns, s.ino)
    }
}

impl From<&Stat> for Seen {
    fn from(s: &Stat) -> Self {
        Seen {
            size: s.size,
            mtime_ns: s.mtime_ns,
            ctime_ns: s.ctime_ns,
            ino: s.ino,
        }
    }
}

/// One path of the base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseEntry {
    pub sha256: String,
    pub central: Option<Seen>,
    pub peer: Option<Seen>,
    /// When the metadata was taken: a file modified just before is read again
    /// (its mtime may not show a later change).
    pub seen_ns: i128,
}

/// Which side of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Central,
    Peer,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Central => "central",
            Side::Peer => "peer",
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::Central => Side::Peer,
            Side::Peer => Side::Central,
        }
    }

    fn parse(s: &str) -> Option<Side> {
        match s {
            "central" => Some(Side::Central),
            "peer" => Some(Side::Peer),
            _ => None,
        }
    }
}

/// A side's part of a journal entry: content hashes (`None`: no file).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Change {
    pub pre: Option<String>,
    pub res: Option<String>,
    /// Known not written: the file cannot hold the result because of a write of ours, so
    /// a file found holding it got there by the site's own changes (a counter reaching the
    /// same value), and is merged like any other change. Recorded for a write left for the
    /// next run; cleared on record before such a side is written.
    pub unwritten: bool,
}

impl Change {
    pub fn writes(&self) -> bool {
        self.pre != self.res
    }
}

/// A decided write of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub path: String,
    /// The base once both sides hold their result (`None`: the path is gone).
    pub base_after: Option<String>,
    pub central: Change,
    pub peer: Change,
    /// Where a result that is not in `objects` (a large file) is read from.
    pub source: Option<Side>,
}

impl JournalEntry {
    pub fn side(&self, side: Side) -> &Change {
        match side {
            Side::Central => &self.central,
            Side::Peer => &self.peer,
        }
    }

    pub fn side_mut(&mut self, side: Side) -> &mut Change {
        match side {
            Side::Central => &mut self.central,
            Side::Peer => &mut self.peer,
        }
    }
}

/// A path whose base is set once its writes are done.
#[derive(Debug, Clone)]
pub struct Settled {
    pub path: String,
    /// `None`: the path is gone from the base.
    pub entry: Option<BaseEntry>,
}

/// How large the state's write-ahead log grows before SQLite copies it into the database
/// (and the size it is cut back to then).
const WAL_MAX: i64 = 64 << 20;

pub struct Store {
    conn: Connection,
}

fn i64_of(n: i128) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store {
    /// Opens (creating) the tree's state database at `path`.
    pub fn open(path: &Path, busy: std::time::Duration) -> Result<Store> {
        let conn =
            Connection::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        conn.busy_timeout(busy)?;
        // SQLite's default 4 KiB pages: a sync rewrites the pages its rows touch, and a
        // balance file's row is tens of bytes. (A database made with 64 KiB pages by an
        // earlier version keeps them.)
        conn.pragma_update(None, "journal_mode", "wal")?;
        conn.pragma_update(None, "synchronous", "full")?;
        // A sync's transaction can touch thousands of pages: with SQLite's default cache
        // (2 MiB) it spills to the log in several steps.
        conn.pragma_update(None, "cache_size", -16384)?;
        // The log is not copied back into the database when the connection closes: that
        // copy (a checkpoint, with its fsyncs) is left to a minute with nothing to write
        // ([`Store::checkpoint`]), or to SQLite when the log grows past `WAL_MAX`.
        // Durability does not change: a commit is synced to the log.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )?;
        let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        conn.pragma_update(None, "wal_autocheckpoint", WAL_MAX / page.max(512))?;
        conn.pragma_update(None, "journal_size_limit", WAL_MAX)?;
        migrate_objects(&conn).with_context(|| format!("cannot upgrade {}", path.display()))?;
        conn.execute_batch(SCHEMA).with_context(|| {
            format!(
                "{} is damaged. Try: move it aside: the next sync merges the tree as a first \
                 sync (every file of either side is kept, differing ones are recorded as \
                 conflicts)",
                path.display()
            )
        })?;
        Ok(Store { conn })
    }

    /// Copies the log's committed pages into the database and truncates it, for a minute
    /// with nothing else to write. (A log left with frames is read whole by the next
    /// process that opens the database: the cost of the log would only move.)
    pub fn checkpoint(&self) -> Result<()> {
        let wal = self.conn.path().map(|p| format!("{p}-wal"));
        let empty = wal
            .and_then(|w| std::fs::metadata(w).ok())
            .is_none_or(|m| m.len() == 0);
        if !empty {
            let _: (i64, i64, i64) =
                self.conn
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?;
        }
        Ok(())
    }

    /// The base of one peer's pair, by path.
    pub fn base(&self, peer: &str) -> Result<BTreeMap<String, BaseEntry>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT path, sha256, c_size, c_mtime, c_ctime, c_ino, p_size, p_mtime, p_ctime, \
             p_ino, seen_ns FROM base WHERE peer = ?1",
        )?;
        let rows = stmt.query_map([peer], |r| {
            let seen = |i: usize| -> rusqlite::Result<Option<Seen>> {
                let size: Option<i64> = r.get(i)?;
                Ok(match size {
                    None => None,
                    Some(size) => Some(Seen {
                        size: u64::try_from(size).unwrap_or(0),
                        mtime_ns: i128::from(r.get::<_, i64>(i + 1)?),
                        ctime_ns: i128::from(r.get::<_, i64>(i + 2)?),
                        ino: u64::try_from(r.get::<_, i64>(i + 3)?).unwrap_or(0),
                    }),
                })
            };
            Ok((
                r.get::<_, String>(0)?,
                BaseEntry {
                    sha256: r.get(1)?,
                    central: seen(2)?,
                    peer: seen(6)?,
                    seen_ns: i128::from(r.get::<_, i64>(10)?),
                },
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn object(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row(
                "SELECT content FROM objects WHERE sha256 = ?1",
                [sha256],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn journal(&self, peer: &str) -> Result<Vec<JournalEntry>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT path, base_after, c_pre, c_res, p_pre, p_res, source, c_unwritten, \
             p_unwritten FROM journal WHERE peer = ?1 ORDER BY path",
        )?;
        let rows = stmt.query_map([peer], |r| {
            Ok(JournalEntry {
                path: r.get(0)?,
                base_after: r.get(1)?,
                central: Change {
                    pre: r.get(2)?,
                    res: r.get(3)?,
                    unwritten: r.get(7)?,
                },
                peer: Change {
                    pre: r.get(4)?,
                    res: r.get(5)?,
                    unwritten: r.get(8)?,
                },
                source: r
                    .get::<_, Option<String>>(6)?
                    .as_deref()
                    .and_then(Side::parse),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records decided writes, the contents they need and their conflict records, in one
    /// transaction: after this, the decisions survive any stop.
    pub fn decide(
        &mut self,
        peer: &str,
        entries: &[JournalEntry],
        objects: &BTreeMap<String, Vec<u8>>,
        records: &[(String, String)],
        settled: &[Settled],
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        let paths = entries
            .iter()
            .map(|e| e.path.as_str())
            .chain(settled.iter().map(|s| s.path.as_str()));
        let released = references(&tx, peer, paths)?;
        {
            let mut put = tx
                .prepare_cached("INSERT OR IGNORE INTO objects(sha256, content) VALUES (?1, ?2)")?;
            for (sha, content) in objects {
                put.execute(params![sha, content])?;
            }
            let mut j = tx.prepare_cached(
                "INSERT OR REPLACE INTO journal(peer, path, base_after, c_pre, c_res, p_pre, \
                 p_res, source, c_unwritten, p_unwritten) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for e in entries {
                j.execute(params![
                    peer,
                    e.path,
                    e.base_after,
                    e.central.pre,
                    e.central.res,
                    e.peer.pre,
                    e.peer.res,
                    e.source.map(Side::name),
                    e.central.unwritten,
                    e.peer.unwritten
                ])?;
            }
            let mut o =
                tx.prepare_cached("INSERT OR IGNORE INTO outbox(id, record) VALUES (?1, ?2)")?;
            for (id, record) in records {
                o.execute(params![id, record])?;
            }
            set_base(&tx, peer, settled)?;
        }
        release(&tx, released)?;
        tx.commit()?;
        Ok(())
    }

    /// Replaces a journal entry (a side found changed since: its new pre-image and result),
    /// with the contents it needs.
    pub fn revise(
        &mut self,
        peer: &str,
        entry: &JournalEntry,
        objects: &BTreeMap<String, Vec<u8>>,
    ) -> Result<()> {
        self.decide(peer, std::slice::from_ref(entry), objects, &[], &[])
    }

    /// Sets the base of finished paths and removes their journal entries, and records the
    /// sides already written of unfinished ones (`progress`: their entries as they now
    /// stand), in one transaction.
    pub fn settle(
        &mut self,
        peer: &str,
        done: &[Settled],
        progress: &[JournalEntry],
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        let paths = done
            .iter()
            .map(|s| s.path.as_str())
            .chain(progress.iter().map(|e| e.path.as_str()));
        let released = references(&tx, peer, paths)?;
        set_base(&tx, peer, done)?;
        {
            let mut j = tx.prepare_cached(
                "UPDATE journal SET c_pre = ?3, c_res = ?4, p_pre = ?5, p_res = ?6, \
                 c_unwritten = ?7, p_unwritten = ?8 WHERE peer = ?1 AND path = ?2",
            )?;
            for e in progress {
                j.execute(params![
                    peer,
                    e.path,
                    e.central.pre,
                    e.central.res,
                    e.peer.pre,
                    e.peer.res,
                    e.central.unwritten,
                    e.peer.unwritten
                ])?;
            }
        }
        {
            let mut del = tx.prepare_cached("DELETE FROM journal WHERE peer = ?1 AND path = ?2")?;
            for s in done {
                del.execute(params![peer, s.path])?;
            }
        }
        release(&tx, released)?;
        tx.commit()?;
        Ok(())
    }

    /// Drops a journal entry without touching the base (nothing of it was written).
    pub fn abandon(&mut self, peer: &str, path: &str) -> Result<()> {
        let tx = self.conn.transaction()?;
        let released = references(&tx, peer, [path])?;
        tx.execute(
            "DELETE FROM journal WHERE peer = ?1 AND path = ?2",
            params![peer, path],
        )?;
        release(&tx, released)?;
        tx.commit()?;
        Ok(())
    }

    /// Drops every content that no base or journal entry refers to (a whole scan; the
    /// transactions above release contents as they go).
    pub fn collect_garbage(&self) -> Result<usize> {
        Ok(self.conn.execute(
            // The hashes come from the index on `sha256`, not from a scan of the table,
            // whose rows hold the contents.
            "DELETE FROM objects WHERE sha256 IN (SELECT sha256 FROM objects \
             EXCEPT SELECT sha256 FROM base \
             EXCEPT SELECT c_pre FROM journal EXCEPT SELECT c_res FROM journal \
             EXCEPT SELECT p_pre FROM journal EXCEPT SELECT p_res FROM journal)",
            [],
        )?)
    }

    /// Conflict records decided but not yet appended to `conflicts.jsonl`.
    pub fn outbox(&self) -> Result<Vec<(String, String)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, record FROM outbox ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn clear_outbox(&self, ids: &[String]) -> Result<()> {
        let mut del = self
            .conn
            .prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
        for id in ids {
            del.execute([id])?;
        }
        Ok(())
    }
}

/// Moves an `objects` table of an earlier version (`WITHOUT ROWID`) to a rowid table.
/// In a `WITHOUT ROWID` table the whole row is the b-tree key, so every seek by hash read
/// the contents of the rows it passed (tens of KiB each); a rowid table with an index on
/// the hash reads only hashes. One transaction: the old table or the new one, never half.
fn migrate_objects(conn: &Connection) -> Result<()> {
    let sql: Option<String> = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'objects'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if !sql.is_some_and(|s| s.to_ascii_uppercase().contains("WITHOUT ROWID")) {
        return Ok(());
    }
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         CREATE TABLE objects_new(sha256 TEXT PRIMARY KEY, content BLOB NOT NULL);
         INSERT INTO objects_new(sha256, content) SELECT sha256, content FROM objects;
         DROP TABLE objects;
         ALTER TABLE objects_new RENAME TO objects;
         COMMIT;",
    )?;
    Ok(())
}

/// The contents the base and the journal of `paths` refer to now.
fn references<'p>(
    tx: &Connection,
    peer: &str,
    paths: impl IntoIterator<Item = &'p str>,
) -> Result<BTreeSet<String>> {
    let mut base = tx.prepare_cached("SELECT sha256 FROM base WHERE peer = ?1 AND path = ?2")?;
    let mut journal = tx.prepare_cached(
        "SELECT c_pre, c_res, p_pre, p_res FROM journal WHERE peer = ?1 AND path = ?2",
    )?;
    let mut out = BTreeSet::new();
    for path in paths {
        if let Some(h) = base
            .query_row(params![peer, path], |r| r.get::<_, String>(0))
            .optional()?
        {
            out.insert(h);
        }
        let hashes = journal
            .query_row(params![peer, path], |r| {
                let h = |i: usize| r.get::<_, Option<String>>(i);
                Ok([h(0)?, h(1)?, h(2)?, h(3)?])
            })
            .optional()?;
        out.extend(hashes.into_iter().flatten().flatten());
    }
    Ok(out)
}

/// Drops those of `hashes` that no base or journal entry refers to any more.
fn release(tx: &Connection, mut hashes: BTreeSet<String>) -> Result<()> {
    if hashes.is_empty() {
        return Ok(());
    }
    // The journal is small (the writes in flight): one pass over it.
    let mut journal = tx.prepare_cached("SELECT c_pre, c_res, p_pre, p_res FROM journal")?;
    let mut rows = journal.query([])?;
    while let Some(r) = rows.next()? {
        for i in 0..4 {
            if let Some(h) = r.get::<_, Option<String>>(i)? {
                hashes.remove(&h);
            }
        }
    }
    let mut del = tx.prepare_cached(
        "DELETE FROM objects WHERE sha256 = ?1 \
         AND NOT EXISTS (SELECT 1 FROM base WHERE sha256 = ?1)",
    )?;
    for h in hashes {
        del.execute([h])?;
    }
    Ok(())
}

fn set_base(tx: &Connection, peer: &str, settled: &[Settled]) -> Result<()> {
    let mut put = tx.prepare_cached(
        "INSERT OR REPLACE INTO base(peer, path, sha256, c_size, c_mtime, c_ctime, c_ino, \
         p_size, p_mtime, p_ctime, p_ino, seen_ns) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?;
    let mut del = tx.prepare_cached("DELETE FROM base WHERE peer = ?1 AND path = ?2")?;
    let parts = |s: Option<Seen>| {
        s.map_or((None, None, None, None), |s| {
            (
                Some(i64::try_from(s.size).unwrap_or(i64::MAX)),
                Some(i64_of(s.mtime_ns)),
                Some(i64_of(s.ctime_ns)),
                Some(i64::try_from(s.ino).unwrap_or(i64::MAX)),
            )
        })
    };
    for s in settled {
        match &s.entry {
            Some(e) => {
                let (cs, cm, cc, ci) = parts(e.central);
                let (ps, pm, pc, pi) = parts(e.peer);
                put.execute(params![
                    peer,
                    s.path,
                    e.sha256,
                    cs,
                    cm,
                    cc,
                    ci,
                    ps,
                    pm,
                    pc,
                    pi,
                    i64_of(e.seen_ns)
                ])?;
            }
            None => {
                del.execute(params![peer, s.path])?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(path: &str, pre: &str, res: &str) -> JournalEntry {
        let change = |pre: &str| Change {
            pre: Some(pre.into()),
            res: Some(res.into()),
            unwritten: false,
        };
        JournalEntry {
            path: path.into(),
            base_after: Some(res.into()),
            central: change(pre),
            peer: change(res),
            source: None,
        }
    }

    fn settled(path: &str, sha: &str) -> Settled {
        Settled {
            path: path.into(),
            entry: Some(BaseEntry {
                sha256: sha.into(),
                central: None,
                peer: None,
                seen_ns: 0,
            }),
        }
    }

    fn hashes(store: &Store) -> Vec<String> {
        let mut stmt = store
            .conn
            .prepare("SELECT sha256 FROM objects ORDER BY sha256")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn a_content_goes_when_nothing_refers_to_it_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut store =
            Store::open(&dir.path().join("t.db"), std::time::Duration::from_secs(1)).unwrap();
        let objects = |names: &[&str]| -> BTreeMap<String, Vec<u8>> {
            names
                .iter()
                .map(|n| (n.to_string(), b"{}".to_vec()))
                .collect()
        };
        // Two peers agree on content "a" for one path; one of them also on "s".
        store
            .decide(
                "p1",
                &[],
                &objects(&["a", "s"]),
                &[],
                &[settled("f", "a"), settled("g", "s")],
            )
            .unwrap();
        store
            .decide("p2", &[], &BTreeMap::new(), &[], &[settled("f", "a")])
            .unwrap();
        // p1 decides "a" -> "b": both stay while the journal refers to them.
        store
            .decide("p1", &[entry("f", "a", "b")], &objects(&["b"]), &[], &[])
            .unwrap();
        assert_eq!(hashes(&store), ["a", "b", "s"]);
        // Done: p1's base moves to "b"; "a" stays, p2's base still refers to it.
        store.settle("p1", &[settled("f", "b")], &[]).unwrap();
        assert_eq!(hashes(&store), ["a", "b", "s"]);
        // p2 moves too: "a" goes.
        store
            .decide("p2", &[], &BTreeMap::new(), &[], &[settled("f", "b")])
            .unwrap();
        assert_eq!(hashes(&store), ["b", "s"]);
        // A path leaving the base releases its content; an abandoned entry its own.
        store
            .decide("p1", &[entry("g", "s", "t")], &objects(&["t"]), &[], &[])
            .unwrap();
        store.abandon("p1", "g").unwrap();
        assert_eq!(hashes(&store), ["b", "s"]);
        store
            .settle(
                "p1",
                &[Settled {
                    path: "g".into(),
                    entry: None,
                }],
                &[],
            )
            .unwrap();
        assert_eq!(hashes(&store), ["b"]);
    }

    #[test]
    fn commits_left_in_the_log_at_close_are_there_at_the_next_open_and_a_checkpoint_empties_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let wal = dir.path().join("t.db-wal");
        let busy = std::time::Duration::from_secs(1);
        let mut store = Store::open(&path, busy).unwrap();
        let objects: BTreeMap<String, Vec<u8>> = [("a".to_string(), b"{}".to_vec())].into();
        store
            .decide(
                "p",
                &[entry("f", "a", "b")],
                &objects,
                &[],
                &[settled("f", "a")],
            )
            .unwrap();
        drop(store);
        // Closed without copying the log back: the commit is in the log alone.
        assert!(std::fs::metadata(&wal).unwrap().len() > 0);
        let store = Store::open(&path, busy).unwrap();
        assert_eq!(store.journal("p").unwrap().len(), 1);
        assert_eq!(hashes(&store), ["a"]);
        store.checkpoint().unwrap();
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
        drop(store);
        // An independent reader sees the same rows.
        let other = Connection::open(&path).unwrap();
        let n: i64 = other
            .query_row("SELECT count(*) FROM journal", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn an_objects_table_of_an_earlier_version_is_moved_with_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tree.db");
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE objects(sha256 TEXT PRIMARY KEY, content BLOB NOT NULL) \
                 WITHOUT ROWID; INSERT INTO objects VALUES ('ab', x'7b7d');",
            )
            .unwrap();
        }
        let store = Store::open(&path, std::time::Duration::from_secs(1)).unwrap();
        assert_eq!(store.object("ab").unwrap(), Some(b"{}".to_vec()));
        let sql: String = store
            .conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'objects'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(!sql.to_ascii_uppercase().contains("WITHOUT ROWID"), "{sql}");
        drop(store);
        // Opening again changes nothing.
        let store = Store::open(&path, std::time::Duration::from_secs(1)).unwrap();
        assert_eq!(store.object("ab").unwrap(), Some(b"{}".to_vec()));
    }
}
