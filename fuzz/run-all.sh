#!/usr/bin/env bash
# Runs every Ballast fuzz target for N seconds each (default 30), one after another.
# Exits non-zero if any target crashes (libFuzzer leaves the input in artifacts/<target>/).
#
#   fuzz/run-all.sh            # 30 s per target
#   fuzz/run-all.sh 300        # 5 min per target
#   fuzz/run-all.sh 60 log_batch superblock   # only these targets
#
# Environment: CARGO_TARGET_DIR (default ~/.cache/ballast/fuzz-target), and optionally
# ROCKSDB_LIB_DIR + ROCKSDB_STATIC=1 to link a prebuilt librocksdb.a instead of compiling RocksDB
# (default: ~/.cache/ballast/fuzz-rocksdb if it holds one; see README.md). Needs cargo-fuzz; the stable toolchain is used with RUSTC_BOOTSTRAP=1.
set -euo pipefail

seconds="${1:-30}"
shift || true
cd "$(dirname "$0")"

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ballast/fuzz-target}"
# A prebuilt librocksdb.a saves compiling RocksDB (with ASan flags) from source; see README.md.
if [ -z "${ROCKSDB_LIB_DIR:-}" ] && [ -f "$HOME/.cache/ballast/fuzz-rocksdb/librocksdb.a" ]; then
    export ROCKSDB_LIB_DIR="$HOME/.cache/ballast/fuzz-rocksdb" ROCKSDB_STATIC=1
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

echo "=== building"
cargo fuzz build

failed=()
for target in "${targets[@]}"; do
    echo "=== $target: ${seconds}s"
    log="$(mktemp "${TMPDIR:-/tmp}/ballast-fuzz-$target.XXXXXX.log")"
    if cargo fuzz run "$target" -- -max_total_time="$seconds" >"$log" 2>&1; then
        grep -E '^Done [0-9]+ runs' "$log" || true
    else
        echo "!!! $target FAILED (log: $log)"
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written to' "$log" || tail -n 30 "$log"
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "crashed: ${failed[*]}"
    exit 1
fi
echo "all ${#targets[@]} targets ran ${seconds}s without a crash"
