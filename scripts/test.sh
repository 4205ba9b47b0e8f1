#!/usr/bin/env bash
# Runs every check and test of tvix-build-vm: formatting, clippy, the whole test suite
# (VM tests boot real QEMU microVMs under TCG, at most two at once), and a parse of
# default.nix. Installs whatever is missing first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
eval "$(scripts/install-deps.sh --print-env)"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The test-only hostile agent is behind a feature; lint it too.
cargo clippy -p tvix-build-vm-agent --features hostile --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --profile ci
nix-instantiate --parse default.nix > /dev/null
echo "test.sh: all checks passed"
