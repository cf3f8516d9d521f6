#!/usr/bin/env bash
# The test command: installs prerequisites, builds every crate once (dev profile), and runs the
# whole test suite: unit tests, property tests, and end-to-end tests with real processes, real
# FUSE mounts and real MariaDB.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

scripts/install-prerequisites.sh
# A reused machine may hold nodes, mounts and namespaces of a run that was killed.
scripts/clean-test-leftovers.sh
echo "== build (target dir $CARGO_TARGET_DIR)"
cargo build --workspace --bins --tests --locked
echo "== tests"
# Two test threads: the machine has two cores and each end-to-end test runs its own node.
cargo test --workspace --locked --no-fail-fast -- --test-threads=2 "$@"
