//! The database job: row-level three-way sync between each central copy and its
//! peers.
//!
//! - `sync`: one pair's sync (fast path, snapshot, SQL diff, merge, the application-schema
//!   rules: UNIQUE, foreign keys, FTS, migrations; apply, commit).
//! - `journal`: the commit protocol that makes a stopped sync complete exactly (journal,
//!   peer marker, roll-forward, conflict outbox), with its recovery table.
//! - `merge`: the pure three-way merge (per key, and per table for multisets and tests).
//! - `apply`: optimistic writes, in any order a valid change set needs; `base`: the merge
//!   base; `migrate`: columns added by a migration on one side; `rekey`: rows inserted on
//!   both sides under one INTEGER PRIMARY KEY, both kept.
//! - `btree`: rows read straight from a file's pages, for the diff.
//! - `changes`: a list of changes held encoded in one buffer (what a plan holds).
//! - `snapshot`, `backup`, `value`. (Conflict records are shared with the file-tree job:
//!   `crate::conflicts`.)
//! - `job`: pair selection, recovery commands (`sync-from-bot`, `restore`, `resolve`),
//!   backup cleanup, the status section.

pub mod apply;
pub mod backup;
pub mod base;
pub mod btree;
pub mod changes;
pub mod job;
pub mod journal;
pub mod merge;
pub mod migrate;
pub mod pages;
pub mod rekey;
pub mod snapshot;
pub mod sync;
pub mod value;
