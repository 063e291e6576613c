//! End-to-end tests of the log job with real files, the real `logrotate`, gzip.
#![allow(
    clippy::panic,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::unwrap_used
)]

mod common;

/// The sources are local.
const REMOTE: bool = false;

include!("cases/logs.rs");
