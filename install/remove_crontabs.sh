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

if ! current=$(crontab "$@" -l 2>/dev/null); then
    echo "no crontab for ${user:-$(id -un)}; nothing to remove"
    exit 0
fi
if ! printf '%s\n' "$current" | grep -q '^# BEGIN cr0sync$'; then
    echo "no cr0sync block in the crontab of ${user:-$(id -un)}; nothing to remove"
    exit 0
fi
printf '%s\n' "$current" | sed '/^# BEGIN cr0sync$/,/^# END cr0sync$/d' | crontab "$@" -
echo "removed the cr0sync block from the crontab of ${user:-$(id -un)}"
