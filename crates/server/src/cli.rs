//! Subcommands: `serve` (the HTTP server), `generate` (one prompt, printed with its
//! speed). Benchmarks live in the `moeserve-bench` binary.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use moeserve_core::generate::generate;
use moeserve_core::sampling::Sampler;
use moeserve_core::{BlockPool, DType, KvStorage, LoadOptions};

#[derive(Parser)]
#[command(
    name = "moeserve",
    version,
    about = "An OpenAI-compatible inference server for Mixture-of-Experts models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(Box<crate::settings::SettingsArgs>),
    /// Generate a continuation of one prompt and print prefill and decode speed.
    Generate(GenerateArgs),
    /// Print the CPU kernel sets this machine runs (best first) and the one a model would
    /// load with (MOESERVE_CPU forces one: avx512, avx2, neon, portable).
    Kernels {
        /// Only the names of the sets this CPU runs, one per line (for scripts).
        #[arg(long)]
        list: bool,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A checkpoint directory or a Hugging Face repo id (owner/name[@revision]).
    #[arg(long, env = "MOESERVE_MODEL")]
    model: String,
    /// The prompt text (sent as is, without a chat template).
    #[arg(long)]
    prompt: String,
    /// How many tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed for sampling at temperature > 0.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute dtype (default: f32 on CPU).
    #[arg(long, value_parser = moeserve_core::parse_compute_dtype, env = "MOESERVE_DTYPE")]
    dtype: Option<DType>,
    /// Where the model runs: cpu, or cuda[:N] (a binary built with --features cuda).
    #[arg(long, default_value = "cpu", env = "MOESERVE_DEVICE")]
    device: String,
    /// KV cache memory budget: bytes, or with a unit (512MiB, 2GiB).
    #[arg(long, default_value = "256MiB", env = "MOESERVE_KV_CACHE_MEMORY")]
    kv_cache_memory: String,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => crate::settings::Settings::resolve(&args).and_then(|settings| {
            init_logging(settings.log_format == "json");
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(crate::serve(settings))
        }),
        Command::Generate(args) => {
            init_logging(false);
            run_generate(args)
        }
        Command::Kernels { list } => run_kernels(list),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_kernels(list: bool) -> anyhow::Result<()> {
    use moeserve_core::backend::Isa;
    let mut out = std::io::stdout().lock();
    if list {
        for isa in Isa::available() {
            writeln!(out, "{isa}")?;
        }
        return Ok(());
    }
    let sets: Vec<String> = Isa::available().iter().map(|i| i.describe()).collect();
    writeln!(out, "this CPU runs: {}", sets.join(", "))?;
    let forced = std::env::var(moeserve_core::backend::cpu::isa::CPU_ENV).ok();
    let selected = Isa::selected().map_err(anyhow::Error::msg)?;
    writeln!(
        out,
        "selected: {}{}",
        selected.describe(),
        match forced {
            Some(v) if !v.trim().is_empty() =>
                format!(" ({}={v})", moeserve_core::backend::cpu::isa::CPU_ENV),
            _ => String::new(),
        }
    )?;
    Ok(())
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let budget = moeserve_core::parse_memory_size(&args.kv_cache_memory).map_err(anyhow::Error::msg)?;
    let opts = LoadOptions {
        device: moeserve_core::device_from_setting(&args.device).map_err(anyhow::Error::msg)?,
        dtype: args.dtype,
        reserve_bytes: budget,
        ..LoadOptions::default()
    };
    let loaded = moeserve_core::load(&args.model, &opts)?;
    let mut kv = KvStorage::with_memory_budget_on(
        loaded.model.kv_layout(),
        args.block_size,
        budget,
        loaded.model.device(),
        loaded.model.backend(),
    )?;
    let mut alloc = BlockPool::new(kv.num_blocks());
    let prompt = loaded.codec.encode(&args.prompt)?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens");
    }
    let context = loaded.model.config().max_position_embeddings;
    let max_tokens = args.max_tokens.min(context.saturating_sub(prompt.len()));
    if max_tokens == 0 {
        anyhow::bail!(
            "the prompt has {} tokens, which fills the model's context of {context}",
            prompt.len()
        );
    }
    let stop: Vec<u32> = if args.ignore_eos {
        vec![]
    } else {
        loaded.codec.eos_token_ids().to_vec()
    };
    let mut sampler = Sampler::new(args.temperature, args.seed);
    let gen = generate(
        loaded.model.as_ref(),
        &mut kv,
        &mut alloc,
        &prompt,
        max_tokens,
        &mut sampler,
        &stop,
    )?;
    let text = loaded.codec.decode(&gen.tokens, true)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}{}", args.prompt, text)?;
    eprintln!(
        "prefill: {} tokens in {:.3}s ({:.1} tok/s); decode: {} tokens in {:.3}s ({:.1} tok/s){}",
        gen.prompt_tokens,
        gen.prefill_secs,
        gen.prefill_tokens_per_sec(),
        gen.tokens.len(),
        gen.decode_secs,
        gen.decode_tokens_per_sec(),
        if gen.stopped {
            "; stopped at end of sequence"
        } else {
            ""
        }
    );
    Ok(())
}
