//! End-to-end tests of the database job on real SQLite files, checked with the
//! independent tools: `sqldiff` between the sides and `PRAGMA integrity_check`.
#![allow(
    clippy::panic,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::unwrap_used
)]

mod common;

/// The peers are local files.
const REMOTE: bool = false;

include!("cases/db.rs");
