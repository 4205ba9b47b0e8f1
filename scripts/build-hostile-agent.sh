#!/usr/bin/env bash
# Builds the hostile test agent (guest/src/bin/tvix-build-vm-hostile-agent.rs) as a static
# binary, like scripts/build-agent.sh builds the real one, and prints its path. Only the
# adversarial VM tests use it. Extra arguments go to cargo.
#   TVIX_AGENT_TARGET_DIR  cargo's target directory (default: target/guest in the checkout).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target_dir=${TVIX_AGENT_TARGET_DIR:-$root/target/guest}
triple=x86_64-unknown-linux-gnu

RUSTFLAGS="-C target-feature=+crt-static" cargo build \
  --manifest-path "$root/Cargo.toml" -p tvix-build-vm-agent --release \
  --features hostile --bin tvix-build-vm-hostile-agent \
  --target "$triple" --target-dir "$target_dir" "$@" >&2

bin=$target_dir/$triple/release/tvix-build-vm-hostile-agent
if file "$bin" 2>/dev/null | grep -q "dynamically linked"; then
  echo "build-hostile-agent: $bin is dynamically linked" >&2
  exit 1
fi
echo "$bin"
