//! The findings of an integrity check: what differs between the signed baseline and the
//! tree now, each identified by its kind and path. A finding is reported once, until it
//! goes away or the baseline is updated.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::scan::{Now, Scan};
use super::{Entry, Files, join};

/// What kind of difference a finding is (in the order a path's findings are listed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FindingKind {
    /// A path not in the baseline.
    Added,
    /// Another kind of file, another mode, owner or link target.
    Changed,
    /// A file whose content differs from the baseline.
    Modified,
    /// A baseline path that is gone.
    Removed,
    /// A path that exists but cannot be read (or lies in a directory that cannot be read).
    Unreadable,
}

impl FindingKind {
    const ALL: [FindingKind; 5] = [
        FindingKind::Added,
        FindingKind::Changed,
        FindingKind::Modified,
        FindingKind::Removed,
        FindingKind::Unreadable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::Added => "added",
            FindingKind::Changed => "changed",
            FindingKind::Modified => "modified",
            FindingKind::Removed => "removed",
            FindingKind::Unreadable => "unreadable",
        }
    }

    fn parse(s: &str) -> Option<FindingKind> {
        FindingKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which finding: its kind and path. Stored under `state/` as the text `"<kind> <path>"`
/// (a kind has no space, so the first space separates them whatever the path holds).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FindingId {
    pub kind: FindingKind,
    pub path: String,
}

impl Serialize for FindingId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{} {}", self.kind, self.path))
    }
}

impl<'de> Deserialize<'de> for FindingId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let (kind, path) = text
            .split_once(' ')
            .and_then(|(k, p)| Some((FindingKind::parse(k)?, p)))
            .ok_or_else(|| serde::de::Error::custom(format!("not a finding: {text:?}")))?;
        Ok(FindingId {
            kind,
            path: path.to_string(),
        })
    }
}

/// One finding of a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub path: String,
    pub detail: String,
    /// Not reported by an earlier check.
    pub new: bool,
}

impl Finding {
    pub(super) fn new(kind: FindingKind, path: &str, detail: String) -> Finding {
        Finding {
            kind,
            path: path.into(),
            detail,
            new: false,
        }
    }

    pub fn id(&self) -> FindingId {
        FindingId {
            kind: self.kind,
            path: self.path.clone(),
        }
    }
}

/// What a check found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub files: usize,
    pub hashed: usize,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn new_findings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.new)
    }
}

/// Calls `f` once per path of the baseline or the current tree.
pub(super) fn join_current<'a>(
    base: &'a Files,
    scanned: &'a Scan,
    f: impl FnMut(Option<&'a (String, Entry)>, Option<&'a (&'a str, Now<'a>)>),
) {
    join(base, |b| b.0.as_str(), &scanned.current, |c| c.0, f);
}

/// The findings of the current tree against the baseline (both sorted by path). A path
/// that could not be read, or lies below a directory that could not be read, is reported
/// as unreadable (by the caller), not as removed.
pub(super) fn compare(base: &Files, scanned: &Scan) -> Vec<Finding> {
    let hidden = |path: &str| {
        scanned.unreadable.iter().any(|(u, _)| {
            path.strip_prefix(u.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    };
    let mut out = Vec::new();
    join_current(base, scanned, |b, c| match (b, c) {
        (Some((path, b)), None) => {
            if !hidden(path) {
                out.push(Finding::new(
                    FindingKind::Removed,
                    path,
                    format!("{} was in the baseline", b.kind),
                ));
            }
        }
        (None, Some((path, _))) => out.push(Finding::new(
            FindingKind::Added,
            path,
            "not in the baseline".into(),
        )),
        (Some((path, b)), Some((_, n))) => {
            let n = n.entry();
            if b.kind != n.kind {
                out.push(Finding::new(
                    FindingKind::Changed,
                    path,
                    format!("{} became a {}", b.kind, n.kind),
                ));
            } else if b.sha256 != n.sha256 {
                out.push(Finding::new(
                    FindingKind::Modified,
                    path,
                    "content differs from the baseline".into(),
                ));
            }
            let mut what = Vec::new();
            if b.mode != n.mode {
                what.push(format!("mode {:o} -> {:o}", b.mode, n.mode));
            }
            if (b.uid, b.gid) != (n.uid, n.gid) {
                what.push(format!("owner {}:{} -> {}:{}", b.uid, b.gid, n.uid, n.gid));
            }
            if b.kind == n.kind && b.target != n.target {
                what.push(format!(
                    "link target {} -> {}",
                    b.target.as_deref().unwrap_or("?"),
                    n.target.as_deref().unwrap_or("?")
                ));
            }
            if !what.is_empty() {
                out.push(Finding::new(FindingKind::Changed, path, what.join(", ")));
            }
        }
        (None, None) => {}
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finding_id_keeps_a_path_with_spaces_whole() {
        let id = FindingId {
            kind: FindingKind::Modified,
            path: "/var/www/my site/index.php".into(),
        };
        let text = serde_json::to_string(&id).unwrap();
        assert_eq!(text, r#""modified /var/www/my site/index.php""#);
        assert_eq!(serde_json::from_str::<FindingId>(&text).unwrap(), id);
        assert!(serde_json::from_str::<FindingId>(r#""bogus /x""#).is_err());
    }

    #[test]
    fn kinds_sort_as_their_names() {
        let names: Vec<&str> = FindingKind::ALL.iter().map(|k| k.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
    }
}
