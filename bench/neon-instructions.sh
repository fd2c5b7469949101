#!/usr/bin/env bash
# Instructions the NEON quantized-matmul kernels execute, counted under emulation (NEON
# cannot be timed on an x86 host): the packed_matmul bench cross-built for aarch64 runs
# one matmul per format and token count under qemu-user, once per emulated CPU (max: i8mm
# and dotprod; cortex-a76: dotprod; cortex-a72: neither), and every instruction executed
# inside the kernels' own functions is counted (qemu's per-instruction exec log, filtered
# to their addresses). Activation quantization is counted apart.
#
#   bench/neon-instructions.sh [rows] [cols]     # default 256 x 2048
#
# Needs Debian's gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user-static, and
# the rustup target aarch64-unknown-linux-gnu (CI's aarch64 step installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-256}"
cols="${2:-2048}"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
cargo build --release -q -p moeserve-bench --bench packed_matmul --target aarch64-unknown-linux-gnu
bin="$(ls -t target/aarch64-unknown-linux-gnu/release/deps/packed_matmul-* | grep -v '\.d$' | head -n1)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# Address ranges of the matmul kernels and of the quantizer, from the symbol table.
ranges() {
  aarch64-linux-gnu-nm -C -S --defined-only "$bin" | grep -E "$1" |
    awk '{printf "%s0x%s+0x%s", (n++ ? "," : ""), $1, $2}'
}
kernels="$(ranges 'quant::neon::(group|run|tile)_')"
quantizer="$(ranges 'quant::neon::quantize')"
[ -n "$kernels" ] || { echo "no NEON kernel symbols in $bin" >&2; exit 1; }
echo "| emulated CPU | kernel | format | tokens | MACs | kernel instructions | per 16x32 block and token | MACs per instruction | weights read per instruction | quantizer instructions |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
for cpu in max cortex-a76 cortex-a72; do
  case "$cpu" in max) kernel=smmla ;; cortex-a76) kernel=sdot ;; *) kernel=smlal ;; esac
  for format in Q4_0 Q8_0 Q4K Q6K; do
    for t in 1 8; do
      count() {
        qemu-aarch64-static -cpu "$cpu" -L /usr/aarch64-linux-gnu -one-insn-per-tb -d exec,nochain \
          -dfilter "$1" -D "$out/log" "$bin" --rows "$rows" --cols "$cols" --tokens "$t" \
          --formats "$format" --reps 1 >/dev/null 2>&1 || true
        grep -c '^Trace' "$out/log" || true
      }
      n="$(count "$kernels")"
      q="$(count "$quantizer")"
      python3 - "$cpu" "$kernel" "$format" "$t" "$rows" "$cols" "$n" "$q" <<'PY'
import sys
cpu, kernel, fmt, t, rows, cols, n, q = sys.argv[1:]
t, rows, cols, n, q = int(t), int(rows), int(cols), int(n), int(q)
macs = t * rows * cols
blocks = rows // 16 * cols // 32
print(f"| {cpu} | {kernel} | {fmt} | {t} | {macs} | {n} | {n / blocks / t:.0f} | {macs / n:.1f} | {rows * cols / n:.2f} | {q} |")
PY
    done
  done
done
