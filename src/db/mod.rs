//! The database job: row-level three-way sync between each central copy and its
//! peers.
//!
//! - `sync`: one pair's sync (fast path, snapshot, SQL diff, journal, apply, commit).
//! - `merge`: the pure three-way merge (per key, and per table for multisets and tests).
//! - `apply`: optimistic writes; `base`: the merge base and its journal.
//! - `snapshot`, `backup`, `conflicts`, `value`.
//! - `job`: pair selection, recovery commands, backup cleanup, the status section.

pub mod apply;
pub mod backup;
pub mod base;
pub mod conflicts;
pub mod job;
pub mod journal;
pub mod merge;
pub mod migrate;
pub mod snapshot;
pub mod sync;
pub mod value;
