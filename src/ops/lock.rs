//! Job locks: `locks/<job>.lock`, held with an exclusive `flock` for a whole run.
//!
//! Invariants:
//! - One lock type for every job and command: [`JobLock`]. Holding the value is holding
//!   the lock; dropping it releases it.
//! - The lock is the kernel's `flock` (`std::fs::File::try_lock`), so it dies with the
//!   process: a SIGKILLed holder leaves no stale lock, and nothing ever deletes lock files
//!   (deleting one would let two processes lock two different inodes).
//! - The file's content (pid, start time, command) is information for people and
//!   `status`, written after the lock is taken; it never decides who holds the lock.
//! - [`holder`] looks without taking the lock, so `status` never makes a cron run skip.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::error::{Error, LockHolder, io_text};
use crate::fsutil::{self, Perms};
use crate::layout::Layout;
use crate::ops::clock;

/// How often a waiting manual command retries the lock.
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct JobLock {
    file: File,
    path: PathBuf,
    job: &'static str,
}

impl JobLock {
    /// Takes the lock if it is free; `Ok(None)` if another process holds it.
    pub fn try_acquire(
        layout: &Layout,
        perms: &Perms,
        job: &'static str,
    ) -> Result<Option<JobLock>> {
        let path = layout.lock_file(job);
        let file = open_lock_file(&path, perms)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(e)) => {
                anyhow::bail!("cannot lock {}: {}", path.display(), io_text(&e))
            }
        }
        let mut lock = JobLock { file, path, job };
        lock.write_holder();
        Ok(Some(lock))
    }

    /// Takes the lock, waiting up to `wait` for the holder to finish. A lock still held
    /// then is [`Error::LockHeld`] naming the holder (exit 3).
    pub fn acquire(
        layout: &Layout,
        perms: &Perms,
        job: &'static str,
        wait: Duration,
    ) -> Result<JobLock> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(lock) = JobLock::try_acquire(layout, perms, job)? {
                return Ok(lock);
            }
            if Instant::now() >= deadline {
                let path = layout.lock_file(job);
                let holder = read_holder(&path);
                return Err(Error::LockHeld { job, path, holder }.into());
            }
            std::thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())));
        }
    }

    /// The name of the job whose lock this is.
    pub fn job(&self) -> &'static str {
        self.job
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_holder(&mut self) {
        let command: Vec<String> = std::env::args().skip(1).collect();
        let text = format!(
            "pid={}\nstarted={}\ncommand={}\n",
            std::process::id(),
            clock::rfc3339(clock::now()),
            command.join(" ")
        );
        // Informational only (module doc): a failure to write it must not fail the run.
        let _ = self
            .file
            .set_len(0)
            .and_then(|()| self.file.seek(SeekFrom::Start(0)))
            .and_then(|_| self.file.write_all(text.as_bytes()));
    }
}

impl Drop for JobLock {
    fn drop(&mut self) {
        // Clear the holder before the kernel releases the lock on close, so a reader
        // never sees a finished run's pid as the holder.
        let _ = self.file.set_len(0);
    }
}

fn open_lock_file(path: &Path, perms: &Perms) -> Result<File> {
    if let Some(dir) = path.parent() {
        fsutil::ensure_dir(dir, perms)
            .with_context(|| format!("cannot create lock directory {}", dir.display()))?;
    }
    let existed = path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(perms.file_mode)
        .open(path)
        .map_err(|e| {
            anyhow::anyhow!("cannot open lock file {}: {}", path.display(), io_text(&e))
        })?;
    if !existed {
        let _ = perms.apply_file(path);
    }
    Ok(file)
}

/// Parses the holder information a lock holder wrote.
pub fn parse_holder(text: &str) -> Option<LockHolder> {
    let mut pid = None;
    let mut started = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pid=") {
            pid = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("started=") {
            started = Some(v.trim().to_string());
        }
    }
    Some(LockHolder {
        pid: pid?,
        started: started.unwrap_or_else(|| "unknown".into()),
    })
}

fn read_holder(path: &Path) -> Option<LockHolder> {
    let mut text = String::new();
    File::open(path).ok()?.read_to_string(&mut text).ok()?;
    parse_holder(&text)
}

/// Who holds a job's lock right now, without taking it. Uses `/proc/locks` to see whether
/// any process holds a `flock` on the lock file's inode; falls back to checking that the
/// recorded pid is alive where `/proc/locks` cannot be read.
pub fn holder(layout: &Layout, job: &str) -> Option<LockHolder> {
    let path = layout.lock_file(job);
    let inode = std::fs::metadata(&path).ok()?.ino();
    let recorded = read_holder(&path);
    // The kernel lists `/proc/locks` a page per read, resuming by position: a lock taken
    // or dropped by another process between two reads can shift the list so one entry is
    // never shown. A lock shown is held; one not shown is looked for again before the
    // answer is "free".
    let mut held = false;
    for _ in 0..3 {
        match std::fs::read_to_string("/proc/locks") {
            Ok(locks) if flock_held_on(&locks, inode) => {
                held = true;
                break;
            }
            Ok(_) => {}
            Err(_) => return recorded.filter(|h| Path::new(&format!("/proc/{}", h.pid)).exists()),
        }
    }
    held.then(|| {
        recorded.unwrap_or(LockHolder {
            pid: 0,
            started: "unknown".into(),
        })
    })
}

/// Whether `/proc/locks` text shows a granted FLOCK on `inode`.
fn flock_held_on(locks: &str, inode: u64) -> bool {
    locks.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:567 0 EOF"; blocked waiters have "->".
        fields.len() >= 6
            && fields[1] == "FLOCK"
            && fields[5]
                .rsplit(':')
                .next()
                .and_then(|i| i.parse::<u64>().ok())
                == Some(inode)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        (dir, layout)
    }

    #[test]
    fn second_acquire_in_same_process_fails_then_succeeds_after_drop() {
        let (_dir, layout) = setup();
        let perms = Perms::default();
        let first = JobLock::try_acquire(&layout, &perms, "database")
            .unwrap()
            .unwrap();
        assert!(
            JobLock::try_acquire(&layout, &perms, "database")
                .unwrap()
                .is_none()
        );
        // Another job's lock is independent.
        assert!(
            JobLock::try_acquire(&layout, &perms, "logs")
                .unwrap()
                .is_some()
        );
        let h = holder(&layout, "database").unwrap();
        assert_eq!(h.pid, std::process::id());
        drop(first);
        assert!(holder(&layout, "database").is_none());
        assert!(
            JobLock::try_acquire(&layout, &perms, "database")
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn acquire_times_out_with_lock_held_error() {
        let (_dir, layout) = setup();
        let perms = Perms::default();
        let _held = JobLock::try_acquire(&layout, &perms, "security")
            .unwrap()
            .unwrap();
        let start = Instant::now();
        let err =
            JobLock::acquire(&layout, &perms, "security", Duration::from_millis(200)).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(200));
        let typed = err.downcast_ref::<Error>().unwrap();
        assert!(
            matches!(typed, Error::LockHeld { holder: Some(h), .. } if h.pid == std::process::id())
        );
    }

    #[test]
    fn parses_holder_text() {
        let h = parse_holder("pid=77\nstarted=2026-11-22T10:00:00Z\ncommand=cron logs\n").unwrap();
        assert_eq!(h.pid, 77);
        assert_eq!(h.started, "2026-11-22T10:00:00Z");
        assert!(parse_holder("").is_none());
    }

    #[test]
    fn proc_locks_parsing() {
        let text = "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 99 fd:01:9999 0 EOF\n\
                    3: POSIX  ADVISORY  WRITE 1 fd:01:4242 0 EOF\n";
        assert!(flock_held_on(text, 5678));
        assert!(!flock_held_on(text, 9999));
        assert!(!flock_held_on(text, 4242));
    }
}
