// The operator's conflict cases, included by tests/db_conflicts.rs (local peers) and
// tests/db_conflicts_remote.rs (the same peers behind ssh), which set `REMOTE`.

use std::path::{Path, PathBuf};

use common::{Root, stderr_of};
use rusqlite::Connection;

const FIXTURE: &str = include_str!("../../fixtures/users.sql");

struct Pair {
    r: Root,
    bot: PathBuf,
    web: PathBuf,
    /// Where the peers live (behind an sshd when `REMOTE`).
    _peers: common::sshd::Peers,
}

impl Pair {
    /// `None` where a `REMOTE` run cannot start its sshd (not root; noted on stderr).
    fn new(quiet: bool) -> Option<Pair> {
        Pair::with(quiet, "")
    }

    fn with(quiet: bool, extra: &str) -> Option<Pair> {
        let r = Root::new();
        let peers = common::sshd::Peers::new(REMOTE, r.tmp.path())?;
        let bot = peers.dir.join("bot.db");
        let web = peers.dir.join("web.db");
        for p in [&bot, &web] {
            exec(p, FIXTURE);
            exec(p, extra);
        }
        peers.hand_over();
        let (remote, bot_url, web_url) = (peers.section(), peers.url(&bot), peers.url(&web));
        r.write_config(&format!(
            "{remote}[database]\nquiet_conflicts = {quiet}\n[[database.db]]\nname = \"users\"\n\
             peers = [\n  {{ name = \"bot\", path = \"{bot_url}\" }},\n  {{ name = \"web\", path = \"{web_url}\" }},\n]\n",
        ));
        let p = Pair {
            r,
            bot,
            web,
            _peers: peers,
        };
        p.run(&["db", "sync"]);
        Some(p)
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.r.cmd().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr_of(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Carol renamed differently on each side: one update/update conflict, central wins.
    fn conflict(&self) -> std::process::Output {
        exec(
            &self.bot,
            "UPDATE users SET nick = 'carol_bot' WHERE id = 3",
        );
        self.run(&["db", "sync", "--peer", "bot"]);
        exec(
            &self.web,
            "UPDATE users SET nick = 'carol_web' WHERE id = 3",
        );
        self.r.cmd().args(["cron", "database"]).output().unwrap()
    }

    fn open(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.run(&["db", "conflicts", "--json"])).unwrap()
    }

    fn nick(&self, db: &Path) -> String {
        Connection::open(db)
            .unwrap()
            .query_row("SELECT nick FROM users WHERE id = 3", [], |r| r.get(0))
            .unwrap()
    }

    fn central(&self) -> PathBuf {
        self.r.path("databases/users.db")
    }
}

fn exec(db: &Path, sql: &str) {
    Connection::open(db).unwrap().execute_batch(sql).unwrap();
}

#[test]
fn a_new_conflict_is_mailed_by_cron_listed_open_and_a_status_problem() {
    let Some(p) = Pair::new(false) else { return };
    let cron = p.conflict();
    assert!(cron.status.success());
    let err = stderr_of(&cron);
    let open = p.open();
    assert_eq!(open.len(), 1);
    let id = open[0]["id"].as_str().unwrap();
    assert_eq!(open[0]["open"], true);
    assert_eq!(
        err.lines()
            .filter(|l| l.contains("conflict in users/web"))
            .count(),
        1,
        "{err}"
    );
    assert!(
        err.contains(id) && err.contains("Try: cr0sync db conflicts"),
        "{err}"
    );
    let status = p.r.status_json();
    assert!(
        status["problems"]
            .to_string()
            .contains("1 open conflict(s)"),
        "{status}"
    );
    assert!(
        status["problems"]
            .to_string()
            .contains("cr0sync db resolve")
    );
    let table = p.run(&["db", "conflicts"]);
    assert!(table.contains(id) && table.contains("open"), "{table}");
}

#[test]
fn quiet_conflicts_keeps_cron_silent_but_status_still_counts_them() {
    let Some(p) = Pair::new(true) else { return };
    let cron = p.conflict();
    assert!(cron.status.success());
    assert_eq!(stderr_of(&cron), "");
    assert_eq!(p.open().len(), 1);
}

#[test]
fn resolve_keep_peer_puts_the_losing_row_back_on_every_side_and_closes_it() {
    let Some(p) = Pair::new(true) else { return };
    p.conflict();
    p.run(&["db", "sync"]);
    assert_eq!(p.nick(&p.web), "carol_bot", "central won");
    let id = p.open()[0]["id"].as_str().unwrap().to_string();
    let out = p.run(&["db", "resolve", &id, "--keep", "peer"]);
    assert!(out.contains("carol_web"), "{out}");
    assert_eq!(p.nick(&p.central()), "carol_web");
    p.run(&["db", "sync"]);
    for db in [&p.central(), &p.bot, &p.web] {
        assert_eq!(p.nick(db), "carol_web", "{}", db.display());
    }
    assert!(p.open().is_empty());
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&p.run(&["db", "conflicts", "--all", "--json"])).unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["open"], false);
    assert!(
        !p.r.status_json()["problems"]
            .to_string()
            .contains("open conflict")
    );
    // Closed once: resolving it again is an error naming it, and changes nothing.
    let again =
        p.r.cmd()
            .args(["db", "resolve", &id, "--ack"])
            .output()
            .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr_of(&again).contains("is not open"),
        "{}",
        stderr_of(&again)
    );
}

#[test]
fn resolve_keep_base_ack_and_ack_all() {
    let Some(p) = Pair::new(true) else { return };
    p.conflict();
    p.run(&["db", "sync"]);
    let id = p.open()[0]["id"].as_str().unwrap().to_string();
    p.run(&["db", "resolve", &id, "--keep", "base"]);
    p.run(&["db", "sync"]);
    for db in [&p.central(), &p.bot, &p.web] {
        assert_eq!(p.nick(db), "carol", "the name before both renames");
    }
    // Two more conflicts, closed by --ack one at a time and then all at once.
    for (b, w) in [("x1", "y1"), ("x2", "y2")] {
        exec(
            &p.bot,
            &format!("UPDATE users SET nick = '{b}' WHERE id = 3"),
        );
        p.run(&["db", "sync", "--peer", "bot"]);
        exec(
            &p.web,
            &format!("UPDATE users SET nick = '{w}' WHERE id = 3"),
        );
        p.run(&["db", "sync"]);
    }
    let open = p.open();
    assert_eq!(open.len(), 2);
    let before = std::fs::read(p.central()).unwrap();
    p.run(&["db", "resolve", open[0]["id"].as_str().unwrap(), "--ack"]);
    assert_eq!(p.open().len(), 1);
    p.run(&["db", "resolve", "--all", "--ack"]);
    assert!(p.open().is_empty());
    assert_eq!(
        before,
        std::fs::read(p.central()).unwrap(),
        "--ack writes nothing"
    );
}

#[test]
fn conflict_records_keep_blobs_infinities_and_negative_zero_losslessly() {
    // A column without affinity keeps each value's own type.
    let Some(p) = Pair::with(
        true,
        "CREATE TABLE m (id INTEGER PRIMARY KEY, v); INSERT INTO m VALUES (1, 0), (2, 0);",
    ) else {
        return;
    };
    exec(
        &p.bot,
        "UPDATE m SET v = x'00ff10' WHERE id = 1; UPDATE m SET v = -9e999 WHERE id = 2;",
    );
    exec(
        &p.web,
        "UPDATE m SET v = 9e999 WHERE id = 1; UPDATE m SET v = -0.0 WHERE id = 2;",
    );
    p.run(&["db", "sync"]);
    let text = std::fs::read_to_string(p.r.path("state/conflicts.jsonl")).unwrap();
    assert!(text.contains(r#"{"hex":"00ff10"}"#), "{text}");
    assert!(text.contains(r#"{"real":"inf"}"#), "{text}");
    assert!(text.contains(r#"{"real":"-inf"}"#), "{text}");
    assert!(text.contains("-0.0"), "{text}");
    // And a recorded infinity can be put back exactly.
    let open = p.open();
    let inf = open
        .iter()
        .find(|c| c["key"] == serde_json::json!([1]))
        .unwrap();
    p.run(&[
        "db",
        "resolve",
        inf["id"].as_str().unwrap(),
        "--keep",
        "peer",
    ]);
    let v: f64 = Connection::open(p.central())
        .unwrap()
        .query_row("SELECT v FROM m WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, f64::INFINITY);
}

#[test]
fn rows_a_side_refuses_are_a_status_problem_and_are_retried_without_the_fast_path() {
    // The website's copy of the table has a CHECK the bot's lacks: the bot's negative
    // balance is refused there, every run retries it, and status says so until it applies.
    let Some(p) = Pair::new(true) else { return };
    exec(
        &p.web,
        "CREATE TABLE w (id INTEGER PRIMARY KEY, coins INTEGER CHECK (coins >= 0));",
    );
    exec(
        &p.bot,
        "CREATE TABLE w (id INTEGER PRIMARY KEY, coins INTEGER);",
    );
    exec(
        &p.central(),
        "CREATE TABLE w (id INTEGER PRIMARY KEY, coins INTEGER);",
    );
    p.run(&["db", "sync"]);
    exec(&p.bot, "INSERT INTO w VALUES (1, -5), (2, 5)");
    p.run(&["db", "sync"]);
    let status = p.r.status_json();
    assert!(
        status["problems"]
            .to_string()
            .contains("1 row(s) unapplied"),
        "{status}"
    );
    let again = p.run(&["db", "sync", "--peer", "web"]);
    assert!(
        !again.contains("unchanged") && !again.contains("in sync"),
        "{again}"
    );
    // Fixed at the source: the next run applies it and the problem goes away.
    exec(&p.bot, "UPDATE w SET coins = 0 WHERE id = 1");
    p.run(&["db", "sync"]);
    p.run(&["db", "sync"]);
    let coins: i64 = Connection::open(&p.web)
        .unwrap()
        .query_row("SELECT coins FROM w WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(coins, 0);
    assert!(
        !p.r.status_json()["problems"]
            .to_string()
            .contains("unapplied")
    );
}

#[test]
fn text_that_is_not_utf8_is_synced_recorded_and_resolved_byte_for_byte() {
    let Some(p) = Pair::with(true, "CREATE TABLE m (id INTEGER PRIMARY KEY, v TEXT);") else {
        return;
    };
    // Bytes an application stored as TEXT: invalid UTF-8 with an embedded NUL.
    exec(
        &p.bot,
        "INSERT INTO m VALUES (1, CAST(x'ff00fe' AS TEXT)), (2, 'plain');",
    );
    p.run(&["db", "sync"]);
    p.run(&["db", "sync"]);
    let cell = |db: &Path, id: i64| -> String {
        Connection::open(db)
            .unwrap()
            .query_row(
                "SELECT typeof(v) || ' ' || hex(v) FROM m WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap()
    };
    for db in [p.central(), p.bot.clone(), p.web.clone()] {
        assert_eq!(cell(&db, 1), "text FF00FE", "{}", db.display());
    }
    // Both sides change row 2 to different invalid bytes: a conflict whose record keeps
    // both exactly, and the operator puts the losing bytes back.
    exec(
        &p.bot,
        "UPDATE m SET v = CAST(x'c328' AS TEXT) WHERE id = 2",
    );
    p.run(&["db", "sync", "--peer", "bot"]);
    exec(&p.web, "UPDATE m SET v = CAST(x'80' AS TEXT) WHERE id = 2");
    p.run(&["db", "sync"]);
    let records: serde_json::Value =
        serde_json::from_str(&p.run(&["db", "conflicts", "--json"])).unwrap();
    let r = &records[0];
    assert_eq!(
        r["rows"]["central"][1],
        serde_json::json!({"text_hex": "c328"})
    );
    assert_eq!(r["rows"]["peer"][1], serde_json::json!({"text_hex": "80"}));
    let id = r["id"].as_str().unwrap().to_string();
    p.run(&["db", "resolve", &id, "--keep", "peer"]);
    p.run(&["db", "sync"]);
    p.run(&["db", "sync"]);
    for db in [p.central(), p.bot.clone(), p.web.clone()] {
        assert_eq!(cell(&db, 2), "text 80", "{}", db.display());
        assert_eq!(cell(&db, 1), "text FF00FE", "{}", db.display());
    }
}

#[test]
fn rows_with_a_null_in_a_composite_key_merge_as_whole_rows_and_never_flip() {
    let Some(p) = Pair::with(
        true,
        "CREATE TABLE s2 (network TEXT, nick TEXT, score INTEGER, PRIMARY KEY (network, nick));",
    ) else {
        return;
    };
    exec(
        &p.bot,
        "INSERT INTO s2 VALUES ('efnet', NULL, 2); INSERT INTO s2 VALUES ('efnet', NULL, 3);",
    );
    exec(&p.web, "INSERT INTO s2 VALUES ('efnet', NULL, 9);");
    p.run(&["db", "sync"]);
    p.run(&["db", "sync"]);
    let rows = |db: &Path| -> Vec<i64> {
        let c = Connection::open(db).unwrap();
        let mut s = c
            .prepare("SELECT score FROM s2 WHERE nick IS NULL ORDER BY score")
            .unwrap();
        s.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    for db in [&p.central(), &p.bot, &p.web] {
        assert_eq!(rows(db), [2, 3, 9], "{}", db.display());
    }
    // Later syncs change nothing: no row flips in or out.
    let before: Vec<Vec<u8>> = [&p.central(), &p.bot, &p.web]
        .iter()
        .map(|d| std::fs::read(d).unwrap())
        .collect();
    p.run(&["db", "sync"]);
    p.run(&["db", "sync"]);
    for (i, db) in [&p.central(), &p.bot, &p.web].iter().enumerate() {
        assert_eq!(rows(db), [2, 3, 9]);
        assert_eq!(std::fs::read(db).unwrap(), before[i], "{}", db.display());
    }
    // A delete of one of them on one side is a delete everywhere.
    exec(&p.web, "DELETE FROM s2 WHERE nick IS NULL AND score = 3");
    p.run(&["db", "sync"]);
    p.run(&["db", "sync"]);
    for db in [&p.central(), &p.bot, &p.web] {
        assert_eq!(rows(db), [2, 9], "{}", db.display());
    }
    assert!(p.open().is_empty());
}
