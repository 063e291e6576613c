//! `cr0sync init`.

use anyhow::Result;
use clap::Args;

use crate::cli::GlobalArgs;
use crate::error::Outcome;

#[derive(Debug, Args)]
#[command(
    about = "Create the central store: directories, default cr0sync.toml, integrity key",
    after_help = "Example:\n  cr0sync --root /data/cr0_system init\n\n\
                  Safe to run again: it creates only what is missing and never overwrites a file."
)]
pub struct InitCmd {}

impl InitCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        crate::ops::logging::setup(crate::ops::logging::LogTarget::Console)?;
        let location = global.location();
        let created = crate::init::init(&location)?;
        let root = location.layout().root().display().to_string();
        if created.paths.is_empty() {
            println!("{root}: already initialized, nothing created");
        } else {
            for path in &created.paths {
                println!("created {}", path.display());
            }
            println!(
                "{root}: initialized. Next: edit {}",
                location.config_path(&location.layout()).display()
            );
        }
        Ok(Outcome::Success)
    }
}
