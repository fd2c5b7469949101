//! The built-in page and its numbers, over HTTP (the browser tests drive the page itself:
//! tests/web/).

use serde_json::{json, Value};

use super::{chat_body, Server};

/// `/` and its files are served with a strict content policy; `/ui/stats` has a row per
/// layer and a column per expert of the fixture MoE, and its counters move with a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_and_its_stats() {
    let s = Server::start(&[]).await;
    for (path, kind) in [
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let r = s.http.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        assert!(h["content-type"].to_str().unwrap().starts_with(kind), "{path}");
        assert!(h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'self'"));
        let body = r.text().await.unwrap();
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path} loads nothing from elsewhere"
        );
    }
    let before = s.get("/ui/stats").await;
    assert_eq!(before["state"], "ready");
    assert_eq!(before["model"], super::MODEL);
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(super::fixture(super::MODEL).join("config.json")).unwrap(),
    )
    .unwrap();
    let layers = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
    let experts = cfg["num_experts"].as_u64().unwrap() as usize;
    // Qwen3-MoE: layer i is sparse when (i + 1) is a multiple of decoder_sparse_step.
    let step = cfg["decoder_sparse_step"].as_u64().unwrap() as usize;
    let sparse: Vec<bool> = (0..layers).map(|i| (i + 1) % step == 0).collect();
    let rows = before["experts"].as_array().unwrap();
    assert_eq!(rows.len(), layers);
    for (row, sparse) in rows.iter().zip(&sparse) {
        let n = row.as_array().unwrap().len();
        assert_eq!(
            n,
            if *sparse { experts } else { 0 },
            "a cell per expert, none for dense layers"
        );
    }
    let sparse_layers = sparse.iter().filter(|s| **s).count() as u64;
    assert!(sparse_layers > 0);
    let v = s.chat(chat_body("Hello there", json!({"max_tokens": 8}))).await;
    let after = s.get("/ui/stats").await;
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        after["prompt_tokens"].as_u64().unwrap() - before["prompt_tokens"].as_u64().unwrap(),
        prompt
    );
    assert_eq!(
        after["generation_tokens"].as_u64().unwrap() - before["generation_tokens"].as_u64().unwrap(),
        8
    );
    let routed = |v: &Value| -> u64 {
        v["experts"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()))
            .sum()
    };
    let top_k = cfg["num_experts_per_tok"].as_u64().unwrap();
    // Every computed token is routed to top_k experts in every sparse layer (the last
    // sampled token is not computed).
    assert_eq!(
        routed(&after) - routed(&before),
        (prompt + 7) * top_k * sparse_layers
    );
    let ttft = &after["ttft"];
    assert_eq!(ttft["count"], 1);
    assert_eq!(
        ttft["le"].as_array().unwrap().len(),
        ttft["cumulative"].as_array().unwrap().len()
    );
}

/// With an API key the page stays open and asks for it; its numbers need it. With
/// `--no-web-ui` there is no page.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_is_open_its_numbers_need_the_key_and_it_can_be_off() {
    let s = Server::start(&["--api-key", "sesame"]).await;
    let status = |path: &'static str, key: Option<&'static str>| {
        let mut r = s.http.get(s.url(path));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/", None).await, 200);
    assert_eq!(status("/ui/app.js", None).await, 200);
    assert_eq!(status("/ui/stats", None).await, 401);
    assert_eq!(status("/ui/stats", Some("sesame")).await, 200);
    drop(s);
    let s = Server::start(&["--no-web-ui"]).await;
    for path in ["/", "/ui/app.js", "/ui/stats"] {
        let r = s.http.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
}
