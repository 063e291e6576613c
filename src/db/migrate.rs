//! Columns added by a schema migration (`ALTER TABLE ... ADD COLUMN`) on one side: the
//! column is added with the same declaration to the other side, to the peer's snapshot
//! and to the merge base, and the merge goes on cell by cell. No edit made before or after
//! the migration, on any side, is reverted: every existing row gets the column's default
//! on the sides that add it, which is exactly what the migration gave the rows of the
//! side that ran it, so only real edits differ from the base.
//!
//! Invariants:
//! - Only trailing columns are added, and only when the key and every shared column agree;
//!   any other difference (a dropped, renamed or retyped column, a changed key) is left to
//!   the caller, which skips the table with a message.
//! - Each `ALTER` is atomic on its database. A run stopped between two of them leaves a
//!   difference the next run sees and finishes; adding is idempotent.
//! - The live peer gets a backup before its schema changes (the caller's `backup` hook).

use anyhow::{Context as _, Result};
use rusqlite::Connection;

use crate::db::snapshot::{Schema, quote};

/// The columns `longer` has after the end of `shorter`, if `shorter` is a prefix of it
/// with the same key.
pub fn added_columns<'a>(shorter: &Schema, longer: &'a Schema) -> Option<&'a [(String, String)]> {
    let n = shorter.columns.len();
    (longer.columns.len() > n
        && longer.columns[..n] == shorter.columns[..]
        && shorter.pk == longer.pk)
        .then(|| &longer.columns[n..])
}

/// The declaration of `column` in table `table` of attached database `db`, as written in
/// its `CREATE TABLE` statement (which `ADD COLUMN` appends to); rebuilt from
/// `table_info` (type, NOT NULL, DEFAULT) if it cannot be found there.
pub fn declaration(conn: &Connection, db: &str, table: &str, column: &str) -> Result<String> {
    let sql: String = conn.query_row(
        &format!("SELECT sql FROM {db}.sqlite_schema WHERE type = 'table' AND name = ?1"),
        [table],
        |r| r.get(0),
    )?;
    if let Some(found) = column_definitions(&sql)
        .into_iter()
        .find(|d| first_identifier(d).eq_ignore_ascii_case(column))
    {
        return Ok(found);
    }
    let (ty, notnull, default): (String, bool, Option<String>) = conn.query_row(
        &format!(
            "SELECT type, \"notnull\", dflt_value FROM pragma_table_info(?1, '{db}') WHERE name = ?2"
        ),
        [table, column],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let mut d = format!("{} {ty}", quote(column));
    if notnull {
        d.push_str(" NOT NULL");
    }
    if let Some(default) = default {
        d.push_str(&format!(" DEFAULT {default}"));
    }
    Ok(d)
}

/// The declaration a merge base gives an added column: its name, declared type and
/// default (the value every existing row took), without constraints.
pub fn base_declaration(conn: &Connection, db: &str, table: &str, column: &str) -> Result<String> {
    let (ty, default): (String, Option<String>) = conn.query_row(
        &format!("SELECT type, dflt_value FROM pragma_table_info(?1, '{db}') WHERE name = ?2"),
        [table, column],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(match default {
        Some(d) => format!("{} {ty} DEFAULT {d}", quote(column)),
        None => format!("{} {ty}", quote(column)),
    })
}

/// Adds a column to table `table` of attached database `db` (`main`, `p`, `b`).
pub fn add_column(conn: &Connection, db: &str, table: &str, declaration: &str) -> Result<()> {
    conn.execute_batch(&format!(
        "ALTER TABLE {db}.{} ADD COLUMN {declaration}",
        quote(table)
    ))
    .with_context(|| format!("cannot add column `{declaration}` to table {table}"))
}

/// The top-level, comma-separated elements of a `CREATE TABLE` body: column definitions
/// and table constraints, quotes and nested parentheses respected.
fn column_definitions(create: &str) -> Vec<String> {
    let Some(open) = create.find('(') else {
        return Vec::new();
    };
    let body = &create[open + 1..];
    let mut out = Vec::new();
    let (mut depth, mut quote_char, mut start) = (0usize, None::<char>, 0usize);
    for (i, ch) in body.char_indices() {
        match (quote_char, ch) {
            (Some(q), c) if c == q => quote_char = None,
            (Some(_), _) => {}
            (None, '\'' | '"' | '`') => quote_char = Some(ch),
            (None, '[') => quote_char = Some(']'),
            (None, '(') => depth += 1,
            (None, ')') if depth == 0 => {
                out.push(body[start..i].trim().to_string());
                break;
            }
            (None, ')') => depth -= 1,
            (None, ',') if depth == 0 => {
                out.push(body[start..i].trim().to_string());
                start = i + 1;
            }
            _ => {}
        }
    }
    out
}

/// The first identifier of a column definition, unquoted.
fn first_identifier(def: &str) -> String {
    let def = def.trim_start();
    let mut chars = def.chars();
    match chars.next() {
        Some(q @ ('"' | '`' | '[')) => {
            let close = if q == '[' { ']' } else { q };
            chars.take_while(|&c| c != close).collect()
        }
        _ => def
            .split(|c: char| c.is_whitespace() || c == '(')
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_definitions_are_split_at_top_level_commas() {
        let sql = "CREATE TABLE t (a INTEGER PRIMARY KEY, \"b c\" TEXT DEFAULT 'x,y', \
                   CHECK (a > 0), d REAL DEFAULT (1.5))";
        let defs = column_definitions(sql);
        assert_eq!(defs.len(), 4);
        assert_eq!(defs[1], "\"b c\" TEXT DEFAULT 'x,y'");
        assert_eq!(first_identifier(&defs[1]), "b c");
        assert_eq!(defs[3], "d REAL DEFAULT (1.5)");
        assert_eq!(first_identifier(&defs[3]), "d");
    }

    #[test]
    fn an_added_column_is_found_with_its_declaration() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE u (id INTEGER PRIMARY KEY, nick TEXT);
             ALTER TABLE u ADD COLUMN level INTEGER NOT NULL DEFAULT 1 CHECK (level > 0);",
        )
        .unwrap();
        assert_eq!(
            declaration(&conn, "main", "u", "level").unwrap(),
            "level INTEGER NOT NULL DEFAULT 1 CHECK (level > 0)"
        );
    }
}
