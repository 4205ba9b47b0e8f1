#!/usr/bin/env bash
# The nix-builder rows of the benchmark (docs/benchmarks.md, docs/nix.md), run by
# scripts/bench.sh (`--only nix`) or alone:
#   scripts/bench-nix.sh [--reps N] [--big-mib N] [--big-files N] [--json PATH]
# Needs TVIX_BUILD_VM_KERNEL/AGENT (scripts/install-deps.sh --print-env) and, for the rows
# against Nix itself, the chroot of scripts/nix-chroot.sh (root: it mounts and chroots).
# TVIX_BUILD_VM_BIN picks the binary (default: target/release, else target/debug).
#
# Rows (variants interleaved, medians over --reps):
#   nix_builder_vs_build  a trivial build through `nix-builder` (local server already up,
#                         inputs cached) / the same command by `build` (embedded store,
#                         inputs already in it); target <= 1.1
#   nix_first_import      first import of a --big-mib MiB, --big-files file input into an
#                         empty castore, MB/s (page cache warm); target >= 100; by the
#                         local server and (_grpc) by a serve given with --builder-addr
#   nix_other_client_import  the same input by a second state dir against that serve:
#                         hashed locally, found on the server, nothing uploaded
#   nix_repeat_import     bytes read from the store path by a repeated build; target 0
#   nix_vs_nix_builder    `nix build` of a trivial derivation through us / the same by
#                         Nix's own builder, per build, in the test chroot: in its sandbox
#                         where the kernel lets Nix make namespaces, else without (said so)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

reps=5 big_mib=400 big_files=20000
json=${CARGO_TARGET_DIR:-target}/bench/nix.json
while [ $# -gt 0 ]; do
  case $1 in
    --reps) reps=$2; shift 2 ;;
    --big-mib) big_mib=$2; shift 2 ;;
    --big-files) big_files=$2; shift 2 ;;
    --json) json=$2; shift 2 ;;
    *) echo "bench-nix: unknown argument $1" >&2; exit 2 ;;
  esac
done

target=${CARGO_TARGET_DIR:-target}
bin=${TVIX_BUILD_VM_BIN:-}
if [ -z "$bin" ]; then
  for b in "$target/release/tvix-build-vm" "$target/debug/tvix-build-vm"; do
    [ -x "$b" ] && { bin=$b; break; }
  done
fi
[ -x "${bin:-}" ] || { echo "bench-nix: no tvix-build-vm binary; set TVIX_BUILD_VM_BIN" >&2; exit 1; }
bin=$(realpath "$bin")
: "${TVIX_BUILD_VM_KERNEL:?set it (scripts/install-deps.sh --print-env)}"
: "${TVIX_BUILD_VM_AGENT:?set it (scripts/install-deps.sh --print-env)}"

work=$(mktemp -d /tmp/tbv-bench-nix.XXXXXX)
pids=()
# The pid of the process serving a unix socket (SO_PEERCRED).
server_pid() {
  python3 -c 'import socket,struct,sys
s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
print(struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0])' "$1" 2>/dev/null || true
}
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # The local server nix-builder started lives in its own session: stop it by its pid.
  for st in state state3; do
    if [ -S "$work/$st/serve.sock" ]; then
      spid=$(server_pid "$work/$st/serve.sock")
      [ -n "$spid" ] && kill "$spid" 2>/dev/null || true
    fi
  done
  sleep 0.5
  rm -rf "$work"
}
trap cleanup EXIT
export TVIX_BUILD_VM_RUNTIME_DIR=$work/rt
mkdir -p "$work/rt" "$work/store" "$work/state"

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
# The median of the per-pair ratios of two interleaved series (as docs/benchmarks.md takes
# every ratio): $1 and $2 are space-separated lists of equal length.
pair_ratio() {
  paste -d' ' <(printf '%s\n' $1) <(printf '%s\n' $2) | awk '{ printf "%.4f\n", $1 / $2 }' | median
}

# A stand-in for Nix's store: busybox as one store path, the big tree as another.
bb=9ayqmbj1zgsyllkbsbml5y79hwmmykby-bb
mkdir -p "$work/store/$bb/bin"
cp /bin/busybox "$work/store/$bb/bin/busybox"

# build.json as Nix writes it (version 1) for output $1, input paths $2 (space separated).
write_build_json() {
  local out=$1 inputs=$2 top=$work/top-$1
  mkdir -p "$top/build"
  local list
  list=$(for i in $inputs; do printf '"/nix/store/%s",' "$i"; done)
  cat > "$top/build.json" <<EOF
{"version":1,"builder":"/nix/store/$bb/bin/busybox","args":["sh","-c","echo hi > \$out"],
 "env":{"HOME":"/homeless-shelter","NIX_BUILD_TOP":"/build","NIX_STORE":"/nix/store",
        "PATH":"/path-not-set","PWD":"/build","TMPDIR":"/build","out":"/nix/store/$out"},
 "topTmpDir":"$top","tmpDir":"$top/build","tmpDirInSandbox":"/build",
 "storeDir":"/nix/store","realStoreDir":"$work/store","system":"x86_64-linux",
 "inputPaths":[${list%,}],"outputs":{"out":"/nix/store/$out"}}
EOF
  echo "$top/build.json"
}
# A fresh valid output basename for rep $1 of row $2.
out_name() { printf '%032d-%s-%s' 0 "$2" "$1" | tr 0 a; }

nix_builder() { # state dir, build.json, extra args...
  local state=$1 j=$2; shift 2
  (cd "$(dirname "$j")/build" && "$bin" -q nix-builder --state-dir "$state" "$@" "$j" >/dev/null 2>"$work/nb.err") \
    || { echo "bench-nix: nix-builder failed:" >&2; cat "$work/nb.err" >&2; exit 1; }
}

# Runs `ours $i` and `theirs $i` interleaved for i in 1..reps and adds a ratio row:
# key, what, target, note suffix.
interleaved_row() {
  local key=$1 what=$2 target=$3 suffix=$4 a=() b=() t0 t1 t2 i
  for i in $(seq 1 "$reps"); do
    t0=$(now); ours "$i"; t1=$(now); theirs "$i"; t2=$(now)
    a+=("$(echo "$t1 - $t0" | bc -l)"); b+=("$(echo "$t2 - $t1" | bc -l)")
  done
  row "$key" "$what" ratio "$(pair_ratio "${a[*]}" "${b[*]}")" "$target" \
    "medians $(printf '%s\n' "${a[@]}" | median)s / $(printf '%s\n' "${b[@]}" | median)s$suffix"
}

rows=()
row() { # key, what, unit, value (a number; bc prints .5 for 0.5), target, note
  set -- "$1" "$2" "$3" "$(awk -v v="$4" 'BEGIN { print v + 0 }')" "$5" "$6"
  rows+=("$(printf '{"key":"%s","what":"%s","unit":"%s","value":%s,"target":"%s","note":"%s"}' "$@")")
  printf '| %s | %s | %s %s | %s | %s |\n' "$1" "$2" "$4" "$3" "$5" "$6" >&2
}

echo "bench-nix: binary $bin, $reps reps" >&2
echo "| row | what | ours | target | note |" >&2
echo "| --- | --- | --- | --- | --- |" >&2

# 1. nix-builder vs build, inputs cached, the local server already running.
nix_builder "$work/state" "$(write_build_json "$(out_name w warm)" "$bb")"
"$bin" -q build --store "$work/bstore" --input "$work/store/$bb" --output out \
  -- "/nix/store/$bb/bin/busybox" sh -c 'echo hi > /nix/store/out' >/dev/null 2>&1
ours() { nix_builder "$work/state" "$(write_build_json "$(out_name "$1" cmp)" "$bb")"; }
theirs() {
  "$bin" -q build --store "$work/bstore" --input "$work/store/$bb" --output out \
    -- "/nix/store/$bb/bin/busybox" sh -c 'echo hi > /nix/store/out' >/dev/null 2>&1
}
interleaved_row nix_builder_vs_build "trivial build: nix-builder (local server up, inputs cached) / build" \
  "<= 1.1" ""

# 2. First import of a big tree, into an empty castore (a fresh server and state dir).
big=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab-big
python3 - "$work/store/$big" "$big_mib" "$big_files" <<'EOF'
import os, sys
root, mib, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = mib * 1024 * 1024 // files
for i in range(files):
    d = os.path.join(root, "d%03d" % (i % 200))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%05d" % i), "wb") as f:
        f.write(os.urandom(size))
EOF
sync
# A host server (fresh castore) in the directory the chroot sees as /tvb (row 4).
mkdir -p "$work/t"
"$bin" -q serve --store "$work/sstore" --listen "unix:$work/t/s.sock" >"$work/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do [ -S "$work/t/s.sock" ] && break; sleep 0.1; done
addr="grpc+unix://$work/t/s.sock"
# The first import into each castore: $1 state dir, $2 row key, $3 label, extra args.
first_import() {
  local state=$1 key=$2 label=$3; shift 3
  nix_builder "$state" "$(write_build_json "$(out_name 1 "$key")" "$bb $big")" "$@"
  local rec bytes ms
  rec=$(tail -1 "$state/builds.jsonl")
  bytes=$(echo "$rec" | python3 -c 'import json,sys; print(json.load(sys.stdin)["input_bytes_read"])')
  ms=$(echo "$rec" | python3 -c 'import json,sys; print(json.load(sys.stdin)["import_ms"])')
  row "$key" "first import of a ${big_mib} MiB, ${big_files}-file input (+busybox), empty castore, $label" \
    "MB/s" "$(echo "scale=1; $bytes / 1000 / $ms" | bc -l)" ">= 100" "$bytes bytes in ${ms} ms, page cache warm"
}
first_import "$work/state3" nix_first_import "local server (blobs written directly)"
first_import "$work/state2" nix_first_import_grpc "a serve over grpc+unix (--builder-addr)" --builder-addr "$addr"

# Another client of the same server (a fresh state dir): hashed, found there, not sent.
nix_builder "$work/state4" "$(write_build_json "$(out_name 3 big)" "$bb $big")" --builder-addr "$addr"
other=$(tail -1 "$work/state4/builds.jsonl")
read -r present4 imported4 bytes4 ms4 < <(echo "$other" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["inputs_present"], r["inputs_imported"], r["input_bytes_read"], r["import_ms"])')
row nix_other_client_import "the same input by another client of that serve (empty input cache): hashed, not sent" \
  "MB/s" "$(echo "scale=1; $bytes4 / 1000 / $ms4" | bc -l)" "-" "$present4 inputs found on the server, $imported4 uploaded; $bytes4 bytes in ${ms4} ms"

# 3. The same inputs again: nothing read.
nix_builder "$work/state3" "$(write_build_json "$(out_name 2 big)" "$bb $big")"
again=$(tail -1 "$work/state3/builds.jsonl")
bytes2=$(echo "$again" | python3 -c 'import json,sys; print(json.load(sys.stdin)["input_bytes_read"])')
ms2=$(echo "$again" | python3 -c 'import json,sys; print(json.load(sys.stdin)["import_ms"])')
row nix_repeat_import "repeated build with the same inputs: bytes read from the store" \
  bytes "$bytes2" "0" "input lookup took ${ms2} ms"

# 4. Against Nix's own builder, in the test chroot (root only).
if [ "$(id -u)" = 0 ]; then
  root=${TVIX_BUILD_VM_NIX_CHROOT:-$(scripts/nix-chroot.sh)}
  mkdir -p "$root/tvb" "$work/t/bb/bin" "$work/t/state"
  cp "$root/bin/busybox" "$work/t/bb/bin/"
  touch "$work/t/tvix-build-vm"
  cat > "$work/t/d.nix" <<'EOF'
{ salt }: derivation {
  name = "trivial"; system = "x86_64-linux"; inherit salt;
  builder = "${builtins.path { path = /tvb/bb; name = "bb"; }}/bin/busybox";
  args = [ "sh" "-c" "echo hi > $out" ];
}
EOF
  # Through the host server: the chroot has no QEMU for a local one, and a host daemon is
  # the set-up for a multi-user Nix anyway.
  eb='[{"systems":["x86_64-linux"],"program":"/tvb/tvix-build-vm","args":["nix-builder","--state-dir","/tvb/state","--builder-addr","grpc+unix:///tvb/s.sock"]}]'
  in_chroot() {
    unshare --mount --propagation private sh -c '
      set -e; R=$1; T=$2; B=$3; shift 3
      mount -t proc proc $R/proc; mount --rbind /dev $R/dev; mount -t sysfs sys $R/sys
      mount --bind $T $R/tvb; mount --bind $B $R/tvb/tvix-build-vm
      exec chroot $R "$@"' sh "$root" "$work/t" "$bin" "$@"
  }
  if in_chroot nix build --no-link --option external-builders "$eb" -f /tvb/d.nix --argstr salt "warm-$$" >/dev/null 2>"$work/nix.err"; then
    ours() {
      in_chroot nix build --no-link --option external-builders "$eb" -f /tvb/d.nix --argstr salt "us-$$-$1" >/dev/null 2>>"$work/nix.err"
    }
    # Nix falls back to no sandbox silently where it cannot make namespaces: ask without
    # fallback first, and say which one was measured.
    sandbox=(--option sandbox true --option sandbox-fallback false) how="in its sandbox"
    if ! in_chroot nix build --no-link "${sandbox[@]}" -f /tvb/d.nix --argstr salt "probe-$$" >/dev/null 2>>"$work/nix.err"; then
      sandbox=(--option sandbox false) how="WITHOUT its sandbox (no namespaces for Nix here)"
    fi
    theirs() {
      in_chroot nix build --no-link "${sandbox[@]}" -f /tvb/d.nix --argstr salt "nix-$$-$1" >/dev/null 2>>"$work/nix.err"
    }
    interleaved_row nix_vs_nix_builder "nix build of a trivial derivation: through us / Nix's own builder $how" \
      "-" " per nix build (evaluation included in both)"
  else
    echo "bench-nix: nix in the chroot failed, row skipped:" >&2; tail -5 "$work/nix.err" >&2
  fi
fi

mkdir -p "$(dirname "$json")"
{ echo "["; (IFS=,; echo "${rows[*]}"); echo "]"; } > "$json"
echo "bench-nix: wrote $json" >&2
