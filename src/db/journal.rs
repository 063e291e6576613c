//! The commit protocol of one pair's sync: how a sync that writes two databases (the peer
//! and the central copy, which no single transaction can span) stays exact when it stops
//! at any instant: SIGKILL, a full disk, a central copy held busy past `busy_timeout`.
//!
//! The law: once a run completes, every side holds what one uninterrupted sync would have
//! produced. Every counter increment committed on any side is counted once, every
//! multiset row occurs as often as the sides' inserts and deletes say, every conflict is
//! recorded once, and no delete is undone.
//!
//! # The protocol
//!
//! A sync holds the central copy and its merge base (one connection, both in
//! rollback-journal mode, so SQLite commits them together) under an exclusive lock from
//! the diff to its commit: nothing else changes them meanwhile. Then:
//!
//! 1. The central copy's changes are written inside that open transaction. A row the
//!    central copy refuses is taken out of the peer's changes too: neither side moves.
//! 2. **Journal.** When the peer is to be written, the run writes the journal
//!    (`state/db/<database>/<peer>.journal.json`, atomically and durably): a transaction
//!    id, and for every row about to change on the peer the central copy's pre-image and
//!    intended result, the row's new base and the conflicts resolved. *Fault point
//!    `after-journal`.*
//! 3. **Peer commit.** The peer's changes and a marker row (table `_cr0sync_commit`:
//!    the transaction id and the rows the peer's own writer changed meanwhile, which were
//!    left alone) commit in one transaction on the peer. *`after-peer-commit`.*
//! 4. Rows the peer left alone are put back in the central copy (and keep their old base),
//!    so the next run merges them afresh. The new base, the conflict records (in the base's
//!    outbox table `_cr0sync_outbox`) and the transaction id (`_cr0sync_meta.committed`)
//!    join the central transaction. *`before-central-commit`.* It commits.
//!    *`during-central-commit`* (inside SQLite's commit), *`after-central-commit`*.
//! 5. The outbox is appended to `state/conflicts.jsonl` (synced), then emptied.
//!    *`after-conflicts-append`.* The journal file is removed and the peer's marker
//!    table dropped (both best effort: a stale one is recognised and removed later).
//!
//! # Recovery
//!
//! At the start of every sync of the pair, before its diff: first the outbox is flushed
//! (records whose id `conflicts.jsonl` already holds are not appended again); then, if a
//! journal file exists:
//!
//! | state found | meaning | what the run does |
//! |---|---|---|
//! | base says `committed` = journal's id | stopped after step 4 | removes the journal; nothing else |
//! | no marker with the journal's id in the peer | stopped before step 3 committed: nothing was written anywhere | removes the journal; merges afresh |
//! | marker present | the peer committed, the central copy did not | **roll-forward** (below), then merges as usual |
//!
//! Roll-forward, in one transaction on the central copy and the base (*fault point
//! `during-roll-forward`* before its commit, *`after-roll-forward`* after): for every
//! journalled row the peer took (not in the marker's left-alone list), the central copy
//! gets the intended result if it still holds the pre-image; if it changed since (another
//! peer's sync), the journalled result is merged into it three-way with the pre-image as
//! base, so that change stays too (a counter gets both deltas). The row's new base is
//! written where the base table still has the table's schema. The journalled conflicts
//! on rows the peer took go to the outbox (the others changed nothing yet: the next merge
//! finds them again), and `committed` is set to the journal's id. A roll-forward that is
//! itself stopped leaves the journal in place and is simply done again by the next run:
//! nothing it did was committed.
//!
//! Because the marker says for certain whether the peer committed, the peer's own writer
//! may change the journalled rows between the two runs (a bot adding coins) without
//! being counted twice or lost: the roll-forward never looks at the peer's current rows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context as _, Result};
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use crate::config::{Direction, Policy};
use crate::conflicts::{self, ConflictRecord};
use crate::context::Context;
use crate::db::apply::{apply, overwrite};
use crate::db::merge::{Change, Conflict, Rules, TableSpec, merge_key};
use crate::db::snapshot::{self, quote};
use crate::db::value::{Key, Row};
use crate::ops::fault;

/// The marker table in the peer (present only between a peer commit and the end of the
/// same run, or until the next run after a stop).
pub const MARKER: &str = "_cr0sync_commit";
const META: &str = "_cr0sync_meta";
const OUTBOX: &str = "_cr0sync_outbox";
/// The journal table of earlier versions (keys only); found, it is dropped.
const OLD_PENDING: &str = "_cr0sync_pending";

/// The state-store name of a pair's journal.
pub fn name(database: &str, peer: &str) -> String {
    crate::ops::state::names::db_journal(database, peer)
}

/// What a run is about to do to the peer, written durably before the peer is touched.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    pub txid: String,
    pub tables: Vec<TableJournal>,
    pub conflicts: Vec<ConflictRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableJournal {
    pub table: String,
    /// The table's columns when the journal was written: a table whose schema changed
    /// since cannot be rolled forward (it is merged afresh, with a warning).
    pub columns: Vec<String>,
    /// Whether the base held this table with the same schema: only then do journalled
    /// rows enter the base on roll-forward (otherwise the next merge is a first sync
    /// of the table, which the rolled-forward central copy makes agree).
    pub fresh_base: bool,
    pub keyed: Vec<KeyEntry>,
    pub multiset: Vec<CountEntry>,
}

/// A keyed row the peer is about to take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyEntry {
    pub key: Key,
    /// The central copy's change: (pre-image, result); `None` if it is not written.
    pub central: Option<(Option<Row>, Option<Row>)>,
    /// The row's base once both sides committed (`None`: no row).
    pub base: Option<Row>,
}

/// A multiset row whose count the peer is about to change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountEntry {
    pub row: Row,
    /// The central copy's count: (before, after); `None` if it is not written.
    pub central: Option<(u64, u64)>,
    pub base: u64,
}

/// The peer's marker: which transaction committed, and the rows (keys, or multiset rows)
/// per table that the peer's own writer had changed, so they were left alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    pub txid: String,
    pub left_alone: BTreeMap<String, Vec<Key>>,
}

/// Writes the marker inside the peer's transaction (`conn` is that transaction).
pub fn mark_peer(conn: &Connection, marker: &Marker) -> Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS main.{MARKER} (txid TEXT NOT NULL, left_alone TEXT NOT NULL);
         DELETE FROM main.{MARKER};"
    ))?;
    conn.execute(
        &format!("INSERT INTO main.{MARKER} VALUES (?1, ?2)"),
        params![marker.txid, serde_json::to_string(&marker.left_alone)?],
    )?;
    Ok(())
}

/// The marker in attached database `db` (the peer's snapshot), if any.
pub fn marker(conn: &Connection, db: &str) -> Result<Option<Marker>> {
    if !has_table(conn, db, MARKER)? {
        return Ok(None);
    }
    let row: Option<(String, String)> = conn
        .query_row(
            &format!("SELECT txid, left_alone FROM {db}.{MARKER} LIMIT 1"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    let Some((txid, left_alone)) = row else {
        return Ok(None);
    };
    // Written by this module in the same transaction as the peer's changes: text that
    // does not parse is a damaged database, and guessing would count rows twice or never.
    let left_alone = serde_json::from_str(&left_alone).with_context(|| {
        format!("the commit marker {db}.{MARKER} of transaction {txid} is damaged")
    })?;
    Ok(Some(Marker { txid, left_alone }))
}

/// Drops the marker table from the live peer, in a transaction of its own. Best effort:
/// a marker left behind is recognised as stale and dropped by a later run.
pub fn drop_marker(peer: &Path, busy: std::time::Duration) {
    let dropped = (|| -> Result<()> {
        let conn = crate::db::apply::open_for_merge(peer, busy)?;
        conn.execute_batch(&format!("DROP TABLE IF EXISTS main.{MARKER}"))?;
        Ok(())
    })();
    if let Err(e) = dropped {
        log::warn!(
            "{}: cannot drop cr0sync's marker table {MARKER} ({e:#}); the next run drops it",
            peer.display()
        );
    }
}

fn has_table(conn: &Connection, db: &str, table: &str) -> Result<bool> {
    Ok(conn.query_row(
        &format!("SELECT count(*) > 0 FROM {db}.sqlite_schema WHERE name = ?1"),
        [table],
        |r| r.get(0),
    )?)
}

/// The id of the last transaction whose central commit happened (base attached as `b`).
pub fn committed(conn: &Connection) -> Result<Option<String>> {
    if !has_table(conn, "b", META)? {
        return Ok(None);
    }
    Ok(conn
        .query_row(
            &format!("SELECT v FROM b.{META} WHERE k = 'committed'"),
            [],
            |r| r.get(0),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?)
}

/// Records, inside the central transaction, that transaction `txid` committed there.
pub fn set_committed(conn: &Connection, txid: &str) -> Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS b.{META} (k TEXT PRIMARY KEY, v TEXT);
         DROP TABLE IF EXISTS b.{OLD_PENDING};"
    ))?;
    conn.execute(
        &format!("INSERT OR REPLACE INTO b.{META} VALUES ('committed', ?1)"),
        [txid],
    )?;
    Ok(())
}

/// Adds conflict records to the base's outbox, inside the central transaction.
pub fn outbox_add(conn: &Connection, records: &[ConflictRecord]) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS b.{OUTBOX} (id TEXT PRIMARY KEY, record TEXT NOT NULL)"
    ))?;
    let mut stmt = conn.prepare(&format!(
        "INSERT OR IGNORE INTO b.{OUTBOX} (id, record) VALUES (?1, ?2)"
    ))?;
    for r in records {
        stmt.execute(params![r.id, serde_json::to_string(r)?])?;
    }
    Ok(())
}

/// Appends the outbox to `state/conflicts.jsonl` and empties it. `fresh`: the records
/// were committed by this very run, so none can be in the file yet; otherwise (records
/// left by a run that stopped) the ids the file holds are skipped.
pub fn flush_outbox(ctx: &Context, conn: &Connection, fresh: bool) -> Result<usize> {
    if !has_table(conn, "b", OUTBOX)? {
        return Ok(0);
    }
    let mut stmt = conn.prepare(&format!("SELECT record FROM b.{OUTBOX} ORDER BY rowid"))?;
    let texts: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if texts.is_empty() {
        return Ok(0);
    }
    let mut records: Vec<ConflictRecord> = texts
        .iter()
        .map(|t| serde_json::from_str(t))
        .collect::<Result<_, _>>()
        .with_context(|| format!("a conflict record in b.{OUTBOX} is damaged"))?;
    if !fresh {
        let known = conflicts::ids(ctx)?;
        records.retain(|r| !known.contains(&r.id));
    }
    conflicts::append(ctx, &records)?;
    fault::point("after-conflicts-append")?;
    conn.execute_batch(&format!("DELETE FROM b.{OUTBOX}"))?;
    Ok(records.len())
}

/// Flushes the outbox of the base file at `base` (before the base is reset).
pub fn flush_outbox_of(ctx: &Context, base: &Path) -> Result<()> {
    if !base.exists() {
        return Ok(());
    }
    let conn = Connection::open_in_memory()?;
    let path = base
        .to_str()
        .with_context(|| format!("path is not UTF-8: {}", base.display()))?;
    conn.execute("ATTACH ?1 AS b", [path])?;
    flush_outbox(ctx, &conn, false)
        .with_context(|| format!("cannot read the merge base {}", base.display()))?;
    Ok(())
}

/// What a roll-forward did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RolledForward {
    pub rows: usize,
    /// Conflicts between a journalled result and a later change to the central copy.
    pub conflicts: Vec<Conflict>,
    /// Tables whose schema changed since the journal was written: not rolled forward.
    pub skipped_tables: Vec<String>,
}

/// Completes an interrupted sync on the central copy and the base, inside the caller's
/// transaction (see the module doc). `counters` and `updated_at` give each table's spec.
pub fn roll_forward(
    conn: &Connection,
    journal: &Journal,
    marker: &Marker,
    policy: Policy,
    spec_of: impl Fn(&snapshot::Schema) -> TableSpec,
) -> Result<RolledForward> {
    let central = snapshot::schemas(conn, "main")?;
    let base = snapshot::schemas(conn, "b")?;
    let rules = Rules {
        policy,
        direction: Direction::Both,
    };
    let mut out = RolledForward::default();
    for tj in &journal.tables {
        let Some(schema) = central.iter().find(|s| s.name == tj.table) else {
            out.skipped_tables.push(tj.table.clone());
            continue;
        };
        let spec = spec_of(schema);
        if spec.columns != tj.columns {
            out.skipped_tables.push(tj.table.clone());
            continue;
        }
        let base_ok = tj.fresh_base && base.iter().any(|b| b == schema);
        let left_alone: Vec<&Key> = marker
            .left_alone
            .get(&tj.table)
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        let taken = |k: &Key| !left_alone.contains(&k);
        let lookup = snapshot::lookup_sql(&spec, "main");
        for e in tj.keyed.iter().filter(|e| taken(&e.key)) {
            if let Some((before, after)) = &e.central {
                let now = snapshot::lookup(conn, &lookup, &e.key)?;
                let want = if now == *before {
                    after.clone()
                } else {
                    // Changed since (another peer's sync): merge the result into it.
                    let m = merge_key(
                        &spec,
                        rules,
                        &e.key,
                        before.as_ref(),
                        now.as_ref(),
                        after.as_ref(),
                    );
                    out.conflicts.extend(m.conflict);
                    m.new_base
                };
                if let Some(ch) = crate::db::merge::change(&e.key, now.as_ref(), want.as_ref()) {
                    apply(conn, "main", &spec, &[ch])
                        .with_context(|| format!("cannot complete table {}", tj.table))?;
                }
            }
            if base_ok {
                let ch = match &e.base {
                    Some(row) => Change::Upsert {
                        key: e.key.clone(),
                        old: None,
                        new: crate::db::value::Packed::pack(row),
                    },
                    None => Change::Delete {
                        key: e.key.clone(),
                        old: crate::db::value::Packed::pack(&[]),
                    },
                };
                overwrite(conn, "b", &spec, &[ch])?;
            }
            out.rows += 1;
        }
        for e in tj.multiset.iter().filter(|e| taken(&e.row)) {
            if let Some((before, after)) = e.central {
                let now = count(conn, "main", &spec, &e.row)?;
                let want = if now == before {
                    after
                } else {
                    u64::try_from((i128::from(after) + i128::from(now) - i128::from(before)).max(0))
                        .unwrap_or(u64::MAX)
                };
                set_count(conn, "main", &spec, &e.row, now, want)?;
            }
            if base_ok {
                let now = count(conn, "b", &spec, &e.row)?;
                set_count(conn, "b", &spec, &e.row, now, e.base)?;
            }
            out.rows += 1;
        }
    }
    Ok(out)
}

/// The journalled conflicts the roll-forward records: those on rows the peer took. A
/// conflict whose resolution wrote the central copy alone (or a row the peer left alone)
/// was not completed by anything, so the next merge finds it again and records it then.
pub fn taken_conflicts(journal: &Journal, marker: &Marker) -> Vec<ConflictRecord> {
    let taken: BTreeSet<(&str, String)> = journal
        .tables
        .iter()
        .flat_map(|t| {
            let left = marker.left_alone.get(&t.table);
            t.keyed
                .iter()
                .filter(move |e| !left.is_some_and(|l| l.contains(&e.key)))
                .map(move |e| {
                    (
                        t.table.as_str(),
                        serde_json::to_string(&e.key).unwrap_or_default(),
                    )
                })
        })
        .collect();
    journal
        .conflicts
        .iter()
        .filter(|r| taken.contains(&(r.table.as_str(), r.key.to_string())))
        .cloned()
        .collect()
}

/// How often `row` occurs in `db.<spec.name>` (a multiset table).
pub fn count(conn: &Connection, db: &str, spec: &TableSpec, row: &Row) -> Result<u64> {
    let same: Vec<String> = spec
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} IS ?{}", quote(c), i + 1))
        .collect();
    let n: i64 = conn
        .prepare_cached(&format!(
            "SELECT count(*) FROM {db}.{} WHERE {}",
            quote(&spec.name),
            same.join(" AND ")
        ))?
        .query_row(rusqlite::params_from_iter(row.iter()), |r| r.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn set_count(
    conn: &Connection,
    db: &str,
    spec: &TableSpec,
    row: &Row,
    now: u64,
    want: u64,
) -> Result<()> {
    if now != want {
        let ch = Change::SetCount {
            row: row.clone(),
            old: now,
            new: want,
        };
        apply(conn, db, spec, &[ch])?;
    }
    Ok(())
}
