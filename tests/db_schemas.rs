//! Real application schemas: the website fixture (UNIQUE nick, AUTOINCREMENT ids,
//! cascades, an audit trigger, a generated column, an external-content FTS5 index),
//! written by a second process the way the site writes it (`sqlite3` with
//! `foreign_keys=ON`, triggers firing), then synced and checked with SQLite's own tools:
//! `sqldiff --primarykey`, `PRAGMA integrity_check` and `foreign_key_check`, FTS5
//! `'integrity-check'` and MATCH queries.
#![allow(clippy::unwrap_used)]

mod common;

/// The peers are local files.
const REMOTE: bool = false;

include!("cases/db_schemas.rs");
