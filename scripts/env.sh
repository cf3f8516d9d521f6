# Sourced by the scripts: one cargo target directory outside the clone, so a reused machine
# builds incrementally, and one profile for everything the tests and the demo run.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ballast/target}"
export BALLAST_BIN_DIR="$CARGO_TARGET_DIR/debug"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
