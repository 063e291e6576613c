//! The plan of a sync: for each table, the changes to write to each side and to the base,
//! and the conflicts to record (the three-way merge of `merge` applied to the rows the diff
//! found), and the mass-delete guard over the whole plan.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use rusqlite::Connection;

use crate::config::DbConfig;
use crate::context::Context;
use crate::db::apply::open_for_merge;
use crate::db::changes::ChangeList;
use crate::db::merge::{self, Change, Conflict, Rules, TableSpec, merge_key, multiset};
use crate::db::migrate;
use crate::db::snapshot::{self, Schema, quote};
use crate::db::value::{Cell, Key, Packed, Row};

use super::Pair;
use super::commit::maybe_backup;
use super::connection::{PARALLEL_DIFF_BYTES, open_reader};
use super::constraints::{collisions, keep_referenced_parents, rekey_rows, resolve_unique};
use super::diff::{Sides, differing_rows};
use super::{PairReport, SkippedTable};
use crate::config::Direction;

pub(super) enum BaseState {
    /// The base holds this table with the same schema.
    Fresh,
    /// No base for this table yet (first sync), or its schema changed: merged as a first
    /// sync and copied into the base afterwards.
    Rebuild,
}

/// The merge of one table, before it is applied.
pub(super) struct Work {
    pub(super) schema: Schema,
    pub(super) spec: TableSpec,
    pub(super) base: BaseState,
    /// The changes to each side, held encoded (see `db::changes`).
    pub(super) to_central: ChangeList,
    pub(super) to_peer: ChangeList,
    /// Keyed tables with a fresh base: the base changes (applied unless a side deferred).
    /// When the base is settled, the base row of each key of `to_central`, `to_peer` and
    /// this list is copied, in SQL, from the side that now holds it (or let go of); this
    /// list holds only the keys whose base row changes though neither side takes a change
    /// (both made the same one), so a key is held once. (Keys with a NULL cell never get
    /// here: they merge as whole rows.)
    pub(super) to_base: Vec<Key>,
    /// Multisets: per row, the base count after the sync and the count to keep if a side
    /// deferred the row.
    pub(super) multiset_base: Vec<(Row, u64, u64)>,
    pub(super) conflicts: Vec<Conflict>,
    pub(super) counter_merges: usize,
    /// Keyed tables: the new base row of a key the peer is to take, for the journal, where
    /// it is not the row the peer gets (see [`new_base_of`]). Kept as exceptions:
    /// with both directions the base becomes what both sides hold, and one copy of each
    /// row is enough.
    pub(super) new_base: BTreeMap<Key, Option<Packed>>,
    /// Keyed tables with a fresh base: the base row, as planning read it, of a key the
    /// peer is to take, where it is not the row the peer's change expects to find (see
    /// [`Work::old_base_of`]): what a key the peer leaves alone goes back to.
    pub(super) old_base: BTreeMap<Key, Option<Packed>>,
    /// Rows of the peer moved to fresh keys (see `rekey`), with the references rewritten:
    /// written to the peer before `to_peer` (which is relative to the moved snapshot), all
    /// of them or none.
    pub(super) peer_edits: Vec<Change>,
    /// How long finding the differing rows took (the rest of planning is the merge).
    pub(super) diff_time: std::time::Duration,
}

impl Work {
    pub(super) fn keyed(&self) -> bool {
        self.spec.keyed()
    }

    /// The base row, before this sync, of a key the peer takes by `change`.
    pub(super) fn old_base_of<'w>(&'w self, change: &'w Change) -> Option<&'w Packed> {
        match self.old_base.get(merge::target_of(change)) {
            Some(row) => row.as_ref(),
            None => merge::before_of(change),
        }
    }

    /// Records the base rows of `change`, a change to the peer planned after the merge:
    /// `old` (the base now) and `new` (the base once both sides committed).
    pub(super) fn note_peer_bases(&mut self, change: &Change, old: Option<Row>, new: Option<Row>) {
        let key = merge::target_of(change);
        let fresh = matches!(self.base, BaseState::Fresh);
        let (new, old) = base_exceptions(change, fresh, old, new);
        match new {
            Some(row) => self.new_base.insert(key.clone(), row),
            None => self.new_base.remove(key),
        };
        match old {
            Some(row) => self.old_base.insert(key.clone(), row),
            None => self.old_base.remove(key),
        };
    }
}

/// The base row a key the peer takes by `change` gets once both sides committed, given
/// the exceptions of [`Work::new_base`].
pub(super) fn new_base_of<'w>(
    new_base: &'w BTreeMap<Key, Option<Packed>>,
    change: &'w Change,
) -> Option<&'w Packed> {
    match new_base.get(merge::target_of(change)) {
        Some(row) => row.as_ref(),
        None => merge::result_of(change),
    }
}

/// Of the base rows of a key the peer takes by `change` (`old`: before this sync, `new`:
/// after it), those `Work` must keep: the ones the change does not already hold (see
/// `Work::new_base` and `Work::old_base`); `old` only with a fresh base.
#[allow(clippy::type_complexity)]
fn base_exceptions(
    change: &Change,
    fresh: bool,
    old: Option<Row>,
    new: Option<Row>,
) -> (Option<Option<Packed>>, Option<Option<Packed>>) {
    let new = new.map(Packed::from);
    let old = old.map(Packed::from);
    let new = (new.as_ref() != merge::result_of(change)).then_some(new);
    let old = (fresh && old.as_ref() != merge::before_of(change)).then_some(old);
    (new, old)
}

/// A keyed table's plan for a run of keys, made on a diff thread as each key is found
/// (its three rows are freed at once); the runs are joined in key order.
#[derive(Default)]
struct Merged {
    to_central: ChangeList,
    to_peer: ChangeList,
    to_base: Vec<Key>,
    conflicts: Vec<Conflict>,
    counter_merges: usize,
    new_base: BTreeMap<Key, Option<Packed>>,
    old_base: BTreeMap<Key, Option<Packed>>,
}

impl Merged {
    /// Merges one key the diff found. A key with a NULL cell is left out: it merges as a
    /// whole row with the others like it.
    fn add(&mut self, spec: &TableSpec, rules: Rules, fresh: bool, key: Key, sides: Sides) {
        if key.iter().any(Cell::is_null) {
            return;
        }
        let [b, c, p] = sides;
        let m = merge_key(spec, rules, &key, b.as_ref(), c.as_ref(), p.as_ref());
        self.counter_merges += usize::from(m.counter_merged);
        self.conflicts.extend(m.conflict);
        let changes_central = m.to_central.is_some();
        self.to_central.extend(m.to_central);
        let to_base = fresh && b != m.new_base && m.to_peer.is_none() && !changes_central;
        if let Some(change) = m.to_peer {
            let (new, old) = base_exceptions(&change, fresh, b, m.new_base);
            if let Some(row) = new {
                self.new_base.insert(key.clone(), row);
            }
            if let Some(row) = old {
                self.old_base.insert(key.clone(), row);
            }
            self.to_peer.push(&change);
        }
        if to_base {
            self.to_base.push(key);
        }
    }

    /// Appends a later run of keys to `w` (its lists of changes are joined by `concat`;
    /// `to_base`, which holds only keys neither side changes, is short).
    fn join(self, w: &mut Work) {
        w.to_base.extend(self.to_base);
        w.conflicts.extend(self.conflicts);
        w.counter_merges += self.counter_merges;
        w.new_base.extend(self.new_base);
        w.old_base.extend(self.old_base);
    }
}

/// Appends `parts` to `into`, emptying each, into room made once: growing `into` part by
/// part would at its peak hold twice the largest list.
fn concat<'a>(into: &mut ChangeList, parts: impl Iterator<Item = &'a mut ChangeList>) {
    let mut parts: Vec<&mut ChangeList> = parts.collect();
    if into.is_empty()
        && let Some(first) = parts.first_mut()
    {
        std::mem::swap(into, *first);
    }
    into.reserve_bytes(parts.iter().map(|p| p.byte_len()).sum());
    for part in parts {
        into.append(part);
        *part = ChangeList::new();
    }
}

pub(super) fn spec_of(db: &DbConfig, schema: &Schema) -> TableSpec {
    schema.spec(
        db.counters
            .get(&schema.name)
            .map(Vec::as_slice)
            .unwrap_or(&[]),
        &db.updated_at,
    )
}

/// The tables of attached database `schema` that merge row by row, by name, less
/// `exclude_tables`: the ordinary tables and the virtual tables that hold their own rows
/// (FTS without `content=`, R*Tree), keyed by rowid.
pub(super) fn tables(
    conn: &Connection,
    schema: &str,
    db: &DbConfig,
) -> Result<BTreeMap<String, Schema>> {
    let mut out: BTreeMap<String, Schema> = snapshot::schemas(conn, schema)?
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    for v in snapshot::virtual_tables(conn, schema)? {
        if v.own_content {
            out.insert(v.name.clone(), snapshot::virtual_schema(conn, schema, &v)?);
        }
    }
    out.retain(|name, _| !db.exclude_tables.contains(name));
    Ok(out)
}

/// Which tables merge, and which are skipped with a reason.
pub(super) fn plan_tables(
    conn: &Connection,
    db: &DbConfig,
    report: &mut PairReport,
) -> Result<Vec<(Schema, BaseState)>> {
    let central = tables(conn, "main", db)?;
    let peer = tables(conn, "p", db)?;
    let base = tables(conn, "b", db)?;
    let names: BTreeSet<&String> = central.keys().chain(peer.keys()).collect();
    let mut out = Vec::new();
    for table in names {
        let reason = match (central.get(table), peer.get(table)) {
            (Some(_), None) => Some(
                "exists in the central copy only. Try: create it in the peer with the same \
                 columns and key, or exclude_tables"
                    .to_string(),
            ),
            (None, Some(_)) => Some(
                "exists in the peer only. Try: create it in the central copy with the same \
                 columns and key (sqlite3 databases/<db>.db), or exclude_tables"
                    .to_string(),
            ),
            (Some(c), Some(p)) if c != p => Some(format!(
                "columns or primary key differ: central {} / peer {}. Try: make them agree \
                 (a column added by a migration is propagated by itself; a dropped, renamed or \
                 retyped column is not), then the next run merges the table",
                describe(c),
                describe(p)
            )),
            _ => None,
        };
        if let Some(reason) = reason {
            log::warn!("{} table {table} skipped: {reason}", db.name.get_ref());
            report.skipped_tables.push(SkippedTable {
                table: table.clone(),
                reason,
            });
            continue;
        }
        let Some(schema) = central.get(table) else {
            continue;
        };
        let state = match base.get(table) {
            Some(b) if b == schema => BaseState::Fresh,
            Some(_) => {
                log::warn!(
                    "{} table {table}: its schema changed on both sides since the last sync; \
                     merging it as a first sync",
                    db.name.get_ref()
                );
                BaseState::Rebuild
            }
            None => BaseState::Rebuild,
        };
        out.push((schema.clone(), state));
    }
    Ok(out)
}

/// The virtual tables of a pair: an external-content FTS index on both sides is kept up to
/// date (returned as `(index, content table)`, rebuilt where its content table is
/// written); any other virtual table is skipped with a message. Their shadow tables are
/// never merged (`snapshot::schemas` leaves them out).
pub(super) fn plan_virtual_tables(
    conn: &Connection,
    db: &DbConfig,
    report: &mut PairReport,
) -> Result<Vec<(String, String)>> {
    let central = snapshot::virtual_tables(conn, "main")?;
    let peer = snapshot::virtual_tables(conn, "p")?;
    let names: BTreeSet<&String> = central.iter().chain(&peer).map(|v| &v.name).collect();
    let mut out = Vec::new();
    for name in names {
        if db.exclude_tables.contains(name) {
            continue;
        }
        let (c, p) = (
            central.iter().find(|v| &v.name == name),
            peer.iter().find(|v| &v.name == name),
        );
        if let (Some(c), Some(p)) = (c, p)
            && c == p
            && let Some(content) = &c.content
        {
            out.push((name.clone(), content.clone()));
            continue;
        }
        // Merged row by row by `plan_tables` (a difference in shape is named there).
        if c.or(p).is_some_and(|v| v.own_content) {
            continue;
        }
        let module = c.or(p).map(|v| v.module.as_str()).unwrap_or_default();
        let reason = format!(
            "virtual table ({module}): cr0sync cannot merge its rows (it merges FTS indexes \
             that hold their own content and R*Trees by rowid, and rebuilds external-content \
             FTS indexes from their content table); its shadow tables are left alone and the \
             other tables sync. Try: exclude_tables = [\"{name}\"] once its content lives in \
             an ordinary table"
        );
        log::warn!("{} table {name} skipped: {reason}", db.name.get_ref());
        report.skipped_tables.push(SkippedTable {
            table: name.clone(),
            reason,
        });
    }
    Ok(out)
}

pub(super) fn describe(s: &Schema) -> String {
    let cols: Vec<String> = s
        .columns
        .iter()
        .enumerate()
        .map(|(i, (n, t))| {
            let pk = if s.pk.contains(&i) { " PK" } else { "" };
            format!("{n} {t}{pk}").trim_end().to_string()
        })
        .collect();
    format!("({})", cols.join(", "))
}

pub(super) fn plan_keyed(
    conn: &Connection,
    reader: Option<&std::sync::Mutex<Connection>>,
    schema: Schema,
    spec: TableSpec,
    base: BaseState,
    rules: Rules,
) -> Result<Work> {
    let fresh = matches!(base, BaseState::Fresh);
    let started = std::time::Instant::now();
    let runs = differing_rows(
        conn,
        reader,
        &schema,
        &spec,
        fresh,
        Merged::default,
        |run: &mut Merged, key, sides| run.add(&spec, rules, fresh, key, sides),
    )
    .with_context(|| format!("cannot compare table {}", schema.name))?;
    let diff_time = started.elapsed();
    let mut w = Work {
        schema,
        spec,
        base,
        to_central: ChangeList::new(),
        to_peer: ChangeList::new(),
        to_base: Vec::new(),
        multiset_base: Vec::new(),
        conflicts: Vec::new(),
        counter_merges: 0,
        new_base: BTreeMap::new(),
        old_base: BTreeMap::new(),
        peer_edits: Vec::new(),
        diff_time,
    };
    // Rows with a NULL in a key column (SQLite allows it outside INTEGER PRIMARY KEY) are
    // no key at all: several may share one. They merge as whole rows, like a table
    // without a key, so none is lost and none flips between runs (`Merged::add` leaves them).
    let null_key = null_key(&w.spec);
    let null_rows = |db: &str| -> Result<Vec<Row>> {
        let cols: Vec<String> = w.spec.columns.iter().map(|c| quote(c)).collect();
        let mut stmt = conn.prepare(&format!(
            "SELECT {} FROM {db}.{} WHERE {}",
            cols.join(", "),
            quote(&w.spec.name),
            null_key
        ))?;
        let rows = stmt.query_map([], |r| {
            (0..cols.len())
                .map(|i| r.get::<_, Cell>(i))
                .collect::<Result<Row, _>>()
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    };
    let (nc, np) = (null_rows("main")?, null_rows("p")?);
    let nb = if fresh { Some(null_rows("b")?) } else { None };
    if !(nc.is_empty() && np.is_empty() && nb.as_ref().is_none_or(Vec::is_empty)) {
        let whole = TableSpec {
            pk: Vec::new(),
            ..w.spec.clone()
        };
        let m = merge::merge_table(&whole, rules, nb.as_deref(), &nc, &np);
        w.to_central.extend(m.to_central);
        w.to_peer.extend(m.to_peer);
        let (bm, cm, pm, newm) = (
            nb.as_deref().map(multiset),
            multiset(&nc),
            multiset(&np),
            multiset(&m.new_base),
        );
        let count = |m: &BTreeMap<Row, u64>, r: &Row| m.get(r).copied().unwrap_or(0);
        let rows: BTreeSet<&Row> = cm.keys().chain(pm.keys()).chain(newm.keys()).collect();
        for r in rows {
            let fallback = match &bm {
                Some(bm) => count(bm, r),
                None => count(&cm, r).min(count(&pm, r)),
            };
            w.multiset_base.push((r.clone(), count(&newm, r), fallback));
        }
    }
    let mut runs = runs;
    concat(
        &mut w.to_central,
        runs.iter_mut().map(|r| &mut r.to_central),
    );
    concat(&mut w.to_peer, runs.iter_mut().map(|r| &mut r.to_peer));
    for run in runs {
        run.join(&mut w);
    }
    Ok(w)
}

pub(super) fn plan_table(
    conn: &Connection,
    reader: Option<&std::sync::Mutex<Connection>>,
    schema: Schema,
    spec: TableSpec,
    base: BaseState,
    rules: Rules,
) -> Result<Work> {
    if spec.keyed() {
        plan_keyed(conn, reader, schema, spec, base, rules)
    } else {
        plan_multiset(conn, schema, spec, base, rules)
    }
}

pub(super) fn plan_multiset(
    conn: &Connection,
    schema: Schema,
    spec: TableSpec,
    base: BaseState,
    rules: Rules,
) -> Result<Work> {
    let c = snapshot::rows(conn, "main", &schema)?;
    let p = snapshot::rows(conn, "p", &schema)?;
    let b = match base {
        BaseState::Fresh => Some(snapshot::rows(conn, "b", &schema)?),
        BaseState::Rebuild => None,
    };
    let m = merge::merge_table(&spec, rules, b.as_deref(), &c, &p);
    let (bm, cm, pm) = (b.as_deref().map(multiset), multiset(&c), multiset(&p));
    let nm = multiset(&m.new_base);
    let all: BTreeSet<&Row> = cm.keys().chain(pm.keys()).chain(nm.keys()).collect();
    let count = |m: &BTreeMap<Row, u64>, r: &Row| m.get(r).copied().unwrap_or(0);
    let multiset_base = all
        .into_iter()
        .map(|r| {
            let fallback = match &bm {
                Some(bm) => count(bm, r),
                None => count(&cm, r).min(count(&pm, r)),
            };
            (r.clone(), count(&nm, r), fallback)
        })
        .collect();
    Ok(Work {
        schema,
        spec,
        base,
        to_central: m.to_central.into(),
        to_peer: m.to_peer.into(),
        to_base: Vec::new(),
        multiset_base,
        conflicts: m.conflicts,
        counter_merges: m.counter_merges,
        new_base: BTreeMap::new(),
        old_base: BTreeMap::new(),
        peer_edits: Vec::new(),
        diff_time: std::time::Duration::ZERO,
    })
}

/// `k1 IS NULL OR k2 IS NULL ...`: the rows of a keyed table that have no key.
pub(super) fn null_key(spec: &TableSpec) -> String {
    let parts: Vec<String> = spec
        .pk
        .iter()
        .map(|&i| format!("{} IS NULL", quote(&spec.columns[i])))
        .collect();
    parts.join(" OR ")
}

/// The mass-delete guard.
pub(super) fn guard(
    conn: &Connection,
    works: &[Work],
    max_percent: u8,
    name: &str,
    peer: &str,
) -> Result<()> {
    for w in works {
        for (side, db, changes) in [
            ("central copy", "main", &w.to_central),
            ("peer", "p", &w.to_peer),
        ] {
            let deletes = changes.counts().deletes;
            if deletes == 0 {
                continue;
            }
            // Count rows only as far as the verdict needs: past `limit` rows the share
            // deleted is within max_delete (or, at 0%, the table is big enough to trip).
            let max = u64::from(max_percent);
            let limit = if max == 0 {
                100
            } else {
                (deletes * 100).div_ceil(max).max(100)
            };
            let rows: u64 = conn
                .query_row(
                    &format!(
                        "SELECT count(*) FROM (SELECT 1 FROM {db}.{} LIMIT {limit})",
                        quote(&w.schema.name)
                    ),
                    [],
                    |r| r.get::<_, i64>(0),
                )?
                .try_into()
                .unwrap_or(0);
            let trips = if rows >= limit {
                max == 0
            } else {
                rows >= 100 && deletes * 100 > max * rows
            };
            if trips {
                anyhow::bail!(
                    "{name}/{peer}: mass-delete guard: the sync would delete {deletes} of the \
                     {rows} rows of table {} in the {side} (max_delete {max_percent}%); nothing \
                     was written. If this is intended: cr0sync db sync --db {name} --peer {peer} \
                     --force",
                    w.schema.name
                );
            }
        }
    }
    // The pages counted are not read again: their cache is let go of before the writes.
    conn.execute_batch("PRAGMA shrink_memory")?;
    Ok(())
}

/// Columns a migration added on one side are added to the other side, the snapshot and
/// the base (see `migrate`), backups first, so the table merges cell by cell.
pub(super) fn add_migrated_columns(
    ctx: &Context,
    conn: &Connection,
    db: &DbConfig,
    peer_path: &Path,
    remote: Option<&super::RemotePeer>,
    now: DateTime<Utc>,
    report: &mut PairReport,
) -> Result<()> {
    let (name, peer_name) = (db.name.get_ref().as_str(), report.peer.clone());
    let central = tables(conn, "main", db)?;
    let peer = tables(conn, "p", db)?;
    // A virtual table's columns cannot be added to (a difference skips it, named).
    let fixed: BTreeSet<String> = snapshot::virtual_tables(conn, "main")?
        .into_iter()
        .chain(snapshot::virtual_tables(conn, "p")?)
        .map(|v| v.name)
        .collect();
    for (table, c) in &central {
        let Some(p) = peer.get(table).filter(|_| !fixed.contains(table)) else {
            continue;
        };
        if let Some(cols) = migrate::added_columns(p, c) {
            // The central copy has them: the peer (live, then its snapshot) gets them.
            maybe_backup(ctx, name, &peer_name, conn, "p", now, report)?;
            let live = match remote {
                Some(_) => None,
                None => Some(open_for_merge(
                    peer_path,
                    ctx.config.general.busy_timeout.0,
                )?),
            };
            for (col, _) in cols {
                let decl = migrate::declaration(conn, "main", table, col)?;
                match (&live, remote) {
                    (Some(live), _) => migrate::add_column(live, "main", table, &decl)
                        .with_context(|| {
                            format!("{name}/{peer_name}: peer {}", peer_path.display())
                        })?,
                    (None, Some(r)) => r.add_column(table, &decl)?,
                    (None, None) => {}
                }
                migrate::add_column(conn, "p", table, &decl)?;
                log::warn!(
                    "{name}/{peer_name} table {table}: column {col} (added by a migration \
                     elsewhere) added to the peer"
                );
            }
        } else if let Some(cols) = migrate::added_columns(c, p) {
            maybe_backup(ctx, name, "central", conn, "main", now, report)?;
            for (col, _) in cols {
                let decl = migrate::declaration(conn, "p", table, col)?;
                migrate::add_column(conn, "main", table, &decl)?;
                log::warn!(
                    "{name}/{peer_name} table {table}: column {col} (added by a migration on \
                     the peer) added to the central copy"
                );
            }
        }
    }
    // The base follows the sides that now agree: existing base rows take the default the
    // migration gave every existing row, so only real edits differ from it.
    let central = tables(conn, "main", db)?;
    let peer = tables(conn, "p", db)?;
    for b in snapshot::schemas(conn, "b")? {
        let (Some(c), Some(p)) = (central.get(&b.name), peer.get(&b.name)) else {
            continue;
        };
        if c != p {
            continue;
        }
        if let Some(cols) = migrate::added_columns(&b, c) {
            for (col, _) in cols {
                let decl = migrate::base_declaration(conn, "main", &b.name, col)?;
                migrate::add_column(conn, "b", &b.name, &decl)?;
            }
        }
    }
    Ok(())
}

/// What a sync is to write: per table, its merge; and the FTS indexes to rebuild.
pub(super) struct Plan {
    pub(super) works: Vec<Work>,
    pub(super) fts: Vec<(String, String)>,
}

impl Pair<'_> {
    /// Step 4: columns a migration added are added on the other side; each table's
    /// differing rows are merged against the base; the plan is then fitted to the
    /// schema's rules (ids both sides handed out, UNIQUE, foreign keys).
    pub(super) fn plan(&mut self, conn: &Connection, snap: &Path) -> Result<Plan> {
        let (ctx, db, rules) = (self.ctx, self.db, self.rules);
        let (name, peer_name) = (self.name, self.peer_name);
        if !self.opts.dry_run {
            let remote = self.remote.as_ref();
            add_migrated_columns(
                ctx,
                conn,
                db,
                &self.peer_path,
                remote,
                self.now,
                &mut self.report,
            )?;
        }
        let plans = plan_tables(conn, db, &mut self.report)?;
        let fts = plan_virtual_tables(conn, db, &mut self.report)?;
        // A second read-only connection for the peer's side of a large table's diff (see
        // `differing_rows`); closed before anything is written.
        let reader = if std::fs::metadata(snap).map_or(0, |m| m.len()) >= PARALLEL_DIFF_BYTES {
            Some(std::sync::Mutex::new(open_reader(conn)?))
        } else {
            None
        };
        let mut works = Vec::new();
        for (schema, base_state) in plans {
            let spec = spec_of(db, &schema);
            let table = schema.name.clone();
            // A table that cannot be read is skipped with its reason; the pair's other tables
            // still sync.
            let work = match plan_table(conn, reader.as_ref(), schema, spec, base_state, rules) {
                Ok(work) => work,
                Err(e) => {
                    let reason = format!(
                        "cannot be compared: {e:#}. Try: check the table with sqlite3 (PRAGMA \
                         integrity_check), or exclude_tables; the pair's other tables sync"
                    );
                    log::warn!("{name}/{peer_name} table {table} skipped: {reason}");
                    self.report
                        .skipped_tables
                        .push(SkippedTable { table, reason });
                    continue;
                }
            };
            works.push(work);
        }
        drop(reader);
        let diff: std::time::Duration = works.iter().map(|w| w.diff_time).sum();
        self.phases.note(format!("diff {} ms", diff.as_millis()));
        if rules.direction == Direction::Both && db.rekey && !collisions(conn, &works)?.is_empty() {
            // The peer's backup comes from the snapshot, which the moves edit.
            if !self.opts.dry_run {
                maybe_backup(ctx, name, peer_name, conn, "p", self.now, &mut self.report)?;
            }
            works = rekey_rows(conn, db, works, rules)
                .with_context(|| format!("{name}/{peer_name}: cannot move colliding rows"))?;
        }
        if rules.direction == Direction::Both {
            for work in &mut works {
                resolve_unique(conn, work, rules).with_context(|| {
                    format!("cannot check the UNIQUE constraints of {}", work.spec.name)
                })?;
            }
            keep_referenced_parents(conn, &mut works)
                .with_context(|| format!("{name}/{peer_name}: cannot check foreign keys"))?;
        }
        Ok(Plan { works, fts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;
    use crate::db::merge::{ConflictKind, Winner};
    use rusqlite::types::Value;

    /// The central copy as `main`, the peer as `p`, the base as `b`, each set up by `sql`
    /// with `{s}` standing for the schema; then the plan of every table.
    fn plan_of(db_toml: &str, sides: [(&str, &str); 3]) -> (Vec<Work>, PairReport) {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("ATTACH ':memory:' AS p; ATTACH ':memory:' AS b")
            .unwrap();
        for (schema, sql) in sides {
            conn.execute_batch(&sql.replace("{s}", schema)).unwrap();
        }
        let db: DbConfig = toml::from_str(&format!("name = \"t\"\npeers = []\n{db_toml}")).unwrap();
        let rules = Rules {
            policy: Policy::CentralWins,
            direction: Direction::Both,
        };
        let mut report = PairReport::default();
        let works = plan_tables(&conn, &db, &mut report)
            .unwrap()
            .into_iter()
            .map(|(schema, base)| {
                let spec = spec_of(&db, &schema);
                plan_table(&conn, None, schema, spec, base, rules).unwrap()
            })
            .collect();
        (works, report)
    }

    const USERS: &str =
        "CREATE TABLE {s}.users(id INTEGER PRIMARY KEY, name TEXT, coins INTEGER NOT NULL);";

    fn int(i: i64) -> Cell {
        Cell::from(Value::Integer(i))
    }

    fn text(s: &str) -> Cell {
        Cell::from(Value::Text(s.into()))
    }

    /// `(key, new row)` of each upsert, `(key, None)` of each delete.
    fn effects(changes: &ChangeList) -> Vec<(Key, Option<Row>)> {
        changes
            .iter()
            .map(|c| match c {
                Change::Upsert { key, new, .. } => (key, Some(new.unpack())),
                Change::Delete { key, .. } => (key, None),
                Change::SetCount { row, new, .. } => (row, Some(vec![int(new as i64)])),
            })
            .collect()
    }

    #[test]
    fn one_sided_changes_go_to_the_other_side_only() {
        let base =
            format!("{USERS} INSERT INTO {{s}}.users VALUES (1, 'andy', 10), (2, 'bob', 20);");
        let central = format!("{base} UPDATE main.users SET name = 'andrew' WHERE id = 1;");
        let peer = format!(
            "{base} DELETE FROM p.users WHERE id = 2; INSERT INTO p.users VALUES (3, 'cy', 0);"
        );
        let (works, report) = plan_of("", [("main", &central), ("p", &peer), ("b", &base)]);
        assert!(report.skipped_tables.is_empty());
        let w = &works[0];
        assert!(w.conflicts.is_empty());
        assert_eq!(
            effects(&w.to_central),
            [
                (vec![int(2)], None),
                (vec![int(3)], Some(vec![int(3), text("cy"), int(0)]))
            ]
        );
        assert_eq!(
            effects(&w.to_peer),
            [(vec![int(1)], Some(vec![int(1), text("andrew"), int(10)]))]
        );
    }

    #[test]
    fn equal_counter_deltas_on_both_sides_are_both_counted() {
        let base = format!("{USERS} INSERT INTO {{s}}.users VALUES (1, 'andy', 1280);");
        let add =
            |s: &str, n: i64| format!("{USERS} INSERT INTO {s}.users VALUES (1, 'andy', {n});");
        let (works, _) = plan_of(
            "counters = { users = [\"coins\"] }",
            [
                ("main", &add("main", 1300)),
                ("p", &add("p", 1300)),
                ("b", &base),
            ],
        );
        let w = &works[0];
        let want = vec![(vec![int(1)], Some(vec![int(1), text("andy"), int(1320)]))];
        assert_eq!(effects(&w.to_central), want);
        assert_eq!(effects(&w.to_peer), want);
        assert_eq!(w.counter_merges, 1);
        assert!(w.conflicts.is_empty());
    }

    #[test]
    fn a_cell_changed_two_ways_is_a_conflict_the_policy_decides() {
        let base = format!("{USERS} INSERT INTO {{s}}.users VALUES (1, 'andy', 10);");
        let side = |s: &str, name: &str| {
            format!("{USERS} INSERT INTO {s}.users VALUES (1, '{name}', 10);")
        };
        let (works, _) = plan_of(
            "",
            [
                ("main", &side("main", "andrew")),
                ("p", &side("p", "drew")),
                ("b", &base),
            ],
        );
        let w = &works[0];
        assert_eq!(w.conflicts.len(), 1);
        let c = &w.conflicts[0];
        assert_eq!(
            (c.kind, c.winner),
            (ConflictKind::UpdateUpdate, Winner::Central)
        );
        assert_eq!(
            c.peer.as_ref().unwrap()[1],
            text("drew"),
            "the loser is kept"
        );
        assert!(w.to_central.is_empty());
        assert_eq!(
            effects(&w.to_peer),
            [(vec![int(1)], Some(vec![int(1), text("andrew"), int(10)]))]
        );
    }

    #[test]
    fn rows_without_a_key_are_counted_as_a_multiset() {
        let log = "CREATE TABLE {s}.log(line TEXT);";
        let base = format!("{log} INSERT INTO {{s}}.log VALUES ('a');");
        let both = |s: &str| format!("{log} INSERT INTO {s}.log VALUES ('a'), ('a');");
        let (works, _) = plan_of(
            "",
            [("main", &both("main")), ("p", &both("p")), ("b", &base)],
        );
        let w = &works[0];
        // One 'a' in the base, one added on each side: three everywhere.
        assert_eq!(
            effects(&w.to_central),
            [(vec![text("a")], Some(vec![int(3)]))]
        );
        assert_eq!(effects(&w.to_peer), [(vec![text("a")], Some(vec![int(3)]))]);
    }

    #[test]
    fn a_table_on_one_side_only_is_skipped_with_a_reason() {
        let (works, report) = plan_of(
            "",
            [
                ("main", USERS),
                ("p", "CREATE TABLE p.other(x);"),
                ("b", ""),
            ],
        );
        assert!(works.is_empty());
        let skipped: Vec<&str> = report
            .skipped_tables
            .iter()
            .map(|s| s.table.as_str())
            .collect();
        assert_eq!(skipped, ["other", "users"]);
        assert!(
            report.skipped_tables[1]
                .reason
                .contains("central copy only")
        );
    }
}
