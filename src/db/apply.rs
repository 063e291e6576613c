//! Writing merge results into a database, inside the caller's transaction.
//!
//! Invariants:
//! - Every write is optimistic: an update or delete matches the whole row the snapshot saw
//!   (every column compared with `IS`, so NULLs match), an insert happens only if the key is
//!   still absent, and a multiset count is changed only if the row still occurs as often as
//!   the snapshot saw. A row changed meanwhile by the database's own writer is left alone
//!   and reported as skipped; the next run merges it.
//! - Multiset changes are "this row occurs N times", never "insert one more", so a change
//!   applied twice (after a crash) has no further effect.
//! - A set of changes valid as a whole applies in any order (values freed later, swaps of
//!   unique values). A row the database still refuses (a constraint of its own) is skipped
//!   with a warning naming the table; the transaction and the other rows go on.
//! - Merged writes are not the application's writes: they run on a connection opened by
//!   [`open_for_merge`], with triggers disabled and foreign keys not enforced, so a trigger
//!   fires once, where the application wrote (its effects arrive as ordinary rows), and
//!   nothing cascades.

use std::borrow::Borrow;
use std::collections::BTreeSet;

use anyhow::{Context as _, Result};
use rusqlite::{Connection, ErrorCode, params_from_iter};

use crate::db::merge::{Change, TableSpec};
use crate::db::snapshot::quote;
use crate::db::value::{Cell, Key, Row};

/// Opens an existing database (never creating it) for merged writes: triggers disabled
/// on this connection (`SQLITE_DBCONFIG_ENABLE_TRIGGER`), foreign keys not enforced.
pub fn open_for_merge(path: &std::path::Path, busy: std::time::Duration) -> Result<Connection> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
        .with_context(|| format!("cannot open database {}", path.display()))?;
    conn.busy_timeout(busy)?;
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER,
        false,
    )?;
    conn.pragma_update(None, "foreign_keys", false)?;
    Ok(conn)
}

/// What an apply left undone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// Keys (keyed tables) or rows (multisets) not written: changed meanwhile, or refused.
    pub skipped: BTreeSet<Key>,
    /// Those of `skipped` the database refused (a constraint), as opposed to changed.
    pub refused: BTreeSet<Key>,
}

/// How one write went.
enum Wrote {
    Done,
    /// The row no longer holds what the snapshot saw: left for the next run.
    Changed,
    /// The database refused it (a constraint); `unique` when another row holds a value
    /// of a UNIQUE constraint, which a later write of the same change set may free.
    Refused {
        unique: bool,
        why: String,
    },
}

/// Applies `changes` to `db.<spec.name>` (`db` is `main` or an ATTACH name).
///
/// A set of changes that is valid as a whole is applied whatever its order: a write
/// refused by a UNIQUE constraint is retried after the others (a value freed by a later
/// update or delete), and writes that still refuse each other (a swap of two unique
/// values) are applied together: their rows are deleted, then their new images inserted,
/// inside a savepoint that is rolled back if that does not succeed either.
pub fn apply<C: Borrow<Change>>(
    conn: &Connection,
    db: &str,
    spec: &TableSpec,
    changes: impl IntoIterator<Item = C>,
) -> Result<Applied> {
    let sql = Statements::new(db, spec);
    let mut out = Applied::default();
    let mut waiting: Vec<C> = Vec::new();
    for item in changes {
        let change = item.borrow();
        match write(conn, &sql, spec, change)? {
            Wrote::Done => {}
            Wrote::Changed => {
                out.skipped.insert(target(change).clone());
            }
            Wrote::Refused { unique: true, .. } => waiting.push(item),
            Wrote::Refused { why, .. } => refuse(&mut out, spec, change, &why),
        }
    }
    // Values freed by later writes: retry until nothing moves.
    let mut last_why = String::new();
    loop {
        let before = waiting.len();
        let mut still = Vec::new();
        for item in waiting {
            match write(conn, &sql, spec, item.borrow())? {
                Wrote::Done => {}
                Wrote::Changed => {
                    out.skipped.insert(target(item.borrow()).clone());
                }
                Wrote::Refused { why, .. } => {
                    last_why = why;
                    still.push(item);
                }
            }
        }
        waiting = still;
        if waiting.is_empty() || waiting.len() == before {
            break;
        }
    }
    let waiting: Vec<&Change> = waiting.iter().map(Borrow::borrow).collect();
    if !waiting.is_empty() && !swap(conn, &sql, spec, &waiting)? {
        for change in waiting {
            refuse(&mut out, spec, change, &last_why);
        }
    }
    Ok(out)
}

fn target(change: &Change) -> &Row {
    crate::db::merge::target_of(change)
}

fn refuse(out: &mut Applied, spec: &TableSpec, change: &Change, why: &str) {
    log::warn!(
        "table {}: row {} refused by the database ({why}); left for the next run",
        spec.name,
        serde_json::to_string(target(change)).unwrap_or_default(),
    );
    out.skipped.insert(target(change).clone());
    out.refused.insert(target(change).clone());
}

/// Writes that refuse each other (a cycle of unique values) as one step: every old image
/// deleted, then every new image inserted, in a savepoint. Returns whether it worked.
fn swap(
    conn: &Connection,
    sql: &Statements,
    spec: &TableSpec,
    changes: &[&Change],
) -> Result<bool> {
    conn.execute_batch("SAVEPOINT cr0sync_swap")?;
    let done = (|| -> Result<bool> {
        for change in changes {
            let old = match change {
                Change::Upsert { old: Some(old), .. } | Change::Delete { old, .. } => old,
                _ => continue,
            };
            if conn
                .prepare_cached(&sql.delete)?
                .execute(params_from_iter(old.values()))?
                == 0
            {
                return Ok(false);
            }
        }
        for change in changes {
            let new = match change {
                Change::Upsert { new, .. } => new,
                _ => continue,
            };
            match conn
                .prepare_cached(&sql.insert)?
                .execute(params_from_iter(new.values()))
            {
                Ok(_) => {}
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == ErrorCode::ConstraintViolation =>
                {
                    return Ok(false);
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot write table {}", spec.name));
                }
            }
        }
        Ok(true)
    })();
    match done {
        Ok(true) => {
            conn.execute_batch("RELEASE cr0sync_swap")?;
            Ok(true)
        }
        other => {
            conn.execute_batch("ROLLBACK TO cr0sync_swap; RELEASE cr0sync_swap")?;
            other.map(|_| false)
        }
    }
}

fn values(row: &[Cell]) -> Vec<&Cell> {
    row.iter().collect()
}

/// The statements of one table's writes.
struct Statements {
    update: String,
    insert: String,
    delete: String,
    exists: String,
    count: String,
    delete_some: String,
}

impl Statements {
    fn new(db: &str, spec: &TableSpec) -> Statements {
        let t = format!("{db}.{}", quote(&spec.name));
        let cols: Vec<String> = spec.columns.iter().map(|c| quote(c)).collect();
        let n = cols.len();
        let match_all = |from: usize| -> String {
            cols.iter()
                .enumerate()
                .map(|(i, c)| format!("{c} IS ?{}", from + i))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let match_key = spec
            .pk
            .iter()
            .enumerate()
            .map(|(i, &c)| format!("{} IS ?{}", cols[c], i + 1))
            .collect::<Vec<_>>()
            .join(" AND ");
        let marks: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
        let sets: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c} = ?{}", i + 1))
            .collect();
        Statements {
            update: format!(
                "UPDATE {t} SET {} WHERE {}",
                sets.join(", "),
                match_all(n + 1)
            ),
            insert: format!(
                "INSERT INTO {t} ({}) VALUES ({})",
                cols.join(", "),
                marks.join(", ")
            ),
            delete: format!("DELETE FROM {t} WHERE {}", match_all(1)),
            exists: format!("SELECT count(*) FROM {t} WHERE {match_key}"),
            count: format!("SELECT count(*) FROM {t} WHERE {}", match_all(1)),
            delete_some: format!(
                "DELETE FROM {t} WHERE rowid IN (SELECT rowid FROM {t} WHERE {} LIMIT ?{})",
                match_all(1),
                n + 1
            ),
        }
    }
}

/// One optimistic write.
fn write(conn: &Connection, sql: &Statements, spec: &TableSpec, change: &Change) -> Result<Wrote> {
    let outcome = |r: rusqlite::Result<usize>| -> Result<Wrote> {
        match r {
            Ok(0) => Ok(Wrote::Changed),
            Ok(_) => Ok(Wrote::Done),
            Err(rusqlite::Error::SqliteFailure(e, msg))
                if e.code == ErrorCode::ConstraintViolation =>
            {
                Ok(Wrote::Refused {
                    // SQLITE_CONSTRAINT_UNIQUE, SQLITE_CONSTRAINT_PRIMARYKEY
                    unique: e.extended_code == 2067 || e.extended_code == 1555,
                    why: msg.unwrap_or_else(|| e.to_string()),
                })
            }
            Err(e) => Err(e).with_context(|| format!("cannot write table {}", spec.name)),
        }
    };
    match change {
        Change::Upsert {
            old: Some(old),
            new,
            ..
        } => {
            let params = new.values().chain(old.values());
            outcome(
                conn.prepare_cached(&sql.update)?
                    .execute(params_from_iter(params)),
            )
        }
        Change::Upsert {
            key,
            old: None,
            new,
        } => {
            let present: i64 = conn
                .prepare_cached(&sql.exists)?
                .query_row(params_from_iter(values(key)), |r| r.get(0))?;
            if present > 0 {
                return Ok(Wrote::Changed);
            }
            outcome(
                conn.prepare_cached(&sql.insert)?
                    .execute(params_from_iter(new.values())),
            )
        }
        Change::Delete { old, .. } => outcome(
            conn.prepare_cached(&sql.delete)?
                .execute(params_from_iter(old.values())),
        ),
        Change::SetCount { row, old, new } => {
            let now: i64 = conn
                .prepare_cached(&sql.count)?
                .query_row(params_from_iter(values(row)), |r| r.get(0))?;
            if u64::try_from(now).ok() != Some(*old) {
                return Ok(Wrote::Changed);
            }
            if new > old {
                for _ in *old..*new {
                    match outcome(
                        conn.prepare_cached(&sql.insert)?
                            .execute(params_from_iter(values(row))),
                    )? {
                        Wrote::Done => {}
                        other => return Ok(other),
                    }
                }
            } else {
                let surplus = Cell::Sql(rusqlite::types::Value::Integer((old - new) as i64));
                let mut params = values(row);
                params.push(&surplus);
                conn.prepare_cached(&sql.delete_some)?
                    .execute(params_from_iter(params))
                    .with_context(|| format!("cannot delete rows from table {}", spec.name))?;
            }
            Ok(Wrote::Done)
        }
    }
}

/// Writes keyed changes without the optimistic check: for the merge base, which only
/// cr0sync writes, inside the central transaction.
pub fn overwrite(conn: &Connection, db: &str, spec: &TableSpec, changes: &[Change]) -> Result<()> {
    let t = format!("{db}.{}", quote(&spec.name));
    let cols: Vec<String> = spec.columns.iter().map(|c| quote(c)).collect();
    let marks: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
    let match_key: Vec<String> = spec
        .pk
        .iter()
        .enumerate()
        .map(|(i, &c)| format!("{} IS ?{}", cols[c], i + 1))
        .collect();
    let upsert = format!(
        "INSERT OR REPLACE INTO {t} ({}) VALUES ({})",
        cols.join(", "),
        marks.join(", ")
    );
    let delete = format!("DELETE FROM {t} WHERE {}", match_key.join(" AND "));
    let mut upsert = conn.prepare(&upsert)?;
    let mut delete = conn.prepare(&delete)?;
    for change in changes {
        match change {
            Change::Upsert { new, .. } => {
                upsert.execute(params_from_iter(new.values()))?;
            }
            Change::Delete { key, .. } => {
                delete.execute(params_from_iter(key.iter()))?;
            }
            Change::SetCount { .. } => anyhow::bail!("overwrite is for keyed tables"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::snapshot::{rows, schemas};
    use rusqlite::types::Value;

    fn setup() -> (Connection, TableSpec, TableSpec) {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE u (id INTEGER PRIMARY KEY, nick TEXT, note TEXT);
             INSERT INTO u VALUES (1, 'a', NULL), (2, 'b', 'x');
             CREATE TABLE seen (nick TEXT);
             INSERT INTO seen VALUES ('a'), ('a'), ('b');",
        )
        .unwrap();
        let s = schemas(&conn, "main").unwrap();
        let seen = s[0].spec(&[], "updated_at");
        let u = s[1].spec(&[], "updated_at");
        (conn, u, seen)
    }

    fn cells(v: &[Value]) -> Row {
        v.iter().cloned().map(Cell::Sql).collect()
    }

    #[test]
    fn writes_only_rows_that_still_hold_the_snapshot_value() {
        let (conn, u, _) = setup();
        let t = |s: &str| Value::Text(s.into());
        let changes = vec![
            // Row 1 still holds (1, 'a', NULL): updated.
            Change::Upsert {
                key: cells(&[Value::Integer(1)]),
                old: Some(cells(&[Value::Integer(1), t("a"), Value::Null]).into()),
                new: cells(&[Value::Integer(1), t("a"), t("new")]).into(),
            },
            // Row 2 changed meanwhile (the snapshot saw 'old'): skipped.
            Change::Delete {
                key: cells(&[Value::Integer(2)]),
                old: cells(&[Value::Integer(2), t("b"), t("old")]).into(),
            },
            // Key 1 exists already: an insert of it is skipped, not an error.
            Change::Upsert {
                key: cells(&[Value::Integer(1)]),
                old: None,
                new: cells(&[Value::Integer(1), t("z"), Value::Null]).into(),
            },
            Change::Upsert {
                key: cells(&[Value::Integer(3)]),
                old: None,
                new: cells(&[Value::Integer(3), t("c"), Value::Null]).into(),
            },
        ];
        let applied = apply(&conn, "main", &u, &changes).unwrap();
        assert_eq!(applied.skipped.len(), 2);
        let schema = &schemas(&conn, "main").unwrap()[1];
        let now = rows(&conn, "main", schema).unwrap();
        assert_eq!(now.len(), 3);
        assert_eq!(now[0][2], Cell::Sql(t("new")));
        assert_eq!(now[1][2], Cell::Sql(t("x")));
    }

    #[test]
    fn a_swap_of_unique_values_applies_and_a_real_violation_is_refused() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE u (id INTEGER PRIMARY KEY, nick TEXT UNIQUE);
             INSERT INTO u VALUES (1, 'alice'), (2, 'bob'), (3, 'carol');",
        )
        .unwrap();
        let spec = schemas(&conn, "main").unwrap()[0].spec(&[], "");
        let row = |id: i64, nick: &str| cells(&[Value::Integer(id), Value::Text(nick.into())]);
        let key = |id: i64| cells(&[Value::Integer(id)]);
        let upd = |id: i64, from: &str, to: &str| Change::Upsert {
            key: key(id),
            old: Some(row(id, from).into()),
            new: row(id, to).into(),
        };
        // alice <-> bob, and carol takes a name freed only by a later write.
        let changes = vec![
            upd(1, "alice", "bob"),
            upd(3, "carol", "dave"),
            upd(2, "bob", "alice"),
        ];
        let applied = apply(&conn, "main", &spec, &changes).unwrap();
        assert!(applied.skipped.is_empty(), "{applied:?}");
        let names: Vec<String> = conn
            .prepare("SELECT nick FROM u ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(names, ["bob", "alice", "dave"]);
        // A new row taking a name another row keeps is refused, and nothing else moves.
        let insert = Change::Upsert {
            key: key(4),
            old: None,
            new: row(4, "bob").into(),
        };
        let applied = apply(&conn, "main", &spec, &[insert]).unwrap();
        assert_eq!(applied.refused.len(), 1);
    }

    #[test]
    fn multiset_counts_are_set_not_added_so_a_replay_is_harmless() {
        let (conn, _, seen) = setup();
        let a = cells(&[Value::Text("a".into())]);
        let changes = vec![Change::SetCount {
            row: a.clone(),
            old: 2,
            new: 4,
        }];
        assert!(
            apply(&conn, "main", &seen, &changes)
                .unwrap()
                .skipped
                .is_empty()
        );
        // The same change again: the row no longer occurs twice, so nothing happens.
        let again = apply(&conn, "main", &seen, &changes).unwrap();
        assert_eq!(again.skipped.len(), 1);
        let down = vec![Change::SetCount {
            row: a,
            old: 4,
            new: 1,
        }];
        apply(&conn, "main", &seen, &down).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM seen WHERE nick = 'a'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 1);
    }
}
