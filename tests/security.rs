//! End-to-end tests of what is built of the security job: API session cleanup
//! and event archiving, with real files, a real flock holder, real gzip.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Root, stderr_of};

const SESSIONS: &str = r#"{
  "version": 3,
  "sessions": {
    "old": { "user": "alice", "expires_at": "2020-01-01T00:00:00Z", "ua": "php/8" },
    "live": { "user": "bob", "expires_at": "2099-01-01T00:00:00Z", "csrf": "t0k" },
    "unix_old": { "user": "carol", "expires_at": 1600000000 }
  },
  "rate_limits": {
    "1.2.3.4": { "count": 12, "window_start": "2020-01-01T00:00:00Z", "window_seconds": 60 },
    "5.6.7.8": { "count": 1, "window_start": "2099-01-01T00:00:00Z", "window_seconds": 60 }
  },
  "extra": { "kept": true }
}
"#;

fn sessions_root(config: &str) -> (Root, PathBuf) {
    let r = Root::new();
    r.write_config(config);
    let file = r.path("shared_storage/api_sessions.json");
    std::fs::write(&file, SESSIONS).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    (r, file)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn cleanup(r: &Root, extra: &[&str]) -> std::process::Output {
    r.cmd()
        .args(["security", "cleanup-sessions"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn expired_entries_are_removed_in_place_keeping_everything_else() {
    let (r, file) = sessions_root("");
    let ino = std::fs::metadata(&file).unwrap().ino();
    let out = cleanup(&r, &["--dry-run"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("would remove 2 expired session(s) and 1")
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        SESSIONS,
        "dry run changes nothing"
    );
    let out = cleanup(&r, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let doc = json(&file);
    assert_eq!(
        doc["sessions"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["live"]
    );
    assert_eq!(doc["sessions"]["live"]["csrf"], "t0k");
    assert_eq!(
        doc["rate_limits"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["5.6.7.8"]
    );
    assert_eq!(doc["extra"]["kept"], true);
    assert_eq!(doc["version"], 3);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.find("version") < text.find("sessions")
            && text.find("rate_limits") < text.find("extra"),
        "key order kept"
    );
    let m = std::fs::metadata(&file).unwrap();
    assert_eq!(m.ino(), ino, "rewritten in place, never renamed over");
    assert_eq!(m.mode() & 0o777, 0o640, "mode kept");
    assert!(!r.path("state/sessions/api_sessions.json.copy").exists());
}

#[test]
fn a_file_that_does_not_parse_is_left_byte_identical_with_its_position() {
    let (r, file) = sessions_root("");
    let bad =
        b"{\n  \"sessions\": {\n    \"a\": { \"expires_at\": \"2020-01-01T00:00:00Z\" },,\n}\n";
    std::fs::write(&file, bad).unwrap();
    let out = cleanup(&r, &[]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("api_sessions.json") && err.contains("line 3, column"),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), bad);
}

#[test]
fn an_interrupted_rewrite_is_restored_from_the_copy_then_cleaned() {
    let (r, file) = sessions_root("");
    // A run died mid-rewrite: the copy is saved, the file is half written.
    std::fs::create_dir_all(r.path("state/sessions")).unwrap();
    std::fs::write(r.path("state/sessions/api_sessions.json.copy"), SESSIONS).unwrap();
    std::fs::write(&file, &SESSIONS.as_bytes()[..100]).unwrap();
    let out = cleanup(&r, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let doc = json(&file);
    assert_eq!(doc["sessions"].as_object().unwrap().len(), 1);
    assert_eq!(doc["sessions"]["live"]["user"], "bob");
    assert!(!r.path("state/sessions/api_sessions.json.copy").exists());
}

/// Holds flock on `file` from another process for `secs`; returns once it is held.
fn hold_flock(file: &Path, secs: f64, dir: &Path) -> std::process::Child {
    let ready = dir.join("held");
    let _ = std::fs::remove_file(&ready);
    let child = Command::new("flock")
        .arg(file)
        .arg("-c")
        .arg(format!("touch '{}'; sleep {secs}", ready.display()))
        .spawn()
        .unwrap();
    while !ready.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

#[test]
fn cleanup_waits_for_the_websites_lock_and_a_waiting_writer_keeps_its_update() {
    let (r, file) = sessions_root("[general]\nbusy_timeout = \"10s\"\n");
    let mut holder = hold_flock(&file, 1.0, r.tmp.path());
    let start = Instant::now();
    let cr0 = std::process::Command::new(common::BIN)
        .arg("--root")
        .arg(&r.root)
        .args(["security", "cleanup-sessions"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // A PHP-like writer queues on the same lock and rewrites the file in place.
    let php_state = SESSIONS.replace("\"live\"", "\"php_new\"");
    let new_file = r.tmp.path().join("php.json");
    std::fs::write(&new_file, &php_state).unwrap();
    let writer = Command::new("flock")
        .arg(&file)
        .arg("-c")
        .arg(format!(
            "cat '{}' > '{}'",
            new_file.display(),
            file.display()
        ))
        .spawn()
        .unwrap();
    let out = cr0.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "cr0sync waited for the lock"
    );
    holder.wait().unwrap();
    assert!(writer.wait_with_output().unwrap().status.success());
    // Whatever order the two waiters got the lock in, the writer's update is there.
    let doc = json(&file);
    assert!(doc["sessions"].get("php_new").is_some(), "{doc}");
}

#[test]
fn a_lock_held_past_busy_timeout_is_an_error_and_the_file_is_untouched() {
    let (r, file) = sessions_root("[general]\nbusy_timeout = \"1s\"\n");
    let mut holder = hold_flock(&file, 3.0, r.tmp.path());
    let out = cleanup(&r, &[]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stayed locked"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), SESSIONS);
    holder.wait().unwrap();
}

fn event(t: &str, i: usize) -> String {
    format!(
        "{{\"time\":\"{t}\",\"kind\":\"integrity.modified\",\"path\":\"/var/www/{i}\",\"detail\":\"event {i}\"}}\n"
    )
}

fn archived_lines(r: &Root) -> Vec<String> {
    let dir = r.path("logs/security/archive");
    let mut lines = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten() {
        let p = e.unwrap().path();
        assert!(
            Command::new("gzip")
                .arg("-t")
                .arg(&p)
                .status()
                .unwrap()
                .success(),
            "{}",
            p.display()
        );
        let out = Command::new("gzip").arg("-dc").arg(&p).output().unwrap();
        lines.extend(
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(String::from),
        );
    }
    lines
}

#[test]
fn events_are_archived_by_month_appending_to_existing_archives() {
    let r = Root::new();
    let events = r.path("logs/security/events.jsonl");
    let mut text = event("2025-09-30T23:59:59Z", 1) + &event("2025-10-01T00:00:00Z", 2);
    text += "not json, kept\n";
    text += &event("2099-01-01T00:00:00Z", 3);
    std::fs::write(&events, &text).unwrap();
    let out = r
        .cmd()
        .args(["security", "archive-events"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        r.path("logs/security/archive/events-2025-09.jsonl.gz")
            .exists()
    );
    assert!(
        r.path("logs/security/archive/events-2025-10.jsonl.gz")
            .exists()
    );
    // A second batch for October is appended as another gzip member.
    let kept = std::fs::read_to_string(&events).unwrap();
    assert_eq!(
        kept,
        "not json, kept\n".to_string() + &event("2099-01-01T00:00:00Z", 3)
    );
    std::fs::write(&events, kept.clone() + &event("2025-10-15T00:00:00Z", 4)).unwrap();
    let out = r
        .cmd()
        .args(["security", "archive-events"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let mut all = archived_lines(&r);
    all.sort();
    assert_eq!(all.len(), 3);
    assert!(all.iter().any(|l| l.contains("event 4")));
    assert_eq!(std::fs::read_to_string(&events).unwrap(), kept);
}

#[test]
fn sigkill_during_archiving_then_one_run_loses_and_duplicates_nothing() {
    let r = Root::new();
    let events = r.path("logs/security/events.jsonl");
    let n = 100_000;
    let mut text = String::with_capacity(n * 110);
    for i in 0..n {
        let t = if i % 10 == 0 {
            "2099-01-01T00:00:00Z".to_string()
        } else {
            format!("2025-{:02}-15T12:00:00Z", 1 + i % 12)
        };
        text.push_str(&event(&t, i));
    }
    std::fs::write(&events, &text).unwrap();
    let killed = common::kill_at_later_and_later_moments(
        &r.root,
        &["security", "archive-events"],
        Duration::from_millis(3),
        400,
        |_| {},
    );
    let log = std::fs::read_to_string(r.path("logs/cron_security.log")).unwrap_or_default();
    eprintln!(
        "{killed} runs killed; {} undone after appending to an archive",
        log.matches("interrupted run was undone").count()
    );
    assert!(killed >= 5, "only {killed} runs were killed");
    let out = r
        .cmd()
        .args(["security", "archive-events"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let mut ids: Vec<String> = archived_lines(&r);
    ids.extend(
        std::fs::read_to_string(&events)
            .unwrap()
            .lines()
            .map(String::from),
    );
    assert_eq!(ids.len(), n, "every event once");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "no duplicates");
}

#[test]
fn cron_security_is_silent_runs_its_schedules_and_status_shows_sessions() {
    let (r, _file) = sessions_root("");
    let out = r.cmd().args(["cron", "security"]).output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        stderr_of(&out)
    );
    let schedule = std::fs::read_to_string(r.path("state/schedule/security.json")).unwrap();
    assert!(
        schedule.contains("cleanup-sessions") && schedule.contains("archive-events"),
        "{schedule}"
    );
    let st = r.status_json();
    assert_eq!(st["sessions"]["active"], 1);
    assert_eq!(st["sessions"]["expired"], 0);
}
