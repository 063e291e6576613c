#!/usr/bin/env python3
"""bench/files: the file-tree job against the tools people use for the same work.

Three parts, each side by side in one run, medians:

1. Nothing changed: 10,000 files of 1-64 KiB in the central directory and one peer,
   synced. `cr0sync cron files` against `find -printf` of both trees (the listing any
   tool needs). Target <= 2x.
2. 1% of the files changed on each side (disjoint), a fresh set each round, applied the
   same way to four copies of the tree pair: `cr0sync files sync` (a three-way merge
   with a journal) against `rsync -a --update` one way plus the other (two one-way
   copies; target <= 1x), against `unison -batch` on its own pair with its archive
   (target: faster), and, for a like-for-like durability, against the same rsync with
   `--fsync` (each file synced, as cr0sync syncs what it writes). Each tool starts with the page cache clean (`sync`), so none pays
   for flushing what another wrote.
3. A large file (default 2 GiB) pulled from a master: `cr0sync files sync` against `cp`
   of the same file, with peak RSS (targets <= 1.3x and under 64 MiB).

Usage: python3 bench/files/run.py [--rounds N] [--files N] [--big-mib N] [--bin ...]
Needs: rsync, unison (Debian: rsync, unison), GNU time. Uses a temporary directory.
"""
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from common import new_root, parser, run, wall  # noqa: E402


def make_tree(dirs, n, rng):
    """The same n files (1-64 KiB of JSON-ish text) in every directory of `dirs`, with
    mtimes an hour old (so no listing sees them as just written)."""
    old = time.time() - 3600
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    for i in range(n):
        sub = f"u{i % 100:02d}"
        size = rng.randint(1024, 64 * 1024)
        body = ('{"user_id": "%d", "balance": %d, "pad": "' % (i, i)).encode()
        body += rng.randbytes(size // 2).hex().encode()[: max(size - len(body) - 3, 0)] + b'"}\n'
        for d in dirs:
            os.makedirs(os.path.join(d, sub), exist_ok=True)
            p = os.path.join(d, sub, f"{i}.json")
            with open(p, "wb") as f:
                f.write(body)
            os.utime(p, (old, old))


def change(pairs, names, tag, rng):
    """Rewrites `names` (relative paths) with new content in the given directories."""
    for rel in names:
        # A new size each time: rsync's and unison's quick checks compare size and mtime.
        pad = rng.randbytes(rng.randint(512, 32 * 1024)).hex()
        body = ('{"changed": "%s", "pad": "%s"}\n' % (tag, pad)).encode()
        for d in pairs:
            with open(os.path.join(d, rel), "wb") as f:
                f.write(body)


def main():
    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--big-mib", type=int, default=2048)
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    for tool in ("rsync", "unison", "find"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (apt-get install {tool})")
    tmp = tempfile.mkdtemp(prefix="cr0sync-bench-files-")
    rng = random.Random(7)
    try:
        root = os.path.join(tmp, "root")
        central = os.path.join(root, "shared_storage", "tree")
        peer = os.path.join(tmp, "peer")
        new_root(binary, root, f"""
[[files.tree]]
name = "tree"
central = "shared_storage/tree"
peers = [{{ name = "site", path = "{peer}" }}]
""")
        ra, rb = os.path.join(tmp, "rsync-a"), os.path.join(tmp, "rsync-b")
        ua, ub = os.path.join(tmp, "unison-a"), os.path.join(tmp, "unison-b")
        fa, fb = os.path.join(tmp, "rsync-fsync-a"), os.path.join(tmp, "rsync-fsync-b")
        print(f"building {args.files:,} files (1-64 KiB) in five tree pairs ...", flush=True)
        make_tree([central, peer, ra, rb, ua, ub, fa, fb], args.files, rng)
        env = dict(os.environ, UNISON=os.path.join(tmp, "unison-archive"))
        unison = ["unison", ua, ub, "-batch", "-auto", "-times", "-silent"]
        subprocess.run(unison, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        # The first cr0sync sync records the base; the second sees every file settled.
        run([binary, "--root", root, "files", "sync"])
        run([binary, "--root", root, "files", "sync"])
        total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(peer) for f in fs)
        print(f"tree: {args.files:,} files, {total / 2**20:.0f} MiB per side", flush=True)

        # 1. Nothing changed.
        find = ["find", central, peer, "-type", "f", "-printf", "%s %T@ %i %p\n"]
        cron = [binary, "--root", root, "cron", "files"]
        t_find, t_cron = [], []
        for i in range(max(args.rounds, 15)):
            for name in (["find", "cron"] if i % 2 == 0 else ["cron", "find"]):
                (t_find if name == "find" else t_cron).append(wall(find if name == "find" else cron))
        mf, mc = statistics.median(t_find), statistics.median(t_cron)
        print(f"nothing changed: find -printf of both trees {mf * 1000:.0f} ms, "
              f"cron files {mc * 1000:.0f} ms, ratio {mc / mf:.2f} (target <= 2)")

        # 2. 1% changed on each side, a fresh set each round.
        every = sorted(os.path.relpath(os.path.join(dp, f), peer)
                       for dp, _, fs in os.walk(peer) for f in fs)
        k = max(args.files // 100, 1)
        res = {"cr0sync": [], "rsync": [], "unison": [], "rsync-fsync": []}
        for i in range(args.rounds):
            picked = rng.sample(every, 2 * k)
            left, right = picked[:k], picked[k:]
            change([central, ra, ua, fa], left, f"central-{i}", rng)
            change([peer, rb, ub, fb], right, f"peer-{i}", rng)
            order = ["cr0sync", "rsync", "unison", "rsync-fsync"]
            rng.shuffle(order)
            for tool in order:
                # Each tool starts with nothing dirty: an fsync would otherwise also flush
                # what the tool before it wrote without syncing.
                os.sync()
                if tool == "cr0sync":
                    res[tool].append(run([binary, "--root", root, "files", "sync"]))
                elif tool == "rsync":
                    start = time.perf_counter()
                    subprocess.run(["rsync", "-a", "--update", ra + "/", rb + "/"], check=True)
                    subprocess.run(["rsync", "-a", "--update", rb + "/", ra + "/"], check=True)
                    res[tool].append((time.perf_counter() - start, float("nan")))
                elif tool == "rsync-fsync":
                    # The same, with each file synced as cr0sync syncs what it writes.
                    start = time.perf_counter()
                    subprocess.run(["rsync", "-a", "--fsync", "--update", fa + "/", fb + "/"], check=True)
                    subprocess.run(["rsync", "-a", "--fsync", "--update", fb + "/", fa + "/"], check=True)
                    res[tool].append((time.perf_counter() - start, float("nan")))
                else:
                    start = time.perf_counter()
                    subprocess.run(unison, env=env, check=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
                    res[tool].append((time.perf_counter() - start, float("nan")))
            for a, b in ((central, peer), (ra, rb), (ua, ub), (fa, fb)):
                diff = subprocess.run(["diff", "-r", a, b], capture_output=True)
                if diff.returncode != 0:
                    sys.exit(f"round {i}: {a} and {b} differ after the sync")
        med = {k: statistics.median(t for t, _ in v) for k, v in res.items()}
        rss = max(r for _, r in res["cr0sync"])
        print(f"1% changed on each side ({k} + {k} files): cr0sync files sync {med['cr0sync'] * 1000:.0f} ms "
              f"(peak RSS {rss:.0f} MiB), rsync -a both ways {med['rsync'] * 1000:.0f} ms, "
              f"unison -batch {med['unison'] * 1000:.0f} ms; "
              f"ratio to rsync {med['cr0sync'] / med['rsync']:.2f} (target <= 1), "
              f"to unison {med['cr0sync'] / med['unison']:.2f} (target < 1); "
              f"rsync -a --fsync both ways {med['rsync-fsync'] * 1000:.0f} ms, "
              f"ratio {med['cr0sync'] / med['rsync-fsync']:.2f}")

        # 3. A large file pulled from a master.
        if args.big_mib > 0:
            broot = os.path.join(tmp, "broot")
            master = os.path.join(tmp, "master")
            os.makedirs(master)
            new_root(binary, broot, f"""
[[files.tree]]
name = "archive"
central = "shared_storage/archive"
peers = [{{ name = "master", path = "{master}", direction = "pull" }}]
""")
            big = os.path.join(master, "big.bin")
            with open(big, "wb") as f:
                chunk = rng.randbytes(1 << 20)
                for _ in range(args.big_mib):
                    f.write(chunk)
            os.utime(big, (time.time() - 3600, time.time() - 3600))
            copy = os.path.join(tmp, "copy.bin")
            os.sync()
            t_cp, r_cp = run(["cp", big, copy])
            os.unlink(copy)
            os.sync()
            t_sync, r_sync = run([binary, "--root", broot, "files", "sync"])
            got = os.path.join(broot, "shared_storage", "archive", "big.bin")
            if os.path.getsize(got) != os.path.getsize(big):
                sys.exit("the large file was not copied whole")
            print(f"{args.big_mib} MiB file: cp {t_cp:.2f} s (peak RSS {r_cp:.0f} MiB), "
                  f"cr0sync files sync {t_sync:.2f} s (peak RSS {r_sync:.0f} MiB), "
                  f"ratio {t_sync / t_cp:.2f} (target <= 1.3, RSS < 64 MiB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
