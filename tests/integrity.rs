//! End-to-end tests of the integrity baseline and check on real trees,
//! hashes compared with `sha256sum`.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Root, stderr_of};

struct Setup {
    r: Root,
    www: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let r = Root::new();
        let www = r.tmp.path().join("www");
        std::fs::create_dir_all(www.join("sub")).unwrap();
        std::fs::create_dir_all(www.join("cache")).unwrap();
        std::fs::write(www.join("index.php"), "<?php echo 'cr0';\n").unwrap();
        std::fs::write(www.join("sub/a.txt"), "alpha\n").unwrap();
        std::fs::write(www.join("sub/x.log"), "excluded\n").unwrap();
        std::fs::write(www.join("cache/c.bin"), "excluded\n").unwrap();
        r.write_config(&format!(
            "[security]\nintegrity_paths = [\"{}\"]\n",
            www.display()
        ));
        Setup { r, www }
    }

    /// Gives every watched file an old mtime, so no entry is racy.
    fn age_files(&self) {
        let touched = Command::new("find")
            .arg(&self.www)
            .args([
                "-type",
                "f",
                "-exec",
                "touch",
                "-d",
                "2020-01-01",
                "{}",
                "+",
            ])
            .status()
            .unwrap();
        assert!(touched.success());
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        self.r.cmd().args(args).output().unwrap()
    }

    fn check_json(&self) -> (i32, serde_json::Value) {
        let out = self.run(&["security", "check", "--json"]);
        (
            out.status.code().unwrap(),
            serde_json::from_slice(&out.stdout).unwrap_or_default(),
        )
    }

    fn baseline(&self) -> serde_json::Value {
        let out = self.run(&["security", "baseline"]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        let signed: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.r.path("shared_storage/file_hashes.json")).unwrap(),
        )
        .unwrap();
        let mut b = signed["baseline"].clone();
        b["hmac"] = signed["hmac"].clone();
        b
    }
}

fn kinds(report: &serde_json::Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_string(),
                f["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn baseline_hashes_agree_with_sha256sum_and_excludes_apply() {
    let s = Setup::new();
    // A larger file too, read in several blocks.
    std::fs::write(s.www.join("big.bin"), vec![7u8; 3 << 20]).unwrap();
    let b = s.baseline();
    let files = b["files"].as_object().unwrap();
    let mut names: Vec<&String> = files.keys().collect();
    names.sort();
    let p = |n: &str| s.www.join(n).display().to_string();
    assert_eq!(
        names,
        [&p("big.bin"), &p("index.php"), &p("sub/a.txt")],
        "**/*.log and **/cache/** left out"
    );
    for n in ["big.bin", "index.php", "sub/a.txt"] {
        assert_eq!(files[&p(n)]["sha256"], sha256sum(&s.www.join(n)), "{n}");
    }
    assert!(b["hmac"].as_str().unwrap().len() == 64);
    let (code, report) = s.check_json();
    assert_eq!(code, 0);
    assert!(report["findings"].as_array().unwrap().is_empty());
}

#[test]
fn every_kind_of_change_is_found_and_reported_once() {
    let s = Setup::new();
    std::os::unix::fs::symlink("/etc/hostname", s.www.join("link")).unwrap();
    s.baseline();
    std::fs::write(s.www.join("index.php"), "<?php evil();\n").unwrap();
    std::fs::set_permissions(
        s.www.join("sub/a.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::remove_file(s.www.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", s.www.join("link")).unwrap();
    std::fs::write(s.www.join("shell.php"), "x").unwrap();
    std::fs::remove_file(s.www.join("sub/a.txt")).ok();
    std::fs::write(s.www.join("sub/a.txt"), "alpha\n").unwrap();
    std::fs::set_permissions(
        s.www.join("sub/a.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let (code, report) = s.check_json();
    assert_eq!(code, 4, "{report}");
    let p = |n: &str| s.www.join(n).display().to_string();
    assert_eq!(
        kinds(&report),
        [
            ("added".into(), p("shell.php")),
            ("changed".into(), p("link")),
            ("changed".into(), p("sub/a.txt")),
            ("modified".into(), p("index.php")),
        ]
    );
    // Each finding is one security event.
    let events = std::fs::read_to_string(s.r.path("logs/security/events.jsonl")).unwrap();
    assert_eq!(events.lines().count(), 4);
    // Reported once: the next check finds the same, but nothing new, exit 0.
    let (code, report) = s.check_json();
    assert_eq!(code, 0);
    assert_eq!(report["findings"].as_array().unwrap().len(), 4);
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["new"] == false)
    );
    assert_eq!(
        std::fs::read_to_string(s.r.path("logs/security/events.jsonl"))
            .unwrap()
            .lines()
            .count(),
        4
    );
    // Accepting one path clears that finding only.
    let out = s.run(&["security", "baseline", "--accept", &p("index.php")]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let (_, report) = s.check_json();
    assert_eq!(report["findings"].as_array().unwrap().len(), 3);
    // A removed file.
    std::fs::remove_file(s.www.join("shell.php")).unwrap();
    s.baseline();
    std::fs::remove_file(s.www.join("index.php")).unwrap();
    let (code, report) = s.check_json();
    assert_eq!(code, 4);
    assert_eq!(kinds(&report), [("removed".into(), p("index.php"))]);
}

#[test]
fn content_changed_with_the_mtime_put_back_is_still_caught() {
    let s = Setup::new();
    let f = s.www.join("index.php");
    let put_back = || {
        let touched = Command::new("touch")
            .args(["-d", "2020-01-01 00:00:00"])
            .arg(&f)
            .status()
            .unwrap();
        assert!(touched.success());
    };
    put_back();
    s.baseline();
    // Same size, new content, mtime restored: only ctime tells.
    std::fs::write(&f, "<?php echo 'CR0';\n").unwrap();
    put_back();
    let (code, report) = s.check_json();
    assert_eq!(code, 4);
    assert_eq!(
        kinds(&report),
        [("modified".into(), f.display().to_string())]
    );
}

#[test]
fn an_unchanged_tree_is_not_read_again() {
    let s = Setup::new();
    for i in 0..50 {
        std::fs::write(s.www.join(format!("f{i}.html")), format!("{i}\n")).unwrap();
    }
    // Old mtimes, so no entry is racy.
    s.age_files();
    s.baseline();
    let out = s.run(&["security", "check"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("52 file(s) checked, 0 read"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn symlink_loops_and_links_outside_are_recorded_not_followed() {
    let s = Setup::new();
    std::os::unix::fs::symlink(&s.www, s.www.join("sub/loop")).unwrap();
    std::os::unix::fs::symlink("/etc", s.www.join("outside")).unwrap();
    let b = s.baseline();
    let files = b["files"].as_object().unwrap();
    assert_eq!(
        files[&s.www.join("outside").display().to_string()]["kind"],
        "symlink"
    );
    assert_eq!(
        files[&s.www.join("outside").display().to_string()]["target"],
        "/etc"
    );
    assert_eq!(
        files[&s.www.join("sub/loop").display().to_string()]["kind"],
        "symlink"
    );
    assert!(
        !files
            .keys()
            .any(|k| k.contains("/etc/") || k.contains("loop/")),
        "never followed"
    );
}

#[test]
fn an_unreadable_file_is_reported_and_the_rest_is_checked() {
    let s = Setup::new();
    common::open_up(s.r.tmp.path());
    let known = s.www.join("sub/known.php");
    std::fs::write(&known, "<?php known();\n").unwrap();
    s.baseline();
    // Run as `nobody`, for whom two files are unreadable (root reads everything): one
    // added since the baseline, one in it.
    let secret = s.www.join("sub/secret.php");
    std::fs::write(&secret, "x").unwrap();
    for f in [&secret, &known] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::write(s.www.join("index.php"), "<?php changed();\n").unwrap();
    if !common::needs_root("reading as an unprivileged user") {
        return;
    }
    // nobody must be able to write the root's state and logs.
    Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(&s.r.root)
        .status()
        .unwrap();
    for d in [&s.www, &s.www.join("sub"), &s.www.join("cache")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for f in [s.www.join("index.php"), s.www.join("sub/a.txt")] {
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = common::cr0sync_unprivileged()
        .arg("--root")
        .arg(&s.r.root)
        .args(["security", "check", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr_of(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let k = kinds(&report);
    for f in [&secret, &known] {
        assert!(
            k.contains(&("unreadable".into(), f.display().to_string())),
            "{k:?}"
        );
    }
    // A file that is there but cannot be read is unreadable, not removed.
    assert!(
        !k.contains(&("removed".into(), known.display().to_string())),
        "{k:?}"
    );
    assert!(
        k.iter()
            .any(|(kind, p)| kind == "modified" && p.ends_with("index.php")),
        "{k:?}"
    );
}

#[test]
fn an_edited_baseline_is_refused_with_an_event() {
    let s = Setup::new();
    s.baseline();
    let path = s.r.path("shared_storage/file_hashes.json");
    let text = std::fs::read_to_string(&path).unwrap();
    // An attacker updates the recorded hash of the file they changed.
    std::fs::write(s.www.join("index.php"), "<?php evil();\n").unwrap();
    let evil = sha256sum(&s.www.join("index.php"));
    let forged =
        regex_free_replace_hash(&text, &s.www.join("index.php").display().to_string(), &evil);
    std::fs::write(&path, forged).unwrap();
    let out = s.run(&["security", "check"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("not trusted") && err.contains("file_hashes.json"),
        "{err}"
    );
    let events = std::fs::read_to_string(s.r.path("logs/security/events.jsonl")).unwrap();
    assert!(events.contains("integrity.baseline_untrusted"));
    // Unsigned (no hmac): refused too.
    std::fs::write(&path, "{\"version\":1,\"files\":{}}").unwrap();
    assert_eq!(s.run(&["security", "check"]).status.code(), Some(4));
}

/// Replaces the sha256 recorded for `file` in the baseline text.
fn regex_free_replace_hash(text: &str, file: &str, hash: &str) -> String {
    let at = text.find(&format!("\"{file}\"")).unwrap();
    let h = at + text[at..].find("\"sha256\":\"").unwrap() + "\"sha256\":\"".len();
    format!("{}{}{}", &text[..h], hash, &text[h + 64..])
}

#[test]
fn cron_records_a_first_baseline_then_prints_new_findings_once() {
    let s = Setup::new();
    let out = s.run(&["cron", "security"]);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        stderr_of(&out)
    );
    assert!(
        s.r.path("shared_storage/file_hashes.json").exists(),
        "trust on first use"
    );
    std::fs::write(s.www.join("index.php"), "<?php evil();\n").unwrap();
    let later = |t: &str| {
        s.r.cmd()
            .env("CR0SYNC_NOW", t)
            .args(["cron", "security"])
            .output()
            .unwrap()
    };
    let out = later("2099-01-01T00:10:00Z");
    assert_eq!(out.status.code(), Some(4));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("integrity: modified") && text.contains("index.php"),
        "{text}"
    );
    let out = later("2099-01-01T00:20:00Z");
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "reported once"
    );
    let st = s.r.status_json();
    assert_eq!(st["integrity"]["open_findings"], 1);
    assert!(
        st["problems"].to_string().contains("integrity finding"),
        "{st}"
    );
}

#[test]
fn full_rehash_is_spread_over_runs() {
    let s = Setup::new();
    let www = s.www.display().to_string();
    s.r.write_config(&format!(
        "[security]\nintegrity_paths = [\"{www}\"]\nfull_rehash = \"1h\"\nintegrity_interval = \"20m\"\n"
    ));
    for i in 0..10 {
        std::fs::write(s.www.join(format!("f{i}")), format!("{i}\n")).unwrap();
    }
    s.age_files();
    s.baseline();
    // Two hours later every hash is stale: 12 files, 3 runs per full_rehash, so at most 4
    // files are read per run, the oldest first.
    let mut reads = Vec::new();
    for _ in 0..3 {
        let out =
            s.r.cmd()
                .env("CR0SYNC_NOW", "2099-01-01T02:00:00Z")
                .args(["security", "check"])
                .output()
                .unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        reads.push(
            text.split(", ").next().unwrap().to_string()
                + " / "
                + text
                    .split(" read")
                    .next()
                    .unwrap()
                    .rsplit(' ')
                    .next()
                    .unwrap(),
        );
    }
    assert_eq!(reads, ["12 file(s) checked / 4"; 3], "{reads:?}");
}

#[test]
fn a_long_baseline_shows_progress_on_a_terminal_only() {
    let s = Setup::new();
    // A sparse 256 MiB file: hashing it takes a while without writing 256 MiB.
    let big = std::fs::File::create(s.www.join("big.bin")).unwrap();
    big.set_len(256 << 20).unwrap();
    drop(big);
    let (tty, last) = common::on_a_terminal(&s.r.root, "security baseline");
    assert!(
        tty.contains("hashing") && tty.contains("%") && tty.contains("256.0 MiB"),
        "{tty:?}"
    );
    // The line is erased before the result is printed.
    assert!(last.starts_with("baseline of "), "{tty:?}");
    // Not on a pipe, whatever the delay.
    let out =
        s.r.cmd()
            .env("CR0SYNC_PROGRESS_AFTER_MS", "0")
            .args(["security", "baseline"])
            .output()
            .unwrap();
    assert!(out.status.success());
    assert!(out.stderr.is_empty(), "{}", stderr_of(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("baseline of "),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
