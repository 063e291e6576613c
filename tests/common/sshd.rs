//! A real OpenSSH server (Debian's openssh-server) on 127.0.0.1 for the tests of peers on
//! other hosts: throwaway host and user keys and a throwaway user, never the machine's
//! own sshd, keys or ~/.ssh.
#![allow(clippy::panic, clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use super::{BIN, stderr_of};

/// A throwaway user, an sshd on a free port of 127.0.0.1 that lets it in with a
/// throwaway key, and a copy of cr0sync it can run. All removed when dropped.
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub user: String,
    pub port: u16,
    child: Child,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", stderr_of(&out));
}

impl Sshd {
    /// `None` (with a note) where the test cannot run: not root, or no sshd installed
    /// (`.ci/run` installs it, so CI always runs these tests).
    pub fn start(authorized_options: &str) -> Option<Sshd> {
        if !super::needs_root("creating a throwaway user for sshd") {
            return None;
        }
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "/usr/sbin/sshd is missing: apt-get install openssh-server (.ci/run does)"
        );
        let dir = tempfile::Builder::new()
            .prefix("cr0sync-sshd")
            .tempdir()
            .unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let user = format!("cr0s{}x{n}", std::process::id() % 100_000);
        // `-p '*'`: no password, but not a locked account (sshd without PAM refuses those).
        run(Command::new("useradd").args([
            "-M",
            "-N",
            "-p",
            "*",
            "-d",
            &d.display().to_string(),
            "-s",
            "/bin/sh",
            &user,
        ]));
        // A copy of the binary the user can run; host and user keys.
        let bin = d.join("cr0sync");
        std::fs::copy(BIN, &bin).unwrap();
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join("host_key")));
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join("user_key")));
        let pubkey = std::fs::read_to_string(d.join("user_key.pub")).unwrap();
        let options = authorized_options.replace("BIN", &bin.display().to_string());
        std::fs::write(d.join("authorized_keys"), format!("{options}{pubkey}")).unwrap();
        let port = free_port();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "ListenAddress 127.0.0.1\nPort {port}\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nPidFile none\nAllowUsers {user}\nLogLevel ERROR\n",
                hk = d.join("host_key").display(),
                ak = d.join("authorized_keys").display(),
            ),
        )
        .unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let sshd = Sshd {
            dir,
            user,
            port,
            child,
        };
        // Ready when the port answers.
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(sshd);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "sshd did not start: {}",
            std::fs::read_to_string(sshd.dir.path().join("sshd.log")).unwrap_or_default()
        );
    }

    /// A directory the remote user owns.
    pub fn user_dir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        run(Command::new("chown").arg("-R").arg(&self.user).arg(&p));
        p
    }

    /// Kills every ssh client connected to this sshd (a connection cut from the client's
    /// side).
    pub fn cut_connections(&self) {
        run(Command::new("pkill").args(["-f", &format!("ssh .*-p {} ", self.port)]));
    }

    pub fn url(&self, path: &Path) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}{}",
            self.user,
            self.port,
            path.display()
        )
    }

    /// The `[remote]` section that reaches this sshd with the throwaway key only.
    pub fn remote_section(&self) -> String {
        format!(
            "[remote]\nssh = [\"ssh\", \"-F\", \"/dev/null\", \"-i\", \"{}\", \"-o\", \"BatchMode=yes\", \
             \"-o\", \"StrictHostKeyChecking=no\", \"-o\", \"UserKnownHostsFile=/dev/null\", \
             \"-o\", \"LogLevel=ERROR\", \"-o\", \"ConnectTimeout=5\"]\nremote_bin = \"{}\"\n",
            self.dir.path().join("user_key").display(),
            self.dir.path().join("cr0sync").display()
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("pkill").args(["-u", &self.user]).output();
        let _ = Command::new("userdel").arg(&self.user).output();
    }
}

/// Where a test's peers live: in a local directory, or (a `remote` run of a suite) in a
/// directory of a throwaway user behind a fresh sshd, named by `ssh://` URLs.
pub struct Peers {
    pub dir: PathBuf,
    sshd: Option<Sshd>,
}

impl Peers {
    /// `local` for a local run; a new sshd's user directory for a remote one (`None`, with
    /// a note, where no sshd can be started). In a remote run the process's umask is 0,
    /// so what the test itself writes there as root stays writable for that user.
    pub fn new(remote: bool, local: &Path) -> Option<Peers> {
        if !remote {
            return Some(Peers {
                dir: local.to_path_buf(),
                sshd: None,
            });
        }
        // SAFETY: umask only sets the process's file-creation mask.
        unsafe { libc::umask(0) };
        let sshd = Sshd::start("")?;
        Some(Peers {
            dir: sshd.user_dir("apps"),
            sshd: Some(sshd),
        })
    }

    /// Gives what the test created in `dir` to the remote user, as a site's own files.
    pub fn hand_over(&self) {
        if let Some(d) = &self.sshd {
            run(Command::new("chown").arg("-R").arg(&d.user).arg(&self.dir));
        }
    }

    /// How the configuration names the peer at `path`.
    pub fn url(&self, path: &Path) -> String {
        match &self.sshd {
            Some(d) => d.url(path),
            None => path.display().to_string(),
        }
    }

    /// The `[remote]` section a remote run needs (empty for a local one).
    pub fn section(&self) -> String {
        self.sshd
            .as_ref()
            .map(Sshd::remote_section)
            .unwrap_or_default()
    }
}
