#!/usr/bin/env bash
# Runs the benchmark harness (docs/benchmarks.md) and prints its table; the JSON goes to
# target/bench/latest.json (or --json PATH).
#   scripts/bench.sh [--quick] [--json PATH] [--only boot,fs,harvest,memory,concurrency,provenance,snix,tenants,micro,nix] [--reps N]
#   scripts/bench.sh --only fleet    the fleet rows: reads (scripts/bench-fleet.sh), then
#                                    builds (section 19 of the VM harness)
# snix (row 8): the trivial build through a real `serve` as snix.build.v1 DoBuild and as the
# seed-layout DoBuild, interleaved; the ratio is snix over seed (target <= 1.02x).
# Installs what the peers need first: virtiofsd 1.14.0 from crates.io into a cache outside
# the checkout, bubblewrap from Debian, plus the kernel and agent (scripts/install-deps.sh).
# --quick: few repetitions and smaller files, a smoke run of a few minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

eval "$(scripts/install-deps.sh --print-env)"

cache=${XDG_CACHE_HOME:-$HOME/.cache}/tvix-build-vm/bench
virtiofsd=$cache/virtiofsd/bin/virtiofsd
if ! "$virtiofsd" --version 2>/dev/null | grep -qF 1.14.0; then
  echo "bench: cargo install virtiofsd@1.14.0 into $cache/virtiofsd" >&2
  mkdir -p "$cache"
  cargo install --locked --quiet virtiofsd --version 1.14.0 \
    --root "$cache/virtiofsd" --target-dir "$cache/virtiofsd-build" >&2
fi
if ! command -v bwrap >/dev/null; then
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends bubblewrap >&2
fi
export VIRTIOFSD=$virtiofsd
export TVIX_BENCH_COMMAND="scripts/bench.sh $*"

quick=""
for a in "$@"; do [ "$a" = --quick ] && quick=--quick; done
only=""
prev=""
for a in "$@"; do [ "$prev" = --only ] && only=$a; prev=$a; done

# The fleet rows (docs/fleet.md) need Garage and HAProxy and start their own fleet: only
# when asked for, `--only fleet`. The read rows print their own table; the build rows are
# the VM harness's section 19 (its JSON goes where --json says, as for the others).
if [[ ",$only," == *,fleet,* ]]; then
  cargo build --locked --release --quiet --bin tvix-build-vm >&2
  reps=""
  prev=""
  for a in "$@"; do [ "$prev" = --reps ] && reps=$a; prev=$a; done
  BENCH_REPS=${reps:-${BENCH_REPS:-3}} \
    BENCH_BIN=${CARGO_TARGET_DIR:-target}/release/tvix-build-vm scripts/bench-fleet.sh
  exec cargo bench --locked --bench vm -- "$@"
fi

# Item 7 (criterion) first, so that the VM harness can fold its results into the table.
if [ -z "$only" ] || [[ ",$only," == *,micro,* ]]; then
  echo "bench: cargo bench --bench castore $quick" >&2
  if [ -n "$quick" ]; then
    cargo bench --locked --bench castore -- --quick --noplot >&2
  else
    cargo bench --locked --bench castore -- --noplot >&2
  fi
fi
# The nix-builder rows (scripts/bench-nix.sh): the release binary against a real Nix in the
# test chroot; their own table and JSON (target/bench/nix.json).
if [ -z "$only" ] || [[ ",$only," == *,nix,* ]]; then
  echo "bench: scripts/bench-nix.sh (nix-builder rows)" >&2
  cargo build --locked --release --bin tvix-build-vm >&2
  nix_reps=5 nix_mib=400 nix_files=20000
  [ -n "$quick" ] && { nix_reps=2; nix_mib=64; nix_files=4000; }
  TVIX_BUILD_VM_BIN=${CARGO_TARGET_DIR:-target}/release/tvix-build-vm \
    scripts/bench-nix.sh --reps "$nix_reps" --big-mib "$nix_mib" --big-files "$nix_files"
  # The Rust harness does not know the nix section: stop here when it was the only one.
  [ "$only" = nix ] && exit 0
  set -- $(printf '%s\n' "$@" | sed 's/^\(.*\),nix$/\1/; s/^nix,//; s/,nix,/,/')
fi
echo "bench: cargo bench --bench vm -- $*" >&2
exec cargo bench --locked --bench vm -- "$@"
