#!/usr/bin/env python3
"""Time to first token with the prefix cache cold, warm in the KV pool, and warm on disk
after a restart (issue 21's benchmark). Stdlib only.

    python3 bench/prefix-cache-disk.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--tokens 1500,4000] [--reps 3] [--binary target/release/moeserve] [--drop-caches]

For each prompt length and repetition it builds a base text of about that many tokens
(counted by the server's /tokenize) and three prompts that share it and differ in their
last sentence. Then:

  1. a server starts on an empty cache directory; `cold` is P1's TTFT, `pool` is P2's
     right after it (its shared blocks are in the pool);
  2. that server gets SIGTERM (it writes what is queued), a new one starts on the same
     directory; `disk` is P3's TTFT (its shared blocks come from disk). With
     --drop-caches (root) the kernel's page cache is dropped before the restart, so the
     blocks come from the device, not from memory.

With --stream-beside, a long stream decodes beside the disk-warm prompts: the largest gap
between its tokens during a disk-warm prompt, against its median gap, shows how much
loading blocks stalls the running sequences.

TTFT is measured by streaming /v1/completions with max_tokens 1. Prints one JSON object:
medians per length and tier, their ratios to cold, and, from /metrics, where a block's
load goes: reading and checking it (the loader thread) and copying it into the pool (the
engine), and the read throughput.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlparse

WORDS = (
    "agent tool schema request context history answer policy system memory token cache "
    "latency budget kernel expert router layer block prefix model server client stream"
).split()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary, model, cache_dir, extra):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        args = [binary, "serve", "--model", model, "--host", "127.0.0.1", "--port", str(self.port),
                "--prefix-cache-dir", cache_dir, "--log-format", "json"] + extra
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if self.get("/ready")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                sys.exit(f"the server exited with {self.proc.returncode}")
            time.sleep(0.2)
        sys.exit("the server did not become ready")

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def get(self, path):
        c = self.conn()
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode()

    def post(self, path, body):
        c = self.conn()
        c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read().decode()
        if r.status != 200:
            sys.exit(f"{path}: {r.status} {data}")
        return json.loads(data)

    def ttft(self, prompt):
        """Seconds to the first streamed token, and the cached prompt tokens."""
        c = self.conn()
        body = {"model": self.model_id(), "prompt": prompt, "max_tokens": 1, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            sys.exit(f"/v1/completions: {r.status} {r.read().decode()}")
        first, cached = None, None
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            # The first chunk with a choice carries the first token (an empty text while
            # a character is incomplete still marks it).
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return first, cached

    def model_id(self):
        if not hasattr(self, "_id"):
            self._id = json.loads(self.get("/v1/models")[1])["data"][0]["id"]
        return self._id

    def metrics(self):
        out = {}
        for line in self.get("/metrics")[1].splitlines():
            m = re.match(r'^moeserve_cache_config_info\{block_size="(\d+)"', line)
            if m:
                out["block_size"] = int(m.group(1))
            m = re.match(r"^(moeserve_prefix_cache_\S+) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


class BackgroundStream(threading.Thread):
    """A long greedy stream whose chunk times show how the engine's steps run while the
    disk-warm prompts load."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.times, self.stop = server, [], threading.Event()

    def run(self):
        c = self.server.conn()
        body = {"model": self.server.model_id(), "prompt": "Count on and on:", "max_tokens": 3000,
                "temperature": 0, "ignore_eos": True, "stream": True}
        try:
            c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            r = c.getresponse()
            for line in r:
                if self.stop.is_set():
                    break
                if line.startswith(b"data: {"):
                    self.times.append(time.perf_counter())
        except (OSError, http.client.HTTPException):
            pass
        finally:
            c.close()

    def gaps_within(self, windows):
        """The largest gap between chunks that ends inside each window, and the median gap
        outside them."""
        inside, outside = [], []
        for a, b in zip(self.times, self.times[1:]):
            (inside if any(s <= b <= e for s, e in windows) else outside).append(b - a)
        return max(inside, default=0.0), statistics.median(outside) if outside else 0.0


def count_tokens(server, text):
    return server.post("/tokenize", {"model": server.model_id(), "prompt": text})["count"]


def base_text(server, tokens, salt):
    """Sentences of varied words: the most whose text stays within `tokens` - 20 tokens
    (room for the last sentence)."""
    def sentence(i):
        words = [WORDS[(i * 7 + j * 3 + salt * 11) % len(WORDS)] for j in range(12)]
        return f"Note {salt}.{i}: " + " ".join(words) + "."

    def text(n):
        return " ".join(sentence(i) for i in range(n))

    lo, hi = 1, 2
    while count_tokens(server, text(hi)) <= tokens - 20:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(server, text(mid)) <= tokens - 20:
            lo = mid
        else:
            hi = mid
    return text(lo)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--binary", default="target/release/moeserve")
    ap.add_argument("--tokens", default="1500,4000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the kernel's page cache before the restart (needs root)")
    ap.add_argument("--stream-beside", action="store_true",
                    help="run a long stream beside the disk-warm prompts and report its token gaps")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra flag for the server (repeat)")
    a = ap.parse_args()
    lengths = [int(t) for t in a.tokens.split(",")]
    cache_dir = tempfile.mkdtemp(prefix="moeserve-prefix-bench-")
    try:
        s = Server(a.binary, a.model, cache_dir, a.server_arg)
        prompts = {}
        for n in lengths:
            for r in range(a.reps):
                base = base_text(s, n, salt=1000 * n + r)
                prompts[(n, r)] = [base + f" Finally, question {k}: what comes next?" for k in ("one", "two", "three")]
        times = {(n, tier): [] for n in lengths for tier in ("cold", "pool", "disk")}
        cached = {(n, tier): [] for n in lengths for tier in ("cold", "pool", "disk")}
        prompt_tokens = {n: count_tokens(s, prompts[(n, 0)][0]) for n in lengths}
        s.ttft("warm up the server")
        for (n, r), (p1, p2, _) in prompts.items():
            for tier, p in (("cold", p1), ("pool", p2)):
                t, c = s.ttft(p)
                times[(n, tier)].append(t)
                cached[(n, tier)].append(c)
        s.stop()
        if a.drop_caches:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        s = Server(a.binary, a.model, cache_dir, a.server_arg)
        s.ttft("warm up the server")
        stream = BackgroundStream(s) if a.stream_beside else None
        if stream:
            stream.start()
            while len(stream.times) < 20:
                if not stream.is_alive():
                    sys.exit("the background stream ended early")
                time.sleep(0.05)
        windows = []
        for (n, r), (_, _, p3) in prompts.items():
            if stream:
                time.sleep(0.3)
            start = time.perf_counter()
            t, c = s.ttft(p3)
            # The stalled step ends with the first token: count the chunk right after it.
            windows.append((start, start + t + 0.1))
            times[(n, "disk")].append(t)
            cached[(n, "disk")].append(c)
        if stream:
            time.sleep(0.3)
            stream.stop.set()
            max_gap, median_gap = stream.gaps_within(windows)
        m = s.metrics()
        s.stop()
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    result = {"model": a.model, "reps": a.reps, "page_cache_dropped": a.drop_caches, "lengths": {}}
    for n in lengths:
        med = {tier: statistics.median(times[(n, tier)]) for tier in ("cold", "pool", "disk")}
        result["lengths"][str(n)] = {
            "prompt_tokens": prompt_tokens[n],
            "ttft_ms": {k: round(v * 1e3, 1) for k, v in med.items()},
            "cached_tokens": {tier: cached[(n, tier)] for tier in ("cold", "pool", "disk")},
            "ratio_to_cold": {k: round(v / med["cold"], 3) for k, v in med.items()},
        }
    hits = m.get('moeserve_prefix_cache_hits_total{tier="disk"}', 0)
    read_s = m.get("moeserve_prefix_cache_disk_read_seconds_total", 0)
    read_b = m.get("moeserve_prefix_cache_disk_read_bytes_total", 0)
    load_s = m.get("moeserve_prefix_cache_disk_load_seconds_total", 0)
    if a.stream_beside:
        result["stream_during_disk_loads"] = {
            "median_gap_ms": round(median_gap * 1e3, 1),
            "max_gap_while_loading_ms": round(max_gap * 1e3, 1),
        }
    for n in lengths:
        L = result["lengths"][str(n)]
        blocks = max(L["cached_tokens"]["disk"][0], 1) / m.get("block_size", 16)
        # What a disk-warm prompt costs over a pool-warm one, per block read.
        L["disk_minus_pool_ms_per_block"] = round((L["ttft_ms"]["disk"] - L["ttft_ms"]["pool"]) / blocks, 3)
    result["disk_tier"] = {
        "blocks_loaded": int(hits),
        "block_bytes": int(read_b / hits) if hits else None,
        "install_ms_per_block": round(load_s / hits * 1e3, 3) if hits else None,
        # Summed over the loader's parallel reads (4 at once).
        "read_ms_per_block_per_reader": round(read_s / hits * 1e3, 3) if hits else None,
        "read_mb_s_per_reader": round(read_b / read_s / 1e6, 1) if read_s else None,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
