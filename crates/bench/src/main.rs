//! `moeserve-bench`: throughput measurements of moeserve (and of any OpenAI-compatible
//! server), kept out of the server binary.

use std::process::ExitCode;

use clap::Parser;
use moeserve_bench::{loadgen, measure, reference, soak, speculative};
use moeserve_core::{DType, LoadOptions};

#[derive(Parser)]
#[command(name = "moeserve-bench", version, about = "Benchmarks of moeserve")]
enum Command {
    /// In-process forward throughput, like `llama-bench -p 512 -n 128`: prefill tok/s
    /// for `batch` prompts in one call, then decode tok/s, per batch size.
    Kernel(KernelBenchArgs),
    /// In-process engine throughput: N concurrent requests at once, aggregate output
    /// tok/s and time to first token, per concurrency level and sampling setting.
    Engine(EngineBenchArgs),
    /// Drives a running OpenAI-compatible server (ours or another) with concurrent
    /// streams and reports TTFT, TPOT, ITL, E2E, throughput and goodput per level.
    Serve(loadgen::ServeBenchArgs),
    /// Drives a moeserve server started with a speculative method: batch-1 decode rate of
    /// echo-heavy and free-text prompts and output tok/s of concurrent streams, each with
    /// speculation off and on, with the acceptance the server counted.
    Speculative(speculative::SpeculativeBenchArgs),
    /// Memory read bandwidth, and the batch-1 decode bound it sets for a model file.
    Memory(MemoryBenchArgs),
    /// C clients for S seconds of mixed traffic with hang-ups and bad requests; then the
    /// server must be idle, answer, and not have grown. Fails on any unexpected answer.
    Soak(soak::SoakArgs),
    /// The fixture models against transformers' logits and greedy tokens on a device
    /// (how a GPU machine without a Rust toolchain checks the GPU backend).
    Reference(reference::ReferenceArgs),
}

#[derive(clap::Args)]
struct MemoryBenchArgs {
    /// A GGUF model: the bound counts the bytes one token reads (routed experts only, no
    /// embedding table when the output matrix is separate); other files count whole.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
}

#[derive(clap::Args)]
struct EngineBenchArgs {
    /// A .gguf file, checkpoint directory or Hugging Face repo id; `random-moe` builds
    /// the medium random MoE (hidden 1024, 16 layers, 32 experts top-4) in memory,
    /// `random:<config.json>` any checkpoint's shape with random weights.
    #[arg(long, env = "MOESERVE_MODEL")]
    model: String,
    /// Where the model runs: cpu, or cuda[:N] (a build with --features cuda).
    #[arg(long, default_value = "cpu", env = "MOESERVE_DEVICE")]
    device: String,
    /// Compute dtype (default: f32 on CPU, bf16 on a GPU).
    #[arg(long, value_parser = moeserve_core::parse_compute_dtype)]
    dtype: Option<DType>,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// KV cache budget (bytes, or 512MiB, 2GiB).
    #[arg(long, default_value = "1GiB")]
    kv_cache_memory: String,
    /// Step token budget.
    #[arg(long, default_value_t = 512)]
    max_num_batched_tokens: usize,
    /// Sampling settings, each run at every level: greedy, default (OpenAI's:
    /// temperature 1, top_p 1) and chat (temperature 0.7, top_p 0.9).
    #[arg(long, value_delimiter = ',', default_value = "greedy,default,chat", value_parser = measure::SamplingSetting::parse)]
    sampling: Vec<measure::SamplingSetting>,
}

#[derive(clap::Args)]
struct KernelBenchArgs {
    /// A .gguf file, checkpoint directory or Hugging Face repo id.
    #[arg(long, env = "MOESERVE_MODEL")]
    model: String,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 512, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    prompt_len: usize,
    /// Decode steps per sequence, from an empty context (as llama-bench's generation test).
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    batches: Vec<usize>,
    /// Measurements per batch size, averaged (as llama-bench's `-r`, 5 by default).
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    repetitions: usize,
    /// Compute dtype (default: f32 on CPU, bf16 on a GPU).
    #[arg(long, value_parser = moeserve_core::parse_compute_dtype)]
    dtype: Option<DType>,
    /// Where the model runs: cpu, or cuda[:N] (a build with --features cuda).
    #[arg(long, default_value = "cpu", env = "MOESERVE_DEVICE")]
    device: String,
    /// KV cache element type: auto (f16 for quantized GGUF models, else f32), f32 or f16.
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
}

fn main() -> ExitCode {
    // As the server does: huge pages for the heap, no spinning threads in candle's pool.
    moeserve_core::process::prepare();
    let result = match Command::parse() {
        Command::Kernel(args) => {
            init_logging();
            run_kernel_bench(args)
        }
        Command::Engine(args) => {
            init_logging();
            run_engine_bench(args)
        }
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(loadgen::run(args))),
        Command::Speculative(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(speculative::run(args))),
        Command::Memory(args) => run_memory_bench(args),
        Command::Reference(args) => {
            init_logging();
            reference::run(args)
        }
        Command::Soak(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(soak::run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run_kernel_bench(args: KernelBenchArgs) -> anyhow::Result<()> {
    let device = moeserve_core::device_from_setting(&args.device).map_err(anyhow::Error::msg)?;
    let kv_cache_dtype =
        moeserve_core::parse_kv_dtype_setting(&args.kv_cache_dtype).map_err(anyhow::Error::msg)?;
    let opts = LoadOptions {
        device: device.clone(),
        dtype: args.dtype,
        kv_cache_dtype,
        ..LoadOptions::default()
    };
    let (model, name, dtype) = match measure::random_config(&args.model) {
        Some(cfg) => {
            let (model, dtype) = random_on(cfg?, &device, args.dtype, kv_cache_dtype)?;
            (model, args.model.clone(), dtype)
        }
        None => {
            let l = moeserve_core::load(&args.model, &opts)?;
            (l.model, l.name, l.dtype)
        }
    };
    let layout = model.kv_layout();
    println!(
        "model {name} ({dtype:?}), kernels {}, {} threads, prompt {} tokens, decode {} tokens, mean of {} repetitions; {:?} KV cache {} bytes/token, {} tokens per GiB",
        model.backend().describe(),
        rayon_threads(),
        args.prompt_len,
        args.decode_tokens,
        args.repetitions,
        layout.dtype,
        layout.bytes_per_token(),
        (1usize << 30) / layout.bytes_per_token()
    );
    println!("| batch | prefill tok/s | decode tok/s | prefill sd | decode sd |");
    println!("|---:|---:|---:|---:|---:|");
    for &b in &args.batches {
        let r = measure::forward_throughput(
            model.as_ref(),
            b,
            args.prompt_len,
            args.decode_tokens,
            args.repetitions,
        )?;
        println!(
            "| {b} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.prefill_tok_s, r.decode_tok_s, r.prefill_sd, r.decode_sd
        );
    }
    if model.has_mtp() {
        println!(
            "\nMTP module (speculative_method mtp): decode step at context {}",
            args.prompt_len
        );
        println!("| batch | plain step ms | step + MTP ms | ratio |");
        println!("|---:|---:|---:|---:|");
        for &b in &args.batches {
            let (plain, mtp) =
                measure::mtp_step_cost(model.as_ref(), b, args.prompt_len, args.decode_tokens)?;
            println!("| {b} | {plain:.2} | {mtp:.2} | {:.3} |", mtp / plain);
        }
    }
    Ok(())
}

/// A random model of `cfg`'s shape on `device`, in `dtype` or the device's default, with
/// the KV cache dtype asked for or the device's default (as loading a checkpoint does).
fn random_on(
    mut cfg: moeserve_core::config::ModelConfig,
    device: &moeserve_core::Device,
    dtype: Option<DType>,
    kv_cache_dtype: Option<moeserve_core::KvDtype>,
) -> anyhow::Result<(Box<dyn moeserve_core::CausalLm>, DType)> {
    let dtype = dtype.unwrap_or_else(|| moeserve_core::models::default_dtype(device));
    cfg.kv_cache_dtype = kv_cache_dtype.unwrap_or(if device.is_cpu() {
        moeserve_core::KvDtype::F32
    } else {
        moeserve_core::KvDtype::F16
    });
    Ok((measure::random_model_on(&cfg, dtype, device)?, dtype))
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn run_engine_bench(args: EngineBenchArgs) -> anyhow::Result<()> {
    use measure as bench;
    use moeserve_core::engine::{Engine, EngineConfig};
    let device = moeserve_core::device_from_setting(&args.device).map_err(anyhow::Error::msg)?;
    let (model, codec, name) = if let Some(cfg) = bench::random_config(&args.model) {
        let cfg = cfg?;
        // No tokenizer comes with random weights: a byte-level stand-in only decodes ids.
        let codec = moeserve_core::TextCodec::byte_fallback(cfg.vocab_size);
        (
            random_on(cfg, &device, args.dtype, None)?.0,
            codec,
            args.model.clone(),
        )
    } else {
        let opts = LoadOptions {
            device,
            dtype: args.dtype,
            ..LoadOptions::default()
        };
        let l = moeserve_core::load(&args.model, &opts)?;
        (l.model, l.codec, l.name)
    };
    let max_seqs = args.concurrency.iter().copied().max().unwrap_or(1);
    let engine = Engine::start(
        model,
        std::sync::Arc::new(codec),
        EngineConfig {
            kv_cache_memory: moeserve_core::parse_memory_size(&args.kv_cache_memory)
                .map_err(anyhow::Error::msg)?,
            max_num_seqs: max_seqs.max(1),
            max_num_batched_tokens: args.max_num_batched_tokens,
            max_waiting_requests: max_seqs.max(1),
            ..EngineConfig::default()
        },
    )?;
    println!(
        "model {name}, {} threads, prompt {} tokens, {} new tokens per request",
        rayon_threads(),
        args.prompt_len,
        args.max_tokens
    );
    println!(
        "| sampling | concurrent | output tok/s | mean TTFT ms | max TTFT ms | wall s | forward ms/step | sample ms/step | detokenize / forward |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut salt = 0;
    for &sampling in &args.sampling {
        for &c in &args.concurrency {
            let r = bench::engine_throughput(&engine, c, args.prompt_len, args.max_tokens, sampling, salt)?;
            salt += 1;
            println!(
                "| {} | {c} | {:.1} | {:.0} | {:.0} | {:.1} | {:.2} | {:.3} | {:.2}% |",
                sampling.name(),
                r.output_tok_s,
                r.mean_ttft_s * 1e3,
                r.max_ttft_s * 1e3,
                r.wall_s,
                r.forward_ms_per_step,
                r.sample_ms_per_step,
                r.detokenize_share * 100.0
            );
        }
    }
    Ok(())
}

/// Read bandwidth of a 1 GiB buffer summed by all threads (best of 5), in bytes/s.
fn memory_bandwidth() -> f64 {
    use rayon::prelude::*;
    let buf = vec![1f32; 1 << 28];
    let mut best = 0f64;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        // Sixteen independent lanes, so the adds vectorise and memory is the limit.
        let s: f32 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for x in c.chunks_exact(16) {
                    for i in 0..16 {
                        acc[i] += x[i];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((buf.len() * 4) as f64 / secs);
    }
    best
}

fn run_memory_bench(args: MemoryBenchArgs) -> anyhow::Result<()> {
    // The host can move the CPUs between the two measurements; one on each side shows it.
    let round_trip = || measure::thread_round_trip_ns(100_000);
    let before = round_trip();
    let bw = memory_bandwidth();
    let after = round_trip();
    println!(
        "memory read bandwidth: {:.1} GB/s ({} threads)",
        bw / 1e9,
        rayon_threads()
    );
    if let (Some(before), Some(after)) = (before, after) {
        println!(
            "thread round trip: {before:.0} ns before, {after:.0} ns after (tens of ns: CPUs on one core complex; hundreds: far apart)"
        );
    }
    if let Some(path) = args.model {
        let bytes = if path.extension().is_some_and(|e| e == "gguf") {
            let ckpt = moeserve_core::gguf::GgufCheckpoint::open(&path)?;
            ckpt.bytes_per_token(&moeserve_core::gguf::model_config(&ckpt)?)
        } else {
            std::fs::metadata(&path)?.len() as f64
        };
        println!(
            "{}: {:.1} MB of weights read per token at batch 1 -> decode bound {:.0} tok/s",
            path.display(),
            bytes / 1e6,
            bw / bytes
        );
    }
    Ok(())
}
