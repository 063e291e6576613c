#!/usr/bin/env python3
"""bench/integrity: `security baseline` against `sha256sum`, and a no-change `security
check` against a `find -printf` walk, on the same tree of about 1 GB in 5,000 files.

Each round alternates which tool runs first; the page cache is warm for both (the tree
was just written). Prints medians, ratios and cr0sync's peak RSS; then the peak RSS of a
baseline of one 10 MiB file and of one 1 GiB file (memory must not grow with file size).

Usage: python3 bench/integrity/run.py [--rounds N] [--bin target/release/cr0sync]
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from common import new_root, parser, run, wall  # noqa: E402


def root_for(tmp, tree, binary):
    return new_root(binary, os.path.join(tmp, "root"),
                    f'[security]\nintegrity_paths = ["{tree}"]\nintegrity_exclude = []\n')


def main():
    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    tmp = tempfile.mkdtemp(prefix="cr0sync-bench-integrity-")
    try:
        tree = os.path.join(tmp, "www")
        block = os.urandom(1 << 20)
        total = 0
        for i in range(5000):
            d = os.path.join(tree, f"d{i % 50}")
            os.makedirs(d, exist_ok=True)
            size = 40_000 + (i * 7919) % 320_000
            with open(os.path.join(d, f"f{i}.bin"), "wb") as f:
                f.write((block * (size // len(block) + 1))[:size])
            total += size
        print(f"tree: 5,000 files, {total / 2**30:.2f} GiB", flush=True)
        root = root_for(tmp, tree, binary)
        sha = f'find "{tree}" -type f -print0 | xargs -0 sha256sum > /dev/null'
        walk = f'find "{tree}" -printf "%p %s %T@ %C@ %i %m %U %G\\n" > /dev/null'
        base_t, sha_t, check_t, find_t = [], [], [], []
        rss = 0.0
        run([binary, "--root", root, "security", "baseline"])
        for r in range(args.rounds):
            pair = [("cr0", [binary, "--root", root, "security", "baseline"]), ("sha", ["sh", "-c", sha])]
            for name, cmd in (pair if r % 2 == 0 else pair[::-1]):
                t, m = run(cmd)
                if name == "cr0":
                    base_t.append(t)
                    rss = max(rss, m)
                else:
                    sha_t.append(t)
            # Old mtimes: nothing is racy, so a check of the unchanged tree reads nothing.
            subprocess.run(["find", tree, "-type", "f", "-exec", "touch", "-d", "2020-01-01", "{}", "+"], check=True)
            run([binary, "--root", root, "security", "baseline"])
            for _ in range(3):
                check_t.append(wall([binary, "--root", root, "security", "check"]))
                find_t.append(wall(["sh", "-c", walk]))
        mb, ms = statistics.median(base_t), statistics.median(sha_t)
        mc, mf = statistics.median(check_t), statistics.median(find_t)
        print(f"security baseline: median {mb:.3f} s ({total / 2**20 / mb:.0f} MiB/s), peak RSS {rss:.0f} MiB")
        print(f"sha256sum:         median {ms:.3f} s ({total / 2**20 / ms:.0f} MiB/s)")
        print(f"  speed-up: {ms / mb:.2f}x (target >= 3)")
        print(f"no-change security check: median {mc * 1000:.1f} ms; find -printf walk: median {mf * 1000:.1f} ms")
        print(f"  ratio: {mc / mf:.2f} (target <= 2)")
        shutil.rmtree(tmp)
        os.makedirs(tmp)
        for size_mb in (10, 1024):
            d = os.path.join(tmp, f"m{size_mb}")
            t = os.path.join(d, "tree")
            os.makedirs(t)
            with open(os.path.join(t, "big.bin"), "wb") as f:
                for _ in range(size_mb):
                    f.write(block)
            r = root_for(d, t, binary)
            _, m = run([binary, "--root", r, "security", "baseline"])
            print(f"memory: baseline of one {size_mb} MiB file: peak RSS {m:.1f} MiB")
            shutil.rmtree(d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
