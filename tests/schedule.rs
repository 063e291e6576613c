//! Schedules with the clock controlled through CR0SYNC_NOW: a task that is due
//! runs once, a task that is not due does not, a failed task is retried at the next run.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Root, stderr_of};

fn cron_at(r: &Root, job: &str, now: &str) -> std::process::Output {
    r.cmd()
        .env("CR0SYNC_NOW", now)
        .args(["cron", job])
        .output()
        .unwrap()
}

fn tasks_of_last_run(r: &Root, job: &str) -> Vec<String> {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.path(&format!("state/runs/{job}.json"))).unwrap())
            .unwrap();
    record["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_due_task_runs_once_and_not_again_until_its_interval_passed() {
    let r = Root::new();
    assert!(
        cron_at(&r, "database", "2030-01-01T00:00:00Z")
            .status
            .success()
    );
    assert_eq!(tasks_of_last_run(&r, "database"), ["clean-backups"]);
    assert!(
        cron_at(&r, "database", "2030-01-01T01:00:00Z")
            .status
            .success()
    );
    assert!(
        tasks_of_last_run(&r, "database").is_empty(),
        "not due an hour later"
    );
    assert!(
        cron_at(&r, "database", "2030-01-07T23:59:29Z")
            .status
            .success()
    );
    assert!(
        tasks_of_last_run(&r, "database").is_empty(),
        "not due before a week (less 30 s of slack)"
    );
    assert!(
        cron_at(&r, "database", "2030-01-08T00:00:00Z")
            .status
            .success()
    );
    assert_eq!(
        tasks_of_last_run(&r, "database"),
        ["clean-backups"],
        "due again after a week"
    );
    let st = r.status_json();
    assert_eq!(
        st["jobs"]["database"]["next_due"]["clean-backups"],
        "2030-01-14T23:59:30Z"
    );
}

#[test]
fn a_failed_task_is_retried_at_the_next_run_not_an_interval_later() {
    let r = Root::new();
    std::fs::write(
        r.path("logs/security/events.jsonl"),
        "{\"time\":\"2020-01-01T00:00:00Z\",\"kind\":\"x\",\"path\":null,\"detail\":\"old\"}\n",
    )
    .unwrap();
    // The archive directory is in the way (a file): archiving fails.
    let archive = r.path("logs/security/archive");
    let _ = std::fs::remove_dir_all(&archive);
    std::fs::write(&archive, "not a directory").unwrap();
    let out = cron_at(&r, "security", "2030-01-01T00:00:00Z");
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("archive"), "{}", stderr_of(&out));
    std::fs::remove_file(&archive).unwrap();
    // One minute later, not a day later: it runs again and succeeds.
    let out = cron_at(&r, "security", "2030-01-01T00:01:00Z");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(tasks_of_last_run(&r, "security").contains(&"archive-events".to_string()));
    assert!(
        r.path("logs/security/archive/events-2020-01.jsonl.gz")
            .exists()
    );
    // And then it is not due for a day.
    let out = cron_at(&r, "security", "2030-01-01T00:02:00Z");
    assert!(out.status.success());
    assert!(!tasks_of_last_run(&r, "security").contains(&"archive-events".to_string()));
}

/// The shape of a JSON value: keys and value types, for a schema snapshot.
fn shape(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value::*;
    match v {
        Null => "null".into(),
        Bool(_) => "bool".into(),
        Number(_) => "number".into(),
        String(_) => "string".into(),
        Array(a) => Array(a.first().map(shape).into_iter().collect()),
        Object(o) => Object(o.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
    }
}

#[test]
fn status_json_schema() {
    let r = Root::new();
    let db = r.tmp.path().join("bot.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'a');",
        )
        .unwrap();
    let src = r.tmp.path().join("logs");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("#c.log"), "line\n").unwrap();
    r.write_config(&format!(
        "[[database.db]]\nname = \"users\"\npeers = [{{ name = \"bot\", path = \"{}\" }}]\n\n\
         [[logs.stream]]\nname = \"rizon\"\nfrom = \"{}\"\nto = \"logs/irc_networks/rizon\"\n",
        db.display(),
        src.display()
    ));
    for job in ["database", "logs", "security"] {
        assert!(
            r.cmd()
                .args(["cron", job])
                .output()
                .unwrap()
                .status
                .success()
        );
    }
    let st = r.status_json();
    insta::assert_snapshot!(serde_json::to_string_pretty(&shape(&st)).unwrap());
}
