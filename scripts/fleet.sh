#!/usr/bin/env bash
# A local fleet in one command, for trying the multi-host deployment (docs/fleet.md):
# 3 Garage nodes (replication factor 3) holding one bucket, 2 `serve` hosts (own runtime
# directories and chunk caches) sharing that bucket as their castore, and HAProxy in front
# (deploy/haproxy.cfg). Prints `host <n> <metrics URL>` per host, then `front <address>`
# last, and stays up; SIGTERM or SIGINT stops everything it started and waits for it.
#
# Needs: the guest kernel and agent (TVIX_BUILD_VM_KERNEL, TVIX_BUILD_VM_AGENT, see
# scripts/install-deps.sh --print-env), haproxy, Garage (scripts/garage.sh, or
# TVIX_GARAGE_BIN). Environment:
#   FLEET_DIR       where state and logs go (default: a new temporary directory, removed at
#                   the end; a given one is kept). host<n>/log holds the host's gRPC
#                   address (`listen=`), host<n>/pid its pid.
#   FLEET_BIN       the tvix-build-vm binary (default: cargo build's, debug)
#   FLEET_MAX_VMS   --max-vms of each host (default 2)
#   FLEET_CACHE     chunk cache size of each host (default 1G); FLEET_CACHE_<n> overrides
#                   it for host n
#   Extra arguments go to both `serve` commands (e.g. --accel kvm).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD

garage=${TVIX_GARAGE_BIN:-$(scripts/garage.sh)}
command -v haproxy >/dev/null || { echo "fleet.sh: haproxy missing (apt-get install haproxy)" >&2; exit 1; }
max_vms=${FLEET_MAX_VMS:-2}
cache_size=${FLEET_CACHE:-1G}

if [[ -n ${FLEET_DIR:-} ]]; then
  dir=$FLEET_DIR; keep=1; mkdir -p "$dir"
else
  dir=$(mktemp -d /tmp/tbv-fleet-XXXXXX); keep=0
fi

pids=()
sleeper=
stopping=0
stop_all() {
  [[ $stopping == 1 ]] && return
  stopping=1
  trap '' TERM INT
  [[ -n $sleeper ]] && kill "$sleeper" 2>/dev/null
  # One at a time, in `pids` order: the front first (no new requests), then the hosts
  # (they drain, still reaching the store), then the store. Each gets 20 s, then SIGKILL.
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  [[ $keep == 1 ]] || rm -rf "$dir"
}
trap 'stop_all; exit 0' TERM INT
trap stop_all EXIT

bin=${FLEET_BIN:-}
if [[ -z $bin ]]; then
  # Always through cargo: a stale binary would run this checkout's scripts with old code.
  # In the background, so a signal meanwhile stops the build too (through `sleeper`).
  cargo build --quiet --bin tvix-build-vm >&2 &
  sleeper=$!
  wait "$sleeper"
  sleeper=
  bin=${CARGO_TARGET_DIR:-$repo/target}/debug/tvix-build-vm
fi

# Free ports, each checked by binding it (a race with other programs is possible but rare).
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
read -r -a ports <<<"$(free_ports 14)"

# Waits until `$1` (a command) succeeds, for at most 60 s.
retry() {
  for _ in $(seq 120); do
    if out=$("$@" 2>&1); then printf '%s\n' "$out"; return 0; fi
    sleep 0.5
  done
  echo "fleet.sh: kept failing: $*: $out" >&2
  return 1
}

# --- Garage: 3 nodes, replication factor 3 (see tests/support/garage.rs, which does the same).
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
for i in 0 1 2; do
  n=$dir/garage$i
  mkdir -p "$n/meta" "$n/data"
  s3=${ports[$((i * 3))]} rpc=${ports[$((i * 3 + 1))]} admin=${ports[$((i * 3 + 2))]}
  cat >"$n/garage.toml" <<TOML
metadata_dir = "$n/meta"
data_dir = "$n/data"
db_engine = "sqlite"
replication_factor = 3
# Our chunks are zstd-compressed already: a second pass only costs CPU.
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$admin"
TOML
  "$garage" -c "$n/garage.toml" server >"$n/log" 2>&1 &
  pids+=($!)
done
g() { "$garage" -c "$dir/garage$1/garage.toml" "${@:2}"; }
ids=()
for i in 0 1 2; do ids+=("$(retry g "$i" node id -q | tail -1)"); done
for i in 1 2; do retry g 0 node connect "${ids[$i]}" >/dev/null; done
for id in "${ids[@]}"; do retry g 0 layout assign -z dc1 -c 1G "${id%%@*}" >/dev/null; done
retry g 0 layout apply --version 1 >/dev/null
retry g 0 bucket create castore >/dev/null
key=$(retry g 0 key create castore-key)
key_id=$(awk -F': *' 'tolower($1) ~ /key id/ {print $2; exit}' <<<"$key")
key_secret=$(awk -F': *' 'tolower($1) ~ /secret key/ {print $2; exit}' <<<"$key")
retry g 0 bucket allow --read --write castore --key castore-key >/dev/null

# --- Two serve hosts; host n talks to Garage node n-1 (any node serves the whole bucket).
# Credentials sit in the address; the process list shows them (fine for a local trial;
# deploy/k8s keeps them in a Secret).
for h in 1 2; do
  hd=$dir/host$h
  mkdir -p "$hd/runtime" "$hd/cache"
  grpc=${ports[$((8 + h))]} metrics=${ports[$((10 + h))]}
  s3=${ports[$(((h - 1) * 3))]}
  cache_var=FLEET_CACHE_$h
  host_cache=${!cache_var:-$cache_size}
  bucket="objectstore+s3://castore/fleet?endpoint=http://127.0.0.1:$s3&region=garage&access_key_id=$key_id&secret_access_key=$key_secret&allow_http=true"
  "$bin" serve \
    --blob-service-addr "$bucket&cache_dir=$hd/cache&cache_size=$host_cache" \
    --directory-service-addr "$bucket" \
    --listen "127.0.0.1:$grpc" --metrics-listen "127.0.0.1:$metrics" \
    --runtime-dir "$hd/runtime" --max-vms "$max_vms" --grace-period 5s "$@" \
    >"$hd/log" 2>&1 &
  pids+=($!)
  echo "$!" >"$hd/pid"  # for tests that kill one host
  export "HOST${h}_GRPC=127.0.0.1:$grpc" "HOST${h}_ADDR=127.0.0.1" \
    "HOST${h}_METRICS_PORT=$metrics" "HOST${h}_MAX_VMS=$max_vms"
done
for h in 1 2; do
  port_var=HOST${h}_METRICS_PORT
  retry curl -sf "http://127.0.0.1:${!port_var}/readyz" >/dev/null ||
    { echo "fleet.sh: host $h did not become ready; log:" >&2; tail -20 "$dir/host$h/log" >&2; exit 1; }
done

# --- HAProxy in front.
front=${ports[13]}
export FRONT_BIND=127.0.0.1:$front
haproxy -W -db -f deploy/haproxy.cfg >"$dir/haproxy.log" 2>&1 &
pids=("$!" "${pids[@]:3}" "${pids[@]:0:3}")  # stop order: front, hosts, store
retry bash -c "exec 3<>/dev/tcp/127.0.0.1/$front" >/dev/null

for h in 1 2; do
  port_var=HOST${h}_METRICS_PORT
  echo "host $h http://127.0.0.1:${!port_var}/metrics"
done
echo "front grpc+http://127.0.0.1:$front"

# Stay up until told to stop; `wait` returns when a signal arrives and the trap runs.
while true; do
  sleep 3600 &
  sleeper=$!
  wait "$sleeper" || true
done
