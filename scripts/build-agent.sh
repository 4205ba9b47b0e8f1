#!/usr/bin/env bash
# Builds the guest agent as a static binary (static glibc: no musl target is installed) and
# prints its path. Extra arguments go to cargo.
#   TVIX_AGENT_TARGET_DIR  cargo's target directory (default: target/guest in the checkout).
#                          A separate directory keeps the static RUSTFLAGS from invalidating
#                          the host's build.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target_dir=${TVIX_AGENT_TARGET_DIR:-$root/target/guest}
triple=x86_64-unknown-linux-gnu

RUSTFLAGS="-C target-feature=+crt-static" cargo build \
  --manifest-path "$root/Cargo.toml" -p tvix-build-vm-agent --release \
  --target "$triple" --target-dir "$target_dir" "$@" >&2

bin=$target_dir/$triple/release/tvix-build-vm-agent
# A dynamically linked init would fail in the initramfs with a bare "not found".
if file "$bin" 2>/dev/null | grep -q "dynamically linked"; then
  echo "build-agent: $bin is dynamically linked" >&2
  exit 1
fi
echo "$bin"
