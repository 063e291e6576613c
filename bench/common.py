"""Helpers shared by the benchmark scripts: timing a command and its peak RSS."""
import os
import subprocess
import sys
import tempfile
import time

GNU_TIME = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None


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
