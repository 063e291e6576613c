//! Helpers shared by the end-to-end tests: the real binary, real temporary roots.
#![allow(
    clippy::panic,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    dead_code
)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod sshd;

pub const BIN: &str = env!("CARGO_BIN_EXE_cr0sync");

/// The cr0sync binary with a clean environment (no CR0SYNC_* from the caller).
pub fn cr0sync() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::new(BIN);
    for var in [
        "CR0SYNC_ROOT",
        "CR0SYNC_CONFIG",
        "CR0SYNC_NOW",
        "CR0SYNC_BIN",
        "CR0SYNC_FAULT",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// The points of a database sync's commit protocol a test can stop it at with
/// `CR0SYNC_FAULT` (see `src/db/journal.rs`), in order.
pub const FAULT_POINTS: [&str; 6] = [
    "after-journal",
    "after-peer-commit",
    "before-central-commit",
    "during-central-commit",
    "after-central-commit",
    "after-conflicts-append",
];

/// A temporary directory and an initialized root inside it.
pub struct Root {
    pub tmp: tempfile::TempDir,
    pub root: PathBuf,
}

/// `cr0sync --root ROOT init`, which must succeed.
pub fn init(root: &Path) {
    cr0sync()
        .arg("--root")
        .arg(root)
        .arg("init")
        .assert()
        .success();
}

impl Root {
    pub fn new() -> Root {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        init(&root);
        Root { tmp, root }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// cr0sync with `--root` set to this root.
    pub fn cmd(&self) -> assert_cmd::Command {
        let mut cmd = cr0sync();
        cmd.arg("--root").arg(&self.root);
        cmd
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(self.root.join("cr0sync.toml"), text).expect("write config");
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = self
            .cmd()
            .args(["status", "--json"])
            .output()
            .expect("status");
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Waits (up to 20 s) until `path` exists: a run paused at a fault point has reached it.
pub fn wait_for(path: &Path) {
    let start = std::time::Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether a test that needs root can run. Not as root it says it was skipped; under
/// `CI=true` (CI runs as root) it fails instead, so a root-only test never passes silently.
pub fn needs_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "this test needs root ({what}); CI runs the tests as root"
    );
    eprintln!("skipped: {what} needs root");
    false
}

/// Runs the binary as the unprivileged user `nobody` when the tests run as root, so that
/// permission bits mean something (root ignores them). Returns a std Command.
pub fn cr0sync_unprivileged() -> Command {
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    for var in ["CR0SYNC_ROOT", "CR0SYNC_CONFIG", "CR0SYNC_NOW"] {
        cmd.env_remove(var);
    }
    cmd
}

/// Lets `nobody` traverse a temporary directory (tempfile makes them 0700).
pub fn open_up(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("metadata").mode() & 0o7777
}

pub fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `cr0sync --root ROOT ARGS` on a pseudo-terminal (util-linux `script`) with the
/// progress line's one-second delay taken away, asserts success, and returns what the
/// terminal showed (stdout and stderr together) and the text after the last erased
/// progress line.
pub fn on_a_terminal(root: &Path, args: &str) -> (String, String) {
    let line = format!(
        "CR0SYNC_PROGRESS_AFTER_MS=0 {BIN} --root {} {args}",
        root.display()
    );
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .output()
        .expect("script");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let tty = String::from_utf8_lossy(&out.stdout).into_owned();
    let after = tty
        .rsplit("\r\x1b[2K")
        .next()
        .unwrap_or_default()
        .to_string();
    (tty, after)
}

/// A temporary directory with `root/` holding only a `cr0sync.toml` of `config`.
pub fn root_with_config(config: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).expect("mkdir root");
    std::fs::write(root.join("cr0sync.toml"), config).expect("write config");
    (tmp, root)
}

/// Runs `cr0sync --root ROOT ARGS...` and asserts the exit code and that stderr is one line
/// containing every needle. Returns stderr.
pub fn expect_failure(root: &Path, args: &[&str], code: i32, needles: &[&str]) -> String {
    let out = cr0sync()
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run");
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
    err
}

/// Runs `cr0sync --root ROOT ARGS...` again and again and SIGKILLs each run a little later
/// than the one before (`step` more each time), until a run finishes by itself. Each
/// killed run starts from what the previous one left, so every moment of a run's life is
/// cut once. `between(round)` runs after each killed run. Returns how many were killed.
pub fn kill_at_later_and_later_moments(
    root: &Path,
    args: &[&str],
    step: std::time::Duration,
    max_rounds: u32,
    mut between: impl FnMut(u32),
) -> usize {
    let mut killed = 0;
    for round in 0..max_rounds {
        let mut child = Command::new(BIN)
            .arg("--root")
            .arg(root)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn cr0sync");
        std::thread::sleep(step * round);
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        child.kill().expect("kill");
        child.wait().expect("wait");
        killed += 1;
        between(round);
    }
    killed
}

/// Runs cr0sync on `root` with `args` and the fault point `point` armed, and checks the
/// run was killed there (SIGKILL, no exit code).
pub fn killed_at(root: &Path, args: &[&str], point: &str) {
    let out = Command::new(BIN)
        .arg("--root")
        .arg(root)
        .args(args)
        .env("CR0SYNC_FAULT", point)
        .output()
        .expect("run cr0sync");
    assert_eq!(
        out.status.code(),
        None,
        "{point}: killed, {}",
        stderr_of(&out)
    );
}

/// Starts cr0sync on `root` with `args` in the background, its stderr kept for the test.
pub fn spawn(root: &Path, args: &[&str]) -> std::process::Child {
    Command::new(BIN)
        .arg("--root")
        .arg(root)
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn cr0sync")
}
