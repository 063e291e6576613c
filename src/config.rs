//! The configuration file: typed structs, defaults, and errors that name the line.
//!
//! Invariants:
//! - Every struct denies unknown fields, so a typo is an error naming the key and its line.
//! - Every key has a default; the commented default file (`config_template.toml`, written by
//!   `init`) parses to exactly [`Config::default`] (a unit test holds this).
//! - [`Config::parse`] checks what serde cannot: duplicate names, names unusable in file
//!   names, a peer path equal to its central copy. Every failure is one
//!   [`Error::Config`] line: file, line, key, what is wrong.
//! - Relative paths are kept as written; [`crate::layout::Layout::resolve`] anchors them at
//!   the root.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::error::Error;

/// The commented default configuration that `init` writes.
pub const TEMPLATE: &str = include_str!("config_template.toml");

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub general: General,
    pub database: DatabaseSection,
    pub logs: LogsSection,
    pub security: SecuritySection,
    pub files: FilesSection,
    pub remote: RemoteConfig,
}

/// `[remote]`: how peers on other hosts (`ssh://` paths) are reached.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// The command that reaches a host; `[-p port] [user@]host <remote_bin> serve` is added.
    pub ssh: Vec<String>,
    /// cr0sync on the remote hosts (on their PATH, or a full path).
    pub remote_bin: String,
    /// How many hosts are served at once.
    pub parallel: u32,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            ssh: ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
                .map(String::from)
                .to_vec(),
            remote_bin: "cr0sync".into(),
            parallel: 4,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct General {
    pub owner: Option<String>,
    pub group: Option<String>,
    pub dir_mode: Mode,
    pub file_mode: Mode,
    pub busy_timeout: Dur,
    pub metrics_dir: Option<PathBuf>,
    /// cr0sync's own `cron_*.log` files roll past this size ...
    pub log_size: Size,
    /// ... keeping this many gzip-compressed older files.
    pub log_keep: u32,
    /// A job's lock held longer than this is a `status` problem (a hung job).
    pub stuck_after: Dur,
}

impl Default for General {
    fn default() -> Self {
        General {
            owner: None,
            group: None,
            dir_mode: Mode(0o775),
            file_mode: Mode(0o664),
            busy_timeout: Dur::secs(5),
            metrics_dir: None,
            log_size: Size(10 << 20),
            log_keep: 5,
            stuck_after: Dur::secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
// The names are the configuration values (`central-wins`, ...).
#[allow(clippy::enum_variant_names)]
pub enum Policy {
    #[default]
    CentralWins,
    PeerWins,
    NewestWins,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    #[default]
    Both,
    Pull,
    Push,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSection {
    pub policy: Policy,
    pub backup_interval: Dur,
    pub backup_keep: Dur,
    pub backup_keep_min: u32,
    pub max_delete: Percent,
    /// `cron database` prints no line per new conflict on stderr.
    pub quiet_conflicts: bool,
    pub db: Vec<DbConfig>,
}

impl Default for DatabaseSection {
    fn default() -> Self {
        DatabaseSection {
            policy: Policy::CentralWins,
            backup_interval: Dur::secs(3600),
            backup_keep: Dur::secs(7 * 86400),
            backup_keep_min: 3,
            max_delete: Percent(50),
            quiet_conflicts: false,
            db: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DbConfig {
    pub name: Spanned<String>,
    pub policy: Option<Policy>,
    #[serde(default = "default_updated_at")]
    pub updated_at: String,
    #[serde(default)]
    pub counters: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub exclude_tables: Vec<String>,
    pub peers: Vec<PeerConfig>,
    /// Rows both sides inserted under one INTEGER PRIMARY KEY both survive: the peer's
    /// row moves to a fresh key (on by default).
    #[serde(default = "default_true")]
    pub rekey: bool,
    /// Undeclared references followed when a key moves: parent table ->
    /// `["child_table.column"]`.
    #[serde(default)]
    pub rekey_refs: BTreeMap<String, Vec<String>>,
}

fn default_true() -> bool {
    true
}

fn default_updated_at() -> String {
    "updated_at".to_string()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: Spanned<String>,
    pub path: Spanned<PathBuf>,
    #[serde(default)]
    pub direction: Direction,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogsSection {
    pub rotate_size: Size,
    pub rotate_keep: u32,
    pub rotated_max_age: Dur,
    pub rotate: Vec<String>,
    pub stream: Vec<StreamConfig>,
}

impl Default for LogsSection {
    fn default() -> Self {
        LogsSection {
            rotate_size: Size(10 << 20),
            rotate_keep: 10,
            rotated_max_age: Dur::secs(30 * 86400),
            rotate: vec![
                "api/*.log".into(),
                "file_access/*.log".into(),
                "website/*.log".into(),
            ],
            stream: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub name: Spanned<String>,
    pub from: PathBuf,
    #[serde(default = "default_pattern")]
    pub pattern: String,
    pub to: PathBuf,
}

fn default_pattern() -> String {
    "*.log".to_string()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FilesSection {
    /// Whole-file conflicts, unless a tree says otherwise.
    pub policy: Policy,
    /// Refuse a sync that deletes more than this share of a tree's files on a side
    /// (trees of 10 files or more).
    pub max_delete: Percent,
    pub tree: Vec<TreeConfig>,
}

impl Default for FilesSection {
    fn default() -> Self {
        FilesSection {
            policy: Policy::NewestWins,
            max_delete: Percent(50),
            tree: Vec::new(),
        }
    }
}

/// How a changed file is written on a side.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum WriteMode {
    /// A temporary file in the same directory, renamed over the target under the target's
    /// `flock` if the target is still as listed.
    #[default]
    Atomic,
    /// Rewritten in place under the file's own `flock`, for sites that rewrite their files
    /// in place under `flock()` (PHP `file_put_contents(..., LOCK_EX)`).
    Flock,
}

/// One `[[files.tree]]`: a central directory and the same directory on each peer.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TreeConfig {
    pub name: Spanned<String>,
    /// Relative to the root.
    pub central: Spanned<PathBuf>,
    /// Globs of the files that sync (`*.txt`; a pattern with `/` matches the path below the
    /// tree, `**` any number of directories). Default: every file.
    #[serde(default = "default_include")]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    pub policy: Option<Policy>,
    /// Numeric JSON keys merged additively, wherever they occur in an object.
    #[serde(default)]
    pub json_counters: Vec<String>,
    #[serde(default)]
    pub write: WriteMode,
    /// Files up to this size keep their content in the base, so both-sided changes can be
    /// merged; larger ones are whole-file conflicts.
    #[serde(default = "default_merge_max")]
    pub merge_max: Size,
    pub max_delete: Option<Percent>,
    pub peers: Vec<PeerConfig>,
}

fn default_include() -> Vec<String> {
    vec!["**".into()]
}

fn default_merge_max() -> Size {
    Size(1 << 20)
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySection {
    pub integrity_paths: Vec<PathBuf>,
    pub integrity_exclude: Vec<String>,
    pub integrity_interval: Dur,
    pub full_rehash: Dur,
    pub session_cleanup_interval: Dur,
    pub event_archive_interval: Dur,
    pub event_archive_after: Dur,
}

impl Default for SecuritySection {
    fn default() -> Self {
        SecuritySection {
            integrity_paths: vec![PathBuf::from("shared_storage/api_keys.json")],
            integrity_exclude: vec!["**/*.log".into(), "**/cache/**".into()],
            integrity_interval: Dur::secs(300),
            full_rehash: Dur::secs(86400),
            session_cleanup_interval: Dur::secs(3600),
            event_archive_interval: Dur::secs(86400),
            event_archive_after: Dur::secs(7 * 86400),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Value types: durations, sizes, percentages, modes. Each parses from a string, so a bad
// value is reported by the TOML parser at the value's own line.

/// A duration written as `"90s"`, `"5m"`, `"1h"`, `"7d"`, `"2w"` or combined (`"1h30m"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
}

impl TryFrom<String> for Dur {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_duration(&s).map(Dur)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        for (unit, len) in [("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)] {
            if s != 0 && s.is_multiple_of(len) {
                return write!(f, "{}{unit}", s / len);
            }
        }
        if self.0.subsec_millis() != 0 {
            return write!(f, "{}ms", self.0.as_millis());
        }
        write!(f, "{s}s")
    }
}

/// Parses `"90s"`, `"1h30m"`, `"250ms"`, `"7d"`. A bare number is refused: the unit is what
/// tells a reader whether `5` meant seconds or minutes.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?} (examples: \"90s\", \"5m\", \"1h\", \"7d\")");
    let s = text.trim();
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            "w" => Duration::from_secs(n.saturating_mul(604800)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
    }
    if total > MAX_DURATION {
        return Err(format!(
            "duration {text:?} is too large (at most 100 years, \"36500d\")"
        ));
    }
    Ok(total)
}

/// The longest duration accepted anywhere: far beyond any interval or age that makes
/// sense, and small enough that adding it to any time or instant cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

/// A size written as `"10MiB"`, `"500KB"`, `"1GiB"` or a byte count (`"4096"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Size(pub u64);

impl TryFrom<String> for Size {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_size(&s).map(Size)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, len) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 != 0 && self.0.is_multiple_of(len) {
                return write!(f, "{}{unit}", self.0 / len);
            }
        }
        write!(f, "{}B", self.0)
    }
}

pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("invalid size {text:?} (examples: \"10MiB\", \"500KB\", \"1GiB\")");
    let s = text.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return Err(bad());
    }
    let n: u64 = s[..digits].parse().map_err(|_| bad())?;
    let mult: u64 = match s[digits..].trim() {
        "" | "B" => 1,
        "K" | "KB" => 1000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

/// A percentage written as `"50%"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Percent(pub u8);

impl TryFrom<String> for Percent {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("invalid percentage {s:?} (example: \"50%\", between 0% and 100%)");
        let n: u8 = s
            .trim()
            .strip_suffix('%')
            .ok_or_else(bad)?
            .trim()
            .parse()
            .map_err(|_| bad())?;
        if n > 100 {
            return Err(bad());
        }
        Ok(Percent(n))
    }
}

/// A Unix permission mode written in octal, as `chmod` takes it: `"775"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Mode(pub u32);

impl TryFrom<String> for Mode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match u32::from_str_radix(s.trim(), 8) {
            Ok(m) if m <= 0o7777 && !s.trim().is_empty() => Ok(Mode(m)),
            _ => Err(format!(
                "invalid mode {s:?} (octal, as chmod takes it: \"775\")"
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Parsing and validation.

impl Config {
    /// Reads and validates `path`. Every failure is an [`Error::Config`] naming the file.
    pub fn load(path: &Path, root: &Path) -> Result<Config, Error> {
        if let Some(kind) = crate::fsutil::special_kind(path) {
            return Err(Error::config(
                path,
                format!("is {kind}, not a configuration file. Try: cr0sync init writes one"),
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| {
            Error::config(path, format!("cannot read: {}", crate::error::io_text(&e)))
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::config(
                path,
                format!(
                    "line {}: not valid UTF-8. Try: save the file as UTF-8",
                    line_of(
                        &String::from_utf8_lossy(e.as_bytes()),
                        e.utf8_error().valid_up_to()
                    )
                ),
            )
        })?;
        Config::parse_at(&text, root).map_err(|message| Error::config(path, message))
    }

    /// Parses configuration text. The error is one line: `line N: key `k`: what is wrong`.
    pub fn parse(text: &str) -> Result<Config, String> {
        Config::parse_at(text, Path::new(""))
    }

    /// Parses configuration text for the store at `root` (relative paths resolve there).
    pub fn parse_at(text: &str, root: &Path) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| describe_toml_error(text, &e))?;
        config.validate(text, root)?;
        Ok(config)
    }

    fn validate(&self, text: &str, root: &Path) -> Result<(), String> {
        let at = |span: std::ops::Range<usize>, msg: String| {
            format!("line {}: {msg}", line_of(text, span.start))
        };
        let mut db_names = HashSet::new();
        for db in &self.database.db {
            let name = db.name.get_ref();
            check_name(name).map_err(|m| at(db.name.span(), format!("key `name`: {m}")))?;
            if !db_names.insert(name.clone()) {
                return Err(at(
                    db.name.span(),
                    format!("key `name`: duplicate database {name:?}"),
                ));
            }
            if db.peers.is_empty() {
                return Err(at(
                    db.name.span(),
                    format!("key `peers`: database {name:?} has no peers"),
                ));
            }

            for (parent, refs) in &db.rekey_refs {
                if let Some(bad) = refs.iter().find(|r| {
                    r.split_once('.')
                        .is_none_or(|(t, c)| t.is_empty() || c.is_empty())
                }) {
                    return Err(at(
                        db.name.span(),
                        format!(
                            "key `rekey_refs`: database {name:?} table {parent:?}: {bad:?} is \
                             not \"table.column\""
                        ),
                    ));
                }
            }
            let mut peer_names = HashSet::new();
            for peer in &db.peers {
                let pname = peer.name.get_ref();
                check_name(pname).map_err(|m| at(peer.name.span(), format!("key `name`: {m}")))?;
                if pname == "central" {
                    return Err(at(
                        peer.name.span(),
                        "key `name`: \"central\" is reserved for the central copy".into(),
                    ));
                }
                if !peer_names.insert(pname.clone()) {
                    return Err(at(
                        peer.name.span(),
                        format!("key `name`: duplicate peer {pname:?} in database {name:?}"),
                    ));
                }
            }
        }
        // A peer file belongs to one pair: never a central copy (of this or any database),
        // never shared by two peers, or the databases would merge into each other.
        let peers: Vec<(&String, &String, &Spanned<PathBuf>)> = self
            .database
            .db
            .iter()
            .flat_map(|db| {
                db.peers
                    .iter()
                    .map(move |p| (db.name.get_ref(), p.name.get_ref(), &p.path))
            })
            .collect();
        for (i, (name, pname, path)) in peers.iter().enumerate() {
            let file = root.join(path.get_ref());
            for db in &self.database.db {
                let other = db.name.get_ref();
                let central = root.join("databases").join(format!("{other}.db"));
                if same_path(&file, &central) {
                    let whose = if other == *name {
                        format!("the central copy of {name:?} itself")
                    } else {
                        format!("the central copy of database {other:?}")
                    };
                    return Err(at(
                        path.span(),
                        format!("key `path`: peer {pname:?} of database {name:?} is {whose}"),
                    ));
                }
            }
            for (other_name, other_peer, other_path) in &peers[..i] {
                if same_path(&file, &root.join(other_path.get_ref())) {
                    return Err(at(
                        path.span(),
                        format!(
                            "key `path`: peer {pname:?} of database {name:?} is the same file \
                             as peer {other_peer:?} of database {other_name:?}; each peer \
                             file belongs to one pair"
                        ),
                    ));
                }
            }
        }
        self.validate_trees(text, root)?;
        let mut stream_names = HashSet::new();
        for stream in &self.logs.stream {
            let name = stream.name.get_ref();
            check_name(name).map_err(|m| at(stream.name.span(), format!("key `name`: {m}")))?;
            if !stream_names.insert(name.clone()) {
                return Err(at(
                    stream.name.span(),
                    format!("key `name`: duplicate stream {name:?}"),
                ));
            }
            if let Some(Err(e)) = crate::remote::client::Spec::parse(&stream.from.to_string_lossy())
            {
                return Err(at(stream.name.span(), format!("key `from`: {e:#}")));
            }
        }
        Ok(())
    }

    /// Tree names, peer names, and no directory inside another: a peer path inside the
    /// central tree or another tree (or the reverse) would sync a tree into itself.
    fn validate_trees(&self, text: &str, root: &Path) -> Result<(), String> {
        let at = |span: std::ops::Range<usize>, msg: String| {
            format!("line {}: {msg}", line_of(text, span.start))
        };
        let mut names = HashSet::new();
        let mut dirs: Vec<(String, PathBuf, std::ops::Range<usize>)> = Vec::new();
        for tree in &self.files.tree {
            let name = tree.name.get_ref();
            check_name(name).map_err(|m| at(tree.name.span(), format!("key `name`: {m}")))?;
            if !names.insert(name.clone()) {
                return Err(at(
                    tree.name.span(),
                    format!("key `name`: duplicate tree {name:?}"),
                ));
            }
            if tree.peers.is_empty() {
                return Err(at(
                    tree.name.span(),
                    format!("key `peers`: tree {name:?} has no peers"),
                ));
            }
            dirs.push((
                format!("the central directory of tree {name:?}"),
                normalize(&root.join(tree.central.get_ref())),
                tree.central.span(),
            ));
            let mut peer_names = HashSet::new();
            for peer in &tree.peers {
                let pname = peer.name.get_ref();
                check_name(pname).map_err(|m| at(peer.name.span(), format!("key `name`: {m}")))?;
                if pname == "central" {
                    return Err(at(
                        peer.name.span(),
                        "key `name`: \"central\" is reserved for the central directory".into(),
                    ));
                }
                if !peer_names.insert(pname.clone()) {
                    return Err(at(
                        peer.name.span(),
                        format!("key `name`: duplicate peer {pname:?} in tree {name:?}"),
                    ));
                }
                dirs.push((
                    format!("peer {pname:?} of tree {name:?}"),
                    normalize(&root.join(peer.path.get_ref())),
                    peer.path.span(),
                ));
            }
        }
        for (i, (what, dir, span)) in dirs.iter().enumerate() {
            for (other, odir, _) in &dirs[..i] {
                if dir.starts_with(odir) || odir.starts_with(dir) {
                    let key = if what.starts_with("peer") {
                        "path"
                    } else {
                        "central"
                    };
                    return Err(at(
                        span.clone(),
                        format!(
                            "key `{key}`: {what} ({}) overlaps {other} ({}); each directory \
                             belongs to one tree and one side",
                            dir.display(),
                            odir.display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The effective whole-file conflict policy of a tree.
    pub fn tree_policy(&self, tree: &TreeConfig) -> Policy {
        tree.policy.unwrap_or(self.files.policy)
    }

    /// The effective conflict policy of a database.
    pub fn policy_of(&self, db: &DbConfig) -> Policy {
        db.policy.unwrap_or(self.database.policy)
    }
}

/// Whether two paths name the same file: equal after lexical normalisation (`.` and `..`),
/// or the same inode when both exist (a symlink to the central copy is still the copy).
fn same_path(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if normalize(a) == normalize(b) {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Names become file names (`databases/<name>.db`, backup names), so keep them plain.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?} (letters, digits, '_', '-', '.'; not starting with '.')"
        ))
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Turns a TOML error into one line naming the line and, where it can be found, the key.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim().replace('\n', " ");
    let Some(span) = err.span() else {
        return message;
    };
    let line = line_of(text, span.start);
    match key_before(text, span.start) {
        Some(key) if !message.contains(&format!("`{key}`")) => {
            format!("line {line}: key `{key}`: {message}")
        }
        _ => format!("line {line}: {message}"),
    }
}

/// The key whose value starts at `offset`: the word before the last `=` on that line.
fn key_before(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let before = &text[line_start..offset];
    let eq = before.rfind('=')?;
    let key: String = before[..eq]
        .trim_end()
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"'))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let key = key.trim_matches('"').to_string();
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parses_to_defaults() {
        let parsed = Config::parse(TEMPLATE).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn rekey_refs_must_name_table_dot_column() {
        let text = "[[database.db]]\nname = \"users\"\nrekey_refs = { users = [\"scores\"] }\n\
                    peers = [{ name = \"bot\", path = \"/tmp/bot.db\" }]\n";
        let e = Config::parse(text).unwrap_err().to_string();
        assert!(
            e.contains("rekey_refs") && e.contains("table.column"),
            "{e}"
        );
        let ok = text.replace("[\"scores\"]", "[\"scores.user_id\"]");
        let c = Config::parse(&ok).unwrap();
        assert!(c.database.db[0].rekey, "rekey is on by default");
        assert_eq!(c.database.db[0].rekey_refs["users"], ["scores.user_id"]);
    }

    #[test]
    fn a_peer_file_belongs_to_one_pair() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let db = |name: &str, peers: &str| {
            format!("[[database.db]]\nname = \"{name}\"\npeers = [{peers}]\n")
        };
        // Another database's central copy.
        let text = db("users", "{ name = \"bot\", path = \"databases/site.db\" }")
            + &db("site", "{ name = \"bot\", path = \"/tmp/site-bot.db\" }");
        let e = Config::parse_at(&text, root).unwrap_err();
        assert!(e.contains("central copy of database \"site\""), "{e}");
        // One file for two databases, also through a symlink.
        std::fs::write(root.join("shared.db"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("shared.db"), root.join("link.db")).unwrap();
        let text = db("users", "{ name = \"bot\", path = \"shared.db\" }")
            + &db("site", "{ name = \"web\", path = \"link.db\" }");
        let e = Config::parse_at(&text, root).unwrap_err();
        assert!(
            e.contains("peer \"web\" of database \"site\" is the same file as peer \"bot\" of database \"users\""),
            "{e}"
        );
        let text = db("users", "{ name = \"bot\", path = \"shared.db\" }")
            + &db("site", "{ name = \"web\", path = \"other.db\" }");
        Config::parse_at(&text, root).unwrap();
    }

    #[test]
    fn template_mentions_every_key() {
        for key in [
            "owner",
            "group",
            "dir_mode",
            "file_mode",
            "busy_timeout",
            "metrics_dir",
            "log_size",
            "log_keep",
            "stuck_after",
            "policy",
            "backup_interval",
            "backup_keep",
            "backup_keep_min",
            "max_delete",
            "updated_at",
            "counters",
            "exclude_tables",
            "peers",
            "rekey",
            "rekey_refs",
            "direction",
            "rotate_size",
            "rotate_keep",
            "rotated_max_age",
            "rotate",
            "pattern",
            "from",
            "to",
            "integrity_paths",
            "integrity_exclude",
            "integrity_interval",
            "full_rehash",
            "session_cleanup_interval",
            "event_archive_interval",
            "event_archive_after",
        ] {
            assert!(
                TEMPLATE.contains(&format!("{key} =")),
                "template lacks {key}"
            );
        }
    }

    #[test]
    fn spec_example_parses() {
        let text = r#"
[general]
owner = "cr0"
group = "www-data"
busy_timeout = "5s"

[database]
policy = "central-wins"
max_delete = "50%"

[[database.db]]
name = "users"
policy = "newest-wins"
updated_at = "updated_at"
counters = { users = ["coins", "points"] }
exclude_tables = ["cache"]
peers = [
  { name = "bot",     path = "/home/cr0/bot/data/users.db" },
  { name = "website", path = "/var/www/html/data/users.db", direction = "both" },
]

[[logs.stream]]
name = "rizon"
from = "/home/cr0/bots/rizon/logs"
pattern = "*.log"
to = "logs/irc_networks/rizon"
"#;
        let c = Config::parse(text).unwrap();
        assert_eq!(c.database.db[0].peers.len(), 2);
        assert_eq!(c.policy_of(&c.database.db[0]), Policy::NewestWins);
        assert_eq!(c.database.db[0].counters["users"], vec!["coins", "points"]);
        assert_eq!(c.logs.stream[0].name.get_ref(), "rizon");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = Config::parse("[database]\n\npolcy = \"central-wins\"\n").unwrap_err();
        assert!(err.starts_with("line 3:"), "{err}");
        assert!(err.contains("polcy"), "{err}");
    }

    #[test]
    fn bad_duration_names_key_and_line() {
        let err = Config::parse("[general]\nbusy_timeout = \"5 parsecs\"\n").unwrap_err();
        assert!(err.starts_with("line 2: key `busy_timeout`"), "{err}");
        assert!(err.contains("invalid duration"), "{err}");
    }

    #[test]
    fn wrong_type_names_key() {
        let err = Config::parse("[database]\nbackup_keep_min = \"three\"\n").unwrap_err();
        assert!(
            err.contains("line 2") && err.contains("backup_keep_min"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_database_is_refused() {
        let text = "[[database.db]]\nname = \"u\"\npeers = [{name=\"bot\", path=\"/a.db\"}]\n\
                    [[database.db]]\nname = \"u\"\npeers = [{name=\"bot\", path=\"/b.db\"}]\n";
        let err = Config::parse(text).unwrap_err();
        assert!(
            err.contains("line 5") && err.contains("duplicate database"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_peer_is_refused() {
        let text = "[[database.db]]\nname = \"u\"\npeers = [\n{name=\"bot\", path=\"/a.db\"},\n\
                    {name=\"bot\", path=\"/b.db\"},\n]\n";
        let err = Config::parse(text).unwrap_err();
        assert!(
            err.contains("line 5") && err.contains("duplicate peer"),
            "{err}"
        );
    }

    #[test]
    fn peer_equal_to_central_is_refused() {
        let text =
            "[[database.db]]\nname = \"u\"\npeers = [{name=\"bot\", path=\"databases/u.db\"}]\n";
        let err = Config::parse(text).unwrap_err();
        assert!(err.contains("central copy"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        for bad in ["", "5", "m", "5x", "-1s", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(Dur::secs(300).to_string(), "5m");
        assert_eq!(Dur::secs(90).to_string(), "90s");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("500KB").unwrap(), 500_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("99999999999GiB").is_err());
        assert_eq!(Size(10 << 20).to_string(), "10MiB");
    }

    #[test]
    fn modes_and_percents() {
        assert_eq!(Mode::try_from("775".to_string()).unwrap(), Mode(0o775));
        assert!(Mode::try_from("789".to_string()).is_err());
        assert_eq!(Percent::try_from("50%".to_string()).unwrap(), Percent(50));
        assert!(Percent::try_from("150%".to_string()).is_err());
        assert!(Percent::try_from("50".to_string()).is_err());
    }

    #[test]
    fn names_must_be_plain() {
        assert!(check_name("users").is_ok());
        assert!(check_name("rizon-net_2").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "sp ace"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
