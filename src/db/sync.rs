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

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, TransactionBehavior, params_from_iter};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{DbConfig, Direction, PeerConfig};
use crate::context::Context;
use crate::db::apply::{apply, open_for_merge};
use crate::db::backup;
use crate::db::base;
use crate::db::conflicts::ConflictRecord;
use crate::db::journal::{self, Journal};
use crate::db::merge::{
    self, Change, Conflict, Counts, Rules, TableSpec, Winner, counts, merge_key, multiset,
};
use crate::db::migrate;
use crate::db::rekey;
use crate::db::snapshot::{self, Schema, quote};
use crate::db::value::{Cell, Key, Row};
use crate::fsutil;
use crate::ops::fault;
use crate::output::Progress;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileStat {
    fn of(path: &Path) -> Option<FileStat> {
        let m = std::fs::metadata(path).ok()?;
        Some(FileStat {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: crate::util::mtime_ns(&m),
        })
    }
}

/// What the fast path compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Digest of the pair's configuration: a changed policy or table list re-merges.
    pub config: String,
    pub central: Option<FileStat>,
    pub central_wal: Option<FileStat>,
    pub peer: Option<FileStat>,
    pub peer_wal: Option<FileStat>,
    /// A file was modified within the filesystem's timestamp resolution of being looked
    /// at, so an equal fingerprint would not prove it unchanged: never fast-path it.
    pub racy: bool,
}

fn wal(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

fn config_digest(db: &DbConfig, peer: &PeerConfig, rules: Rules) -> String {
    let text = format!(
        "{:?}|{:?}|{}|{:?}|{:?}|{}",
        rules.policy,
        rules.direction,
        db.updated_at,
        db.counters,
        db.exclude_tables,
        peer.path.get_ref().display()
    );
    let digest = Sha256::digest(text.as_bytes());
    crate::util::hex(&digest[..12])
}

/// Racy when modified less than two seconds before `now` (coarse filesystem clocks).
fn racy(stats: &[Option<FileStat>], now: std::time::SystemTime) -> bool {
    let now_ns = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    stats
        .iter()
        .flatten()
        .any(|s| now_ns - s.mtime_ns < 2_000_000_000)
}

enum BaseState {
    /// The base holds this table with the same schema.
    Fresh,
    /// No base for this table yet (first sync), or its schema changed: merged as a first
    /// sync and copied into the base afterwards.
    Rebuild,
}

/// The merge of one table, before it is applied.
struct Work {
    schema: Schema,
    spec: TableSpec,
    base: BaseState,
    to_central: Vec<Change>,
    to_peer: Vec<Change>,
    /// Keyed tables with a fresh base: the base changes (applied unless a side deferred).
    to_base: Vec<Change>,
    /// Multisets: per row, the base count after the sync and the count to keep if a side
    /// deferred the row.
    multiset_base: Vec<(Row, u64, u64)>,
    conflicts: Vec<Conflict>,
    counter_merges: usize,
    /// Keyed tables: the new base row of every key the peer is to take (for the journal).
    new_base: BTreeMap<Key, Option<Row>>,
    /// Rows of the peer moved to fresh keys (see `rekey`), with the references rewritten:
    /// written to the peer before `to_peer` (which is relative to the moved snapshot), all
    /// of them or none.
    peer_edits: Vec<Change>,
}

impl Work {
    fn keyed(&self) -> bool {
        self.spec.keyed()
    }
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

fn spec_of(db: &DbConfig, schema: &Schema) -> TableSpec {
    schema.spec(
        db.counters
            .get(&schema.name)
            .map(Vec::as_slice)
            .unwrap_or(&[]),
        &db.updated_at,
    )
}

/// Completes a sync that stopped between its peer commit and its central commit (see
/// `journal`). Returns whether there was anything to complete.
fn complete_interrupted(
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
fn commit_central(
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
fn journal_of(
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
fn undo(conn: &Connection, w: &Work, keys: &BTreeSet<Key>) -> Result<()> {
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

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path is not UTF-8: {}", p.display()))
}

/// Opens the central copy for writing (never creating it) in rollback-journal mode, which
/// the atomic commit with the base needs. The central copy is cr0sync's own file.
fn open_central(path: &Path, busy: std::time::Duration) -> Result<Connection> {
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
const PARALLEL_DIFF_BYTES: u64 = 8 << 20;

/// A read-only connection to the same central copy, snapshot (`p`) and base (`b`) as
/// `conn`, for reading beside it on another thread.
fn open_reader(conn: &Connection) -> Result<Connection> {
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

/// Columns a migration added on one side are added to the other side, the snapshot and
/// the base (see `migrate`), backups first, so the table merges cell by cell.
fn add_migrated_columns(
    ctx: &Context,
    conn: &Connection,
    db: &DbConfig,
    peer_path: &Path,
    now: DateTime<Utc>,
    report: &mut PairReport,
) -> Result<()> {
    let (name, peer_name) = (db.name.get_ref().as_str(), report.peer.clone());
    let central = tables(conn, "main", db)?;
    let peer = tables(conn, "p", db)?;
    // A virtual table's columns cannot be added to (a difference skips it, named).
    let fixed: BTreeSet<String> = snapshot::virtual_tables(conn, "main")?
        .into_iter()
        .chain(snapshot::virtual_tables(conn, "p")?)
        .map(|v| v.name)
        .collect();
    for (table, c) in &central {
        let Some(p) = peer.get(table).filter(|_| !fixed.contains(table)) else {
            continue;
        };
        if let Some(cols) = migrate::added_columns(p, c) {
            // The central copy has them: the peer (live, then its snapshot) gets them.
            maybe_backup(ctx, name, &peer_name, conn, "p", now, report)?;
            let live = open_for_merge(peer_path, ctx.config.general.busy_timeout.0)?;
            for (col, _) in cols {
                let decl = migrate::declaration(conn, "main", table, col)?;
                migrate::add_column(&live, "main", table, &decl)
                    .with_context(|| format!("{name}/{peer_name}: peer {}", peer_path.display()))?;
                migrate::add_column(conn, "p", table, &decl)?;
                log::warn!(
                    "{name}/{peer_name} table {table}: column {col} (added by a migration \
                     elsewhere) added to the peer"
                );
            }
        } else if let Some(cols) = migrate::added_columns(c, p) {
            maybe_backup(ctx, name, "central", conn, "main", now, report)?;
            for (col, _) in cols {
                let decl = migrate::declaration(conn, "p", table, col)?;
                migrate::add_column(conn, "main", table, &decl)?;
                log::warn!(
                    "{name}/{peer_name} table {table}: column {col} (added by a migration on \
                     the peer) added to the central copy"
                );
            }
        }
    }
    // The base follows the sides that now agree: existing base rows take the default the
    // migration gave every existing row, so only real edits differ from it.
    let central = tables(conn, "main", db)?;
    let peer = tables(conn, "p", db)?;
    for b in snapshot::schemas(conn, "b")? {
        let (Some(c), Some(p)) = (central.get(&b.name), peer.get(&b.name)) else {
            continue;
        };
        if c != p {
            continue;
        }
        if let Some(cols) = migrate::added_columns(&b, c) {
            for (col, _) in cols {
                let decl = migrate::base_declaration(conn, "main", &b.name, col)?;
                migrate::add_column(conn, "b", &b.name, &decl)?;
            }
        }
    }
    Ok(())
}

/// The tables of attached database `schema` that merge row by row, by name, less
/// `exclude_tables`: the ordinary tables and the virtual tables that hold their own rows
/// (FTS without `content=`, R*Tree), keyed by rowid.
fn tables(conn: &Connection, schema: &str, db: &DbConfig) -> Result<BTreeMap<String, Schema>> {
    let mut out: BTreeMap<String, Schema> = snapshot::schemas(conn, schema)?
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    for v in snapshot::virtual_tables(conn, schema)? {
        if v.own_content {
            out.insert(v.name.clone(), snapshot::virtual_schema(conn, schema, &v)?);
        }
    }
    out.retain(|name, _| !db.exclude_tables.contains(name));
    Ok(out)
}

/// Which tables merge, and which are skipped with a reason.
fn plan_tables(
    conn: &Connection,
    db: &DbConfig,
    report: &mut PairReport,
) -> Result<Vec<(Schema, BaseState)>> {
    let central = tables(conn, "main", db)?;
    let peer = tables(conn, "p", db)?;
    let base = tables(conn, "b", db)?;
    let names: BTreeSet<&String> = central.keys().chain(peer.keys()).collect();
    let mut out = Vec::new();
    for table in names {
        let reason = match (central.get(table), peer.get(table)) {
            (Some(_), None) => Some(
                "exists in the central copy only. Try: create it in the peer with the same \
                 columns and key, or exclude_tables"
                    .to_string(),
            ),
            (None, Some(_)) => Some(
                "exists in the peer only. Try: create it in the central copy with the same \
                 columns and key (sqlite3 databases/<db>.db), or exclude_tables"
                    .to_string(),
            ),
            (Some(c), Some(p)) if c != p => Some(format!(
                "columns or primary key differ: central {} / peer {}. Try: make them agree \
                 (a column added by a migration is propagated by itself; a dropped, renamed or \
                 retyped column is not), then the next run merges the table",
                describe(c),
                describe(p)
            )),
            _ => None,
        };
        if let Some(reason) = reason {
            log::warn!("{} table {table} skipped: {reason}", db.name.get_ref());
            report.skipped_tables.push(SkippedTable {
                table: table.clone(),
                reason,
            });
            continue;
        }
        let Some(schema) = central.get(table) else {
            continue;
        };
        let state = match base.get(table) {
            Some(b) if b == schema => BaseState::Fresh,
            Some(_) => {
                log::warn!(
                    "{} table {table}: its schema changed on both sides since the last sync; \
                     merging it as a first sync",
                    db.name.get_ref()
                );
                BaseState::Rebuild
            }
            None => BaseState::Rebuild,
        };
        out.push((schema.clone(), state));
    }
    Ok(out)
}

/// The virtual tables of a pair: an external-content FTS index on both sides is kept up to
/// date (returned as `(index, content table)`, rebuilt where its content table is
/// written); any other virtual table is skipped with a message. Their shadow tables are
/// never merged (`snapshot::schemas` leaves them out).
fn plan_virtual_tables(
    conn: &Connection,
    db: &DbConfig,
    report: &mut PairReport,
) -> Result<Vec<(String, String)>> {
    let central = snapshot::virtual_tables(conn, "main")?;
    let peer = snapshot::virtual_tables(conn, "p")?;
    let names: BTreeSet<&String> = central.iter().chain(&peer).map(|v| &v.name).collect();
    let mut out = Vec::new();
    for name in names {
        if db.exclude_tables.contains(name) {
            continue;
        }
        let (c, p) = (
            central.iter().find(|v| &v.name == name),
            peer.iter().find(|v| &v.name == name),
        );
        if let (Some(c), Some(p)) = (c, p)
            && c == p
            && let Some(content) = &c.content
        {
            out.push((name.clone(), content.clone()));
            continue;
        }
        // Merged row by row by `plan_tables` (a difference in shape is named there).
        if c.or(p).is_some_and(|v| v.own_content) {
            continue;
        }
        let module = c.or(p).map(|v| v.module.as_str()).unwrap_or_default();
        let reason = format!(
            "virtual table ({module}): cr0sync cannot merge its rows (it merges FTS indexes \
             that hold their own content and R*Trees by rowid, and rebuilds external-content \
             FTS indexes from their content table); its shadow tables are left alone and the \
             other tables sync. Try: exclude_tables = [\"{name}\"] once its content lives in \
             an ordinary table"
        );
        log::warn!("{} table {name} skipped: {reason}", db.name.get_ref());
        report.skipped_tables.push(SkippedTable {
            table: name.clone(),
            reason,
        });
    }
    Ok(out)
}

/// Rebuilds, inside the caller's transaction on `db`, each FTS index whose content table
/// `changed` says was written (merged writes run without the triggers that keep it up to
/// date).
fn rebuild_indexes(
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

fn describe(s: &Schema) -> String {
    let cols: Vec<String> = s
        .columns
        .iter()
        .enumerate()
        .map(|(i, (n, t))| {
            let pk = if s.pk.contains(&i) { " PK" } else { "" };
            format!("{n} {t}{pk}").trim_end().to_string()
        })
        .collect();
    format!("({})", cols.join(", "))
}

/// The base, central and peer rows of one key (`None`: absent).
type Sides = [Option<Row>; 3];

/// The keys whose rows differ between the central copy and the snapshot, with their base,
/// central and peer rows, found in SQL: the comparison `sqldiff` makes (columns compared
/// with `IS`), one pass over each side, the base consulted only for rows that differ.
fn differing_rows(
    conn: &Connection,
    reader: Option<&std::sync::Mutex<Connection>>,
    schema: &Schema,
    spec: &TableSpec,
    with_base: bool,
) -> Result<BTreeMap<Key, Sides>> {
    let t = quote(&schema.name);
    let cols: Vec<String> = spec.columns.iter().map(|c| quote(c)).collect();
    let pk: Vec<&String> = spec.pk.iter().map(|&i| &cols[i]).collect();
    // `=` on the key lets SQLite walk the other side's key index; a NULL key (possible
    // in rowid tables) never matches, so its row is merely looked at again, never missed.
    let on_key = |a: &str, b: &str| -> String {
        pk.iter()
            .map(|c| format!("{a}.{c} = {b}.{c}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let all = |a: &str| -> String {
        cols.iter()
            .map(|c| format!("{a}.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let differs: String = cols
        .iter()
        .enumerate()
        .filter(|(i, _)| !spec.pk.contains(i))
        .map(|(_, c)| format!(" OR x.{c} IS NOT c.{c}"))
        .collect();
    // The base row, joined only to rows that differ (after the WHERE filter).
    let base_part = |side: &str| -> (String, String) {
        if with_base {
            (
                format!(", o.{} IS NULL, {}", pk[0], all("o")),
                format!(" LEFT JOIN b.{t} AS o ON {}", on_key("o", side)),
            )
        } else {
            (String::new(), String::new())
        }
    };
    let (base_cols, base_join) = base_part("c");
    let n = cols.len();
    // Reads `n` cells from column `at`, or `None` if the flag column before them is set.
    let read = |r: &rusqlite::Row, at: usize| -> rusqlite::Result<Option<Row>> {
        if r.get::<_, bool>(at)? {
            return Ok(None);
        }
        (at + 1..=at + n)
            .map(|i| r.get::<_, Cell>(i))
            .collect::<Result<_, _>>()
            .map(Some)
    };
    // Rows equal on both sides still matter when the base disagrees: a row both sides
    // inserted alike must enter the base (or a later delete of it would be undone), and a
    // counter both sides moved by the same delta leaves the rows equal (+1 and +1 is +2).
    let base_disagrees: String = if with_base {
        let moved: String = spec
            .counters
            .iter()
            .map(|&i| format!(" OR c.{0} IS NOT o.{0}", cols[i]))
            .collect();
        format!(" OR o.{} IS NULL{moved}", pk[0])
    } else {
        String::new()
    };
    let changed = format!(
        "SELECT 0, {}, x.{} IS NULL, {}{base_cols} FROM main.{t} AS c \
         LEFT JOIN p.{t} AS x ON {}{base_join} WHERE x.{} IS NULL{differs}{base_disagrees}",
        all("c"),
        pk[0],
        all("x"),
        on_key("x", "c"),
        pk[0],
    );
    // Central rows without a base row, and peer-only rows with one: with the table sizes
    // they tell whether any base row is missing from both sides (see below).
    let central_side = || -> Result<(i64, Vec<(Key, Sides)>)> {
        let mut stmt = conn.prepare(&changed)?;
        let mut rows = stmt.query([])?;
        let mut central_unbased = 0i64;
        let mut found = Vec::new();
        while let Some(r) = rows.next()? {
            let c = read(r, 0)?;
            let p = read(r, n + 1)?;
            let b = if with_base { read(r, 2 * n + 2)? } else { None };
            if let Some(c) = c {
                central_unbased += i64::from(b.is_none());
                found.push((spec.key_of(&c), [b, Some(c), p]));
            }
        }
        Ok((central_unbased, found))
    };
    let (base_cols, base_join) = base_part("x");
    let peer_only = format!(
        "SELECT 0, {}{base_cols} FROM p.{t} AS x LEFT JOIN main.{t} AS c ON {}{base_join} \
         WHERE c.{} IS NULL",
        all("x"),
        on_key("c", "x"),
        pk[0],
    );
    let count_sql = |db: &str| format!("SELECT count(*) FROM {db}.{t}");
    let counts = [count_sql("main"), count_sql("b")];
    // The peer's side (its rows the central copy lacks, and the table sizes) reads other
    // pages than the central side: on a large table it runs on a second connection, on
    // the other core, meanwhile.
    let peer_side = |conn: &Connection| -> Result<(Vec<Sides>, i64, [i64; 2])> {
        let mut found = Vec::new();
        let mut peer_only_based = 0i64;
        let mut stmt = conn.prepare(&peer_only)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let p = read(r, 0)?;
            let b = if with_base { read(r, n + 1)? } else { None };
            if let Some(p) = p {
                peer_only_based += i64::from(b.is_some());
                found.push([b, None, Some(p)]);
            }
        }
        let mut sizes = [0i64; 2];
        if with_base {
            for (size, sql) in sizes.iter_mut().zip(&counts) {
                *size = conn.query_row(sql, [], |r| r.get(0))?;
            }
        }
        Ok((found, peer_only_based, sizes))
    };
    let (central_side, peer_side) = match reader {
        Some(reader) => std::thread::scope(|s| {
            let peer = s.spawn(|| {
                let reader = reader
                    .lock()
                    .map_err(|_| anyhow::anyhow!("the second reader failed earlier"))?;
                peer_side(&reader)
            });
            let central = central_side();
            let peer = peer
                .join()
                .map_err(|_| anyhow::anyhow!("the second reader stopped unexpectedly"))
                .and_then(|r| r);
            (central, peer)
        }),
        None => (central_side(), peer_side(conn)),
    };
    let (central_unbased, found) = central_side?;
    let (peer_found, peer_only_based, [central_rows, base_rows]) = peer_side?;
    let mut out: BTreeMap<Key, Sides> = found.into_iter().collect();
    for sides in peer_found {
        if let Some(p) = &sides[2] {
            out.insert(spec.key_of(p), sides);
        }
    }
    // Base rows whose key the central copy lacks number `central_unbased - (central rows -
    // base rows)`; those the peer still holds were just found. Only if some are left (rows
    // both sides deleted) is the base scanned for them. NULL keys only make the count err
    // towards scanning.
    let gone_from_both = if with_base {
        central_unbased - (central_rows - base_rows) - peer_only_based
    } else {
        0
    };
    if gone_from_both != 0 {
        // Rows both sides deleted: the base lets go of them.
        let same = |a: &str| -> String {
            pk.iter()
                .map(|c| format!("{a}.{c} IS o.{c}"))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let base_only = format!(
            "SELECT 0, {} FROM b.{t} AS o WHERE NOT EXISTS (SELECT 1 FROM main.{t} AS c WHERE \
             {}) AND NOT EXISTS (SELECT 1 FROM p.{t} AS c WHERE {})",
            all("o"),
            same("c"),
            same("c"),
        );
        let mut stmt = conn.prepare(&base_only)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            if let Some(b) = read(r, 0)? {
                out.entry(spec.key_of(&b)).or_insert([Some(b), None, None]);
            }
        }
    }
    Ok(out)
}

fn merge_keyed(
    conn: &Connection,
    reader: Option<&std::sync::Mutex<Connection>>,
    schema: Schema,
    spec: TableSpec,
    base: BaseState,
    rules: Rules,
) -> Result<Work> {
    let fresh = matches!(base, BaseState::Fresh);
    let mut keys = differing_rows(conn, reader, &schema, &spec, fresh)
        .with_context(|| format!("cannot compare table {}", schema.name))?;
    let mut w = Work {
        schema,
        spec,
        base,
        to_central: Vec::new(),
        to_peer: Vec::new(),
        to_base: Vec::new(),
        multiset_base: Vec::new(),
        conflicts: Vec::new(),
        counter_merges: 0,
        new_base: BTreeMap::new(),
        peer_edits: Vec::new(),
    };
    // Rows with a NULL in a key column (SQLite allows it outside INTEGER PRIMARY KEY) are
    // no key at all: several may share one. They merge as whole rows, like a table
    // without a key, so none is lost and none flips between runs.
    keys.retain(|key, _| !key.iter().any(Cell::is_null));
    let null_key = null_key(&w.spec);
    let null_rows = |db: &str| -> Result<Vec<Row>> {
        let cols: Vec<String> = w.spec.columns.iter().map(|c| quote(c)).collect();
        let mut stmt = conn.prepare(&format!(
            "SELECT {} FROM {db}.{} WHERE {}",
            cols.join(", "),
            quote(&w.spec.name),
            null_key
        ))?;
        let rows = stmt.query_map([], |r| {
            (0..cols.len())
                .map(|i| r.get::<_, Cell>(i))
                .collect::<Result<Row, _>>()
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    };
    let (nc, np) = (null_rows("main")?, null_rows("p")?);
    let nb = if fresh { Some(null_rows("b")?) } else { None };
    if !(nc.is_empty() && np.is_empty() && nb.as_ref().is_none_or(Vec::is_empty)) {
        let whole = TableSpec {
            pk: Vec::new(),
            ..w.spec.clone()
        };
        let m = merge::merge_table(&whole, rules, nb.as_deref(), &nc, &np);
        w.to_central.extend(m.to_central);
        w.to_peer.extend(m.to_peer);
        let (bm, cm, pm, newm) = (
            nb.as_deref().map(multiset),
            multiset(&nc),
            multiset(&np),
            multiset(&m.new_base),
        );
        let count = |m: &BTreeMap<Row, u64>, r: &Row| m.get(r).copied().unwrap_or(0);
        let rows: BTreeSet<&Row> = cm.keys().chain(pm.keys()).chain(newm.keys()).collect();
        for r in rows {
            let fallback = match &bm {
                Some(bm) => count(bm, r),
                None => count(&cm, r).min(count(&pm, r)),
            };
            w.multiset_base.push((r.clone(), count(&newm, r), fallback));
        }
    }
    // Consumed as merged, so each key's three rows are freed once its changes are made.
    for (key, [b, c, p]) in keys {
        let key = &key;
        let m = merge_key(&w.spec, rules, key, b.as_ref(), c.as_ref(), p.as_ref());
        w.counter_merges += usize::from(m.counter_merged);
        w.conflicts.extend(m.conflict);
        w.to_central.extend(m.to_central);
        if let Some(ch) = m.to_peer {
            w.to_peer.push(ch);
            w.new_base.insert(key.clone(), m.new_base.clone());
        }
        if matches!(w.base, BaseState::Fresh) {
            w.to_base
                .extend(merge::change(key, b.as_ref(), m.new_base.as_ref()));
        }
    }
    Ok(w)
}

fn merge_one(
    conn: &Connection,
    reader: Option<&std::sync::Mutex<Connection>>,
    schema: Schema,
    spec: TableSpec,
    base: BaseState,
    rules: Rules,
) -> Result<Work> {
    if spec.keyed() {
        merge_keyed(conn, reader, schema, spec, base, rules)
    } else {
        merge_multiset(conn, schema, spec, base, rules)
    }
}

/// `(table, key)` of every insert/insert conflict on a table keyed by its rowid whose base
/// is known (on a first sync every difference looks like one).
fn collisions(conn: &Connection, works: &[Work]) -> Result<Vec<(String, Key)>> {
    let mut out = Vec::new();
    for w in works {
        if !w.keyed()
            || !matches!(w.base, BaseState::Fresh)
            || !w
                .conflicts
                .iter()
                .any(|c| c.kind == merge::ConflictKind::InsertInsert)
            || !rekey::rowid_key(conn, "main", &w.schema)?
        {
            continue;
        }
        out.extend(
            w.conflicts
                .iter()
                .filter(|c| c.kind == merge::ConflictKind::InsertInsert)
                .map(|c| (w.spec.name.clone(), c.key.clone())),
        );
    }
    Ok(out)
}

/// Moves the peer's row of every collision to a fresh key in the snapshot (see `rekey`),
/// merges the tables the moves touched again, and records each move as a `rekey`
/// conflict; the moves become those tables' `peer_edits`. Repeated until no collision is
/// left: two rows that looked identical (the same audit line for user 3 on both sides)
/// differ once one side's user 3 has moved, and collide in turn.
fn rekey_rows(
    conn: &Connection,
    db: &DbConfig,
    mut works: Vec<Work>,
    rules: Rules,
) -> Result<Vec<Work>> {
    let specs: BTreeMap<String, TableSpec> = works
        .iter()
        .map(|w| (w.spec.name.clone(), w.spec.clone()))
        .collect();
    let mut mover = rekey::Mover::default();
    let mut moves: Vec<rekey::Moved> = Vec::new();
    let mut centrals: BTreeMap<(String, Key), Option<Row>> = BTreeMap::new();
    loop {
        let found: Vec<(String, Key)> = collisions(conn, &works)?
            .into_iter()
            .filter(|c| !centrals.contains_key(c))
            .collect();
        if found.is_empty() {
            break;
        }
        for (t, k) in &found {
            let row = snapshot::lookup(conn, &snapshot::lookup_sql(&specs[t], "main"), k)?;
            centrals.insert((t.clone(), k.clone()), row);
        }
        moves.extend(mover.move_rows(conn, &specs, &found, &db.rekey_refs)?);
        let tables = mover.tables();
        works = works
            .into_iter()
            .map(|w| {
                if tables.contains(w.spec.name.as_str()) {
                    merge_one(conn, None, w.schema, w.spec, w.base, rules)
                } else {
                    Ok(w)
                }
            })
            .collect::<Result<_>>()?;
    }
    let mut edits = mover.edits(conn, &specs)?;
    for w in &mut works {
        let Some(edits) = edits.remove(&w.spec.name) else {
            continue;
        };
        if w.keyed() {
            // Keys only the moves changed: the peer holds the merge's result once they
            // are written (the journal needs it as their new base).
            let sql = snapshot::lookup_sql(&w.spec, "p");
            for e in &edits {
                let key = merge::target_of(e);
                if !w.new_base.contains_key(key) {
                    w.new_base
                        .insert(key.clone(), snapshot::lookup(conn, &sql, key)?);
                }
            }
        }
        w.peer_edits = edits;
    }
    for m in moves {
        let Some(w) = works.iter_mut().find(|w| w.spec.name == m.table) else {
            continue;
        };
        let mut result = m.row.clone();
        result[w.spec.pk[0]] = m.to[0].clone();
        let refs: Vec<String> = m
            .references
            .iter()
            .map(|(c, n)| format!("{n} in {c}"))
            .collect();
        log::warn!(
            "table {}: both sides inserted a row under key {}; the peer's moved to {}{} \
             (recorded)",
            m.table,
            serde_json::to_string(&m.from).unwrap_or_default(),
            serde_json::to_string(&m.to).unwrap_or_default(),
            if refs.is_empty() {
                String::new()
            } else {
                format!(", with the rows referencing it ({})", refs.join(", "))
            }
        );
        let central = centrals
            .remove(&(m.table.clone(), m.from.clone()))
            .flatten();
        w.conflicts.push(Conflict {
            table: m.table,
            key: m.from,
            kind: merge::ConflictKind::Rekey,
            base: None,
            central,
            peer: Some(m.row),
            winner: Winner::Central,
            result: Some(result),
            moved_to: Some(m.to),
        });
    }
    Ok(works)
}

fn merge_multiset(
    conn: &Connection,
    schema: Schema,
    spec: TableSpec,
    base: BaseState,
    rules: Rules,
) -> Result<Work> {
    let c = snapshot::rows(conn, "main", &schema)?;
    let p = snapshot::rows(conn, "p", &schema)?;
    let b = match base {
        BaseState::Fresh => Some(snapshot::rows(conn, "b", &schema)?),
        BaseState::Rebuild => None,
    };
    let m = merge::merge_table(&spec, rules, b.as_deref(), &c, &p);
    let (bm, cm, pm) = (b.as_deref().map(multiset), multiset(&c), multiset(&p));
    let nm = multiset(&m.new_base);
    let all: BTreeSet<&Row> = cm.keys().chain(pm.keys()).chain(nm.keys()).collect();
    let count = |m: &BTreeMap<Row, u64>, r: &Row| m.get(r).copied().unwrap_or(0);
    let multiset_base = all
        .into_iter()
        .map(|r| {
            let fallback = match &bm {
                Some(bm) => count(bm, r),
                None => count(&cm, r).min(count(&pm, r)),
            };
            (r.clone(), count(&nm, r), fallback)
        })
        .collect();
    Ok(Work {
        schema,
        spec,
        base,
        to_central: m.to_central,
        to_peer: m.to_peer,
        to_base: Vec::new(),
        multiset_base,
        conflicts: m.conflicts,
        counter_merges: m.counter_merges,
        new_base: BTreeMap::new(),
        peer_edits: Vec::new(),
    })
}

/// The UNIQUE constraints (other than the key) of a table, as column indices; indexes on
/// expressions and partial indexes are left to the database (a write they refuse is
/// reported and retried next run).
fn unique_indexes(conn: &Connection, db: &str, spec: &TableSpec) -> Result<Vec<Vec<usize>>> {
    let mut out = Vec::new();
    let mut list = conn.prepare(&format!("PRAGMA {db}.index_list({})", quote(&spec.name)))?;
    let indexes: Vec<(String, bool, String, bool)> = list
        .query_map([], |r| Ok((r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
        .collect::<Result<_, _>>()?;
    for (name, unique, origin, partial) in indexes {
        if !unique || origin == "pk" || partial {
            continue;
        }
        let mut info = conn.prepare(&format!("PRAGMA {db}.index_info({})", quote(&name)))?;
        let cols: Vec<Option<String>> = info
            .query_map([], |r| r.get(2))?
            .collect::<Result<_, _>>()?;
        let idx: Option<Vec<usize>> = cols
            .iter()
            .map(|c| {
                c.as_ref()
                    .and_then(|c| spec.columns.iter().position(|n| n == c))
            })
            .collect();
        if let Some(idx) = idx {
            out.push(idx);
        }
    }
    Ok(out)
}

/// Rows the merge would write into a side where a row under another key holds the same
/// value of a UNIQUE constraint (the same nick registered under two ids, one on each
/// side) are `unique` conflicts, resolved by the policy between the two rows: the loser
/// is removed from the side that holds it (and not copied to the other), and recorded.
/// Both sides then converge on the winner. Values freed or swapped by the same set of
/// changes are no conflict (`apply` writes them in a working order).
fn resolve_unique(conn: &Connection, w: &mut Work, rules: Rules) -> Result<()> {
    if !w.keyed() {
        return Ok(());
    }
    let indexes = unique_indexes(conn, "main", &w.spec)?;
    if indexes.is_empty() {
        return Ok(());
    }
    for into_peer in [true, false] {
        let (side, origin) = if into_peer {
            ("p", "main")
        } else {
            ("main", "p")
        };
        let list = if into_peer { &w.to_peer } else { &w.to_central };
        // Each key's final row on this side after its changes (None: deleted).
        let finals: BTreeMap<Key, Option<Row>> = list
            .iter()
            .filter_map(|c| match c {
                Change::Upsert { key, new, .. } => Some((key.clone(), Some(new.clone()))),
                Change::Delete { key, .. } => Some((key.clone(), None)),
                Change::SetCount { .. } => None,
            })
            .collect();
        let mut found = Vec::new();
        for (key, row) in finals.iter().filter_map(|(k, r)| Some((k, r.as_ref()?))) {
            for cols in &indexes {
                if cols.iter().any(|&i| row[i].is_null()) {
                    continue; // NULLs never collide in a UNIQUE index
                }
                let same: Vec<String> = cols
                    .iter()
                    .enumerate()
                    .map(|(n, &i)| format!("{} IS ?{}", quote(&w.spec.columns[i]), n + 1))
                    .collect();
                let all: Vec<String> = w.spec.columns.iter().map(|c| quote(c)).collect();
                let sql = format!(
                    "SELECT {} FROM {side}.{} WHERE {}",
                    all.join(", "),
                    quote(&w.spec.name),
                    same.join(" AND ")
                );
                let values: Vec<&Cell> = cols.iter().map(|&i| &row[i]).collect();
                let mut stmt = conn.prepare_cached(&sql)?;
                let holders: Vec<Row> = stmt
                    .query_map(params_from_iter(values), |r| {
                        (0..all.len())
                            .map(|i| r.get::<_, Cell>(i))
                            .collect::<Result<Row, _>>()
                    })?
                    .collect::<Result<_, _>>()?;
                for holder in holders {
                    let h = w.spec.key_of(&holder);
                    let freed = finals.get(&h).is_some_and(|f| {
                        f.as_ref()
                            .is_none_or(|f| cols.iter().any(|&i| f[i] != row[i]))
                    });
                    if &h != key && !freed {
                        found.push((key.clone(), row.clone(), holder));
                    }
                }
            }
        }
        for (key, row, holder) in found {
            let h = w.spec.key_of(&holder);
            let (central, peer) = if into_peer {
                (&row, &holder)
            } else {
                (&holder, &row)
            };
            let winner = merge::pick(&w.spec, rules.policy, Some(central), Some(peer));
            let holder_wins = (winner == Winner::Peer) == into_peer;
            let (loser_key, loser_side) = if holder_wins {
                (key.clone(), origin)
            } else {
                (h.clone(), side)
            };
            // The loser leaves the side holding it and is copied nowhere.
            let loser_now =
                snapshot::lookup(conn, &snapshot::lookup_sql(&w.spec, loser_side), &loser_key)?;
            let (to_loser_side, to_other) = if loser_side == "p" {
                (&mut w.to_peer, &mut w.to_central)
            } else {
                (&mut w.to_central, &mut w.to_peer)
            };
            to_loser_side.retain(|c| merge::target_of(c) != &loser_key);
            to_other.retain(|c| merge::target_of(c) != &loser_key);
            if let Some(old) = loser_now.clone() {
                to_loser_side.push(Change::Delete {
                    key: loser_key.clone(),
                    old,
                });
            }
            w.to_base.retain(|c| merge::target_of(c) != &loser_key);
            w.to_base.push(Change::Delete {
                key: loser_key.clone(),
                old: Vec::new(),
            });
            w.new_base.remove(&loser_key);
            if loser_side == "p" {
                w.new_base.insert(loser_key.clone(), None);
            }
            w.conflicts.push(Conflict {
                table: w.spec.name.clone(),
                key: loser_key,
                kind: merge::ConflictKind::Unique,
                base: None,
                central: Some(central.clone()),
                peer: Some(peer.clone()),
                winner,
                result: Some(if holder_wins {
                    holder.clone()
                } else {
                    row.clone()
                }),
                moved_to: None,
            });
        }
    }
    Ok(())
}

/// A parent row deleted on one side while the other side still has rows referencing it
/// (a comment added to a post the bot deleted): applying the delete would leave orphans,
/// so the parent is kept (its deletion undone where it was deleted) and the conflict is
/// recorded. Declared single-column foreign keys are followed; cr0sync's own writes never
/// cascade, so after a sync `PRAGMA foreign_key_check` reports nothing new.
fn keep_referenced_parents(conn: &Connection, works: &mut [Work]) -> Result<()> {
    // (child table, child column, parent table) for every declared single-column key.
    let mut refs = Vec::new();
    for w in works.iter() {
        let mut stmt = conn.prepare(
            "SELECT id, \"table\", \"from\", count(*) OVER (PARTITION BY id) \
             FROM pragma_foreign_key_list(?1, 'main')",
        )?;
        let rows = stmt.query_map([&w.spec.name], |r| {
            Ok((
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        for row in rows {
            let (parent, from, parts) = row?;
            if parts == 1 {
                refs.push((w.spec.name.clone(), from, parent));
            }
        }
    }
    for (child, column, parent) in refs {
        let Some(pi) = works
            .iter()
            .position(|w| w.spec.name == parent && w.keyed())
        else {
            continue;
        };
        if works[pi].spec.pk.len() != 1 {
            continue;
        }
        for into_peer in [true, false] {
            // A delete on its way to `side`, whose rows may still reference the parent.
            let (side, origin) = if into_peer {
                ("p", "main")
            } else {
                ("main", "p")
            };
            let deletes: Vec<(Key, Row)> = {
                let list = if into_peer {
                    &works[pi].to_peer
                } else {
                    &works[pi].to_central
                };
                list.iter()
                    .filter_map(|c| match c {
                        Change::Delete { key, old } => Some((key.clone(), old.clone())),
                        _ => None,
                    })
                    .collect()
            };
            for (key, parent_row) in deletes {
                let ci = works.iter().position(|w| w.spec.name == child);
                let Some(ci) = ci else { continue };
                let child_deletes: BTreeSet<Key> = {
                    let list = if into_peer {
                        &works[ci].to_peer
                    } else {
                        &works[ci].to_central
                    };
                    list.iter()
                        .filter(|c| matches!(c, Change::Delete { .. }))
                        .map(|c| merge::target_of(c).clone())
                        .collect()
                };
                let cspec = works[ci].spec.clone();
                let kcols: Vec<String> =
                    cspec.pk.iter().map(|&i| quote(&cspec.columns[i])).collect();
                let sql = format!(
                    "SELECT {} FROM {side}.{} WHERE {} = ?1",
                    if kcols.is_empty() {
                        "rowid".to_string()
                    } else {
                        kcols.join(", ")
                    },
                    quote(&child),
                    quote(&column)
                );
                let mut stmt = conn.prepare_cached(&sql)?;
                let n = kcols.len().max(1);
                let referencing: Vec<Key> = stmt
                    .query_map([&key[0]], |r| {
                        (0..n)
                            .map(|i| r.get::<_, Cell>(i))
                            .collect::<Result<Key, _>>()
                    })?
                    .collect::<Result<_, _>>()?;
                let orphans = referencing
                    .iter()
                    .filter(|k| !child_deletes.contains(*k))
                    .count();
                if orphans == 0 {
                    continue;
                }
                // Keep the parent: no delete on `side`, and `origin` gets it back.
                let w = &mut works[pi];
                let (to_side, to_origin) = if into_peer {
                    (&mut w.to_peer, &mut w.to_central)
                } else {
                    (&mut w.to_central, &mut w.to_peer)
                };
                to_side.retain(|c| merge::target_of(c) != &key);
                to_origin.retain(|c| merge::target_of(c) != &key);
                let origin_now =
                    snapshot::lookup(conn, &snapshot::lookup_sql(&w.spec, origin), &key)?;
                if let Some(change) = merge::change(&key, origin_now.as_ref(), Some(&parent_row)) {
                    to_origin.push(change);
                }
                w.to_base.retain(|c| merge::target_of(c) != &key);
                w.to_base.push(Change::Upsert {
                    key: key.clone(),
                    old: None,
                    new: parent_row.clone(),
                });
                w.new_base.insert(key.clone(), Some(parent_row.clone()));
                let (central, peer) = if into_peer {
                    (None, Some(parent_row.clone()))
                } else {
                    (Some(parent_row.clone()), None)
                };
                let winner = if into_peer {
                    Winner::Peer
                } else {
                    Winner::Central
                };
                w.conflicts.push(Conflict {
                    table: w.spec.name.clone(),
                    key: key.clone(),
                    kind: merge::ConflictKind::ForeignKey,
                    base: None,
                    central,
                    peer,
                    winner,
                    result: Some(parent_row.clone()),
                    moved_to: None,
                });
                log::warn!(
                    "table {parent}: row {} was deleted on one side but {orphans} row(s) of {child} \
                     still reference it on the other; it is kept everywhere (recorded)",
                    serde_json::to_string(&key).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// `k1 IS NULL OR k2 IS NULL ...`: the rows of a keyed table that have no key.
fn null_key(spec: &TableSpec) -> String {
    let parts: Vec<String> = spec
        .pk
        .iter()
        .map(|&i| format!("{} IS NULL", quote(&spec.columns[i])))
        .collect();
    parts.join(" OR ")
}

/// The base's multiset rows as counts to write: the new count, or the old one for a row
/// a side left for the next run.
fn multiset_base_counts(w: &Work, deferred: &BTreeSet<Key>) -> Vec<Change> {
    w.multiset_base
        .iter()
        .map(|(row, keep, fallback)| Change::SetCount {
            row: row.clone(),
            old: 0,
            new: if deferred.contains(row) {
                *fallback
            } else {
                *keep
            },
        })
        .filter(|c| !matches!(c, Change::SetCount { new: 0, .. }))
        .collect()
}

/// Brings the base up to date for one table, inside the central transaction. Rows a side
/// deferred keep their old base, so the next run sees their change again.
/// Settles the base of every table for what the central copy now holds, less `deferred`.
fn settle_bases(
    conn: &Connection,
    works: &[Work],
    direction: Direction,
    deferred: &[BTreeSet<Key>],
) -> Result<()> {
    for (w, deferred) in works.iter().zip(deferred) {
        settle_base(conn, w, direction, deferred)?;
    }
    Ok(())
}

/// The base rows, before the base is settled, of the keys about to be written to the peer
/// (keyed tables with a base): what a key the peer leaves alone goes back to.
fn base_before(
    conn: &Connection,
    works: &[Work],
    to_peer: &[Vec<Change>],
) -> Result<Vec<BTreeMap<Key, Option<Row>>>> {
    works
        .iter()
        .zip(to_peer)
        .map(|(w, changes)| {
            let mut out = BTreeMap::new();
            if w.keyed() && matches!(w.base, BaseState::Fresh) {
                let sql = snapshot::lookup_sql(&w.spec, "b");
                for key in changes.iter().map(merge::target_of) {
                    if !key.iter().any(Cell::is_null) {
                        out.insert(key.clone(), snapshot::lookup(conn, &sql, key)?);
                    }
                }
            }
            Ok(out)
        })
        .collect()
}

/// Puts back the base of the keys the peer left alone (`left`) after `settle_bases` took
/// them in: their rows from `before`, or the table settled again with `deferred`.
fn unsettle(
    conn: &Connection,
    w: &Work,
    direction: Direction,
    deferred: &BTreeSet<Key>,
    left: &BTreeSet<Key>,
    before: &BTreeMap<Key, Option<Row>>,
) -> Result<()> {
    if !(w.keyed() && matches!(w.base, BaseState::Fresh)) {
        // Multisets and first syncs settle from scratch: again, with the rows left alone.
        return settle_base(conn, w, direction, deferred);
    }
    let back: Vec<Change> = left
        .iter()
        .filter_map(|key| {
            Some(match before.get(key)? {
                Some(row) => Change::Upsert {
                    key: key.clone(),
                    old: None,
                    new: row.clone(),
                },
                None => Change::Delete {
                    key: key.clone(),
                    old: Vec::new(),
                },
            })
        })
        .collect();
    crate::db::apply::overwrite(conn, "b", &w.spec, &back)?;
    settle_null_key_rows(conn, w, deferred)
}

/// Rows with a NULL in the key: their base is a multiset, like a keyless table's.
fn settle_null_key_rows(conn: &Connection, w: &Work, deferred: &BTreeSet<Key>) -> Result<()> {
    if !matches!(w.base, BaseState::Fresh) || w.multiset_base.is_empty() {
        return Ok(());
    }
    let t = quote(&w.schema.name);
    conn.execute_batch(&format!("DELETE FROM b.{t} WHERE {}", null_key(&w.spec)))?;
    let whole = TableSpec {
        pk: Vec::new(),
        ..w.spec.clone()
    };
    let changes = multiset_base_counts(w, deferred);
    apply(conn, "b", &whole, &changes)?;
    Ok(())
}

fn settle_base(
    conn: &Connection,
    w: &Work,
    direction: Direction,
    deferred: &BTreeSet<Key>,
) -> Result<()> {
    let t = quote(&w.schema.name);
    if !w.keyed() {
        if matches!(w.base, BaseState::Rebuild) {
            conn.execute_batch(&format!(
                "DROP TABLE IF EXISTS b.{t}; {}",
                base::create_table_sql(&w.schema, "b")
            ))?;
        } else {
            conn.execute_batch(&format!("DELETE FROM b.{t}"))?;
        }
        let changes = multiset_base_counts(w, deferred);
        apply(conn, "b", &w.spec, &changes)?;
        return Ok(());
    }
    settle_null_key_rows(conn, w, deferred)?;
    match w.base {
        BaseState::Fresh => {
            // The new base row of every settled key is what `from` now holds, so it is
            // copied in SQL; keys with a NULL cell (which `=` never matches) go row by row.
            let from = if direction == Direction::Pull {
                "p"
            } else {
                "main"
            };
            let settled = w.to_base.iter().filter_map(|c| match c {
                Change::Upsert { key, .. } | Change::Delete { key, .. } => {
                    (!deferred.contains(key)).then_some((key, c))
                }
                Change::SetCount { .. } => None,
            });
            let (plain, nulls): (Vec<_>, Vec<_>) =
                settled.partition(|(key, _)| !key.iter().any(Cell::is_null));
            let nulls: Vec<Change> = nulls.into_iter().map(|(_, c)| c.clone()).collect();
            crate::db::apply::overwrite(conn, "b", &w.spec, &nulls)?;
            if !plain.is_empty() {
                let pk: Vec<String> = w
                    .spec
                    .pk
                    .iter()
                    .map(|&i| quote(&w.spec.columns[i]))
                    .collect();
                let pk = pk.join(", ");
                conn.execute_batch(&format!(
                    "DROP TABLE IF EXISTS temp.cr0sync_keys; CREATE TEMP TABLE cr0sync_keys ({pk});"
                ))?;
                let marks: Vec<String> = (1..=w.spec.pk.len()).map(|i| format!("?{i}")).collect();
                let mut insert = conn.prepare(&format!(
                    "INSERT INTO temp.cr0sync_keys VALUES ({})",
                    marks.join(", ")
                ))?;
                for (key, _) in &plain {
                    insert.execute(params_from_iter(key.iter()))?;
                }
                let same_key: Vec<String> = w
                    .spec
                    .pk
                    .iter()
                    .map(|&i| {
                        let c = quote(&w.spec.columns[i]);
                        format!("s.{c} = k.{c}")
                    })
                    .collect();
                let same_key = same_key.join(" AND ");
                let kcols: Vec<String> = w
                    .spec
                    .pk
                    .iter()
                    .map(|&i| format!("k.{}", quote(&w.spec.columns[i])))
                    .collect();
                let kcols = kcols.join(", ");
                let named: Vec<String> = w.spec.columns.iter().map(|c| quote(c)).collect();
                let cols = named.join(", ");
                let scols: Vec<String> = named.iter().map(|c| format!("s.{c}")).collect();
                let scols = scols.join(", ");
                // Driven by the key list: one index lookup per key, never a scan.
                conn.execute_batch(&format!(
                    "INSERT OR REPLACE INTO b.{t} ({cols}) SELECT {scols} FROM temp.cr0sync_keys AS k \
                       JOIN {from}.{t} AS s ON {same_key};
                     DELETE FROM b.{t} WHERE ({pk}) IN (SELECT {kcols} FROM temp.cr0sync_keys \
                       AS k WHERE NOT EXISTS (SELECT 1 FROM {from}.{t} AS s WHERE {same_key}));
                     DROP TABLE temp.cr0sync_keys;"
                ))?;
            }
        }
        BaseState::Rebuild => {
            let from = if direction == Direction::Pull {
                "p"
            } else {
                "main"
            };
            base::copy_table(conn, &w.schema, from)?;
            let key_cols: Vec<String> = w
                .spec
                .pk
                .iter()
                .enumerate()
                .map(|(i, &c)| format!("{} IS ?{}", quote(&w.spec.columns[c]), i + 1))
                .collect();
            let sql = format!("DELETE FROM b.{t} WHERE {}", key_cols.join(" AND "));
            // (Deferred rows with a NULL in the key are whole rows, not keys: the next
            // first sync treats them as it treats a keyless table's.)
            for key in deferred.iter().filter(|k| k.len() == w.spec.pk.len()) {
                conn.execute(&sql, params_from_iter(key.iter()))?;
            }
        }
    }
    Ok(())
}

/// The mass-delete guard.
fn guard(conn: &Connection, works: &[Work], max_percent: u8, name: &str, peer: &str) -> Result<()> {
    for w in works {
        for (side, db, changes) in [
            ("central copy", "main", &w.to_central),
            ("peer", "p", &w.to_peer),
        ] {
            let deletes = counts(changes).deletes;
            if deletes == 0 {
                continue;
            }
            // Count rows only as far as the verdict needs: past `limit` rows the share
            // deleted is within max_delete (or, at 0%, the table is big enough to trip).
            let max = u64::from(max_percent);
            let limit = if max == 0 {
                100
            } else {
                (deletes * 100).div_ceil(max).max(100)
            };
            let rows: u64 = conn
                .query_row(
                    &format!(
                        "SELECT count(*) FROM (SELECT 1 FROM {db}.{} LIMIT {limit})",
                        quote(&w.schema.name)
                    ),
                    [],
                    |r| r.get::<_, i64>(0),
                )?
                .try_into()
                .unwrap_or(0);
            let trips = if rows >= limit {
                max == 0
            } else {
                rows >= 100 && deletes * 100 > max * rows
            };
            if trips {
                anyhow::bail!(
                    "{name}/{peer}: mass-delete guard: the sync would delete {deletes} of the \
                     {rows} rows of table {} in the {side} (max_delete {max_percent}%); nothing \
                     was written. If this is intended: cr0sync db sync --db {name} --peer {peer} \
                     --force",
                    w.schema.name
                );
            }
        }
    }
    Ok(())
}

/// What a peer's transaction writes besides its rows' changes.
struct PeerWrite<'a> {
    to_peer: &'a [Vec<Change>],
    txid: &'a str,
    fts: &'a [(String, String)],
    sequences: &'a [(String, i64, bool)],
}

/// `(table, highest sqlite_sequence of the two sides, the peer's is lower)` for the merged
/// tables with an AUTOINCREMENT counter on both sides.
fn sequence_targets(conn: &Connection, works: &[Work]) -> Result<Vec<(String, i64, bool)>> {
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
fn raise_sequences(conn: &Connection, sequences: &[(String, i64, bool)]) -> Result<()> {
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
fn write_peer_side(
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
fn maybe_backup(
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

/// Takes the exclusive lock on the central copy and the base for one transaction. A copy
/// held busy past `busy_timeout` is one clear error naming it and who holds it.
fn lock_central<'c>(conn: &'c Connection, path: &Path) -> Result<rusqlite::Transaction<'c>> {
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
