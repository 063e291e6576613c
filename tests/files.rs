//! The file-tree job end to end: the real binary on real directories.
//!
//! The laws under test: every committed increment of every site is in the final balance
//! on every side (counted once, whatever stops the sync); a change on one side reaches
//! the others; nothing is ever lost (a losing file is kept and recorded); a missing or
//! emptied directory is never mirrored.
#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

mod common;

/// The sites are local directories.
const REMOTE: bool = false;

include!("cases/files.rs");
