#!/usr/bin/env bash
# Validates the Kubernetes manifests in this directory offline and strictly (see
# validate.py), then checks that the validator rejects deliberately broken copies of them.
# Needs python3 with venv; installs pinned packages from PyPI into target/k8s-venv once
# (later runs need no network). No kubectl or cluster.
#
#   deploy/kubernetes/validate.sh              validate, then self-test
#   deploy/kubernetes/validate.sh DIR          validate another copy of this directory only
#   deploy/kubernetes/validate.sh --self-test  self-test only
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/target/k8s-venv"
# kubernetes-validate bundles the Kubernetes JSON schemas (strict variants included);
# jsonschema checks the vendored InferencePool CRD schema.
pins="kubernetes-validate==1.37.0 jsonschema==4.25.1 PyYAML==6.0.3"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.pins" 2>/dev/null)" != "$pins" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet --disable-pip-version-check $pins
  echo "$pins" >"$venv/.pins"
fi
py() { PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" "$here/validate.py" "$@"; }
if [ $# -gt 0 ]; then
  py "$@"
else
  py "$here"
  py --self-test "$here"
fi
