//! The command-line surface: help text snapshots and exit codes of usage errors.
#![allow(clippy::unwrap_used)]

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
}
