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
    for job in ["database", "logs", "security"] {
        assert!(text.contains(&format!("ran cron {job}: ok")), "{text}");
    }
    // The database part: a conflict, a counter merge, backups.
    assert!(text.contains("= 100 on every side"), "{text}");
    assert!(
        text.contains("conflict in users table users key [3]: central wins"),
        "{text}"
    );
    assert!(text.contains("backup: "), "{text}");
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
