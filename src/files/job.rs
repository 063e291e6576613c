//! The file-tree job: `cron files`, `files sync`, `files status` and its `status` section.

use anyhow::Result;
use serde::Serialize;

use crate::config::{PeerConfig, TreeConfig};
use crate::conflicts::{self, ConflictKind};
use crate::context::Context;
use crate::error::Error;
use crate::files::sync::{self, Options, PairReport, PairState};
use crate::ops::section::Section;
use crate::ops::state::names;
use crate::ops::task::{JobRun, RunRecord, RunResult, TaskDone};
use crate::output::{Table, Tone, paint};

/// The job's name: its lock, its run records.
pub const JOB: &str = "files";

/// Which trees and peers a command acts on (empty: all).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub trees: Vec<String>,
    pub peer: Option<String>,
}

/// The selected (tree, peer) pairs in configuration order; an unknown name is a usage
/// error listing the configured ones.
pub fn pairs<'a>(
    ctx: &'a Context,
    sel: &Selection,
) -> Result<Vec<(&'a TreeConfig, &'a PeerConfig)>> {
    let trees = &ctx.config.files.tree;
    let known = || {
        trees
            .iter()
            .map(|t| t.name.get_ref().as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for name in &sel.trees {
        if !trees.iter().any(|t| t.name.get_ref() == name) {
            return Err(Error::Usage(format!(
                "--tree {name}: no such tree (configured: {})",
                known()
            ))
            .into());
        }
    }
    let out: Vec<_> = trees
        .iter()
        .filter(|t| sel.trees.is_empty() || sel.trees.contains(t.name.get_ref()))
        .flat_map(|t| t.peers.iter().map(move |p| (t, p)))
        .filter(|(_, p)| sel.peer.as_ref().is_none_or(|n| p.name.get_ref() == n))
        .collect();
    if let Some(peer) = &sel.peer
        && out.is_empty()
    {
        return Err(Error::Usage(format!(
            "--peer {peer}: no such peer in the selected tree(s)"
        ))
        .into());
    }
    Ok(out)
}

fn task_name(tree: &TreeConfig, peer: &PeerConfig) -> String {
    format!("sync {}/{}", tree.name.get_ref(), peer.name.get_ref())
}

/// Syncs the selected pairs, each a task of the run (one failing leaves the others).
pub fn sync_pairs(run: &mut JobRun, sel: &Selection, force: bool) -> Result<Vec<PairReport>> {
    let ctx = run.ctx;
    let opts = Options {
        dry_run: run.dry_run,
        force,
    };
    let mut reports = Vec::new();
    // One connection per host for the whole run, shared by its pairs.
    let hosts = crate::remote::client::Hosts::new(&ctx.config.remote);
    let selected = pairs(ctx, sel)?;
    hosts.open_all(selected.iter().map(|(_, p)| p.path.get_ref().as_path()));
    for (tree, peer) in selected {
        let now = run.now;
        run.task(&task_name(tree, peer), |run| {
            let report = sync::sync_pair(ctx, tree, peer, opts, now, &hosts)?;
            run.gauge(
                "cr0sync_files_changed",
                (report.central.total() + report.peer_side.total()) as f64,
            );
            run.gauge("cr0sync_files_conflicts_recorded", report.conflicts as f64);
            run.gauge("cr0sync_files_deferred", report.deferred as f64);
            let done = TaskDone::new(report.summary());
            reports.push(report);
            Ok(done)
        });
    }
    crate::remote::client::record_hosts(&ctx.state, &hosts, run.now, run.dry_run)?;
    Ok(reports)
}

/// `cron files`: every pair; one stderr line per new conflict, so cron mails it.
pub fn cron_tasks(run: &mut JobRun) -> Result<()> {
    let reports = sync_pairs(run, &Selection::default(), false)?;
    for line in reports.iter().flat_map(|r| &r.new_conflicts) {
        eprintln!("cr0sync: {line}");
    }
    Ok(())
}

/// One pair in `files status` and the `trees` status section.
#[derive(Debug, Clone, Serialize)]
pub struct PairStatus {
    pub tree: String,
    pub peer: String,
    pub direction: String,
    pub path: String,
    pub last_sync: Option<String>,
    pub files: Option<usize>,
    /// Open `file` and `json` conflicts of the pair.
    pub conflicts: usize,
    /// Writes the last sync left for the next run.
    pub deferred: usize,
    /// Directories the last sync could not read (nothing below them is synced).
    pub unreadable: Vec<String>,
    pub last_error: Option<String>,
    /// A peer on another host: that host, and whether the last run reached it.
    pub host: Option<String>,
    pub host_reachable: Option<bool>,
}

pub fn pair_statuses(ctx: &Context) -> Result<Vec<PairStatus>> {
    let record: Option<RunRecord> = ctx.state.load(&names::run_record(JOB))?;
    let open = conflicts::open(ctx)?;
    let hosts = crate::remote::client::load_hosts(&ctx.state)?;
    let mut out = Vec::new();
    for tree in &ctx.config.files.tree {
        let name = tree.name.get_ref();
        for peer in &tree.peers {
            let peer_name = peer.name.get_ref();
            let state: Option<PairState> = ctx.state.load(&names::files_pair(name, peer_name))?;
            let task = task_name(tree, peer);
            let raw = peer.path.get_ref().to_string_lossy().into_owned();
            let host = crate::remote::client::Spec::parse(&raw)
                .and_then(Result::ok)
                .map(|s| s.host_label());
            let path = if host.is_some() {
                raw
            } else {
                ctx.resolve(peer.path.get_ref()).display().to_string()
            };
            out.push(PairStatus {
                host_reachable: host
                    .as_ref()
                    .and_then(|h| hosts.get(h))
                    .map(|h| h.reachable),
                host,
                tree: name.clone(),
                peer: peer_name.clone(),
                direction: format!("{:?}", peer.direction).to_lowercase(),
                path,
                last_sync: state
                    .as_ref()
                    .map(|s| crate::ops::clock::rfc3339(s.last_sync)),
                files: state.as_ref().map(|s| s.report.files),
                conflicts: open
                    .iter()
                    .filter(|c| {
                        matches!(c.kind, ConflictKind::File | ConflictKind::Json)
                            && &c.database == name
                            && &c.peer == peer_name
                    })
                    .count(),
                deferred: state.as_ref().map_or(0, |s| s.report.deferred),
                unreadable: state
                    .as_ref()
                    .map(|s| s.report.unreadable.clone())
                    .unwrap_or_default(),
                last_error: record.as_ref().and_then(|r| {
                    r.tasks
                        .iter()
                        .find(|t| t.name == task && t.result == RunResult::Error)
                        .map(|t| t.detail.clone())
                }),
            });
        }
    }
    Ok(out)
}

/// The `trees` section of `status`.
pub fn section(ctx: &Context) -> Result<Section> {
    let pairs = pair_statuses(ctx)?;
    let mut table = Table::new(["TREE", "PEER", "LAST SYNC", "FILES", "CONFLICTS", "STATE"]);
    let mut problems = Vec::new();
    for p in &pairs {
        let state = if let Some(e) = &p.last_error {
            problems.push(format!("tree {}/{}: {e}", p.tree, p.peer));
            paint("error", Tone::Bad)
        } else if p.last_sync.is_none() {
            paint("never synced", Tone::Warn)
        } else if !p.unreadable.is_empty() {
            for line in &p.unreadable {
                problems.push(format!(
                    "tree {}/{}: {line}. Try: give the user that runs cr0sync read access to it",
                    p.tree, p.peer
                ));
            }
            paint(&format!("{} unreadable", p.unreadable.len()), Tone::Warn)
        } else if p.deferred > 0 {
            problems.push(format!(
                "tree {}/{}: {} write(s) left for the next run (the site changed or held \
                 the files meanwhile); the sides differ until then. Try: cr0sync files sync \
                 --tree {} --peer {}",
                p.tree, p.peer, p.deferred, p.tree, p.peer
            ));
            paint(&format!("{} deferred", p.deferred), Tone::Warn)
        } else {
            paint("ok", Tone::Good)
        };
        table.row([
            p.tree.clone(),
            p.peer.clone(),
            p.last_sync.clone().unwrap_or_else(|| "-".into()),
            p.files.map_or("-".into(), |n| n.to_string()),
            p.conflicts.to_string(),
            state,
        ]);
    }
    // Hosts still configured (a host no longer used keeps its entry but is not a problem).
    let configured: std::collections::BTreeSet<&String> =
        pairs.iter().filter_map(|p| p.host.as_ref()).collect();
    for (host, h) in crate::remote::client::load_hosts(&ctx.state)? {
        if !h.reachable && configured.contains(&host) {
            problems.push(format!(
                "host {host} was not reachable at the last run ({}): {}",
                crate::ops::clock::rfc3339(h.last_run),
                h.error.unwrap_or_default()
            ));
        }
    }
    let open: usize = pairs.iter().map(|p| p.conflicts).sum();
    if open > 0 {
        problems.push(format!(
            "trees: {open} open file conflict(s): the policy chose a winner; losing JSON values \
             are in the records, losing files are kept under state/files/<tree>/lost/. Try: \
             cr0sync db conflicts, then cr0sync db resolve ID --ack once reviewed"
        ));
    }
    Ok(Section {
        key: "trees",
        title: "File trees",
        json: serde_json::to_value(&pairs)?,
        table,
        problems,
    })
}

/// The per-pair lines of `files sync`.
pub fn sync_table(reports: &[PairReport]) -> Table {
    let mut t = Table::new(["TREE", "PEER", "CENTRAL", "PEER", "CONFLICTS", "NOTE"]);
    for r in reports {
        let c = |c: &crate::files::plan::Counts| {
            format!("+{} ~{} -{}", c.created, c.changed, c.removed)
        };
        let mut notes = Vec::new();
        if r.recovered > 0 {
            notes.push(format!(
                "{} write(s) of a stopped run completed",
                r.recovered
            ));
        }
        if r.deferred > 0 {
            notes.push(format!("{} left for the next run", r.deferred));
        }
        if !r.skipped.is_empty() {
            notes.push(format!(
                "{} skipped (symlinks, special files)",
                r.skipped.len()
            ));
        }
        t.row([
            r.tree.clone(),
            r.peer.clone(),
            c(&r.central),
            c(&r.peer_side),
            r.conflicts.to_string(),
            notes.join("; "),
        ]);
    }
    t
}

/// Closes file conflict `id`. With `side` (`central`, `peer` or `base`), that version (of
/// the whole file, or of the JSON key) is first written into the central directory's file,
/// from where the next sync carries it to every side; without, the policy's choice stands.
pub fn resolve(run: &mut JobRun, id: &str, side: Option<&str>) -> Result<String> {
    let ctx = run.ctx;
    let record = conflicts::find_open(ctx, id)?;
    let close = |run: &JobRun, action: &str| -> Result<()> {
        if !run.dry_run {
            conflicts::close(
                run.ctx,
                &[conflicts::Closing {
                    id: id.to_string(),
                    time: run.now,
                    action: action.to_string(),
                }],
            )?;
        }
        Ok(())
    };
    let Some(side) = side else {
        close(run, "ack")?;
        return Ok(format!("conflict {id} closed; no file changed"));
    };
    let tree = ctx
        .config
        .files
        .tree
        .iter()
        .find(|t| *t.name.get_ref() == record.database)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "conflict {id} is in tree {:?}, which is no longer configured. Try: cr0sync db \
                 resolve {id} --ack",
                record.database
            )
        })?;
    let rel = record.key.as_str().unwrap_or_default().to_string();
    let central_root = ctx.resolve(tree.central.get_ref());
    let dir = crate::files::write::Dir {
        root: &central_root,
        mode: tree.write,
        perms: &ctx.perms,
        busy: ctx.config.general.busy_timeout.0,
        batch: false,
    };
    let lock = (tree.write == crate::config::WriteMode::Flock).then_some(dir.busy);
    let cur = crate::files::write::read_current(&dir.path(&rel), tree.merge_max.0, lock)?;
    let image = match side {
        "central" => &record.rows.central,
        "peer" => &record.rows.peer,
        _ => &record.rows.base,
    };
    let wanted: Option<Vec<u8>> = match record.kind {
        ConflictKind::Json => {
            // The file as it is now, with the key set to the chosen value.
            let bytes = cur.content.clone().ok_or_else(|| {
                anyhow::anyhow!("{} is gone or too large to edit", dir.path(&rel).display())
            })?;
            let mut value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!("{} is not JSON any more: {e}", dir.path(&rel).display())
            })?;
            let keys: Vec<&str> = record.table.split('/').collect();
            set_key(&mut value, &keys, image.clone().filter(|v| !v.is_null()));
            let style = crate::files::json::Style::of(std::str::from_utf8(&bytes).unwrap_or(""));
            Some(style.render(&value))
        }
        _ => {
            let sha = image
                .as_ref()
                .and_then(|v| v["sha256"].as_str())
                .map(str::to_string);
            match sha {
                None => None,
                Some(h) if Some(&h) == cur.sha256.as_ref() => {
                    close(run, &format!("keep-{side}"))?;
                    return Ok(format!(
                        "conflict {id}: {} already holds the {side} version; closed",
                        dir.path(&rel).display()
                    ));
                }
                Some(h) => Some(kept_content(ctx, tree, &record, &h)?),
            }
        }
    };
    if run.dry_run {
        return Ok(format!(
            "conflict {id}: would write the {side} version into {}",
            dir.path(&rel).display()
        ));
    }
    let content = match &wanted {
        Some(b) => crate::files::write::Content::Bytes(b),
        None => crate::files::write::Content::Absent,
    };
    match dir.put(
        &rel,
        cur.sha256.as_deref().map(crate::files::write::Expect::hash),
        content,
        ctx.perms.file_mode,
    )? {
        crate::files::write::Outcome::Done(_) => {}
        _ => anyhow::bail!(
            "{} changed while the conflict was being resolved; nothing was written. Try: the \
             same command again",
            dir.path(&rel).display()
        ),
    }
    close(run, &format!("keep-{side}"))?;
    Ok(format!(
        "conflict {id}: the {side} version is in {}; the next files sync carries it to every side",
        dir.path(&rel).display()
    ))
}

/// The bytes of a version of a file conflict: the kept loser, or a content the tree's
/// state still holds.
fn kept_content(
    ctx: &Context,
    tree: &TreeConfig,
    record: &crate::conflicts::ConflictRecord,
    sha: &str,
) -> Result<Vec<u8>> {
    if let Some(kept) = record.result["lost_kept_at"].as_str()
        && !kept.is_empty()
        && let Ok(bytes) = std::fs::read(kept)
        && crate::files::write::sha256(&bytes) == sha
    {
        return Ok(bytes);
    }
    let store = crate::files::store::Store::open(
        &ctx.state.path(&names::files_state(tree.name.get_ref())),
        ctx.config.general.busy_timeout.0,
    )?;
    store.object(sha)?.ok_or_else(|| {
        anyhow::anyhow!(
            "that version of {} is no longer kept (only the losing file and JSON files up \
             to merge_max are). Try: cr0sync db resolve {} --ack",
            record.key,
            record.id
        )
    })
}

/// Sets (or, with `None`, removes) the value at a `/` path of keys.
fn set_key(value: &mut serde_json::Value, keys: &[&str], to: Option<serde_json::Value>) {
    let Some((last, parents)) = keys.split_last() else {
        return;
    };
    let mut at = value;
    for k in parents {
        let Some(obj) = at.as_object_mut() else {
            return;
        };
        at = obj
            .entry(k.to_string())
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
    }
    if let Some(obj) = at.as_object_mut() {
        match to {
            Some(v) => {
                obj.insert(last.to_string(), v);
            }
            None => {
                obj.remove(*last);
            }
        }
    }
}
