#!/usr/bin/env bash
# Every CPU kernel set this machine runs, side by side on one model and one matmul shape,
# with ratios: for a user on an arm64 machine (Graviton, Ampere, Apple Silicon under
# Linux) or any x86 host to see what each set gives there. The NEON kernels could not be
# timed where they were written (only emulated); this is the script to time them.
#
#   bench/kernel-sets.sh [model.gguf] [threads]
#
# Prints the CPU, the memory bandwidth and the batch-1 decode bound it sets, then per
# set (best first, portable last): prefill of a 512-token prompt and decode (batch 1 and
# 16) on the model, and the quantized matmul's rate per format on one thread
# (packed_matmul). For llama.cpp on the same file: bench/compare-llamacpp.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-$(scripts/fetch-default-model.sh)}"
threads="${2:-$(nproc 2>/dev/null || sysctl -n hw.ncpu)}"
cargo build --release -q -p moeserve -p moeserve-bench
ms=target/release/moeserve
mb=target/release/moeserve-bench
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cpu="$( (lscpu 2>/dev/null | sed -n 's/^Model name: *//p'; sysctl -n machdep.cpu.brand_string 2>/dev/null) | head -n1)"
echo "CPU: ${cpu:-unknown} ($(uname -m)), $threads threads"
$ms kernels
RAYON_NUM_THREADS="$threads" $mb memory --model "$model"
sets="$($ms kernels --list)"
for set in $sets; do
  echo "== MOESERVE_CPU=$set"
  MOESERVE_CPU="$set" RAYON_NUM_THREADS="$threads" $mb kernel --model "$model" \
    --prompt-len 512 --decode-tokens 128 --repetitions 3 --batches 1,16 | tee "$out/$set"
  MOESERVE_CPU="$set" RAYON_NUM_THREADS=1 cargo bench -q -p moeserve-bench --bench packed_matmul -- \
    --rows 2048 --cols 2048
done
python3 - "$out" $sets <<'PY'
import sys
out, sets = sys.argv[1], sys.argv[2:]
rows = {}
for s in sets:
    for line in open(f"{out}/{s}"):
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 5 and cells[0].isdigit():
            rows[(s, int(cells[0]))] = (float(cells[1]), float(cells[2]))
print("\n| kernel set | batch | prefill tok/s | decode tok/s | prefill / portable | decode / portable |")
print("|---|---:|---:|---:|---:|---:|")
for (s, b), (pp, tg) in rows.items():
    base = rows.get(("portable", b))
    r = lambda v, i: f"{v / base[i]:.2f}" if base else "n/a"
    print(f"| {s} | {b} | {pp:.1f} | {tg:.1f} | {r(pp, 0)} | {r(tg, 1)} |")
PY
