#!/usr/bin/env python3
"""bench/remote: database peers on another host, over a real OpenSSH server on loopback.

The script starts its own sshd (Debian's openssh-server) on 127.0.0.x with throwaway
host and user keys and a throwaway user (created and removed here; run as root), never
the machine's own sshd or keys.

1. A peer database of about 100 MiB behind ssh, 1% of its rows changed on the peer each
   round (a fresh set). `cr0sync db sync` (a three-way merge: the snapshot's changed
   pages travel, both sides written, backups, the journal) against `rsync --inplace` of
   the same file one way over the same ssh (rsync's delta transfer into the copy from
   the previous round). Bytes on the wire (cr0sync's frames as its log counts them;
   rsync's `--stats` total) and wall time, medians; targets: fewer bytes than rsync, and
   under 2x its time.
2. 20 unchanged peers on 20 hosts (20 ports of loopback sshds, one connection each): the whole
   `cron database` minute with `[remote] parallel = 4` (target: under 2 s), and with 1.

Usage: python3 bench/remote/run.py [--rounds N] [--rows N] [--bin ...]
Needs: root, openssh-server, openssh-client, rsync, sqlite3 (python's module).
"""
import os
import pwd
import random
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from common import new_root, parser  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Sshd:
    def __init__(self, tmp, n_ports):
        self.dir = os.path.join(tmp, "sshd")
        os.makedirs(self.dir)
        os.chmod(tmp, 0o755)
        os.chmod(self.dir, 0o755)
        self.user = f"cr0b{os.getpid() % 100000}"
        subprocess.run(["useradd", "-M", "-N", "-p", "*", "-d", self.dir, "-s", "/bin/sh", self.user],
                       check=True)
        self.uid = pwd.getpwnam(self.user).pw_uid
        for key in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            os.path.join(self.dir, key)], check=True)
        shutil.copy(os.path.join(self.dir, "user_key.pub"), os.path.join(self.dir, "authorized_keys"))
        # Each port stands for a host (connections are per host:port); sshd listens on
        # at most 16 sockets, so one process per 10 ports.
        self.ports = [free_port() for _ in range(n_ports)]
        self.port = self.ports[0]
        os.makedirs("/run/sshd", exist_ok=True)
        self.procs = []
        for g in range(0, n_ports, 10):
            conf = os.path.join(self.dir, f"sshd_config{g}")
            listen = "".join(f"Port {p}\n" for p in self.ports[g:g + 10])
            with open(conf, "w") as f:
                f.write(f"ListenAddress 127.0.0.1\n{listen}HostKey {self.dir}/host_key\n"
                        f"AuthorizedKeysFile {self.dir}/authorized_keys\nPasswordAuthentication no\n"
                        f"UsePAM no\nStrictModes no\nPidFile none\nAllowUsers {self.user}\n"
                        f"LogLevel ERROR\nMaxStartups 100\n")
            self.procs.append(subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", conf],
                                               stderr=subprocess.DEVNULL))
        for port in self.ports:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
        self.ssh = ["ssh", "-F", "/dev/null", "-i", os.path.join(self.dir, "user_key"),
                    "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                    "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
        self.bin = os.path.join(self.dir, "cr0sync")

    def owned_dir(self, name):
        d = os.path.join(self.dir, name)
        os.makedirs(d, exist_ok=True)
        os.chown(d, self.uid, -1)
        return d

    def chown(self, path):
        os.chown(path, self.uid, -1)

    def url(self, port, path):
        return f"ssh://{self.user}@127.0.0.1:{port}{path}"

    def remote_section(self, parallel=4, extra=()):
        ssh = ", ".join(f'"{a}"' for a in self.ssh + list(extra))
        return f'[remote]\nssh = [{ssh}]\nremote_bin = "{self.bin}"\nparallel = {parallel}\n'

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()
        subprocess.run(["pkill", "-u", self.user], stderr=subprocess.DEVNULL)
        subprocess.run(["userdel", self.user], stderr=subprocess.DEVNULL)


def wire_bytes(root):
    """cr0sync's bytes on the wire in the last run (the log's last counting line)."""
    last = None
    for name in os.listdir(os.path.join(root, "logs")):
        path = os.path.join(root, "logs", name)
        if not os.path.isfile(path):
            continue
        with open(path, errors="replace") as f:
            for line in f:
                m = re.search(r"(\d+) bytes sent, (\d+) received", line)
                if m:
                    stamp = line[:24]
                    if last is None or stamp >= last[0]:
                        last = (stamp, int(m.group(1)) + int(m.group(2)))
    return last[1] if last else float("nan")


def main():
    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, default=400_000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates a throwaway user for its sshd")
    for tool in ("rsync", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (apt-get install rsync openssh-client openssh-server)")
    binary = os.path.abspath(args.bin)
    tmp = tempfile.mkdtemp(prefix="cr0sync-bench-remote-")
    sshd = Sshd(tmp, 20)
    rng = random.Random(7)
    try:
        shutil.copy(binary, sshd.bin)
        os.chmod(sshd.bin, 0o755)
        # 1. One large database.
        bot_dir = sshd.owned_dir("bot")
        bot = os.path.join(bot_dir, "users.db")
        c = sqlite3.connect(bot)
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT NOT NULL, coins INTEGER NOT NULL)")
        c.executemany("INSERT INTO users VALUES (?, ?, ?)",
                      ((i, f"user{i}-" + "x" * 200, 100) for i in range(1, args.rows + 1)))
        c.commit()
        c.close()
        for f in os.listdir(bot_dir):
            sshd.chown(os.path.join(bot_dir, f))
        size = os.path.getsize(bot)
        root = os.path.join(tmp, "root")
        new_root(binary, root, sshd.remote_section() + f"""
[[database.db]]
name = "users"
counters = {{ users = ["coins"] }}
peers = [{{ name = "bot", path = "{sshd.url(sshd.port, bot)}" }}]
""")
        print(f"peer database: {args.rows:,} rows, {size / 2**20:.0f} MiB", flush=True)
        subprocess.run([binary, "--root", root, "db", "sync"], check=True, stdout=subprocess.DEVNULL)
        mirror = os.path.join(tmp, "rsync-copy.db")
        rsync_e = " ".join(sshd.ssh + ["-p", str(sshd.port)])
        remote_src = f"{sshd.user}@127.0.0.1:{bot}"
        subprocess.run(["rsync", "-e", rsync_e, remote_src, mirror], check=True)
        k = max(args.rows // 100, 1)
        res = {"cr0sync": [], "rsync": []}
        for i in range(args.rounds):
            c = sqlite3.connect(bot)
            ids = rng.sample(range(1, args.rows + 1), k)
            c.executemany("UPDATE users SET coins = coins + 1 WHERE id = ?", ((x,) for x in ids))
            c.commit()
            c.close()
            order = ["cr0sync", "rsync"] if i % 2 == 0 else ["rsync", "cr0sync"]
            for tool in order:
                os.sync()
                start = time.perf_counter()
                if tool == "cr0sync":
                    subprocess.run([binary, "--root", root, "db", "sync"], check=True,
                                   stdout=subprocess.DEVNULL)
                    t = time.perf_counter() - start
                    res[tool].append((t, wire_bytes(root)))
                else:
                    out = subprocess.run(["rsync", "--inplace", "--stats", "-e", rsync_e,
                                          remote_src, mirror], check=True, capture_output=True,
                                         text=True).stdout
                    t = time.perf_counter() - start
                    sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))
                    recv = int(re.search(r"Total bytes received: ([\d,]+)", out).group(1).replace(",", ""))
                    res[tool].append((t, sent + recv))
        med = {k2: (statistics.median(t for t, _ in v), statistics.median(b for _, b in v))
               for k2, v in res.items()}
        (tc, bc), (tr, br) = med["cr0sync"], med["rsync"]
        print(f"1% of rows changed on the peer ({k:,} rows), {args.rounds} rounds, medians: "
              f"cr0sync db sync {tc:.2f} s, {bc / 2**20:.2f} MiB on the wire; "
              f"rsync --inplace one way {tr:.2f} s, {br / 2**20:.2f} MiB; "
              f"bytes ratio {bc / br:.2f} (target < 1), time ratio {tc / tr:.2f} (target < 2)")

        # 2. 20 unchanged peers on 20 hosts.
        peers = []
        for n, port in enumerate(sshd.ports):
            d = sshd.owned_dir(f"peer{n}")
            p = os.path.join(d, "small.db")
            c = sqlite3.connect(p)
            c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
            c.executemany("INSERT INTO t VALUES (?, ?)", ((i, "v") for i in range(100)))
            c.commit()
            c.close()
            sshd.chown(p)
            peers.append(f'{{ name = "p{n}", path = "{sshd.url(port, p)}" }}')
        # The third: ssh's own connection sharing (ControlPersist), an operator's choice in
        # the [remote] ssh command: a minute then reuses the connections of the last one.
        control = ["-o", "ControlMaster=auto", "-o", f"ControlPath={tmp}/cm-%C",
                   "-o", "ControlPersist=120"]
        for parallel, extra, what in ((4, (), ""), (1, (), ""),
                                      (4, control, ", ssh ControlPersist")):
            root2 = os.path.join(tmp, f"root-many-{parallel}-{len(extra)}")
            new_root(binary, root2, sshd.remote_section(parallel, extra) + f"""
[[database.db]]
name = "small"
peers = [{", ".join(peers)}]
""")
            for _ in range(2):
                subprocess.run([binary, "--root", root2, "db", "sync"], check=True,
                               stdout=subprocess.DEVNULL)
            time.sleep(2.2)  # the peers' last writes older than the clock's resolution
            subprocess.run([binary, "--root", root2, "cron", "database"], check=True)
            times = []
            for _ in range(max(args.rounds, 5)):
                start = time.perf_counter()
                subprocess.run([binary, "--root", root2, "cron", "database"], check=True)
                times.append(time.perf_counter() - start)
            print(f"20 unchanged peers on 20 hosts, parallel = {parallel}{what}: cron database "
                  f"{statistics.median(times):.2f} s (median; target < 2 s with parallel = 4)")
    finally:
        subprocess.run(["pkill", "-f", f"ControlPath={tmp}"], stderr=subprocess.DEVNULL)
        sshd.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
