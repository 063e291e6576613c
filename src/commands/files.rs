//! `cr0sync files ...`.

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::cli::GlobalArgs;
use crate::error::Outcome;
use crate::files::job::{self, Selection};
use crate::jobs::Job;
use crate::jobs::runner::run_job;
use crate::ops::task::Trigger;
use crate::output::Table;

#[derive(Debug, Args)]
#[command(
    about = "Three-way sync of directories of files: JSON merged key by key, counters added",
    after_help = "Example:\n  cr0sync files sync --dry-run\n  cr0sync files sync --tree balances --peer site1\n  cr0sync files status --json"
)]
pub struct FilesCmd {
    #[command(subcommand)]
    pub action: FilesAction,
}

#[derive(Debug, Subcommand)]
pub enum FilesAction {
    /// Sync every (tree, peer) pair, or the ones selected
    #[command(
        after_help = "Example:\n  cr0sync files sync\n  cr0sync files sync --tree balances --dry-run"
    )]
    Sync {
        /// Only this tree (repeatable)
        #[arg(long = "tree", value_name = "NAME")]
        trees: Vec<String>,
        /// Only this peer
        #[arg(long, value_name = "NAME")]
        peer: Option<String>,
        /// Show what would change, write nothing
        #[arg(long)]
        dry_run: bool,
        /// Override the mass-delete guard
        #[arg(long)]
        force: bool,
    },
    /// Per tree and peer: last sync, files, open conflicts, writes left for the next run
    #[command(after_help = "Example:\n  cr0sync files status\n  cr0sync files status --json")]
    Status {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

impl FilesCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        let ctx = global.context()?;
        match &self.action {
            FilesAction::Sync {
                trees,
                peer,
                dry_run,
                force,
            } => {
                let sel = Selection {
                    trees: trees.clone(),
                    peer: peer.clone(),
                };
                job::pairs(&ctx, &sel)?;
                let mut reports = Vec::new();
                let result = run_job(&ctx, Job::Files, Trigger::Manual, *dry_run, |run| {
                    reports = job::sync_pairs(run, &sel, *force)?;
                    Ok(())
                });
                print!("{}", job::sync_table(&reports).render());
                for line in reports.iter().flat_map(|r| &r.new_conflicts) {
                    eprintln!("cr0sync: {line}");
                }
                Ok(result?.outcome)
            }
            FilesAction::Status { json } => {
                let pairs = job::pair_statuses(&ctx)?;
                if *json {
                    println!("{}", serde_json::to_string_pretty(&pairs)?);
                } else {
                    let mut t = Table::new([
                        "TREE",
                        "PEER",
                        "DIRECTION",
                        "LAST SYNC",
                        "FILES",
                        "CONFLICTS",
                        "DEFERRED",
                    ]);
                    for p in &pairs {
                        t.row([
                            p.tree.clone(),
                            p.peer.clone(),
                            p.direction.clone(),
                            p.last_sync.clone().unwrap_or_else(|| "-".into()),
                            p.files.map_or("-".into(), |n| n.to_string()),
                            p.conflicts.to_string(),
                            p.deferred.to_string(),
                        ]);
                    }
                    if t.is_empty() {
                        println!("no [[files.tree]] configured");
                    } else {
                        print!("{}", t.render());
                    }
                }
                Ok(Outcome::Success)
            }
        }
    }
}
