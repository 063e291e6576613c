//! Creating the central store: the directory layout, the commented default
//! configuration and the integrity HMAC key.
//!
//! Invariants: idempotent — an existing file is never overwritten and an existing
//! directory never re-moded; what is created gets the configured modes (secrets 600) and,
//! as root, the configured owner and group.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context as _, Result};

use crate::config::{Config, TEMPLATE};
use crate::context::{Location, perms_of};
use crate::error::io_text;
use crate::fsutil::{self, SECRET_MODE};

/// What `init` created; empty on a second run.
#[derive(Debug, Default)]
pub struct Created {
    pub paths: Vec<PathBuf>,
}

pub fn init(location: &Location) -> Result<Created> {
    let layout = location.layout();
    let config_path = location.config_path(&layout);
    // An existing configuration decides the modes; otherwise the defaults do.
    let perms = if config_path.exists() {
        perms_of(
            &Config::load(&config_path, layout.root())?,
            &config_path,
            layout.root(),
        )?
    } else {
        perms_of(&Config::default(), &config_path, layout.root())?
    };
    fsutil::set_umask(perms.umask());
    let mut created = Created::default();
    for dir in layout.directories() {
        let made = fsutil::ensure_dir(&dir, &perms).map_err(|e| {
            anyhow::anyhow!(
                "cannot create directory {}: {}. Try: create it as a user allowed to, or choose \
                 another --root",
                dir.display(),
                io_text(&e)
            )
        })?;
        if made {
            created.paths.push(dir);
        }
    }
    if let Some(dir) = config_path.parent() {
        fsutil::ensure_dir(dir, &perms)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    if fsutil::create_new(&config_path, TEMPLATE.as_bytes(), perms.file_mode, &perms)
        .with_context(|| format!("cannot write {}", config_path.display()))?
    {
        created.paths.push(config_path);
    }
    let key_path = layout.integrity_key();
    if !key_path.exists() {
        let key = random_hex(32).context("cannot read /dev/urandom for the integrity key")?;
        if fsutil::create_new(&key_path, key.as_bytes(), SECRET_MODE, &perms)
            .with_context(|| format!("cannot write {}", key_path.display()))?
        {
            created.paths.push(key_path);
        }
    }
    Ok(created)
}

/// `n` random bytes from the kernel, hex-encoded.
fn random_hex(n: usize) -> std::io::Result<String> {
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(crate::util::hex(&bytes))
}
