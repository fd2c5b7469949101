//! Time to choose one token per sampling setting, on one thread, over logits shaped like a
//! language model's (a few likely tokens over a long tail) of the default model's
//! vocabulary size.
//!
//!     cargo bench -p moeserve-bench --bench sampling -- [--vocab 49152] [--draws 2000] [--only top_k]

use std::time::Instant;

use moeserve_bench::measure::arg;
use moeserve_core::sampling::{Sampler, SamplingParams};

fn main() {
    let (vocab, draws) = (arg("--vocab", 49152), arg("--draws", 2000));
    let only: String = arg("--only", String::new());
    // A fixed pseudo-random tail (sums of three uniforms) with a few tokens far above it.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let logits: Vec<f32> = (0..vocab)
        .map(|_| {
            if uniform() > 0.9995 {
                10.0 + 6.0 * uniform()
            } else {
                4.0 * (uniform() + uniform() + uniform()) - 6.0
            }
        })
        .collect();
    let prompt: Vec<u32> = (0..512).map(|i| (i * 7919 % vocab) as u32).collect();
    let output: Vec<u32> = (0..128).map(|i| (i * 104_729 % vocab) as u32).collect();
    let setting = |f: fn(&mut SamplingParams)| {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    };
    let settings: [(&str, SamplingParams); 9] = [
        ("greedy", setting(|p| p.temperature = 0.0)),
        ("default (temperature 1, top_p 1)", setting(|_| {})),
        (
            "chat (temperature 0.7, top_p 0.9)",
            setting(|p| {
                p.temperature = 0.7;
                p.top_p = 0.9;
            }),
        ),
        ("top_k 40", setting(|p| p.top_k = 40)),
        ("min_p 0.05", setting(|p| p.min_p = 0.05)),
        (
            "llama.cpp's (top_k 40, top_p 0.95, min_p 0.05, temperature 0.8)",
            setting(|p| {
                p.temperature = 0.8;
                p.top_k = 40;
                p.top_p = 0.95;
                p.min_p = 0.05;
            }),
        ),
        ("default + logprobs 5", setting(|p| p.logprobs = Some(5))),
        (
            "default + presence, frequency, repetition penalties",
            setting(|p| {
                p.presence_penalty = 0.5;
                p.frequency_penalty = 0.5;
                p.repetition_penalty = 1.1;
            }),
        ),
        (
            "temperature 2 (a flat nucleus), top_p 0.95",
            setting(|p| {
                p.temperature = 2.0;
                p.top_p = 0.95;
            }),
        ),
    ];
    println!("vocabulary {vocab}, prompt 512 and output 128 tokens, best of 3 runs of {draws} draws");
    println!("| setting | us per token |\n|---|---:|");
    for (name, params) in settings.into_iter().filter(|(name, _)| name.contains(&only)) {
        let mut sampler = Sampler::from_params(&params, 1);
        let mut best = f64::MAX;
        for _ in 0..3 {
            let start = Instant::now();
            for _ in 0..draws {
                std::hint::black_box(sampler.sample(&logits, &prompt, &output, &Default::default()));
            }
            best = best.min(start.elapsed().as_secs_f64() / draws as f64);
        }
        println!("| {name} | {:.1} |", best * 1e6);
    }
}
