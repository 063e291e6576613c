// The file-tree job's end-to-end cases, included by tests/files.rs (local sites) and
// tests/files_remote.rs (the same sites behind ssh), which set `REMOTE`.

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Root, stderr_of};

/// A root with one tree `balances` (central `shared_storage/balances`) and two site
/// directories as peers.
struct Sites {
    r: Root,
    site1: PathBuf,
    site2: PathBuf,
    /// The sshd the sites are reached through when `REMOTE`.
    _sshd: Option<common::sshd::Sshd>,
}

impl Sites {
    /// `None` where a `REMOTE` run cannot start its sshd (not root; noted on stderr).
    fn new(extra: &str) -> Option<Sites> {
        let r = Root::new();
        let (site1, site2, sshd) = if REMOTE {
            let sshd = common::sshd::Sshd::start("")?;
            // The sites' directories belong to the remote user; what the test writes
            // there as root stays writable for it (as a site's own files would be).
            // SAFETY: umask only sets the process's file-creation mask.
            unsafe { libc::umask(0) };
            let site1 = sshd.user_dir("site1").join("balances");
            let site2 = sshd.user_dir("site2").join("balances");
            (site1, site2, Some(sshd))
        } else {
            (
                r.tmp.path().join("site1/balances"),
                r.tmp.path().join("site2/balances"),
                None,
            )
        };
        std::fs::create_dir_all(&site1).unwrap();
        std::fs::create_dir_all(&site2).unwrap();
        let (url1, url2, remote) = match &sshd {
            Some(d) => (d.url(&site1), d.url(&site2), d.remote_section()),
            None => (
                site1.display().to_string(),
                site2.display().to_string(),
                String::new(),
            ),
        };
        r.write_config(&format!(
            r#"{remote}
[[files.tree]]
name = "balances"
central = "shared_storage/balances"
include = ["*.txt", "*.json"]
exclude = ["*.tmp", "*.site-tmp"]
json_counters = ["balance"]
{extra}
peers = [
  {{ name = "site1", path = "{url1}" }},
  {{ name = "site2", path = "{url2}" }},
]
"#
        ));
        Some(Sites {
            r,
            site1,
            site2,
            _sshd: sshd,
        })
    }

    fn central(&self) -> PathBuf {
        self.r.path("shared_storage/balances")
    }

    fn sync(&self) -> std::process::Output {
        self.r.cmd().args(["files", "sync"]).output().unwrap()
    }

    fn sync_ok(&self) {
        let out = self.sync();
        assert!(out.status.success(), "{}", stderr_of(&out));
    }

    fn sides(&self) -> [PathBuf; 3] {
        [self.central(), self.site1.clone(), self.site2.clone()]
    }

    fn balance(dir: &Path, user: &str) -> i64 {
        let text = std::fs::read_to_string(dir.join(format!("{user}.txt"))).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        v["balance"].as_i64().unwrap()
    }
}

fn write_file(path: &Path, text: &str) {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn two_sites_adding_coins_in_the_same_minute_add_up_everywhere() {
    let Some(s) = Sites::new("") else { return };
    write_file(
        &s.site1.join("1-andy.txt"),
        r#"{"user_id": "1-andy", "balance": 1280}"#,
    );
    s.sync_ok();
    s.sync_ok();
    for dir in s.sides() {
        assert_eq!(Sites::balance(&dir, "1-andy"), 1280, "{}", dir.display());
    }
    // +20 on one site, -10 on the other, in the same minute.
    write_file(
        &s.site1.join("1-andy.txt"),
        r#"{"user_id": "1-andy", "balance": 1300}"#,
    );
    write_file(
        &s.site2.join("1-andy.txt"),
        r#"{"user_id": "1-andy", "balance": 1270}"#,
    );
    s.sync_ok();
    s.sync_ok();
    for dir in s.sides() {
        assert_eq!(Sites::balance(&dir, "1-andy"), 1290, "{}", dir.display());
    }
    // Key order and style are kept.
    let text = std::fs::read_to_string(s.central().join("1-andy.txt")).unwrap();
    assert!(
        text.starts_with(r#"{"user_id":"1-andy","balance":1290}"#),
        "{text}"
    );
    // The same change on both sides is two changes.
    write_file(
        &s.site1.join("1-andy.txt"),
        r#"{"user_id":"1-andy","balance":1310}"#,
    );
    write_file(
        &s.site2.join("1-andy.txt"),
        r#"{"user_id":"1-andy","balance":1310}"#,
    );
    s.sync_ok();
    s.sync_ok();
    for dir in s.sides() {
        assert_eq!(Sites::balance(&dir, "1-andy"), 1330, "{}", dir.display());
    }
    // Nothing changed: nothing written, nothing recorded.
    let before = std::fs::metadata(s.central().join("1-andy.txt")).unwrap();
    s.sync_ok();
    let after = std::fs::metadata(s.central().join("1-andy.txt")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (before.ino(), before.mtime_nsec()),
        (after.ino(), after.mtime_nsec())
    );
}

#[test]
fn changes_deletes_and_creations_propagate_and_a_losing_file_is_kept() {
    let Some(s) = Sites::new("policy = \"newest-wins\"") else { return };
    write_file(&s.site1.join("a/notes.txt"), "one\n");
    write_file(&s.central().join("b.txt"), "bee\n");
    std::fs::create_dir_all(s.central()).unwrap();
    s.sync_ok();
    s.sync_ok();
    for dir in s.sides() {
        assert_eq!(
            std::fs::read_to_string(dir.join("a/notes.txt")).unwrap(),
            "one\n"
        );
        assert_eq!(std::fs::read_to_string(dir.join("b.txt")).unwrap(), "bee\n");
    }
    // A delete on one side is a delete everywhere.
    std::fs::remove_file(s.site2.join("b.txt")).unwrap();
    s.sync_ok();
    s.sync_ok();
    for dir in s.sides() {
        assert!(!dir.join("b.txt").exists(), "{}", dir.display());
    }
    // Both sides change a text file: newest wins, the loser is kept and recorded.
    write_file(&s.central().join("a/notes.txt"), "central's\n");
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_file(&s.site1.join("a/notes.txt"), "site1's\n");
    let out =
        s.r.cmd()
            .args(["files", "sync", "--peer", "site1"])
            .output()
            .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("conflict in tree balances/site1 file a/notes.txt"));
    assert_eq!(
        std::fs::read_to_string(s.central().join("a/notes.txt")).unwrap(),
        "site1's\n"
    );
    let out =
        s.r.cmd()
            .args(["db", "conflicts", "--json"])
            .output()
            .unwrap();
    let records: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = records
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "file")
        .unwrap_or_else(|| panic!("{records}"));
    assert_eq!(r["key"], "a/notes.txt");
    let kept = r["result"]["lost_kept_at"].as_str().unwrap();
    assert_eq!(std::fs::read_to_string(kept).unwrap(), "central's\n");
    // status names the open conflict, and ack closes it.
    let status = s.r.status_json();
    assert!(
        status["trees"][0]["conflicts"].as_u64().unwrap() >= 1,
        "{status}"
    );
    // The operator keeps central's version after all: it goes back into the central file,
    // and the next sync carries it to every side.
    let id = r["id"].as_str().unwrap();
    s.r.cmd()
        .args(["db", "resolve", id, "--keep", "central"])
        .assert()
        .success();
    s.sync_ok();
    s.sync_ok();
    for dir in s.sides() {
        assert_eq!(
            std::fs::read_to_string(dir.join("a/notes.txt")).unwrap(),
            "central's\n",
            "{}",
            dir.display()
        );
    }
    let status = s.r.status_json();
    assert_eq!(status["trees"][0]["conflicts"], 0, "{status}");
}

#[test]
fn a_json_key_changed_two_ways_is_a_conflict_resolved_per_key() {
    let Some(s) = Sites::new("policy = \"central-wins\"") else { return };
    write_file(
        &s.site1.join("p.json"),
        "{\n  \"nick\": \"andy\",\n  \"mail\": \"a@x\",\n  \"balance\": 5\n}\n",
    );
    s.sync_ok();
    s.sync_ok();
    write_file(
        &s.central().join("p.json"),
        "{\n  \"nick\": \"andrew\",\n  \"mail\": \"a@x\",\n  \"balance\": 6\n}\n",
    );
    write_file(
        &s.site1.join("p.json"),
        "{\n  \"nick\": \"drew\",\n  \"mail\": \"b@x\",\n  \"balance\": 9\n}\n",
    );
    let out =
        s.r.cmd()
            .args(["files", "sync", "--peer", "site1"])
            .output()
            .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let merged = "{\n  \"nick\": \"andrew\",\n  \"mail\": \"b@x\",\n  \"balance\": 10\n}\n";
    for dir in [s.central(), s.site1.clone()] {
        assert_eq!(std::fs::read_to_string(dir.join("p.json")).unwrap(), merged);
    }
    let out =
        s.r.cmd()
            .args(["db", "conflicts", "--json"])
            .output()
            .unwrap();
    let records: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &records.as_array().unwrap()[0];
    assert_eq!(
        (r["kind"].as_str(), r["table"].as_str()),
        (Some("json"), Some("nick"))
    );
    assert_eq!(r["rows"]["peer"], "drew");
    let id = r["id"].as_str().unwrap();
    s.r.cmd()
        .args(["db", "resolve", id, "--keep", "peer"])
        .assert()
        .success();
    s.sync_ok();
    s.sync_ok();
    let want = "{\n  \"nick\": \"drew\",\n  \"mail\": \"b@x\",\n  \"balance\": 10\n}\n";
    for dir in s.sides() {
        assert_eq!(
            std::fs::read_to_string(dir.join("p.json")).unwrap(),
            want,
            "{}",
            dir.display()
        );
    }
}

#[test]
fn a_missing_peer_directory_is_an_error_and_nothing_is_removed() {
    let Some(s) = Sites::new("") else { return };
    for i in 0..12 {
        write_file(&s.site1.join(format!("{i}.txt")), "{\"balance\": 1}");
    }
    s.sync_ok();
    s.sync_ok();
    std::fs::rename(&s.site2, s.r.tmp.path().join("unmounted")).unwrap();
    let out = s.sync();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("peer directory not found"), "{err}");
    assert_eq!(std::fs::read_dir(s.central()).unwrap().count(), 12);
    assert_eq!(std::fs::read_dir(&s.site1).unwrap().count(), 12);
    // An empty directory in its place (the disk unmounted, its mount point left) is
    // refused by the mass-delete guard; --force removes what the operator wants removed.
    std::fs::create_dir_all(&s.site2).unwrap();
    let out =
        s.r.cmd()
            .args(["files", "sync", "--peer", "site2"])
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains("would remove 12 of the 12 files on the central side"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(s.central()).unwrap().count(), 12);
    s.r.cmd()
        .args(["files", "sync", "--peer", "site2", "--force"])
        .assert()
        .success();
    assert_eq!(std::fs::read_dir(s.central()).unwrap().count(), 0);
}

#[test]
fn an_unreadable_directory_is_left_alone_and_a_status_problem() {
    if !common::needs_root("an unreadable directory (run as an unprivileged user)") {
        return;
    }
    let Some(s) = Sites::new("") else { return };
    write_file(&s.site1.join("private/a.txt"), "{\"balance\": 1}");
    write_file(&s.site1.join("b.txt"), "{\"balance\": 2}");
    s.sync_ok();
    s.sync_ok();
    assert!(s.central().join("private/a.txt").exists());
    if REMOTE {
        // The remote end's user cannot read one directory of its site.
        std::fs::set_permissions(
            s.site1.join("private"),
            std::os::unix::fs::PermissionsExt::from_mode(0o000),
        )
        .unwrap();
        let out =
            s.r.cmd()
                .args(["files", "sync", "--peer", "site1"])
                .output()
                .unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        assert!(s.central().join("private/a.txt").exists());
        let problems = s.r.status_json()["problems"].to_string();
        assert!(
            problems.contains("cannot read") && problems.contains("private"),
            "{problems}"
        );
        return;
    }
    // Everything belongs to the unprivileged user that runs the sync, except that it
    // cannot read one directory.
    common::open_up(s.r.tmp.path());
    let chown = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(s.r.tmp.path())
        .status()
        .unwrap();
    assert!(chown.success());
    std::fs::set_permissions(
        s.site1.join("private"),
        std::os::unix::fs::PermissionsExt::from_mode(0o000),
    )
    .unwrap();
    let out = common::cr0sync_unprivileged()
        .arg("--root")
        .arg(&s.r.root)
        .args(["files", "sync", "--peer", "site1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    // Nothing below it was taken for deleted.
    assert!(s.central().join("private/a.txt").exists());
    let status = s.r.status_json();
    let problems = status["problems"].to_string();
    assert!(
        problems.contains("cannot read") && problems.contains("private"),
        "{status}"
    );
}

#[test]
fn symlinks_and_special_files_are_skipped_never_followed() {
    let Some(s) = Sites::new("") else { return };
    let secret = s.r.tmp.path().join("secret.txt");
    write_file(&secret, "secret");
    std::os::unix::fs::symlink(&secret, s.site1.join("link.txt")).unwrap();
    let status = Command::new("mkfifo")
        .arg(s.site1.join("pipe.txt"))
        .status()
        .unwrap();
    assert!(status.success());
    write_file(&s.site1.join("ok.txt"), "ok");
    s.sync_ok();
    assert!(s.central().join("ok.txt").exists());
    assert!(!s.central().join("link.txt").exists());
    assert!(!s.central().join("pipe.txt").exists());
}

#[test]
fn one_way_pairs_write_their_target_only() {
    let r = Root::new();
    let master = r.tmp.path().join("master");
    let mirror = r.tmp.path().join("mirror");
    std::fs::create_dir_all(&master).unwrap();
    std::fs::create_dir_all(&mirror).unwrap();
    r.write_config(&format!(
        r#"
[[files.tree]]
name = "archive"
central = "shared_storage/archive"
peers = [
  {{ name = "master", path = "{}", direction = "pull" }},
  {{ name = "mirror", path = "{}", direction = "push" }},
]
"#,
        master.display(),
        mirror.display()
    ));
    write_file(&master.join("song.mp3"), "la la");
    write_file(&mirror.join("local.txt"), "mirror's own");
    r.cmd().args(["files", "sync"]).assert().success();
    assert_eq!(
        std::fs::read_to_string(mirror.join("song.mp3")).unwrap(),
        "la la"
    );
    // The mirror's own file never reaches the central copy or the master.
    assert!(!r.path("shared_storage/archive/local.txt").exists());
    assert!(!master.join("local.txt").exists());
    // A change on the central copy never reaches the master.
    write_file(&r.path("shared_storage/archive/extra.txt"), "x");
    r.cmd().args(["files", "sync"]).assert().success();
    assert!(!master.join("extra.txt").exists());
    assert!(mirror.join("extra.txt").exists());
}

#[test]
fn bad_tree_configuration_is_exit_2_naming_key_and_line() {
    let r = Root::new();
    let cases = [
        (
            "[[files.tree]]\nname = \"t\"\ncentral = \"c\"\nbogus = 1\npeers = []\n",
            "bogus",
        ),
        (
            "[[files.tree]]\nname = \"t\"\ncentral = \"c\"\npeers = [{ name = \"p\", path = \"/x\" }]\n\
             [[files.tree]]\nname = \"t\"\ncentral = \"d\"\npeers = [{ name = \"p\", path = \"/y\" }]\n",
            "duplicate tree",
        ),
        (
            "[[files.tree]]\nname = \"t\"\ncentral = \"c\"\npeers = [{ name = \"p\", path = \"c/inside\" }]\n",
            "overlaps",
        ),
    ];
    for (text, needle) in cases {
        r.write_config(text);
        let out = r.cmd().args(["files", "status"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = stderr_of(&out);
        assert!(err.contains(needle) && err.contains("line "), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

/// Two PHP sites add coins to one user's balance file while `cron files` runs every few
/// hundred milliseconds: every increment either site wrote is in the final balance on
/// every side. `inplace`: the sites rewrite the file in place under its flock (PHP's
/// usual `flock` + `ftruncate` + `fwrite`), served with `write = "flock"`. `rename`: the
/// sites lock the file, then rename a new version over it, served with the default
/// atomic writes.
fn php_writers_under_cron(write: &str, php_mode: &str) {
    if Command::new("php").arg("-v").output().is_err() {
        panic!("php-cli is needed (apt-get install php-cli)");
    }
    let Some(s) = Sites::new(&format!("write = \"{write}\"")) else { return };
    for dir in [&s.site1, &s.site2] {
        write_file(
            &dir.join("7-php.txt"),
            "{\"user_id\":\"7-php\",\"balance\":1000}\n",
        );
    }
    s.sync_ok();
    s.sync_ok();
    let php = |dir: &Path| {
        Command::new("php")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/clients/add_balance.php"
            ))
            .arg(dir.join("7-php.txt"))
            .arg("4")
            .arg(php_mode)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let w1 = php(&s.site1);
    let w2 = php(&s.site2);
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(5) {
        let out = s.r.cmd().args(["cron", "files"]).output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        std::thread::sleep(std::time::Duration::from_millis(150));
    }
    let count = |c: std::process::Child| -> i64 {
        let out = c.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let (a, b) = (count(w1), count(w2));
    assert!(a > 50 && b > 50, "the writers ran: {a} {b}");
    for _ in 0..4 {
        s.sync_ok();
    }
    for dir in s.sides() {
        assert_eq!(
            Sites::balance(&dir, "7-php"),
            1000 + a + b,
            "{} (site1 wrote {a}, site2 {b})",
            dir.display()
        );
    }
}

#[test]
fn php_writers_in_place_under_cron_every_increment_counts_once() {
    php_writers_under_cron("flock", "inplace");
}

#[test]
fn php_writers_renaming_under_cron_every_increment_counts_once() {
    php_writers_under_cron("atomic", "rename");
}

/// A sync with many balance files changed on both sides, stopped at each named point of
/// its protocol (and then at random instants), then run to the end: the result is the
/// uninterrupted one.
#[test]
fn a_sync_stopped_anywhere_completes_with_each_delta_once() {
    let setup = || {
        let s = Sites::new("")?;
        for i in 0..40 {
            write_file(
                &s.site1.join(format!("{i}.txt")),
                &format!("{{\"balance\": {i}}}\n"),
            );
        }
        write_file(&s.site1.join("text.txt"), "base\n");
        s.sync_ok();
        s.sync_ok();
        for i in 0..40 {
            write_file(
                &s.site1.join(format!("{i}.txt")),
                &format!("{{\"balance\": {}}}\n", i + 5),
            );
            write_file(
                &s.site2.join(format!("{i}.txt")),
                &format!("{{\"balance\": {}}}\n", i + 7),
            );
        }
        write_file(&s.central().join("text.txt"), "central\n");
        write_file(&s.site1.join("text.txt"), "site1\n");
        Some(s)
    };
    let check = |s: &Sites| {
        for _ in 0..3 {
            s.sync_ok();
        }
        for dir in s.sides() {
            for i in 0..40 {
                assert_eq!(
                    Sites::balance(&dir, &i.to_string()),
                    i + 12,
                    "{} file {i}",
                    dir.display()
                );
            }
        }
        let out =
            s.r.cmd()
                .args(["db", "conflicts", "--json"])
                .output()
                .unwrap();
        let records: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let files: Vec<_> = records
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["key"] == "text.txt")
            .collect();
        assert_eq!(files.len(), 1, "recorded once: {records}");
        for dir in s.sides() {
            let partial: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
                .collect();
            assert!(
                partial.is_empty(),
                "temporaries of killed runs are removed: {partial:?}"
            );
        }
    };
    for point in [
        "files-after-decide",
        "files-after-write",
        "files-after-writes",
        "files-after-conflicts-append",
    ] {
        let Some(s) = setup() else { return };
        common::killed_at(&s.r.root, &["files", "sync", "--peer", "site1"], point);
        check(&s);
    }
    let Some(s) = setup() else { return };
    let killed = common::kill_at_later_and_later_moments(
        &s.r.root,
        &["files", "sync"],
        std::time::Duration::from_millis(3),
        200,
        |_| {},
    );
    assert!(killed > 3, "the run was cut {killed} times");
    check(&s);
}

#[test]
fn a_stopped_copy_whose_source_is_gone_by_the_next_run_is_decided_again() {
    let Some(s) = Sites::new("") else { return };
    s.sync_ok();
    // A file new on site1 (not a JSON object: it is copied from its side, not stored).
    std::fs::write(s.site1.join("notes.txt"), "plain text\n").unwrap();
    common::killed_at(
        &s.r.root,
        &["files", "sync", "--peer", "site1"],
        "files-after-decide",
    );
    // The site deletes it before the next run: the stopped copy has no source any more.
    std::fs::remove_file(s.site1.join("notes.txt")).unwrap();
    s.sync_ok();
    s.sync_ok();
    for side in s.sides() {
        assert!(!side.join("notes.txt").exists(), "{}", side.display());
    }
}
