//! `cr0sync cron <job>`: what cron runs every minute. Silent when all is well;
//! exits 0 at once when the job is already running.

use anyhow::Result;
use clap::Args;

use crate::cli::GlobalArgs;
use crate::error::Outcome;
use crate::jobs::Job;
use crate::jobs::runner::run_job;
use crate::ops::task::Trigger;

#[derive(Debug, Args)]
#[command(
    about = "Run one job as cron does: skip if it is already running, log to logs/cron_*.log",
    after_help = "Example:\n  cr0sync cron database\n  cr0sync cron logs --dry-run"
)]
pub struct CronCmd {
    /// Which job to run
    #[arg(value_enum)]
    pub job: Job,

    /// Run every task that is due, but write nothing
    #[arg(long)]
    pub dry_run: bool,
}

impl CronCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        let ctx = global.context()?;
        let report = run_job(&ctx, self.job, Trigger::Cron, self.dry_run, |run| {
            self.job.cron(run)
        })?;
        Ok(report.outcome)
    }
}
