//! The local end: a connection to `cr0sync serve` on another host through the system's
//! `ssh`, and the registry that opens one connection per host per job run.
//!
//! Invariants:
//! - One line per failure, naming the host and what to do: unreachable, login refused,
//!   cr0sync missing there, another protocol version, connection lost. A host that failed
//!   once in a run fails at once for its other pairs (same line), and other hosts go on.
//! - The remote's stderr goes to the local job log, line by line, prefixed with the host.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::config::RemoteConfig;
use crate::remote::proto::{self, PROTOCOL, Request, Response};

/// A peer path on another host: `ssh://[user@]host[:port]/absolute/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    /// The absolute path on that host.
    pub path: String,
}

impl Spec {
    /// `None`: not an `ssh://` path (a local one). `Some(Err)`: a malformed one.
    pub fn parse(s: &str) -> Option<Result<Spec>> {
        let rest = s.strip_prefix("ssh://")?;
        Some(Self::parse_rest(s, rest))
    }

    fn parse_rest(s: &str, rest: &str) -> Result<Spec> {
        let Some(slash) = rest.find('/') else {
            bail!("{s}: an ssh:// path needs an absolute path after the host");
        };
        let (authority, path) = rest.split_at(slash);
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_string()), h),
            None => (None, authority),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h,
                Some(
                    p.parse::<u16>()
                        .map_err(|_| anyhow!("{s}: the port {p:?} is not a number"))?,
                ),
            ),
            None => (hostport, None),
        };
        if host.is_empty() {
            bail!("{s}: the host is missing");
        }
        Ok(Spec {
            user,
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }

    /// The host as people write it (`user@host:port`), which also keys its connection.
    pub fn host_label(&self) -> String {
        let mut s = String::new();
        if let Some(u) = &self.user {
            s.push_str(u);
            s.push('@');
        }
        s.push_str(&self.host);
        if let Some(p) = self.port {
            s.push_str(&format!(":{p}"));
        }
        s
    }
}

/// A reader or writer that counts the bytes through it (what went over the wire).
struct Counted<T> {
    inner: T,
    bytes: u64,
}

impl<T: Write> Write for Counted<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Read> Read for Counted<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// A live connection to one host.
pub struct Conn {
    host: String,
    child: Child,
    input: BufWriter<Counted<ChildStdin>>,
    output: BufReader<Counted<ChildStdout>>,
    stderr: Arc<Mutex<Vec<String>>>,
    lost: bool,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("host", &self.host).finish()
    }
}

impl Conn {
    /// Runs `ssh ... host remote_bin serve` and exchanges versions.
    pub fn open(cfg: &RemoteConfig, spec: &Spec) -> Result<Conn> {
        let host = spec.host_label();
        let Some((prog, args)) = cfg.ssh.split_first() else {
            bail!("[remote] ssh is empty; it needs at least the ssh program");
        };
        let mut cmd = Command::new(prog);
        cmd.args(args);
        if let Some(p) = spec.port {
            cmd.arg("-p").arg(p.to_string());
        }
        match &spec.user {
            Some(u) => cmd.arg(format!("{u}@{}", spec.host)),
            None => cmd.arg(&spec.host),
        };
        cmd.arg(&cfg.remote_bin).arg("serve");
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {prog} to reach {host}. Try: install openssh-client, or set [remote] ssh"))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            bail!("cannot talk to {prog}");
        };
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let label = host.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log::info!("{label}: {line}");
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        let mut conn = Conn {
            host,
            child,
            input: BufWriter::with_capacity(
                1 << 16,
                Counted {
                    inner: stdin,
                    bytes: 0,
                },
            ),
            output: BufReader::with_capacity(
                1 << 16,
                Counted {
                    inner: stdout,
                    bytes: 0,
                },
            ),
            stderr: lines,
            lost: false,
        };
        let hello = Request::Hello {
            protocol: PROTOCOL,
            version: env!("CARGO_PKG_VERSION").into(),
        };
        match conn.call(&hello, &[]) {
            Ok((
                Response::Hello {
                    protocol: PROTOCOL, ..
                },
                _,
            )) => Ok(conn),
            Ok((Response::Hello { protocol, version }, _)) => bail!(
                "{} runs cr0sync {version} (protocol {protocol}); this is cr0sync {} \
                 (protocol {PROTOCOL}). Try: install the same version on both hosts",
                conn.host,
                env!("CARGO_PKG_VERSION")
            ),
            Ok(_) => bail!("{}: cr0sync serve answered out of turn", conn.host),
            Err(e) => Err(conn.explain(e, cfg)),
        }
    }

    /// The host as configured (`user@host:port`).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Sends one request and waits for its answer. An error frame is an error naming the
    /// host; a lost connection is too, and every later call fails at once.
    pub fn call(&mut self, req: &Request, body: &[u8]) -> Result<(Response, Vec<u8>)> {
        if self.lost {
            bail!(
                "the connection to {} was lost earlier in this run",
                self.host
            );
        }
        let sent = proto::write_frame(&mut self.input, req, body);
        let got = sent.and_then(|()| proto::read_frame::<_, Response>(&mut self.output));
        match got {
            Ok(Some((Response::Error { message }, _))) => bail!("{}: {message}", self.host),
            Ok(Some(r)) => Ok(r),
            Ok(None) => {
                self.lost = true;
                Err(self.lost_line())
            }
            Err(e) => {
                self.lost = true;
                Err(e.context(self.lost_line()))
            }
        }
    }

    fn lost_line(&mut self) -> anyhow::Error {
        // Give ssh a moment to exit and say why.
        for _ in 0..20 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        let last = self
            .stderr
            .lock()
            .ok()
            .and_then(|l| l.last().cloned())
            .unwrap_or_default();
        let why = if last.is_empty() {
            String::new()
        } else {
            format!(" ({last})")
        };
        anyhow!(
            "the connection to {} was lost{why}; what was not finished is completed by the \
             next run. Try: cr0sync status, and check the host and its disk",
            self.host
        )
    }

    /// The line for a connection that failed before the versions were exchanged.
    fn explain(&mut self, e: anyhow::Error, cfg: &RemoteConfig) -> anyhow::Error {
        let _ = self.child.wait();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let text = self
            .stderr
            .lock()
            .map(|l| l.join(" / "))
            .unwrap_or_default();
        let code = self.child.try_wait().ok().flatten().and_then(|s| s.code());
        let host = &self.host;
        let try_ssh = match host.rsplit_once(':') {
            Some((h, port)) => format!("ssh -p {port} {h} true"),
            None => format!("ssh {host} true"),
        };
        let lower = text.to_ascii_lowercase();
        if lower.contains("permission denied") || lower.contains("too many authentication") {
            anyhow!(
                "{host} refused the login ({text}). Try: install this user's ssh key on {host} \
                 (README: peers on other hosts), and check `{try_ssh}` works without a \
                 password"
            )
        } else if code == Some(127) || lower.contains("not found") || lower.contains("no such file")
        {
            anyhow!(
                "cr0sync is not installed on {host} (remote_bin = {:?}: {text}). Try: install \
                 it there, or set [remote] remote_bin to its full path",
                cfg.remote_bin
            )
        } else if lower.contains("refused")
            || lower.contains("timed out")
            || lower.contains("could not resolve")
            || lower.contains("no route")
            || lower.contains("unreachable")
        {
            anyhow!("cannot reach {host} ({text}). Try: check the host is up and `{try_ssh}` works")
        } else {
            anyhow!(
                "cannot start cr0sync serve on {host}: {e:#}{}. Try: `ssh {host} {} serve` by \
                 hand to see why",
                if text.is_empty() {
                    String::new()
                } else {
                    format!(" ({text})")
                },
                cfg.remote_bin
            )
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.lost {
            let _ = proto::write_frame(&mut self.input, &Request::Bye, &[]);
            let _ = proto::read_frame::<_, Response>(&mut self.output);
        }
        log::info!(
            "{}: {} bytes sent, {} received (cr0sync's frames, before ssh's encryption)",
            self.host,
            self.input.get_ref().bytes,
            self.output.get_ref().bytes
        );
        // The server has said goodbye and ends, and ssh with it: wait for that (briefly,
        // in small steps: a run closes one connection per host), never on a hung one.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `state/remote/hosts.json` keeps per host: its last run and how it went.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostState {
    pub last_run: chrono::DateTime<chrono::Utc>,
    pub reachable: bool,
    pub error: Option<String>,
}

/// Says in the log whether each host this run used was reachable, and records it for
/// `status` (others keep their entries; a dry run records nothing).
pub fn record_hosts(
    state: &crate::ops::state::StateStore,
    hosts: &Hosts,
    now: chrono::DateTime<chrono::Utc>,
    dry_run: bool,
) -> Result<()> {
    let used = hosts.reachability();
    for (host, error) in &used {
        match error {
            None => log::info!("host {host}: reachable"),
            Some(e) => log::warn!("host {host}: not reachable in this run: {e}"),
        }
    }
    if used.is_empty() || dry_run {
        return Ok(());
    }
    let name = crate::ops::state::names::REMOTE_HOSTS;
    let mut all: std::collections::BTreeMap<String, HostState> =
        state.load(name)?.unwrap_or_default();
    for (host, error) in used {
        all.insert(
            host,
            HostState {
                last_run: now,
                reachable: error.is_none(),
                error,
            },
        );
    }
    state.save(name, &all)
}

/// The hosts as the last runs left them.
pub fn load_hosts(
    state: &crate::ops::state::StateStore,
) -> Result<std::collections::BTreeMap<String, HostState>> {
    Ok(state
        .load(crate::ops::state::names::REMOTE_HOSTS)?
        .unwrap_or_default())
}

/// A connection shared by every pair on its host.
pub type Shared = Arc<Mutex<Conn>>;

/// One request and its answer over a shared connection.
pub fn call_on(conn: &Mutex<Conn>, req: &Request, body: &[u8]) -> Result<(Response, Vec<u8>)> {
    conn.lock()
        .map_err(|_| anyhow!("a connection is unusable after an earlier failure"))?
        .call(req, body)
}

/// The connections of one job run, opened on first use, one per host. A host that
/// failed keeps its error line for the rest of the run.
#[derive(Debug)]
pub struct Hosts {
    cfg: RemoteConfig,
    conns: Mutex<HashMap<String, Result<Shared, String>>>,
}

impl Hosts {
    pub fn new(cfg: &RemoteConfig) -> Hosts {
        Hosts {
            cfg: cfg.clone(),
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// The connection to `spec`'s host.
    pub fn get(&self, spec: &Spec) -> Result<Shared> {
        let key = spec.host_label();
        let mut conns = self
            .conns
            .lock()
            .map_err(|_| anyhow!("the connection registry is unusable"))?;
        let entry = conns
            .entry(key)
            .or_insert_with(|| match Conn::open(&self.cfg, spec) {
                Ok(c) => Ok(Arc::new(Mutex::new(c))),
                Err(e) => Err(format!("{e:#}")),
            });
        entry.clone().map_err(|e| anyhow!(e))
    }

    /// Opens the connections to the hosts of `paths` (those that are `ssh://` paths), up
    /// to `[remote] parallel` at once: the slow part of a run over many hosts is the ssh
    /// handshakes, which then overlap. A failure is kept for that host's pairs.
    pub fn open_all<'p>(&self, paths: impl IntoIterator<Item = &'p Path>) {
        let mut specs: Vec<Spec> = Vec::new();
        for p in paths {
            if let Some(Ok(spec)) = Spec::parse(&p.to_string_lossy())
                && !specs.iter().any(|s| s.host_label() == spec.host_label())
            {
                specs.push(spec);
            }
        }
        if let Ok(conns) = self.conns.lock() {
            specs.retain(|s| !conns.contains_key(&s.host_label()));
        }
        let n = usize::try_from(self.cfg.parallel).unwrap_or(1);
        let opened = crate::util::parallel_map_n(&specs, n, |spec| Conn::open(&self.cfg, spec));
        if let Ok(mut conns) = self.conns.lock() {
            for (spec, conn) in specs.iter().zip(opened) {
                let entry = match conn {
                    Some(Ok(c)) => Ok(Arc::new(Mutex::new(c))),
                    Some(Err(e)) => Err(format!("{e:#}")),
                    None => continue,
                };
                conns.insert(spec.host_label(), entry);
            }
        }
    }

    /// Each host used in this run, and the error line of those that could not be reached.
    pub fn reachability(&self) -> Vec<(String, Option<String>)> {
        self.conns
            .lock()
            .map(|c| {
                let mut v: Vec<_> = c
                    .iter()
                    .map(|(h, r)| (h.clone(), r.as_ref().err().cloned()))
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default()
    }
}

/// A file on another host, read range by range (`ReadRange`). Reads are served from a
/// buffer that grows while reads are sequential (64 KiB, doubling up to one frame), so a
/// fingerprint costs one small round trip and a long copy about one per MiB. With `ino`,
/// only that inode is read: a file rotated away since it was listed is an error.
pub struct RemoteFile<'a> {
    conn: &'a Mutex<Conn>,
    path: String,
    ino: Option<u64>,
    pos: u64,
    buf: Vec<u8>,
    /// The offset of `buf[0]`.
    buf_at: u64,
    ahead: usize,
}

impl<'a> RemoteFile<'a> {
    pub fn new(conn: &'a Mutex<Conn>, path: String, ino: Option<u64>) -> RemoteFile<'a> {
        RemoteFile {
            conn,
            path,
            ino,
            pos: 0,
            buf: Vec::new(),
            buf_at: 0,
            ahead: 64 << 10,
        }
    }
}

impl Read for RemoteFile<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let end = self.buf_at + self.buf.len() as u64;
        if self.pos < self.buf_at || self.pos >= end {
            let sequential = self.pos == end && !self.buf.is_empty();
            self.ahead = if sequential {
                (self.ahead * 2).min(proto::CHUNK)
            } else {
                64 << 10
            };
            let len = self.ahead.max(out.len()).min(proto::CHUNK) as u64;
            let req = Request::ReadRange {
                path: self.path.clone(),
                offset: self.pos,
                len,
                ino: self.ino,
            };
            let (_, body) = call_on(self.conn, &req, &[])
                .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
            self.buf = body;
            self.buf_at = self.pos;
            if self.buf.is_empty() {
                return Ok(0);
            }
        }
        let from = usize::try_from(self.pos - self.buf_at).unwrap_or(usize::MAX);
        let n = out.len().min(self.buf.len().saturating_sub(from));
        out[..n].copy_from_slice(&self.buf[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for RemoteFile<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        self.pos = match to {
            std::io::SeekFrom::Start(n) => n,
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "a seek before the start")
            })?,
            std::io::SeekFrom::End(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "a remote file is not read from its end",
                ));
            }
        };
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ssh_paths_parse_and_local_ones_are_not_remote() {
        let s = Spec::parse("ssh://cr0@bot1.example.org:2222/home/cr0/data")
            .unwrap()
            .unwrap();
        assert_eq!(s.user.as_deref(), Some("cr0"));
        assert_eq!(s.host, "bot1.example.org");
        assert_eq!(s.port, Some(2222));
        assert_eq!(s.path, "/home/cr0/data");
        assert_eq!(s.host_label(), "cr0@bot1.example.org:2222");
        let s = Spec::parse("ssh://host/x").unwrap().unwrap();
        assert_eq!((s.user, s.port, s.path.as_str()), (None, None, "/x"));
        assert!(Spec::parse("/var/data").is_none());
        assert!(Spec::parse("ssh://host").unwrap().is_err());
        assert!(Spec::parse("ssh://host:abc/x").unwrap().is_err());
        assert!(Spec::parse("ssh:///x").unwrap().is_err());
    }
}
