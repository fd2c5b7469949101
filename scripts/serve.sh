#!/usr/bin/env bash
# Serves the default model (fetching it first if it is missing) on http://127.0.0.1:8080.
# Extra arguments go to `moeserve serve` (see `moeserve serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-default-model.sh >/dev/null
exec cargo run --release --quiet -p moeserve -- serve "$@"
