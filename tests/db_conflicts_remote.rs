//! Conflicts an operator can act on: every conflict has an id and stays open until
//! reviewed; `db conflicts` lists the open ones (`--all` every one); `db resolve ID --keep
//! central|peer|base` writes that image back through the central copy, `--ack` closes
//! without change; `status` counts open conflicts with a Try line; `cron database` prints
//! one stderr line per new conflict unless `quiet_conflicts = true`.
//!
//! This run: both peers behind `ssh://` (a real sshd on 127.0.0.1 and a throwaway user,
//! see `common::sshd`).
#![allow(clippy::unwrap_used)]

mod common;

/// The peers are databases on "another host", reached through `cr0sync serve`.
const REMOTE: bool = true;

include!("cases/db_conflicts.rs");
