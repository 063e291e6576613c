//! Plans adjusted to the schema's own rules: ids both sides handed out (moved by `rekey`),
//! UNIQUE constraints, and parents still referenced by foreign keys.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use rusqlite::{Connection, params_from_iter};

use crate::config::DbConfig;
use crate::db::merge::{self, Change, Conflict, Rules, TableSpec, Winner};
use crate::db::rekey;
use crate::db::snapshot::{self, quote};
use crate::db::value::{Cell, Key, Packed, Row};

use super::plan::{BaseState, Work, plan_table};

/// `(table, key)` of every insert/insert conflict on a table keyed by its rowid whose base
/// is known (on a first sync every difference looks like one).
pub(super) fn collisions(conn: &Connection, works: &[Work]) -> Result<Vec<(String, Key)>> {
    let mut out = Vec::new();
    for w in works {
        if !w.keyed()
            || !matches!(w.base, BaseState::Fresh)
            || !w
                .conflicts
                .iter()
                .any(|c| c.kind == merge::ConflictKind::InsertInsert)
            || !rekey::rowid_key(conn, "main", &w.schema)?
        {
            continue;
        }
        out.extend(
            w.conflicts
                .iter()
                .filter(|c| c.kind == merge::ConflictKind::InsertInsert)
                .map(|c| (w.spec.name.clone(), c.key.clone())),
        );
    }
    Ok(out)
}

/// The base row of `key` as planning sees it (`None` without a fresh base).
fn base_row(conn: &Connection, w: &Work, key: &Key) -> Result<Option<Row>> {
    if !matches!(w.base, BaseState::Fresh) || key.iter().any(Cell::is_null) {
        return Ok(None);
    }
    snapshot::lookup(conn, &snapshot::lookup_sql(&w.spec, "b"), key)
}

/// Moves the peer's row of every collision to a fresh key in the snapshot (see `rekey`),
/// merges the tables the moves touched again, and records each move as a `rekey`
/// conflict; the moves become those tables' `peer_edits`. Repeated until no collision is
/// left: two rows that looked identical (the same audit line for user 3 on both sides)
/// differ once one side's user 3 has moved, and collide in turn.
pub(super) fn rekey_rows(
    conn: &Connection,
    db: &DbConfig,
    mut works: Vec<Work>,
    rules: Rules,
) -> Result<Vec<Work>> {
    let specs: BTreeMap<String, TableSpec> = works
        .iter()
        .map(|w| (w.spec.name.clone(), w.spec.clone()))
        .collect();
    let mut mover = rekey::Mover::default();
    let mut moves: Vec<rekey::Moved> = Vec::new();
    let mut centrals: BTreeMap<(String, Key), Option<Row>> = BTreeMap::new();
    loop {
        let found: Vec<(String, Key)> = collisions(conn, &works)?
            .into_iter()
            .filter(|c| !centrals.contains_key(c))
            .collect();
        if found.is_empty() {
            break;
        }
        for (t, k) in &found {
            let row = snapshot::lookup(conn, &snapshot::lookup_sql(&specs[t], "main"), k)?;
            centrals.insert((t.clone(), k.clone()), row);
        }
        moves.extend(mover.move_rows(conn, &specs, &found, &db.rekey_refs)?);
        let tables = mover.tables();
        works = works
            .into_iter()
            .map(|w| {
                if tables.contains(w.spec.name.as_str()) {
                    plan_table(conn, None, w.schema, w.spec, w.base, rules)
                } else {
                    Ok(w)
                }
            })
            .collect::<Result<_>>()?;
    }
    let mut edits = mover.edits(conn, &specs)?;
    for w in &mut works {
        let Some(edits) = edits.remove(&w.spec.name) else {
            continue;
        };
        if w.keyed() {
            // Keys only the moves changed: the peer holds the merge's result once they
            // are written (the journal needs it as their new base).
            let sql = snapshot::lookup_sql(&w.spec, "p");
            let planned: BTreeSet<Key> = w
                .to_peer
                .iter()
                .map(|c| merge::target_of(&c).clone())
                .collect();
            for e in &edits {
                let key = merge::target_of(e);
                if !w.new_base.contains_key(key) && !planned.contains(key) {
                    w.new_base.insert(
                        key.clone(),
                        snapshot::lookup(conn, &sql, key)?.map(Packed::from),
                    );
                }
            }
        }
        w.peer_edits = edits;
    }
    for m in moves {
        let Some(w) = works.iter_mut().find(|w| w.spec.name == m.table) else {
            continue;
        };
        let mut result = m.row.clone();
        result[w.spec.pk[0]] = m.to[0].clone();
        let refs: Vec<String> = m
            .references
            .iter()
            .map(|(c, n)| format!("{n} in {c}"))
            .collect();
        log::warn!(
            "table {}: both sides inserted a row under key {}; the peer's moved to {}{} \
             (recorded)",
            m.table,
            serde_json::to_string(&m.from).unwrap_or_default(),
            serde_json::to_string(&m.to).unwrap_or_default(),
            if refs.is_empty() {
                String::new()
            } else {
                format!(", with the rows referencing it ({})", refs.join(", "))
            }
        );
        let central = centrals
            .remove(&(m.table.clone(), m.from.clone()))
            .flatten();
        w.conflicts.push(Conflict {
            table: m.table,
            key: m.from,
            kind: merge::ConflictKind::Rekey,
            base: None,
            central,
            peer: Some(m.row),
            winner: Winner::Central,
            result: Some(result),
            moved_to: Some(m.to),
        });
    }
    Ok(works)
}

/// The UNIQUE constraints (other than the key) of a table, as column indices; indexes on
/// expressions and partial indexes are left to the database (a write they refuse is
/// reported and retried next run).
pub(super) fn unique_indexes(
    conn: &Connection,
    db: &str,
    spec: &TableSpec,
) -> Result<Vec<Vec<usize>>> {
    let mut out = Vec::new();
    let mut list = conn.prepare(&format!("PRAGMA {db}.index_list({})", quote(&spec.name)))?;
    let indexes: Vec<(String, bool, String, bool)> = list
        .query_map([], |r| Ok((r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
        .collect::<Result<_, _>>()?;
    for (name, unique, origin, partial) in indexes {
        if !unique || origin == "pk" || partial {
            continue;
        }
        let mut info = conn.prepare(&format!("PRAGMA {db}.index_info({})", quote(&name)))?;
        let cols: Vec<Option<String>> = info
            .query_map([], |r| r.get(2))?
            .collect::<Result<_, _>>()?;
        let idx: Option<Vec<usize>> = cols
            .iter()
            .map(|c| {
                c.as_ref()
                    .and_then(|c| spec.columns.iter().position(|n| n == c))
            })
            .collect();
        if let Some(idx) = idx {
            out.push(idx);
        }
    }
    Ok(out)
}

/// Rows the merge would write into a side where a row under another key holds the same
/// value of a UNIQUE constraint (the same nick registered under two ids, one on each
/// side) are `unique` conflicts, resolved by the policy between the two rows: the loser
/// is removed from the side that holds it (and not copied to the other), and recorded.
/// Both sides then converge on the winner. Values freed or swapped by the same set of
/// changes are no conflict (`apply` writes them in a working order).
pub(super) fn resolve_unique(conn: &Connection, w: &mut Work, rules: Rules) -> Result<()> {
    if !w.keyed() {
        return Ok(());
    }
    let indexes = unique_indexes(conn, "main", &w.spec)?;
    if indexes.is_empty() {
        return Ok(());
    }
    for into_peer in [true, false] {
        let (side, origin) = if into_peer {
            ("p", "main")
        } else {
            ("main", "p")
        };
        let list = if into_peer { &w.to_peer } else { &w.to_central };
        // Each key's final row on this side after its changes (None: deleted).
        let finals: BTreeMap<Key, Option<Row>> = list
            .iter()
            .filter_map(|c| match c {
                Change::Upsert { key, new, .. } => Some((key.clone(), Some(new.unpack()))),
                Change::Delete { key, .. } => Some((key.clone(), None)),
                Change::SetCount { .. } => None,
            })
            .collect();
        let mut found = Vec::new();
        for (key, row) in finals.iter().filter_map(|(k, r)| Some((k, r.as_ref()?))) {
            for cols in &indexes {
                if cols.iter().any(|&i| row[i].is_null()) {
                    continue; // NULLs never collide in a UNIQUE index
                }
                let same: Vec<String> = cols
                    .iter()
                    .enumerate()
                    .map(|(n, &i)| format!("{} IS ?{}", quote(&w.spec.columns[i]), n + 1))
                    .collect();
                let all: Vec<String> = w.spec.columns.iter().map(|c| quote(c)).collect();
                let sql = format!(
                    "SELECT {} FROM {side}.{} WHERE {}",
                    all.join(", "),
                    quote(&w.spec.name),
                    same.join(" AND ")
                );
                let values: Vec<&Cell> = cols.iter().map(|&i| &row[i]).collect();
                let mut stmt = conn.prepare_cached(&sql)?;
                let holders: Vec<Row> = stmt
                    .query_map(params_from_iter(values), |r| {
                        (0..all.len())
                            .map(|i| r.get::<_, Cell>(i))
                            .collect::<Result<Row, _>>()
                    })?
                    .collect::<Result<_, _>>()?;
                for holder in holders {
                    let h = w.spec.key_of(&holder);
                    let freed = finals.get(&h).is_some_and(|f| {
                        f.as_ref()
                            .is_none_or(|f| cols.iter().any(|&i| f[i] != row[i]))
                    });
                    if &h != key && !freed {
                        found.push((key.clone(), row.clone(), holder));
                    }
                }
            }
        }
        for (key, row, holder) in found {
            let h = w.spec.key_of(&holder);
            let (central, peer) = if into_peer {
                (&row, &holder)
            } else {
                (&holder, &row)
            };
            let winner = merge::pick(&w.spec, rules.policy, Some(central), Some(peer));
            let holder_wins = (winner == Winner::Peer) == into_peer;
            let (loser_key, loser_side) = if holder_wins {
                (key.clone(), origin)
            } else {
                (h.clone(), side)
            };
            // The loser leaves the side holding it and is copied nowhere.
            let loser_now =
                snapshot::lookup(conn, &snapshot::lookup_sql(&w.spec, loser_side), &loser_key)?;
            let (to_loser_side, to_other) = if loser_side == "p" {
                (&mut w.to_peer, &mut w.to_central)
            } else {
                (&mut w.to_central, &mut w.to_peer)
            };
            to_loser_side.retain(|c| merge::target_of(c) != &loser_key);
            to_other.retain(|c| merge::target_of(c) != &loser_key);
            let delete = loser_now.as_ref().map(|old| Change::Delete {
                key: loser_key.clone(),
                old: Packed::pack(old),
            });
            to_loser_side.extend(delete.clone());
            w.to_base.retain(|k| k != &loser_key);
            w.to_base.push(loser_key.clone());
            w.new_base.remove(&loser_key);
            if let (Some(delete), "p") = (&delete, loser_side) {
                let old = base_row(conn, w, &loser_key)?;
                w.note_peer_bases(delete, old, None);
            }
            w.conflicts.push(Conflict {
                table: w.spec.name.clone(),
                key: loser_key,
                kind: merge::ConflictKind::Unique,
                base: None,
                central: Some(central.clone()),
                peer: Some(peer.clone()),
                winner,
                result: Some(if holder_wins {
                    holder.clone()
                } else {
                    row.clone()
                }),
                moved_to: None,
            });
        }
    }
    Ok(())
}

/// A parent row deleted on one side while the other side still has rows referencing it
/// (a comment added to a post the bot deleted): applying the delete would leave orphans,
/// so the parent is kept (its deletion undone where it was deleted) and the conflict is
/// recorded. Declared single-column foreign keys are followed; cr0sync's own writes never
/// cascade, so after a sync `PRAGMA foreign_key_check` reports nothing new.
pub(super) fn keep_referenced_parents(conn: &Connection, works: &mut [Work]) -> Result<()> {
    // (child table, child column, parent table) for every declared single-column key.
    let mut refs = Vec::new();
    for w in works.iter() {
        let mut stmt = conn.prepare(
            "SELECT id, \"table\", \"from\", count(*) OVER (PARTITION BY id) \
             FROM pragma_foreign_key_list(?1, 'main')",
        )?;
        let rows = stmt.query_map([&w.spec.name], |r| {
            Ok((
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        for row in rows {
            let (parent, from, parts) = row?;
            if parts == 1 {
                refs.push((w.spec.name.clone(), from, parent));
            }
        }
    }
    for (child, column, parent) in refs {
        let Some(pi) = works
            .iter()
            .position(|w| w.spec.name == parent && w.keyed())
        else {
            continue;
        };
        if works[pi].spec.pk.len() != 1 {
            continue;
        }
        for into_peer in [true, false] {
            // A delete on its way to `side`, whose rows may still reference the parent.
            let (side, origin) = if into_peer {
                ("p", "main")
            } else {
                ("main", "p")
            };
            let deletes: Vec<(Key, Row)> = {
                let list = if into_peer {
                    &works[pi].to_peer
                } else {
                    &works[pi].to_central
                };
                list.iter()
                    .filter_map(|c| match c {
                        Change::Delete { key, old } => Some((key.clone(), old.unpack())),
                        _ => None,
                    })
                    .collect()
            };
            let Some(ci) = works.iter().position(|w| w.spec.name == child) else {
                continue;
            };
            // (Read once: the lists are held encoded.)
            let mut child_deletes: BTreeSet<Key> = BTreeSet::new();
            if !deletes.is_empty() {
                let list = if into_peer {
                    &works[ci].to_peer
                } else {
                    &works[ci].to_central
                };
                child_deletes.extend(list.iter().filter_map(|c| match c {
                    Change::Delete { key, .. } => Some(key),
                    _ => None,
                }));
            }
            for (key, parent_row) in deletes {
                let cspec = works[ci].spec.clone();
                let kcols: Vec<String> =
                    cspec.pk.iter().map(|&i| quote(&cspec.columns[i])).collect();
                let sql = format!(
                    "SELECT {} FROM {side}.{} WHERE {} = ?1",
                    if kcols.is_empty() {
                        "rowid".to_string()
                    } else {
                        kcols.join(", ")
                    },
                    quote(&child),
                    quote(&column)
                );
                let mut stmt = conn.prepare_cached(&sql)?;
                let n = kcols.len().max(1);
                let referencing: Vec<Key> = stmt
                    .query_map([&key[0]], |r| {
                        (0..n)
                            .map(|i| r.get::<_, Cell>(i))
                            .collect::<Result<Key, _>>()
                    })?
                    .collect::<Result<_, _>>()?;
                let orphans = referencing
                    .iter()
                    .filter(|k| !child_deletes.contains(*k))
                    .count();
                if orphans == 0 {
                    continue;
                }
                // Keep the parent: no delete on `side`, and `origin` gets it back.
                let w = &mut works[pi];
                let (to_side, to_origin) = if into_peer {
                    (&mut w.to_peer, &mut w.to_central)
                } else {
                    (&mut w.to_central, &mut w.to_peer)
                };
                to_side.retain(|c| merge::target_of(c) != &key);
                to_origin.retain(|c| merge::target_of(c) != &key);
                if pi == ci {
                    // A table that references itself: this row is no longer deleted.
                    child_deletes.remove(&key);
                }
                let origin_now =
                    snapshot::lookup(conn, &snapshot::lookup_sql(&w.spec, origin), &key)?;
                let change = merge::change(&key, origin_now.as_ref(), Some(&parent_row));
                to_origin.extend(change.clone());
                w.to_base.retain(|k| k != &key);
                w.to_base.push(key.clone());
                match change {
                    Some(change) if !into_peer => {
                        let old = base_row(conn, w, &key)?;
                        w.note_peer_bases(&change, old, Some(parent_row.clone()));
                    }
                    _ => {
                        w.new_base
                            .insert(key.clone(), Some(Packed::pack(&parent_row)));
                    }
                }
                let (central, peer) = if into_peer {
                    (None, Some(parent_row.clone()))
                } else {
                    (Some(parent_row.clone()), None)
                };
                let winner = if into_peer {
                    Winner::Peer
                } else {
                    Winner::Central
                };
                w.conflicts.push(Conflict {
                    table: w.spec.name.clone(),
                    key: key.clone(),
                    kind: merge::ConflictKind::ForeignKey,
                    base: None,
                    central,
                    peer,
                    winner,
                    result: Some(parent_row.clone()),
                    moved_to: None,
                });
                log::warn!(
                    "table {parent}: row {} was deleted on one side but {orphans} row(s) of {child} \
                     still reference it on the other; it is kept everywhere (recorded)",
                    serde_json::to_string(&key).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
