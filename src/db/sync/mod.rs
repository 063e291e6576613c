//! Syncing one (database, peer) pair: snapshot, diff, three-way merge, guarded and
//! backed-up apply, conflict records, new base.
//!
//! How a sync goes (the numbered steps of `sync_pair_inner`, one method each):
//! 1. Fast path (`fingerprint`): if the pair's files (device, inode, size, mtime of the
//!    database and its `-wal`) and its configuration match the fingerprint of the last
//!    successful sync, stop.
//! 2. Snapshot of the peer, into a copy kept in `state/db/<db>/<peer>.snapshot.db` (a
//!    peer in rollback-journal mode: only the blocks that differ from the kept copy are
//!    rewritten, under SQLite's shared lock; in WAL mode: the online backup API). The diff
//!    reads that copy, so the bot's writer is blocked only for the copy. The first time,
//!    the central copy is created from it.
//! 3. One connection (`connection`) holds the central copy as `main`, the snapshot as `p`
//!    and the base as `b`. A sync that stopped between its two commits is completed first
//!    (`commit`, from the journal of `db::journal`).
//! 4. Diff and plan. Keyed tables are compared page by page (`diff` through `db::btree`,
//!    for rowid tables) or in SQL (`diff`: central against snapshot, by primary key; for
//!    tables with counters also against the base, since equal deltas leave both sides
//!    equal), and each key whose rows differ is merged in Rust against the base as soon
//!    as it is found (`plan`, with `db::merge`); the plan holds each side's changes
//!    encoded one after another in one buffer (`db::changes`). Memory grows with the
//!    number of differing rows, not with the database. Tables without a
//!    primary key are merged as multisets. The plan is then fitted to the schema's rules
//!    (`constraints`: ids both sides handed out, UNIQUE, foreign keys) and checked by the
//!    mass-delete guard.
//! 5. Backups, the writes and the two commits (`commit`) in the order `db::journal` lays
//!    down, so a sync stopped at any instant is completed exactly by the next run; the
//!    base is settled inside the central commit (`settle`). Once the central copy's
//!    changes are written, the keys whose base they change are staged in a temporary
//!    table and their rows let go of (but for keys the peer takes too), so the plan's
//!    two sides are never held beside the peer's write.
//! 6. Only then is the fingerprint recorded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::config::{DbConfig, PeerConfig};
use crate::context::Context;
use crate::db::base;
use crate::db::journal::{self};
use crate::db::merge::{Counts, Rules, counts};
use crate::db::snapshot::{self};
use crate::fsutil;
use crate::output::Progress;

mod commit;
mod connection;
mod constraints;
mod diff;
mod fingerprint;
mod plan;
mod remote;
mod settle;

pub(crate) use commit::{PeerWriteSet, write_peer_tables};
pub(crate) use fingerprint::FileStat;
use fingerprint::{Fingerprint, Look};
use plan::{Plan, guard};
use remote::RemotePeer;

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
    hosts: &crate::remote::client::Hosts,
) -> Result<PairReport> {
    sync_pair_inner(ctx, db, peer, opts, now, hosts).map_err(|e| {
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

/// One pair's sync in progress: what every step reads, and the report the steps fill in.
pub(super) struct Pair<'a> {
    pub(super) ctx: &'a Context,
    pub(super) db: &'a DbConfig,
    pub(super) name: &'a str,
    pub(super) peer_name: &'a str,
    pub(super) rules: Rules,
    pub(super) opts: Options,
    /// Stamps conflicts, backups and the transaction id.
    pub(super) now: DateTime<Utc>,
    pub(super) busy: Duration,
    pub(super) central_path: PathBuf,
    pub(super) peer_path: PathBuf,
    pub(super) base_path: PathBuf,
    pub(super) journal_name: String,
    /// A peer on another host (then `peer_path` is the copy of it kept in `state/`).
    pub(super) remote: Option<RemotePeer>,
    pub(super) report: PairReport,
    pub(super) phases: crate::util::Phases,
}

/// The steps of the module doc, in order.
fn sync_pair_inner(
    ctx: &Context,
    db: &DbConfig,
    peer: &PeerConfig,
    opts: Options,
    now: DateTime<Utc>,
    hosts: &crate::remote::client::Hosts,
) -> Result<PairReport> {
    let mut pair = Pair::new(ctx, db, peer, opts, now, hosts)?;

    // 1. Fast path (for a peer on another host, one round trip).
    let peer_stat = match &pair.remote {
        Some(r) => r.stat()?,
        None => (
            FileStat::of(&pair.peer_path),
            FileStat::of(&fingerprint::wal(&pair.peer_path)),
        ),
    };
    let look = Look::now(db, peer, pair.rules, &pair.central_path, peer_stat);
    if pair.unchanged(&look)? {
        pair.report.unchanged = true;
        return Ok(pair.report);
    }

    // 2. Snapshot of the peer (the central copy is created from it the first time).
    let progress = Progress::new(format!("{}: snapshot of the peer", pair.label()), 0);
    let snap = pair.snapshot()?;
    if !pair.central_path.exists() {
        pair.report.created_central = true;
        if opts.dry_run {
            return Ok(pair.report);
        }
        progress.stage(format!("{}: creating the central copy", pair.label()));
        pair.create_central(&snap)?;
    }
    pair.phases.mark("snapshot");

    // 3. One connection; a sync stopped between its two commits is completed first.
    progress.stage(format!("{}: diff and merge", pair.label()));
    let conn = pair.open(&snap)?;
    let stale_marker = pair.complete_interrupted(&conn, &snap)?;

    // 4. Diff and plan, within the schema's rules and the mass-delete guard.
    let mut plan = pair.plan(&conn, &snap)?;
    pair.phases.mark("diff and merge");
    pair.report_plan(&plan);
    if !opts.force {
        guard(
            &conn,
            &plan.works,
            ctx.config.database.max_delete.0,
            pair.name,
            pair.peer_name,
        )?;
    }
    if opts.dry_run {
        return Ok(pair.report);
    }

    // 5. Backups, the writes and the two commits.
    progress.stage(format!("{}: backups and writes", pair.label()));
    let wrote_peer = pair.write(&conn, &mut plan, progress)?;
    // 6. The fingerprint, once the data it describes is durable; beside it, the commit
    // marker is dropped from a local peer (in any order: a marker left by a crash is
    // dropped by the next run, whose fingerprint cannot match the written peer).
    let drop_marker = wrote_peer || stale_marker;
    if let (true, Some(r)) = (drop_marker, &pair.remote) {
        r.drop_marker();
    }
    let recorded = std::thread::scope(|s| {
        if drop_marker && pair.remote.is_none() {
            let (peer, busy) = (&pair.peer_path, pair.busy);
            s.spawn(move || journal::drop_marker(peer, busy));
        }
        pair.record(look)
    });
    recorded?;
    pair.phases.mark("marker and fingerprint");
    log::info!("{}: {}", pair.label(), pair.phases.text());
    Ok(pair.report)
}

impl<'a> Pair<'a> {
    fn new(
        ctx: &'a Context,
        db: &'a DbConfig,
        peer: &'a PeerConfig,
        opts: Options,
        now: DateTime<Utc>,
        hosts: &crate::remote::client::Hosts,
    ) -> Result<Self> {
        let name = db.name.get_ref().as_str();
        let peer_name = peer.name.get_ref().as_str();
        let raw = peer.path.get_ref().to_string_lossy().into_owned();
        let remote = match crate::remote::client::Spec::parse(&raw) {
            None => None,
            Some(spec) => {
                let spec = spec.with_context(|| format!("{name}/{peer_name}"))?;
                let conn = hosts
                    .get(&spec)
                    .with_context(|| format!("{name}/{peer_name}"))?;
                Some(RemotePeer {
                    conn,
                    host: spec.host_label(),
                    path: spec.path,
                })
            }
        };
        let peer_path = match &remote {
            Some(_) => ctx
                .state
                .path(&crate::ops::state::names::remote_db_copy(name, peer_name)),
            None => ctx.resolve(peer.path.get_ref()),
        };
        let missing = match &remote {
            Some(r) => r.stat()?.0.is_none().then(|| r.label()),
            None => (!peer_path.exists()).then(|| peer_path.display().to_string()),
        };
        if let Some(missing) = missing {
            anyhow::bail!(
                "{name}/{peer_name}: peer database not found: {missing} (never created). Try: \
                 fix the peer's path in the configuration, or restore the file"
            );
        }
        Ok(Pair {
            ctx,
            db,
            name,
            peer_name,
            rules: Rules {
                policy: ctx.config.policy_of(db),
                direction: peer.direction,
            },
            opts,
            now,
            busy: ctx.config.general.busy_timeout.0,
            central_path: ctx.layout.central_db(name),
            peer_path,
            base_path: ctx.state.path(&base::name(name, peer_name)),
            journal_name: journal::name(name, peer_name),
            remote,
            report: PairReport {
                database: name.into(),
                peer: peer_name.into(),
                ..PairReport::default()
            },
            phases: crate::util::Phases::start(),
        })
    }

    /// `database/peer`, as messages name the pair.
    pub(super) fn label(&self) -> String {
        format!("{}/{}", self.name, self.peer_name)
    }

    /// Step 1: whether the pair's files and configuration are as the last sync left them.
    fn unchanged(&self, look: &Look) -> Result<bool> {
        let previous: Option<PairState> = self
            .ctx
            .state
            .load(&state_name(self.name, self.peer_name))?;
        Ok(previous.is_some_and(|p| look.matches(&p.fingerprint) && self.base_path.exists()))
    }

    /// Step 2: the peer's snapshot, in a copy kept in `state/` between syncs. A local peer
    /// is compared with it under SQLite's shared lock and only the blocks that differ are
    /// rewritten (a peer in WAL mode is copied afresh with the online backup API); a peer
    /// on another host is copied there by its server and only the pages that differ
    /// travel. Either way a change the sync makes to the copy (a migrated column, moved
    /// keys) is undone by the next snapshot, which compares every byte.
    fn snapshot(&mut self) -> Result<PathBuf> {
        self.phases = crate::util::Phases::start();
        if let Some(r) = &self.remote {
            if let Some(dir) = self.peer_path.parent() {
                fsutil::ensure_dir(dir, &self.ctx.perms)?;
            }
            r.fetch(&self.peer_path).with_context(|| self.label())?;
            return Ok(self.peer_path.clone());
        }
        // Kept between syncs: a fresh copy of a large peer every run would cost a new file
        // and fresh memory for its page cache each time (several times the copy itself on
        // a virtual machine that hands freed memory back to its host).
        let kept = self.ctx.state.path(&crate::ops::state::names::db_snapshot(
            self.name,
            self.peer_name,
        ));
        if let Some(dir) = kept.parent() {
            fsutil::ensure_dir(dir, &self.ctx.perms)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        snapshot::snapshot_kept(&self.peer_path, &kept, self.busy).with_context(|| self.label())?;
        self.ctx
            .perms
            .apply_file(&kept)
            .with_context(|| format!("cannot set the mode of {}", kept.display()))?;
        Ok(kept)
    }

    /// Step 2, the first time: the central copy is a copy of the peer's snapshot.
    fn create_central(&self, snap: &Path) -> Result<()> {
        fsutil::atomic_replace_with(&self.central_path, &self.ctx.perms, |tmp| {
            snapshot::snapshot_to(snap, tmp, self.busy)?;
            let c = Connection::open(tmp)?;
            c.pragma_update(None, "journal_mode", "delete")?;
            c.close().map_err(|(_, e)| e)?;
            Ok(())
        })
        .with_context(|| {
            format!(
                "cannot create the central copy {}",
                self.central_path.display()
            )
        })?;
        log::info!(
            "{}: central copy created from peer {}",
            self.name,
            self.peer_name
        );
        Ok(())
    }

    /// Step 4's figures, before anything is written.
    fn report_plan(&mut self, plan: &Plan) {
        for w in &plan.works {
            self.report.tables.push(TableReport {
                table: w.spec.name.clone(),
                central: w.to_central.counts(),
                peer: counts(&w.peer_edits) + w.to_peer.counts(),
                conflicts: w.conflicts.len(),
                counter_merges: w.counter_merges,
                deferred: 0,
            });
        }
    }

    /// Step 6: the fingerprint of the files as this sync saw them.
    fn record(&self, look: Look) -> Result<()> {
        // Rows left for the next run (changed meanwhile, or refused) must be retried even
        // if no file changes: never fast-path such a pair.
        let deferred = self.report.tables.iter().any(|t| t.deferred > 0);
        self.ctx.state.save(
            &state_name(self.name, self.peer_name),
            &PairState {
                last_sync: self.now,
                fingerprint: look.fingerprint(&self.central_path, deferred),
                report: self.report.clone(),
            },
        )
    }
}
