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
    for (tree, peer) in pairs(ctx, sel)? {
        let now = run.now;
        run.task(&task_name(tree, peer), |run| {
            let report = sync::sync_pair(ctx, tree, peer, opts, now)?;
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
    pub last_error: Option<String>,
}

pub fn pair_statuses(ctx: &Context) -> Result<Vec<PairStatus>> {
    let record: Option<RunRecord> = ctx.state.load(&names::run_record(JOB))?;
    let open = conflicts::open(ctx)?;
    let mut out = Vec::new();
    for tree in &ctx.config.files.tree {
        let name = tree.name.get_ref();
        for peer in &tree.peers {
            let peer_name = peer.name.get_ref();
            let state: Option<PairState> = ctx.state.load(&names::files_pair(name, peer_name))?;
            let task = task_name(tree, peer);
            out.push(PairStatus {
                tree: name.clone(),
                peer: peer_name.clone(),
                direction: format!("{:?}", peer.direction).to_lowercase(),
                path: ctx.resolve(peer.path.get_ref()).display().to_string(),
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
