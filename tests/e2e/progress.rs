//! Serving a model by Hugging Face repo id: the real hf-hub download path against a
//! stand-in hub on localhost (`HF_ENDPOINT`), its progress in `/health` and the log while
//! `/ready` says 503, and the files in the cache afterwards.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::*;

/// Serves a checkpoint directory the way huggingface.co's `resolve` endpoint does, as far
/// as hf-hub reads it: ranged GETs answered 206 with `content-range`, the blob's `etag`
/// and the commit in `x-repo-commit`. Bodies of more than a few bytes trickle out over
/// `trickle`, so that the download takes long enough to watch.
struct StandInHub {
    dir: PathBuf,
    commit: String,
    trickle: Duration,
}

fn parse_range(headers: &HeaderMap, size: usize) -> (usize, usize) {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="));
    let Some((a, b)) = range.and_then(|r| r.split_once('-')) else {
        return (0, size - 1);
    };
    let start = a.parse().unwrap_or(0);
    let end = b.parse().unwrap_or(size - 1).min(size - 1);
    (start, end)
}

async fn resolve(
    State(hub): State<Arc<StandInHub>>,
    Path((_owner, _name, _rev, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Ok(bytes) = std::fs::read(hub.dir.join(&file)) else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    let (start, end) = parse_range(&headers, bytes.len());
    // A content hash stands in for the blob's sha256 (any stable name will do).
    let etag = format!(
        "\"{:016x}\"",
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64)
            .wrapping_mul(0x100_0000_01b3))
    );
    let body = bytes[start..=end].to_vec();
    let body = if body.len() > 64 * 1024 {
        let pieces = 20;
        let pause = hub.trickle / pieces as u32;
        let chunk = body.len().div_ceil(pieces);
        let chunks: Vec<Vec<u8>> = body.chunks(chunk).map(<[u8]>::to_vec).collect();
        Body::from_stream(futures::stream::iter(chunks).then(move |c| async move {
            tokio::time::sleep(pause).await;
            Ok::<_, std::io::Error>(c)
        }))
    } else {
        Body::from(body)
    };
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header("etag", etag)
        .header("x-repo-commit", &hub.commit)
        .header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{end}/{}", bytes.len()),
        )
        .header(header::CONTENT_LENGTH, end + 1 - start)
        .body(body)
        .unwrap()
}

async fn start_hub(hub: StandInHub) -> String {
    let app = axum::Router::new()
        .route(
            "/{owner}/{name}/resolve/{rev}/{*file}",
            axum::routing::get(resolve),
        )
        .with_state(Arc::new(hub));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hub_download_shows_its_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let endpoint = start_hub(StandInHub {
        dir: fixture(MODEL),
        commit: commit.into(),
        trickle: Duration::from_secs(3),
    })
    .await;
    let s = Server::spawn(
        "moeserve-test/tiny-qwen3-moe",
        &[],
        &[
            ("HF_ENDPOINT", endpoint.as_str()),
            ("HF_HUB_CACHE", cache.to_str().unwrap()),
            ("HF_HUB_OFFLINE", "0"),
        ],
    );

    // While it downloads: /ready is 503 and /health says what it is doing.
    let t = Instant::now();
    let mut seen = Vec::new();
    loop {
        let health = s.get("/health").await;
        assert_eq!(health["status"], "ok", "{health}");
        if health["model"] == "ready" {
            assert!(health.get("progress").is_none(), "{health}");
            break;
        }
        assert_eq!(health["model"], "loading", "{health}");
        if let Some(p) = health.get("progress") {
            let ready = s.http.get(s.url("/ready")).send().await.unwrap();
            if s.get("/health").await["model"] == "loading" {
                assert_eq!(ready.status(), 503);
            }
            seen.push(p.clone());
        }
        assert!(t.elapsed() < Duration::from_secs(60), "not ready; saw {seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let weights: Vec<&Value> = seen
        .iter()
        .filter(|p| p["stage"] == "download" && p["file"] == "model.safetensors")
        .collect();
    assert!(
        weights.len() >= 3,
        "the 3 s download of model.safetensors was seen a few times: {seen:?}"
    );
    let size = std::fs::metadata(fixture(MODEL).join("model.safetensors"))
        .unwrap()
        .len();
    for p in &weights {
        assert_eq!(p["total_bytes"], size, "{p}");
        assert!(p["done_bytes"].as_u64().unwrap() <= size, "{p}");
        assert!(
            p["message"]
                .as_str()
                .unwrap()
                .starts_with("downloading model.safetensors: "),
            "{p}"
        );
    }
    let done: Vec<u64> = weights
        .iter()
        .map(|p| p["done_bytes"].as_u64().unwrap())
        .collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
    assert!(done.first() < done.last(), "the download moved: {done:?}");

    // The log says the same (a line to start, one per 5 s, one at the end: no terminal here).
    let log = s.log.lock().unwrap().join("\n");
    assert!(log.contains("downloading model.safetensors: "), "{log}");
    assert!(log.contains("downloaded model.safetensors"), "{log}");
    assert!(!log.contains('\r'), "no progress bar without a terminal");

    // The files landed in the hub cache, byte for byte, and the model serves.
    let cached = cache
        .join("models--moeserve-test--tiny-qwen3-moe/snapshots")
        .join(commit);
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(cached.join(file)).unwrap(),
            std::fs::read(fixture(MODEL).join(file)).unwrap(),
            "{file}"
        );
    }
    assert_eq!(s.get("/v1/models").await["data"][0]["id"], "tiny-qwen3-moe");
    let v = s
        .chat(json!({"model": "tiny-qwen3-moe", "max_tokens": 4,
                     "messages": [{"role": "user", "content": "Hi"}]}))
        .await;
    assert_eq!(v["choices"][0]["message"]["role"], "assistant", "{v}");
}
