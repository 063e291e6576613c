//! `cr0sync db ...` and `cr0sync sync-from-bot`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::cli::GlobalArgs;
use crate::conflicts;
use crate::db::job::{self, Selection};
use crate::error::Outcome;
use crate::jobs::Job;
use crate::jobs::runner::run_job;
use crate::ops::task::{TaskDone, Trigger};
use crate::output::Table;

#[derive(Debug, Args)]
#[command(
    about = "Sync databases between the central copy and the peers; backups and conflicts",
    after_help = "Example:\n  cr0sync db sync --dry-run\n  cr0sync db sync --db users --peer bot\n  \
                  cr0sync db status\n  cr0sync db conflicts --json"
)]
pub struct DbCmd {
    #[command(subcommand)]
    pub action: DbAction,
}

#[derive(Debug, Subcommand)]
pub enum DbAction {
    Sync(SyncCmd),
    Status(JsonFlag),
    Conflicts(ConflictsCmd),
    Resolve(ResolveCmd),
    Restore(RestoreCmd),
    CleanBackups(CleanCmd),
}

#[derive(Debug, Args)]
#[command(
    visible_alias = "bidirectional",
    about = "Three-way merge of every pair (or the named ones), with backups and conflict records",
    after_help = "Example:\n  cr0sync db sync\n  cr0sync db sync --db users --db game --dry-run\n  \
                  cr0sync db sync --db users --peer website --force\n\n\
                  Exits 1 if a pair failed (the others still sync), 3 if the database job is \
                  running (see --wait)."
)]
pub struct SyncCmd {
    #[command(flatten)]
    pub pairs: PairArgs,
    /// Print per table what would change, write nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Override the mass-delete guard
    #[arg(long)]
    pub force: bool,
}

/// `--db NAME... --peer NAME`, shared by the commands that work on pairs.
#[derive(Debug, Args)]
pub struct PairArgs {
    /// Only this database (repeatable; default: all)
    #[arg(long = "db", value_name = "NAME")]
    pub databases: Vec<String>,
    /// Only the pairs with this peer
    #[arg(long, value_name = "NAME")]
    pub peer: Option<String>,
}

impl PairArgs {
    pub fn selection(&self) -> Selection {
        Selection {
            databases: self.databases.clone(),
            peer: self.peer.clone(),
        }
    }
}

#[derive(Debug, Args)]
#[command(
    about = "Per pair: last sync, changes, conflicts, rows left unapplied, skipped tables",
    after_help = "Example:\n  cr0sync db status\n  cr0sync db status --json | jq '.[0]'"
)]
pub struct JsonFlag {
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(
    about = "List the open conflicts (a policy chose a winner; the losing row is recorded)",
    after_help = "Example:\n  cr0sync db conflicts\n  cr0sync db conflicts --all --json | jq length"
)]
pub struct ConflictsCmd {
    /// Every recorded conflict, resolved ones too
    #[arg(long)]
    pub all: bool,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(
    about = "Close a conflict: put one of its rows back through the central copy, or acknowledge it",
    after_help = "Example:\n  cr0sync db resolve 20261203T101500.123456Z-42-users-bot-0 --keep peer\n  \
                  cr0sync db resolve 20261203T101500.123456Z-42-users-bot-0 --ack\n  \
                  cr0sync db resolve --all --ack\n\n\
                  --keep writes that row image (or its absence) into the central copy, backup \
                  first; the next sync carries it to every peer.",
    group(clap::ArgGroup::new("how").required(true).args(["keep", "ack"])),
    group(clap::ArgGroup::new("which").required(true).args(["id", "all"]))
)]
pub struct ResolveCmd {
    /// The conflict's id (from `cr0sync db conflicts`)
    pub id: Option<String>,
    /// Every open conflict (with --ack only)
    #[arg(long, requires = "ack", conflicts_with = "keep")]
    pub all: bool,
    /// Which row image to keep
    #[arg(long, value_parser = ["central", "peer", "base"])]
    pub keep: Option<String>,
    /// Close without changing data (the policy's choice stands)
    #[arg(long)]
    pub ack: bool,
    /// Say what would be written, write nothing
    #[arg(long)]
    pub dry_run: bool,
}

impl ResolveCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        let ctx = global.context()?;
        let mut line = String::new();
        // A conflict of a file tree is resolved under the file-tree job's lock.
        let file_conflict = match &self.id {
            Some(id) if !self.all => crate::conflicts::open(&ctx)?.iter().any(|r| {
                &r.id == id
                    && matches!(
                        r.kind,
                        crate::conflicts::ConflictKind::File | crate::conflicts::ConflictKind::Json
                    )
            }),
            _ => false,
        };
        let report = if file_conflict {
            let id = self.id.clone().unwrap_or_default();
            run_job(&ctx, Job::Files, Trigger::Manual, self.dry_run, |run| {
                line = crate::files::job::resolve(run, &id, self.keep.as_deref())?;
                Ok(())
            })?
        } else {
            run_job(&ctx, Job::Database, Trigger::Manual, self.dry_run, |run| {
                line = match &self.id {
                    Some(id) if !self.all => job::resolve(run, id, self.keep.as_deref())?,
                    _ => job::ack_all(run)?,
                };
                Ok(())
            })?
        };
        println!("{line}");
        Ok(report.outcome)
    }
}

#[derive(Debug, Args)]
#[command(
    about = "Put a backup back into the central copy or a peer (backing up the current state first)",
    after_help = "Example:\n  cr0sync db restore /data/cr0_system/backups/users/users.central.20261122T030000Z.db.gz\n  \
                  cr0sync db restore backups/users/users.bot.20261122T030000Z.db.gz --to bot\n\n\
                  The pairs involved are reset: their next sync is a first sync (a union, \
                  differing rows resolved by policy and recorded as conflicts)."
)]
pub struct RestoreCmd {
    /// A backup file, backups/<name>/<name>.<target>.<stamp>.db.gz
    pub backup_file: PathBuf,
    /// `central` or a peer's name
    #[arg(long, default_value = "central", value_name = "central|PEER")]
    pub to: String,
    /// Say what would be restored, write nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
#[command(
    about = "Remove backups older than backup_keep, keeping the newest backup_keep_min per target",
    after_help = "Example:\n  cr0sync db clean-backups --dry-run"
)]
pub struct CleanCmd {
    /// List what would be removed, remove nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
#[command(
    about = "Recovery: replace the central copy with a peer's copy (backup first) and reset the pair",
    after_help = "Example:\n  cr0sync sync-from-bot --db users\n  cr0sync sync-from-bot --db users --peer website --dry-run\n\n\
                  --peer defaults to the peer named `bot`, or the only peer."
)]
pub struct SyncFromBotCmd {
    #[command(flatten)]
    pub pairs: PairArgs,
    /// Say what would be replaced, write nothing
    #[arg(long)]
    pub dry_run: bool,
}

impl DbCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        match &self.action {
            DbAction::Sync(cmd) => cmd.run(global),
            DbAction::Status(f) => status(global, f.json),
            DbAction::Conflicts(c) => list_conflicts(global, c.json, c.all),
            DbAction::Resolve(cmd) => cmd.run(global),
            DbAction::Restore(cmd) => cmd.run(global),
            DbAction::CleanBackups(cmd) => cmd.run(global),
        }
    }
}

impl SyncCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        let ctx = global.context()?;
        let sel = self.pairs.selection();
        job::pairs(&ctx, &sel)?;
        let mut reports = Vec::new();
        let result = run_job(&ctx, Job::Database, Trigger::Manual, self.dry_run, |run| {
            reports = job::sync_pairs(run, &sel, self.force)?;
            Ok(())
        });
        print!("{}", crate::db::job::sync_table(&reports).render());
        if self.dry_run {
            println!("dry run: nothing written");
        }
        Ok(result?.outcome)
    }
}

fn status(global: &GlobalArgs, json: bool) -> Result<Outcome> {
    let ctx = global.context()?;
    if json {
        let pairs = job::pair_statuses(&ctx)?;
        println!("{}", serde_json::to_string_pretty(&pairs)?);
    } else {
        let s = job::section(&ctx)?;
        print!("{}", s.table.render());
        for p in s.problems {
            println!("  - {p}");
        }
    }
    Ok(Outcome::Success)
}

fn list_conflicts(global: &GlobalArgs, json: bool, all: bool) -> Result<Outcome> {
    let ctx = global.context()?;
    let closed = conflicts::closed_ids(&ctx)?;
    let records: Vec<_> = conflicts::read(&ctx)?
        .into_iter()
        .filter(|r| all || !closed.contains(&r.id))
        .collect();
    if json {
        let values: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["open"] = (!closed.contains(&r.id)).into();
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&values)?);
        return Ok(Outcome::Success);
    }
    let mut t = Table::new([
        "ID",
        "TIME",
        "DATABASE",
        "PEER",
        "TABLE",
        "KEY",
        "KIND",
        "WINNER",
        "LOSING ROW",
        "STATE",
    ]);
    for c in &records {
        let losing = if c.winner == crate::db::merge::Winner::Central {
            &c.rows.peer
        } else {
            &c.rows.central
        };
        t.row([
            c.id.clone(),
            crate::ops::clock::rfc3339(c.time),
            c.database.clone(),
            c.peer.clone(),
            c.table.clone(),
            c.key.to_string(),
            c.kind.to_string(),
            c.winner.to_string(),
            losing
                .as_ref()
                .map_or("(deleted)".into(), |r| r.to_string()),
            if closed.contains(&c.id) {
                "resolved"
            } else {
                "open"
            }
            .to_string(),
        ]);
    }
    if t.is_empty() {
        println!(
            "{}",
            if all {
                "no conflicts recorded"
            } else {
                "no open conflicts"
            }
        );
    } else {
        print!("{}", t.render());
    }
    Ok(Outcome::Success)
}

impl RestoreCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        let ctx = global.context()?;
        let file = std::path::absolute(&self.backup_file)?;
        let (db, _) = job::backup_owner(&ctx, &file)?;
        let mut line = String::new();
        let report = run_job(&ctx, Job::Database, Trigger::Manual, self.dry_run, |run| {
            line = job::restore(run, db, &file, &self.to)?;
            Ok(())
        })?;
        println!("{line}");
        Ok(report.outcome)
    }
}

impl CleanCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        let ctx = global.context()?;
        let (mut removed, mut copies) = (Vec::new(), Vec::new());
        let report = run_job(&ctx, Job::Database, Trigger::Manual, self.dry_run, |run| {
            run.task(crate::db::job::CLEAN_BACKUPS.name(), |run| {
                removed = job::clean_backups(run.ctx, run.dry_run, run.now)?;
                copies = job::clean_stale_copies(run.ctx, run.dry_run)?;
                Ok(TaskDone::new(format!(
                    "{} expired backup(s) and {} copy(ies) of peers no longer configured",
                    removed.len(),
                    copies.len()
                )))
            });
            Ok(())
        })?;
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        for b in &removed {
            println!("{verb} {}", b.path.display());
        }
        println!("{} backup(s) {verb}", removed.len());
        for path in &copies {
            println!(
                "{verb} {} (a copy of a peer no longer configured)",
                path.display()
            );
        }
        Ok(report.outcome)
    }
}

impl SyncFromBotCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        let ctx = global.context()?;
        let sel = Selection {
            databases: self.pairs.databases.clone(),
            peer: None,
        };
        job::pairs(&ctx, &sel)?;
        let dbs: Vec<_> = ctx
            .config
            .database
            .db
            .iter()
            .filter(|d| sel.databases.is_empty() || sel.databases.contains(d.name.get_ref()))
            .collect();
        let chosen = dbs
            .iter()
            .map(|d| job::recovery_peer(d, self.pairs.peer.as_deref()).map(|p| (*d, p)))
            .collect::<Result<Vec<_>>>()?;
        let mut lines = Vec::new();
        let report = run_job(&ctx, Job::Database, Trigger::Manual, self.dry_run, |run| {
            for (db, peer) in &chosen {
                run.task(
                    &format!(
                        "sync-from-bot {}/{}",
                        db.name.get_ref(),
                        peer.name.get_ref()
                    ),
                    |run| {
                        let line = job::sync_from_peer(run, db, peer)?;
                        lines.push(line.clone());
                        Ok(TaskDone::new(line))
                    },
                );
            }
            Ok(())
        });
        for l in &lines {
            println!("{l}");
        }
        Ok(report?.outcome)
    }
}
