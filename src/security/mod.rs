//! The security job: the signed integrity baseline and check (`integrity`),
//! cleanup of expired API sessions and rate-limit windows (`sessions`), the security event
//! log with its monthly archive (`events`), wired to cron and status through `job`.

pub mod events;
pub mod integrity;
pub mod job;
pub mod sessions;
