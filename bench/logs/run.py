#!/usr/bin/env python3
"""bench/logs: the log job against `cat >> dst; sync` and `gzip -6` on the same files.

1. Copy: 50 sources that already have a checkpoint each get 10 MB of new IRC lines
   (`[2025-11-09 18:45:30] <nick> text`, 500 MB in all). Each round times
   `cr0sync logs sync` (one fdatasync per destination) and
   `for f: cat src/f >> dst/f; done; sync` on fresh copies of the same destinations,
   alternating which runs first. Medians and the ratio; peak RSS of cr0sync.
2. Memory: peak RSS of `logs sync` copying one 10 MB source and one 1 GB source.
3. Compression: a 100 MB central log rotated by `cr0sync logs rotate` (rename, gzip,
   temp + rename) against `gzip -6 -c` of the same file; times and sizes.
4. No change: `cron logs` over 1,000 synced sources, median of 30.

Usage: python3 bench/logs/run.py [--rounds N] [--bin target/release/cr0sync]
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
from common import new_root, parser, run, wall, write_config  # noqa: E402


def irc_lines(nbytes, seed):
    rnd = random.Random(seed)
    nicks = ["alice", "bob", "carol", "dave", "eve", "cr0bot", "mallory", "trent"]
    words = ("the quick brown fox jumps over lazy dog irc log merge central store bot "
             "website sync rotate line byte exactly once never lost").split()
    out, size, sec = [], 0, 0
    while size < nbytes:
        sec += 1
        text = " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 16)))
        line = (f"[2025-11-09 {10 + sec // 3600 % 14:02}:{sec // 60 % 60:02}:{sec % 60:02}] "
                f"<{rnd.choice(nicks)}> {text}\n")
        out.append(line)
        size += len(line)
    return "".join(out).encode()


def root_with_stream(tmp, src, binary, extra=""):
    return new_root(binary, os.path.join(tmp, "root"),
                    f'[logs]\nrotate_size = "100GiB"\n{extra}\n'
                    f'[[logs.stream]]\nname = "bench"\nfrom = "{src}"\nto = "logs/irc_networks/bench"\n')


def main():
    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    tmp = tempfile.mkdtemp(prefix="cr0sync-bench-logs-")
    try:
        # 1. Copy.
        src = os.path.join(tmp, "src")
        os.makedirs(src)
        chunk = irc_lines(10 * 2**20, 1)
        for i in range(50):
            with open(os.path.join(src, f"#chan{i}.log"), "wb") as f:
                f.write(b"[2025-11-09 10:00:00] <alice> hello\n")
        root = root_with_stream(tmp, src, binary)
        run([binary, "--root", root, "logs", "sync"])
        for i in range(50):
            with open(os.path.join(src, f"#chan{i}.log"), "ab") as f:
                f.write(chunk)
        template = os.path.join(tmp, "template")
        shutil.copytree(root, template)
        dest = os.path.join(root, "logs", "irc_networks", "bench")
        catdst = os.path.join(tmp, "catdst")
        total = sum(os.path.getsize(os.path.join(src, n)) for n in os.listdir(src))
        print(f"copy: 50 sources, {total / 2**20:.0f} MiB of new lines", flush=True)
        cat_script = f'for f in "{src}"/*.log; do cat "$f" >> "{catdst}/$(basename "$f")"; done; sync'
        times = {"cr0sync": [], "cat": []}
        rss = 0
        for r in range(args.rounds):
            shutil.rmtree(root)
            shutil.copytree(template, root)
            shutil.rmtree(catdst, ignore_errors=True)
            shutil.copytree(os.path.join(template, "logs", "irc_networks", "bench"), catdst)
            subprocess.run(["sync"])
            order = ["cr0sync", "cat"] if r % 2 == 0 else ["cat", "cr0sync"]
            for tool in order:
                if tool == "cr0sync":
                    t, m = run([binary, "--root", root, "logs", "sync"])
                    rss = max(rss, m)
                else:
                    t, _ = run(["sh", "-c", cat_script])
                times[tool].append(t)
            for n in ("#chan0.log", "#chan49.log"):
                if open(os.path.join(dest, n), "rb").read() != open(os.path.join(src, n), "rb").read():
                    sys.exit(f"destination {n} differs from its source")
        mc, mk = statistics.median(times["cr0sync"]), statistics.median(times["cat"])
        print(f"  cr0sync logs sync: median {mc:.3f} s ({total / 2**20 / mc:.0f} MiB/s), peak RSS {rss:.0f} MiB")
        print(f"  cat >> dst; sync:  median {mk:.3f} s ({total / 2**20 / mk:.0f} MiB/s)")
        print(f"  ratio cr0sync / cat+sync: {mc / mk:.2f} (target <= 1.0)")
        shutil.rmtree(root)
        shutil.rmtree(template)
        shutil.rmtree(catdst)
        shutil.rmtree(src)

        # 2. Memory against file size.
        for size_mb in (10, 1024):
            d = os.path.join(tmp, f"mem{size_mb}")
            s = os.path.join(d, "src")
            os.makedirs(s)
            with open(os.path.join(s, "big.log"), "wb") as f:
                for _ in range(size_mb // 10):
                    f.write(chunk)
            r = root_with_stream(d, s, binary)
            _, m = run([binary, "--root", r, "logs", "sync"])
            print(f"memory: one {size_mb} MiB source: peak RSS {m:.1f} MiB")
            shutil.rmtree(d)

        # 3. Compression.
        d = os.path.join(tmp, "rot")
        os.makedirs(os.path.join(d, "src"))
        r = root_with_stream(d, os.path.join(d, "src"), binary)
        write_config(r, '[logs]\nrotate_size = "1MiB"\nrotate = ["api/*.log"]\n')
        api = os.path.join(r, "logs", "api")
        os.makedirs(api, exist_ok=True)
        big = os.path.join(d, "api.log")
        with open(big, "wb") as f:
            for _ in range(10):
                f.write(chunk)
        size = os.path.getsize(big)
        ct, gt, csize, gsize = [], [], 0, 0
        for _ in range(args.rounds):
            for n in os.listdir(api):
                os.remove(os.path.join(api, n))
            shutil.copy(big, os.path.join(api, "api.log"))
            t, _ = run([binary, "--root", r, "logs", "rotate"])
            ct.append(t)
            csize = os.path.getsize(os.path.join(api, "api.log.1.gz"))
            with open(os.path.join(d, "out.gz"), "wb") as out:
                start = time.perf_counter()
                subprocess.run(["gzip", "-6", "-c", big], stdout=out, check=True)
                gt.append(time.perf_counter() - start)
            gsize = os.path.getsize(os.path.join(d, "out.gz"))
        mc, mg = statistics.median(ct), statistics.median(gt)
        print(f"compression of {size / 2**20:.0f} MiB: cr0sync logs rotate median {mc:.3f} s -> "
              f"{csize / 2**20:.2f} MiB; gzip -6 median {mg:.3f} s -> {gsize / 2**20:.2f} MiB")
        print(f"  speed-up vs gzip -6: {mg / mc:.2f}x (target >= 2); size {csize / gsize * 100 - 100:+.1f}% (target within 5%)")
        shutil.rmtree(d)

        # 4. No change over 1,000 sources.
        d = os.path.join(tmp, "many")
        s = os.path.join(d, "src")
        os.makedirs(s)
        for i in range(1000):
            with open(os.path.join(s, f"#c{i}.log"), "wb") as f:
                f.write(chunk[:2000])
            os.utime(os.path.join(s, f"#c{i}.log"), (time.time() - 60, time.time() - 60))
        r = root_with_stream(d, s, binary)
        run([binary, "--root", r, "cron", "logs"])
        run([binary, "--root", r, "cron", "logs"])
        t = [wall([binary, "--root", r, "cron", "logs"]) for _ in range(30)]
        print(f"no-change cron logs over 1,000 sources: median {statistics.median(t) * 1000:.1f} ms (target < 20 ms)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
