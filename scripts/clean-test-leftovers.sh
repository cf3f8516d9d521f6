#!/usr/bin/env bash
# Removes what an interrupted test run left behind on this machine, so the next run starts clean:
# a test killed with SIGKILL (or a CI job cut off) cannot run its cleanup, and leaves storage
# nodes and FUSE drivers running, FUSE and loop mounts, loop devices, network namespaces and
# their bridge, and its temporary directory.
#
# Touches only what the tests name (`tests/src/lib.rs`, `tests/src/netns.rs`):
#   - test directories `ballast-test-*` under $BALLAST_TEST_DIR (default: the temp directory)
#     whose last change is older than $BALLAST_LEFTOVER_MINUTES (default 120; no run of the
#     suite takes that long), with the processes whose command line names them, the mounts under
#     them and the loop devices backed by files in them;
#   - network namespaces named `bl` + 5 hex digits + `n` + index with no process inside, and
#     bridges named `bl` + 5 hex digits + `br` with no namespace of their prefix left.
# A suite running at the same time is left alone: its directories are young, and its
# namespaces hold its nodes.
set -uo pipefail

root="${BALLAST_TEST_DIR:-${TMPDIR:-/tmp}}"
minutes="${BALLAST_LEFTOVER_MINUTES:-120}"
cleaned=0

# Bounded: at most 1,000 leftover directories per run.
mapfile -t directories < <(find "$root" -maxdepth 1 -name 'ballast-test-*' -type d \
    -mmin "+$minutes" 2>/dev/null | head -n 1000)

for directory in "${directories[@]}"; do
    [ -n "$directory" ] || continue
    # Processes started for this directory (nodes, drivers, MariaDB): stopped first, so no
    # mount is held busy and no device is reopened.
    pkill -KILL -f -- "$directory/" 2>/dev/null && cleaned=$((cleaned + 1))
    # Mounts under it, deepest first. A FUSE mount whose driver is gone answers ENOTCONN or
    # hangs; a lazy unmount detaches it either way.
    mapfile -t mounts < <(awk -v prefix="$directory/" 'index($5, prefix) == 1 { print $5 }' \
        /proc/self/mountinfo | sort -r)
    for mountpoint in "${mounts[@]}"; do
        [ -n "$mountpoint" ] || continue
        umount -l "$mountpoint" 2>/dev/null && cleaned=$((cleaned + 1))
    done
    # Loop devices backed by files in it.
    if command -v losetup >/dev/null; then
        mapfile -t loops < <(losetup -n -l -O NAME,BACK-FILE 2>/dev/null |
            awk -v prefix="$directory/" 'index($2, prefix) == 1 { print $1 }')
        for loop in "${loops[@]}"; do
            [ -n "$loop" ] || continue
            losetup -d "$loop" 2>/dev/null && cleaned=$((cleaned + 1))
        done
    fi
    rm -rf --one-file-system "$directory" 2>/dev/null && cleaned=$((cleaned + 1))
done

if command -v ip >/dev/null; then
    mapfile -t namespaces < <(ip netns list 2>/dev/null | awk '{ print $1 }' |
        grep -E '^bl[0-9a-f]{5}n[0-9]+$' | head -n 1000)
    for namespace in "${namespaces[@]}"; do
        [ -n "$namespace" ] || continue
        if [ -z "$(ip netns pids "$namespace" 2>/dev/null)" ]; then
            ip netns delete "$namespace" 2>/dev/null && cleaned=$((cleaned + 1))
        fi
    done
    mapfile -t bridges < <(ip -o link show type bridge 2>/dev/null |
        awk -F': ' '{ print $2 }' | cut -d@ -f1 | grep -E '^bl[0-9a-f]{5}br$' | head -n 1000)
    for bridge in "${bridges[@]}"; do
        [ -n "$bridge" ] || continue
        prefix="${bridge%br}"
        if ! ip netns list 2>/dev/null | awk '{ print $1 }' | grep -q "^${prefix}n"; then
            ip link delete "$bridge" 2>/dev/null && cleaned=$((cleaned + 1))
        fi
    done
fi

if [ "$cleaned" -gt 0 ]; then
    echo "== removed $cleaned leftovers of interrupted test runs"
fi
exit 0
