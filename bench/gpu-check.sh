#!/usr/bin/env bash
# The GPU backend's checks and benchmarks, in one run on a machine with an NVIDIA GPU
# (and no Rust toolchain needed there): correctness of every fixture against
# transformers, then batch-1 decode and aggregate throughput of a medium MoE and a
# DeepSeek-shaped model with random weights (their shapes are what the speed depends
# on; the checkpoints themselves are too large to carry).
#
# Build here, with the CUDA toolkit (or ../shared/tools/cuda-build.sh on the project's
# build machines, which has none):
#   cargo build --release -p moeserve-bench --features cuda
#   mkdir -p .device-bin && cp target/release/moeserve-bench .device-bin/ && strip .device-bin/moeserve-bench
# Run there, from the repository root (results under $OUT, default gpu-check-out/):
#   bench/gpu-check.sh [.device-bin/moeserve-bench]
#
# Prints: the GPU; the fixtures' max logit difference and greedy-token agreement in f32
# (the pass bar: 1e-3, 1e-4 for DeepSeek) and in bf16; forward prefill and decode tok/s
# at batch 1, 16 and 64; engine output tok/s at 1, 16 and 64 concurrent streams.
set -uo pipefail
BIN=${1:-.device-bin/moeserve-bench}
OUT=${OUT:-gpu-check-out}
DEVICE=${DEVICE:-cuda}
MEDIUM=${MEDIUM_CONFIG:-models/medium-moe/hf/config.json}
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
