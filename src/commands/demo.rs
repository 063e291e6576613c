//! `cr0sync demo [--dir DIR]`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::cli::GlobalArgs;
use crate::error::Outcome;

#[derive(Debug, Args)]
#[command(
    about = "Build a self-contained demo (central store, bot side, website side), run every \
             job once and show status",
    after_help = "Example:\n  cr0sync demo\n  cr0sync demo --dir /tmp/cr0-demo\n\n\
                  An earlier demo in the same directory is replaced; any other non-empty \
                  directory is refused."
)]
pub struct DemoCmd {
    /// Where to build the demo
    #[arg(long, value_name = "DIR", default_value = "./cr0sync-demo")]
    pub dir: PathBuf,
}

impl DemoCmd {
    pub fn run(&self, _global: &GlobalArgs) -> Result<Outcome> {
        let dir = std::path::absolute(&self.dir)?;
        print!("{}", crate::demo::run(&dir)?);
        Ok(Outcome::Success)
    }
}
