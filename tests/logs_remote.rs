//! The log job's end-to-end tests once more, with the stream's `from` behind `ssh://`
//! (a real sshd on 127.0.0.1 and a throwaway user: see `common::sshd`). They must pass
//! unchanged: every line once across rotation, truncation, compression and SIGKILL.
#![allow(
    clippy::panic,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::unwrap_used
)]

mod common;

/// The sources are read through `cr0sync serve` on "another host".
const REMOTE: bool = true;

include!("cases/logs.rs");
