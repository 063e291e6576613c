//! Listing one side of a tree: the regular files that match `include` and not `exclude`,
//! with the metadata the fast path compares. Stat only: no file is read here.
//!
//! Invariants:
//! - Symlinks, devices, sockets and FIFOs are reported and skipped, never followed or read.
//! - A directory that cannot be read makes the listing partial below it: the paths under
//!   it are unknown, never "deleted" (the plan leaves them alone).
//! - cr0sync's own temporary files (`.name.tmp.<pid>.<n>`) are never listed.
//! - A missing root is an error, never an empty tree.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::Result;

use crate::error::io_text;
use crate::fsutil;
use crate::util::path_match;

/// What the fast path compares, and what a write checks the target still has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stat {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Stat {
    pub fn of(m: &std::fs::Metadata) -> Stat {
        Stat {
            size: m.size(),
            mtime_ns: crate::util::mtime_ns(m),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
            ino: m.ino(),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        }
    }
}

#[derive(Debug, Default)]
pub struct Listing {
    /// Relative path (`/`-separated) -> metadata.
    pub files: BTreeMap<String, Stat>,
    /// Paths left out, with why (a symlink, a special file, a name that is not UTF-8).
    pub skipped: Vec<(String, String)>,
    /// Directories that could not be read: nothing below them is known.
    pub unreadable: Vec<(String, String)>,
    /// Temporary files of cr0sync runs that were killed mid-write (relative paths).
    pub stale_temps: Vec<String>,
}

impl Listing {
    /// Whether `path` lies below a directory that could not be read.
    pub fn hidden(&self, path: &str) -> bool {
        self.unreadable.iter().any(|(dir, _)| {
            dir.is_empty()
                || path
                    .strip_prefix(dir.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }
}

/// Lists the tree at `root`.
pub fn list(root: &Path, include: &[String], exclude: &[String]) -> Result<Listing> {
    match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => anyhow::bail!("{} is not a directory", root.display()),
        Err(e) => anyhow::bail!("{}: {}", root.display(), io_text(&e)),
    }
    let mut out = Listing::default();
    // Directory by directory, each entry's metadata taken relative to its open directory
    // (no path walk per file).
    let mut dirs = vec![String::new()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(root.join(&dir)) {
            Ok(r) => r,
            Err(e) => {
                out.unreadable.push((dir, io_text(&e)));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    out.unreadable.push((dir.clone(), io_text(&e)));
                    break;
                }
            };
            let name = entry.file_name();
            let rel = |name: &str| {
                if dir.is_empty() {
                    name.to_string()
                } else {
                    format!("{dir}/{name}")
                }
            };
            let Some(name) = name.to_str() else {
                out.skipped
                    .push((rel(&name.to_string_lossy()), "the name is not UTF-8".into()));
                continue;
            };
            let rel = rel(name);
            let ft = match entry.file_type() {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    out.unreadable.push((rel, io_text(&e)));
                    continue;
                }
            };
            if ft.is_dir() {
                dirs.push(rel);
                continue;
            }
            if fsutil::is_temp_name(name) {
                if fsutil::is_stale_temp(name) {
                    out.stale_temps.push(rel);
                }
                continue;
            }
            if !include.iter().any(|p| path_match(p, &rel))
                || exclude.iter().any(|p| path_match(p, &rel))
            {
                continue;
            }
            if !ft.is_file() {
                let what = if ft.is_symlink() {
                    "a symlink (never followed)"
                } else {
                    "a special file"
                };
                out.skipped.push((rel, what.into()));
                continue;
            }
            match entry.metadata() {
                Ok(m) => {
                    out.files.insert(rel, Stat::of(&m));
                }
                // Gone between the directory read and the stat: as if not listed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => out.unreadable.push((rel, io_text(&e))),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_matching_regular_files_and_reports_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("1-andy.txt"), "x").unwrap();
        std::fs::write(root.join("a/b/2-bob.txt"), "y").unwrap();
        std::fs::write(root.join("a/skip.tmp"), "z").unwrap();
        std::fs::write(root.join(".x.txt.tmp.1.2"), "t").unwrap();
        std::os::unix::fs::symlink("1-andy.txt", root.join("link.txt")).unwrap();
        let l = list(root, &["*.txt".into()], &["*.tmp".into()]).unwrap();
        let names: Vec<&str> = l.files.keys().map(String::as_str).collect();
        assert_eq!(names, ["1-andy.txt", "a/b/2-bob.txt"]);
        assert_eq!(l.skipped.len(), 1);
        assert_eq!(l.skipped[0].0, "link.txt");
        assert!(list(&root.join("missing"), &["**".into()], &[]).is_err());
    }
}
