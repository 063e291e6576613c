//! Where a stream's source files are read: a local directory, or a directory on another
//! host through `cr0sync serve` (`from = "ssh://host/var/log/bot"`). The stream code
//! ([`crate::logs::stream`]) is written once, over [`SourceFs`].
//!
//! Invariants:
//! - A file is read from the inode it was listed with: on another host every read names
//!   that inode, and a file rotated away meanwhile is an error for this run (the next run
//!   finds it among the rotations), never another file's bytes.
//! - On another host a directory is listed once per run (one round trip); the stream
//!   code sees the files as they were at that instant, which is what a local run that
//!   stats each file a moment apart also tolerates: bytes appended later wait for the next
//!   run.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::remote::client::{Conn, RemoteFile, call_on};
pub use crate::remote::proto::Meta;
use crate::remote::proto::{Request, Response};

/// Reading a stream's source directory.
pub trait SourceFs {
    type File: Read + Seek;
    /// A path's metadata, links followed.
    fn metadata(&self, path: &Path) -> io::Result<Meta>;
    /// Opens a file for reading, with its metadata.
    fn open(&self, path: &Path) -> io::Result<(Self::File, Meta)>;
    /// The entries of a directory with their metadata (links followed), by name.
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<(String, Meta)>>;
}

/// Source files on this host.
pub struct Local;

impl SourceFs for Local {
    type File = File;

    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        std::fs::metadata(path).map(|m| Meta::of(&m))
    }

    fn open(&self, path: &Path) -> io::Result<(File, Meta)> {
        let f = File::open(path)?;
        let m = Meta::of(&f.metadata()?);
        Ok((f, m))
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<(String, Meta)>> {
        let mut out: Vec<(String, Meta)> = std::fs::read_dir(dir)?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let m = std::fs::metadata(e.path()).ok()?;
                Some((name, Meta::of(&m)))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// Source files on another host, over a connection of this run.
pub struct Remote<'a> {
    conn: &'a Mutex<Conn>,
    /// Directory listings of this run, by directory.
    dirs: RefCell<HashMap<PathBuf, Vec<(String, Meta)>>>,
}

impl<'a> Remote<'a> {
    pub fn new(conn: &'a Mutex<Conn>) -> Remote<'a> {
        Remote {
            conn,
            dirs: RefCell::new(HashMap::new()),
        }
    }

    fn call(&self, req: &Request) -> io::Result<Response> {
        call_on(self.conn, req, &[])
            .map(|(r, _)| r)
            .map_err(|e| io::Error::other(format!("{e:#}")))
    }
}

impl<'a> SourceFs for Remote<'a> {
    type File = RemoteFile<'a>;

    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no file name"));
        };
        let name = name.to_string_lossy();
        self.read_dir(dir)?
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, m)| m)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "No such file or directory"))
    }

    fn open(&self, path: &Path) -> io::Result<(RemoteFile<'a>, Meta)> {
        let meta = self.metadata(path)?;
        let file = RemoteFile::new(
            self.conn,
            path.to_string_lossy().into_owned(),
            Some(meta.ino),
        );
        Ok((file, meta))
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<(String, Meta)>> {
        if let Some(entries) = self.dirs.borrow().get(dir) {
            return Ok(entries.clone());
        }
        let req = Request::Dir {
            path: dir.to_string_lossy().into_owned(),
        };
        match self.call(&req)? {
            Response::Dir { entries } => {
                self.dirs
                    .borrow_mut()
                    .insert(dir.to_path_buf(), entries.clone());
                Ok(entries)
            }
            r => Err(io::Error::other(format!(
                "cr0sync serve answered out of turn ({r:?})"
            ))),
        }
    }
}
