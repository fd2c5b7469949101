//! `moeserve-bench serve`: drives any OpenAI-compatible server with concurrent streaming
//! chat requests and reports vLLM's serving metrics per concurrency level, at the
//! sampling settings users send (greedy alone is not what they see), and one level of
//! short chat answers that end at end-of-sequence.
//!
//! Definitions (as vLLM's benchmark_serving and ../shared/loadgen.py):
//! - TTFT: request sent -> first content chunk;
//! - TPOT: per request, (end - first token) / (output tokens - 1);
//! - ITL: every gap between consecutive content chunks;
//! - E2E: request sent -> last chunk;
//! - goodput: completed requests per second that met both the TTFT and TPOT targets.

use std::time::{Duration, Instant};

use crate::measure::SamplingSetting;
use futures::StreamExt;
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct ServeBenchArgs {
    /// Base URL of the server (e.g. http://127.0.0.1:8080).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Model id to request.
    #[arg(long)]
    model: String,
    /// Concurrency levels; each runs that many requests at once.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Tokens per request (sent with ignore_eos, which vLLM and llama.cpp honour).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Requests per level, as a multiple of the concurrency.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Sampling settings, each run at every level: greedy (temperature 0), default
    /// (OpenAI's: temperature 1, top_p 1) and chat (temperature 0.7, top_p 0.9). Sent
    /// explicitly with top_k and min_p off, so that servers whose own defaults differ
    /// sample the same distribution.
    #[arg(long, value_delimiter = ',', default_value = "greedy,default,chat", value_parser = SamplingSetting::parse)]
    sampling: Vec<SamplingSetting>,
    /// Concurrency of one more level as users run it: short chat questions answered until
    /// end-of-sequence (no ignore_eos) at `--chat-sampling`; reports requests/s and
    /// tok/s. 0 skips it.
    #[arg(long, default_value_t = 16)]
    chat_concurrency: usize,
    /// Sampling of the chat level.
    #[arg(long, default_value = "default", value_parser = SamplingSetting::parse)]
    chat_sampling: SamplingSetting,
    /// max_tokens of the chat level's requests.
    #[arg(long, default_value_t = 256)]
    chat_max_tokens: usize,
    /// Requests of the chat level, as a multiple of its concurrency.
    #[arg(long, default_value_t = 4)]
    chat_rounds: usize,
    /// Concurrency of the structured-output comparison: that many requests constrained
    /// to a JSON schema (`response_format`) against as many unconstrained ones of the
    /// same token counts, at each `--structured-sampling`. 0 skips it.
    #[arg(long, default_value_t = 16)]
    structured_concurrency: usize,
    /// Sampling settings of the structured-output comparison.
    #[arg(long, value_delimiter = ',', default_value = "greedy,chat", value_parser = SamplingSetting::parse)]
    structured_sampling: Vec<SamplingSetting>,
    /// TTFT target for goodput, in milliseconds.
    #[arg(long, default_value_t = 2000.0)]
    ttft_slo_ms: f64,
    /// TPOT target for goodput, in milliseconds.
    #[arg(long, default_value_t = 100.0)]
    tpot_slo_ms: f64,
    /// Bearer key, if the server wants one.
    #[arg(long, env = "MOESERVE_API_KEY")]
    api_key: Option<String>,
    /// Print one JSON object per level instead of the table.
    #[arg(long)]
    json: bool,
}

/// What one level sends.
#[derive(Debug, Clone, Copy)]
struct Workload {
    sampling: SamplingSetting,
    /// `max_tokens` tokens each with `ignore_eos`, or short chat answers that end at EOS.
    ignore_eos: bool,
    max_tokens: usize,
    /// Constrained to [`structured_schema`] with `response_format`.
    constrained: bool,
}

/// The structured-output comparison's schema: records of a few typed fields, at least
/// 1000 of them, so that no answer can end before `max_tokens` and both sides of the
/// comparison generate the same number of tokens.
fn structured_schema() -> Value {
    json!({"type": "array", "minItems": 1000, "items": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "tags": {"type": "array", "items": {"enum": ["friend", "colleague", "family"]}, "maxItems": 3}},
        "required": ["name", "age", "city", "tags"], "additionalProperties": false}})
}

/// Short questions a chat user asks; answers end at end-of-sequence.
const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "What does a lighthouse keeper do?",
    "Explain photosynthesis in two sentences.",
    "Name four planets of the solar system.",
    "How do I boil an egg?",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn.",
];

#[derive(Debug, Default, Clone)]
pub(crate) struct RequestResult {
    pub(crate) ok: bool,
    pub(crate) ttft: f64,
    pub(crate) e2e: f64,
    /// Output tokens: the usage chunk's count where the server sends one, else the
    /// chunks with content.
    pub(crate) tokens: usize,
    /// The streamed content.
    pub(crate) text: String,
    /// Chunks with content (the ITL samples are the gaps between them).
    chunks: usize,
    itl: Vec<f64>,
}

async fn one(client: &reqwest::Client, args: &ServeBenchArgs, work: Workload, i: usize) -> RequestResult {
    let prompt = if work.ignore_eos {
        format!(
            "Request {i}: write a long story about a lighthouse keeper who finds a message in a bottle, \
             with many details about the sea, the weather and the town."
        )
    } else {
        QUESTIONS[i % QUESTIONS.len()].to_string()
    };
    let mut body = json!({"model": args.model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": work.max_tokens, "ignore_eos": work.ignore_eos, "stream": true,
        "stream_options": {"include_usage": true}});
    if let (Some(body), Some(fields)) = (body.as_object_mut(), work.sampling.request_fields().as_object()) {
        body.extend(fields.clone());
    }
    if work.constrained {
        body["response_format"] = json!({"type": "json_schema",
            "json_schema": {"name": "people", "schema": structured_schema(), "strict": true}});
        body["messages"][0]["content"] = format!("Request {i}: list people I know, as JSON.").into();
    }
    stream_chat(client, &args.url, args.api_key.as_deref(), &body, i).await
}

/// Sends one streaming chat request and times its chunks.
pub(crate) async fn stream_chat(
    client: &reqwest::Client,
    url: &str,
    api_key: Option<&str>,
    body: &Value,
    i: usize,
) -> RequestResult {
    let start = Instant::now();
    let send = || {
        let mut req = client
            .post(format!("{}/v1/chat/completions", url.trim_end_matches('/')))
            .json(body);
        if let Some(k) = api_key {
            req = req.bearer_auth(k);
        }
        req.send()
    };
    let mut r = RequestResult::default();
    // One retry when no connection could be made, so the server never saw the request.
    // (A pooled keep-alive connection the server had closed is retried by the client
    // itself.)
    let resp = match send().await {
        Err(e) if e.is_connect() => send().await,
        first => first,
    };
    let resp = match resp {
        Ok(resp) => resp,
        Err(e) => {
            eprintln!("request {i} failed: {e}");
            return r;
        }
    };
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        eprintln!(
            "request {i}: HTTP {status}: {}",
            text.chars().take(200).collect::<String>()
        );
        return r;
    }
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut last: Option<Instant> = None;
    let mut usage: Option<usize> = None;
    while let Some(Ok(bytes)) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    r.tokens = usage.unwrap_or(r.chunks);
                    r.ok = r.chunks > 0;
                    r.e2e = start.elapsed().as_secs_f64();
                    return r;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    usage = Some(n as usize);
                }
                let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
                if !content.is_empty() {
                    r.text.push_str(content);
                    let now = Instant::now();
                    match last {
                        None => r.ttft = (now - start).as_secs_f64(),
                        Some(t) => r.itl.push((now - t).as_secs_f64()),
                    }
                    last = Some(now);
                    r.chunks += 1;
                }
            }
        }
    }
    r
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

pub async fn run(args: ServeBenchArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let fixed = |sampling| Workload {
        sampling,
        ignore_eos: true,
        max_tokens: args.max_tokens,
        constrained: false,
    };
    // One warm-up request (model load, caches), then one burst at the largest level
    // with a few tokens each: the first full batch of a server pays for its first-touched
    // buffers (seen as a 3x TTFT on whichever setting ran first).
    let warm = one(&client, &args, fixed(SamplingSetting::Greedy), usize::MAX).await;
    anyhow::ensure!(warm.ok, "the warm-up request to {} failed", args.url);
    let burst = Workload {
        max_tokens: args.max_tokens.min(16),
        ..fixed(SamplingSetting::Greedy)
    };
    let widest = args
        .concurrency
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(args.chat_concurrency);
    futures::stream::iter(0..widest)
        .map(|i| one(&client, &args, burst, i))
        .buffer_unordered(widest)
        .collect::<Vec<_>>()
        .await;
    if !args.json {
        println!(
            "| sampling | concurrent | req/s | output tok/s | TTFT mean / p50 / p99 ms | TPOT mean ms | ITL mean / p99 ms | E2E mean ms | goodput req/s | errors |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    let mut levels: Vec<(Workload, usize, usize)> = Vec::new();
    for &sampling in &args.sampling {
        for &c in &args.concurrency {
            levels.push((fixed(sampling), c, c * args.rounds.max(1)));
        }
    }
    if args.chat_concurrency > 0 {
        let chat = Workload {
            sampling: args.chat_sampling,
            ignore_eos: false,
            max_tokens: args.chat_max_tokens,
            constrained: false,
        };
        let c = args.chat_concurrency;
        levels.push((chat, c, c * args.chat_rounds.max(1)));
    }
    if args.structured_concurrency > 0 {
        let c = args.structured_concurrency;
        for &sampling in &args.structured_sampling {
            for constrained in [false, true] {
                levels.push((
                    Workload {
                        constrained,
                        ..fixed(sampling)
                    },
                    c,
                    c * args.rounds.max(1),
                ));
            }
        }
    }
    let mut unconstrained_tok_s = f64::NAN;
    for (work, c, n) in levels {
        let constraint_s = constraint_seconds(&client, &args).await;
        let start = Instant::now();
        let results: Vec<RequestResult> = futures::stream::iter(0..n)
            .map(|i| one(&client, &args, work, i))
            .buffer_unordered(c)
            .collect()
            .await;
        let wall = start.elapsed().as_secs_f64();
        let mut row = summarize(&args, work, c, &results, wall);
        if work.constrained {
            // Grammar time per generated token, from the server's own counter.
            let spent = constraint_seconds(&client, &args).await - constraint_s;
            let tokens = row["output_tok_s"].as_f64().unwrap_or(0.0) * wall;
            row["constraint_us_per_token"] = json!(spent * 1e6 / tokens.max(1.0));
            row["vs_unconstrained"] =
                json!(row["output_tok_s"].as_f64().unwrap_or(f64::NAN) / unconstrained_tok_s);
        } else if work.ignore_eos {
            unconstrained_tok_s = row["output_tok_s"].as_f64().unwrap_or(f64::NAN);
        }
        if args.json {
            println!("{row}");
        } else {
            let label = if work.constrained {
                format!(
                    "{}, json_schema ({:.2}x unconstrained, {:.0} us/token in the grammar)",
                    work.sampling.name(),
                    row["vs_unconstrained"].as_f64().unwrap_or(f64::NAN),
                    row["constraint_us_per_token"].as_f64().unwrap_or(f64::NAN)
                )
            } else if work.ignore_eos {
                work.sampling.name().to_string()
            } else {
                format!("{}, chat to EOS", work.sampling.name())
            };
            let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
            println!(
                "| {label} | {c} | {:.2} | {:.1} | {:.0} / {:.0} / {:.0} | {:.1} | {:.1} / {:.1} | {:.0} | {:.2} | {} |",
                f(&row["request_throughput"]),
                f(&row["output_tok_s"]),
                f(&row["ttft_ms"]["mean"]),
                f(&row["ttft_ms"]["p50"]),
                f(&row["ttft_ms"]["p99"]),
                f(&row["tpot_ms_mean"]),
                f(&row["itl_ms"]["mean"]),
                f(&row["itl_ms"]["p99"]),
                f(&row["e2e_ms_mean"]),
                f(&row["goodput_req_s"]),
                row["errors"]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// The server's `moeserve_engine_constraint_seconds_total` (NaN from a server without
/// it, such as llama-server).
async fn constraint_seconds(client: &reqwest::Client, args: &ServeBenchArgs) -> f64 {
    let url = format!("{}/metrics", args.url.trim_end_matches('/'));
    let Ok(resp) = client.get(url).send().await else {
        return f64::NAN;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("moeserve_engine_constraint_seconds_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// One level's metrics as a JSON object.
fn summarize(args: &ServeBenchArgs, work: Workload, c: usize, results: &[RequestResult], wall: f64) -> Value {
    let n = results.len();
    let ok: Vec<&RequestResult> = results.iter().filter(|r| r.ok).collect();
    let mut ttft: Vec<f64> = ok.iter().map(|r| r.ttft * 1e3).collect();
    let tpot = |r: &RequestResult| (r.e2e - r.ttft) * 1e3 / (r.tokens - 1) as f64;
    let tpots: Vec<f64> = ok.iter().filter(|r| r.tokens > 1).map(|r| tpot(r)).collect();
    let mut itl: Vec<f64> = ok.iter().flat_map(|r| r.itl.iter().map(|x| x * 1e3)).collect();
    let e2e: Vec<f64> = ok.iter().map(|r| r.e2e * 1e3).collect();
    let tokens: usize = ok.iter().map(|r| r.tokens).sum();
    let good = ok
        .iter()
        .filter(|r| r.ttft * 1e3 <= args.ttft_slo_ms && (r.tokens <= 1 || tpot(r) <= args.tpot_slo_ms))
        .count();
    json!({
        "sampling": work.sampling.name(), "ignore_eos": work.ignore_eos, "max_tokens": work.max_tokens,
        "json_schema": work.constrained,
        "concurrency": c, "requests": n, "errors": n - ok.len(), "wall_s": wall,
        "request_throughput": ok.len() as f64 / wall, "output_tok_s": tokens as f64 / wall,
        "mean_output_tokens": tokens as f64 / ok.len().max(1) as f64,
        "ttft_ms": {"mean": mean(&ttft), "p50": percentile(&mut ttft, 50.0), "p99": percentile(&mut ttft, 99.0)},
        "tpot_ms_mean": mean(&tpots),
        "itl_ms": {"mean": mean(&itl), "p99": percentile(&mut itl, 99.0)},
        "e2e_ms_mean": mean(&e2e),
        "goodput_req_s": good as f64 / wall,
    })
}
