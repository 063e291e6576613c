//! The log job as commands see it: syncing every stream, rotating central logs, cleaning
//! old rotations, and the status section.
//!
//! Invariants:
//! - Each stream is its own task; one stream's failure is reported and the others go on.
//!   Within a stream, one unreadable source is reported and the other files still sync.
//! - A stream's checkpoints are saved once per run, after every destination it appended
//!   to was fdatasync'ed.
//! - Rotation runs after the sync under the same lock. When it renames a stream
//!   destination, it records at once that the destination starts again at 0.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::StreamConfig;
use crate::context::Context;
use crate::fsutil;
use crate::logs::rotate::{self, is_rotation};
use crate::logs::source::{Local, Remote, SourceFs};
use crate::logs::stream::{self, FORGET_AFTER_DAYS, StreamState, sync_file};
use crate::ops::section::Section;
use crate::ops::task::{JobRun, Task, TaskDone};
use crate::output::{Table, Tone, paint};
use crate::remote::client::{Hosts, Spec};
use crate::util::glob_match;

fn stream_name(s: &StreamConfig) -> &str {
    s.name.get_ref()
}

/// The host and path of a stream whose `from` is on another host (`ssh://`).
fn remote_from(s: &StreamConfig) -> Option<Result<Spec>> {
    Spec::parse(&s.from.to_string_lossy())
}

/// The source files of a stream on another host: regular files (or links to them) in
/// the remote `from` matching `pattern`, by name.
fn remote_sources(fs: &Remote, from: &Path, s: &StreamConfig) -> Result<Vec<(String, PathBuf)>> {
    let entries = fs.read_dir(from).map_err(|e| {
        anyhow::anyhow!(
            "stream {}: cannot list {}: {}. Try: check `from` in the configuration",
            stream_name(s),
            s.from.display(),
            crate::error::io_text(&e)
        )
    })?;
    let mut out = Vec::new();
    for (name, meta) in entries {
        if !glob_match(&s.pattern, &name) {
            continue;
        }
        if meta.is_file {
            out.push((name.clone(), from.join(name)));
        } else {
            log::warn!(
                "stream {}: {name} in {} is not a regular file, not a log file; skipped. Try: \
                 narrow `pattern`",
                stream_name(s),
                s.from.display()
            );
        }
    }
    Ok(out)
}

/// The source files of a stream: regular files (or links to them) in `from` matching
/// `pattern`, by name. A FIFO, device or directory that matches is named in the log and
/// never opened.
pub fn sources(ctx: &Context, s: &StreamConfig) -> Result<Vec<(String, PathBuf)>> {
    let from = ctx.resolve(&s.from);
    let entries = std::fs::read_dir(&from).map_err(|e| {
        anyhow::anyhow!(
            "stream {}: cannot list {}: {}. Try: check `from` in the configuration",
            stream_name(s),
            from.display(),
            crate::error::io_text(&e)
        )
    })?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !glob_match(&s.pattern, &name) {
            continue;
        }
        let path = e.path();
        if path.is_file() {
            out.push((name, path));
            continue;
        }
        // (A dangling symlink is nothing yet: left out quietly, as before it exists.)
        match crate::fsutil::special_kind(&path) {
            None => {}
            Some(kind) => log::warn!(
                "stream {}: {} is {kind}, not a log file; skipped. Try: narrow `pattern`, or \
                 move it out of {}",
                stream_name(s),
                path.display(),
                from.display()
            ),
        }
    }
    out.sort();
    Ok(out)
}

/// What syncing one stream did.
#[derive(Debug, Clone, Default)]
pub struct StreamReport {
    pub files: usize,
    pub copied: u64,
    pub unfinished: usize,
    /// Bytes that vanished before they could be copied.
    pub lost: u64,
    pub skipped: usize,
    pub errors: Vec<String>,
}

/// Syncs one stream. `fast`: skip sources whose inode, size and mtime are unchanged. A
/// stream on another host is read over that host's connection in `hosts`.
pub fn sync_stream(
    ctx: &Context,
    s: &StreamConfig,
    fast: bool,
    dry_run: bool,
    now: DateTime<Utc>,
    hosts: &Hosts,
) -> Result<StreamReport> {
    match remote_from(s) {
        None => {
            let sources = sources(ctx, s)?;
            sync_sources(ctx, s, &Local, &sources, fast, dry_run, now)
        }
        Some(spec) => {
            let spec = spec?;
            let conn = hosts.get(&spec)?;
            let fs = Remote::new(&conn);
            let sources = remote_sources(&fs, Path::new(&spec.path), s)?;
            sync_sources(ctx, s, &fs, &sources, fast, dry_run, now)
        }
    }
}

/// Syncs a stream's `sources`, read through `fs`.
fn sync_sources<F: SourceFs>(
    ctx: &Context,
    s: &StreamConfig,
    fs: &F,
    sources: &[(String, PathBuf)],
    fast: bool,
    dry_run: bool,
    now: DateTime<Utc>,
) -> Result<StreamReport> {
    let name = stream_name(s);
    let to = ctx.resolve(&s.to);
    let state_file = stream::state_name(name);
    let mut state: StreamState = ctx.state.load(&state_file)?.unwrap_or_default();
    // When a run last changed this stream's state (it is saved only then): a new source's
    // rotations changed since are content no run saw.
    let since = std::fs::metadata(ctx.state.path(&state_file))
        .and_then(|m| m.modified())
        .ok()
        .map(DateTime::<Utc>::from);
    let before = state.clone();
    let mut report = StreamReport::default();
    if !dry_run {
        fsutil::ensure_dir(&to, &ctx.perms)
            .with_context(|| format!("cannot create {}", to.display()))?;
    }
    for (file, path) in sources {
        report.files += 1;
        let mut cp = state.files.get(file).cloned();
        if dry_run {
            let size = fs.metadata(path).map(|m| m.size).unwrap_or(0);
            report.copied += size.saturating_sub(cp.map_or(0, |c| c.offset));
            continue;
        }
        let dest = to.join(file);
        let new = !dest.exists();
        match sync_file(fs, path, &dest, &mut cp, fast, since) {
            Ok(r) => {
                if new && dest.exists() {
                    ctx.perms.apply_file(&dest).with_context(|| {
                        format!("cannot set the owner and mode of {}", dest.display())
                    })?;
                }
                report.copied += r.copied;
                report.unfinished += r.unfinished;
                report.lost += r.lost;
                state.copied_total += r.copied;
                if r.unfinished > 0 {
                    state.lost_bytes += r.lost;
                    state.last_loss = Some(now);
                }
                report.skipped += usize::from(r.skipped);
                if let Some(cp) = cp {
                    state.files.insert(file.clone(), cp);
                }
            }
            Err(e) => {
                log::error!("stream {name}: {e:#}");
                report.errors.push(format!("{e:#}"));
            }
        }
    }
    // Sources that disappeared keep their checkpoint for a week.
    let present: std::collections::BTreeSet<&String> = sources.iter().map(|(n, _)| n).collect();
    state.files.retain(|file, cp| {
        if present.contains(file) {
            return true;
        }
        let since = *cp.missing_since.get_or_insert(now);
        let keep = now - since < chrono::Duration::days(FORGET_AFTER_DAYS);
        if !keep {
            log::info!(
                "stream {name}: {file} is gone for {FORGET_AFTER_DAYS} days; checkpoint dropped"
            );
        }
        keep
    });
    if !dry_run && state != before {
        ctx.state.save(&state_file, &state)?;
    }
    if let Some(first) = report.errors.first() {
        anyhow::bail!(
            "stream {name}: {} of {} file(s) failed; first: {first}",
            report.errors.len(),
            report.files
        );
    }
    Ok(report)
}

/// Syncs every stream as one task each; one connection per host for the whole run.
pub fn sync_streams(run: &mut JobRun, fast: bool) {
    let ctx = run.ctx;
    let hosts = Hosts::new(&ctx.config.remote);
    hosts.open_all(ctx.config.logs.stream.iter().map(|s| s.from.as_path()));
    for s in &ctx.config.logs.stream {
        let (dry, now) = (run.dry_run, run.now);
        run.task(&format!("sync {}", stream_name(s)), |run| {
            let r = sync_stream(ctx, s, fast, dry, now, &hosts)?;
            run.gauge("cr0sync_logs_bytes_copied", r.copied as f64);
            run.gauge("cr0sync_logs_bytes_lost", r.lost as f64);
            let mut detail = format!(
                "{} file(s), {} byte(s) {}copied",
                r.files,
                r.copied,
                if dry { "would be " } else { "" }
            );
            if r.skipped > 0 {
                detail.push_str(&format!(", {} unchanged", r.skipped));
            }
            if r.unfinished > 0 {
                detail.push_str(&format!(
                    ", {} rotated file(s) could not be finished: {} byte(s) lost (see the log)",
                    r.unfinished, r.lost
                ));
            }
            Ok(TaskDone::new(detail))
        });
    }
    if let Err(e) = crate::remote::client::record_hosts(&ctx.state, &hosts, run.now, run.dry_run) {
        log::warn!("cannot record which hosts were reachable: {e:#}");
    }
}

/// A file `logs rotate` considers, with its size and whether a killed rotation left its
/// raw `name.1` behind (both read from one directory listing: no extra stat per file).
#[derive(Debug, Clone)]
pub struct Target {
    pub path: PathBuf,
    pub size: u64,
    pub leftover: bool,
}

/// Every stream destination and every `[logs].rotate` match.
pub fn rotation_targets(ctx: &Context) -> Vec<Target> {
    let mut out: Vec<Target> = Vec::new();
    // `known`: sizes cr0sync recorded itself (stream destinations have no other writer),
    // so those files need no stat.
    let mut add_dir =
        |dir: &Path, pattern: &str, known: &std::collections::BTreeMap<String, u64>| {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            let entries: Vec<_> = entries.flatten().collect();
            let names: std::collections::HashSet<String> = entries
                .iter()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            for e in &entries {
                let n = e.file_name().to_string_lossy().into_owned();
                let plain = !is_rotation(&n) && !n.ends_with(".tmp") && !n.contains(".tmp.");
                if !plain || !glob_match(pattern, &n) {
                    continue;
                }
                let size = match known.get(&n) {
                    Some(&size) if e.file_type().is_ok_and(|t| t.is_file()) => size,
                    _ => match e.metadata() {
                        Ok(meta) if meta.is_file() => meta.len(),
                        _ => continue,
                    },
                };
                out.push(Target {
                    path: e.path(),
                    size,
                    leftover: names.contains(&format!("{n}.1")),
                });
            }
        };
    for s in &ctx.config.logs.stream {
        // Only a shortcut (sizes cr0sync recorded): without it every file is stat'ed.
        let state: StreamState = match ctx.state.load(&stream::state_name(stream_name(s))) {
            Ok(state) => state.unwrap_or_default(),
            Err(e) => {
                log::warn!("{e:#} (rotation reads the sizes from the files instead)");
                StreamState::default()
            }
        };
        let known = state
            .files
            .iter()
            .map(|(name, cp)| (name.clone(), cp.dest_len))
            .collect();
        add_dir(&ctx.resolve(&s.to), &s.pattern, &known);
    }
    let logs = ctx.layout.logs_dir();
    let none = std::collections::BTreeMap::new();
    for g in &ctx.config.logs.rotate {
        let (dir, pattern) = match g.rsplit_once('/') {
            Some((d, p)) => (logs.join(d), p.to_string()),
            None => (logs.clone(), g.clone()),
        };
        add_dir(&dir, &pattern, &none);
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out.dedup_by(|a, b| a.path == b.path);
    out
}

/// Rotates every target larger than `rotate_size`; returns (file, size) of each.
pub fn rotate_all(ctx: &Context, dry_run: bool) -> Result<Vec<(PathBuf, u64)>> {
    let limit = ctx.config.logs.rotate_size.0;
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for Target {
        path,
        size,
        leftover,
    } in rotation_targets(ctx)
    {
        if leftover
            && !dry_run
            && let Err(e) = rotate::finish_leftover(&path, &ctx.perms)
        {
            errors.push(format!("{e:#}"));
        }
        if size <= limit {
            continue;
        }
        if dry_run {
            done.push((path, size));
            continue;
        }
        let result = rotate::rotate_file(&path, ctx.config.logs.rotate_keep, &ctx.perms, || {
            destination_restarted(ctx, &path)
        });
        match result {
            Ok(gz) => {
                log::info!(
                    "rotated {} ({size} bytes) to {}",
                    path.display(),
                    gz.display()
                );
                done.push((path, size));
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if let Some(first) = errors.first() {
        anyhow::bail!("{} rotation(s) failed; first: {first}", errors.len());
    }
    Ok(done)
}

/// A stream destination was renamed away: its checkpoint's destination length is now 0.
fn destination_restarted(ctx: &Context, dest: &Path) -> Result<()> {
    for s in &ctx.config.logs.stream {
        let to = ctx.resolve(&s.to);
        let Some(file) = dest.strip_prefix(&to).ok().and_then(|f| f.to_str()) else {
            continue;
        };
        let name = stream::state_name(stream_name(s));
        let mut state: StreamState = ctx.state.load(&name)?.unwrap_or_default();
        if let Some(cp) = state.files.get_mut(file) {
            cp.dest_len = 0;
            ctx.state.save(&name, &state)?;
        }
    }
    Ok(())
}

/// Removes rotations (`*.N.gz`) under `logs/` older than `rotated_max_age`.
pub fn clean_rotations(ctx: &Context, dry_run: bool, now: DateTime<Utc>) -> Result<Vec<PathBuf>> {
    let max_age = chrono::Duration::from_std(ctx.config.logs.rotated_max_age.0)
        .unwrap_or(chrono::Duration::MAX);
    let mut removed = Vec::new();
    let mut dirs: Vec<PathBuf> = vec![ctx.layout.logs_dir()];
    dirs.extend(ctx.config.logs.stream.iter().map(|s| ctx.resolve(&s.to)));
    for dir in dirs {
        for e in walkdir::WalkDir::new(&dir).into_iter().flatten() {
            let name = e.file_name().to_string_lossy();
            if !e.file_type().is_file()
                || !is_rotation(&name)
                || removed.contains(&e.path().to_path_buf())
            {
                continue;
            }
            let Some(modified) = e.metadata().ok().and_then(|m| m.modified().ok()) else {
                continue;
            };
            let modified: DateTime<Utc> = modified.into();
            if now - modified > max_age {
                if !dry_run {
                    std::fs::remove_file(e.path())
                        .with_context(|| format!("cannot remove {}", e.path().display()))?;
                }
                removed.push(e.path().to_path_buf());
            }
        }
    }
    Ok(removed)
}

/// The periodic task that removes rotated files past their age.
pub const CLEAN_ROTATIONS: Task = Task::new("clean-rotations");

/// The cron job's tasks: sync (fast path), rotate, and daily cleanup.
pub fn cron_tasks(run: &mut JobRun) -> Result<()> {
    sync_streams(run, true);
    run.task("rotate", |run| {
        let done = rotate_all(run.ctx, run.dry_run)?;
        Ok(TaskDone::new(format!("{} file(s) rotated", done.len())))
    });
    run.periodic(CLEAN_ROTATIONS, |run| {
        let removed = clean_rotations(run.ctx, run.dry_run, run.now)?;
        Ok(TaskDone::new(format!(
            "{} old rotation(s) removed",
            removed.len()
        )))
    });
    Ok(())
}

/// One stream in `logs status` and the `streams` status section.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    pub stream: String,
    pub from: String,
    pub to: String,
    pub files: usize,
    /// Bytes copied over the stream's life (a stream copied before this was counted
    /// reports what its current destinations hold, at least).
    pub bytes_copied: u64,
    pub bytes_behind: u64,
    /// Bytes that vanished before they could be copied, over the stream's life.
    pub bytes_lost: u64,
    pub last_loss: Option<String>,
    pub error: Option<String>,
}

pub fn stream_statuses(ctx: &Context) -> Result<Vec<StreamStatus>> {
    let mut out = Vec::new();
    let hosts = crate::remote::client::load_hosts(&ctx.state)?;
    for s in &ctx.config.logs.stream {
        let state: StreamState = ctx
            .state
            .load(&stream::state_name(stream_name(s)))?
            .unwrap_or_default();
        let mut st = StreamStatus {
            stream: stream_name(s).to_string(),
            from: match remote_from(s) {
                Some(_) => s.from.display().to_string(),
                None => ctx.resolve(&s.from).display().to_string(),
            },
            to: ctx.resolve(&s.to).display().to_string(),
            files: 0,
            bytes_copied: state
                .copied_total
                .max(state.files.values().map(|c| c.dest_len).sum()),
            bytes_behind: 0,
            bytes_lost: state.lost_bytes,
            last_loss: state.last_loss.map(crate::ops::clock::rfc3339),
            error: None,
        };
        // A rotated file still followed counts as behind by what it got since.
        for c in state.files.values() {
            if let Some(r) = &c.rotated {
                st.bytes_behind += r.size.saturating_sub(r.offset);
            }
        }
        if let Some(spec) = remote_from(s) {
            // Not connected for a status: the files as the last run saw them, and whether
            // their host was reachable then.
            st.files = state
                .files
                .values()
                .filter(|c| c.missing_since.is_none())
                .count();
            st.bytes_behind += state
                .files
                .values()
                .map(|c| c.size.saturating_sub(c.offset))
                .sum::<u64>();
            let host = spec.map(|s| s.host_label()).unwrap_or_default();
            if let Some(h) = hosts.get(&host)
                && !h.reachable
            {
                st.error = Some(format!(
                    "stream {}: host {host} was not reachable at the last run ({}): {}. Try: \
                     `cr0sync logs sync` by hand shows the ssh error; the lines not copied yet \
                     wait on that host",
                    stream_name(s),
                    crate::ops::clock::rfc3339(h.last_run),
                    h.error.as_deref().unwrap_or("no answer")
                ));
            }
            out.push(st);
            continue;
        }
        match sources(ctx, s) {
            Ok(files) => {
                st.files = files.len();
                for (name, path) in files {
                    use std::os::unix::fs::MetadataExt;
                    let Ok(meta) = std::fs::metadata(&path) else {
                        continue;
                    };
                    // The checkpoint counts only while it describes this very file.
                    let done = state
                        .files
                        .get(&name)
                        .filter(|c| c.ino == meta.ino())
                        .map_or(0, |c| c.offset);
                    let size = meta.len();
                    st.bytes_behind += size.saturating_sub(done);
                }
            }
            Err(e) => st.error = Some(format!("{e:#}")),
        }
        out.push(st);
    }
    Ok(out)
}

/// The `streams` section of `status`.
pub fn section(ctx: &Context) -> Result<Section> {
    let streams = stream_statuses(ctx)?;
    let mut table = Table::new(["STREAM", "FILES", "COPIED", "BEHIND", "LOST", "STATE"]);
    let mut problems = Vec::new();
    let now = crate::ops::clock::now();
    for s in &streams {
        // Content lost in the last 7 days is a problem (then it is history: bytes_lost).
        let recent_loss = s.last_loss.as_deref().is_some_and(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .is_ok_and(|t| now - t.with_timezone(&chrono::Utc) < chrono::Duration::days(7))
        });
        if recent_loss {
            problems.push(format!(
                "stream {} lost content: a rotated source vanished before cr0sync could copy \
                 the end of it (at least {} byte(s) in all; last at {}). Try: look in {} for \
                 the rotation and append what is missing by hand; rotate with delaycompress, \
                 or less often than cron logs runs",
                s.stream,
                s.bytes_lost,
                s.last_loss.as_deref().unwrap_or("?"),
                s.from
            ));
        }
        let state = match &s.error {
            Some(e) => {
                problems.push(e.clone());
                paint("error", Tone::Bad)
            }
            None if recent_loss => paint("lost", Tone::Bad),
            None if s.bytes_behind > 0 => paint("behind", Tone::Warn),
            None => paint("ok", Tone::Good),
        };
        table.row([
            s.stream.clone(),
            s.files.to_string(),
            s.bytes_copied.to_string(),
            s.bytes_behind.to_string(),
            s.bytes_lost.to_string(),
            state,
        ]);
    }
    Ok(Section {
        key: "streams",
        title: "Log streams",
        json: serde_json::to_value(&streams)?,
        table,
        problems,
    })
}
