#!/usr/bin/env python3
"""bench/db: a full three-way `cr0sync db sync` against `sqldiff` on the same files.

For each table size (--rows, default 1,000,000; bench/db/gen.sql) and share changed
(--percent, default 1 and 0.1 percent of the rows on each side: half updates, a quarter
deletes, a quarter inserts, the sides disjoint), each round restores the same starting
files, then runs `sqldiff --primarykey central peer` and `cr0sync db sync` (alternating
which goes first) and records wall time and peak RSS of each. Prints medians, the ratio,
and the median of each phase of the sync (from its phase line in the log).

Then the fast path: four 50 MB databases, synced, nothing changed: `cr0sync cron
database` wall time, median of 30.

Usage: python3 bench/db/run.py [--rounds N] [--rows N ...] [--percent P ...]
                               [--no-fast-path] [--bin target/release/cr0sync]
Needs: sqlite3, sqldiff (Debian: sqlite3, sqlite3-tools). Uses a temporary directory.
"""
import os
import re
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


PHASE = re.compile(r"([a-z][a-z ]*?) (\d+) ms")


def phases_of(line):
    """{phase: ms} of one sync's phase line; the details in parentheses count too
    ("diff 98 ms" inside "diff and merge 119 ms (diff 98 ms)")."""
    body = line.split("INFO", 1)[-1].split(": ", 1)[-1].split(" (peak RSS")[0]
    return {name.strip(): int(ms) for name, ms in PHASE.findall(body)}


def one_case(binary, tmp, rows, changed, rounds):
    """Median times, peak RSS and the median of each phase for one table size and change
    count."""
    case = os.path.join(tmp, f"case-{rows}-{changed}")
    os.makedirs(case)
    root = new_root(binary, os.path.join(case, "root"))
    peer = os.path.join(case, "peer.db")
    central = os.path.join(root, "databases", "bench.db")
    print(f"generating {rows:,} rows ...", flush=True)
    with open(os.path.join(HERE, "gen.sql")) as f:
        sqlite(peer, f.read().replace("1000000", str(rows)))
    config(root, [("bench", peer)])
    # First sync: central created from the peer, base recorded.
    run([binary, "--root", root, "db", "sync"])
    # Routine backups of both sides exist now, as in steady state (one per
    # backup_interval); the first write of each interval also pays for a gzip backup.
    sqlite(peer, "UPDATE users SET points = points + 1 WHERE id = 1;")
    sqlite(central, "UPDATE users SET points = points + 1 WHERE id = 2;")
    run([binary, "--root", root, "db", "sync"])
    sqlite(peer, side_changes(3, 20_000_000, rows, changed))
    sqlite(central, side_changes(5, 30_000_000, rows, changed))
    template = os.path.join(tmp, "template")
    shutil.rmtree(template, ignore_errors=True)
    shutil.copytree(case, template, symlinks=True)
    size = os.path.getsize(peer) / 2**20
    print(f"database: {size:.0f} MiB, {rows:,} rows, {changed:,} rows changed on each side",
          flush=True)
    log = os.path.join(root, "logs", "cron_database_sync.log")
    results = {"sqldiff": [], "cr0sync": []}
    phases = []
    for i in range(rounds):
        for name in ("root", "peer.db"):
            dst = os.path.join(case, name)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
                shutil.copytree(os.path.join(template, name), dst)
            else:
                shutil.copy2(os.path.join(template, name), dst)
        subprocess.run(["sync"], check=True)
        order = ["sqldiff", "cr0sync"] if i % 2 == 0 else ["cr0sync", "sqldiff"]
        for tool in order:
            if tool == "sqldiff":
                results[tool].append(run(["sqldiff", "--primarykey", central, peer]))
            else:
                results[tool].append(run([binary, "--root", root, "db", "sync"]))
                with open(log) as f:
                    lines = [l for l in f if "snapshot" in l and " ms" in l]
                phases.append(phases_of(lines[-1]))
        out = subprocess.run(["sqldiff", "--primarykey", central, peer], capture_output=True,
                             check=True)
        if out.stdout:
            sys.exit("after the sync, sqldiff still shows differences")
    shutil.rmtree(case)
    med = {k: statistics.median(t for t, _ in v) for k, v in results.items()}
    rss = {k: max(r for _, r in v) for k, v in results.items()}
    names = list(dict.fromkeys(n for p in phases for n in p))
    breakdown = {n: statistics.median(p.get(n, 0) for p in phases) for n in names}
    return med, rss, breakdown


def main():
    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000],
                    help="table sizes (memory must not grow with them)")
    ap.add_argument("--percent", type=float, nargs="+", default=[1.0, 0.1],
                    help="rows changed on each side, in percent of the table")
    ap.add_argument("--no-fast-path", action="store_true",
                    help="skip the no-change figure")
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    tmp = tempfile.mkdtemp(prefix="cr0sync-bench-db-")
    try:
        table = []
        for rows in args.rows:
            for pct in args.percent:
                changed = int(rows * pct / 100)
                med, rss, breakdown = one_case(binary, tmp, rows, changed, args.rounds)
                ratio = med["cr0sync"] / med["sqldiff"]
                print(f"  sqldiff --primarykey (two-way diff): median {med['sqldiff']:.3f} s, "
                      f"peak RSS {rss['sqldiff']:.0f} MiB")
                print(f"  cr0sync db sync (three-way, applied): median {med['cr0sync']:.3f} s, "
                      f"peak RSS {rss['cr0sync']:.0f} MiB")
                print(f"  ratio {ratio:.2f} (target <= 1.0); RSS over sqldiff's "
                      f"{rss['cr0sync'] - rss['sqldiff']:+.0f} MiB (target <= +16)")
                print("  phases (median ms): " + ", ".join(f"{n} {v:.0f}" for n, v in breakdown.items()),
                      flush=True)
                table.append((rows, pct, med, rss, ratio))
        print("\nrows        changed  sqldiff s  cr0sync s  ratio  RSS sqldiff/cr0sync MiB")
        for rows, pct, med, rss, ratio in table:
            print(f"{rows:>10,}  {pct:>5}%  {med['sqldiff']:>9.3f}  {med['cr0sync']:>9.3f}  "
                  f"{ratio:>5.2f}  {rss['sqldiff']:.0f}/{rss['cr0sync']:.0f}")
        if args.no_fast_path:
            return

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
