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
