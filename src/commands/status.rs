//! `cr0sync status [--json]`.

use anyhow::Result;
use clap::Args;

use crate::cli::GlobalArgs;
use crate::error::Outcome;
use crate::jobs::status;

#[derive(Debug, Args)]
#[command(
    about = "Show last runs, lock holders and anything that needs attention",
    after_help = "Example:\n  cr0sync status\n  cr0sync status --json | jq .jobs.database.last_result\n  \
                  cr0sync status --check || mail -s 'cr0sync needs attention' root\n\n\
                  --check prints only the problems and exits 1 when there is one (0 otherwise)."
)]
pub struct StatusCmd {
    /// Print JSON for scripts and monitoring
    #[arg(long, conflicts_with = "check")]
    pub json: bool,
    /// Print only the problems, each with what to do; exit 1 if there is one
    #[arg(long)]
    pub check: bool,
}

impl StatusCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        let ctx = global.context()?;
        crate::ops::logging::setup(crate::ops::logging::LogTarget::Console)?;
        let report = status::collect(&ctx)?;
        if self.check {
            let problems = report.problems();
            for p in &problems {
                println!("{p}");
            }
            return Ok(if problems.is_empty() {
                Outcome::Success
            } else {
                Outcome::Problems
            });
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report.to_json())?);
        } else {
            print!("{}", report.to_human());
        }
        Ok(Outcome::Success)
    }
}
