#!/usr/bin/env bash
# Benchmark: start-to-exit of /bin/true in a container — Keel (init starting a Type=oneshot container unit, timed
# around `initctl start`, which returns when the container has exited) against `crun run` and `runc run` on the
# same busybox root filesystem (the image's unpacked layer), in the same run. Median and p90 of N runs each.
# Prints a markdown table.
#
# Everything runs in a private mount namespace with a cgroup2 hierarchy mounted at /sys/fs/cgroup: crun 1.8
# refuses this host's hybrid cgroup layout otherwise. Keel's init runs as PID 1 of its own PID namespace.
# Needs root, crun, runc, busybox-static, python3 (to edit config.json).
set -euo pipefail
N=${N:-50}
BIN=${BIN:-target/x86_64-unknown-linux-gnu/release}
[ -x "$BIN/init" ] || BIN=target/release
BIN=$(cd "$BIN" && pwd)

if [ -z "${KEEL_BENCH_INNER:-}" ]; then
  exec unshare -m --propagation private env KEEL_BENCH_INNER=1 N="$N" BIN="$BIN" bash "$0" "$@"
fi
mount -t cgroup2 none /sys/fs/cgroup

work=$(mktemp -d /tmp/keel-bench-containers.XXXXXX)
init_pid=
cleanup() {
  if [ -n "$init_pid" ]; then
    "$BIN/initctl" --socket "$work/state/init.sock" poweroff >/dev/null 2>&1 || kill "$init_pid" 2>/dev/null || true
    wait "$init_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
export KEEL_IMAGES_ROOT=$work/images KEEL_CONTAINERS_ROOT=$work/containers

"$BIN/initctl" image busybox --busybox "$(command -v busybox)" >/dev/null
layer=$(ls -d "$work"/images/layers/* | head -1)

# Times in µs of N runs of "$@" (EPOCHREALTIME: no fork around the measured command).
measure() {
  local out=$1; shift
  : > "$out"
  for _ in $(seq 1 "$N"); do
    local t0=$EPOCHREALTIME
    "$@" >/dev/null 2>&1 || { echo "failed: $*" >&2; return 1; }
    local t1=$EPOCHREALTIME
    echo $(( (${t1/./} - ${t0/./}) )) >> "$out"
  done
}
stats() { sort -n "$1" | awk '{a[NR]=$1} END {printf "%.1f | %.1f", a[int((NR+1)/2)]/1000, a[int(NR*0.9+0.5)]/1000}'; }

# --- Keel ------------------------------------------------------------------------------------------------------
mkdir -p "$work/units"
echo "[Unit]" > "$work/units/default.target"
printf '[Service]\nType=oneshot\nExecStart=/bin/true\n[Container]\nImage=busybox\n' > "$work/units/true.service"
unshare --pid --fork --kill-child --mount-proc --uts "$BIN/init" --units-dir "$work/units" --state-dir "$work/state" \
  --cgroup-root /sys/fs/cgroup > "$work/init.log" 2>&1 &
init_pid=$!
"$BIN/initctl" --socket "$work/state/init.sock" ping --wait-ready --timeout 30 >/dev/null
"$BIN/initctl" --socket "$work/state/init.sock" start true.service >/dev/null   # warm-up
measure "$work/keel.times" "$BIN/initctl" --socket "$work/state/init.sock" start true.service
# initctl's own cost (connect, request, reply), to read the table fairly.
measure "$work/ping.times" "$BIN/initctl" --socket "$work/state/init.sock" ping

# --- crun and runc: one OCI bundle on the same rootfs ----------------------------------------------------------
mkdir -p "$work/bundle"
cp -a "$layer" "$work/bundle/rootfs"   # a copy: runtimes may create mount points in it
( cd "$work/bundle" && crun spec )
python3 - "$work/bundle/config.json" "$layer" <<'PY'
import json, sys
p, root = sys.argv[1], sys.argv[2]
c = json.load(open(p))
c["process"]["terminal"] = False
c["process"]["args"] = ["/bin/true"]
# This host withholds CAP_SYS_RESOURCE: crun cannot raise RLIMIT_MEMLOCK for its eBPF device filter, so no device
# cgroup (Keel has none either) and no rlimits.
c["process"].pop("rlimits", None)
c["linux"].get("resources", {}).pop("devices", None)
c["root"] = {"path": "rootfs", "readonly": False}
json.dump(c, open(p, "w"))
PY
crun run -b "$work/bundle" keel-bench-warm >/dev/null 2>&1 || true
measure "$work/crun.times" crun run -b "$work/bundle" keel-bench-crun
runc run -b "$work/bundle" keel-bench-warm >/dev/null 2>&1 || true
measure "$work/runc.times" runc run -b "$work/bundle" keel-bench-runc

echo "| runtime (start-to-exit of /bin/true, $N runs) | median ms | p90 ms |"
echo "|---|---|---|"
echo "| Keel: \`initctl start\` of a Type=oneshot container unit | $(stats "$work/keel.times") |"
echo "| crun $(crun --version | awk 'NR==1 {print $3}'): \`crun run\` | $(stats "$work/crun.times") |"
echo "| runc $(runc --version | awk 'NR==1 {print $3}'): \`runc run\` | $(stats "$work/runc.times") |"
echo "| (initctl ping round trip, included in Keel's figure) | $(stats "$work/ping.times") |"
