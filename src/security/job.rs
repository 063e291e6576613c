//! The security job as commands see it: session cleanup and event archiving as tasks of
//! one run (both on their schedules under `cron security`), and the `sessions` status
//! section. The integrity tasks join here when they are built.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use crate::context::Context;
use crate::ops::runner::{JobRun, TaskDone};
use crate::ops::status::Section;
use crate::output::{Table, Tone, paint};
use crate::security::{events, sessions};

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

/// The cron job's tasks, each on its schedule.
pub fn cron_tasks(run: &mut JobRun) -> Result<()> {
    let sec = &run.ctx.config.security;
    let (sessions_every, archive_every): (Duration, Duration) =
        (sec.session_cleanup_interval.0, sec.event_archive_interval.0);
    run.periodic("cleanup-sessions", sessions_every, cleanup_sessions_task);
    run.periodic("archive-events", archive_every, archive_events_task);
    Ok(())
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
