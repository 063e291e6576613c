//! The log job: IRC logs copied into the central store exactly once, across
//! rotation, truncation and crashes (`stream`), from this host or another (`source`), and
//! rotation of central logs (`rotate`).
//! `job` wires them to commands, cron and status.

pub mod job;
pub mod rotate;
pub mod source;
pub mod stream;
