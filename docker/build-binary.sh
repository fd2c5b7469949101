#!/usr/bin/env bash
# Builds the release `moeserve` binary for a Docker platform's architecture (TARGETARCH:
# amd64 or arm64), on whatever machine runs it: natively when the two match, else
# cross-compiled with Debian's cross gcc as the linker (no emulation). The Dockerfile's
# build stage runs this; it runs the same way outside a container.
#
#   docker/build-binary.sh arm64 out/moeserve
#
# One binary runs on every CPU of its architecture: the kernels pick AVX-512, AVX2 or
# NEON at start (MOESERVE_CPU forces one), so nothing is compiled for the build machine.
set -euo pipefail
arch="${1:?TARGETARCH: amd64 or arm64}"
out="${2:?where the binary goes}"
case "$arch" in
  amd64 | x86_64) target=x86_64-unknown-linux-gnu; cross=x86_64-linux-gnu; debarch=amd64 ;;
  arm64 | aarch64) target=aarch64-unknown-linux-gnu; cross=aarch64-linux-gnu; debarch=arm64 ;;
  *) echo "unsupported architecture: $arch (amd64 or arm64)" >&2; exit 1 ;;
esac
host="$(rustc -vV | sed -n 's/^host: //p')"
args=(build --release --locked -p moeserve)
strip=strip
if [ "$target" != "$host" ]; then
  if ! command -v "$cross-gcc" >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "gcc-$cross" "g++-$cross" \
      "libc6-dev-$debarch-cross" >/dev/null
  fi
  rustup target list --installed | grep -qx "$target" || rustup target add "$target"
  upper="$(echo "$target" | tr 'a-z-' 'A-Z_')"
  export "CARGO_TARGET_${upper}_LINKER=$cross-gcc"
  # The C code of the tokenizers crate's regex engine (onig) goes through the same gcc.
  export "CC_${target//-/_}=$cross-gcc" "CXX_${target//-/_}=$cross-g++"
  args+=(--target "$target")
  strip="$cross-strip"
  built="target/$target/release/moeserve"
else
  built="target/release/moeserve"
fi
cargo "${args[@]}"
mkdir -p "$(dirname "$out")"
cp "$built" "$out"
"$strip" "$out"
echo "$out ($target)"
