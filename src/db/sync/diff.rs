//! The SQL that matches keys: which rows differ between the central copy and the
//! snapshot (and, for tables with counters, the base), read in key order on one or two
//! connections. Only those rows are merged in Rust.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use rusqlite::Connection;

use crate::db::merge::TableSpec;
use crate::db::snapshot::{Schema, quote};
use crate::db::value::{Cell, Key, Row};

/// The base, central and peer rows of one key (`None`: absent).
pub(super) type Sides = [Option<Row>; 3];

/// The keys whose rows differ between the central copy and the snapshot, with their base,
/// central and peer rows, each folded by `add` into an accumulator (made by `start`) as
/// it is found: a key's rows are held only until `add` has taken what the caller keeps
/// of them. Returns the accumulators of consecutive runs of keys, in key order (one run
/// per diff thread). Found from the files' pages where the table allows it, else in SQL
/// (the comparison `sqldiff` makes).
pub(super) fn differing_rows<A: Send>(
    conn: &Connection,
    reader: Option<&std::sync::Mutex<Connection>>,
    schema: &Schema,
    spec: &TableSpec,
    with_base: bool,
    start: impl Fn() -> A + Sync,
    add: impl Fn(&mut A, Key, Sides) + Sync,
) -> Result<Vec<A>> {
    match differing_rows_from_pages(conn, schema, spec, with_base, &start, &add) {
        Ok(Some(found)) => return Ok(found),
        Ok(None) => {}
        Err(e) => log::debug!(
            "table {}: compared in SQL ({e:#} when read from its pages)",
            schema.name
        ),
    }
    let mut run = start();
    for (key, sides) in differing_rows_in_sql(conn, reader, schema, spec, with_base)? {
        add(&mut run, key, sides);
    }
    Ok(vec![run])
}

/// The fast route for a table keyed by its rowid (`INTEGER PRIMARY KEY`): the three files'
/// pages are read in rowid order side by side (`db::btree`) and rows are compared as
/// stored, byte for byte, under one read transaction that holds SQLite's shared lock on
/// each file; only the rows that differ are decoded. Rows stored alike hold the same
/// values; rows stored differently but equal in value merge to no change. `None`: the
/// table does not qualify (another key, generated columns, an index for its key, a base
/// only in memory); an error: the caller compares in SQL.
fn differing_rows_from_pages<A: Send>(
    conn: &Connection,
    schema: &Schema,
    spec: &TableSpec,
    with_base: bool,
    start: &(impl Fn() -> A + Sync),
    add: &(impl Fn(&mut A, Key, Sides) + Sync),
) -> Result<Option<Vec<A>>> {
    use crate::db::btree::{DbFile, Layout, Rows};
    let [key] = spec.pk[..] else {
        return Ok(None);
    };
    if !schema.columns[key].1.eq_ignore_ascii_case("INTEGER") || !conn.is_autocommit() {
        return Ok(None);
    }
    let dbs: &[&str] = if with_base {
        &["b", "main", "p"]
    } else {
        &["main", "p"]
    };
    conn.execute_batch("BEGIN")?;
    let scanned = (|| -> Result<Option<Vec<A>>> {
        let mut files = Vec::new();
        let mut roots = Vec::new();
        for db in dbs {
            // Inside the transaction: these reads take the shared lock on each file.
            let root: u32 = conn.query_row(
                &format!(
                    "SELECT rootpage FROM {db}.sqlite_schema WHERE type = 'table' AND name = ?1"
                ),
                [&schema.name],
                |r| r.get(0),
            )?;
            // A key that is not the rowid has an index of its own; generated columns are
            // stored where the merge does not read them.
            let other: i64 = conn.query_row(
                "SELECT (SELECT count(*) FROM pragma_index_list(?1, ?2) WHERE origin = 'pk') + \
                 (SELECT count(*) FROM pragma_table_xinfo(?1, ?2) WHERE hidden != 0)",
                [&schema.name, *db],
                |r| r.get(0),
            )?;
            let file: String = conn.query_row(
                "SELECT file FROM pragma_database_list WHERE name = ?1",
                [db],
                |r| r.get(0),
            )?;
            if root == 0 || other != 0 || file.is_empty() {
                return Ok(None);
            }
            // The snapshot (`p`) is this sync's own copy; no other process locks it.
            files.push(DbFile::open(Path::new(&file), *db != "p")?);
            roots.push(root);
        }
        let declared: Vec<&str> = schema.columns.iter().map(|(_, t)| t.as_str()).collect();
        let layout = Layout::new(&declared, key);
        // The key space cut where the central copy's pages are, one range per core.
        let central = dbs.iter().position(|d| *d == "main").unwrap_or(0);
        let cuts = crate::db::btree::split_points(&files[central], roots[central], 2)?;
        let mut bounds = vec![i64::MIN];
        bounds.extend(cuts);
        let ranges: Vec<(i64, Option<i64>)> = bounds
            .iter()
            .enumerate()
            .map(|(i, &from)| (from, bounds.get(i + 1).copied()))
            .collect();
        let scan = |(from, to): (i64, Option<i64>)| -> Result<A> {
            let mut rows = files
                .iter()
                .zip(&roots)
                .map(|(f, &root)| Rows::from(f, root, from))
                .collect::<Result<Vec<_>>>()?;
            let n = rows.len();
            let mut records = vec![Vec::new(); n];
            let mut at = vec![None; n];
            for i in 0..n {
                at[i] = rows[i].next(&mut records[i])?;
            }
            let mut out = start();
            while let Some(rowid) = at.iter().flatten().min().copied() {
                if to.is_some_and(|to| rowid >= to) {
                    break;
                }
                let here: Vec<bool> = at.iter().map(|a| *a == Some(rowid)).collect();
                let alike = here.iter().all(|h| *h) && records.iter().all(|r| *r == records[0]);
                if !alike {
                    let mut sides: Sides = [None, None, None];
                    // `dbs` is base, central, peer, or (without a base) central, peer.
                    for i in 0..n {
                        if here[i] {
                            sides[i + 3 - n] = Some(layout.decode(rowid, &records[i])?);
                        }
                    }
                    if let Some(row) = sides.iter().flatten().next() {
                        add(&mut out, spec.key_of(row), sides);
                    }
                }
                for i in 0..n {
                    if here[i] {
                        at[i] = rows[i].next(&mut records[i])?;
                    }
                }
            }
            Ok(out)
        };
        let parts: Vec<Result<A>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranges[1..]
                .iter()
                .map(|&range| s.spawn(move || scan(range)))
                .collect();
            let mut parts = vec![scan(ranges[0])];
            for h in handles {
                parts.push(
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a diff thread stopped"))),
                );
            }
            parts
        });
        Ok(Some(parts.into_iter().collect::<Result<_>>()?))
    })();
    conn.execute_batch("COMMIT")?;
    scanned
}

/// [`differing_rows`] in SQL, for any table with a key.
fn differing_rows_in_sql(
    conn: &Connection,
    reader: Option<&std::sync::Mutex<Connection>>,
    schema: &Schema,
    spec: &TableSpec,
    with_base: bool,
) -> Result<BTreeMap<Key, Sides>> {
    let t = quote(&schema.name);
    let cols: Vec<String> = spec.columns.iter().map(|c| quote(c)).collect();
    let pk: Vec<&String> = spec.pk.iter().map(|&i| &cols[i]).collect();
    // `=` on the key lets SQLite walk the other side's key index; a NULL key (possible
    // in rowid tables) never matches, so its row is merely looked at again, never missed.
    let on_key = |a: &str, b: &str| -> String {
        pk.iter()
            .map(|c| format!("{a}.{c} = {b}.{c}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let all = |a: &str| -> String {
        cols.iter()
            .map(|c| format!("{a}.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let differs: String = cols
        .iter()
        .enumerate()
        .filter(|(i, _)| !spec.pk.contains(i))
        .map(|(_, c)| format!(" OR x.{c} IS NOT c.{c}"))
        .collect();
    // The base row, joined only to rows that differ (after the WHERE filter).
    let base_part = |side: &str| -> (String, String) {
        if with_base {
            (
                format!(", o.{} IS NULL, {}", pk[0], all("o")),
                format!(" LEFT JOIN b.{t} AS o ON {}", on_key("o", side)),
            )
        } else {
            (String::new(), String::new())
        }
    };
    let (base_cols, base_join) = base_part("c");
    let n = cols.len();
    // Reads `n` cells from column `at`, or `None` if the flag column before them is set.
    let read = |r: &rusqlite::Row, at: usize| -> rusqlite::Result<Option<Row>> {
        if r.get::<_, bool>(at)? {
            return Ok(None);
        }
        (at + 1..=at + n)
            .map(|i| r.get::<_, Cell>(i))
            .collect::<Result<_, _>>()
            .map(Some)
    };
    // Rows equal on both sides still matter when the base disagrees: a row both sides
    // inserted alike must enter the base (or a later delete of it would be undone), and a
    // counter both sides moved by the same delta leaves the rows equal (+1 and +1 is +2).
    let base_disagrees: String = if with_base {
        let moved: String = spec
            .counters
            .iter()
            .map(|&i| format!(" OR c.{0} IS NOT o.{0}", cols[i]))
            .collect();
        format!(" OR o.{} IS NULL{moved}", pk[0])
    } else {
        String::new()
    };
    let changed = format!(
        "SELECT 0, {}, x.{} IS NULL, {}{base_cols} FROM main.{t} AS c \
         LEFT JOIN p.{t} AS x ON {}{base_join} WHERE x.{} IS NULL{differs}{base_disagrees}",
        all("c"),
        pk[0],
        all("x"),
        on_key("x", "c"),
        pk[0],
    );
    // Central rows without a base row, and peer-only rows with one: with the table sizes
    // they tell whether any base row is missing from both sides (see below).
    let central_side = || -> Result<(i64, Vec<(Key, Sides)>)> {
        let mut stmt = conn.prepare(&changed)?;
        let mut rows = stmt.query([])?;
        let mut central_unbased = 0i64;
        let mut found = Vec::new();
        while let Some(r) = rows.next()? {
            let c = read(r, 0)?;
            let p = read(r, n + 1)?;
            let b = if with_base { read(r, 2 * n + 2)? } else { None };
            if let Some(c) = c {
                central_unbased += i64::from(b.is_none());
                found.push((spec.key_of(&c), [b, Some(c), p]));
            }
        }
        Ok((central_unbased, found))
    };
    let (base_cols, base_join) = base_part("x");
    let peer_only = format!(
        "SELECT 0, {}{base_cols} FROM p.{t} AS x LEFT JOIN main.{t} AS c ON {}{base_join} \
         WHERE c.{} IS NULL",
        all("x"),
        on_key("c", "x"),
        pk[0],
    );
    let count_sql = |db: &str| format!("SELECT count(*) FROM {db}.{t}");
    let counts = [count_sql("main"), count_sql("b")];
    // The peer's side (its rows the central copy lacks, and the table sizes) reads other
    // pages than the central side: on a large table it runs on a second connection, on
    // the other core, meanwhile.
    let peer_side = |conn: &Connection| -> Result<(Vec<Sides>, i64, [i64; 2])> {
        let mut found = Vec::new();
        let mut peer_only_based = 0i64;
        let mut stmt = conn.prepare(&peer_only)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let p = read(r, 0)?;
            let b = if with_base { read(r, n + 1)? } else { None };
            if let Some(p) = p {
                peer_only_based += i64::from(b.is_some());
                found.push([b, None, Some(p)]);
            }
        }
        let mut sizes = [0i64; 2];
        if with_base {
            for (size, sql) in sizes.iter_mut().zip(&counts) {
                *size = conn.query_row(sql, [], |r| r.get(0))?;
            }
        }
        Ok((found, peer_only_based, sizes))
    };
    let (central_side, peer_side) = match reader {
        Some(reader) => std::thread::scope(|s| {
            let peer = s.spawn(|| {
                let reader = reader
                    .lock()
                    .map_err(|_| anyhow::anyhow!("the second reader failed earlier"))?;
                peer_side(&reader)
            });
            let central = central_side();
            let peer = peer
                .join()
                .map_err(|_| anyhow::anyhow!("the second reader stopped unexpectedly"))
                .and_then(|r| r);
            (central, peer)
        }),
        None => (central_side(), peer_side(conn)),
    };
    let (central_unbased, found) = central_side?;
    let (peer_found, peer_only_based, [central_rows, base_rows]) = peer_side?;
    let mut out: BTreeMap<Key, Sides> = found.into_iter().collect();
    for sides in peer_found {
        if let Some(p) = &sides[2] {
            out.insert(spec.key_of(p), sides);
        }
    }
    // Base rows whose key the central copy lacks number `central_unbased - (central rows -
    // base rows)`; those the peer still holds were just found. Only if some are left (rows
    // both sides deleted) is the base scanned for them. NULL keys only make the count err
    // towards scanning.
    let gone_from_both = if with_base {
        central_unbased - (central_rows - base_rows) - peer_only_based
    } else {
        0
    };
    if gone_from_both != 0 {
        // Rows both sides deleted: the base lets go of them.
        let same = |a: &str| -> String {
            pk.iter()
                .map(|c| format!("{a}.{c} IS o.{c}"))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let base_only = format!(
            "SELECT 0, {} FROM b.{t} AS o WHERE NOT EXISTS (SELECT 1 FROM main.{t} AS c WHERE \
             {}) AND NOT EXISTS (SELECT 1 FROM p.{t} AS c WHERE {})",
            all("o"),
            same("c"),
            same("c"),
        );
        let mut stmt = conn.prepare(&base_only)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            if let Some(b) = read(r, 0)? {
                out.entry(spec.key_of(&b)).or_insert([Some(b), None, None]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::snapshot::schemas;
    use proptest::prelude::*;

    /// A row of the test table: `(id, a, n, r)`; `None` cells are NULL.
    type TestRow = (i64, Option<String>, Option<i64>, Option<f64>);

    fn write(path: &Path, rows: &[TestRow], page_size: u32) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA page_size = {page_size}; CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, \
             n INTEGER, r REAL, pad BLOB)"
        ))
        .unwrap();
        for (id, a, n, r) in rows {
            conn.execute(
                "INSERT INTO t VALUES (?1, ?2, ?3, ?4, zeroblob(?1 % 3 * 400))",
                rusqlite::params![id, a, n, r],
            )
            .unwrap();
        }
    }

    fn row() -> impl Strategy<Value = (Option<String>, Option<i64>, Option<f64>)> {
        (
            proptest::option::of("[a-c]{0,3}"),
            proptest::option::of(-2i64..3),
            proptest::option::of(prop_oneof![Just(1.0), Just(2.5), Just(-0.0)]),
        )
    }

    /// A side: the base with some rows changed, deleted or added.
    fn side(base: Vec<TestRow>) -> impl Strategy<Value = Vec<TestRow>> {
        let n = base.len();
        (
            proptest::collection::vec((0u8..6, row()), n),
            proptest::collection::vec((0i64..120, row()), 0..8),
        )
            .prop_map(move |(edits, added)| {
                let mut out: BTreeMap<i64, TestRow> = BTreeMap::new();
                for (r, (op, new)) in base.iter().zip(edits) {
                    match op {
                        0 => {}
                        1 => {
                            out.insert(r.0, (r.0, new.0, new.1, new.2));
                        }
                        _ => {
                            out.insert(r.0, r.clone());
                        }
                    }
                }
                for (id, new) in added {
                    out.entry(id).or_insert((id, new.0, new.1, new.2));
                }
                out.into_values().collect()
            })
    }

    fn three() -> impl Strategy<Value = [Vec<TestRow>; 3]> {
        proptest::collection::btree_map(0i64..100, row(), 0..80)
            .prop_map(|m| {
                m.into_iter()
                    .map(|(id, r)| (id, r.0, r.1, r.2))
                    .collect::<Vec<_>>()
            })
            .prop_flat_map(|base| {
                (Just(base.clone()), side(base.clone()), side(base)).prop_map(|(b, c, p)| [b, c, p])
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The law of the fast route: it finds every row the SQL comparison finds, with the
        /// same three sides, and any other row it finds is one both sides hold alike (so it
        /// merges to no change for either side).
        #[test]
        fn reading_pages_finds_what_sql_finds(sides in three(), counters in any::<bool>()) {
            let dir = tempfile::tempdir().unwrap();
            let paths: Vec<_> = ["b.db", "c.db", "p.db"].iter().map(|n| dir.path().join(n)).collect();
            for (path, rows) in paths.iter().zip(&sides) {
                write(path, rows, 512);
            }
            let conn = Connection::open(&paths[1]).unwrap();
            conn.execute("ATTACH ?1 AS p", [paths[2].to_str().unwrap()]).unwrap();
            conn.execute("ATTACH ?1 AS b", [paths[0].to_str().unwrap()]).unwrap();
            let schema = schemas(&conn, "main").unwrap().remove(0);
            let counters: &[String] = if counters { &["n".to_string()] } else { &[] };
            let spec = schema.spec(counters, "");
            for with_base in [true, false] {
                let sql = differing_rows_in_sql(&conn, None, &schema, &spec, with_base).unwrap();
                let pages: BTreeMap<Key, Sides> = differing_rows_from_pages(
                    &conn,
                    &schema,
                    &spec,
                    with_base,
                    &BTreeMap::new,
                    &|run: &mut BTreeMap<Key, Sides>, k, s| {
                        run.insert(k, s);
                    },
                )
                .unwrap()
                .expect("the table qualifies")
                .into_iter()
                .flatten()
                .collect();
                for (key, s) in &sql {
                    prop_assert_eq!(pages.get(key), Some(s));
                }
                for (key, [_, c, p]) in &pages {
                    if !sql.contains_key(key) {
                        prop_assert!(c.is_some() && c == p, "{key:?}");
                    }
                }
            }
        }
    }
}
