//! Human output: compact aligned tables, colour only on a terminal, and a progress line
//! for long runs on a terminal only. Stdout carries data only; messages go
//! through `log` or the error path, progress to stderr.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A table of text cells, rendered with columns aligned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        Table {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Renders the table; the last column is not padded, so lines carry no trailing blanks.
    pub fn render(&self) -> String {
        let cols = self
            .headers
            .len()
            .max(self.rows.iter().map(Vec::len).max().unwrap_or(0));
        let mut widths = vec![0; cols];
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Paints `text` for a terminal: green for good, yellow for attention, red for failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Good,
    Warn,
    Bad,
}

pub fn paint(text: &str, tone: Tone) -> String {
    if !std::io::stdout().is_terminal() || std::env::var_os("NO_COLOR").is_some() {
        return text.to_string();
    }
    let code = match tone {
        Tone::Good => "32",
        Tone::Warn => "33",
        Tone::Bad => "31",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// Milliseconds for people: `12 ms`, `3.4 s`, `2m05s`.
pub fn human_ms(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms} ms"),
        1000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60),
    }
}

/// Bytes for people: `512 B`, `3.4 KiB`, `1.2 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Whether a progress line is on the terminal now. Progress lines and the warnings logged
/// to stderr both write under this lock, so a warning first erases the line (the next tick
/// draws it again below the warning).
static LINE_SHOWN: Mutex<bool> = Mutex::new(false);

/// Writes `text` to stderr, first erasing a progress line if one is showing.
pub fn stderr_text(text: &str) {
    let mut shown = LINE_SHOWN.lock().unwrap_or_else(|e| e.into_inner());
    let mut err = std::io::stderr().lock();
    if *shown {
        let _ = err.write_all(b"\r\x1b[2K");
        *shown = false;
    }
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

/// Draws (`Some`) or erases (`None`) the progress line.
fn progress_text(line: Option<&str>) {
    let mut shown = LINE_SHOWN.lock().unwrap_or_else(|e| e.into_inner());
    let mut err = std::io::stderr().lock();
    if line.is_none() && !*shown {
        return;
    }
    let _ = write!(err, "\r\x1b[2K{}", line.unwrap_or_default());
    let _ = err.flush();
    *shown = line.is_some();
}

/// Test hook: milliseconds before a progress line first appears (default 1,000), and
/// `CR0SYNC_PROGRESS_AFTER_MS` with a pseudo-terminal lets a test see one on a short run.
const PROGRESS_AFTER_ENV: &str = "CR0SYNC_PROGRESS_AFTER_MS";

/// A progress line for a long run (a first baseline, a first sync of a large database).
///
/// Invariants: drawn on stderr only when stderr is a terminal (cron, pipes and files never
/// see it), only once the run has taken more than a second, redrawn at most ten times a
/// second by its own thread (so a long single step still shows time passing), erased
/// when the value is dropped, before anything else is printed, and erased before each
/// warning logged to stderr ([`stderr_text`]). `add` is a relaxed atomic
/// add, cheap enough for every block read and safe from several threads.
#[derive(Debug)]
pub struct Progress {
    shared: Option<Arc<Shared>>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    label: Mutex<String>,
    total: AtomicU64,
    done: AtomicU64,
    started: Instant,
    stop: (Mutex<bool>, Condvar),
}

impl Progress {
    /// A progress line for `label`; `total` bytes (or steps) to do, 0 if unknown.
    pub fn new(label: impl Into<String>, total: u64) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress {
                shared: None,
                ticker: None,
            };
        }
        let after = std::env::var(PROGRESS_AFTER_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(1), Duration::from_millis);
        let shared = Arc::new(Shared {
            label: Mutex::new(label.into()),
            total: AtomicU64::new(total),
            done: AtomicU64::new(0),
            started: Instant::now(),
            stop: (Mutex::new(false), Condvar::new()),
        });
        let mine = Arc::clone(&shared);
        let ticker = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || mine.tick(after))
            .ok();
        Progress {
            shared: Some(shared),
            ticker,
        }
    }

    /// Counts `n` more bytes (or steps) done.
    pub fn add(&self, n: u64) {
        if let Some(s) = &self.shared {
            s.done.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Names what is being done now.
    pub fn stage(&self, label: impl Into<String>) {
        if let Some(s) = &self.shared
            && let Ok(mut l) = s.label.lock()
        {
            *l = label.into();
        }
    }
}

impl Shared {
    fn tick(&self, after: Duration) {
        let (lock, wake) = &self.stop;
        let mut drawn = false;
        let Ok(mut stopped) = lock.lock() else {
            return;
        };
        loop {
            let wait = if drawn {
                Duration::from_millis(100)
            } else {
                after.saturating_sub(self.started.elapsed())
            };
            stopped = match wake.wait_timeout_while(stopped, wait, |s| !*s) {
                Ok((s, _)) => s,
                Err(_) => return,
            };
            if *stopped {
                break;
            }
            if self.started.elapsed() >= after {
                let label = self.label.lock().map(|l| l.clone()).unwrap_or_default();
                let line = progress_line(
                    &label,
                    self.done.load(Ordering::Relaxed),
                    self.total.load(Ordering::Relaxed),
                    self.started.elapsed(),
                );
                progress_text(Some(&line));
                drawn = true;
            }
        }
        progress_text(None);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(s) = &self.shared {
            let (lock, wake) = &s.stop;
            if let Ok(mut stopped) = lock.lock() {
                *stopped = true;
            }
            wake.notify_all();
        }
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

/// One progress line: a bar with the share done when the total is known, else what was
/// done so far; then the time taken.
fn progress_line(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let time = human_ms(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
    if total == 0 {
        return match done {
            0 => format!("{label}  {time}"),
            _ => format!("{label}  {}  {time}", human_bytes(done)),
        };
    }
    let share = (done.min(total) as f64 / total as f64).clamp(0.0, 1.0);
    // 24ths done, rounded: at most 24.
    let (d, t) = (u128::from(done.min(total)), u128::from(total));
    let filled = usize::try_from((d * 24 + t / 2) / t).unwrap_or(24).min(24);
    format!(
        "{label} [{}{}] {:>3.0}%  {} / {}  {time}",
        "#".repeat(filled),
        "-".repeat(24 - filled),
        share * 100.0,
        human_bytes(done.min(total)),
        human_bytes(total)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_with_and_without_a_total() {
        assert_eq!(
            progress_line("baseline", 1 << 29, 1 << 31, Duration::from_millis(3400)),
            "baseline [######------------------]  25%  512.0 MiB / 2.0 GiB  3.4 s"
        );
        assert_eq!(
            progress_line("main/bot: snapshot", 0, 0, Duration::from_millis(1200)),
            "main/bot: snapshot  1.2 s"
        );
        assert_eq!(human_bytes(1023), "1023 B");
    }

    #[test]
    fn aligns_columns_without_trailing_blanks() {
        let mut t = Table::new(["JOB", "RESULT", "NOTE"]);
        t.row(["database", "ok", ""]);
        t.row(["logs", "never", "x"]);
        assert_eq!(
            t.render(),
            "JOB       RESULT  NOTE\ndatabase  ok\nlogs      never   x\n"
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_ms(12), "12 ms");
        assert_eq!(human_ms(3400), "3.4 s");
        assert_eq!(human_ms(125_000), "2m05s");
    }
}
