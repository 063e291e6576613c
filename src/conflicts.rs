//! The conflict record: `state/conflicts.jsonl`, one JSON object a line, shared by the
//! jobs that merge (database rows, files of a tree) and reviewed with `db conflicts` and
//! `db resolve`.
//!
//! Invariants:
//! - Records are only appended, each with a unique `id`, and synced. A sync commits its
//!   records into the merge base's outbox together with the central copy, then appends
//!   them here (see `journal`): a record is never lost, and never appended twice.
//! - A line that does not parse (a torn last line after a full disk) is reported and
//!   skipped by readers; it never stops a sync.
//! - A conflict is open until an operator reviews it: `db resolve` appends a closing line
//!   (`{"id", "time", "action"}`) to `state/conflicts-closed.jsonl`, the same way. Open
//!   conflicts are the records without a closing line.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::context::Context;

pub const FILE: &str = crate::ops::state::names::DB_CONFLICTS;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Winner {
    Central,
    Peer,
}

impl std::fmt::Display for Winner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Winner::Central => "central",
            Winner::Peer => "peer",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictKind {
    /// The same cell changed to different values on both sides.
    UpdateUpdate,
    /// Both sides inserted the key with different values.
    InsertInsert,
    /// One side updated the row, the other deleted it.
    UpdateDelete,
    /// Two rows under different keys hold the same value of a UNIQUE constraint (the same
    /// nick registered under two ids): the loser is removed from the side that holds it.
    Unique,
    /// A parent row deleted on one side while the other still has rows referencing it:
    /// the parent is kept (its deletion undone).
    ForeignKey,
    /// Both sides inserted different rows under one INTEGER PRIMARY KEY: both are kept,
    /// the peer's under a fresh key (`moved_to`).
    Rekey,
    /// A file of a tree changed differently on both sides that could not be merged: the
    /// winner's content is on both sides, the loser's kept under `state/`.
    File,
    /// A key of a JSON file changed differently on both sides: the file is merged key by
    /// key and this key takes the winner's value.
    Json,
}

impl std::fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConflictKind::UpdateUpdate => "update-update",
            ConflictKind::InsertInsert => "insert-insert",
            ConflictKind::UpdateDelete => "update-delete",
            ConflictKind::Unique => "unique",
            ConflictKind::ForeignKey => "foreign-key",
            ConflictKind::Rekey => "rekey",
            ConflictKind::File => "file",
            ConflictKind::Json => "json",
        })
    }
}

/// The three row images of a conflict (`null`: the row was absent / deleted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Images<T> {
    pub base: Option<T>,
    pub central: Option<T>,
    pub peer: Option<T>,
}

/// One line of `conflicts.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictRecord {
    pub id: String,
    pub time: DateTime<Utc>,
    pub database: String,
    pub peer: String,
    pub table: String,
    /// Primary-key values; for a table without a key, `null`.
    pub key: serde_json::Value,
    pub kind: ConflictKind,
    pub rows: Images<serde_json::Value>,
    pub winner: Winner,
    /// The row both sides hold after the merge (`null`: deleted).
    pub result: serde_json::Value,
    /// `rekey`: the key the peer's row moved to (its old key is `key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_key: Option<serde_json::Value>,
}

pub const CLOSED: &str = crate::ops::state::names::DB_CONFLICTS_CLOSED;

/// The line that closes a conflict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Closing {
    pub id: String,
    pub time: DateTime<Utc>,
    /// `ack`, `keep-central`, `keep-peer` or `keep-base`.
    pub action: String,
}

/// The id of one sync's decisions (`<time>-<pid>-<what>-<peer>`): unique per run and
/// pair; conflict ids are it with `-<n>` appended.
pub fn transaction_id(now: DateTime<Utc>, what: &str, peer: &str) -> String {
    format!(
        "{}-{}-{what}-{peer}",
        now.format("%Y%m%dT%H%M%S%.6fZ"),
        std::process::id()
    )
}

/// Appends records and syncs the file.
pub fn append(ctx: &Context, records: &[ConflictRecord]) -> Result<()> {
    append_lines(ctx, FILE, records)
}

/// Closes conflicts (appends their closing lines, synced).
pub fn close(ctx: &Context, closings: &[Closing]) -> Result<()> {
    append_lines(ctx, CLOSED, closings)
}

/// The ids of closed conflicts.
pub fn closed_ids(ctx: &Context) -> Result<BTreeSet<String>> {
    Ok(read_lines::<Closing>(ctx, CLOSED)?
        .into_iter()
        .map(|c| c.id)
        .collect())
}

/// The open conflicts, oldest first.
pub fn open(ctx: &Context) -> Result<Vec<ConflictRecord>> {
    let closed = closed_ids(ctx)?;
    Ok(read(ctx)?
        .into_iter()
        .filter(|r| !closed.contains(&r.id))
        .collect())
}

/// The open conflict `id`, or an error saying it is not open and what to do.
pub fn find_open(ctx: &Context, id: &str) -> Result<ConflictRecord> {
    open(ctx)?.into_iter().find(|r| r.id == id).ok_or_else(|| {
        anyhow::anyhow!(
            "conflict {id} is not open (unknown, or already resolved). Try: cr0sync db \
             conflicts --all"
        )
    })
}

fn append_lines<T: Serialize>(ctx: &Context, file: &str, records: &[T]) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let path = ctx.state.path(file);
    let mut text = Vec::new();
    for r in records {
        serde_json::to_writer(&mut text, r)?;
        text.push(b'\n');
    }
    crate::fsutil::append_durable(&path, &text, &ctx.perms)
        .with_context(|| format!("cannot append to {}", path.display()))?;
    Ok(())
}

/// Every record, oldest first; unreadable lines are logged and skipped.
pub fn read(ctx: &Context) -> Result<Vec<ConflictRecord>> {
    read_lines(ctx, FILE)
}

fn read_lines<T: serde::de::DeserializeOwned>(ctx: &Context, file: &str) -> Result<Vec<T>> {
    let path = ctx.state.path(file);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut out = Vec::new();
    for (n, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice(&line) {
            Ok(r) => out.push(r),
            Err(e) => log::warn!(
                "{} line {}: not a valid line ({e}); skipped",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(out)
}

/// The ids already recorded (to record a journalled conflict once only).
pub fn ids(ctx: &Context) -> Result<BTreeSet<String>> {
    Ok(read(ctx)?.into_iter().map(|r| r.id).collect())
}
