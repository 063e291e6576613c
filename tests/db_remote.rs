//! End-to-end tests of the database job on real SQLite files, checked with the
//! independent tools: `sqldiff` between the sides and `PRAGMA integrity_check`. This run:
//! both peers behind `ssh://` (a real sshd on 127.0.0.1 and a throwaway user, see
//! `common::sshd`).
#![allow(
    clippy::panic,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::unwrap_used
)]

mod common;

/// The peers are databases on "another host", reached through `cr0sync serve`.
const REMOTE: bool = true;

include!("cases/db.rs");
