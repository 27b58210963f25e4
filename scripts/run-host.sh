#!/usr/bin/env bash
# `make run` before an image exists: Keel's init as PID 1 of a fresh PID/mount/UTS namespace on this host,
# supervising the demo units in examples/demo-units. Unit output goes to the console; in another terminal:
#   export KEEL_INIT_SOCKET=/tmp/keel-run/init.sock PATH=$PWD/target/x86_64-unknown-linux-gnu/release:$PATH
#   initctl list; initctl status web.service; initctl logs -f; curl 127.0.0.1:8080
# Ctrl-C (SIGINT) stops every unit and ends the namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/target/x86_64-unknown-linux-gnu/release
STATE=${KEEL_RUN_STATE:-/tmp/keel-run}
mkdir -p "$STATE"
cg=/sys/fs/cgroup/unified; [ -e $cg/cgroup.procs ] || cg=/sys/fs/cgroup
echo "keel: starting init in a new PID namespace; control socket $STATE/init.sock"
echo "keel: try: KEEL_INIT_SOCKET=$STATE/init.sock $BIN/initctl list"
exec unshare --pid --fork --kill-child --mount-proc --uts -- \
  env PATH="$BIN:/usr/sbin:/usr/bin:/sbin:/bin" \
  "$BIN/init" --units-dir "$PWD/examples/demo-units" --state-dir "$STATE" --cgroup-root "$cg" \
  --hostname keel-demo --forward-to-console
