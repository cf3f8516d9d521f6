#!/bin/bash
# Hand A/B of the cold sequential read on a local 3-node cluster: an rf=3 volume and an rf=1
# volume on the same nodes; $SIZE written to each with 1 MiB fio writes, then, for each round,
# caches dropped and the file read back with 1 MiB fio reads, rf=3 and rf=1 alternating.
#
# Not a benchmark of record (benches/run.sh cluster is): a tool for comparing two builds by
# hand, as docs/benchmarks.md describes ("hand A/B").
#
#   BINARIES=/dir/with/ballast,ballast-node,ballast-fuse ROUNDS=3 SIZE=1G \
#       benches/hand/cluster-read-ab.sh
#
# Defaults: the release binaries under $CARGO_TARGET_DIR (or ~/.cache/ballast/target), 3
# rounds of 1 GiB, work directory /var/tmp/ballast-cluster-read-ab (removed at the end).
set -euo pipefail

binaries=${BINARIES:-${CARGO_TARGET_DIR:-$HOME/.cache/ballast/target}/release}
rounds=${ROUNDS:-3}
size=${SIZE:-1G}
work=${WORK:-/var/tmp/ballast-cluster-read-ab}

rf1_pid=
cleanup() {
    umount "$work/mnt/rf1" 2>/dev/null || true
    [ -n "$rf1_pid" ] && kill "$rf1_pid" 2>/dev/null || true
    "$binaries/ballast" local down --dir "$work" >/dev/null 2>&1 || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

rm -rf "$work"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
endpoints="http://127.0.0.1:$port,http://127.0.0.1:$((port + 1)),http://127.0.0.1:$((port + 2))"
"$binaries/ballast" local up --dir "$work" --nodes 3 --volume rf3 --quota 8GiB \
    --device-size 12GiB --listen "127.0.0.1:$port" >/dev/null
"$binaries/ballast" --node "$endpoints" volume create rf1 --quota 8GiB \
    --replication-factor 1 >/dev/null
mkdir -p "$work/mnt/rf1"
RUST_LOG=warn "$binaries/ballast-fuse" --node "$endpoints" --volume rf1 \
    --mountpoint "$work/mnt/rf1" 2>"$work/mnt-rf1.log" &
rf1_pid=$!
for _ in $(seq 100); do grep -q " $work/mnt/rf1 " /proc/self/mountinfo && break; sleep 0.1; done
for volume in rf3 rf1; do
    grep -q " $work/mnt/$volume " /proc/self/mountinfo || { echo "$volume is not mounted" >&2; exit 1; }
    fio --name=write --directory="$work/mnt/$volume" --filename=sequential.bin --rw=write \
        --bs=1M --size="$size" --ioengine=psync --end_fsync=1 --output=/dev/null
done

read_mb_per_s() { # volume: MB/s, and the nodes' CPU seconds per GiB read
    sync; echo 3 >/proc/sys/vm/drop_caches
    local before after
    before=$(nodes_ticks)
    fio --name=read --directory="$work/mnt/$1" --filename=sequential.bin --rw=read --bs=1M \
        --size="$size" --ioengine=psync --output-format=json >"$work/fio.json"
    after=$(nodes_ticks)
    jq -r --argjson ticks $((after - before)) \
        '.jobs[0].read | "\(.bw_bytes / 1e6 | floor) \($ticks / 100 / (.io_bytes / 1073741824) * 100 | floor / 100)"' \
        "$work/fio.json"
}

# Which node leads each volume: a driver reads through memory shared with its first node only
# when that node leads the volume, so results differ with the placement.
leader() { # volume: as node 1 sees it
    "$binaries/ballast" --node "http://127.0.0.1:$port" status 2>/dev/null |
        awk -v v="$1" '$2 == v { print $3; exit }'
}
echo "leaders: rf3 node $(leader rf3), rf1 node $(leader rf1)"
# CPU of the three node processes together, in clock ticks.
nodes_ticks() {
    local total=0 node
    for node in 1 2 3; do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$(cat "$work/node$node/node.pid")/stat")))
    done
    echo "$total"
}
for round in $(seq "$rounds"); do
    if [ $((round % 2)) = 1 ]; then
        read -r rf3 rf3_cpu <<<"$(read_mb_per_s rf3)"
        read -r rf1 rf1_cpu <<<"$(read_mb_per_s rf1)"
    else
        read -r rf1 rf1_cpu <<<"$(read_mb_per_s rf1)"
        read -r rf3 rf3_cpu <<<"$(read_mb_per_s rf3)"
    fi
    awk -v a="$rf3" -v b="$rf1" -v ac="$rf3_cpu" -v bc="$rf1_cpu" 'BEGIN {
        printf "cold read: rf=3 %d MB/s, rf=1 %d MB/s (%.2f×); nodes CPU s per GiB: rf=3 %.2f, rf=1 %.2f\n", a, b, a / b, ac, bc }'
done
