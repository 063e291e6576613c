#!/usr/bin/env python3
"""bench/minute: the whole minute with nothing changed.

A root scaled up from the demo: 4 databases of about 50 MB (one peer each), 1,000 log
sources in one stream, 10,000 watched files. After everything is synced and a baseline
recorded (old mtimes, so nothing is racy), time `cron database`, `cron logs` and
`cron security` back to back, median of 30 minutes: once as a usual minute (the integrity
check is due every 5 minutes, so not in this one) and once with the integrity check due.

Usage: python3 bench/minute/run.py [--bin target/release/cr0sync]
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from common import new_root, parser, wall, write_config  # noqa: E402


def main():
    ap = parser(__doc__)
    ap.add_argument("--minutes", type=int, default=30)
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    tmp = tempfile.mkdtemp(prefix="cr0sync-bench-minute-")
    try:
        root = os.path.join(tmp, "root")
        new_root(binary, root)
        dbs = []
        for n in range(4):
            p = os.path.join(tmp, f"bot{n}.db")
            subprocess.run(["sqlite3", p], check=True, input=(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);"
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 480000)"
                "INSERT INTO t SELECT i, hex(randomblob(50)) FROM n;").encode())
            dbs.append((f"db{n}", p))
        logs = os.path.join(tmp, "irc")
        os.makedirs(logs)
        line = b"[2025-11-09 18:45:30] <alice> the quick brown fox jumps over the lazy dog\n"
        for i in range(1000):
            with open(os.path.join(logs, f"#chan{i}.log"), "wb") as f:
                f.write(line * 20)
        www = os.path.join(tmp, "www")
        for i in range(10_000):
            d = os.path.join(www, f"d{i % 100}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"p{i}.php"), "wb") as f:
                f.write(b"<?php echo %d;\n" % i)
        old = time.time() - 3600
        for base, _, files in os.walk(tmp):
            for name in files:
                os.utime(os.path.join(base, name), (old, old))
        text = '[security]\nintegrity_paths = ["%s"]\n' % www
        for name, p in dbs:
            text += f'\n[[database.db]]\nname = "{name}"\npeers = [{{ name = "bot", path = "{p}" }}]\n'
        text += f'\n[[logs.stream]]\nname = "irc"\nfrom = "{logs}"\nto = "logs/irc_networks/irc"\n'
        write_config(root, text)
        sizes = sum(os.path.getsize(p) for _, p in dbs) / 2**20
        print(f"root: 4 databases ({sizes:.0f} MiB), 1,000 log sources, 10,000 watched files", flush=True)
        jobs = [[binary, "--root", root, "cron", j] for j in ("database", "logs", "security")]
        for _ in range(3):  # first syncs, first baseline, settle fingerprints
            for cmd in jobs:
                subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
        subprocess.run([binary, "--root", root, "security", "baseline"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(jobs[2], check=True, stdout=subprocess.DEVNULL)

        def minute():
            parts = [wall(cmd) for cmd in jobs]
            return sum(parts), parts

        usual = [minute() for _ in range(args.minutes)]
        tot = statistics.median(t for t, _ in usual) * 1000
        each = [statistics.median(p[i] for _, p in usual) * 1000 for i in range(3)]
        print(f"usual minute (integrity check not due): median {tot:.1f} ms "
              f"(database {each[0]:.1f}, logs {each[1]:.1f}, security {each[2]:.1f}) (target < 60 ms)")
        # The minute in five when the integrity check is due.
        text = text.replace("[security]\n", '[security]\nintegrity_interval = "0s"\n')
        write_config(root, text)
        due = [minute() for _ in range(args.minutes)]
        tot = statistics.median(t for t, _ in due) * 1000
        each = [statistics.median(p[i] for _, p in due) * 1000 for i in range(3)]
        print(f"minute with the integrity check due: median {tot:.1f} ms "
              f"(database {each[0]:.1f}, logs {each[1]:.1f}, security {each[2]:.1f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
