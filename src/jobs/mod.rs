//! The registry: the one place that lists the jobs. For each job, its name (which is also
//! its lock, `locks/<name>.lock`, and its run records), its own log file, its periodic tasks
//! with their intervals, what `cron <job>` runs and the sections it adds to `status`.
//!
//! Layers, bottom up: the foundation (`ops`, `fsutil`, `util`, `layout`, `config`,
//! `context`) knows no job; each job (`db`, `logs`, `security`, `files`) is one folder that uses
//! the foundation; this registry, the [`runner`] and [`status`] sit above the jobs; the
//! commands sit on top. Adding a job is one folder and one entry in [`Job::spec`].

pub mod runner;
pub mod status;

use std::fmt;
use std::time::Duration;

use anyhow::Result;

use crate::config::Config;
use crate::ops::section::SectionFn;
use crate::ops::task::{JobRun, Periodic};

const DAY: Duration = Duration::from_secs(86_400);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Job {
    Database,
    Logs,
    Security,
    Files,
}

/// Everything the runner, `status` and `cron` need to know about one job.
#[derive(Debug)]
pub struct JobSpec {
    /// The name used in lock files, run records, `status` and the command line.
    pub name: &'static str,
    /// cr0sync's own log for the job, under `logs/`.
    pub log_file: &'static str,
    /// The job's periodic tasks and their intervals: what `cron` runs when due and what
    /// `status` shows as next due.
    pub periodic: fn(&Config) -> Vec<Periodic>,
    /// What `cron <job>` runs.
    pub cron: fn(&mut JobRun) -> Result<()>,
    /// The sections the job adds to `status`, in display order.
    pub sections: &'static [SectionFn],
}

const DATABASE: JobSpec = JobSpec {
    name: crate::db::job::JOB,
    log_file: "cron_database_sync.log",
    periodic: |_| {
        vec![Periodic {
            task: crate::db::job::CLEAN_BACKUPS,
            every: DAY.saturating_mul(7),
        }]
    },
    cron: crate::db::job::cron_tasks,
    sections: &[crate::db::job::section],
};

const LOGS: JobSpec = JobSpec {
    name: "logs",
    log_file: "cron_log_sync.log",
    periodic: |_| {
        vec![Periodic {
            task: crate::logs::job::CLEAN_ROTATIONS,
            every: DAY,
        }]
    },
    cron: crate::logs::job::cron_tasks,
    sections: &[crate::logs::job::section],
};

const SECURITY: JobSpec = JobSpec {
    name: "security",
    log_file: "cron_security.log",
    periodic: |config| {
        use crate::security::job::{ARCHIVE_EVENTS, CLEANUP_SESSIONS, INTEGRITY_CHECK};
        let sec = &config.security;
        vec![
            Periodic {
                task: INTEGRITY_CHECK,
                every: sec.integrity_interval.0,
            },
            Periodic {
                task: CLEANUP_SESSIONS,
                every: sec.session_cleanup_interval.0,
            },
            Periodic {
                task: ARCHIVE_EVENTS,
                every: sec.event_archive_interval.0,
            },
        ]
    },
    cron: crate::security::job::cron_tasks,
    sections: &[
        crate::security::job::integrity_section,
        crate::security::job::section,
    ],
};

const FILES: JobSpec = JobSpec {
    name: crate::files::job::JOB,
    log_file: "cron_files_sync.log",
    periodic: |_| Vec::new(),
    cron: crate::files::job::cron_tasks,
    sections: &[crate::files::job::section],
};

impl Job {
    pub const ALL: [Job; 4] = [Job::Database, Job::Logs, Job::Security, Job::Files];

    /// The job's entry in the registry.
    pub fn spec(self) -> &'static JobSpec {
        match self {
            Job::Database => &DATABASE,
            Job::Logs => &LOGS,
            Job::Security => &SECURITY,
            Job::Files => &FILES,
        }
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    pub fn log_file_name(self) -> &'static str {
        self.spec().log_file
    }

    pub fn periodic(self, config: &Config) -> Vec<Periodic> {
        (self.spec().periodic)(config)
    }

    /// Runs what `cron <job>` runs, inside a run of this job.
    pub fn cron(self, run: &mut JobRun) -> Result<()> {
        (self.spec().cron)(run)
    }

    /// The job whose name is `name`.
    pub fn named(name: &str) -> Option<Job> {
        Job::ALL.into_iter().find(|j| j.name() == name)
    }
}

impl fmt::Display for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_log_files_are_distinct() {
        let names: std::collections::BTreeSet<_> = Job::ALL.iter().map(|j| j.name()).collect();
        let logs: std::collections::BTreeSet<_> =
            Job::ALL.iter().map(|j| j.log_file_name()).collect();
        assert_eq!(names.len(), Job::ALL.len());
        assert_eq!(logs.len(), Job::ALL.len());
        for job in Job::ALL {
            assert_eq!(Job::named(job.name()), Some(job));
        }
    }

    #[test]
    fn every_periodic_task_is_named_once() {
        let config = Config::default();
        let mut seen = std::collections::BTreeSet::new();
        for job in Job::ALL {
            for p in job.periodic(&config) {
                assert!(seen.insert(p.task), "{} listed twice", p.task);
                assert!(p.every > Duration::ZERO);
            }
        }
    }
}
