//! Rotation of central logs and cleanup of old rotations.
//!
//! Invariants:
//! - `name.log` is renamed to `name.log.1` before anything is compressed, so a byte
//!   appended to `name.log` is either in the renamed file or in a new `name.log`. The
//!   compressed `name.log.1.gz` is written to a temporary name and renamed when whole;
//!   if the renamed file grew meanwhile (a writer still held it open), the rest is added
//!   as another gzip member before the raw file is removed.
//! - A run killed at any point is finished by the next rotation of that file: a raw
//!   `name.log.1` left behind is compressed first (or, if its `.gz` is already whole,
//!   only what the `.gz` lacks is added), before anything is shifted.
//! - At most `keep` rotations are kept; older ones are shifted up, the oldest removed.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

use crate::fsutil::{self, Perms};
use crate::util::with_suffix;

pub fn rotated(path: &Path, n: u32) -> PathBuf {
    with_suffix(path, &format!(".{n}.gz"))
}

/// How many bytes a (possibly multi-member) gzip file decompresses to.
fn gz_len(gz: &Path) -> Result<u64> {
    let mut d = MultiGzDecoder::new(BufReader::new(File::open(gz)?));
    Ok(std::io::copy(&mut d, &mut std::io::sink())?)
}

/// Block size of the parallel compression: each block is one gzip member.
const BLOCK: usize = 4 << 20;

fn gzip_block(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut gz = GzEncoder::new(Vec::with_capacity(data.len() / 4), Compression::new(6));
    gz.write_all(data)?;
    gz.finish()
}

/// Compresses `raw` from byte `from` to its end and appends it to `out` as gzip members of
/// `BLOCK` bytes, compressed on every core at once (a multi-member file is one valid
/// `.gz`; `gzip -d` and `MultiGzDecoder` read it whole). Memory: two blocks per core.
fn add_member(raw: &Path, from: u64, out: &mut File) -> Result<u64> {
    let workers = crate::util::workers();
    let mut src = File::open(raw)?;
    src.seek(SeekFrom::Start(from))?;
    let mut src = BufReader::with_capacity(1 << 20, src);
    let mut out = BufWriter::with_capacity(1 << 20, &mut *out);
    let mut total = 0u64;
    loop {
        let mut blocks = Vec::with_capacity(workers);
        for _ in 0..workers {
            let mut block = Vec::with_capacity(BLOCK);
            (&mut src).take(BLOCK as u64).read_to_end(&mut block)?;
            if block.is_empty() {
                break;
            }
            blocks.push(block);
        }
        if blocks.is_empty() {
            break;
        }
        let compressed = crate::util::parallel_map(&blocks, |b| gzip_block(b));
        for (block, gz) in blocks.iter().zip(compressed) {
            let gz = gz.unwrap_or_else(|| Err(std::io::Error::other("compressor panicked")));
            out.write_all(&gz?)?;
            total += block.len() as u64;
        }
    }
    out.flush()?;
    Ok(total)
}

/// Compresses `raw` into `gz` (temporary name, then rename), adds what was appended to
/// `raw` meanwhile, and removes `raw`.
fn compress(raw: &Path, gz: &Path, perms: &Perms) -> Result<()> {
    let mut done = 0;
    fsutil::atomic_replace_with(gz, perms, |tmp| {
        let mut out = File::create(tmp)?;
        done = add_member(raw, 0, &mut out)?;
        if done == 0 {
            // An empty file is still one (empty) member, so the .gz is valid.
            out.write_all(&gzip_block(&[])?)?;
        }
        Ok(())
    })
    .with_context(|| format!("cannot compress {}", raw.display()))?;
    catch_up(raw, gz, done)?;
    fs::remove_file(raw).with_context(|| format!("cannot remove {}", raw.display()))?;
    fsutil::fsync_dir(raw.parent().unwrap_or(Path::new(".")))?;
    Ok(())
}

/// Appends to `gz` (as further members) what `raw` holds beyond `done` bytes.
fn catch_up(raw: &Path, gz: &Path, mut done: u64) -> Result<()> {
    loop {
        let size = fs::metadata(raw)?.len();
        if size <= done {
            return Ok(());
        }
        let mut out = OpenOptions::new().append(true).open(gz)?;
        done += add_member(raw, done, &mut out)?;
        out.sync_all()?;
    }
}

/// Finishes a rotation a killed run left: a raw `name.1` is compressed (or only its rest
/// added, if `name.1.gz` is already whole).
pub fn finish_leftover(path: &Path, perms: &Perms) -> Result<bool> {
    let raw = with_suffix(path, ".1");
    if !raw.exists() {
        return Ok(false);
    }
    let gz = rotated(path, 1);
    if gz.exists() {
        let have = gz_len(&gz).with_context(|| format!("cannot read {}", gz.display()))?;
        catch_up(&raw, &gz, have)?;
        fs::remove_file(&raw)?;
    } else {
        compress(&raw, &gz, perms)?;
    }
    log::info!("{}: finished an interrupted rotation", path.display());
    Ok(true)
}

/// Rotates `path`: shifts `name.N.gz` up (keeping `keep`), renames `name` to `name.1`,
/// calls `renamed` (the caller records that the live file starts again at 0), then
/// compresses. Returns the new `name.1.gz`.
pub fn rotate_file(
    path: &Path,
    keep: u32,
    perms: &Perms,
    renamed: impl FnOnce() -> Result<()>,
) -> Result<PathBuf> {
    let keep = keep.max(1);
    finish_leftover(path, perms)?;
    let oldest = rotated(path, keep);
    crate::fsutil::remove_if_exists(&oldest)
        .with_context(|| format!("cannot remove the oldest rotation {}", oldest.display()))?;
    for n in (1..keep).rev() {
        let from = rotated(path, n);
        if from.exists() {
            fs::rename(&from, rotated(path, n + 1))
                .with_context(|| format!("cannot shift {}", from.display()))?;
        }
    }
    let raw = with_suffix(path, ".1");
    fs::rename(path, &raw).with_context(|| format!("cannot rotate {}", path.display()))?;
    fsutil::fsync_dir(path.parent().unwrap_or(Path::new(".")))?;
    renamed()?;
    let gz = rotated(path, 1);
    compress(&raw, &gz, perms)?;
    Ok(gz)
}

/// Whether a file name is a rotation: `<name>.<N>.gz`.
pub fn is_rotation(name: &str) -> bool {
    name.strip_suffix(".gz")
        .and_then(|s| s.rsplit_once('.'))
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Reads a rotation back (all members).
#[cfg(test)]
fn read_rotation(gz: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    MultiGzDecoder::new(BufReader::new(File::open(gz)?)).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotations_shift_and_keep_at_most_keep() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.log");
        let perms = Perms::default();
        for i in 0..4 {
            fs::write(&log, format!("round {i}\n")).unwrap();
            rotate_file(&log, 3, &perms, || Ok(())).unwrap();
        }
        assert!(!log.exists());
        assert_eq!(read_rotation(&rotated(&log, 1)).unwrap(), b"round 3\n");
        assert_eq!(read_rotation(&rotated(&log, 3)).unwrap(), b"round 1\n");
        assert!(!rotated(&log, 4).exists());
        assert!(is_rotation("a.log.12.gz") && !is_rotation("a.log.gz") && !is_rotation("a.log"));
    }

    #[test]
    fn a_leftover_raw_rotation_is_finished_without_loss() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.log");
        let perms = Perms::default();
        // Killed after the rename, before compression.
        fs::write(with_suffix(&log, ".1"), b"one\ntwo\n").unwrap();
        assert!(finish_leftover(&log, &perms).unwrap());
        assert_eq!(read_rotation(&rotated(&log, 1)).unwrap(), b"one\ntwo\n");
        // Killed after the .gz was installed, while the raw file had grown.
        fs::write(with_suffix(&log, ".1"), b"one\ntwo\nthree\n").unwrap();
        assert!(finish_leftover(&log, &perms).unwrap());
        assert_eq!(
            read_rotation(&rotated(&log, 1)).unwrap(),
            b"one\ntwo\nthree\n"
        );
        assert!(!with_suffix(&log, ".1").exists());
    }
}
