//! Syncing one (database, peer) pair: snapshot, diff, three-way merge, guarded and
//! backed-up apply, conflict records, new base.
//!
//! How a sync goes:
//! 1. Fast path: if the pair's files (device, inode, size, mtime of the database and its
//!    `-wal`) and its configuration match the fingerprint of the last successful sync, stop.
//! 2. The peer is copied with the online backup API into scratch space (`state/tmp`); the
//!    diff reads that copy, so the bot's writer is blocked only for the copy.
//! 3. One connection holds the central copy as `main`, the snapshot as `p` and the base as
//!    `b`. A sync that stopped between its two commits is completed first (`journal`).
//! 4. Keyed tables are compared in SQL (central against snapshot, by primary key; for
//!    tables with counters also against the base, since equal deltas leave both sides
//!    equal), and only keys whose rows differ are merged in Rust against the base. Memory
//!    grows with the number of differing rows, not with the database. Tables without a
//!    primary key are merged as multisets in memory.
//! 5. Backups, then the writes and the two commits in the order `journal` lays down, so a
//!    sync stopped at any instant is completed exactly by the next run. Only then is the
//!    fingerprint recorded.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::config::{DbConfig, Direction, PeerConfig};
use crate::context::Context;
use crate::db::apply::apply;
use crate::db::backup;
use crate::db::base;
use crate::db::conflicts::ConflictRecord;
use crate::db::journal::{self, Journal};
use crate::db::merge::{self, Change, Counts, Rules, counts};
use crate::db::snapshot::{self};
use crate::db::value::Key;
use crate::fsutil;
use crate::ops::fault;
use crate::output::Progress;

mod commit;
mod connection;
mod constraints;
mod diff;
mod fingerprint;
mod plan;
mod settle;

use commit::{
    PeerWrite, commit_central, complete_interrupted, journal_of, maybe_backup, raise_sequences,
    rebuild_indexes, sequence_targets, undo, write_peer_side,
};
use connection::{PARALLEL_DIFF_BYTES, lock_central, open_central, open_reader, path_str};
use constraints::{collisions, keep_referenced_parents, rekey_rows, resolve_unique};
use fingerprint::{FileStat, Fingerprint, config_digest, racy, wal};
use plan::{add_migrated_columns, guard, merge_one, plan_tables, plan_virtual_tables, spec_of};
use settle::{base_before, settle_bases, unsettle};

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub dry_run: bool,
    /// Override the mass-delete guard.
    pub force: bool,
}

/// What a sync did (or, in a dry run, would do) to one table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableReport {
    pub table: String,
    pub central: Counts,
    pub peer: Counts,
    pub conflicts: usize,
    pub counter_merges: usize,
    /// Rows left for the next run because their database's writer changed them meanwhile.
    pub deferred: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedTable {
    pub table: String,
    pub reason: String,
}

/// The outcome of one pair's sync.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PairReport {
    pub database: String,
    pub peer: String,
    /// Fast path: nothing changed since the last sync; not opened.
    pub unchanged: bool,
    pub created_central: bool,
    /// A journal of an interrupted run was found and completed.
    pub recovered: bool,
    pub tables: Vec<TableReport>,
    pub skipped_tables: Vec<SkippedTable>,
    pub backups: Vec<PathBuf>,
    /// One line per conflict this sync recorded, for `cron database` to print.
    #[serde(default, skip_serializing)]
    pub new_conflicts: Vec<String>,
}

impl PairReport {
    pub fn changes(&self) -> (u64, u64, usize) {
        let n = |c: &Counts| c.inserts + c.updates + c.deletes;
        self.tables.iter().fold((0, 0, 0), |(c, p, k), t| {
            (c + n(&t.central), p + n(&t.peer), k + t.conflicts)
        })
    }

    /// One line for the log and the run record.
    pub fn summary(&self) -> String {
        if self.unchanged {
            return format!("{}/{}: unchanged", self.database, self.peer);
        }
        let (c, p, k) = self.changes();
        let mut s = format!(
            "{}/{}: {c} change(s) to central, {p} to the peer, {k} conflict(s)",
            self.database, self.peer
        );
        if self.created_central {
            s.push_str(", central copy created from the peer");
        }
        if !self.skipped_tables.is_empty() {
            s.push_str(&format!(", {} table(s) skipped", self.skipped_tables.len()));
        }
        s
    }
}

/// What `state/db/<database>/<peer>.json` keeps: the last successful sync.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairState {
    pub last_sync: DateTime<Utc>,
    pub fingerprint: Fingerprint,
    /// The last sync that was not a fast-path skip.
    pub report: PairReport,
}

pub fn state_name(database: &str, peer: &str) -> String {
    crate::ops::state::names::db_pair(database, peer)
}

/// Syncs one pair. `now` stamps conflicts and backups.
pub fn sync_pair(
    ctx: &Context,
    db: &DbConfig,
    peer: &PeerConfig,
    opts: Options,
    now: DateTime<Utc>,
) -> Result<PairReport> {
    sync_pair_inner(ctx, db, peer, opts, now).map_err(|e| {
        let pair = format!("{}/{}", db.name.get_ref(), peer.name.get_ref());
        let e = if e.to_string().starts_with(&pair) {
            e
        } else {
            e.context(pair)
        };
        if fsutil::is_disk_full(&e) {
            anyhow::anyhow!(
                "{e:#}. Try: free space on the filesystems of {} and of the peer (df -h); \
                 the next run completes the sync",
                ctx.layout.root().display()
            )
        } else {
            e
        }
    })
}

fn sync_pair_inner(
    ctx: &Context,
    db: &DbConfig,
    peer: &PeerConfig,
    opts: Options,
    now: DateTime<Utc>,
) -> Result<PairReport> {
    let name = db.name.get_ref().as_str();
    let peer_name = peer.name.get_ref().as_str();
    let rules = Rules {
        policy: ctx.config.policy_of(db),
        direction: peer.direction,
    };
    let central_path = ctx.layout.central_db(name);
    let peer_path = ctx.resolve(peer.path.get_ref());
    let mut report = PairReport {
        database: name.into(),
        peer: peer_name.into(),
        ..PairReport::default()
    };
    if !peer_path.exists() {
        anyhow::bail!(
            "{name}/{peer_name}: peer database not found: {} (never created). Try: fix the \
             peer's path in the configuration, or restore the file",
            peer_path.display()
        );
    }

    // 1. Fast path.
    let state_file = state_name(name, peer_name);
    let previous: Option<PairState> = ctx.state.load(&state_file)?;
    let digest = config_digest(db, peer, rules);
    let seen_at = std::time::SystemTime::now();
    let peer_stat = (FileStat::of(&peer_path), FileStat::of(&wal(&peer_path)));
    let central_stat = (
        FileStat::of(&central_path),
        FileStat::of(&wal(&central_path)),
    );
    if let Some(prev) = &previous {
        let f = &prev.fingerprint;
        let base_exists = ctx.state.path(&base::name(name, peer_name)).exists();
        if !f.racy
            && base_exists
            && f.config == digest
            && (f.peer, f.peer_wal) == peer_stat
            && (f.central, f.central_wal) == central_stat
        {
            report.unchanged = true;
            return Ok(report);
        }
    }

    // 2. Snapshot of the peer.
    let mut phases = Phases::start();
    let progress = Progress::new(format!("{name}/{peer_name}: snapshot of the peer"), 0);
    let busy = ctx.config.general.busy_timeout.0;
    let scratch = backup::scratch_dir(ctx)?;
    let snap = scratch.join(format!("{name}.{peer_name}.snapshot.db"));
    let snap = fsutil::Scratch::new(snap);
    snapshot::snapshot_to(&peer_path, &snap, busy)
        .with_context(|| format!("{name}/{peer_name}"))?;

    if !central_path.exists() {
        report.created_central = true;
        if opts.dry_run {
            return Ok(report);
        }
        progress.stage(format!("{name}/{peer_name}: creating the central copy"));
        fsutil::atomic_replace_with(&central_path, &ctx.perms, |tmp| {
            snapshot::snapshot_to(&snap, tmp, busy)?;
            let c = Connection::open(tmp)?;
            c.pragma_update(None, "journal_mode", "delete")?;
            c.close().map_err(|(_, e)| e)?;
            Ok(())
        })
        .with_context(|| format!("cannot create the central copy {}", central_path.display()))?;
        log::info!("{name}: central copy created from peer {peer_name}");
    }

    phases.mark("snapshot");
    progress.stage(format!("{name}/{peer_name}: diff and merge"));
    // 3. One connection: central as main, snapshot as p, base as b.
    let mut conn = open_central(&central_path, busy)?;
    if fault::is_armed("during-central-commit") {
        conn.commit_hook(Some(|| fault::point("during-central-commit").is_err()))?;
    }
    conn.execute("ATTACH ?1 AS p", [path_str(&snap)?])
        .with_context(|| format!("cannot open the snapshot {}", snap.display()))?;
    let base_path = ctx.state.path(&base::name(name, peer_name));
    if opts.dry_run && !base_path.exists() {
        conn.execute_batch("ATTACH ':memory:' AS b")?;
    } else {
        if !base_path.exists() {
            // ATTACH inherits the central connection's no-create flag: create it here.
            if let Some(dir) = base_path.parent() {
                fsutil::ensure_dir(dir, &ctx.perms)
                    .with_context(|| format!("cannot create directory {}", dir.display()))?;
            }
            Connection::open(&base_path)?.close().map_err(|(_, e)| e)?;
            ctx.perms.apply_file(&base_path)?;
        }
        let attached = conn.execute("ATTACH ?1 AS b", [path_str(&base_path)?]);
        let not_a_database = matches!(
            &attached,
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::NotADatabase
                    || f.code == rusqlite::ErrorCode::DatabaseCorrupt
        );
        if !not_a_database {
            attached
                .with_context(|| format!("cannot open the merge base {}", base_path.display()))?;
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
            let aside =
                base_path.with_extension(format!("db.unreadable-{}", now.format("%Y%m%dT%H%M%SZ")));
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
            std::fs::rename(&base_path, &aside).with_context(|| {
                format!(
                    "cannot move the unreadable merge base {} aside",
                    base_path.display()
                )
            })?;
            Connection::open(&base_path)?.close().map_err(|(_, e)| e)?;
            ctx.perms.apply_file(&base_path)?;
            conn.execute("ATTACH ?1 AS b", [path_str(&base_path)?])
                .with_context(|| format!("cannot open the merge base {}", base_path.display()))?;
            log::warn!(
                "{name}/{peer_name}: the merge base was unreadable; it is kept as {} and the \
                 pair is merged as a first sync (rows on either side are kept, differing rows \
                 are recorded as conflicts)",
                aside.display()
            );
        }
    }
    let stale_marker = journal::marker(&conn, "p")
        .with_context(|| format!("cannot read the snapshot {}", snap.display()))?
        .is_some();
    let journal_name = journal::name(name, peer_name);
    if !opts.dry_run {
        let unreadable = || {
            format!(
                "the merge base {} is damaged; nothing was written. Try: move it aside (mv {0} \
                 {0}.damaged): the next run merges the pair as a first sync, keeping every row \
                 of either side and recording differing rows as conflicts",
                base_path.display()
            )
        };
        // Conflict records a stopped run committed but had not appended yet.
        journal::flush_outbox(ctx, &conn, false).with_context(unreadable)?;
        if let Some(j) = ctx.state.load::<Journal>(&journal_name)? {
            report.recovered =
                complete_interrupted(ctx, &conn, db, rules, peer_name, &j, &central_path)?;
            ctx.state.remove(&journal_name)?;
        }
    }

    if !opts.dry_run {
        add_migrated_columns(ctx, &conn, db, &peer_path, now, &mut report)?;
    }
    let plans = plan_tables(&conn, db, &mut report)?;
    let fts = plan_virtual_tables(&conn, db, &mut report)?;
    // A second read-only connection for the peer's side of a large table's diff (see
    // `differing_rows`); closed before anything is written.
    let reader = if std::fs::metadata(&snap).map_or(0, |m| m.len()) >= PARALLEL_DIFF_BYTES {
        Some(std::sync::Mutex::new(open_reader(&conn)?))
    } else {
        None
    };
    let mut works = Vec::new();
    for (schema, base_state) in plans {
        let spec = spec_of(db, &schema);
        let table = schema.name.clone();
        // A table that cannot be read is skipped with its reason; the pair's other tables
        // still sync.
        let work = match merge_one(&conn, reader.as_ref(), schema, spec, base_state, rules) {
            Ok(work) => work,
            Err(e) => {
                let reason = format!(
                    "cannot be compared: {e:#}. Try: check the table with sqlite3 (PRAGMA \
                     integrity_check), or exclude_tables; the pair's other tables sync"
                );
                log::warn!("{name}/{peer_name} table {table} skipped: {reason}");
                report.skipped_tables.push(SkippedTable { table, reason });
                continue;
            }
        };
        works.push(work);
    }
    drop(reader);
    if rules.direction == Direction::Both && db.rekey && !collisions(&conn, &works)?.is_empty() {
        // The peer's backup comes from the snapshot, which the moves edit.
        if !opts.dry_run {
            maybe_backup(ctx, name, peer_name, &conn, "p", now, &mut report)?;
        }
        works = rekey_rows(&conn, db, works, rules)
            .with_context(|| format!("{name}/{peer_name}: cannot move colliding rows"))?;
    }
    if rules.direction == Direction::Both {
        for work in &mut works {
            resolve_unique(&conn, work, rules).with_context(|| {
                format!("cannot check the UNIQUE constraints of {}", work.spec.name)
            })?;
        }
        keep_referenced_parents(&conn, &mut works)
            .with_context(|| format!("{name}/{peer_name}: cannot check foreign keys"))?;
    }
    phases.mark("diff and merge");

    for w in &works {
        report.tables.push(TableReport {
            table: w.spec.name.clone(),
            central: counts(&w.to_central),
            peer: counts(&[&w.peer_edits[..], &w.to_peer[..]].concat()),
            conflicts: w.conflicts.len(),
            counter_merges: w.counter_merges,
            deferred: 0,
        });
    }
    if !opts.force {
        guard(
            &conn,
            &works,
            ctx.config.database.max_delete.0,
            name,
            peer_name,
        )?;
    }
    if opts.dry_run {
        return Ok(report);
    }

    let txid = format!(
        "{}-{}-{name}-{peer_name}",
        now.format("%Y%m%dT%H%M%S%.6fZ"),
        std::process::id()
    );
    let records: Vec<ConflictRecord> = works
        .iter()
        .flat_map(|w| &w.conflicts)
        .enumerate()
        .map(|(i, c)| ConflictRecord::new(format!("{txid}-{i}"), now, name, peer_name, c))
        .collect();

    // 4. Backups: the peer's from its snapshot, the central copy's through this
    // connection. Then the exclusive lock on the central copy and the base, held to the
    // commit, and the central copy's changes inside that transaction. (Only this job
    // writes them, under its job lock, so the diff above still holds; the writes are
    // optimistic all the same.)
    progress.stage(format!("{name}/{peer_name}: backups and writes"));
    if works.iter().any(|w| !w.to_peer.is_empty()) {
        maybe_backup(ctx, name, peer_name, &conn, "p", now, &mut report)?;
    }
    if works.iter().any(|w| !w.to_central.is_empty()) {
        maybe_backup(ctx, name, "central", &conn, "main", now, &mut report)?;
    }
    phases.mark("backups");
    let tx = lock_central(&conn, &central_path)?;
    let mut refused = Vec::new();
    let central_write = || format!("cannot write the central copy {}", central_path.display());
    let base_write = || format!("cannot write the merge base {}", base_path.display());
    for w in &works {
        refused.push(
            apply(&tx, "main", &w.spec, &w.to_central)
                .with_context(central_write)?
                .skipped,
        );
    }
    phases.mark("central apply");
    // A row the central copy refused is not written to the peer either.
    let to_peer: Vec<Vec<Change>> = works
        .iter()
        .zip(&refused)
        .map(|(w, refused)| {
            w.to_peer
                .iter()
                .filter(|c| !refused.contains(merge::target_of(c)))
                .cloned()
                .collect()
        })
        .collect();
    // AUTOINCREMENT counters: every side's `sqlite_sequence` is raised to the highest one,
    // so no side hands out again an id another side has used (even for a row that lost).
    let sequences = sequence_targets(&conn, &works)?;
    let peer_seq_behind = sequences.iter().any(|s| s.2);
    let write_peer = to_peer.iter().any(|c| !c.is_empty())
        || works.iter().any(|w| !w.peer_edits.is_empty())
        || peer_seq_behind;

    // The journal, then the peer's commit with its marker.
    let mut left_alone = vec![BTreeSet::new(); works.len()];
    if write_peer {
        let j = journal_of(&txid, &works, &to_peer, &records);
        ctx.state
            .write_bytes(&journal_name, &serde_json::to_vec(&j)?)
            .with_context(|| format!("{name}/{peer_name}: nothing was written"))?;
        phases.mark("journal");
        fault::point("after-journal")?;
        // The peer's commit runs beside the settling of the base, which goes on in the
        // central copy's open transaction (nothing of it is durable before the central
        // commit below); a row the peer then leaves alone is put back afterwards.
        let before = base_before(&conn, &works, &to_peer)?;
        let side = PeerWrite {
            to_peer: &to_peer,
            txid: &txid,
            fts: &fts,
            sequences: &sequences,
        };
        let (peer, settled) = std::thread::scope(|s| {
            let peer = s.spawn(|| write_peer_side(&peer_path, busy, &works, &side));
            let settled = settle_bases(&tx, &works, rules.direction, &refused);
            (peer.join(), settled)
        });
        left_alone = peer
            .map_err(|_| anyhow::anyhow!("the peer's writer stopped unexpectedly"))?
            .with_context(|| {
                format!(
                    "{name}/{peer_name}: cannot write peer {}; nothing was written",
                    peer_path.display()
                )
            })?;
        settled.with_context(base_write)?;
        fault::point("after-peer-commit")?;
        phases.mark("peer writes and base");
        // Rows the peer left alone get the central copy's old row and keep their old base.
        for (i, w) in works.iter().enumerate() {
            if left_alone[i].is_empty() {
                continue;
            }
            undo(&tx, w, &left_alone[i]).with_context(central_write)?;
            let deferred: BTreeSet<Key> = refused[i].union(&left_alone[i]).cloned().collect();
            unsettle(
                &tx,
                w,
                rules.direction,
                &deferred,
                &left_alone[i],
                &before[i],
            )
            .with_context(base_write)?;
        }
    } else {
        settle_bases(&tx, &works, rules.direction, &refused).with_context(base_write)?;
        phases.mark("base");
    }
    // Erased before the conflict warnings below.
    drop(progress);
    for (i, t) in report.tables.iter_mut().enumerate() {
        t.deferred = refused[i].union(&left_alone[i]).count();
    }
    rebuild_indexes(&tx, "main", &fts, |t| {
        works
            .iter()
            .any(|w| w.spec.name == t && !w.to_central.is_empty())
    })
    .with_context(central_write)?;
    raise_sequences(&tx, &sequences).with_context(central_write)?;
    commit_central(
        ctx,
        &conn,
        tx,
        &records,
        write_peer.then_some(txid.as_str()),
        ["before-central-commit", "after-central-commit"],
        &central_path,
    )
    .with_context(base_write)?;
    phases.mark("central commit");
    for r in &records {
        let line = match &r.new_key {
            Some(new_key) => format!(
                "conflict in {name}/{peer_name} table {} key {}: both sides inserted a row \
                 there; both are kept, the peer's under key {new_key} (rekey, id {}). Try: \
                 update anything outside the database that holds the old id, then cr0sync db \
                 resolve {} --ack",
                r.table, r.key, r.id, r.id
            ),
            None => format!(
                "conflict in {name}/{peer_name} table {} key {}: {} wins ({}, id {}). Try: \
                 cr0sync db conflicts; cr0sync db resolve {} --keep central|peer|base or --ack",
                r.table, r.key, r.winner, r.kind, r.id, r.id
            ),
        };
        log::warn!("{line}");
        report.new_conflicts.push(line);
    }
    if write_peer {
        ctx.state.remove(&journal_name)?;
    }
    if write_peer || stale_marker {
        journal::drop_marker(&peer_path, busy);
    }
    log::info!("{name}/{peer_name}: {}", phases.text());

    let fingerprint = Fingerprint {
        config: digest,
        central: FileStat::of(&central_path),
        central_wal: FileStat::of(&wal(&central_path)),
        peer: peer_stat.0,
        peer_wal: peer_stat.1,
        // Rows left for the next run (changed meanwhile, or refused) must be retried even
        // if no file changes: never fast-path such a pair.
        racy: racy(&[peer_stat.0, peer_stat.1], seen_at)
            || report.tables.iter().any(|t| t.deferred > 0),
    };
    ctx.state.save(
        &state_file,
        &PairState {
            last_sync: now,
            fingerprint,
            report: report.clone(),
        },
    )?;
    Ok(report)
}

/// Wall time per phase of a sync, for the log.
struct Phases {
    last: std::time::Instant,
    done: Vec<(&'static str, u128)>,
}

impl Phases {
    fn start() -> Self {
        Phases {
            last: std::time::Instant::now(),
            done: Vec::new(),
        }
    }

    fn mark(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.done.push((name, (now - self.last).as_millis()));
        self.last = now;
    }

    fn text(&self) -> String {
        let parts: Vec<String> = self
            .done
            .iter()
            .map(|(n, ms)| format!("{n} {ms} ms"))
            .collect();
        parts.join(", ")
    }
}
