#!/usr/bin/env bash
# Benchmark: Keel init's resident memory with 50 supervised units and its time to start them, beside tini and
# s6 (Debian packages) measured in the same run. Prints a markdown table; `make bench` appends it to the report.
#
# RSS is summed over every supervisor process (for s6: s6-svscan plus one s6-supervise per service), never over
# the services themselves (all of them are `sleep`).
set -euo pipefail
BIN=${BIN:-target/x86_64-unknown-linux-gnu/release}
N=${N:-50}
work=$(mktemp -d /tmp/keel-bench-init.XXXXXX)
cleanup() { pkill -f "keel-bench-init" 2>/dev/null || true; kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
pids=()
trap cleanup EXIT

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
now_ms() { date +%s%3N; }

# --- Keel init -----------------------------------------------------------------------------------------------
mkdir -p "$work/keel/units/default.target.wants"
echo "[Unit]" > "$work/keel/units/default.target"
for i in $(seq 1 "$N"); do
  printf '[Service]\nExecStart=/bin/sleep 100000\n' > "$work/keel/units/s$i.service"
  ln -s "../s$i.service" "$work/keel/units/default.target.wants/s$i.service"
done
cg=/sys/fs/cgroup/unified; [ -e $cg/cgroup.procs ] || cg=/sys/fs/cgroup
t0=$(now_ms)
"$BIN/init" --units-dir "$work/keel/units" --state-dir "$work/keel/state" --cgroup-root "$cg" >"$work/keel.log" 2>&1 &
kp=$!; pids+=("$kp")
"$BIN/initctl" --socket "$work/keel/state/init.sock" ping --wait-ready --timeout 60 >/dev/null
t_keel=$(( $(now_ms) - t0 ))
sleep 1
keel_rss=$(rss_kb "$kp")
"$BIN/initctl" --socket "$work/keel/state/init.sock" poweroff >/dev/null
wait "$kp" || true

# --- tini (one child only: it is a reaper, not a supervisor) ---------------------------------------------------
tini -s -- sleep 100000 & tp=$!; pids+=("$tp")
sleep 0.5
tini_rss=$(rss_kb "$tp")
kill "$tp" 2>/dev/null || true; wait "$tp" 2>/dev/null || true

# --- s6 -------------------------------------------------------------------------------------------------------
mkdir -p "$work/s6"
for i in $(seq 1 "$N"); do
  mkdir -p "$work/s6/s$i"
  printf '#!/bin/sh\nexec sleep 100000\n' > "$work/s6/s$i/run"; chmod +x "$work/s6/s$i/run"
done
t0=$(now_ms)
s6-svscan "$work/s6" & sp=$!; pids+=("$sp")
for i in $(seq 1 "$N"); do
  until s6-svstat -u "$work/s6/s$i" 2>/dev/null | grep -q true; do sleep 0.01; done
done
t_s6=$(( $(now_ms) - t0 ))
sleep 1
s6_rss=$(rss_kb "$sp")
for p in $(pgrep -f "s6-supervise s[0-9]+" || true); do s6_rss=$(( s6_rss + $(rss_kb "$p") )); done
s6-svscanctl -t "$work/s6" 2>/dev/null || kill "$sp"
wait "$sp" 2>/dev/null || true

kib() { awk -v k="$1" 'BEGIN { printf "%.2f MiB", k/1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f×", a/b }'; }
cat <<EOF
| supervisor ($N units of \`sleep\`) | RSS of the supervisor processes | time to start all $N | Keel ÷ peer (RSS) |
|---|---|---|---|
| Keel init | $(kib "$keel_rss") | ${t_keel} ms | 1.00× |
| tini (reaps one child, supervises nothing) | $(kib "$tini_rss") | – | $(ratio "$keel_rss" "$tini_rss") |
| s6-svscan + $N s6-supervise | $(kib "$s6_rss") | ${t_s6} ms | $(ratio "$keel_rss" "$s6_rss") |
EOF
# init's RSS depends on init/link-order.txt naming the functions its idle loop runs; say when the list has aged.
if command -v nm >/dev/null && [ -f init/link-order.txt ]; then
  listed=$(grep -vc '^#' init/link-order.txt || true)
  found=$(grep -v '^#' init/link-order.txt | grep -cxF -f <(nm --no-demangle "$BIN/init" | awk '{print $NF}') || true)
  echo
  echo "init/link-order.txt: $found of $listed listed functions exist in this build (fewer, or new idle-loop code: refresh with scripts/init-link-order.sh)."
fi
