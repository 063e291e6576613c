//! cr0sync's own job logs: one file per job, rolled by size into valid gzip files.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

#[test]
fn job_log_rolls_by_size_into_gzip() {
    let r = Root::new();
    r.write_config("[general]\nlog_size = \"1KiB\"\nlog_keep = 2\n");
    for _ in 0..40 {
        r.cmd()
            .args(["cron", "database"])
            .assert()
            .success()
            .stdout("")
            .stderr("");
    }
    let rolled = r.path("logs/cron_database_sync.log.1.gz");
    assert!(rolled.is_file(), "no rolled log");
    let ok = Command::new("gzip")
        .arg("-t")
        .arg(&rolled)
        .status()
        .unwrap();
    assert!(ok.success(), "gzip -t failed on {}", rolled.display());
    assert!(
        !r.path("logs/cron_database_sync.log.3.gz").exists(),
        "log_keep = 2 keeps .1 and .2"
    );
    let live = std::fs::metadata(r.path("logs/cron_database_sync.log"))
        .unwrap()
        .len();
    assert!(live <= 2048, "live log stays near log_size: {live}");
    // Jobs log to their own files only.
    assert!(!r.path("logs/cron_log_sync.log").exists());
}
