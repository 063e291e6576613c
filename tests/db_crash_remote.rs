//! The exactness law of the database sync under stops: whatever sequence of stops happens
//! (SIGKILL at each named point of the commit protocol, the same point again and again, a
//! full disk, a central copy held busy), once a run completes every side holds exactly
//! what one uninterrupted sync would have produced.
//!
//! The oracle is a twin: two identical worlds get the same changes; the twin syncs
//! without interruption, the other is stopped at a fault point (`CR0SYNC_FAULT`) and then
//! completed. Every table of every side is compared cell by cell, and the conflict
//! records (less their ids and times) must be the same list, each id once. On top of the
//! twin, the counters and multiset rows are checked against their arithmetic: base plus
//! every side's delta, each insert once.
//!
//! This run: both peers behind `ssh://` (a real sshd on 127.0.0.1 and a throwaway user,
//! see `common::sshd`).
#![allow(clippy::unwrap_used)]

mod common;

/// The peers are databases on "another host", reached through `cr0sync serve`.
const REMOTE: bool = true;

include!("cases/db_crash.rs");
