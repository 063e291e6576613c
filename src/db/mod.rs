//! The database job (SPEC 3): row-level three-way sync between each central copy and its
//! peers.
//!
//! Built so far:
//! - `value`: SQLite cells with a total order (rows as map keys and multiset members).
//! - `merge`: the pure three-way merge of one table, with its laws as property tests.
//! - `snapshot`: consistent snapshots through the online backup API, schemas and rows.
//! - `base`: the merge base of a pair, an SQLite file in `state/` replaced atomically.
//!
//! Still to come (issue 3): apply with optimistic writes, conflict
//! records, backups, the fast path, the mass-delete guard and the `db` commands. Until
//! they land, nothing here is reachable from the command line.

pub mod apply;
pub mod backup;
pub mod base;
pub mod conflicts;
pub mod job;
pub mod merge;
pub mod snapshot;
pub mod sync;
pub mod value;
