//! The state store: cr0sync's private files under `state/`.
//!
//! Invariants:
//! - Every state file is written through [`StateStore::save`] or
//!   [`StateStore::replace_with`], both ending in [`crate::fsutil`]'s temp-file, fsync,
//!   rename, fsync-directory sequence: a reader sees the old state or the new one.
//! - State is recorded only after the data it describes is durable; callers keep that order.
//! - A state file that cannot be parsed is an error naming it, never silently reset.
//! - Every name under `state/` comes from [`names`]: one list of what the directory holds
//!   and how each file is written.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::io_text;
use crate::fsutil::{self, Perms};

/// Every file under `state/`, relative to it. Written with [`StateStore::save`] or
/// [`StateStore::replace_with`] (atomic replace) unless the entry says otherwise.
pub mod names {
    /// The record of a job's last completed run.
    pub fn run_record(job: &str) -> String {
        format!("runs/{job}.json")
    }

    /// The last time a cron run of the job was skipped (its lock was held).
    pub fn skip_record(job: &str) -> String {
        format!("runs/{job}.skipped.json")
    }

    /// When each periodic task of a job last ran and last succeeded.
    pub fn schedule(job: &str) -> String {
        format!("schedule/{job}.json")
    }

    /// The database job's record of one (database, peer) pair: fingerprints, last report.
    pub fn db_pair(database: &str, peer: &str) -> String {
        format!("db/{database}/{peer}.json")
    }

    /// The three-way merge base of a pair: an SQLite file changed in its own transactions
    /// (replaced atomically only when it is rebuilt whole).
    pub fn db_base(database: &str, peer: &str) -> String {
        format!("db/{database}/{peer}.base.db")
    }

    /// A local peer's snapshot, kept between syncs so the next one rewrites only the
    /// blocks that changed (a cache: every byte is compared again each time).
    pub fn db_snapshot(database: &str, peer: &str) -> String {
        format!("db/{database}/{peer}.snapshot.db")
    }

    /// What a database sync is about to write to the peer, durable before the peer is touched.
    pub fn db_journal(database: &str, peer: &str) -> String {
        format!("db/{database}/{peer}.journal.json")
    }

    /// Database conflicts as they are recorded: appended durably, one JSON line each.
    pub const DB_CONFLICTS: &str = "conflicts.jsonl";

    /// Closing lines of reviewed conflicts: appended durably, one JSON line each.
    pub const DB_CONFLICTS_CLOSED: &str = "conflicts-closed.jsonl";

    /// Scratch files of the database job (restores, checks); removed after use.
    pub const TMP_DIR: &str = "tmp";

    /// A log stream's checkpoints: how far each source has been copied.
    pub fn log_stream(stream: &str) -> String {
        format!("logs/{stream}.json")
    }

    /// The integrity check's hash cache (size, mtime, inode, hash per path).
    pub const INTEGRITY_CACHE: &str = "security/integrity-cache.json";

    /// Integrity findings already reported as events (each is reported once).
    pub const INTEGRITY_REPORTED: &str = "security/integrity-reported.json";

    /// When the integrity check last ran and what it found.
    pub const INTEGRITY_LAST_CHECK: &str = "security/integrity-last-check.json";

    /// The HMAC key that signs the integrity baseline (mode 600; written once by `init`).
    pub const INTEGRITY_KEY: &str = "integrity.key";

    /// What an event archiving run is about to append to the monthly archives (their
    /// lengths before), so an interrupted run is undone before it is done again.
    pub const EVENT_ARCHIVE_JOURNAL: &str = "security/archive-journal.json";

    /// A tree's state: base, contents, journal and conflict outbox of every pair (an
    /// SQLite database changed in transactions).
    pub fn files_state(tree: &str) -> String {
        format!("files/{tree}.db")
    }

    /// The last sync of a (tree, peer) pair.
    pub fn files_pair(tree: &str, peer: &str) -> String {
        format!("files/{tree}/{peer}.json")
    }

    /// The losing content of a `file` conflict, kept until the conflict is resolved.
    pub fn files_lost(tree: &str, id: &str) -> String {
        format!("files/{tree}/lost/{id}")
    }

    /// The copy of a database peer on another host, kept since its last sync (only the
    /// pages that differ from it travel).
    pub fn remote_db_copy(db: &str, peer: &str) -> String {
        format!("remote/db/{db}/{peer}.db")
    }

    /// Each remote host a job used: whether it was reachable at its last run.
    pub const REMOTE_HOSTS: &str = "remote/hosts.json";

    /// The copy of the sessions file a cleanup rewrites from, kept until the rewrite is
    /// installed.
    pub const SESSIONS_COPY: &str = "sessions/api_sessions.json.copy";
}

#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
    perms: Perms,
}

impl StateStore {
    pub fn new(dir: PathBuf, perms: Perms) -> Self {
        StateStore { dir, perms }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a state file; `name` may contain `/` for a subdirectory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Reads a JSON state file; `Ok(None)` if it does not exist yet.
    pub fn load<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let path = self.path(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => anyhow::bail!(
                "cannot read state file: {}: {}",
                path.display(),
                io_text(&e)
            ),
        };
        let value = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "state file is damaged: {}. Try: move it aside; cr0sync rebuilds it on the next run",
                path.display()
            )
        })?;
        Ok(Some(value))
    }

    /// Writes a JSON state file atomically and durably.
    pub fn save<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(value)?;
        bytes.push(b'\n');
        self.write_bytes(name, &bytes)
    }

    pub fn write_bytes(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(name);
        self.ensure_parent(&path)?;
        fsutil::atomic_write(&path, bytes, self.perms.file_mode, &self.perms)
            .with_context(|| format!("cannot write state file: {}", path.display()))
    }

    /// Builds a state file of any format: `build` writes the complete file at the temporary
    /// path it is given; it is then synced and renamed over `name`.
    pub fn replace_with(&self, name: &str, build: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let path = self.path(name);
        self.ensure_parent(&path)?;
        fsutil::atomic_replace_with(&path, &self.perms, build)
            .with_context(|| format!("cannot write state file: {}", path.display()))
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(fsutil::fsync_dir(path.parent().unwrap_or(&self.dir))?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }

    fn ensure_parent(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            fsutil::ensure_dir(parent, &self.perms)
                .with_context(|| format!("cannot create directory {}", parent.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn save_then_load_roundtrips_in_subdirectories() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state"), Perms::default());
        let mut v = BTreeMap::new();
        v.insert("a".to_string(), 1);
        store.save("runs/database.json", &v).unwrap();
        let back: BTreeMap<String, i32> = store.load("runs/database.json").unwrap().unwrap();
        assert_eq!(back, v);
        assert!(
            store
                .load::<BTreeMap<String, i32>>("missing.json")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn damaged_state_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().to_path_buf(), Perms::default());
        std::fs::write(store.path("x.json"), b"{not json").unwrap();
        let err = store.load::<serde_json::Value>("x.json").unwrap_err();
        assert!(format!("{err:#}").contains("x.json"));
    }

    #[test]
    fn replace_with_installs_what_build_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().to_path_buf(), Perms::default());
        store
            .replace_with("base.bin", |tmp| Ok(std::fs::write(tmp, b"abc")?))
            .unwrap();
        assert_eq!(std::fs::read(store.path("base.bin")).unwrap(), b"abc");
        // A failing build leaves the old file and no temporary behind.
        let err = store.replace_with("base.bin", |_| anyhow::bail!("nope"));
        assert!(err.is_err());
        assert_eq!(std::fs::read(store.path("base.bin")).unwrap(), b"abc");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
