//! Ownership: an operator runs commands as root against a root that belongs to the cron
//! user; afterwards every file and directory under the root still belongs to that user,
//! and every cron job then runs as that user (through setpriv) without a permission error.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::{BIN, Root, stderr_of};

const NOBODY: u32 = 65534;

fn chown_r(path: &Path) {
    let ok = Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Paths under `dir` not owned by `nobody`.
fn foreign(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(dir) {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        if m.uid() != NOBODY || m.gid() != NOBODY {
            out.push(format!("{} ({}:{})", e.path().display(), m.uid(), m.gid()));
        }
    }
    out
}

#[test]
fn commands_run_as_root_leave_every_file_to_the_roots_owner_and_cron_runs_as_it() {
    if !common::needs_root("running commands as root against a user's root") {
        return;
    }
    let r = Root::new();
    common::open_up(r.tmp.path());
    // The sides the jobs read and write, writable by the cron user too.
    let side = r.tmp.path().join("side");
    let logs = side.join("logs");
    let www = side.join("www");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(logs.join("#chan.log"), "12:00 <a> hi\n").unwrap();
    std::fs::write(www.join("index.php"), "<?php echo 1;\n").unwrap();
    let bot = side.join("bot.db");
    let out = Command::new("sqlite3")
        .arg(&bot)
        .arg("CREATE TABLE t (id INTEGER PRIMARY KEY, v); INSERT INTO t VALUES (1, 'a');")
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(
        r.path("shared_storage/api_sessions.json"),
        r#"{"sessions": {"x": {"expires_at": "2020-01-01T00:00:00Z"}}, "rate_limits": {}}"#,
    )
    .unwrap();
    r.write_config(&format!(
        "[[database.db]]\nname = \"d\"\npeers = [{{ name = \"bot\", path = \"{}\" }}]\n\n\
         [[logs.stream]]\nname = \"net\"\nfrom = \"{}\"\nto = \"logs/irc_networks/net\"\n\n\
         [security]\nintegrity_paths = [\"{}\"]\n",
        bot.display(),
        logs.display(),
        www.display()
    ));
    chown_r(&r.root);
    chown_r(&side);

    // The operator, as root, runs what the README shows.
    let as_root: &[&[&str]] = &[
        &["db", "sync"],
        &["logs", "sync"],
        &["logs", "rotate"],
        &["security", "baseline"],
        &["security", "check"],
        &["security", "cleanup-sessions"],
        &["security", "archive-events"],
        &["cron", "database"],
        &["cron", "logs"],
        &["cron", "security"],
        &["db", "clean-backups"],
        &["status"],
    ];
    for args in as_root {
        let out = r.cmd().args(*args).output().unwrap();
        assert!(
            out.status.success(),
            "as root {args:?}: {}",
            stderr_of(&out)
        );
    }
    let test_scripts = Command::new("sh")
        .arg(format!(
            "{}/install/test_cron_scripts.sh",
            env!("CARGO_MANIFEST_DIR")
        ))
        .arg("--root")
        .arg(&r.root)
        .arg("--bin")
        .arg(BIN)
        .output()
        .unwrap();
    assert!(
        test_scripts.status.success(),
        "{}",
        stderr_of(&test_scripts)
    );
    assert_eq!(foreign(&r.root), Vec::<String>::new(), "left to root");

    // Then cron, as the root's owner: every job succeeds.
    std::fs::write(logs.join("#chan.log"), "12:00 <a> hi\n12:01 <b> yo\n").unwrap();
    for job in ["database", "logs", "security"] {
        let out = common::cr0sync_unprivileged()
            .arg("--root")
            .arg(&r.root)
            .args(["cron", job])
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "cron {job} as the owner: {}",
            stderr_of(&out)
        );
    }
    let out = r.cmd().args(["status", "--check"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
