//! `moeserve-bench speculative`: what speculative decoding does to a running moeserve
//! server started with a speculative method (`--speculative-method ngram`).
//!
//! Every measurement runs twice on the same server, once with the request field
//! `speculative: false` and once without it, interleaved round by round so that both
//! meet the same machine state (this host's speed drifts from minute to minute). The
//! server's `spec_decode` counters, read around each speculative run, give its
//! acceptance: the share of drafted tokens accepted, and the mean accepted length (tokens
//! a sequence gains per drafted step, 1 + accepted / drafts, as vLLM reports it).
//!
//! Batch 1 runs echo-heavy prompts (rewrite a function with one name changed, copy a JSON
//! config with one value changed, repeat a list) and free text (a poem, an explanation),
//! greedy until end-of-sequence or `--max-tokens`, and reports each one's decode rate
//! (tokens after the first over the time after the first) and whether both outputs are
//! the same (greedy speculation is lossless). Then each `--concurrency` level runs that
//! many long-story streams of `--stream-tokens` tokens (ignore_eos) and reports output
//! tok/s.

use std::time::Instant;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::loadgen::{stream_chat, RequestResult};

#[derive(clap::Args)]
pub struct SpeculativeBenchArgs {
    /// Base URL of a moeserve server started with a speculative method.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Model id to request.
    #[arg(long)]
    model: String,
    /// Runs of each measurement with speculation off and on (interleaved).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// max_tokens of the batch-1 prompts (they end at end-of-sequence otherwise).
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Concurrency levels of the streaming comparison; empty skips it.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    concurrency: Vec<usize>,
    /// Tokens per stream at the concurrency levels (sent with ignore_eos).
    #[arg(long, default_value_t = 128)]
    stream_tokens: usize,
    /// Bearer key, if the server wants one.
    #[arg(long, env = "MOESERVE_API_KEY")]
    api_key: Option<String>,
    /// Print one JSON object per row instead of the table.
    #[arg(long)]
    json: bool,
}

/// The batch-1 prompts: (name, echo-heavy, prompt).
const PROMPTS: [(&str, bool, &str); 5] = [
    (
        "rewrite a 40-line function",
        true,
        include_str!("prompts/rewrite_function.txt"),
    ),
    ("copy a JSON config", true, include_str!("prompts/copy_json.txt")),
    ("repeat a list", true, include_str!("prompts/repeat_list.txt")),
    ("poem", false, include_str!("prompts/poem.txt")),
    ("explanation", false, include_str!("prompts/explanation.txt")),
];

/// The server's speculative-decoding counters.
#[derive(Debug, Default, Clone, Copy)]
struct SpecCounters {
    drafts: f64,
    draft_tokens: f64,
    accepted: f64,
}

impl SpecCounters {
    fn delta(self, before: SpecCounters) -> SpecCounters {
        SpecCounters {
            drafts: self.drafts - before.drafts,
            draft_tokens: self.draft_tokens - before.draft_tokens,
            accepted: self.accepted - before.accepted,
        }
    }

    fn add(&mut self, d: SpecCounters) {
        self.drafts += d.drafts;
        self.draft_tokens += d.draft_tokens;
        self.accepted += d.accepted;
    }

    fn acceptance_rate(&self) -> f64 {
        self.accepted / self.draft_tokens
    }

    fn mean_accepted_length(&self) -> f64 {
        1.0 + self.accepted / self.drafts
    }
}

async fn counters(client: &reqwest::Client, url: &str) -> SpecCounters {
    let Ok(resp) = client
        .get(format!("{}/metrics", url.trim_end_matches('/')))
        .send()
        .await
    else {
        return SpecCounters::default();
    };
    let text = resp.text().await.unwrap_or_default();
    let read = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    SpecCounters {
        drafts: read("moeserve_spec_decode_num_drafts_total"),
        draft_tokens: read("moeserve_spec_decode_num_draft_tokens_total"),
        accepted: read("moeserve_spec_decode_num_accepted_tokens_total"),
    }
}

fn body(
    args: &SpeculativeBenchArgs,
    prompt: &str,
    max_tokens: usize,
    ignore_eos: bool,
    speculative: bool,
) -> Value {
    let mut body = json!({"model": args.model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "ignore_eos": ignore_eos, "temperature": 0.0, "stream": true,
        "stream_options": {"include_usage": true}});
    if !speculative {
        body["speculative"] = json!(false);
    }
    body
}

/// Sums of one side (off or on) of a comparison.
#[derive(Debug, Default)]
struct Side {
    tokens: usize,
    seconds: f64,
    errors: usize,
    text: Option<String>,
    same_text: bool,
}

impl Side {
    fn rate(&self) -> f64 {
        self.tokens as f64 / self.seconds
    }
}

pub async fn run(args: SpeculativeBenchArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let warm = stream_chat(
        &client,
        &args.url,
        args.api_key.as_deref(),
        &body(&args, "Hello", 16, false, true),
        0,
    )
    .await;
    anyhow::ensure!(warm.ok, "the warm-up request to {} failed", args.url);
    anyhow::ensure!(
        !counters(&client, &args.url).await.drafts.is_nan(),
        "{} does not report moeserve_spec_decode counters (is it moeserve?)",
        args.url
    );
    if !args.json {
        println!("| workload | tokens | off tok/s | on tok/s | on / off | acceptance | mean accepted length | same output |");
        println!("|---|---:|---:|---:|---:|---:|---:|---|");
    }
    let rounds = args.rounds.max(1);
    for (name, echo, prompt) in PROMPTS {
        let mut sides = [
            Side {
                same_text: true,
                ..Side::default()
            },
            Side {
                same_text: true,
                ..Side::default()
            },
        ];
        let mut spec = SpecCounters::default();
        for _ in 0..rounds {
            for (side, speculative) in sides.iter_mut().zip([false, true]) {
                let before = counters(&client, &args.url).await;
                let r = stream_chat(
                    &client,
                    &args.url,
                    args.api_key.as_deref(),
                    &body(&args, prompt, args.max_tokens, false, speculative),
                    0,
                )
                .await;
                if speculative {
                    spec.add(counters(&client, &args.url).await.delta(before));
                }
                record(side, &r);
            }
        }
        let same = sides[0].same_text && sides[1].same_text && sides[0].text == sides[1].text;
        let label = format!("batch 1, {name} ({})", if echo { "echo" } else { "free text" });
        report(&args, &label, &sides, spec, Some(same));
    }
    for &c in &args.concurrency {
        let mut sides = [Side::default(), Side::default()];
        let mut spec = SpecCounters::default();
        for _ in 0..rounds {
            for (side, speculative) in sides.iter_mut().zip([false, true]) {
                let before = counters(&client, &args.url).await;
                let start = Instant::now();
                let results: Vec<RequestResult> = futures::stream::iter(0..c)
                    .map(|i| {
                        let prompt = format!(
                            "Request {i}: write a long story about a lighthouse keeper who finds a message \
                             in a bottle, with many details about the sea, the weather and the town."
                        );
                        let body = body(&args, &prompt, args.stream_tokens, true, speculative);
                        let client = &client;
                        let url = &args.url;
                        let key = args.api_key.as_deref();
                        async move { stream_chat(client, url, key, &body, i).await }
                    })
                    .buffer_unordered(c)
                    .collect()
                    .await;
                side.seconds += start.elapsed().as_secs_f64();
                if speculative {
                    spec.add(counters(&client, &args.url).await.delta(before));
                }
                for r in &results {
                    if r.ok {
                        side.tokens += r.tokens;
                    } else {
                        side.errors += 1;
                    }
                }
            }
        }
        report(
            &args,
            &format!("{c} streams, story (output tok/s)"),
            &sides,
            spec,
            None,
        );
    }
    Ok(())
}

/// Adds one batch-1 request to its side: decode tokens and time after the first token.
fn record(side: &mut Side, r: &RequestResult) {
    if !r.ok || r.tokens < 2 {
        side.errors += 1;
        return;
    }
    side.tokens += r.tokens - 1;
    side.seconds += r.e2e - r.ttft;
    match &side.text {
        None => side.text = Some(r.text.clone()),
        Some(t) => side.same_text &= *t == r.text,
    }
}

fn report(
    args: &SpeculativeBenchArgs,
    label: &str,
    sides: &[Side; 2],
    spec: SpecCounters,
    same: Option<bool>,
) {
    let [off, on] = sides;
    let row = json!({
        "workload": label, "tokens_per_run": on.tokens / args.rounds.max(1),
        "off_tok_s": off.rate(), "on_tok_s": on.rate(), "ratio": on.rate() / off.rate(),
        "acceptance_rate": spec.acceptance_rate(), "mean_accepted_length": spec.mean_accepted_length(),
        "drafts": spec.drafts, "draft_tokens": spec.draft_tokens, "accepted_tokens": spec.accepted,
        "same_output": same, "errors": off.errors + on.errors,
    });
    if args.json {
        println!("{row}");
        return;
    }
    let same = match same {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    };
    let errors = off.errors + on.errors;
    // No drafts at all (a batch wider than speculative_disable_by_batch_size): no rates.
    let (acceptance, length) = if spec.drafts > 0.0 {
        (
            format!("{:.0}%", 100.0 * spec.acceptance_rate()),
            format!("{:.2}", spec.mean_accepted_length()),
        )
    } else {
        ("no drafts".to_string(), "-".to_string())
    };
    println!(
        "| {label} | {} | {:.1} | {:.1} | {:.2}x | {acceptance} | {length} | {same}{} |",
        on.tokens / args.rounds.max(1),
        off.rate(),
        on.rate(),
        on.rate() / off.rate(),
        if errors > 0 {
            format!(" ({errors} errors)")
        } else {
            String::new()
        }
    );
}
