#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test tvix-build-vm, and nothing
# that is already there: Debian packages, cargo-installed helpers, the guest kernel (cached
# outside the checkout, see kernel-config/build.sh) and the static guest agent.
# Idempotent and quick when everything is present. Prints `export` lines for the artefacts
# when given --print-env.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

apt_packages=(
  qemu-system-x86        # the VMM that runs here (TCG)
  linux-source-6.1       # guest kernel source
  bc flex bison libelf-dev libssl-dev  # guest kernel build
  busybox-static         # test guests and example builds
  e2fsprogs              # formats scratch disks
  libseccomp-dev libcap-ng-dev  # the virtiofsd crate links libcap-ng
  nix-bin                # nix-instantiate --parse default.nix
  bubblewrap b3sum       # benchmark peers
  haproxy                # the fleet's front (deploy/haproxy.cfg, scripts/fleet.sh)
  xz-utils pkg-config gcc make
)
missing=()
for p in "${apt_packages[@]}"; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq >&2
  $sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

export PATH="$HOME/.cargo/bin:$PATH"
cargo_install() { # crate version binary
  if ! "$3" --version 2>/dev/null | grep -qF "$2"; then
    echo "install-deps: cargo install $1@$2" >&2
    cargo install --locked --quiet "$1@$2" >&2
  fi
}
cargo_install vhost-device-vsock 0.3.0 vhost-device-vsock
command -v cargo-nextest >/dev/null || cargo install --locked --quiet cargo-nextest >&2
# The provenance tests' independent DSSE verifier.
python3 -c 'import cryptography' 2>/dev/null || python3 -m pip install --quiet cryptography >&2

kernel_dir=$(kernel-config/build.sh)
agent=$(scripts/build-agent.sh)
hostile_agent=$(scripts/build-hostile-agent.sh)
nix_chroot=$(scripts/nix-chroot.sh)  # Debian sid's Nix 2.34 for tests/nix_*.rs (cached)
# The fleet's object store (tests/fleet_*.rs, scripts/fleet.sh); cached, 20 minutes the first time.
garage=$(scripts/garage.sh)

if [ "${1:-}" = "--print-env" ]; then
  echo "export TVIX_BUILD_VM_KERNEL=$kernel_dir/vmlinux"
  echo "export TVIX_BUILD_VM_AGENT=$agent"
  echo "export TVIX_BUILD_VM_HOSTILE_AGENT=$hostile_agent"
  echo "export TVIX_BUILD_VM_NIX_CHROOT=$nix_chroot"
  echo "export TVIX_GARAGE_BIN=$garage"
  echo "export PATH=$HOME/.cargo/bin:\$PATH"
fi
