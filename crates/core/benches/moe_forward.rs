//! Forward-pass throughput of a medium random Mixture-of-Experts model (Qwen3-MoE shape:
//! hidden 1024, 16 layers, 32 experts top-4, expert width 512), built in memory.
//!
//!     cargo bench -p moeserve-core --bench moe_forward -- [--prompt-len 64] [--decode-steps 16] [--batches 1,8,32]
//!
//! Prints prefill and decode tokens/s at each batch size: prefill runs `batch` prompts
//! of `prompt-len` tokens in one forward call, decode then runs `decode-steps` steps of
//! one token per sequence.

use std::time::Instant;

use moeserve_core::bench::forward_throughput;
use moeserve_core::config::{HfConfig, ModelConfig};
use moeserve_core::models::build_model;
use moeserve_core::weights::WeightStore;
use moeserve_core::{DType, Device};

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> moeserve_core::Result<()> {
    let prompt_len: usize = arg("--prompt-len", 64);
    let steps: usize = arg("--decode-steps", 16);
    let batches: Vec<usize> = arg("--batches", "1,8,32".to_string())
        .split(',')
        .map(|b| b.parse().expect("--batches takes a comma-separated list"))
        .collect();
    let hf: HfConfig = serde_json::from_value(serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 4,
        "head_dim": 64, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 512,
        "norm_topk_prob": true, "decoder_sparse_step": 1
    }))
    .unwrap();
    let cfg = ModelConfig::from_hf(&hf)?;
    let t0 = Instant::now();
    let store = WeightStore::random(0.02, DType::F32, &Device::Cpu);
    let model = build_model(&cfg, &store)?;
    eprintln!(
        "built random Qwen3-MoE (hidden 1024, 16 layers, 32 experts top-4, width 512) in {:.1}s; {} rayon threads",
        t0.elapsed().as_secs_f64(),
        rayon::current_num_threads()
    );
    println!("| batch | prefill tok/s ({prompt_len}-token prompts) | decode tok/s ({steps} steps) |");
    println!("|---:|---:|---:|");
    for &b in &batches {
        let r = forward_throughput(model.as_ref(), b, prompt_len, steps)?;
        println!("| {b} | {:.1} | {:.1} |", r.prefill_tok_s, r.decode_tok_s);
    }
    Ok(())
}
