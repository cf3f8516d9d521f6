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
  sysbench         # benchmarks and the MariaDB-under-failover test
  iproute2         # ip netns / veth / bridge for the partition and nemesis tests
  util-linux       # nsenter: run a node inside its network namespace; losetup, mount
  e2fsprogs        # mkfs.ext4: the small state filesystem of tests/tests/full_state_filesystem.rs
  jq               # benches/run.sh reads fio's JSON
  fio              # benchmark yardstick
  python3-venv     # the chart checker's virtual environment (below)
  podman           # builds and runs the container image (no Docker engine here)
  runc             # podman's runtime here: crun fails on this VM's hybrid cgroups
  mmdebstrap       # the image's base root filesystem, from Debian's packages
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

# The chart checks (scripts/check-chart.py) render the chart with Helm's own Go engine
# (helm-python-sdk embeds it: no helm binary) and validate every object with
# kubernetes-validate. Both come from PyPI, into a virtual environment of their own: Debian's
# python3 is "externally managed" (PEP 668), and --break-system-packages would mix them into
# the system's packages. tests/tests/chart.rs runs the same interpreter ($BALLAST_PYTHON, else
# this venv's). Quick when present: one import check, no network.
venv="${BALLAST_VENV:-$HOME/.cache/ballast/venv}"
python_packages=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0)
venv_check='import importlib.metadata as m, helm_python, kubernetes_validate
assert m.version("helm-python-sdk") == "0.2.2" and m.version("kubernetes-validate") == "1.37.0"'
if ! "$venv/bin/python3" -c "$venv_check" >/dev/null 2>&1; then
  echo "installing the chart checker's Python packages into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "${python_packages[@]}"
  "$venv/bin/python3" -c "$venv_check"
fi

# mariadbd must not be running from the package: tests start their own servers.
if command -v systemctl >/dev/null 2>&1; then systemctl stop mariadb >/dev/null 2>&1 || true; fi
exit 0
