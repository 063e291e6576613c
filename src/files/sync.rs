//! Syncing one (tree, peer) pair. The steps:
//! 1. Both directories exist (a missing peer directory is an error, never an empty tree;
//!    the central one is created the first time).
//! 2. Writes a stopped run decided are completed first, from the journal (`store`).
//! 3. Both sides are listed (stat only); a file whose metadata matches the base (and was
//!    not modified just before it was seen, see `racy_margin`) is not read; the others are hashed, and
//!    read when small enough to merge.
//! 4. Each path is decided (`plan`); the mass-delete guard checks the whole plan.
//! 5. Losing contents of conflicts are kept under `state/`; then the journal, the merge
//!    results and the conflict records are committed in one transaction. Meanwhile the
//!    new contents of an `atomic` tree are written to temporary files (invisible under
//!    their names; a stopped run's are removed by the next).
//! 6. The writes ([`complete`]): per side, a file that holds its result is done, one that
//!    still holds what was decided on is written (optimistically), one the site changed
//!    meanwhile is merged again (JSON) or keeps the site's change; an entry whose sides
//!    all hold their results leaves the journal in the transaction that sets its base.
//! 7. Conflict records are appended to `state/conflicts.jsonl`, and unused contents
//!    dropped.
//!
//! A run stopped at any instant leaves no partial file under a real name (writes are
//! atomic, or in place under the site's lock with the content to restore in the journal),
//! and the next run completes the journal before it decides anything new: every change
//! is made once, every counter delta counted once, every conflict recorded once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::{TreeConfig, WriteMode};
use crate::conflicts::{self, ConflictRecord, Images};
use crate::context::Context;
use crate::files::json::{self, Prefer};
use crate::files::list::{self, Listing};
use crate::files::plan::{self, Counts, Known, Rules};
use crate::files::side::{Source, Staged, Tree};
use crate::files::store::{BaseEntry, JournalEntry, Seen, Settled, Side, Store};
use crate::files::write::{self, Current, Dir, Outcome};
use crate::fsutil;
use crate::ops::fault;
use crate::ops::state::names;
use crate::remote::client::{Hosts, Shared, Spec};

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub dry_run: bool,
    /// Override the mass-delete guard.
    pub force: bool,
}

/// What one pair's sync did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PairReport {
    pub tree: String,
    pub peer: String,
    /// Files on the central side after the sync.
    pub files: usize,
    pub central: Counts,
    pub peer_side: Counts,
    pub conflicts: usize,
    /// Writes left for the next run (the site changed or held the file meanwhile).
    pub deferred: usize,
    /// Writes of a stopped run completed first.
    pub recovered: usize,
    /// Paths skipped (symlinks, special files, names that are not UTF-8).
    pub skipped: Vec<String>,
    /// Directories that could not be read, with why: nothing below them is synced.
    #[serde(default)]
    pub unreadable: Vec<String>,
    /// One line per new conflict, for `cron files` to print.
    #[serde(default, skip_serializing)]
    pub new_conflicts: Vec<String>,
}

impl PairReport {
    pub fn summary(&self) -> String {
        format!(
            "{}/{}: {} change(s) to central, {} to the peer, {} conflict(s), {} deferred",
            self.tree,
            self.peer,
            self.central.total(),
            self.peer_side.total(),
            self.conflicts,
            self.deferred
        )
    }
}

/// `state/files/<tree>/<peer>.json`: the last sync of a pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairState {
    pub last_sync: DateTime<Utc>,
    pub report: PairReport,
}

/// One pair in progress.
struct Pair<'a> {
    hosts: &'a Hosts,
    ctx: &'a Context,
    tree: &'a TreeConfig,
    name: &'a str,
    peer: &'a str,
    central_root: PathBuf,
    /// The peer's local directory; unused when `peer_remote` is set.
    peer_root: PathBuf,
    /// A peer on another host: its connection and its path there.
    peer_remote: Option<(Shared, String)>,
    rules: Rules<'a>,
    merge_max: u64,
    now: DateTime<Utc>,
}

impl<'a> Pair<'a> {
    fn dir(&self, side: Side) -> Tree<'_> {
        if let (Side::Peer, Some((conn, root))) = (side, &self.peer_remote) {
            return Tree::Remote {
                conn,
                root,
                flock: self.tree.write == WriteMode::Flock,
                batch: true,
            };
        }
        Tree::Local(Dir {
            root: match side {
                Side::Central => &self.central_root,
                Side::Peer => &self.peer_root,
            },
            mode: self.tree.write,
            perms: &self.ctx.perms,
            busy: self.ctx.config.general.busy_timeout.0,
            batch: true,
        })
    }

    /// Makes what was written on both sides durable.
    fn sync_sides(&self) -> Result<()> {
        match (self.dir(Side::Central), self.dir(Side::Peer)) {
            // Two local sides: one `syncfs` when they share a filesystem.
            (Tree::Local(c), Tree::Local(p)) => fsutil::sync_filesystems(&[c.root, p.root])
                .with_context(|| {
                    format!("cannot sync {} or {}", c.root.display(), p.root.display())
                }),
            (c, p) => {
                c.sync()?;
                p.sync()
            }
        }
    }

    /// How long a read waits for the site's lock (`write = "flock"` trees only).
    fn read_lock(&self) -> Option<std::time::Duration> {
        (self.tree.write == WriteMode::Flock).then_some(self.ctx.config.general.busy_timeout.0)
    }

    fn label(&self) -> String {
        format!("{}/{}", self.name, self.peer)
    }
}

/// Where a peer is: a local directory, or a connection and a path on another host.
fn peer_location(
    ctx: &Context,
    hosts: &Hosts,
    peer: &crate::config::PeerConfig,
) -> Result<(PathBuf, Option<(Shared, String)>)> {
    let path = peer.path.get_ref();
    match Spec::parse(&path.to_string_lossy()) {
        None => Ok((ctx.resolve(path), None)),
        Some(spec) => {
            let spec = spec?;
            let conn = hosts.get(&spec)?;
            Ok((path.clone(), Some((conn, spec.path))))
        }
    }
}

/// Syncs one pair of a tree.
pub fn sync_pair(
    ctx: &Context,
    tree: &TreeConfig,
    peer: &crate::config::PeerConfig,
    opts: Options,
    now: DateTime<Utc>,
    hosts: &Hosts,
) -> Result<PairReport> {
    let name = tree.name.get_ref().as_str();
    let peer_name = peer.name.get_ref().as_str();
    let (peer_root, peer_remote) =
        peer_location(ctx, hosts, peer).with_context(|| format!("{name}/{peer_name}"))?;
    let pair = Pair {
        ctx,
        hosts,
        tree,
        name,
        peer: peer_name,
        central_root: ctx.resolve(tree.central.get_ref()),
        peer_root,
        peer_remote,
        rules: Rules {
            policy: ctx.config.tree_policy(tree),
            direction: peer.direction,
            counters: &tree.json_counters,
        },
        merge_max: tree.merge_max.0,
        now,
    };
    run(&pair, opts).with_context(|| pair.label())
}

fn run(pair: &Pair, opts: Options) -> Result<PairReport> {
    let ctx = pair.ctx;
    let mut report = PairReport {
        tree: pair.name.into(),
        peer: pair.peer.into(),
        ..PairReport::default()
    };
    // 1. Both directories.
    if !pair.dir(Side::Peer).is_dir()? {
        anyhow::bail!(
            "peer directory not found: {} (never created, to protect the central copy from \
             an unmounted disk). Try: fix the peer's path in the configuration, or mount the \
             disk",
            pair.dir(Side::Peer).label("")
        );
    }
    if !pair.central_root.exists() && !opts.dry_run {
        fsutil::ensure_dir(&pair.central_root, &ctx.perms)
            .with_context(|| format!("cannot create directory {}", pair.central_root.display()))?;
    }
    let state_path = ctx.state.path(&names::files_state(pair.name));
    if let Some(dir) = state_path.parent() {
        fsutil::ensure_dir(dir, &ctx.perms)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let mut store = Store::open(&state_path, ctx.config.general.busy_timeout.0)?;
    // 2. A stopped run's writes, of every pair of the tree (another pair must not change
    //    a file whose write is still pending: its completion would count that change).
    if !opts.dry_run {
        for peer in &pair.tree.peers {
            let (peer_root, peer_remote) = match peer_location(ctx, pair.hosts, peer) {
                Ok(l) => l,
                Err(e) => {
                    // That pair's own sync reports it; its pending writes wait for it.
                    log::warn!("{}/{}: {e:#}", pair.name, peer.name.get_ref());
                    continue;
                }
            };
            let other = Pair {
                peer: peer.name.get_ref(),
                peer_root,
                peer_remote,
                central_root: pair.central_root.clone(),
                rules: Rules {
                    direction: peer.direction,
                    ..pair.rules
                },
                ..*pair
            };
            let pending = store.journal(other.peer)?;
            if pending.is_empty() || !other.dir(Side::Peer).is_dir()? {
                continue;
            }
            let (done, _) = complete(
                &other,
                &mut store,
                pending,
                &BTreeMap::new(),
                &Trusted::new(),
                BTreeMap::new(),
                Prepared::new(),
            )?;
            if other.peer == pair.peer {
                report.recovered = done;
            }
            log::info!(
                "{}: {done} write(s) of a stopped run completed",
                other.label()
            );
        }
        flush_outbox(ctx, &store)?;
    }
    let pending: BTreeSet<String> = store
        .journal(pair.peer)?
        .into_iter()
        .map(|e| e.path)
        .collect();

    // 3. Both listings, then what changed. Metadata recorded now is trusted later only for
    //    files last modified well before this instant (`racy_margin`, the racy-entry rule: a
    //    write in the same clock tick as the one we saw does not change the metadata).
    let seen_ns = wall_ns();
    let mut phases = crate::util::Phases::start();
    let (central, peer) = std::thread::scope(|s| {
        let c = s.spawn(|| {
            if pair.central_root.exists() {
                list::list(&pair.central_root, &pair.tree.include, &pair.tree.exclude)
            } else {
                Ok(Listing::default())
            }
        });
        let p = pair
            .dir(Side::Peer)
            .list(&pair.tree.include, &pair.tree.exclude);
        (c.join(), p)
    });
    let central = central.map_err(|_| anyhow::anyhow!("the listing stopped unexpectedly"))??;
    let peer = peer?;
    if !opts.dry_run {
        for (root, rel) in central
            .stale_temps
            .iter()
            .map(|r| (&pair.central_root, r))
            .chain(peer.stale_temps.iter().map(|r| (&pair.peer_root, r)))
        {
            let path = root.join(rel);
            match fsutil::remove_if_exists(&path) {
                Ok(()) => log::info!("removed {} (left by a stopped run)", path.display()),
                Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
            }
        }
    }
    for (path, why) in central.skipped.iter().chain(&peer.skipped) {
        log::warn!("{}: {path} skipped: {why}", pair.label());
        report.skipped.push(path.clone());
    }
    for (side, listing) in [(Side::Central, &central), (Side::Peer, &peer)] {
        for (dir, why) in &listing.unreadable {
            let line = format!(
                "cannot read {} ({} side): {why}; nothing below it is synced",
                pair.dir(side).label(dir),
                side.name()
            );
            log::warn!("{}: {line}", pair.label());
            report.unreadable.push(line);
        }
    }
    phases.mark("list");
    let base = store.base(pair.peer)?;
    phases.mark("base");
    let (known, racy, trusted) = known_sides(pair, &central, &peer, &base, &pending)?;
    phases.mark("read changed");

    // 4. The plan.
    let mut entries = Vec::new();
    let mut objects: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut decided = Vec::new();
    let mut settled = Vec::new();
    for (path, (c, p)) in &known {
        let b = base.get(path);
        // The base's content is read only for a path changed on both sides (a merge).
        let bh = b.map(|b| b.sha256.as_str());
        let (ch, ph) = (c.sha256.as_deref(), p.sha256.as_deref());
        let merges = ch != bh && ph != bh && (ch != ph || !pair.rules.counters.is_empty());
        let b_bytes = match b {
            Some(b) if merges => store.object(&b.sha256)?,
            _ => None,
        };
        let plan = plan::decide(
            path,
            b.map(|b| (b.sha256.as_str(), b_bytes.as_deref())),
            c,
            p,
            pair.rules,
        );
        for (h, bytes) in plan.objects {
            objects.insert(h, bytes);
        }
        let has_entry = plan.entry.is_some();
        if let Some(e) = plan.entry {
            // Pre-images and results of small files go to the store, so a later merge (a
            // site writing meanwhile, a stopped run) has them.
            // Only JSON objects are ever merged: their contents are kept as later bases and
            // pre-images; any other file is copied from its side when written.
            for k in [c, p] {
                if let (Some(h), Some(bytes)) = (&k.sha256, &k.content)
                    && json::looks_like_object(bytes)
                {
                    objects.insert(h.clone(), bytes.clone());
                }
            }
            entries.push(e);
        }
        let stat_of = |l: &Listing| l.files.get(path).map(Seen::from);
        let settle_to = plan.settle.or_else(|| {
            // Unchanged: refresh the base's metadata when a side's moved (a touch).
            let b = b.filter(|_| !has_entry)?;
            let fresh = (stat_of(&central), stat_of(&peer));
            (b.central != fresh.0 || b.peer != fresh.1 || racy.contains(path))
                .then(|| Some(b.sha256.clone()))
        });
        if let Some(to) = settle_to {
            for k in [c, p] {
                if let (Some(h), Some(bytes)) = (&k.sha256, &k.content)
                    && Some(h) == to.as_ref()
                    && json::looks_like_object(bytes)
                {
                    objects.insert(h.clone(), bytes.clone());
                }
            }
            settled.push(Settled {
                path: path.clone(),
                entry: to.map(|sha256| BaseEntry {
                    sha256,
                    central: stat_of(&central),
                    peer: stat_of(&peer),
                    seen_ns,
                }),
            });
        }
        decided.extend(plan.conflicts);
    }
    let counts = plan::counts(&entries);
    report.central = counts.get(&Side::Central).copied().unwrap_or_default();
    report.peer_side = counts.get(&Side::Peer).copied().unwrap_or_default();
    report.conflicts = decided.len();
    report.deferred = pending.len();
    guard(pair, &central, &peer, &report, opts)?;
    if opts.dry_run {
        report.files = central.files.len();
        return Ok(report);
    }

    phases.mark("plan");
    // 5. Losing contents, then the decisions, durably.
    let txid = conflicts::transaction_id(pair.now, pair.name, pair.peer);
    let mut records = Vec::new();
    for (i, d) in decided.iter().enumerate() {
        let id = format!("{txid}-{i}");
        let mut result = d.result.clone();
        if let Some(loser) = d.loser {
            let kept = keep_lost(pair, &id, loser, &d.path, &known)?;
            result = serde_json::json!({"winner": d.result, "lost_kept_at": kept});
        }
        let record = ConflictRecord {
            id: id.clone(),
            time: pair.now,
            database: pair.name.into(),
            peer: pair.peer.into(),
            table: d.key.clone(),
            key: serde_json::Value::String(d.path.clone()),
            kind: d.kind,
            rows: Images {
                base: Some(d.base.clone()),
                central: Some(d.central.clone()),
                peer: Some(d.peer.clone()),
            },
            winner: d.winner,
            result,
            new_key: None,
        };
        report.new_conflicts.push(conflict_line(pair, &record));
        records.push((id, serde_json::to_string(&record)?));
    }
    // The temporary files of an `atomic` tree's writes are written while the decisions
    // are made durable: nothing can see them under their names, and a stopped run's are
    // removed by the next.
    let (decided, prepared) = std::thread::scope(|s| {
        let early = (pair.tree.write == WriteMode::Atomic && !entries.is_empty())
            .then(|| s.spawn(|| prepare_all(pair, &entries, &write_jobs(&entries), &objects)));
        let decided = store.decide(pair.peer, &entries, &objects, &records, &settled);
        (decided, early.map(|h| h.join()))
    });
    decided.with_context(|| format!("cannot write {}", state_path.display()))?;
    let prepared = match prepared {
        None => Prepared::new(),
        Some(p) => p.map_err(|_| anyhow::anyhow!("a writer stopped unexpectedly"))??,
    };
    fault::point("files-after-decide")?;

    phases.mark("journal");
    // 6. The writes (nothing to do in the usual minute: no entry).
    let idle = entries.is_empty();
    if !idle {
        let listed: BTreeMap<(Side, String), Seen> = central
            .files
            .iter()
            .map(|(p, s)| ((Side::Central, p.clone()), Seen::from(s)))
            .chain(
                peer.files
                    .iter()
                    .map(|(p, s)| ((Side::Peer, p.clone()), Seen::from(s))),
            )
            .collect();
        let (_, left) = complete(
            pair, &mut store, entries, &listed, &trusted, objects, prepared,
        )?;
        report.deferred += left;
    }
    fault::point("files-after-writes")?;

    phases.mark("writes and base");
    // 7. Records and cleanup.
    flush_outbox(ctx, &store)?;
    if report.recovered > 0 {
        // Contents are released as the base and journal move; a stopped run is the one
        // time to look at the whole store.
        store.collect_garbage()?;
    }
    if idle {
        // The state's log is copied into its database in a minute with nothing to write,
        // not in the sync that wrote it.
        store.checkpoint()?;
    }
    phases.mark("records and cleanup");
    log::info!("{}: {}", pair.label(), phases.text());
    // As listed, with what this sync created and removed there.
    let n = central.files.len() as u64 + report.central.created;
    report.files = usize::try_from(n.saturating_sub(report.central.removed)).unwrap_or(usize::MAX);
    for line in &report.new_conflicts {
        log::warn!("{line}");
    }
    ctx.state.save(
        &names::files_pair(pair.name, pair.peer),
        &PairState {
            last_sync: pair.now,
            report: report.clone(),
        },
    )?;
    Ok(report)
}

/// How long before the instant its metadata was taken a file must have been modified for
/// that metadata to vouch for its content: a later write within the same timestamp tick
/// would not change it. Timestamps with sub-second parts (ext4, XFS, Btrfs: ticks of a
/// few milliseconds) get 100 ms; whole seconds (a filesystem that keeps no more, or a
/// file touched to a whole second) get 2 s.
fn racy_margin(stat: &list::Stat) -> i128 {
    if stat.mtime_ns % 1_000_000_000 == 0 {
        2_000_000_000
    } else {
        100_000_000
    }
}

/// Every path of three maps sorted by path, once each and in order, with what each map
/// holds for it (a merge join: no lookups, no copies).
fn join3<'a, A, B, C>(
    a: &'a BTreeMap<String, A>,
    b: &'a BTreeMap<String, B>,
    c: &'a BTreeMap<String, C>,
) -> impl Iterator<Item = (&'a String, Option<&'a A>, Option<&'a B>, Option<&'a C>)> {
    let (mut a, mut b, mut c) = (
        a.iter().peekable(),
        b.iter().peekable(),
        c.iter().peekable(),
    );
    std::iter::from_fn(move || {
        let key = [
            a.peek().map(|x| x.0),
            b.peek().map(|x| x.0),
            c.peek().map(|x| x.0),
        ]
        .into_iter()
        .flatten()
        .min()?;
        let a = a.next_if(|x| x.0 == key).map(|x| x.1);
        let b = b.next_if(|x| x.0 == key).map(|x| x.1);
        let c = c.next_if(|x| x.0 == key).map(|x| x.1);
        Some((key, a, b, c))
    })
}

/// The wall clock in nanoseconds (not the test clock: it is compared with file times).
fn wall_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

/// Each path's state on both sides. Files whose metadata matches the base are known from
/// it; the others are read, on every core.
/// Each path's state on both sides.
type Sides = BTreeMap<String, (Known, Known)>;

/// Sides known from the base (not read), with the metadata that vouches for their
/// content: a write checks that metadata under the lock instead of reading the file.
type Trusted = BTreeMap<(Side, String), Seen>;

fn known_sides(
    pair: &Pair,
    central: &Listing,
    peer: &Listing,
    base: &BTreeMap<String, BaseEntry>,
    pending: &BTreeSet<String>,
) -> Result<(Sides, BTreeSet<String>, Trusted)> {
    // Paths whose metadata matched the base but were too recent to trust: read again, and
    // if unchanged, recorded again with this run's time so the next run trusts them.
    let mut racy = BTreeSet::new();
    let mut to_read: Vec<(String, Side)> = Vec::new();
    let mut trusted = Trusted::new();
    let mut out: BTreeMap<String, (Known, Known)> = BTreeMap::new();
    let some_hidden = !central.unreadable.is_empty() || !peer.unreadable.is_empty();
    for (path, c_stat, p_stat, b) in join3(&central.files, &peer.files, base) {
        if pending.contains(path) || (some_hidden && (central.hidden(path) || peer.hidden(path))) {
            continue;
        }
        let fresh = |seen: Option<Seen>, stat: &list::Stat| {
            b.is_some_and(|b| {
                seen.is_some_and(|s| s.matches(stat))
                    && stat.mtime_ns < b.seen_ns - racy_margin(stat)
            })
        };
        // The usual path: the base vouches for both sides. Nothing to read or decide.
        if let (Some(b), Some(cs), Some(ps)) = (b, c_stat, p_stat)
            && fresh(b.central, cs)
            && fresh(b.peer, ps)
        {
            continue;
        }
        let mut pair_known = (Known::default(), Known::default());
        for (side, stat) in [(Side::Central, c_stat), (Side::Peer, p_stat)] {
            let Some(stat) = stat else {
                continue;
            };
            let seen = b.and_then(|b| match side {
                Side::Central => b.central,
                Side::Peer => b.peer,
            });
            let fresh = fresh(seen, stat);
            let k = Known {
                sha256: fresh.then(|| b.map(|b| b.sha256.clone())).flatten(),
                content: None,
                mtime_ns: stat.mtime_ns,
                mode: stat.mode,
            };
            if fresh {
                trusted.insert((side, path.clone()), Seen::from(stat));
            } else {
                if seen.is_some_and(|s| s.matches(stat)) {
                    racy.insert(path.clone());
                }
                to_read.push((path.clone(), side));
            }
            match side {
                Side::Central => pair_known.0 = k,
                Side::Peer => pair_known.1 = k,
            }
        }
        out.insert(path.clone(), pair_known);
    }
    let read = crate::util::parallel_map(&to_read, |(path, side)| {
        pair.dir(*side)
            .read_current(path, pair.merge_max, pair.read_lock())
    });
    for ((path, side), r) in to_read.iter().zip(read) {
        let r = r.ok_or_else(|| anyhow::anyhow!("a reader stopped unexpectedly"))??;
        let Some(k) = out.get_mut(path).map(|(c, p)| match side {
            Side::Central => c,
            Side::Peer => p,
        }) else {
            continue;
        };
        k.sha256 = r.sha256;
        k.content = r.content;
        if let Some(s) = r.stat {
            k.mtime_ns = s.mtime_ns;
            k.mode = s.mode;
        }
    }
    // Paths the base knows whose content is the base's (unchanged on both sides) need
    // nothing: drop them before deciding.
    out.retain(|path, (c, p)| {
        let b = base.get(path).map(|b| b.sha256.as_str());
        !(c.sha256.as_deref() == b && p.sha256.as_deref() == b && b.is_some())
            || racy.contains(path)
            || base.get(path).is_some_and(|b| {
                b.central != central.files.get(path).map(Seen::from)
                    || b.peer != peer.files.get(path).map(Seen::from)
            })
    });
    trusted.retain(|(_, path), _| out.contains_key(path));
    Ok((out, racy, trusted))
}

/// Refuses a plan that removes more than `max_delete` of a side's files (10 files or more).
fn guard(
    pair: &Pair,
    central: &Listing,
    peer: &Listing,
    report: &PairReport,
    opts: Options,
) -> Result<()> {
    if opts.force {
        return Ok(());
    }
    let max = pair
        .tree
        .max_delete
        .unwrap_or(pair.ctx.config.files.max_delete)
        .0;
    for (side, listing, counts) in [
        ("central", central, report.central),
        ("peer", peer, report.peer_side),
    ] {
        let n = listing.files.len() as u64;
        if n >= 10 && counts.removed * 100 > n * u64::from(max) {
            anyhow::bail!(
                "refused: the sync would remove {} of the {n} files on the {side} side (more \
                 than max_delete = {max}%); nothing was written. Is a directory unmounted or \
                 wiped? Try: check both directories; if the removals are wanted, run cr0sync \
                 files sync --tree {} --peer {} --force",
                counts.removed,
                pair.name,
                pair.peer
            );
        }
    }
    Ok(())
}

/// Keeps the losing content of a `file` conflict under `state/files/<tree>/lost/<id>`.
/// Returns that path.
fn keep_lost(
    pair: &Pair,
    id: &str,
    loser: Side,
    path: &str,
    known: &BTreeMap<String, (Known, Known)>,
) -> Result<String> {
    let name = names::files_lost(pair.name, id);
    let dest = pair.ctx.state.path(&name);
    let k = known.get(path).map(|(c, p)| match loser {
        Side::Central => c,
        Side::Peer => p,
    });
    if k.is_none_or(|k| k.sha256.is_none()) {
        // The losing side had deleted the file: nothing to keep.
        return Ok(String::new());
    }
    let src = pair.dir(loser);
    pair.ctx
        .state
        .replace_with(&name, |tmp| {
            match k.and_then(|k| k.content.as_ref()) {
                Some(bytes) => std::fs::write(tmp, bytes)?,
                None => src
                    .copy_to_local(path, tmp)
                    .map_err(std::io::Error::other)?,
            }
            Ok(())
        })
        .with_context(|| format!("cannot keep the losing content of {path}"))?;
    Ok(dest.display().to_string())
}

fn conflict_line(pair: &Pair, r: &ConflictRecord) -> String {
    let what = if r.table.is_empty() {
        String::new()
    } else {
        format!(" key {}", r.table)
    };
    format!(
        "conflict in tree {} file {}{what} ({}): {} wins (id {}). Try: cr0sync db conflicts; \
         cr0sync db resolve {} --ack once reviewed",
        pair.label(),
        r.key.as_str().unwrap_or_default(),
        r.kind,
        r.winner,
        r.id,
        r.id
    )
}

/// Appends the outbox's records that `conflicts.jsonl` lacks, then empties it.
fn flush_outbox(ctx: &Context, store: &Store) -> Result<()> {
    let outbox = store.outbox()?;
    if outbox.is_empty() {
        return Ok(());
    }
    let known = conflicts::ids(ctx)?;
    let mut records = Vec::new();
    for (id, text) in &outbox {
        if known.contains(id) {
            continue;
        }
        let r: ConflictRecord = serde_json::from_str(text)
            .with_context(|| format!("a conflict record in the outbox of {id} is damaged"))?;
        records.push(r);
    }
    conflicts::append(ctx, &records)?;
    fault::point("files-after-conflicts-append")?;
    store.clear_outbox(&outbox.into_iter().map(|(id, _)| id).collect::<Vec<_>>())
}

/// Completes journal entries: see the module doc (step 6). `listed` has the metadata of
/// the files as this run listed them (empty when completing a stopped run's entries): a
/// side that needs no write keeps it in the base. Returns how many entries were completed
/// and how many are left for the next run.
fn complete(
    pair: &Pair,
    store: &mut Store,
    entries: Vec<JournalEntry>,
    listed: &BTreeMap<(Side, String), Seen>,
    trusted: &Trusted,
    objects: BTreeMap<String, Vec<u8>>,
    prepared: Prepared,
) -> Result<(usize, usize)> {
    let mut done = Vec::new();
    let mut progress = Vec::new();
    let mut left = 0;
    // Before any read or write below (see the racy-entry rule in `run`).
    let seen_ns = wall_ns();
    // The common case first: each side still holds what was decided on, and the write
    // (which checks that under the file's lock) is made without reading the file first.
    // What this finds changed is handled below. Prepared contents are renamed into place
    // on every core (they are synced as a batch, so no fsync per file queues up); the
    // other writes go one after another.
    let jobs = write_jobs(&entries);
    // Sides known not to hold a result of ours: every side of an entry decided in this run
    // (nothing is written before this), and sides a stopped run recorded as left unwritten.
    // A recorded flag is cleared on record before the side is written, so a stop after
    // the write never has it taken for unwritten.
    let fresh = !listed.is_empty();
    let known_unwritten: BTreeSet<(usize, Side)> = jobs
        .iter()
        .filter(|(i, side)| fresh || entries[*i].side(*side).unwritten)
        .copied()
        .collect();
    let mut entries = entries;
    let recorded: Vec<usize> = jobs
        .iter()
        .filter(|(i, side)| entries[*i].side(*side).unwritten)
        .map(|(i, _)| *i)
        .collect();
    if !recorded.is_empty() {
        for i in &recorded {
            entries[*i].central.unwritten = false;
            entries[*i].peer.unwritten = false;
        }
        let cleared: Vec<JournalEntry> = recorded.iter().map(|i| entries[*i].clone()).collect();
        store.decide(pair.peer, &cleared, &BTreeMap::new(), &[], &[])?;
    }
    // The results' contents: those the caller has in memory, the others from the store.
    let mut contents = objects;
    for (i, side) in &jobs {
        if let Some(h) = &entries[*i].side(*side).res
            && !contents.contains_key(h)
            && let Some(bytes) = store.object(h)?
        {
            contents.insert(h.clone(), bytes);
        }
    }
    let any_write = !jobs.is_empty();
    // In an `atomic` tree every new content goes to a temporary file first (unless the
    // caller prepared them), and one sync of each filesystem makes them all durable
    // before any is renamed into place (instead of an fsync per file).
    let workers = workers(pair);
    let mut prepared = prepared;
    if pair.tree.write == WriteMode::Atomic {
        if prepared.is_empty() {
            prepared = prepare_all(pair, &entries, &jobs, &contents)?;
        }
        if !prepared.is_empty() {
            pair.sync_sides()?;
        }
    }
    let mut first: BTreeMap<(usize, Side), Option<SideDone>> = BTreeMap::new();
    // The prepared contents first, renamed into place on every core.
    // (Each slot is emptied by the one worker that places it.)
    type Slot = std::sync::Mutex<Option<Staged>>;
    let ready: Vec<((usize, Side), Slot)> = prepared
        .into_iter()
        .filter_map(|(key, p)| match p {
            Some(p) => Some((key, Slot::new(Some(p)))),
            None => {
                first.insert(key, Some(SideDone::Abandon));
                None
            }
        })
        .collect();
    let placed = crate::util::parallel_map_n(&ready, workers, |((i, side), p)| {
        let p = p.lock().ok().and_then(|mut p| p.take());
        let e = &entries[*i];
        let seen = trusted.get(&(*side, e.path.clone())).copied();
        put_result(pair, e, *side, seen, None, p)
    });
    for ((key, _), done) in ready.iter().zip(placed) {
        let done = done.ok_or_else(|| anyhow::anyhow!("a writer stopped unexpectedly"))??;
        first.insert(*key, done);
    }
    let rest: Vec<(usize, Side)> = jobs
        .into_iter()
        .filter(|k| !first.contains_key(k))
        .collect();
    for (i, side) in rest {
        let e = &entries[i];
        let object = e.side(side).res.as_ref().and_then(|h| contents.get(h));
        let seen = trusted.get(&(side, e.path.clone())).copied();
        let outcome = put_result(pair, e, side, seen, object.map(Vec::as_slice), None)?;
        first.insert((i, side), outcome);
    }
    'entries: for (n, mut e) in entries.into_iter().enumerate() {
        let mut stats = [None, None];
        let mut finished = true;
        let mut wrote = false;
        for (i, side) in [Side::Central, Side::Peer].into_iter().enumerate() {
            let untouched = !e.side(side).writes();
            let tried = first.remove(&(n, side)).flatten();
            let unwritten = known_unwritten.contains(&(n, side));
            let outcome = match tried {
                Some(done) => done,
                None => complete_side(pair, store, &mut e, side, unwritten)?,
            };
            match outcome {
                SideDone::Yes(stat) => {
                    stats[i] = if untouched {
                        listed.get(&(side, e.path.clone())).copied()
                    } else {
                        wrote = true;
                        stat
                    };
                    // Written: from now on this side needs nothing more.
                    let c = e.side_mut(side);
                    c.pre = c.res.clone();
                }
                SideDone::Later => {
                    // Not written in this run: a later run must not take a file that
                    // reaches the result by the site's own changes for our write.
                    finished = false;
                    e.side_mut(side).unwritten = true;
                    wrote = true;
                }
                SideDone::Abandon => {
                    // A copy whose source changed: nothing was written for this entry
                    // (only one side is ever written from a source); the old base stays,
                    // and the next run decides again.
                    store.abandon(pair.peer, &e.path)?;
                    left += 1;
                    continue 'entries;
                }
            }
        }
        if !finished {
            left += 1;
            if wrote {
                progress.push(e);
            }
            continue;
        }
        done.push(Settled {
            path: e.path.clone(),
            entry: e.base_after.clone().map(|sha256| BaseEntry {
                sha256,
                central: stats[0],
                peer: stats[1],
                seen_ns,
            }),
        });
    }
    // The renames, removals and rewrites above are durable before the base records them.
    if any_write {
        pair.sync_sides()?;
    }
    store.settle(pair.peer, &done, &progress)?;
    Ok((done.len(), left))
}

/// Each side of each entry that a journal's completion writes, by entry index.
fn write_jobs(entries: &[JournalEntry]) -> Vec<(usize, Side)> {
    entries
        .iter()
        .enumerate()
        .flat_map(|(i, e)| {
            [Side::Central, Side::Peer]
                .into_iter()
                .filter(move |s| e.side(*s).writes())
                .map(move |s| (i, s))
        })
        .collect()
}

/// Temporary files holding the new contents of an `atomic` tree's writes, not yet synced
/// or renamed. `None`: the source of a copy changed meanwhile.
type Prepared = BTreeMap<(usize, Side), Option<Staged>>;

/// How many writes run at once: every core for local sides (no fsync per file to queue);
/// one for a remote side, whose requests go one after another over its connection.
fn workers(pair: &Pair) -> usize {
    if pair.peer_remote.is_some() {
        1
    } else {
        crate::util::workers()
    }
}

/// Writes the temporary file of each of `jobs` that leaves a file (see [`Prepared`]).
fn prepare_all(
    pair: &Pair,
    entries: &[JournalEntry],
    jobs: &[(usize, Side)],
    contents: &BTreeMap<String, Vec<u8>>,
) -> Result<Prepared> {
    let staged: Vec<(usize, Side)> = jobs
        .iter()
        .filter(|(i, side)| entries[*i].side(*side).res.is_some())
        .copied()
        .collect();
    let made = crate::util::parallel_map_n(&staged, workers(pair), |&(i, side)| {
        let e = &entries[i];
        let object = e.side(side).res.as_ref().and_then(|h| contents.get(h));
        with_result(pair, e, side, object.map(Vec::as_slice), |content, mode| {
            pair.dir(side).prepare(&e.path, content, mode)
        })
    });
    let mut prepared = Prepared::new();
    for (key, p) in staged.into_iter().zip(made) {
        let p = p.ok_or_else(|| anyhow::anyhow!("a writer stopped unexpectedly"))??;
        prepared.insert(key, p);
    }
    Ok(prepared)
}

enum SideDone {
    /// The side holds its result: its metadata when known (a write just made, or the
    /// file as read).
    Yes(Option<Seen>),
    Later,
    Abandon,
}

/// How many times a side that keeps changing under the sync is tried in one run.
const ATTEMPTS: usize = 3;

fn complete_side(
    pair: &Pair,
    store: &mut Store,
    e: &mut JournalEntry,
    side: Side,
    unwritten: bool,
) -> Result<SideDone> {
    let dir = pair.dir(side);
    for _ in 0..ATTEMPTS {
        let ch = e.side(side).clone();
        if !ch.writes() {
            return Ok(SideDone::Yes(None));
        }
        let cur = dir.read_current(&e.path, pair.merge_max, pair.read_lock())?;
        if cur.sha256 == ch.res && !unwritten {
            return Ok(SideDone::Yes(cur.stat.as_ref().map(Seen::from)));
        }
        if cur.sha256 == ch.pre && cur.sha256 != ch.res {
            let object = match &ch.res {
                Some(h) => store.object(h)?,
                None => None,
            };
            match put_result(pair, e, side, None, object.as_deref(), None)? {
                Some(done) => return Ok(done),
                None => continue,
            }
        }
        // The site changed the file since the decision: merge its change into the result
        // (JSON), or let the site's change stand (it is newer).
        revise(pair, store, e, side, &cur)?;
    }
    Ok(SideDone::Later)
}

/// Writes a side's result if the side still holds its pre-image (vouched for by `seen`
/// when given), from `prepared` when given. `None`: it did not (changed meanwhile).
fn put_result(
    pair: &Pair,
    e: &JournalEntry,
    side: Side,
    seen: Option<Seen>,
    object: Option<&[u8]>,
    prepared: Option<Staged>,
) -> Result<Option<SideDone>> {
    let dir = pair.dir(side);
    let pre = e
        .side(side)
        .pre
        .as_deref()
        .map(|sha256| write::Expect { sha256, seen });
    let outcome = match prepared {
        Some(p) => dir.place(&e.path, pre, p)?,
        None => with_result(pair, e, side, object, |content, mode| {
            dir.put(&e.path, pre, content, mode)
        })?,
    };
    Ok(match outcome {
        Outcome::Done(stat) => {
            fault::point("files-after-write")?;
            Some(SideDone::Yes(stat.as_ref().map(Seen::from)))
        }
        Outcome::Busy => Some(SideDone::Later),
        Outcome::SourceChanged => Some(SideDone::Abandon),
        Outcome::Changed => None,
    })
}

/// Calls `f` with what a side's write puts in place: its result's bytes (`object`) or a
/// copy of the source side's file, and the mode a created file gets (the mode of the file
/// it copies; a replaced one keeps its own).
fn with_result<T>(
    pair: &Pair,
    e: &JournalEntry,
    side: Side,
    object: Option<&[u8]>,
    f: impl FnOnce(Source, u32) -> Result<T>,
) -> Result<T> {
    let ch = e.side(side);
    let content = match &ch.res {
        None => Source::Absent,
        Some(h) => match object {
            Some(bytes) => Source::Bytes(bytes),
            None => Source::Copy {
                from: pair.dir(e.source.unwrap_or(side.other())),
                rel: &e.path,
                sha256: h,
            },
        },
    };
    let mode = pair
        .dir(side.other())
        .stat(&e.path)
        .map_or(pair.ctx.perms.file_mode, |s| s.mode);
    f(content, mode)
}

/// A side found holding neither its pre-image nor its result: the journal entry is
/// revised durably before anything is written, so a stop cannot count a change twice.
fn revise(
    pair: &Pair,
    store: &mut Store,
    e: &mut JournalEntry,
    side: Side,
    cur: &Current,
) -> Result<()> {
    let ch = e.side(side).clone();
    let bytes = |h: &Option<String>| -> Result<Option<Vec<u8>>> {
        match h {
            Some(h) => store.object(h),
            None => Ok(None),
        }
    };
    let (pre, res) = (bytes(&ch.pre)?, bytes(&ch.res)?);
    let mut objects = BTreeMap::new();
    let cur_obj = cur.content.as_deref().and_then(json::object);
    let torn = pair.tree.write == WriteMode::Flock
        && cur_obj.is_none()
        && res.as_deref().and_then(json::object).is_some();
    let new_res = match (&pre, &res, &cur_obj) {
        (Some(pre), Some(res), Some(cur_obj)) if !torn => {
            match (json::object(pre), json::object(res)) {
                (Some(p), Some(r)) => {
                    let (m, _) =
                        json::merge3(Some(&p), cur_obj, &r, pair.rules.counters, Prefer::Central);
                    let style = json::Style::of(
                        std::str::from_utf8(cur.content.as_deref().unwrap_or_default())
                            .unwrap_or(""),
                    );
                    let out = style.render(&serde_json::Value::Object(m));
                    let h = write::sha256(&out);
                    objects.insert(h.clone(), out);
                    Some(h)
                }
                _ => cur.sha256.clone(),
            }
        }
        // A flock-mode file torn by a stopped rewrite of ours: write the result again.
        _ if torn => ch.res.clone(),
        _ => cur.sha256.clone(),
    };
    if let (Some(h), Some(b)) = (&cur.sha256, &cur.content) {
        objects.insert(h.clone(), b.clone());
    }
    let c = e.side_mut(side);
    c.pre = cur.sha256.clone();
    c.res = new_res;
    // Recorded as possibly written: a write follows at once.
    c.unwritten = false;
    store.revise(pair.peer, e, &objects)
}
