#!/bin/sh
# Runs each cr0sync job once as cron would, in dry-run mode (nothing is written), and
# reports pass or fail per job. Exit 0 only if all pass.
#
# usage: install/test_cron_scripts.sh [--root DIR] [--bin PATH]
#   --root  the central store (default: $CR0SYNC_ROOT, else /data/cr0_system)
#   --bin   the cr0sync binary (default: $CR0SYNC_BIN, else cr0sync on PATH)
set -u

me=test_cron_scripts.sh
root=${CR0SYNC_ROOT:-/data/cr0_system}
bin=${CR0SYNC_BIN:-}

usage() {
    echo "usage: $me [--root DIR] [--bin PATH]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || usage; root=$2; shift 2 ;;
        --bin) [ $# -ge 2 ] || usage; bin=$2; shift 2 ;;
        -h | --help) usage ;;
        *) echo "$me: unknown option: $1" >&2; usage ;;
    esac
done

[ -n "$bin" ] || bin=$(command -v cr0sync || true)
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "$me: cr0sync binary not found or not executable: ${bin:-(not on PATH)}. Try: --bin /path/to/cr0sync" >&2
    exit 1
fi

failed=0
for job in database logs security files; do
    err=$("$bin" --root "$root" cron "$job" --dry-run 2>&1 >/dev/null)
    code=$?
    case $code in
        0) echo "$job: pass" ;;
        4) echo "$job: pass (integrity findings: see cr0sync security check)" ;;
        *)
            echo "$job: FAIL (exit $code): $(printf '%s' "$err" | head -n 1)"
            failed=1
            ;;
    esac
done
exit $failed
