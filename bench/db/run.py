#!/usr/bin/env python3
"""bench/db: a full three-way `cr0sync db sync` against `sqldiff` on the same files.

1,000,000 rows (bench/db/gen.sql; --rows to change); 1% of the rows changed on each side
(5,000 updates, 2,500 inserts, 2,500 deletes per side per million rows, disjoint). Each round restores the same starting
files, then runs `sqldiff --primarykey central peer` and `cr0sync db sync` (alternating
which goes first) and records wall time and peak RSS of each. Prints medians and ratios.

Then the fast path: four 50 MB databases, synced, nothing changed: `cr0sync cron
database` wall time, median of 30.

Usage: python3 bench/db/run.py [--rounds N] [--bin target/release/cr0sync]
Needs: sqlite3, sqldiff (Debian: sqlite3, sqlite3-tools). Uses a temporary directory.
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
from common import new_root, parser, run, wall, write_config  # noqa: E402


def sqlite(db, sql):
    subprocess.run(["sqlite3", db], input=sql.encode(), check=True)


def side_changes(offset, insert_base, rows, changed):
    # changed/2 updates, changed/4 deletes, changed/4 inserts; offset keeps the sides
    # disjoint.
    every = max(rows // (changed // 2), 8)
    return f"""
    UPDATE users SET coins = coins + 1, updated_at = '2025-11-09T18:00:00Z'
      WHERE id % {every} = {offset};
    DELETE FROM users WHERE id % {2 * every} = {offset + 1};
    WITH RECURSIVE n(i) AS (SELECT {insert_base} UNION ALL SELECT i + 1 FROM n
                            WHERE i < {insert_base + changed // 4 - 1})
    INSERT INTO users SELECT i, 'new' || i, NULL, 0, 0, '2025-11-09T18:00:00Z' FROM n;
    """


def config(root, dbs):
    text = '[database]\nbackup_interval = "1h"\n'
    for name, peer in dbs:
        text += (f'\n[[database.db]]\nname = "{name}"\n'
                 f'peers = [{{ name = "bot", path = "{peer}" }}]\n')
    write_config(root, text)


def main():
    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=1_000_000,
                    help="table size (memory must not grow with it)")
    ap.add_argument("--changed", type=int, default=0,
                    help="rows changed per side (default: 1%% of --rows)")
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    tmp = tempfile.mkdtemp(prefix="cr0sync-bench-db-")
    try:
        root = new_root(binary, os.path.join(tmp, "root"))
        peer = os.path.join(tmp, "peer.db")
        central = os.path.join(root, "databases", "bench.db")
        print(f"generating {args.rows:,} rows ...", flush=True)
        with open(os.path.join(HERE, "gen.sql")) as f:
            sqlite(peer, f.read().replace("1000000", str(args.rows)))
        config(root, [("bench", peer)])
        # First sync: central created from the peer, base recorded.
        run([binary, "--root", root, "db", "sync"])
        # Routine backups of both sides exist now, as in steady state (one per
        # backup_interval); the first write of each interval also pays for a gzip backup.
        sqlite(peer, "UPDATE users SET points = points + 1 WHERE id = 1;")
        sqlite(central, "UPDATE users SET points = points + 1 WHERE id = 2;")
        run([binary, "--root", root, "db", "sync"])
        changed = args.changed or args.rows // 100
        sqlite(peer, side_changes(3, 20_000_000, args.rows, changed))
        sqlite(central, side_changes(5, 30_000_000, args.rows, changed))
        template = os.path.join(tmp, "template")
        shutil.copytree(tmp, template, ignore=shutil.ignore_patterns("template"), symlinks=True)
        size = os.path.getsize(peer) / 2**20
        print(f"database: {size:.0f} MiB, {changed:,} rows changed on each side", flush=True)

        results = {"sqldiff": [], "cr0sync": []}
        for i in range(args.rounds):
            for name in ("root", "peer.db"):
                dst = os.path.join(tmp, name)
                if os.path.isdir(dst):
                    shutil.rmtree(dst)
                    shutil.copytree(os.path.join(template, name), dst)
                else:
                    shutil.copy2(os.path.join(template, name), dst)
            order = ["sqldiff", "cr0sync"] if i % 2 == 0 else ["cr0sync", "sqldiff"]
            for tool in order:
                if tool == "sqldiff":
                    results[tool].append(run(["sqldiff", "--primarykey", central, peer]))
                else:
                    results[tool].append(run([binary, "--root", root, "db", "sync"]))
            out = subprocess.run(["sqldiff", "--primarykey", central, peer], capture_output=True, check=True)
            if out.stdout:
                sys.exit("after the sync, sqldiff still shows differences")
        with open(os.path.join(root, "logs", "cron_database_sync.log")) as f:
            phases = [l.strip() for l in f if "snapshot" in l and "ms" in l]
        print("last sync's phases:", phases[-1] if phases else "?")
        med = {k: statistics.median(t for t, _ in v) for k, v in results.items()}
        rss = {k: max(r for _, r in v) for k, v in results.items()}
        print(f"sqldiff --primarykey (two-way diff): median {med['sqldiff']:.3f} s, peak RSS {rss['sqldiff']:.0f} MiB")
        print(f"cr0sync db sync (three-way, applied): median {med['cr0sync']:.3f} s, peak RSS {rss['cr0sync']:.0f} MiB")
        print(f"ratio cr0sync / sqldiff: {med['cr0sync'] / med['sqldiff']:.2f} (target <= 1.5)")

        # Fast path: four 50 MB databases, nothing changed.
        fast = os.path.join(tmp, "fast")
        os.makedirs(fast)
        froot = new_root(binary, os.path.join(fast, "root"))
        dbs = []
        for n in range(4):
            p = os.path.join(fast, f"peer{n}.db")
            sqlite(p, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);"
                      "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 480000)"
                      "INSERT INTO t SELECT i, hex(randomblob(50)) FROM n;")
            os.utime(p, (time.time() - 3600, time.time() - 3600))
            dbs.append((f"db{n}", p))
        config(froot, dbs)
        run([binary, "--root", froot, "cron", "database"])
        run([binary, "--root", froot, "cron", "database"])
        times = [wall([binary, "--root", froot, "cron", "database"]) for _ in range(30)]
        sizes = sum(os.path.getsize(p) for _, p in dbs) / 2**20
        print(f"no-change cron database over 4 databases ({sizes:.0f} MiB): median {statistics.median(times) * 1000:.1f} ms (target < 20 ms)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
