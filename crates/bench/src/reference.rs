//! `moeserve-bench reference`: the fixture models against what transformers computed for
//! them (`reference.json`, from tests/fixtures/generate.py), on any device. The test
//! suite does this on the CPU; this command is how a machine with a GPU and no Rust
//! toolchain checks the GPU backend: one binary, the fixtures, a table.
//!
//! Per fixture: each prompt prefilled alone, its last-position logits against
//! transformers' (max |diff|), then greedy decoding for as many steps as the reference
//! has, every token compared; and all prompts again in one batch, which must choose the
//! same tokens.
//!
//! The bar: in f32, the test suite's (1e-3, 1e-4 for DeepSeek) and every greedy token;
//! in bf16, transformers' own bf16 run against the same reference (`bf16.json`, from
//! tests/fixtures/bf16_reference.py), within twice its logit error (both round the same
//! weights, at different places); bf16 tokens are reported, not required (the fixtures'
//! logit margins are small enough that bf16 rounding moves some argmaxes, transformers'
//! own included).

use std::path::{Path, PathBuf};

use anyhow::Context;
use moeserve_core::sampling::argmax;
use moeserve_core::{
    BlockPool, BlockTable, CausalLm, DType, ForwardBatch, KvStorage, LoadOptions, LogitRows, SequenceInput,
};
use serde::Deserialize;

#[derive(clap::Args)]
pub struct ReferenceArgs {
    /// The fixture models' directory.
    #[arg(long, default_value = "tests/fixtures/models")]
    pub fixtures: PathBuf,
    /// Fixtures to check (default: every directory with a reference.json).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Where the models run: cpu, or cuda[:N] (a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32 (tolerance 1e-3, 1e-4 for DeepSeek, every greedy token) or
    /// bf16 (within twice transformers' own bf16 error, from bf16.json).
    #[arg(long, default_value = "f32", value_parser = moeserve_core::parse_compute_dtype)]
    pub dtype: DType,
}

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<PromptReference>,
}

/// Transformers' bf16 run of a fixture against its reference.
#[derive(Deserialize)]
struct Bf16Reference {
    max_last_logit_diff: f32,
    greedy_agreeing: usize,
    greedy_total: usize,
}

#[derive(Deserialize)]
struct PromptReference {
    ids: Vec<u32>,
    last_logits: Vec<f32>,
    greedy: Vec<u32>,
}

/// One fixture's result.
struct Outcome {
    max_logit_diff: f32,
    tokens_agreeing: usize,
    tokens: usize,
    batched_same: bool,
}

pub fn run(args: ReferenceArgs) -> anyhow::Result<()> {
    let device = moeserve_core::device_from_setting(&args.device).map_err(anyhow::Error::msg)?;
    let mut names: Vec<String> = std::fs::read_dir(&args.fixtures)
        .with_context(|| format!("reading {}", args.fixtures.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("reference.json").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| args.only.is_empty() || args.only.contains(n))
        .collect();
    names.sort();
    println!(
        "fixtures against transformers on {:?} in {:?}",
        device, args.dtype
    );
    println!(
        "| fixture | max logit diff | tolerance | greedy tokens agreeing | transformers bf16 tokens | batched = alone | verdict |"
    );
    println!("|---|---:|---:|---:|---:|---|---|");
    let mut failed = 0;
    for name in &names {
        let dir = args.fixtures.join(name);
        // No bf16.json: no bf16 bar (fixtures the bf16 generator does not make); one
        // that does not parse is an error, not a fixture left unjudged.
        let bf16: Option<Bf16Reference> = match std::fs::read_to_string(dir.join("bf16.json")) {
            Ok(s) => Some(serde_json::from_str(&s).with_context(|| format!("{name}/bf16.json"))?),
            Err(_) => None,
        };
        // The bar for this dtype, if there is one.
        let tol = match args.dtype {
            DType::F32 if name.starts_with("deepseek") => Some(1e-4),
            DType::F32 => Some(1e-3),
            DType::BF16 => bf16.as_ref().map(|b| 2.0 * b.max_last_logit_diff),
            _ => None,
        };
        let o = check(&dir, &device, args.dtype)?;
        let tokens_ok = args.dtype != DType::F32 || o.tokens_agreeing == o.tokens;
        let verdict = match tol {
            Some(tol) if o.max_logit_diff <= tol && tokens_ok && o.batched_same => "ok",
            Some(_) => {
                failed += 1;
                "FAIL"
            }
            None => "not judged",
        };
        println!(
            "| {name} | {:.2e} | {} | {}/{} | {} | {} | {verdict} |",
            o.max_logit_diff,
            tol.map_or("-".into(), |t| format!("{t:.1e}")),
            o.tokens_agreeing,
            o.tokens,
            match (&bf16, args.dtype) {
                (Some(b), DType::BF16) => format!("{}/{}", b.greedy_agreeing, b.greedy_total),
                _ => "-".into(),
            },
            if o.batched_same { "yes" } else { "no" },
        );
    }
    if failed > 0 {
        anyhow::bail!("{failed} fixtures differ from transformers");
    }
    Ok(())
}

fn check(dir: &Path, device: &moeserve_core::Device, dtype: DType) -> anyhow::Result<Outcome> {
    let reference: Reference = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
    let opts = LoadOptions {
        device: device.clone(),
        dtype: Some(dtype),
        kv_cache_dtype: Some(moeserve_core::KvDtype::F32),
        ..LoadOptions::default()
    };
    let model = moeserve_core::load(dir.to_str().context("a UTF-8 path")?, &opts)?.model;
    let kv = KvStorage::for_model(model.as_ref(), 16, 256)?;
    let mut runner = Runner {
        alloc: BlockPool::new(kv.num_blocks()),
        kv,
        model,
    };
    let steps = reference.prompts.first().map_or(0, |p| p.greedy.len());
    let mut outcome = Outcome {
        max_logit_diff: 0.0,
        tokens_agreeing: 0,
        tokens: 0,
        batched_same: true,
    };
    let mut alone = Vec::new();
    for p in &reference.prompts {
        let (first_logits, tokens) = runner.greedy(&[&p.ids], steps)?.remove(0);
        let diff = first_logits
            .iter()
            .zip(&p.last_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        outcome.max_logit_diff = outcome.max_logit_diff.max(diff);
        // Tokens agree up to the first difference (after it the contexts differ).
        outcome.tokens_agreeing += tokens.iter().zip(&p.greedy).take_while(|(a, b)| a == b).count();
        outcome.tokens += p.greedy.len();
        alone.push(tokens);
    }
    let prompts: Vec<&[u32]> = reference.prompts.iter().map(|p| p.ids.as_slice()).collect();
    let together = runner.greedy(&prompts, steps)?;
    outcome.batched_same = together.iter().map(|(_, t)| t).eq(alone.iter());
    Ok(outcome)
}

struct Runner {
    model: Box<dyn CausalLm>,
    kv: KvStorage,
    alloc: BlockPool,
}

impl Runner {
    /// Greedy decoding of `prompts` in one batch per step: per prompt, the prefill's
    /// last logits and the chosen tokens.
    fn greedy(&mut self, prompts: &[&[u32]], steps: usize) -> anyhow::Result<Vec<(Vec<f32>, Vec<u32>)>> {
        let mut tables = Vec::with_capacity(prompts.len());
        for p in prompts {
            let mut t = BlockTable::new();
            t.reserve(&mut self.alloc, p.len() + steps, 16)?;
            tables.push(t);
        }
        let mut inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let mut pos = vec![0usize; prompts.len()];
        let mut results = vec![(Vec::new(), Vec::new()); prompts.len()];
        for step in 0..steps {
            let batch = ForwardBatch::new(
                (0..prompts.len())
                    .map(|i| SequenceInput {
                        tokens: &inputs[i],
                        start_pos: pos[i],
                        block_table: tables[i].blocks(),
                        logits: LogitRows::Last,
                    })
                    .collect(),
            );
            let out = self.model.forward(&batch, &mut self.kv)?;
            for i in 0..prompts.len() {
                let logits = out.last_logits(i)?;
                let next = argmax(&logits);
                if step == 0 {
                    results[i].0 = logits;
                }
                pos[i] += inputs[i].len();
                inputs[i] = vec![next];
                results[i].1.push(next);
            }
        }
        for mut t in tables {
            t.release_all(&mut self.alloc);
        }
        Ok(results)
    }
}
