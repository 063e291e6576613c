//! Real application schemas: the website fixture (UNIQUE nick, AUTOINCREMENT ids,
//! cascades, an audit trigger, a generated column, an external-content FTS5 index),
//! written by a second process the way the site writes it (`sqlite3` with
//! `foreign_keys=ON`, triggers firing), then synced and checked with SQLite's own tools:
//! `sqldiff --primarykey`, `PRAGMA integrity_check` and `foreign_key_check`, FTS5
//! `'integrity-check'` and MATCH queries.
//!
//! This run: both peers behind `ssh://` (a real sshd on 127.0.0.1 and a throwaway user,
//! see `common::sshd`); the remote end applies each peer's changes. They must pass
//! unchanged.
#![allow(clippy::unwrap_used)]

mod common;

/// The peers are databases on "another host", reached through `cr0sync serve`.
const REMOTE: bool = true;

include!("cases/db_schemas.rs");
