//! The merge base of a (database, peer) pair (SPEC 3.1): the rows both sides agreed on at
//! the end of the last successful sync, kept as an SQLite file at
//! `state/db/<database>/<peer>.base.db`.
//!
//! Invariants:
//! - The base is written whole through the state store's atomic replace (built at a
//!   temporary name, synced, renamed), so it is always a complete, consistent file.
//! - The caller replaces it only after both sides committed; a run that dies before
//!   leaves the old base, and the next run's three-way merge completes the work.
//! - Each table keeps its columns and primary key, so a schema change is detected.

use anyhow::{Context as _, Result};
use rusqlite::Connection;

use crate::db::snapshot::{self, Schema, quote};
use crate::db::value::Row;
use crate::ops::state::StateStore;

/// A database's tables: each schema with its rows.
pub type Tables = Vec<(Schema, Vec<Row>)>;

/// The state-store name of a pair's base.
pub fn name(database: &str, peer: &str) -> String {
    format!("db/{database}/{peer}.base.db")
}

/// The base of a pair as schemas and rows; `None` before the first successful sync.
pub fn load(state: &StateStore, database: &str, peer: &str) -> Result<Option<Tables>> {
    let path = state.path(&name(database, peer));
    if !path.exists() {
        return Ok(None);
    }
    let conn = snapshot::snapshot(&path, std::time::Duration::from_secs(1)).with_context(|| {
        format!("merge base is unreadable. Try: cr0sync sync-from-bot --db {database} to reset it")
    })?;
    let mut out = Vec::new();
    for schema in snapshot::schemas(&conn)? {
        let rows = snapshot::rows(&conn, &schema)?;
        out.push((schema, rows));
    }
    Ok(Some(out))
}

/// Replaces a pair's base with `tables`.
pub fn save(
    state: &StateStore,
    database: &str,
    peer: &str,
    tables: &[(Schema, Vec<Row>)],
) -> Result<()> {
    state.replace_with(&name(database, peer), |tmp| {
        let mut conn = Connection::open(tmp)?;
        let tx = conn.transaction()?;
        for (schema, rows) in tables {
            tx.execute_batch(&create_table_sql(schema))?;
            let marks = vec!["?"; schema.columns.len()].join(", ");
            let mut stmt = tx.prepare(&format!(
                "INSERT INTO {} VALUES ({marks})",
                quote(&schema.name)
            ))?;
            for row in rows {
                stmt.execute(rusqlite::params_from_iter(row.iter().map(|c| &c.0)))?;
            }
        }
        tx.commit()?;
        conn.close().map_err(|(_, e)| e)?;
        Ok(())
    })
}

/// `CREATE TABLE` with the same columns, declared types and primary key as `schema`.
pub fn create_table_sql(schema: &Schema) -> String {
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
        "CREATE TABLE {} ({});",
        quote(&schema.name),
        parts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::value::Cell;
    use crate::fsutil::Perms;
    use rusqlite::types::Value;

    #[test]
    fn save_then_load_roundtrips_schemas_and_rows() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::new(dir.path().to_path_buf(), Perms::default());
        assert!(load(&state, "users", "bot").unwrap().is_none());
        let scores = Schema {
            name: "scores".into(),
            columns: vec![
                ("net".into(), "TEXT".into()),
                ("nick".into(), "TEXT".into()),
                ("data".into(), "BLOB".into()),
            ],
            pk: vec![1, 0],
        };
        let seen = Schema {
            name: "seen".into(),
            columns: vec![("n".into(), "".into())],
            pk: vec![],
        };
        let rows = vec![vec![
            Cell(Value::Text("rizon".into())),
            Cell(Value::Text("a\"b".into())),
            Cell(Value::Blob(vec![0, 1])),
        ]];
        let twice = vec![vec![Cell(Value::Integer(1))], vec![Cell(Value::Integer(1))]];
        let tables = vec![
            (scores.clone(), rows.clone()),
            (seen.clone(), twice.clone()),
        ];
        save(&state, "users", "bot", &tables).unwrap();
        let back = load(&state, "users", "bot").unwrap().unwrap();
        assert_eq!(back, tables);
        // Replacing it leaves exactly one file.
        save(&state, "users", "bot", &tables[..1]).unwrap();
        assert_eq!(load(&state, "users", "bot").unwrap().unwrap().len(), 1);
        assert_eq!(
            std::fs::read_dir(state.path("db/users")).unwrap().count(),
            1
        );
    }

    #[test]
    fn damaged_base_is_an_error_with_a_fix() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::new(dir.path().to_path_buf(), Perms::default());
        std::fs::create_dir_all(state.path("db/users")).unwrap();
        std::fs::write(
            state.path(&name("users", "bot")),
            b"not a database at all, just text",
        )
        .unwrap();
        let err = format!("{:#}", load(&state, "users", "bot").unwrap_err());
        assert!(
            err.contains("sync-from-bot") && err.contains("bot.base.db"),
            "{err}"
        );
    }
}
