#!/usr/bin/env bash
# Installs what building, running and testing Ballast needs on a Debian machine, and does
# nothing when it is already there. Runs as root (or with sudo available).
set -euo pipefail

packages=(
  fuse3            # fusermount3 and /etc/fuse.conf for the FUSE driver
  pkg-config
  clang            # librocksdb-sys runs bindgen, which needs libclang
  libclang-dev
  python3          # lock probes in the POSIX tests
  mariadb-server   # real MariaDB for the end-to-end tests
  mariadb-client
  sysbench         # benchmarks
  fio              # benchmark yardstick
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_command=""
  if [ "$(id -u)" -ne 0 ]; then sudo_command="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo_command apt-get update -qq
  # Debian's maintainer scripts try to start mariadb; in containers that is refused, harmlessly.
  $sudo_command apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# mariadbd must not be running from the package: tests start their own servers.
if command -v systemctl >/dev/null 2>&1; then systemctl stop mariadb >/dev/null 2>&1 || true; fi
exit 0
