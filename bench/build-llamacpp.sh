#!/usr/bin/env bash
# Fetches llama.cpp's source (vendored in the llama-cpp-python source distribution on
# PyPI) and builds the tools moeserve is compared and cross-checked with:
# llama-bench, llama-batched-bench, llama-server, llama-tokenize, and llama-quantize
# (bench/medium-moe.sh makes its Q4_K_M GGUF with it).
# Nothing of llama.cpp is committed: it lives in bench/llama.cpp (git-ignored).
#
#   bench/build-llamacpp.sh            # prints the bin directory at the end
#   LLAMA_CPU=avx2 bench/build-llamacpp.sh
#
# LLAMA_CPU=avx2 builds it for AVX2 + FMA + F16C only (no AVX-512, whatever this CPU has),
# in its own build directory: the comparison for moeserve's AVX2 kernels
# (MOESERVE_CPU=avx2) on a host that has AVX-512.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/llama.cpp"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
mkdir -p "$dest"
if [ ! -f "$dest/src/CMakeLists.txt" ]; then
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$version" -d "$dest/dl"
  tar xzf "$dest/dl/llama_cpp_python-$version.tar.gz" -C "$dest/dl"
  rm -rf "$dest/src"
  mv "$dest/dl/llama_cpp_python-$version/vendor/llama.cpp" "$dest/src"
  rm -rf "$dest/dl"
fi
if ! command -v cmake >/dev/null; then
  python3 -m pip install --quiet cmake
fi
# On CPUs that report AMX, -march=native compiles llama.cpp's AMX matmul, whose tile
# instructions need the kernel to grant the process tile state; where a VM does not
# (llama-bench died of SIGILL in ldtilecfg here), they are left out.
flags=""
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
build="$dest/build"
cpu=(-DGGML_NATIVE=ON)
case "${LLAMA_CPU:-native}" in
  native) ;;
  avx2)
    build="$dest/build-avx2"
    cpu=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
      -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
      -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
    flags=""
    ;;
  *) echo "LLAMA_CPU: native or avx2" >&2; exit 1 ;;
esac
cmake -S "$dest/src" -B "$build" -DCMAKE_BUILD_TYPE=Release "${cpu[@]}" \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON >/dev/null
cmake --build "$build" --config Release -j "$(nproc)" \
  --target llama-bench llama-batched-bench llama-server llama-tokenize llama-quantize
echo "$build/bin"
