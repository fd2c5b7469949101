#!/usr/bin/env bash
# The GPU backend's checks and benchmarks, in one run on a machine with an NVIDIA GPU
# (and no Rust toolchain needed there): correctness of every fixture against
# transformers, then batch-1 decode and aggregate throughput of a medium MoE and a
# DeepSeek-shaped model with random weights (their shapes are what the speed depends
# on; the checkpoints themselves are too large to carry).
#
# Build here, with the CUDA toolkit (or ../shared/tools/cuda-build.sh on the project's
# build machines, which have none; its binaries go in target-cuda/):
#   cargo build --release -p moeserve-bench --features cuda
#   mkdir -p .device-bin && cp target/release/moeserve-bench .device-bin/ && strip .device-bin/moeserve-bench
# Run there, from the repository root (results under $OUT, default gpu-check-out/):
#   bench/gpu-check.sh [.device-bin/moeserve-bench]
# A binary from cuda-build.sh links empty stubs of the CUDA libraries; preload the real
# ones there first:
#   export LD_PRELOAD="libcuda.so.1 libcudart.so.13 libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10"
#
# Prints: the GPU; the fixtures' max logit difference and greedy-token agreement in f32
# (the pass bar: 1e-3, 1e-4 for DeepSeek, every greedy token) and in bf16 (the bar:
# twice transformers' own bf16 error, tests/fixtures/models/*/bf16.json); forward
# prefill and decode tok/s at batch 1, 16 and 64; engine output tok/s at 1, 16 and 64
# concurrent streams. The medium MoE is bench/medium-moe-config.json (the shape
# bench/make-medium-moe.py writes) with random weights.
set -uo pipefail
BIN=${1:-.device-bin/moeserve-bench}
OUT=${OUT:-gpu-check-out}
DEVICE=${DEVICE:-cuda}
MEDIUM=${MEDIUM_CONFIG:-bench/medium-moe-config.json}
mkdir -p "$OUT"
status=0
step() {
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  if ! "$@" > "$OUT/$name.txt" 2> "$OUT/$name.err"; then
    echo "FAILED ($?): see $OUT/$name.err" | tee -a "$OUT/summary.txt"
    tail -5 "$OUT/$name.err" | tee -a "$OUT/summary.txt"
    status=1
  fi
  cat "$OUT/$name.txt" | tee -a "$OUT/summary.txt" > /dev/null
  echo "($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt" >> "$OUT/summary.txt"

step reference-f32 "$BIN" reference --device "$DEVICE" --dtype f32
step reference-bf16 "$BIN" reference --device "$DEVICE" --dtype bf16

if [ -f "$MEDIUM" ]; then
  step kernel-medium "$BIN" kernel --device "$DEVICE" --model "random:$MEDIUM" --dtype bf16 \
    --batches 1,16,64 --prompt-len 128 --decode-tokens 64 --repetitions 3
  step engine-medium "$BIN" engine --device "$DEVICE" --model "random:$MEDIUM" --dtype bf16 \
    --concurrency 1,16,64 --prompt-len 64 --max-tokens 128 --kv-cache-memory 8GiB --sampling greedy
else
  echo "no $MEDIUM: the medium MoE's runs skipped" | tee -a "$OUT/summary.txt"
fi
step kernel-deepseek "$BIN" kernel --device "$DEVICE" --model random-deepseek --dtype bf16 \
  --batches 1,16,64 --prompt-len 128 --decode-tokens 64 --repetitions 3
step engine-deepseek "$BIN" engine --device "$DEVICE" --model random-deepseek --dtype bf16 \
  --concurrency 1,16,64 --prompt-len 64 --max-tokens 128 --kv-cache-memory 8GiB --sampling greedy
exit $status
