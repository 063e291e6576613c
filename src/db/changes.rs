//! A list of changes held encoded, one after another in one buffer: what a sync's plan
//! holds for each side. A change held apart costs its slot and three allocations (key,
//! old row, new row), and a plan's two lists, built key by key side by side, interleave
//! those allocations, so letting one list go frees holes no page cache can use. Encoded,
//! a change costs its bytes, and a list let go of returns its memory whole.
//!
//! Invariant: a list reads back exactly the changes pushed into it, in order, and
//! serializes as the `Vec<Change>` it stands for (a property test checks both).

use std::fmt;

use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeSeq, Serializer};

use crate::db::merge::{Change, Counts};
use crate::db::value::{Packed, get_varint, put_varint};

/// See the module doc.
#[derive(Clone, Default, PartialEq)]
pub struct ChangeList {
    bytes: Vec<u8>,
    len: usize,
}

// The encoding: a tag byte, then the key (a multiset's row) as a length and a packing,
// then per variant the rows (a length and a packing each) or the two counts.
const INSERT: u8 = 0;
const UPDATE: u8 = 1;
const DELETE: u8 = 2;
const SET_COUNT: u8 = 3;

fn put_packing(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn get_packing<'b>(bytes: &'b [u8], at: &mut usize) -> &'b [u8] {
    let n = usize::try_from(get_varint(bytes, at)).unwrap_or(usize::MAX);
    let out = &bytes[*at..*at + n];
    *at += n;
    out
}

impl ChangeList {
    pub fn new() -> ChangeList {
        ChangeList::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, change: &Change) {
        let out = &mut self.bytes;
        let mut key = Vec::new();
        match change {
            Change::Upsert { key: k, old, new } => {
                out.push(if old.is_some() { UPDATE } else { INSERT });
                Packed::pack_into(&mut key, k);
                put_packing(out, &key);
                if let Some(old) = old {
                    put_packing(out, old.as_bytes());
                }
                put_packing(out, new.as_bytes());
            }
            Change::Delete { key: k, old } => {
                out.push(DELETE);
                Packed::pack_into(&mut key, k);
                put_packing(out, &key);
                put_packing(out, old.as_bytes());
            }
            Change::SetCount { row, old, new } => {
                out.push(SET_COUNT);
                Packed::pack_into(&mut key, row);
                put_packing(out, &key);
                put_varint(out, *old);
                put_varint(out, *new);
            }
        }
        self.len += 1;
    }

    /// The changes, decoded one at a time.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            bytes: &self.bytes,
            at: 0,
            left: self.len,
        }
    }

    /// What [`crate::db::merge::counts`] makes of the changes, read from their tags and counts
    /// without decoding a row.
    pub fn counts(&self) -> Counts {
        let mut n = Counts::default();
        let (b, mut at) = (&self.bytes, 0);
        while at < b.len() {
            let tag = b[at];
            at += 1;
            get_packing(b, &mut at);
            match tag {
                INSERT => {
                    get_packing(b, &mut at);
                    n.inserts += 1;
                }
                UPDATE => {
                    get_packing(b, &mut at);
                    get_packing(b, &mut at);
                    n.updates += 1;
                }
                DELETE => {
                    get_packing(b, &mut at);
                    n.deletes += 1;
                }
                _ => {
                    let (old, new) = (get_varint(b, &mut at), get_varint(b, &mut at));
                    if new > old {
                        n.inserts += new - old;
                    } else {
                        n.deletes += old - new;
                    }
                }
            }
        }
        n
    }

    pub fn to_vec(&self) -> Vec<Change> {
        self.iter().collect()
    }

    /// Keeps the changes `keep` says yes to, in order, in place.
    pub fn retain(&mut self, mut keep: impl FnMut(&Change) -> bool) {
        let (mut read, mut write, mut len) = (0, 0, 0);
        while read < self.bytes.len() {
            let start = read;
            let change = decode(&self.bytes, &mut read);
            if keep(&change) {
                self.bytes.copy_within(start..read, write);
                write += read - start;
                len += 1;
            }
        }
        self.bytes.truncate(write);
        self.len = len;
    }

    /// Moves the changes of `other` to the end of this list.
    pub fn append(&mut self, other: &mut ChangeList) {
        if self.is_empty() {
            std::mem::swap(self, other);
            return;
        }
        self.bytes.append(&mut other.bytes);
        self.len += std::mem::take(&mut other.len);
    }

    /// Makes room for `bytes` more bytes of changes (see [`ChangeList::byte_len`]).
    pub fn reserve_bytes(&mut self, bytes: usize) {
        self.bytes.reserve_exact(bytes);
    }

    /// The size of the encoded changes.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    pub fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit();
    }
}

/// Decodes the change at `at`, moving `at` past it. The bytes are this module's own.
fn decode(bytes: &[u8], at: &mut usize) -> Change {
    let tag = bytes[*at];
    *at += 1;
    let key = Packed::unpack_bytes(get_packing(bytes, at));
    match tag {
        INSERT => Change::Upsert {
            key,
            old: None,
            new: Packed::from_bytes(get_packing(bytes, at)),
        },
        UPDATE => {
            let old = Packed::from_bytes(get_packing(bytes, at));
            Change::Upsert {
                key,
                old: Some(old),
                new: Packed::from_bytes(get_packing(bytes, at)),
            }
        }
        DELETE => Change::Delete {
            key,
            old: Packed::from_bytes(get_packing(bytes, at)),
        },
        _ => {
            let old = get_varint(bytes, at);
            Change::SetCount {
                row: key,
                old,
                new: get_varint(bytes, at),
            }
        }
    }
}

/// See [`ChangeList::iter`].
#[derive(Debug)]
pub struct Iter<'a> {
    bytes: &'a [u8],
    at: usize,
    left: usize,
}

impl Iterator for Iter<'_> {
    type Item = Change;

    fn next(&mut self) -> Option<Change> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        Some(decode(self.bytes, &mut self.at))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a ChangeList {
    type Item = Change;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl Extend<Change> for ChangeList {
    fn extend<I: IntoIterator<Item = Change>>(&mut self, changes: I) {
        for change in changes {
            self.push(&change);
        }
    }
}

impl FromIterator<Change> for ChangeList {
    fn from_iter<I: IntoIterator<Item = Change>>(changes: I) -> ChangeList {
        let mut list = ChangeList::new();
        list.extend(changes);
        list
    }
}

impl From<Vec<Change>> for ChangeList {
    fn from(changes: Vec<Change>) -> ChangeList {
        changes.into_iter().collect()
    }
}

impl fmt::Debug for ChangeList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// As the list of its changes.
impl Serialize for ChangeList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.len))?;
        for change in self {
            seq.serialize_element(&change)?;
        }
        seq.end()
    }
}

/// From a list of changes, encoded as each is read.
impl<'de> Deserialize<'de> for ChangeList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ChangeList, D::Error> {
        struct Changes;
        impl<'de> Visitor<'de> for Changes {
            type Value = ChangeList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of changes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ChangeList, A::Error> {
                let mut list = ChangeList::new();
                while let Some(change) = seq.next_element::<Change>()? {
                    list.push(&change);
                }
                Ok(list)
            }
        }
        d.deserialize_seq(Changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::value::Cell;
    use proptest::prelude::*;
    use rusqlite::types::Value;

    fn cell() -> impl Strategy<Value = Cell> {
        prop_oneof![
            Just(Cell::Sql(Value::Null)),
            any::<i64>().prop_map(|i| Cell::Sql(Value::Integer(i))),
            any::<f64>().prop_map(|f| Cell::Sql(Value::Real(f))),
            ".{0,12}".prop_map(|t| Cell::Sql(Value::Text(t))),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| Cell::Sql(Value::Blob(b))),
            // As a read gives it: TEXT that is not UTF-8 is kept as its bytes.
            proptest::collection::vec(any::<u8>(), 0..6).prop_map(|b| match String::from_utf8(b) {
                Ok(t) => Cell::Sql(Value::Text(t)),
                Err(e) => Cell::RawText(e.into_bytes()),
            }),
        ]
    }

    fn row() -> impl Strategy<Value = Vec<Cell>> {
        proptest::collection::vec(cell(), 0..5)
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            (row(), proptest::option::of(row()), row()).prop_map(|(key, old, new)| {
                Change::Upsert {
                    key,
                    old: old.map(Packed::from),
                    new: Packed::from(new),
                }
            }),
            (row(), row()).prop_map(|(key, old)| Change::Delete {
                key,
                old: Packed::from(old),
            }),
            (row(), any::<u64>(), any::<u64>()).prop_map(|(row, old, new)| Change::SetCount {
                row,
                old,
                new
            }),
        ]
    }

    proptest! {
        /// A list reads back, keeps, appends and serializes as the `Vec` it stands for.
        #[test]
        fn a_list_holds_exactly_its_changes(
            a in proptest::collection::vec(change(), 0..12),
            b in proptest::collection::vec(change(), 0..12),
            keep in proptest::collection::vec(any::<bool>(), 12),
        ) {
            let mut list = ChangeList::from(a.clone());
            prop_assert_eq!(list.len(), a.len());
            prop_assert_eq!(list.to_vec(), a.clone());
            prop_assert_eq!(list.counts(), crate::db::merge::counts(&a));
            let json = serde_json::to_string(&list).unwrap();
            prop_assert_eq!(&json, &serde_json::to_string(&a).unwrap());
            let read: ChangeList = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(read.to_vec(), a.clone());

            let mut i = 0;
            list.retain(|_| { i += 1; keep[i - 1] });
            let kept: Vec<Change> =
                a.iter().zip(&keep).filter(|(_, k)| **k).map(|(c, _)| c.clone()).collect();
            prop_assert_eq!(list.to_vec(), kept.clone());

            list.append(&mut ChangeList::from(b.clone()));
            let both: Vec<Change> = kept.into_iter().chain(b).collect();
            prop_assert_eq!(list.len(), both.len());
            prop_assert_eq!(list.to_vec(), both);
        }
    }
}
