//! The wall clock. Everything that compares times (schedules, expiry, retention) asks
//! [`now`], so tests can move time with `CR0SYNC_NOW` instead of sleeping.
//!
//! `CR0SYNC_NOW` (RFC 3339, e.g. `2026-11-22T10:00:00Z`) is a test hook: it is documented
//! in the README as such and should never be set in production.

use chrono::{DateTime, SecondsFormat, Utc};

pub const NOW_ENV: &str = "CR0SYNC_NOW";

pub fn now() -> DateTime<Utc> {
    std::env::var(NOW_ENV)
        .ok()
        .and_then(|s| DateTime::parse_from_rfc3339(s.trim()).ok())
        .map_or_else(Utc::now, |t| t.with_timezone(&Utc))
}

/// `2026-11-22T10:00:00Z`: the one timestamp format of state files and messages.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}
