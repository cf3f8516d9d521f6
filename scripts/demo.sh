#!/usr/bin/env bash
# The main command: installs prerequisites, builds, starts a local Ballast node on a
# file-backed device under ./.ballast, mounts a volume at ./.ballast/mnt/demo, and runs a short
# demo. Stop everything with:  target/ballast local down   (printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

scripts/install-prerequisites.sh
echo "== build"
cargo build --workspace --bins --locked
ballast="$BALLAST_BIN_DIR/ballast"
directory="$PWD/.ballast"

echo "== start a local node and mount volume 'demo'"
"$ballast" local up --dir "$directory" --volume demo --quota 1GiB
mount="$directory/mnt/demo"

echo "== demo"
echo "-- write a 64 MiB file with fsync, read it back, compare checksums"
dd if=/dev/urandom of="$directory/sample.bin" bs=1M count=64 status=none
dd if="$directory/sample.bin" of="$mount/sample.bin" bs=1M conv=fsync status=none
sha256sum "$directory/sample.bin" "$mount/sample.bin" | awk '{print "   " $1 "  " $2}'
cmp "$directory/sample.bin" "$mount/sample.bin" && echo "   identical"
echo "-- directories, a symlink, a hard link, an atomic rename"
mkdir -p "$mount/apps/shop/models"
echo "v1" > "$mount/apps/shop/models/current.tmp" && mv "$mount/apps/shop/models/current.tmp" "$mount/apps/shop/models/current"
ln -sf models/current "$mount/apps/shop/latest"
ln -f "$mount/sample.bin" "$mount/sample.hardlink"
ls -la "$mount" "$mount/apps/shop" | sed 's/^/   /'
echo "-- df shows the volume quota"
df -h "$mount" | sed 's/^/   /'
echo "-- volumes and node status"
"$ballast" volume list | sed 's/^/   /'
"$ballast" status | sed 's/^/   /'
echo
echo "The volume stays mounted at $mount."
echo "Stop everything with: $ballast local down --dir $directory"
