// The exactness cases of the database sync under stops, included by tests/db_crash.rs
// (local peers) and tests/db_crash_remote.rs (the same peers behind ssh), which set
// `REMOTE`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{FAULT_POINTS as POINTS, Root, stderr_of};
use rusqlite::Connection;

const FIXTURE: &str = include_str!("../../fixtures/users.sql");

/// A root with database `users` (`coins` a counter) and peers `bot` and `web`.
struct World {
    r: Root,
    bot: PathBuf,
    web: PathBuf,
    /// Where the peers live (behind an sshd when `REMOTE`).
    _peers: common::sshd::Peers,
}

impl World {
    /// `None` where a `REMOTE` run cannot start its sshd (not root; noted on stderr).
    fn new(policy: &str) -> Option<World> {
        let r = Root::new();
        let peers = common::sshd::Peers::new(REMOTE, r.tmp.path())?;
        let bot = peers.dir.join("bot.db");
        let web = peers.dir.join("web.db");
        for p in [&bot, &web] {
            exec(p, FIXTURE);
            exec(p, "PRAGMA journal_mode = wal");
        }
        peers.hand_over();
        let (remote, bot_url, web_url) = (peers.section(), peers.url(&bot), peers.url(&web));
        r.write_config(&format!(
            "{remote}[general]\nbusy_timeout = \"1s\"\n[database]\nbackup_interval = \"0s\"\n\
             [[database.db]]\nname = \"users\"\npolicy = \"{policy}\"\n\
             counters = {{ users = [\"coins\"] }}\n\
             peers = [\n  {{ name = \"bot\", path = \"{bot_url}\" }},\n  {{ name = \"web\", path = \"{web_url}\" }},\n]\n",
        ));
        let w = World {
            r,
            bot,
            web,
            _peers: peers,
        };
        w.sync_ok(&[]);
        Some(w)
    }

    fn central(&self) -> PathBuf {
        self.r.path("databases/users.db")
    }

    fn side(&self, name: &str) -> PathBuf {
        match name {
            "bot" => self.bot.clone(),
            "web" => self.web.clone(),
            _ => self.central(),
        }
    }

    fn sync(&self, args: &[&str], fault: Option<&str>) -> std::process::Output {
        let mut cmd = self.r.cmd();
        cmd.args(["db", "sync"]).args(args);
        if let Some(f) = fault {
            cmd.env("CR0SYNC_FAULT", f);
        }
        cmd.output().unwrap()
    }

    fn sync_ok(&self, args: &[&str]) {
        let out = self.sync(args, None);
        assert!(out.status.success(), "db sync failed: {}", stderr_of(&out));
    }

    /// Every user table of every side, rows sorted, cells as SQLite quotes them.
    fn dump(&self) -> Vec<(String, Vec<String>)> {
        ["central", "bot", "web"]
            .iter()
            .flat_map(|s| {
                dump(&self.side(s))
                    .into_iter()
                    .map(move |(t, rows)| (format!("{s}.{t}"), rows))
            })
            .collect()
    }

    /// The conflict records less their ids and times, in order; asserts each id is unique.
    fn conflicts(&self) -> Vec<serde_json::Value> {
        let text =
            std::fs::read_to_string(self.r.path("state/conflicts.jsonl")).unwrap_or_default();
        let mut ids = BTreeSet::new();
        let mut out = Vec::new();
        for line in text.lines() {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
            let id = v["id"].as_str().unwrap().to_string();
            assert!(ids.insert(id.clone()), "conflict {id} recorded twice");
            let o = v.as_object_mut().unwrap();
            o.remove("id");
            o.remove("time");
            out.push(v);
        }
        out
    }

    fn one(&self, side: &str, sql: &str) -> String {
        query(&self.side(side), sql).remove(0)
    }
}

fn exec(db: &Path, sql: &str) {
    let c = Connection::open(db).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    c.execute_batch(sql).unwrap();
}

fn query(db: &Path, sql: &str) -> Vec<String> {
    let c = Connection::open(db).unwrap();
    let mut stmt = c.prepare(sql).unwrap();
    stmt.query_map([], |r| {
        Ok(match r.get::<_, rusqlite::types::Value>(0)? {
            rusqlite::types::Value::Integer(i) => i.to_string(),
            rusqlite::types::Value::Text(t) => t,
            other => format!("{other:?}"),
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn dump(db: &Path) -> Vec<(String, Vec<String>)> {
    let tables = query(
        db,
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite%' \
         ORDER BY name",
    );
    tables
        .into_iter()
        .map(|t| {
            let cols = query(db, &format!("SELECT name FROM pragma_table_info('{t}')"));
            let quoted: Vec<String> = cols.iter().map(|c| format!("quote(\"{c}\")")).collect();
            let rows = query(
                db,
                &format!(
                    "SELECT {} FROM \"{t}\" ORDER BY 1",
                    quoted.join(" || '|' || ")
                ),
            );
            let mut rows = rows;
            rows.sort();
            (t, rows)
        })
        .collect()
}

/// The changes of one round: the bot's are synced first (so the central copy holds them),
/// then the website's, which the sync under test carries: counters with equal and unequal
/// deltas on both sides, a counter on a row also updated elsewhere, multiset inserts on
/// both sides, a delete, inserts, a same-cell conflict, and one id (300) both sides
/// handed out to a different user (rekeyed).
fn round(w: &World) {
    exec(
        &w.bot,
        "UPDATE users SET coins = coins + 3 WHERE id = 1;
         UPDATE users SET coins = coins + 1 WHERE id = 2;
         UPDATE users SET nick = 'carol_bot', coins = coins + 2 WHERE id = 3;
         INSERT INTO users VALUES (100, 'dave', NULL, 5, 't1');
         INSERT INTO users VALUES (300, 'frank', NULL, 1, 't1');
         INSERT INTO seen VALUES ('x', '#c', 't1');",
    );
    w.sync_ok(&["--peer", "bot"]);
    exec(
        &w.web,
        "UPDATE users SET coins = coins + 5 WHERE id = 1;
         UPDATE users SET coins = coins + 1 WHERE id = 2;
         UPDATE users SET nick = 'carol_web', email = 'c@web', coins = coins + 2 WHERE id = 3;
         INSERT INTO users VALUES (200, 'erin', NULL, 7, 't2');
         INSERT INTO users VALUES (300, 'gina', NULL, 1, 't2');
         DELETE FROM scores WHERE nick = 'bob';
         INSERT INTO seen VALUES ('x', '#c', 't1');
         INSERT INTO seen VALUES ('alice', '#cr0', '2025-11-01T09:59:00Z');",
    );
}

/// More changes before a repeated stop, so the sync has work for both sides again: the
/// bot adds a coin to bob (synced, so the central copy moves meanwhile), the website one
/// to alice and a `seen` row.
fn more(w: &World) {
    exec(&w.bot, "UPDATE users SET coins = coins + 1 WHERE id = 2");
    w.sync_ok(&["--peer", "bot"]);
    exec(
        &w.web,
        "UPDATE users SET coins = coins + 1 WHERE id = 1; INSERT INTO seen VALUES ('y', '#c', 't');",
    );
}

/// What every side must hold after `round`, `extra` calls of `more` and complete syncs.
fn assert_law(w: &World, extra: usize) {
    for side in ["central", "bot", "web"] {
        let coins = |id: i64| w.one(side, &format!("SELECT coins FROM users WHERE id = {id}"));
        assert_eq!(coins(1), (108 + extra).to_string(), "{side}: 100 + 3 + 5");
        assert_eq!(
            coins(2),
            (52 + extra).to_string(),
            "{side}: 50 + 1 + 1 (equal deltas both count)"
        );
        assert_eq!(
            coins(3),
            "14",
            "{side}: 10 + 2 + 2 beside the nick conflict"
        );
        assert_eq!(
            w.one(side, "SELECT count(*) FROM seen WHERE nick = 'x'"),
            "2",
            "{side}: each side's insert once"
        );
        assert_eq!(
            w.one(side, "SELECT count(*) FROM seen WHERE nick = 'y'"),
            extra.to_string(),
        );
        assert_eq!(
            w.one(side, "SELECT count(*) FROM seen WHERE nick = 'alice'"),
            "2",
            "{side}: the website's second alice"
        );
        assert_eq!(
            w.one(side, "SELECT count(*) FROM users WHERE id IN (100, 200)"),
            "2"
        );
        assert_eq!(w.one(side, "SELECT count(*) FROM scores"), "1", "{side}");
        assert_eq!(
            query(
                &w.side(side),
                "SELECT id || nick FROM users WHERE id >= 300 ORDER BY id"
            ),
            ["300frank", "301gina"],
            "{side}: both registrations, the website's under a fresh id"
        );
        assert_eq!(w.one(side, "PRAGMA integrity_check"), "ok");
        assert_eq!(
            w.one(
                side,
                "SELECT count(*) FROM sqlite_schema WHERE name LIKE '\\_cr0sync%' ESCAPE '\\'"
            ),
            "0",
            "{side}: no marker left behind"
        );
    }
    let c = w.conflicts();
    assert_eq!(
        c.len(),
        2,
        "the nick conflict and the move, once each: {c:?}"
    );
    assert_eq!(c[0]["key"], serde_json::json!([3]));
    assert_eq!(c[1]["kind"], "rekey");
    assert_eq!(
        (&c[1]["key"], &c[1]["new_key"]),
        (&serde_json::json!([300]), &serde_json::json!([301]))
    );
}

/// Runs `sync --peer web` with `fault` armed `times` times in a row, each run stopping
/// there (with `more` changes before each repeat, so each run reaches the point again),
/// then completes with plain syncs.
fn stop_then_complete(w: &World, fault: &str, times: usize) {
    for i in 0..times {
        if i > 0 {
            more(w);
        }
        let out = w.sync(&["--peer", "web"], Some(fault));
        assert!(!out.status.success(), "{fault} #{i}: the run did not stop");
    }
    w.sync_ok(&[]);
    w.sync_ok(&[]);
}

/// Two identical worlds after `round`: the first to be stopped, the second synced
/// without interruption (with `extra` calls of `more`, each followed by a sync).
fn twins(policy: &str, extra: usize) -> Option<(World, World)> {
    let (a, b) = (World::new(policy)?, World::new(policy)?);
    round(&a);
    round(&b);
    b.sync_ok(&["--peer", "web"]);
    for _ in 0..extra {
        more(&b);
        b.sync_ok(&["--peer", "web"]);
    }
    b.sync_ok(&[]);
    b.sync_ok(&[]);
    Some((a, b))
}

fn assert_twins(stopped: &World, clean: &World, extra: usize, what: &str) {
    assert_eq!(
        stopped.dump(),
        clean.dump(),
        "{what}: sides differ from the twin"
    );
    assert_eq!(
        stopped.conflicts(),
        clean.conflicts(),
        "{what}: conflict records differ from the twin"
    );
    assert_law(stopped, extra);
}

#[test]
fn an_uninterrupted_sync_obeys_the_law() {
    let Some((_, clean)) = twins("central-wins", 0) else { return };
    assert_law(&clean, 0);
}

#[test]
fn a_sync_killed_at_each_point_once_is_completed_exactly() {
    for point in POINTS {
        let Some((stopped, clean)) = twins("central-wins", 0) else { return };
        stop_then_complete(&stopped, point, 1);
        assert_twins(&stopped, &clean, 0, point);
    }
}

#[test]
fn a_sync_killed_at_the_same_point_three_times_is_completed_exactly() {
    for point in POINTS {
        let Some((stopped, clean)) = twins("peer-wins", 2) else { return };
        stop_then_complete(&stopped, point, 3);
        assert_twins(&stopped, &clean, 2, point);
    }
}

#[test]
fn a_full_disk_at_each_point_is_reported_and_completed_exactly() {
    for point in POINTS {
        let Some((stopped, clean)) = twins("central-wins", 0) else { return };
        let out = stopped.sync(&["--peer", "web"], Some(&format!("{point}:enospc")));
        if point != "during-central-commit" {
            assert!(!out.status.success(), "{point}");
            assert!(
                stderr_of(&out).contains("No space left on device"),
                "{point}: {}",
                stderr_of(&out)
            );
        }
        stopped.sync_ok(&[]);
        stopped.sync_ok(&[]);
        assert_twins(&stopped, &clean, 0, point);
    }
}

#[test]
fn a_roll_forward_killed_again_and_again_is_completed_by_the_next_run() {
    // A roll-forward stopped before its commit is done again by the next run, however
    // often; stopped after its commit, it is not done twice.
    for (again, times) in [
        ("during-roll-forward", 1),
        ("during-roll-forward", 2),
        ("during-roll-forward", 10),
        ("after-roll-forward", 1),
    ] {
        let Some((stopped, clean)) = twins("newest-wins", 0) else { return };
        let out = stopped.sync(&["--peer", "web"], Some("after-peer-commit"));
        assert!(!out.status.success());
        for _ in 0..times {
            let out = stopped.sync(&["--peer", "web"], Some(again));
            assert!(!out.status.success(), "{again} x{times}: did not stop");
        }
        stopped.sync_ok(&[]);
        stopped.sync_ok(&[]);
        assert_twins(&stopped, &clean, 0, &format!("{again} x{times}"));
    }
}

#[test]
fn the_peer_writer_changing_journalled_rows_between_the_runs_is_counted_once() {
    // Killed after the peer commit; before the next run, the website adds coins to the
    // very rows the interrupted sync wrote. The marker, not the rows, tells what committed.
    let Some(w) = World::new("central-wins") else { return };
    round(&w);
    let out = w.sync(&["--peer", "web"], Some("after-peer-commit"));
    assert!(!out.status.success());
    exec(
        &w.web,
        "UPDATE users SET coins = coins + 10 WHERE id IN (1, 2);
         INSERT INTO seen VALUES ('x', '#c', 't1');",
    );
    // And the central copy moves on through the other peer meanwhile.
    exec(&w.bot, "UPDATE users SET coins = coins + 100 WHERE id = 1");
    w.sync_ok(&["--peer", "bot"]);
    w.sync_ok(&[]);
    w.sync_ok(&[]);
    for side in ["central", "bot", "web"] {
        let coins = |id: i64| w.one(side, &format!("SELECT coins FROM users WHERE id = {id}"));
        assert_eq!(coins(1), "218", "{side}: 100 + 3 + 5 + 10 + 100");
        assert_eq!(coins(2), "62", "{side}: 50 + 1 + 1 + 10");
        assert_eq!(
            w.one(side, "SELECT count(*) FROM seen WHERE nick = 'x'"),
            "3"
        );
    }
    assert_eq!(w.conflicts().len(), 2);
}

#[test]
fn a_busy_central_copy_is_named_with_its_holder_and_the_next_run_completes() {
    // Bot adds 3 coins (synced); the website adds 5; a reader holds the central copy
    // across two syncs of the website. Both fail clearly, nothing is counted twice.
    let Some(w) = World::new("central-wins") else { return };
    exec(&w.bot, "UPDATE users SET coins = coins + 3 WHERE id = 1");
    w.sync_ok(&["--peer", "bot"]);
    exec(
        &w.web,
        "UPDATE users SET coins = coins + 5 WHERE id = 1; INSERT INTO seen VALUES ('x', '#c', 't');",
    );
    let mut reader = std::process::Command::new("sqlite3")
        .arg(w.central())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::{BufRead, Write};
        let stdin = reader.stdin.as_mut().unwrap();
        stdin
            .write_all(b"BEGIN; SELECT count(*) FROM users;\n")
            .unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(reader.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
    }
    for _ in 0..2 {
        let out = w.sync(&["--peer", "web"], None);
        assert!(!out.status.success());
        let err = stderr_of(&out);
        assert!(
            err.contains("databases/users.db is busy") && err.contains("(sqlite3)"),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    reader.kill().unwrap();
    reader.wait().unwrap();
    w.sync_ok(&[]);
    w.sync_ok(&[]);
    for side in ["central", "bot", "web"] {
        assert_eq!(w.one(side, "SELECT coins FROM users WHERE id = 1"), "108");
        assert_eq!(
            w.one(side, "SELECT count(*) FROM seen WHERE nick = 'x'"),
            "1"
        );
    }
}

#[test]
fn random_sigkills_with_counters_and_repeated_kills_of_one_round_lose_and_double_nothing() {
    // A 30,000-row table changed on both sides, then syncs killed at later and later
    // instants (each killed run starts from what the last one left), twice over the same
    // round; then one complete sync. Counters, multiset inserts and conflicts are exact.
    let Some(w) = World::new("central-wins") else { return };
    let fill = "WITH RECURSIVE n(i) AS (SELECT 1000 UNION ALL SELECT i + 1 FROM n WHERE i < 30999)
                INSERT INTO users SELECT i, 'n' || i, NULL, 0, 't0' FROM n;";
    exec(&w.bot, fill);
    exec(&w.web, fill);
    w.sync_ok(&[]);
    exec(
        &w.bot,
        "UPDATE users SET coins = coins + 1 WHERE id >= 1000;
         UPDATE users SET nick = 'bot' WHERE id BETWEEN 1000 AND 1009;
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300)
         INSERT INTO seen SELECT 'b' || i, '#c', 't' FROM n;",
    );
    exec(
        &w.web,
        "UPDATE users SET coins = coins + 1 WHERE id >= 1000;
         UPDATE users SET coins = coins + 2 WHERE id % 7 = 0;
         UPDATE users SET nick = 'web' WHERE id BETWEEN 1000 AND 1009;
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300)
         INSERT INTO seen SELECT 'w' || i, '#c', 't' FROM n;",
    );
    let mut killed = 0;
    for _ in 0..2 {
        killed += common::kill_at_later_and_later_moments(
            &w.r.root,
            &["db", "sync"],
            std::time::Duration::from_millis(7),
            60,
            |_| {},
        );
    }
    assert!(killed > 5, "only {killed} runs were killed");
    w.sync_ok(&[]);
    w.sync_ok(&[]);
    for side in ["central", "bot", "web"] {
        assert_eq!(
            w.one(
                side,
                "SELECT count(*) FROM users WHERE id >= 1000 AND coins != 2 + 2 * (id % 7 = 0)"
            ),
            "0",
            "{side}: every increment once: {:?}",
            query(
                &w.side(side),
                "SELECT id || ':' || coins FROM users WHERE id >= 1000 \
                 AND coins != 2 + 2 * (id % 7 = 0) LIMIT 10"
            )
        );
        assert_eq!(w.one(side, "SELECT count(*) FROM seen"), "601");
        assert_eq!(w.one(side, "SELECT count(DISTINCT nick) FROM seen"), "601");
        assert_eq!(
            w.one(
                side,
                "SELECT count(*) FROM users WHERE id BETWEEN 1000 AND 1009 AND nick = 'bot'"
            ),
            "10",
            "{side}: central wins the nick conflicts"
        );
    }
    let c = w.conflicts();
    assert_eq!(c.len(), 10, "each nick conflict once: {}", c.len());
    eprintln!("{killed} runs killed");
}

// ---- Real clients: a bot (Python's sqlite3) and a website (PHP's PDO) adding coins. ----

/// How long the concurrent runs last: 12 s in CI, `CR0SYNC_SOAK_SECS` for a soak.
fn soak_secs() -> f64 {
    std::env::var("CR0SYNC_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12.0)
}

/// Starts a writer adding coins to user 1 of `db` for `secs`: PHP for the website when
/// `php` is installed (CI installs it), Python otherwise.
fn writer(db: &Path, secs: f64, php: bool) -> std::process::Child {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    let has_php = std::process::Command::new("php")
        .arg("-r")
        .arg("exit(class_exists('PDO') && in_array('sqlite', PDO::getAvailableDrivers()) ? 0 : 1);")
        .status()
        .is_ok_and(|s| s.success());
    let mut cmd = if php && has_php {
        let mut c = std::process::Command::new("php");
        c.arg(dir.join("add_coins.php"));
        c
    } else {
        let mut c = std::process::Command::new("python3");
        c.arg(dir.join("add_coins.py"));
        c
    };
    cmd.arg(db)
        .arg(secs.to_string())
        .arg("1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn committed(child: std::process::Child) -> u64 {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Both writers run while syncs run back to back (each killed at a random instant when
/// `kill` is set); afterwards, every side holds 100 + every committed increment.
fn writers_during_syncs(kill: bool) {
    let Some(w) = World::new("central-wins") else { return };
    let secs = soak_secs();
    let (bot, web) = (writer(&w.bot, secs, false), writer(&w.web, secs, true));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
    let mut seed: u64 = std::process::id() as u64 * 2_654_435_761 + 1;
    let (mut runs, mut killed, mut failed) = (0, 0, 0);
    while std::time::Instant::now() < deadline {
        let mut child = std::process::Command::new(common::BIN)
            .arg("--root")
            .arg(&w.r.root)
            .args(["db", "sync"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        if kill && seed.is_multiple_of(2) {
            std::thread::sleep(std::time::Duration::from_millis(seed % 120));
            let _ = child.kill();
        }
        let status = child.wait().unwrap();
        if std::os::unix::process::ExitStatusExt::signal(&status) == Some(9) {
            killed += 1;
        } else if !status.success() {
            failed += 1;
        }
        runs += 1;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (nb, nw) = (committed(bot), committed(web));
    w.sync_ok(&[]);
    w.sync_ok(&[]);
    eprintln!(
        "{runs} syncs ({killed} killed, {failed} failed); bot {nb} and website {nw} increments"
    );
    assert!(nb > 100 && nw > 100, "the writers hardly ran: {nb} {nw}");
    let want = (100 + nb + nw).to_string();
    for side in ["central", "bot", "web"] {
        assert_eq!(
            w.one(side, "SELECT coins FROM users WHERE id = 1"),
            want,
            "{side}: 100 + {nb} + {nw}"
        );
    }
    assert!(w.conflicts().is_empty());
}

#[test]
fn a_bot_and_a_website_adding_coins_during_syncs_lose_and_double_nothing() {
    writers_during_syncs(false);
}

#[test]
fn a_bot_and_a_website_adding_coins_during_killed_syncs_lose_and_double_nothing() {
    writers_during_syncs(true);
}

// ---- A real full disk: the central store on a small tmpfs. ----

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size_kib: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }

    fn resize(&self, size_kib: u64) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size_kib}k")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_under_the_central_store_is_reported_and_completed_exactly() {
    if !common::needs_root("mounting a tmpfs") {
        return;
    }
    // The disk fills at a different step each time: while backing up, journalling,
    // committing the central copy, writing the state. Each run that fails must say so
    // and leave everything to be completed exactly once the disk has room again.
    let mut failures = BTreeSet::new();
    for free_kib in [8, 48, 160, 400, 700, 1000, 1400] {
        let Some(w) = World::new("central-wins") else { return };
        let fill = "WITH RECURSIVE n(i) AS (SELECT 1000 UNION ALL SELECT i + 1 FROM n WHERE i < 4999)
                    INSERT INTO users SELECT i, 'n' || i, 'e' || i || hex(zeroblob(36)), 0, 't0' FROM n;";
        exec(&w.bot, fill);
        exec(&w.web, fill);
        w.sync_ok(&[]);
        round(&w);
        exec(
            &w.web,
            "UPDATE users SET coins = coins + 1, email = hex(randomblob(40)) WHERE id >= 1000;",
        );
        // The root moves onto a tmpfs with `free_kib` left over.
        let fs = w.r.tmp.path().join("fs");
        let used: u64 = std::process::Command::new("du")
            .args(["-sk"])
            .arg(&w.r.root)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .next()
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0)
            })
            .unwrap();
        let Some(tmpfs) = Tmpfs::mount(&fs, used + free_kib) else {
            eprintln!("skipped: cannot mount a tmpfs here");
            return;
        };
        let root = fs.join("root");
        assert!(
            std::process::Command::new("cp")
                .arg("-a")
                .arg(&w.r.root)
                .arg(&root)
                .status()
                .unwrap()
                .success()
        );
        let run = || {
            common::cr0sync()
                .arg("--root")
                .arg(&root)
                .args(["db", "sync"])
                .output()
                .unwrap()
        };
        let out = run();
        if !out.status.success() {
            let err = stderr_of(&out);
            assert!(
                err.contains("No space left on device") || err.contains("disk is full"),
                "{free_kib} KiB: {err}"
            );
            assert!(!err.contains("damaged"), "blames the wrong file: {err}");
            assert!(
                err.contains(root.to_str().unwrap()),
                "names the file: {err}"
            );
            failures.insert(err.lines().next().unwrap_or_default().to_string());
        }
        tmpfs.resize(used + 64 * 1024);
        for _ in 0..2 {
            let out = run();
            assert!(out.status.success(), "{free_kib} KiB: {}", stderr_of(&out));
        }
        let central = root.join("databases/users.db");
        for db in [&central, &w.bot, &w.web] {
            let one = |sql: &str| query(db, sql).remove(0);
            assert_eq!(one("SELECT coins FROM users WHERE id = 1"), "108");
            assert_eq!(one("SELECT coins FROM users WHERE id = 2"), "52");
            assert_eq!(
                one("SELECT count(*) FROM users WHERE id >= 1000 AND coins != 1"),
                "0",
                "{free_kib} KiB: every increment once"
            );
            assert_eq!(one("SELECT count(*) FROM seen WHERE nick = 'x'"), "2");
            assert_eq!(one("PRAGMA integrity_check"), "ok");
        }
        assert_eq!(dump(&central), dump(&w.web), "{free_kib} KiB");
        assert_eq!(dump(&central), dump(&w.bot), "{free_kib} KiB");
        let text = std::fs::read_to_string(root.join("state/conflicts.jsonl")).unwrap();
        assert_eq!(
            text.lines().count(),
            2,
            "{free_kib} KiB: the nick conflict and the move: {text}"
        );
        drop(tmpfs);
    }
    eprintln!("distinct failures: {failures:#?}");
    assert!(
        failures.len() >= 2,
        "the disk filled at too few steps: {failures:?}"
    );
}

#[test]
fn a_row_both_sides_deleted_and_one_side_inserted_again_is_a_plain_insert() {
    // The base lets go of a row both sides deleted, so inserting it again later is an
    // insert everywhere, not an update/delete conflict that could drop it.
    let Some(w) = World::new("central-wins") else { return };
    exec(&w.bot, "DELETE FROM users WHERE id = 3");
    exec(&w.web, "DELETE FROM users WHERE id = 3");
    w.sync_ok(&[]);
    w.sync_ok(&[]);
    exec(
        &w.web,
        "INSERT INTO users VALUES (3, 'carol2', NULL, 1, 't9')",
    );
    w.sync_ok(&[]);
    w.sync_ok(&[]);
    for side in ["central", "bot", "web"] {
        assert_eq!(w.one(side, "SELECT nick FROM users WHERE id = 3"), "carol2");
    }
    assert!(w.conflicts().is_empty(), "{:?}", w.conflicts());
}

#[test]
fn sync_from_bot_after_a_stopped_sync_does_not_complete_the_stale_journal() {
    // The web pair stops after its peer commit; the operator then makes the website's copy
    // the central copy. The stale journal must not add the website's coins a second time.
    let Some(w) = World::new("central-wins") else { return };
    round(&w);
    let out = w.sync(&["--peer", "web"], Some("after-peer-commit"));
    assert!(!out.status.success());
    let web_coins = w.one("web", "SELECT coins FROM users WHERE id = 1");
    let out =
        w.r.cmd()
            .args(["sync-from-bot", "--db", "users", "--peer", "web"])
            .output()
            .unwrap();
    if REMOTE {
        // Not built for a peer on another host: refused with one line, nothing changed;
        // the next syncs complete the stopped one.
        let err = stderr_of(&out);
        assert!(!out.status.success(), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("does not reach peers on other hosts"), "{err}");
        w.sync_ok(&[]);
        w.sync_ok(&[]);
        let central = w.one("central", "SELECT coins FROM users WHERE id = 1");
        for side in ["bot", "web"] {
            assert_eq!(w.one(side, "SELECT coins FROM users WHERE id = 1"), central);
        }
        return;
    }
    assert!(out.status.success(), "{}", stderr_of(&out));
    w.sync_ok(&[]);
    w.sync_ok(&[]);
    for side in ["central", "bot", "web"] {
        assert_eq!(
            w.one(side, "SELECT coins FROM users WHERE id = 1"),
            web_coins,
            "{side}"
        );
    }
}

#[test]
fn rows_the_website_changes_while_the_sync_writes_them_are_left_for_the_next_run_and_counted_once()
{
    // The website's sync pauses after its journal (the peer not written yet, the base being
    // settled beside the peer's commit); meanwhile the website adds coins to the very rows
    // the sync is about to write, and one more multiset row it is about to set. Those are
    // left alone, their base put back, and the next runs count every write once.
    let Some(w) = World::new("central-wins") else { return };
    round(&w);
    let child = std::process::Command::new(common::BIN)
        .arg("--root")
        .arg(&w.r.root)
        .args(["db", "sync", "--peer", "web"])
        .env("CR0SYNC_FAULT", "after-journal:sleep=3000")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_for(&w.r.path("state/db/users/web.journal.json"));
    exec(
        &w.web,
        "UPDATE users SET coins = coins + 10 WHERE id IN (1, 2);
         INSERT INTO seen VALUES ('x', '#c', 't1');",
    );
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("users") && report.contains("row(s) changed meanwhile"),
        "{report}"
    );
    w.sync_ok(&[]);
    w.sync_ok(&[]);
    for side in ["central", "bot", "web"] {
        let coins = |id: i64| w.one(side, &format!("SELECT coins FROM users WHERE id = {id}"));
        assert_eq!(coins(1), "118", "{side}: 100 + 3 + 5 + 10");
        assert_eq!(coins(2), "62", "{side}: 50 + 1 + 1 + 10");
        assert_eq!(
            w.one(side, "SELECT count(*) FROM seen WHERE nick = 'x'"),
            "3",
            "{side}: the bot's x and the website's two"
        );
        assert_eq!(w.one(side, "PRAGMA integrity_check"), "ok");
    }
    // The bases agree with the sides: one more run finds nothing to do.
    let out = w.r.cmd().args(["db", "sync"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains('+') || text.lines().all(|l| !l.contains("+1") && !l.contains("~1")),
        "{text}"
    );
    assert_eq!(w.conflicts().len(), 2);
}

#[test]
fn a_large_table_is_diffed_on_two_connections_with_the_same_result() {
    // A snapshot over 8 MiB diffs the peer's side on a second connection. The rows the
    // base must learn about or let go of (inserted alike on both sides, deleted on both)
    // are found as on a small table, and a later delete of a row inserted alike is kept.
    let Some(w) = World::new("central-wins") else { return };
    let fill = "WITH RECURSIVE n(i) AS (SELECT 1000 UNION ALL SELECT i + 1 FROM n WHERE i < 150999)
                INSERT INTO users SELECT i, 'n' || i, printf('%060d', i), 0, 't0' FROM n;";
    exec(&w.bot, fill);
    exec(&w.web, fill);
    w.sync_ok(&[]);
    assert!(std::fs::metadata(&w.web).unwrap().len() > 8 << 20);
    exec(
        &w.bot,
        "UPDATE users SET coins = coins + 1 WHERE id % 100 = 0 AND id >= 2000;
         DELETE FROM users WHERE id BETWEEN 1000 AND 1299;
         INSERT INTO users SELECT i, 'both' || i, NULL, 0, 't' FROM
           (WITH RECURSIVE n(i) AS (SELECT 200001 UNION ALL SELECT i + 1 FROM n WHERE i < 200100) SELECT i FROM n);",
    );
    exec(
        &w.web,
        "UPDATE users SET coins = coins + 2 WHERE id % 100 = 0 AND id >= 2000;
         DELETE FROM users WHERE id BETWEEN 1200 AND 1499;
         INSERT INTO users SELECT i, 'both' || i, NULL, 0, 't' FROM
           (WITH RECURSIVE n(i) AS (SELECT 200001 UNION ALL SELECT i + 1 FROM n WHERE i < 200100) SELECT i FROM n);
         INSERT INTO users VALUES (300001, 'web', NULL, 0, 't');",
    );
    w.sync_ok(&[]);
    w.sync_ok(&[]);
    let expect_rows = (150_000 - 500 + 100 + 1 + 3).to_string();
    for side in ["central", "bot", "web"] {
        assert_eq!(
            w.one(side, "SELECT count(*) FROM users"),
            expect_rows,
            "{side}"
        );
        assert_eq!(
            w.one(
                side,
                "SELECT count(*) FROM users WHERE id BETWEEN 2000 AND 150999 AND id % 100 = 0 AND coins != 3"
            ),
            "0",
            "{side}: both increments of every counter"
        );
    }
    // A row both sides inserted alike entered the base: deleting it later is kept.
    exec(&w.bot, "DELETE FROM users WHERE id = 200001");
    w.sync_ok(&[]);
    w.sync_ok(&[]);
    for side in ["central", "bot", "web"] {
        assert_eq!(
            w.one(side, "SELECT count(*) FROM users WHERE id = 200001"),
            "0",
            "{side}"
        );
    }
    assert_eq!(w.dump()[0].1, w.dump()[3].1, "central and bot agree");
}
