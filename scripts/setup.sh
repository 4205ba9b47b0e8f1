#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for tvix-build-vm and runs the main job once: installs
# what is missing (scripts/install-deps.sh: Debian packages, vhost-device-vsock, the guest
# kernel and agent), builds the host binary, and runs an example build on the embedded
# store: a static busybox imported as the input builds a small output tree in a microVM.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
eval "$(scripts/install-deps.sh --print-env)"

cargo build --release --locked -p tvix-build-vm
bin=target/release/tvix-build-vm

echo "setup: building an example in a microVM (store: ${TVIX_BUILD_VM_STORE:-default})" >&2
store_args=()
[ -n "${TVIX_BUILD_VM_STORE:-}" ] && store_args=(--store "$TVIX_BUILD_VM_STORE")
"$bin" build "${store_args[@]}" \
  --input /bin/busybox \
  --output example-hello \
  --env out=/nix/store/example-hello \
  -- /nix/store/busybox sh -c '
    B=/nix/store/busybox
    $B mkdir -p $out/bin $out/share
    echo "hello from a single-use microVM (kernel $($B uname -r))" > $out/share/greeting
    $B ln -s ../share/greeting $out/bin/greeting
    $B cat $out/share/greeting'
