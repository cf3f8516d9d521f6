#!/bin/bash
# Where an rf=3 sequential write's time goes: a local 3-node cluster (`ballast local up`), nodes
# logging `ballast::timing` debug events, ROUNDS fio writes of SIZE (1 MiB, psync, final
# fsync) to the rf=3 volume, and after each a summary of every node's events
# (`timing-summary.py`): the leader's writes (prewrite, proposal), its AppendEntries round
# trips, each node's log appends (data write, record append, flush) and applies.
#
# Not a benchmark of record (benches/run.sh is): a tool for reading the write path by hand.
#
#   NODES=3 ROUNDS=2 SIZE=1G benches/hand/replicated-write-timing.sh
#
# The per-round logs are kept in $WORK/logs (default /var/tmp/ballast-write-timing).
set -euo pipefail

binaries=${CARGO_TARGET_DIR:-$HOME/.cache/ballast/target}/release
work=${WORK:-/var/tmp/ballast-write-timing}
here=$(cd "$(dirname "$0")" && pwd)
nodes=${NODES:-3}
cluster=$work/cluster
cleanup() { "$binaries/ballast" local down --dir "$cluster" >/dev/null 2>&1 || true; rm -rf "$cluster"; }
trap cleanup EXIT
rm -rf "$work"
mkdir -p "$work/logs"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUST_LOG="info,openraft=warn,ballast::timing=debug" "$binaries/ballast" local up --dir "$cluster" \
    --nodes "$nodes" --volume timed --quota 8GiB --device-size 12GiB --listen "127.0.0.1:$port" >/dev/null
for round in $(seq "${ROUNDS:-2}"); do
    marks=()
    for node in $(seq "$nodes"); do marks+=("$(wc -l <"$cluster/node$node/node.log")"); done
    fio --name=write --directory="$cluster/mnt/timed" --filename="f$round.bin" --rw=write --bs=1M \
        --size="${SIZE:-1G}" --ioengine=psync --end_fsync=1 --output-format=json |
        jq -r '"round '"$round"': \(.jobs[0].write.bw_bytes / 1e6 | floor) MB/s"'
    logs=()
    for node in $(seq "$nodes"); do
        tail -n +"$((marks[node - 1] + 1))" "$cluster/node$node/node.log" >"$work/logs/round$round-node$node.log"
        logs+=("$work/logs/round$round-node$node.log")
    done
    "$here/timing-summary.py" "${logs[@]}"
    sleep 3
done
