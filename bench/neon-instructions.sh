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
# The test binary is position independent: qemu loads it at a base address, read from
# its page log on a tiny run.
MOESERVE_CPU=neon qemu-aarch64-static -cpu max -L /usr/aarch64-linux-gnu -d page -D "$out/page" \
  "$bin" --rows 16 --cols 64 --tokens 1 --formats Q4_0 --reps 1 >/dev/null
# One instruction per translation block, unchained: every instruction executed is logged.
one_insn=-one-insn-per-tb
qemu-aarch64-static --help | grep -q -- -one-insn-per-tb || one_insn=-singlestep   # qemu before 8.1
base="$(grep -m1 -oE '^[0-9a-f]{16}-' "$out/page" | tr -d -)"
# Address ranges of the matmul kernels (every function of quant::neon that the compiler
# kept out of line: the entry points, tiles and helpers) and of the quantizer.
ranges() {
  aarch64-linux-gnu-nm -C -S --defined-only "$bin" | grep -E "$1" | grep -Ev "${2:-^$}" |
    python3 -c 'import sys
base = int(sys.argv[1], 16)
print(",".join(f"{base + int(a, 16):#x}+{int(n, 16):#x}" for a, n, *_ in map(str.split, sys.stdin)))' "$base"
}
kernels="$(ranges 'quant::neon::' 'quant::neon::quantize')"
quantizer="$(ranges 'quant::neon::quantize')"
[ -n "$kernels" ] || { echo "no NEON kernel symbols in $bin" >&2; exit 1; }
echo "| emulated CPU | kernel | format | tokens | MACs | kernel instructions | per 16x32 block and token | MACs per instruction | weights read per instruction | quantizer instructions |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
for cpu in max cortex-a76 cortex-a72; do
  case "$cpu" in max) kernel=smmla ;; cortex-a76) kernel=sdot ;; *) kernel=smlal ;; esac
  for format in Q4_0 Q8_0 Q4K Q6K; do
    for t in 1 8; do
      count() {
        rm -f "$out/log"
        MOESERVE_CPU=neon RAYON_NUM_THREADS=1 qemu-aarch64-static -cpu "$cpu" -L /usr/aarch64-linux-gnu "$one_insn" -d exec,nochain \
          -dfilter "$1" -D "$out/log" "$bin" --rows "$rows" --cols "$cols" --tokens "$t" \
          --formats "$format" --reps 1 >/dev/null 2>&1 || true
        if [ -f "$out/log" ]; then grep -c '^Trace' "$out/log" || true; else echo 0; fi
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
