//! Reading a rowid table straight from an SQLite file, in rowid order, as `(rowid, record
//! bytes)`: what lets the diff compare three files a page at a time instead of looking
//! every row up in the other files (see `sync::diff`).
//!
//! Invariants:
//! - Only read, never written, and only while the caller holds SQLite's shared lock on
//!   the file (or the file is private), through a descriptor that is never closed
//!   (`fsutil::pinned`) unless the file is cr0sync's private scratch.
//! - Anything unexpected (a page of another kind, a page number out of range, a cell past
//!   its page, a loop) is an error, never a panic: the caller then compares the table in
//!   SQL, which names any damage.
//! - A record is decoded to cells exactly as SQLite reads it back (a REAL column's integer
//!   comes back REAL); a record SQLite would complete from the schema (a column added
//!   since it was written) is an error, so the caller's SQL reads it instead.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail, ensure};
use rusqlite::types::ValueRef;

use crate::db::value::{Cell, Row};

/// An SQLite file opened for reading its pages.
pub struct DbFile {
    file: Arc<File>,
    page_size: usize,
    /// Page size less the reserved bytes at each page's end.
    usable: usize,
    pages: u32,
}

impl DbFile {
    /// Opens `path`, which must be a UTF-8 database (the only encoding the cells decode
    /// from here). A file other processes may lock is read through a descriptor that is
    /// never closed (`shared`, see `fsutil::pinned`); cr0sync's own scratch copy through
    /// one closed when done, so its space is freed when it is removed.
    pub fn open(path: &Path, shared: bool) -> Result<Self> {
        let file = if shared {
            crate::fsutil::pinned(path)
        } else {
            File::open(path).map(Arc::new)
        }
        .with_context(|| format!("cannot read {}", path.display()))?;
        let mut header = [0u8; 100];
        file.read_exact_at(&mut header, 0)?;
        let page_size = crate::db::pages::page_size(&header)? as usize;
        let usable = page_size - usize::from(header[20]);
        ensure!(usable >= 480, "usable page size {usable} is too small");
        let encoding = u32::from_be_bytes([header[56], header[57], header[58], header[59]]);
        ensure!(encoding <= 1, "text encoding {encoding} is not UTF-8");
        let len = file.metadata()?.len();
        let pages = u32::try_from(len / page_size as u64).context("file too large")?;
        Ok(DbFile {
            file,
            page_size,
            usable,
            pages,
        })
    }

    fn read(&self, page: u32, buf: &mut Vec<u8>) -> Result<()> {
        ensure!(
            page >= 1 && page <= self.pages,
            "page {page} is out of range (the file has {} pages)",
            self.pages
        );
        buf.resize(self.page_size, 0);
        self.file
            .read_exact_at(buf, u64::from(page - 1) * self.page_size as u64)?;
        Ok(())
    }
}

/// Reads a big-endian `u16` at `at`.
fn u16_at(page: &[u8], at: usize) -> Result<usize> {
    match page.get(at..at + 2) {
        Some(b) => Ok(usize::from(u16::from_be_bytes([b[0], b[1]]))),
        None => bail!("offset {at} is past the page"),
    }
}

fn u32_at(page: &[u8], at: usize) -> Result<u32> {
    match page.get(at..at + 4) {
        Some(b) => Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        None => bail!("offset {at} is past the page"),
    }
}

/// SQLite's variable-length integer at `at`: its value and length.
fn varint(b: &[u8], at: usize) -> Result<(u64, usize)> {
    let mut v = 0u64;
    for i in 0..9 {
        let Some(&byte) = b.get(at + i) else {
            bail!("a number runs past its page")
        };
        if i == 8 {
            return Ok(((v << 8) | u64::from(byte), 9));
        }
        v = (v << 7) | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            return Ok((v, i + 1));
        }
    }
    unreachable!("the loop returns by its ninth byte")
}

/// An interior page being walked: the page, where its header starts, its cell count and
/// the next child to descend into (`cells` is the right-most pointer).
struct Frame {
    page: Vec<u8>,
    header: usize,
    cells: usize,
    next: usize,
}

/// A table b-tree walked in rowid order.
pub struct Rows<'a> {
    file: &'a DbFile,
    stack: Vec<Frame>,
    leaf: Vec<u8>,
    leaf_header: usize,
    leaf_cells: usize,
    leaf_next: usize,
    visited: u32,
    spare: Vec<Vec<u8>>,
    ahead: ReadAhead,
}

/// Pages read ahead of a walk: once two pages in a row were read one after the other (a
/// table written in key order keeps its leaves in file order), the next read fetches
/// [`AHEAD`] pages in one call; out of order, one page at a time.
#[derive(Default)]
struct ReadAhead {
    buf: Vec<u8>,
    first: u32,
    count: u32,
    last: u32,
}

/// Pages fetched by one read ahead (128 KiB of 4 KiB pages).
const AHEAD: u32 = 32;

impl ReadAhead {
    fn read(&mut self, file: &DbFile, page: u32, out: &mut Vec<u8>) -> Result<()> {
        let sequential = page == self.last.wrapping_add(1);
        self.last = page;
        let ps = file.page_size;
        if page < self.first || page >= self.first + self.count {
            if !sequential {
                return file.read(page, out);
            }
            ensure!(
                page >= 1 && page <= file.pages,
                "page {page} is out of range (the file has {} pages)",
                file.pages
            );
            let count = AHEAD.min(file.pages - page + 1);
            self.buf.resize(count as usize * ps, 0);
            file.file
                .read_exact_at(&mut self.buf, u64::from(page - 1) * ps as u64)?;
            self.first = page;
            self.count = count;
        }
        let at = (page - self.first) as usize * ps;
        out.clear();
        out.extend_from_slice(&self.buf[at..at + ps]);
        Ok(())
    }
}

impl<'a> Rows<'a> {
    /// The table whose root page is `root`, from its first row with a rowid of at least
    /// `start`.
    pub fn from(file: &'a DbFile, root: u32, start: i64) -> Result<Self> {
        let mut rows = Rows {
            file,
            stack: Vec::new(),
            leaf: Vec::new(),
            leaf_header: 0,
            leaf_cells: 0,
            leaf_next: 0,
            visited: 0,
            spare: Vec::new(),
            ahead: ReadAhead::default(),
        };
        rows.descend(root, start)?;
        Ok(rows)
    }

    /// Reads page `page` and goes down to the leaf that holds `start` (or would), at its
    /// first row of at least `start`.
    fn descend(&mut self, mut page: u32, start: i64) -> Result<()> {
        loop {
            self.visited += 1;
            ensure!(
                self.visited <= self.file.pages && self.stack.len() < 64,
                "the table's pages form a loop"
            );
            let mut buf = self.spare.pop().unwrap_or_default();
            self.ahead.read(self.file, page, &mut buf)?;
            let header = if page == 1 { 100 } else { 0 };
            let cells = u16_at(&buf, header + 3)?;
            match buf[header] {
                13 => {
                    self.spare.push(std::mem::replace(&mut self.leaf, buf));
                    self.leaf_header = header;
                    self.leaf_cells = cells;
                    self.leaf_next = 0;
                    if start != i64::MIN {
                        while self.leaf_next < cells {
                            let at = u16_at(&self.leaf, header + 8 + 2 * self.leaf_next)?;
                            let (_, n) = varint(&self.leaf, at)?;
                            if varint(&self.leaf, at + n)?.0 as i64 >= start {
                                break;
                            }
                            self.leaf_next += 1;
                        }
                    }
                    return Ok(());
                }
                5 => {
                    let mut frame = Frame {
                        page: buf,
                        header,
                        cells,
                        next: 0,
                    };
                    // An interior cell's key is the largest rowid of its left child.
                    if start != i64::MIN {
                        while frame.next < cells {
                            let at = u16_at(&frame.page, header + 12 + 2 * frame.next)?;
                            if varint(&frame.page, at + 4)?.0 as i64 >= start {
                                break;
                            }
                            frame.next += 1;
                        }
                    }
                    page = Self::child(&mut frame)?;
                    self.stack.push(frame);
                }
                kind => bail!("page {page} is of kind {kind}, not a table b-tree page"),
            }
        }
    }

    /// The next child of an interior page (advancing it).
    fn child(frame: &mut Frame) -> Result<u32> {
        let page = if frame.next < frame.cells {
            let at = u16_at(&frame.page, frame.header + 12 + 2 * frame.next)?;
            u32_at(&frame.page, at)?
        } else {
            u32_at(&frame.page, frame.header + 8)?
        };
        frame.next += 1;
        Ok(page)
    }

    /// The next row: its rowid, with its record in `record`; `None` past the last row.
    pub fn next(&mut self, record: &mut Vec<u8>) -> Result<Option<i64>> {
        while self.leaf_next >= self.leaf_cells {
            // Up to the nearest interior page with a child left, then down again.
            loop {
                let Some(top) = self.stack.last_mut() else {
                    return Ok(None);
                };
                if top.next <= top.cells {
                    let child = Self::child(top)?;
                    self.descend(child, i64::MIN)?;
                    break;
                }
                if let Some(frame) = self.stack.pop() {
                    self.spare.push(frame.page);
                }
            }
        }
        let at = u16_at(&self.leaf, self.leaf_header + 8 + 2 * self.leaf_next)?;
        self.leaf_next += 1;
        let (size, n) = varint(&self.leaf, at)?;
        let (rowid, m) = varint(&self.leaf, at + n)?;
        let start = at + n + m;
        self.payload(start, size, record)?;
        Ok(Some(rowid as i64))
    }

    /// Copies a cell's payload (`size` bytes from `start`, the rest on overflow pages).
    fn payload(&self, start: usize, size: u64, record: &mut Vec<u8>) -> Result<()> {
        let usable = self.file.usable;
        let size = usize::try_from(size).context("record too large")?;
        // How much of the payload stays on the leaf (the formula of SQLite's file format).
        let max_local = usable - 35;
        let local = if size <= max_local {
            size
        } else {
            let min_local = (usable - 12) * 32 / 255 - 23;
            let k = min_local + (size - min_local) % (usable - 4);
            if k <= max_local { k } else { min_local }
        };
        record.clear();
        match self.leaf.get(start..start + local) {
            Some(b) => record.extend_from_slice(b),
            None => bail!("a cell runs past its page"),
        }
        if local == size {
            return Ok(());
        }
        let mut next = u32_at(&self.leaf, start + local)?;
        let mut page = Vec::new();
        let mut hops = 0u32;
        while record.len() < size {
            hops += 1;
            ensure!(hops <= self.file.pages, "an overflow chain forms a loop");
            self.file.read(next, &mut page)?;
            next = u32_at(&page, 0)?;
            let take = (size - record.len()).min(usable - 4);
            record.extend_from_slice(&page[4..4 + take]);
        }
        Ok(())
    }
}

/// Rowids that cut the table whose root page is `root` into about `parts` ranges of
/// pages (the keys of its top interior pages); fewer for a small table.
pub fn split_points(file: &DbFile, root: u32, parts: usize) -> Result<Vec<i64>> {
    let mut page = Vec::new();
    file.read(root, &mut page)?;
    let header = if root == 1 { 100 } else { 0 };
    if page[header] != 5 {
        return Ok(Vec::new());
    }
    let cells = u16_at(&page, header + 3)?;
    let mut out = Vec::new();
    for part in 1..parts {
        let i = cells * part / parts;
        if i < cells {
            let at = u16_at(&page, header + 12 + 2 * i)?;
            out.push(varint(&page, at + 4)?.0 as i64);
        }
    }
    out.dedup();
    Ok(out)
}

/// How a table's records decode: its column count, the column that is the rowid, and the
/// columns of REAL affinity.
pub struct Layout {
    pub columns: usize,
    pub rowid_column: usize,
    pub real: Vec<bool>,
}

impl Layout {
    /// From each column's declared type, by SQLite's affinity rules.
    pub fn new(declared: &[&str], rowid_column: usize) -> Self {
        let real = declared
            .iter()
            .map(|t| {
                let t = t.to_ascii_uppercase();
                !t.contains("INT")
                    && !t.contains("CHAR")
                    && !t.contains("CLOB")
                    && !t.contains("TEXT")
                    && !t.contains("BLOB")
                    && (t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB"))
            })
            .collect();
        Layout {
            columns: declared.len(),
            rowid_column,
            real,
        }
    }

    /// The row a record holds, as SQLite reads it back.
    pub fn decode(&self, rowid: i64, record: &[u8]) -> Result<Row> {
        let (header_len, mut at) = varint(record, 0)?;
        let header_len = usize::try_from(header_len).context("record header too large")?;
        ensure!(
            header_len <= record.len(),
            "a record header runs past the record"
        );
        let mut body = header_len;
        let mut row = Vec::with_capacity(self.columns);
        while at < header_len {
            let (kind, n) = varint(&record[..header_len], at)?;
            at += n;
            let len = match kind {
                0 | 8 | 9 => 0,
                1 => 1,
                2 => 2,
                3 => 3,
                4 => 4,
                5 => 6,
                6 | 7 => 8,
                10 | 11 => bail!("reserved serial type {kind}"),
                k => usize::try_from((k - 12) / 2).context("value too large")?,
            };
            let Some(bytes) = record.get(body..body + len) else {
                bail!("a value runs past its record");
            };
            body += len;
            let i = row.len();
            ensure!(
                i < self.columns,
                "a record has more values than the table has columns"
            );
            let int = |b: &[u8]| {
                let mut v: i64 = if b[0] & 0x80 != 0 { -1 } else { 0 };
                for &x in b {
                    v = (v << 8) | i64::from(x);
                }
                v
            };
            let value = match kind {
                0 if i == self.rowid_column => ValueRef::Integer(rowid),
                0 => ValueRef::Null,
                8 => ValueRef::Integer(0),
                9 => ValueRef::Integer(1),
                1..=6 => ValueRef::Integer(int(bytes)),
                7 => ValueRef::Real(f64::from_be_bytes(bytes.try_into()?)),
                k if k % 2 == 0 => ValueRef::Blob(bytes),
                _ => ValueRef::Text(bytes),
            };
            ensure!(
                i != self.rowid_column || kind == 0,
                "the key column holds a value of its own (it is not the rowid)"
            );
            let value = match value {
                ValueRef::Integer(v) if self.real[i] && i != self.rowid_column => {
                    ValueRef::Real(v as f64)
                }
                v => v,
            };
            row.push(<Cell as rusqlite::types::FromSql>::column_result(value)?);
        }
        ensure!(
            row.len() == self.columns,
            "a record has fewer values than the table has columns (written before a column was \
             added)"
        );
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// Every row of `table`, as SQL reads it.
    fn sql_rows(conn: &Connection, table: &str, n: usize) -> Vec<(i64, Row)> {
        let mut stmt = conn
            .prepare(&format!("SELECT rowid, * FROM {table} ORDER BY rowid"))
            .unwrap();
        stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                (1..=n)
                    .map(|i| r.get::<_, Cell>(i))
                    .collect::<Result<_, _>>()?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    #[test]
    fn rows_read_from_pages_equal_what_sql_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = Connection::open(&path).unwrap();
        // Small pages: a deep tree, and overflow chains for the long values.
        conn.execute_batch(
            "PRAGMA page_size = 512;
             CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, score REAL, n INT, data BLOB);
             WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 3000)
             INSERT INTO t SELECT i * 3 - 1000, 'n' || i, CASE WHEN i % 3 = 0 THEN i ELSE i + 0.5 END,
               CASE i % 5 WHEN 0 THEN NULL WHEN 1 THEN 0 WHEN 2 THEN 1 WHEN 3 THEN -i * 100000
               ELSE i * 4294967296 END,
               CASE WHEN i % 97 = 0 THEN randomblob(3000) ELSE x'00ff' END FROM k;
             UPDATE t SET name = CAST(x'ff41' AS TEXT) WHERE id = 2;
             DELETE FROM t WHERE id % 7 = 0;",
        )
        .unwrap();
        let root: u32 = conn
            .query_row(
                "SELECT rootpage FROM sqlite_schema WHERE name = 't'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let expected = sql_rows(&conn, "t", 5);
        let file = DbFile::open(&path, false).unwrap();
        let layout = Layout::new(&["INTEGER", "TEXT", "REAL", "INT", "BLOB"], 0);
        let mut rows = Rows::from(&file, root, i64::MIN).unwrap();
        let mut record = Vec::new();
        let mut got = Vec::new();
        while let Some(rowid) = rows.next(&mut record).unwrap() {
            got.push((rowid, layout.decode(rowid, &record).unwrap()));
        }
        assert_eq!(got.len(), expected.len());
        assert_eq!(got, expected);
        // From any rowid: the rows from there on.
        for start in [
            -2000, -998, -997, 0, 1, 2, 3, 4, 500, 4000, 7997, 7998, 9000,
        ] {
            let mut rows = Rows::from(&file, root, start).unwrap();
            let mut from = Vec::new();
            while let Some(rowid) = rows.next(&mut record).unwrap() {
                from.push(rowid);
            }
            let want: Vec<i64> = expected
                .iter()
                .map(|(r, _)| *r)
                .filter(|r| *r >= start)
                .collect();
            assert_eq!(from, want, "from {start}");
        }
        let cuts = split_points(&file, root, 2).unwrap();
        assert_eq!(cuts.len(), 1);
    }

    /// Descriptors this process holds on `path`.
    fn open_descriptors(path: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target == path)
            .count()
    }

    #[test]
    fn a_scratch_copy_is_closed_after_reading_and_a_shared_file_stays_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("scratch.db");
        let shared = dir.path().join("shared.db");
        for path in [&scratch, &shared] {
            Connection::open(path)
                .unwrap()
                .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY)")
                .unwrap();
        }
        drop(DbFile::open(&scratch, false).unwrap());
        assert_eq!(open_descriptors(&scratch), 0);
        drop(DbFile::open(&shared, true).unwrap());
        drop(DbFile::open(&shared, true).unwrap());
        // Kept open (closing it would drop SQLite's locks), once per file.
        assert_eq!(open_descriptors(&shared), 1);
    }

    #[test]
    fn damage_and_other_layouts_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);
             CREATE TABLE w (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID;
             CREATE TABLE later (id INTEGER PRIMARY KEY, v TEXT);
             INSERT INTO t VALUES (1, 'a'); INSERT INTO w VALUES ('a', 'b');
             INSERT INTO later VALUES (1, 'a');
             ALTER TABLE later ADD COLUMN extra TEXT DEFAULT 'x';",
        )
        .unwrap();
        let root = |name: &str| -> u32 {
            conn.query_row(
                "SELECT rootpage FROM sqlite_schema WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .unwrap()
        };
        let file = DbFile::open(&path, false).unwrap();
        assert!(Rows::from(&file, root("w"), i64::MIN).is_err());
        assert!(Rows::from(&file, 9999, i64::MIN).is_err());
        let mut record = Vec::new();
        let mut rows = Rows::from(&file, root("later"), i64::MIN).unwrap();
        let rowid = rows.next(&mut record).unwrap().unwrap();
        let layout = Layout::new(&["INTEGER", "TEXT", "TEXT"], 0);
        assert!(layout.decode(rowid, &record).is_err());
        // A page of garbage where the table's root was.
        let t = root("t");
        drop(conn);
        let mut bytes = std::fs::read(&path).unwrap();
        let ps = 4096;
        for b in &mut bytes[(t as usize - 1) * ps..t as usize * ps] {
            *b = 0xff;
        }
        let damaged = dir.path().join("d.db");
        std::fs::write(&damaged, &bytes).unwrap();
        let file = DbFile::open(&damaged, false).unwrap();
        assert!(Rows::from(&file, t, i64::MIN).is_err());
        for garbage in [&[0xffu8; 3][..], &[0x05, 0x0a, 0x0b][..], &[][..]] {
            assert!(Layout::new(&["INTEGER"], 0).decode(1, garbage).is_err());
        }
    }
}
