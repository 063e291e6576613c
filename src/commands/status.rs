//! `cr0sync status [--json]`.

use anyhow::Result;
use clap::Args;

use crate::cli::GlobalArgs;
use crate::error::Outcome;
use crate::ops::status;

#[derive(Debug, Args)]
#[command(
    about = "Show last runs, lock holders and anything that needs attention",
    after_help = "Example:\n  cr0sync status\n  cr0sync status --json | jq .jobs.database.last_result"
)]
pub struct StatusCmd {
    /// Print JSON for scripts and monitoring
    #[arg(long)]
    pub json: bool,
}

impl StatusCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        let ctx = global.context()?;
        crate::ops::logging::setup(crate::ops::logging::LogTarget::Console)?;
        let report = status::collect(&ctx)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report.to_json())?);
        } else {
            print!("{}", report.to_human());
        }
        Ok(Outcome::Success)
    }
}
