#!/usr/bin/env bash
# Runs the ipc benchmark (release) and the multiprocessing.Queue benchmark, then
# compares the 64 B round-trip medians. Extra arguments (e.g. --quick) are
# passed to both programs.
set -euo pipefail
cd "$(dirname "$0")/.."

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== cargo bench -p ipc --bench ipc_bench -- $*" >&2
cargo bench -p ipc --bench ipc_bench -- "$@" | tee "$out/ipc.txt"
echo
echo "== python3 bench/exo_queue.py $*" >&2
python3 bench/exo_queue.py "$@" | tee "$out/exo.txt"
echo

awk -F= '
    /^RESULT ipc_unix_rtt_64_median_us=/ { ipc = $2 }
    /^RESULT exo_rtt_64_median_us=/      { exo = $2 }
    END {
        if (ipc == "" || exo == "") { print "missing RESULT lines" > "/dev/stderr"; exit 1 }
        printf "RATIO exo-style / ipc-unix round-trip median, 64 B: %.1fx (%s us / %s us)\n", exo / ipc, exo, ipc
    }
' "$out/ipc.txt" "$out/exo.txt"
