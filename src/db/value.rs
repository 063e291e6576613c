//! SQLite values with a total order, so rows can be map keys and multiset members.
//!
//! Order: NULL < numbers (INTEGER and REAL compared by value) < TEXT < BLOB, as SQLite
//! sorts them. Equality is exact: `1` (INTEGER) and `1.0` (REAL) are different cells,
//! because writing one where the other was is a change a reader can see (`typeof()`).

use std::cmp::Ordering;

use rusqlite::types::Value;
use serde::ser::{Serialize, Serializer};

/// One SQLite value, byte for byte. TEXT that is not valid UTF-8 (SQLite stores whatever
/// bytes it is given) is kept as its bytes, read and written as TEXT.
#[derive(Debug, Clone)]
pub enum Cell {
    Sql(Value),
    RawText(Vec<u8>),
}

/// A whole row, columns in table order.
pub type Row = Vec<Cell>;

/// The primary-key cells of a row.
pub type Key = Vec<Cell>;

fn rank(c: &Cell) -> u8 {
    match c {
        Cell::Sql(Value::Null) => 0,
        Cell::Sql(Value::Integer(_) | Value::Real(_)) => 1,
        Cell::Sql(Value::Text(_)) | Cell::RawText(_) => 2,
        Cell::Sql(Value::Blob(_)) => 3,
    }
}

impl Ord for Cell {
    fn cmp(&self, other: &Self) -> Ordering {
        use Value::*;
        // TEXT compares byte by byte, as SQLite's BINARY collation does.
        if let (Some(a), Some(b)) = (self.text_bytes(), other.text_bytes()) {
            return a.cmp(b);
        }
        match (self, other) {
            (Cell::Sql(a), Cell::Sql(b)) => match (a, b) {
                (Integer(a), Integer(b)) => a.cmp(b),
                (Real(a), Real(b)) => a.total_cmp(b),
                // Same number as INTEGER and REAL: INTEGER first so equality stays exact.
                (Integer(a), Real(b)) => (*a as f64).total_cmp(b).then(Ordering::Less),
                (Real(a), Integer(b)) => a.total_cmp(&(*b as f64)).then(Ordering::Greater),
                (Blob(a), Blob(b)) => a.cmp(b),
                _ => rank(self).cmp(&rank(other)),
            },
            _ => rank(self).cmp(&rank(other)),
        }
    }
}

impl PartialOrd for Cell {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Cell {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Cell {}

impl Cell {
    pub fn is_null(&self) -> bool {
        matches!(self, Cell::Sql(Value::Null))
    }

    /// The cell as a number, for counters: INTEGER or REAL.
    pub fn as_number(&self) -> Option<Number> {
        match self {
            Cell::Sql(Value::Integer(i)) => Some(Number::Int(*i)),
            Cell::Sql(Value::Real(f)) => Some(Number::Real(*f)),
            _ => None,
        }
    }

    pub fn as_integer(&self) -> Option<i64> {
        match self {
            Cell::Sql(Value::Integer(i)) => Some(*i),
            _ => None,
        }
    }

    fn text_bytes(&self) -> Option<&[u8]> {
        match self {
            Cell::Sql(Value::Text(t)) => Some(t.as_bytes()),
            Cell::RawText(b) => Some(b),
            _ => None,
        }
    }
}

impl From<Value> for Cell {
    fn from(v: Value) -> Self {
        Cell::Sql(v)
    }
}

impl Cell {
    /// The cell of a value SQLite hands over.
    pub fn from_ref(v: rusqlite::types::ValueRef<'_>) -> Cell {
        match v {
            rusqlite::types::ValueRef::Text(b) => match std::str::from_utf8(b) {
                Ok(t) => Cell::Sql(Value::Text(t.to_string())),
                Err(_) => Cell::RawText(b.to_vec()),
            },
            rusqlite::types::ValueRef::Null => Cell::Sql(Value::Null),
            rusqlite::types::ValueRef::Integer(i) => Cell::Sql(Value::Integer(i)),
            rusqlite::types::ValueRef::Real(f) => Cell::Sql(Value::Real(f)),
            rusqlite::types::ValueRef::Blob(b) => Cell::Sql(Value::Blob(b.to_vec())),
        }
    }
}

impl rusqlite::types::FromSql for Cell {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        Ok(Cell::from_ref(v))
    }
}

impl rusqlite::ToSql for Cell {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Cell::Sql(v) => ToSqlOutput::Borrowed(ValueRef::from(v)),
            Cell::RawText(b) => ToSqlOutput::Borrowed(ValueRef::Text(b)),
        })
    }
}

/// A row packed into one allocation: how a change holds the rows it writes (and, one
/// after another, how a plan's `ChangeList` holds them), about a quarter of a [`Row`]'s
/// size (a `Row` allocates its cells, and each TEXT or
/// BLOB, apart). Equal packings are equal rows, cell for cell. Serializes as the row.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Packed(Box<[u8]>);

// The packing: per cell a tag byte, then for INTEGER its zigzag LEB128, for REAL its 8
// bytes, for TEXT and BLOB their length (LEB128) and bytes.
const P_NULL: u8 = 0;
const P_INT: u8 = 1;
const P_REAL: u8 = 2;
const P_TEXT: u8 = 3;
const P_BLOB: u8 = 4;

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v.to_le_bytes()[0] | 0x80);
        v >>= 7;
    }
    out.push(v.to_le_bytes()[0]);
}

pub(crate) fn get_varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = bytes[*at];
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            break;
        }
    }
    v
}

impl Packed {
    pub fn pack(row: &[Cell]) -> Packed {
        let mut out = Vec::with_capacity(row.len() * 4);
        Packed::pack_into(&mut out, row);
        Packed(out.into_boxed_slice())
    }

    /// The packing of `row`, appended to `out`.
    pub(crate) fn pack_into(out: &mut Vec<u8>, row: &[Cell]) {
        for cell in row {
            let (tag, bytes): (u8, &[u8]) = match cell {
                Cell::Sql(Value::Null) => (P_NULL, &[]),
                Cell::Sql(Value::Integer(i)) => {
                    out.push(P_INT);
                    put_varint(out, ((*i << 1) ^ (*i >> 63)).cast_unsigned());
                    continue;
                }
                Cell::Sql(Value::Real(f)) => {
                    out.push(P_REAL);
                    out.extend_from_slice(&f.to_bits().to_le_bytes());
                    continue;
                }
                Cell::Sql(Value::Text(t)) => (P_TEXT, t.as_bytes()),
                Cell::RawText(b) => (P_TEXT, b),
                Cell::Sql(Value::Blob(b)) => (P_BLOB, b),
            };
            out.push(tag);
            if tag != P_NULL {
                put_varint(out, bytes.len() as u64);
                out.extend_from_slice(bytes);
            }
        }
    }

    /// The packing's bytes (see [`Packed::from_bytes`]).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A packing from bytes [`Packed::as_bytes`] or [`Packed::pack_into`] gave.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Packed {
        Packed(bytes.into())
    }

    /// The row packed in `bytes` (see [`Packed::pack_into`]), unpacked.
    pub(crate) fn unpack_bytes(bytes: &[u8]) -> Row {
        Packed::refs_of(bytes).map(Cell::from_ref).collect()
    }

    pub fn unpack(&self) -> Row {
        self.refs().map(Cell::from_ref).collect()
    }

    /// The cells as SQLite values borrowed from the packing, to bind without unpacking.
    pub fn values(&self) -> impl Iterator<Item = rusqlite::types::ToSqlOutput<'_>> {
        self.refs().map(rusqlite::types::ToSqlOutput::Borrowed)
    }

    fn refs(&self) -> impl Iterator<Item = rusqlite::types::ValueRef<'_>> {
        Packed::refs_of(&self.0)
    }

    fn refs_of(b: &[u8]) -> impl Iterator<Item = rusqlite::types::ValueRef<'_>> {
        use rusqlite::types::ValueRef;
        let mut at = 0;
        std::iter::from_fn(move || {
            let tag = *b.get(at)?;
            at += 1;
            Some(match tag {
                P_INT => {
                    let z = get_varint(b, &mut at);
                    ValueRef::Integer(((z >> 1) as i64) ^ -((z & 1) as i64))
                }
                P_REAL => {
                    let mut f = [0u8; 8];
                    f.copy_from_slice(&b[at..at + 8]);
                    at += 8;
                    ValueRef::Real(f64::from_bits(u64::from_le_bytes(f)))
                }
                P_TEXT | P_BLOB => {
                    let n = usize::try_from(get_varint(b, &mut at)).unwrap_or(usize::MAX);
                    let bytes = &b[at..at + n];
                    at += n;
                    if tag == P_BLOB {
                        ValueRef::Blob(bytes)
                    } else {
                        ValueRef::Text(bytes)
                    }
                }
                _ => ValueRef::Null,
            })
        })
    }
}

impl From<&Row> for Packed {
    fn from(row: &Row) -> Packed {
        Packed::pack(row)
    }
}

impl From<Row> for Packed {
    fn from(row: Row) -> Packed {
        Packed::pack(&row)
    }
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.unpack().fmt(f)
    }
}

impl Serialize for Packed {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.unpack().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Packed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Row::deserialize(d).map(Packed::from)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i64),
    Real(f64),
}

/// `base + (central - base) + (peer - base)` for counter columns. Integers stay integers
/// (saturating, never wrapping); any REAL makes the result REAL.
pub fn counter_merge(base: &Cell, central: &Cell, peer: &Cell) -> Option<Cell> {
    use Number::*;
    let (b, c, p) = (base.as_number()?, central.as_number()?, peer.as_number()?);
    Some(Cell::Sql(match (b, c, p) {
        (Int(b), Int(c), Int(p)) => {
            let v = (c as i128) + (p as i128) - (b as i128);
            Value::Integer(i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX }))
        }
        _ => {
            let f = |n: Number| match n {
                Int(i) => i as f64,
                Real(r) => r,
            };
            Value::Real(f(c) + f(p) - f(b))
        }
    }))
}

/// Cells in conflict records and dry-run output: JSON values; BLOBs as `{"hex": "..."}`,
/// TEXT that is not UTF-8 as `{"text_hex": "..."}`.
impl Serialize for Cell {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let hex = crate::util::hex;
        let v = match self {
            Cell::Sql(v) => v,
            Cell::RawText(b) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("text_hex", &hex(b))?;
                return m.end();
            }
        };
        match v {
            Value::Null => s.serialize_none(),
            Value::Integer(i) => s.serialize_i64(*i),
            Value::Real(f) if f.is_finite() => s.serialize_f64(*f),
            // JSON has no infinities or NaN: `{"real": "inf"}`, so nothing is lost.
            Value::Real(f) => {
                let word = if f.is_nan() {
                    "nan"
                } else if *f > 0.0 {
                    "inf"
                } else {
                    "-inf"
                };
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("real", word)?;
                m.end()
            }
            Value::Text(t) => s.serialize_str(t),
            Value::Blob(b) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("hex", &hex(b))?;
                m.end()
            }
        }
    }
}

/// The inverse of the JSON form above, for journal entries read back after a crash.
impl<'de> serde::Deserialize<'de> for Cell {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        cell_from_json(&v).ok_or_else(|| serde::de::Error::custom(format!("not a cell: {v}")))
    }
}

pub fn cell_from_json(v: &serde_json::Value) -> Option<Cell> {
    use serde_json::Value as J;
    let bytes = crate::util::unhex;
    if let J::Object(m) = v
        && let Some(hex) = m.get("text_hex")
    {
        let b = bytes(hex.as_str()?)?;
        return Some(match String::from_utf8(b) {
            Ok(t) => Cell::Sql(Value::Text(t)),
            Err(e) => Cell::RawText(e.into_bytes()),
        });
    }
    Some(Cell::Sql(match v {
        J::Null => Value::Null,
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64()?),
        },
        J::String(s) => Value::Text(s.clone()),
        J::Object(m) if m.contains_key("real") => Value::Real(match m.get("real")?.as_str()? {
            "inf" => f64::INFINITY,
            "-inf" => f64::NEG_INFINITY,
            "nan" => f64::NAN,
            _ => return None,
        }),
        J::Object(m) => Value::Blob(bytes(m.get("hex")?.as_str()?)?),
        J::Bool(_) | J::Array(_) => return None,
    }))
}

/// A row or key from its JSON form.
pub fn row_from_json(v: &serde_json::Value) -> Option<Row> {
    v.as_array()?.iter().map(cell_from_json).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(v: Value) -> Cell {
        Cell::Sql(v)
    }

    #[test]
    fn order_follows_sqlite_type_ranks() {
        let mut cells = [
            c(Value::Blob(vec![1])),
            c(Value::Text("a".into())),
            c(Value::Real(1.5)),
            c(Value::Integer(1)),
            c(Value::Null),
        ];
        cells.sort();
        assert!(cells[0].is_null());
        assert_eq!(cells[1], c(Value::Integer(1)));
        assert_eq!(cells[2], c(Value::Real(1.5)));
        assert_eq!(cells[4], c(Value::Blob(vec![1])));
    }

    #[test]
    fn integer_and_real_are_distinct_cells() {
        assert_ne!(c(Value::Integer(1)), c(Value::Real(1.0)));
        assert!(c(Value::Integer(1)) < c(Value::Real(1.0)));
        assert!(c(Value::Real(0.5)) < c(Value::Integer(1)));
    }

    #[test]
    fn counters_add_both_deltas() {
        let m = counter_merge(
            &c(Value::Integer(50)),
            &c(Value::Integer(80)),
            &c(Value::Integer(70)),
        );
        assert_eq!(m, Some(c(Value::Integer(100))));
        let m = counter_merge(
            &c(Value::Integer(1)),
            &c(Value::Real(2.5)),
            &c(Value::Integer(3)),
        );
        assert_eq!(m, Some(c(Value::Real(4.5))));
        assert_eq!(
            counter_merge(
                &c(Value::Null),
                &c(Value::Integer(1)),
                &c(Value::Integer(2))
            ),
            None
        );
        let big = counter_merge(
            &c(Value::Integer(0)),
            &c(Value::Integer(i64::MAX)),
            &c(Value::Integer(5)),
        );
        assert_eq!(big, Some(c(Value::Integer(i64::MAX))));
    }

    #[test]
    fn json_form_roundtrips() {
        let row = vec![
            c(Value::Null),
            c(Value::Integer(-7)),
            c(Value::Real(1.0)),
            c(Value::Text("é\n".into())),
            c(Value::Blob(vec![0, 255, 16])),
            c(Value::Real(f64::INFINITY)),
            c(Value::Real(f64::NEG_INFINITY)),
            c(Value::Real(-0.0)),
            Cell::RawText(vec![b'a', 0xff, 0]),
        ];
        let json = serde_json::to_value(&row).unwrap();
        let back = row_from_json(&json).unwrap();
        assert_eq!(back, row);
        assert!(matches!(back[2], Cell::Sql(Value::Real(_))));
        assert!(matches!(back[8], Cell::RawText(_)));
        assert_eq!(json[8], serde_json::json!({"text_hex": "61ff00"}));
    }

    #[test]
    fn text_that_is_not_utf8_is_text_compared_byte_by_byte() {
        let raw = Cell::RawText(vec![b'b', 0xff]);
        assert!(c(Value::Text("b".into())) < raw);
        assert!(raw < c(Value::Text("c".into())));
        assert!(raw < c(Value::Blob(vec![0])));
        assert_ne!(raw, c(Value::Blob(vec![b'b', 0xff])));
    }

    fn any_cell() -> impl proptest::strategy::Strategy<Value = Cell> {
        use proptest::prelude::*;
        prop_oneof![
            Just(c(Value::Null)),
            any::<i64>().prop_map(|i| c(Value::Integer(i))),
            (-3i64..3).prop_map(|i| c(Value::Integer(i))),
            any::<f64>()
                .prop_filter("SQLite stores no NaN", |f| !f.is_nan())
                .prop_map(|f| c(Value::Real(f))),
            (-2i64..2).prop_map(|i| c(Value::Real(i as f64))),
            ".{0,3}".prop_map(|t| c(Value::Text(t))),
            proptest::collection::vec(any::<u8>(), 0..200).prop_map(|b| c(Value::Blob(b))),
            proptest::collection::vec(any::<u8>(), 0..4).prop_map(|b| match String::from_utf8(b) {
                Ok(t) => c(Value::Text(t)),
                Err(e) => Cell::RawText(e.into_bytes()),
            }),
        ]
    }

    proptest::proptest! {
        /// A packed row unpacks to an equal row, and two rows pack alike exactly when they
        /// are equal (the plan compares packed rows).
        #[test]
        fn packing_keeps_rows_and_their_equality(
            a in proptest::collection::vec(any_cell(), 0..6),
            b in proptest::collection::vec(any_cell(), 0..6),
        ) {
            let (pa, pb) = (Packed::pack(&a), Packed::pack(&b));
            proptest::prop_assert_eq!(&pa.unpack(), &a);
            proptest::prop_assert_eq!(pa == pb, a == b);
            let json = serde_json::to_string(&pa).unwrap();
            proptest::prop_assert_eq!(json, serde_json::to_string(&a).unwrap());
        }
    }

    /// Journals, conflict records and a remote peer's writes carry REAL values as JSON:
    /// every one must read back bit for bit (serde_json's `float_roundtrip`; without it
    /// this value came back one unit in the last place off).
    #[test]
    fn a_real_reads_back_from_json_bit_for_bit() {
        for f in [
            1.152_875_089_698_165_7e54,
            0.1,
            f64::MIN_POSITIVE,
            5e-324,
            -1.0 / 3.0,
        ] {
            let row = vec![c(Value::Real(f))];
            let back: Row = serde_json::from_str(&serde_json::to_string(&row).unwrap()).unwrap();
            assert!(matches!(back[0], Cell::Sql(Value::Real(g)) if g.to_bits() == f.to_bits()));
        }
    }

    #[test]
    fn blobs_serialize_as_hex() {
        let json = serde_json::to_string(&c(Value::Blob(vec![0xde, 0xad]))).unwrap();
        assert_eq!(json, r#"{"hex":"dead"}"#);
    }
}
