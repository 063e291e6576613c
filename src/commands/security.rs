//! `cr0sync security ...`: what is built so far.

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::cli::GlobalArgs;
use crate::error::Outcome;
use crate::jobs::Job;
use crate::jobs::runner::run_job;
use crate::ops::task::Trigger;
use crate::security::{integrity, job};

#[derive(Debug, Args)]
#[command(
    about = "File integrity baseline and check, API session cleanup, security event archiving",
    after_help = "Example:\n  cr0sync security baseline\n  cr0sync security check --json\n  \
                  cr0sync security cleanup-sessions --dry-run\n  cr0sync security archive-events\n\n\
                  security check exits 4 when it finds something new."
)]
pub struct SecurityCmd {
    #[command(subcommand)]
    pub action: SecurityAction,
}

#[derive(Debug, Subcommand)]
pub enum SecurityAction {
    /// Record the integrity baseline (signed) of integrity_paths, or accept one path's change
    #[command(
        after_help = "Example:\n  cr0sync security baseline\n  cr0sync security baseline --accept /var/www/html/index.php"
    )]
    Baseline {
        /// Update only this path's entry (after a change you made on purpose)
        #[arg(long, value_name = "PATH")]
        accept: Option<std::path::PathBuf>,
    },
    /// Compare the watched files with the baseline; exit 4 when something new is found
    #[command(after_help = "Example:\n  cr0sync security check\n  cr0sync security check --json")]
    Check {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove expired sessions and rate-limit windows from api_sessions.json, in place, under its flock
    #[command(after_help = "Example:\n  cr0sync security cleanup-sessions --dry-run")]
    CleanupSessions {
        /// Count what would be removed, change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Move events older than event_archive_after to logs/security/archive/events-YYYY-MM.jsonl.gz
    #[command(after_help = "Example:\n  cr0sync security archive-events")]
    ArchiveEvents {
        /// Count what would be moved, change nothing
        #[arg(long)]
        dry_run: bool,
    },
}

impl SecurityCmd {
    pub fn run(&self, global: &GlobalArgs) -> Result<Outcome> {
        let ctx = global.context()?;
        if let SecurityAction::Baseline { accept } = &self.action {
            let mut line = String::new();
            let report = run_job(&ctx, Job::Security, Trigger::Manual, false, |run| {
                let (n, unreadable) = integrity::baseline(run.ctx, accept.as_deref(), run.now)?;
                for (path, why) in &unreadable {
                    eprintln!("cr0sync: cannot read {path}: {why}; left out of the baseline");
                }
                line = match accept {
                    Some(p) => format!("accepted {} into the baseline ({n} file(s))", p.display()),
                    None => format!(
                        "baseline of {n} file(s) written to {}",
                        run.ctx.layout.file_hashes().display()
                    ),
                };
                Ok(())
            })?;
            println!("{line}");
            return Ok(report.outcome);
        }
        if let SecurityAction::Check { json } = self.action {
            let mut result = None;
            let report = run_job(&ctx, Job::Security, Trigger::Manual, false, |run| {
                let r = integrity::check(run.ctx, false, run.now)?;
                let new = r.new_findings().count();
                run.task(job::INTEGRITY_CHECK.name(), |_| {
                    Ok(crate::ops::task::TaskDone {
                        detail: format!(
                            "{} file(s), {} finding(s), {new} new",
                            r.files,
                            r.findings.len()
                        ),
                        findings: new > 0,
                    })
                });
                result = Some(r);
                Ok(())
            })?;
            if let Some(r) = result {
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    let mut t = crate::output::Table::new(["KIND", "PATH", "DETAIL", "NEW"]);
                    for f in &r.findings {
                        t.row([
                            f.kind.to_string(),
                            f.path.clone(),
                            f.detail.clone(),
                            if f.new { "new".into() } else { String::new() },
                        ]);
                    }
                    if !t.is_empty() {
                        print!("{}", t.render());
                    }
                    println!(
                        "{} file(s) checked, {} read; {} finding(s), {} new",
                        r.files,
                        r.hashed,
                        r.findings.len(),
                        r.new_findings().count()
                    );
                }
            }
            return Ok(report.outcome);
        }
        let (dry_run, name) = match self.action {
            SecurityAction::CleanupSessions { dry_run } => (dry_run, job::CLEANUP_SESSIONS.name()),
            SecurityAction::ArchiveEvents { dry_run } => (dry_run, job::ARCHIVE_EVENTS.name()),
            SecurityAction::Baseline { .. } | SecurityAction::Check { .. } => {
                return Ok(Outcome::Success);
            }
        };
        let report = run_job(&ctx, Job::Security, Trigger::Manual, dry_run, |run| {
            match self.action {
                SecurityAction::CleanupSessions { .. } => {
                    run.task(name, job::cleanup_sessions_task)
                }
                SecurityAction::ArchiveEvents { .. } => run.task(name, job::archive_events_task),
                SecurityAction::Baseline { .. } | SecurityAction::Check { .. } => {}
            }
            Ok(())
        })?;
        for t in &report.tasks {
            println!("{}", t.detail);
        }
        Ok(report.outcome)
    }
}
