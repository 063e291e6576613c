//! The SQL that matches keys: which rows differ between the central copy and the
//! snapshot (and, for tables with counters, the base), read in key order on one or two
//! connections. Only those rows are merged in Rust.

use std::collections::BTreeMap;

use anyhow::Result;
use rusqlite::Connection;

use crate::db::merge::TableSpec;
use crate::db::snapshot::{Schema, quote};
use crate::db::value::{Cell, Key, Row};

/// The base, central and peer rows of one key (`None`: absent).
pub(super) type Sides = [Option<Row>; 3];

/// The keys whose rows differ between the central copy and the snapshot, with their base,
/// central and peer rows, found in SQL: the comparison `sqldiff` makes (columns compared
/// with `IS`), one pass over each side, the base consulted only for rows that differ.
pub(super) fn differing_rows(
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
