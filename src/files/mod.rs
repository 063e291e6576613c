//! The file-tree job: three-way sync of directories of small files (JSON merged key by
//! key, counters added) and mirrors of large archives, between a central directory and
//! the same directory on each peer.
//!
//! - `list`: one side's files, stat only.
//! - `plan`: per path, what each side is to hold (pure decisions), with `json` for the
//!   key-by-key merge.
//! - `store`: the tree's state (base, contents, journal, conflict outbox) in one SQLite
//!   database under `state/files/`.
//! - `write`: optimistic, atomic (or in-place under `flock`) writes of one file.
//! - `side`: one side's directory, local or on another host (over `remote`).
//! - `sync`: one pair, step by step, with its crash-safety argument.
//! - `job`: pair selection, `cron files`, the status section.

pub mod job;
pub mod json;
pub mod list;
pub mod plan;
pub mod side;
pub mod store;
pub mod sync;
pub mod write;
