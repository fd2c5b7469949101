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
# Both CLIs fail a turn whose answer stops at its token limit (Codex: "Incomplete
# response returned"; Claude Code: "exceeded the N output token maximum"), so the model
# must end its answers. The CLIs get a one-line system prompt (Codex's catalog entry for
# the model, which also gives it the free-form apply_patch, a custom tool with a Lark
# grammar; Claude Code's --system-prompt) in place of their own 10-20k
# tokens, past which the 135M default model writes noise that does not end; their tool
# lists, and everything else they send, go as they are (the context of a copy of the
# default GGUF is raised to 32k, as the tools alone are 5-8k tokens). Answers are capped
# at 384 tokens (--max-output-tokens) and, since neither CLI sends a temperature,
# sampled at 0.5 (--default-temperature): at 1.0 the 135M model rarely ends an answer in
# time (Codex: 0 of 4 runs, against 4 of 4 at 0.5); a run that fails only because the
# model did not end in time is tried again (up to 16
# times: a 135M model's answers are not judged, the protocol is), any other failure
# fails at once. Claude Code gets two built-in tools (--tools "Bash,Read"): its full set
# is 8k tokens, past the model's trained context by itself.
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
"$bin" serve --model "$model" --host 127.0.0.1 --port "$up" --max-output-tokens 384 --default-temperature 0.5 \
  2>"$work/server.log" &
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
instructions="You are a coding assistant in a terminal. Answer briefly."
# What Codex knows of the model (its catalog entry): the context, the one-line
# instructions, and the free-form apply_patch tool (a custom tool with a Lark grammar).
cat > "$work/codex-models.json" <<JSON
{"models": [{"slug": "$name", "display_name": "$name", "context_window": 32768,
  "base_instructions": "$instructions", "apply_patch_tool_type": "freeform",
  "shell_type": "shell_command", "supported_reasoning_levels": [], "support_verbosity": false,
  "truncation_policy": {"mode": "tokens", "limit": 10000}, "experimental_supported_tools": [],
  "visibility": "list", "supported_in_api": true, "priority": 1}]}
JSON
cat > "$work/codex-home/config.toml" <<TOML
model = "$name"
model_catalog_json = "$PWD/$work/codex-models.json"
model_provider = "moeserve"

[model_providers.moeserve]
name = "moeserve"
base_url = "$url/v1"
wire_api = "responses"
TOML
# Runs a CLI (its output in $work/$1.out) until it exits 0; a failure other than an
# answer cut at its token limit ends the run.
attempt() {
  local name="$1"
  shift
  for try in $(seq 1 16); do
    if (cd "$repo" && "$@" </dev/null >"$PWD/../$name.out" 2>&1); then
      tail -n 3 "$work/$name.out"
      return 0
    fi
    if ! grep -qE "Incomplete response returned, reason: max_output_tokens|exceeded the [0-9]+ output token maximum" "$work/$name.out"; then
      tail -n 20 "$work/$name.out"
      echo "$name failed"
      exit 1
    fi
    echo "$name: the model's answer ran to its limit (try $try); again"
  done
  tail -n 20 "$work/$name.out"
  echo "$name: no answer ended within its limit in 16 tries"
  exit 1
}
attempt codex env CODEX_HOME="$PWD/$work/codex-home" OPENAI_API_KEY=none timeout 600 \
  "$PWD/tests/agents/node_modules/.bin/codex" exec --skip-git-repo-check "What does calc.py do?"

echo "-- Claude Code: claude -p"
attempt claude env HOME="$PWD/$work/home" ANTHROPIC_BASE_URL="$url" ANTHROPIC_API_KEY=none \
  ANTHROPIC_MODEL="$name" ANTHROPIC_SMALL_FAST_MODEL="$name" CLAUDE_CODE_MAX_OUTPUT_TOKENS=384 \
  DISABLE_TELEMETRY=1 CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 timeout 600 \
  "$PWD/tests/agents/node_modules/.bin/claude" -p --tools "Bash,Read" --system-prompt "$instructions" \
  "What does calc.py do?"

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
def tool_types(tools):
    for t in tools or []:
        yield t.get("type")
        if t.get("type") == "namespace":
            yield from tool_types(t.get("tools"))
codex = [r for r in api if r["path"] == "/v1/responses" and isinstance(r.get("body"), dict)]
assert any("custom" in set(tool_types(r["body"].get("tools"))) for r in codex), "Codex offered no custom tool"
assert not bad, "\n".join(f'{r["status"]} {r["method"]} {r["path"]}: {r.get("error", "")}' for r in bad)
print(f"{len(api)} API requests, all 2xx")
PY
