//! The three-way merge of one table: the heart of the
//! database job, as a pure function over rows. No I/O here; snapshots come in as row
//! lists, and changes go out as lists the apply step writes.
//!
//! Invariants (each is a property test below):
//! - After applying `to_central` and `to_peer`, a `both` pair holds `new_base` on both sides.
//! - Merging again (base = `new_base`, sides as applied) yields no change and no conflict.
//! - Every cell either side changed is in the result, or the row has a conflict record
//!   carrying both images: the losing value is never silently dropped.
//! - Tables with a primary key merge by key, cell by cell. Tables without one merge as
//!   multisets: each row's target count is `central + peer - base`, written as "this row
//!   occurs N times" (idempotent after a crash between the two commits).
//! - A one-directional pair writes one side only; its base is the unwritten side's
//!   snapshot, so a difference it may not propagate is not re-detected as new every run.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::config::{Direction, Policy};
use chrono::{DateTime, Utc};

use crate::conflicts::{ConflictRecord, Images};
use crate::db::value::{Key, Packed, Row, counter_merge};

/// What the merge needs to know about a table whose schema agrees on all sides.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct TableSpec {
    pub name: String,
    pub columns: Vec<String>,
    /// Indices of the primary-key columns, in key order; empty: no declared key.
    pub pk: Vec<usize>,
    /// Columns merged additively (`counters` in the configuration).
    pub counters: Vec<usize>,
    /// The `updated_at` column, if the table has it: newest-wins compares it, and a
    /// change to it alone never makes a conflict (both sides stamp it on every write).
    pub updated_at: Option<usize>,
}

impl TableSpec {
    pub fn keyed(&self) -> bool {
        !self.pk.is_empty()
    }

    pub fn key_of(&self, row: &Row) -> Key {
        self.pk.iter().map(|&i| row[i].clone()).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    pub policy: Policy,
    pub direction: Direction,
}

/// One change to one side. `old` is what the snapshot saw: the apply step writes only if
/// the row still holds it (optimistic writes). Keyed rows are held packed; a plan holds
/// its changes encoded in a `db::changes::ChangeList`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub enum Change {
    /// Keyed insert (`old: None`) or update.
    Upsert {
        key: Key,
        old: Option<Packed>,
        new: Packed,
    },
    Delete {
        key: Key,
        old: Packed,
    },
    /// Multiset table: the row should occur `new` times (it occurred `old` times).
    SetCount {
        row: Row,
        old: u64,
        new: u64,
    },
}

pub use crate::conflicts::{ConflictKind, Winner};

/// A conflict and how it was resolved; every one is recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conflict {
    pub table: String,
    pub key: Key,
    pub kind: ConflictKind,
    pub base: Option<Row>,
    pub central: Option<Row>,
    pub peer: Option<Row>,
    pub winner: Winner,
    pub result: Option<Row>,
    /// `rekey`: the fresh key the peer's row moved to.
    pub moved_to: Option<Key>,
}

/// The outcome of merging one table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableMerge {
    pub to_central: Vec<Change>,
    pub to_peer: Vec<Change>,
    pub conflicts: Vec<Conflict>,
    /// The base to store once both sides committed these changes.
    pub new_base: Vec<Row>,
    /// Rows whose counter columns were merged additively.
    pub counter_merges: usize,
}

/// Inserts, updates and deletes of a change list (multiset counts add up rows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Counts {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
}

/// The key a change writes (keyed tables), or the row whose count it sets (multisets).
pub fn target_of(change: &Change) -> &Key {
    match change {
        Change::Upsert { key, .. } | Change::Delete { key, .. } => key,
        Change::SetCount { row, .. } => row,
    }
}

impl std::ops::Add for Counts {
    type Output = Counts;
    fn add(self, other: Counts) -> Counts {
        Counts {
            inserts: self.inserts + other.inserts,
            updates: self.updates + other.updates,
            deletes: self.deletes + other.deletes,
        }
    }
}

/// The row a keyed change leaves (`None`: deleted, or a multiset change).
pub fn result_of(change: &Change) -> Option<&Packed> {
    match change {
        Change::Upsert { new, .. } => Some(new),
        Change::Delete { .. } | Change::SetCount { .. } => None,
    }
}

/// The row a keyed change expects to find (`None`: none, or a multiset change).
pub fn before_of(change: &Change) -> Option<&Packed> {
    match change {
        Change::Upsert { old, .. } => old.as_ref(),
        Change::Delete { old, .. } => Some(old),
        Change::SetCount { .. } => None,
    }
}

pub fn counts<C: std::borrow::Borrow<Change>>(changes: impl IntoIterator<Item = C>) -> Counts {
    let mut n = Counts::default();
    for c in changes {
        match c.borrow() {
            Change::Upsert { old: None, .. } => n.inserts += 1,
            Change::Upsert { old: Some(_), .. } => n.updates += 1,
            Change::Delete { .. } => n.deletes += 1,
            Change::SetCount { old, new, .. } if new > old => n.inserts += new - old,
            Change::SetCount { old, new, .. } => n.deletes += old - new,
        }
    }
    n
}

/// Merges one table. `base` is `None` on the first sync of a pair.
pub fn merge_table(
    spec: &TableSpec,
    rules: Rules,
    base: Option<&[Row]>,
    central: &[Row],
    peer: &[Row],
) -> TableMerge {
    if spec.keyed() {
        merge_keyed(spec, rules, base.unwrap_or(&[]), central, peer)
    } else {
        merge_multiset(rules, base, central, peer)
    }
}

fn by_key(spec: &TableSpec, rows: &[Row]) -> BTreeMap<Key, Row> {
    rows.iter().map(|r| (spec.key_of(r), r.clone())).collect()
}

fn merge_keyed(
    spec: &TableSpec,
    rules: Rules,
    base: &[Row],
    central: &[Row],
    peer: &[Row],
) -> TableMerge {
    let (b, c, p) = (
        by_key(spec, base),
        by_key(spec, central),
        by_key(spec, peer),
    );
    let keys: BTreeSet<&Key> = b.keys().chain(c.keys()).chain(p.keys()).collect();
    let mut out = TableMerge::default();
    for key in keys {
        let m = merge_key(spec, rules, key, b.get(key), c.get(key), p.get(key));
        out.counter_merges += usize::from(m.counter_merged);
        out.conflicts.extend(m.conflict);
        out.to_central.extend(m.to_central);
        out.to_peer.extend(m.to_peer);
        out.new_base.extend(m.new_base);
    }
    out
}

/// The merge of one key of a keyed table: what each side must become, and the new base.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyMerge {
    pub to_central: Option<Change>,
    pub to_peer: Option<Change>,
    pub conflict: Option<Conflict>,
    pub counter_merged: bool,
    /// The row the base holds for this key once both sides committed.
    pub new_base: Option<Row>,
}

/// Merges one key: `bv`, `cv`, `pv` are the base, central and peer rows (`None`: absent).
/// The streaming sync calls this for every key whose rows differ between the sides.
pub fn merge_key(
    spec: &TableSpec,
    rules: Rules,
    key: &Key,
    bv: Option<&Row>,
    cv: Option<&Row>,
    pv: Option<&Row>,
) -> KeyMerge {
    let resolved = resolve(spec, rules.policy, bv, cv, pv);
    let result = resolved.result;
    let conflict = resolved.conflict.map(|winner| Conflict {
        table: spec.name.clone(),
        key: key.clone(),
        kind: match (bv, cv, pv) {
            (None, _, _) => ConflictKind::InsertInsert,
            (Some(_), Some(_), Some(_)) => ConflictKind::UpdateUpdate,
            _ => ConflictKind::UpdateDelete,
        },
        base: bv.cloned(),
        central: cv.cloned(),
        peer: pv.cloned(),
        winner,
        result: result.clone(),
        moved_to: None,
    });
    let to_central = match rules.direction {
        Direction::Push => None,
        _ => change(key, cv, result.as_ref()),
    };
    let to_peer = match rules.direction {
        Direction::Pull => None,
        _ => change(key, pv, result.as_ref()),
    };
    let new_base = match rules.direction {
        Direction::Both => result,
        Direction::Pull => pv.cloned(),
        Direction::Push => cv.cloned(),
    };
    KeyMerge {
        to_central,
        to_peer,
        conflict,
        counter_merged: resolved.counter_merged,
        new_base,
    }
}

/// The change that turns `now` into `want` for one key, if any. Also used for the base.
pub fn change(key: &Key, now: Option<&Row>, want: Option<&Row>) -> Option<Change> {
    match (now, want) {
        (a, b) if a == b => None,
        (old, Some(new)) => Some(Change::Upsert {
            key: key.clone(),
            old: old.map(|row| Packed::pack(row)),
            new: Packed::pack(new),
        }),
        (Some(old), None) => Some(Change::Delete {
            key: key.clone(),
            old: Packed::pack(old),
        }),
        (None, None) => None,
    }
}

struct Resolved {
    result: Option<Row>,
    /// `Some(winner)` if this was a conflict.
    conflict: Option<Winner>,
    counter_merged: bool,
}

fn resolve(
    spec: &TableSpec,
    policy: Policy,
    b: Option<&Row>,
    c: Option<&Row>,
    p: Option<&Row>,
) -> Resolved {
    let plain = |r: Option<&Row>| Resolved {
        result: r.cloned(),
        conflict: None,
        counter_merged: false,
    };
    if p == b {
        return plain(c);
    }
    if c == b {
        return plain(p);
    }
    // The same row on both sides is one change, unless a counter moved on both: equal
    // deltas are two increments (+1 and +1 is +2), never one.
    if c == p && !counters_moved_on_both(spec, b, c, p) {
        return plain(c);
    }
    // Both sides changed the row, differently.
    let winner = pick(spec, policy, c, p);
    let whole = |w: Winner| match w {
        Winner::Central => c.cloned(),
        Winner::Peer => p.cloned(),
    };
    let (Some(b), Some(c), Some(p)) = (b, c, p) else {
        // insert/insert with different values, or update/delete: the policy decides.
        return Resolved {
            result: whole(winner),
            conflict: Some(winner),
            counter_merged: false,
        };
    };
    // Update/update: merge cell by cell.
    let mut row = Vec::with_capacity(c.len());
    let mut conflicted = false;
    let mut counter_merged = false;
    for i in 0..c.len() {
        let (bi, ci, pi) = (&b[i], &c[i], &p[i]);
        let cell = if pi == bi {
            ci.clone()
        } else if ci == bi {
            pi.clone()
        } else if spec.counters.contains(&i)
            && let Some(sum) = counter_merge(bi, ci, pi)
        {
            // Checked before equality: equal deltas on both sides both count.
            counter_merged = true;
            sum
        } else if ci == pi {
            ci.clone()
        } else if spec.updated_at == Some(i) {
            // Both stamped the row: keep the newer stamp; not a conflict by itself.
            ci.max(pi).clone()
        } else {
            conflicted = true;
            match winner {
                Winner::Central => ci.clone(),
                Winner::Peer => pi.clone(),
            }
        };
        row.push(cell);
    }
    Resolved {
        result: Some(row),
        conflict: conflicted.then_some(winner),
        counter_merged,
    }
}

/// Whether some counter cell of an updated row changed on both sides (by any deltas,
/// equal ones included).
fn counters_moved_on_both(
    spec: &TableSpec,
    b: Option<&Row>,
    c: Option<&Row>,
    p: Option<&Row>,
) -> bool {
    let (Some(b), Some(c), Some(p)) = (b, c, p) else {
        return false;
    };
    spec.counters
        .iter()
        .any(|&i| c[i] != b[i] && p[i] != b[i] && counter_merge(&b[i], &c[i], &p[i]).is_some())
}

/// Which side wins a conflict under `policy`. A deletion has no `updated_at`,
/// so newest-wins falls back to central-wins for it, as for ties and NULLs.
pub fn pick(spec: &TableSpec, policy: Policy, c: Option<&Row>, p: Option<&Row>) -> Winner {
    match policy {
        Policy::CentralWins => Winner::Central,
        Policy::PeerWins => Winner::Peer,
        Policy::NewestWins => {
            let stamp = |r: Option<&Row>| {
                spec.updated_at
                    .and_then(|i| r.map(|r| r[i].clone()))
                    .filter(|v| !v.is_null())
            };
            match (stamp(c), stamp(p)) {
                (Some(cs), Some(ps)) if ps > cs => Winner::Peer,
                _ => Winner::Central,
            }
        }
    }
}

pub fn multiset(rows: &[Row]) -> BTreeMap<Row, u64> {
    let mut m = BTreeMap::new();
    for r in rows {
        *m.entry(r.clone()).or_insert(0) += 1;
    }
    m
}

fn merge_multiset(rules: Rules, base: Option<&[Row]>, central: &[Row], peer: &[Row]) -> TableMerge {
    let (c, p) = (multiset(central), multiset(peer));
    let b = base.map(multiset);
    let rows: BTreeSet<&Row> = c
        .keys()
        .chain(p.keys())
        .chain(b.iter().flat_map(|b| b.keys()))
        .collect();
    let mut out = TableMerge::default();
    for row in rows {
        let cn = c.get(row).copied().unwrap_or(0);
        let pn = p.get(row).copied().unwrap_or(0);
        // First sync: what both sides hold is taken as shared, so identical rows stay.
        let bn = match &b {
            Some(b) => b.get(row).copied().unwrap_or(0),
            None => cn.min(pn),
        };
        let target = u64::try_from((i128::from(cn) + i128::from(pn) - i128::from(bn)).max(0))
            .unwrap_or(u64::MAX);
        if rules.direction != Direction::Push && target != cn {
            out.to_central.push(Change::SetCount {
                row: row.clone(),
                old: cn,
                new: target,
            });
        }
        if rules.direction != Direction::Pull && target != pn {
            out.to_peer.push(Change::SetCount {
                row: row.clone(),
                old: pn,
                new: target,
            });
        }
        let keep = match rules.direction {
            Direction::Both => target,
            Direction::Pull => pn,
            Direction::Push => cn,
        };
        out.new_base.extend(std::iter::repeat_n(
            row.clone(),
            usize::try_from(keep).unwrap_or(usize::MAX),
        ));
    }
    out
}

/// Applies changes to an in-memory table: the reference semantics the SQLite apply step
/// must match, used by the property tests.
impl Conflict {
    /// The record of this conflict, as `conflicts.jsonl` keeps it.
    pub fn record(
        &self,
        id: String,
        time: DateTime<Utc>,
        database: &str,
        peer: &str,
    ) -> ConflictRecord {
        let c = self;
        let json = |r: &Option<Row>| {
            r.as_ref()
                .map(|r| serde_json::to_value(r).unwrap_or_default())
        };
        ConflictRecord {
            id,
            time,
            database: database.into(),
            peer: peer.into(),
            table: c.table.clone(),
            key: serde_json::to_value(&c.key).unwrap_or_default(),
            kind: c.kind,
            rows: Images {
                base: json(&c.base),
                central: json(&c.central),
                peer: json(&c.peer),
            },
            winner: c.winner,
            result: json(&c.result).unwrap_or(serde_json::Value::Null),
            new_key: c
                .moved_to
                .as_ref()
                .map(|k| serde_json::to_value(k).unwrap_or_default()),
        }
    }
}

#[cfg(test)]
pub fn apply_in_memory(spec: &TableSpec, rows: &[Row], changes: &[Change]) -> Vec<Row> {
    if spec.keyed() {
        let mut m = by_key(spec, rows);
        for ch in changes {
            match ch {
                Change::Upsert { key, new, .. } => {
                    m.insert(key.clone(), new.unpack());
                }
                Change::Delete { key, .. } => {
                    m.remove(key);
                }
                Change::SetCount { .. } => {}
            }
        }
        m.into_values().collect()
    } else {
        let mut m = multiset(rows);
        for ch in changes {
            if let Change::SetCount { row, new, .. } = ch {
                m.insert(row.clone(), *new);
            }
        }
        let mut out = Vec::new();
        for (row, n) in m {
            out.extend(std::iter::repeat_n(
                row,
                usize::try_from(n).unwrap_or(usize::MAX),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::value::Cell;
    use proptest::prelude::*;
    use rusqlite::types::Value;

    fn int(i: i64) -> Cell {
        Cell::Sql(Value::Integer(i))
    }
    fn text(s: &str) -> Cell {
        Cell::Sql(Value::Text(s.into()))
    }
    fn null() -> Cell {
        Cell::Sql(Value::Null)
    }

    /// users(id PK, nick, email, coins counter, updated_at)
    fn users() -> TableSpec {
        TableSpec {
            name: "users".into(),
            columns: ["id", "nick", "email", "coins", "updated_at"]
                .map(String::from)
                .to_vec(),
            pk: vec![0],
            counters: vec![3],
            updated_at: Some(4),
        }
    }

    fn user(id: i64, nick: &str, email: &str, coins: i64, at: &str) -> Row {
        vec![int(id), text(nick), text(email), int(coins), text(at)]
    }

    const BOTH: Rules = Rules {
        policy: Policy::CentralWins,
        direction: Direction::Both,
    };

    fn sorted(mut rows: Vec<Row>) -> Vec<Row> {
        rows.sort();
        rows
    }

    #[test]
    fn one_sided_changes_propagate() {
        let base = vec![user(1, "a", "a@x", 1, "t0"), user(2, "b", "b@x", 1, "t0")];
        let central = base.clone();
        let peer = vec![user(1, "a", "a@y", 1, "t1"), user(3, "c", "c@x", 0, "t1")];
        let m = merge_table(&users(), BOTH, Some(&base), &central, &peer);
        assert!(m.conflicts.is_empty());
        assert!(m.to_peer.is_empty());
        assert_eq!(
            counts(&m.to_central),
            Counts {
                inserts: 1,
                updates: 1,
                deletes: 1
            }
        );
        assert_eq!(sorted(m.new_base), sorted(peer));
    }

    #[test]
    fn different_columns_merge_without_conflict() {
        let base = vec![user(1, "alice", "a@x", 10, "t0")];
        let central = vec![user(1, "alice2", "a@x", 10, "t1")];
        let peer = vec![user(1, "alice", "a@y", 10, "t2")];
        let m = merge_table(&users(), BOTH, Some(&base), &central, &peer);
        assert!(m.conflicts.is_empty(), "{:?}", m.conflicts);
        assert_eq!(m.new_base, vec![user(1, "alice2", "a@y", 10, "t2")]);
    }

    #[test]
    fn same_change_on_both_sides_is_no_conflict() {
        let base = vec![user(1, "a", "a@x", 1, "t0")];
        let both = vec![user(1, "a", "new@x", 1, "t1")];
        let m = merge_table(&users(), BOTH, Some(&base), &both, &both);
        assert!(m.conflicts.is_empty() && m.to_central.is_empty() && m.to_peer.is_empty());
    }

    #[test]
    fn counters_add_both_deltas() {
        let base = vec![user(2, "bob", "b@x", 50, "t0")];
        let central = vec![user(2, "bob", "b@x", 80, "t1")];
        let peer = vec![user(2, "bob", "b@x", 70, "t2")];
        let m = merge_table(&users(), BOTH, Some(&base), &central, &peer);
        assert!(m.conflicts.is_empty());
        assert_eq!(m.counter_merges, 1);
        assert_eq!(m.new_base, vec![user(2, "bob", "b@x", 100, "t2")]);
    }

    #[test]
    fn equal_counter_deltas_on_both_sides_both_count() {
        // +1 and +1 is +2, +3 and +3 is +6, +3 and -3 is 0: never "the same change once".
        for (c, p, want) in [
            (101, 101, 102),
            (103, 103, 106),
            (103, 97, 100),
            (101, 102, 103),
        ] {
            let base = vec![user(1, "a", "a@x", 100, "t0")];
            let central = vec![user(1, "a", "a@x", c, "t0")];
            let peer = vec![user(1, "a", "a@x", p, "t0")];
            let m = merge_table(&users(), BOTH, Some(&base), &central, &peer);
            assert!(m.conflicts.is_empty());
            assert_eq!(m.new_base, vec![user(1, "a", "a@x", want, "t0")], "{c} {p}");
        }
    }

    #[test]
    fn equal_counter_deltas_merge_with_other_columns_changed_too() {
        let base = vec![user(1, "a", "a@x", 100, "t0")];
        let central = vec![user(1, "bot", "a@x", 101, "t1")];
        let peer = vec![user(1, "a", "web@x", 101, "t2")];
        let m = merge_table(&users(), BOTH, Some(&base), &central, &peer);
        assert!(m.conflicts.is_empty());
        assert_eq!(m.new_base, vec![user(1, "bot", "web@x", 102, "t2")]);
    }

    #[test]
    fn same_cell_conflict_follows_policy_and_is_recorded() {
        let base = vec![user(3, "carol", "c@x", 1, "t0")];
        let central = vec![user(3, "carol_bot", "c@x", 1, "t1")];
        let peer = vec![user(3, "carol_web", "c@x", 1, "t2")];
        for (policy, nick, winner) in [
            (Policy::CentralWins, "carol_bot", Winner::Central),
            (Policy::PeerWins, "carol_web", Winner::Peer),
            (Policy::NewestWins, "carol_web", Winner::Peer),
        ] {
            let rules = Rules {
                policy,
                direction: Direction::Both,
            };
            let m = merge_table(&users(), rules, Some(&base), &central, &peer);
            assert_eq!(m.conflicts.len(), 1, "{policy:?}");
            let c = &m.conflicts[0];
            assert_eq!((c.kind, c.winner), (ConflictKind::UpdateUpdate, winner));
            assert_eq!(c.central.as_ref(), Some(&central[0]));
            assert_eq!(c.peer.as_ref(), Some(&peer[0]));
            assert_eq!(m.new_base[0][1], text(nick), "{policy:?}");
        }
    }

    #[test]
    fn newest_wins_ties_and_nulls_fall_back_to_central() {
        let spec = users();
        let rules = Rules {
            policy: Policy::NewestWins,
            direction: Direction::Both,
        };
        let base = vec![user(1, "a", "e", 1, "t0")];
        let central = vec![user(1, "c", "e", 1, "t5")];
        let peer = vec![user(1, "p", "e", 1, "t5")];
        let m = merge_table(&spec, rules, Some(&base), &central, &peer);
        assert_eq!(m.conflicts[0].winner, Winner::Central);
        let mut peer_null = peer.clone();
        peer_null[0][4] = null();
        let m = merge_table(&spec, rules, Some(&base), &central, &peer_null);
        assert_eq!(m.conflicts[0].winner, Winner::Central);
    }

    #[test]
    fn update_delete_is_a_conflict() {
        let base = vec![user(1, "a", "e", 1, "t0")];
        let central: Vec<Row> = vec![];
        let peer = vec![user(1, "a", "e2", 1, "t1")];
        let m = merge_table(&users(), BOTH, Some(&base), &central, &peer);
        assert_eq!(m.conflicts[0].kind, ConflictKind::UpdateDelete);
        assert!(m.new_base.is_empty(), "central-wins keeps the deletion");
        assert_eq!(counts(&m.to_peer).deletes, 1);
        let peer_wins = Rules {
            policy: Policy::PeerWins,
            direction: Direction::Both,
        };
        let m = merge_table(&users(), peer_wins, Some(&base), &central, &peer);
        assert_eq!(m.new_base, peer);
    }

    #[test]
    fn first_sync_copies_one_sided_rows_and_flags_differences() {
        let central = vec![user(1, "a", "e", 1, "t0"), user(2, "b", "e", 1, "t0")];
        let peer = vec![
            user(1, "a", "e", 1, "t0"),
            user(2, "B", "e", 1, "t0"),
            user(3, "c", "e", 1, "t0"),
        ];
        let m = merge_table(&users(), BOTH, None, &central, &peer);
        assert_eq!(m.conflicts.len(), 1);
        assert_eq!(m.conflicts[0].kind, ConflictKind::InsertInsert);
        assert_eq!(counts(&m.to_central).inserts, 1);
        assert_eq!(counts(&m.to_peer).updates, 1);
    }

    #[test]
    fn pull_writes_central_only_and_is_stable() {
        let rules = Rules {
            policy: Policy::CentralWins,
            direction: Direction::Pull,
        };
        let base = vec![user(1, "a", "e", 1, "t0")];
        let central = vec![user(1, "c", "e", 1, "t1")];
        let peer = vec![user(1, "p", "e", 1, "t1"), user(2, "new", "e", 1, "t1")];
        let m = merge_table(&users(), rules, Some(&base), &central, &peer);
        assert!(m.to_peer.is_empty());
        assert_eq!(m.conflicts.len(), 1);
        let central2 = apply_in_memory(&users(), &central, &m.to_central);
        let again = merge_table(&users(), rules, Some(&m.new_base), &central2, &peer);
        assert!(
            again.conflicts.is_empty() && again.to_central.is_empty() && again.to_peer.is_empty()
        );
    }

    fn seen() -> TableSpec {
        TableSpec {
            name: "seen".into(),
            columns: vec!["nick".into()],
            pk: vec![],
            counters: vec![],
            updated_at: None,
        }
    }

    #[test]
    fn multiset_inserts_on_both_sides_occur_twice() {
        let base: Vec<Row> = vec![vec![text("a")]];
        let central = vec![vec![text("a")], vec![text("x")]];
        let peer = vec![vec![text("a")], vec![text("x")]];
        let m = merge_table(&seen(), BOTH, Some(&base), &central, &peer);
        assert_eq!(
            sorted(m.new_base),
            vec![vec![text("a")], vec![text("x")], vec![text("x")]]
        );
    }

    #[test]
    fn multiset_first_sync_leaves_identical_rows_alone() {
        let rows = vec![vec![text("a")], vec![text("a")]];
        let m = merge_table(&seen(), BOTH, None, &rows, &rows);
        assert!(m.to_central.is_empty() && m.to_peer.is_empty());
        assert_eq!(m.new_base.len(), 2);
    }

    // ---- Property tests: the merge laws (STYLE 11). ----

    /// Small keyed tables: id 0..6, nick from a few values or NULL, coins counter.
    fn arb_rows() -> impl Strategy<Value = Vec<Row>> {
        let cell = prop_oneof![
            Just(null()),
            (0..3i64).prop_map(int),
            "[ab]".prop_map(|s| text(&s))
        ];
        proptest::collection::btree_map(0..6i64, (cell, 0..4i64, 0..3i64), 0..6).prop_map(|m| {
            m.into_iter()
                .map(|(id, (nick, coins, at))| {
                    vec![int(id), nick.clone(), nick, int(coins), int(at)]
                })
                .collect()
        })
    }

    fn arb_rules() -> impl Strategy<Value = Rules> {
        let policy = prop_oneof![
            Just(Policy::CentralWins),
            Just(Policy::PeerWins),
            Just(Policy::NewestWins)
        ];
        let dir = prop_oneof![
            Just(Direction::Both),
            Just(Direction::Pull),
            Just(Direction::Push)
        ];
        (policy, dir).prop_map(|(policy, direction)| Rules { policy, direction })
    }

    proptest! {
        /// The counter law: a counter cell ends at base + every side's delta, whatever the
        /// deltas (equal, cancelling, zero) and whatever else changed in the row.
        #[test]
        fn a_counter_ends_at_base_plus_every_delta(
            b in -5i64..5, dc in -3i64..4, dp in -3i64..4,
            nick_c in any::<bool>(), email_p in any::<bool>(),
            rules in arb_rules(),
        ) {
            let base = vec![user(1, "a", "a@x", b, "t0")];
            let central = vec![user(1, if nick_c { "c" } else { "a" }, "a@x", b + dc, "t0")];
            let peer = vec![user(1, "a", if email_p { "p@x" } else { "a@x" }, b + dp, "t0")];
            let m = merge_table(&users(), rules, Some(&base), &central, &peer);
            prop_assert!(m.conflicts.is_empty());
            let c2 = apply_in_memory(&users(), &central, &m.to_central);
            let p2 = apply_in_memory(&users(), &peer, &m.to_peer);
            let want = int(b + dc + dp);
            match rules.direction {
                Direction::Both => {
                    prop_assert_eq!(&c2[0][3], &want);
                    prop_assert_eq!(&p2[0][3], &want);
                }
                // One-directional pairs write one side; that side gets both deltas.
                Direction::Pull => prop_assert_eq!(&c2[0][3], &want),
                Direction::Push => prop_assert_eq!(&p2[0][3], &want),
            }
        }
    }

    proptest! {
        #[test]
        fn both_sides_agree_after_sync_and_second_sync_is_a_noop(
            base in arb_rows(), central in arb_rows(), peer in arb_rows(), rules in arb_rules(),
            first in any::<bool>(),
        ) {
            let spec = users();
            let base_opt = (!first).then_some(base.as_slice());
            let m = merge_table(&spec, rules, base_opt, &central, &peer);
            let c2 = apply_in_memory(&spec, &central, &m.to_central);
            let p2 = apply_in_memory(&spec, &peer, &m.to_peer);
            if rules.direction == Direction::Both {
                prop_assert_eq!(sorted(c2.clone()), sorted(p2.clone()));
                prop_assert_eq!(sorted(c2.clone()), sorted(m.new_base.clone()));
            }
            let again = merge_table(&spec, rules, Some(&m.new_base), &c2, &p2);
            prop_assert!(again.to_central.is_empty(), "{:?}", again.to_central);
            prop_assert!(again.to_peer.is_empty(), "{:?}", again.to_peer);
            prop_assert!(again.conflicts.is_empty());
        }

        #[test]
        fn no_written_cell_disappears_without_a_conflict_record(
            base in arb_rows(), central in arb_rows(), peer in arb_rows(), rules in arb_rules(),
        ) {
            let spec = users();
            let m = merge_table(&spec, rules, Some(&base), &central, &peer);
            let c2 = apply_in_memory(&spec, &central, &m.to_central);
            let p2 = apply_in_memory(&spec, &peer, &m.to_peer);
            let b = by_key(&spec, &base);
            let conflicted: BTreeSet<Key> = m.conflicts.iter().map(|c| c.key.clone()).collect();
            // Check the side(s) this pair writes to.
            let targets: Vec<&Vec<Row>> = match rules.direction {
                Direction::Both => vec![&c2],
                Direction::Pull => vec![&c2],
                Direction::Push => vec![&p2],
            };
            let writers: Vec<&Vec<Row>> = match rules.direction {
                Direction::Both => vec![&central, &peer],
                Direction::Pull => vec![&peer],
                Direction::Push => vec![&central],
            };
            for target in targets {
                let t = by_key(&spec, target);
                for side in &writers {
                    let s = by_key(&spec, side);
                    let keys: BTreeSet<&Key> = s.keys().chain(b.keys()).collect();
                    for key in keys {
                        // Only what this side wrote (differs from the base) must survive.
                        if conflicted.contains(key) || b.get(key) == s.get(key) { continue; }
                        match (b.get(key), s.get(key)) {
                            (_, Some(row)) => {
                                let got = t.get(key);
                                prop_assert!(got.is_some(), "row {:?} lost", key);
                                let got = got.unwrap();
                                for i in 0..row.len() {
                                    let changed = b.get(key).is_none_or(|br| br[i] != row[i]);
                                    if changed && !spec.counters.contains(&i) && spec.updated_at != Some(i) {
                                        prop_assert_eq!(&got[i], &row[i], "cell {} of {:?}", i, key);
                                    }
                                }
                            }
                            (Some(_), None) => prop_assert!(!t.contains_key(key), "delete of {:?} lost", key),
                            (None, None) => {}
                        }
                    }
                }
            }
        }

        #[test]
        fn multiset_sides_agree_and_counts_add_up(
            base in proptest::collection::vec(0..4i64, 0..8),
            central in proptest::collection::vec(0..4i64, 0..8),
            peer in proptest::collection::vec(0..4i64, 0..8),
        ) {
            let rows = |v: &[i64]| v.iter().map(|&i| vec![int(i)]).collect::<Vec<Row>>();
            let (b, c, p) = (rows(&base), rows(&central), rows(&peer));
            let spec = seen();
            let m = merge_table(&spec, BOTH, Some(&b), &c, &p);
            let c2 = apply_in_memory(&spec, &c, &m.to_central);
            let p2 = apply_in_memory(&spec, &p, &m.to_peer);
            prop_assert_eq!(sorted(c2.clone()), sorted(p2.clone()));
            let again = merge_table(&spec, BOTH, Some(&m.new_base), &c2, &p2);
            prop_assert!(again.to_central.is_empty() && again.to_peer.is_empty());
            // Re-applying the same target counts after a crash changes nothing more.
            prop_assert_eq!(sorted(apply_in_memory(&spec, &c2, &m.to_central)), sorted(c2));
        }
    }
}
