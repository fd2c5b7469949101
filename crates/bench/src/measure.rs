//! In-process measurements: forward-pass throughput (like `llama-bench -p N -n M`),
//! engine throughput at a sampling setting, a thread round trip, and the medium random
//! models they run on.

use std::time::Instant;

use moeserve_core::{
    BlockPool, BlockTable, CausalLm, ForwardBatch, KvStorage, LogitRows, Result, SequenceInput,
};

#[derive(Debug, Clone, Copy)]
pub struct ForwardThroughput {
    pub batch: usize,
    /// Tokens per second prefilling `batch` prompts in one forward call: the mean over
    /// the repetitions, and their standard deviation.
    pub prefill_tok_s: f64,
    pub prefill_sd: f64,
    /// Tokens per second over the decode steps (`batch` tokens per step): mean and
    /// standard deviation over the repetitions.
    pub decode_tok_s: f64,
    pub decode_sd: f64,
}

/// Mean and sample standard deviation.
fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// The round trip of one cache line between two threads, in nanoseconds: one thread
/// writes a counter and waits for the other to answer, `rounds` times; the median of five
/// such runs. `None` with fewer than two CPUs.
///
/// On a shared host the two threads' CPUs may sit on one core complex or far apart (on
/// another chiplet or socket), and the host can move them from one minute to the next.
/// Far apart, the pair can draw on two memory paths (more bandwidth) but every hand-off
/// between threads (each parallel section of a forward pass) costs several times more;
/// this tells which placement a benchmark met.
pub fn thread_round_trip_ns(rounds: u64) -> Option<f64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 || rounds == 0 {
        return None;
    }
    // Spins until `flag` reads `value`; yields now and then, so that it still finishes
    // if the OS puts both threads on one CPU.
    let wait_for = |flag: &AtomicU64, value: u64| {
        let mut spins = 0u32;
        while flag.load(Ordering::Acquire) != value {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    };
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let flag = AtomicU64::new(0);
            std::thread::scope(|s| {
                s.spawn(|| {
                    for i in 0..=rounds {
                        wait_for(&flag, 2 * i + 1);
                        flag.store(2 * i + 2, Ordering::Release);
                    }
                });
                // Round 0 is untimed: the other thread starting up.
                let mut start = Instant::now();
                for i in 0..=rounds {
                    flag.store(2 * i + 1, Ordering::Release);
                    wait_for(&flag, 2 * i + 2);
                    if i == 0 {
                        start = Instant::now();
                    }
                }
                start.elapsed().as_nanos() as f64 / rounds as f64
            })
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    Some(runs[2])
}

/// The value after flag `name` on the command line of a `cargo bench` target, or
/// `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A cache of 16-token blocks just large enough for `batch` sequences of `per_seq`
/// tokens, and their block tables.
fn cache_for(model: &dyn CausalLm, batch: usize, per_seq: usize) -> Result<(KvStorage, Vec<BlockTable>)> {
    let block_size = 16;
    let blocks = batch * BlockTable::blocks_for(per_seq, block_size);
    let kv = KvStorage::for_model(model, block_size, blocks)?;
    let mut alloc = BlockPool::new(blocks);
    let mut tables = Vec::with_capacity(batch);
    for _ in 0..batch {
        let mut t = BlockTable::new();
        t.reserve(&mut alloc, per_seq, block_size)?;
        tables.push(t);
    }
    Ok((kv, tables))
}

/// Like `llama-bench -p prompt_len -n decode_steps -r repetitions` with `batch`
/// sequences: after a warm-up pass, prefills `batch` prompts of `prompt_len` tokens in
/// one forward call, then, from an empty context again (as llama-bench's generation
/// test), runs `decode_steps` steps of one token per sequence; `repetitions` times, and
/// reports both rates' mean and spread (as llama-bench's `avg_ts` and `stddev_ts`).
/// Token ids are arbitrary but fixed (spread over the vocabulary).
pub fn forward_throughput(
    model: &dyn CausalLm,
    batch: usize,
    prompt_len: usize,
    decode_steps: usize,
    repetitions: usize,
) -> Result<ForwardThroughput> {
    let vocab = model.config().vocab_size;
    let (mut kv, tables) = cache_for(model, batch, prompt_len.max(decode_steps))?;
    let token = |s: usize, i: usize| ((s * 7919 + i * 104_729 + 13) % vocab) as u32;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|s| (0..prompt_len).map(|i| token(s, i)).collect())
        .collect();
    let step = |len: usize, start_pos: usize, kv: &mut KvStorage| {
        let seqs = (0..batch)
            .map(|s| SequenceInput {
                tokens: &prompts[s][..len],
                start_pos,
                block_table: tables[s].blocks(),
                logits: LogitRows::Last,
            })
            .collect();
        model.forward(&ForwardBatch::new(seqs), kv).map(drop)
    };
    // Warm-up: first-touch page faults and lazily built state stay out of the figures.
    step(prompt_len.min(16), 0, &mut kv)?;
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..repetitions.max(1) {
        let t = Instant::now();
        step(prompt_len, 0, &mut kv)?;
        prefill.push((batch * prompt_len) as f64 / t.elapsed().as_secs_f64());
        // Decode positions 0.. again: each step overwrites what the prompt left in the
        // cache.
        let t = Instant::now();
        for pos in 0..decode_steps {
            let seqs = (0..batch)
                .map(|s| SequenceInput {
                    tokens: std::slice::from_ref(&prompts[s][pos % prompt_len.max(1)]),
                    start_pos: pos,
                    block_table: tables[s].blocks(),
                    logits: LogitRows::Last,
                })
                .collect();
            model.forward(&ForwardBatch::new(seqs), &mut kv)?;
        }
        decode.push((batch * decode_steps) as f64 / t.elapsed().as_secs_f64());
    }
    let ((prefill_tok_s, prefill_sd), (decode_tok_s, decode_sd)) = (mean_sd(&prefill), mean_sd(&decode));
    Ok(ForwardThroughput {
        batch,
        prefill_tok_s,
        prefill_sd,
        decode_tok_s,
        decode_sd,
    })
}

/// What drafting with a model's MTP module adds to a decode step: `steps` decode steps of
/// one token per sequence for `batch` sequences at context `context`, plain, then with the
/// hidden states returned and the MTP module run on the same positions (what an engine
/// step with `--speculative-method mtp` does besides checking the draft). Returns the
/// mean milliseconds of each kind of step.
pub fn mtp_step_cost(model: &dyn CausalLm, batch: usize, context: usize, steps: usize) -> Result<(f64, f64)> {
    let vocab = model.config().vocab_size;
    let (mut kv, tables) = cache_for(model, batch, context + steps)?;
    let tokens: Vec<u32> = (0..batch).map(|s| ((s * 7919 + 13) % vocab) as u32).collect();
    let inputs = |pos: usize| -> Vec<SequenceInput> {
        (0..batch)
            .map(|s| SequenceInput {
                tokens: std::slice::from_ref(&tokens[s]),
                start_pos: pos,
                block_table: tables[s].blocks(),
                logits: LogitRows::Last,
            })
            .collect()
    };
    // The attention reads `context` positions of (arbitrary) cache either way.
    let time = |with_mtp: bool, kv: &mut KvStorage| -> Result<f64> {
        let t = Instant::now();
        for pos in context..context + steps {
            let out = model.forward(&ForwardBatch::new(inputs(pos)).with_hidden(with_mtp), kv)?;
            if let Some(hidden) = &out.hidden {
                model.forward_mtp(&ForwardBatch::new(inputs(pos)), hidden, kv)?;
            }
        }
        Ok(t.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64)
    };
    time(true, &mut kv)?; // warm-up
    let plain = time(false, &mut kv)?;
    let with_mtp = time(true, &mut kv)?;
    Ok((plain, with_mtp))
}

/// The medium random Mixture-of-Experts model of the benchmarks: Qwen3-MoE shaped,
/// hidden 1024, 16 layers, 32 experts top-4, expert width 512 (0.9 B parameters).
pub fn medium_moe_config() -> moeserve_core::config::ModelConfig {
    let hf: moeserve_core::config::HfConfig = serde_json::from_value(serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 4,
        "head_dim": 64, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 512,
        "norm_topk_prob": true, "decoder_sparse_step": 1
    }))
    .expect("valid config");
    moeserve_core::config::ModelConfig::from_hf(&hf).expect("valid config")
}

/// The medium random DeepSeek-V3-shaped model of the benchmarks: hidden 1024, 16 layers
/// (the first dense), 64 routed experts top-6 in 8 groups, 1 shared expert, latent
/// attention with kv_lora_rank 512 and rope dim 64; one MTP layer, as DeepSeek-V3 has.
pub fn medium_deepseek_config() -> moeserve_core::config::ModelConfig {
    let hf: moeserve_core::config::HfConfig = serde_json::from_value(serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "q_lora_rank": 384, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
        "v_head_dim": 128, "n_routed_experts": 64, "num_experts_per_tok": 6, "n_shared_experts": 1,
        "moe_intermediate_size": 256, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5, "norm_topk_prob": true, "num_nextn_predict_layers": 1
    }))
    .expect("valid config");
    moeserve_core::config::ModelConfig::from_hf(&hf).expect("valid config")
}

/// By name, for the bench commands: `random-moe`, `random-deepseek`, or
/// `random:<config.json>` (any checkpoint's shape, its weights random: how a model too
/// large to carry is measured where only its config is).
pub fn random_config(name: &str) -> Option<Result<moeserve_core::config::ModelConfig>> {
    match name {
        "random-moe" => Some(Ok(medium_moe_config())),
        "random-deepseek" => Some(Ok(medium_deepseek_config())),
        _ => name
            .strip_prefix("random:")
            .map(|path| moeserve_core::config::ModelConfig::from_file(std::path::Path::new(path))),
    }
}

/// A model of `cfg`'s shape with random weights (N(0, 0.02)), built in memory in f32 on
/// the CPU.
pub fn random_model(cfg: &moeserve_core::config::ModelConfig) -> Result<Box<dyn CausalLm>> {
    random_model_on(cfg, candle_core::DType::F32, &candle_core::Device::Cpu)
}

/// A model of `cfg`'s shape with random weights in `dtype` on `device`, for the device's
/// default backend (on the CPU, the kernel set `MOESERVE_CPU` names or the best).
pub fn random_model_on(
    cfg: &moeserve_core::config::ModelConfig,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Box<dyn CausalLm>> {
    let store = moeserve_core::weights::WeightStore::random(0.02, dtype, device)
        .with_backend(moeserve_core::backend::Backend::for_device(device)?);
    moeserve_core::models::build_model(cfg, &store)
}

/// The sampling settings the benchmarks run at: what users send, not greedy alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplingSetting {
    /// `temperature: 0`.
    Greedy,
    /// OpenAI's defaults, which every client that sends no sampling fields gets:
    /// temperature 1, top_p 1.
    Default,
    /// A typical chat setting: temperature 0.7, top_p 0.9.
    Chat,
}

impl SamplingSetting {
    pub const ALL: [SamplingSetting; 3] = [Self::Greedy, Self::Default, Self::Chat];

    pub fn name(self) -> &'static str {
        match self {
            Self::Greedy => "greedy",
            Self::Default => "default",
            Self::Chat => "chat",
        }
    }

    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| format!("unknown sampling setting {name:?} (greedy, default or chat)"))
    }

    /// `(temperature, top_p)`, sent explicitly: other servers' own defaults differ
    /// (llama-server's are top_k 40, min_p 0.05, temperature 0.8).
    pub fn temperature_top_p(self) -> (f32, f32) {
        match self {
            Self::Greedy => (0.0, 1.0),
            Self::Default => (1.0, 1.0),
            Self::Chat => (0.7, 0.9),
        }
    }

    /// The OpenAI request fields, to merge into a request body. llama-server's own
    /// filters (top_k 40, min_p 0.05) are switched off so that both servers sample
    /// the same distribution.
    pub fn request_fields(self) -> serde_json::Value {
        let (temperature, top_p) = self.temperature_top_p();
        serde_json::json!({"temperature": temperature, "top_p": top_p, "top_k": -1, "min_p": 0.0})
    }
}

/// What one concurrency level of the engine benchmark measured.
#[derive(Debug, Clone, Copy)]
pub struct EngineThroughput {
    pub concurrency: usize,
    /// Generated tokens per second over the level's wall time, all requests together.
    pub output_tok_s: f64,
    pub mean_ttft_s: f64,
    pub max_ttft_s: f64,
    pub wall_s: f64,
    /// Share of the engine thread's time spent detokenizing and checking stops,
    /// relative to the forward calls.
    pub detokenize_share: f64,
    /// Engine steps, and the mean time per step in forward calls and in sampling.
    pub steps: u64,
    pub forward_ms_per_step: f64,
    pub sample_ms_per_step: f64,
}

/// Submits `concurrency` requests at once (prompts of `prompt_len` tokens, `max_tokens`
/// tokens each at `sampling`, ignoring EOS; seeded, so runs repeat) and measures
/// throughput, time to first token and where the engine's time goes.
pub fn engine_throughput(
    engine: &moeserve_core::engine::Engine,
    concurrency: usize,
    prompt_len: usize,
    max_tokens: usize,
    sampling: SamplingSetting,
    salt: usize,
) -> Result<EngineThroughput> {
    use moeserve_core::engine::{EngineEvent, GenerateRequest};
    use moeserve_core::sampling::SamplingParams;
    use std::sync::atomic::Ordering;
    let vocab = engine.limits().vocab_size;
    let stats = engine.stats();
    let counters = || {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        (
            load(&stats.forward_ns),
            load(&stats.detokenize_ns),
            load(&stats.sample_ns),
            load(&stats.steps),
        )
    };
    let (fwd0, detok0, sample0, steps0) = counters();
    let start = Instant::now();
    let (temperature, top_p) = sampling.temperature_top_p();
    let handles = (0..concurrency)
        .map(|c| {
            let prompt = (0..prompt_len)
                .map(|i| ((salt * 7919 + c * 104_729 + i * 31 + 5) % vocab) as u32)
                .collect();
            let params = SamplingParams {
                ignore_eos: true,
                temperature,
                top_p,
                seed: Some((salt * 1000 + c) as u64),
                ..SamplingParams::greedy(max_tokens)
            };
            engine
                .submit(GenerateRequest { prompt, params })
                .map_err(|e| moeserve_core::Error::InvalidBatch(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let results: Vec<(f64, usize)> = std::thread::scope(|s| {
        let joins: Vec<_> = handles
            .into_iter()
            .map(|mut h| {
                s.spawn(move || {
                    let (mut ttft, mut tokens) = (None, 0);
                    while let Some(ev) = h.blocking_next() {
                        match ev {
                            EngineEvent::Delta { token_ids, .. } => {
                                ttft.get_or_insert_with(|| start.elapsed().as_secs_f64());
                                tokens += token_ids.len();
                            }
                            EngineEvent::Done(_) | EngineEvent::Error(_) => break,
                            _ => {}
                        }
                    }
                    (ttft.unwrap_or(f64::NAN), tokens)
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("bench thread"))
            .collect()
    });
    let wall_s = start.elapsed().as_secs_f64();
    let tokens: usize = results.iter().map(|r| r.1).sum();
    let (fwd1, detok1, sample1, steps1) = counters();
    let (fwd, detok, sample, steps) = (fwd1 - fwd0, detok1 - detok0, sample1 - sample0, steps1 - steps0);
    let per_step_ms = |ns: u64| ns as f64 / 1e6 / steps.max(1) as f64;
    Ok(EngineThroughput {
        concurrency,
        output_tok_s: tokens as f64 / wall_s,
        mean_ttft_s: results.iter().map(|r| r.0).sum::<f64>() / concurrency as f64,
        max_ttft_s: results.iter().map(|r| r.0).fold(0.0, f64::max),
        wall_s,
        detokenize_share: detok as f64 / fwd.max(1) as f64,
        steps,
        forward_ms_per_step: per_step_ms(fwd),
        sample_ms_per_step: per_step_ms(sample),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two threads answer each other to the end (the call returns) with a positive,
    /// finite time per round trip; no rounds give no figure.
    #[test]
    fn thread_round_trip_completes() {
        let Some(ns) = thread_round_trip_ns(2000) else {
            return;
        };
        assert!(ns.is_finite() && ns > 0.0, "{ns}");
        assert_eq!(thread_round_trip_ns(0), None);
    }

    /// The spread is the sample standard deviation (as llama-bench's `stddev_ts`), and
    /// one measurement has none.
    #[test]
    fn mean_and_sample_deviation() {
        assert_eq!(mean_sd(&[300.0]), (300.0, 0.0));
        let (m, sd) = mean_sd(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m, 5.0);
        assert!((sd - (32.0f64 / 7.0).sqrt()).abs() < 1e-12, "{sd}");
    }
}
