//! INTEGER PRIMARY KEY collisions: two different rows inserted on the two sides under
//! the same rowid key (the bot registers dave, the website erin, both as id 1000). With
//! `rekey` on, both survive: the peer's row (the one not yet in the central copy) moves
//! to a fresh key, and every reference to it moves with it.
//!
//! Invariants:
//! - Only tables whose key is their rowid (`INTEGER PRIMARY KEY`, with or without
//!   AUTOINCREMENT) are rekeyed; any other key is an application's own identity, and an
//!   insert/insert on it stays a conflict resolved by the policy.
//! - A fresh key is above every key the central copy, the peer or the base holds and
//!   above both sides' `sqlite_sequence`, so it was never handed out by anyone.
//! - The move is made on the peer's snapshot first (a scratch copy), with every
//!   referencing column (declared single-column FOREIGN KEYs, and `rekey_refs`) rewritten
//!   in the same step; the merge then runs again on the moved snapshot, so the rules for
//!   UNIQUE values, foreign keys and counters see the rows as they will be. The edits
//!   are returned as changes against the live peer, written first in the sync's one peer
//!   transaction, all of them or none (a row the peer's writer changed meanwhile fails the
//!   run before anything is committed): the move, its references and the merge land
//!   together.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use rusqlite::Connection;

use crate::db::merge::{self, Change, TableSpec};
use crate::db::snapshot::{self, Schema, quote};
use crate::db::value::{Cell, Key, Row};

/// Whether a table's primary key is its rowid (`INTEGER PRIMARY KEY`, not WITHOUT ROWID).
pub fn rowid_key(conn: &Connection, db: &str, schema: &Schema) -> Result<bool> {
    let [pk] = schema.pk[..] else {
        return Ok(false);
    };
    if !schema.columns[pk].1.eq_ignore_ascii_case("INTEGER") {
        return Ok(false);
    }
    let without_rowid: bool = conn.query_row(
        "SELECT wr FROM pragma_table_list WHERE schema = ?1 AND name = ?2",
        [db, &schema.name],
        |r| r.get(0),
    )?;
    Ok(!without_rowid)
}

/// One row moved to a fresh key on the peer.
#[derive(Debug, Clone, PartialEq)]
pub struct Moved {
    pub table: String,
    pub from: Key,
    pub to: Key,
    /// The peer's row as it was under `from`.
    pub row: Row,
    /// Rows rewritten because they referenced it, as `table.column` -> count.
    pub references: BTreeMap<String, usize>,
}

/// Moves rows of the snapshot attached as `p` to fresh keys, remembering what it touched
/// so the edits can be replayed on the live peer.
#[derive(Debug, Default)]
pub struct Mover {
    touched: Touched,
    next: BTreeMap<String, i64>,
}

impl Mover {
    /// Moves the peer's row of every collision `(table, key)` to a fresh key, rewriting
    /// the columns that reference it. `specs` are the synced tables; `refs` the configured
    /// `rekey_refs` (parent table -> `child.column`).
    pub fn move_rows(
        &mut self,
        conn: &Connection,
        specs: &BTreeMap<String, TableSpec>,
        collisions: &[(String, Key)],
        refs: &BTreeMap<String, Vec<String>>,
    ) -> Result<Vec<Moved>> {
        let mut out = Vec::new();
        for (table, key) in collisions {
            let spec = &specs[table];
            let Some(from) = key.first().and_then(Cell::as_integer) else {
                continue;
            };
            let Some(row) = snapshot::lookup(conn, &snapshot::lookup_sql(spec, "p"), key)? else {
                continue;
            };
            let fresh = match self.next.get(table) {
                Some(n) => *n,
                None => fresh_key(conn, spec)?,
            };
            self.next.insert(table.clone(), fresh + 1);
            let to = vec![Cell::Sql(rusqlite::types::Value::Integer(fresh))];
            self.touched.keyed(conn, spec, key)?;
            self.touched.keyed(conn, spec, &to)?;
            let pk = quote(&spec.columns[spec.pk[0]]);
            conn.execute(
                &format!(
                    "UPDATE p.{} SET {pk} = ?1 WHERE {pk} = ?2",
                    quote(&spec.name)
                ),
                [fresh, from],
            )?;
            let mut moved = Moved {
                table: table.clone(),
                from: key.clone(),
                to,
                row,
                references: BTreeMap::new(),
            };
            for (child, column) in references(conn, specs, table, refs)? {
                let n = rewrite(
                    conn,
                    &mut self.touched,
                    &specs[&child],
                    &column,
                    from,
                    fresh,
                )
                .with_context(|| format!("cannot rewrite {child}.{column}"))?;
                if n > 0 {
                    moved.references.insert(format!("{child}.{column}"), n);
                }
            }
            out.push(moved);
        }
        Ok(out)
    }

    /// The tables the moves touched so far.
    pub fn tables(&self) -> BTreeSet<&str> {
        self.touched
            .keyed
            .keys()
            .chain(self.touched.counted.keys())
            .map(String::as_str)
            .collect()
    }

    /// Per table, the changes that take the live peer where the snapshot now is.
    pub fn edits(
        &self,
        conn: &Connection,
        specs: &BTreeMap<String, TableSpec>,
    ) -> Result<BTreeMap<String, Vec<Change>>> {
        self.touched.edits(conn, specs)
    }
}

/// A key no side has used: above the largest key of the central copy, the peer and the
/// base, and above either side's `sqlite_sequence`.
fn fresh_key(conn: &Connection, spec: &TableSpec) -> Result<i64> {
    let mut top = 0i64;
    for db in ["main", "p", "b"] {
        let max: Option<i64> = conn.query_row(
            &format!("SELECT max(rowid) FROM {db}.{}", quote(&spec.name)),
            [],
            |r| r.get(0),
        )?;
        top = top.max(max.unwrap_or(0));
        let has_sequence: bool = conn.query_row(
            &format!("SELECT count(*) > 0 FROM {db}.sqlite_schema WHERE name = 'sqlite_sequence'"),
            [],
            |r| r.get(0),
        )?;
        if has_sequence {
            let seq: Option<i64> = conn.query_row(
                &format!("SELECT max(seq) FROM {db}.sqlite_sequence WHERE name = ?1"),
                [&spec.name],
                |r| r.get(0),
            )?;
            top = top.max(seq.unwrap_or(0));
        }
    }
    top.checked_add(1)
        .with_context(|| format!("table {}: no fresh key above {top}", spec.name))
}

/// `(child table, column)` of every synced column referring to `parent`'s key: declared
/// single-column FOREIGN KEYs of the peer's schema, and `rekey_refs`.
fn references(
    conn: &Connection,
    specs: &BTreeMap<String, TableSpec>,
    parent: &str,
    refs: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<(String, String)>> {
    let parent_key = &specs[parent].columns[specs[parent].pk[0]];
    let mut out = Vec::new();
    for child in specs.keys() {
        let mut stmt = conn.prepare_cached(
            "SELECT \"from\", \"to\", count(*) OVER (PARTITION BY id) FROM \
             pragma_foreign_key_list(?1, 'p') WHERE \"table\" = ?2 COLLATE NOCASE",
        )?;
        let rows = stmt.query_map([child, parent], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (from, to, parts) = row?;
            let to_key = to.is_none_or(|t| t.eq_ignore_ascii_case(parent_key));
            if parts == 1 && to_key {
                out.push((child.clone(), from));
            }
        }
    }
    for r in refs.get(parent).into_iter().flatten() {
        let Some((child, column)) = r.split_once('.') else {
            continue;
        };
        let known = specs
            .get(child)
            .is_some_and(|s| s.columns.iter().any(|c| c == column));
        if !known {
            log::warn!(
                "rekey_refs: {r} names no synced column; references there to a moved {parent} \
                 row are not rewritten. Try: fix rekey_refs"
            );
            continue;
        }
        let pair = (child.to_string(), column.to_string());
        if !out.contains(&pair) {
            out.push(pair);
        }
    }
    Ok(out)
}

/// Points every row of `p.<spec>` whose `column` is `from` at `to`. Returns how many.
fn rewrite(
    conn: &Connection,
    touched: &mut Touched,
    spec: &TableSpec,
    column: &str,
    from: i64,
    to: i64,
) -> Result<usize> {
    let cols: Vec<String> = spec.columns.iter().map(|c| quote(c)).collect();
    let at = spec
        .columns
        .iter()
        .position(|c| c == column)
        .with_context(|| format!("no column {column}"))?;
    let mut stmt = conn.prepare(&format!(
        "SELECT {} FROM p.{} WHERE {} = ?1",
        cols.join(", "),
        quote(&spec.name),
        cols[at]
    ))?;
    let rows: Vec<Row> = stmt
        .query_map([from], |r| {
            (0..cols.len())
                .map(|i| r.get::<_, Cell>(i))
                .collect::<Result<Row, _>>()
        })?
        .collect::<Result<_, _>>()?;
    for row in &rows {
        let mut moved = row.clone();
        moved[at] = Cell::Sql(rusqlite::types::Value::Integer(to));
        if spec.keyed() {
            touched.keyed(conn, spec, &spec.key_of(row))?;
            touched.keyed(conn, spec, &spec.key_of(&moved))?;
        } else {
            touched.counted(conn, spec, row)?;
            touched.counted(conn, spec, &moved)?;
        }
    }
    conn.execute(
        &format!(
            "UPDATE p.{} SET {} = ?1 WHERE {} = ?2",
            quote(&spec.name),
            cols[at],
            cols[at]
        ),
        [to, from],
    )?;
    Ok(rows.len())
}

/// The rows of the snapshot the moves touch, as they were before the first of them.
#[derive(Debug, Default)]
struct Touched {
    keyed: BTreeMap<String, BTreeMap<Key, Option<Row>>>,
    counted: BTreeMap<String, BTreeMap<Row, u64>>,
}

impl Touched {
    fn keyed(&mut self, conn: &Connection, spec: &TableSpec, key: &Key) -> Result<()> {
        let rows = self.keyed.entry(spec.name.clone()).or_default();
        if !rows.contains_key(key) {
            let row = snapshot::lookup(conn, &snapshot::lookup_sql(spec, "p"), key)?;
            rows.insert(key.clone(), row);
        }
        Ok(())
    }

    fn counted(&mut self, conn: &Connection, spec: &TableSpec, row: &Row) -> Result<()> {
        let rows = self.counted.entry(spec.name.clone()).or_default();
        if !rows.contains_key(row) {
            rows.insert(
                row.clone(),
                crate::db::journal::count(conn, "p", spec, row)?,
            );
        }
        Ok(())
    }

    /// Per table, the changes from the rows as they were to the rows as they are now.
    fn edits(
        &self,
        conn: &Connection,
        specs: &BTreeMap<String, TableSpec>,
    ) -> Result<BTreeMap<String, Vec<Change>>> {
        let mut out: BTreeMap<String, Vec<Change>> = BTreeMap::new();
        for (table, rows) in &self.keyed {
            let spec = &specs[table];
            let sql = snapshot::lookup_sql(spec, "p");
            for (key, was) in rows {
                let now = snapshot::lookup(conn, &sql, key)?;
                if let Some(ch) = merge::change(key, was.as_ref(), now.as_ref()) {
                    out.entry(table.clone()).or_default().push(ch);
                }
            }
        }
        for (table, rows) in &self.counted {
            let spec = &specs[table];
            for (row, &was) in rows {
                let now = crate::db::journal::count(conn, "p", spec, row)?;
                if now != was {
                    out.entry(table.clone())
                        .or_default()
                        .push(Change::SetCount {
                            row: row.clone(),
                            old: was,
                            new: now,
                        });
                }
            }
        }
        Ok(out)
    }
}
