//! Base upkeep: after a sync, the base holds what both sides now agree on; rows a side
//! deferred keep their old base, so the next run merges them again.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use rusqlite::{Connection, params_from_iter};

use crate::config::Direction;
use crate::db::apply::apply;
use crate::db::base;
use crate::db::changes::ChangeList;
use crate::db::merge::{self, Change, TableSpec};
use crate::db::snapshot::quote;
use crate::db::value::{Cell, Key, Packed};

use super::plan::{BaseState, Work, null_key};

/// The base's multiset rows as counts to write: the new count, or the old one for a row
/// a side left for the next run.
pub(super) fn multiset_base_counts(w: &Work, deferred: &BTreeSet<Key>) -> Vec<Change> {
    w.multiset_base
        .iter()
        .map(|(row, keep, fallback)| Change::SetCount {
            row: row.clone(),
            old: 0,
            new: if deferred.contains(row) {
                *fallback
            } else {
                *keep
            },
        })
        .filter(|c| !matches!(c, Change::SetCount { new: 0, .. }))
        .collect()
}

/// Settles the base of every table for what the central copy now holds, less `deferred`,
/// inside the central transaction (`to_peer`: the peer's changes, per table). Rows a side
/// deferred keep their old base, so the next run sees their change again. The keys of the
/// central copy's changes were staged before (`stage_keys`).
pub(super) fn settle_bases(
    conn: &Connection,
    works: &[Work],
    to_peer: &[&ChangeList],
    direction: Direction,
    deferred: &[BTreeSet<Key>],
) -> Result<()> {
    let none = ChangeList::new();
    for (i, (w, deferred)) in works.iter().zip(deferred).enumerate() {
        let to_peer = to_peer.get(i).copied().unwrap_or(&none);
        settle_base(conn, i, w, to_peer, direction, deferred)?;
    }
    Ok(())
}

/// The temporary table that holds the keys of table `i` of the plan whose base is settled.
fn staged(i: usize) -> String {
    format!("temp.cr0sync_settle_{i}")
}

/// Whether `w` settles its base key by key: a keyed table with a fresh base.
fn by_key(w: &Work) -> bool {
    w.keyed() && matches!(w.base, BaseState::Fresh)
}

/// Stages, in a temporary table of the central connection, the keys whose base row
/// changes with the central copy's changes: the keys of `to_central` and `to_base`, less
/// `deferred`. Called once the central copy's changes are written, so their rows can be
/// let go of before the peer is written; the peer's keys join them in `settle_base`.
/// Keyed tables with a fresh base only (the others settle whole).
pub(super) fn stage_keys(
    conn: &Connection,
    i: usize,
    w: &Work,
    deferred: &BTreeSet<Key>,
) -> Result<()> {
    if !by_key(w) {
        return Ok(());
    }
    let pk = key_columns(w);
    // Keyed by the key, so a key both sides change is staged once.
    conn.execute_batch(&format!(
        "DROP TABLE IF EXISTS {0}; CREATE TABLE {0} ({pk}, PRIMARY KEY ({pk})) WITHOUT ROWID;",
        staged(i)
    ))?;
    add_keys(conn, i, w, deferred, w.to_base.iter())?;
    add_keys(
        conn,
        i,
        w,
        deferred,
        w.to_central.iter().filter_map(change_key),
    )
}

/// `k1, k2, ...`: the key's columns, quoted.
fn key_columns(w: &Work) -> String {
    let pk: Vec<String> = w
        .spec
        .pk
        .iter()
        .map(|&i| quote(&w.spec.columns[i]))
        .collect();
    pk.join(", ")
}

/// The key a keyed change writes (a multiset row has none).
fn change_key(c: Change) -> Option<Key> {
    match c {
        Change::Upsert { key, .. } | Change::Delete { key, .. } => Some(key),
        Change::SetCount { .. } => None,
    }
}

/// Adds `keys` (less `deferred`, and less keys with a NULL cell, which merge as whole
/// rows) to the staged keys of table `i`.
fn add_keys<K: std::borrow::Borrow<Key>>(
    conn: &Connection,
    i: usize,
    w: &Work,
    deferred: &BTreeSet<Key>,
    keys: impl Iterator<Item = K>,
) -> Result<()> {
    let n = w.spec.pk.len();
    let marks: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
    let mut insert = conn.prepare(&format!(
        "INSERT OR IGNORE INTO {} VALUES ({})",
        staged(i),
        marks.join(", ")
    ))?;
    for key in keys {
        let key = key.borrow();
        if key.len() == n && !key.iter().any(Cell::is_null) && !deferred.contains(key) {
            insert.execute(params_from_iter(key.iter()))?;
        }
    }
    Ok(())
}

/// The base rows, before this sync, of the keys the peer left alone (`left`, out of its
/// changes `to_peer`): what each goes back to. Keyed tables with a fresh base only; the
/// rows come from the plan (see `Work::old_base`), so reading them needs no database.
pub(super) fn base_before(
    w: &Work,
    to_peer: &ChangeList,
    left: &BTreeSet<Key>,
) -> BTreeMap<Key, Option<Packed>> {
    if !(w.keyed() && matches!(w.base, BaseState::Fresh)) || left.is_empty() {
        return BTreeMap::new();
    }
    to_peer
        .iter()
        .filter(|c| left.contains(merge::target_of(c)))
        .filter(|c| !merge::target_of(c).iter().any(Cell::is_null))
        .map(|c| (merge::target_of(&c).clone(), w.old_base_of(&c).cloned()))
        .collect()
}

/// Puts back the base of the keys the peer left alone (`left`) after `settle_bases` took
/// them in: their rows from `before`, or the table settled again with `deferred`.
pub(super) fn unsettle(
    conn: &Connection,
    w: &Work,
    direction: Direction,
    deferred: &BTreeSet<Key>,
    left: &BTreeSet<Key>,
    before: &BTreeMap<Key, Option<Packed>>,
) -> Result<()> {
    if !by_key(w) {
        // Multisets and first syncs settle from scratch: again, with the rows left alone.
        return settle_base(conn, usize::MAX, w, &ChangeList::new(), direction, deferred);
    }
    let back: Vec<Change> = left
        .iter()
        .filter_map(|key| {
            Some(match before.get(key)? {
                Some(row) => Change::Upsert {
                    key: key.clone(),
                    old: None,
                    new: row.clone(),
                },
                None => Change::Delete {
                    key: key.clone(),
                    old: Packed::pack(&[]),
                },
            })
        })
        .collect();
    crate::db::apply::overwrite(conn, "b", &w.spec, &back)?;
    settle_null_key_rows(conn, w, deferred)
}

/// Rows with a NULL in the key: their base is a multiset, like a keyless table's.
pub(super) fn settle_null_key_rows(
    conn: &Connection,
    w: &Work,
    deferred: &BTreeSet<Key>,
) -> Result<()> {
    if !matches!(w.base, BaseState::Fresh) || w.multiset_base.is_empty() {
        return Ok(());
    }
    let t = quote(&w.schema.name);
    conn.execute_batch(&format!("DELETE FROM b.{t} WHERE {}", null_key(&w.spec)))?;
    let whole = TableSpec {
        pk: Vec::new(),
        ..w.spec.clone()
    };
    let changes = multiset_base_counts(w, deferred);
    apply(conn, "b", &whole, &changes)?;
    Ok(())
}

/// Settles the base of table `i` of the plan (see `settle_bases`).
pub(super) fn settle_base(
    conn: &Connection,
    i: usize,
    w: &Work,
    to_peer: &ChangeList,
    direction: Direction,
    deferred: &BTreeSet<Key>,
) -> Result<()> {
    let t = quote(&w.schema.name);
    if !w.keyed() {
        if matches!(w.base, BaseState::Rebuild) {
            conn.execute_batch(&format!(
                "DROP TABLE IF EXISTS b.{t}; {}",
                base::create_table_sql(&w.schema, "b")
            ))?;
        } else {
            conn.execute_batch(&format!("DELETE FROM b.{t}"))?;
        }
        let changes = multiset_base_counts(w, deferred);
        apply(conn, "b", &w.spec, &changes)?;
        return Ok(());
    }
    settle_null_key_rows(conn, w, deferred)?;
    match w.base {
        BaseState::Fresh => {
            // The new base row of every staged key is what `from` now holds, so it is
            // copied in SQL. A key whose base does not change is copied to itself.
            let from = if direction == Direction::Pull {
                "p"
            } else {
                "main"
            };
            add_keys(conn, i, w, deferred, to_peer.iter().filter_map(change_key))?;
            let keys = staged(i);
            let pk = key_columns(w);
            let same_key: Vec<String> = w
                .spec
                .pk
                .iter()
                .map(|&i| {
                    let c = quote(&w.spec.columns[i]);
                    format!("s.{c} = k.{c}")
                })
                .collect();
            let same_key = same_key.join(" AND ");
            let kcols: Vec<String> = w
                .spec
                .pk
                .iter()
                .map(|&i| format!("k.{}", quote(&w.spec.columns[i])))
                .collect();
            let kcols = kcols.join(", ");
            let named: Vec<String> = w.spec.columns.iter().map(|c| quote(c)).collect();
            let cols = named.join(", ");
            let scols: Vec<String> = named.iter().map(|c| format!("s.{c}")).collect();
            let scols = scols.join(", ");
            // An existing base row is updated in place (an upsert: REPLACE would delete
            // and insert it again).
            let sets: Vec<String> = w
                .spec
                .columns
                .iter()
                .enumerate()
                .filter(|(i, _)| !w.spec.pk.contains(i))
                .map(|(_, c)| format!("{0} = excluded.{0}", quote(c)))
                .collect();
            let on_conflict = if sets.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!("DO UPDATE SET {}", sets.join(", "))
            };
            // Driven by the key list: one index lookup per key, never a scan.
            conn.execute_batch(&format!(
                "INSERT INTO b.{t} ({cols}) SELECT {scols} FROM {keys} AS k \
                   JOIN {from}.{t} AS s ON {same_key} WHERE true ON CONFLICT ({pk}) \
                   {on_conflict};
                 DELETE FROM b.{t} WHERE ({pk}) IN (SELECT {kcols} FROM {keys} AS k \
                   WHERE NOT EXISTS (SELECT 1 FROM {from}.{t} AS s WHERE {same_key}));
                 DROP TABLE {keys};"
            ))?;
        }
        BaseState::Rebuild => {
            let from = if direction == Direction::Pull {
                "p"
            } else {
                "main"
            };
            base::copy_table(conn, &w.schema, from)?;
            let key_cols: Vec<String> = w
                .spec
                .pk
                .iter()
                .enumerate()
                .map(|(i, &c)| format!("{} IS ?{}", quote(&w.spec.columns[c]), i + 1))
                .collect();
            let sql = format!("DELETE FROM b.{t} WHERE {}", key_cols.join(" AND "));
            // (Deferred rows with a NULL in the key are whole rows, not keys: the next
            // first sync treats them as it treats a keyless table's.)
            for key in deferred.iter().filter(|k| k.len() == w.spec.pk.len()) {
                conn.execute(&sql, params_from_iter(key.iter()))?;
            }
        }
    }
    Ok(())
}
