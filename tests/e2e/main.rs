//! End-to-end tests: the real `moeserve` binary on an ephemeral port, serving a fixture
//! model, driven over real HTTP.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

mod ecosystem;
mod prefix_disk;
mod progress;
mod web;

const MODEL: &str = "qwen3_moe";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

struct Server {
    child: Child,
    base: String,
    http: reqwest::Client,
    /// Everything the server has written to stderr so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    async fn start(extra: &[&str]) -> Server {
        Self::start_model(&fixture(MODEL), extra).await
    }

    async fn start_model(model: &std::path::Path, extra: &[&str]) -> Server {
        let s = Self::spawn(model.to_str().unwrap(), extra, &[]);
        s.wait_ready(Duration::from_secs(30)).await;
        s
    }

    /// Starts the binary serving `model` (a path or a hub repo id) with `env` set, and
    /// returns once it listens (the model may still be loading).
    fn spawn(model: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moeserve"))
            .args(["serve", "--model", model, "--host", "127.0.0.1", "--port", "0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("MOESERVE_API_KEY")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start moeserve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("listening on http://") {
                    let _ = tx.send(line[i + "listening on ".len()..].trim().to_string());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server printed its address");
        Server {
            child,
            base,
            http: reqwest::Client::new(),
            log,
        }
    }

    async fn wait_ready(&self, limit: Duration) {
        let t = Instant::now();
        loop {
            if let Ok(r) = self.http.get(self.url("/ready")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(t.elapsed() < limit, "the server did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.http.post(self.url(path)).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A GET's JSON body.
    async fn get(&self, path: &str) -> Value {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        r.json().await.unwrap()
    }

    async fn chat(&self, body: Value) -> Value {
        let (status, v) = self.post("/v1/chat/completions", body).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    /// All `data:` payloads of a streamed response; `[DONE]` as a string.
    async fn stream(&self, path: &str, body: Value) -> Vec<Value> {
        let r = self.http.post(self.url(path)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let text = r.text().await.unwrap();
        parse_sse(&text)
    }

    /// The `/metrics` exposition.
    async fn metrics_text(&self) -> String {
        let r = self.http.get(self.url("/metrics")).send().await.unwrap();
        r.text().await.unwrap()
    }

    async fn metric(&self, name: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }

    async fn wait_metric(&self, name: &str, want: f64) {
        let t = Instant::now();
        while self.metric(name).await != want {
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "{name} never reached {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Server {
    /// Sends the server SIGTERM (its graceful shutdown).
    fn sigterm(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SSE framing: events separated by a blank line, `data: ` lines; comments ignored.
fn parse_sse(text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for event in text.split("\n\n").filter(|e| !e.trim().is_empty()) {
        for line in event.lines() {
            if let Some(d) = line.strip_prefix("data: ") {
                out.push(if d == "[DONE]" {
                    Value::from("[DONE]")
                } else {
                    serde_json::from_str(d).unwrap()
                });
            } else {
                assert!(line.starts_with(':'), "unexpected SSE line {line:?}");
            }
        }
    }
    out
}

/// A validator for the OpenAPI document's schema `name`, with every object schema closed
/// to the properties it lists: a field the server sends that the document does not
/// describe fails, as does one it describes differently.
fn schema(doc: &Value, name: &str) -> jsonschema::Validator {
    fn close_objects(v: &mut Value) {
        match v {
            Value::Object(m) => {
                if m.contains_key("properties") && !m.contains_key("additionalProperties") {
                    m.insert("additionalProperties".into(), Value::Bool(false));
                }
                m.values_mut().for_each(close_objects);
            }
            Value::Array(a) => a.iter_mut().for_each(close_objects),
            _ => {}
        }
    }
    let mut components = doc["components"].clone();
    close_objects(&mut components);
    let root = json!({"$ref": format!("#/components/schemas/{name}"), "components": components});
    jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("schema {name}: {e}"))
}

/// `v` is valid against `validator` (the schema `name`).
fn assert_valid(validator: &jsonschema::Validator, name: &str, v: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(v)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{name}: {errors:?}\n{v}");
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 12,
                       "temperature": 0, "ignore_eos": true});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_completions_json_and_stream() {
    let s = Server::start(&[]).await;
    let v = s.chat(chat_body("Hello there", json!({}))).await;
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], MODEL);
    assert!(v["system_fingerprint"].is_string());
    let c = &v["choices"][0];
    assert_eq!(
        (c["index"].as_u64(), c["message"]["role"].as_str()),
        (Some(0), Some("assistant"))
    );
    assert_eq!(c["finish_reason"], "length");
    assert!(c["logprobs"].is_null());
    let u = &v["usage"];
    assert_eq!(u["completion_tokens"], 12);
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());

    // The same request streamed, with a usage chunk: same text.
    let chunks = s
        .stream(
            "/v1/chat/completions",
            chat_body(
                "Hello there",
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            ),
        )
        .await;
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let first = &chunks[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk = &chunks[chunks.len() - 2];
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 12);
    let mut text = String::new();
    let mut finish = None;
    for c in &chunks[..chunks.len() - 2] {
        assert!(c["usage"].is_null(), "usage is null on every other chunk");
        assert_eq!(c["id"], first["id"]);
        let ch = &c["choices"][0];
        text.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
        if !ch["finish_reason"].is_null() {
            finish = Some(ch["finish_reason"].clone());
        }
    }
    assert_eq!(text, c["message"]["content"].as_str().unwrap());
    assert_eq!(finish, Some(json!("length")));

    // Without include_usage: no usage field at all, still [DONE].
    let chunks = s
        .stream("/v1/chat/completions", chat_body("Hi", json!({"stream": true})))
        .await;
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c.get("usage").is_none()));

    // Array-of-parts content, system and assistant turns.
    let v = s
        .chat(json!({"model": MODEL, "max_tokens": 3, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Again"}]}))
        .await;
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn n_logprobs_stop_and_seed() {
    let s = Server::start(&[]).await;
    let v = s
        .chat(chat_body(
            "Tell me",
            json!({"n": 2, "temperature": 1.0, "seed": 9}),
        ))
        .await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(
        (choices[0]["index"].as_u64(), choices[1]["index"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(v["usage"]["completion_tokens"], 24);

    let v = s
        .chat(chat_body("Tell me", json!({"logprobs": true, "top_logprobs": 3})))
        .await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 12);
    for e in content {
        assert!(e["token"].is_string() && e["logprob"].as_f64().unwrap() <= 0.0 && e["bytes"].is_array());
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 3);
    }

    // A stop string taken from the greedy output ends it early and is not in the text.
    let full = s.chat(chat_body("Stop test", json!({"max_tokens": 20}))).await;
    let text = full["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let cut = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= text.len() / 2)
        .unwrap();
    let stop: String = text[cut..].chars().take(2).collect();
    let v = s
        .chat(chat_body(
            "Stop test",
            json!({"max_tokens": 20, "stop": [stop.clone()]}),
        ))
        .await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        &text[..text.find(&stop).unwrap()]
    );

    // Seeds reproduce.
    let sample = |seed: u64| {
        chat_body(
            "Seeded",
            json!({"temperature": 1.0, "top_p": 0.9, "seed": seed, "max_tokens": 16}),
        )
    };
    let a = s.chat(sample(123)).await;
    let b = s.chat(sample(123)).await;
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
    let others: Vec<Value> = futures::future::join_all((0..4).map(|k| s.chat(sample(1000 + k)))).await;
    assert!(others
        .iter()
        .any(|o| o["choices"][0]["message"] != a["choices"][0]["message"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_prompts_echo_and_logprobs() {
    let s = Server::start(&[]).await;
    let body = |prompt: Value, extra: Value| {
        let mut b =
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": true});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let (st, v) = s
        .post("/v1/completions", body(json!("The quick brown fox"), json!({})))
        .await;
    assert_eq!(st, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();

    // The same prompt as token ids (from the tokenizer the fixture generator used).
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(MODEL).join("reference.json")).unwrap())
            .unwrap();
    let p = &reference["prompts"][1];
    assert_eq!(p["text"], "The quick brown fox jumps over the lazy dog.");
    let (_, by_text) = s
        .post("/v1/completions", body(p["text"].clone(), json!({})))
        .await;
    let (_, by_ids) = s.post("/v1/completions", body(p["ids"].clone(), json!({}))).await;
    assert_eq!(by_text["choices"][0]["text"], by_ids["choices"][0]["text"]);

    // Several prompts: one choice each, in order.
    let (_, v) = s
        .post(
            "/v1/completions",
            body(json!(["The quick brown fox", "Hello"]), json!({})),
        )
        .await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), text);
    assert_eq!(v["choices"][1]["index"], 1);
    let (_, v) = s
        .post(
            "/v1/completions",
            body(json!([p["ids"], [5, 6, 7]]), json!({"n": 2})),
        )
        .await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 4);

    // Echo, with logprobs for prompt and completion tokens.
    let (_, v) = s
        .post(
            "/v1/completions",
            body(json!("The quick brown fox"), json!({"echo": true, "logprobs": 2})),
        )
        .await;
    let c = &v["choices"][0];
    assert_eq!(c["text"].as_str().unwrap(), format!("The quick brown fox{text}"));
    let lp = &c["logprobs"];
    let n = prompt_tokens as usize + 5;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n);
    assert!(lp["token_logprobs"][0].is_null() && lp["token_logprobs"][1].is_number());
    assert_eq!(lp["top_logprobs"][n - 1].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"].as_array().unwrap().len(), n);

    // Streaming completions.
    let chunks = s
        .stream(
            "/v1/completions",
            body(json!("The quick brown fox"), json!({"stream": true})),
        )
        .await;
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let streamed: String = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(streamed, text);
}

/// Bad requests: status, error type and param for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_request_catalogue() {
    let s = Server::start(&["--max-body-bytes", "20000", "--max-n", "4"]).await;
    let chat = "/v1/chat/completions";
    let comp = "/v1/completions";
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let long_prompt = "word ".repeat(3000);
    // (path, raw body, status, type, param)
    let cases: Vec<(&str, String, u16, &str, Option<&str>)> = vec![
        (chat, "{not json".into(), 400, "invalid_request_error", None),
        (chat, "".into(), 400, "invalid_request_error", None),
        (chat, "[1, 2]".into(), 400, "invalid_request_error", None),
        (
            chat,
            json!({"messages": msgs}).to_string(),
            400,
            "invalid_request_error",
            None,
        ),
        (
            chat,
            json!({"model": MODEL}).to_string(),
            400,
            "invalid_request_error",
            None,
        ),
        (
            chat,
            json!({"model": MODEL, "messages": []}).to_string(),
            400,
            "invalid_request_error",
            Some("messages"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": "hi"}).to_string(),
            400,
            "invalid_request_error",
            Some("messages"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).to_string(),
            400,
            "invalid_request_error",
            Some("messages[0].role"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": [{"role": "user"}]}).to_string(),
            400,
            "invalid_request_error",
            Some("messages[0].content"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
                .to_string(),
            400,
            "invalid_request_error",
            Some("messages[0].content[0].type"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": [{"content": "x"}]}).to_string(),
            400,
            "invalid_request_error",
            Some("messages[0]"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "temperature": "hot"}).to_string(),
            400,
            "invalid_request_error",
            Some("temperature"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "temperature": 2.5}).to_string(),
            400,
            "invalid_request_error",
            Some("temperature"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "temperature": -1}).to_string(),
            400,
            "invalid_request_error",
            Some("temperature"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "top_k": -5}).to_string(),
            400,
            "invalid_request_error",
            Some("top_k"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "n": 5}).to_string(),
            400,
            "invalid_request_error",
            Some("n"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "21 C"}]})
                .to_string(),
            400,
            "invalid_request_error",
            Some("messages[1].tool_call_id"),
        ),
        (
            chat,
            format!(r#"{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], "temperature": NaN}}"#),
            400,
            "invalid_request_error",
            None,
        ),
        (
            comp,
            json!({"model": MODEL, "prompt": long_prompt}).to_string(),
            400,
            "invalid_request_error",
            Some("prompt"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "top_p": 0}).to_string(),
            400,
            "invalid_request_error",
            Some("top_p"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "top_p": 1.5}).to_string(),
            400,
            "invalid_request_error",
            Some("top_p"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "n": 0}).to_string(),
            400,
            "invalid_request_error",
            Some("n"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "n": 5}).to_string(),
            400,
            "invalid_request_error",
            Some("n"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "max_tokens": 0}).to_string(),
            400,
            "invalid_request_error",
            Some("max_tokens"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "max_tokens": -5}).to_string(),
            400,
            "invalid_request_error",
            Some("max_tokens"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "max_tokens": 100000}).to_string(),
            400,
            "invalid_request_error",
            Some("max_tokens"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "presence_penalty": 3}).to_string(),
            400,
            "invalid_request_error",
            Some("presence_penalty"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "frequency_penalty": -3}).to_string(),
            400,
            "invalid_request_error",
            Some("frequency_penalty"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "logit_bias": {"abc": 1}}).to_string(),
            400,
            "invalid_request_error",
            Some("logit_bias"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "logit_bias": {"5": 500}}).to_string(),
            400,
            "invalid_request_error",
            Some("logit_bias"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "logit_bias": {"99999": 1}}).to_string(),
            400,
            "invalid_request_error",
            Some("logit_bias"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "logprobs": true, "top_logprobs": 25}).to_string(),
            400,
            "invalid_request_error",
            Some("top_logprobs"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "top_logprobs": 2}).to_string(),
            400,
            "invalid_request_error",
            Some("top_logprobs"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "stop": ["a", "b", "c", "d", "e"]}).to_string(),
            400,
            "invalid_request_error",
            Some("stop"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "stop": 5}).to_string(),
            400,
            "invalid_request_error",
            Some("stop"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "stream": "yes"}).to_string(),
            400,
            "invalid_request_error",
            Some("stream"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": msgs, "stream_options": {"include_usage": true}}).to_string(),
            400,
            "invalid_request_error",
            Some("stream_options"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]}).to_string(),
            400,
            "invalid_request_error",
            Some("messages"),
        ),
        (
            chat,
            json!({"model": "gpt-4", "messages": msgs}).to_string(),
            404,
            "invalid_request_error",
            Some("model"),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(30000)}]}).to_string(),
            413,
            "invalid_request_error",
            None,
        ),
        (
            comp,
            json!({"model": MODEL, "prompt": "hi", "suffix": "bye"}).to_string(),
            400,
            "invalid_request_error",
            Some("suffix"),
        ),
        (
            comp,
            json!({"model": MODEL, "prompt": []}).to_string(),
            400,
            "invalid_request_error",
            Some("prompt"),
        ),
        (
            comp,
            json!({"model": MODEL, "prompt": [-1, 2]}).to_string(),
            400,
            "invalid_request_error",
            Some("prompt"),
        ),
        (
            comp,
            json!({"model": MODEL, "prompt": [99999]}).to_string(),
            400,
            "invalid_request_error",
            Some("prompt"),
        ),
        (
            comp,
            json!({"model": MODEL, "prompt": {"text": "hi"}}).to_string(),
            400,
            "invalid_request_error",
            Some("prompt"),
        ),
        (
            comp,
            json!({"model": MODEL, "prompt": "hi", "logprobs": 30}).to_string(),
            400,
            "invalid_request_error",
            Some("logprobs"),
        ),
        (
            comp,
            json!({"model": MODEL, "prompt": "hi", "best_of": 3}).to_string(),
            400,
            "invalid_request_error",
            Some("best_of"),
        ),
        (
            comp,
            json!({"model": "nope", "prompt": "hi"}).to_string(),
            404,
            "invalid_request_error",
            Some("model"),
        ),
    ];
    assert!(cases.len() >= 30);
    for (path, body, status, kind, param) in cases {
        let r = s
            .http
            .post(s.url(path))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let got_status = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        let e = &v["error"];
        assert_eq!(got_status, status, "{path} {body:.200}: {v}");
        assert_eq!(e["type"], kind, "{path} {body:.200}: {v}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(
            e.get("code").is_some() && e.get("param").is_some(),
            "all four fields present: {v}"
        );
        if let Some(p) = param {
            assert!(
                e["param"].as_str().is_some_and(|x| x.starts_with(p)),
                "{path} {body:.200}: param {} not {p}",
                e["param"]
            );
        }
    }
    // Bytes that are not UTF-8 inside a JSON string.
    let mut raw =
        format!(r#"{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "h"#).into_bytes();
    raw.extend_from_slice(b"\xff\xfe\"}]}");
    let r = s
        .http
        .post(s.url(chat))
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    // The prompt-too-long message says the numbers.
    let (_, v) = s
        .post(
            chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]}),
        )
        .await;
    assert!(v["error"]["message"].as_str().unwrap().contains("2048"), "{v}");
    // Not JSON content type, unknown route, wrong method, unknown model id.
    let r = s.http.post(s.url(chat)).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 415);
    let r = s.http.get(s.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "invalid_request_error"
    );
    let r = s.http.get(s.url(chat)).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let r = s.http.get(s.url("/v1/models/other")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Still serving after all that.
    s.chat(chat_body("ok?", json!({"max_tokens": 2}))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys_protect_everything_but_health_and_ready() {
    let s = Server::start(&["--api-key", "key-one", "--api-key", "key-two"]).await;
    let models = s.url("/v1/models");
    assert_eq!(s.http.get(&models).send().await.unwrap().status(), 401);
    let r = s.http.get(&models).bearer_auth("key-three").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "authentication_error"
    );
    assert_eq!(
        s.http
            .get(&models)
            .bearer_auth("key-two")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(s.http.get(s.url("/metrics")).send().await.unwrap().status(), 401);
    // Anthropic's clients send the key as x-api-key.
    let r = s
        .http
        .get(&models)
        .header("x-api-key", "key-one")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // public_metrics opens /metrics (for scrapers without the key), nothing else.
    let open = Server::start(&["--api-key", "key-one", "--public-metrics", "true"]).await;
    assert_eq!(
        open.http.get(open.url("/metrics")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        open.http
            .get(open.url("/v1/models"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(s.http.get(s.url("/health")).send().await.unwrap().status(), 200);
    assert_eq!(s.http.get(s.url("/ready")).send().await.unwrap().status(), 200);
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .json(&chat_body("hi", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("key-one")
        .json(&chat_body("hi", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnects_free_kv_blocks() {
    let s = Server::start(&["--sse-keepalive-secs", "1", "--max-num-seqs", "1"]).await;
    assert_eq!(s.metric("moeserve_kv_cache_blocks_used").await, 0.0);
    let long = chat_body("A long one", json!({"max_tokens": 1800, "stream": true}));
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    let t = Instant::now();
    while s.metric("moeserve_kv_cache_blocks_used").await == 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the stream never took KV blocks"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A second stream waits behind it (one sequence at a time) and leaves before its first token.
    let r2 = s
        .http
        .post(s.url("/v1/chat/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut body2 = r2.bytes_stream();
    body2.next().await.unwrap().unwrap(); // the role chunk comes at once
    s.wait_metric("moeserve_num_requests_waiting", 1.0).await;
    drop(body2);
    s.wait_metric("moeserve_num_requests_waiting", 0.0).await;
    // Now the first leaves mid-stream.
    drop(body);
    s.wait_metric("moeserve_kv_cache_blocks_used", 0.0).await;
    s.wait_metric("moeserve_num_requests_running", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_streams_all_complete() {
    let s = Server::start(&[]).await;
    let reqs = (0..64).map(|i| {
        s.stream(
            "/v1/chat/completions",
            chat_body(
                &format!("Request number {i}"),
                json!({"max_tokens": 24, "stream": true}),
            ),
        )
    });
    let all = futures::future::join_all(reqs).await;
    for chunks in all {
        assert_eq!(chunks.last().unwrap(), "[DONE]");
        assert!(chunks.iter().all(|c| c.get("error").is_none()));
        let finish = chunks
            .iter()
            .rev()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str());
        assert_eq!(finish, Some("length"));
    }
    s.wait_metric("moeserve_kv_cache_blocks_used", 0.0).await;
    let text = s.metrics_text().await;
    for name in [
        "moeserve_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 64",
        "moeserve_time_to_first_token_seconds_bucket",
        "moeserve_inter_token_latency_seconds_count",
        "moeserve_e2e_request_latency_seconds_sum",
        "moeserve_kv_cache_blocks_total",
        "moeserve_prefix_cache_hit_tokens",
        "moeserve_generation_tokens_total 1536",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    assert!(
        text.contains("moeserve_expert_routed_tokens_total{expert=\"7\",layer=\"1\"}"),
        "{text}"
    );
    // 24 tokens each took at least 24 steps; forward calls are part of the steps' time.
    let steps = s.metric("moeserve_engine_steps_total").await;
    let step_s = s.metric("moeserve_engine_step_seconds_total").await;
    let forward_s = s.metric("moeserve_engine_forward_seconds_total").await;
    let sample_s = s.metric("moeserve_engine_sample_seconds_total").await;
    assert!(steps >= 24.0, "{steps} steps");
    assert!(
        forward_s > 0.0 && forward_s <= step_s,
        "forward {forward_s} s of {step_s} s"
    );
    // Every step that ended a prompt or a decode chose tokens, outside the forward calls.
    assert!(
        sample_s > 0.0 && forward_s + sample_s <= step_s,
        "sampling {sample_s} s, forward {forward_s} s of {step_s} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_429_at_once() {
    let s = Server::start(&["--max-num-seqs", "1", "--max-waiting-requests", "1"]).await;
    let long = chat_body("hog", json!({"max_tokens": 1800, "stream": true}));
    let r1 = s
        .http
        .post(s.url("/v1/chat/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    s.wait_metric("moeserve_num_requests_running", 1.0).await;
    let r2 = s
        .http
        .post(s.url("/v1/chat/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    s.wait_metric("moeserve_num_requests_waiting", 1.0).await;
    let t = Instant::now();
    let r3 = s
        .http
        .post(s.url("/v1/chat/completions"))
        .json(&chat_body("late", json!({})))
        .send()
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(r3.status(), 429);
    // Refusals are answered at once: the median of 20 within 50 ms, none slower than
    // half a second (the engine keeps both cores of a CI machine busy meanwhile).
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let r = s
            .http
            .post(s.url("/v1/chat/completions"))
            .json(&chat_body("late", json!({})))
            .send()
            .await
            .unwrap();
        times.push(t.elapsed());
        assert_eq!(r.status(), 429);
    }
    times.sort();
    assert!(times[10] < Duration::from_millis(50), "{times:?}");
    assert!(times[19] < Duration::from_millis(500), "{times:?}");
    // One request waits for the one slot and none has finished yet: about a second.
    assert_eq!(r3.headers()["retry-after"], "1");
    assert_eq!(
        r3.json::<Value>().await.unwrap()["error"]["code"],
        "rate_limit_exceeded"
    );
    drop((r1, r2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_finishes_the_stream_in_flight() {
    let mut s = Server::start(&["--shutdown-timeout-secs", "30"]).await;
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .json(&chat_body(
            "Until the end",
            json!({"max_tokens": 300, "stream": true}),
        ))
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    s.sigterm();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let chunks = parse_sse(&text);
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let tokens = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    assert!(
        tokens > 250,
        "the stream ran to its end after SIGTERM ({tokens} content chunks)"
    );
    let t = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_health_openapi() {
    let s = Server::start(&["--served-model-name", "tiny-moe"]).await;
    let v: Value = s.get("/v1/models").await;
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny-moe");
    assert_eq!(v["data"][0]["object"], "model");
    let v: Value = s.get("/v1/models/tiny-moe").await;
    assert_eq!(v["id"], "tiny-moe");
    let (st, _) = s
        .post(
            "/v1/chat/completions",
            json!({"model": "tiny-moe", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
        )
        .await;
    assert_eq!(st, 200);
    let doc: Value = s.get("/openapi.json").await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/models/{id}",
        "/health",
        "/ready",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(doc["paths"].get(p).is_some(), "openapi lacks {p}");
    }
}

/// A copy of the MoE fixture whose vocabulary has `<think>`/`</think>` (two rare ids
/// re-purposed) and whose chat template opens a thought, as DeepSeek-R1's does.
fn reasoning_fixture(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(fixture(MODEL)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let tok_path = dir.join("tokenizer.json");
    let mut tok: Value = serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    for (id, text) in [(380u64, "<think>"), (381, "</think>")] {
        // Rename the vocabulary entry and drop the merge that produced it.
        let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
        let old = vocab
            .iter()
            .find(|(_, v)| v.as_u64() == Some(id))
            .map(|(k, _)| k.clone())
            .unwrap();
        vocab.remove(&old);
        vocab.insert(text.into(), id.into());
        tok["model"]["merges"].as_array_mut().unwrap().retain(|m| {
            let pair: Vec<String> = match m {
                Value::String(s) => s.split(' ').map(String::from).collect(),
                other => serde_json::from_value(other.clone()).unwrap(),
            };
            pair.concat() != old
        });
        tok["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(json!({"id": id, "content": text, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": false}));
    }
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let template = cfg["chat_template"]
        .as_str()
        .unwrap()
        .replace("assistant\\n' }}", "assistant\\n<think>\\n' }}");
    assert!(template.contains("<think>"));
    cfg["chat_template"] = template.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reasoning_content_is_split_from_the_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("reasoner");
    reasoning_fixture(&dir);
    let s = Server::start_model(&dir, &["--served-model-name", MODEL]).await;
    // The thought never closes: all of it is reasoning.
    let v = s
        .chat(chat_body("Think about it", json!({"max_tokens": 10})))
        .await;
    let m = &v["choices"][0]["message"];
    assert_eq!(m["content"], "");
    assert!(!m["reasoning_content"].as_str().unwrap().is_empty());
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // A budget of 4 thinking tokens closes the thought; the answer follows.
    let body = chat_body(
        "Think about it",
        json!({"max_tokens": 16, "max_reasoning_tokens": 4}),
    );
    let v = s.chat(body.clone()).await;
    let m = &v["choices"][0]["message"];
    let (reasoning, content) = (
        m["reasoning_content"].as_str().unwrap(),
        m["content"].as_str().unwrap(),
    );
    assert!(!reasoning.is_empty() && !content.is_empty(), "{m}");
    assert!(!reasoning.contains("</think>") && !content.contains("</think>"));

    // The reasoning field is in the OpenAPI document too.
    let doc: Value = s.get("/openapi.json").await;
    assert_valid(&schema(&doc, "ChatCompletion"), "ChatCompletion", &v);

    // Streamed, the deltas add up to the same split.
    let mut sb = body;
    sb["stream"] = true.into();
    let chunks = s.stream("/v1/chat/completions", sb).await;
    let chunk_schema = schema(&doc, "ChatCompletionChunk");
    let (mut r, mut c) = (String::new(), String::new());
    for ch in &chunks[..chunks.len() - 1] {
        assert_valid(&chunk_schema, "ChatCompletionChunk", ch);
        let d = &ch["choices"][0]["delta"];
        r.push_str(d["reasoning_content"].as_str().unwrap_or(""));
        c.push_str(d["content"].as_str().unwrap_or(""));
    }
    assert_eq!((r.as_str(), c.as_str()), (reasoning, content));

    // Without a reasoning vocabulary the extension is refused.
    let plain = Server::start(&[]).await;
    let (st, v) = plain
        .post(
            "/v1/chat/completions",
            chat_body("x", json!({"max_reasoning_tokens": 4})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("max_reasoning_tokens"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_request_deadline_ends_long_requests() {
    // A twentieth of a second, and no stopping at the end-of-sequence token: the tiny
    // model decodes ~4000 tokens/s on one stream here, so about 200 fit in the deadline,
    // and 1900 would need a machine ten times as fast.
    let s = Server::start(&["--request-timeout-secs", "0.05"]).await;
    let t = Instant::now();
    let v = s
        .chat(chat_body(
            "Go on and on",
            json!({"max_tokens": 1900, "ignore_eos": true}),
        ))
        .await;
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n > 0 && n < 1900, "{n} tokens");
    s.wait_metric("moeserve_kv_cache_blocks_used", 0.0).await;
    let chunks = s
        .stream(
            "/v1/chat/completions",
            chat_body(
                "Go on",
                json!({"max_tokens": 1900, "ignore_eos": true, "stream": true}),
            ),
        )
        .await;
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "length"));
}

/// Real responses of every route and shape are valid against the OpenAPI document the
/// server serves (generated from the types), with no field left undescribed: chat and
/// completions, streamed and not, with logprobs, `n`, echo, several prompts and usage
/// chunks; models, health, readiness; errors. (`models_health_openapi` checks that every
/// route is in it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn responses_match_the_openapi_document() {
    let s = Server::start(&[]).await;
    let doc: Value = s.get("/openapi.json").await;
    assert_eq!(doc["openapi"], "3.1.0");
    let check = |name: &str, v: &Value| assert_valid(&schema(&doc, name), name, v);

    let v = s
        .chat(chat_body(
            "Hello",
            json!({"n": 2, "logprobs": true, "top_logprobs": 3, "temperature": 0.7, "seed": 1}),
        ))
        .await;
    check("ChatCompletion", &v);
    // The check can fail: an undescribed field, or a described one of the wrong type.
    let chat_schema = schema(&doc, "ChatCompletion");
    let mut extra = v.clone();
    extra["choices"][0]["message"]["surprise"] = json!(1);
    assert!(!chat_schema.is_valid(&extra));
    let mut wrong = v.clone();
    wrong["usage"]["prompt_tokens"] = json!("many");
    assert!(!chat_schema.is_valid(&wrong));
    let chunks = s
        .stream(
            "/v1/chat/completions",
            chat_body("Hello", json!({"stream": true, "logprobs": true, "top_logprobs": 2, "stream_options": {"include_usage": true}})),
        )
        .await;
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    for c in &chunks[..chunks.len() - 1] {
        check("ChatCompletionChunk", c);
    }
    let body = json!({"model": MODEL, "prompt": ["Once upon", "A time"], "max_tokens": 5, "echo": true,
                      "logprobs": 2, "ignore_eos": true});
    let (st, v) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(st, 200, "{v}");
    check("Completion", &v);
    let mut streamed = body;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = s.stream("/v1/completions", streamed).await;
    for c in &chunks[..chunks.len() - 1] {
        check("CompletionChunk", c);
    }
    // Tool calls, whole and streamed.
    let tools = json!({"tools": [{"type": "function", "function": {"name": "f", "parameters":
        {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}],
        "tool_choice": "required", "max_tokens": 200});
    check(
        "ChatCompletion",
        &s.chat(chat_body("Call f", tools.clone())).await,
    );
    let mut streamed = tools;
    streamed["stream"] = json!(true);
    for c in s
        .stream("/v1/chat/completions", chat_body("Call f", streamed))
        .await
        .iter()
        .rev()
        .skip(1)
    {
        check("ChatCompletionChunk", c);
    }
    check("ModelList", &s.get("/v1/models").await);
    check("ModelCard", &s.get("/v1/models/qwen3_moe").await);
    check("Health", &s.get("/health").await);
    check("Ready", &s.get("/ready").await);
    for (path, body) in [
        ("/v1/chat/completions", chat_body("x", json!({"temperature": 9}))),
        (
            "/v1/chat/completions",
            json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "x", "max_tokens": 100000}),
        ),
    ] {
        let (st, v) = s.post(path, body).await;
        assert!(st >= 400, "{v}");
        check("ErrorResponse", &v);
    }
}

/// Structured outputs over HTTP: `response_format` (json_schema, json_object, text) on
/// chat and `structured_outputs` (json, regex, choice, grammar) on chat and completions
/// give outputs in their language, streamed equal to non-streamed for the same seed;
/// bad constraints are 400s naming the parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn structured_outputs_over_http() {
    let s = Server::start(&[]).await;
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 3},
        "mood": {"anyOf": [{"enum": ["happy", "sad"]}, {"type": "null"}]},
        "pet": {"$ref": "#/$defs/pet"}},
        "required": ["name", "scores", "mood", "pet"], "additionalProperties": false,
        "$defs": {"pet": {"type": "object", "properties": {"legs": {"type": "integer", "minimum": 0, "maximum": 8}},
                          "required": ["legs"], "additionalProperties": false}}});
    let validator = jsonschema::validator_for(&schema).unwrap();
    let format =
        json!({"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}});
    let body = |extra: Value| {
        let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "Describe someone."}],
                           "max_tokens": 120, "temperature": 0.9, "seed": 11});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let v = s.chat(body(json!({"response_format": format}))).await;
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let parsed: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(validator.is_valid(&parsed), "{text}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let chunks = s
        .stream(
            "/v1/chat/completions",
            body(json!({"response_format": format, "stream": true})),
        )
        .await;
    let streamed: String = chunks[..chunks.len() - 1]
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text, "streamed equals non-streamed");

    // json_object, and text (no constraint).
    let v = s
        .chat(body(json!({"response_format": {"type": "json_object"}, "n": 2})))
        .await;
    for c in v["choices"].as_array().unwrap() {
        // A random model may write one endless key: a complete output is an object, a
        // cut one at least starts as one.
        let t = c["message"]["content"].as_str().unwrap();
        match c["finish_reason"].as_str() {
            Some("stop") => assert!(
                serde_json::from_str::<Value>(t).is_ok_and(|v| v.is_object()),
                "{t:?}"
            ),
            _ => assert!(t.starts_with('{'), "{t:?}"),
        }
    }
    let v = s
        .chat(body(
            json!({"response_format": {"type": "text"}, "max_tokens": 5}),
        ))
        .await;
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // structured_outputs on completions: regex, choice, grammar.
    let complete = |so: Value| json!({"model": MODEL, "prompt": "The answer is", "max_tokens": 30, "structured_outputs": so});
    let (status, v) = s
        .post(
            "/v1/completions",
            complete(json!({"regex": "[0-9]{3}-[a-z]{2,4}"})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let t = v["choices"][0]["text"].as_str().unwrap();
    let (digits, letters) = t.split_once('-').unwrap_or_else(|| panic!("{t:?}"));
    assert!(
        digits.len() == 3 && digits.bytes().all(|b| b.is_ascii_digit()),
        "{t:?}"
    );
    assert!(
        (2..=4).contains(&letters.len()) && letters.bytes().all(|b| b.is_ascii_lowercase()),
        "{t:?}"
    );
    let (_, v) = s
        .post(
            "/v1/completions",
            complete(json!({"choice": ["yes", "no", "maybe not"]})),
        )
        .await;
    assert!(
        ["yes", "no", "maybe not"].contains(&v["choices"][0]["text"].as_str().unwrap()),
        "{v}"
    );
    let grammar = "start: \"(\" num (\"+\" num)* \")\"\nnum: /[1-9][0-9]?/";
    let (_, v) = s
        .post("/v1/completions", complete(json!({"grammar": grammar})))
        .await;
    let t = v["choices"][0]["text"].as_str().unwrap();
    assert!(
        t.starts_with('(') && (t.ends_with(')') || v["choices"][0]["finish_reason"] == "length"),
        "{t:?}"
    );
    let (_, v) = s
        .post(
            "/v1/chat/completions",
            body(json!({"structured_outputs": {"json": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4}}})),
        )
        .await;
    let t = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Vec<bool>>(t).is_ok(), "{t:?}");

    // Bad constraints: 400 naming the parameter.
    let bad = [
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format.type",
        ),
        (
            json!({"response_format": {"type": "json_schema"}}),
            "response_format.json_schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "no-such-format"}}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"regex": "(a"}}),
            "structured_outputs.regex",
        ),
        (
            json!({"structured_outputs": {"grammar": "start: nothing_here"}}),
            "structured_outputs.grammar",
        ),
        (
            json!({"structured_outputs": {"choice": []}}),
            "structured_outputs.choice",
        ),
        (
            json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}),
            "structured_outputs",
        ),
        (json!({"structured_outputs": {}}), "structured_outputs"),
    ];
    for (extra, param) in bad {
        let (status, v) = s.post("/v1/chat/completions", body(extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    // A constraint that cannot finish within max_tokens ends with "length".
    let v = s
        .chat(body(json!({"response_format": format, "max_tokens": 3})))
        .await;
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}, "required": ["zone"],
            "additionalProperties": false}}}
    ])
}

/// Tool calling over HTTP on a model that left to itself calls nothing: a named or
/// required choice gives well-formed calls of offered functions with valid arguments
/// (`content` null, `finish_reason` "tool_calls"), streamed as an id/type/name delta and
/// argument pieces that add up to the non-streamed arguments byte for byte; `none`
/// calls nothing; a tool result round trip renders; bad tool requests are 400s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tool_calls_over_http() {
    let s = Server::start(&[]).await;
    let tools = weather_tools();
    let validator = |name: &str| {
        let f = tools
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["function"]["name"] == name)
            .unwrap();
        jsonschema::validator_for(&f["function"]["parameters"]).unwrap()
    };
    let body = |extra: Value| {
        let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "Weather in Rome?"}],
                           "tools": tools, "max_tokens": 250, "temperature": 0.8, "seed": 3});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let named = json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
    let v = s.chat(body(named.clone())).await;
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    assert!(c["message"]["content"].is_null(), "{v}");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(
        (call["type"].as_str(), call["function"]["name"].as_str()),
        (Some("function"), Some("get_weather"))
    );
    let arguments = call["function"]["arguments"].as_str().unwrap().to_string();
    let parsed: Value = serde_json::from_str(&arguments).unwrap();
    assert!(validator("get_weather").is_valid(&parsed), "{arguments}");

    // Streamed: the first piece has the id, type and name; the pieces add up.
    let mut streamed = body(named);
    streamed["stream"] = json!(true);
    let chunks = s.stream("/v1/chat/completions", streamed).await;
    let (mut args, mut first, mut finish) = (String::new(), None, None);
    for ch in &chunks[..chunks.len() - 1] {
        let choice = &ch["choices"][0];
        for d in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(d["index"], 0);
            if first.is_none() {
                first = Some(d.clone());
            } else {
                assert!(
                    d.get("id").is_none() && d["function"].get("name").is_none(),
                    "{d}"
                );
            }
            args.push_str(d["function"]["arguments"].as_str().unwrap_or(""));
        }
        assert!(
            choice["delta"]["content"].as_str().is_none_or(str::is_empty),
            "{ch}"
        );
        if !choice["finish_reason"].is_null() {
            finish = Some(choice["finish_reason"].clone());
        }
    }
    let first = first.expect("a tool call delta");
    assert!(first["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(
        (first["type"].as_str(), first["function"]["name"].as_str()),
        (Some("function"), Some("get_weather"))
    );
    assert_eq!(args, arguments, "streamed arguments equal the non-streamed ones");
    assert_eq!(finish, Some(json!("tool_calls")));

    // Required, one call: one of the offered functions, valid arguments.
    for seed in [1, 2, 3] {
        let v = s
            .chat(body(
                json!({"tool_choice": "required", "parallel_tool_calls": false, "seed": seed}),
            ))
            .await;
        let calls = v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(calls.len(), 1, "{v}");
        let name = calls[0]["function"]["name"].as_str().unwrap();
        let parsed: Value =
            serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(validator(name).is_valid(&parsed), "{v}");
    }
    // None: no calls.
    let v = s
        .chat(body(json!({"tool_choice": "none", "max_tokens": 10})))
        .await;
    assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string());
    assert_ne!(v["choices"][0]["finish_reason"], "tool_calls");

    // A tool result round trip renders and answers.
    let v = s
        .chat(
            json!({"model": MODEL, "tools": tools, "max_tokens": 8, "messages": [
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"}]}),
        )
        .await;
    assert!(v["choices"][0]["message"].is_object(), "{v}");

    // Bad tool requests: 400 naming the parameter.
    let msgs = json!([{"role": "user", "content": "x"}]);
    let bad = [
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (json!({"tool_choice": "sometimes"}), "tool_choice"),
        (json!({"tools": null, "tool_choice": "auto"}), "tool_choice"),
        (
            json!({"tools": [{"type": "function", "function": {"description": "no name"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"messages": [{"role": "tool", "content": "3"}]}),
            "messages[0].tool_call_id",
        ),
        (
            json!({"tool_choice": "required", "response_format": {"type": "json_object"}}),
            "tool_choice",
        ),
    ];
    for (extra, param) in bad {
        let mut b = body(extra.clone());
        if b["messages"].as_array().unwrap().len() > 1 {
            b["messages"] = msgs.clone();
        }
        let (status, v) = s.post("/v1/chat/completions", b).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
}

/// n-gram speculation over HTTP: the same greedy text with it on (the default), off per
/// request and streamed; the spec_decode counters move; bad settings stop the server
/// with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn speculative_decoding_over_http() {
    // The random fixture falls into loops, which the n-gram proposer drafts from one
    // token of match on.
    let s = Server::start(&["--speculative-method", "ngram", "--ngram-prompt-lookup-min", "1"]).await;
    let body = |mut extra: Value| {
        extra["max_tokens"] = json!(200);
        chat_body("Tell me a story", extra)
    };
    let on = s.chat(body(json!({}))).await;
    let accepted = s.metric("moeserve_spec_decode_num_accepted_tokens_total").await;
    assert!(s.metric("moeserve_spec_decode_num_drafts_total").await > 0.0);
    assert!(accepted > 0.0, "no drafted token was accepted: {on}");
    assert!(s.metric("moeserve_spec_decode_num_draft_tokens_total").await >= accepted);
    assert!(
        s.metric("moeserve_spec_decode_num_accepted_tokens_per_pos_total{position=\"0\"}")
            .await
            > 0.0
    );
    let off = s.chat(body(json!({"speculative": false}))).await;
    assert_eq!(
        s.metric("moeserve_spec_decode_num_accepted_tokens_total").await,
        accepted,
        "an opted-out request drafted"
    );
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(text(&on), text(&off));
    assert_eq!(on["usage"]["completion_tokens"], 200);
    let chunks = s
        .stream(
            "/v1/chat/completions",
            body(json!({"stream": true, "speculative": null})),
        )
        .await;
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text(&on));
    let (status, v) = s
        .post("/v1/chat/completions", body(json!({"speculative": "yes"})))
        .await;
    assert_eq!(status, 400, "{v}");
    drop(s);

    // DeepSeek-V3 with its MTP module: drafts from it, the same text.
    let s = Server::start_model(&fixture("deepseek_v3_mtp"), &["--speculative-method", "mtp"]).await;
    let mtp = |extra: Value| {
        let mut b = body(extra);
        b["model"] = json!("deepseek_v3_mtp");
        b
    };
    let on = s.chat(mtp(json!({}))).await;
    assert!(s.metric("moeserve_spec_decode_num_drafts_total").await > 5.0);
    let off = s.chat(mtp(json!({"speculative": false}))).await;
    assert_eq!(text(&on), text(&off));
    drop(s);

    for (args, want) in [
        (["--speculative-method", "eagle"], "unknown speculative method"),
        (
            ["--speculative-method", "mtp"],
            "no multi-token prediction weights",
        ),
        (["--num-speculative-tokens", "99"], "at most 16"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_moeserve"))
            .args([
                "serve",
                "--model",
                fixture(MODEL).to_str().unwrap(),
                "--port",
                "0",
            ])
            .args(args)
            .output()
            .expect("run moeserve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

/// What real clients send is taken: `null` for every optional field (OpenAI's "not
/// set"; LangChain, LiteLLM and older SDKs send them), OpenAI's fields that do not apply
/// here, `name` on messages, text-part lists with extra keys for system and developer
/// messages; and `n` up to the configured `max_n` (it was capped at 16 whatever the
/// setting).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_real_clients_send_is_accepted() {
    let s = Server::start(&["--max-n", "20"]).await;
    let nulls = [
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "n",
        "stop",
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "seed",
        "top_k",
        "min_p",
        "repetition_penalty",
        "min_tokens",
        "ignore_eos",
        "stop_token_ids",
        "skip_special_tokens",
        "speculative",
        "max_tokens",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_reasoning_tokens",
        "response_format",
        "structured_outputs",
        "user",
    ];
    let mut body = json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
            {"role": "user", "name": "ada", "content": [{"type": "text", "text": "Hello", "cache_control": null}]},
            {"role": "assistant", "content": null, "name": "bot", "tool_calls": null},
            {"role": "user", "content": "Again?"},
        ],
        "max_completion_tokens": 4,
        "store": false,
        "metadata": {"team": "a"},
        "service_tier": "auto",
        "modalities": ["text"],
        "prediction": {"type": "content", "content": "Hello"},
        "reasoning_effort": "low",
        "user": "user-1",
        "function_call": null,
        "functions": null,
        "audio": null,
    });
    for k in nulls {
        body[k] = Value::Null;
    }
    let v = s.chat(body.clone()).await;
    assert_eq!(v["choices"][0]["message"]["role"], "assistant", "{v}");
    body["stream"] = json!(true);
    let chunks = s.stream("/v1/chat/completions", body).await;
    assert_eq!(chunks.last().unwrap(), "[DONE]");

    let mut comp = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4, "user": "u"});
    for k in [
        "stream",
        "stream_options",
        "logprobs",
        "echo",
        "suffix",
        "best_of",
        "n",
        "stop",
        "temperature",
        "seed",
        "top_k",
        "logit_bias",
        "structured_outputs",
    ] {
        comp[k] = Value::Null;
    }
    let (status, v) = s.post("/v1/completions", comp.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["logprobs"], Value::Null, "{v}");
    comp["stream"] = json!(true);
    assert_eq!(s.stream("/v1/completions", comp).await.last().unwrap(), "[DONE]");

    // n above the old fixed 16, up to max_n; and beyond it, the setting's limit is named.
    let v = s.chat(chat_body("Hi", json!({"n": 20, "max_tokens": 2}))).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 20);
    let (status, v) = s
        .post(
            "/v1/chat/completions",
            chat_body("Hi", json!({"n": 21, "max_tokens": 2})),
        )
        .await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("20"), "{v}");
}

/// Logprobs of tokens that split a character: `bytes` are the token's own (not U+FFFD's),
/// they add up to the text, and `text_offset` counts characters, from chunk to chunk of
/// a stream as in one body.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logprobs_of_tokens_that_split_a_character() {
    let s = Server::start(&[]).await;
    // The fixture's small vocabulary spells these characters byte by byte.
    let prompt = "naïve €5 日本";
    let v = s
        .chat(
            json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 24, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
        )
        .await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let bytes: Vec<u8> = content
        .iter()
        .flat_map(|t| {
            t["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
        })
        .collect();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(String::from_utf8_lossy(&bytes).trim(), text.trim(), "{v}");

    // Echo with logprobs on completions: the prompt's tokens (some split a character).
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0,
        "echo": true, "logprobs": 1});
    let (_, v) = s.post("/v1/completions", body.clone()).await;
    let lp = &v["choices"][0]["logprobs"];
    let offsets: Vec<usize> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap() as usize)
        .collect();
    let text = v["choices"][0]["text"].as_str().unwrap();
    let chars = text.chars().count();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    assert!(
        *offsets.last().unwrap() < chars,
        "{offsets:?} in {chars} characters"
    );
    // "ï" is two tokens here, both starting where "ï" does (character 2).
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let split = tokens.iter().filter(|t| t.contains('\u{fffd}')).count();
    assert!(split >= 2, "the fixture splits characters: {tokens:?}");
    let mut streamed = Vec::new();
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    for c in s.stream("/v1/completions", sb).await {
        if let Some(o) = c["choices"][0]["logprobs"]["text_offset"].as_array() {
            streamed.extend(o.iter().map(|x| x.as_u64().unwrap() as usize));
        }
    }
    assert_eq!(streamed, offsets);
}

/// Raw HTTP: an oversized head gets 431; hundreds of clients that send half a head and
/// wait hold no real request up, and are closed after `header_read_timeout_secs`;
/// pipelined requests are answered in order; a body cut short of its Content-Length
/// leaves nothing behind; a chunked body works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_and_unusual_http() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start(&["--header-read-timeout-secs", "2"]).await;
    let addr = s.base.trim_start_matches("http://").to_string();

    let r = s
        .http
        .get(s.url("/health"))
        .header("x-big", "a".repeat(200_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);

    // 300 connections, each with half a request head.
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
            .await
            .unwrap();
        slow.push(c);
    }
    let t = Instant::now();
    s.chat(chat_body("Hi", json!({"max_tokens": 4}))).await;
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    // After the head timeout they are closed (read returns 0 or an error, or a 408).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for c in slow.iter_mut().take(20) {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
            .await
            .expect("closed, not left hanging")
            .unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || head.starts_with("HTTP/1.1 408"), "{head}");
    }
    drop(slow);
    // A connection that sends nothing is closed too.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("an idle connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // Two pipelined requests on one connection: both answered, in order.
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8_lossy(&out);
    let (first, second) = (
        out.find("\"status\":\"ok\"").unwrap(),
        out.find("\"object\":\"list\"").unwrap(),
    );
    assert!(first < second, "{out}");
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");

    // A body shorter than its Content-Length, then the write side closed.
    let body = chat_body("Hi", json!({"max_tokens": 4})).to_string();
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len() + 100
    );
    c.write_all(head.as_bytes()).await.unwrap();
    c.write_all(body.as_bytes()).await.unwrap();
    c.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out}");
    s.wait_metric("moeserve_num_requests_running", 0.0).await;
    s.wait_metric("moeserve_num_requests_waiting", 0.0).await;

    // A chunked request body.
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (a, b) = body.split_at(body.len() / 2);
    let chunked = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    c.write_all(chunked.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("chat.completion"), "{out}");
    // Still serving.
    s.chat(chat_body("ok?", json!({"max_tokens": 2}))).await;
}

/// A request still running when the drain time runs out is not reported as finished by
/// length (as it was): its stream ends with an error event (503's body) in place of the
/// unfinished choices' finishes; and `/ready` answering 503 during the drain is not
/// logged as an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_aborted_at_shutdown_fail_with_503() {
    // 16 choices of 1900 tokens, two at a time: seconds of work on the tiny fixture.
    let mut s = Server::start(&[
        "--shutdown-timeout-secs",
        "1",
        "--max-num-seqs",
        "2",
        "--speculative-method",
        "none",
    ])
    .await;
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .json(&chat_body(
            "Until the end",
            json!({"max_tokens": 1900, "stream": true, "ignore_eos": true, "n": 16}),
        ))
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    s.sigterm();
    // Draining: /ready says 503 (on a connection opened before the listener closed, or
    // refused; either way no error is logged for it).
    let _ = s.http.get(s.url("/ready")).send().await;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => text.push_str(std::str::from_utf8(&c).unwrap()),
            Err(_) => break,
        }
    }
    let chunks = parse_sse(&text);
    // Choices that ran to their end before the drain time did (by length); the others
    // were stopped, and the stream says so with an error instead of their finishes.
    let finished = chunks
        .iter()
        .filter(|c| c["choices"][0]["finish_reason"].is_string())
        .count();
    assert!(finished < 16, "{finished} choices finished");
    let err = chunks
        .iter()
        .find(|c| c.get("error").is_some())
        .expect("an error event");
    assert_eq!(err["error"]["code"], "service_unavailable", "{err}");
    let _ = s.child.wait();
    let log = s.log.lock().unwrap().join("\n");
    assert!(!log.contains("ERROR"), "{log}");
}
