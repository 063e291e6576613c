//! Conflicts an operator can act on: every conflict has an id and stays open until
//! reviewed; `db conflicts` lists the open ones (`--all` every one); `db resolve ID --keep
//! central|peer|base` writes that image back through the central copy, `--ack` closes
//! without change; `status` counts open conflicts with a Try line; `cron database` prints
//! one stderr line per new conflict unless `quiet_conflicts = true`.
#![allow(clippy::unwrap_used)]

mod common;

/// The peers are local files.
const REMOTE: bool = false;

include!("cases/db_conflicts.rs");
