//! The crontab scripts against the real `crontab` command (Debian's cron package), for a
//! throwaway user the test creates and removes: never the invoking user's crontab.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};

use common::{BIN, Root};

/// A user that exists for one test; removed (with its crontab) when dropped.
struct ThrowawayUser(String);

impl ThrowawayUser {
    fn create(tag: &str) -> Option<ThrowawayUser> {
        if !common::needs_root("creating a throwaway user") {
            return None;
        }
        let name = format!("cr0t{}{tag}", std::process::id() % 100_000);
        let ok = Command::new("useradd")
            .args(["-M", "-N", "-s", "/usr/sbin/nologin", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "useradd {name}");
        Some(ThrowawayUser(name))
    }

    fn crontab(&self) -> Option<String> {
        let out = Command::new("crontab")
            .args(["-u", &self.0, "-l"])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8(out.stdout).unwrap())
    }

    fn set_crontab(&self, text: &str) {
        use std::io::Write;
        let mut child = Command::new("crontab")
            .args(["-u", &self.0, "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    }
}

impl Drop for ThrowawayUser {
    fn drop(&mut self) {
        let _ = Command::new("crontab").args(["-u", &self.0, "-r"]).output();
        let _ = Command::new("userdel").arg(&self.0).output();
    }
}

fn script(name: &str, args: &[&str]) -> Output {
    Command::new("sh")
        .arg(format!("{}/install/{name}", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .env_remove("CR0SYNC_ROOT")
        .env_remove("CR0SYNC_BIN")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn install_is_idempotent_keeps_other_lines_and_remove_takes_only_the_block() {
    let Some(user) = ThrowawayUser::create("a") else {
        return;
    };
    let r = Root::new();
    let root = r.root.display().to_string();
    let args = [
        "--user",
        user.0.as_str(),
        "--root",
        root.as_str(),
        "--bin",
        BIN,
    ];

    // No crontab yet.
    assert_eq!(user.crontab(), None);
    ok(&script("install_crontabs.sh", &args));
    let first = user.crontab().unwrap();
    assert_eq!(first.matches("# BEGIN cr0sync").count(), 1, "{first}");
    for job in ["database", "logs", "security", "files"] {
        assert!(
            first.contains(&format!("* * * * * {BIN} --root {root} cron {job}")),
            "{first}"
        );
    }
    assert!(
        first.contains("MAILTO=") && first.contains("SHELL=/bin/sh") && first.contains("PATH=")
    );

    // Other lines, before and after; installing twice leaves one block.
    user.set_crontab(&format!(
        "MAILTO=ops@example.org\n0 5 * * * /bin/true # mine\n{first}30 6 * * * /bin/echo later\n"
    ));
    ok(&script("install_crontabs.sh", &args));
    ok(&script("install_crontabs.sh", &args));
    let twice = user.crontab().unwrap();
    assert_eq!(twice.matches("# BEGIN cr0sync").count(), 1, "{twice}");
    assert_eq!(twice.matches("# END cr0sync").count(), 1, "{twice}");
    assert!(
        twice.starts_with(
            "MAILTO=ops@example.org\n0 5 * * * /bin/true # mine\n30 6 * * * /bin/echo later\n"
        ),
        "{twice}"
    );
    assert!(
        twice.trim_end().ends_with("# END cr0sync"),
        "the block goes last: {twice}"
    );

    // Remove: only the block goes.
    ok(&script("remove_crontabs.sh", &["--user", &user.0]));
    let after = user.crontab().unwrap();
    assert_eq!(
        after,
        "MAILTO=ops@example.org\n0 5 * * * /bin/true # mine\n30 6 * * * /bin/echo later\n"
    );
    // Again: nothing to remove.
    assert!(ok(&script("remove_crontabs.sh", &["--user", &user.0])).contains("nothing to remove"));
}

#[test]
fn remove_gives_back_the_crontab_byte_for_byte() {
    let Some(user) = ThrowawayUser::create("c") else {
        return;
    };
    let r = Root::new();
    let root = r.root.display().to_string();
    let args = [
        "--user",
        user.0.as_str(),
        "--root",
        root.as_str(),
        "--bin",
        BIN,
    ];
    // A user who had no crontab has none again.
    assert_eq!(user.crontab(), None);
    ok(&script("install_crontabs.sh", &args));
    ok(&script("install_crontabs.sh", &args));
    ok(&script("remove_crontabs.sh", &["--user", &user.0]));
    assert_eq!(user.crontab(), None, "no empty crontab left behind");
    // Trailing blank lines, comments and blank lines inside stay exactly.
    for before in [
        "0 5 * * * /bin/true\n\n\n",
        "# mine\n\n0 5 * * * /bin/true # x\n",
        "\n",
    ] {
        user.set_crontab(before);
        let stored = user.crontab().unwrap();
        ok(&script("install_crontabs.sh", &args));
        ok(&script("install_crontabs.sh", &args));
        ok(&script("remove_crontabs.sh", &["--user", &user.0]));
        assert_eq!(user.crontab().unwrap(), stored, "{before:?}");
    }
}

#[test]
fn install_refuses_a_missing_binary_or_root_clearly() {
    let Some(user) = ThrowawayUser::create("b") else {
        return;
    };
    let r = Root::new();
    let root = r.root.display().to_string();
    let out = script(
        "install_crontabs.sh",
        &[
            "--user",
            &user.0,
            "--root",
            &root,
            "--bin",
            "/nonexistent/cr0sync",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("binary not found"));
    let out = script(
        "install_crontabs.sh",
        &[
            "--user",
            &user.0,
            "--root",
            "/nonexistent/root",
            "--bin",
            BIN,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an initialized cr0sync root"));
    assert_eq!(user.crontab(), None, "nothing installed");
}

#[test]
fn test_cron_scripts_passes_on_a_good_root_and_names_the_broken_config() {
    let r = Root::new();
    let root = r.root.display().to_string();
    let out = script("test_cron_scripts.sh", &["--root", &root, "--bin", BIN]);
    let text = ok(&out);
    assert_eq!(
        text,
        "database: pass\nlogs: pass\nsecurity: pass\nfiles: pass\n"
    );
    // Dry runs wrote nothing: no run records.
    assert!(!r.path("state/runs/database.json").exists());
    r.write_config("[general]\nbusy_timout = \"5s\"\n");
    let out = script("test_cron_scripts.sh", &["--root", &root, "--bin", BIN]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("database: FAIL (exit 2): cr0sync: configuration error")
            && text.contains("busy_timout"),
        "{text}"
    );
}
