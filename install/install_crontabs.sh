#!/bin/sh
# Installs cr0sync's four every-minute entries into a user's crontab, between
# "# BEGIN cr0sync" and "# END cr0sync". Idempotent: an earlier block is replaced, every
# other line is kept. The block goes last, so its SHELL/PATH/MAILTO settings apply to its
# own lines only. Works when the user has no crontab yet.
#
# usage: install/install_crontabs.sh [--user USER] [--root DIR] [--bin PATH]
#   --user  whose crontab (default: the invoking user; other users need root)
#   --root  the central store (default: $CR0SYNC_ROOT, else /data/cr0_system)
#   --bin   the cr0sync binary (default: $CR0SYNC_BIN, else cr0sync on PATH)
set -eu

me=install_crontabs.sh
user=""
root=${CR0SYNC_ROOT:-/data/cr0_system}
bin=${CR0SYNC_BIN:-}

usage() {
    echo "usage: $me [--user USER] [--root DIR] [--bin PATH]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --user) [ $# -ge 2 ] || usage; user=$2; shift 2 ;;
        --root) [ $# -ge 2 ] || usage; root=$2; shift 2 ;;
        --bin) [ $# -ge 2 ] || usage; bin=$2; shift 2 ;;
        -h | --help) usage ;;
        *) echo "$me: unknown option: $1" >&2; usage ;;
    esac
done

[ -n "$bin" ] || bin=$(command -v cr0sync || true)
if [ -z "$bin" ] || [ ! -f "$bin" ] || [ ! -x "$bin" ]; then
    echo "$me: cr0sync binary not found or not executable: ${bin:-(not on PATH)}. Try: --bin /path/to/cr0sync" >&2
    exit 1
fi
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

if [ ! -f "$root/cr0sync.toml" ]; then
    echo "$me: $root is not an initialized cr0sync root (no cr0sync.toml). Try: $bin --root $root init" >&2
    exit 1
fi
root=$(cd "$root" && pwd)

if [ -n "$user" ]; then
    set -- -u "$user"
else
    set --
fi

# The current crontab, byte for byte, in a file (command substitution would drop its
# trailing blank lines). An earlier cr0sync block is replaced; whether the user had a
# crontab before the first install, and whether it ended in a newline, is kept in the
# block, so remove_crontabs.sh can give back exactly what was there.
tmp=$(mktemp)
trap 'rm -f "$tmp" "$tmp.rest"' EXIT
none_before=false
if ! crontab "$@" -l >"$tmp" 2>/dev/null; then
    : >"$tmp"
    none_before=true
fi
if grep -q '^# cr0sync: there was no crontab before this block$' "$tmp"; then
    none_before=true
fi
no_newline=false
if grep -q '^# cr0sync: the line before this block had no newline$' "$tmp"; then
    no_newline=true
fi
sed '/^# BEGIN cr0sync$/,/^# END cr0sync$/d' "$tmp" >"$tmp.rest"
if [ -s "$tmp.rest" ] && [ "$(tail -c 1 "$tmp.rest" | od -An -c | tr -d ' ')" != '\n' ]; then
    no_newline=true
    echo >>"$tmp.rest"
fi

{
    cat "$tmp.rest"
    echo "# BEGIN cr0sync"
    echo "# installed by install/install_crontabs.sh; remove with install/remove_crontabs.sh"
    if $none_before; then
        echo "# cr0sync: there was no crontab before this block"
    fi
    if $no_newline; then
        echo "# cr0sync: the line before this block had no newline"
    fi
    echo "SHELL=/bin/sh"
    echo "PATH=/usr/local/bin:/usr/bin:/bin"
    echo "MAILTO=${MAILTO:-root}"
    for job in database logs security files; do
        echo "* * * * * $bin --root $root cron $job"
    done
    echo "# END cr0sync"
} | crontab "$@" -

echo "installed the cr0sync block into the crontab of ${user:-$(id -un)}: $bin --root $root"
