#!/usr/bin/env bash
# Builds the guest kernel from Debian's linux-source-6.1 with tinyconfig plus the fragments in
# fragments/, and prints the directory holding vmlinux (PVH ELF), bzImage and the final .config.
#
# The result is cached outside the checkout, keyed by the source package version, the fragments
# and this script, so CI and later sessions build it once per machine:
#   ${TVIX_BUILD_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tvix-build-vm}/kernel/<key>/
# Fails if any symbol a fragment asks for did not survive the merge.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src_tar=/usr/src/linux-source-6.1.tar.xz
[ -f "$src_tar" ] || { echo "kernel: $src_tar missing: apt-get install linux-source-6.1" >&2; exit 1; }

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "$src_version"; cat "$here"/fragments/*.config "$here/build.sh"; } | sha256sum | cut -c1-16)
cache=${TVIX_BUILD_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tvix-build-vm}
out="$cache/kernel/$key"

mkdir -p "$cache/kernel"
exec 9>"$cache/kernel/.lock"
flock 9

if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  echo "$out"
  exit 0
fi

work=$(mktemp -d "$cache/kernel/.build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "kernel: building $src_version with key $key in $work (about 4 minutes on 2 cores)" >&2
tar -xf "$src_tar" -C "$work"
tree="$work/linux-source-6.1"
cat "$here"/fragments/*.config > "$work/fragment.config"
(
  cd "$tree"
  make -s ARCH=x86_64 tinyconfig >&2
  scripts/kconfig/merge_config.sh -m .config "$work/fragment.config" >&2
  make -s ARCH=x86_64 olddefconfig >&2
)

# Like Kata's kernel build: a symbol we asked for that kconfig dropped (an unmet
# dependency) is an error, not a surprise at boot.
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*)
      grep -qxF "$line" "$tree/.config" || { echo "kernel: requested '$line' did not survive the merge" >&2; missing=1; } ;;
    "# CONFIG_"*" is not set")
      sym=${line#\# }; sym=${sym%% *}
      if grep -q "^$sym=" "$tree/.config"; then echo "kernel: requested '$line' but it is set" >&2; missing=1; fi ;;
  esac
done < "$work/fragment.config"
[ "$missing" = 0 ] || exit 1

make -C "$tree" -s ARCH=x86_64 -j"$(nproc)" vmlinux bzImage >&2
mkdir -p "$work/result"
cp "$tree/vmlinux" "$tree/arch/x86/boot/bzImage" "$work/result/"
cp "$tree/.config" "$work/result/config"
echo "$src_version" > "$work/result/source-version"
rm -rf "$out"
mv "$work/result" "$out"
echo "$out"
