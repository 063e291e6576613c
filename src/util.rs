//! Small helpers every part of cr0sync shares, so each exists once.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// The bytes of lower- or upper-case hexadecimal `text`; `None` if it is not that.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A file's modification time in nanoseconds since the epoch (exact: i128 never wraps).
pub fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

/// `path` with `suffix` appended to its last component (`x.db` + `-wal`, `a.log` + `.1`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Whether `name` matches a glob of `*` (any run of bytes) and `?` (one byte).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// The `/`-separated components of a path or pattern, without empty ones.
pub fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

/// Whether path components `n` match pattern components `p`: `**` matches any number of
/// components, other components are globs ([`glob_match`]).
pub fn matches_segments(p: &[&str], n: &[&str]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some(&"**") => {
            matches_segments(&p[1..], n) || (!n.is_empty() && matches_segments(p, &n[1..]))
        }
        Some(seg) => !n.is_empty() && glob_match(seg, n[0]) && matches_segments(&p[1..], &n[1..]),
    }
}

/// Whether a relative path matches a pattern: a pattern without `/` matches the last
/// component (`*.json`), one with `/` the whole path (`users/**/*.json`).
pub fn path_match(pattern: &str, rel: &str) -> bool {
    if pattern.contains('/') || pattern == "**" {
        matches_segments(&segments(pattern), &segments(rel))
    } else {
        glob_match(pattern, rel.rsplit('/').next().unwrap_or(rel))
    }
}

/// How many threads a parallel step uses: every core, at most 8.
pub fn workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8)
}

/// `f` of every item, on up to [`workers`] threads, in the items' order. An item whose
/// worker panicked has `None` (the panic hook of the binary ends the process first).
pub fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<Option<R>> {
    parallel_map_n(items, workers(), f)
}

/// As [`parallel_map`], on `n` threads (for work that waits rather than computes, such
/// as opening connections).
pub fn parallel_map_n<T: Sync, R: Send>(
    items: &[T],
    n: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<Option<R>> {
    let next = AtomicUsize::new(0);
    let parts: Vec<Vec<(usize, R)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n.max(1).min(items.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        mine.push((i, f(item)));
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let mut out: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    for (i, r) in parts.into_iter().flatten() {
        out[i] = Some(r);
    }
    out
}

/// Wall time per phase of a run, for the log (`snapshot 12 ms, diff 30 ms`).
#[derive(Debug)]
pub struct Phases {
    last: std::time::Instant,
    /// Each phase as shown, with the peak RSS (MiB) at its end.
    done: Vec<(String, u64)>,
    notes: Vec<String>,
}

/// The process's peak resident set so far, in MiB (Linux `VmHWM`; 0 where unknown).
pub fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

impl Phases {
    pub fn start() -> Self {
        Phases {
            last: std::time::Instant::now(),
            done: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// A detail of the phase under way (shown with it, in parentheses).
    pub fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    /// Ends the phase `name` now.
    pub fn mark(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        let ms = (now - self.last).as_millis();
        let shown = if self.notes.is_empty() {
            format!("{name} {ms} ms")
        } else {
            format!("{name} {ms} ms ({})", self.notes.join("; "))
        };
        self.notes.clear();
        self.done.push((shown, peak_rss_mib()));
        self.last = now;
    }

    pub fn text(&self) -> String {
        let parts: Vec<String> = self.done.iter().map(|(shown, _)| shown.clone()).collect();
        let peaks: Vec<String> = self.done.iter().map(|(_, mib)| mib.to_string()).collect();
        format!(
            "{} (peak RSS after each, MiB: {})",
            parts.join(", "),
            peaks.join("/")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
        assert_eq!(unhex("000fA5ff"), Some(vec![0x00, 0x0f, 0xa5, 0xff]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.log", "#cr0.log"));
        assert!(!glob_match("*.log", "#cr0.log.1"));
        assert!(glob_match("a?c*", "abcdef"));
        assert!(!glob_match("a?c", "ac"));
    }

    #[test]
    fn parallel_map_keeps_the_order_of_its_items() {
        let items: Vec<u64> = (0..1000).collect();
        let out = parallel_map(&items, |i| i * 2);
        assert_eq!(out.len(), 1000);
        assert!(
            out.iter()
                .enumerate()
                .all(|(i, r)| *r == Some(i as u64 * 2))
        );
        assert!(parallel_map(&[] as &[u8], |_| 0).is_empty());
        assert_eq!(
            with_suffix(Path::new("/a/x.db"), "-wal"),
            Path::new("/a/x.db-wal")
        );
    }
}
