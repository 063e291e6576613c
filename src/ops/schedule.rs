//! Periodic tasks: `state/schedule/<job>.json` records when each task of a job
//! last succeeded and last ran. One file per job, written under that job's lock, so two
//! jobs never race on one file.
//!
//! Invariants: a task is due when it never succeeded or its last success is at least one
//! interval old, less [`SLACK`] (cron starts each run a little earlier or later, so a
//! 5-minute task under a 1-minute cron runs every 5 minutes, not every 6); a task that
//! failed is retried at the next run, not a full interval later. A success is recorded
//! only after the task's own writes are durable.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ops::state::{StateStore, names};

/// How much earlier than a full interval a task is due again.
pub const SLACK: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskTimes {
    pub last_success: Option<DateTime<Utc>>,
    pub last_attempt: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub tasks: BTreeMap<String, TaskTimes>,
}

impl Schedule {
    pub fn load(state: &StateStore, job: &str) -> Result<Schedule> {
        Ok(state.load(&names::schedule(job))?.unwrap_or_default())
    }

    pub fn save(&self, state: &StateStore, job: &str) -> Result<()> {
        state.save(&names::schedule(job), self)
    }

    pub fn is_due(&self, task: &str, interval: Duration, now: DateTime<Utc>) -> bool {
        self.next_due(task, interval).is_none_or(|due| due <= now)
    }

    /// When the task is next due (one interval after its last success, less [`SLACK`]);
    /// `None` if it never succeeded (due now).
    pub fn next_due(&self, task: &str, interval: Duration) -> Option<DateTime<Utc>> {
        let last = self.tasks.get(task)?.last_success?;
        let interval = chrono::Duration::from_std(interval.saturating_sub(SLACK))
            .unwrap_or(chrono::Duration::MAX);
        Some(
            last.checked_add_signed(interval)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        )
    }

    pub fn record(&mut self, task: &str, now: DateTime<Utc>, result: &Result<(), String>) {
        let t = self.tasks.entry(task.to_string()).or_default();
        t.last_attempt = Some(now);
        match result {
            Ok(()) => {
                t.last_success = Some(now);
                t.last_error = None;
            }
            Err(e) => t.last_error = Some(e.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn never_run_task_is_due() {
        assert!(Schedule::default().is_due(
            "x",
            Duration::from_secs(3600),
            at("2026-01-01T00:00:00Z")
        ));
    }

    #[test]
    fn due_after_one_interval() {
        let mut s = Schedule::default();
        s.record("x", at("2026-01-01T00:00:00Z"), &Ok(()));
        let hour = Duration::from_secs(3600);
        assert!(!s.is_due("x", hour, at("2026-01-01T00:59:29Z")));
        assert!(s.is_due("x", hour, at("2026-01-01T00:59:30Z")));
    }

    #[test]
    fn a_five_minute_task_under_a_one_minute_cron_runs_every_five_minutes() {
        // Each run starts up to a few seconds later than the minute; the task still runs
        // at every fifth one.
        let mut s = Schedule::default();
        let five = Duration::from_secs(300);
        let mut ran = Vec::new();
        for minute in 0..16 {
            let now = at("2026-01-01T00:00:00Z")
                + chrono::Duration::minutes(minute)
                + chrono::Duration::milliseconds((minute * 737) % 4000);
            if s.is_due("x", five, now) {
                s.record("x", now, &Ok(()));
                ran.push(minute);
            }
        }
        assert_eq!(ran, [0, 5, 10, 15]);
    }

    #[test]
    fn failed_task_is_due_again_at_next_run() {
        let mut s = Schedule::default();
        s.record("x", at("2026-01-01T00:00:00Z"), &Ok(()));
        s.record("x", at("2026-01-01T01:00:00Z"), &Err("disk full".into()));
        assert!(s.is_due("x", Duration::from_secs(3600), at("2026-01-01T01:01:00Z")));
        assert_eq!(s.tasks["x"].last_error.as_deref(), Some("disk full"));
    }
}
