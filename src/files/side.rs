//! One side of a pair as the sync sees it: a local directory ([`Dir`]), or a directory on
//! another host served by `cr0sync serve` over ssh. Every operation has the same meaning
//! on both: the remote end runs the local code (`files::write`, `files::list`) there.

use std::cell::RefCell;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context as _, Result, anyhow, bail};

use crate::files::list::{Listing, Stat};
use crate::files::write::{self, Content, Current, Dir, Expect, Outcome, Prepared};
use crate::fsutil;
use crate::remote::client::{Conn, RemoteFile, call_on as call};
use crate::remote::proto::{CHUNK, Expected, Request, Response};

/// A side's directory.
#[derive(Debug, Clone, Copy)]
pub enum Tree<'a> {
    Local(Dir<'a>),
    Remote {
        conn: &'a Mutex<Conn>,
        /// The absolute path on that host.
        root: &'a str,
        flock: bool,
        /// As [`Dir::batch`].
        batch: bool,
    },
}

/// What a write puts in place.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    Bytes(&'a [u8]),
    /// A copy of the other side's file, which must still hash to `sha256`.
    Copy {
        from: Tree<'a>,
        rel: &'a str,
        sha256: &'a str,
    },
    Absent,
}

/// A content written ahead to a temporary file beside its target.
#[derive(Debug)]
pub enum Staged {
    Local(Prepared),
    Remote(u64),
}

fn unexpected(r: &Response) -> anyhow::Error {
    anyhow!("cr0sync serve answered out of turn ({r:?})")
}

fn expected(e: Option<Expect>) -> Option<Expected> {
    e.map(|e| Expected {
        sha256: e.sha256.to_string(),
        seen: e.seen.map(Into::into),
    })
}

/// The source of a copy that is no longer there: reading it is `NotFound`, which a write
/// takes as a source that changed (nothing is written).
struct Gone;

impl Read for Gone {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::NotFound.into())
    }
}

impl<'a> Tree<'a> {
    fn remote_path(root: &str, rel: &str) -> String {
        if rel.is_empty() {
            root.to_string()
        } else {
            format!("{}/{rel}", root.trim_end_matches('/'))
        }
    }

    /// How people see a path of this side (`/dir/file`, `host:/dir/file`).
    pub fn label(&self, rel: &str) -> String {
        match self {
            Tree::Local(d) => d.path(rel).display().to_string(),
            Tree::Remote { conn, root, .. } => {
                let host = conn
                    .lock()
                    .map(|c| c.host().to_string())
                    .unwrap_or_default();
                format!("{host}:{}", Self::remote_path(root, rel))
            }
        }
    }

    pub fn is_dir(&self) -> Result<bool> {
        match self {
            Tree::Local(d) => Ok(d.root.is_dir()),
            Tree::Remote { conn, root, .. } => {
                match call(
                    conn,
                    &Request::IsDir {
                        path: root.to_string(),
                    },
                    &[],
                )? {
                    (Response::Bool { value }, _) => Ok(value),
                    (r, _) => Err(unexpected(&r)),
                }
            }
        }
    }

    pub fn list(&self, include: &[String], exclude: &[String]) -> Result<Listing> {
        match self {
            Tree::Local(d) => crate::files::list::list(d.root, include, exclude),
            Tree::Remote { conn, root, .. } => {
                let req = Request::List {
                    root: root.to_string(),
                    include: include.to_vec(),
                    exclude: exclude.to_vec(),
                };
                match call(conn, &req, &[])? {
                    (
                        Response::Listing {
                            files,
                            skipped,
                            unreadable,
                        },
                        _,
                    ) => Ok(Listing {
                        files: files.into_iter().collect(),
                        skipped,
                        unreadable,
                        // Removed by the server as it lists.
                        stale_temps: Vec::new(),
                    }),
                    (r, _) => Err(unexpected(&r)),
                }
            }
        }
    }

    pub fn read_current(
        &self,
        rel: &str,
        keep_max: u64,
        lock: Option<std::time::Duration>,
    ) -> Result<Current> {
        match self {
            Tree::Local(d) => write::read_current(&d.path(rel), keep_max, lock),
            Tree::Remote { conn, root, .. } => {
                let req = Request::Read {
                    path: Self::remote_path(root, rel),
                    keep_max,
                    lock_ms: lock.map(|l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX)),
                };
                match call(conn, &req, &[])? {
                    (Response::Current { stat, sha256, kept }, body) => Ok(Current {
                        stat,
                        sha256,
                        content: kept.then_some(body),
                    }),
                    (r, _) => Err(unexpected(&r)),
                }
            }
        }
    }

    pub fn stat(&self, rel: &str) -> Option<Stat> {
        match self {
            Tree::Local(d) => std::fs::metadata(d.path(rel)).ok().map(|m| Stat::of(&m)),
            Tree::Remote { conn, root, .. } => {
                let req = Request::Stat {
                    path: Self::remote_path(root, rel),
                };
                match call(conn, &req, &[]) {
                    Ok((Response::Stat { stat }, _)) => stat,
                    _ => None,
                }
            }
        }
    }

    /// Calls `f` with `source` as local content (a file on another host is streamed).
    fn with_content<T>(source: Source, f: impl FnOnce(Content) -> Result<T>) -> Result<T> {
        match source {
            Source::Bytes(b) => f(Content::Bytes(b)),
            Source::Absent => f(Content::Absent),
            Source::Copy {
                from: Tree::Local(d),
                rel,
                sha256,
            } => f(Content::File {
                path: &d.path(rel),
                sha256,
            }),
            Source::Copy {
                from: from @ Tree::Remote { conn, root, .. },
                rel,
                sha256,
            } => {
                let Some(stat) = from.stat(rel) else {
                    // Gone since the decision: the write sees a source that changed.
                    let gone = RefCell::new(Gone);
                    return f(Content::Stream {
                        src: &gone,
                        size: 0,
                        sha256,
                    });
                };
                let reader =
                    RefCell::new(RemoteFile::new(conn, Self::remote_path(root, rel), None));
                f(Content::Stream {
                    src: &reader,
                    size: stat.size,
                    sha256,
                })
            }
        }
    }

    /// Sends `source` (bytes, or a local file) into a new temporary file on the remote
    /// host. `None`: a copied file no longer hashes to what was expected.
    fn upload(
        conn: &Mutex<Conn>,
        root: &str,
        rel: &str,
        source: Source,
        mode: u32,
        sync: bool,
    ) -> Result<Option<u64>> {
        let req = Request::Prepare {
            root: root.to_string(),
            rel: rel.to_string(),
            mode,
        };
        let token = match call(conn, &req, &[])? {
            (Response::Token { token }, _) => token,
            (r, _) => return Err(unexpected(&r)),
        };
        let send = |chunk: &[u8]| -> Result<()> {
            call(conn, &Request::Append { token }, chunk).map(|_| ())
        };
        let sha256 = match source {
            Source::Bytes(b) => {
                for chunk in b.chunks(CHUNK) {
                    send(chunk)?;
                }
                write::sha256(b)
            }
            Source::Copy {
                from: Tree::Local(d),
                rel: src_rel,
                sha256,
            } => {
                let path = d.path(src_rel);
                // Gone: nothing is placed; the server drops the temporary file with the
                // connection.
                let Some(mut f) = write::open_source(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?
                else {
                    return Ok(None);
                };
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    send(&buf[..n])?;
                }
                sha256.to_string()
            }
            Source::Copy { .. } => bail!("a copy between two remote hosts is not supported"),
            Source::Absent => bail!("nothing to upload"),
        };
        let seal = Request::Seal {
            token,
            sha256,
            sync,
        };
        match call(conn, &seal, &[])? {
            (Response::Bool { value: true }, _) => Ok(Some(token)),
            (Response::Bool { value: false }, _) => Ok(None),
            (r, _) => Err(unexpected(&r)),
        }
    }

    /// As [`Dir::put`].
    pub fn put(
        &self,
        rel: &str,
        expect: Option<Expect>,
        source: Source,
        mode: u32,
    ) -> Result<Outcome> {
        match *self {
            Tree::Local(d) => Self::with_content(source, |c| d.put(rel, expect, c, mode)),
            Tree::Remote {
                conn,
                root,
                flock,
                batch,
            } => {
                let small = match source {
                    Source::Bytes(b) if b.len() <= CHUNK => Some(b.to_vec()),
                    Source::Copy {
                        from: Tree::Local(d),
                        rel: src_rel,
                        sha256,
                    } if flock => {
                        let bytes = std::fs::read(d.path(src_rel))?;
                        if write::sha256(&bytes) != sha256 {
                            return Ok(Outcome::SourceChanged);
                        }
                        Some(bytes)
                    }
                    Source::Absent => Some(Vec::new()),
                    _ => None,
                };
                match small {
                    Some(body) => {
                        let req = Request::Put {
                            root: root.to_string(),
                            rel: rel.to_string(),
                            expect: expected(expect),
                            remove: matches!(source, Source::Absent),
                            mode,
                            flock,
                            batch,
                        };
                        match call(conn, &req, &body)? {
                            (Response::Outcome { outcome }, _) => Ok(outcome.into()),
                            (r, _) => Err(unexpected(&r)),
                        }
                    }
                    None => match Self::upload(conn, root, rel, source, mode, true)? {
                        Some(token) => self.place(rel, expect, Staged::Remote(token)),
                        None => Ok(Outcome::SourceChanged),
                    },
                }
            }
        }
    }

    /// As [`Dir::prepare`] (not synced: see [`Tree::sync`]).
    pub fn prepare(&self, rel: &str, source: Source, mode: u32) -> Result<Option<Staged>> {
        match *self {
            Tree::Local(d) => {
                Ok(Self::with_content(source, |c| d.prepare(rel, c, mode))?.map(Staged::Local))
            }
            Tree::Remote { conn, root, .. } => {
                Ok(Self::upload(conn, root, rel, source, mode, false)?.map(Staged::Remote))
            }
        }
    }

    /// As [`Dir::place`].
    pub fn place(&self, rel: &str, expect: Option<Expect>, staged: Staged) -> Result<Outcome> {
        match (*self, staged) {
            (Tree::Local(d), Staged::Local(p)) => d.place(rel, expect, p),
            (
                Tree::Remote {
                    conn,
                    root,
                    flock,
                    batch,
                },
                Staged::Remote(token),
            ) => {
                let req = Request::Place {
                    root: root.to_string(),
                    rel: rel.to_string(),
                    token,
                    expect: expected(expect),
                    flock,
                    batch,
                };
                match call(conn, &req, &[])? {
                    (Response::Outcome { outcome }, _) => Ok(outcome.into()),
                    (r, _) => Err(unexpected(&r)),
                }
            }
            _ => bail!("a write prepared on one side was placed on the other"),
        }
    }

    /// Makes what was written on this side durable (one `syncfs` of its filesystem).
    pub fn sync(&self) -> Result<()> {
        match self {
            Tree::Local(d) => fsutil::sync_filesystems(&[d.root])
                .with_context(|| format!("cannot sync {}", d.root.display())),
            Tree::Remote { conn, root, .. } => call(
                conn,
                &Request::SyncFs {
                    paths: vec![root.to_string()],
                },
                &[],
            )
            .map(|_| ()),
        }
    }

    /// Copies this side's file `rel` into the local file `dest`.
    pub fn copy_to_local(&self, rel: &str, dest: &Path) -> Result<()> {
        match self {
            Tree::Local(d) => {
                std::fs::copy(d.path(rel), dest)?;
                Ok(())
            }
            Tree::Remote { conn, root, .. } => {
                let mut reader = RemoteFile::new(conn, Self::remote_path(root, rel), None);
                let mut out = std::fs::File::create(dest)?;
                std::io::copy(&mut reader, &mut out)?;
                Ok(())
            }
        }
    }
}
