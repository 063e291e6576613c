//! The writes and the commit protocol: the journal, the peer's transaction with its
//! marker, the central commit with the base and the conflict outbox, completion of a sync
//! stopped between them, backups, AUTOINCREMENT counters and FTS indexes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, TransactionBehavior};

use crate::config::DbConfig;
use crate::context::Context;
use crate::db::apply::{apply, open_for_merge};
use crate::db::backup;
use crate::db::conflicts::ConflictRecord;
use crate::db::journal::{self, Journal};
use crate::db::merge::{self, Change, Rules};
use crate::db::snapshot::{self, quote};
use crate::db::value::Key;
use crate::ops::fault;

use super::PairReport;
use super::connection::lock_central;
use super::plan::{BaseState, Work, spec_of};

/// Completes a sync that stopped between its peer commit and its central commit (see
/// `journal`). Returns whether there was anything to complete.
pub(super) fn complete_interrupted(
    ctx: &Context,
    conn: &Connection,
    db: &DbConfig,
    rules: Rules,
    peer_name: &str,
    j: &Journal,
    central_path: &Path,
) -> Result<bool> {
    if journal::committed(conn)?.as_deref() == Some(j.txid.as_str()) {
        return Ok(false);
    }
    let Some(marker) = journal::marker(conn, "p")?.filter(|m| m.txid == j.txid) else {
        log::info!(
            "{}: the previous sync stopped before it wrote the peer; nothing to complete",
            db.name.get_ref()
        );
        return Ok(false);
    };
    let rows: usize = j
        .tables
        .iter()
        .map(|t| t.keyed.len() + t.multiset.len())
        .sum();
    log::warn!(
        "{}: the previous sync was interrupted after writing the peer; completing it ({rows} \
         journalled rows)",
        db.name.get_ref()
    );
    let tx = lock_central(conn, central_path)?;
    let done = journal::roll_forward(&tx, j, &marker, rules.policy, |s| spec_of(db, s))?;
    let fts: Vec<(String, String)> = snapshot::virtual_tables(&tx, "main")?
        .into_iter()
        .filter_map(|v| Some((v.name, v.content?)))
        .collect();
    rebuild_indexes(&tx, "main", &fts, |t| {
        j.tables.iter().any(|tj| tj.table == t)
    })?;
    for t in &done.skipped_tables {
        log::warn!(
            "{} table {t}: its schema changed since the interrupted sync; its rows are merged \
             afresh",
            db.name.get_ref()
        );
    }
    let mut records = journal::taken_conflicts(j, &marker);
    records.extend(done.conflicts.iter().enumerate().map(|(i, c)| {
        ConflictRecord::new(
            format!("{}-r{i}", j.txid),
            crate::ops::clock::now(),
            db.name.get_ref(),
            peer_name,
            c,
        )
    }));
    commit_central(
        ctx,
        conn,
        tx,
        &records,
        Some(&j.txid),
        ["during-roll-forward", "after-roll-forward"],
        central_path,
    )?;
    Ok(true)
}

/// The central commit of the protocol (see `journal`): the conflict records (into the
/// base's outbox) and the id of the journal it completes join the open transaction on the
/// central copy and the base; it commits; the outbox is appended to `conflicts.jsonl`.
/// `points` are the fault points just before and just after the commit.
pub(super) fn commit_central(
    ctx: &Context,
    conn: &Connection,
    tx: rusqlite::Transaction<'_>,
    records: &[ConflictRecord],
    txid: Option<&str>,
    points: [&str; 2],
    central_path: &Path,
) -> Result<()> {
    journal::outbox_add(&tx, records)?;
    if let Some(txid) = txid {
        journal::set_committed(&tx, txid)?;
    }
    fault::point(points[0])?;
    tx.commit().with_context(|| {
        format!(
            "cannot commit the central copy {}; the next run completes this sync",
            central_path.display()
        )
    })?;
    fault::point(points[1])?;
    journal::flush_outbox(ctx, conn, true)?;
    Ok(())
}

/// The journal of the peer's changes about to be committed (see `journal`).
pub(super) fn journal_of(
    txid: &str,
    works: &[Work],
    to_peer: &[Vec<Change>],
    records: &[ConflictRecord],
) -> Journal {
    let mut tables = Vec::new();
    for (w, to_peer) in works.iter().zip(to_peer) {
        if to_peer.is_empty() {
            continue;
        }
        let mut t = journal::TableJournal {
            table: w.spec.name.clone(),
            columns: w.spec.columns.clone(),
            fresh_base: matches!(w.base, BaseState::Fresh),
            ..Default::default()
        };
        let central: BTreeMap<&Key, &Change> = w
            .to_central
            .iter()
            .map(|c| (merge::target_of(c), c))
            .collect();
        for ch in to_peer {
            let target = merge::target_of(ch);
            match ch {
                Change::SetCount { row, .. } => {
                    let central = central.get(target).and_then(|c| match c {
                        Change::SetCount { old, new, .. } => Some((*old, *new)),
                        _ => None,
                    });
                    let base = w
                        .multiset_base
                        .iter()
                        .find(|(r, ..)| r == row)
                        .map_or(0, |(_, keep, _)| *keep);
                    t.multiset.push(journal::CountEntry {
                        row: row.clone(),
                        central,
                        base,
                    });
                }
                Change::Upsert { key, .. } | Change::Delete { key, .. } => {
                    let central = central.get(target).map(|c| match c {
                        Change::Upsert { old, new, .. } => (old.clone(), Some(new.clone())),
                        Change::Delete { old, .. } => (Some(old.clone()), None),
                        Change::SetCount { .. } => (None, None),
                    });
                    t.keyed.push(journal::KeyEntry {
                        key: key.clone(),
                        central,
                        base: w.new_base.get(key).cloned().flatten(),
                    });
                }
            }
        }
        tables.push(t);
    }
    Journal {
        txid: txid.to_string(),
        tables,
        conflicts: records.to_vec(),
    }
}

/// Puts back the central copy's old rows for the keys (or multiset rows) in `keys`,
/// inside the central transaction, which still holds what it wrote for them.
pub(super) fn undo(conn: &Connection, w: &Work, keys: &BTreeSet<Key>) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let back: Vec<Change> = w
        .to_central
        .iter()
        .filter(|c| keys.contains(merge::target_of(c)))
        .filter_map(|c| match c {
            Change::Upsert { key, old, new } => merge::change(key, Some(new), old.as_ref()),
            Change::Delete { key, old } => merge::change(key, None, Some(old)),
            Change::SetCount { row, old, new } => Some(Change::SetCount {
                row: row.clone(),
                old: *new,
                new: *old,
            }),
        })
        .collect();
    apply(conn, "main", &w.spec, &back)?;
    Ok(())
}

/// What a peer's transaction writes besides its rows' changes.
pub(super) struct PeerWrite<'a> {
    pub(super) to_peer: &'a [Vec<Change>],
    pub(super) txid: &'a str,
    pub(super) fts: &'a [(String, String)],
    pub(super) sequences: &'a [(String, i64, bool)],
}

/// `(table, highest sqlite_sequence of the two sides, the peer's is lower)` for the merged
/// tables with an AUTOINCREMENT counter on both sides.
pub(super) fn sequence_targets(
    conn: &Connection,
    works: &[Work],
) -> Result<Vec<(String, i64, bool)>> {
    let has = |db: &str| -> Result<bool> {
        Ok(conn.query_row(
            &format!("SELECT count(*) > 0 FROM {db}.sqlite_schema WHERE name = 'sqlite_sequence'"),
            [],
            |r| r.get(0),
        )?)
    };
    if !has("main")? || !has("p")? {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT c.name, max(c.seq, x.seq), x.seq < c.seq FROM main.sqlite_sequence AS c \
         JOIN p.sqlite_sequence AS x ON x.name = c.name",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)))?;
    for row in rows {
        let row = row?;
        if works.iter().any(|w| w.spec.name == row.0) {
            out.push(row);
        }
    }
    Ok(out)
}

/// Raises `main.sqlite_sequence` (inside the caller's transaction) to the targets.
pub(super) fn raise_sequences(conn: &Connection, sequences: &[(String, i64, bool)]) -> Result<()> {
    for (table, seq, _) in sequences {
        conn.execute(
            "UPDATE main.sqlite_sequence SET seq = ?2 WHERE name = ?1 AND seq < ?2",
            rusqlite::params![table, seq],
        )?;
    }
    Ok(())
}

/// Writes the peer's changes and the journal's marker in one immediate transaction on
/// the live file. Returns, per table, the rows left alone because the peer's own writer
/// changed them after the snapshot.
pub(super) fn write_peer_side(
    path: &Path,
    busy: std::time::Duration,
    works: &[Work],
    side: &PeerWrite,
) -> Result<Vec<BTreeSet<Key>>> {
    let (to_peer, txid, fts) = (side.to_peer, side.txid, side.fts);
    let mut conn = open_for_merge(path, busy)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut out = Vec::new();
    let mut marker = journal::Marker {
        txid: txid.to_string(),
        ..Default::default()
    };
    for w in works.iter().filter(|w| !w.peer_edits.is_empty()) {
        let skipped = apply(&tx, "main", &w.spec, &w.peer_edits)?.skipped;
        if let Some(key) = skipped.first() {
            anyhow::bail!(
                "table {}: row {} changed while its key was being moved to a fresh one; \
                 the next run tries again",
                w.spec.name,
                serde_json::to_string(key).unwrap_or_default()
            );
        }
    }
    for (w, changes) in works.iter().zip(to_peer) {
        let skipped = apply(&tx, "main", &w.spec, changes)?.skipped;
        if !skipped.is_empty() {
            marker
                .left_alone
                .insert(w.spec.name.clone(), skipped.iter().cloned().collect());
        }
        out.push(skipped);
    }
    rebuild_indexes(&tx, "main", fts, |t| {
        works
            .iter()
            .zip(to_peer)
            .any(|(w, c)| w.spec.name == t && !(c.is_empty() && w.peer_edits.is_empty()))
    })?;
    raise_sequences(&tx, side.sequences)?;
    journal::mark_peer(&tx, &marker)?;
    tx.commit()?;
    Ok(out)
}

/// Takes a routine backup of attached database `schema` of `conn` as `target`, if due.
pub(super) fn maybe_backup(
    ctx: &Context,
    name: &str,
    target: &str,
    conn: &Connection,
    schema: &str,
    now: DateTime<Utc>,
    report: &mut PairReport,
) -> Result<()> {
    if backup::due(
        ctx,
        name,
        target,
        ctx.config.database.backup_interval.0,
        now,
    )? {
        report
            .backups
            .push(backup::take_from(ctx, name, target, conn, schema, now)?);
    }
    Ok(())
}

/// Rebuilds, inside the caller's transaction on `db`, each FTS index whose content table
/// `changed` says was written (merged writes run without the triggers that keep it up to
/// date).
pub(super) fn rebuild_indexes(
    conn: &Connection,
    db: &str,
    fts: &[(String, String)],
    changed: impl Fn(&str) -> bool,
) -> Result<()> {
    for (index, content) in fts {
        if changed(content) {
            let i = quote(index);
            conn.execute_batch(&format!("INSERT INTO {db}.{i}({i}) VALUES ('rebuild')"))
                .with_context(|| format!("cannot rebuild the full-text index {index}"))?;
        }
    }
    Ok(())
}
