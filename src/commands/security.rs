//! `cr0sync security ...` (SPEC 5): what is built so far.

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::cli::GlobalArgs;
use crate::error::Outcome;
use crate::ops::job::Job;
use crate::ops::runner::{Trigger, run_job};
use crate::security::job;

#[derive(Debug, Args)]
#[command(
    about = "Security tasks: expired API session cleanup, security event archiving",
    after_help = "Example:\n  cr0sync security cleanup-sessions --dry-run\n  cr0sync security archive-events"
)]
pub struct SecurityCmd {
    #[command(subcommand)]
    pub action: SecurityAction,
}

#[derive(Debug, Subcommand)]
pub enum SecurityAction {
    /// Remove expired sessions and rate-limit windows from api_sessions.json, in place, under its flock
    #[command(after_help = "Example:\n  cr0sync security cleanup-sessions --dry-run")]
    CleanupSessions {
        /// Count what would be removed, change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Move events older than event_archive_after to logs/security/archive/events-YYYY-MM.jsonl.gz
    #[command(after_help = "Example:\n  cr0sync security archive-events")]
    ArchiveEvents {
        /// Count what would be moved, change nothing
        #[arg(long)]
        dry_run: bool,
    },
}

impl SecurityCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        let ctx = global.context()?;
        let (dry_run, name) = match self.action {
            SecurityAction::CleanupSessions { dry_run } => (dry_run, "cleanup-sessions"),
            SecurityAction::ArchiveEvents { dry_run } => (dry_run, "archive-events"),
        };
        let report = run_job(&ctx, Job::Security, Trigger::Manual, dry_run, |run| {
            match self.action {
                SecurityAction::CleanupSessions { .. } => {
                    run.task(name, job::cleanup_sessions_task)
                }
                SecurityAction::ArchiveEvents { .. } => run.task(name, job::archive_events_task),
            }
            Ok(())
        })?;
        for t in &report.tasks {
            println!("{}", t.detail);
        }
        Ok(report.outcome)
    }
}
