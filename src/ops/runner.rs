//! Running a job: lock, log, tasks, run record. Every job and every manual command that
//! writes goes through [`run_job`], so locking and records behave the same everywhere.
//!
//! Invariants:
//! - The lock is held from before the first task until after the run record is written.
//! - A cron run whose lock is held exits 0 at once and records only a skip (in its own
//!   file, so it never overwrites the record the holder is about to write).
//! - A task's failure is logged and recorded; the remaining tasks still run (where one
//!   failure makes the rest unsafe, the task returns the error from the body instead).
//! - The run record is written at the end of every run that is not a dry run, whatever the
//!   result. A periodic task's success is recorded in the schedule only after it returned.
//! - A dry run writes no state at all.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::context::Context;
use crate::error::{Error, Outcome};
use crate::ops::clock;
use crate::ops::job::Job;
use crate::ops::lock::{self, JobLock};
use crate::ops::logging::{self, LogTarget};
use crate::ops::schedule::Schedule;

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

pub fn record_file(job: Job) -> String {
    format!("runs/{}.json", job.name())
}

pub fn skip_file(job: Job) -> String {
    format!("runs/{}.skipped.json", job.name())
}

/// A run in progress: what tasks see.
#[derive(Debug)]
pub struct JobRun<'a> {
    pub ctx: &'a Context,
    pub job: Job,
    pub dry_run: bool,
    /// The run's notion of "now", fixed at its start.
    pub now: DateTime<Utc>,
    tasks: Vec<TaskRecord>,
    errors: Vec<anyhow::Error>,
    findings: bool,
    /// Job-specific gauges for the metrics file (added up when set twice).
    gauges: std::collections::BTreeMap<&'static str, f64>,
    schedule: Schedule,
    _lock: JobLock,
}

impl JobRun<'_> {
    /// Adds `value` to a job-specific gauge of this run's metrics file.
    pub fn gauge(&mut self, name: &'static str, value: f64) {
        *self.gauges.entry(name).or_insert(0.0) += value;
    }

    /// Sets a job-specific gauge (a level rather than a count of this run).
    pub fn set_gauge(&mut self, name: &'static str, value: f64) {
        self.gauges.insert(name, value);
    }

    /// Runs a task every run. Its error is logged and recorded; the run goes on.
    pub fn task(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<TaskDone>) {
        let result = f(self);
        self.finish_task(name, result);
    }

    /// Runs a periodic task when due (`state/schedule`); a failed one is due again next run.
    pub fn periodic(
        &mut self,
        name: &str,
        interval: Duration,
        f: impl FnOnce(&mut Self) -> Result<TaskDone>,
    ) {
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

/// Writes `cr0sync_<job>.prom` for node_exporter's textfile collector, atomically.
fn write_metrics(
    ctx: &Context,
    dir: &std::path::Path,
    job: Job,
    record: &RunRecord,
    gauges: &std::collections::BTreeMap<&'static str, f64>,
) -> Result<()> {
    let secs = |t: DateTime<Utc>| t.timestamp_millis() as f64 / 1000.0;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: f64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{job=\"{}\"}} {value}\n",
            job.name()
        ));
    };
    gauge(
        "cr0sync_last_run_timestamp_seconds",
        "When the last run finished.",
        secs(record.finished),
    );
    gauge(
        "cr0sync_last_success_timestamp_seconds",
        "When the last successful run finished (0: never).",
        record.last_success.map_or(0.0, secs),
    );
    gauge(
        "cr0sync_run_duration_seconds",
        "How long the last run took.",
        record.duration_ms as f64 / 1000.0,
    );
    gauge(
        "cr0sync_run_failed",
        "1 if the last run failed.",
        f64::from(u8::from(record.result == RunResult::Error)),
    );
    for (name, value) in gauges {
        gauge(name, "Counted by the last run (see the README).", *value);
    }
    crate::fsutil::ensure_dir(dir, &ctx.perms)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    let path = dir.join(format!("cr0sync_{}.prom", job.name()));
    crate::fsutil::atomic_write(&path, out.as_bytes(), ctx.perms.file_mode, &ctx.perms).map_err(
        |e| {
            anyhow::anyhow!(
                "cannot write metrics {}: {}",
                path.display(),
                crate::error::io_text(&e)
            )
        },
    )
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

/// What a finished run did, for commands that print it.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: Outcome,
    /// The lock was held and this cron run did nothing.
    pub skipped: bool,
    pub tasks: Vec<TaskRecord>,
    pub duration_ms: u64,
}

/// Runs `body` as one run of `job`: see the module doc for what this guarantees.
/// Records a run that failed before it started its work (best effort: the error itself is
/// what the caller reports).
fn record_early_failure(
    ctx: &Context,
    job: Job,
    trigger: Trigger,
    command: &str,
    e: &anyhow::Error,
) {
    let now = clock::now();
    let previous: Option<RunRecord> = ctx.state.load(&record_file(job)).unwrap_or(None);
    let record = RunRecord {
        started: now,
        finished: now,
        duration_ms: 0,
        result: RunResult::Error,
        trigger,
        command: command.to_string(),
        error: Some(format!("{e:#}")),
        tasks: Vec::new(),
        last_success: previous.and_then(|p| p.last_success),
    };
    let _ = ctx.state.save(&record_file(job), &record);
}

pub fn run_job(
    ctx: &Context,
    job: Job,
    trigger: Trigger,
    dry_run: bool,
    body: impl FnOnce(&mut JobRun) -> Result<()>,
) -> Result<RunReport> {
    let log_path = ctx.layout.job_log(job);
    let command: Vec<String> = std::env::args().skip(1).collect();
    let command = command.join(" ");
    // A job that fails before it can even log (its log file unwritable) still leaves a
    // failed run record, so `status` shows it.
    if let Err(e) = logging::setup(LogTarget::JobFile {
        path: &log_path,
        max_size: ctx.config.general.log_size.0,
        keep: ctx.config.general.log_keep,
    }) {
        if !dry_run {
            record_early_failure(ctx, job, trigger, &command, &e);
        }
        return Err(e);
    }
    // log4rs creates the file as whoever runs this: it gets the root's owner and modes
    // (as the log rolls, again at the end).
    let _ = ctx.perms.apply_file(&log_path);

    let lock = match trigger {
        Trigger::Manual => ctx.lock(job)?,
        Trigger::Cron => match JobLock::try_acquire(&ctx.layout, &ctx.perms, job)? {
            Some(lock) => lock,
            None => {
                let holder = lock::holder(&ctx.layout, job);
                let pid = holder.as_ref().map(|h| h.pid);
                log::info!(
                    "skipped: the {job} job is already running (pid {})",
                    pid.map_or("unknown".into(), |p| p.to_string())
                );
                if !dry_run {
                    let skip = SkipRecord {
                        time: clock::now(),
                        holder_pid: pid,
                    };
                    ctx.state.save(&skip_file(job), &skip)?;
                }
                return Ok(RunReport {
                    outcome: Outcome::Success,
                    skipped: true,
                    tasks: Vec::new(),
                    duration_ms: 0,
                });
            }
        },
    };

    let started = clock::now();
    let timer = Instant::now();
    log::info!("{}start: {command}", if dry_run { "dry run " } else { "" });
    let schedule = Schedule::load(&ctx.state, job)?;
    let mut run = JobRun {
        ctx,
        job,
        dry_run,
        now: started,
        tasks: Vec::new(),
        errors: Vec::new(),
        findings: false,
        gauges: std::collections::BTreeMap::new(),
        schedule,
        _lock: lock,
    };
    if let Err(e) = body(&mut run) {
        log::error!("{e:#}");
        run.errors.push(e);
    }
    let duration = timer.elapsed();
    let failed = !run.errors.is_empty();
    if !dry_run {
        run.schedule.save(&ctx.state, job)?;
        let previous: Option<RunRecord> = ctx.state.load(&record_file(job)).unwrap_or(None);
        let finished = started + chrono::Duration::from_std(duration).unwrap_or_default();
        let record = RunRecord {
            started,
            finished,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            result: if failed {
                RunResult::Error
            } else {
                RunResult::Ok
            },
            trigger,
            command,
            error: run.errors.first().map(|e| format!("{e:#}")),
            tasks: run.tasks.clone(),
            last_success: if failed {
                previous.and_then(|p| p.last_success)
            } else {
                Some(finished)
            },
        };
        ctx.state.save(&record_file(job), &record)?;
        if let Some(dir) = &ctx.config.general.metrics_dir {
            write_metrics(ctx, &ctx.resolve(dir), job, &record, &run.gauges)?;
        }
    }
    log::info!(
        "{}: {} task(s) in {} ms",
        if failed { "failed" } else { "done" },
        run.tasks.len(),
        duration.as_millis()
    );
    let _ = ctx.perms.apply_file(&log_path);
    let outcome = if run.findings {
        Outcome::Findings
    } else {
        Outcome::Success
    };
    let mut errors = std::mem::take(&mut run.errors);
    let tasks = std::mem::take(&mut run.tasks);
    drop(run);
    match errors.len() {
        0 => Ok(RunReport {
            outcome,
            skipped: false,
            tasks,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        }),
        1 => Err(errors.remove(0)),
        _ => Err(Error::Several(errors.iter().map(|e| format!("{e:#}")).collect()).into()),
    }
}
