//! Base upkeep: after a sync, the base holds what both sides now agree on; rows a side
//! deferred keep their old base, so the next run merges them again.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use rusqlite::{Connection, params_from_iter};

use crate::config::Direction;
use crate::db::apply::apply;
use crate::db::base;
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

/// Brings the base up to date for one table, inside the central transaction. Rows a side
/// deferred keep their old base, so the next run sees their change again.
/// Settles the base of every table for what the central copy now holds, less `deferred`.
pub(super) fn settle_bases(
    conn: &Connection,
    works: &[Work],
    direction: Direction,
    deferred: &[BTreeSet<Key>],
) -> Result<()> {
    for (w, deferred) in works.iter().zip(deferred) {
        settle_base(conn, w, direction, deferred)?;
    }
    Ok(())
}

/// The base rows, before this sync, of the keys the peer left alone (`left`, out of its
/// changes `to_peer`): what each goes back to. Keyed tables with a fresh base only; the
/// rows come from the plan (see `Work::old_base`), so reading them needs no database.
pub(super) fn base_before(
    w: &Work,
    to_peer: &[Change],
    left: &BTreeSet<Key>,
) -> BTreeMap<Key, Option<Packed>> {
    if !(w.keyed() && matches!(w.base, BaseState::Fresh)) || left.is_empty() {
        return BTreeMap::new();
    }
    to_peer
        .iter()
        .filter(|c| left.contains(merge::target_of(c)))
        .filter(|c| !merge::target_of(c).iter().any(Cell::is_null))
        .map(|c| (merge::target_of(c).clone(), w.old_base_of(c).cloned()))
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
    if !(w.keyed() && matches!(w.base, BaseState::Fresh)) {
        // Multisets and first syncs settle from scratch: again, with the rows left alone.
        return settle_base(conn, w, direction, deferred);
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

pub(super) fn settle_base(
    conn: &Connection,
    w: &Work,
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
            // The new base row of every settled key is what `from` now holds, so it is
            // copied in SQL (keys with a NULL cell never get here: see `Work::to_base`).
            let from = if direction == Direction::Pull {
                "p"
            } else {
                "main"
            };
            let plain: Vec<&Key> = w
                .to_base
                .iter()
                .filter(|key| !deferred.contains(*key))
                .collect();
            if !plain.is_empty() {
                let pk: Vec<String> = w
                    .spec
                    .pk
                    .iter()
                    .map(|&i| quote(&w.spec.columns[i]))
                    .collect();
                let pk = pk.join(", ");
                conn.execute_batch(&format!(
                    "DROP TABLE IF EXISTS temp.cr0sync_keys; CREATE TEMP TABLE cr0sync_keys ({pk});"
                ))?;
                let marks: Vec<String> = (1..=w.spec.pk.len()).map(|i| format!("?{i}")).collect();
                let mut insert = conn.prepare(&format!(
                    "INSERT INTO temp.cr0sync_keys VALUES ({})",
                    marks.join(", ")
                ))?;
                for key in &plain {
                    insert.execute(params_from_iter(key.iter()))?;
                }
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
                    "INSERT INTO b.{t} ({cols}) SELECT {scols} FROM temp.cr0sync_keys AS k \
                       JOIN {from}.{t} AS s ON {same_key} WHERE true ON CONFLICT ({pk}) \
                       {on_conflict};
                     DELETE FROM b.{t} WHERE ({pk}) IN (SELECT {kcols} FROM temp.cr0sync_keys \
                       AS k WHERE NOT EXISTS (SELECT 1 FROM {from}.{t} AS s WHERE {same_key}));
                     DROP TABLE temp.cr0sync_keys;"
                ))?;
            }
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
