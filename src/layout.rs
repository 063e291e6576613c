//! Where everything lives under the root. No other module builds a path under the
//! root by hand, so the layout on disk and this file cannot drift apart.

use std::path::{Path, PathBuf};

/// Default root when neither `--root` nor `CR0SYNC_ROOT` is given.
pub const DEFAULT_ROOT: &str = "/data/cr0_system";

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Anchors a configured path at the root; absolute paths are returned as they are.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.root.join(path)
        }
    }

    pub fn config_file(&self) -> PathBuf {
        self.root.join("cr0sync.toml")
    }

    pub fn databases_dir(&self) -> PathBuf {
        self.root.join("databases")
    }

    /// Central copy of a configured database.
    pub fn central_db(&self, name: &str) -> PathBuf {
        self.databases_dir().join(format!("{name}.db"))
    }

    pub fn backups_dir(&self, name: &str) -> PathBuf {
        self.root.join("backups").join(name)
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// cr0sync's own log file for a job.
    pub fn job_log(&self, file_name: &str) -> PathBuf {
        self.logs_dir().join(file_name)
    }

    pub fn security_events(&self) -> PathBuf {
        self.logs_dir().join("security").join("events.jsonl")
    }

    pub fn security_archive_dir(&self) -> PathBuf {
        self.logs_dir().join("security").join("archive")
    }

    pub fn integrity_reports_dir(&self) -> PathBuf {
        self.logs_dir().join("integrity")
    }

    pub fn shared_storage(&self) -> PathBuf {
        self.root.join("shared_storage")
    }

    pub fn api_keys(&self) -> PathBuf {
        self.shared_storage().join("api_keys.json")
    }

    pub fn api_sessions(&self) -> PathBuf {
        self.shared_storage().join("api_sessions.json")
    }

    pub fn file_hashes(&self) -> PathBuf {
        self.shared_storage().join("file_hashes.json")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// The HMAC key that signs the integrity baseline (mode 600).
    pub fn integrity_key(&self) -> PathBuf {
        self.state_dir()
            .join(crate::ops::state::names::INTEGRITY_KEY)
    }

    pub fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    pub fn lock_file(&self, job: &str) -> PathBuf {
        self.locks_dir().join(format!("{job}.lock"))
    }

    /// Every directory `init` creates, parents first.
    pub fn directories(&self) -> Vec<PathBuf> {
        let logs = self.logs_dir();
        vec![
            self.root.clone(),
            self.databases_dir(),
            self.root.join("backups"),
            logs.clone(),
            logs.join("security"),
            self.security_archive_dir(),
            self.integrity_reports_dir(),
            logs.join("api"),
            logs.join("file_access"),
            logs.join("website"),
            logs.join("irc_networks"),
            self.shared_storage(),
            self.state_dir(),
            self.locks_dir(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_spec() {
        let l = Layout::new("/data/cr0_system");
        assert_eq!(
            l.central_db("users"),
            Path::new("/data/cr0_system/databases/users.db")
        );
        assert_eq!(
            l.job_log("cron_database_sync.log"),
            Path::new("/data/cr0_system/logs/cron_database_sync.log")
        );
        assert_eq!(
            l.lock_file("logs"),
            Path::new("/data/cr0_system/locks/logs.lock")
        );
        assert_eq!(
            l.resolve(Path::new("logs/irc_networks/rizon")),
            Path::new("/data/cr0_system/logs/irc_networks/rizon")
        );
        assert_eq!(l.resolve(Path::new("/var/www")), Path::new("/var/www"));
    }

    #[test]
    fn directories_start_with_root_and_parents_come_first() {
        let l = Layout::new("/r");
        let dirs = l.directories();
        assert_eq!(dirs[0], Path::new("/r"));
        for (i, d) in dirs.iter().enumerate() {
            if let Some(parent) = d.parent().filter(|p| p.starts_with("/r")) {
                assert!(
                    dirs[..i].iter().any(|x| x == parent),
                    "{} before parent",
                    d.display()
                );
            }
        }
    }
}
