#!/usr/bin/env bash
# The agents people run, against moeserve over real HTTP: Codex CLI (`codex exec`, a
# custom provider on the Responses API) on a small repository, Claude Code (`claude -p`,
# ANTHROPIC_BASE_URL) and the OpenAI Agents SDK (tests/agents/agents_sdk.py: a forced
# function tool over Responses and Chat, streamed and not). Each must exit 0, and every
# request they make must be answered 2xx: they go through tests/agents/recording_proxy.py,
# which records each request and its status (target/agents/requests.jsonl).
#
#   tests/agents/run.sh [path/to/moeserve]
#
# The clients' system prompts and tools are 10-20k tokens, past the default model's 8k
# context: the server runs a copy of its GGUF with the context length raised to 32k (a
# 135M model's answers past 8k are noise; the protocol is what is checked). Output is
# capped at 256 tokens a request (--max-output-tokens), since such a model rarely ends
# on its own; Claude Code is told the same cap (CLAUDE_CODE_MAX_OUTPUT_TOKENS), as a
# stopped-at-the-limit answer otherwise makes it retry with a larger one.
#
# Needs node and npm (the CLIs are pinned by tests/agents/package-lock.json) and python3
# (a venv in target/agents-venv gets openai-agents and gguf from PyPI).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${1:-target/release/moeserve}"
work=target/agents
rm -rf "$work" && mkdir -p "$work"

echo "-- clients"
(cd tests/agents && npm ci --silent --no-audit --no-fund)
venv=target/agents-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "openai-agents==0.25.0" "gguf==0.17.1"
"tests/agents/node_modules/.bin/codex" --version
"tests/agents/node_modules/.bin/claude" --version

echo "-- the default model with a 32k context"
base="$(scripts/fetch-default-model.sh)"
model="$work/$(basename "$base" .gguf)-32k.gguf"
cp "$base" "$model"
"$venv/bin/gguf-set-metadata" "$model" llama.context_length 32768 --force >/dev/null
name="$(basename "$model" .gguf)"

port_of() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
up="$(port_of)"
proxy="$(port_of)"
"$bin" serve --model "$model" --host 127.0.0.1 --port "$up" --max-output-tokens 256 2>"$work/server.log" &
server=$!
python3 tests/agents/recording_proxy.py --listen "$proxy" --upstream "http://127.0.0.1:$up" --out "$work/requests.jsonl" &
recorder=$!
trap 'kill $server $recorder 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do curl -fsS "http://127.0.0.1:$proxy/ready" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "http://127.0.0.1:$proxy/ready" >/dev/null || { cat "$work/server.log"; exit 1; }
url="http://127.0.0.1:$proxy"

echo "-- Codex CLI: codex exec on a small repository"
repo="$PWD/$work/repo"
mkdir -p "$repo" "$work/codex-home" "$work/home"
printf 'def add(a, b):\n    return a + b\n' > "$repo/calc.py"
git -C "$repo" init -q
cat > "$work/codex-home/config.toml" <<TOML
model = "$name"
model_provider = "moeserve"

[model_providers.moeserve]
name = "moeserve"
base_url = "$url/v1"
wire_api = "responses"
TOML
(cd "$repo" && CODEX_HOME="$PWD/../codex-home" OPENAI_API_KEY=none timeout 600 \
  ../../../tests/agents/node_modules/.bin/codex exec --skip-git-repo-check "What does calc.py do?" \
  </dev/null >"../codex.out" 2>&1) || { tail -n 20 "$work/codex.out"; echo "codex exec failed"; exit 1; }
tail -n 3 "$work/codex.out"

echo "-- Claude Code: claude -p"
(cd "$repo" && HOME="$PWD/../home" ANTHROPIC_BASE_URL="$url" ANTHROPIC_API_KEY=none \
  ANTHROPIC_MODEL="$name" ANTHROPIC_SMALL_FAST_MODEL="$name" CLAUDE_CODE_MAX_OUTPUT_TOKENS=256 \
  DISABLE_TELEMETRY=1 CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 timeout 600 \
  ../../../tests/agents/node_modules/.bin/claude -p "What does calc.py do?" \
  </dev/null >"../claude.out" 2>&1) || { tail -n 20 "$work/claude.out"; echo "claude -p failed"; exit 1; }
tail -n 3 "$work/claude.out"

echo "-- OpenAI Agents SDK: a forced function tool over Responses and Chat"
MOESERVE_URL="$url" MOESERVE_MODEL="$name" timeout 600 "$venv/bin/python" tests/agents/agents_sdk.py

echo "-- every request answered 2xx"
python3 - "$work/requests.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
api = [r for r in rows if r["path"].startswith("/v1/")]
bad = [r for r in api if not 200 <= r["status"] < 300]
for r in api:
    print(r["status"], r["method"], r["path"], (r.get("body") or {}).get("tool_choice", "") if isinstance(r.get("body"), dict) else "")
paths = {r["path"].split("?")[0] for r in api}
assert {"/v1/responses", "/v1/messages", "/v1/chat/completions"} <= paths, paths
assert not bad, "\n".join(f'{r["status"]} {r["method"]} {r["path"]}: {r.get("error", "")}' for r in bad)
print(f"{len(api)} API requests, all 2xx")
PY
