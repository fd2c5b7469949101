#!/usr/bin/env bash
# moeserve side by side with llama.cpp on the same GGUF, the same threads, the same load.
# Builds llama.cpp from the llama-cpp-python sdist (bench/build-llamacpp.sh, git-ignored),
# then prints one table with ratios (moeserve / llama.cpp). Serving runs each level at
# three sampling settings (greedy; OpenAI's default, temperature 1 and top_p 1; chat,
# temperature 0.7 and top_p 0.9; all sent explicitly with top_k and min_p off, since
# llama-server's own defaults differ), then one level of short chat answers that end at
# end-of-sequence.
#
#   bench/compare-llamacpp.sh [model.gguf] [threads]
#   LEVELS=1,16,64 SAMPLING=greedy,default,chat CHAT_LEVEL=16 MAX_TOKENS=128 bench/compare-llamacpp.sh
#   MOESERVE_CPU=avx2 LLAMA_CPU=avx2 bench/compare-llamacpp.sh   # both on AVX2 only
#
# MOESERVE_CPU forces moeserve's kernel set (avx512, avx2, neon, portable) and LLAMA_CPU
# builds llama.cpp for the same (bench/build-llamacpp.sh), so each set is compared on one
# host against llama.cpp built for the same instructions.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-$(scripts/fetch-default-model.sh)}"
threads="${2:-$(nproc)}"
levels="${LEVELS:-1,16,64}"
tokens="${MAX_TOKENS:-128}"
sampling="${SAMPLING:-greedy,default,chat}"
chat_level="${CHAT_LEVEL:-16}"
bin="$(bench/build-llamacpp.sh | tail -n1)"
cargo build --release -q -p moeserve -p moeserve-bench
ms=target/release/moeserve
mb=target/release/moeserve-bench
echo "== CPU: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n1); moeserve: $($ms kernels | tail -n1); llama.cpp: ${LLAMA_CPU:-native} ($bin)"
export LD_LIBRARY_PATH="$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The same malloc settings for both: moeserve asks glibc for transparent huge pages
# (it re-executes itself with this unless GLIBC_TUNABLES is set); llama.cpp's buffers
# get them too. (Its weights are mmapped from the file, which this does not change.)
export GLIBC_TUNABLES="${GLIBC_TUNABLES-glibc.malloc.hugetlb=1}"
out="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$out"' EXIT

# The bandwidth probe runs before, between and after the two kernel benches: on a shared
# host it can read twice as much from one minute to the next, so one reading does not
# tell which state the decode runs met.
probe() { RAYON_NUM_THREADS="$threads" $mb memory --model "$model" | tee -a "$out/mem"; }
echo "== kernels: llama-bench -p 512 -n 128 vs moeserve-bench kernel, memory bandwidth around them"
probe
"$bin/llama-bench" -m "$model" -p 512 -n 128 -r 5 -t "$threads" -o json > "$out/llama-bench.json"
probe
RAYON_NUM_THREADS="$threads" $mb kernel --model "$model" --prompt-len 512 --decode-tokens 128 --repetitions 5 --batches 1 | tee "$out/kernel"
probe

wait_ready() { for _ in $(seq 1 600); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }
name="$(basename "$model" .gguf)"

echo "== serving: llama-server -np 16"
"$bin/llama-server" -m "$model" -t "$threads" -np 16 -c $((16 * 1024)) --port 18180 --host 127.0.0.1 >"$out/llama-server.log" 2>&1 &
lpid=$!
wait_ready http://127.0.0.1:18180/health
serve_bench() { $mb serve --url "$1" --model "$name" --concurrency "$levels" --max-tokens "$tokens" \
  --sampling "$sampling" --chat-concurrency "$chat_level" --json; }
serve_bench http://127.0.0.1:18180 | tee "$out/llama-serve.jsonl"
kill "$lpid"; wait "$lpid" 2>/dev/null || true

echo "== serving: moeserve"
RAYON_NUM_THREADS="$threads" $ms serve --model "$model" --port 18181 >"$out/moeserve.log" 2>&1 &
mpid=$!
wait_ready http://127.0.0.1:18181/ready
serve_bench http://127.0.0.1:18181 | tee "$out/moeserve-serve.jsonl"
kill -TERM "$mpid"; wait "$mpid" 2>/dev/null || true

python3 - "$out" <<'PY'
import json, re, sys
out = sys.argv[1]
lb = json.load(open(f"{out}/llama-bench.json"))
# Both kernel benches are the mean of 5 repetitions, with their standard deviation.
l_pp, l_pp_sd = next((r["avg_ts"], r["stddev_ts"]) for r in lb if r["n_prompt"] > 0)
l_tg, l_tg_sd = next((r["avg_ts"], r["stddev_ts"]) for r in lb if r["n_gen"] > 0)
row = [l for l in open(f"{out}/kernel") if l.startswith("| 1 |")][0].split("|")
m_pp, m_tg, m_pp_sd, m_tg_sd = map(float, row[2:6])
print("\n| metric | moeserve | llama.cpp | ratio |\n|---|---:|---:|---:|")
print(f"| prefill tok/s (512) | {m_pp:.1f} ± {m_pp_sd:.1f} | {l_pp:.1f} ± {l_pp_sd:.1f} | {m_pp / l_pp:.2f} |")
print(f"| decode tok/s (batch 1) | {m_tg:.1f} ± {m_tg_sd:.1f} | {l_tg:.1f} ± {l_tg_sd:.1f} | {m_tg / l_tg:.2f} |")
# Rows keyed by (sampling, concurrency, ignore_eos, json_schema).
load = lambda f: {(r["sampling"], r["concurrency"], r["ignore_eos"], r.get("json_schema", False)): r
                  for r in map(json.loads, open(f))}
m, l = load(f"{out}/moeserve-serve.jsonl"), load(f"{out}/llama-serve.jsonl")
ratio = lambda a, b: f"{a / b:.2f}" if a and b else "n/a"
num = lambda v, f: format(v, f) if v is not None else "n/a"
for key in m:
    s, c, fixed, constrained = key
    if constrained:
        s = f"{s}, json_schema"
    mr, lr = m[key], l.get(key, {})
    errors = mr["errors"] + lr.get("errors", 0)
    note = f", {errors} failed requests" if errors else ""
    if fixed:
        mo, lo = mr["output_tok_s"], lr.get("output_tok_s")
        mt, lt = mr["ttft_ms"]["p99"], lr.get("ttft_ms", {}).get("p99")
        print(f"| output tok/s, {c} streams, {s}{note} | {num(mo, '.1f')} | {num(lo, '.1f')} | {ratio(mo, lo)} |")
        print(f"| TTFT p99 ms, {c} streams, {s} | {num(mt, '.0f')} | {num(lt, '.0f')} | {ratio(mt, lt)} |")
    else:
        for what, field, f in [("requests/s", "request_throughput", ".2f"), ("output tok/s", "output_tok_s", ".1f"),
                               ("mean answer tokens", "mean_output_tokens", ".0f")]:
            a, b = mr[field], lr.get(field)
            print(f"| chat to EOS, {c} streams, {s}: {what}{note} | {num(a, f)} | {num(b, f)} | {ratio(a, b)} |")
# Constrained to a JSON schema against unconstrained at the same token counts, on each
# server (llama-server has no grammar-time counter).
for (s, c, fixed, constrained), r in m.items():
    if constrained:
        u, lc, lu = m.get((s, c, True, False)), l.get((s, c, True, True)), l.get((s, c, True, False))
        theirs = ratio(lc["output_tok_s"], lu["output_tok_s"]) if lc and lu else "n/a"
        print(f"| json_schema / unconstrained output tok/s, {c} streams, {s} | {ratio(r['output_tok_s'], u['output_tok_s'])} | {theirs} | |")
        print(f"| grammar time per token, {c} streams, {s} (moeserve) | {r['constraint_us_per_token']:.0f} us | | |")
# Sampled against greedy at the same token counts (ignore_eos), moeserve alone.
for (s, c, fixed, constrained), r in m.items():
    g = m.get(("greedy", c, True, False))
    if fixed and not constrained and s != "greedy" and g:
        print(f"| moeserve {s} / greedy output tok/s, {c} streams | {r['output_tok_s']:.1f} | {g['output_tok_s']:.1f} | {ratio(r['output_tok_s'], g['output_tok_s'])} |")
mem = open(f"{out}/mem").read()
bounds = [float(b) for b in re.findall(r"decode bound (\d+)", mem)]
if bounds:
    # Each decode against the probes on either side of it.
    lb_, mb_ = bounds[:2], bounds[1:3]
    span = lambda tg, bs: "-".join(f"{tg / b:.0%}" for b in sorted(set(bs), reverse=True))
    print(f"| batch-1 decode / memory bound | {span(m_tg, mb_)} | {span(l_tg, lb_)} | |")
    gbs = re.findall(r"bandwidth: ([\d.]+) GB/s", mem)
    print(f"\nMemory bandwidth probes (before llama-bench, between, after moeserve): {', '.join(gbs)} GB/s")
    trips = re.findall(r"round trip: (\d+) ns before, (\d+) ns after", mem)
    if trips:
        # Hundreds of ns: the host had put the two CPUs far apart (see the README).
        print(f"Thread round trips around each probe: {', '.join(f'{a}/{b}' for a, b in trips)} ns")
PY
