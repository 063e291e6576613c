//! The wire format between cr0sync and `cr0sync serve` on another host.
//!
//! A frame is: the header's length (u32, big-endian), the body's length (u32, big-endian),
//! one flag byte (bit 0: the body is deflate-compressed), the header (JSON, one
//! [`Request`] or [`Response`]) and the body (raw bytes: file contents; empty for most
//! frames). Headers are small; contents travel in bodies, compressed when that makes them
//! smaller, in chunks of at most [`CHUNK`] bytes.
//!
//! The first exchange is [`Request::Hello`] / [`Response::Hello`] with the protocol and
//! program versions; a client refuses a server whose protocol differs, naming both. Every
//! request gets exactly one response, in order; a failure is [`Response::Error`] with one
//! line, and the connection stays usable.
//!
//! Safety across a lost connection: every request either only reads, or is guarded so
//! that repeating it, or never getting its answer, leaves both sides as a stop at that
//! instant would: a write goes to a temporary file that is only renamed into place by
//! [`Request::Place`] after the target is checked under its lock (the check of the local
//! case, made on the remote host), and temporary files of a connection that ends are
//! removed by the server (or, if it is killed, by the next listing).

use std::io::{Read, Write};

use anyhow::{Context as _, Result, bail};
use flate2::Compression;
use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;
use serde::{Deserialize, Serialize};

use crate::files::list::Stat;
use crate::files::store::Seen;
use crate::files::write::Outcome;

/// The protocol this build speaks; a peer speaking another is refused.
pub const PROTOCOL: u32 = 2;
/// The largest body sent in one frame.
pub const CHUNK: usize = 1 << 20;
const MAX_HEADER: u32 = 64 << 20;
const MAX_BODY: u32 = 256 << 20;

/// What the client asks. Paths are absolute paths on the serving host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Hello {
        protocol: u32,
        version: String,
    },
    /// Whether `path` is a directory.
    IsDir {
        path: String,
    },
    /// A file's metadata (`None`: no file).
    Stat {
        path: String,
    },
    /// The regular files of a tree (see `files::list`); stale temporary files are removed.
    List {
        root: String,
        include: Vec<String>,
        exclude: Vec<String>,
    },
    /// A file's metadata and hash, and its bytes (the body) when at most `keep_max`.
    Read {
        path: String,
        keep_max: u64,
        lock_ms: Option<u64>,
    },
    /// Bytes of a file from `offset`, at most `len` (the body; shorter at the end). With
    /// `ino`, only from that inode: a file renamed or replaced since it was listed is an
    /// error, never another file's bytes.
    ReadRange {
        path: String,
        offset: u64,
        len: u64,
        #[serde(default)]
        ino: Option<u64>,
    },
    /// The entries of one directory with their metadata (links followed; for log
    /// sources and their rotations).
    Dir {
        path: String,
    },
    /// One path's metadata (links followed; `None`: nothing there).
    Meta {
        path: String,
    },
    /// Starts a temporary file beside `root/rel` with `mode`; answered with its token.
    Prepare {
        root: String,
        rel: String,
        mode: u32,
    },
    /// Appends the body to a prepared file.
    Append {
        token: u64,
    },
    /// Ends a prepared file: it must hash to `sha256` (else it is dropped and the answer
    /// is `false`); synced when `sync`.
    Seal {
        token: u64,
        sha256: String,
        sync: bool,
    },
    /// Puts a sealed file in place if the target still holds `expect`.
    Place {
        root: String,
        rel: String,
        token: u64,
        expect: Option<Expected>,
        flock: bool,
        batch: bool,
    },
    /// Writes the body (or removes, when `remove`) at `root/rel` if it still holds
    /// `expect`, synced on its own unless `batch`.
    Put {
        root: String,
        rel: String,
        expect: Option<Expected>,
        remove: bool,
        mode: u32,
        flock: bool,
        batch: bool,
    },
    /// Makes everything written under these paths durable (`syncfs`).
    SyncFs {
        paths: Vec<String>,
    },
    /// A database's and its `-wal`'s metadata (the fast path: one round trip).
    DbStat {
        path: String,
    },
    /// A consistent copy of a database (online backup API) kept by the server for this
    /// connection; answered with its size, page size, SHA-256 and page hashes (the body).
    DbSnapshot {
        path: String,
    },
    /// Pages of a kept copy (the body: each `page_size` bytes, in the order asked).
    DbPages {
        token: u64,
        pages: Vec<u64>,
    },
    /// Drops a kept copy.
    DbRelease {
        token: u64,
    },
    /// Writes a peer's change set (the body: a JSON `PeerWriteSet`) in one transaction on
    /// the live database, with the journal's marker; answered with the rows left alone.
    DbApply {
        path: String,
    },
    /// Drops cr0sync's marker table from the live database.
    DbDropMarker {
        path: String,
    },
    /// Adds a column (a migration made elsewhere) to the live database.
    DbAddColumn {
        path: String,
        table: String,
        decl: String,
    },
    Bye,
}

/// A file's identity and size, as the log job compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub is_file: bool,
}

impl Meta {
    pub fn of(m: &std::fs::Metadata) -> Meta {
        use std::os::unix::fs::MetadataExt;
        Meta {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: crate::util::mtime_ns(m),
            is_file: m.is_file(),
        }
    }
}

/// What a target must still hold (see `files::write::Expect`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Expected {
    pub sha256: String,
    pub seen: Option<SeenW>,
}

/// [`Seen`] on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SeenW {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub ino: u64,
}

impl From<Seen> for SeenW {
    fn from(s: Seen) -> Self {
        SeenW {
            size: s.size,
            mtime_ns: s.mtime_ns,
            ctime_ns: s.ctime_ns,
            ino: s.ino,
        }
    }
}

impl From<SeenW> for Seen {
    fn from(s: SeenW) -> Self {
        Seen {
            size: s.size,
            mtime_ns: s.mtime_ns,
            ctime_ns: s.ctime_ns,
            ino: s.ino,
        }
    }
}

/// [`Outcome`] on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeW {
    Done { stat: Option<Stat> },
    Changed,
    SourceChanged,
    Busy,
}

impl From<Outcome> for OutcomeW {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Done(stat) => OutcomeW::Done { stat },
            Outcome::Changed => OutcomeW::Changed,
            Outcome::SourceChanged => OutcomeW::SourceChanged,
            Outcome::Busy => OutcomeW::Busy,
        }
    }
}

impl From<OutcomeW> for Outcome {
    fn from(o: OutcomeW) -> Self {
        match o {
            OutcomeW::Done { stat } => Outcome::Done(stat),
            OutcomeW::Changed => Outcome::Changed,
            OutcomeW::SourceChanged => Outcome::SourceChanged,
            OutcomeW::Busy => Outcome::Busy,
        }
    }
}

/// What the server answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Hello {
        protocol: u32,
        version: String,
    },
    Ok,
    Bool {
        value: bool,
    },
    Stat {
        stat: Option<Stat>,
    },
    Listing {
        files: Vec<(String, Stat)>,
        skipped: Vec<(String, String)>,
        unreadable: Vec<(String, String)>,
    },
    /// A file read (`Read`): the bytes, if kept, are the body.
    Current {
        stat: Option<Stat>,
        sha256: Option<String>,
        kept: bool,
    },
    /// Bytes (`ReadRange`) in the body.
    Bytes,
    Dir {
        entries: Vec<(String, Meta)>,
    },
    Meta {
        meta: Option<Meta>,
    },
    Token {
        token: u64,
    },
    DbStat {
        db: Option<crate::db::sync::FileStat>,
        wal: Option<crate::db::sync::FileStat>,
    },
    DbSnapshot {
        token: u64,
        size: u64,
        page_size: u32,
        sha256: String,
    },
    /// Per table, the keys the peer's own writer changed meanwhile (JSON, in the body).
    DbApplied,
    Outcome {
        outcome: OutcomeW,
    },
    Error {
        message: String,
    },
}

/// Writes one frame; the body is compressed when that makes it smaller.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, header: &T, body: &[u8]) -> Result<()> {
    let head = serde_json::to_vec(header)?;
    let packed;
    let (flags, out): (u8, &[u8]) = if body.len() >= 512 {
        let mut enc = DeflateEncoder::new(Vec::with_capacity(body.len() / 2), Compression::fast());
        enc.write_all(body)?;
        packed = enc.finish()?;
        if packed.len() < body.len() {
            (1, &packed)
        } else {
            (0, body)
        }
    } else {
        (0, body)
    };
    let hl = u32::try_from(head.len()).context("a frame header is too large")?;
    let bl = u32::try_from(out.len()).context("a frame body is too large")?;
    let mut prefix = [0u8; 9];
    prefix[..4].copy_from_slice(&hl.to_be_bytes());
    prefix[4..8].copy_from_slice(&bl.to_be_bytes());
    prefix[8] = flags;
    w.write_all(&prefix)?;
    w.write_all(&head)?;
    w.write_all(out)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame: its header and its (decompressed) body. `None`: the stream ended
/// cleanly before a frame.
pub fn read_frame<R: Read, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<Option<(T, Vec<u8>)>> {
    let mut prefix = [0u8; 9];
    match r.read_exact(&mut prefix[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut prefix[1..])
        .context("the connection ended in the middle of a frame")?;
    let hl = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    let bl = u32::from_be_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
    if hl > MAX_HEADER || bl > MAX_BODY {
        bail!(
            "a frame of {hl} + {bl} bytes is larger than the protocol allows: the other side \
             is not cr0sync serve, or something printed on its output (a login banner?)"
        );
    }
    let mut head = vec![0u8; hl as usize];
    r.read_exact(&mut head)
        .context("the connection ended in the middle of a frame")?;
    let mut body = vec![0u8; bl as usize];
    r.read_exact(&mut body)
        .context("the connection ended in the middle of a frame")?;
    if prefix[8] & 1 != 0 {
        let mut plain = Vec::with_capacity(body.len() * 2);
        DeflateDecoder::new(&body[..])
            .read_to_end(&mut plain)
            .context("a compressed frame body is damaged")?;
        body = plain;
    }
    let header = serde_json::from_slice(&head).context("a frame header is not valid")?;
    Ok(Some((header, body)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn frames_round_trip_with_and_without_compression() {
        let mut buf = Vec::new();
        let big = vec![b'a'; 100_000];
        let random: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        write_frame(&mut buf, &Request::Append { token: 7 }, &big).unwrap();
        write_frame(&mut buf, &Request::Append { token: 8 }, &random).unwrap();
        write_frame(&mut buf, &Request::Bye, &[]).unwrap();
        assert!(buf.len() < 100_000, "the repetitive body is compressed");
        let mut r = &buf[..];
        let (h, b): (Request, Vec<u8>) = read_frame(&mut r).unwrap().unwrap();
        assert!(matches!(h, Request::Append { token: 7 }));
        assert_eq!(b, big);
        let (h, b): (Request, Vec<u8>) = read_frame(&mut r).unwrap().unwrap();
        assert!(matches!(h, Request::Append { token: 8 }));
        assert_eq!(b, random);
        let (h, _): (Request, Vec<u8>) = read_frame(&mut r).unwrap().unwrap();
        assert!(matches!(h, Request::Bye));
        assert!(read_frame::<_, Request>(&mut r).unwrap().is_none());
    }

    #[test]
    fn a_truncated_or_foreign_stream_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Request::Bye, b"xyz").unwrap();
        let cut = &buf[..buf.len() - 1];
        assert!(read_frame::<_, Request>(&mut &cut[..]).is_err());
        let banner = b"Welcome to Ubuntu 24.04 LTS\n";
        assert!(read_frame::<_, Request>(&mut &banner[..]).is_err());
    }
}
