//! The database job (SPEC 3): row-level three-way sync between each central copy and its
//! peers.
//!
//! Built so far: `value` (SQLite cells with a total order) and `merge` (the pure three-way
//! merge of one table, with its laws as property tests). Snapshots, apply, backups and the
//! `db` commands build on these and are not wired into the command line yet.

pub mod merge;
pub mod value;
