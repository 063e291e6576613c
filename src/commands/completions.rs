//! `cr0sync completions SHELL` and `cr0sync man`: generated from the clap definition, so
//! they always match the commands.

use anyhow::Result;
use clap::{Args, CommandFactory};

use crate::cli::Cli;
use crate::error::Outcome;

#[derive(Debug, Args)]
#[command(
    about = "Print a shell completion script",
    after_help = "Example:\n  cr0sync completions bash | sudo tee /usr/share/bash-completion/completions/cr0sync\n  \
                  cr0sync completions zsh > ~/.zfunc/_cr0sync"
)]
pub struct CompletionsCmd {
    /// bash, zsh, fish, elvish or powershell
    pub shell: clap_complete::Shell,
}

impl CompletionsCmd {
    pub fn run(&self) -> Result<Outcome> {
        let mut cmd = Cli::command();
        let mut text = Vec::new();
        clap_complete::generate(self.shell, &mut cmd, "cr0sync", &mut text);
        print_all(&text)
    }
}

#[derive(Debug, Args)]
#[command(
    about = "Print the man page (roff), or write one page per command into a directory",
    after_help = "Example:\n  sudo cr0sync man --dir /usr/local/share/man/man1 && man cr0sync-db-sync\n  \
                  cr0sync man | man -l -\n\n\
                  The page of cr0sync lists its commands as cr0sync-db(1) and so on: --dir \
                  writes those pages too."
)]
pub struct ManCmd {
    /// Write cr0sync.1 and a page per command (cr0sync-db.1, cr0sync-db-sync.1, ...) here
    #[arg(long, value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
}

impl ManCmd {
    pub fn run(&self) -> Result<Outcome> {
        if let Some(dir) = &self.dir {
            clap_mangen::generate_to(Cli::command(), dir).map_err(|e| {
                anyhow::anyhow!(
                    "cannot write the man pages into {}: {}. Try: create the directory, or \
                     run with permission to write there",
                    dir.display(),
                    crate::error::io_text(&e)
                )
            })?;
            return Ok(Outcome::Success);
        }
        let mut text = Vec::new();
        clap_mangen::Man::new(Cli::command()).render(&mut text)?;
        print_all(&text)
    }
}

/// Writes to stdout; a reader that closed the pipe early (`| head`) is not an error.
fn print_all(bytes: &[u8]) -> Result<Outcome> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Outcome::Success),
        other => {
            other?;
            Ok(Outcome::Success)
        }
    }
}
