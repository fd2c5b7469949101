//! The model core against transformers: every architecture's tiny fixture model (made by
//! tests/fixtures/generate.py, which also recorded what transformers computes for it)
//! must give the same logits, top-5 logprobs and greedy tokens; batching and chunked
//! prefill must not change the results.

use std::path::PathBuf;

use moeserve_core::sampling::{argmax, log_softmax};
use moeserve_core::{
    BlockPool, BlockTable, CausalLm, ForwardBatch, KvStorage, LoadOptions, LogitRows, SequenceInput,
};
use serde::Deserialize;

const LOGIT_TOL: f32 = 1e-3;
/// DeepSeek's issue asks for 1e-4.
const DEEPSEEK_LOGIT_TOL: f32 = 1e-4;
const LOGPROB_TOL: f32 = 1e-3;
/// Two f32 computations of the same thing in a different batch shape.
const SAME_TOL: f32 = 1e-4;

#[derive(Deserialize)]
struct Reference {
    architecture: String,
    prompts: Vec<PromptReference>,
}

#[derive(Deserialize)]
struct PromptReference {
    ids: Vec<u32>,
    last_logits: Vec<f32>,
    greedy: Vec<u32>,
    top_logprobs: Vec<Vec<(u32, f32)>>,
}

/// Whether the suite runs through the GPU backend's kernels (on the CPU): false here;
/// tests/gpu_backend.rs includes this file as a module with its own `GPU_KERNELS` true.
#[allow(dead_code)]
const GPU_KERNELS: bool = false;

/// Where the suite runs: the CPU, or the GPU `MOESERVE_TEST_DEVICE` names (`cuda`,
/// `cuda:N`; a test binary built with `--features cuda`, how the device check runs the
/// suite on a GPU), in f32 with an f32 cache either way.
fn test_device() -> candle_core::Device {
    let name = std::env::var("MOESERVE_TEST_DEVICE").unwrap_or_default();
    moeserve_core::device_from_setting(&name).unwrap()
}

fn load_options() -> LoadOptions {
    LoadOptions {
        device: test_device(),
        dtype: Some(candle_core::DType::F32),
        kv_cache_dtype: Some(moeserve_core::KvDtype::F32),
        // The GPU backend's kernels, or the default for the device: on the CPU the kernel
        // set MOESERVE_CPU names (how CI runs this suite through each set) or the best.
        backend: crate::GPU_KERNELS.then_some(moeserve_core::backend::Backend::Gpu),
        ..LoadOptions::default()
    }
}

/// A fixture's path.
fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A model with its own cache, running sequences by hand.
struct Runner {
    model: Box<dyn CausalLm>,
    kv: KvStorage,
    alloc: BlockPool,
}

impl Runner {
    fn new(dir: &std::path::Path) -> Self {
        let loaded = moeserve_core::load(dir.to_str().unwrap(), &load_options()).unwrap();
        Self::with_model(loaded.model)
    }

    fn with_model(model: Box<dyn CausalLm>) -> Self {
        let kv = KvStorage::for_model(model.as_ref(), 16, 128).unwrap();
        let alloc = BlockPool::new(kv.num_blocks());
        Runner { model, kv, alloc }
    }

    fn table(&mut self, tokens: usize) -> BlockTable {
        let mut t = BlockTable::new();
        t.reserve(&mut self.alloc, tokens, 16).unwrap();
        t
    }

    /// Greedy decoding of several prompts in one batch per step. Returns, per prompt, the
    /// logits at each step (the first from prefill) and the chosen tokens.
    fn greedy_batch(&mut self, prompts: &[&[u32]], steps: usize) -> Vec<(Vec<Vec<f32>>, Vec<u32>)> {
        let tables: Vec<BlockTable> = prompts.iter().map(|p| self.table(p.len() + steps)).collect();
        let mut inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let mut pos = vec![0usize; prompts.len()];
        let mut results = vec![(Vec::new(), Vec::new()); prompts.len()];
        for _ in 0..steps {
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
            let out = self.model.forward(&batch, &mut self.kv).unwrap();
            for i in 0..prompts.len() {
                let logits = out.last_logits(i).unwrap();
                let next = argmax(&logits);
                pos[i] += inputs[i].len();
                inputs[i] = vec![next];
                results[i].0.push(logits);
                results[i].1.push(next);
            }
        }
        for mut t in tables {
            t.release_all(&mut self.alloc);
        }
        results
    }

    /// Prefills `prompt` in chunks of the given sizes; returns the last chunk's logits for
    /// every token (`LogitRows::All`).
    fn chunked_prefill(&mut self, prompt: &[u32], chunks: &[usize]) -> Vec<Vec<f32>> {
        let mut table = self.table(prompt.len());
        let mut start = 0;
        let mut last = Vec::new();
        for &c in chunks {
            let end = (start + c).min(prompt.len());
            let batch = ForwardBatch::new(vec![SequenceInput {
                tokens: &prompt[start..end],
                start_pos: start,
                block_table: table.blocks(),
                logits: LogitRows::All,
            }]);
            let out = self.model.forward(&batch, &mut self.kv).unwrap();
            assert_eq!(out.rows[0].len(), end - start);
            last = out.rows[0]
                .clone()
                .map(|r| out.logits.get(r).unwrap().to_vec1::<f32>().unwrap())
                .collect();
            start = end;
        }
        assert_eq!(start, prompt.len(), "chunks must cover the prompt");
        table.release_all(&mut self.alloc);
        last
    }
}

fn check_against_transformers(name: &str) {
    let dir = fixture(name);
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let mut runner = Runner::new(&dir);
    assert_eq!(
        runner.model.config().architecture.hf_name(),
        reference.architecture
    );
    let steps = reference.prompts[0].greedy.len();
    let logit_tol = if name.starts_with("deepseek") {
        DEEPSEEK_LOGIT_TOL
    } else {
        LOGIT_TOL
    };

    // Each prompt alone: logits, top-5 logprobs and greedy tokens as transformers has them.
    let mut alone = Vec::new();
    for (p, r) in reference.prompts.iter().enumerate() {
        let (logits, tokens) = runner.greedy_batch(&[&r.ids], steps).remove(0);
        let err = max_abs_diff(&logits[0], &r.last_logits);
        assert!(
            err < logit_tol,
            "{name} prompt {p}: last-position logits differ by {err}"
        );
        for (step, (l, want)) in logits.iter().zip(&r.top_logprobs).enumerate() {
            let lp = log_softmax(l);
            for &(id, want_lp) in want {
                let err = (lp[id as usize] - want_lp).abs();
                assert!(
                    err < LOGPROB_TOL,
                    "{name} prompt {p} step {step}: logprob of token {id} is {} (transformers {want_lp})",
                    lp[id as usize]
                );
            }
        }
        assert_eq!(
            tokens, r.greedy,
            "{name} prompt {p}: greedy tokens differ from transformers"
        );
        alone.push((logits, tokens));
    }

    // All prompts in one batch (a long prefill next to short ones, then batched decodes).
    let prompts: Vec<&[u32]> = reference.prompts.iter().map(|r| r.ids.as_slice()).collect();
    let together = runner.greedy_batch(&prompts, steps);
    for (p, ((l_alone, t_alone), (l_batch, t_batch))) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            t_alone, t_batch,
            "{name} prompt {p}: batched tokens differ from alone"
        );
        for (a, b) in l_alone.iter().zip(l_batch) {
            let err = max_abs_diff(a, b);
            assert!(
                err < SAME_TOL,
                "{name} prompt {p}: batched logits differ by {err}"
            );
        }
    }

    // Chunked prefill of the longest prompt equals prefill in one piece, at every position
    // of the last chunk.
    let long = &reference.prompts.iter().max_by_key(|r| r.ids.len()).unwrap().ids;
    let whole = runner.chunked_prefill(long, &[long.len()]);
    let chunked = runner.chunked_prefill(long, &[7, 1, 16, 5, long.len()]);
    let tail = &whole[whole.len() - chunked.len()..];
    for (i, (a, b)) in tail.iter().zip(&chunked).enumerate() {
        let err = max_abs_diff(a, b);
        assert!(err < SAME_TOL, "{name}: chunked prefill row {i} differs by {err}");
    }
    let reference_last = &reference
        .prompts
        .iter()
        .max_by_key(|r| r.ids.len())
        .unwrap()
        .last_logits;
    assert!(max_abs_diff(chunked.last().unwrap(), reference_last) < logit_tol);

    // Nothing leaked.
    assert_eq!(runner.alloc.num_free(), runner.alloc.num_blocks());
}

macro_rules! reference_tests {
    ($($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                check_against_transformers(stringify!($name));
            }
        )*
    };
}

reference_tests!(
    llama,
    llama_linear,
    qwen2,
    qwen3,
    mixtral,
    qwen2_moe,
    qwen3_moe,
    olmoe,
    deepseek_v2,
    deepseek_v3,
    deepseek_v3_fp8,
    // With a multi-token prediction module, which the main forward must not touch.
    deepseek_v3_mtp,
    // Saved by transformers 5: `rope_parameters` instead of `rope_scaling`/`rope_theta`.
    llama_tf5,
    mixtral_tf5,
    deepseek_v3_tf5
);

#[derive(Deserialize)]
struct MtpReference {
    prompts: Vec<MtpPrompt>,
}

#[derive(Deserialize)]
struct MtpPrompt {
    ids: Vec<u32>,
    mtp_next: u32,
    mtp_logits: Vec<Vec<f32>>,
}

/// DeepSeek-V3's multi-token prediction module (loaded from `model.layers.{N}` as the
/// release lays it out) gives the draft logits of the generator's torch version of it at
/// every prompt position, within 1e-4, from the main model's hidden states; its KV goes
/// into the pool's extra layer.
#[test]
fn mtp_module_matches_the_torch_reference() {
    check_mtp_module(&fixture("deepseek_v3_mtp"), DEEPSEEK_LOGIT_TOL);
}

/// The same module from the fixture's GGUF twin (llama.cpp's `blk.{N}.nextn.*` layout,
/// block_count counting the MTP block, f16 weights, hence the f16 tolerance).
#[test]
fn mtp_module_from_gguf_matches_the_torch_reference() {
    check_mtp_module(&fixture("deepseek_v3_mtp-f16.gguf"), 2e-2);
}

fn check_mtp_module(path: &std::path::Path, tol: f32) {
    let reference: MtpReference = serde_json::from_str(
        &std::fs::read_to_string(fixture("deepseek_v3_mtp").join("reference.json")).unwrap(),
    )
    .unwrap();
    let mut runner = Runner::new(path);
    assert!(runner.model.has_mtp());
    let plain = moeserve_core::load(fixture("deepseek_v3").to_str().unwrap(), &load_options()).unwrap();
    assert!(!plain.model.has_mtp());
    assert_eq!(
        runner.model.kv_layout().num_layers,
        plain.model.kv_layout().num_layers + 1
    );
    for p in &reference.prompts {
        let n = p.ids.len();
        let table = runner.table(n + 1);
        let out = runner
            .model
            .forward(
                &ForwardBatch::new(vec![SequenceInput {
                    tokens: &p.ids,
                    start_pos: 0,
                    block_table: table.blocks(),
                    logits: LogitRows::Last,
                }])
                .with_hidden(true),
                &mut runner.kv,
            )
            .unwrap();
        assert_eq!(argmax(&out.last_logits(0).unwrap()), p.mtp_next);
        let hidden = out.hidden.expect("hidden states asked for");
        assert_eq!(hidden.dims(), [n, runner.model.config().hidden_size]);
        let mut following = p.ids[1..].to_vec();
        following.push(p.mtp_next);
        let drafts = runner
            .model
            .forward_mtp(
                &ForwardBatch::new(vec![SequenceInput {
                    tokens: &following,
                    start_pos: 0,
                    block_table: table.blocks(),
                    logits: LogitRows::All,
                }]),
                &hidden,
                &mut runner.kv,
            )
            .unwrap();
        assert_eq!(drafts.rows[0].len(), n);
        for (i, want) in p.mtp_logits.iter().enumerate() {
            let got = drafts.logits.get(i).unwrap().to_vec1::<f32>().unwrap();
            let err = max_abs_diff(&got, want);
            assert!(err < tol, "position {i}: max |diff| {err}");
        }
        let mut table = table;
        table.release_all(&mut runner.alloc);
    }
    assert_eq!(runner.alloc.num_free(), runner.alloc.num_blocks());
}

/// The MTP module run step by step, one token behind the main model (its KV written a
/// position at a time, as the engine keeps it), gives the draft logits a run over the
/// whole sequence at once gives, within 1e-4.
#[test]
fn mtp_module_kept_step_by_step_matches_one_pass() {
    let dir = fixture("deepseek_v3_mtp");
    let reference: MtpReference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let mut runner = Runner::new(&dir);
    let p = &reference.prompts[0];
    let steps = 6;
    let total = p.ids.len() + steps + 1;
    fn seq<'a>(
        tokens: &'a [u32],
        start: usize,
        table: &'a BlockTable,
        logits: LogitRows,
    ) -> SequenceInput<'a> {
        SequenceInput {
            tokens,
            start_pos: start,
            block_table: table.blocks(),
            logits,
        }
    }
    // Step by step: the prompt, then one greedy token per step; the module after each.
    let table = runner.table(total);
    let mut tokens = p.ids.clone();
    let mut computed = 0;
    let mut stepwise: Vec<Vec<f32>> = Vec::new();
    for _ in 0..=steps {
        let input = tokens[computed..].to_vec();
        let out = runner
            .model
            .forward(
                &ForwardBatch::new(vec![seq(&input, computed, &table, LogitRows::Last)]).with_hidden(true),
                &mut runner.kv,
            )
            .unwrap();
        tokens.push(argmax(&out.last_logits(0).unwrap()));
        let following = tokens[computed + 1..].to_vec();
        let mtp = runner
            .model
            .forward_mtp(
                &ForwardBatch::new(vec![seq(&following, computed, &table, LogitRows::Last)]),
                out.hidden.as_ref().unwrap(),
                &mut runner.kv,
            )
            .unwrap();
        stepwise.push(mtp.last_logits(0).unwrap());
        computed = tokens.len() - 1;
    }
    // One pass over the same tokens in a fresh cache.
    let fresh = runner.table(total);
    let input = tokens[..computed].to_vec();
    let out = runner
        .model
        .forward(
            &ForwardBatch::new(vec![seq(&input, 0, &fresh, LogitRows::None)]).with_hidden(true),
            &mut runner.kv,
        )
        .unwrap();
    let following = tokens[1..].to_vec();
    let mtp = runner
        .model
        .forward_mtp(
            &ForwardBatch::new(vec![seq(&following, 0, &fresh, LogitRows::All)]),
            out.hidden.as_ref().unwrap(),
            &mut runner.kv,
        )
        .unwrap();
    for (k, got) in stepwise.iter().enumerate() {
        let i = p.ids.len() - 1 + k;
        let want = mtp.logits.get(i).unwrap().to_vec1::<f32>().unwrap();
        let err = max_abs_diff(got, &want);
        assert!(err < SAME_TOL, "step {k} (position {i}): max |diff| {err}");
    }
    // The prompt positions of the one pass are the reference's.
    for (i, want) in p.mtp_logits.iter().take(p.ids.len() - 1).enumerate() {
        let got = mtp.logits.get(i).unwrap().to_vec1::<f32>().unwrap();
        assert!(max_abs_diff(&got, want) < DEEPSEEK_LOGIT_TOL, "position {i}");
    }
}

/// Routing in the MoE fixtures is non-trivial: every expert of every sparse layer gets
/// tokens from the long prompt, and several experts per token.
#[test]
fn moe_fixtures_use_every_expert() {
    for name in [
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "deepseek_v2",
        "deepseek_v3",
    ] {
        let dir = fixture(name);
        let reference: Reference =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let mut runner = Runner::new(&dir);
        let long = &reference.prompts[2].ids;
        let mut table = runner.table(long.len());
        let batch = ForwardBatch::new(vec![SequenceInput {
            tokens: long,
            start_pos: 0,
            block_table: table.blocks(),
            logits: LogitRows::Last,
        }]);
        let out = runner.model.forward(&batch, &mut runner.kv).unwrap();
        table.release_all(&mut runner.alloc);
        let moe = runner.model.config().moe.clone().unwrap();
        let sparse: Vec<&Vec<u32>> = out.expert_load.iter().filter(|l| !l.is_empty()).collect();
        assert!(!sparse.is_empty(), "{name}: no sparse layer reported expert load");
        for load in sparse {
            assert_eq!(load.len(), moe.num_experts);
            assert!(
                load.iter().all(|&c| c > 0),
                "{name}: an expert got no token: {load:?}"
            );
            assert_eq!(load.iter().sum::<u32>() as usize, long.len() * moe.top_k);
        }
    }
}

/// DeepSeek's latent attention in its absorbed form (attending over the cached latents)
/// gives the same logits at every prefill and decode step as the naive form
/// (up-projecting every cached latent to per-head keys and values).
#[test]
fn absorbed_latent_attention_equals_naive() {
    for name in ["deepseek_v2", "deepseek_v3"] {
        let dir = fixture(name);
        let build = |absorb: bool| {
            let mut cfg = moeserve_core::ModelConfig::from_file(&dir.join("config.json")).unwrap();
            cfg.mla.as_mut().unwrap().absorb = absorb;
            let store = moeserve_core::weights::WeightStore::from_safetensors(
                &[dir.join("model.safetensors")],
                candle_core::DType::F32,
                &test_device(),
            )
            .unwrap();
            Runner::with_model(moeserve_core::models::build_model(&cfg, &store).unwrap())
        };
        let (mut absorbed, mut naive) = (build(true), build(false));
        let reference: Reference =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let prompts: Vec<&[u32]> = reference.prompts.iter().map(|r| r.ids.as_slice()).collect();
        let a = absorbed.greedy_batch(&prompts, 16);
        let b = naive.greedy_batch(&prompts, 16);
        for (p, ((la, ta), (lb, tb))) in a.iter().zip(&b).enumerate() {
            assert_eq!(ta, tb, "{name} prompt {p}: tokens differ");
            for (step, (x, y)) in la.iter().zip(lb).enumerate() {
                let err = max_abs_diff(x, y);
                assert!(
                    err < SAME_TOL,
                    "{name} prompt {p} step {step}: absorbed vs naive differ by {err}"
                );
            }
        }
    }
}
