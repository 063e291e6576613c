// The real-schema cases, included by tests/db_schemas.rs (local peers) and
// tests/db_schemas_remote.rs (the same peers behind ssh), which set `REMOTE`.

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Root, stderr_of};

const WEBSITE: &str = include_str!("../../fixtures/website.sql");

struct Site {
    r: Root,
    bot: PathBuf,
    web: PathBuf,
    /// Where the peers live (behind an sshd when `REMOTE`).
    _peers: common::sshd::Peers,
}

impl Site {
    /// `None` where a `REMOTE` run cannot start its sshd (not root; noted on stderr).
    fn new(extra_sql: &str) -> Option<Site> {
        let r = Root::new();
        let peers = common::sshd::Peers::new(REMOTE, r.tmp.path())?;
        let bot = peers.dir.join("bot.db");
        let web = peers.dir.join("web.db");
        for p in [&bot, &web] {
            app(p, WEBSITE);
            app(p, extra_sql);
        }
        peers.hand_over();
        let (remote, bot_url, web_url) = (peers.section(), peers.url(&bot), peers.url(&web));
        r.write_config(&format!(
            "{remote}[general]\nbusy_timeout = \"1s\"\n[[database.db]]\nname = \"site\"\n\
             counters = {{ users = [\"coins\"] }}\n\
             peers = [\n  {{ name = \"bot\", path = \"{bot_url}\" }},\n  {{ name = \"web\", path = \"{web_url}\" }},\n]\n",
        ));
        let s = Site {
            r,
            bot,
            web,
            _peers: peers,
        };
        s.sync();
        Some(s)
    }

    fn central(&self) -> PathBuf {
        self.r.path("databases/site.db")
    }

    fn sides(&self) -> [PathBuf; 3] {
        [self.central(), self.bot.clone(), self.web.clone()]
    }

    fn sync(&self) -> String {
        let out = self.r.cmd().args(["db", "sync"]).output().unwrap();
        assert!(out.status.success(), "db sync failed: {}", stderr_of(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// The sides agree table by table (`sqldiff --primarykey` on every ordinary table and
    /// `sqlite_sequence`; the storage of an FTS index may be laid out differently on each
    /// side, so its shadow tables are checked with its own integrity check instead), and
    /// every side passes SQLite's checks.
    fn assert_converged(&self) {
        let tables = query(
            &self.central(),
            "SELECT name FROM pragma_table_list WHERE schema = 'main' AND type = 'table' \
             AND name NOT LIKE 'sqlite_schema' ORDER BY name",
        );
        for side in [&self.bot, &self.web] {
            for table in &tables {
                let out = Command::new("sqldiff")
                    .args(["--primarykey", "--table", table])
                    .arg(self.central())
                    .arg(side)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "sqldiff: {}", stderr_of(&out));
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout),
                    "",
                    "sqldiff central {} table {table}",
                    side.display()
                );
            }
        }
        for db in self.sides() {
            assert_eq!(one(&db, "PRAGMA integrity_check"), "ok", "{}", db.display());
            assert_eq!(
                query(&db, "PRAGMA foreign_key_check"),
                Vec::<String>::new(),
                "{}",
                db.display()
            );
        }
    }
}

/// Writes as the application does: its own process, foreign keys on, triggers firing.
fn app(db: &Path, sql: &str) {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(format!("PRAGMA foreign_keys = ON; {sql}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "sqlite3: {}", stderr_of(&out));
}

fn query(db: &Path, sql: &str) -> Vec<String> {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().unwrap();
    assert!(out.status.success(), "sqlite3 {sql}: {}", stderr_of(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn one(db: &Path, sql: &str) -> String {
    query(db, sql).into_iter().next().unwrap_or_default()
}

#[test]
fn a_trigger_fires_once_where_the_application_wrote_however_often_it_syncs() {
    let Some(s) = Site::new("") else { return };
    app(
        &s.bot,
        "UPDATE users SET email = 'alice@bot.example' WHERE id = 1",
    );
    assert_eq!(one(&s.bot, "SELECT count(*) FROM audit"), "1");
    for _ in 0..4 {
        s.sync();
    }
    s.assert_converged();
    for db in s.sides() {
        assert_eq!(
            one(&db, "SELECT count(*) FROM audit"),
            "1",
            "one application update, one audit row: {}",
            db.display()
        );
        assert_eq!(
            one(&db, "SELECT email FROM users WHERE id = 1"),
            "alice@bot.example"
        );
    }
}

#[test]
fn generated_columns_are_never_written_and_follow_from_the_row() {
    let Some(s) = Site::new("") else { return };
    app(&s.web, "UPDATE users SET nick = 'BOB' WHERE id = 2");
    app(&s.bot, "UPDATE users SET coins = coins + 5 WHERE id = 2");
    s.sync();
    s.sync();
    s.assert_converged();
    for db in s.sides() {
        assert_eq!(
            one(
                &db,
                "SELECT nick || ' ' || nick_lower || ' ' || coins FROM users WHERE id = 2"
            ),
            "BOB bob 55"
        );
    }
}

#[test]
fn an_external_content_fts_index_answers_for_the_merged_content_on_every_side() {
    let Some(s) = Site::new("") else { return };
    app(
        &s.bot,
        "INSERT INTO posts (id, user_id, title, body) VALUES (10, 1, 'rust', 'a sync tool in rust');
         UPDATE posts SET body = 'coins and more coins' WHERE id = 2;",
    );
    app(
        &s.web,
        "INSERT INTO posts (id, user_id, title, body) VALUES (20, 2, 'php', 'the website in php');
         DELETE FROM posts WHERE id = 1;",
    );
    s.sync();
    s.sync();
    s.assert_converged();
    for db in s.sides() {
        assert_eq!(
            query(
                &db,
                "INSERT INTO posts_fts (posts_fts) VALUES ('integrity-check')"
            ),
            Vec::<String>::new(),
            "{}",
            db.display()
        );
        let hits = |q: &str| {
            query(
                &db,
                &format!("SELECT rowid FROM posts_fts WHERE posts_fts MATCH '{q}' ORDER BY rowid"),
            )
        };
        assert_eq!(hits("rust"), ["10"], "{}", db.display());
        assert_eq!(hits("php"), ["20"]);
        assert_eq!(hits("more"), ["2"]);
        assert_eq!(hits("bots"), Vec::<String>::new(), "deleted post 1 is gone");
        // The cascade ran where the application deleted; the comment went with its post.
        assert_eq!(one(&db, "SELECT count(*) FROM comments"), "0");
    }
}

#[test]
fn fts_indexes_with_their_own_content_and_rtrees_merge_by_rowid_and_pass_their_checks() {
    let Some(s) = Site::new(
        "CREATE VIRTUAL TABLE notes USING fts5 (text);
         CREATE VIRTUAL TABLE places USING rtree (id, x0, x1);
         CREATE VIRTUAL TABLE blind USING fts5 (text, content = '');",
    ) else {
        return;
    };
    // Both sides add a note (FTS5 hands out rowid 1 on each: a collision, rekeyed) and a
    // place; the contentless index cannot be merged (its text is not stored).
    app(
        &s.bot,
        "INSERT INTO notes VALUES ('bot note'); INSERT INTO places VALUES (1, 0, 1);
         INSERT INTO blind (rowid, text) VALUES (1, 'secret');",
    );
    app(
        &s.web,
        "INSERT INTO notes VALUES ('web note'); INSERT INTO places VALUES (2, 5, 6);
         UPDATE users SET coins = coins + 1 WHERE id = 1;",
    );
    let out = s.sync();
    assert!(
        out.contains("blind") && out.contains("virtual table (fts5)"),
        "{out}"
    );
    s.sync();
    // Then edits and deletes through the virtual tables, on both sides.
    app(&s.bot, "DELETE FROM places WHERE id = 2");
    app(
        &s.web,
        "UPDATE notes SET text = 'web note edited' WHERE rowid = 2",
    );
    s.sync();
    s.sync();
    for db in s.sides() {
        let d = db.display();
        assert_eq!(one(&db, "SELECT coins FROM users WHERE id = 1"), "101");
        assert_eq!(one(&db, "PRAGMA integrity_check"), "ok", "{d}");
        assert_eq!(
            query(&db, "INSERT INTO notes (notes) VALUES ('integrity-check')"),
            Vec::<String>::new(),
            "{d}"
        );
        assert_eq!(
            query(&db, "SELECT rowid || ' ' || text FROM notes ORDER BY rowid"),
            ["1 bot note", "2 web note edited"],
            "{d}"
        );
        assert_eq!(
            query(&db, "SELECT rowid FROM notes WHERE notes MATCH 'edited'"),
            ["2"],
            "{d}: the index answers for the merged content"
        );
        assert_eq!(one(&db, "SELECT rtreecheck('places')"), "ok", "{d}");
        assert_eq!(
            query(&db, "SELECT id FROM places WHERE x0 <= 0.5 AND x1 >= 0.5"),
            ["1"],
            "{d}"
        );
        assert_eq!(one(&db, "SELECT count(*) FROM places"), "1", "{d}");
    }
    // The contentless index was left alone on each side.
    assert_eq!(one(&s.web, "SELECT count(*) FROM blind"), "0");
    assert_eq!(one(&s.bot, "SELECT count(*) FROM blind"), "1");
    let c = conflicts(&s);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(
        (&c[0]["table"], &c[0]["kind"], &c[0]["new_key"]),
        (
            &serde_json::json!("notes"),
            &serde_json::json!("rekey"),
            &serde_json::json!([2])
        )
    );
}

#[test]
fn a_column_added_on_one_side_is_added_everywhere_and_no_edit_is_reverted() {
    let Some(s) = Site::new("") else { return };
    // The bot's application migrates and writes the new column; everyone else edits
    // the old columns meanwhile.
    app(
        &s.bot,
        "ALTER TABLE users ADD COLUMN level INTEGER NOT NULL DEFAULT 1;
         UPDATE users SET level = 5 WHERE id = 1;
         UPDATE users SET email = 'bob@bot.example' WHERE id = 2;",
    );
    app(
        &s.web,
        "UPDATE users SET email = 'alice@web.example' WHERE id = 1",
    );
    app(
        &s.central(),
        "UPDATE users SET coins = coins + 1 WHERE id = 2",
    );
    s.sync();
    s.sync();
    s.assert_converged();
    for db in s.sides() {
        assert_eq!(
            query(
                &db,
                "SELECT id || ' ' || email || ' ' || coins || ' ' || level FROM users ORDER BY id"
            ),
            ["1 alice@web.example 100 5", "2 bob@bot.example 51 1"],
            "{}",
            db.display()
        );
    }
    assert!(std::fs::read_dir(s.r.path("backups/site")).unwrap().count() >= 2);
}

#[test]
fn columns_added_by_hand_on_every_side_keep_the_edits_made_since_the_last_sync() {
    // The sequence an operator follows after the skip message: the column is added on
    // all sides by hand, while edits made since the last sync wait on each side.
    let Some(s) = Site::new("") else { return };
    app(
        &s.bot,
        "UPDATE users SET email = 'alice@bot.example' WHERE id = 1",
    );
    app(
        &s.web,
        "UPDATE users SET email = 'bob@web.example' WHERE id = 2",
    );
    for db in s.sides() {
        app(
            &db,
            "ALTER TABLE users ADD COLUMN level INTEGER NOT NULL DEFAULT 1",
        );
    }
    app(&s.web, "UPDATE users SET level = 3 WHERE id = 1");
    s.sync();
    s.sync();
    s.assert_converged();
    for db in s.sides() {
        assert_eq!(
            query(
                &db,
                "SELECT id || ' ' || email || ' ' || level FROM users ORDER BY id"
            ),
            ["1 alice@bot.example 3", "2 bob@web.example 1"],
            "{}",
            db.display()
        );
    }
}

fn conflicts(s: &Site) -> Vec<serde_json::Value> {
    std::fs::read_to_string(s.r.path("state/conflicts.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_swap_of_unique_nicks_on_one_side_applies_without_conflict() {
    let Some(s) = Site::new("") else { return };
    app(
        &s.bot,
        "UPDATE users SET nick = 'tmp' WHERE id = 1; UPDATE users SET nick = 'alice' WHERE id = 2;
         UPDATE users SET nick = 'bob' WHERE id = 1;",
    );
    s.sync();
    s.sync();
    s.assert_converged();
    for db in s.sides() {
        assert_eq!(
            query(&db, "SELECT nick FROM users ORDER BY id"),
            ["bob", "alice"],
            "{}",
            db.display()
        );
    }
    assert!(conflicts(&s).is_empty());
}

#[test]
fn the_same_nick_registered_on_both_sides_is_a_unique_conflict_and_the_sides_converge() {
    for (policy, winner_id) in [("central-wins", "3"), ("peer-wins", "4")] {
        let Some(s) = Site::new("") else { return };
        s.r.write_config(
            &std::fs::read_to_string(s.r.path("cr0sync.toml"))
                .unwrap()
                .replace(
                    "name = \"site\"",
                    &format!("name = \"site\"\npolicy = \"{policy}\""),
                ),
        );
        // Both register zed between two syncs, under different ids.
        app(&s.bot, "INSERT INTO users (id, nick) VALUES (3, 'zed')");
        app(&s.web, "INSERT INTO users (id, nick) VALUES (4, 'zed')");
        s.sync();
        s.sync();
        s.sync();
        s.assert_converged();
        for db in s.sides() {
            assert_eq!(
                query(&db, "SELECT id FROM users WHERE nick = 'zed'"),
                [winner_id],
                "{policy}: {}",
                db.display()
            );
        }
        let c = conflicts(&s);
        assert_eq!(c.len(), 1, "{policy}: {c:?}");
        assert_eq!(c[0]["kind"], "unique");
        // The losing registration is in the record.
        assert!(c[0].to_string().contains("[4,\"zed\"") && c[0].to_string().contains("[3,\"zed\""));
    }
}

#[test]
fn a_post_deleted_on_one_side_while_the_other_commented_on_it_is_kept_with_the_comment() {
    let Some(s) = Site::new("") else { return };
    // The bot deletes post 1 (its app cascades to comment 1); the website comments on it.
    app(&s.bot, "DELETE FROM posts WHERE id = 1");
    assert_eq!(one(&s.bot, "SELECT count(*) FROM comments"), "0");
    app(
        &s.web,
        "INSERT INTO comments (id, post_id, body) VALUES (7, 1, 'nice post')",
    );
    for _ in 0..3 {
        s.sync();
    }
    s.assert_converged();
    for db in s.sides() {
        assert_eq!(
            one(&db, "SELECT title FROM posts WHERE id = 1"),
            "hello",
            "the post is kept: {}",
            db.display()
        );
        assert_eq!(
            query(&db, "SELECT id FROM comments ORDER BY id"),
            ["7"],
            "the new comment stays, the old one went with the bot's cascade: {}",
            db.display()
        );
        assert_eq!(
            query(
                &db,
                "INSERT INTO posts_fts (posts_fts) VALUES ('integrity-check')"
            ),
            Vec::<String>::new()
        );
    }
    let c = conflicts(&s);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c[0]["kind"], "foreign-key");
}

/// The oracle of a registration race: every (nick, post title, comment body) either app
/// wrote, joined through the ids as the app sees them.
const THREADS: &str = "SELECT u.nick || '/' || p.title || '/' || c.body FROM comments AS c \
     JOIN posts AS p ON p.id = c.post_id JOIN users AS u ON u.id = p.user_id ORDER BY 1";

#[test]
fn an_id_both_sides_handed_out_keeps_both_registrations_and_their_children() {
    let Some(s) = Site::new("") else { return };
    s.r.write_config(
        &std::fs::read_to_string(s.r.path("cr0sync.toml"))
            .unwrap()
            .replace(
                "name = \"site\"",
                "name = \"site\"\nrekey_refs = { users = [\"audit.user_id\"] }",
            ),
    );
    // Between two syncs each app registers a user, who writes a post that gets a comment,
    // and edits their profile (the audit trigger fires): AUTOINCREMENT hands out the same
    // ids on both sides (user 3, post 3, comment 2, audit 1).
    let register = |db: &Path, nick: &str| {
        app(
            db,
            &format!(
                "INSERT INTO users (nick) VALUES ('{nick}');
                 INSERT INTO posts (user_id, title, body) VALUES (last_insert_rowid(), '{nick} here', 'a post by {nick}');
                 INSERT INTO comments (post_id, body) VALUES (last_insert_rowid(), 'hi {nick}');
                 UPDATE users SET email = '{nick}@example.org' WHERE nick = '{nick}';"
            ),
        );
    };
    register(&s.bot, "dave");
    register(&s.web, "erin");
    let expected = {
        let mut t = query(&s.bot, THREADS);
        t.extend(query(&s.web, THREADS));
        t.sort();
        t.dedup();
        t
    };
    assert_eq!(one(&s.web, "SELECT id FROM users WHERE nick = 'erin'"), "3");
    s.sync();
    s.sync();
    s.assert_converged();
    for db in s.sides() {
        assert_eq!(query(&db, THREADS), expected, "{}", db.display());
        assert_eq!(
            query(&db, "SELECT id || ' ' || nick FROM users ORDER BY id"),
            ["1 alice", "2 bob", "3 dave", "4 erin"],
            "{}",
            db.display()
        );
        // The undeclared reference (rekey_refs) followed the move.
        assert_eq!(
            query(
                &db,
                "SELECT u.nick FROM audit AS a JOIN users AS u ON u.id = a.user_id ORDER BY 1"
            ),
            ["dave", "erin"],
            "{}",
            db.display()
        );
        // The full-text index answers for the moved post on every side.
        assert_eq!(
            query(
                &db,
                "SELECT rowid FROM posts_fts WHERE posts_fts MATCH 'erin'"
            ),
            ["4"],
            "{}",
            db.display()
        );
        assert_eq!(
            query(
                &db,
                "INSERT INTO posts_fts (posts_fts) VALUES ('integrity-check')"
            ),
            Vec::<String>::new()
        );
        // No side hands out a used id again.
        assert_eq!(
            one(&db, "SELECT seq FROM sqlite_sequence WHERE name = 'users'"),
            "4",
            "{}",
            db.display()
        );
    }
    // One rekey record per moved row, naming old and new key.
    let c = conflicts(&s);
    let moves: Vec<String> = c
        .iter()
        .map(|r| {
            assert_eq!(r["kind"], "rekey", "{r}");
            format!("{} {} -> {}", r["table"], r["key"], r["new_key"])
        })
        .collect();
    assert_eq!(
        moves,
        [
            "\"audit\" [1] -> [2]",
            "\"comments\" [2] -> [3]",
            "\"posts\" [3] -> [4]",
            "\"users\" [3] -> [4]"
        ]
    );
    // Nothing moves again.
    let before = s.sync();
    assert!(!before.contains("rekey"), "{before}");
    assert_eq!(conflicts(&s).len(), 4);
    // Both rows were kept: there is no side to keep, only a review to acknowledge.
    let id = c[3]["id"].as_str().unwrap();
    let out =
        s.r.cmd()
            .args(["db", "resolve", id, "--keep", "peer"])
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("--ack"), "{}", stderr_of(&out));
    let out =
        s.r.cmd()
            .args(["db", "resolve", id, "--ack"])
            .output()
            .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
}

#[test]
fn with_rekey_off_an_id_collision_is_an_insert_conflict_resolved_by_the_policy() {
    let Some(s) = Site::new("") else { return };
    s.r.write_config(
        &std::fs::read_to_string(s.r.path("cr0sync.toml"))
            .unwrap()
            .replace("name = \"site\"", "name = \"site\"\nrekey = false"),
    );
    app(&s.bot, "INSERT INTO users (nick) VALUES ('dave')");
    app(&s.web, "INSERT INTO users (nick) VALUES ('erin')");
    s.sync();
    s.sync();
    s.assert_converged();
    for db in s.sides() {
        assert_eq!(one(&db, "SELECT nick FROM users WHERE id = 3"), "dave");
    }
    let c = conflicts(&s);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c[0]["kind"], "insert-insert");
}
