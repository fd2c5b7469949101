//! `moeserve-bench soak`: C clients for S seconds against a running server, each sending
//! a mix of what real traffic holds: streamed and plain chat, completions, `n` = 2,
//! seeded sampling (the same seed must give the same text, whatever the batch), bad
//! requests, and clients that hang up in the middle of a stream or before the first byte.
//! At the end it checks that the server went back to idle (nothing running or waiting,
//! no KV block held, per `/metrics`), still answers, and that its resident memory did not
//! grow after the warm-up. Prints the figures; fails on any unexpected answer.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Model id (default: the server's only model).
    #[arg(long)]
    model: Option<String>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 600.0)]
    seconds: f64,
    /// max_tokens of each generation.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Allowed growth of the resident set from the end of the warm-up (the first fifth
    /// of the run, at most a minute) to the end, in MiB.
    #[arg(long, default_value_t = 64.0)]
    rss_growth_mib: f64,
    /// Bearer key, if the server wants one.
    #[arg(long, env = "MOESERVE_API_KEY")]
    api_key: Option<String>,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

/// What one request of the mix does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    StreamChat,
    PlainChat,
    Completion,
    ChoicesN2,
    Seeded,
    BadRequest,
    HangUpMidStream,
    HangUpBeforeFirstByte,
}

const MIX: [Kind; 8] = [
    Kind::StreamChat,
    Kind::PlainChat,
    Kind::Completion,
    Kind::ChoicesN2,
    Kind::Seeded,
    Kind::BadRequest,
    Kind::HangUpMidStream,
    Kind::HangUpBeforeFirstByte,
];

/// How a request went.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// 429: the queue was full (expected under overload, never a failure).
    Busy,
    /// Anything else: the reason.
    Failed(String),
}

#[derive(Default)]
struct Tally {
    by_kind: BTreeMap<String, [u64; 3]>,
    failures: Vec<String>,
    busy_latency_max: f64,
    seeded: HashMap<u64, String>,
    seeded_mismatches: u64,
}

struct Ctx {
    args: SoakArgs,
    model: String,
    client: reqwest::Client,
    tally: Mutex<Tally>,
}

impl Ctx {
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let r = self
            .client
            .post(format!("{}{path}", self.args.url.trim_end_matches('/')));
        match &self.args.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    fn chat(&self, prompt: &str, extra: Value) -> Value {
        let mut b = json!({"model": self.model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.args.max_tokens});
        for (k, v) in extra.as_object().into_iter().flatten() {
            b[k] = v.clone();
        }
        b
    }
}

const PROMPTS: [&str; 6] = [
    "Write a short poem about the sea.",
    "List three prime numbers.",
    "Explain what a hash map is.",
    "Translate 'good morning' into French.",
    "What is the capital of Japan?",
    "Give me a name for a cat.",
];

async fn one(ctx: &Ctx, kind: Kind, i: u64) -> Outcome {
    let prompt = PROMPTS[i as usize % PROMPTS.len()];
    let started = Instant::now();
    let (path, body) = match kind {
        Kind::StreamChat | Kind::HangUpMidStream | Kind::HangUpBeforeFirstByte => (
            "/v1/chat/completions",
            ctx.chat(
                prompt,
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            ),
        ),
        Kind::PlainChat => (
            "/v1/chat/completions",
            ctx.chat(prompt, json!({"temperature": 0.7})),
        ),
        Kind::Completion => (
            "/v1/completions",
            json!({"model": ctx.model, "prompt": prompt, "max_tokens": ctx.args.max_tokens}),
        ),
        Kind::ChoicesN2 => ("/v1/chat/completions", ctx.chat(prompt, json!({"n": 2}))),
        Kind::Seeded => (
            "/v1/chat/completions",
            ctx.chat(prompt, json!({"temperature": 0.9, "seed": i % 4})),
        ),
        Kind::BadRequest => (
            "/v1/chat/completions",
            match i % 3 {
                0 => ctx.chat(prompt, json!({"temperature": 7})),
                1 => json!({"model": ctx.model, "messages": []}),
                _ => ctx.chat(prompt, json!({"top_k": -5})),
            },
        ),
    };
    let send = ctx.post(path).json(&body).send();
    if kind == Kind::HangUpBeforeFirstByte {
        // The request goes out; the client is gone before the answer starts.
        let _ = tokio::time::timeout(Duration::from_millis(2 + i % 20), send).await;
        return Outcome::Ok;
    }
    let resp = match send.await {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("{kind:?}: {e}")),
    };
    let status = resp.status().as_u16();
    if status == 429 {
        let mut t = ctx.tally.lock().unwrap();
        t.busy_latency_max = t.busy_latency_max.max(started.elapsed().as_secs_f64());
        return Outcome::Busy;
    }
    if kind == Kind::BadRequest {
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        return if status == 400 && v["error"]["type"] == "invalid_request_error" {
            Outcome::Ok
        } else {
            Outcome::Failed(format!("bad request answered {status}: {v}"))
        };
    }
    if status != 200 {
        let text = resp.text().await.unwrap_or_default();
        return Outcome::Failed(format!("{kind:?}: HTTP {status}: {text:.200}"));
    }
    match kind {
        Kind::StreamChat | Kind::HangUpMidStream => {
            let mut stream = resp.bytes_stream();
            let mut text = String::new();
            let mut events = 0;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
                    Err(e) => return Outcome::Failed(format!("{kind:?}: stream broke: {e}")),
                }
                events = text.matches("\n\n").count();
                if kind == Kind::HangUpMidStream && events >= 3 {
                    return Outcome::Ok; // dropped here, mid-stream
                }
            }
            if !text.contains("data: [DONE]") || !text.contains("\"finish_reason\":\"") {
                return Outcome::Failed(format!("{kind:?}: stream of {events} events did not end well"));
            }
            if text.contains("{\"error\":") {
                return Outcome::Failed(format!("{kind:?}: error event: {text:.300}"));
            }
            Outcome::Ok
        }
        _ => {
            let v: Value = match resp.json().await {
                Ok(v) => v,
                Err(e) => return Outcome::Failed(format!("{kind:?}: body: {e}")),
            };
            let choices = v["choices"].as_array().map_or(0, Vec::len);
            let want = if kind == Kind::ChoicesN2 { 2 } else { 1 };
            if choices != want {
                return Outcome::Failed(format!("{kind:?}: {choices} choices: {v:.300}"));
            }
            if kind == Kind::Seeded {
                let text = v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let key = (i % 4) * 1000 + i % PROMPTS.len() as u64;
                let mut t = ctx.tally.lock().unwrap();
                match t.seeded.get(&key) {
                    Some(first) if *first != text => t.seeded_mismatches += 1,
                    Some(_) => {}
                    None => {
                        t.seeded.insert(key, text);
                    }
                }
            }
            Outcome::Ok
        }
    }
}

async fn metrics(ctx: &Ctx) -> anyhow::Result<HashMap<String, f64>> {
    let mut r = ctx
        .client
        .get(format!("{}/metrics", ctx.args.url.trim_end_matches('/')));
    if let Some(k) = &ctx.args.api_key {
        r = r.bearer_auth(k);
    }
    let text = r.send().await?.text().await?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect())
}

pub async fn run(args: SoakArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .build()?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let mut r = client.get(format!("{}/v1/models", args.url.trim_end_matches('/')));
            if let Some(k) = &args.api_key {
                r = r.bearer_auth(k);
            }
            let v: Value = r.send().await?.json().await?;
            v["data"][0]["id"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("no model in /v1/models: {v}"))?
                .to_string()
        }
    };
    let ctx = Arc::new(Ctx {
        args,
        model,
        client,
        tally: Mutex::new(Tally::default()),
    });
    let duration = Duration::from_secs_f64(ctx.args.seconds);
    let warmup = (duration / 5).min(Duration::from_secs(60));
    let start = Instant::now();
    let rss_at = |m: &HashMap<String, f64>| m.get("process_resident_memory_bytes").copied();
    let warm_rss = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(warmup).await;
            metrics(&ctx).await.ok()
        })
    };
    let clients: Vec<_> = (0..ctx.args.clients)
        .map(|c| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut i = c as u64;
                let mut k = c;
                while start.elapsed() < duration {
                    // Each client walks the mix from its own place.
                    let kind = MIX[k % MIX.len()];
                    k += 1;
                    let outcome = one(&ctx, kind, i).await;
                    let mut t = ctx.tally.lock().unwrap();
                    let slot = t.by_kind.entry(format!("{kind:?}")).or_default();
                    match outcome {
                        Outcome::Ok => slot[0] += 1,
                        Outcome::Busy => slot[1] += 1,
                        Outcome::Failed(why) => {
                            slot[2] += 1;
                            if t.failures.len() < 20 {
                                t.failures.push(why);
                            }
                        }
                    }
                    i += ctx.args.clients as u64;
                }
            })
        })
        .collect();
    for c in clients {
        c.await?;
    }
    let wall = start.elapsed().as_secs_f64();
    let warm = warm_rss.await?.as_ref().and_then(rss_at);

    // Back to idle: nothing running or waiting, no block held.
    let idle_start = Instant::now();
    let mut last = HashMap::new();
    let idle = loop {
        last = metrics(&ctx).await.unwrap_or(last);
        let get = |k: &str| last.get(k).copied().unwrap_or(f64::NAN);
        if get("moeserve_num_requests_running") == 0.0
            && get("moeserve_num_requests_waiting") == 0.0
            && get("moeserve_kv_cache_blocks_used") == 0.0
        {
            break true;
        }
        if idle_start.elapsed() > Duration::from_secs(30) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let after = one(&ctx, Kind::PlainChat, 0).await;
    let end_rss = rss_at(&last);

    let t = ctx.tally.lock().unwrap();
    let total = |i: usize| t.by_kind.values().map(|v| v[i]).sum::<u64>();
    let (ok, busy, failed) = (total(0), total(1), total(2));
    let growth_mib = match (warm, end_rss) {
        (Some(a), Some(b)) => Some((b - a) / (1024.0 * 1024.0)),
        _ => None,
    };
    let rss_ok = growth_mib.is_none_or(|g| g <= ctx.args.rss_growth_mib);
    let passed = failed == 0 && idle && after == Outcome::Ok && rss_ok && t.seeded_mismatches == 0;
    let report = json!({
        "clients": ctx.args.clients,
        "seconds": wall,
        "requests": ok + busy + failed,
        "requests_per_second": (ok + busy + failed) as f64 / wall,
        "ok": ok,
        "busy_429": busy,
        "busy_429_latency_max_ms": t.busy_latency_max * 1e3,
        "failed": failed,
        "by_kind": t.by_kind.iter().map(|(k, v)| (k.clone(), json!({"ok": v[0], "busy_429": v[1], "failed": v[2]}))).collect::<serde_json::Map<_, _>>(),
        "seeded_mismatches": t.seeded_mismatches,
        "idle_after": idle,
        "answers_after": after == Outcome::Ok,
        "rss_after_warmup_mib": warm.map(|b| b / 1048576.0),
        "rss_end_mib": end_rss.map(|b| b / 1048576.0),
        "rss_growth_mib": growth_mib,
        "failures": t.failures,
        "passed": passed,
    });
    if ctx.args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    anyhow::ensure!(passed, "the soak failed (see above)");
    Ok(())
}
