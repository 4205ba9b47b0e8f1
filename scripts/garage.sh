#!/usr/bin/env bash
# Builds Garage (the S3-compatible object store the fleet tests and scripts/fleet.sh run) once
# per version, caches it outside the checkout like the kernel, and prints the binary's path.
# Garage is a separate program we only run, never link. Idempotent: a second call with the
# binary in place prints the path and builds nothing; concurrent calls wait on one lock.
#   GARAGE_VERSION     the pinned version (default below)
#   TVIX_GARAGE_CACHE  cache root (default: ~/.cache/tvix-build-vm/garage)
# Extra arguments go to `cargo install` (e.g. -j 1).
set -euo pipefail

version=${GARAGE_VERSION:-2.5.0}
cache=${TVIX_GARAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tvix-build-vm/garage}
root=$cache/$version
bin=$root/bin/garage

mkdir -p "$cache"
exec 9>"$cache/.lock-$version"
flock 9

if [[ ! -x $bin ]]; then
  echo "garage.sh: building garage $version into $root (about 20 minutes on 2 cores)" >&2
  # A private target dir: a half-finished build is resumed by the next call, and the
  # project's own target dir is not touched.
  CARGO_TARGET_DIR=$cache/build-$version cargo install garage --version "$version" --locked \
    --root "$root" "$@" >&2
  # The build tree is several GB; only the binary is kept.
  rm -rf "$cache/build-$version"
fi
"$bin" --version >/dev/null 2>&1 || { echo "garage.sh: $bin does not run" >&2; exit 1; }
echo "$bin"
