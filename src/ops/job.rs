//! The three jobs. Each has one lock, one log file and one run record.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Job {
    Database,
    Logs,
    Security,
}

impl Job {
    pub const ALL: [Job; 3] = [Job::Database, Job::Logs, Job::Security];

    /// The name used in lock files, run records, `status` and the command line.
    pub fn name(self) -> &'static str {
        match self {
            Job::Database => "database",
            Job::Logs => "logs",
            Job::Security => "security",
        }
    }

    /// The job's periodic tasks and their intervals: what `cron` runs when due
    /// and what `status` shows as next due. One list, used by both.
    pub fn periodic(
        self,
        config: &crate::config::Config,
    ) -> Vec<(&'static str, std::time::Duration)> {
        const DAY: u64 = 86_400;
        let sec = &config.security;
        match self {
            Job::Database => vec![("clean-backups", std::time::Duration::from_secs(7 * DAY))],
            Job::Logs => vec![("clean-rotations", std::time::Duration::from_secs(DAY))],
            Job::Security => vec![
                ("integrity-check", sec.integrity_interval.0),
                ("cleanup-sessions", sec.session_cleanup_interval.0),
                ("archive-events", sec.event_archive_interval.0),
            ],
        }
    }

    /// The interval of one of [`Job::periodic`]'s tasks.
    pub fn interval(self, config: &crate::config::Config, task: &str) -> std::time::Duration {
        self.periodic(config)
            .into_iter()
            .find(|(name, _)| *name == task)
            .map_or(std::time::Duration::MAX, |(_, every)| every)
    }

    /// cr0sync's own log for the job, under `logs/`.
    pub fn log_file_name(self) -> &'static str {
        match self {
            Job::Database => "cron_database_sync.log",
            Job::Logs => "cron_log_sync.log",
            Job::Security => "cron_security.log",
        }
    }
}

impl fmt::Display for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
