//! `cr0sync logs ...`.

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::cli::GlobalArgs;
use crate::error::Outcome;
use crate::jobs::Job;
use crate::jobs::runner::{RunReport, run_job};
use crate::logs::job;
use crate::ops::task::{TaskDone, Trigger};
use crate::output::Table;

#[derive(Debug, Args)]
#[command(
    about = "Copy IRC logs into the central store exactly once; rotate central logs",
    after_help = "Example:\n  cr0sync logs sync\n  cr0sync logs rotate --dry-run\n  cr0sync logs status --json"
)]
pub struct LogsCmd {
    #[command(subcommand)]
    pub action: LogsAction,
}

#[derive(Debug, Subcommand)]
pub enum LogsAction {
    /// Append new complete lines of every stream's sources (skips unchanged sources)
    #[command(after_help = "Example:\n  cr0sync logs sync")]
    Sync,
    /// Like sync, but look at every source even if its size and mtime are unchanged
    #[command(after_help = "Example:\n  cr0sync logs sync-all")]
    SyncAll,
    /// Rotate stream destinations and [logs].rotate files larger than rotate_size
    #[command(after_help = "Example:\n  cr0sync logs rotate --dry-run")]
    Rotate {
        /// List what would be rotated, rotate nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Per stream: files, bytes copied, bytes behind
    #[command(after_help = "Example:\n  cr0sync logs status\n  cr0sync logs status --json")]
    Status {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

fn print_tasks(report: &RunReport) {
    let mut t = Table::new(["TASK", "DETAIL"]);
    for task in &report.tasks {
        t.row([task.name.as_str(), task.detail.as_str()]);
    }
    if !t.is_empty() {
        print!("{}", t.render());
    }
}

impl LogsCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        let ctx = global.context()?;
        let report = match &self.action {
            LogsAction::Sync | LogsAction::SyncAll => {
                let fast = matches!(self.action, LogsAction::Sync);
                run_job(&ctx, Job::Logs, Trigger::Manual, false, |run| {
                    job::sync_streams(run, fast);
                    Ok(())
                })?
            }
            LogsAction::Rotate { dry_run } => {
                let mut done = Vec::new();
                let report = run_job(&ctx, Job::Logs, Trigger::Manual, *dry_run, |run| {
                    run.task("rotate", |run| {
                        done = job::rotate_all(run.ctx, run.dry_run)?;
                        Ok(TaskDone::new(format!("{} file(s) rotated", done.len())))
                    });
                    Ok(())
                })?;
                let verb = if *dry_run { "would rotate" } else { "rotated" };
                for (path, size) in &done {
                    println!("{verb} {} ({size} bytes)", path.display());
                }
                println!("{} file(s) {verb}", done.len());
                return Ok(report.outcome);
            }
            LogsAction::Status { json } => {
                let streams = job::stream_statuses(&ctx)?;
                if *json {
                    println!("{}", serde_json::to_string_pretty(&streams)?);
                } else {
                    let s = job::section(&ctx)?;
                    print!("{}", s.table.render());
                    for p in s.problems {
                        println!("  - {p}");
                    }
                }
                return Ok(Outcome::Success);
            }
        };
        print_tasks(&report);
        Ok(report.outcome)
    }
}
