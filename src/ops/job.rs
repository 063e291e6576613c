//! The three jobs (SPEC 6.1). Each has one lock, one log file and one run record.

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

    /// cr0sync's own log for the job, under `logs/` (names from SPEC 1).
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
