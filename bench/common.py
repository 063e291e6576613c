"""Helpers shared by the benchmark scripts: their common options, a root to run on,
timing a command and its peak RSS."""
import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GNU_TIME = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None


def parser(doc):
    """An argument parser with the option every benchmark has: --bin, the cr0sync
    binary (default: this checkout's release build)."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--bin", default=os.path.join(HERE, "..", "target", "release", "cr0sync"))
    return ap


def write_config(root, text):
    with open(os.path.join(root, "cr0sync.toml"), "w") as f:
        f.write(text)


def new_root(binary, root, config=None):
    """`cr0sync init` of `root`, then its cr0sync.toml replaced by `config` if given."""
    subprocess.run([os.path.abspath(binary), "--root", root, "init"], check=True,
                   stdout=subprocess.DEVNULL)
    if config is not None:
        write_config(root, config)
    return root


def wall(cmd):
    """Wall time of cmd alone (no GNU time wrapper), for the millisecond figures."""
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def run(cmd):
    """Runs cmd; returns (seconds, peak RSS in MiB). The RSS comes from GNU time (Debian
    package `time`), whose own small process forks the program: measured from this Python
    process, a forked child would count the harness's memory too."""
    err = tempfile.TemporaryFile()
    rss_file = tempfile.NamedTemporaryFile(delete=False)
    full = [GNU_TIME, "-f", "%M", "-o", rss_file.name] + cmd if GNU_TIME else cmd
    start = time.perf_counter()
    proc = subprocess.run(full, stdout=subprocess.DEVNULL, stderr=err)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        err.seek(0)
        sys.exit(f"{cmd} failed ({proc.returncode}): {err.read().decode()}")
    rss = float("nan")
    if GNU_TIME:
        with open(rss_file.name) as f:
            rss = int(f.read().split()[-1]) / 1024
    os.unlink(rss_file.name)
    return elapsed, rss
