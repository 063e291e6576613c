//! The security job (SPEC 5). Built so far: cleanup of expired API sessions and
//! rate-limit windows (`sessions`) and the security event log with its monthly archive
//! (`events`), wired through `job`. The integrity baseline and check (5.1, 5.2) are not
//! built yet (issue 5 is open).

pub mod events;
pub mod integrity;
pub mod job;
pub mod sessions;
