//! Page hashes of an SQLite file, for sending only the pages that differ (as
//! sqlite3_rsync does): the file is cut at the page size its header gives, and each page
//! is hashed (SHA-256, first 16 bytes). Only for files no process writes meanwhile (a
//! snapshot, the kept copy of a remote peer).

use std::io::Read;
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use sha2::{Digest, Sha256};

/// Bytes of one page hash.
pub const HASH: usize = 16;

/// The page size an SQLite header declares.
pub fn page_size(header: &[u8]) -> Result<u32> {
    if header.len() < 100 || !header.starts_with(b"SQLite format 3\0") {
        bail!("not an SQLite database");
    }
    Ok(match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        n if n >= 512 && n.is_power_of_two() => u32::from(n),
        n => bail!("page size {n} in the header is not valid"),
    })
}

/// One page's hash (SHA-256, first [`HASH`] bytes).
pub fn hash(page: &[u8]) -> [u8; HASH] {
    let mut out = [0u8; HASH];
    out.copy_from_slice(&Sha256::digest(page)[..HASH]);
    out
}

/// The page size and the hash of every page of `path` (a missing file: no pages), with the
/// SHA-256 of the whole file.
pub fn hashes(path: &Path, page_size: u32) -> Result<(Vec<u8>, String)> {
    let mut out = Vec::new();
    let mut whole = Sha256::new();
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((out, crate::util::hex(&whole.finalize())));
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut page = vec![0u8; page_size as usize];
    loop {
        let mut got = 0;
        while got < page.len() {
            let n = f.read(&mut page[got..])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            break;
        }
        whole.update(&page[..got]);
        if got < page.len() {
            // A short last page never matches a whole one.
            out.extend_from_slice(&[0u8; HASH]);
            break;
        }
        out.extend_from_slice(&Sha256::digest(&page)[..HASH]);
    }
    Ok((out, crate::util::hex(&whole.finalize())))
}

/// The SQLite header's page size of the file at `path`.
pub fn page_size_of(path: &Path) -> Result<u32> {
    let mut header = [0u8; 100];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .with_context(|| format!("cannot read {}", path.display()))?;
    page_size(&header).with_context(|| path.display().to_string())
}
