#!/usr/bin/env bash
# The main command: installs prerequisites, builds, starts a local 3-node Ballast cluster (three
# processes, each with its own file-backed device under ./.ballast), mounts a 3-way replicated
# volume at ./.ballast/mnt/demo, and runs a short demo, including kill -9 of the node leading the
# volume. Stop everything with:  ballast local down --dir .ballast   (printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

scripts/install-prerequisites.sh
echo "== build"
cargo build --workspace --bins --locked
ballast="$BALLAST_BIN_DIR/ballast"
directory="$PWD/.ballast"

echo "== start a local 3-node cluster and mount volume 'demo' (3 replicas)"
if [ -d "$directory" ]; then
    # A fresh cluster every run: the demo's data is throw-away, and a directory left by an older
    # build may hold an on-disk format this build refuses.
    echo "   removing the previous demo cluster in $directory"
    "$ballast" local down --dir "$directory" >/dev/null 2>&1 || true
    if findmnt -rn -o TARGET | grep -q "^$directory/"; then
        echo "a mount under $directory is still active; unmount it first" >&2
        exit 1
    fi
    rm -rf --one-file-system "$directory"
fi
"$ballast" local up --dir "$directory" --volume demo --quota 1GiB --nodes 3
mount="$directory/mnt/demo"
nodes="http://127.0.0.1:7400,http://127.0.0.1:7401,http://127.0.0.1:7402"
export BALLAST_NODE="$nodes"

echo "== demo"
echo "-- write a 64 MiB file with fsync, read it back, compare checksums"
dd if=/dev/urandom of="$directory/sample.bin" bs=1M count=64 status=none
dd if="$directory/sample.bin" of="$mount/sample.bin" bs=1M conv=fsync status=none
sha256sum "$directory/sample.bin" "$mount/sample.bin" | awk '{print "   " $1 "  " $2}'
cmp "$directory/sample.bin" "$mount/sample.bin" && echo "   identical"
echo "-- each replica wrote those 1 MiB writes to its device once: the log holds only records"
echo "   naming the blocks (pinned until a checkpoint lets the log be purged)"
for port in 7400 7401 7402; do
    "$ballast" --node "http://127.0.0.1:$port" status | awk -v port="$port" '/^detached writes/ { sub(/^detached writes +/, ""); print "   node at :" port ": " $0 }'
done
echo "-- directories, a symlink, a hard link, an atomic rename"
mkdir -p "$mount/apps/shop/models"
echo "v1" > "$mount/apps/shop/models/current.tmp" && mv "$mount/apps/shop/models/current.tmp" "$mount/apps/shop/models/current"
ln -sf models/current "$mount/apps/shop/latest"
ln -f "$mount/sample.bin" "$mount/sample.hardlink"
ls -la "$mount" "$mount/apps/shop" | sed 's/^/   /'
echo "-- df shows the volume quota"
df -h "$mount" | sed 's/^/   /'
echo "-- the cluster: nodes, and where the volume's replicas and leader are"
"$ballast" node list | sed 's/^/   /'
"$ballast" volume list | sed 's/^/   /'
leader=$("$ballast" volume list --bytes | awk '$1 == "demo" { print $8 }')
echo "-- kill -9 node $leader, which leads the volume; the data is still there"
kill -9 "$(cat "$directory/node$leader/node.pid")"
# O_DIRECT: read from the cluster, not from the page cache.
expected=$(sha256sum < "$directory/sample.bin" | awk '{print $1}')
actual=$(dd if="$mount/sample.bin" iflag=direct bs=1M status=none | sha256sum | awk '{print $1}')
echo "   $actual  sample.bin read back with node $leader dead"
[ "$actual" = "$expected" ] && echo "   identical to what was written"
echo "written while node $leader is down" > "$mount/during-outage.txt" && sync "$mount/during-outage.txt"
echo "   wrote during-outage.txt: $(cat "$mount/during-outage.txt")"
"$ballast" volume list | sed 's/^/   /'
new_leader=$("$ballast" volume list --bytes | awk '$1 == "demo" { print $8 }')
echo "-- restart node $leader (local up starts what is missing); it catches up"
"$ballast" local up --dir "$directory" --volume demo --nodes 3 | grep "started node" | sed 's/^/   /'
for attempt in $(seq 1 50); do
  applied=$("$ballast" --node "http://127.0.0.1:$((7399 + leader))" status 2>/dev/null | awk '$2 == "demo" { print $4 }')
  leader_applied=$("$ballast" --node "http://127.0.0.1:$((7399 + new_leader))" status 2>/dev/null | awk '$2 == "demo" { print $4 }')
  [ -n "$applied" ] && [ "$applied" != 0 ] && [ "$applied" = "$leader_applied" ] && break
  sleep 0.2
done
echo "   node $leader applied index ${applied:-?}, the leader (node $new_leader) ${leader_applied:-?}"
echo
echo "The volume stays mounted at $mount."
echo "Stop everything with: $ballast local down --dir $directory"
