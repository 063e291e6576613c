//! The writes and the commit protocol: the journal, the peer's transaction with its
//! marker, the central commit with the base and the conflict outbox, completion of a sync
//! stopped between them, backups, AUTOINCREMENT counters and FTS indexes.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, TransactionBehavior};

use crate::config::DbConfig;
use crate::conflicts::ConflictRecord;
use crate::context::Context;
use crate::db::apply::{apply, open_for_merge};
use crate::db::backup;
use crate::db::changes::ChangeList;
use crate::db::journal::{self, Journal};
use crate::db::merge::{self, Change, Rules};
use crate::db::snapshot::{self, quote};
use crate::db::value::{Key, Packed};
use crate::ops::fault;

use super::Pair;
use super::PairReport;
use super::connection::lock_central;
use super::plan::Plan;
use super::plan::{BaseState, Work, new_base_of, spec_of};
use super::settle::{base_before, settle_bases, stage_keys, unsettle};
use crate::output::Progress;

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
        c.record(
            format!("{}-r{i}", j.txid),
            crate::ops::clock::now(),
            db.name.get_ref(),
            peer_name,
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

/// The journal of the peer's changes about to be committed (see `journal`), read from
/// the plan as it is serialized: it is written as it is made, never built whole. It
/// serializes as a [`Journal`] (a unit test reads one back).
#[derive(serde::Serialize)]
pub(super) struct JournalOut<'a> {
    txid: &'a str,
    tables: Vec<TableOut<'a>>,
    conflicts: &'a [ConflictRecord],
}

/// A [`journal::TableJournal`], read from the plan.
#[derive(serde::Serialize)]
struct TableOut<'a> {
    table: &'a str,
    columns: &'a [String],
    fresh_base: bool,
    keyed: KeyedOut<'a>,
    multiset: Vec<journal::CountEntry>,
}

/// The [`journal::KeyEntry`]s of a table: one per keyed change of `to_peer`, with the
/// central copy's change of the same key (`central`) and its new base (`new_base`: the
/// exceptions of `Work::new_base`).
struct KeyedOut<'a> {
    to_peer: &'a ChangeList,
    central: BTreeMap<Key, Change>,
    new_base: &'a BTreeMap<Key, Option<Packed>>,
}

/// A [`journal::KeyEntry`], borrowed.
#[derive(serde::Serialize)]
struct KeyOut<'a> {
    key: &'a Key,
    central: Option<(Option<&'a Packed>, Option<&'a Packed>)>,
    base: Option<&'a Packed>,
}

impl serde::Serialize for KeyedOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(None)?;
        for ch in self.to_peer {
            let (Change::Upsert { key, .. } | Change::Delete { key, .. }) = &ch else {
                continue;
            };
            let central = self.central.get(key).map(|c| match c {
                Change::Upsert { old, new, .. } => (old.as_ref(), Some(new)),
                Change::Delete { old, .. } => (Some(old), None),
                Change::SetCount { .. } => (None, None),
            });
            let base = new_base_of(self.new_base, &ch);
            seq.serialize_element(&KeyOut { key, central, base })?;
        }
        seq.end()
    }
}

pub(super) fn journal_of<'a>(
    txid: &'a str,
    works: &'a [Work],
    to_peer: &[&'a ChangeList],
    records: &'a [ConflictRecord],
) -> JournalOut<'a> {
    let mut tables = Vec::new();
    for (w, &to_peer) in works.iter().zip(to_peer) {
        if to_peer.is_empty() {
            continue;
        }
        // (By now the central copy's changes are only those of keys the peer takes too.)
        let central: BTreeMap<Key, Change> = w
            .to_central
            .iter()
            .map(|c| (merge::target_of(&c).clone(), c))
            .collect();
        let mut multiset = Vec::new();
        for ch in to_peer {
            if let Change::SetCount { row, .. } = &ch {
                let central = central.get(row).and_then(|c| match c {
                    Change::SetCount { old, new, .. } => Some((*old, *new)),
                    _ => None,
                });
                let base = w
                    .multiset_base
                    .iter()
                    .find(|(r, ..)| r == row)
                    .map_or(0, |(_, keep, _)| *keep);
                multiset.push(journal::CountEntry {
                    row: row.clone(),
                    central,
                    base,
                });
            }
        }
        tables.push(TableOut {
            table: &w.spec.name,
            columns: &w.spec.columns,
            fresh_base: matches!(w.base, BaseState::Fresh),
            keyed: KeyedOut {
                to_peer,
                central,
                new_base: &w.new_base,
            },
            multiset,
        });
    }
    JournalOut {
        txid,
        tables,
        conflicts: records,
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
        .map(|c| match c {
            Change::Upsert {
                key,
                old: Some(old),
                new,
            } => Change::Upsert {
                key: key.clone(),
                old: Some(new.clone()),
                new: old.clone(),
            },
            Change::Upsert {
                key,
                old: None,
                new,
            } => Change::Delete {
                key: key.clone(),
                old: new.clone(),
            },
            Change::Delete { key, old } => Change::Upsert {
                key: key.clone(),
                old: None,
                new: old.clone(),
            },
            Change::SetCount { row, old, new } => Change::SetCount {
                row: row.clone(),
                old: new,
                new: old,
            },
        })
        .collect();
    apply(conn, "main", &w.spec, &back)?;
    Ok(())
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

/// Everything a peer's transaction writes, in a form that travels to another host (where
/// `cr0sync serve` runs [`write_peer_tables`] on the peer's live file).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct PeerWriteSet {
    /// Per merged table: its spec, the rows moved to fresh keys (written first, all or
    /// none) and the changes.
    pub tables: Vec<(merge::TableSpec, Vec<Change>, ChangeList)>,
    pub txid: String,
    pub fts: Vec<(String, String)>,
    pub sequences: Vec<(String, i64, bool)>,
}

impl PeerWriteSet {
    /// The peer's part of a sync: `to_peer` (per work) is moved in, not copied.
    fn of(
        works: &[Work],
        to_peer: Vec<ChangeList>,
        txid: &str,
        fts: &[(String, String)],
        sequences: Vec<(String, i64, bool)>,
    ) -> PeerWriteSet {
        PeerWriteSet {
            tables: works
                .iter()
                .zip(to_peer)
                .map(|(w, c)| (w.spec.clone(), w.peer_edits.clone(), c))
                .collect(),
            txid: txid.to_string(),
            fts: fts.to_vec(),
            sequences,
        }
    }
}

/// Writes the peer's changes and the journal's marker in one immediate transaction on
/// the live file (here, or through `cr0sync serve` on the peer's host). Returns, per
/// table, the rows left alone because the peer's own writer changed them after the
/// snapshot.
pub(super) fn write_peer_side(
    path: &Path,
    remote: Option<&super::RemotePeer>,
    busy: std::time::Duration,
    set: &PeerWriteSet,
) -> Result<Vec<BTreeSet<Key>>> {
    match remote {
        Some(r) => r.apply(set),
        None => write_peer_tables(path, busy, set),
    }
}

/// See [`write_peer_side`].
pub(crate) fn write_peer_tables(
    path: &Path,
    busy: std::time::Duration,
    set: &PeerWriteSet,
) -> Result<Vec<BTreeSet<Key>>> {
    let mut conn = open_for_merge(path, busy)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut out = Vec::new();
    let mut marker = journal::Marker {
        txid: set.txid.clone(),
        ..Default::default()
    };
    for (spec, edits, _) in set.tables.iter().filter(|(_, e, _)| !e.is_empty()) {
        let skipped = apply(&tx, "main", spec, edits)?.skipped;
        if let Some(key) = skipped.first() {
            anyhow::bail!(
                "table {}: row {} changed while its key was being moved to a fresh one; \
                 the next run tries again",
                spec.name,
                serde_json::to_string(key).unwrap_or_default()
            );
        }
    }
    for (spec, _, changes) in &set.tables {
        let skipped = apply(&tx, "main", spec, changes)?.skipped;
        if !skipped.is_empty() {
            marker
                .left_alone
                .insert(spec.name.clone(), skipped.iter().cloned().collect());
        }
        out.push(skipped);
    }
    rebuild_indexes(&tx, "main", &set.fts, |t| {
        set.tables
            .iter()
            .any(|(s, e, c)| s.name == t && !(c.is_empty() && e.is_empty()))
    })?;
    raise_sequences(&tx, &set.sequences)?;
    journal::mark_peer(&tx, &marker)?;
    // (A test stops the writer here: the transaction, never committed, leaves nothing.)
    fault::point("peer-before-commit")?;
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

impl Pair<'_> {
    /// Step 3: a sync stopped between its two commits is completed from its journal, and
    /// conflict records it committed are appended. Returns whether the snapshot carries a
    /// commit marker of an earlier run (dropped from the peer after this sync).
    pub(super) fn complete_interrupted(&mut self, conn: &Connection, snap: &Path) -> Result<bool> {
        let ctx = self.ctx;
        let stale_marker = journal::marker(conn, "p")
            .with_context(|| format!("cannot read the snapshot {}", snap.display()))?
            .is_some();
        if !self.opts.dry_run {
            let unreadable = || {
                format!(
                    "the merge base {} is damaged; nothing was written. Try: move it aside (mv {0} \
                     {0}.damaged): the next run merges the pair as a first sync, keeping every row \
                     of either side and recording differing rows as conflicts",
                    self.base_path.display()
                )
            };
            // Conflict records a stopped run committed but had not appended yet.
            journal::flush_outbox(ctx, conn, false).with_context(unreadable)?;
            if let Some(j) = ctx.state.load::<Journal>(&self.journal_name)? {
                self.report.recovered = complete_interrupted(
                    ctx,
                    conn,
                    self.db,
                    self.rules,
                    self.peer_name,
                    &j,
                    &self.central_path,
                )?;
                ctx.state.remove(&self.journal_name)?;
            }
        }
        Ok(stale_marker)
    }
}

impl Pair<'_> {
    /// Step 5: backups, then the central copy's changes inside its exclusive transaction,
    /// the journal, the peer's commit (with the base settled beside it), and the central
    /// commit with the base and the conflict records. Returns whether the peer was written.
    /// (Only this job writes the central copy and the base, under its job lock, so the
    /// diff still holds; the peer's writes are optimistic.)
    pub(super) fn write(
        &mut self,
        conn: &Connection,
        plan: &mut Plan,
        progress: Progress,
    ) -> Result<bool> {
        let txid = crate::conflicts::transaction_id(self.now, self.name, self.peer_name);
        let records: Vec<ConflictRecord> = plan
            .works
            .iter()
            .flat_map(|w| &w.conflicts)
            .enumerate()
            .map(|(i, c)| c.record(format!("{txid}-{i}"), self.now, self.name, self.peer_name))
            .collect();

        // 5a. Backups: the peer's from its snapshot, the central copy's through this
        // connection.
        if plan.works.iter().any(|w| !w.to_peer.is_empty()) {
            self.backup(conn, self.peer_name, "p")?;
        }
        if plan.works.iter().any(|w| !w.to_central.is_empty()) {
            self.backup(conn, "central", "main")?;
        }
        self.phases.mark("backups");

        // 5b. The exclusive lock on the central copy and the base, held to the commit, and
        // the central copy's changes inside that transaction.
        let tx = lock_central(conn, &self.central_path)?;
        let mut refused = Vec::new();
        for w in &plan.works {
            refused.push(
                apply(&tx, "main", &w.spec, &w.to_central)
                    .with_context(|| self.central_write())?
                    .skipped,
            );
        }
        self.phases.mark("central apply");

        // The keys whose base changes with these writes are staged; then the central
        // copy's rows are let go of, but for the keys the peer takes too (the journal and
        // a key the peer leaves alone need them).
        let to_peer = peer_changes(&mut plan.works, &refused);
        let central_written: Vec<bool> = plan
            .works
            .iter()
            .map(|w| !w.to_central.is_empty())
            .collect();
        for (i, w) in plan.works.iter_mut().enumerate() {
            stage_keys(&tx, i, w, &refused[i]).with_context(|| self.base_write())?;
            if to_peer[i].is_empty() {
                w.to_central = ChangeList::new();
                continue;
            }
            // By hash, to hold little: a key that shares one with the peer's keys is kept
            // for nothing, which is harmless.
            let peer_keys: HashSet<u64> = to_peer[i].iter().map(|c| key_hash(&c)).collect();
            w.to_central.retain(|c| peer_keys.contains(&key_hash(c)));
            w.to_central.shrink_to_fit();
        }
        tx.execute_batch("PRAGMA shrink_memory")?;
        self.phases.mark("staging");

        // 5c. The journal, then the peer's commit with its marker, the base settled beside.
        let works = &plan.works;
        // AUTOINCREMENT counters: every side's `sqlite_sequence` is raised to the highest
        // one, so no side hands out again an id another side has used (even for a row that
        // lost).
        let sequences = sequence_targets(conn, works)?;
        let write_peer = to_peer.iter().any(|c| !c.is_empty())
            || works.iter().any(|w| !w.peer_edits.is_empty())
            || sequences.iter().any(|s| s.2);
        let left_alone = if write_peer {
            let raise = sequences.clone();
            let set = PeerWriteSet::of(works, to_peer, &txid, &plan.fts, raise);
            let changes: Vec<&ChangeList> = set.tables.iter().map(|t| &t.2).collect();
            let j = journal_of(&txid, works, &changes, &records);
            self.write_peer(&tx, works, j, &set, &refused)?
        } else {
            settle_bases(&tx, works, &[], self.rules.direction, &refused)
                .with_context(|| self.base_write())?;
            self.phases.mark("base");
            vec![BTreeSet::new(); works.len()]
        };
        // Erased before the conflict warnings below.
        drop(progress);
        for (i, t) in self.report.tables.iter_mut().enumerate() {
            t.deferred = refused[i].union(&left_alone[i]).count();
        }

        // 5d. FTS indexes and counters, then the central commit with the base and the
        // conflict records.
        rebuild_indexes(&tx, "main", &plan.fts, |t| {
            works
                .iter()
                .zip(&central_written)
                .any(|(w, &written)| w.spec.name == t && written)
        })
        .with_context(|| self.central_write())?;
        raise_sequences(&tx, &sequences).with_context(|| self.central_write())?;
        commit_central(
            self.ctx,
            conn,
            tx,
            &records,
            write_peer.then_some(txid.as_str()),
            ["before-central-commit", "after-central-commit"],
            &self.central_path,
        )
        .with_context(|| self.base_write())?;
        self.phases.mark("central commit");
        self.announce(&records);
        if write_peer {
            self.ctx.state.remove(&self.journal_name)?;
        }
        Ok(write_peer)
    }

    /// Step 5c: the journal, durable before the peer is touched; then the peer's commit
    /// beside the settling of the base, which goes on in the central copy's open
    /// transaction (nothing of it is durable before the central commit); a row the peer
    /// then leaves alone gets the central copy's old row and keeps its old base. Returns
    /// the keys the peer left alone, per table.
    fn write_peer(
        &mut self,
        tx: &Connection,
        works: &[Work],
        journal: JournalOut<'_>,
        set: &PeerWriteSet,
        refused: &[BTreeSet<Key>],
    ) -> Result<Vec<BTreeSet<Key>>> {
        let label = self.label();
        self.ctx
            .state
            .replace_with(&self.journal_name, |tmp| {
                // Streamed: a journal of many rows is never held whole in memory.
                let mut out = std::io::BufWriter::new(std::fs::File::create_new(tmp)?);
                serde_json::to_writer(&mut out, &journal)?;
                out.into_inner().map_err(|e| e.into_error())?;
                Ok(())
            })
            .with_context(|| format!("{label}: nothing was written"))?;
        drop(journal);
        self.phases.mark("journal");
        fault::point("after-journal")?;
        let (peer, settled) = std::thread::scope(|s| {
            let peer = s.spawn(|| {
                let t = std::time::Instant::now();
                let r = write_peer_side(&self.peer_path, self.remote.as_ref(), self.busy, set);
                (r, t.elapsed())
            });
            // Meanwhile, on this thread: the base settled.
            let t = std::time::Instant::now();
            let changes: Vec<&ChangeList> = set.tables.iter().map(|t| &t.2).collect();
            let settled = settle_bases(tx, works, &changes, self.rules.direction, refused);
            let base_time = t.elapsed();
            let peer = peer.join().map(|(r, peer_time)| {
                self.phases.note(format!(
                    "peer write {} ms beside base {} ms",
                    peer_time.as_millis(),
                    base_time.as_millis(),
                ));
                r
            });
            (peer, settled)
        });
        let left_alone = peer
            .map_err(|_| anyhow::anyhow!("the peer's writer stopped unexpectedly"))?
            .with_context(|| {
                format!(
                    "{label}: cannot write peer {}; nothing was written",
                    self.remote
                        .as_ref()
                        .map_or_else(|| self.peer_path.display().to_string(), |r| r.label())
                )
            })?;
        settled.with_context(|| self.base_write())?;
        fault::point("after-peer-commit")?;
        self.phases.mark("peer writes and base");
        for (i, w) in works.iter().enumerate() {
            if left_alone[i].is_empty() {
                continue;
            }
            undo(tx, w, &left_alone[i]).with_context(|| self.central_write())?;
            let deferred: BTreeSet<Key> = refused[i].union(&left_alone[i]).cloned().collect();
            let before = base_before(w, &set.tables[i].2, &left_alone[i]);
            unsettle(
                tx,
                w,
                self.rules.direction,
                &deferred,
                &left_alone[i],
                &before,
            )
            .with_context(|| self.base_write())?;
        }
        Ok(left_alone)
    }

    /// A routine backup of one side (`schema` `p`: the peer's snapshot; `main`: central).
    pub(super) fn backup(&mut self, conn: &Connection, target: &str, schema: &str) -> Result<()> {
        maybe_backup(
            self.ctx,
            self.name,
            target,
            conn,
            schema,
            self.now,
            &mut self.report,
        )
    }

    /// One warning line per recorded conflict, for the log and cron's mail.
    fn announce(&mut self, records: &[ConflictRecord]) {
        let (name, peer_name) = (self.name, self.peer_name);
        for r in records {
            let line = match &r.new_key {
                Some(new_key) => format!(
                    "conflict in {name}/{peer_name} table {} key {}: both sides inserted a row \
                     there; both are kept, the peer's under key {new_key} (rekey, id {}). Try: \
                     update anything outside the database that holds the old id, then cr0sync \
                     db resolve {} --ack",
                    r.table, r.key, r.id, r.id
                ),
                None => format!(
                    "conflict in {name}/{peer_name} table {} key {}: {} wins ({}, id {}). Try: \
                     cr0sync db conflicts; cr0sync db resolve {} --keep central|peer|base or \
                     --ack",
                    r.table, r.key, r.winner, r.kind, r.id, r.id
                ),
            };
            log::warn!("{line}");
            self.report.new_conflicts.push(line);
        }
    }

    fn central_write(&self) -> String {
        format!(
            "cannot write the central copy {}",
            self.central_path.display()
        )
    }

    fn base_write(&self) -> String {
        format!("cannot write the merge base {}", self.base_path.display())
    }
}

/// A hash of the key (or multiset row) a change writes.
fn key_hash(change: &Change) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut packed = Vec::new();
    Packed::pack_into(&mut packed, merge::target_of(change));
    let mut h = std::collections::hash_map::DefaultHasher::new();
    packed.hash(&mut h);
    h.finish()
}

/// What the peer is to take, moved out of the plan (nothing reads `Work::to_peer` after
/// this): a row the central copy refused is not written to the peer either.
fn peer_changes(works: &mut [Work], refused: &[BTreeSet<Key>]) -> Vec<ChangeList> {
    works
        .iter_mut()
        .zip(refused)
        .map(|(w, refused)| {
            let mut changes = std::mem::take(&mut w.to_peer);
            if !refused.is_empty() {
                changes.retain(|c| !refused.contains(merge::target_of(c)));
            }
            changes
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::value::{Cell, Row};
    use rusqlite::types::Value;

    /// The journal is written from the plan as it is serialized; it must read back as
    /// the `Journal` that completes an interrupted sync, field for field.
    #[test]
    fn the_journal_read_from_the_plan_reads_back_as_a_journal() {
        let row = |id: i64, nick: &[u8]| -> Row {
            vec![
                Cell::Sql(Value::Integer(id)),
                Cell::RawText(nick.to_vec()),
                Cell::Sql(Value::Real(1.5)),
                Cell::Sql(Value::Null),
                Cell::Sql(Value::Blob(vec![0, 255])),
            ]
        };
        let key = |id: i64| vec![Cell::Sql(Value::Integer(id))];
        let (old, new, gone, fresh, other) = (
            row(7, b"a"),
            row(7, b"\xff"),
            row(8, b"b"),
            row(9, b"c"),
            row(9, b"d"),
        );
        let columns = vec!["id".to_string(), "nick".to_string()];
        let counted = journal::CountEntry {
            row: row(1, b"x"),
            central: Some((1, 2)),
            base: 2,
        };
        // Key 7: both sides take the same update; key 8: both delete; key 9: only the
        // peer takes an insert, and the base gets another row (an exception).
        let both = [
            Change::Upsert {
                key: key(7),
                old: Some(Packed::pack(&old)),
                new: Packed::pack(&new),
            },
            Change::Delete {
                key: key(8),
                old: Packed::pack(&gone),
            },
        ];
        let to_peer: ChangeList = both
            .iter()
            .cloned()
            .chain([
                Change::Upsert {
                    key: key(9),
                    old: None,
                    new: Packed::pack(&fresh),
                },
                Change::SetCount {
                    row: row(1, b"x"),
                    old: 1,
                    new: 2,
                },
            ])
            .collect();
        let central: BTreeMap<Key, Change> = both
            .into_iter()
            .map(|c| (merge::target_of(&c).clone(), c))
            .collect();
        let new_base = BTreeMap::from([(key(9), Some(Packed::pack(&other)))]);
        let out = JournalOut {
            txid: "t-1",
            tables: vec![TableOut {
                table: "users",
                columns: &columns,
                fresh_base: true,
                keyed: KeyedOut {
                    to_peer: &to_peer,
                    central,
                    new_base: &new_base,
                },
                multiset: vec![counted.clone()],
            }],
            conflicts: &[],
        };
        let read: Journal = serde_json::from_str(&serde_json::to_string(&out).unwrap()).unwrap();
        let entry = |id, central, base| journal::KeyEntry {
            key: key(id),
            central,
            base,
        };
        let want = Journal {
            txid: "t-1".to_string(),
            tables: vec![journal::TableJournal {
                table: "users".to_string(),
                columns: columns.clone(),
                fresh_base: true,
                keyed: vec![
                    entry(7, Some((Some(old.clone()), Some(new.clone()))), Some(new)),
                    entry(8, Some((Some(gone), None)), None),
                    entry(9, None, Some(other)),
                ],
                multiset: vec![counted],
            }],
            conflicts: Vec::new(),
        };
        assert_eq!(read, want);
    }
}
