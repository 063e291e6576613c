//! The plan of one pair's sync: per path, what each side holds against the base, and
//! what each side is to hold. Pure decisions over hashes and contents; the reading is done
//! by the caller ([`Known`]).
//!
//! Per path (a side's state is its content hash, or no file):
//! - Unchanged on both sides: nothing (the base's metadata is refreshed if it moved).
//! - Changed on one side: the other side takes it (a delete too).
//! - Changed on both sides to the same content: nothing, unless `json_counters` keys
//!   changed: both deltas count (the merge below yields the sum, written to both).
//! - Changed differently on both sides: JSON objects are merged key by key (see `json`),
//!   a key changed differently on both sides being a `json` conflict resolved by the
//!   policy; anything else is a `file` conflict: the policy's winner goes to both sides
//!   and the loser's content is kept under `state/`.
//! - A one-way pair (`pull`: peer to central, `push`: central to peer) never writes the
//!   other side; its base is then that side's state, so a difference it may not propagate
//!   is not found again every run.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::config::{Direction, Policy};
use crate::conflicts::{ConflictKind, Winner};
use crate::files::json::{self, Prefer, Style};
use crate::files::store::{Change, JournalEntry, Side};

/// What one side holds at a path, as far as the plan needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Known {
    /// `None`: no file.
    pub sha256: Option<String>,
    /// The bytes, when the file is small enough to merge.
    pub content: Option<Vec<u8>>,
    pub mtime_ns: i128,
    pub mode: u32,
}

/// A conflict the plan decided, before it becomes a record.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    pub path: String,
    pub kind: ConflictKind,
    /// The JSON key (`json`), or empty (`file`).
    pub key: String,
    pub base: Value,
    pub central: Value,
    pub peer: Value,
    pub winner: Winner,
    pub result: Value,
    /// `file`: the side whose content lost (kept under `state/`).
    pub loser: Option<Side>,
}

/// What the plan decides for one path.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PathPlan {
    /// Writes to make, if any.
    pub entry: Option<JournalEntry>,
    /// The base when nothing is written (`Some(None)`: the path leaves the base).
    pub settle: Option<Option<String>>,
    /// Contents the entry needs that the store may not have (merge results).
    pub objects: Vec<(String, Vec<u8>)>,
    pub conflicts: Vec<Decided>,
}

/// The rules of a tree's pair.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub policy: Policy,
    pub direction: Direction,
    pub counters: &'a [String],
}

/// Decides one path. `base` is the agreed content (hash and bytes when kept).
pub fn decide(
    path: &str,
    base: Option<(&str, Option<&[u8]>)>,
    central: &Known,
    peer: &Known,
    rules: Rules,
) -> PathPlan {
    let b = base.map(|(h, _)| h);
    let (c, p) = (central.sha256.as_deref(), peer.sha256.as_deref());
    let mut plan = PathPlan::default();
    let both = |res: Option<&str>| JournalEntry {
        path: path.to_string(),
        base_after: res.map(str::to_string),
        central: Change {
            pre: c.map(str::to_string),
            res: res.map(str::to_string),
            unwritten: false,
        },
        peer: Change {
            pre: p.map(str::to_string),
            res: res.map(str::to_string),
            unwritten: false,
        },
        source: None,
    };
    if c == p {
        // Equal changes add their counters (against a base: a file new on both sides with
        // the same content is simply the same file).
        let merged = (c != b && b.is_some() && !rules.counters.is_empty())
            .then(|| merge_json(base, central, peer, rules))
            .flatten();
        match merged {
            Some((bytes, _)) if Some(sha(&bytes).as_str()) != c => {
                let res = sha(&bytes);
                plan.entry = Some(both(Some(&res)));
                plan.objects.push((res, bytes));
            }
            _ if c == b => {}
            _ => plan.settle = Some(c.map(str::to_string)),
        }
    } else if c == b {
        let mut e = both(p);
        e.source = Some(Side::Peer);
        plan.entry = Some(e);
    } else if p == b {
        let mut e = both(c);
        e.source = Some(Side::Central);
        plan.entry = Some(e);
    } else if let Some((bytes, keys)) = merge_json(base, central, peer, rules) {
        let res = sha(&bytes);
        plan.entry = Some(both(Some(&res)));
        plan.objects.push((res, bytes));
        plan.conflicts = keys;
        for k in &mut plan.conflicts {
            k.path = path.to_string();
        }
    } else {
        let winner = whole_file_winner(central, peer, rules.policy);
        let (win, lose) = match winner {
            Winner::Central => (central, Side::Peer),
            Winner::Peer => (peer, Side::Central),
        };
        let mut e = both(win.sha256.as_deref());
        e.source = Some(lose.other());
        plan.entry = Some(e);
        let image = |k: &Known| match &k.sha256 {
            Some(h) => json!({"sha256": h}),
            None => Value::Null,
        };
        plan.conflicts.push(Decided {
            path: path.to_string(),
            kind: ConflictKind::File,
            key: String::new(),
            base: b.map_or(Value::Null, |h| json!({"sha256": h})),
            central: image(central),
            peer: image(peer),
            winner,
            result: image(win),
            loser: Some(lose),
        });
    }
    if let Some(e) = plan.entry.take() {
        plan.entry = one_way(e, rules.direction, &mut plan.settle);
    }
    plan
}

/// A one-way pair keeps the writes to its target side only; the base is then the state
/// of the side it may not write.
fn one_way(
    mut e: JournalEntry,
    direction: Direction,
    settle: &mut Option<Option<String>>,
) -> Option<JournalEntry> {
    let frozen = match direction {
        Direction::Both => return Some(e),
        Direction::Pull => Side::Peer,
        Direction::Push => Side::Central,
    };
    let keep = e.side(frozen).pre.clone();
    e.side_mut(frozen).res = keep.clone();
    e.base_after = keep.clone();
    if e.side(frozen.other()).writes() {
        Some(e)
    } else {
        *settle = Some(keep);
        None
    }
}

/// `newest-wins` compares mtimes (a side without the file has none: the file wins); ties
/// fall back to central.
fn whole_file_winner(central: &Known, peer: &Known, policy: Policy) -> Winner {
    match policy {
        Policy::CentralWins => Winner::Central,
        Policy::PeerWins => Winner::Peer,
        Policy::NewestWins => match (&central.sha256, &peer.sha256) {
            (None, Some(_)) => Winner::Peer,
            (Some(_), None) => Winner::Central,
            _ if peer.mtime_ns > central.mtime_ns => Winner::Peer,
            _ => Winner::Central,
        },
    }
}

/// The key-by-key merge, when both sides (and the base, if any) are JSON objects whose
/// bytes are at hand. Returns the bytes to write (in central's style) and the conflicts.
fn merge_json(
    base: Option<(&str, Option<&[u8]>)>,
    central: &Known,
    peer: &Known,
    rules: Rules,
) -> Option<(Vec<u8>, Vec<Decided>)> {
    let c_bytes = central.content.as_deref()?;
    let c = json::object(c_bytes)?;
    let p = json::object(peer.content.as_deref()?)?;
    let b = match base {
        None => None,
        Some((_, bytes)) => Some(json::object(bytes?)?),
    };
    let prefer = match whole_file_winner(central, peer, rules.policy) {
        Winner::Central => Prefer::Central,
        Winner::Peer => Prefer::Peer,
    };
    let (merged, keys) = json::merge3(b.as_ref(), &c, &p, rules.counters, prefer);
    let style = Style::of(std::str::from_utf8(c_bytes).unwrap_or(""));
    let bytes = style.render(&Value::Object(merged));
    let winner = match prefer {
        Prefer::Central => Winner::Central,
        Prefer::Peer => Winner::Peer,
    };
    let decided = keys
        .into_iter()
        .map(|k| Decided {
            path: String::new(),
            kind: ConflictKind::Json,
            result: match winner {
                Winner::Central => k.central.clone(),
                Winner::Peer => k.peer.clone(),
            }
            .unwrap_or(Value::Null),
            key: k.key,
            base: k.base.unwrap_or(Value::Null),
            central: k.central.unwrap_or(Value::Null),
            peer: k.peer.unwrap_or(Value::Null),
            winner,
            loser: None,
        })
        .collect();
    Some((bytes, decided))
}

fn sha(bytes: &[u8]) -> String {
    crate::files::write::sha256(bytes)
}

/// How many files a plan creates, changes and removes on one side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub created: u64,
    pub changed: u64,
    pub removed: u64,
}

impl Counts {
    pub fn add(&mut self, c: &Change) {
        match (&c.pre, &c.res) {
            (None, Some(_)) => self.created += 1,
            (Some(_), None) => self.removed += 1,
            (Some(a), Some(b)) if a != b => self.changed += 1,
            _ => {}
        }
    }

    pub fn total(&self) -> u64 {
        self.created + self.changed + self.removed
    }
}

/// Counts of a set of entries per side.
pub fn counts(entries: &[JournalEntry]) -> BTreeMap<Side, Counts> {
    let mut out = BTreeMap::new();
    for e in entries {
        for side in [Side::Central, Side::Peer] {
            out.entry(side)
                .or_insert_with(Counts::default)
                .add(e.side(side));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(text: Option<&str>, mtime_ns: i128) -> Known {
        Known {
            sha256: text.map(|t| sha(t.as_bytes())),
            content: text.map(|t| t.as_bytes().to_vec()),
            mtime_ns,
            mode: 0o644,
        }
    }

    const RULES: Rules = Rules {
        policy: Policy::NewestWins,
        direction: Direction::Both,
        counters: &[],
    };

    fn plan(b: Option<&str>, c: Option<&str>, p: Option<&str>, rules: Rules) -> PathPlan {
        let bh = b.map(|t| sha(t.as_bytes()));
        let base = b.map(|t| (bh.as_deref().unwrap_or(""), Some(t.as_bytes())));
        decide("f", base, &known(c, 1), &known(p, 2), rules)
    }

    fn results(p: &PathPlan) -> (Option<String>, Option<String>) {
        let e = p.entry.as_ref().unwrap();
        (e.central.res.clone(), e.peer.res.clone())
    }

    #[test]
    fn a_one_sided_change_goes_to_the_other_side() {
        let p = plan(Some("a"), Some("a"), Some("b"), RULES);
        assert_eq!(results(&p), (Some(sha(b"b")), Some(sha(b"b"))));
        assert!(p.conflicts.is_empty());
        let p = plan(Some("a"), None, Some("a"), RULES);
        assert_eq!(results(&p), (None, None), "a delete is a change");
        let p = plan(None, None, Some("new"), RULES);
        assert_eq!(results(&p).0, Some(sha(b"new")));
    }

    #[test]
    fn unchanged_and_equal_changes_write_nothing() {
        assert_eq!(
            plan(Some("a"), Some("a"), Some("a"), RULES),
            PathPlan::default()
        );
        let p = plan(Some("a"), Some("b"), Some("b"), RULES);
        assert!(p.entry.is_none());
        assert_eq!(p.settle, Some(Some(sha(b"b"))));
    }

    #[test]
    fn json_counters_add_both_deltas_even_when_equal() {
        let counters = ["balance".to_string()];
        let rules = Rules {
            counters: &counters,
            ..RULES
        };
        let b = r#"{"user_id":"1-andy","balance":1280}"#;
        let p = plan(
            Some(b),
            Some(r#"{"user_id":"1-andy","balance":1300}"#),
            Some(r#"{"user_id":"1-andy","balance":1270}"#),
            rules,
        );
        let want = r#"{"user_id":"1-andy","balance":1290}"#;
        assert_eq!(
            results(&p),
            (Some(sha(want.as_bytes())), Some(sha(want.as_bytes())))
        );
        assert_eq!(p.objects[0].1, want.as_bytes());
        let p = plan(
            Some(r#"{"balance":100}"#),
            Some(r#"{"balance":120}"#),
            Some(r#"{"balance":120}"#),
            rules,
        );
        assert_eq!(p.objects[0].1, br#"{"balance":140}"#);
    }

    #[test]
    fn other_two_way_changes_are_conflicts_with_the_loser_kept() {
        let p = plan(Some("a"), Some("b"), Some("c"), RULES);
        // newest-wins: the peer's mtime is later.
        assert_eq!(results(&p), (Some(sha(b"c")), Some(sha(b"c"))));
        assert_eq!(p.conflicts.len(), 1);
        assert_eq!(p.conflicts[0].kind, ConflictKind::File);
        assert_eq!(p.conflicts[0].loser, Some(Side::Central));
        let p = plan(
            Some(r#"{"nick":"a"}"#),
            Some(r#"{"nick":"b"}"#),
            Some(r#"{"nick":"c"}"#),
            Rules {
                policy: Policy::CentralWins,
                ..RULES
            },
        );
        assert_eq!(p.conflicts[0].kind, ConflictKind::Json);
        assert_eq!(p.conflicts[0].key, "nick");
        assert_eq!(p.objects[0].1, br#"{"nick":"b"}"#);
    }

    #[test]
    fn a_one_way_pair_writes_its_target_only() {
        let pull = Rules {
            direction: Direction::Pull,
            ..RULES
        };
        // Central changed: a pull pair does not write the peer.
        let p = plan(Some("a"), Some("b"), Some("a"), pull);
        assert!(p.entry.is_none());
        assert_eq!(p.settle, Some(Some(sha(b"a"))));
        // Peer changed: central takes it.
        let p = plan(Some("a"), Some("a"), Some("b"), pull);
        let e = p.entry.unwrap();
        assert_eq!(e.central.res, Some(sha(b"b")));
        assert!(!e.peer.writes());
    }
}
