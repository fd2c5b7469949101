//! The prefix cache on disk, through the real binary: restarts, kills, the byte bound.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{chat_body, fixture, Server, MODEL};

/// Every file under the cache directory, by model subdirectory.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for sub in std::fs::read_dir(dir).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out
}

fn blocks(dir: &Path) -> Vec<PathBuf> {
    files(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "kv"))
        .collect()
}

fn temporaries(dir: &Path) -> Vec<PathBuf> {
    files(dir)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp"))
        .collect()
}

/// A long system prompt, as agents resend on every turn (about 1,150 tokens with the fixtures' tokenizer).
fn long_chat(model: &str, question: &str) -> Value {
    let system: String = (0..40)
        .map(|i| format!("Rule {i}: answer tersely about topic {}. ", i * 7 % 31))
        .collect();
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": true,
    })
}

fn cached(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn wait_exit(s: &mut Server) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            return st;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the server did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_with(dir: &Path, model: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--prefix-cache-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start_model(&fixture(model), &args).await
}

/// A prefix computed before a SIGTERM is read from disk after the restart, with the same
/// greedy answer as the cold run; the shutdown leaves no temporary files; another model
/// on the same directory finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_prefix_cache_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = start_with(tmp.path(), MODEL, &[]).await;
    let cold = s.chat(long_chat(MODEL, "What is rule 3?")).await;
    assert_eq!(cached(&cold), 0);
    let prompt_tokens = cold["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 1000, "{prompt_tokens}");
    s.sigterm();
    assert!(wait_exit(&mut s).await.success());
    assert!(temporaries(tmp.path()).is_empty());
    let written = blocks(tmp.path()).len() as u64;
    assert!(written >= prompt_tokens / 16, "{written} blocks written");

    let s = start_with(tmp.path(), MODEL, &[]).await;
    let warm = s.chat(long_chat(MODEL, "What is rule 3?")).await;
    assert_eq!(cached(&warm), (prompt_tokens - 1) / 16 * 16);
    assert_eq!(content(&warm), content(&cold), "the same greedy answer");
    let hits = s.metric(r#"moeserve_prefix_cache_hits_total{tier="disk"}"#).await;
    assert_eq!(hits as u64, (prompt_tokens - 1) / 16);
    assert!(s.metric("moeserve_prefix_cache_disk_read_bytes_total").await > 0.0);
    assert!(s.metric("moeserve_prefix_cache_disk_load_seconds_total").await > 0.0);
    assert_eq!(
        s.metric("moeserve_prefix_cache_disk_blocks").await as u64,
        written
    );
    // Another question after the same system prompt: the shared blocks, now in the pool.
    let other = s.chat(long_chat(MODEL, "And rule 4?")).await;
    assert!(
        cached(&other) >= prompt_tokens / 16 * 16 - 32,
        "{}",
        cached(&other)
    );
    assert!(s.metric(r#"moeserve_prefix_cache_hits_total{tier="pool"}"#).await > 0.0);
    drop(s);

    // Another model on the same directory: its own subdirectory, no hits.
    let s = start_with(tmp.path(), "qwen3", &[]).await;
    let v = s.chat(long_chat("qwen3", "What is rule 3?")).await;
    assert_eq!(cached(&v), 0);
    assert_eq!(
        s.metric(r#"moeserve_prefix_cache_hits_total{tier="disk"}"#).await,
        0.0
    );
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2);
}

/// A server killed outright (SIGKILL) while it writes blocks leaves at most temporary
/// files, never a partial block: the next server removes them, and every block it reads
/// is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_server_leaves_no_partial_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = start_with(tmp.path(), MODEL, &[]).await;
    let mut tasks = vec![];
    for i in 0..4 {
        let (http, url) = (s.http.clone(), s.url("/v1/chat/completions"));
        let mut body = long_chat(MODEL, &format!("Question {i}"));
        body["max_tokens"] = json!(400);
        tasks.push(tokio::spawn(
            async move { http.post(url).json(&body).send().await },
        ));
    }
    // Kill once blocks are being written.
    let t = Instant::now();
    while blocks(tmp.path()).len() < 20 {
        assert!(t.elapsed() < Duration::from_secs(20), "no blocks written");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    for t in tasks {
        let _ = t.await;
    }
    let sizes: Vec<u64> = blocks(tmp.path())
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .collect();
    assert!(
        sizes.windows(2).all(|w| w[0] == w[1]),
        "every block file is whole: {sizes:?}"
    );

    let s = start_with(tmp.path(), MODEL, &[]).await;
    assert!(temporaries(tmp.path()).is_empty(), "the new owner removed them");
    let v = s.chat(long_chat(MODEL, "Question 0")).await;
    assert!(cached(&v) > 0);
    assert_eq!(s.metric("moeserve_prefix_cache_disk_corrupt_total").await, 0.0);
}

/// `--prefix-cache-disk-bytes` bounds the directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_disk_cache_keeps_its_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start_with(tmp.path(), MODEL, &[]).await;
    s.chat(chat_body(
        "One block's worth of prompt, or a little more than that.",
        json!({"max_tokens": 1}),
    ))
    .await;
    let t = Instant::now();
    while blocks(tmp.path()).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let record = blocks(tmp.path())[0].metadata().unwrap().len();
    drop(s);
    let bound = 30 * record;
    let s = start_with(
        tmp.path(),
        MODEL,
        &["--prefix-cache-disk-bytes", &bound.to_string()],
    )
    .await;
    for i in 0..4 {
        s.chat(long_chat(MODEL, &format!("Question {i}"))).await;
    }
    let t = Instant::now();
    // The writer catches up; the bound holds throughout.
    loop {
        let on_disk: u64 = blocks(tmp.path())
            .iter()
            .filter_map(|p| p.metadata().ok())
            .map(|m| m.len())
            .sum();
        assert!(on_disk <= bound, "{on_disk} bytes on disk, bound {bound}");
        if s.metric("moeserve_prefix_cache_disk_blocks").await == 30.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the disk tier never filled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.metric("moeserve_prefix_cache_disk_bytes").await as u64, bound);
}
