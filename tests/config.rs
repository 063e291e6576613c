//! Configuration errors: each kind is exit 2 with one line naming the file, line and key.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

/// Writes `text` as the config, runs `status`, and returns (exit code, stderr).
fn run_with(text: &[u8]) -> (Option<i32>, String, Root) {
    let r = Root::new();
    std::fs::write(r.path("cr0sync.toml"), text).unwrap();
    let out = r.cmd().arg("status").output().unwrap();
    (out.status.code(), stderr_of(&out), r)
}

fn assert_config_error(text: &str, line: usize, key: &str) {
    let (code, err, r) = run_with(text.as_bytes());
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(&r.path("cr0sync.toml").display().to_string()),
        "file: {err}"
    );
    assert!(err.contains(&format!("line {line}")), "line {line}: {err}");
    assert!(err.contains(key), "key {key}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn unknown_key() {
    assert_config_error(
        "[database]\npolicy = \"central-wins\"\nbackup_intervall = \"1h\"\n",
        3,
        "backup_intervall",
    );
}

#[test]
fn unknown_section() {
    assert_config_error(
        "[general]\n\n[datbase]\npolicy = \"central-wins\"\n",
        3,
        "datbase",
    );
}

#[test]
fn wrong_type() {
    assert_config_error("[logs]\nrotate_keep = \"ten\"\n", 2, "rotate_keep");
}

#[test]
fn bad_duration() {
    assert_config_error(
        "[security]\nintegrity_interval = \"5 minutes\"\n",
        2,
        "integrity_interval",
    );
}

#[test]
fn bad_size() {
    assert_config_error("[logs]\nrotate_size = \"10 megs\"\n", 2, "rotate_size");
}

#[test]
fn bad_policy() {
    assert_config_error("[database]\npolicy = \"bot-wins\"\n", 2, "policy");
}

#[test]
fn duplicate_database() {
    assert_config_error(
        "[[database.db]]\nname = \"users\"\npeers = [{ name = \"bot\", path = \"/a/users.db\" }]\n\n\
         [[database.db]]\nname = \"users\"\npeers = [{ name = \"bot\", path = \"/b/users.db\" }]\n",
        6,
        "name",
    );
}

#[test]
fn duplicate_peer() {
    assert_config_error(
        "[[database.db]]\nname = \"users\"\npeers = [\n  { name = \"bot\", path = \"/a/users.db\" },\n  \
         { name = \"bot\", path = \"/b/users.db\" },\n]\n",
        5,
        "duplicate peer",
    );
}

#[test]
fn duplicate_stream() {
    assert_config_error(
        "[[logs.stream]]\nname = \"rizon\"\nfrom = \"/a\"\nto = \"logs/irc_networks/rizon\"\n\
         [[logs.stream]]\nname = \"rizon\"\nfrom = \"/b\"\nto = \"logs/irc_networks/rizon2\"\n",
        6,
        "duplicate stream",
    );
}

#[test]
fn peer_path_is_the_central_copy() {
    let r = Root::new();
    let central = r.path("databases/users.db");
    let text = format!(
        "[[database.db]]\nname = \"users\"\npeers = [{{ name = \"bot\", path = \"{}\" }}]\n",
        central.display()
    );
    r.write_config(&text);
    expect_failure(&r.root, &["status"], 2, &["line 3", "central copy"]);
}

#[test]
fn garbage_and_invalid_utf8() {
    let (code, err, _r) = run_with(&[0xff, 0xfe, 0x00, 0x9c, b'\n', 0x80]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("UTF-8"), "{err}");
    let (code, err, _r) = run_with(b"{{{{ this is not toml ]]]]");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("line 1"), "{err}");
}

#[test]
fn empty_config_means_defaults() {
    let (code, err, _r) = run_with(b"");
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn missing_root_says_how_to_create_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("nope");
    let hint = format!("cr0sync init --root {}", root.display());
    expect_failure(&root, &["status"], 2, &[&hint]);
}

#[test]
fn missing_config_says_how_to_create_it() {
    let r = Root::new();
    std::fs::remove_file(r.path("cr0sync.toml")).unwrap();
    expect_failure(
        &r.root,
        &["status"],
        2,
        &["configuration file does not exist", "cr0sync init"],
    );
}

#[test]
fn explicit_config_flag_and_environment() {
    let r = Root::new();
    let other = r.tmp.path().join("other.toml");
    std::fs::write(&other, "[general]\nbogus = 1\n").unwrap();
    let out = r
        .cmd()
        .arg("--config")
        .arg(&other)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("other.toml"));
    let out = r
        .cmd()
        .env("CR0SYNC_CONFIG", &other)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn unreadable_config_is_a_clear_error() {
    let r = Root::new();
    open_up(r.tmp.path());
    let cfg = r.path("cr0sync.toml");
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let out = cr0sync_unprivileged()
        .arg("--root")
        .arg(&r.root)
        .arg("status")
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cr0sync.toml") && err.contains("Permission denied"),
        "{err}"
    );
}

#[test]
fn unknown_owner_is_a_config_error() {
    assert_config_error_anyline("[general]\nowner = \"no-such-user-cr0\"\n", "owner");
}

fn assert_config_error_anyline(text: &str, key: &str) {
    let (code, err, _r) = run_with(text.as_bytes());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(key), "{err}");
}

#[test]
fn bad_wait_flag_is_usage_error() {
    let r = Root::new();
    let out = r.cmd().args(["status", "--wait", "soon"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
