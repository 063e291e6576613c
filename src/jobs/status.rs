//! `cr0sync status`: what people read at 3 a.m. and what monitoring parses.
//!
//! The report has a fixed head (root, config, jobs) and then the sections each job lists in
//! the registry ([`crate::jobs::JobSpec::sections`]). Collecting status takes no lock and
//! writes nothing, so it is safe to run at any time, even while jobs run.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

use crate::context::Context;
use crate::error::LockHolder;
use crate::jobs::Job;
use crate::ops::lock;
use crate::ops::section::Section;
use crate::ops::state::names;
use crate::ops::task::{RunRecord, RunResult, SkipRecord};
use crate::output::{Table, Tone, human_ms, paint};

/// How a job's last run ended, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LastResult {
    Ok,
    Error,
    /// The last cron run found the lock held and did nothing.
    Skipped,
    Never,
}

impl LastResult {
    pub fn as_str(self) -> &'static str {
        match self {
            LastResult::Ok => "ok",
            LastResult::Error => "error",
            LastResult::Skipped => "skipped",
            LastResult::Never => "never",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub last_run: Option<String>,
    pub last_result: LastResult,
    pub duration_ms: Option<u64>,
    pub locked_by: Option<LockHolder>,
    pub last_success: Option<String>,
    pub error: Option<String>,
    /// Periodic tasks and when each is next due (`now` if it never succeeded).
    pub next_due: BTreeMap<&'static str, String>,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub root: String,
    pub config: String,
    pub jobs: BTreeMap<&'static str, JobStatus>,
    pub sections: Vec<Section>,
    /// Hung jobs and jobs that stopped running (with the clock they were judged by).
    pub job_problems: Vec<String>,
}

pub fn job_status(ctx: &Context, job: Job) -> Result<JobStatus> {
    let schedule = crate::ops::schedule::Schedule::load(&ctx.state, job.name())?;
    let next_due: BTreeMap<&'static str, String> = job
        .periodic(&ctx.config)
        .into_iter()
        .map(|p| {
            let due = schedule
                .next_due(p.task.name(), p.every)
                .map_or_else(|| "now".to_string(), crate::ops::clock::rfc3339);
            (p.task.name(), due)
        })
        .collect();
    let record: Option<RunRecord> = ctx.state.load(&names::run_record(job.name()))?;
    let skip: Option<SkipRecord> = ctx.state.load(&names::skip_record(job.name()))?;
    let locked_by = lock::holder(&ctx.layout, job.name());
    let ts = |t: chrono::DateTime<chrono::Utc>| crate::ops::clock::rfc3339(t);
    let skipped_last = match (&record, &skip) {
        (Some(r), Some(s)) => s.time > r.finished,
        (None, Some(_)) => true,
        _ => false,
    };
    let status = match (&record, &skip) {
        _ if skipped_last => JobStatus {
            last_run: skip.as_ref().map(|s| ts(s.time)),
            last_result: LastResult::Skipped,
            duration_ms: None,
            locked_by,
            last_success: record.as_ref().and_then(|r| r.last_success).map(ts),
            error: None,
            next_due: next_due.clone(),
        },
        (Some(r), _) => JobStatus {
            last_run: Some(ts(r.started)),
            last_result: match r.result {
                RunResult::Ok => LastResult::Ok,
                RunResult::Error => LastResult::Error,
            },
            duration_ms: Some(r.duration_ms),
            locked_by,
            last_success: r.last_success.map(ts),
            error: r.error.clone(),
            next_due: next_due.clone(),
        },
        (None, _) => JobStatus {
            last_run: None,
            last_result: LastResult::Never,
            duration_ms: None,
            locked_by,
            last_success: None,
            error: None,
            next_due,
        },
    };
    Ok(status)
}

pub fn collect(ctx: &Context) -> Result<Report> {
    let mut jobs = BTreeMap::new();
    let mut job_problems = Vec::new();
    let now = crate::ops::clock::now();
    for job in Job::ALL {
        let status = job_status(ctx, job)?;
        job_problems.extend(timing_problems(ctx, job, &status, now));
        jobs.insert(job.name(), status);
    }
    let mut sections = Vec::new();
    for job in Job::ALL {
        for section in job.spec().sections {
            sections.push(section(ctx)?);
        }
    }
    Ok(Report {
        root: ctx.layout.root().display().to_string(),
        config: ctx.config_path.display().to_string(),
        jobs,
        sections,
        job_problems,
    })
}

/// A lock held past `stuck_after`, and a job that ran before but has had no successful run
/// for [`STALE_AFTER`].
fn timing_problems(
    ctx: &Context,
    job: Job,
    status: &JobStatus,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<String> {
    let mut out = Vec::new();
    let parse = |t: &str| {
        chrono::DateTime::parse_from_rfc3339(t)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc))
    };
    let stuck_after = chrono::Duration::from_std(ctx.config.general.stuck_after.0)
        .unwrap_or(chrono::Duration::MAX);
    if let Some(h) = &status.locked_by
        && let Some(started) = parse(&h.started)
        && now - started > stuck_after
    {
        out.push(format!(
            "the {job} job has held its lock since {} (pid {}), longer than stuck_after: it \
             may hang (a path it waits on, a lock it cannot get). Try: look at logs/{} and at \
             the process (ps -p {}); kill it if it is stuck, the next run completes its work",
            h.started,
            h.pid,
            job.log_file_name(),
            h.pid
        ));
    }
    // A job that never ran, on a root set up longer ago than that: cron was never installed.
    let set_up = std::fs::metadata(ctx.layout.root().join("state"))
        .and_then(|m| m.created())
        .ok()
        .map(chrono::DateTime::<chrono::Utc>::from)
        // Some filesystems report an unknown birth time as the epoch.
        .filter(|t| t.timestamp() > 978_307_200);
    if status.last_result == LastResult::Never
        && status.locked_by.is_none()
        && set_up.is_some_and(|t| now - t > STALE_AFTER)
    {
        out.push(format!(
            "the {job} job has never run, though this root was set up at {}. Try: install the \
             cron entries (install/install_crontabs.sh --user USER --root {}) or the systemd \
             timers in install/, then install/test_cron_scripts.sh",
            set_up.map(crate::ops::clock::rfc3339).unwrap_or_default(),
            ctx.layout.root().display()
        ));
    }
    let ran = status.last_run.is_some() && status.last_result != LastResult::Skipped;
    let last_ok = status.last_success.as_deref().and_then(parse);
    if ran && status.locked_by.is_none() && last_ok.is_none_or(|t| now - t > STALE_AFTER) {
        let since = status.last_success.as_deref().unwrap_or("never");
        out.push(format!(
            "the {job} job has had no successful run for over 3 minutes (last success: \
             {since}); cron runs it every minute. Try: crontab -l for the user that runs \
             cr0sync (install/install_crontabs.sh installs the entries), systemctl status \
             cron, and logs/{}",
            job.log_file_name()
        ));
    }
    out
}

/// Cron runs every job every minute: a job without a successful run for this long is not
/// being run (cron not installed or not running), or fails every time.
const STALE_AFTER: chrono::Duration = chrono::Duration::minutes(3);

impl Report {
    /// Problems an operator should act on, across jobs and sections.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = self.job_problems.clone();
        for (name, job) in &self.jobs {
            if job.last_result == LastResult::Error {
                problems.push(format!(
                    "the {name} job failed: {}. See logs/{}",
                    job.error.as_deref().unwrap_or("unknown error"),
                    Job::named(name).map_or("", Job::log_file_name)
                ));
            }
        }
        problems.extend(
            self.sections
                .iter()
                .flat_map(|s| s.problems.iter().cloned()),
        );
        problems
    }

    pub fn to_json(&self) -> Value {
        let mut obj = serde_json::Map::new();
        obj.insert("root".into(), Value::String(self.root.clone()));
        obj.insert("config".into(), Value::String(self.config.clone()));
        obj.insert(
            "jobs".into(),
            serde_json::to_value(&self.jobs).unwrap_or(Value::Null),
        );
        for s in &self.sections {
            obj.insert(s.key.into(), s.json.clone());
        }
        let problems = self.problems();
        obj.insert("ok".into(), Value::Bool(problems.is_empty()));
        obj.insert(
            "problems".into(),
            serde_json::to_value(problems).unwrap_or(Value::Null),
        );
        Value::Object(obj)
    }

    pub fn to_human(&self) -> String {
        let mut out = format!("root    {}\nconfig  {}\n\n", self.root, self.config);
        let mut t = Table::new([
            "JOB",
            "LAST RUN",
            "RESULT",
            "DURATION",
            "LOCKED BY",
            "NEXT DUE",
        ]);
        for (name, j) in &self.jobs {
            let tone = match j.last_result {
                LastResult::Ok => Tone::Good,
                LastResult::Error => Tone::Bad,
                LastResult::Skipped | LastResult::Never => Tone::Warn,
            };
            t.row([
                name.to_string(),
                j.last_run.clone().unwrap_or_else(|| "-".into()),
                paint(j.last_result.as_str(), tone),
                j.duration_ms.map_or("-".into(), human_ms),
                j.locked_by
                    .as_ref()
                    .map_or("-".into(), |h| format!("pid {} since {}", h.pid, h.started)),
                j.next_due
                    .iter()
                    .map(|(task, due)| format!("{task} {due}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ]);
        }
        out.push_str(&t.render());
        for s in &self.sections {
            out.push_str(&format!("\n{}\n", s.title));
            if s.table.is_empty() {
                out.push_str("  (none configured)\n");
            } else {
                out.push_str(&s.table.render());
            }
        }
        let problems = self.problems();
        out.push('\n');
        if problems.is_empty() {
            out.push_str(&paint("verdict: all good", Tone::Good));
            out.push('\n');
        } else {
            out.push_str(&paint(
                &format!("verdict: {} problem(s)", problems.len()),
                Tone::Bad,
            ));
            out.push('\n');
            for p in problems {
                out.push_str(&format!("  - {p}\n"));
            }
        }
        out
    }
}
