#!/usr/bin/env bash
# The fleet rows of the benchmark (docs/benchmarks.md, run by `scripts/bench.sh --only
# fleet`): a 256 MiB input read back through the front of scripts/fleet.sh (HAProxy, a serve
# host, the S3 castore on a 3-node Garage), cold (the host's chunk cache empty) and warm
# (cached), against one `serve` host with the embedded store. Prints a Markdown table with
# the ratios. Reads go through `tvix-build-vm store export`, i.e. the castore gRPC services
# a build's inputs also come through.
#   BENCH_BIN   the binary (default: cargo build --release's)
#   BENCH_REPS  repetitions of each row, the median is kept (default 3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD
if [[ -z ${BENCH_BIN:-} ]]; then
  cargo build --release --quiet --bin tvix-build-vm >&2
  BENCH_BIN=${CARGO_TARGET_DIR:-$repo/target}/release/tvix-build-vm
fi
reps=${BENCH_REPS:-3}
work=$(mktemp -d /tmp/tbv-bench-fleet-XXXXXX)
fleet_pid= single_pid=
cleanup() {
  # Each stops what it started (fleet.sh on SIGTERM stops its fleet and waits for it).
  [[ -n $fleet_pid ]] && { kill -TERM "$fleet_pid" 2>/dev/null; wait "$fleet_pid" 2>/dev/null; }
  [[ -n $single_pid ]] && { kill -TERM "$single_pid" 2>/dev/null; wait "$single_pid" 2>/dev/null; }
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' TERM INT

head -c $((256 << 20)) /dev/urandom >"$work/input"
secs() { local s e; s=$(date +%s%N); "$@" >/dev/null; e=$(date +%s%N); echo $(((e - s) / 1000000)); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
store() { "$BENCH_BIN" store "$1" --blob-service-addr "$2" --directory-service-addr "$2" "${@:3}"; }
# Milliseconds to export `node` from `addr` into a fresh path.
read_ms() { rm -rf "$work/out"; secs store export "$1" "$2" "$work/out"; }

# One host, the embedded store.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BENCH_BIN" serve --store "$work/single" --listen "127.0.0.1:$port" --runtime-dir "$work/single-rt" \
  >"$work/single.log" 2>&1 &
single_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
single=grpc+http://127.0.0.1:$port
node=$(store import "$single" "$work/input")
read_ms "$single" "$node" >/dev/null  # page cache
single_ms=$(for _ in $(seq "$reps"); do read_ms "$single" "$node"; done | median)

# The fleet: each cold read needs a host whose cache lacks the blob, so a fresh fleet per
# repetition (the hosts alternate under leastconn; two reads empty both caches).
cold=() warm=()
for _ in $(seq "$reps"); do
  FLEET_BIN=$BENCH_BIN scripts/fleet.sh >"$work/fleet.out" 2>"$work/fleet.err" &
  fleet_pid=$!
  for _ in $(seq 600); do grep -q '^front ' "$work/fleet.out" && break; sleep 0.1; done
  front=$(awk '/^front /{print $2}' "$work/fleet.out")
  [[ -n $front ]] || { cat "$work/fleet.err" >&2; exit 1; }
  node=$(store import "$front" "$work/input")
  cold+=("$(read_ms "$front" "$node")")
  read_ms "$front" "$node" >/dev/null  # the other host's cache
  warm+=("$(read_ms "$front" "$node")")
  kill -TERM "$fleet_pid"; wait "$fleet_pid" || true; fleet_pid=
done
cold_ms=$(printf '%s\n' "${cold[@]}" | median)
warm_ms=$(printf '%s\n' "${warm[@]}" | median)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
echo "| fleet: read a 256 MiB input | ms (median of $reps) | ratio |"
echo "| --- | --- | --- |"
echo "| one host, embedded store | $single_ms | 1 |"
echo "| front + S3 castore, warm cache | $warm_ms | $(ratio "$warm_ms" "$single_ms") x one host (target <= 1.1) |"
echo "| front + S3 castore, cold cache | $cold_ms | cold/warm throughput $(ratio "$warm_ms" "$cold_ms") (target >= 0.5) |"
