#!/bin/sh
# Removes the cr0sync block ("# BEGIN cr0sync" ... "# END cr0sync") from a user's
# crontab, keeping every other line. Does nothing if there is no block or no crontab.
#
# usage: install/remove_crontabs.sh [--user USER]
set -eu

me=remove_crontabs.sh
user=""

usage() {
    echo "usage: $me [--user USER]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --user) [ $# -ge 2 ] || usage; user=$2; shift 2 ;;
        -h | --help) usage ;;
        *) echo "$me: unknown option: $1" >&2; usage ;;
    esac
done

if [ -n "$user" ]; then
    set -- -u "$user"
else
    set --
fi

# Byte for byte, in files (command substitution would drop trailing blank lines).
tmp=$(mktemp)
trap 'rm -f "$tmp" "$tmp.rest"' EXIT
if ! crontab "$@" -l >"$tmp" 2>/dev/null; then
    echo "no crontab for ${user:-$(id -un)}; nothing to remove"
    exit 0
fi
if ! grep -q '^# BEGIN cr0sync$' "$tmp"; then
    echo "no cr0sync block in the crontab of ${user:-$(id -un)}; nothing to remove"
    exit 0
fi
sed '/^# BEGIN cr0sync$/,/^# END cr0sync$/d' "$tmp" >"$tmp.rest"
if grep -q '^# cr0sync: the line before this block had no newline$' "$tmp" && [ -s "$tmp.rest" ]; then
    # The installer added the newline: take it back.
    size=$(wc -c <"$tmp.rest")
    head -c "$((size - 1))" "$tmp.rest" >"$tmp.trim" && mv "$tmp.trim" "$tmp.rest"
fi
if grep -q '^# cr0sync: there was no crontab before this block$' "$tmp" && [ ! -s "$tmp.rest" ]; then
    crontab "$@" -r
    echo "removed the crontab of ${user:-$(id -un)}, which had only the cr0sync block"
    exit 0
fi
crontab "$@" "$tmp.rest"
echo "removed the cr0sync block from the crontab of ${user:-$(id -un)}"
