//! The fast path: what a pair's files and configuration looked like at its last successful
//! sync, and whether they still do.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{DbConfig, PeerConfig};
use crate::db::merge::Rules;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileStat {
    pub(crate) fn of(path: &Path) -> Option<FileStat> {
        let m = std::fs::metadata(path).ok()?;
        Some(FileStat {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: crate::util::mtime_ns(&m),
        })
    }
}

/// What the fast path compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Digest of the pair's configuration: a changed policy or table list re-merges.
    pub config: String,
    pub central: Option<FileStat>,
    pub central_wal: Option<FileStat>,
    pub peer: Option<FileStat>,
    pub peer_wal: Option<FileStat>,
    /// A file was modified within the filesystem's timestamp resolution of being looked
    /// at, so an equal fingerprint would not prove it unchanged: never fast-path it.
    pub racy: bool,
}

pub(crate) fn wal(path: &Path) -> PathBuf {
    crate::util::with_suffix(path, "-wal")
}

pub(super) fn config_digest(db: &DbConfig, peer: &PeerConfig, rules: Rules) -> String {
    let text = format!(
        "{:?}|{:?}|{}|{:?}|{:?}|{}",
        rules.policy,
        rules.direction,
        db.updated_at,
        db.counters,
        db.exclude_tables,
        peer.path.get_ref().display()
    );
    let digest = Sha256::digest(text.as_bytes());
    crate::util::hex(&digest[..12])
}

/// Racy when modified less than two seconds before `now` (coarse filesystem clocks).
pub(super) fn racy(stats: &[Option<FileStat>], now: std::time::SystemTime) -> bool {
    let now_ns = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    stats
        .iter()
        .flatten()
        .any(|s| now_ns - s.mtime_ns < 2_000_000_000)
}

/// The pair's files and configuration as a sync first looks at them (step 1).
pub(super) struct Look {
    digest: String,
    seen_at: std::time::SystemTime,
    peer: (Option<FileStat>, Option<FileStat>),
    central: (Option<FileStat>, Option<FileStat>),
}

impl Look {
    pub(super) fn now(
        db: &DbConfig,
        peer_cfg: &PeerConfig,
        rules: Rules,
        central_path: &Path,
        peer: (Option<FileStat>, Option<FileStat>),
    ) -> Look {
        Look {
            digest: config_digest(db, peer_cfg, rules),
            seen_at: std::time::SystemTime::now(),
            peer,
            central: (FileStat::of(central_path), FileStat::of(&wal(central_path))),
        }
    }

    /// Whether the last successful sync's fingerprint proves nothing changed since.
    pub(super) fn matches(&self, f: &Fingerprint) -> bool {
        !f.racy
            && f.config == self.digest
            && (f.peer, f.peer_wal) == self.peer
            && (f.central, f.central_wal) == self.central
    }

    /// The fingerprint to record after a sync: the peer as it was looked at (a change
    /// made during the sync is seen next run), the central copy as the sync left it.
    pub(super) fn fingerprint(self, central_path: &Path, deferred: bool) -> Fingerprint {
        Fingerprint {
            racy: racy(&[self.peer.0, self.peer.1], self.seen_at) || deferred,
            config: self.digest,
            central: FileStat::of(central_path),
            central_wal: FileStat::of(&wal(central_path)),
            peer: self.peer.0,
            peer_wal: self.peer.1,
        }
    }
}
