//! Property tests of the merge laws through the real sync path (SQLite files, the binary):
//! after a sync both sides hold the same rows; every cell either side wrote is present (the
//! `updated_at` column keeps the newer stamp when both wrote it) or the side's row stands
//! in a conflict record; a second sync changes nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{Root, stderr_of};
use proptest::prelude::*;
use rusqlite::{Connection, types::Value};

#[derive(Debug, Clone)]
enum Op {
    Put(i64, Option<String>, Option<i64>),
    Delete(i64),
    Seen(String),
}

fn op() -> impl Strategy<Value = Op> {
    let text =
        prop::option::of(prop::sample::select(vec!["a", "b", "c", ""]).prop_map(String::from));
    prop_oneof![
        (0..12i64, text, prop::option::of(0..3i64)).prop_map(|(k, t, n)| Op::Put(k, t, n)),
        (0..12i64).prop_map(Op::Delete),
        prop::sample::select(vec!["x", "y"]).prop_map(|s| Op::Seen(s.into())),
    ]
}

fn apply(db: &Path, ops: &[Op]) {
    let c = Connection::open(db).unwrap();
    for op in ops {
        match op {
            Op::Put(k, t, n) => {
                c.execute(
                    "INSERT OR REPLACE INTO t VALUES (?1, ?2, ?3)",
                    rusqlite::params![k, t, n],
                )
                .unwrap();
            }
            Op::Delete(k) => {
                c.execute("DELETE FROM t WHERE k = ?1", [k]).unwrap();
            }
            Op::Seen(s) => {
                c.execute("INSERT INTO seen VALUES (?1)", [s]).unwrap();
            }
        }
    }
}

type Rows = BTreeMap<i64, (Value, Value)>;

fn rows(db: &Path) -> Rows {
    let c = Connection::open(db).unwrap();
    let mut s = c.prepare("SELECT k, t, n FROM t").unwrap();
    s.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn seen(db: &Path) -> Vec<String> {
    let c = Connection::open(db).unwrap();
    let mut s = c.prepare("SELECT s FROM seen ORDER BY s").unwrap();
    s.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Integer(i) => (*i).into(),
        Value::Text(t) => t.clone().into(),
        _ => unreachable!(),
    }
}

/// An `updated_at` stamp's order: NULL before any number, as SQLite sorts them.
fn stamp(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => Some(*i),
        _ => None,
    }
}

fn sync(r: &Root) -> String {
    let out = r.cmd().args(["db", "sync"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    String::from_utf8(out.stdout).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn sync_converges_keeps_every_write_and_is_idempotent(
        start in prop::collection::vec(op(), 0..10),
        on_central in prop::collection::vec(op(), 0..10),
        on_peer in prop::collection::vec(op(), 0..10),
        policy in prop::sample::select(vec!["central-wins", "peer-wins", "newest-wins"]),
    ) {
        let r = Root::new();
        let peer = r.tmp.path().join("peer.db");
        Connection::open(&peer).unwrap().execute_batch(
            "CREATE TABLE t (k INTEGER PRIMARY KEY, t TEXT, n INTEGER); CREATE TABLE seen (s TEXT);"
        ).unwrap();
        apply(&peer, &start);
        r.write_config(&format!(
            "[[database.db]]\nname = \"p\"\npolicy = \"{policy}\"\nupdated_at = \"n\"\n\
             peers = [{{ name = \"bot\", path = \"{}\" }}]\n", peer.display()));
        sync(&r);
        let central = r.path("databases/p.db");
        let (seen_before, c0) = (seen(&peer), rows(&central));
        apply(&central, &on_central);
        apply(&peer, &on_peer);
        let (wrote_c, wrote_p) = (rows(&central), rows(&peer));
        let (seen_c, seen_p) = (seen(&central), seen(&peer));
        sync(&r);

        // Both sides hold the same rows.
        let (after_c, after_p) = (rows(&central), rows(&peer));
        prop_assert_eq!(&after_c, &after_p);
        prop_assert_eq!(seen(&central), seen(&peer));
        // Multiset: each side's inserts are added.
        prop_assert_eq!(
            seen(&central).len() + seen_before.len(),
            seen_c.len() + seen_p.len()
        );

        // Every cell a side wrote (changed from the start) is there, and a row it deleted is
        // gone, or the side's row is in a conflict record. Cells the other side changed
        // alone merge in (cell by cell), so a written row need not be there whole; `n` is
        // the `updated_at` column: when both sides stamp a row the newer stamp stays, and
        // that alone is no conflict.
        let out = r.cmd().args(["db", "conflicts", "--json"]).output().unwrap();
        let conflicts: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        for (side, wrote, image) in [("central", &wrote_c, "central"), ("peer", &wrote_p, "peer")] {
            let keys: std::collections::BTreeSet<i64> = wrote.keys().chain(c0.keys()).copied().collect();
            for k in keys {
                let now = wrote.get(&k);
                if now == c0.get(&k) {
                    continue; // this side did not change the key
                }
                let kept = match (now, c0.get(&k), after_c.get(&k)) {
                    (None, _, after) => after.is_none(),
                    (Some(w), Some(s), Some(a)) => {
                        (w.0 == s.0 || w.0 == a.0) && (w.1 == s.1 || stamp(&a.1) >= stamp(&w.1))
                    }
                    (Some(w), None, Some(a)) => w == a,
                    (Some(_), _, None) => false,
                };
                if kept {
                    continue;
                }
                let want = now.map(|(t, n)| serde_json::json!([k, json(t), json(n)]));
                let recorded = conflicts.iter().any(|c| {
                    c["key"] == serde_json::json!([k])
                        && c["rows"][image] == want.clone().unwrap_or(serde_json::Value::Null)
                });
                prop_assert!(recorded, "{side}'s write of key {k} ({now:?}) is lost: {after_c:?} {conflicts:?}");
            }
        }

        // A second sync changes nothing and records nothing.
        let before = (std::fs::read(&central).unwrap(), std::fs::read(&peer).unwrap());
        let again = sync(&r);
        prop_assert!(again.contains("in sync"), "{}", again);
        prop_assert_eq!(before, (std::fs::read(&central).unwrap(), std::fs::read(&peer).unwrap()));
        let out = r.cmd().args(["db", "conflicts", "--json"]).output().unwrap();
        let after: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        prop_assert_eq!(after.len(), conflicts.len());
    }
}

// ---- "Stop, then complete" equals "complete": the exactness law as a property. ----

/// A change an application makes: upsert a row's text, add to its counter, delete it, add
/// or remove one occurrence of a multiset row.
#[derive(Debug, Clone)]
enum Step {
    Put(i64, String),
    Add(i64, i64),
    Del(i64),
    Seen(String),
    Unseen(String),
}

fn step() -> impl Strategy<Value = Step> {
    let word = prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from);
    prop_oneof![
        (0..6i64, word.clone()).prop_map(|(k, t)| Step::Put(k, t)),
        // Small deltas, so equal ones on both sides are common.
        (0..6i64, -1..3i64).prop_map(|(k, d)| Step::Add(k, d)),
        (0..6i64).prop_map(Step::Del),
        word.clone().prop_map(Step::Seen),
        word.prop_map(Step::Unseen),
    ]
}

fn run_steps(db: &Path, steps: &[Step]) {
    let c = Connection::open(db).unwrap();
    for s in steps {
        match s {
            Step::Put(k, t) => c.execute(
                "INSERT INTO t VALUES (?1, ?2, 0) ON CONFLICT (k) DO UPDATE SET t = excluded.t",
                rusqlite::params![k, t],
            ),
            Step::Add(k, d) => c.execute(
                "UPDATE t SET c = c + ?2 WHERE k = ?1",
                rusqlite::params![k, d],
            ),
            Step::Del(k) => c.execute("DELETE FROM t WHERE k = ?1", [k]),
            Step::Seen(s) => c.execute("INSERT INTO seen VALUES (?1)", [s]),
            Step::Unseen(s) => c.execute(
                "DELETE FROM seen WHERE rowid = (SELECT rowid FROM seen WHERE s = ?1 LIMIT 1)",
                [s],
            ),
        }
        .unwrap();
    }
}

/// One world: a central copy and one peer, synced from a common start.
struct Twin {
    r: Root,
    peer: std::path::PathBuf,
}

impl Twin {
    fn new(start: &[Step], policy: &str) -> Twin {
        let r = Root::new();
        let peer = r.tmp.path().join("peer.db");
        Connection::open(&peer)
            .unwrap()
            .execute_batch(
                "CREATE TABLE t (k INTEGER PRIMARY KEY, t TEXT, c INTEGER NOT NULL DEFAULT 0);
                 CREATE TABLE seen (s TEXT);",
            )
            .unwrap();
        run_steps(&peer, start);
        r.write_config(&format!(
            "[database]\nbackup_interval = \"0s\"\n[[database.db]]\nname = \"p\"\n\
             policy = \"{policy}\"\ncounters = {{ t = [\"c\"] }}\n\
             peers = [{{ name = \"bot\", path = \"{}\" }}]\n",
            peer.display()
        ));
        sync(&r);
        Twin { r, peer }
    }

    fn central(&self) -> std::path::PathBuf {
        self.r.path("databases/p.db")
    }

    fn rows(db: &Path) -> Vec<(i64, Option<String>, i64)> {
        let c = Connection::open(db).unwrap();
        let mut s = c.prepare("SELECT k, t, c FROM t ORDER BY k").unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    fn counters(db: &Path) -> BTreeMap<i64, i64> {
        let c = Connection::open(db).unwrap();
        let mut s = c.prepare("SELECT k, c FROM t").unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    fn seen_counts(db: &Path) -> BTreeMap<String, i64> {
        let mut m = BTreeMap::new();
        for s in seen(db) {
            *m.entry(s).or_insert(0) += 1;
        }
        m
    }

    fn conflicts(&self) -> Vec<serde_json::Value> {
        let text =
            std::fs::read_to_string(self.r.path("state/conflicts.jsonl")).unwrap_or_default();
        let mut ids = std::collections::BTreeSet::new();
        text.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert!(
                    ids.insert(v["id"].to_string()),
                    "conflict recorded twice: {l}"
                );
                let o = v.as_object_mut().unwrap();
                o.remove("id");
                o.remove("time");
                v
            })
            .collect()
    }
}

/// Where a sync may stop: each point of the commit protocol, and a roll-forward stopped
/// too (a comma arms both points, so each later run stops again during its roll-forward).
fn stops() -> Vec<&'static str> {
    let mut v = common::FAULT_POINTS.to_vec();
    v.push("after-peer-commit,during-roll-forward");
    v
}

proptest! {
    // 24 cases in CI; PROPTEST_CASES=N for a longer search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_stopped_sync_completed_later_equals_one_uninterrupted_sync(
        start in prop::collection::vec(step(), 0..12),
        on_central in prop::collection::vec(step(), 0..10),
        on_peer in prop::collection::vec(step(), 0..10),
        policy in prop::sample::select(vec!["central-wins", "peer-wins", "newest-wins"]),
        stop in prop::sample::select(stops()),
        times in 1..4usize,
        full_disk in any::<bool>(),
    ) {
        let (stopped, clean) = (Twin::new(&start, policy), Twin::new(&start, policy));
        let before = (Twin::counters(&clean.central()), Twin::seen_counts(&clean.central()));
        for w in [&stopped, &clean] {
            run_steps(&w.central(), &on_central);
            run_steps(&w.peer, &on_peer);
        }
        let wrote = (
            Twin::counters(&clean.central()), Twin::counters(&clean.peer),
            Twin::seen_counts(&clean.central()), Twin::seen_counts(&clean.peer),
        );
        sync(&clean.r);
        let fault = if full_disk {
            stop.split(',').map(|p| format!("{p}:enospc")).collect::<Vec<_>>().join(",")
        } else {
            stop.to_string()
        };
        for _ in 0..times {
            stopped.r.cmd().args(["db", "sync"]).env("CR0SYNC_FAULT", &fault).output().unwrap();
        }
        sync(&stopped.r);
        sync(&stopped.r);
        sync(&clean.r);

        // Stop, then complete == complete: every cell, every multiset row, every record.
        for (a, b) in [(stopped.central(), clean.central()), (stopped.peer.clone(), clean.peer.clone())] {
            prop_assert_eq!(Twin::rows(&a), Twin::rows(&b));
            prop_assert_eq!(seen(&a), seen(&b));
        }
        prop_assert_eq!(stopped.conflicts(), clean.conflicts());

        // And complete obeys the arithmetic: a counter on a row every side kept ends at
        // base + both deltas; a multiset row occurs base + both sides' changes times.
        let (base_c, base_s) = before;
        let (wc, wp, sc, sp) = wrote;
        let after = Twin::counters(&stopped.central());
        for (k, b) in &base_c {
            if let (Some(c), Some(p), Some(a)) = (wc.get(k), wp.get(k), after.get(k)) {
                prop_assert_eq!(*a, b + (c - b) + (p - b), "counter of key {}", k);
            }
        }
        let seen_after = Twin::seen_counts(&stopped.central());
        let words: std::collections::BTreeSet<&String> =
            base_s.keys().chain(sc.keys()).chain(sp.keys()).collect();
        for s in words {
            let n = |m: &BTreeMap<String, i64>| m.get(s).copied().unwrap_or(0);
            let want = (n(&sc) + n(&sp) - n(&base_s)).max(0);
            prop_assert_eq!(n(&seen_after), want, "occurrences of {}", s);
        }
    }
}
