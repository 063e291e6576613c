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
//! - A row the database refuses (a constraint of its own) is skipped with a warning naming
//!   the table; the transaction and the other rows go on.
//! - Merged writes are not the application's writes: they run on a connection opened by
//!   [`open_for_merge`], with triggers disabled and foreign keys not enforced, so a trigger
//!   fires once, where the application wrote (its effects arrive as ordinary rows), and
//!   nothing cascades.

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
    /// Keys (keyed tables) or rows (multisets) not written because they changed meanwhile.
    pub skipped: BTreeSet<Key>,
}

/// Applies `changes` to `db.<spec.name>` (`db` is `main` or an ATTACH name).
pub fn apply(conn: &Connection, db: &str, spec: &TableSpec, changes: &[Change]) -> Result<Applied> {
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
    let update = format!(
        "UPDATE {t} SET {} WHERE {}",
        sets.join(", "),
        match_all(n + 1)
    );
    let insert = format!(
        "INSERT INTO {t} ({}) VALUES ({})",
        cols.join(", "),
        marks.join(", ")
    );
    let delete = format!("DELETE FROM {t} WHERE {}", match_all(1));
    let exists = format!("SELECT count(*) FROM {t} WHERE {match_key}");
    let count = format!("SELECT count(*) FROM {t} WHERE {}", match_all(1));
    let delete_some = format!(
        "DELETE FROM {t} WHERE rowid IN (SELECT rowid FROM {t} WHERE {} LIMIT ?{})",
        match_all(1),
        n + 1
    );

    fn values(row: &[Cell]) -> Vec<&rusqlite::types::Value> {
        row.iter().map(|c| &c.0).collect()
    }
    let mut out = Applied::default();
    for change in changes {
        match change {
            Change::Upsert {
                key,
                old: Some(old),
                new,
            } => {
                let mut params = values(new);
                params.extend(values(old));
                let done = conn
                    .prepare_cached(&update)?
                    .execute(params_from_iter(params));
                if !wrote(done, &spec.name, key)? {
                    out.skipped.insert(key.clone());
                }
            }
            Change::Upsert {
                key,
                old: None,
                new,
            } => {
                let present: i64 = conn
                    .prepare_cached(&exists)?
                    .query_row(params_from_iter(values(key)), |r| r.get(0))?;
                if present > 0 {
                    out.skipped.insert(key.clone());
                    continue;
                }
                let done = conn
                    .prepare_cached(&insert)?
                    .execute(params_from_iter(values(new)));
                if !wrote(done, &spec.name, key)? {
                    out.skipped.insert(key.clone());
                }
            }
            Change::Delete { key, old } => {
                let done = conn
                    .prepare_cached(&delete)?
                    .execute(params_from_iter(values(old)));
                if !wrote(done, &spec.name, key)? {
                    out.skipped.insert(key.clone());
                }
            }
            Change::SetCount { row, old, new } => {
                let now: i64 = conn
                    .prepare_cached(&count)?
                    .query_row(params_from_iter(values(row)), |r| r.get(0))?;
                if now as u64 != *old {
                    out.skipped.insert(row.clone());
                    continue;
                }
                if new > old {
                    for _ in *old..*new {
                        let done = conn
                            .prepare_cached(&insert)?
                            .execute(params_from_iter(values(row)));
                        if !wrote(done, &spec.name, row)? {
                            out.skipped.insert(row.clone());
                            break;
                        }
                    }
                } else {
                    let surplus = rusqlite::types::Value::Integer((old - new) as i64);
                    let mut params = values(row);
                    params.push(&surplus);
                    conn.prepare_cached(&delete_some)?
                        .execute(params_from_iter(params))
                        .with_context(|| format!("cannot delete rows from table {}", spec.name))?;
                }
            }
        }
    }
    Ok(out)
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
                upsert.execute(params_from_iter(new.iter().map(|c| &c.0)))?;
            }
            Change::Delete { key, .. } => {
                delete.execute(params_from_iter(key.iter().map(|c| &c.0)))?;
            }
            Change::SetCount { .. } => anyhow::bail!("overwrite is for keyed tables"),
        }
    }
    Ok(())
}

/// Whether a write changed a row. A constraint the database enforces is a skip with a
/// warning; any other error ends the apply (and the caller's transaction).
fn wrote(result: rusqlite::Result<usize>, table: &str, key: &Row) -> Result<bool> {
    match result {
        Ok(n) => Ok(n > 0),
        Err(rusqlite::Error::SqliteFailure(e, msg)) if e.code == ErrorCode::ConstraintViolation => {
            log::warn!(
                "table {table}: row {} refused by the database ({}); left as it is",
                serde_json::to_string(key).unwrap_or_default(),
                msg.unwrap_or_else(|| e.to_string())
            );
            Ok(false)
        }
        Err(e) => Err(e).with_context(|| format!("cannot write table {table}")),
    }
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
        v.iter().cloned().map(Cell).collect()
    }

    #[test]
    fn writes_only_rows_that_still_hold_the_snapshot_value() {
        let (conn, u, _) = setup();
        let t = |s: &str| Value::Text(s.into());
        let changes = vec![
            // Row 1 still holds (1, 'a', NULL): updated.
            Change::Upsert {
                key: cells(&[Value::Integer(1)]),
                old: Some(cells(&[Value::Integer(1), t("a"), Value::Null])),
                new: cells(&[Value::Integer(1), t("a"), t("new")]),
            },
            // Row 2 changed meanwhile (the snapshot saw 'old'): skipped.
            Change::Delete {
                key: cells(&[Value::Integer(2)]),
                old: cells(&[Value::Integer(2), t("b"), t("old")]),
            },
            // Key 1 exists already: an insert of it is skipped, not an error.
            Change::Upsert {
                key: cells(&[Value::Integer(1)]),
                old: None,
                new: cells(&[Value::Integer(1), t("z"), Value::Null]),
            },
            Change::Upsert {
                key: cells(&[Value::Integer(3)]),
                old: None,
                new: cells(&[Value::Integer(3), t("c"), Value::Null]),
            },
        ];
        let applied = apply(&conn, "main", &u, &changes).unwrap();
        assert_eq!(applied.skipped.len(), 2);
        let schema = &schemas(&conn, "main").unwrap()[1];
        let now = rows(&conn, "main", schema).unwrap();
        assert_eq!(now.len(), 3);
        assert_eq!(now[0][2], Cell(t("new")));
        assert_eq!(now[1][2], Cell(t("x")));
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
