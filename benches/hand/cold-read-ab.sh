#!/bin/bash
# Hand A/B of the cold sequential read through a FUSE mount: one node, one 1 GiB file written
# once; each round starts the node with environment A, then with environment B (restarting
# node and driver, caches dropped), reads the file with fio (1 MiB, psync), and prints MB/s,
# the node's and driver's CPU per GiB, and what reached the disk (requests × average size,
# mean time per request, mean requests at once). Then the same for a native file, buffered
# and with O_DIRECT. TRACE=/path/prefix saves the block layer's request and split events of
# each read to /path/prefix-<label>-<round>.txt.
#
# Not a benchmark of record (benches/run.sh is): a tool for comparing two variants by hand,
# alternating them, as docs/benchmarks.md describes ("hand A/B").
#
#   ENV_A="" ENV_B="BALLAST_SOMETHING=1" ROUNDS=3 benches/hand/cold-read-ab.sh
#   NODE_BINARY_B=/path/other/ballast-node ROUNDS=3 benches/hand/cold-read-ab.sh
set -euo pipefail

binaries=${CARGO_TARGET_DIR:-$HOME/.cache/ballast/target}/release
node_binary_a=${NODE_BINARY_A:-$binaries/ballast-node}
node_binary_b=${NODE_BINARY_B:-$node_binary_a}
fuse_binary=${FUSE_BINARY:-$binaries/ballast-fuse}
cli_binary=${CLI_BINARY:-$binaries/ballast}
rounds=${ROUNDS:-3}
size=${SIZE:-1G}
work=${WORK:-/var/tmp/ballast-read-ab}
disk=${DISK:-$(lsblk -no pkname "$(findmnt -no source --target /var/tmp)" 2>/dev/null || true)}
disk_stat=/sys/block/${disk:-vda}/stat

node_pid= fuse_pid=
stop() {
    umount "$work/mnt" 2>/dev/null || true
    [ -n "$fuse_pid" ] && { kill "$fuse_pid" 2>/dev/null || true; wait "$fuse_pid" 2>/dev/null || true; }
    [ -n "$node_pid" ] && { kill "$node_pid" 2>/dev/null || true; wait "$node_pid" 2>/dev/null || true; }
    fuse_pid= node_pid=
}
cleanup() { stop; rm -rf "$work"; }
trap cleanup EXIT

rm -rf "$work"
mkdir -p "$work/mnt" "$work/native"
device=$work/device.img
fio --name=fill --filename="$device" --rw=write --bs=1M --size=4G --ioengine=io_uring \
    --direct=1 --iodepth=8 --output=/dev/null
"$node_binary_a" format --device "$device" --node-id 1 >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

start() { # node binary, environment ("NAME=value ...")
    : >"$work/node.out"
    env $2 RUST_LOG=warn "$1" run --device "$device" --state-dir "$work/state" \
        --listen "127.0.0.1:$port" >"$work/node.out" 2>>"$work/node.log" &
    node_pid=$!
    for _ in $(seq 100); do grep -q "serving on" "$work/node.out" && break; sleep 0.1; done
    "$cli_binary" --node "http://127.0.0.1:$port" volume list | grep -q '^ab\b' ||
        "$cli_binary" --node "http://127.0.0.1:$port" volume create ab --quota 3G >/dev/null
    RUST_LOG=warn "$fuse_binary" --node "http://127.0.0.1:$port" --volume ab \
        --mountpoint "$work/mnt" 2>>"$work/fuse.log" &
    fuse_pid=$!
    for _ in $(seq 100); do grep -q " $work/mnt " /proc/self/mountinfo && break; sleep 0.1; done
    grep -q " $work/mnt " /proc/self/mountinfo || { echo "the mount did not come up" >&2; exit 1; }
}

ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
disk_counters() { awk '{ print $1, $3, $4 }' "$disk_stat"; }
read_once() { # label, file, extra fio arguments...
    local label=$1 file=$2
    shift 2
    sync; echo 3 >/proc/sys/vm/drop_caches
    local node_before=0 fuse_before=0 before after
    [ -n "$node_pid" ] && node_before=$(ticks "$node_pid") fuse_before=$(ticks "$fuse_pid")
    read -r -a before <<<"$(disk_counters)"
    local tracing=/sys/kernel/tracing
    if [ -n "${TRACE:-}" ]; then
        echo >"$tracing/trace"
        echo 1 >"$tracing/events/block/block_rq_issue/enable"
        echo 1 >"$tracing/events/block/block_split/enable"
        echo 1 >"$tracing/tracing_on"
    fi
    fio --name=read --filename="$file" --rw=read --bs=1M --size="$size" --output-format=json \
        "$@" >"$work/fio.json"
    read -r -a after <<<"$(disk_counters)"
    if [ -n "${TRACE:-}" ]; then
        echo 0 >"$tracing/tracing_on"
        echo 0 >"$tracing/events/block/block_rq_issue/enable"
        echo 0 >"$tracing/events/block/block_split/enable"
        cp "$tracing/trace" "$TRACE-$label-$round.txt"
    fi
    local node_after=0 fuse_after=0 huge_kib=0
    [ -n "$node_pid" ] && node_after=$(ticks "$node_pid") fuse_after=$(ticks "$fuse_pid") &&
        huge_kib=$(awk '/AnonHugePages/ { print $2 }' "/proc/$node_pid/smaps_rollup")
    awk -v label="$label" -v mbs="$(jq '.jobs[0].read.bw_bytes / 1e6' "$work/fio.json")" \
        -v gib="$(jq '.jobs[0].read.io_bytes / 1073741824' "$work/fio.json")" \
        -v huge="$huge_kib" -v ms="$(jq '.jobs[0].read.runtime' "$work/fio.json")" \
        -v node=$((node_after - node_before)) -v fuse=$((fuse_after - fuse_before)) \
        -v r=$((after[0] - before[0])) -v s=$((after[1] - before[1])) -v t=$((after[2] - before[2])) 'BEGIN {
        printf "%-10s %6.0f MB/s  CPU s/GiB node %.2f driver %.2f  disk %d x %.0f KiB, %.1f ms, %.1f at once; node huge pages %d MiB\n",
            label, mbs, node / 100 / gib, fuse / 100 / gib, r, (r ? s / 2 / r : 0), (r ? t / r : 0), (ms ? t / ms : 0), huge / 1024 }'
}

start "$node_binary_a" "${ENV_A:-}"
fio --name=write --filename="$work/mnt/sequential.bin" --rw=write --bs=1M --size="$size" \
    --ioengine=psync --end_fsync=1 --output=/dev/null
stop
fio --name=write --filename="$work/native/sequential.bin" --rw=write --bs=1M --size="$size" \
    --ioengine=psync --end_fsync=1 --output=/dev/null

for round in $(seq "$rounds"); do
    echo "round $round"
    start "$node_binary_a" "${ENV_A:-}"
    read_once "A" "$work/mnt/sequential.bin" --ioengine=psync
    stop
    start "$node_binary_b" "${ENV_B:-}"
    read_once "B" "$work/mnt/sequential.bin" --ioengine=psync
    stop
    read_once "native" "$work/native/sequential.bin" --ioengine=psync
    read_once "O_DIRECT" "$work/native/sequential.bin" --ioengine=io_uring --direct=1 --iodepth=8
done
