#!/bin/bash
# Hand A/B of the sequential write through a FUSE mount: for each round, a 1 MiB fio write of
# $SIZE through a one-node mount, then the same write to a native directory of the same
# filesystem, with the CPU per GiB written of the node, the driver and the whole machine.
#
# Not a benchmark of record (benches/run.sh is): a tool for comparing two builds by hand,
# alternating them, as docs/benchmarks.md describes ("hand A/B").
#
#   NODE_BINARY=/path/ballast-node FUSE_BINARY=/path/ballast-fuse ROUNDS=2 SIZE=2G \
#       benches/hand/sequential-write-ab.sh
#
# Defaults: the release binaries under $CARGO_TARGET_DIR (or ~/.cache/ballast/target), 3
# rounds of 2 GiB, work directory /var/tmp/ballast-write-ab (removed at the end). PERF=1
# records `perf record -a` for 2 s of the first round into $WORK/perf.data (kept). NODE_LOG sets
# the node's RUST_LOG (default warn; `warn,ballast::timing=debug` logs each write's steps to
# $WORK/node.log, kept), FUSE_LOG the driver's (the same filter logs each node write it sent
# to $WORK/fuse.log; see benches/hand/write-lineup.py and driver-series.py).
set -euo pipefail

binaries=${CARGO_TARGET_DIR:-$HOME/.cache/ballast/target}/release
node_binary=${NODE_BINARY:-$binaries/ballast-node}
fuse_binary=${FUSE_BINARY:-$binaries/ballast-fuse}
cli_binary=${CLI_BINARY:-$binaries/ballast}
rounds=${ROUNDS:-3}
size=${SIZE:-2G}
work=${WORK:-/var/tmp/ballast-write-ab}

node_pid= fuse_pid=
cleanup() {
    umount "$work/mnt" 2>/dev/null || true
    [ -n "$fuse_pid" ] && kill "$fuse_pid" 2>/dev/null || true
    [ -n "$node_pid" ] && kill "$node_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work/device.img" "$work/state" "$work/native"
}
trap cleanup EXIT

rm -rf "$work"
mkdir -p "$work/mnt" "$work/native"
device=$work/device.img
truncate -s 8G "$device"
# A written device file: first writes to a sparse file are the host filesystem allocating.
fio --name=fill --filename="$device" --rw=write --bs=1M --size=8G --ioengine=io_uring \
    --direct=1 --iodepth=8 --output=/dev/null
"$node_binary" format --device "$device" --node-id 1 >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUST_LOG=${NODE_LOG:-warn} "$node_binary" run --device "$device" --state-dir "$work/state" \
    --listen "127.0.0.1:$port" >"$work/node.out" 2>"$work/node.log" &
node_pid=$!
for _ in $(seq 100); do grep -q "serving on" "$work/node.out" && break; sleep 0.1; done
"$cli_binary" --node "http://127.0.0.1:$port" volume create ab --quota 6G >/dev/null
RUST_LOG=${FUSE_LOG:-warn} "$fuse_binary" --node "http://127.0.0.1:$port" --volume ab \
    --mountpoint "$work/mnt" 2>"$work/fuse.log" &
fuse_pid=$!
for _ in $(seq 100); do grep -q " $work/mnt " /proc/self/mountinfo && break; sleep 0.1; done
grep -q " $work/mnt " /proc/self/mountinfo || { echo "the mount did not come up" >&2; exit 1; }

ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
write_mb_per_s() { # directory
    fio --name=write --directory="$1" --filename=sequential.bin --rw=write --bs=1M \
        --size="$size" --ioengine=psync --end_fsync=1 --output-format=json >"$work/fio.json"
    rm -f "$1/sequential.bin"
    jq '.jobs[0].write.bw_bytes / 1e6 | floor' "$work/fio.json"
}

for round in $(seq "$rounds"); do
    sync; echo 3 >/proc/sys/vm/drop_caches
    node_before=$(ticks "$node_pid") fuse_before=$(ticks "$fuse_pid") all_before=$(machine_ticks)
    perf_pid=
    if [ -n "${PERF:-}" ] && [ "$round" = 1 ]; then
        perf record -q -a -o "$work/perf.data" -- sleep 2 & perf_pid=$!
    fi
    ballast=$(write_mb_per_s "$work/mnt")
    gib=$(jq '.jobs[0].write.io_bytes / 1073741824' "$work/fio.json")
    node_after=$(ticks "$node_pid") fuse_after=$(ticks "$fuse_pid") all_after=$(machine_ticks)
    [ -n "$perf_pid" ] && wait "$perf_pid"
    sync; echo 3 >/proc/sys/vm/drop_caches
    native=$(write_mb_per_s "$work/native")
    awk -v b="$ballast" -v n="$native" -v g="$gib" -v node=$((node_after - node_before)) \
        -v fuse=$((fuse_after - fuse_before)) -v all=$((all_after - all_before)) 'BEGIN {
        printf "ballast %d MB/s, native %d MB/s; CPU s per GiB: node %.2f, driver %.2f, machine %.2f\n",
            b, n, node / 100 / g, fuse / 100 / g, all / 100 / g }'
done
