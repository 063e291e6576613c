//! What a job's tasks see while a run is in progress ([`JobRun`]), what each task reports
//! ([`TaskDone`]) and the records a run leaves under `state/runs/`.
//!
//! This module knows no job: a job is a name, its periodic tasks are typed [`Task`] names
//! with intervals that the registry (`crate::jobs`) hands in. The runner that takes the
//! lock, sets up the log and writes the records sits above the jobs (`crate::jobs::runner`).
//!
//! Invariants:
//! - A task's failure is logged and recorded; the remaining tasks still run.
//! - A periodic task's success is recorded in the schedule only after it returned.
//! - A periodic task the registry does not list is an error of the run, never silently
//!   "not due".

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::context::Context;
use crate::ops::lock::JobLock;
use crate::ops::schedule::Schedule;

/// The name of a periodic task (`clean-backups`, `integrity-check`, ...). Each job module
/// declares its own as constants; the registry gives each an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Task(&'static str);

impl Task {
    pub const fn new(name: &'static str) -> Self {
        Task(name)
    }

    pub fn name(self) -> &'static str {
        self.0
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A periodic task and how often it is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Periodic {
    pub task: Task,
    pub every: Duration,
}

/// Who started the run: cron skips when the lock is held; a person waits, then exits 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Cron,
    Manual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunResult {
    Ok,
    Error,
}

/// What one task of a run did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub name: String,
    pub result: RunResult,
    pub detail: String,
}

/// The record of a job's last completed run: `state/runs/<job>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub duration_ms: u64,
    pub result: RunResult,
    pub trigger: Trigger,
    pub command: String,
    pub error: Option<String>,
    pub tasks: Vec<TaskRecord>,
    /// Finish time of the last run that succeeded (this one or an earlier one).
    pub last_success: Option<DateTime<Utc>>,
}

/// The last time a cron run was skipped: `state/runs/<job>.skipped.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkipRecord {
    pub time: DateTime<Utc>,
    pub holder_pid: Option<u32>,
}

/// What a successful task reports.
#[derive(Debug, Clone, Default)]
pub struct TaskDone {
    /// One line for the log and the run record: what it did.
    pub detail: String,
    /// New integrity findings: the command exits 4.
    pub findings: bool,
}

impl TaskDone {
    pub fn new(detail: impl Into<String>) -> Self {
        TaskDone {
            detail: detail.into(),
            findings: false,
        }
    }
}

/// A run in progress: what tasks see. Holding it is holding the job's lock.
#[derive(Debug)]
pub struct JobRun<'a> {
    pub ctx: &'a Context,
    /// The job's name (its lock, its records).
    pub job: &'static str,
    pub dry_run: bool,
    /// The run's notion of "now", fixed at its start.
    pub now: DateTime<Utc>,
    pub(crate) tasks: Vec<TaskRecord>,
    pub(crate) errors: Vec<anyhow::Error>,
    pub(crate) findings: bool,
    /// Job-specific gauges for the metrics file (added up when set twice).
    pub(crate) gauges: BTreeMap<&'static str, f64>,
    pub(crate) schedule: Schedule,
    periodic: Vec<Periodic>,
    _lock: JobLock,
}

impl<'a> JobRun<'a> {
    /// A run of the job whose lock is `lock`, with the job's periodic tasks.
    pub fn new(
        ctx: &'a Context,
        lock: JobLock,
        dry_run: bool,
        now: DateTime<Utc>,
        periodic: Vec<Periodic>,
    ) -> Result<Self> {
        let job = lock.job();
        Ok(JobRun {
            ctx,
            job,
            dry_run,
            now,
            tasks: Vec::new(),
            errors: Vec::new(),
            findings: false,
            gauges: BTreeMap::new(),
            schedule: Schedule::load(&ctx.state, job)?,
            periodic,
            _lock: lock,
        })
    }

    /// Adds `value` to a job-specific gauge of this run's metrics file.
    pub fn gauge(&mut self, name: &'static str, value: f64) {
        *self.gauges.entry(name).or_insert(0.0) += value;
    }

    /// Sets a job-specific gauge (a level rather than a count of this run).
    pub fn set_gauge(&mut self, name: &'static str, value: f64) {
        self.gauges.insert(name, value);
    }

    /// How often `task` is due, as the registry says.
    pub fn interval(&self, task: Task) -> Option<Duration> {
        self.periodic
            .iter()
            .find(|p| p.task == task)
            .map(|p| p.every)
    }

    /// Runs a task every run. Its error is logged and recorded; the run goes on.
    pub fn task(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<TaskDone>) {
        let result = f(self);
        self.finish_task(name, result);
    }

    /// Runs a periodic task when due (`state/schedule`); a failed one is due again next run.
    pub fn periodic(&mut self, task: Task, f: impl FnOnce(&mut Self) -> Result<TaskDone>) {
        let name = task.name();
        let Some(interval) = self.interval(task) else {
            let e = anyhow::anyhow!(
                "{name}: not a periodic task of the {} job (a bug: report it)",
                self.job
            );
            self.finish_task(name, Err(e));
            return;
        };
        if !self.schedule.is_due(name, interval, self.now) {
            log::debug!("{name}: not due");
            return;
        }
        let result = f(self);
        let as_text = result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}"));
        if !self.dry_run {
            self.schedule.record(name, self.now, &as_text);
        }
        self.finish_task(name, result);
    }

    fn finish_task(&mut self, name: &str, result: Result<TaskDone>) {
        match result {
            Ok(done) => {
                log::info!("{name}: {}", done.detail);
                self.findings |= done.findings;
                self.tasks.push(TaskRecord {
                    name: name.into(),
                    result: RunResult::Ok,
                    detail: done.detail,
                });
            }
            Err(e) => {
                log::error!("{name}: {e:#}");
                self.tasks.push(TaskRecord {
                    name: name.into(),
                    result: RunResult::Error,
                    detail: format!("{e:#}"),
                });
                self.errors.push(e);
            }
        }
    }
}
