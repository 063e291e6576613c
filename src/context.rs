//! The context every command runs in: the root's layout, the parsed configuration, the
//! permissions to apply, the state store, and how long manual commands wait for a lock.
//!
//! Precedence (STYLE 7): flags > environment (`CR0SYNC_ROOT`, `CR0SYNC_CONFIG`, read by
//! clap) > the file > defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::config::Config;
use crate::error::Error;
use crate::fsutil::{self, Perms};
use crate::layout::{DEFAULT_ROOT, Layout};
use crate::ops::lock::JobLock;
use crate::ops::state::StateStore;

#[derive(Debug, Clone)]
pub struct Context {
    pub layout: Layout,
    pub config: Config,
    pub config_path: PathBuf,
    pub perms: Perms,
    pub state: StateStore,
    /// `--wait`: how long a manual command waits for a job lock.
    pub wait: Duration,
}

/// Root and configuration file as given on the command line (or the environment).
#[derive(Debug, Clone, Default)]
pub struct Location {
    pub root: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

impl Location {
    pub fn layout(&self) -> Layout {
        Layout::new(
            self.root
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT)),
        )
    }

    pub fn config_path(&self, layout: &Layout) -> PathBuf {
        self.config.clone().unwrap_or_else(|| layout.config_file())
    }
}

impl Context {
    /// Loads an initialized root. A missing root or configuration says how to create it.
    pub fn load(location: &Location, wait: Duration) -> Result<Context> {
        let layout = location.layout();
        if !layout.root().is_dir() {
            return Err(Error::NotInitialized {
                what: "root directory",
                path: layout.root().to_path_buf(),
                root: Some(layout.root().to_path_buf()),
            }
            .into());
        }
        let config_path = location.config_path(&layout);
        if !config_path.exists() {
            return Err(Error::NotInitialized {
                what: "configuration file",
                path: config_path,
                root: Some(layout.root().to_path_buf()),
            }
            .into());
        }
        let config = Config::load(&config_path, layout.root())?;
        Context::from_config(layout, config, config_path, wait)
    }

    pub fn from_config(
        layout: Layout,
        config: Config,
        config_path: PathBuf,
        wait: Duration,
    ) -> Result<Context> {
        let perms = perms_of(&config, &config_path, layout.root())?;
        fsutil::set_umask(perms.umask());
        let state = StateStore::new(layout.state_dir(), perms);
        Ok(Context {
            layout,
            config,
            config_path,
            perms,
            state,
            wait,
        })
    }

    /// Takes a job's lock for a manual command, waiting up to `--wait`.
    pub fn lock(&self, job: &'static str) -> Result<JobLock> {
        JobLock::acquire(&self.layout, &self.perms, job, self.wait)
    }

    /// A configured path anchored at the root.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.layout.resolve(path)
    }
}

/// Modes and ownership from `[general]`. An unknown user or group is a configuration error.
/// Run as root, what is not configured is taken from the root directory itself, so a
/// command an operator runs as root never leaves files the cron user cannot write.
pub fn perms_of(config: &Config, config_path: &Path, root: &Path) -> Result<Perms> {
    let g = &config.general;
    let owner = match &g.owner {
        Some(name) => Some(fsutil::lookup_user(name).ok_or_else(|| {
            Error::config(config_path, format!("key `owner`: no such user {name:?}"))
        })?),
        None => None,
    };
    let group = match &g.group {
        Some(name) => Some(fsutil::lookup_group(name).ok_or_else(|| {
            Error::config(config_path, format!("key `group`: no such group {name:?}"))
        })?),
        None => None,
    };
    let (owner, group) = if fsutil::running_as_root() {
        use std::os::unix::fs::MetadataExt;
        let of_root = std::fs::metadata(root).ok();
        (
            owner.or_else(|| of_root.as_ref().map(MetadataExt::uid)),
            group.or_else(|| of_root.as_ref().map(MetadataExt::gid)),
        )
    } else {
        (owner, group)
    };
    Ok(Perms {
        dir_mode: g.dir_mode.0,
        file_mode: g.file_mode.0,
        owner,
        group,
    })
}
