#!/usr/bin/env bash
# Sets up a Debian sid chroot holding a real Nix (2.34+, which has the `external-builders`
# experimental feature; Debian 12 ships only 2.8) for the `nix-builder` tests, and prints its
# path. The chroot is cached outside the checkout, keyed by what goes into it (this script,
# the mirror, the package list), so a second run costs a stat. Concurrent runs serialise on a
# lock; a half-built chroot is never published (built under a temporary name, then renamed).
#
# Mounts (proc, dev, dev/pts, sys) are NOT left in place: whoever runs Nix in the chroot
# mounts them for the run and unmounts them afterwards (see tests/nix_builder_vm.rs).
#
# Usage: scripts/nix-chroot.sh            -> prints /…/nix-chroot/<key>/root
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(nix-bin busybox-static python3-minimal)

# The Debian mirror this machine already uses (sources.list or the deb822 form).
mirror=""
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  [ -f "$f" ] || continue
  mirror=$(awk '$1 == "deb" && $2 ~ /^https?:\/\// && $2 !~ /security/ { print $2; exit }' "$f")
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ]; then
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    mirror=$(awk '$1 == "URIs:" && $2 !~ /security/ { print $2; exit }' "$f")
    [ -n "$mirror" ] && break
  done
fi
mirror=${mirror:-http://deb.debian.org/debian}

key=$( { cat "${BASH_SOURCE[0]}"; echo "$mirror"; echo "${packages[*]}"; } | sha256sum | cut -c1-16)
cache=${TVIX_NIX_CHROOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tvix-build-vm/nix-chroot}
dir=$cache/$key
mkdir -p "$cache"

exec 9>"$cache/.lock"
flock 9

if [ -f "$dir/done" ]; then
  echo "$dir/root"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "nix-chroot: debootstrap and chroot need root" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null; then
  echo "nix-chroot: apt-get install debootstrap" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2 \
    || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2; }
fi

# A leftover from an interrupted run (the lock is ours: nobody else is building it).
work=$dir.tmp
if [ -d "$work" ]; then
  for m in sys dev/pts dev proc; do umount -l "$work/root/$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$work"
fi
mkdir -p "$work"

echo "nix-chroot: debootstrap sid from $mirror into $work (about a minute)" >&2
# debootstrap's own resolver cannot pick providers of virtual packages (nix-bin needs one
# via libdbd-sqlite3-perl), so the base system comes first and apt installs the rest.
debootstrap --variant=minbase sid "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  exit 1
}
# The sid Release file may be past its Valid-Until date: apt-get (not debootstrap) refuses it.
echo 'Acquire::Check-Valid-Until "false";' >"$work/root/etc/apt/apt.conf.d/99no-valid-until"
mounted=()
unmount_all() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" || true; done
  mounted=()
}
trap unmount_all EXIT
mount -t proc proc "$work/root/proc" && mounted+=("$work/root/proc")
mount --bind /dev "$work/root/dev" && mounted+=("$work/root/dev")
in_chroot_apt() {
  chroot "$work/root" env DEBIAN_FRONTEND=noninteractive apt-get "$@" >>"$work/apt.log" 2>&1
}
if ! in_chroot_apt install -y -q --no-install-recommends "${packages[@]}"; then
  in_chroot_apt update -q && in_chroot_apt install -y -q --no-install-recommends "${packages[@]}" || {
    tail -n 30 "$work/apt.log" >&2
    exit 1
  }
fi
chroot "$work/root" apt-get clean
unmount_all
trap - EXIT

mkdir -p "$work/root/etc/nix"
cat >"$work/root/etc/nix/nix.conf" <<'EOF'
build-users-group =
sandbox = false
experimental-features = nix-command external-builders
substituters =
EOF

# Nix's hash rewriting fails a build when /homeless-shelter exists; make sure it does not.
rm -rf "$work/root/homeless-shelter"

# (nix itself needs /proc, which is not mounted now.)
echo "nix-chroot: $(chroot "$work/root" dpkg-query -W -f='nix-bin ${Version}' nix-bin)" >&2
touch "$work/done"
mv "$work" "$dir"
echo "$dir/root"
