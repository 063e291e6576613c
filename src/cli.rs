//! The command line (clap derive). Each subcommand is a struct with a `run`; the logic
//! lives in the job modules. Global options are accepted before or after the subcommand.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::commands::{
    completions::{CompletionsCmd, ManCmd},
    cron::CronCmd,
    db::{DbCmd, SyncFromBotCmd},
    demo::DemoCmd,
    files::FilesCmd,
    init::InitCmd,
    logs::LogsCmd,
    run::RunCmd,
    security::SecurityCmd,
    status::StatusCmd,
};
use crate::context::{Context, Location};
use crate::error::Outcome;

const EXAMPLES: &str = "\
Examples:
  cr0sync --root /data/cr0_system init      create the central store
  cr0sync status                            what ran, what is wrong, what to do
  cr0sync run database --wait 1m            run a job now and see what it did
  cr0sync cron database                     what cron runs every minute
  cr0sync db sync --dry-run                 what a database sync would change
  cr0sync demo                              try everything on a throwaway root

Exit codes: 0 ok, 1 runtime error, 2 usage or configuration error,
3 lock held, 4 integrity findings.";

#[derive(Debug, Parser)]
#[command(
    name = "cr0sync",
    version,
    about = "Keeps the databases, IRC logs and integrity state of IRC bots and their website \
             consistent through one central store.",
    after_help = EXAMPLES
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Root of the central store [default: /data/cr0_system]
    #[arg(long, global = true, env = "CR0SYNC_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// Configuration file [default: <root>/cr0sync.toml]
    #[arg(long, global = true, env = "CR0SYNC_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// How long a manual command waits for a running job's lock (e.g. 30s, 5m)
    #[arg(long, global = true, value_name = "DURATION", default_value = "0s",
          value_parser = parse_wait)]
    pub wait: Duration,
}

fn parse_wait(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

impl GlobalArgs {
    pub fn location(&self) -> Location {
        Location {
            root: self.root.clone(),
            config: self.config.clone(),
        }
    }

    /// Loads the context of an initialized root.
    pub fn context(&self) -> Result<Context> {
        Context::load(&self.location(), self.wait)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Init(InitCmd),
    Status(StatusCmd),
    Run(RunCmd),
    Cron(CronCmd),
    Db(DbCmd),
    Logs(LogsCmd),
    Files(FilesCmd),
    Security(SecurityCmd),
    SyncFromBot(SyncFromBotCmd),
    Demo(DemoCmd),
    Serve(crate::commands::serve::ServeCmd),
    Completions(CompletionsCmd),
    Man(ManCmd),
}

impl Cli {
    pub fn run(&self) -> Result<Outcome> {
        match &self.command {
            Command::Init(cmd) => cmd.run(&self.global),
            Command::Status(cmd) => cmd.run(&self.global),
            Command::Run(cmd) => cmd.run(&self.global),
            Command::Cron(cmd) => cmd.run(&self.global),
            Command::Db(cmd) => cmd.run(&self.global),
            Command::Logs(cmd) => cmd.run(&self.global),
            Command::Files(cmd) => cmd.run(&self.global),
            Command::Security(cmd) => cmd.run(&self.global),
            Command::SyncFromBot(cmd) => cmd.run(&self.global),
            Command::Demo(cmd) => cmd.run(&self.global),
            Command::Serve(cmd) => cmd.run(),
            Command::Completions(cmd) => cmd.run(),
            Command::Man(cmd) => cmd.run(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_has_an_example() {
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            let help = sub
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(
                help.contains("Example"),
                "{} --help has no example",
                sub.get_name()
            );
        }
    }

    #[test]
    fn global_options_after_subcommand() {
        let cli =
            Cli::try_parse_from(["cr0sync", "status", "--root", "/x", "--wait", "5m"]).unwrap();
        assert_eq!(cli.global.root.as_deref(), Some(std::path::Path::new("/x")));
        assert_eq!(cli.global.wait, Duration::from_secs(300));
    }
}
