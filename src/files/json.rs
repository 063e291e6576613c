//! The three-way merge of JSON files, key by key.
//!
//! Laws (unit and property tests below):
//! - A key changed on one side takes that change; a key changed the same way on both sides
//!   takes it once; a key removed on one side and unchanged on the other is removed.
//! - A numeric key named in `json_counters` takes `base + (central - base) + (peer - base)`
//!   wherever it occurs: every delta of either side is counted once, also when both sides
//!   made the same change (+20 on each side is +40). A file new on both sides has no base
//!   and so no deltas: its counters are compared like any key (a differing one is a
//!   conflict the policy resolves, never a sum that would create coins).
//! - Objects changed on both sides merge recursively; any other value changed differently
//!   on both sides is a conflict on that key, resolved by the winner given, and reported
//!   with the three values.
//! - The merged object keeps central's key order, with keys only the peer has appended in
//!   the peer's order.

use serde_json::{Map, Number, Value};

/// A key both sides changed to different values.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyConflict {
    /// `/`-separated path of keys from the top object (`profile/nick`).
    pub key: String,
    pub base: Option<Value>,
    pub central: Option<Value>,
    pub peer: Option<Value>,
}

/// Which side's value a conflicting key takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefer {
    Central,
    Peer,
}

/// Merges two objects against their base. `None` for a base means the file is new on both
/// sides (merged against an empty object, without counters).
pub fn merge3(
    base: Option<&Map<String, Value>>,
    central: &Map<String, Value>,
    peer: &Map<String, Value>,
    counters: &[String],
    prefer: Prefer,
) -> (Map<String, Value>, Vec<KeyConflict>) {
    let empty = Map::new();
    let mut conflicts = Vec::new();
    let counters = if base.is_some() { counters } else { &[] };
    let merged = merge_objects(
        base.unwrap_or(&empty),
        central,
        peer,
        counters,
        prefer,
        "",
        &mut conflicts,
    );
    (merged, conflicts)
}

fn merge_objects(
    base: &Map<String, Value>,
    central: &Map<String, Value>,
    peer: &Map<String, Value>,
    counters: &[String],
    prefer: Prefer,
    at: &str,
    conflicts: &mut Vec<KeyConflict>,
) -> Map<String, Value> {
    let mut out = Map::new();
    let keys = central
        .keys()
        .chain(peer.keys().filter(|k| !central.contains_key(*k)))
        .chain(
            base.keys()
                .filter(|k| !central.contains_key(*k) && !peer.contains_key(*k)),
        );
    for key in keys {
        let path = if at.is_empty() {
            key.clone()
        } else {
            format!("{at}/{key}")
        };
        let (b, c, p) = (base.get(key), central.get(key), peer.get(key));
        let value = if counters.iter().any(|k| k == key)
            && let Some(sum) = counter(b, c, p)
        {
            Some(sum)
        } else if c == p {
            c.cloned()
        } else if c == b {
            p.cloned()
        } else if p == b {
            c.cloned()
        } else if let (Some(Value::Object(c)), Some(Value::Object(p))) = (c, p) {
            let empty = Map::new();
            let b = match b {
                Some(Value::Object(b)) => b,
                _ => &empty,
            };
            Some(Value::Object(merge_objects(
                b, c, p, counters, prefer, &path, conflicts,
            )))
        } else {
            conflicts.push(KeyConflict {
                key: path,
                base: b.cloned(),
                central: c.cloned(),
                peer: p.cloned(),
            });
            match prefer {
                Prefer::Central => c.cloned(),
                Prefer::Peer => p.cloned(),
            }
        };
        if let Some(v) = value {
            out.insert(key.clone(), v);
        }
    }
    out
}

/// `base + (central - base) + (peer - base)` when every present value is a number; a side
/// without the key counts as its base (it did not change it), a base without it as 0.
fn counter(b: Option<&Value>, c: Option<&Value>, p: Option<&Value>) -> Option<Value> {
    fn num(v: Option<&Value>) -> Option<Option<&Number>> {
        match v {
            None => Some(None),
            Some(Value::Number(n)) => Some(Some(n)),
            Some(_) => None,
        }
    }
    let (b, c, p) = (num(b)?, num(c)?, num(p)?);
    if c.is_none() && p.is_none() {
        return None;
    }
    let (c, p) = (c.or(b), p.or(b));
    if let (Some(bi), Some(ci), Some(pi)) = (
        b.map_or(Some(0), Number::as_i64),
        c.map_or(Some(0), Number::as_i64),
        p.map_or(Some(0), Number::as_i64),
    ) && let Some(sum) = ci.checked_add(pi).and_then(|s| s.checked_sub(bi))
    {
        return Some(Value::from(sum));
    }
    let f = |n: Option<&Number>| n.and_then(Number::as_f64).unwrap_or(0.0);
    Number::from_f64(f(c) + f(p) - f(b)).map(Value::Number)
}

/// How a JSON file was written, so a merged one is written the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// Spaces per level; `None`: on one line.
    pub indent: Option<usize>,
    pub trailing_newline: bool,
}

impl Style {
    pub fn of(text: &str) -> Style {
        let body = text.trim_end_matches('\n');
        let indent = body.find('\n').map(|i| {
            body[i + 1..]
                .bytes()
                .take_while(|b| *b == b' ')
                .count()
                .max(1)
        });
        Style {
            indent,
            trailing_newline: text.ends_with('\n'),
        }
    }

    pub fn render(self, value: &Value) -> Vec<u8> {
        let mut out = match self.indent {
            None => serde_json::to_vec(value).unwrap_or_default(),
            Some(n) => {
                let indent = vec![b' '; n];
                let mut buf = Vec::new();
                let fmt = serde_json::ser::PrettyFormatter::with_indent(&indent);
                let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
                match serde::Serialize::serialize(value, &mut ser) {
                    Ok(()) => buf,
                    Err(_) => serde_json::to_vec(value).unwrap_or_default(),
                }
            }
        };
        if self.trailing_newline {
            out.push(b'\n');
        }
        out
    }
}

/// The bytes as a JSON object, if they are one.
pub fn object(bytes: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// Whether `bytes` may be a JSON object (first and last non-blank bytes are braces),
/// without parsing it: decides which contents are kept for later merges, where keeping
/// one that is not is harmless ([`object`] decides when merging).
pub fn looks_like_object(bytes: &[u8]) -> bool {
    let t = bytes.trim_ascii();
    t.first() == Some(&b'{') && t.last() == Some(&b'}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn merge(b: Value, c: Value, p: Value) -> (Value, Vec<KeyConflict>) {
        let counters = vec!["balance".to_string(), "coins".to_string()];
        let (m, k) = merge3(Some(&obj(b)), &obj(c), &obj(p), &counters, Prefer::Central);
        (Value::Object(m), k)
    }

    #[test]
    fn counters_add_both_deltas() {
        let b = json!({"user_id": "1-andy", "balance": 1280});
        let (m, k) = merge(
            b,
            json!({"user_id": "1-andy", "balance": 1300}),
            json!({"user_id": "1-andy", "balance": 1270}),
        );
        assert_eq!(m, json!({"user_id": "1-andy", "balance": 1290}));
        assert!(k.is_empty());
        // The same change on both sides is two changes.
        let (m, _) = merge(
            json!({"balance": 100}),
            json!({"balance": 120}),
            json!({"balance": 120}),
        );
        assert_eq!(m, json!({"balance": 140}));
        let (m, _) = merge(
            json!({"balance": 1.5}),
            json!({"balance": 2.5}),
            json!({"balance": 1.5}),
        );
        assert_eq!(m, json!({"balance": 2.5}));
    }

    #[test]
    fn keys_merge_one_by_one_and_conflicts_name_the_key() {
        let (m, k) = merge(
            json!({"nick": "a", "mail": "x", "profile": {"bio": "", "site": ""}}),
            json!({"nick": "b", "mail": "x", "profile": {"bio": "hi", "site": ""}}),
            json!({"nick": "c", "mail": "y", "profile": {"bio": "", "site": "s"}, "new": 1}),
        );
        assert_eq!(
            m,
            json!({"nick": "b", "mail": "y", "profile": {"bio": "hi", "site": "s"}, "new": 1})
        );
        assert_eq!(k.len(), 1);
        assert_eq!(k[0].key, "nick");
        assert_eq!(k[0].peer, Some(json!("c")));
    }

    #[test]
    fn a_file_new_on_both_sides_adds_no_counters() {
        let counters = vec!["balance".to_string()];
        let (m, k) = merge3(
            None,
            &obj(json!({"balance": 10})),
            &obj(json!({"balance": 5})),
            &counters,
            Prefer::Central,
        );
        assert_eq!(Value::Object(m), json!({"balance": 10}));
        assert_eq!(k.len(), 1, "a conflict, recorded");
    }

    #[test]
    fn a_key_removed_on_one_side_is_removed() {
        let (m, k) = merge(
            json!({"a": 1, "b": 2}),
            json!({"a": 1}),
            json!({"a": 1, "b": 2}),
        );
        assert_eq!(m, json!({"a": 1}));
        assert!(k.is_empty());
    }

    #[test]
    fn style_is_kept() {
        let pretty = "{\n    \"a\": 1\n}\n";
        let s = Style::of(pretty);
        assert_eq!(
            s,
            Style {
                indent: Some(4),
                trailing_newline: true
            }
        );
        assert_eq!(s.render(&json!({"a": 1})), pretty.as_bytes());
        let compact = "{\"a\":1}";
        assert_eq!(
            Style::of(compact).render(&json!({"a": 1})),
            compact.as_bytes()
        );
    }

    proptest::proptest! {
        /// Every delta of either side is counted once.
        #[test]
        fn counter_law(b in -1000i64..1000, dc in -1000i64..1000, dp in -1000i64..1000) {
            let (m, k) = merge(
                json!({"coins": b}),
                json!({"coins": b + dc}),
                json!({"coins": b + dp}),
            );
            proptest::prop_assert_eq!(m, json!({"coins": b + dc + dp}));
            proptest::prop_assert!(k.is_empty());
        }

        /// Merging with one side unchanged gives the other side.
        #[test]
        fn one_sided_is_the_change(a in 0i64..5, x in 0i64..5, y in 0i64..5) {
            let base = json!({"k": a, "n": {"x": x}});
            let side = json!({"k": y, "n": {"x": x + y}, "z": a});
            let (m, k) = merge(base.clone(), base.clone(), side.clone());
            proptest::prop_assert_eq!(&m, &side);
            proptest::prop_assert!(k.is_empty());
            let (m, _) = merge(base.clone(), side.clone(), base);
            proptest::prop_assert_eq!(m, side);
        }
    }
}
