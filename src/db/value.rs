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

impl rusqlite::types::FromSql for Cell {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        Ok(match v {
            rusqlite::types::ValueRef::Text(b) => match std::str::from_utf8(b) {
                Ok(t) => Cell::Sql(Value::Text(t.to_string())),
                Err(_) => Cell::RawText(b.to_vec()),
            },
            rusqlite::types::ValueRef::Null => Cell::Sql(Value::Null),
            rusqlite::types::ValueRef::Integer(i) => Cell::Sql(Value::Integer(i)),
            rusqlite::types::ValueRef::Real(f) => Cell::Sql(Value::Real(f)),
            rusqlite::types::ValueRef::Blob(b) => Cell::Sql(Value::Blob(b.to_vec())),
        })
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

    #[test]
    fn blobs_serialize_as_hex() {
        let json = serde_json::to_string(&c(Value::Blob(vec![0xde, 0xad]))).unwrap();
        assert_eq!(json, r#"{"hex":"dead"}"#);
    }
}
