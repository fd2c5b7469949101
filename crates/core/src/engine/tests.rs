//! Engine tests on the tiny fixture models.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::detok::Detokenizer;
use super::*;
use crate::LoadOptions;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// Loads a fixture. With `MOESERVE_TEST_GPU_KERNELS=1` every layer runs through
/// `backend::gpu` (on the CPU, the KV pool in its device-tensor form): how CI checks
/// that the scheduler, the prefix cache and its disk tier, speculation and constraints
/// work unchanged over the GPU backend (`.ci/run` runs these tests both ways).
fn load(name: &str, opts: &LoadOptions) -> crate::LoadedModel {
    let mut opts = opts.clone();
    if std::env::var("MOESERVE_TEST_GPU_KERNELS").is_ok_and(|v| v == "1") {
        opts.backend = Some(crate::backend::Backend::Gpu);
    }
    crate::load(fixture(name).to_str().unwrap(), &opts).unwrap()
}

fn start(name: &str, cfg: EngineConfig) -> Engine {
    let loaded = load(name, &LoadOptions::default());
    Engine::start(loaded.model, Arc::new(loaded.codec), cfg).unwrap()
}

fn reference_prompts(name: &str) -> Vec<(Vec<u32>, Vec<u32>)> {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap())
            .unwrap();
    r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                serde_json::from_value(p["ids"].clone()).unwrap(),
                serde_json::from_value(p["greedy"].clone()).unwrap(),
            )
        })
        .collect()
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Choice {
    tokens: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
    stop: Option<String>,
    logprobs: Vec<TokenLogprob>,
}

#[derive(Debug, Default)]
struct Outcome {
    choices: Vec<Choice>,
    usage: Usage,
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    deltas: usize,
}

fn collect(mut h: RequestHandle) -> Outcome {
    let mut o = Outcome::default();
    while let Some(ev) = h.blocking_next() {
        match ev {
            EngineEvent::PromptLogprobs(lp) => o.prompt_logprobs = Some(lp),
            EngineEvent::Delta {
                index,
                token_ids,
                text,
                logprobs,
            } => {
                if o.choices.len() <= index {
                    o.choices.resize(index + 1, Choice::default());
                }
                let c = &mut o.choices[index];
                c.tokens.extend(token_ids);
                c.text.push_str(&text);
                c.logprobs.extend(logprobs);
                o.deltas += 1;
            }
            EngineEvent::Finished { index, reason, stop } => {
                o.choices[index].finish = Some(reason);
                o.choices[index].stop = stop;
            }
            EngineEvent::Done(u) => {
                o.usage = u;
                break;
            }
            EngineEvent::Error(e) => panic!("engine error: {e}"),
        }
    }
    o
}

fn run(e: &Engine, prompt: &[u32], params: SamplingParams) -> Outcome {
    collect(
        e.submit(GenerateRequest {
            prompt: prompt.to_vec(),
            params,
        })
        .unwrap(),
    )
}

/// Greedy, past EOS (the random fixture models emit it early).
fn greedy(max: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(max)
    }
}

fn seeded(max: usize, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: Some(seed),
        max_tokens: Some(max),
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn filler(n: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + salt * 101) % 300 + 3) as u32).collect()
}

#[test]
fn greedy_and_seeded_outputs_are_the_same_alone_and_in_a_batch_of_16_others() {
    for name in ["qwen3_moe", "llama"] {
        let e = start(name, EngineConfig::default());
        let refs = reference_prompts(name);
        // Even prompts greedy, odd ones seeded sampling.
        let params_for = |i: usize| {
            if i.is_multiple_of(2) {
                greedy(32)
            } else {
                seeded(32, 7 + i as u64)
            }
        };
        let alone: Vec<Outcome> = refs
            .iter()
            .enumerate()
            .map(|(i, (p, _))| run(&e, p, params_for(i)))
            .collect();
        // Greedy alone is what transformers produced.
        for (i, (o, (_, want))) in alone.iter().zip(&refs).enumerate() {
            if i.is_multiple_of(2) {
                assert_eq!(&o.choices[0].tokens, want, "{name} prompt {i}");
            }
        }
        // The same requests among 16 others of various lengths, greedy and sampled, all
        // in flight at once.
        let mut handles = Vec::new();
        for k in 0..16 {
            let p = filler(5 + k * 13, k);
            let params = if k.is_multiple_of(3) {
                greedy(20 + k)
            } else {
                seeded(20 + k, k as u64)
            };
            handles.push((None, e.submit(GenerateRequest { prompt: p, params }).unwrap()));
            if k < refs.len() {
                let h = e
                    .submit(GenerateRequest {
                        prompt: refs[k].0.clone(),
                        params: params_for(k),
                    })
                    .unwrap();
                handles.push((Some(k), h));
            }
        }
        for (k, h) in handles {
            let o = collect(h);
            if let Some(k) = k {
                assert_eq!(
                    o.choices[0].tokens, alone[k].choices[0].tokens,
                    "{name} request {k} in a batch"
                );
                assert_eq!(o.choices[0].text, alone[k].choices[0].text);
            }
        }
        wait_until("blocks to be freed", || {
            e.stats().kv_blocks_used.load(Ordering::Relaxed) == 0
        });
    }
}

#[test]
fn preemption_with_a_tiny_pool_finishes_everything_identically_without_leaks() {
    let (want, got, tiny) = under_preemption(|_| None);
    for (k, (a, b)) in want.iter().zip(&got).enumerate() {
        assert_eq!(a.choices, b.choices, "request {k}");
        assert_eq!(b.choices[0].finish, Some(FinishReason::Length));
    }
    assert!(
        tiny.stats().preemptions.load(Ordering::Relaxed) > 0,
        "the pool was meant to run out"
    );
    wait_until("blocks to be freed", || {
        tiny.stats().kv_blocks_used.load(Ordering::Relaxed) == 0
    });
}

/// Prompt logprobs (`echo` with `logprobs`) of a prompt preempted in the middle of its
/// prefill are each prompt token's once, in order, as without preemption. (They were
/// appended again when the prompt was recomputed.) Three decoding requests grow into a
/// pool of 10 blocks while a 60-token prompt is prefilled 5 tokens a step behind them; as
/// the last admitted, it is the one preempted.
#[test]
fn a_prompt_preempted_during_prefill_reports_its_prompt_logprobs_once() {
    let long = filler(60, 9);
    let runs: Vec<(Outcome, u64)> = [512 * 16 * 64, 512 * 16 * 10]
        .into_iter()
        .map(|pool| {
            let e = start(
                "qwen3_moe",
                EngineConfig {
                    kv_cache_memory: pool,
                    max_num_batched_tokens: 8,
                    ..EngineConfig::default()
                },
            );
            let decoders: Vec<_> = (0..3)
                .map(|k| {
                    e.submit(GenerateRequest {
                        prompt: filler(16, k),
                        params: greedy(40),
                    })
                    .unwrap()
                })
                .collect();
            let with_logprobs = e
                .submit(GenerateRequest {
                    prompt: long.clone(),
                    params: SamplingParams {
                        prompt_logprobs: Some(2),
                        ..greedy(4)
                    },
                })
                .unwrap();
            let out = collect(with_logprobs);
            decoders.into_iter().for_each(|h| {
                collect(h);
            });
            wait_until("blocks to be freed", || {
                e.stats().kv_blocks_used.load(Ordering::Relaxed) == 0
            });
            (out, e.stats().preemptions.load(Ordering::Relaxed))
        })
        .collect();
    let ((want, _), (got, preemptions)) = (&runs[0], &runs[1]);
    assert!(*preemptions > 0, "the pool was meant to run out");
    let (want, got) = (
        want.prompt_logprobs.as_ref().unwrap(),
        got.prompt_logprobs.as_ref().expect("prompt logprobs sent"),
    );
    assert_eq!(got.len(), long.len(), "one entry per prompt token");
    for (pos, (a, b)) in want.iter().zip(got).enumerate().skip(1) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        // The same token at each position; f32 logits of another batch shape may differ
        // in the last bits.
        assert_eq!((a.token, b.token), (long[pos], long[pos]), "position {pos}");
        assert!((a.logprob - b.logprob).abs() < 1e-4, "position {pos}");
    }
}

/// Eight requests of 40 tokens (greedy and seeded alternately, each with the constraint
/// `constrain` gives), run on a roomy pool and then on a pool of 10 blocks while they
/// need 4 each; returns both runs' outcomes and the small engine.
fn under_preemption(
    constrain: impl Fn(&Engine) -> Option<Arc<crate::grammar::Constraint>>,
) -> (Vec<Outcome>, Vec<Outcome>, Engine) {
    let prompts: Vec<Vec<u32>> = (0..8).map(|k| filler(20 + k * 3, k)).collect();
    let reqs = |e: &Engine| {
        let constraint = constrain(e);
        let hs: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let params = if k.is_multiple_of(2) {
                    greedy(40)
                } else {
                    seeded(40, k as u64)
                };
                let params = SamplingParams {
                    constraint: constraint.clone(),
                    ..params
                };
                e.submit(GenerateRequest {
                    prompt: p.clone(),
                    params,
                })
                .unwrap()
            })
            .collect();
        hs.into_iter().map(collect).collect::<Vec<_>>()
    };
    let roomy = start("qwen3_moe", EngineConfig::default());
    let want = reqs(&roomy);
    // 2 layers * 2 kv heads * (16 + 16) floats * 4 bytes = 512 bytes per token: 10 blocks
    // of 16 tokens, while the 8 requests need 4 blocks each.
    let tiny = start(
        "qwen3_moe",
        EngineConfig {
            kv_cache_memory: 512 * 16 * 10,
            ..EngineConfig::default()
        },
    );
    assert_eq!(tiny.stats().kv_blocks_total.load(Ordering::Relaxed), 10);
    let got = reqs(&tiny);
    (want, got, tiny)
}

#[test]
fn a_shared_1000_token_prefix_is_computed_once() {
    let prefix = filler(1000, 3);
    let with = |suffix: &[u32]| prefix.iter().chain(suffix).copied().collect::<Vec<u32>>();
    let (a, b) = (with(&[10, 11, 12]), with(&[20, 21, 22, 23, 24]));
    let cold = start(
        "qwen3_moe",
        EngineConfig {
            enable_prefix_caching: false,
            ..EngineConfig::default()
        },
    );
    let want_b = run(&cold, &b, greedy(16));
    assert_eq!(want_b.usage.cached_tokens, 0);

    let e = start("qwen3_moe", EngineConfig::default());
    let first = run(&e, &a, greedy(16));
    assert_eq!(first.usage.cached_tokens, 0);
    let computed_before = e.stats().prompt_tokens.load(Ordering::Relaxed)
        - e.stats().prefix_cache_hit_tokens.load(Ordering::Relaxed);
    let second = run(&e, &b, greedy(16));
    // 62 full blocks of 16 = 992 tokens come from the cache.
    assert_eq!(second.usage.cached_tokens, 992);
    let computed = e.stats().prompt_tokens.load(Ordering::Relaxed)
        - e.stats().prefix_cache_hit_tokens.load(Ordering::Relaxed)
        - computed_before;
    assert_eq!(computed as usize, b.len() - 992);
    assert_eq!(
        second.choices, want_b.choices,
        "a cache hit changes nothing in the output"
    );
}

#[test]
fn dropping_the_handle_aborts_and_frees_blocks() {
    let e = start("qwen3_moe", EngineConfig::default());
    let mut h = e
        .submit(GenerateRequest {
            prompt: filler(50, 1),
            params: SamplingParams {
                ignore_eos: true,
                ..greedy(1500)
            },
        })
        .unwrap();
    assert!(matches!(h.blocking_next(), Some(EngineEvent::Delta { .. })));
    // The gauges are published at the end of the step that sent the delta.
    wait_until("blocks in use", || {
        e.stats().kv_blocks_used.load(Ordering::Relaxed) > 0
    });
    drop(h);
    wait_until("the aborted request's blocks", || {
        e.stats().kv_blocks_used.load(Ordering::Relaxed) == 0
            && e.stats().running.load(Ordering::Relaxed) == 0
    });
    // The engine still serves.
    assert_eq!(run(&e, &filler(5, 2), greedy(3)).choices[0].tokens.len(), 3);
}

#[test]
fn every_stop_condition_ends_with_the_right_reason() {
    let e = start("llama", EngineConfig::default());
    let eos = e.codec().eos_token_ids()[0];
    let prompt = filler(12, 5);
    let base = run(
        &e,
        &prompt,
        SamplingParams {
            ignore_eos: true,
            ..greedy(24)
        },
    );
    let c = &base.choices[0];
    assert_eq!((c.tokens.len(), c.finish), (24, Some(FinishReason::Length)));
    assert_eq!(base.usage.completion_tokens, 24);

    // A stop token id: ends at its first occurrence, which is not in the text.
    let t = c.tokens[6];
    let first = c.tokens.iter().position(|&x| x == t).unwrap();
    let o = run(
        &e,
        &prompt,
        SamplingParams {
            stop_token_ids: vec![t],
            ignore_eos: true,
            ..greedy(24)
        },
    );
    assert_eq!(o.choices[0].tokens, c.tokens[..=first]);
    assert_eq!(o.choices[0].finish, Some(FinishReason::Stop));
    assert_eq!(
        o.choices[0].text,
        e.codec().decode(&c.tokens[..first], true).unwrap()
    );

    // EOS (forced by a logit bias), ignore_eos and min_tokens.
    let biased = SamplingParams {
        logit_bias: vec![(eos, 100.0)],
        ..SamplingParams::greedy(10)
    };
    let o = run(&e, &prompt, biased.clone());
    assert_eq!(
        (o.choices[0].tokens.clone(), o.choices[0].finish),
        (vec![eos], Some(FinishReason::Stop))
    );
    assert_eq!(o.choices[0].text, "");
    let o = run(
        &e,
        &prompt,
        SamplingParams {
            ignore_eos: true,
            ..biased.clone()
        },
    );
    assert_eq!(
        (o.choices[0].tokens.len(), o.choices[0].finish),
        (10, Some(FinishReason::Length))
    );
    let o = run(
        &e,
        &prompt,
        SamplingParams {
            min_tokens: 4,
            ..biased
        },
    );
    assert_eq!(o.choices[0].tokens.len(), 5);
    assert!(o.choices[0].tokens[..4].iter().all(|&t| t != eos));
    assert_eq!(o.choices[0].finish, Some(FinishReason::Stop));

    // A stop string spanning tokens: the text ends right before its first occurrence.
    let text = &c.text;
    let mid = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= text.len() / 2)
        .unwrap();
    let end = text[mid..]
        .char_indices()
        .nth(3)
        .map(|(i, _)| mid + i)
        .unwrap_or(text.len());
    let stop = text[mid..end].to_string();
    let o = run(
        &e,
        &prompt,
        SamplingParams {
            stop: vec![stop.clone()],
            ignore_eos: true,
            ..greedy(24)
        },
    );
    assert_eq!(o.choices[0].text, text[..text.find(&stop).unwrap()]);
    assert_eq!(o.choices[0].finish, Some(FinishReason::Stop));
    // The stop string that ended it is named (Anthropic's `stop_sequence`).
    assert_eq!(o.choices[0].stop.as_deref(), Some(stop.as_str()));

    // The model's context: a 2040-token prompt in a 2048-position model gets 8 tokens.
    let o = run(
        &e,
        &filler(2040, 1),
        SamplingParams {
            ignore_eos: true,
            ..greedy(8)
        },
    );
    assert_eq!(
        (o.choices[0].tokens.len(), o.choices[0].finish),
        (8, Some(FinishReason::Length))
    );
    let o = run(
        &e,
        &filler(2040, 1),
        SamplingParams {
            ignore_eos: true,
            max_tokens: None,
            ..greedy(1)
        },
    );
    assert_eq!(
        (o.choices[0].tokens.len(), o.choices[0].finish),
        (8, Some(FinishReason::Length))
    );
}

#[test]
fn streamed_text_is_whole_characters_and_adds_up() {
    let loaded = load("llama", &LoadOptions::default());
    let codec = &loaded.codec;
    for s in ["Café 東京 🚀🙂 naïve résumé", "こんにちは, 北京!", "👨‍👩‍👧‍👦 family"]
    {
        let ids = codec.encode(s).unwrap();
        let mut d = Detokenizer::new(true);
        let mut deltas: Vec<String> = ids.iter().map(|&t| d.push(codec, t)).collect();
        deltas.push(d.flush(codec));
        assert!(deltas.iter().all(|x| !x.contains('\u{FFFD}')), "{deltas:?}");
        assert!(
            deltas.iter().any(|x| x.is_empty()),
            "some token must split a character: {deltas:?}"
        );
        assert_eq!(deltas.concat(), codec.decode(&ids, true).unwrap());
        assert_eq!(deltas.concat(), s);
    }
}

#[test]
fn invalid_requests_are_refused_at_submit_naming_the_parameter() {
    let e = start("llama", EngineConfig::default());
    let submit = |prompt: Vec<u32>, params: SamplingParams| match e.submit(GenerateRequest { prompt, params })
    {
        Err(err) => err,
        Ok(h) => panic!("accepted: {}", h.id()),
    };
    let bad = submit(
        vec![1],
        SamplingParams {
            temperature: 5.0,
            ..greedy(4)
        },
    );
    assert!(
        matches!(bad, SubmitError::InvalidParameter(ref p) if p.param == "temperature"),
        "{bad:?}"
    );
    assert!(matches!(submit(vec![], greedy(4)), SubmitError::InvalidPrompt(_)));
    let outside = submit(vec![100_000], greedy(4));
    assert!(
        matches!(outside, SubmitError::InvalidPrompt(ref m) if m.contains("100000")),
        "{outside:?}"
    );
    // The numbers come with the error: a prompt that fills the context, and a prompt
    // plus max_tokens past it.
    let long = submit(filler(2048, 0), greedy(4));
    assert_eq!(
        long,
        SubmitError::ContextLengthExceeded {
            prompt_tokens: 2048,
            max_tokens: None,
            limit: 2048,
            by_kv_pool: false,
        }
    );
    assert!(long.to_string().contains("2048"), "{long}");
    let too_many = submit(filler(2000, 0), greedy(100));
    assert!(
        matches!(
            too_many,
            SubmitError::ContextLengthExceeded {
                prompt_tokens: 2000,
                max_tokens: Some(100),
                ..
            }
        ),
        "{too_many:?}"
    );
    assert!(
        too_many.to_string().contains("2000") && too_many.to_string().contains("100"),
        "{too_many}"
    );
}

#[test]
fn n_choices_logprobs_and_prompt_logprobs() {
    let e = start("qwen3_moe", EngineConfig::default());
    let prompt = filler(40, 9);
    let o = run(
        &e,
        &prompt,
        SamplingParams {
            n: 3,
            ..seeded(12, 5)
        },
    );
    assert_eq!(o.choices.len(), 3);
    assert!(o
        .choices
        .iter()
        .all(|c| c.tokens.len() == 12 && c.finish == Some(FinishReason::Length)));
    assert_ne!(
        o.choices[0].tokens, o.choices[1].tokens,
        "different seeds per choice"
    );
    assert_eq!(o.usage.completion_tokens, 36);
    assert_eq!(o.usage.prompt_tokens, 40);
    // The same request again samples the same three choices.
    let again = run(
        &e,
        &prompt,
        SamplingParams {
            n: 3,
            ..seeded(12, 5)
        },
    );
    assert_eq!(again.choices, o.choices);

    let o = run(
        &e,
        &prompt,
        SamplingParams {
            logprobs: Some(3),
            prompt_logprobs: Some(2),
            ..greedy(5)
        },
    );
    let c = &o.choices[0];
    assert_eq!(c.logprobs.len(), 5);
    for (lp, &t) in c.logprobs.iter().zip(&c.tokens) {
        assert_eq!(
            (lp.token, lp.top.len(), lp.top[0].0),
            (t, 3, t),
            "greedy picks the top token"
        );
        assert!(lp.logprob <= 0.0 && (lp.logprob - lp.top[0].1).abs() < 1e-6);
    }
    let plp = o.prompt_logprobs.expect("prompt logprobs");
    assert_eq!(plp.len(), prompt.len());
    assert!(plp[0].is_none());
    for (i, lp) in plp.iter().enumerate().skip(1) {
        let lp = lp.as_ref().unwrap();
        assert_eq!((lp.token, lp.top.len()), (prompt[i], 2));
    }
}

#[test]
fn a_full_queue_refuses_at_once() {
    let e = start(
        "qwen3_moe",
        EngineConfig {
            max_num_seqs: 1,
            max_waiting_requests: 2,
            ..EngineConfig::default()
        },
    );
    let long = || GenerateRequest {
        prompt: filler(8, 1),
        params: SamplingParams {
            ignore_eos: true,
            ..greedy(1500)
        },
    };
    // One runs, two wait, the fourth is refused.
    let mut held = vec![e.submit(long()).unwrap()];
    wait_until("the first to run", || {
        e.stats().running.load(Ordering::Relaxed) == 1
    });
    held.push(e.submit(long()).unwrap());
    held.push(e.submit(long()).unwrap());
    assert_eq!(
        e.submit(long()).err(),
        Some(SubmitError::QueueFull { waiting: 2, limit: 2 })
    );
    drop(held);
    wait_until("the queue to drain", || {
        e.stats().waiting.load(Ordering::Relaxed) == 0
    });
    assert!(e.submit(long()).is_ok());
}

#[test]
fn a_reasoning_budget_closes_the_thought_after_that_many_tokens() {
    // The fixture has no <think> tokens; any two ids serve to test the mechanism.
    let e = start("llama", EngineConfig::default());
    let prompt = filler(10, 4);
    let free = run(&e, &prompt, greedy(30));
    let (start_token, end_token) = (300, 301);
    assert!(!free.choices[0].tokens[..12].contains(&end_token));
    let budget = crate::sampling::Reasoning {
        max_tokens: Some(7),
        start_token,
        end_token,
        starts_open: true,
    };
    let o = run(
        &e,
        &prompt,
        SamplingParams {
            reasoning: Some(budget),
            ..greedy(30)
        },
    );
    let t = &o.choices[0].tokens;
    assert_eq!(
        t[..7],
        free.choices[0].tokens[..7],
        "the thought runs freely up to its budget"
    );
    assert_eq!(t[7], end_token, "then it is closed");
    assert_eq!(t.len(), 30, "and the answer follows");
}

fn constraint(e: &Engine, spec: crate::grammar::ConstraintSpec) -> Option<Arc<crate::grammar::Constraint>> {
    let compiler = crate::grammar::GrammarCompiler::new(e.codec(), e.limits().vocab_size).unwrap();
    Some(Arc::new(compiler.compile(&spec).unwrap()))
}

/// Structured outputs end to end in the engine, on a random model that left to itself
/// writes no JSON: greedy and sampled choices (n = 3) all follow the schema and stop when
/// it is complete; tokens the grammar forces (the keys) come without a forward each;
/// the same seed gives the same output; logprobs are of the masked distribution.
#[test]
fn constrained_outputs_follow_their_grammar() {
    use crate::grammar::ConstraintSpec;
    let e = start("llama", EngineConfig::default());
    let schema = serde_json::json!({"type": "object", "properties": {
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["red", "green"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}},
        "required": ["count", "kind", "tags"], "additionalProperties": false});
    let c = constraint(&e, ConstraintSpec::JsonSchema(schema));
    let valid = |text: &str| {
        let v: serde_json::Value =
            serde_json::from_str(text).unwrap_or_else(|err| panic!("{text:?} is not JSON: {err}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 3, "{text}");
        assert!(o["count"].as_u64().is_some_and(|n| n <= 999), "{text}");
        assert!(["red", "green"].contains(&o["kind"].as_str().unwrap()), "{text}");
        let tags = o["tags"].as_array().unwrap();
        assert!(
            tags.len() <= 2 && tags.iter().all(|t| t.as_str().unwrap().chars().count() <= 4),
            "{text}"
        );
    };
    let prompt = filler(12, 1);
    let steps = e.stats().steps.load(Ordering::Relaxed);
    let o = run(
        &e,
        &prompt,
        SamplingParams {
            constraint: c.clone(),
            ..SamplingParams::greedy(120)
        },
    );
    let steps = e.stats().steps.load(Ordering::Relaxed) - steps;
    let g = &o.choices[0];
    valid(&g.text);
    assert_eq!(g.finish, Some(FinishReason::Stop));
    assert!(
        (steps as usize) < g.tokens.len(),
        "{steps} steps for {} tokens: forced tokens need no forward",
        g.tokens.len()
    );
    assert!(e.stats().constraint_ns.load(Ordering::Relaxed) > 0);

    let sampled = |seed| {
        run(
            &e,
            &prompt,
            SamplingParams {
                n: 3,
                temperature: 1.0,
                seed: Some(seed),
                max_tokens: Some(120),
                constraint: c.clone(),
                ..SamplingParams::default()
            },
        )
    };
    let a = sampled(7);
    for ch in &a.choices {
        valid(&ch.text);
        assert_eq!(ch.finish, Some(FinishReason::Stop));
    }
    assert_eq!(a.choices, sampled(7).choices, "the same seed, the same choices");

    // Logprobs come from the masked distribution: every alternative continues a choice.
    let words = ["alpha", "beta gamma"];
    let c = constraint(&e, ConstraintSpec::Choice(words.map(String::from).to_vec()));
    let o = run(
        &e,
        &prompt,
        SamplingParams {
            logprobs: Some(5),
            top_p: 0.9,
            seed: Some(3),
            constraint: c,
            ..SamplingParams::greedy(20)
        },
    );
    let ch = &o.choices[0];
    assert!(words.contains(&ch.text.as_str()), "{:?}", ch.text);
    let first = &ch.logprobs[0];
    assert!(!first.top.is_empty());
    for &(t, lp) in &first.top {
        let s = e.codec().decode(&[t], false).unwrap();
        assert!(lp.is_finite() && words.iter().any(|w| w.starts_with(&s)), "{s:?}");
    }
    let total: f32 = first.top.iter().map(|&(_, lp)| lp.exp()).sum();
    assert!(total <= 1.0 + 1e-4, "{total}");
}

/// Inside a reasoning model's thought the grammar does not apply; it starts after the
/// thought's end token.
#[test]
fn the_grammar_starts_after_the_thought() {
    use crate::grammar::ConstraintSpec;
    let e = start("llama", EngineConfig::default());
    let prompt = filler(10, 4);
    let (start_token, end_token) = (300, 301);
    let free = run(&e, &prompt, greedy(6));
    let o = run(
        &e,
        &prompt,
        SamplingParams {
            reasoning: Some(crate::sampling::Reasoning {
                max_tokens: Some(6),
                start_token,
                end_token,
                starts_open: true,
            }),
            constraint: constraint(&e, ConstraintSpec::Regex("[0-9]{2,4}".into())),
            ..SamplingParams::greedy(40)
        },
    );
    let t = &o.choices[0].tokens;
    assert_eq!(t[..6], free.choices[0].tokens[..6], "the thought is free");
    assert_eq!(t[6], end_token);
    let answer = e.codec().decode(&t[7..], false).unwrap();
    assert!(
        (2..=4).contains(&answer.len()) && answer.bytes().all(|b| b.is_ascii_digit()),
        "{answer:?}"
    );
}

/// Constrained sequences that are preempted (their blocks freed, recomputed later) keep
/// their matcher where it was: the same outputs as with room to spare, all in the
/// grammar's language, and no block leaked.
#[test]
fn preempted_constrained_sequences_finish_identically() {
    use crate::grammar::ConstraintSpec;
    let (want, got, tiny) =
        under_preemption(|e| constraint(e, ConstraintSpec::Regex("[a-z]+( [a-z]+)*".into())));
    for (k, (a, b)) in want.iter().zip(&got).enumerate() {
        assert_eq!(a.choices, b.choices, "request {k}");
        let text = &b.choices[0].text;
        assert!(
            text.trim_end()
                .split(' ')
                .all(|w| !w.is_empty() && w.bytes().all(|c| c.is_ascii_lowercase())),
            "{text:?}"
        );
    }
    assert!(tiny.stats().preemptions.load(Ordering::Relaxed) > 0);
    wait_until("blocks to be freed", || {
        tiny.stats().kv_blocks_used.load(Ordering::Relaxed) == 0
    });
}

fn with_speculation(method: crate::spec::SpeculativeMethod, ngram_min: usize) -> EngineConfig {
    EngineConfig {
        speculative: crate::spec::SpeculativeConfig {
            method,
            num_speculative_tokens: 4,
            ngram_min,
            ngram_max: 4,
            // Drafts in every step, so that they are checked among 16 others too.
            disable_by_batch_size: 0,
        },
        ..EngineConfig::default()
    }
}

/// Greedy output is the same with speculation on and off (n-gram drafts, and DeepSeek's
/// MTP module on the fixture that has one): alone and among 16 others, with stop
/// strings, max_tokens and n > 1, and under preemption; every KV block comes back. The
/// random fixtures fall into loops, where n-gram drafts are accepted (checked); the
/// random MTP module drafts at every decoding step (checked) and is right now and then.
#[test]
fn greedy_outputs_are_identical_with_speculation_on_and_off() {
    use crate::spec::SpeculativeMethod;
    for (name, on) in [
        ("qwen3_moe", SpeculativeMethod::Ngram),
        ("llama", SpeculativeMethod::Ngram),
        ("deepseek_v3", SpeculativeMethod::Ngram),
        ("deepseek_v3_mtp", SpeculativeMethod::Mtp),
    ] {
        let mut runs = Vec::new();
        for (method, pool) in [(SpeculativeMethod::None, 256 << 20), (on, 256 << 20), (on, 0)] {
            let mut cfg = with_speculation(method, 1);
            if pool == 0 {
                // 12 blocks for 17 requests that need 3 to 5 each: preemption.
                let loaded = load(name, &LoadOptions::default());
                cfg.kv_cache_memory = loaded.model.kv_layout().bytes_per_token() * 16 * 12;
            }
            let e = start(name, cfg);
            let mut requests: Vec<(Vec<u32>, SamplingParams)> = reference_prompts(name)
                .into_iter()
                .map(|(p, _)| (p, greedy(40)))
                .collect();
            for k in 0..14 {
                let mut params = greedy(10 + 3 * k);
                if k % 4 == 1 {
                    params.n = 2;
                }
                if k % 4 == 2 {
                    // A stop string made of the text greedy decoding produces.
                    params.stop = vec!["a".into(), "e ".into()];
                }
                requests.push((filler(8 + 5 * k, k), params));
            }
            let alone: Vec<Outcome> = requests.iter().map(|(p, s)| run(&e, p, s.clone())).collect();
            let handles: Vec<_> = requests
                .iter()
                .map(|(p, s)| {
                    e.submit(GenerateRequest {
                        prompt: p.clone(),
                        params: s.clone(),
                    })
                    .unwrap()
                })
                .collect();
            let together: Vec<Outcome> = handles.into_iter().map(collect).collect();
            wait_until("blocks to be freed", || {
                e.stats().kv_blocks_used.load(Ordering::Relaxed) == 0
            });
            let s = e.stats();
            runs.push((
                alone,
                together,
                s.spec_accepted_tokens.load(Ordering::Relaxed),
                s.preemptions.load(Ordering::Relaxed),
                s.spec_drafts.load(Ordering::Relaxed),
            ));
        }
        let (base, ..) = &runs[0];
        for (i, (alone, together, accepted, preemptions, drafts)) in runs.iter().enumerate() {
            for (k, o) in base.iter().enumerate() {
                assert_eq!(alone[k].choices, o.choices, "{name} run {i} request {k} alone");
                assert_eq!(
                    together[k].choices, o.choices,
                    "{name} run {i} request {k} in a batch"
                );
            }
            if i > 0 && on == SpeculativeMethod::Ngram {
                assert!(
                    *accepted > 10,
                    "{name} run {i}: only {accepted} drafted tokens accepted"
                );
            }
            if i > 0 && on == SpeculativeMethod::Mtp {
                // Every decoding step after the first drafts (a few pause after misses).
                assert!(*drafts > 200, "{name} run {i}: only {drafts} drafts");
                eprintln!("{name} run {i}: {drafts} MTP drafts, {accepted} accepted");
            }
            if i == 2 {
                assert!(*preemptions > 0, "{name}: the small pool was meant to preempt");
            }
        }
    }
}

/// Sampled output keeps the model's distribution with speculation on. A logit bias
/// confines the model to three tokens (their relative probabilities still the model's,
/// in context), and the prompt is made of them, so the n-gram proposer drafts at every
/// step and about a third of the drafts are right (checked); 3,000 seeded 4-token
/// samples at temperature 1 with speculation off and 3,000 with other seeds on, their 81 possible sequences
/// compared by a two-sample chi-square test at the 0.999 level (sequences drawn fewer
/// than 10 times in all pooled).
#[test]
fn sampled_outputs_keep_their_distribution_with_speculation() {
    use crate::spec::SpeculativeMethod;
    let prompt: Vec<u32> = [40u32, 41, 42, 42, 40, 41, 41, 42, 40, 40, 42, 41].repeat(3);
    let draws = |method, seeds: std::ops::Range<u64>| {
        let e = start("qwen3_moe", with_speculation(method, 1));
        let mut samples: Vec<Vec<u32>> = Vec::new();
        for chunk in seeds.collect::<Vec<_>>().chunks(64) {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&seed| {
                    let params = SamplingParams {
                        temperature: 1.0,
                        seed: Some(seed * 7919),
                        max_tokens: Some(4),
                        ignore_eos: true,
                        logit_bias: vec![(40, 40.0), (41, 40.0), (42, 40.0)],
                        ..SamplingParams::default()
                    };
                    e.submit(GenerateRequest {
                        prompt: prompt.clone(),
                        params,
                    })
                    .unwrap()
                })
                .collect();
            samples.extend(handles.into_iter().map(|h| collect(h).choices[0].tokens.clone()));
        }
        let s = e.stats();
        let drafted = s.spec_draft_tokens.load(Ordering::Relaxed);
        let accepted = s.spec_accepted_tokens.load(Ordering::Relaxed);
        (samples, drafted, accepted)
    };
    // Other seeds for the run with speculation: with the same seeds the samples are the
    // same ones (each token is drawn from the same distribution with the same random
    // number either way), which is checked too but would make the test vacuous.
    let (off, _, _) = draws(SpeculativeMethod::None, 0..3000);
    let (on, drafted, accepted) = draws(SpeculativeMethod::Ngram, 3000..6000);
    let (same_seeds, _, _) = draws(SpeculativeMethod::Ngram, 0..3000);
    assert_eq!(same_seeds, off);
    assert!(
        accepted * 5 > drafted && accepted > 1000,
        "the test needs drafts accepted: {accepted} of {drafted}"
    );
    let count = |s: &[Vec<u32>]| {
        let mut c: HashMap<Vec<u32>, f64> = HashMap::new();
        for t in s {
            *c.entry(t.clone()).or_default() += 1.0;
        }
        c
    };
    let (a, b) = (count(&off), count(&on));
    let mut keys: Vec<&Vec<u32>> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let (mut chi2, mut bins, mut pooled) = (0.0, 0usize, (0.0, 0.0));
    for k in keys {
        let (x, y) = (a.get(k).copied().unwrap_or(0.0), b.get(k).copied().unwrap_or(0.0));
        if x + y < 10.0 {
            pooled = (pooled.0 + x, pooled.1 + y);
        } else {
            chi2 += (x - y).powi(2) / (x + y);
            bins += 1;
        }
    }
    if pooled.0 + pooled.1 > 0.0 {
        chi2 += (pooled.0 - pooled.1).powi(2) / (pooled.0 + pooled.1);
        bins += 1;
    }
    assert!(bins >= 10, "too few distinct samples for the test: {bins}");
    let df = (bins - 1) as f64;
    // The 0.999 quantile of chi-square with df degrees of freedom (Wilson-Hilferty).
    let z = 3.09;
    let critical = df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3);
    eprintln!("chi-square {chi2:.1} over {bins} bins, critical {critical:.1}; {accepted} of {drafted} drafted accepted");
    assert!(
        chi2 < critical,
        "chi-square {chi2:.1} over {bins} bins exceeds {critical:.1}"
    );
}

/// The fixture's MTP module with an answer key: the module runs as it is (its KV upkeep
/// one token behind the main model, over the positions each step kept), then its guess
/// for the token after position i is replaced by the known greedy token there. So every
/// draft is right, and the engine's bookkeeping of accepted MTP drafts (two tokens per
/// step, the module run over both kept positions next) is what the test checks.
struct MtpWithAnswerKey {
    inner: Box<dyn crate::models::CausalLm>,
    /// The whole greedy sequence of the one request: prompt, then output.
    answer: Vec<u32>,
}

impl crate::models::CausalLm for MtpWithAnswerKey {
    fn config(&self) -> &crate::config::ModelConfig {
        self.inner.config()
    }

    fn kv_layout(&self) -> crate::kv::KvLayout {
        self.inner.kv_layout()
    }

    fn device(&self) -> &candle_core::Device {
        self.inner.device()
    }

    fn backend(&self) -> crate::backend::Backend {
        self.inner.backend()
    }

    fn forward(
        &self,
        batch: &crate::ForwardBatch,
        kv: &mut crate::KvStorage,
    ) -> crate::Result<crate::ForwardOutput> {
        self.inner.forward(batch, kv)
    }

    fn has_mtp(&self) -> bool {
        true
    }

    fn forward_mtp(
        &self,
        batch: &crate::ForwardBatch,
        hidden: &candle_core::Tensor,
        kv: &mut crate::KvStorage,
    ) -> crate::Result<crate::ForwardOutput> {
        let mut out = self.inner.forward_mtp(batch, hidden, kv)?;
        let mut rows = out.logits.to_vec2::<f32>()?;
        for (s, r) in batch.seqs.iter().zip(&out.rows) {
            if let (Some(last), Some(&want)) = (
                r.clone().last(),
                self.answer.get(s.start_pos + s.tokens.len() + 1),
            ) {
                rows[last][want as usize] = 1e6;
            }
        }
        out.logits = candle_core::Tensor::new(rows, out.logits.device())?;
        Ok(out)
    }
}

/// With MTP drafts that are always right, greedy output is still the output without
/// speculation, about half the tokens come from accepted drafts, and the pool is whole.
#[test]
fn accepted_mtp_drafts_keep_greedy_output_and_the_pool() {
    use crate::spec::SpeculativeMethod;
    let name = "deepseek_v3_mtp";
    let (prompt, _) = reference_prompts(name).remove(2);
    let off = run(&start(name, EngineConfig::default()), &prompt, greedy(48));
    let mut answer = prompt.clone();
    answer.extend(&off.choices[0].tokens);
    let loaded = load(name, &LoadOptions::default());
    let model = Box::new(MtpWithAnswerKey {
        inner: loaded.model,
        answer,
    });
    let e = Engine::start(
        model,
        Arc::new(loaded.codec),
        with_speculation(SpeculativeMethod::Mtp, 1),
    )
    .unwrap();
    let on = run(&e, &prompt, greedy(48));
    assert_eq!(on.choices, off.choices);
    let s = e.stats();
    let (drafts, accepted) = (
        s.spec_drafts.load(Ordering::Relaxed),
        s.spec_accepted_tokens.load(Ordering::Relaxed),
    );
    assert_eq!(accepted, drafts, "every draft was right");
    assert!(accepted >= 22, "{accepted} of 47 tokens came from drafts");
    assert_eq!(s.steps.load(Ordering::Relaxed), 1 + 47 - accepted);
    wait_until("blocks to be freed", || {
        s.kv_blocks_used.load(Ordering::Relaxed) == 0
    });
}

/// An engine whose prefix cache also keeps blocks under `dir`.
fn start_with_disk(name: &str, dir: &std::path::Path, max_bytes: u64, cfg: EngineConfig) -> Engine {
    start_with_disk_opts(name, dir, max_bytes, cfg, &LoadOptions::default())
}

fn start_with_disk_opts(
    name: &str,
    dir: &std::path::Path,
    max_bytes: u64,
    cfg: EngineConfig,
    opts: &LoadOptions,
) -> Engine {
    let loaded = load(name, opts);
    let weights_identity = crate::kv::disk::weights_identity(&loaded.weight_files).unwrap();
    let cfg = EngineConfig {
        prefix_cache_disk: Some(DiskCacheConfig {
            dir: dir.to_path_buf(),
            max_bytes,
            weights_identity,
        }),
        ..cfg
    };
    Engine::start(loaded.model, Arc::new(loaded.codec), cfg).unwrap()
}

fn block_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = vec![];
    for sub in std::fs::read_dir(dir).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "kv") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

fn disk_hits(e: &Engine) -> u64 {
    e.stats().prefix_disk_hits.load(Ordering::Relaxed)
}

/// The same prompt run cold (no prefix cache at all) for the reference output.
fn cold_run(name: &str, prompt: &[u32], max: usize) -> Outcome {
    let cold = start(
        name,
        EngineConfig {
            enable_prefix_caching: false,
            ..EngineConfig::default()
        },
    );
    run(&cold, prompt, greedy(max))
}

/// A prefix computed before a restart is read from disk after it: the second engine
/// computes only the tokens past the shared blocks, and answers exactly as a cold run.
/// On the DeepSeek fixture (latent attention: the compressed KV goes to disk) and a
/// grouped-query MoE.
#[test]
fn a_prefix_is_served_from_disk_after_a_restart() {
    for name in ["deepseek_v3", "qwen3_moe"] {
        let tmp = tempfile::tempdir().unwrap();
        let prefix = filler(1000, 5);
        let with = |suffix: &[u32]| prefix.iter().chain(suffix).copied().collect::<Vec<u32>>();
        let (a, b) = (with(&[10, 11, 12]), with(&[20, 21, 22, 23, 24]));
        let want = cold_run(name, &b, 16);

        let first = start_with_disk(name, tmp.path(), 1 << 30, EngineConfig::default());
        assert_eq!(run(&first, &a, greedy(16)).usage.cached_tokens, 0);
        assert!(first.flush_prefix_cache(Duration::from_secs(10)));
        assert_eq!(disk_hits(&first), 0, "{name}: nothing to read from disk yet");
        drop(first);
        // 1003 prompt tokens + 15 computed outputs: 63 full blocks.
        assert_eq!(block_files(tmp.path()).len(), 63, "{name}");

        let second = start_with_disk(name, tmp.path(), 1 << 30, EngineConfig::default());
        let got = run(&second, &b, greedy(16));
        assert_eq!(got.usage.cached_tokens, 992, "{name}: 62 blocks from disk");
        assert_eq!(disk_hits(&second), 62, "{name}");
        assert_eq!(
            got.choices, want.choices,
            "{name}: the same greedy output as cold"
        );
        // Now in the pool: a third request shares them from there.
        let again = run(&second, &b, greedy(16));
        assert_eq!(again.usage.cached_tokens, 992);
        assert_eq!(disk_hits(&second), 62, "{name}: the pool answered");
        assert_eq!(again.choices, want.choices, "{name}");
    }
}

/// Blocks the pool evicted come back from disk within one process too.
#[test]
fn blocks_evicted_from_a_small_pool_are_read_back_from_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "qwen3_moe";
    let a = filler(600, 7);
    let want = cold_run(name, &a, 8);
    // A pool of 50 blocks (800 tokens): the second prompt evicts the first one's blocks.
    let bytes_per_block = {
        let loaded = load(name, &LoadOptions::default());
        loaded.model.kv_layout().bytes_per_token() * 16
    };
    let cfg = EngineConfig {
        kv_cache_memory: 50 * bytes_per_block,
        ..EngineConfig::default()
    };
    let e = start_with_disk(name, tmp.path(), 1 << 30, cfg);
    assert_eq!(run(&e, &a, greedy(8)).usage.cached_tokens, 0);
    assert!(e.flush_prefix_cache(Duration::from_secs(10)));
    run(&e, &filler(700, 8), greedy(8));
    assert!(e.flush_prefix_cache(Duration::from_secs(10)));
    let got = run(&e, &a, greedy(8));
    assert!(disk_hits(&e) > 0, "evicted blocks came from disk");
    assert_eq!(got.usage.cached_tokens, 592);
    assert_eq!(got.choices, want.choices);
    wait_until("blocks released", || {
        e.stats().kv_blocks_used.load(Ordering::Relaxed) == 0
    });
}

/// A corrupt or truncated block file is a miss (and is removed): the prefix is served up
/// to the block before it, and the answer is the cold one.
#[test]
fn corrupt_and_truncated_block_files_are_misses() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "qwen3";
    let a = filler(300, 9);
    let want = cold_run(name, &a, 8);
    let first = start_with_disk(name, tmp.path(), 1 << 30, EngineConfig::default());
    run(&first, &a, greedy(8));
    drop(first);
    // Which file holds which block: by the chained hashes of the prompt's blocks.
    let mut hashes = vec![];
    for b in 0..a.len() / 16 {
        hashes.push(crate::kv::block_hash(
            hashes.last().copied().unwrap_or(0),
            &a[b * 16..(b + 1) * 16],
        ));
    }
    let files = block_files(tmp.path());
    let file_of = |h: u64| {
        files
            .iter()
            .find(|p| p.file_stem().unwrap().to_string_lossy() == format!("{h:016x}"))
            .unwrap()
            .clone()
    };
    // Block 5: one payload byte flipped. Block 17: cut short. (The loader reads 16
    // blocks at a time, 4 files at once; block 17 is in the window after block 5's, so
    // the miss at 5 keeps it unread.)
    let five = file_of(hashes[5]);
    let mut bytes = std::fs::read(&five).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&five, bytes).unwrap();
    let late = file_of(hashes[17]);
    let bytes = std::fs::read(&late).unwrap();
    let late_len = bytes.len();
    std::fs::write(&late, &bytes[..bytes.len() - 100]).unwrap();

    let second = start_with_disk(name, tmp.path(), 1 << 30, EngineConfig::default());
    let got = run(&second, &a, greedy(8));
    assert_eq!(got.usage.cached_tokens, 5 * 16, "blocks 0-4 only");
    assert_eq!(got.choices, want.choices);
    let corrupt = second
        .disk_tier()
        .unwrap()
        .stats()
        .corrupt
        .load(Ordering::Relaxed);
    assert_eq!(corrupt, 1);
    // Removed, then recomputed and written again (the third engine reads through it).
    assert!(second.flush_prefix_cache(Duration::from_secs(10)));
    assert_eq!(five.metadata().unwrap().len(), late_len as u64);
    let again = run(&second, &a, greedy(8));
    assert_eq!(again.choices, want.choices);
    drop(second);
    let third = start_with_disk(name, tmp.path(), 1 << 30, EngineConfig::default());
    let got = run(&third, &a, greedy(8));
    assert_eq!(got.choices, want.choices);
    assert_eq!(
        got.usage.cached_tokens,
        17 * 16,
        "stops at the truncated block 17"
    );
    assert_eq!(
        third.disk_tier().unwrap().stats().corrupt.load(Ordering::Relaxed),
        1
    );
    assert!(third.flush_prefix_cache(Duration::from_secs(10)));
    assert_eq!(late.metadata().unwrap().len(), late_len as u64, "rewritten whole");
}

/// Another model, or the same model with another KV dtype, on the same directory gets
/// its own subdirectory and none of the first one's blocks.
#[test]
fn another_model_or_kv_dtype_gets_no_hits() {
    let tmp = tempfile::tempdir().unwrap();
    let a = filler(300, 11);
    let first = start_with_disk("qwen3_moe", tmp.path(), 1 << 30, EngineConfig::default());
    run(&first, &a, greedy(4));
    drop(first);
    let other = start_with_disk("qwen3", tmp.path(), 1 << 30, EngineConfig::default());
    assert_eq!(run(&other, &a, greedy(4)).usage.cached_tokens, 0);
    assert_eq!(disk_hits(&other), 0);
    drop(other);
    let f16 = LoadOptions {
        kv_cache_dtype: Some(crate::kv::KvDtype::F16),
        ..LoadOptions::default()
    };
    let half = start_with_disk_opts("qwen3_moe", tmp.path(), 1 << 30, EngineConfig::default(), &f16);
    assert_eq!(run(&half, &a, greedy(4)).usage.cached_tokens, 0);
    drop(half);
    let block32 = EngineConfig {
        block_size: 32,
        ..EngineConfig::default()
    };
    let other_blocks = start_with_disk("qwen3_moe", tmp.path(), 1 << 30, block32);
    assert_eq!(run(&other_blocks, &a, greedy(4)).usage.cached_tokens, 0);
    drop(other_blocks);
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        4,
        "one subdirectory each"
    );
    // The first model still finds its own.
    let back = start_with_disk("qwen3_moe", tmp.path(), 1 << 30, EngineConfig::default());
    assert_eq!(run(&back, &a, greedy(4)).usage.cached_tokens, 288);
}

/// The disk tier keeps to its byte bound, dropping the least recently used blocks.
#[test]
fn the_disk_tier_keeps_its_byte_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "qwen3";
    let e = start_with_disk(name, tmp.path(), 1 << 30, EngineConfig::default());
    run(&e, &filler(40, 1), greedy(1));
    assert!(e.flush_prefix_cache(Duration::from_secs(10)));
    let record = e.disk_tier().unwrap().store().bytes_on_disk() / 2;
    drop(e);
    let bound = 20 * record;
    let e = start_with_disk(name, tmp.path(), bound, EngineConfig::default());
    for salt in 0..4 {
        run(&e, &filler(200, 20 + salt), greedy(1));
    }
    let tier = e.disk_tier().unwrap();
    assert!(tier.flush(Duration::from_secs(10)));
    assert_eq!(tier.store().len(), 20);
    assert!(tier.store().bytes_on_disk() <= bound);
    let on_disk: u64 = block_files(tmp.path())
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .sum();
    assert!(on_disk <= bound, "{on_disk} bytes on disk, bound {bound}");
    // The newest prompt's blocks are the ones kept.
    drop(e);
    let e = start_with_disk(name, tmp.path(), bound, EngineConfig::default());
    assert_eq!(run(&e, &filler(200, 23), greedy(1)).usage.cached_tokens, 192);
}

/// Held by the tests that slow the disk loader down (its delay is process-wide).
static SLOW_LOADER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// While a request's prefix is read from disk, the running sequences keep decoding and
/// the request is admitted once its blocks have arrived; a request dropped while it
/// waits for the disk leaves nothing behind.
#[test]
fn other_sequences_decode_while_a_prefix_loads_from_disk() {
    let _slow_loader = SLOW_LOADER.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let name = "qwen3";
    let (a, c) = (filler(600, 31), filler(600, 32));
    let want = cold_run(name, &a, 4);
    let first = start_with_disk(name, tmp.path(), 1 << 30, EngineConfig::default());
    run(&first, &a, greedy(4));
    run(&first, &c, greedy(4));
    drop(first);

    let e = Arc::new(start_with_disk(
        name,
        tmp.path(),
        1 << 30,
        EngineConfig::default(),
    ));
    let long = e
        .submit(GenerateRequest {
            prompt: filler(20, 33),
            params: greedy(1500),
        })
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let streamer = std::thread::spawn(move || {
        let mut h = long;
        while let Some(ev) = h.blocking_next() {
            if matches!(ev, EngineEvent::Delta { .. }) {
                let _ = tx.send(Instant::now());
            }
            if matches!(ev, EngineEvent::Done(_)) {
                break;
            }
        }
    });
    rx.recv().unwrap();
    super::disk_load::LOAD_DELAY_MS.store(400, Ordering::Relaxed);
    let asked = Instant::now();
    let got = run(&e, &a, greedy(4));
    let answered = Instant::now();
    // The abandoned one: submitted, dropped while its blocks load.
    let dropped = e
        .submit(GenerateRequest {
            prompt: c.clone(),
            params: greedy(4),
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(dropped);
    super::disk_load::LOAD_DELAY_MS.store(0, Ordering::Relaxed);
    assert!(answered - asked >= Duration::from_millis(400));
    assert_eq!(got.usage.cached_tokens, 592);
    assert_eq!(got.choices, want.choices);
    assert_eq!(disk_hits(&e), 37);
    let during = rx
        .try_iter()
        .filter(|t| *t > asked && *t < asked + Duration::from_millis(400))
        .count();
    assert!(
        during > 20,
        "the stream got {during} tokens while the prefix loaded"
    );
    streamer.join().unwrap();
    wait_until("all blocks released", || {
        e.stats().kv_blocks_used.load(Ordering::Relaxed) == 0
            && e.stats().waiting.load(Ordering::Relaxed) == 0
    });
    // The dropped request's blocks were dropped with it; C is read again.
    let again = run(&e, &c, greedy(4));
    assert_eq!(again.usage.cached_tokens, 592);
    assert_eq!(again.choices, cold_run(name, &c, 4).choices);
}

/// A burst of requests sharing one prefix after a restart reads it from disk once: the
/// later ones wait for the first one's load.
#[test]
fn a_burst_on_one_prefix_reads_it_from_disk_once() {
    let _slow_loader = SLOW_LOADER.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let name = "qwen3";
    let prefix = filler(600, 41);
    let with = |s: u32| prefix.iter().copied().chain([s, s + 1]).collect::<Vec<u32>>();
    let first = start_with_disk(name, tmp.path(), 1 << 30, EngineConfig::default());
    run(&first, &with(5), greedy(2));
    drop(first);
    let e = start_with_disk(name, tmp.path(), 1 << 30, EngineConfig::default());
    super::disk_load::LOAD_DELAY_MS.store(200, Ordering::Relaxed);
    let handles: Vec<RequestHandle> = (0..4)
        .map(|i| {
            e.submit(GenerateRequest {
                prompt: with(10 + 2 * i),
                params: greedy(2),
            })
            .unwrap()
        })
        .collect();
    let outcomes: Vec<Outcome> = handles.into_iter().map(collect).collect();
    super::disk_load::LOAD_DELAY_MS.store(0, Ordering::Relaxed);
    for o in &outcomes {
        assert_eq!(o.usage.cached_tokens, 592);
    }
    assert_eq!(e.disk_tier().unwrap().stats().hits.load(Ordering::Relaxed), 37);
    assert_eq!(
        disk_hits(&e),
        4 * 37,
        "every request's shared blocks came from disk"
    );
}

/// A longer prompt does not settle for a shorter prompt's load of the same prefix; more
/// prefixes than loads may run at once wait their turn and all get their blocks.
#[test]
fn loads_cover_each_prompt_and_wait_their_turn() {
    let _slow_loader = SLOW_LOADER.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let name = "qwen3";
    let long = filler(900, 51);
    let others: Vec<Vec<u32>> = (0..6).map(|i| filler(300, 60 + i)).collect();
    let first = start_with_disk(name, tmp.path(), 1 << 30, EngineConfig::default());
    run(&first, &long, greedy(1));
    for p in &others {
        run(&first, p, greedy(1));
    }
    drop(first);
    let e = start_with_disk(name, tmp.path(), 1 << 30, EngineConfig::default());
    super::disk_load::LOAD_DELAY_MS.store(100, Ordering::Relaxed);
    let submit = |prompt: Vec<u32>| {
        e.submit(GenerateRequest {
            prompt,
            params: greedy(2),
        })
        .unwrap()
    };
    // The short one first: its load covers 37 blocks; the long one needs 56.
    let short = submit(long[..600].iter().copied().chain([1, 2]).collect());
    let whole = submit(long.iter().copied().chain([3]).collect());
    let rest: Vec<RequestHandle> = others
        .iter()
        .map(|p| submit(p.iter().copied().chain([4]).collect()))
        .collect();
    assert_eq!(collect(short).usage.cached_tokens, 592);
    assert_eq!(collect(whole).usage.cached_tokens, 896);
    for h in rest {
        assert_eq!(collect(h).usage.cached_tokens, 288);
    }
    super::disk_load::LOAD_DELAY_MS.store(0, Ordering::Relaxed);
    wait_until("all blocks released", || {
        e.stats().kv_blocks_used.load(Ordering::Relaxed) == 0
    });
}
