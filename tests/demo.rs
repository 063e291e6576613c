//! `cr0sync demo`: builds a self-contained root, runs every job, prints status.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn demo_runs_every_job_and_prints_status() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let out = cr0sync()
        .arg("demo")
        .arg("--dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("verdict: all good"), "{text}");
    assert!(
        text.contains("Next, on your server:") && text.contains("install_crontabs.sh"),
        "the demo ends with what to do next: {text}"
    );
    for job in ["database", "logs", "security", "files"] {
        assert!(text.contains(&format!("ran cron {job}: ok")), "{text}");
    }
    // The file-tree part: two sites changed one balance file in the same minute.
    assert!(
        text.contains(
            "andy's balance: 1280 + 20 - 10 = 1290 (central, bot, website: [1290, 1290, 1290])"
        ),
        "{text}"
    );
    // The database part: a conflict, a counter merge, backups.
    assert!(text.contains("= 100 on every side"), "{text}");
    // A peer on another host, when an sshd can be started (CI installs openssh-server and
    // runs as root); otherwise the demo says what it skipped.
    if common::is_root() && std::path::Path::new("/usr/sbin/sshd").exists() {
        assert!(
            text.contains("both balance files are on both sides: yes"),
            "{text}"
        );
    } else {
        assert!(text.contains("peer on another host: skipped"), "{text}");
    }
    assert!(
        text.contains("conflict in users table users key [3]: central wins"),
        "{text}"
    );
    assert!(text.contains("backup: "), "{text}");
    // The site database (the website's real schema): an id both sides handed out, both
    // registrations kept with their posts, the search index agreeing, the move acknowledged.
    assert!(
        text.contains("user 3 dave (post 3), user 4 erin (post 4); a search for erin finds post 4"),
        "{text}"
    );
    assert!(
        text.contains("conflict in site table users key [3]: both rows kept, the website's under key [4] (rekey)"),
        "{text}"
    );
    let central_site = dir.join("root/databases/site.db");
    for side in ["bot", "website"] {
        let db = dir.join(side).join("data/site.db");
        for table in ["users", "posts", "comments", "audit", "sqlite_sequence"] {
            let diff = std::process::Command::new("sqldiff")
                .args(["--primarykey", "--table", table])
                .arg(&central_site)
                .arg(&db)
                .output()
                .unwrap();
            assert!(
                diff.status.success() && diff.stdout.is_empty(),
                "{side} {table}: {}",
                String::from_utf8_lossy(&diff.stdout)
            );
        }
        let out = std::process::Command::new("sqlite3")
            .arg(&db)
            .arg(
                "INSERT INTO posts_fts (posts_fts) VALUES ('integrity-check'); \
                 PRAGMA integrity_check; PRAGMA foreign_key_check;",
            )
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n", "{side}");
    }
    // The log part: a source rotated between runs, every line exactly once.
    assert!(
        text.contains("exactly the old and the new source together"),
        "{text}"
    );
    // Both sides and the central copy are intact, equal real SQLite databases.
    let central = dir.join("root/databases/users.db");
    for side in ["bot", "website"] {
        let db = dir.join(side).join("data/users.db");
        let out = std::process::Command::new("sqlite3")
            .arg(&db)
            .arg("SELECT count(*) FROM users; PRAGMA integrity_check;")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "4\nok\n", "{side}");
        let diff = std::process::Command::new("sqldiff")
            .args(["--primarykey", "--table", "users"])
            .arg(&central)
            .arg(&db)
            .output()
            .unwrap();
        assert!(diff.status.success() && diff.stdout.is_empty(), "{side}");
    }
    // The demo root is a normal root.
    cr0sync()
        .arg("--root")
        .arg(dir.join("root"))
        .arg("status")
        .assert()
        .success();
    // Running it again replaces the earlier demo.
    cr0sync()
        .arg("demo")
        .arg("--dir")
        .arg(&dir)
        .assert()
        .success();
}

#[test]
fn demo_refuses_a_directory_that_is_not_a_demo() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("precious.txt"), b"keep me").unwrap();
    let out = cr0sync()
        .arg("demo")
        .arg("--dir")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("not a cr0sync demo directory"));
    assert_eq!(
        std::fs::read(tmp.path().join("precious.txt")).unwrap(),
        b"keep me"
    );
}
