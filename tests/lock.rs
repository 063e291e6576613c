//! Job locks with a real second process: `flock(1)` from util-linux holds the same kernel
//! lock cr0sync takes, which is also how an operator pauses a job during maintenance.
#![allow(
    clippy::panic,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::unwrap_used
)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A process that holds `locks/<job>.lock` with flock and writes its pid into it, as
/// cr0sync does. It is a single process (the shell execs sleep), so SIGKILL frees the lock.
fn hold_lock(r: &Root, job: &str, seconds: u32) -> Child {
    let path = r.path(&format!("locks/{job}.lock"));
    let script = format!(
        ": > '{p}'; exec 9>>'{p}'; flock -x 9; printf 'pid=%s\\nstarted=2026-11-22T03:00:00Z\\n' $$ >&9; \
         echo locked; exec sleep {seconds}",
        p = path.display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn holder");
    // Wait until the holder says it has the lock.
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    child
}

#[test]
fn cron_command_skips_silently_while_locked() {
    let r = Root::new();
    let mut holder = hold_lock(&r, "database", 30);
    let out = r.cmd().args(["cron", "database"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "cron must be silent"
    );
    let status = r.status_json();
    assert_eq!(status["jobs"]["database"]["last_result"], "skipped");
    assert_eq!(status["jobs"]["database"]["locked_by"]["pid"], holder.id());
    let log = std::fs::read_to_string(r.path("logs/cron_database_sync.log")).unwrap();
    assert!(log.contains("skipped"), "{log}");
    // Other jobs are not blocked by this lock.
    r.cmd().args(["cron", "logs"]).assert().success();
    assert_eq!(r.status_json()["jobs"]["logs"]["last_result"], "ok");
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn sigkilled_holder_leaves_no_stale_lock() {
    let r = Root::new();
    let mut holder = hold_lock(&r, "security", 60);
    assert!(!r.status_json()["jobs"]["security"]["locked_by"].is_null());
    // SIGKILL: no chance to clean up. The kernel releases the flock.
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(r.status_json()["jobs"]["security"]["locked_by"].is_null());
    r.cmd()
        .args(["cron", "security"])
        .assert()
        .success()
        .stdout("")
        .stderr("");
    assert_eq!(r.status_json()["jobs"]["security"]["last_result"], "ok");
}

#[test]
fn status_while_locked_does_not_disturb_the_holder() {
    let r = Root::new();
    let mut holder = hold_lock(&r, "logs", 30);
    let start = Instant::now();
    for _ in 0..5 {
        let s = r.status_json();
        assert_eq!(s["jobs"]["logs"]["locked_by"]["pid"], holder.id());
        assert_eq!(
            s["jobs"]["logs"]["locked_by"]["started"],
            "2026-11-22T03:00:00Z"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(holder.try_wait().unwrap().is_none(), "holder still running");
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn manual_command_exits_3_naming_the_holder() {
    let r = Root::new();
    let mut holder = hold_lock(&r, "database", 30);
    let out = r.cmd().args(["run", "database"]).output().unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("pid {}", holder.id())), "{err}");
    assert!(err.contains("2026-11-22T03:00:00Z"), "{err}");
    assert!(
        err.contains("locks/database.lock") && err.contains("--wait"),
        "{err}"
    );
    // A refused manual run leaves the last record alone.
    assert_eq!(r.status_json()["jobs"]["database"]["last_result"], "never");
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn manual_command_waits_for_the_holder_with_wait() {
    let r = Root::new();
    let mut holder = hold_lock(&r, "logs", 1);
    let start = Instant::now();
    let out = r
        .cmd()
        .args(["run", "logs", "--wait", "20s"])
        .output()
        .unwrap();
    let elapsed = start.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    // It ran only after the holder exited (about one second), not at once, not at 20 s.
    assert!(
        holder.try_wait().unwrap().is_some(),
        "ran while the holder was alive"
    );
    assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(15), "{elapsed:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("logs job"));
    assert_eq!(r.status_json()["jobs"]["logs"]["last_result"], "ok");
    assert_eq!(
        r.status_json()["jobs"]["logs"]["locked_by"],
        serde_json::Value::Null
    );
    let _ = holder.wait();
}

#[test]
fn wait_expires_then_exits_3() {
    let r = Root::new();
    let mut holder = hold_lock(&r, "security", 30);
    let start = Instant::now();
    // The global option is accepted before the subcommand too.
    let out = r
        .cmd()
        .args(["--wait", "1s", "run", "security"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(10),
        "{elapsed:?}"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn manual_run_after_a_sigkilled_holder_proceeds_at_once() {
    let r = Root::new();
    let mut holder = hold_lock(&r, "database", 60);
    holder.kill().unwrap();
    holder.wait().unwrap();
    let start = Instant::now();
    r.cmd().args(["run", "database"]).assert().success();
    assert!(start.elapsed() < Duration::from_secs(5));
}
