//! `cr0sync serve`: the remote end, run by ssh on the host that holds a peer. It reads no
//! configuration, keeps no state and needs no root: it answers [`Request`]s on stdin with
//! [`Response`]s on stdout until the connection ends.
//!
//! Invariants:
//! - With `--allow DIR...`, every path of every request must lie in one of those
//!   directories once symlinks are resolved; anything else is refused with an error frame
//!   (the connection stays up). Without `--allow`, the user's own permissions are the
//!   limit, as with rsync or Unison over ssh.
//! - Writes are those of a local side (`files::write`): a temporary file beside the
//!   target, checked under the target's lock before it is renamed into place. Temporary
//!   files of unfinished writes are removed when the connection ends.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use sha2::{Digest, Sha256};

use crate::config::WriteMode;
use crate::db::pages;
use crate::db::snapshot;
use crate::db::sync::{FileStat, PeerWriteSet, write_peer_tables};
use crate::files::list;
use crate::files::write::{self, Content, Dir, Expect, Prepared};
use crate::fsutil::{self, Perms};
use crate::remote::proto::{self, CHUNK, Expected, PROTOCOL, Request, Response};
use crate::util::hex;

/// How long a write waits for a site's lock on the file.
const BUSY: Duration = Duration::from_secs(10);

/// A temporary file being received.
struct Incoming {
    tmp: fsutil::Scratch,
    file: File,
    hash: Sha256,
    mode: u32,
}

pub struct Server {
    allow: Vec<PathBuf>,
    perms: Perms,
    next: u64,
    incoming: HashMap<u64, Incoming>,
    sealed: HashMap<u64, Prepared>,
    /// Database snapshots kept for this connection: the file and its page size.
    snapshots: HashMap<u64, (fsutil::Scratch, u32)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("allow", &self.allow)
            .finish()
    }
}

impl Server {
    /// A server confined to `allow` (empty: no confinement). An allowed directory that
    /// does not exist is an error.
    pub fn new(allow: &[PathBuf]) -> Result<Server> {
        let allow = allow
            .iter()
            .map(|d| {
                d.canonicalize()
                    .with_context(|| format!("--allow {}: no such directory", d.display()))
            })
            .collect::<Result<_>>()?;
        Ok(Server {
            allow,
            perms: Perms::default(),
            next: 1,
            incoming: HashMap::new(),
            sealed: HashMap::new(),
            snapshots: HashMap::new(),
        })
    }

    /// Answers requests until the input ends or says goodbye.
    pub fn run(&mut self, input: &mut impl Read, output: &mut impl Write) -> Result<()> {
        while let Some((req, body)) = proto::read_frame::<_, Request>(input)? {
            if matches!(req, Request::Bye) {
                proto::write_frame(output, &Response::Ok, &[])?;
                break;
            }
            let (resp, out) = match self.answer(req, body) {
                Ok(r) => r,
                Err(e) => (
                    Response::Error {
                        message: format!("{e:#}"),
                    },
                    Vec::new(),
                ),
            };
            proto::write_frame(output, &resp, &out)?;
        }
        Ok(())
    }

    fn answer(&mut self, req: Request, body: Vec<u8>) -> Result<(Response, Vec<u8>)> {
        let none = Vec::new;
        Ok(match req {
            Request::Hello { .. } => (
                Response::Hello {
                    protocol: PROTOCOL,
                    version: env!("CARGO_PKG_VERSION").into(),
                },
                none(),
            ),
            Request::Bye => (Response::Ok, none()),
            Request::IsDir { path } => {
                let p = self.path(&path)?;
                (Response::Bool { value: p.is_dir() }, none())
            }
            Request::Dir { path } => {
                let p = self.path(&path)?;
                let mut entries = Vec::new();
                let listing = std::fs::read_dir(&p)
                    .with_context(|| format!("cannot list {}", p.display()))?;
                for e in listing.flatten() {
                    let Ok(name) = e.file_name().into_string() else {
                        continue;
                    };
                    if let Ok(m) = std::fs::metadata(e.path()) {
                        entries.push((name, proto::Meta::of(&m)));
                    }
                }
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                (Response::Dir { entries }, none())
            }
            Request::Meta { path } => {
                let p = self.path(&path)?;
                let meta = std::fs::metadata(&p).ok().map(|m| proto::Meta::of(&m));
                (Response::Meta { meta }, none())
            }
            Request::Stat { path } => {
                let p = self.path(&path)?;
                let stat = std::fs::symlink_metadata(&p)
                    .ok()
                    .filter(std::fs::Metadata::is_file)
                    .map(|m| list::Stat::of(&m));
                (Response::Stat { stat }, none())
            }
            Request::List {
                root,
                include,
                exclude,
            } => {
                let root = self.path(&root)?;
                let l = list::list(&root, &include, &exclude)?;
                for rel in &l.stale_temps {
                    // Left by a killed serve: nobody will finish it.
                    let _ = fsutil::remove_if_exists(&root.join(rel));
                }
                (
                    Response::Listing {
                        files: l.files.into_iter().collect(),
                        skipped: l.skipped,
                        unreadable: l.unreadable,
                    },
                    none(),
                )
            }
            Request::Read {
                path,
                keep_max,
                lock_ms,
            } => {
                let p = self.path(&path)?;
                let cur = write::read_current(
                    &p,
                    keep_max.min(CHUNK as u64),
                    lock_ms.map(Duration::from_millis),
                )?;
                let kept = cur.content.is_some();
                (
                    Response::Current {
                        stat: cur.stat,
                        sha256: cur.sha256,
                        kept,
                    },
                    cur.content.unwrap_or_default(),
                )
            }
            Request::ReadRange {
                path,
                offset,
                len,
                ino,
            } => {
                let p = self.path(&path)?;
                let mut f =
                    File::open(&p).with_context(|| format!("cannot read {}", p.display()))?;
                if let Some(ino) = ino
                    && f.metadata()?.ino() != ino
                {
                    bail!(
                        "{} was replaced since it was listed (rotated); the next run reads it \
                         again",
                        p.display()
                    );
                }
                f.seek(SeekFrom::Start(offset))?;
                let mut buf = Vec::new();
                f.take(len.min(CHUNK as u64)).read_to_end(&mut buf)?;
                (Response::Bytes, buf)
            }
            Request::Prepare { root, rel, mode } => {
                let target = self.target(&root, &rel)?;
                if let Some(dir) = target.parent()
                    && !dir.exists()
                {
                    fsutil::ensure_dir(dir, &self.perms)?;
                }
                let tmp = fsutil::temp_beside(&target);
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&tmp)
                    .with_context(|| format!("cannot write {}", tmp.display()))?;
                let token = self.next;
                self.next += 1;
                self.incoming.insert(
                    token,
                    Incoming {
                        tmp,
                        file,
                        hash: Sha256::new(),
                        mode,
                    },
                );
                (Response::Token { token }, none())
            }
            Request::Append { token } => {
                let inc = self
                    .incoming
                    .get_mut(&token)
                    .context("no such write in progress")?;
                inc.file
                    .write_all(&body)
                    .with_context(|| format!("cannot write {}", inc.tmp.display()))?;
                inc.hash.update(&body);
                (Response::Ok, none())
            }
            Request::Seal {
                token,
                sha256,
                sync,
            } => {
                let inc = self
                    .incoming
                    .remove(&token)
                    .context("no such write in progress")?;
                if hex(&inc.hash.finalize()) != sha256 {
                    return Ok((Response::Bool { value: false }, none()));
                }
                if sync {
                    inc.file.sync_all()?;
                }
                std::fs::set_permissions(
                    &*inc.tmp,
                    std::os::unix::fs::PermissionsExt::from_mode(inc.mode),
                )?;
                self.sealed.insert(token, Prepared::from_scratch(inc.tmp));
                (Response::Bool { value: true }, none())
            }
            Request::Place {
                root,
                rel,
                token,
                expect,
                flock,
                batch,
            } => {
                self.target(&root, &rel)?;
                let root = self.path(&root)?;
                let prepared = self.sealed.remove(&token).context("no such sealed write")?;
                let dir = self.dir(&root, flock, batch);
                let outcome = dir.place(relative(&rel)?, expect_of(&expect), prepared)?;
                (
                    Response::Outcome {
                        outcome: outcome.into(),
                    },
                    none(),
                )
            }
            Request::Put {
                root,
                rel,
                expect,
                remove,
                mode,
                flock,
                batch,
            } => {
                self.target(&root, &rel)?;
                let root = self.path(&root)?;
                let dir = self.dir(&root, flock, batch);
                let content = if remove {
                    Content::Absent
                } else {
                    Content::Bytes(&body)
                };
                let outcome = dir.put(relative(&rel)?, expect_of(&expect), content, mode)?;
                (
                    Response::Outcome {
                        outcome: outcome.into(),
                    },
                    none(),
                )
            }
            Request::DbStat { path } => {
                let p = self.path(&path)?;
                let db = FileStat::of(&p);
                let wal = FileStat::of(&crate::util::with_suffix(&p, "-wal"));
                (Response::DbStat { db, wal }, none())
            }
            Request::DbSnapshot { path } => {
                let p = self.path(&path)?;
                let token = self.next;
                self.next += 1;
                let tmp = fsutil::Scratch::new(
                    std::env::temp_dir()
                        .join(format!("cr0sync-serve-{}-{token}.db", std::process::id())),
                );
                remove_dead_snapshots();
                snapshot::snapshot_to(&p, &tmp, BUSY)?;
                let page_size = pages::page_size_of(&tmp)?;
                let (hashes, sha256) = pages::hashes(&tmp, page_size)?;
                // (A test stops the server here: the connection is lost mid-snapshot.)
                crate::ops::fault::point("serve-after-snapshot")?;
                let size = std::fs::metadata(&*tmp)?.len();
                self.snapshots.insert(token, (tmp, page_size));
                (
                    Response::DbSnapshot {
                        token,
                        size,
                        page_size,
                        sha256,
                    },
                    hashes,
                )
            }
            Request::DbPages { token, pages } => {
                let (tmp, page_size) = self.snapshots.get(&token).context("no such snapshot")?;
                let ps = u64::from(*page_size);
                let mut f = File::open(&**tmp)?;
                let mut out = vec![0u8; pages.len() * *page_size as usize];
                for (i, page) in pages.iter().enumerate() {
                    f.seek(SeekFrom::Start(page * ps))?;
                    f.read_exact(&mut out[i * *page_size as usize..(i + 1) * *page_size as usize])?;
                }
                (Response::Bytes, out)
            }
            Request::DbRelease { token } => {
                self.snapshots.remove(&token);
                (Response::Ok, none())
            }
            Request::DbApply { path } => {
                let p = self.path(&path)?;
                let set: PeerWriteSet =
                    serde_json::from_slice(&body).context("a peer's change set is damaged")?;
                let left = write_peer_tables(&p, BUSY, &set).with_context(|| {
                    format!("cannot write {}; nothing was written", p.display())
                })?;
                // (Here: applied, and the answer lost with the connection.)
                crate::ops::fault::point("serve-after-apply")?;
                let left: Vec<Vec<_>> = left.into_iter().map(|k| k.into_iter().collect()).collect();
                (Response::DbApplied, serde_json::to_vec(&left)?)
            }
            Request::DbDropMarker { path } => {
                let p = self.path(&path)?;
                crate::db::journal::drop_marker(&p, BUSY);
                (Response::Ok, none())
            }
            Request::DbAddColumn { path, table, decl } => {
                let p = self.path(&path)?;
                let live = crate::db::apply::open_for_merge(&p, BUSY)?;
                crate::db::migrate::add_column(&live, "main", &table, &decl)?;
                (Response::Ok, none())
            }
            Request::SyncFs { paths } => {
                let paths = paths
                    .iter()
                    .map(|p| self.path(p))
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
                fsutil::sync_filesystems(&refs)?;
                (Response::Ok, none())
            }
        })
    }

    fn dir<'a>(&'a self, root: &'a Path, flock: bool, batch: bool) -> Dir<'a> {
        Dir {
            root,
            mode: if flock {
                WriteMode::Flock
            } else {
                WriteMode::Atomic
            },
            perms: &self.perms,
            busy: BUSY,
            batch,
        }
    }

    /// `root/rel`, checked as a whole: a symlink below `root` must not lead a write out
    /// of the allowed directories.
    fn target(&self, root: &str, rel: &str) -> Result<PathBuf> {
        let rel = relative(rel)?;
        self.path(&format!("{}/{rel}", root.trim_end_matches('/')))
    }

    /// `path` if it is absolute, has no `..`, and lies in an allowed directory (symlinks
    /// resolved as far as the path exists).
    fn path(&self, path: &str) -> Result<PathBuf> {
        let p = Path::new(path);
        if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
            bail!("refused: {path} is not an absolute path without `..`");
        }
        if self.allow.is_empty() {
            return Ok(p.to_path_buf());
        }
        // The nearest existing ancestor, with symlinks resolved, then the rest.
        let mut existing = p.to_path_buf();
        let mut rest = Vec::new();
        while existing.symlink_metadata().is_err() {
            match (existing.file_name(), existing.parent()) {
                (Some(name), Some(parent)) => {
                    rest.push(name.to_os_string());
                    existing = parent.to_path_buf();
                }
                _ => break,
            }
        }
        let mut real = existing.canonicalize().unwrap_or(existing);
        for name in rest.iter().rev() {
            real.push(name);
        }
        if self.allow.iter().any(|a| real.starts_with(a)) {
            Ok(p.to_path_buf())
        } else {
            bail!("refused: {path} is outside the directories this key may use (serve --allow)")
        }
    }
}

fn relative(rel: &str) -> Result<&str> {
    let p = Path::new(rel);
    if p.is_absolute() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        bail!("refused: {rel} is not a plain relative path");
    }
    Ok(rel)
}

fn expect_of(e: &Option<Expected>) -> Option<Expect<'_>> {
    e.as_ref().map(|e| Expect {
        sha256: &e.sha256,
        seen: e.seen.map(Into::into),
    })
}

/// `cr0sync serve`: answers on stdin/stdout.
pub fn serve_stdio(allow: &[PathBuf]) -> Result<()> {
    let mut server = Server::new(allow)?;
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut input = std::io::BufReader::with_capacity(1 << 16, stdin.lock());
    let mut output = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    server.run(&mut input, &mut output)
}

/// Removes the snapshots of servers that were killed (their pid no longer runs): a
/// server removes its own when its connection ends, a killed one cannot.
fn remove_dead_snapshots() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("cr0sync-serve-") else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
