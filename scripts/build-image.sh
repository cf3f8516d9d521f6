#!/usr/bin/env bash
# Builds the Ballast container image with podman, without a Docker engine and without pulling
# anything from a container registry:
#
#   1. base: a minimal Debian root filesystem made by mmdebstrap from Debian's packages
#      (variant "essential" plus image/base-packages.txt, the same release as this machine so
#      the binaries' glibc matches), imported into podman as localhost/ballast-base:<hash>;
#   2. image: image/Containerfile on top of it, adding every executable ballast* file found in
#      $BALLAST_BIN_DIR (stripped of debug info) and image/ballast-node-prepare, tagged
#      localhost/ballast:<hash>, localhost/ballast:dev and localhost/ballast:<version> (the
#      chart's default image).
#
# Both steps are cached, keyed by a hash of their inputs: the base by the package list and the
# mmdebstrap command, the image by the base, the recipe and the binaries. A rebuild with
# unchanged inputs does nothing. Older localhost/ballast and localhost/ballast-base images made
# by this script are removed (by exact name), so a machine keeps one of each.
#
# Requires root, podman, mmdebstrap (scripts/install-prerequisites.sh installs them).
# ballast-node, ballast-fuse and ballast are required; any other ballast* binary (ballast-csi,
# ballast-scheduler-extender) is included when present.
#
# Prints the image reference (localhost/ballast:<hash>) as the last line of stdout.
#
# Environment: BALLAST_BIN_DIR (default: the cargo target dir's debug/, see scripts/env.sh),
# BALLAST_IMAGE_CACHE (default: ~/.cache/ballast/image), BALLAST_DEBIAN_MIRROR,
# BALLAST_DEBIAN_SECURITY_MIRROR, BALLAST_IMAGE_SUITE (default: this machine's release).
set -euo pipefail
cd "$(dirname "$0")/.."
repository="$PWD"
if [ -z "${BALLAST_BIN_DIR:-}" ]; then source scripts/env.sh; fi

cache="${BALLAST_IMAGE_CACHE:-$HOME/.cache/ballast/image}"
mirror="${BALLAST_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security_mirror="${BALLAST_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
suite="${BALLAST_IMAGE_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}"

log() { echo "build-image: $*" >&2; }
fail() { log "error: $*"; exit 1; }

for tool in podman mmdebstrap strip sha256sum; do
  command -v "$tool" >/dev/null || fail "$tool is missing (run scripts/install-prerequisites.sh)"
done
for name in ballast-node ballast-fuse ballast; do
  [ -x "$BALLAST_BIN_DIR/$name" ] || fail "$BALLAST_BIN_DIR/$name is missing (build with cargo build --workspace --bins)"
done

# Binaries: every executable regular file named ballast* without a dot (cargo leaves
# ballast-node.d dependency files beside the binaries).
binaries=()
for path in "$BALLAST_BIN_DIR"/ballast*; do
  name="$(basename "$path")"
  case "$name" in *.*) continue ;; esac
  if [ -f "$path" ] && [ -x "$path" ]; then binaries+=("$name"); fi
done
log "binaries from $BALLAST_BIN_DIR: ${binaries[*]}"

mkdir -p "$cache"

# ---- 1. base root filesystem -----------------------------------------------------------------
packages="$(sed -e 's/#.*//' image/base-packages.txt | tr -s ' \n' '\n' | sed '/^$/d' | sort | paste -sd, -)"
mmdebstrap_arguments=(
  --mode=root --variant=essential --include="$packages"
  # No documentation, manuals or translations: nothing in the image reads them.
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --format=tar
  "$suite"
)
mirrors=("deb $mirror $suite main" "deb $mirror $suite-updates main")
if [ "$suite" != "sid" ] && [ "$suite" != "unstable" ]; then
  mirrors+=("deb $security_mirror $suite-security main")
fi
base_key="$(printf '%s\n' "recipe 1" "${mmdebstrap_arguments[@]}" "${mirrors[@]}" | sha256sum | cut -c1-16)"
base_image="localhost/ballast-base:$base_key"

if podman image exists "$base_image"; then
  log "base $base_image is cached"
else
  rootfs="$cache/rootfs-$base_key.tar"
  if [ ! -s "$rootfs" ]; then
    log "building the base root filesystem ($suite: essential + $packages) with mmdebstrap"
    rm -f "$cache"/rootfs-*.tar "$cache"/rootfs-*.tar.partial
    mmdebstrap "${mmdebstrap_arguments[@]}" "$rootfs.partial" "${mirrors[@]}" </dev/null >&2
    mv "$rootfs.partial" "$rootfs"
  fi
  log "importing $rootfs as $base_image"
  podman import --quiet --change 'CMD ["/bin/bash"]' "$rootfs" "$base_image" >/dev/null
fi

# ---- 2. the image ----------------------------------------------------------------------------
version="$("$BALLAST_BIN_DIR/ballast-node" --version | awk '{print $2}')"
image_key="$(
  {
    echo "base $base_key"
    echo "version $version"
    sha256sum image/Containerfile image/ballast-node-prepare
    for name in "${binaries[@]}"; do
      echo "$name $(sha256sum < "$BALLAST_BIN_DIR/$name" | cut -c1-64)"
    done
  } | sha256sum | cut -c1-16
)"
image="localhost/ballast:$image_key"

if podman image exists "$image"; then
  log "image $image is cached (inputs unchanged)"
else
  context="$(mktemp -d "$cache/context.XXXXXX")"
  trap 'rm -rf "$context"' EXIT
  mkdir "$context/bin"
  for name in "${binaries[@]}"; do
    # Debug builds carry hundreds of MB of DWARF; symbols stay for backtraces.
    strip --strip-debug -o "$context/bin/$name" "$BALLAST_BIN_DIR/$name"
  done
  install -m 0755 image/ballast-node-prepare "$context/ballast-node-prepare"
  log "building $image (ballast $version)"
  podman build --quiet --pull=never --file "$repository/image/Containerfile" \
    --build-arg BASE_IMAGE="$base_image" --build-arg BALLAST_VERSION="$version" \
    --tag "$image" "$context" >/dev/null
fi
# :<version> is what the Helm chart deploys by default (image.tag empty = appVersion).
podman tag "$image" localhost/ballast:dev "localhost/ballast:$version"

# Keep one image of each kind: remove older ones this script made, by exact reference.
podman images --format '{{.Repository}}:{{.Tag}}' |
  while read -r reference; do
    case "$reference" in
      localhost/ballast:dev | "localhost/ballast:$version" | "$image" | "$base_image") ;;
      localhost/ballast:* | localhost/ballast-base:*)
        log "removing old $reference"
        podman rmi "$reference" >/dev/null 2>&1 || true
        ;;
    esac
  done

echo "$image"
