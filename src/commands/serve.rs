//! `cr0sync serve`: the remote end of a peer on another host, run by ssh.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::error::Outcome;

#[derive(Debug, Args)]
#[command(
    about = "Serve this host's peers to a cr0sync on another host (run by ssh, on stdin/stdout)",
    after_help = "Example:\n  ssh cr0@bot1.example.org cr0sync serve   (what cr0sync runs for an ssh:// peer)\n\n\
                  In ~cr0/.ssh/authorized_keys on the remote host, confine the central host's \
                  key to serving the peers' directories:\n  \
                  command=\"cr0sync serve --allow /home/cr0/bot/data\",restrict ssh-ed25519 AAAA... cr0sync@central\n\n\
                  serve reads no configuration and keeps no state; it speaks a framed binary \
                  protocol, not meant for people."
)]
pub struct ServeCmd {
    /// Refuse every path outside these directories (repeatable)
    #[arg(long, value_name = "DIR", num_args = 1..)]
    pub allow: Vec<PathBuf>,
}

impl ServeCmd {
    pub fn run(&self) -> Result<Outcome> {
        crate::remote::serve::serve_stdio(&self.allow)?;
        Ok(Outcome::Success)
    }
}
