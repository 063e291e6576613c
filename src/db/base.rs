//! The merge base of a (database, peer) pair (SPEC 3.1): the rows both sides agreed on at
//! the end of the last successful sync, kept as an SQLite file at
//! `state/db/<database>/<peer>.base.db`, attached to the sync's connection as `b`.
//!
//! Invariants:
//! - Each base table has the columns, declared types and primary key of the table it
//!   mirrors, so a schema change is detected by comparing schemas.
//! - The base changes only in SQLite transactions, and its merged rows change only in the
//!   same transaction that commits the central copy (SQLite commits attached rollback-journal
//!   databases atomically), so the base never runs ahead of the central copy.
//! - Before a sync writes the peer, it records in the base's journal table
//!   (`_cr0sync_pending`) the keys it is about to change and the conflicts it resolved. The
//!   central commit clears it. A journal found at the start of a run means the last run
//!   died between the two commits: its keys are merged again, and its conflicts are
//!   recorded if their resolution already reached a side (see `sync`).

use anyhow::Result;
use rusqlite::Connection;

use crate::db::snapshot::{Schema, quote};

/// The journal table inside a base file.
pub const PENDING: &str = "_cr0sync_pending";

/// The state-store name of a pair's base.
pub fn name(database: &str, peer: &str) -> String {
    format!("db/{database}/{peer}.base.db")
}

/// One journal entry: a key about to change, or a resolved conflict (as its JSON record).
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub table: String,
    /// The key (keyed tables) as JSON; `None` for a conflict entry.
    pub key: Option<String>,
    pub conflict: Option<String>,
}

/// Reads the journal of the base attached as `b`; empty if there is none.
pub fn pending(conn: &Connection) -> Result<Vec<Pending>> {
    let exists: bool = conn.query_row(
        "SELECT count(*) > 0 FROM b.sqlite_schema WHERE name = ?1",
        [PENDING],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(&format!("SELECT tbl, key, conflict FROM b.{PENDING}"))?;
    let rows = stmt.query_map([], |r| {
        Ok(Pending {
            table: r.get(0)?,
            key: r.get(1)?,
            conflict: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Writes the journal in its own transaction on the base (durable before the peer is written).
pub fn write_pending(conn: &Connection, entries: &[Pending]) -> Result<()> {
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS b.{PENDING} (tbl TEXT NOT NULL, key TEXT, conflict TEXT);
         DELETE FROM b.{PENDING};"
    ))?;
    {
        let mut stmt = tx.prepare(&format!(
            "INSERT INTO b.{PENDING} (tbl, key, conflict) VALUES (?1, ?2, ?3)"
        ))?;
        for e in entries {
            stmt.execute(rusqlite::params![e.table, e.key, e.conflict])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Clears the journal; part of the caller's (central + base) transaction.
pub fn clear_pending(conn: &Connection) -> Result<()> {
    conn.execute_batch(&format!("DROP TABLE IF EXISTS b.{PENDING}"))?;
    Ok(())
}

/// Replaces base table `schema.name` with a copy of `from.<table>` (`main` or `p`).
pub fn copy_table(conn: &Connection, schema: &Schema, from: &str) -> Result<()> {
    let t = quote(&schema.name);
    conn.execute_batch(&format!(
        "DROP TABLE IF EXISTS b.{t}; {} INSERT INTO b.{t} SELECT * FROM {from}.{t};",
        create_table_sql(schema, "b")
    ))?;
    Ok(())
}

/// `CREATE TABLE` in attached database `db` with the same columns, declared types and
/// primary key as `schema`.
pub fn create_table_sql(schema: &Schema, db: &str) -> String {
    let mut parts: Vec<String> = schema
        .columns
        .iter()
        .map(|(name, ty)| format!("{} {}", quote(name), ty))
        .collect();
    if !schema.pk.is_empty() {
        let pk: Vec<String> = schema
            .pk
            .iter()
            .map(|&i| quote(&schema.columns[i].0))
            .collect();
        parts.push(format!("PRIMARY KEY ({})", pk.join(", ")));
    }
    format!(
        "CREATE TABLE {db}.{} ({});",
        quote(&schema.name),
        parts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::snapshot::schemas;

    #[test]
    fn copied_table_keeps_schema_and_rows_and_journal_roundtrips() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("c.db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE scores (net TEXT, nick TEXT, score INTEGER, PRIMARY KEY (nick, net));
             INSERT INTO scores VALUES ('rizon', 'a', 1), ('efnet', 'a', x'00');",
        )
        .unwrap();
        let base = dir.path().join("b.db");
        conn.execute("ATTACH ?1 AS b", [base.to_str().unwrap()])
            .unwrap();
        let schema = schemas(&conn, "main").unwrap().remove(0);
        copy_table(&conn, &schema, "main").unwrap();
        copy_table(&conn, &schema, "main").unwrap();
        assert_eq!(schemas(&conn, "b").unwrap(), vec![schema.clone()]);
        let n: i64 = conn
            .query_row("SELECT count(*) FROM b.scores", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
        assert!(pending(&conn).unwrap().is_empty());
        let entry = Pending {
            table: "scores".into(),
            key: Some(r#"["a","rizon"]"#.into()),
            conflict: None,
        };
        write_pending(&conn, std::slice::from_ref(&entry)).unwrap();
        assert_eq!(pending(&conn).unwrap(), vec![entry]);
        assert_eq!(
            schemas(&conn, "b").unwrap().len(),
            1,
            "journal is not a table to sync"
        );
        clear_pending(&conn).unwrap();
        assert!(pending(&conn).unwrap().is_empty());
    }
}
