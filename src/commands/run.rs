//! `cr0sync run <job>`: run a job now, as a person. Unlike `cron`, it waits up to `--wait`
//! for a running job and otherwise exits 3 naming the holder, and it prints what each task
//! did.

use anyhow::Result;
use clap::Args;

use crate::cli::GlobalArgs;
use crate::error::Outcome;
use crate::jobs::Job;
use crate::jobs::runner::run_job;
use crate::ops::task::{RunResult, Trigger};
use crate::output::Table;

#[derive(Debug, Args)]
#[command(
    about = "Run one job now and print what it did (waits for a running job with --wait)",
    after_help = "Example:\n  cr0sync run database\n  cr0sync run logs --wait 2m\n\n\
                  Exits 3 if the job is still running after --wait (default: do not wait)."
)]
pub struct RunCmd {
    /// Which job to run
    #[arg(value_enum)]
    pub job: Job,

    /// Run every task that is due, but write nothing
    #[arg(long)]
    pub dry_run: bool,
}

impl RunCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        let ctx = global.context()?;
        let report = run_job(&ctx, self.job, Trigger::Manual, self.dry_run, |run| {
            self.job.cron(run)
        })?;
        let mut t = Table::new(["TASK", "RESULT", "DETAIL"]);
        for task in &report.tasks {
            let result = match task.result {
                RunResult::Ok => "ok",
                RunResult::Error => "error",
            };
            t.row([task.name.as_str(), result, task.detail.as_str()]);
        }
        if !t.is_empty() {
            print!("{}", t.render());
        }
        let dry = if self.dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        };
        println!(
            "{} job: {} task(s), ok in {} ms{dry}",
            self.job,
            report.tasks.len(),
            report.duration_ms
        );
        Ok(report.outcome)
    }
}
