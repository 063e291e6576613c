//! The state store: cr0sync's private files under `state/`.
//!
//! Invariants:
//! - Every state file is written through [`StateStore::save`] or
//!   [`StateStore::replace_with`], both ending in [`crate::fsutil`]'s temp-file, fsync,
//!   rename, fsync-directory sequence: a reader sees the old state or the new one.
//! - State is recorded only after the data it describes is durable; callers keep that order.
//! - A state file that cannot be parsed is an error naming it, never silently reset.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::io_text;
use crate::fsutil::{self, Perms};

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
