//! The merge base of a (database, peer) pair: the rows both sides agreed on at
//! the end of the last successful sync, kept as an SQLite file at
//! `state/db/<database>/<peer>.base.db`, attached to the sync's connection as `b`.
//!
//! Invariants:
//! - Each base table has the columns, declared types and primary key of the table it
//!   mirrors, so a schema change is detected by comparing schemas.
//! - The base changes only in SQLite transactions, and its merged rows change only in the
//!   same transaction that commits the central copy (SQLite commits attached rollback-journal
//!   databases atomically), so the base never runs ahead of the central copy.
//! - The base file also carries the commit protocol's bookkeeping (`_cr0sync_meta`, the
//!   conflict outbox): see `journal`. Tables named `_cr0sync%` are never merged.

use anyhow::Result;
use rusqlite::Connection;

use crate::db::snapshot::{Schema, quote};

/// The state-store name of a pair's base.
pub fn name(database: &str, peer: &str) -> String {
    crate::ops::state::names::db_base(database, peer)
}

/// Replaces base table `schema.name` with a copy of `from.<table>` (`main` or `p`).
pub fn copy_table(conn: &Connection, schema: &Schema, from: &str) -> Result<()> {
    let t = quote(&schema.name);
    // Named columns: generated columns are neither in the schema nor in the base.
    let cols: Vec<String> = schema.columns.iter().map(|(c, _)| quote(c)).collect();
    let cols = cols.join(", ");
    conn.execute_batch(&format!(
        "DROP TABLE IF EXISTS b.{t}; {} INSERT INTO b.{t} ({cols}) SELECT {cols} FROM {from}.{t};",
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
    fn copied_table_keeps_schema_and_rows() {
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
    }
}
