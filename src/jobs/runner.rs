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
//! - A run record that cannot be read or written is never passed over in silence: a
//!   damaged previous record is logged (it only carries the last success time forward) and
//!   a record that cannot be written fails the run.

use std::time::Instant;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};

use crate::context::Context;
use crate::error::{Error, Outcome};
use crate::jobs::Job;
use crate::ops::clock;
use crate::ops::lock::{self, JobLock};
use crate::ops::logging::{self, LogTarget};
use crate::ops::state::names;
use crate::ops::task::{JobRun, RunRecord, RunResult, SkipRecord, TaskRecord, Trigger};

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

/// What a finished run did, for commands that print it.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: Outcome,
    pub tasks: Vec<TaskRecord>,
    pub duration_ms: u64,
}

/// The last success recorded before this run. A damaged record only loses that time: the
/// record written at the end of this run replaces it.
fn previous_success(ctx: &Context, job: Job) -> Option<DateTime<Utc>> {
    match ctx.state.load::<RunRecord>(&names::run_record(job.name())) {
        Ok(previous) => previous.and_then(|p| p.last_success),
        Err(e) => {
            log::warn!("{e:#} (its last success time is lost; this run's record replaces it)");
            None
        }
    }
}

/// Sets the job log's owner and mode (log4rs creates and rolls it as whoever runs this).
fn own_log_file(ctx: &Context, path: &std::path::Path) {
    if let Err(e) = ctx.perms.apply_file(path) {
        log::warn!(
            "cannot set the owner or mode of {}: {} (the run goes on; the cron user may not              be able to write this log: fix its owner)",
            path.display(),
            crate::error::io_text(&e)
        );
    }
}

/// Records a run that failed before it started its work, so `status` shows it.
fn record_early_failure(
    ctx: &Context,
    job: Job,
    trigger: Trigger,
    command: &str,
    e: &anyhow::Error,
) -> Result<()> {
    let now = clock::now();
    let record = RunRecord {
        started: now,
        finished: now,
        duration_ms: 0,
        result: RunResult::Error,
        trigger,
        command: command.to_string(),
        error: Some(format!("{e:#}")),
        tasks: Vec::new(),
        last_success: previous_success(ctx, job),
    };
    ctx.state.save(&names::run_record(job.name()), &record)
}

/// Runs `body` as one run of `job`: see the module doc for what this guarantees.
pub fn run_job(
    ctx: &Context,
    job: Job,
    trigger: Trigger,
    dry_run: bool,
    body: impl FnOnce(&mut JobRun) -> Result<()>,
) -> Result<RunReport> {
    let log_path = ctx.layout.job_log(job.log_file_name());
    let command: Vec<String> = std::env::args().skip(1).collect();
    let command = command.join(" ");
    // A job that fails before it can even log (its log file unwritable) still leaves a
    // failed run record, so `status` shows it.
    if let Err(e) = logging::setup(LogTarget::JobFile {
        path: &log_path,
        max_size: ctx.config.general.log_size.0,
        keep: ctx.config.general.log_keep,
    }) {
        // Best effort, and the one place a state error is not reported: the run fails with
        // the line that names the cause (usually the same unwritable root), and a job without
        // a fresh record is a problem in `status` anyway (no successful run).
        if !dry_run {
            let _ = record_early_failure(ctx, job, trigger, &command, &e);
        }
        return Err(e);
    }
    // log4rs creates the file as whoever runs this: it gets the root's owner and modes
    // (as the log rolls, again at the end).
    own_log_file(ctx, &log_path);

    let lock = match trigger {
        Trigger::Manual => ctx.lock(job.name())?,
        Trigger::Cron => match JobLock::try_acquire(&ctx.layout, &ctx.perms, job.name())? {
            Some(lock) => lock,
            None => {
                let holder = lock::holder(&ctx.layout, job.name());
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
                    ctx.state.save(&names::skip_record(job.name()), &skip)?;
                }
                return Ok(RunReport {
                    outcome: Outcome::Success,
                    tasks: Vec::new(),
                    duration_ms: 0,
                });
            }
        },
    };

    let started = clock::now();
    let timer = Instant::now();
    log::info!("{}start: {command}", if dry_run { "dry run " } else { "" });
    let mut run = JobRun::new(ctx, lock, dry_run, started, job.periodic(&ctx.config))?;
    if let Err(e) = body(&mut run) {
        log::error!("{e:#}");
        run.errors.push(e);
    }
    let duration = timer.elapsed();
    let failed = !run.errors.is_empty();
    if !dry_run {
        run.schedule.save(&ctx.state, job.name())?;
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
                previous_success(ctx, job)
            } else {
                Some(finished)
            },
        };
        ctx.state.save(&names::run_record(job.name()), &record)?;
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
    own_log_file(ctx, &log_path);
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
            tasks,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        }),
        1 => Err(errors.remove(0)),
        _ => Err(Error::Several(errors.iter().map(|e| format!("{e:#}")).collect()).into()),
    }
}
