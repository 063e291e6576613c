//! `cr0sync init`: layout, modes, idempotence, refusal on a read-only parent.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use walkdir::WalkDir;

const DIRS: &[&str] = &[
    "databases",
    "backups",
    "logs",
    "logs/security",
    "logs/security/archive",
    "logs/integrity",
    "logs/api",
    "logs/file_access",
    "logs/website",
    "logs/irc_networks",
    "shared_storage",
    "state",
    "locks",
];

/// (path, mode, size, mtime, inode) of everything under `dir`.
fn snapshot(dir: &Path) -> BTreeMap<String, (u32, u64, i64, u64)> {
    WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .map(|e| {
            let m = e.metadata().unwrap();
            let key = e.path().strip_prefix(dir).unwrap().display().to_string();
            (
                key,
                (
                    m.mode(),
                    m.len(),
                    m.mtime_nsec() + m.mtime() * 1_000_000_000,
                    m.ino(),
                ),
            )
        })
        .collect()
}

#[test]
fn creates_the_whole_layout_with_modes() {
    let r = Root::new();
    assert_eq!(mode(&r.root), 0o775);
    for d in DIRS {
        let p = r.path(d);
        assert!(p.is_dir(), "{d} missing");
        assert_eq!(mode(&p), 0o775, "{d}");
    }
    assert_eq!(mode(&r.path("cr0sync.toml")), 0o664);
    assert_eq!(mode(&r.path("state/integrity.key")), 0o600);
    let key = std::fs::read_to_string(r.path("state/integrity.key")).unwrap();
    assert_eq!(key.len(), 64);
    assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
    // The written configuration is the commented default and is valid.
    let text = std::fs::read_to_string(r.path("cr0sync.toml")).unwrap();
    assert!(text.contains("backup_keep_min = 3"));
    r.cmd().arg("status").assert().success();
}

#[test]
fn second_run_changes_nothing() {
    let r = Root::new();
    let before = snapshot(&r.root);
    let out = r.cmd().arg("init").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("already initialized"));
    assert_eq!(snapshot(&r.root), before);
}

#[test]
fn never_overwrites_an_edited_config_or_key() {
    let r = Root::new();
    let custom = "[general]\nbusy_timeout = \"9s\"\n";
    r.write_config(custom);
    let key = std::fs::read(r.path("state/integrity.key")).unwrap();
    std::fs::remove_dir(r.path("logs/api")).unwrap();
    r.cmd().arg("init").assert().success();
    assert_eq!(
        std::fs::read_to_string(r.path("cr0sync.toml")).unwrap(),
        custom
    );
    assert_eq!(std::fs::read(r.path("state/integrity.key")).unwrap(), key);
    assert!(
        r.path("logs/api").is_dir(),
        "a missing directory is recreated"
    );
}

#[test]
fn root_from_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("envroot");
    cr0sync()
        .env("CR0SYNC_ROOT", &root)
        .arg("init")
        .assert()
        .success();
    assert!(root.join("cr0sync.toml").is_file());
    // The flag wins over the environment.
    let other = tmp.path().join("flagroot");
    cr0sync()
        .env("CR0SYNC_ROOT", &root)
        .arg("--root")
        .arg(&other)
        .arg("init")
        .assert()
        .success();
    assert!(other.join("cr0sync.toml").is_file());
}

#[test]
fn modes_from_an_existing_config_apply_to_what_is_created() {
    let (_tmp, root) = root_with_config("[general]\ndir_mode = \"750\"\nfile_mode = \"640\"\n");
    common::init(&root);
    assert_eq!(mode(&root.join("databases")), 0o750);
    assert_eq!(mode(&root.join("state/integrity.key")), 0o600);
}

#[test]
fn read_only_parent_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    open_up(tmp.path());
    let parent = tmp.path().join("ro");
    std::fs::create_dir(&parent).unwrap();
    std::fs::set_permissions(&parent, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    let root = parent.join("root");
    let out = cr0sync_unprivileged()
        .arg("--root")
        .arg(&root)
        .arg("init")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&root.display().to_string()), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(!err.contains("panicked"));
    assert!(!root.exists());
}

#[test]
fn owner_and_group_applied_when_root() {
    if !needs_root("applying ownership") {
        return;
    }
    let (_tmp, root) = root_with_config("[general]\nowner = \"nobody\"\ngroup = \"65534\"\n");
    common::init(&root);
    for p in ["databases", "state/integrity.key", "locks"] {
        let m = std::fs::metadata(root.join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "{p}");
    }
}
