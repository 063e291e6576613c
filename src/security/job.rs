//! The security job as commands see it: session cleanup and event archiving as tasks of
//! one run (both on their schedules under `cron security`), and the `sessions` status
//! section. The integrity tasks join here when they are built.

use anyhow::Result;
use serde_json::json;

use crate::context::Context;
use crate::ops::section::Section;
use crate::ops::task::{JobRun, Task, TaskDone};
use crate::output::{Table, Tone, paint};
use crate::security::{events, integrity, sessions};

pub fn cleanup_sessions_task(run: &mut JobRun) -> Result<TaskDone> {
    let c = sessions::cleanup(run.ctx, run.dry_run, run.now)?;
    let verb = if run.dry_run {
        "would remove"
    } else {
        "removed"
    };
    Ok(TaskDone::new(format!(
        "{verb} {} expired session(s) and {} rate-limit window(s); {} session(s) and {} \
         window(s) active",
        c.sessions_expired, c.rate_limits_expired, c.sessions_active, c.rate_limits_active
    )))
}

pub fn archive_events_task(run: &mut JobRun) -> Result<TaskDone> {
    let a = events::archive(run.ctx, run.dry_run, run.now)?;
    let verb = if run.dry_run { "would move" } else { "moved" };
    Ok(TaskDone::new(format!(
        "{verb} {} event(s) to {} monthly archive(s); {} kept",
        a.moved,
        a.months.len(),
        a.kept
    )))
}

/// The integrity check as a task. With `print`, new findings are printed (cron mails
/// them); the run's outcome is "findings" (exit 4) when there are new ones. Under cron, a
/// root without a baseline records its first one (trust on first use) and says so in
/// the log.
pub fn integrity_task(run: &mut JobRun, print: bool, first_use: bool) -> Result<TaskDone> {
    if first_use && !run.ctx.layout.file_hashes().exists() {
        if run.dry_run {
            return Ok(TaskDone::new(
                "no baseline yet; a real run records the first one",
            ));
        }
        let (n, unreadable) = integrity::baseline(run.ctx, None, run.now)?;
        log::warn!(
            "no integrity baseline yet: recorded one of {n} file(s) ({} unreadable); later \
             checks compare with it",
            unreadable.len()
        );
        return Ok(TaskDone::new(format!(
            "first baseline recorded: {n} file(s)"
        )));
    }
    let report = integrity::check(run.ctx, run.dry_run, run.now)?;
    let new: Vec<&integrity::Finding> = report.new_findings().collect();
    run.gauge("cr0sync_integrity_findings_new", new.len() as f64);
    if print {
        for f in &new {
            println!("integrity: {} {}: {}", f.kind, f.path, f.detail);
        }
    }
    Ok(TaskDone {
        detail: format!(
            "{} file(s), {} read, {} finding(s), {} new",
            report.files,
            report.hashed,
            report.findings.len(),
            new.len()
        ),
        findings: !new.is_empty(),
    })
}

/// The integrity check against the signed baseline.
pub const INTEGRITY_CHECK: Task = Task::new("integrity-check");
/// Removing expired API sessions and rate-limit entries.
pub const CLEANUP_SESSIONS: Task = Task::new("cleanup-sessions");
/// Moving old security events into the monthly archives.
pub const ARCHIVE_EVENTS: Task = Task::new("archive-events");

/// The cron job's tasks, each on its schedule.
pub fn cron_tasks(run: &mut JobRun) -> Result<()> {
    run.periodic(INTEGRITY_CHECK, |run| integrity_task(run, true, true));
    run.periodic(CLEANUP_SESSIONS, cleanup_sessions_task);
    // Every run, due or not, so the metric never disappears between checks.
    match integrity::open_findings(run.ctx) {
        Ok(open) => run.set_gauge("cr0sync_integrity_findings_open", open as f64),
        // The integrity check reads the same file and fails with this error; the gauge
        // is left out rather than reported as 0.
        Err(e) => log::warn!("{e:#} (the open-findings metric is left out of this run)"),
    }
    run.periodic(ARCHIVE_EVENTS, archive_events_task);
    Ok(())
}

/// The `integrity` section of `status`: last check and open findings.
pub fn integrity_section(ctx: &Context) -> Result<Section> {
    let last = integrity::last_check(ctx)?;
    let baseline = ctx.layout.file_hashes().exists();
    let mut table = Table::new(["BASELINE", "LAST CHECK", "FILES", "OPEN FINDINGS"]);
    let mut problems = Vec::new();
    let open = last.as_ref().map_or(0, |l| l.open_findings);
    if open > 0 {
        problems.push(format!(
            "{open} integrity finding(s) open. See: cr0sync security check; accept a change \
             with cr0sync security baseline --accept PATH"
        ));
    }
    table.row([
        if baseline {
            "yes".to_string()
        } else {
            paint("none", Tone::Warn)
        },
        last.as_ref()
            .map_or("-".into(), |l| crate::ops::clock::rfc3339(l.time)),
        last.as_ref().map_or("-".into(), |l| l.files.to_string()),
        if open > 0 {
            paint(&open.to_string(), Tone::Bad)
        } else {
            "0".into()
        },
    ]);
    Ok(Section {
        key: "integrity",
        title: "Integrity",
        json: json!({
            "baseline": baseline,
            "last_check": last.as_ref().map(|l| crate::ops::clock::rfc3339(l.time)),
            "files": last.as_ref().map(|l| l.files),
            "open_findings": open,
        }),
        table,
        problems,
    })
}

/// The `sessions` section of `status`: active and expired entries, read without locking.
pub fn section(ctx: &Context) -> Result<Section> {
    let mut table = Table::new([
        "FILE",
        "SESSIONS",
        "EXPIRED",
        "RATE LIMITS",
        "EXPIRED",
        "STATE",
    ]);
    let mut problems = Vec::new();
    let path = ctx.layout.api_sessions();
    let json = match sessions::peek(ctx, crate::ops::clock::now()) {
        Ok(Some(c)) => {
            table.row([
                path.display().to_string(),
                c.sessions_active.to_string(),
                c.sessions_expired.to_string(),
                c.rate_limits_active.to_string(),
                c.rate_limits_expired.to_string(),
                paint("ok", Tone::Good),
            ]);
            json!({"file": path, "active": c.sessions_active, "expired": c.sessions_expired,
                   "rate_limits_active": c.rate_limits_active,
                   "rate_limits_expired": c.rate_limits_expired, "error": null})
        }
        Ok(None) => json!({"file": path, "active": 0, "expired": 0, "rate_limits_active": 0,
                           "rate_limits_expired": 0, "error": null}),
        Err(e) => {
            let e = format!("{e:#}");
            problems.push(e.clone());
            table.row([
                path.display().to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                paint("error", Tone::Bad),
            ]);
            json!({"file": path, "error": e})
        }
    };
    Ok(Section {
        key: "sessions",
        title: "API sessions",
        json,
        table,
        problems,
    })
}
