//! Logging setup (log4rs), done once per process after the configuration is read.
//!
//! A job logs to its own file under `logs/` (`cron_database_sync.log`, ...), rolled by size
//! into gzip-compressed `<name>.N.gz`. On a terminal, warnings and errors also go to stderr;
//! under cron nothing does, so cron mails only the final error line that `main` prints.
//! Everything else in cr0sync logs through the `log` facade only.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context as _, Result};
use log::LevelFilter;
use log4rs::append::Append;
use log4rs::append::rolling_file::RollingFileAppender;
use log4rs::append::rolling_file::policy::compound::CompoundPolicy;
use log4rs::append::rolling_file::policy::compound::roll::fixed_window::FixedWindowRoller;
use log4rs::append::rolling_file::policy::compound::trigger::size::SizeTrigger;
use log4rs::config::{Appender, Config, Root};
use log4rs::encode::pattern::PatternEncoder;
use log4rs::filter::{Filter, Response};

static HANDLE: OnceLock<log4rs::Handle> = OnceLock::new();

const FILE_PATTERN: &str = "{d(%Y-%m-%dT%H:%M:%S%.3fZ)(utc)} {l:<5} [{P}] {m}{n}";

/// Passes warnings only: errors reach stderr once, as the final line `main` prints.
#[derive(Debug)]
struct WarningsOnly;

impl Filter for WarningsOnly {
    fn filter(&self, record: &log::Record) -> Response {
        if record.level() == log::Level::Warn {
            Response::Neutral
        } else {
            Response::Reject
        }
    }
}

/// Warnings on stderr as `cr0sync: WARN: ...`, through [`crate::output::stderr_text`] so
/// a progress line on the terminal is erased first.
#[derive(Debug)]
struct Stderr;

impl Append for Stderr {
    fn append(&self, record: &log::Record) -> anyhow::Result<()> {
        crate::output::stderr_text(&format!("cr0sync: {}: {}\n", record.level(), record.args()));
        Ok(())
    }

    fn flush(&self) {}
}

/// Where log records go: a job's file (plus stderr on a terminal), or stderr only.
#[derive(Debug, Clone, Copy)]
pub enum LogTarget<'a> {
    Console,
    JobFile {
        path: &'a Path,
        max_size: u64,
        keep: u32,
    },
}

/// Installs (or replaces) the process's logger.
pub fn setup(target: LogTarget<'_>) -> Result<()> {
    let mut builder = Config::builder();
    let mut root = Root::builder();
    if std::io::stderr().is_terminal() {
        builder = builder.appender(
            Appender::builder()
                .filter(Box::new(WarningsOnly))
                .build("stderr", Box::new(Stderr)),
        );
        root = root.appender("stderr");
    }
    let mut level = LevelFilter::Warn;
    if let LogTarget::JobFile {
        path,
        max_size,
        keep,
    } = target
    {
        let pattern = format!("{}.{{}}.gz", path.display());
        let roller = FixedWindowRoller::builder()
            .base(1)
            .build(&pattern, keep.max(1))
            .map_err(|e| anyhow::anyhow!("log roller for {}: {e}", path.display()))?;
        let policy = CompoundPolicy::new(Box::new(SizeTrigger::new(max_size)), Box::new(roller));
        let file = RollingFileAppender::builder()
            .encoder(Box::new(PatternEncoder::new(FILE_PATTERN)))
            .build(path, Box::new(policy))
            .with_context(|| {
                format!(
                    "cannot open log file {} (ls -l it: it must be writable by the user that \
                     runs cr0sync). Try: chown it to that user, or remove it (it is recreated)",
                    path.display()
                )
            })?;
        builder = builder.appender(Appender::builder().build("file", Box::new(file)));
        root = root.appender("file");
        level = LevelFilter::Info;
    }
    let config = builder
        .build(root.build(level))
        .context("log configuration")?;
    match HANDLE.get() {
        Some(handle) => handle.set_config(config),
        None => {
            let handle = log4rs::init_config(config).context("cannot start logging")?;
            let _ = HANDLE.set(handle);
        }
    }
    Ok(())
}
