#!/usr/bin/env bash
# Makes the "medium random MoE" (Qwen3-MoE, 24 layers, 32 experts of which 4 active, ~1.4 B
# parameters; see bench/make-medium-moe.py) as Q8_0 and Q4_K_M GGUFs, to benchmark moeserve
# against llama.cpp on an MoE bigger than the tests' toy ones. Seeded, so reruns give the
# same weights. Idempotent: a step whose output exists is skipped. Needs ~6 GB free disk
# while it runs (~2.3 GB after) and ~8 GB of memory.
#
#   bench/medium-moe.sh [outdir]      # default models/medium-moe (git-ignored); prints the two GGUFs
#   KEEP_HF=1 bench/medium-moe.sh     # keep the bf16 safetensors (default: delete once converted)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-models/medium-moe}"
if [ -z "${PYTHON:-}" ]; then
  # The reference venv has torch + transformers (the generator and the converter need both).
  if [ -x /root/refvenv/bin/python ]; then PYTHON=/root/refvenv/bin/python; else PYTHON=python3; fi
fi
q8="$out/medium-moe-Q8_0.gguf"
q4="$out/medium-moe-Q4_K_M.gguf"
bf16="$out/medium-moe-bf16.gguf"

bin="$(bench/build-llamacpp.sh | tail -n1)"   # also builds llama-quantize
export LD_LIBRARY_PATH="$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The converter puts its own gguf-py (newer than PyPI's gguf) first on sys.path itself.
convert=("$PYTHON" bench/llama.cpp/src/convert_hf_to_gguf.py)

# Each output is written under a temporary name and renamed, so an interrupted run
# leaves nothing that a rerun would take for finished. The checkpoint is needed only
# while a GGUF is still to be converted from it.
if [ ! -f "$q8" ] || { [ ! -f "$q4" ] && [ ! -f "$bf16" ]; }; then
  if [ ! -f "$out/hf/model.safetensors" ]; then
    rm -rf "$out/hf.partial"
    "$PYTHON" bench/make-medium-moe.py "$out/hf.partial"
    rm -rf "$out/hf"
    mv "$out/hf.partial" "$out/hf"
  fi
fi

if [ ! -f "$q8" ]; then
  "${convert[@]}" "$out/hf" --outtype q8_0 --outfile "$q8.partial"
  mv "$q8.partial" "$q8"
fi
if [ ! -f "$q4" ]; then
  # Q4_K_M is not among the converter's outtypes: go through a lossless bf16 GGUF.
  if [ ! -f "$bf16" ]; then
    "${convert[@]}" "$out/hf" --outtype bf16 --outfile "$bf16.partial"
    mv "$bf16.partial" "$bf16"
  fi
  "$bin/llama-quantize" "$bf16" "$q4.partial" Q4_K_M
  mv "$q4.partial" "$q4"
fi
rm -f "$bf16"
# The weights are reproducible from the seed; config and tokenizer stay for reference.
[ "${KEEP_HF:-0}" = 1 ] || rm -f "$out/hf/model.safetensors"

ls -l "$q8" "$q4" >&2
echo "$q8"
echo "$q4"
