//! Errors and exit codes: the one place that decides what a failure means to the caller.
//!
//! Rules:
//! - Job modules return [`Error`] where the caller must tell cases apart (a lock held, a
//!   configuration mistake, a mass delete); everything else is `anyhow::Error` with
//!   context added at the edge: `.with_context(|| format!("{}: ...", path.display()))`.
//! - The exit code of a failed command is found by walking the `anyhow` chain for an
//!   [`Error`]; a chain without one is a runtime error (exit 1).
//! - `main` prints exactly one line per failure: `cr0sync: <what>: <file>: <why>`, and
//!   when the fix is known, `Try: ...` on the same line, so a 3 a.m. cron mail is one line.
//! - Nothing panics on bad input or an I/O error; nothing but `main` exits the process.

use std::path::PathBuf;

/// The exit status of a command that did not fail outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0: done, nothing to do, or a cron job skipped because its lock is held.
    Success,
    /// Exit 4: an integrity check found something new.
    Findings,
    /// Exit 1: `status --check` found a problem.
    Problems,
}

/// Process exit codes. Scripts rely on these numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Success = 0,
    Runtime = 1,
    Usage = 2,
    LockHeld = 3,
    Findings = 4,
}

impl From<Outcome> for ExitCode {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Success => ExitCode::Success,
            Outcome::Findings => ExitCode::Findings,
            Outcome::Problems => ExitCode::Runtime,
        }
    }
}

/// Who holds a job lock, as written into the lock file by the holder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LockHolder {
    pub pid: u32,
    pub started: String,
}

/// Failures a caller must be able to tell apart.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file that cannot be used: exit 2.
    #[error("configuration error: {}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    /// The root or the configuration file does not exist yet: exit 2.
    #[error("{what} does not exist: {}. Try: cr0sync init{}", path.display(), root_flag(root))]
    NotInitialized {
        what: &'static str,
        path: PathBuf,
        root: Option<PathBuf>,
    },

    /// A bad command-line value that clap cannot check by itself: exit 2.
    #[error("{0}")]
    Usage(String),

    /// Another process holds the job's lock: exit 3 for manual commands.
    #[error("{}", lock_held_message(job, path, holder))]
    LockHeld {
        job: &'static str,
        path: PathBuf,
        holder: Option<LockHolder>,
    },

    /// Several independent tasks of one run failed: one line each, exit 1.
    #[error("{}", .0.join("\n"))]
    Several(Vec<String>),

    /// A security finding that stops a command, such as a tampered baseline: exit 4.
    #[error("{0}")]
    Security(String),
}

fn root_flag(root: &Option<PathBuf>) -> String {
    match root {
        Some(root) => format!(" --root {}", root.display()),
        None => String::new(),
    }
}

fn lock_held_message(job: &str, path: &std::path::Path, holder: &Option<LockHolder>) -> String {
    let who = match holder {
        Some(h) => format!("pid {} since {}", h.pid, h.started),
        None => "another process".to_string(),
    };
    format!(
        "the {job} job is running ({who}): {}. Try: wait for it to finish, or pass --wait 5m",
        path.display()
    )
}

impl Error {
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Config { .. } | Error::NotInitialized { .. } | Error::Usage(_) => {
                ExitCode::Usage
            }
            Error::LockHeld { .. } => ExitCode::LockHeld,
            Error::Several(_) => ExitCode::Runtime,
            Error::Security(_) => ExitCode::Findings,
        }
    }
}

/// The exit code for a failed command: the first typed [`Error`] in the chain decides.
pub fn exit_code_of(err: &anyhow::Error) -> ExitCode {
    err.chain()
        .find_map(|cause| cause.downcast_ref::<Error>())
        .map_or(ExitCode::Runtime, Error::exit_code)
}

/// An I/O error as a reader wants it: "No such file or directory", without "(os error 2)".
pub fn io_text(err: &std::io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// The lines printed for a failed command: one per problem. `{:#}` joins the context
/// chain with ": ", so an error that crossed several layers is still one line.
pub fn render(err: &anyhow::Error) -> Vec<String> {
    if let Some(Error::Several(problems)) = err.downcast_ref::<Error>() {
        return problems
            .iter()
            .map(|p| format!("cr0sync: {}", p.replace('\n', " ")))
            .collect();
    }
    vec![strip_os_error(
        &format!("cr0sync: {err:#}").replace('\n', " "),
    )]
}

/// Drops the " (os error 13)" that std appends: the words before it already say it.
fn strip_os_error(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find(" (os error ") {
        out.push_str(&rest[..i]);
        rest = match rest[i..].find(')') {
            Some(j) => &rest[i + j + 1..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_error_deep_in_chain_decides_exit_code() {
        let err = anyhow::Error::new(Error::config("/x/cr0sync.toml", "line 3: bad"))
            .context("loading configuration");
        assert_eq!(exit_code_of(&err), ExitCode::Usage);
    }

    #[test]
    fn untyped_error_is_runtime() {
        let err: anyhow::Error = std::io::Error::other("disk full").into();
        assert_eq!(exit_code_of(&err), ExitCode::Runtime);
    }

    #[test]
    fn lock_held_names_pid_and_path() {
        let err = Error::LockHeld {
            job: "database",
            path: "/r/locks/database.lock".into(),
            holder: Some(LockHolder {
                pid: 42,
                started: "2026-01-01T00:00:00Z".into(),
            }),
        };
        let text = err.to_string();
        assert!(text.contains("pid 42"), "{text}");
        assert!(text.contains("/r/locks/database.lock"), "{text}");
        assert_eq!(err.exit_code(), ExitCode::LockHeld);
    }

    #[test]
    fn render_is_one_line() {
        let err = anyhow::anyhow!("first\nsecond").context("outer");
        let lines = render(&err);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("cr0sync: outer: first"));
    }

    #[test]
    fn missing_root_says_how_to_create_it() {
        let err: anyhow::Error = Error::NotInitialized {
            what: "root",
            path: "/data/x".into(),
            root: Some("/data/x".into()),
        }
        .into();
        assert!(render(&err)[0].contains("Try: cr0sync init --root /data/x"));
    }

    #[test]
    fn os_error_numbers_are_dropped() {
        let err =
            anyhow::Error::new(std::io::Error::from_raw_os_error(13)).context("cannot open /x");
        assert_eq!(
            render(&err),
            vec!["cr0sync: cannot open /x: Permission denied"]
        );
    }

    #[test]
    fn several_problems_are_one_line_each() {
        let err: anyhow::Error = Error::Several(vec!["a: x".into(), "b: y".into()]).into();
        assert_eq!(render(&err), vec!["cr0sync: a: x", "cr0sync: b: y"]);
        assert_eq!(exit_code_of(&err), ExitCode::Runtime);
    }
}
