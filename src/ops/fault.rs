//! Named fault points: a test-only hook that stops the process at a precise step of a
//! crash-safe protocol, so tests can prove that the next run completes what this one began.
//!
//! `CR0SYNC_FAULT=NAME` makes [`point`]`(NAME)` kill the process with SIGKILL (no
//! destructor, no rollback, no flush runs: exactly what a power cut or the OOM killer
//! leaves). `CR0SYNC_FAULT=NAME:enospc` instead makes the point fail with "No space left
//! on device", so the ordinary error path runs (transactions roll back, the run reports
//! the error). `CR0SYNC_FAULT=NAME:sleep=MS` pauses there for MS milliseconds, so a test
//! can write into a database at that precise step, as a concurrent application would.
//! Several points may be given, separated by commas.
//!
//! Like `CR0SYNC_NOW`, this is a test hook: the README documents it as such, and it must
//! never be set in production. When it is unset a point costs one cached lookup.

use std::io;
use std::sync::OnceLock;

pub const FAULT_ENV: &str = "CR0SYNC_FAULT";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Kill,
    NoSpace,
    Sleep(std::time::Duration),
}

fn armed() -> &'static [(String, Action)] {
    static ARMED: OnceLock<Vec<(String, Action)>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let Ok(spec) = std::env::var(FAULT_ENV) else {
            return Vec::new();
        };
        spec.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s.split_once(':') {
                Some((name, "enospc")) => (name.to_string(), Action::NoSpace),
                Some((name, how)) if how.starts_with("sleep=") => {
                    let ms = how["sleep=".len()..].parse().unwrap_or(0);
                    let pause = std::time::Duration::from_millis(ms);
                    (name.to_string(), Action::Sleep(pause))
                }
                _ => (s.to_string(), Action::Kill),
            })
            .collect()
    })
}

/// Whether `CR0SYNC_FAULT` names this point (to install a hook only when a test asks).
pub fn is_armed(name: &str) -> bool {
    armed().iter().any(|(armed, _)| armed == name)
}

/// Passes through unless `CR0SYNC_FAULT` names this point.
pub fn point(name: &str) -> io::Result<()> {
    for (armed, action) in armed() {
        if armed == name {
            match action {
                Action::Kill => {
                    log::logger().flush();
                    // SAFETY: kill(2) on our own pid with a constant signal number.
                    unsafe {
                        libc::kill(libc::getpid(), libc::SIGKILL);
                    }
                }
                Action::NoSpace => {
                    return Err(io::Error::from_raw_os_error(libc::ENOSPC));
                }
                Action::Sleep(pause) => std::thread::sleep(*pause),
            }
        }
    }
    Ok(())
}
