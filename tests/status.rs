//! `cr0sync status` before and after runs, and the silence of cron runs.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn before_any_run_every_job_is_never() {
    let r = Root::new();
    let s = r.status_json();
    assert_eq!(s["root"], r.root.display().to_string());
    assert_eq!(s["config"], r.path("cr0sync.toml").display().to_string());
    for job in ["database", "logs", "security"] {
        let j = &s["jobs"][job];
        assert_eq!(j["last_result"], "never", "{job}");
        assert!(j["last_run"].is_null());
        assert!(j["duration_ms"].is_null());
        assert!(j["locked_by"].is_null());
    }
    assert_eq!(s["ok"], true);
}

#[test]
fn after_a_run_the_record_shows_it() {
    let r = Root::new();
    let out = r.cmd().args(["cron", "logs"]).output().unwrap();
    assert!(out.status.success());
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "cron is silent when all is well"
    );
    let s = r.status_json();
    let j = &s["jobs"]["logs"];
    assert_eq!(j["last_result"], "ok");
    assert!(j["duration_ms"].is_u64());
    let last_run = j["last_run"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(last_run).is_ok(),
        "{last_run}"
    );
    assert_eq!(s["jobs"]["database"]["last_result"], "never");
    assert!(r.path("logs/cron_log_sync.log").is_file());
    assert_eq!(mode(&r.path("logs/cron_log_sync.log")), 0o664);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.path("state/runs/logs.json")).unwrap()).unwrap();
    assert_eq!(record["trigger"], "cron");
}

#[test]
fn the_clock_hook_dates_the_run() {
    let r = Root::new();
    r.cmd()
        .env("CR0SYNC_NOW", "2030-01-02T03:04:05Z")
        .args(["cron", "security"])
        .assert()
        .success();
    assert_eq!(
        r.status_json()["jobs"]["security"]["last_run"],
        "2030-01-02T03:04:05Z"
    );
}

#[test]
fn human_status_is_an_aligned_table_with_a_verdict() {
    let r = Root::new();
    r.cmd().args(["cron", "database"]).assert().success();
    let out = r.cmd().arg("status").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("\x1b["), "no colour when not a terminal");
    let header = text.lines().find(|l| l.starts_with("JOB")).unwrap();
    let col = header.find("RESULT").unwrap();
    let db = text.lines().find(|l| l.starts_with("database")).unwrap();
    assert_eq!(&db[col..col + 2], "ok", "{text}");
    let logs = text.lines().find(|l| l.starts_with("logs")).unwrap();
    assert_eq!(&logs[col..col + 5], "never", "{text}");
    assert!(text.contains("verdict: all good"), "{text}");
}

#[test]
fn dry_run_writes_no_record() {
    let r = Root::new();
    r.cmd()
        .args(["cron", "database", "--dry-run"])
        .assert()
        .success();
    assert_eq!(r.status_json()["jobs"]["database"]["last_result"], "never");
    assert!(!r.path("state/runs/database.json").exists());
}

#[test]
fn status_on_a_read_only_root_still_works() {
    let r = Root::new();
    r.cmd().args(["cron", "database"]).assert().success();
    open_up(r.tmp.path());
    // Everything readable, nothing writable for the unprivileged user.
    let out = cr0sync_unprivileged()
        .arg("--root")
        .arg(&r.root)
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    // A job run there fails cleanly: exit 1, one line naming a file, no panic.
    let out = cr0sync_unprivileged()
        .arg("--root")
        .arg(&r.root)
        .args(["cron", "database"])
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&r.root.display().to_string()) && err.contains("Permission denied"),
        "{err}"
    );
}

#[test]
fn metrics_files_are_written_for_node_exporter() {
    let r = common::Root::new();
    let metrics = r.tmp.path().join("metrics");
    r.write_config(&format!(
        "[general]\nmetrics_dir = \"{}\"\n",
        metrics.display()
    ));
    for job in ["database", "logs", "security"] {
        let out = r.cmd().args(["cron", job]).output().unwrap();
        assert!(out.status.success(), "{}", common::stderr_of(&out));
        let text = std::fs::read_to_string(metrics.join(format!("cr0sync_{job}.prom"))).unwrap();
        for name in [
            "cr0sync_last_run_timestamp_seconds",
            "cr0sync_last_success_timestamp_seconds",
            "cr0sync_run_duration_seconds",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} gauge\n{name}{{job=\"{job}\"}} ")),
                "{text}"
            );
        }
    }
    let security = std::fs::read_to_string(metrics.join("cr0sync_security.prom")).unwrap();
    assert!(
        security.contains("cr0sync_integrity_findings_open{job=\"security\"} 0"),
        "{security}"
    );
    // No temporary file left next to them.
    assert_eq!(std::fs::read_dir(&metrics).unwrap().count(), 3);
}

fn check_at(r: &Root, now: Option<&str>) -> (i32, String) {
    let mut cmd = r.cmd();
    cmd.args(["status", "--check"]);
    if let Some(now) = now {
        cmd.env("CR0SYNC_NOW", now);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[test]
fn check_exits_1_exactly_when_a_job_stopped_running_or_hangs() {
    let r = Root::new();
    // A fresh root that never ran: nothing to report yet.
    assert_eq!(check_at(&r, None), (0, String::new()));
    let out = r.cmd().args(["cron", "database"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(check_at(&r, None), (0, String::new()));
    // Three minutes later without another run: cron is not running it; and the jobs
    // that never ran on a root set up that long ago were never installed.
    let later = rfc3339(chrono::Utc::now() + chrono::Duration::minutes(4));
    let (code, text) = check_at(&r, Some(&later));
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("database job has had no successful run") && text.contains("crontab -l"),
        "{text}"
    );
    if std::fs::metadata(r.path("state"))
        .and_then(|m| m.created())
        .is_ok()
    {
        assert!(
            text.contains("the logs job has never run") && text.contains("install_crontabs.sh"),
            "{text}"
        );
    }
    // A job holding its lock past stuck_after (10m by default) is named with its pid.
    let db = r.tmp.path().join("bot.db");
    let setup = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("CREATE TABLE t (id INTEGER PRIMARY KEY, v); INSERT INTO t VALUES (1, 'a');")
        .status()
        .unwrap();
    assert!(setup.success());
    r.write_config(&format!(
        "[[database.db]]\nname = \"d\"\npeers = [{{ name = \"bot\", path = \"{}\" }}]\n",
        db.display()
    ));
    let first = r.cmd().args(["db", "sync"]).output().unwrap();
    assert!(first.status.success(), "{}", stderr_of(&first));
    // A change for the peer, so the sync writes a journal and pauses after it.
    std::process::Command::new("sqlite3")
        .arg(r.path("databases/d.db"))
        .arg("UPDATE t SET v = 'b'")
        .status()
        .unwrap();
    let mut slow = std::process::Command::new(BIN)
        .arg("--root")
        .arg(&r.root)
        .args(["db", "sync"])
        .env("CR0SYNC_FAULT", "after-journal:sleep=4000")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&r.path("state/db/d/bot.journal.json"));
    let (code, text) = check_at(&r, None);
    assert_eq!(code, 0, "held for a moment only: {text}");
    let much_later = rfc3339(chrono::Utc::now() + chrono::Duration::minutes(11));
    let (code, text) = check_at(&r, Some(&much_later));
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("has held its lock since") && text.contains(&format!("pid {}", slow.id())),
        "{text}"
    );
    assert!(slow.wait().unwrap().success());
}

#[test]
fn a_job_that_cannot_open_its_log_file_is_recorded_as_failed_and_named() {
    let r = Root::new();
    // A log file nobody can open as a file (a directory in its place, which even root
    // cannot write into as a file).
    let log = r.path("logs/cron_database_sync.log");
    let _ = std::fs::remove_file(&log);
    std::fs::create_dir(&log).unwrap();
    let out = r.cmd().args(["cron", "database"]).output().unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot open log file") && err.contains("Try:"),
        "{err}"
    );
    let (code, text) = check_at(&r, None);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("the database job failed") && text.contains("cron_database_sync.log"),
        "{text}"
    );
    assert_eq!(r.status_json()["jobs"]["database"]["last_result"], "error");
}
