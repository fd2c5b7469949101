#!/usr/bin/env python3
"""Writes a random "medium" Qwen3-MoE checkpoint (Hugging Face format) for benchmarking.

    python bench/make-medium-moe.py OUT_DIR [--seed 0]

Writes OUT_DIR/config.json, OUT_DIR/model.safetensors (bf16, ~1.4 B parameters, ~2.7 GB)
and the tokenizer files. bench/medium-moe.sh turns it into Q8_0 and Q4_K_M GGUFs.
bench/medium-moe-config.json is its config.json (bench/gpu-check.sh runs that shape
with random weights on a GPU machine).

Why random: no MoE of this size can be fetched here, and speed does not depend on the
values. The shape is the one the benchmarking issue asks for: 24 layers, hidden 1024,
16 query / 4 KV heads of 64, 32 experts of 512 with 4 routed per token, every layer MoE.

Why the SmolLM2 tokenizer: llama.cpp's convert_hf_to_gguf.py hashes how the tokenizer
splits a test string and refuses BPE pre-tokenizers it does not know, so a made-up
tokenizer will not convert. We take the vocabulary and merges of the SmolLM2 GGUF that
the project already uses (scripts/fetch-default-model.sh), loaded by transformers.
Transformers' GGUF loader only approximates the pipeline (no digit split, adds BOS,
eos = <|im_start|>), so it is restored to SmolLM's own (Digits + ByteLevel, no BOS,
eos <|im_end|>); the script checks the converter's hash recognizes it as "smollm".
"""

import argparse
import json
import subprocess
from hashlib import sha256
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

ROOT = Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# convert_hf_to_gguf.py's test string and the hash it maps to "smollm"
# (bench/llama.cpp/src/conversion/base.py, get_vocab_base_pre).
CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
SMOLLM_HASH = "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"


def smollm_tokenizer() -> PreTrainedTokenizerFast:
    models = ROOT / "models"
    if not (models / GGUF).exists():
        subprocess.run([str(ROOT / "scripts/fetch-default-model.sh")], check=True, stdout=subprocess.DEVNULL)
    loaded = AutoTokenizer.from_pretrained(str(models), gguf_file=GGUF)
    spec = json.loads(loaded.backend_tokenizer.to_str())
    # SmolLM2's tokenizer.json pipeline, around the vocabulary and merges from the GGUF.
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    spec["model"]["byte_fallback"] = False
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", chat_template=loaded.chat_template)
    got = sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()
    assert got == SMOLLM_HASH, f"tokenizer hash {got} is not llama.cpp's smollm one"
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tok = smollm_tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=len(tok),  # 49152
        hidden_size=1024, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
        intermediate_size=2816, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        rms_norm_eps=1e-6, max_position_embeddings=4096, rope_theta=1000000.0,
        tie_word_embeddings=False, dtype="bfloat16",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        architectures=["Qwen3MoeForCausalLM"])

    # Built on the meta device, then allocated in bf16 and filled once: skips transformers'
    # own fp32 init of ~1.4 B parameters (twice the memory, and minutes on few cores).
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():  # fixed order, so the seed fixes the weights
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:  # drawn in fp32 then rounded: bf16's own normal_ truncates (std 0.0199)
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(mean=0.0, std=0.02))
    # The rotary inv_freq buffer is not saved, but to_empty left it garbage: recompute it.
    model.model.rotary_emb = Qwen3MoeRotaryEmbedding(config)
    n = sum(p.numel() for p in model.parameters())

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, max_shard_size="20GB")  # one model.safetensors
    tok.save_pretrained(args.out)
    print(f"{args.out}: {n / 1e9:.2f} B parameters, vocab {len(tok)}")


if __name__ == "__main__":
    main()
