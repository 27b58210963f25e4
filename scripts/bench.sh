#!/usr/bin/env bash
# `make bench`: every component's benchmark, each against its peer in the same run. Prints markdown tables;
# the numbers recorded in docs/benchmarks.md come from these commands on the machine named there.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=target/x86_64-unknown-linux-gnu/release
section() { printf '\n## %s\n\n' "$1"; }

section "init: RSS with 50 units and time to start them, beside tini and s6"
bash scripts/bench-init.sh || echo "(init benchmark failed)"

section "containers: /bin/true start-to-exit, beside crun and runc"
[ -x scripts/bench-containers.sh ] && bash scripts/bench-containers.sh || echo "(containers benchmark not available)"

section "clusterd: 3 members vs etcd 3.4, wrk PUT/GET"
BENCH_OUT=/dev/stdout bash clusterd/bench/clusterd-bench.sh 10 || echo "(clusterd benchmark failed)"

section "updater: apply of a 256 MiB USR payload vs zstd -dc | dd conv=fsync"
"$BIN/updater-bench" --size 256 --runs 3 || echo "(updater benchmark failed)"

section "image: boot time (make bench-image runs the QEMU boot comparison, ~3 min)"
echo "run: make bench-image"
