//! A database peer on another host: what the sync asks of `cr0sync serve` there.
//!
//! - The fast path is one round trip (`DbStat`: the database's and its `-wal`'s
//!   metadata).
//! - The snapshot travels as pages: the server takes a consistent copy (online backup
//!   API) and sends its page hashes; only pages that differ from the copy of that peer
//!   kept in `state/` since its last sync are sent, each checked against its hash, and
//!   the kept copy is patched in place. A kept copy torn by a stop, or changed by a sync,
//!   is repaired the same way (its pages differ). The sync then reads the kept copy as a
//!   local peer's snapshot, and the peer's backup is taken from it.
//! - The peer's writes are the local ones (`write_peer_tables`), run by the server in one
//!   transaction on the live file with the journal's marker.

use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};

use crate::db::pages;
use crate::db::value::Key;
use crate::remote::client::Shared;
use crate::remote::proto::{CHUNK, Request, Response};

use super::FileStat;
use super::PeerWriteSet;

/// The peer's host connection and its path there.
pub(crate) struct RemotePeer {
    pub(crate) conn: Shared,
    pub(crate) host: String,
    pub(crate) path: String,
}

impl RemotePeer {
    fn call(&self, req: &Request, body: &[u8]) -> Result<(Response, Vec<u8>)> {
        self.conn
            .lock()
            .map_err(|_| anyhow!("the connection to {} is unusable", self.host))?
            .call(req, body)
    }

    /// `host:path`, as messages name the peer.
    pub(crate) fn label(&self) -> String {
        format!("{}:{}", self.host, self.path)
    }

    /// The database's and its `-wal`'s metadata.
    pub(crate) fn stat(&self) -> Result<(Option<FileStat>, Option<FileStat>)> {
        match self.call(
            &Request::DbStat {
                path: self.path.clone(),
            },
            &[],
        )? {
            (Response::DbStat { db, wal }, _) => Ok((db, wal)),
            (r, _) => bail!("{}: unexpected answer {r:?}", self.host),
        }
    }

    /// Makes `kept` a copy of a consistent snapshot of the peer, moving only the pages
    /// that differ. Returns (pages moved, pages in all).
    pub(crate) fn fetch(&self, kept: &Path) -> Result<(usize, usize)> {
        let (token, size, page_size, sha256, theirs) = match self.call(
            &Request::DbSnapshot {
                path: self.path.clone(),
            },
            &[],
        )? {
            (
                Response::DbSnapshot {
                    token,
                    size,
                    page_size,
                    sha256,
                },
                body,
            ) => (token, size, page_size, sha256, body),
            (r, _) => bail!("{}: unexpected answer {r:?}", self.host),
        };
        // `sha256` (the whole snapshot's) is not needed: every page is checked by its hash.
        let _ = sha256;
        let result = self.patch(kept, token, size, page_size, &theirs);
        // The server drops its copy at the end of the connection anyway.
        let _ = self.call(&Request::DbRelease { token }, &[]);
        result
    }

    fn patch(
        &self,
        kept: &Path,
        token: u64,
        size: u64,
        page_size: u32,
        theirs: &[u8],
    ) -> Result<(usize, usize)> {
        let ps = u64::from(page_size);
        let total = theirs.len() / pages::HASH;
        let (ours, _) = pages::hashes(kept, page_size)?;
        let need: Vec<u64> = (0..total)
            .filter(|&i| {
                let range = i * pages::HASH..(i + 1) * pages::HASH;
                ours.get(range.clone()) != theirs.get(range)
            })
            .map(|i| i as u64)
            .collect();
        if let Some(dir) = kept.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(kept)
            .with_context(|| format!("cannot write {}", kept.display()))?;
        let per_call = (CHUNK / page_size as usize).max(1);
        for batch in need.chunks(per_call) {
            let req = Request::DbPages {
                token,
                pages: batch.to_vec(),
            };
            let body = match self.call(&req, &[])? {
                (Response::Bytes, body) => body,
                (r, _) => bail!("{}: unexpected answer {r:?}", self.host),
            };
            if body.len() != batch.len() * page_size as usize {
                bail!("{}: a page transfer came back short", self.host);
            }
            for (page, bytes) in batch.iter().zip(body.chunks(page_size as usize)) {
                // Each page checked against its hash: with the pages that already matched,
                // the kept copy is then the snapshot, page for page.
                let i = usize::try_from(*page).unwrap_or(usize::MAX);
                let want = theirs.get(i * pages::HASH..(i + 1) * pages::HASH);
                if want != Some(&pages::hash(bytes)[..]) {
                    bail!(
                        "page {page} of {} arrived damaged; nothing was synced. Try: the next \
                         run transfers it again",
                        self.label()
                    );
                }
                f.seek(SeekFrom::Start(page * ps))?;
                f.write_all(bytes)?;
            }
        }
        f.set_len(size)?;
        f.sync_all()?;
        drop(f);
        log::info!(
            "{}: {} of {} pages transferred ({} KiB)",
            self.label(),
            need.len(),
            total,
            need.len() as u64 * ps / 1024
        );
        Ok((need.len(), total))
    }

    /// Runs the peer's transaction on the peer's host.
    pub(crate) fn apply(&self, set: &PeerWriteSet) -> Result<Vec<BTreeSet<Key>>> {
        let body = serde_json::to_vec(set)?;
        match self.call(
            &Request::DbApply {
                path: self.path.clone(),
            },
            &body,
        )? {
            (Response::DbApplied, body) => {
                let left: Vec<Vec<Key>> = serde_json::from_slice(&body)
                    .context("the answer to a peer's transaction is damaged")?;
                Ok(left.into_iter().map(|k| k.into_iter().collect()).collect())
            }
            (r, _) => bail!("{}: unexpected answer {r:?}", self.host),
        }
    }

    /// Drops the journal's marker table on the peer (a failure is logged: the next run
    /// drops it).
    pub(crate) fn drop_marker(&self) {
        if let Err(e) = self.call(
            &Request::DbDropMarker {
                path: self.path.clone(),
            },
            &[],
        ) {
            log::warn!(
                "{}: cannot drop cr0sync's marker table ({e:#}); the next run drops it",
                self.label()
            );
        }
    }

    /// Adds a column to the peer's live database.
    pub(crate) fn add_column(&self, table: &str, decl: &str) -> Result<()> {
        let req = Request::DbAddColumn {
            path: self.path.clone(),
            table: table.into(),
            decl: decl.into(),
        };
        self.call(&req, &[]).map(|_| ())
    }
}
