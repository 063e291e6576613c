//! The command-line surface: help text snapshots and exit codes of usage errors.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use common::*;

#[test]
fn help_snapshot() {
    let out = cr0sync().arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    insta::assert_snapshot!("help", String::from_utf8(out.stdout).unwrap());
}

#[test]
fn every_command_has_help_with_an_example() {
    for cmd in [&["init"][..], &["status"], &["run"], &["cron"], &["demo"]] {
        let out = cr0sync().args(cmd).arg("--help").output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{cmd:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("Example"), "{cmd:?}: {text}");
    }
}

#[test]
fn usage_errors_exit_2() {
    cr0sync().arg("frobnicate").assert().code(2);
    cr0sync().args(["cron", "nonsense"]).assert().code(2);
    cr0sync().assert().code(2);
}

#[test]
fn completions_and_man_page_are_generated_from_the_commands() {
    let out = common::cr0sync()
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(
        script.contains("_cr0sync")
            && script.contains("sync-from-bot")
            && script.contains("cleanup-sessions")
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cr0sync.bash");
    std::fs::write(&file, &script).unwrap();
    assert!(
        std::process::Command::new("bash")
            .arg("-n")
            .arg(&file)
            .status()
            .unwrap()
            .success(),
        "valid bash"
    );
    for shell in ["zsh", "fish"] {
        assert!(
            common::cr0sync()
                .args(["completions", shell])
                .output()
                .unwrap()
                .status
                .success()
        );
    }
    let out = common::cr0sync().arg("man").output().unwrap();
    assert!(out.status.success());
    let man = String::from_utf8(out.stdout).unwrap();
    assert!(
        man.contains(".TH cr0sync 1") && man.contains("sync\\-from\\-bot"),
        "{}",
        &man[..200]
    );
    // With --dir, every page a page refers to exists.
    let pages = tempfile::tempdir().unwrap();
    let out = common::cr0sync()
        .args(["man", "--dir"])
        .arg(pages.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let mut count = 0;
    for page in std::fs::read_dir(pages.path()).unwrap() {
        let text = std::fs::read_to_string(page.unwrap().path()).unwrap();
        count += 1;
        for word in text
            .replace("\\-", "-")
            .split(|c: char| c.is_whitespace() || c == ',')
        {
            if let Some(name) = word.strip_suffix("(1)")
                && name.starts_with("cr0sync")
            {
                assert!(
                    pages.path().join(format!("{name}.1")).exists(),
                    "{name}(1) is referred to but not written"
                );
            }
        }
    }
    assert!(count > 20, "{count} pages");
}

#[test]
fn inputs_too_large_to_represent_are_clear_errors_never_panics() {
    let r = Root::new();
    // A wait too long to add to a clock: a usage error.
    let out = r
        .cmd()
        .args(["run", "database", "--wait", "18446744073709551615s"])
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("too large") && !err.contains("panicked"),
        "{err}"
    );
    // The same in the configuration: exit 2 naming the key.
    let config = std::fs::read_to_string(r.path("cr0sync.toml")).unwrap();
    r.write_config(&config.replace(
        "event_archive_after = \"7d\"",
        "event_archive_after = \"100000000d\"",
    ));
    let out = r.cmd().arg("status").output().unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("event_archive_after") && err.contains("too large"),
        "{err}"
    );
    r.write_config(&config);
    // A rate-limit window too long to end (as an integer and as a float): kept, no panic.
    std::fs::write(
        r.path("shared_storage/api_sessions.json"),
        r#"{"sessions": {}, "rate_limits": {
            "a": {"window_start": 1700000000, "window_seconds": 9000000000000000},
            "b": {"window_start": 1700000000, "window_seconds": 9e15},
            "c": {"window_start": 9e300, "window_seconds": 60}}}"#,
    )
    .unwrap();
    for args in [&["security", "cleanup-sessions"][..], &["status"][..]] {
        let out = r.cmd().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr_of(&out));
    }
    let kept = std::fs::read_to_string(r.path("shared_storage/api_sessions.json")).unwrap();
    assert!(
        kept.contains("\"a\"") && kept.contains("\"b\"") && kept.contains("\"c\""),
        "{kept}"
    );
}

/// Runs `cmd`, failing the test if it has not finished within 20 s (it blocked).
fn within_20s(mut cmd: std::process::Command) -> std::process::Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(20) {
            let _ = child.kill();
            panic!("{cmd:?} blocked");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_fifo_where_a_file_belongs_is_refused_and_nothing_blocks() {
    let mkfifo = |p: &std::path::Path| {
        let _ = std::fs::remove_file(p);
        assert!(
            std::process::Command::new("mkfifo")
                .arg(p)
                .status()
                .unwrap()
                .success()
        );
    };
    let r = Root::new();
    mkfifo(&r.path("shared_storage/api_sessions.json"));
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("--root")
        .arg(&r.root)
        .args(["security", "cleanup-sessions"]);
    let out = within_20s(cmd);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("api_sessions.json is a named pipe"), "{err}");
    mkfifo(&r.path("cr0sync.toml"));
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("--root").arg(&r.root).arg("status");
    let out = within_20s(cmd);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cr0sync.toml") && err.contains("named pipe"),
        "{err}"
    );
}
