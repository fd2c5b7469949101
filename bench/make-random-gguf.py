#!/usr/bin/env python3
"""Random-weight GGUFs of real MoE shapes, quantized as llama-quantize lays out Q4_K_M,
written straight from random quantized blocks (no float checkpoint, no torch): for
benchmarks of shapes whose matrices do not fit in cache, where a toy model's would.

    python3 bench/make-random-gguf.py --shape qwen3-30b-a3b --out models/qwen3-30b-a3b-Q4_K_M.gguf
    python3 bench/make-random-gguf.py --shape medium-moe --layers 4 --out /tmp/small.gguf

Shapes (llama.cpp's keys):
- medium-moe: hidden 1024, 24 layers, 32 experts top-4 of width 512, 16 heads of 64 (the
  repository's medium random MoE, bench/medium-moe-config.json): 0.8 GB.
- qwen3-30b-a3b: hidden 2048, 48 layers, 128 experts top-8 of width 768, 32 heads of 128
  (4 KV heads): 18 GB (the vocabulary is the tokenizer's, not Qwen's 151,936).
- deepseek-v2-lite (deepseek2): hidden 2048, 27 layers (the first dense, width 10944), 64
  experts top-6 of width 1408 plus 2 shared, 16 heads of latent attention (a 512-wide
  latent, 128 + 64 rope dims per query and key, 128 per value), no query compression
  (`q_lora_rank` 0), YaRN x40 from 4096: about 9 GB. Rows of 1408 and 10944 are not whole
  256-blocks, so their down projections take the Q5_0 / Q8_0 fallbacks; so do the
  per-head 128-wide `attn_k_b`.

Tensor types follow llama.cpp's Q4_K_M rules for these shapes: Q4_K by default, Q6_K for
the output matrix and, on the layers `use_more_bits` picks (the first and last eighth and
every third between), for attn_v and ffn_down(_exps); norms and the router's gate in f32.
Each block's scales give weights of RMS about 1/sqrt(row length) (activations stay
finite through every layer), with the block's codes uniform at random.

The tokenizer (and chat template) is copied from a GGUF given with --tokenizer (default:
the default model, SmolLM2-135M-Instruct Q4_1). Needs numpy and gguf from PyPI. Seeded:
the same arguments give the same file. Tensors are generated and written one at a time,
so memory stays at about the largest tensor.
"""

import argparse
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

SHAPES = {
    "medium-moe": dict(
        hidden=1024, layers=24, experts=32, top_k=4, expert_width=512, heads=16, kv_heads=4,
        head_dim=64, context=4096, rope_theta=1e6, eps=1e-6, dense_width=2816,
    ),
    "qwen3-30b-a3b": dict(
        hidden=2048, layers=48, experts=128, top_k=8, expert_width=768, heads=32, kv_heads=4,
        head_dim=128, context=40960, rope_theta=1e6, eps=1e-6, dense_width=6144,
    ),
    # deepseek2 architecture: multi-head latent attention without query compression
    # (q_lora_rank 0, as llama.cpp writes V2-Lite), one leading dense layer, shared experts.
    "deepseek-v2-lite": dict(
        arch="deepseek2", hidden=2048, layers=27, experts=64, top_k=6, expert_width=1408, heads=16,
        shared_experts=2, kv_lora=512, qk_nope=128, qk_rope=64, v_head=128, dense_layers=1,
        context=32768, rope_theta=1e4, eps=1e-6, dense_width=10944,
    ),
}

QK_K = 256


def use_more_bits(i, n):
    """llama.cpp's choice of layers that get more bits in a _M mix."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(kind, cols):
    """llama.cpp's fallback for rows that are not whole 256-blocks (tensor_type_fallback)."""
    if cols % QK_K == 0:
        return kind
    return {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}.get(kind, kind)


def f16(x):
    return np.asarray(x, dtype=np.float16).view(np.uint8)


def blocks(kind, n, std, rng):
    """`n` random blocks of `kind` (uint8, [n, bytes per block]) whose weights have RMS
    about `std` and mean about 0."""
    if kind == T.Q4_K:
        # w = d * sc * q - dmin * m, q in 0..15: sub-block scales and mins near 32, so that
        # dmin * m is d * sc * 7.5 (centred) and the RMS is d * sc * 4.61.
        sc = rng.integers(28, 37, size=(n, 8), dtype=np.uint8)
        mn = sc.copy()
        d = std / (32 * 4.61) * np.ones(n)
        dmin = d * 7.5
        packed = np.zeros((n, 12), dtype=np.uint8)
        packed[:, 0:4] = sc[:, 0:4] & 63
        packed[:, 4:8] = mn[:, 0:4] & 63
        packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
        packed[:, 0:4] |= (sc[:, 4:8] >> 4) << 6
        packed[:, 4:8] |= (mn[:, 4:8] >> 4) << 6
        qs = rng.integers(0, 256, size=(n, 128), dtype=np.uint8)
        return np.concatenate([f16(d).reshape(n, 2), f16(dmin).reshape(n, 2), packed, qs], axis=1)
    if kind == T.Q6_K:
        # w = d * sc * (q - 32), q in 0..63: RMS d * sc * 18.47.
        ql = rng.integers(0, 256, size=(n, 128), dtype=np.uint8)
        qh = rng.integers(0, 256, size=(n, 64), dtype=np.uint8)
        sc = rng.integers(28, 37, size=(n, 16), dtype=np.int8).view(np.uint8)
        d = std / (32 * 18.47) * np.ones(n)
        return np.concatenate([ql, qh, sc, f16(d).reshape(n, 2)], axis=1)
    if kind == T.Q5_0:
        # w = d * (q - 16), q in 0..31: RMS d * 9.23.
        d = std / 9.23 * np.ones(n)
        q = rng.integers(0, 256, size=(n, 20), dtype=np.uint8)
        return np.concatenate([f16(d).reshape(n, 2), q], axis=1)
    if kind == T.Q8_0:
        # w = d * q, q in -128..127: RMS d * 73.9.
        d = std / 73.9 * np.ones(n)
        q = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
        return np.concatenate([f16(d).reshape(n, 2), q], axis=1)
    raise ValueError(f"no generator for {kind}")


def quantized(kind, shape, rng):
    """A random matrix (or stack of them) of `shape` (numpy order, rows last) in `kind`,
    as the bytes GGUF stores: [..., rows, bytes per row]."""
    cols = shape[-1]
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    rows = int(np.prod(shape[:-1]))
    n = rows * cols // block_elems
    data = blocks(kind, n, 1.0 / np.sqrt(cols), rng)
    assert data.shape == (n, block_bytes)
    return data.reshape(*shape[:-1], cols // block_elems * block_bytes)


def plan_deepseek2(s, layers):
    """(name, numpy shape, kind) of every tensor of the deepseek2 layout (kv_b split into
    per-head k_b and v_b, as current llama.cpp writes it)."""
    h, nh, e, w = s["hidden"], s["heads"], s["experts"], s["expert_width"]
    lora, nope, rope, v = s["kv_lora"], s["qk_nope"], s["qk_rope"], s["v_head"]
    vocab = s["vocab"]
    out = [("token_embd.weight", (vocab, h), T.Q4_K)]
    for i in range(layers):
        more = use_more_bits(i, layers)
        b = f"blk.{i}"
        out += [
            (f"{b}.attn_norm.weight", (h,), T.F32),
            (f"{b}.attn_q.weight", (nh * (nope + rope), h), T.Q4_K),
            (f"{b}.attn_kv_a_mqa.weight", (lora + rope, h), T.Q4_K),
            (f"{b}.attn_kv_a_norm.weight", (lora,), T.F32),
            (f"{b}.attn_k_b.weight", (nh, lora, nope), T.Q4_K),
            (f"{b}.attn_v_b.weight", (nh, v, lora), T.Q6_K if more else T.Q4_K),
            (f"{b}.attn_output.weight", (h, nh * v), T.Q4_K),
            (f"{b}.ffn_norm.weight", (h,), T.F32),
        ]
        if i < s["dense_layers"]:
            dw = s["dense_width"]
            out += [
                (f"{b}.ffn_gate.weight", (dw, h), T.Q4_K),
                (f"{b}.ffn_up.weight", (dw, h), T.Q4_K),
                (f"{b}.ffn_down.weight", (h, dw), T.Q6_K if more else T.Q4_K),
            ]
            continue
        sw = w * s["shared_experts"]
        out += [
            (f"{b}.ffn_gate_inp.weight", (e, h), T.F32),
            (f"{b}.ffn_gate_exps.weight", (e, w, h), T.Q4_K),
            (f"{b}.ffn_up_exps.weight", (e, w, h), T.Q4_K),
            (f"{b}.ffn_down_exps.weight", (e, h, w), T.Q6_K if more else T.Q4_K),
            (f"{b}.ffn_gate_shexp.weight", (sw, h), T.Q4_K),
            (f"{b}.ffn_up_shexp.weight", (sw, h), T.Q4_K),
            (f"{b}.ffn_down_shexp.weight", (h, sw), T.Q6_K if more else T.Q4_K),
        ]
    out += [("output_norm.weight", (h,), T.F32), ("output.weight", (vocab, h), T.Q6_K)]
    return [(name, shape, fallback(kind, shape[-1]) if kind != T.F32 else kind) for name, shape, kind in out]


def plan(s, layers):
    """(name, numpy shape, kind) of every tensor, in llama.cpp's order and types."""
    if s.get("arch") == "deepseek2":
        return plan_deepseek2(s, layers)
    h, hd, nh, nkv, e, w = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"], s["experts"], s["expert_width"]
    vocab = s["vocab"]
    out = [("token_embd.weight", (vocab, h), T.Q4_K)]
    for i in range(layers):
        more = use_more_bits(i, layers)
        b = f"blk.{i}"
        out += [
            (f"{b}.attn_norm.weight", (h,), T.F32),
            (f"{b}.attn_q.weight", (nh * hd, h), T.Q4_K),
            (f"{b}.attn_k.weight", (nkv * hd, h), T.Q4_K),
            (f"{b}.attn_v.weight", (nkv * hd, h), T.Q6_K if more else T.Q4_K),
            (f"{b}.attn_output.weight", (h, nh * hd), T.Q4_K),
            (f"{b}.attn_q_norm.weight", (hd,), T.F32),
            (f"{b}.attn_k_norm.weight", (hd,), T.F32),
            (f"{b}.ffn_norm.weight", (h,), T.F32),
            (f"{b}.ffn_gate_inp.weight", (e, h), T.F32),
            (f"{b}.ffn_gate_exps.weight", (e, w, h), T.Q4_K),
            (f"{b}.ffn_up_exps.weight", (e, w, h), T.Q4_K),
            (f"{b}.ffn_down_exps.weight", (e, h, w), T.Q6_K if more else T.Q4_K),
        ]
    out += [("output_norm.weight", (h,), T.F32), ("output.weight", (vocab, h), T.Q6_K)]
    return [(name, shape, fallback(kind, shape[-1]) if kind != T.F32 else kind) for name, shape, kind in out]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--layers", type=int, help="fewer layers than the shape's (small versions for tests)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", help="a GGUF whose tokenizer to copy (default: the default model)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    s = dict(SHAPES[args.shape])
    layers = args.layers or s["layers"]
    tok_path = args.tokenizer
    if tok_path is None:
        here = os.path.dirname(os.path.abspath(__file__))
        tok_path = os.popen(f"bash {here}/../scripts/fetch-default-model.sh").read().strip()
    reader = gguf.GGUFReader(tok_path)
    s["vocab"] = len(reader.fields["tokenizer.ggml.tokens"].data)

    arch = s.get("arch", "qwen3moe")
    tmp = args.out + ".partial"
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(f"random {args.shape}" + (f" ({layers} layers)" if args.layers else ""))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(layers)
    writer.add_context_length(s["context"])
    writer.add_embedding_length(s["hidden"])
    writer.add_feed_forward_length(s["dense_width"])
    writer.add_head_count(s["heads"])
    writer.add_rope_freq_base(s["rope_theta"])
    writer.add_layer_norm_rms_eps(s["eps"])
    writer.add_expert_count(s["experts"])
    writer.add_expert_used_count(s["top_k"])
    writer.add_expert_feed_forward_length(s["expert_width"])
    if arch == "deepseek2":
        # llama.cpp's MLA keys: the cache holds one head of latent + rope dims; the
        # `_mla` lengths are the model's own per-head query/key and value widths.
        lora, rope = s["kv_lora"], s["qk_rope"]
        writer.add_head_count_kv(1)
        writer.add_key_length(lora + rope)
        writer.add_value_length(lora)
        writer.add_uint32(f"{arch}.attention.key_length_mla", s["qk_nope"] + rope)
        writer.add_uint32(f"{arch}.attention.value_length_mla", s["v_head"])
        writer.add_uint32(f"{arch}.attention.kv_lora_rank", lora)
        writer.add_uint32(f"{arch}.attention.q_lora_rank", 0)
        writer.add_rope_dimension_count(rope)
        writer.add_uint32(f"{arch}.leading_dense_block_count", s["dense_layers"])
        writer.add_uint32(f"{arch}.expert_shared_count", s["shared_experts"])
        writer.add_float32(f"{arch}.expert_weights_scale", 1.0)
        writer.add_uint32(f"{arch}.expert_gating_func", 1)  # softmax
        writer.add_string(f"{arch}.rope.scaling.type", "yarn")
        writer.add_float32(f"{arch}.rope.scaling.factor", 40.0)
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length", 4096)
        writer.add_float32(f"{arch}.rope.scaling.yarn_log_multiplier", 0.0707)
    else:
        writer.add_head_count_kv(s["kv_heads"])
        writer.add_key_length(s["head_dim"])
        writer.add_value_length(s["head_dim"])
    # The tokenizer's keys as they are in its file.
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_array(name, value)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(name, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], vtype)

    tensors = plan(s, layers)
    for name, shape, kind in tensors:
        if kind == T.F32:
            nbytes, raw_shape = 4 * int(np.prod(shape)), shape
        else:
            block_elems, block_bytes = gguf.GGML_QUANT_SIZES[kind]
            nbytes = int(np.prod(shape)) // block_elems * block_bytes
            raw_shape = (*shape[:-1], shape[-1] // block_elems * block_bytes)
        writer.add_tensor_info(name, raw_shape, np.dtype(np.float32 if kind == T.F32 else np.uint8), nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = 0
    rng = np.random.default_rng(args.seed)
    for i, (name, shape, kind) in enumerate(tensors):
        if kind == T.F32:
            if name.endswith("ffn_gate_inp.weight"):
                data = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
            else:
                data = np.ones(shape, dtype=np.float32)
        else:
            data = quantized(kind, shape, rng)
        writer.write_tensor_data(data)
        total += data.nbytes
        if i % 12 == 0:
            print(f"\r{i + 1}/{len(tensors)} tensors, {total / 2**30:.1f} GiB", end="", file=sys.stderr, flush=True)
    writer.close()
    os.replace(tmp, args.out)
    print(f"\r{len(tensors)} tensors, {total / 2**30:.2f} GiB: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
