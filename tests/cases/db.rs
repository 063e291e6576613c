// The database job's end-to-end cases, included by tests/db.rs (local peers) and
// tests/db_remote.rs (the same peers behind ssh), which set `REMOTE`.

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Root, stderr_of};
use rusqlite::Connection;

const FIXTURE: &str = include_str!("../../fixtures/users.sql");
const BOT_CHANGES: &str = include_str!("../../fixtures/bot_changes.sql");
const WEB_CHANGES: &str = include_str!("../../fixtures/website_changes.sql");

/// A root with database `users` and peers `bot` and `website`, both from the fixture.
struct Setup {
    r: Root,
    bot: PathBuf,
    web: PathBuf,
    /// Where the peers live (behind an sshd when `REMOTE`).
    peers: common::sshd::Peers,
}

impl Setup {
    /// `None` where a `REMOTE` run cannot start its sshd (not root; noted on stderr).
    fn new(extra: &str) -> Option<Setup> {
        Self::with(extra, "", FIXTURE)
    }

    fn with(db_keys: &str, general: &str, fixture: &str) -> Option<Setup> {
        let r = Root::new();
        let peers = common::sshd::Peers::new(REMOTE, r.tmp.path())?;
        let bot = peers.dir.join("bot.db");
        let web = peers.dir.join("web.db");
        exec(&bot, fixture);
        exec(&web, fixture);
        peers.hand_over();
        let s = Setup { r, bot, web, peers };
        s.config(db_keys, general);
        Some(s)
    }

    fn config(&self, db_keys: &str, general: &str) {
        self.r.write_config(&format!(
            "{}[general]\nbusy_timeout = \"1s\"\n{general}\n\
             [[database.db]]\nname = \"users\"\n{db_keys}\n\
             peers = [\n  {{ name = \"bot\", path = \"{}\" }},\n  {{ name = \"website\", path = \"{}\" }},\n]\n",
            self.peers.section(),
            self.peers.url(&self.bot),
            self.peers.url(&self.web)
        ));
    }

    fn central(&self) -> PathBuf {
        self.r.path("databases/users.db")
    }

    fn sync(&self, args: &[&str]) -> std::process::Output {
        self.r
            .cmd()
            .args(["db", "sync"])
            .args(args)
            .output()
            .unwrap()
    }

    fn sync_ok(&self) -> String {
        let out = self.sync(&[]);
        assert!(out.status.success(), "db sync failed: {}", stderr_of(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Both peers equal the central copy, and all three pass `integrity_check`.
    fn assert_converged(&self) {
        for side in [&self.bot, &self.web] {
            assert_same(&self.central(), side);
        }
        for db in [self.central(), self.bot.clone(), self.web.clone()] {
            assert_eq!(integrity(&db), "ok", "{}", db.display());
        }
    }
}

fn exec(db: &Path, sql: &str) {
    Connection::open(db).unwrap().execute_batch(sql).unwrap();
}

fn query(db: &Path, sql: &str) -> Vec<String> {
    let c = Connection::open(db).unwrap();
    let mut stmt = c.prepare(sql).unwrap();
    let n = stmt.column_count();
    stmt.query_map([], |r| {
        Ok((0..n)
            .map(|i| match r.get::<_, rusqlite::types::Value>(i).unwrap() {
                rusqlite::types::Value::Null => "NULL".to_string(),
                rusqlite::types::Value::Integer(v) => v.to_string(),
                rusqlite::types::Value::Real(v) => v.to_string(),
                rusqlite::types::Value::Text(v) => v,
                rusqlite::types::Value::Blob(v) => format!("x{}", v.len()),
            })
            .collect::<Vec<_>>()
            .join("|"))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Every table of `a` holds the same rows in `b`: `sqldiff --primarykey` (keys as declared,
/// not SQLite's internal rowids) prints nothing for keyed tables; tables without a key are
/// multisets, compared sorted.
fn assert_same(a: &Path, b: &Path) {
    let tables = query(
        a,
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite%'",
    );
    for t in tables {
        let keyed = query(
            a,
            &format!("SELECT count(*) FROM pragma_table_info('{t}') WHERE pk > 0"),
        ) != ["0"];
        if keyed {
            let out = Command::new("sqldiff")
                .args(["--primarykey", "--table", &t])
                .arg(a)
                .arg(b)
                .output()
                .unwrap();
            assert!(out.status.success(), "sqldiff: {}", stderr_of(&out));
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "",
                "sqldiff {} {} table {t}",
                a.display(),
                b.display()
            );
        } else {
            let rows = |db: &Path| {
                let mut v = query(db, &format!("SELECT * FROM \"{t}\""));
                v.sort();
                v
            };
            assert_eq!(rows(a), rows(b), "table {t} (no primary key) differs");
        }
    }
}

fn sqldiff(a: &Path, b: &Path) -> String {
    let out = Command::new("sqldiff")
        .arg("--primarykey")
        .arg(a)
        .arg(b)
        .output()
        .expect("sqldiff (apt install sqlite3-tools)");
    assert!(out.status.success(), "sqldiff: {}", stderr_of(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn integrity(db: &Path) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg("PRAGMA integrity_check")
        .output()
        .expect("sqlite3");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn conflicts(r: &Root) -> Vec<serde_json::Value> {
    let out = r
        .cmd()
        .args(["db", "conflicts", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

#[test]
fn first_sync_creates_the_central_copy_and_later_syncs_merge_cell_by_cell() {
    let Some(s) = Setup::new("counters = { users = [\"coins\"] }") else { return };
    let out = s.sync_ok();
    assert!(out.contains("central copy created"), "{out}");
    s.assert_converged();

    exec(&s.bot, BOT_CHANGES);
    exec(&s.web, WEB_CHANGES);
    s.sync_ok();
    s.sync_ok(); // the bot pair picks up what the website pair brought to central
    s.assert_converged();
    let users = query(
        &s.central(),
        "SELECT id, nick, email, coins FROM users ORDER BY id",
    );
    assert_eq!(
        users,
        [
            // The website's email change and nothing from the bot: both kept.
            "1|alice|alice@cr0.example|100",
            // +30 on the bot, +20 on the website: both kept (counters).
            "2|bob|bob@example.org|100",
            // Both renamed carol: central-wins keeps the bot's name (it reached central first).
            "3|carol_bot|NULL|10",
            "4|dave|NULL|5",
        ]
    );
    assert_eq!(
        query(
            &s.central(),
            "SELECT score FROM scores WHERE nick = 'alice'"
        ),
        ["12"]
    );
    assert_eq!(query(&s.central(), "SELECT count(*) FROM seen"), ["2"]);
    // The losing name stands in the conflict record, with all three images.
    let c = conflicts(&s.r);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c[0]["table"], "users");
    assert_eq!(c[0]["peer"], "website");
    assert_eq!(c[0]["kind"], "update-update");
    assert_eq!(c[0]["winner"], "central");
    assert_eq!(c[0]["rows"]["peer"][1], "carol_web");
    assert_eq!(c[0]["rows"]["central"][1], "carol_bot");
    assert_eq!(c[0]["rows"]["base"][1], "carol");
    // A further sync changes nothing and records nothing.
    let out = s.sync_ok();
    assert!(!out.contains("+1") && !out.contains("~1"), "{out}");
    assert_eq!(conflicts(&s.r).len(), 1);
}

#[test]
fn policies_decide_conflicts() {
    for (policy, expect) in [
        ("peer-wins", "carol_web"),
        ("newest-wins", "carol_web"),
        ("central-wins", "carol_bot"),
    ] {
        let Some(s) = Setup::new(&format!("policy = \"{policy}\"")) else { return };
        s.sync_ok();
        // The bot pair syncs first and brings the bot's rename to central; the website pair
        // then meets its own rename of the same cell: a conflict.
        exec(&s.bot, BOT_CHANGES);
        exec(&s.web, WEB_CHANGES);
        s.sync_ok();
        s.sync_ok();
        s.assert_converged();
        assert_eq!(
            query(&s.central(), "SELECT nick FROM users WHERE id = 3"),
            [expect],
            "{policy}"
        );
        // Without counters, coins is a plain conflicting cell: bob's row conflicts too.
        assert_eq!(conflicts(&s.r).len(), 2, "{policy}");
    }
}

#[test]
fn update_delete_and_insert_insert_are_conflicts_resolved_by_policy() {
    // With `rekey` on (the default) both id-9 rows would survive (tests/db_schemas.rs).
    let Some(s) = Setup::new("policy = \"peer-wins\"\nrekey = false") else { return };
    s.sync_ok();
    exec(
        &s.central(),
        "DELETE FROM users WHERE id = 1; INSERT INTO users VALUES (9, 'c9', NULL, 0, 't');",
    );
    exec(
        &s.bot,
        "UPDATE users SET email = 'x' WHERE id = 1; INSERT INTO users VALUES (9, 'b9', NULL, 0, 't');",
    );
    s.sync(&["--peer", "bot"]);
    assert_eq!(sqldiff(&s.central(), &s.bot), "");
    assert_eq!(
        query(
            &s.central(),
            "SELECT nick, email FROM users WHERE id IN (1, 9) ORDER BY id"
        ),
        ["alice|x", "b9|NULL"]
    );
    let kinds: Vec<String> = conflicts(&s.r)
        .iter()
        .map(|c| c["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["update-delete", "insert-insert"]);
}

#[test]
fn directions_pull_and_push_write_one_side_only() {
    let Some(s) = Setup::new("") else { return };
    s.sync_ok();
    let bot = s.bot.display().to_string();
    let web = s.web.display().to_string();
    s.r.write_config(&format!(
        "[[database.db]]\nname = \"users\"\npeers = [\n  {{ name = \"bot\", path = \"{bot}\", direction = \"pull\" }},\n  \
         {{ name = \"website\", path = \"{web}\", direction = \"push\" }},\n]\n"
    ));
    exec(
        &s.bot,
        "INSERT INTO users VALUES (10, 'from_bot', NULL, 0, 't')",
    );
    exec(
        &s.web,
        "INSERT INTO users VALUES (11, 'from_web', NULL, 0, 't')",
    );
    exec(
        &s.central(),
        "INSERT INTO users VALUES (12, 'from_central', NULL, 0, 't')",
    );
    s.sync_ok();
    s.sync_ok();
    let ids = |db: &Path| query(db, "SELECT id FROM users WHERE id >= 10 ORDER BY id");
    assert_eq!(
        ids(&s.central()),
        ["10", "12"],
        "pull brings the bot's row; push ignores the website's"
    );
    assert_eq!(ids(&s.bot), ["10"], "nothing is pushed to a pull peer");
    assert_eq!(
        ids(&s.web),
        ["10", "11", "12"],
        "push peer gets central; keeps its own"
    );
    // Stable: the differences a direction may not propagate are not redone every run.
    let out = s.sync_ok();
    assert!(!out.contains("+1"), "{out}");
}

#[test]
fn multisets_composite_keys_blobs_nulls_and_excluded_tables() {
    let Some(s) = Setup::new("exclude_tables = [\"cache\"]") else { return };
    for db in [&s.bot, &s.web] {
        exec(db, "CREATE TABLE files (owner BLOB, name TEXT, data BLOB, note TEXT, PRIMARY KEY (owner, name));
                  CREATE TABLE cache (k TEXT);
                  CREATE TABLE log (id INTEGER PRIMARY KEY AUTOINCREMENT, msg TEXT);");
    }
    exec(&s.bot, "INSERT INTO cache VALUES ('bot only')");
    s.sync_ok();
    // Both sides insert the same row into a table without a key: it occurs twice.
    exec(
        &s.bot,
        "INSERT INTO seen VALUES ('zed', '#x', 't');
                  INSERT INTO files VALUES (x'00ff', 'a', x'deadbeef', NULL);
                  INSERT INTO log (msg) VALUES ('b');",
    );
    exec(
        &s.web,
        "INSERT INTO seen VALUES ('zed', '#x', 't');
                  INSERT INTO files VALUES (x'00fe', 'a', NULL, 'n');
                  DELETE FROM seen WHERE nick = 'alice';",
    );
    s.sync_ok();
    s.sync_ok();
    // The excluded table differs and is left as it is on every side.
    assert_eq!(query(&s.bot, "SELECT count(*) FROM cache"), ["1"]);
    assert_eq!(query(&s.central(), "SELECT count(*) FROM cache"), ["1"]);
    assert_eq!(query(&s.web, "SELECT count(*) FROM cache"), ["0"]);
    exec(&s.bot, "DELETE FROM cache");
    exec(&s.central(), "DELETE FROM cache");
    s.assert_converged();
    assert_eq!(
        query(&s.central(), "SELECT nick FROM seen ORDER BY nick"),
        ["zed", "zed"]
    );
    assert_eq!(
        query(
            &s.central(),
            "SELECT hex(owner), data FROM files ORDER BY owner"
        ),
        ["00FE|NULL", "00FF|x4"]
    );
}

#[test]
fn tables_whose_schemas_differ_are_skipped_and_the_rest_syncs() {
    let Some(s) = Setup::new("") else { return };
    s.sync_ok();
    exec(
        &s.bot,
        // A renamed column (an added one is propagated instead: tests/db_schemas.rs).
        "ALTER TABLE scores RENAME COLUMN score TO points; CREATE TABLE extra (x);
                  INSERT INTO users VALUES (5, 'eve', NULL, 0, 't'); UPDATE scores SET points = 99;",
    );
    let out = s.sync_ok();
    assert!(
        out.contains("skipped: columns or primary key differ"),
        "{out}"
    );
    assert!(out.contains("skipped: exists in the peer only"), "{out}");
    assert_eq!(
        query(&s.central(), "SELECT nick FROM users WHERE id = 5"),
        ["eve"]
    );
    assert_eq!(
        query(&s.central(), "SELECT max(score) FROM scores"),
        ["10"],
        "not merged"
    );
    let status = s.r.status_json();
    let bot = status["databases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer"] == "bot")
        .unwrap();
    assert_eq!(bot["skipped_tables"].as_array().unwrap().len(), 2);
    assert!(
        status["problems"]
            .to_string()
            .contains("table scores is not synced"),
        "{status}"
    );
}

#[test]
fn missing_corrupt_truncated_and_locked_peers_fail_clearly_and_leave_central_alone() {
    if REMOTE {
        // Damaged files are rewritten by this test as root under the remote user's
        // directory; a missing remote path is tested in tests/remote.rs.
        return;
    }
    let Some(s) = Setup::new("") else { return };
    s.sync_ok();
    let big = s.r.tmp.path().join("big.db");
    exec(
        &big,
        "CREATE TABLE t (x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) INSERT INTO t SELECT randomblob(100) FROM n;",
    );

    type Damage<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Damage<'_>, &str)> = vec![
        (
            "missing",
            Box::new(|p: &Path| std::fs::remove_file(p).unwrap()),
            "not found",
        ),
        (
            "random bytes",
            Box::new(|p: &Path| std::fs::write(p, vec![0x5au8; 64 * 1024]).unwrap()),
            "bot.db",
        ),
        (
            "truncated",
            Box::new(|p: &Path| {
                std::fs::copy(&big, p).unwrap();
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(std::fs::metadata(p).unwrap().len() / 3).unwrap();
            }),
            "bot.db",
        ),
        (
            "a wrong page size in the header",
            Box::new(|p: &Path| {
                use std::io::{Seek, SeekFrom, Write};
                let mut f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.seek(SeekFrom::Start(16)).unwrap();
                f.write_all(&[0x02, 0x00]).unwrap();
            }),
            "bot.db: malformed database schema",
        ),
    ];
    for (n, (what, damage, needle)) in cases.into_iter().enumerate() {
        let id = 100 + n;
        exec(
            &s.web,
            &format!("INSERT INTO users VALUES ({id}, 'web', NULL, 0, 't')"),
        );
        let saved = std::fs::read(&s.bot).unwrap();
        damage(&s.bot);
        let damaged = std::fs::read(&s.bot).ok();
        let central_before = std::fs::read(s.central()).unwrap();
        let out = s.sync(&["--peer", "bot"]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: one line: {err}");
        assert!(
            err.contains(needle) && err.contains("users/bot"),
            "{what}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(
            std::fs::read(s.central()).unwrap(),
            central_before,
            "{what}: central byte-identical"
        );
        // A run over all pairs fails too, but the healthy pair still syncs.
        let out = s.sync(&[]);
        assert_eq!(out.status.code(), Some(1), "{what}");
        assert_eq!(
            std::fs::read(&s.bot).ok(),
            damaged,
            "{what}: peer left as it was"
        );
        assert_eq!(
            query(
                &s.central(),
                &format!("SELECT nick FROM users WHERE id = {id}")
            ),
            ["web"],
            "{what}: the other pair still synced"
        );
        std::fs::write(&s.bot, &saved).unwrap();
        s.sync_ok();
    }

    // Locked: a writer holds an exclusive lock longer than busy_timeout.
    let before = std::fs::read(s.central()).unwrap();
    let holder = Connection::open(&s.bot).unwrap();
    holder
        .execute_batch("BEGIN EXCLUSIVE; INSERT INTO users VALUES (8, 'x', NULL, 0, 't');")
        .unwrap();
    let out = s.sync(&["--peer", "bot"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("busy") && err.contains("bot.db"), "{err}");
    assert_eq!(
        std::fs::read(s.central()).unwrap(),
        before,
        "central byte-identical"
    );
    holder.execute_batch("COMMIT").unwrap();
    s.sync_ok();
    assert_eq!(
        query(&s.central(), "SELECT nick FROM users WHERE id = 8"),
        ["x"]
    );
}

#[test]
fn a_peer_that_is_a_fifo_a_device_a_directory_or_empty_is_refused_without_blocking() {
    let Some(s) = Setup::new("") else { return };
    s.sync_ok();
    let tmp = s.r.tmp.path();
    let fifo = tmp.join("pipe.db");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let dir = tmp.join("dir.db");
    std::fs::create_dir(&dir).unwrap();
    let empty = tmp.join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    let cases = [
        (fifo, "a named pipe (FIFO)"),
        (PathBuf::from("/dev/zero"), "a device"),
        (PathBuf::from("/dev/null"), "a device"),
        (dir, "a directory"),
        (empty, "an empty file (0 bytes)"),
    ];
    for (path, kind) in cases {
        s.r.write_config(&format!(
            "[general]\nbusy_timeout = \"1s\"\n[[database.db]]\nname = \"users\"\n\
             peers = [\n  {{ name = \"bot\", path = \"{}\" }},\n  {{ name = \"website\", path = \"{}\" }},\n]\n",
            path.display(),
            s.web.display()
        ));
        exec(&s.web, "UPDATE users SET coins = coins + 1 WHERE id = 1");
        let mut child = std::process::Command::new(common::BIN)
            .arg("--root")
            .arg(&s.r.root)
            .args(["db", "sync"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > std::time::Duration::from_secs(20) {
                let _ = child.kill();
                panic!("{}: the sync blocked", path.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(1), "{}: {err}", path.display());
        assert_eq!(
            err.lines().count(),
            1,
            "{}: one line: {err}",
            path.display()
        );
        assert!(
            err.contains(&path.display().to_string()) && err.contains(kind),
            "{err}"
        );
        // The healthy pair still synced.
        assert_eq!(
            query(&s.central(), "SELECT coins FROM users WHERE id = 1"),
            query(&s.web, "SELECT coins FROM users WHERE id = 1")
        );
    }
}

#[test]
fn mass_delete_guard_stops_a_wiped_peer_unless_forced() {
    let Some(s) = Setup::new("") else { return };
    exec(
        &s.bot,
        "WITH RECURSIVE n(i) AS (SELECT 100 UNION ALL SELECT i + 1 FROM n WHERE i < 299) INSERT INTO users SELECT i, 'n' || i, NULL, 0, 't' FROM n;",
    );
    exec(
        &s.web,
        "WITH RECURSIVE n(i) AS (SELECT 100 UNION ALL SELECT i + 1 FROM n WHERE i < 299) INSERT INTO users SELECT i, 'n' || i, NULL, 0, 't' FROM n;",
    );
    s.sync_ok();
    exec(&s.bot, "DELETE FROM users WHERE id > 50");
    let before = std::fs::read(s.central()).unwrap();
    let out = s.sync(&["--peer", "bot"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("mass-delete guard")
            && err.contains("table users")
            && err.contains("200 of the 203"),
        "{err}"
    );
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(s.central()).unwrap(), before);
    let out = s.sync(&["--peer", "bot", "--force"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(query(&s.central(), "SELECT count(*) FROM users"), ["3"]);
}

/// Every file under `dir` (but cr0sync's own log and lock files) with its mtime and a
/// digest of its bytes.
fn tree(dir: &Path) -> Vec<(PathBuf, i64, i64, u64)> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<_> = walkdir::WalkDir::new(dir)
        .into_iter()
        .map(Result::unwrap)
        .filter(|e| e.file_type().is_file())
        .filter(|e| !e.path().to_string_lossy().contains("/root/logs/"))
        .filter(|e| !e.path().to_string_lossy().contains("/root/locks/"))
        .map(|e| {
            let m = e.metadata().unwrap();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(e.path()).unwrap().hash(&mut h);
            (
                e.path().to_path_buf(),
                m.mtime(),
                m.mtime_nsec(),
                h.finish(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn dry_run_prints_per_table_counts_and_writes_nothing() {
    let Some(s) = Setup::new("counters = { users = [\"coins\"] }") else { return };
    s.sync_ok();
    exec(&s.bot, BOT_CHANGES);
    exec(&s.web, WEB_CHANGES);
    let before = tree(s.r.tmp.path());
    let out = s.sync(&["--dry-run"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    // The old scripts' name is the same command.
    let alias =
        s.r.cmd()
            .args(["db", "bidirectional", "--dry-run"])
            .output()
            .unwrap();
    assert_eq!(alias.stdout, out.stdout);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("users     bot      users   +1 ~2 -0  +0 ~0 -0  0"),
        "{text}"
    );
    assert!(text.contains("dry run: nothing written"), "{text}");
    let after = tree(s.r.tmp.path());
    // The peer's kept snapshot (a remote peer's transfer cache, a local peer's kept copy:
    // the peer's pages as last read, not a decision) is refreshed by a dry run too;
    // nothing else changes.
    let cache = |t: Vec<(PathBuf, i64, i64, u64)>| -> Vec<(PathBuf, i64, i64, u64)> {
        t.into_iter()
            .filter(|(p, ..)| {
                let p = p.to_string_lossy();
                !(p.contains("/state/remote/db/") || p.ends_with(".snapshot.db"))
            })
            .collect()
    };
    assert_eq!(cache(before), cache(after));
}

#[test]
fn fast_path_skips_a_pair_whose_files_did_not_change() {
    let Some(s) = Setup::new("") else { return };
    // Old mtimes, so the fingerprint is not racy.
    for f in [&s.bot, &s.web] {
        assert!(
            Command::new("touch")
                .args(["-d", "2020-01-01"])
                .arg(f)
                .status()
                .unwrap()
                .success()
        );
    }
    s.sync_ok();
    s.sync_ok();
    let out = s.sync_ok();
    assert_eq!(
        out.matches("unchanged since the last sync").count(),
        2,
        "{out}"
    );
    // A change on a peer ends the fast path for that pair.
    exec(&s.web, "INSERT INTO users VALUES (20, 'w', NULL, 0, 't')");
    let out = s.sync_ok();
    assert!(out.contains("website  users  +1 ~0 -0"), "{out}");
    assert_eq!(
        query(&s.central(), "SELECT nick FROM users WHERE id = 20"),
        ["w"]
    );
    // Central changed, so the bot pair is no longer unchanged either.
    let out = s.sync_ok();
    assert!(out.contains("bot      users  +0 ~0 -0  +1 ~0 -0"), "{out}");
    s.assert_converged();
}

fn backups(s: &Setup) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(s.r.path("backups/users"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn backups_are_whole_gzip_files_throttled_by_interval_and_restorable() {
    let Some(s) = Setup::new("") else { return };
    s.sync_ok();
    assert!(backups(&s).is_empty(), "nothing written, nothing backed up");
    exec(&s.bot, "INSERT INTO users VALUES (30, 'a', NULL, 0, 't')");
    s.sync_ok();
    let first = backups(&s);
    let names: Vec<String> = first
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("users.central.")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.starts_with("users.website.")),
        "{names:?}"
    );
    for b in &first {
        assert!(
            Command::new("gzip")
                .arg("-t")
                .arg(b)
                .status()
                .unwrap()
                .success(),
            "{}",
            b.display()
        );
    }
    // Within backup_interval (1h default): no new routine backup.
    exec(&s.bot, "INSERT INTO users VALUES (31, 'b', NULL, 0, 't')");
    s.sync_ok();
    assert_eq!(backups(&s), first);

    // Restore the central backup: it held rows up to 29 only (taken before id 30 arrived).
    let central_backup = first
        .iter()
        .find(|p| p.to_string_lossy().contains(".central."))
        .unwrap();
    let out =
        s.r.cmd()
            .args(["db", "restore"])
            .arg(central_backup)
            .output()
            .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        query(&s.central(), "SELECT count(*) FROM users WHERE id >= 30"),
        ["0"]
    );
    assert_eq!(integrity(&s.central()), "ok");
    assert!(
        backups(&s).len() > first.len(),
        "the state before the restore was backed up"
    );
    // The pairs were reset: the next sync is a union, nothing is lost.
    s.sync_ok();
    s.sync_ok();
    s.assert_converged();
    assert_eq!(
        query(&s.central(), "SELECT count(*) FROM users WHERE id >= 30"),
        ["2"]
    );

    // clean-backups keeps backup_keep_min per target even when all are old.
    let out =
        s.r.cmd()
            .args(["db", "clean-backups", "--dry-run"])
            .output()
            .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 backup(s) would remove"));
}

#[test]
fn sync_from_bot_replaces_central_after_a_backup_and_resets_the_pair() {
    let Some(s) = Setup::new("") else { return };
    s.sync_ok();
    if REMOTE {
        // Not built for a peer on another host: one line, the central copy untouched.
        let before = std::fs::read(s.central()).unwrap();
        let out = s.r.cmd().args(["sync-from-bot"]).output().unwrap();
        let err = stderr_of(&out);
        assert!(!out.status.success(), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("does not reach peers on other hosts"), "{err}");
        assert_eq!(std::fs::read(s.central()).unwrap(), before);
        return;
    }
    exec(&s.central(), "UPDATE users SET nick = 'broken'");
    exec(
        &s.bot,
        "INSERT INTO users VALUES (40, 'bot40', NULL, 0, 't')",
    );
    let dry =
        s.r.cmd()
            .args(["sync-from-bot", "--dry-run"])
            .output()
            .unwrap();
    assert!(dry.status.success());
    assert!(String::from_utf8_lossy(&dry.stdout).contains("would replace"));
    let out =
        s.r.cmd()
            .args(["sync-from-bot", "--db", "users"])
            .output()
            .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(sqldiff(&s.central(), &s.bot), "");
    assert!(
        backups(&s)
            .iter()
            .any(|p| p.to_string_lossy().contains(".central."))
    );
    // The old central state is in the backup.
    let b = backups(&s)
        .into_iter()
        .find(|p| p.to_string_lossy().contains(".central."))
        .unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -dc '{}' > '{}'",
            b.display(),
            s.r.tmp.path().join("old.db").display()
        ))
        .status()
        .unwrap();
    assert!(out.success());
    assert_eq!(
        query(
            &s.r.tmp.path().join("old.db"),
            "SELECT DISTINCT nick FROM users"
        ),
        ["broken"]
    );
    s.sync_ok();
    s.sync_ok();
    s.assert_converged();
}

#[test]
fn cron_database_is_silent_syncs_and_records_the_run() {
    let Some(s) = Setup::new("") else { return };
    let out = s.r.cmd().args(["cron", "database"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    s.assert_converged();
    let status = s.r.status_json();
    assert_eq!(status["jobs"]["database"]["last_result"], "ok");
    assert_eq!(status["databases"].as_array().unwrap().len(), 2);
    assert!(status["databases"][0]["last_sync"].is_string());
    let schedule: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.r.path("state/schedule/database.json")).unwrap())
            .unwrap();
    assert!(schedule.to_string().contains("clean-backups"), "{schedule}");
}

/// A peer dropped from the configuration leaves its copy in `state/` (a local peer's kept
/// snapshot, a remote peer's transfer copy), the size of the peer: `db clean-backups`
/// removes it, and only it (its base stays, a configured peer's copy stays).
#[test]
fn the_copy_of_a_peer_no_longer_configured_is_cleaned_up_and_nothing_else() {
    let Some(s) = Setup::new("") else { return };
    s.sync_ok();
    let copy = |peer: &str| {
        if REMOTE {
            s.r.path(&format!("state/remote/db/users/{peer}.db"))
        } else {
            s.r.path(&format!("state/db/users/{peer}.snapshot.db"))
        }
    };
    let clean = |args: &[&str]| -> String {
        let out = s.r.cmd().args(["db", "clean-backups"]).args(args).output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(copy("bot").is_file() && copy("website").is_file());
    let out = clean(&[]);
    assert!(!out.contains("no longer configured"), "{out}");
    assert!(copy("bot").is_file() && copy("website").is_file());

    // `website` is dropped from the configuration.
    s.r.write_config(&format!(
        "{}[general]\nbusy_timeout = \"1s\"\n[[database.db]]\nname = \"users\"\n\
         peers = [ {{ name = \"bot\", path = \"{}\" }} ]\n",
        s.peers.section(),
        s.peers.url(&s.bot)
    ));
    let gone = copy("website").display().to_string();
    let out = clean(&["--dry-run"]);
    assert!(
        out.contains(&format!("would remove {gone} (a copy of a peer no longer configured)")),
        "{out}"
    );
    assert!(copy("website").is_file());
    let out = clean(&[]);
    assert!(
        out.contains(&format!("removed {gone} (a copy of a peer no longer configured)")),
        "{out}"
    );
    assert!(!copy("website").exists());
    assert!(copy("bot").is_file());
    assert!(s.r.path("state/db/users/website.base.db").is_file());
    // The pair left syncs on.
    s.sync_ok();
    assert_same(&s.central(), &s.bot);
}

#[test]
fn a_writer_inserting_during_many_syncs_loses_nothing() {
    writer_during_syncs("wal");
}

#[test]
fn a_writer_in_rollback_journal_mode_during_many_syncs_loses_nothing() {
    writer_during_syncs("delete");
}

fn writer_during_syncs(journal: &str) {
    let Some(s) = Setup::new("") else { return };
    // A writer committing every few milliseconds in rollback-journal mode can keep a
    // reader waiting for a while on a loaded machine: give the snapshot room, as an
    // operator with such a bot would (busy_timeout).
    let config = std::fs::read_to_string(s.r.path("cr0sync.toml")).unwrap();
    s.r.write_config(&config.replace("busy_timeout = \"1s\"", "busy_timeout = \"10s\""));
    exec(&s.bot, &format!("PRAGMA journal_mode = {journal}"));
    s.sync_ok();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (bot, stop) = (s.bot.clone(), stop.clone());
        std::thread::spawn(move || {
            let c = Connection::open(&bot).unwrap();
            c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
            let mut n = 1000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.execute("INSERT INTO users VALUES (?1, 'w', NULL, 0, 't')", [n])
                    .unwrap();
                c.execute("UPDATE users SET coins = coins + 1 WHERE id = 1", [])
                    .unwrap();
                n += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            n - 1000
        })
    };
    for _ in 0..25 {
        let out = s.sync(&[]);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    s.sync_ok();
    s.sync_ok();
    s.assert_converged();
    assert_eq!(
        query(&s.central(), "SELECT count(*) FROM users WHERE id >= 1000"),
        [written.to_string()]
    );
    assert_eq!(
        query(&s.central(), "SELECT coins FROM users WHERE id = 1"),
        [(100 + written).to_string()]
    );
    assert_eq!(
        journal_mode(&s.bot),
        journal,
        "the peer's journal mode is never changed"
    );
}

fn journal_mode(db: &Path) -> String {
    query(db, "PRAGMA journal_mode").remove(0)
}

#[test]
fn sigkill_at_many_moments_then_one_sync_leaves_everything_equal_intact_and_complete() {
    let Some(s) = Setup::new("") else { return };
    let fill = "WITH RECURSIVE n(i) AS (SELECT 100 UNION ALL SELECT i + 1 FROM n WHERE i < 40099)
                INSERT INTO users SELECT i, 'n' || i, 'e' || i, i, 't0' FROM n;";
    exec(&s.bot, fill);
    exec(&s.web, fill);
    s.sync_ok();
    // Disjoint work on each side: updates, inserts, deletes and multiset inserts.
    exec(&s.bot, "UPDATE users SET nick = 'bot' || id WHERE id % 10 = 1;
                  DELETE FROM users WHERE id % 100 = 7;
                  WITH RECURSIVE n(i) AS (SELECT 100000 UNION ALL SELECT i + 1 FROM n WHERE i < 104999)
                  INSERT INTO users SELECT i, 'bn' || i, NULL, 0, 't1' FROM n;
                  WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500)
                  INSERT INTO seen SELECT 'b' || i, '#c', 't' FROM n;");
    exec(&s.web, "UPDATE users SET email = 'web' || id WHERE id % 10 = 2;
                  WITH RECURSIVE n(i) AS (SELECT 200000 UNION ALL SELECT i + 1 FROM n WHERE i < 204999)
                  INSERT INTO users SELECT i, 'wn' || i, NULL, 0, 't2' FROM n;
                  WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500)
                  INSERT INTO seen SELECT 'w' || i, '#c', 't' FROM n;");

    let killed = common::kill_at_later_and_later_moments(
        &s.r.root,
        &["db", "sync"],
        std::time::Duration::from_millis(10),
        80,
        |_| {},
    );
    assert!(
        killed > 10,
        "only {killed} runs were killed: the database is too small"
    );
    let log = std::fs::read_to_string(s.r.path("logs/cron_database_sync.log")).unwrap();
    eprintln!(
        "{killed} runs killed; {} later runs completed an interrupted one",
        log.matches("previous sync was interrupted").count()
    );
    s.sync_ok();
    s.sync_ok();
    s.assert_converged();
    let c = s.central();
    let one = |sql: &str| query(&c, sql).remove(0);
    assert_eq!(
        one("SELECT count(*) FROM users WHERE id BETWEEN 100000 AND 104999"),
        "5000"
    );
    assert_eq!(
        one("SELECT count(*) FROM users WHERE id BETWEEN 200000 AND 204999"),
        "5000"
    );
    assert_eq!(
        one("SELECT count(*) FROM users WHERE id < 100000 AND id % 100 = 7"),
        "0"
    );
    assert_eq!(
        one("SELECT count(*) FROM users WHERE id < 100000 AND id % 10 = 1 AND nick != 'bot' || id"),
        "0"
    );
    assert_eq!(
        one(
            "SELECT count(*) FROM users WHERE id < 100000 AND id % 10 = 2 AND email != 'web' || id"
        ),
        "0"
    );
    assert_eq!(
        one("SELECT count(*) FROM users"),
        (3 + 40_000 - 400 + 10_000).to_string()
    );
    // Each multiset insert exactly once: nothing lost, nothing duplicated.
    assert_eq!(one("SELECT count(*) FROM seen"), "1001");
    assert_eq!(one("SELECT count(DISTINCT nick) FROM seen"), "1001");
    // No conflicts were made up, and no record was written twice.
    let recorded = conflicts(&s.r);
    assert!(recorded.is_empty(), "{recorded:?}");
}

#[test]
fn a_peer_whose_writer_died_mid_transaction_is_recovered_by_sqlite_and_synced() {
    let Some(s) = Setup::new("") else { return };
    exec(
        &s.bot,
        "WITH RECURSIVE n(i) AS (SELECT 100 UNION ALL SELECT i + 1 FROM n WHERE i < 20099)
                  INSERT INTO users SELECT i, 'n' || i, hex(randomblob(64)), 0, 't' FROM n;",
    );
    s.sync_ok();
    // A writer with a tiny cache spills an uncommitted update into the file, then dies:
    // the peer is left with a hot journal.
    let mut writer = std::process::Command::new("sqlite3")
        .arg(&s.bot)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = writer.stdin.as_mut().unwrap();
        stdin
            .write_all(b"PRAGMA cache_size = 2; BEGIN; UPDATE users SET email = 'lost';\n")
            .unwrap();
        stdin.flush().unwrap();
    }
    let journal = s.bot.with_extension("db-journal");
    for _ in 0..200 {
        if journal.exists() && std::fs::metadata(&journal).unwrap().len() > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    writer.kill().unwrap();
    writer.wait().unwrap();
    assert!(journal.exists(), "no hot journal was left");
    s.sync_ok();
    s.assert_converged();
    assert_eq!(
        query(
            &s.central(),
            "SELECT count(*) FROM users WHERE email = 'lost'"
        ),
        ["0"]
    );
}

#[test]
fn a_first_sync_shows_its_stages_on_a_terminal_only() {
    let Some(s) = Setup::new("") else { return };
    // Enough rows that the first sync takes some milliseconds.
    exec(
        &s.bot,
        "CREATE TABLE big (id INTEGER PRIMARY KEY, v TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000)
         INSERT INTO big SELECT i, hex(randomblob(40)) FROM n;",
    );
    // Not on a pipe.
    let out =
        s.r.cmd()
            .env("CR0SYNC_PROGRESS_AFTER_MS", "0")
            .args(["db", "sync", "--peer", "website"])
            .output()
            .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(!stderr_of(&out).contains('\r'), "{}", stderr_of(&out));
    // On a terminal: the bot's table `big` is new, and the website has no such table, so
    // its pair warns while its progress line may be showing.
    let (tty, last) = common::on_a_terminal(&s.r.root, "db sync");
    assert!(tty.contains("users/bot: "), "{tty:?}");
    // Erased before the report (warnings printed after the last erase are whole lines).
    let report = last
        .split("\r\n")
        .skip_while(|l| l.starts_with("cr0sync: WARN"))
        .collect::<Vec<_>>()
        .join("\r\n");
    assert!(report.starts_with("DATABASE"), "{tty:?}");
    // Every warning starts a line of its own: a progress line is erased before it.
    let warnings: Vec<usize> = tty.match_indices("cr0sync: WARN").map(|(i, _)| i).collect();
    assert!(!warnings.is_empty(), "{tty:?}");
    for i in warnings {
        let before = &tty[..i];
        assert!(
            before.is_empty() || before.ends_with('\n') || before.ends_with("\r\x1b[2K"),
            "{tty:?}"
        );
    }
}

#[test]
fn an_unreadable_merge_base_is_set_aside_and_the_pair_merged_as_a_first_sync() {
    let Some(s) = Setup::new("") else { return };
    s.sync_ok();
    // Both sides move on; then the bot pair's base is garbage.
    exec(&s.bot, "INSERT INTO users VALUES (50, 'b50', NULL, 0, 't')");
    exec(
        &s.central(),
        "INSERT INTO users VALUES (60, 'c60', NULL, 0, 't'); UPDATE users SET nick = 'x' WHERE id = 2",
    );
    let base = s.r.path("state/db/users/bot.base.db");
    std::fs::write(&base, vec![0x42u8; 8192]).unwrap();
    let out = s.sync(&["--peer", "bot"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let aside: Vec<_> = std::fs::read_dir(s.r.path("state/db/users"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("bot.base.db.unreadable-"))
        .collect();
    assert_eq!(aside.len(), 1, "the garbage is kept aside");
    let log = std::fs::read_to_string(s.r.path("logs/cron_database_sync.log")).unwrap();
    assert!(log.contains("merged as a first sync"), "{log}");
    // Nothing either side had is lost; the renamed row is a recorded conflict.
    assert_eq!(sqldiff(&s.central(), &s.bot), "");
    for db in [s.central(), s.bot.clone()] {
        assert_eq!(
            query(&db, "SELECT id FROM users WHERE id IN (50, 60) ORDER BY id"),
            ["50", "60"]
        );
    }
    assert_eq!(conflicts(&s.r).len(), 1);
    s.sync_ok();
    s.assert_converged();
}

#[test]
fn a_healthy_wal_peer_in_a_directory_cr0sync_cannot_write_is_not_called_damaged() {
    if REMOTE {
        // About the local process's own permissions (and this run's umask is 0).
        return;
    }
    if !common::needs_root("reading as an unprivileged user") {
        return;
    }
    let r = Root::new();
    common::open_up(r.tmp.path());
    let ro = r.tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let bot = ro.join("bot.db");
    exec(
        &bot,
        "PRAGMA journal_mode = wal; CREATE TABLE t (id INTEGER PRIMARY KEY, v); INSERT INTO t VALUES (1, 'a');",
    );
    r.write_config(&format!(
        "[[database.db]]\nname = \"d\"\npeers = [{{ name = \"bot\", path = \"{}\" }}]\n",
        bot.display()
    ));
    assert!(
        std::process::Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(&r.root)
            .status()
            .unwrap()
            .success()
    );
    let out = common::cr0sync_unprivileged()
        .arg("--root")
        .arg(&r.root)
        .args(["db", "sync"])
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("WAL mode") && err.contains(&ro.display().to_string()),
        "{err}"
    );
    assert!(
        !err.contains("damaged") && !err.contains("restore"),
        "{err}"
    );
}

#[test]
fn a_restore_into_a_wal_peer_of_another_page_size_says_why_and_writes_nothing() {
    let Some(s) = Setup::new("") else { return };
    exec(&s.bot, "PRAGMA journal_mode = wal");
    s.sync_ok();
    // A backup with bigger pages than the bot's database.
    let other = s.r.tmp.path().join("big-pages.db");
    exec(
        &other,
        "PRAGMA page_size = 16384; CREATE TABLE users (id INTEGER PRIMARY KEY, nick TEXT NOT NULL, \
         email TEXT, coins INTEGER NOT NULL DEFAULT 0, updated_at TEXT NOT NULL); VACUUM;",
    );
    let gz = s.r.tmp.path().join("users.bot.20260101T000000Z.db.gz");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -c '{}' > '{}'",
            other.display(),
            gz.display()
        ))
        .status()
        .unwrap();
    assert!(out.success());
    let before = std::fs::read(&s.bot).unwrap();
    let out =
        s.r.cmd()
            .args(["db", "restore"])
            .arg(&gz)
            .args(["--to", "bot"])
            .output()
            .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    if REMOTE {
        // Not built for a peer on another host: one line, nothing written.
        assert!(err.contains("does not reach peers on other hosts"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_eq!(std::fs::read(&s.bot).unwrap(), before, "nothing written");
        return;
    }
    assert!(
        err.contains("WAL mode")
            && err.contains("journal_mode=DELETE")
            && !err.contains("readonly"),
        "{err}"
    );
    assert_eq!(std::fs::read(&s.bot).unwrap(), before, "nothing written");
}
