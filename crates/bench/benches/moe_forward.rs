//! Forward-pass throughput of a medium random Mixture-of-Experts model (Qwen3-MoE shape:
//! hidden 1024, 16 layers, 32 experts top-4, expert width 512), built in memory.
//!
//!     cargo bench -p moeserve-bench --bench moe_forward -- [--prompt-len 64] [--decode-steps 16] [--batches 1,8,32]
//!
//! Prints prefill and decode tokens/s at each batch size: prefill runs `batch` prompts
//! of `prompt-len` tokens in one forward call, decode then runs `decode-steps` steps of
//! one token per sequence.

use std::time::Instant;

use moeserve_bench::measure::{arg, forward_throughput, medium_moe_config, random_model};

fn main() -> moeserve_core::Result<()> {
    let prompt_len: usize = arg("--prompt-len", 64);
    let steps: usize = arg("--decode-steps", 16);
    let batches: Vec<usize> = arg("--batches", "1,8,32".to_string())
        .split(',')
        .map(|b| b.parse().expect("--batches takes a comma-separated list"))
        .collect();
    let cfg = medium_moe_config();
    let t0 = Instant::now();
    let model = random_model(&cfg)?;
    eprintln!(
        "built random Qwen3-MoE (hidden 1024, 16 layers, 32 experts top-4, width 512) in {:.1}s; {} rayon threads",
        t0.elapsed().as_secs_f64(),
        rayon::current_num_threads()
    );
    println!("| batch | prefill tok/s ({prompt_len}-token prompts) | decode tok/s ({steps} steps) |");
    println!("|---:|---:|---:|");
    for &b in &batches {
        let r = forward_throughput(model.as_ref(), b, prompt_len, steps, 1)?;
        println!("| {b} | {:.1} | {:.1} |", r.prefill_tok_s, r.decode_tok_s);
    }
    Ok(())
}
