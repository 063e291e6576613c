//! Peers on other hosts, against a real OpenSSH server (Debian's openssh-server) that the
//! tests start on 127.0.0.1 with throwaway host and user keys and a throwaway user:
//! never the machine's own sshd, keys or ~/.ssh.
//!
//! The laws under test: a tree synced with a peer behind `ssh://` ends as it would with a
//! local peer (every counter delta once); a confined key reads nothing outside its
//! directories; every connection failure is one line naming the host and what to do.
#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::sshd::{Sshd, free_port, run};
use common::{Root, stderr_of};

fn tree_config(sshd: &Sshd, peer: &str, extra: &str) -> String {
    format!(
        "{}\n[[files.tree]]\nname = \"balances\"\ncentral = \"shared_storage/balances\"\n\
         json_counters = [\"balance\"]\n{extra}\npeers = [{{ name = \"site\", path = \"{peer}\" }}]\n",
        sshd.remote_section()
    )
}

/// A root with the tree `balances` whose one peer is the directory `site` behind ssh;
/// returns it, the peer directory and the central one.
fn tree_root(sshd: &Sshd) -> (Root, PathBuf, PathBuf) {
    let peer = sshd.user_dir("site");
    let r = Root::new();
    r.write_config(&tree_config(sshd, &sshd.url(&peer), ""));
    let central = r.path("shared_storage/balances");
    std::fs::create_dir_all(&central).unwrap();
    (r, peer, central)
}

fn balance(path: &Path) -> i64 {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["balance"].as_i64().unwrap()
}

#[test]
fn a_tree_with_a_peer_behind_ssh_merges_like_a_local_one() {
    let Some(sshd) = Sshd::start("") else { return };
    let (r, peer, central) = tree_root(&sshd);
    std::fs::write(
        central.join("1-andy.txt"),
        "{\"user_id\": \"1-andy\", \"balance\": 1280}\n",
    )
    .unwrap();
    std::fs::write(
        peer.join("2-bob.txt"),
        "{\"user_id\": \"2-bob\", \"balance\": 5}\n",
    )
    .unwrap();
    // A large file (more than one frame) from the peer, and one from the central side.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(peer.join("archive.bin"), &big).unwrap();
    std::fs::write(central.join("upload.bin"), &big[..2_500_000]).unwrap();
    run(Command::new("chown").arg("-R").arg(&sshd.user).arg(&peer));

    let out = r.cmd().args(["files", "sync"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    for name in ["1-andy.txt", "2-bob.txt", "archive.bin", "upload.bin"] {
        assert_eq!(
            std::fs::read(central.join(name)).unwrap(),
            std::fs::read(peer.join(name)).unwrap(),
            "{name}"
        );
    }
    // Files written on the remote host belong to its user, not to root.
    let owner =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(peer.join("1-andy.txt")).unwrap());
    let user_uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&peer).unwrap());
    assert_eq!(owner, user_uid);

    // Both sides add coins in the same minute: every delta counts once, everywhere.
    std::fs::write(
        central.join("1-andy.txt"),
        "{\"user_id\": \"1-andy\", \"balance\": 1300}\n",
    )
    .unwrap();
    std::fs::write(
        peer.join("1-andy.txt"),
        "{\"user_id\": \"1-andy\", \"balance\": 1270}\n",
    )
    .unwrap();
    std::fs::remove_file(central.join("upload.bin")).unwrap();
    let out = r.cmd().args(["files", "sync"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(balance(&central.join("1-andy.txt")), 1290);
    assert_eq!(balance(&peer.join("1-andy.txt")), 1290);
    assert!(
        !peer.join("upload.bin").exists(),
        "a delete reaches the remote side"
    );

    // Nothing changed: nothing written, still equal.
    let out = r.cmd().args(["files", "sync"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("+0 ~0 -0"), "{text}");
}

#[test]
fn a_confined_key_reads_nothing_outside_its_directories() {
    let Some(sshd) = Sshd::start("command=\"BIN serve --allow ALLOWED\",restrict ") else {
        return;
    };
    // The key's command is fixed before the directory exists: write it now.
    let allowed = sshd.user_dir("site");
    let ak = sshd.dir.path().join("authorized_keys");
    let text = std::fs::read_to_string(&ak)
        .unwrap()
        .replace("ALLOWED", &allowed.display().to_string());
    std::fs::write(&ak, text).unwrap();
    std::fs::write(allowed.join("1-andy.txt"), "{\"balance\": 1}\n").unwrap();

    // Inside: works.
    let r = Root::new();
    r.write_config(&tree_config(&sshd, &sshd.url(&allowed), ""));
    let out = r.cmd().args(["files", "sync"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(r.path("shared_storage/balances/1-andy.txt").exists());

    // /etc through the protocol: refused, nothing of it arrives.
    let r2 = Root::new();
    r2.write_config(&tree_config(
        &sshd,
        &sshd.url(Path::new("/etc")),
        "include = [\"passwd\"]",
    ));
    let out = r2.cmd().args(["files", "sync"]).output().unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("refused") && err.contains("outside"), "{err}");
    assert!(!r2.path("shared_storage/balances/passwd").exists());
    // A symlink inside the allowed directory pointing out is refused too.
    std::os::unix::fs::symlink("/etc", allowed.join("etc")).unwrap();
    let r3 = Root::new();
    r3.write_config(&tree_config(
        &sshd,
        &sshd.url(&allowed.join("etc")),
        "include = [\"passwd\"]",
    ));
    let out = r3.cmd().args(["files", "sync"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("outside"), "{}", stderr_of(&out));
    assert!(!r3.path("shared_storage/balances/passwd").exists());
    // Nor can a write follow a symlink inside the allowed directory out of it.
    let outside = sshd.user_dir("outside");
    std::fs::remove_file(allowed.join("etc")).unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("evil")).unwrap();
    let central = r.path("shared_storage/balances");
    std::fs::create_dir_all(central.join("evil")).unwrap();
    std::fs::write(central.join("evil/x.txt"), "{}\n").unwrap();
    let out = r.cmd().args(["files", "sync"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("outside"), "{}", stderr_of(&out));
    assert!(!outside.join("x.txt").exists(), "nothing written outside");
}

#[test]
fn connection_failures_are_one_line_naming_the_host() {
    let Some(sshd) = Sshd::start("") else { return };
    let peer = sshd.user_dir("site");
    // A port that accepts connections (the kernel's backlog) and never answers: ssh's
    // ConnectTimeout (5 s in these tests) ends the handshake.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    type Change<'a> = Box<dyn Fn(&str) -> String + 'a>;
    let cases: [(&str, Change, &str); 4] = [
        (
            "unreachable",
            Box::new(|c: &str| {
                c.replace(&format!(":{}/", sshd.port), &format!(":{}/", free_port()))
            }),
            "cannot reach",
        ),
        (
            "timed out",
            Box::new(|c: &str| c.replace(&format!(":{}/", sshd.port), &format!(":{silent_port}/"))),
            "cannot reach",
        ),
        (
            "login refused",
            Box::new(|c: &str| c.replace("user_key", "no_such_key")),
            "refused the login",
        ),
        (
            "cr0sync missing",
            Box::new(|c: &str| c.replace("remote_bin = \"", "remote_bin = \"/nonexistent")),
            "not installed",
        ),
    ];
    for (what, change, needle) in cases {
        let r = Root::new();
        r.write_config(&change(&tree_config(&sshd, &sshd.url(&peer), "")));
        let out = r.cmd().args(["files", "sync"]).output().unwrap();
        assert!(!out.status.success(), "{what}");
        let err = stderr_of(&out);
        assert!(err.contains(needle), "{what}: {err}");
        assert!(
            err.contains("127.0.0.1"),
            "{what}: the host is named: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
    }
    drop(silent);
}

/// A root with one tree whose only peer is behind ssh, 40 balance files synced, then
/// changed on both sides (+5 central, +7 remote) and a text file changed both ways.
fn changed_both_ways(sshd: &Sshd) -> (Root, PathBuf) {
    let peer = sshd.user_dir(&format!("site{}", free_port()));
    let r = Root::new();
    r.write_config(&tree_config(sshd, &sshd.url(&peer), ""));
    let central = r.path("shared_storage/balances");
    std::fs::create_dir_all(&central).unwrap();
    for i in 0..40 {
        std::fs::write(
            peer.join(format!("{i}.txt")),
            format!("{{\"balance\": {i}}}\n"),
        )
        .unwrap();
    }
    std::fs::write(peer.join("text.txt"), "base\n").unwrap();
    run(Command::new("chown").arg("-R").arg(&sshd.user).arg(&peer));
    for _ in 0..2 {
        let out = r.cmd().args(["files", "sync"]).output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    for i in 0..40 {
        std::fs::write(
            central.join(format!("{i}.txt")),
            format!("{{\"balance\": {}}}\n", i + 5),
        )
        .unwrap();
        std::fs::write(
            peer.join(format!("{i}.txt")),
            format!("{{\"balance\": {}}}\n", i + 7),
        )
        .unwrap();
    }
    std::fs::write(central.join("text.txt"), "central\n").unwrap();
    std::fs::write(peer.join("text.txt"), "site\n").unwrap();
    (r, peer)
}

/// After any stop: three more syncs give every delta once on both sides, one conflict
/// record for the text file, and no temporary file on either side.
fn completes_exactly(r: &Root, peer: &Path) {
    for _ in 0..3 {
        let out = r.cmd().args(["files", "sync"]).output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    for dir in [r.path("shared_storage/balances"), peer.to_path_buf()] {
        for i in 0..40 {
            assert_eq!(
                balance(&dir.join(format!("{i}.txt"))),
                i + 12,
                "{} file {i}",
                dir.display()
            );
        }
        let partial: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(partial.is_empty(), "temporaries are removed: {partial:?}");
    }
    let out = r
        .cmd()
        .args(["db", "conflicts", "--json"])
        .output()
        .unwrap();
    let records: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text: Vec<_> = records
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["key"] == "text.txt")
        .collect();
    assert_eq!(text.len(), 1, "recorded once: {records}");
}

#[test]
fn a_sync_with_a_remote_peer_stopped_anywhere_completes_with_each_delta_once() {
    let Some(sshd) = Sshd::start("") else { return };
    for point in [
        "files-after-decide",
        "files-after-write",
        "files-after-writes",
        "files-after-conflicts-append",
    ] {
        let (r, peer) = changed_both_ways(&sshd);
        common::killed_at(&r.root, &["files", "sync"], point);
        completes_exactly(&r, &peer);
    }
    let (r, peer) = changed_both_ways(&sshd);
    let killed = common::kill_at_later_and_later_moments(
        &r.root,
        &["files", "sync"],
        std::time::Duration::from_millis(5),
        200,
        |_| {},
    );
    assert!(killed > 3, "the run was cut {killed} times");
    completes_exactly(&r, &peer);
}

#[test]
fn a_connection_killed_mid_copy_is_one_line_and_the_next_run_completes() {
    let Some(sshd) = Sshd::start("") else { return };
    let (r, peer, central) = tree_root(&sshd);
    // Incompressible, so it takes many frames.
    let mut big = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in &mut big {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
    std::fs::write(central.join("archive.bin"), &big).unwrap();
    let child = common::spawn(&r.root, &["files", "sync"]);
    // Wait for the copy to be under way on the remote side, then cut the connection.
    let started = std::time::Instant::now();
    loop {
        let temp = std::fs::read_dir(&peer)
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().contains(".tmp."));
        if temp {
            break;
        }
        assert!(started.elapsed().as_secs() < 30, "the copy never started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    sshd.cut_connections();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("127.0.0.1") && err.contains("lost"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        !peer.join("archive.bin").exists(),
        "no partial file under the real name"
    );
    // Status names the pair's failure until a run succeeds.
    let status = r.status_json();
    let text = status.to_string();
    assert!(text.contains("lost"), "{text}");

    let out = r.cmd().args(["files", "sync"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(std::fs::read(peer.join("archive.bin")).unwrap(), big);
    let temps: Vec<_> = std::fs::read_dir(&peer)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
}

#[test]
fn status_names_a_host_that_was_not_reachable() {
    let Some(sshd) = Sshd::start("") else { return };
    let peer = sshd.user_dir("site");
    let r = Root::new();
    let config = tree_config(&sshd, &sshd.url(&peer), "");
    r.write_config(&config);
    let out = r.cmd().args(["files", "sync"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(r.status_json()["trees"][0]["host_reachable"], true);

    let dead = free_port();
    r.write_config(&config.replace(&format!(":{}/", sshd.port), &format!(":{dead}/")));
    let out = r.cmd().args(["cron", "files"]).output().unwrap();
    assert!(!out.status.success());
    let status = r.status_json();
    assert_eq!(status["trees"][0]["host_reachable"], false, "{status}");
    let out = r.cmd().arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("127.0.0.1:{dead} was not reachable")),
        "{text}"
    );
}

#[test]
fn a_log_stream_whose_host_is_not_reachable_is_one_line_and_a_status_problem() {
    let Some(sshd) = Sshd::start("") else { return };
    let src = sshd.user_dir("irclogs");
    std::fs::write(src.join("#cr0.log"), "[2025-11-09 18:45:00] <nick> hi\n").unwrap();
    let r = Root::new();
    let config = format!(
        "{}\n[[logs.stream]]\nname = \"rizon\"\nfrom = \"{}\"\nto = \"logs/irc/rizon\"\n",
        sshd.remote_section(),
        sshd.url(&src)
    );
    r.write_config(&config);
    let out = r.cmd().args(["logs", "sync"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let st = r.status_json();
    assert_eq!(st["streams"][0]["files"], 1, "{st}");
    assert_eq!(st["streams"][0]["bytes_behind"], 0, "{st}");

    let dead = free_port();
    r.write_config(&config.replace(&format!(":{}/", sshd.port), &format!(":{dead}/")));
    let out = r.cmd().args(["logs", "sync"]).output().unwrap();
    let err = stderr_of(&out);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(&format!("127.0.0.1:{dead}")), "{err}");
    let out = r.cmd().arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "host {}@127.0.0.1:{dead} was not reachable",
            sshd.user
        )),
        "{text}"
    );
}

fn sql(db: &Path, text: &str) {
    rusqlite::Connection::open(db)
        .unwrap()
        .execute_batch(text)
        .unwrap();
}

fn rows(db: &Path) -> Vec<(i64, String, i64)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut st = c
        .prepare("SELECT id, name, coins FROM users ORDER BY id")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

/// A root whose database `users` has one peer, a bot's WAL database behind ssh, synced
/// once (the central copy made from it).
fn remote_database(sshd: &Sshd) -> (Root, PathBuf) {
    let dir = sshd.user_dir(&format!("bot{}", free_port()));
    let bot = dir.join("users.db");
    sql(
        &bot,
        "PRAGMA journal_mode = WAL;
         CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT NOT NULL, coins INTEGER NOT NULL DEFAULT 0);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
         INSERT INTO users SELECT i, 'user' || i || printf('%.200c', 'x'), 100 FROM n;",
    );
    run(Command::new("chown").arg("-R").arg(&sshd.user).arg(&dir));
    let r = Root::new();
    r.write_config(&format!(
        "{}\n[general]\nbusy_timeout = \"2s\"\n[[database.db]]\nname = \"users\"\n\
         counters = {{ users = [\"coins\"] }}\npeers = [{{ name = \"bot\", path = \"{}\" }}]\n",
        sshd.remote_section(),
        sshd.url(&bot)
    ));
    let out = r.cmd().args(["db", "sync"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    (r, bot)
}

/// Both sides change: +10 coins on central and +5 on the bot for user 1, an insert on
/// central, a delete and a rename on the bot, and user 4 renamed two ways (a conflict).
fn change_both(r: &Root, bot: &Path) {
    sql(
        &r.path("databases/users.db"),
        "UPDATE users SET coins = coins + 10 WHERE id = 1; INSERT INTO users VALUES (5001, 'new', 7);
         UPDATE users SET name = 'central' WHERE id = 4;",
    );
    sql(
        bot,
        "UPDATE users SET coins = coins + 5 WHERE id = 1; DELETE FROM users WHERE id = 2;
         UPDATE users SET name = 'renamed' WHERE id = 3;
         UPDATE users SET name = 'bot' WHERE id = 4;",
    );
}

fn merged_exactly(r: &Root, bot: &Path) {
    let central = r.path("databases/users.db");
    let (c, b) = (rows(&central), rows(bot));
    assert_eq!(c, b, "both sides hold the same rows");
    assert_eq!(c[0], (1, c[0].1.clone(), 115), "each increment once");
    assert!(c.iter().any(|row| row.0 == 5001));
    assert!(!c.iter().any(|row| row.0 == 2));
    assert!(c.iter().any(|row| row.0 == 3 && row.1 == "renamed"));
    let check = rusqlite::Connection::open(bot).unwrap();
    let ok: String = check
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}

fn transferred(r: &Root) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(r.path("logs")).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("pages transferred")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let i = words.iter().position(|w| *w == "of").unwrap();
            out.push((words[i - 1].parse().unwrap(), words[i + 1].parse().unwrap()));
        }
    }
    out
}

#[test]
fn a_database_peer_behind_ssh_merges_both_ways_moving_only_changed_pages() {
    let Some(sshd) = Sshd::start("") else { return };
    let (r, bot) = remote_database(&sshd);
    assert_eq!(rows(&r.path("databases/users.db")).len(), 2000);
    change_both(&r, &bot);
    let out = r.cmd().args(["db", "sync"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    merged_exactly(&r, &bot);
    // The second transfer moved a few pages of the database, not all of them.
    let moves = transferred(&r);
    assert_eq!(moves.len(), 2, "{moves:?}");
    let (moved, total) = moves[1];
    assert!(total > 50 && moved * 5 < total, "{moves:?}");
    // Nothing changed since: once the peer's files have been still for longer than the
    // filesystem clock's resolution (each snapshot's last reader touches a WAL database
    // nobody else holds open), a run is the fast path: one round trip, no snapshot.
    for _ in 0..2 {
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let out = r.cmd().args(["cron", "database"]).output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    let before = transferred(&r);
    assert!(
        before[2..].iter().all(|(moved, _)| *moved <= 4),
        "{before:?}"
    );
    let out = r.cmd().args(["cron", "database"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(transferred(&r), before, "an unchanged peer is not copied");
    // A peer backup is kept, from the snapshot.
    assert!(std::fs::read_dir(r.path("backups")).unwrap().count() > 0);
}

#[test]
fn a_database_sync_with_a_remote_peer_stopped_at_any_point_completes_exactly() {
    let Some(sshd) = Sshd::start("") else { return };
    for point in common::FAULT_POINTS {
        let (r, bot) = remote_database(&sshd);
        change_both(&r, &bot);
        common::killed_at(&r.root, &["db", "sync"], point);
        for _ in 0..2 {
            let out = r.cmd().args(["db", "sync"]).output().unwrap();
            assert!(out.status.success(), "{point}: {}", stderr_of(&out));
        }
        merged_exactly(&r, &bot);
    }
    // SIGKILL at later and later instants: in the transfer, the merge, the remote
    // transaction, the commits.
    let (r, bot) = remote_database(&sshd);
    change_both(&r, &bot);
    let killed = common::kill_at_later_and_later_moments(
        &r.root,
        &["db", "sync"],
        std::time::Duration::from_millis(15),
        100,
        |_| {},
    );
    assert!(killed > 3, "the run was cut {killed} times");
    for _ in 0..2 {
        let out = r.cmd().args(["db", "sync"]).output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    merged_exactly(&r, &bot);
}

#[test]
fn another_protocol_version_or_a_missing_remote_path_is_one_line_naming_the_host() {
    let Some(sshd) = Sshd::start("") else { return };
    // A "cr0sync" on the remote that answers the first frame with another protocol.
    let fake = sshd.dir.path().join("old_cr0sync.py");
    std::fs::write(
        &fake,
        "import sys, struct, json\n\
         d = sys.stdin.buffer.read(9)\n\
         hl, bl = struct.unpack('>II', d[:8])\n\
         sys.stdin.buffer.read(hl + bl)\n\
         h = json.dumps({'hello': {'protocol': 999, 'version': '9.9.9'}}).encode()\n\
         sys.stdout.buffer.write(struct.pack('>IIB', len(h), 0, 0) + h)\n\
         sys.stdout.flush()\n",
    )
    .unwrap();
    let peer = sshd.user_dir("site");
    let r = Root::new();
    let config = tree_config(&sshd, &sshd.url(&peer), "");
    let bin = sshd.dir.path().join("cr0sync").display().to_string();
    r.write_config(&config.replace(&bin, &format!("python3 {}", fake.display())));
    let out = r.cmd().args(["files", "sync"]).output().unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("127.0.0.1") && err.contains("protocol 999") && err.contains("same version"),
        "{err}"
    );

    // A peer path that does not exist on the remote host: an error, never an empty tree
    // or a new database.
    let r = Root::new();
    r.write_config(&tree_config(&sshd, &sshd.url(&peer.join("missing")), ""));
    let out = r.cmd().args(["files", "sync"]).output().unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("peer directory not found") && err.contains("127.0.0.1"),
        "{err}"
    );
    let r = Root::new();
    r.write_config(&format!(
        "{}\n[[database.db]]\nname = \"users\"\npeers = [{{ name = \"bot\", path = \"{}\" }}]\n",
        sshd.remote_section(),
        sshd.url(&peer.join("missing.db"))
    ));
    let out = r.cmd().args(["db", "sync"]).output().unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("peer database not found") && err.contains("127.0.0.1"),
        "{err}"
    );
    assert!(!peer.join("missing.db").exists(), "never created");
}

/// The config of `r` with `remote_bin` a wrapper that runs `cr0sync serve` with the fault
/// point `point` armed on the remote side (ssh passes no environment).
fn with_remote_fault(sshd: &Sshd, config: &str, point: &str) -> String {
    let real = sshd.dir.path().join("cr0sync");
    let wrapper = sshd.dir.path().join(format!("cr0sync-fault-{point}"));
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nCR0SYNC_FAULT={point} exec {} \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let line = format!("remote_bin = \"{}\"", real.display());
    assert!(config.contains(&line), "{config}");
    config.replace(&line, &format!("remote_bin = \"{}\"", wrapper.display()))
}

#[test]
fn a_connection_lost_mid_snapshot_or_mid_apply_is_one_line_and_the_next_run_completes_exactly() {
    let Some(sshd) = Sshd::start("") else { return };
    // The remote end stops (its connection with it) after taking the snapshot, inside
    // the peer's transaction, and after committing it but before answering.
    for point in [
        "serve-after-snapshot",
        "peer-before-commit",
        "serve-after-apply",
    ] {
        let (r, bot) = remote_database(&sshd);
        change_both(&r, &bot);
        let config = std::fs::read_to_string(r.path("cr0sync.toml")).unwrap();
        r.write_config(&with_remote_fault(&sshd, &config, point));
        let out = r.cmd().args(["db", "sync"]).output().unwrap();
        let err = stderr_of(&out);
        assert!(!out.status.success(), "{point}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{point}: one line: {err}");
        assert!(
            err.contains("127.0.0.1") && err.contains("lost"),
            "{point}: {err}"
        );
        let check = rusqlite::Connection::open(&bot).unwrap();
        let ok: String = check
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok", "{point}");
        drop(check);
        r.write_config(&config);
        let out = r.cmd().args(["db", "sync"]).output().unwrap();
        assert!(out.status.success(), "{point}: {}", stderr_of(&out));
        merged_exactly(&r, &bot);
    }
}

#[test]
fn the_ssh_process_killed_mid_snapshot_or_mid_apply_is_one_line_and_the_next_run_completes_exactly()
{
    let Some(sshd) = Sshd::start("") else { return };
    // The remote end pauses at the point (4 s); the test kills the ssh process meanwhile.
    // (On a machine slow enough to miss the pause, the cut lands at another instant: the
    // law checked below is the same.)
    for point in ["serve-after-snapshot", "peer-before-commit"] {
        let (r, bot) = remote_database(&sshd);
        change_both(&r, &bot);
        let config = std::fs::read_to_string(r.path("cr0sync.toml")).unwrap();
        r.write_config(&with_remote_fault(
            &sshd,
            &config,
            &format!("{point}:sleep=4000"),
        ));
        let child = common::spawn(&r.root, &["db", "sync"]);
        std::thread::sleep(std::time::Duration::from_millis(2500));
        sshd.cut_connections();
        let out = child.wait_with_output().unwrap();
        let err = stderr_of(&out);
        assert!(!out.status.success(), "{point}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{point}: one line: {err}");
        assert!(
            err.contains("127.0.0.1") && err.contains("lost"),
            "{point}: {err}"
        );
        r.write_config(&config);
        // The remote end may still be in its pause: the next run waits for the peer.
        std::thread::sleep(std::time::Duration::from_millis(2000));
        let out = r.cmd().args(["db", "sync"]).output().unwrap();
        assert!(out.status.success(), "{point}: {}", stderr_of(&out));
        merged_exactly(&r, &bot);
    }
}

#[test]
fn a_log_stream_whose_connection_is_killed_mid_copy_completes_every_line_once() {
    let Some(sshd) = Sshd::start("") else { return };
    let src = sshd.user_dir("irclogs");
    let r = Root::new();
    r.write_config(&format!(
        "{}\n[[logs.stream]]\nname = \"rizon\"\nfrom = \"{}\"\nto = \"logs/irc/rizon\"\n",
        sshd.remote_section(),
        sshd.url(&src)
    ));
    // Lines of random text (little to compress), enough to take a while.
    let mut text = String::new();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for i in 0..400_000 {
        let mut words = String::new();
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            words.push_str(&format!("{x:016x} "));
        }
        text.push_str(&format!(
            "[2025-11-09 18:45:00] <nick{}> {i} {words}\n",
            i % 7
        ));
    }
    std::fs::write(src.join("#cr0.log"), &text).unwrap();
    let dest = r.path("logs/irc/rizon/#cr0.log");
    let child = common::spawn(&r.root, &["logs", "sync"]);
    let started = std::time::Instant::now();
    while std::fs::metadata(&dest).map_or(0, |m| m.len()) == 0 {
        assert!(started.elapsed().as_secs() < 30, "the copy never started");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    sshd.cut_connections();
    let out = child.wait_with_output().unwrap();
    let err = stderr_of(&out);
    if out.status.success() {
        eprintln!("the copy finished before the connection was cut; nothing to check");
    } else {
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains("127.0.0.1") && err.contains("lost"), "{err}");
    }
    // Lines written meanwhile, then the next run: every line once, whole lines only.
    let more = "[2025-11-09 18:46:00] <nick1> after the cut\n";
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(src.join("#cr0.log"))
        .unwrap();
    std::io::Write::write_all(&mut f, more.as_bytes()).unwrap();
    let out = r.cmd().args(["logs", "sync"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(std::fs::read_to_string(&dest).unwrap() == text.clone() + more);
}

#[test]
fn a_remote_disk_that_fills_up_is_one_line_naming_the_host_and_leaves_no_partial_file() {
    let Some(sshd) = Sshd::start("") else { return };
    let (r, peer, central) = tree_root(&sshd);
    // The peer's directory is a real 1 MiB filesystem.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&peer)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("note: cannot mount a tmpfs here; the remote disk-full case is not run");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(peer.clone());
    run(Command::new("chown").arg(&sshd.user).arg(&peer));
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(central.join("archive.bin"), &big).unwrap();
    std::fs::write(
        central.join("1-andy.txt"),
        "{\"user_id\": \"1-andy\", \"balance\": 5}\n",
    )
    .unwrap();
    let out = r.cmd().args(["files", "sync"]).output().unwrap();
    let err = stderr_of(&out);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("127.0.0.1") && err.contains("No space left on device"),
        "{err}"
    );
    let left: Vec<String> = std::fs::read_dir(&peer)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp.") || n == "archive.bin")
        .collect();
    assert!(left.is_empty(), "no partial file: {left:?}");
    // Space made (the archive leaves the central tree): the next run completes.
    std::fs::remove_file(central.join("archive.bin")).unwrap();
    let out = r.cmd().args(["files", "sync"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(balance(&peer.join("1-andy.txt")), 5);
}
