#!/usr/bin/env bash
# Refresh init/link-order.txt: the functions init's idle loop and control API run, which the linker places first
# in .text (lld --symbol-ordering-file, see init/build.rs) so that they share a few 64 KiB fault-around windows
# instead of touching ~20 scattered ones (docs/benchmarks.md, init).
#
# Runs the release init with 50 units, attaches `perf record -e page-faults` once it is ready (start-up pages are
# released then), exercises the API and a quiet period, and appends every function whose code page faulted and
# that the list lacks. Only the first function to fault in a window is seen, so run it, rebuild
# (`cargo build --release -p keel-init`) and run it again, measuring with scripts/bench-init.sh, until init's
# RSS stops falling. It does not reach "0 added": each rebuild moves code, and each round names 11-22 more
# (2026-12-08: ten rounds took the list from 163 to 310 names and init from 1.33 to 1.08 MiB; the last four
# rounds gained 0.06 MiB). Needs perf and root.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/x86_64-unknown-linux-gnu/release}
LIST=init/link-order.txt
work=$(mktemp -d /tmp/keel-link-order.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/units/default.target.wants"
echo "[Unit]" > "$work/units/default.target"
for i in $(seq 1 50); do
  printf '[Service]\nExecStart=/bin/sleep 100000\n' > "$work/units/s$i.service"
  ln -s "../s$i.service" "$work/units/default.target.wants/s$i.service"
done
cg=/sys/fs/cgroup/unified; [ -e $cg/cgroup.procs ] || cg=/sys/fs/cgroup
"$BIN/init" --units-dir "$work/units" --state-dir "$work/state" --cgroup-root "$cg" >"$work/log" 2>&1 &
kp=$!
ctl() { "$BIN/initctl" --socket "$work/state/init.sock" "$@" >/dev/null || true; }
ctl ping --wait-ready --timeout 60
perf record -q -e page-faults -c 1 -d -p "$kp" -o "$work/perf.data" 2>/dev/null &
pp=$!
sleep 1
ctl ping; ctl list; ctl --json list; ctl status s1.service; ctl logs -n 5 s1.service; ctl restart s3.service
ctl reload
sleep 6
ctl list
sleep 1
kill -INT "$pp"; wait "$pp" || true
ctl poweroff
wait "$kp" || true
# Instruction fetches only (the faulting address is the instruction pointer); mangled names, first fault first.
perf script -i "$work/perf.data" -F ip,sym,addr --no-demangle 2>/dev/null \
  | awk '$1 == $3 && $2 != "[unknown]" && $2 !~ /@/ { print $2 }' | awk '!seen[$0]++' > "$work/faulted"
touch "$LIST"
# Names this build no longer has (renamed, or another build's hash) are dropped; new ones are appended.
nm --no-demangle "$BIN/init" | awk '{ print $NF }' | sort -u > "$work/symbols"
{ grep '^#' "$LIST"; grep -v '^#' "$LIST" | grep -xF -f "$work/symbols"; } > "$work/kept" || true
dropped=$(( $(grep -vc '^#' "$LIST") - $(grep -vc '^#' "$work/kept") ))
new=$(grep -vxF -f <(grep -v '^#' "$work/kept") "$work/faulted" | grep -xF -f "$work/symbols" || true)
cp "$work/kept" "$LIST"
[ -z "$new" ] || printf '%s\n' "$new" >> "$LIST"
added=$( [ -z "$new" ] && echo 0 || printf '%s\n' "$new" | wc -l )
echo "init-link-order: $LIST: $added added, $dropped dropped$( [ "$added" = 0 ] && echo '; complete for this build' || echo '; rebuild init and run again')"
