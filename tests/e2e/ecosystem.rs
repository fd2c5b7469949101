//! End-to-end tests of the other APIs clients speak: OpenAI's Responses API, Anthropic's
//! Messages API, vLLM's tokenize endpoints, and the metrics the Gateway API Inference
//! Extension reads.

use super::*;

/// Named SSE events: `(event, data)` pairs; comments ignored.
fn parse_named_sse(text: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for event in text.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let (mut name, mut data) = (None, None);
        for line in event.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = Some(serde_json::from_str::<Value>(d).unwrap());
            } else {
                assert!(line.starts_with(':'), "unexpected SSE line {line:?}");
            }
        }
        match (name, data) {
            (Some(n), Some(d)) => out.push((n, d)),
            (None, None) => {}
            other => panic!("an event without a name or data: {other:?}"),
        }
    }
    out
}

impl Server {
    async fn stream_named(&self, path: &str, body: Value) -> Vec<(String, Value)> {
        let r = self.http.post(self.url(path)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        parse_named_sse(&text)
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        let r = self.http.delete(self.url(path)).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn get_status(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
}

/// The Responses API over HTTP: a response and its stream (the documented event order,
/// numbered, each valid against the OpenAPI document; deltas add up to the final text,
/// which equals the non-streamed one); a required function call, whole and streamed,
/// whose result continues the stored conversation by `previous_response_id`;
/// `text.format` json_schema; retrieve, delete, `store: false`, the store's bound; the
/// errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn responses_api_over_http() {
    let s = Server::start(&[]).await;
    let doc: Value = s.get("/openapi.json").await;
    let check = |name: &str, v: &Value| assert_valid(&schema(&doc, name), name, v);
    let body = json!({"model": MODEL, "input": "Hello", "instructions": "Be brief.", "max_output_tokens": 12,
                      "temperature": 0});
    let (st, r) = s.post("/v1/responses", body.clone()).await;
    assert_eq!(st, 200, "{r}");
    check("ResponseObject", &r);
    assert_eq!(
        (r["object"].as_str(), r["instructions"].as_str()),
        (Some("response"), Some("Be brief."))
    );
    let text: String = r["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["type"] == "message")
        .map(|o| o["content"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(r["output_text"], text.as_str());
    let u = &r["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["input_tokens"].as_u64().unwrap() + u["output_tokens"].as_u64().unwrap())
    );
    match r["status"].as_str().unwrap() {
        "incomplete" => {
            assert_eq!(u["output_tokens"], 12);
            assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
        }
        status => assert_eq!(status, "completed"),
    }

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let events = s.stream_named("/v1/responses", sb).await;
    let mut deltas = String::new();
    for (i, (name, v)) in events.iter().enumerate() {
        assert_eq!(v["type"], name.as_str());
        assert_eq!(v["sequence_number"], i, "{v}");
        check("ResponseStreamEvent", v);
        if name == "response.output_text.delta" {
            deltas.push_str(v["delta"].as_str().unwrap());
        }
    }
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..2], ["response.created", "response.in_progress"]);
    let last = &events.last().unwrap().1;
    assert_eq!(
        names.last().unwrap(),
        &format!("response.{}", r["status"].as_str().unwrap())
    );
    assert_eq!(deltas, text);
    assert_eq!(last["response"]["output_text"], r["output_text"]);
    assert_eq!(
        last["response"]["usage"]["output_tokens"],
        r["usage"]["output_tokens"]
    );
    if !text.is_empty() {
        let i = names
            .iter()
            .position(|n| *n == "response.output_item.added")
            .unwrap();
        assert_eq!(
            names[i..i + 3],
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta"
            ]
        );
    }

    // A required function call.
    let tools: Vec<Value> = weather_tools()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let mut f = t["function"].clone();
            f["type"] = json!("function");
            f
        })
        .collect();
    let call_body = json!({"model": MODEL, "input": "Weather in Paris?", "tools": tools, "tool_choice": "required",
                           "parallel_tool_calls": false, "max_output_tokens": 200, "temperature": 0});
    let (st, r) = s.post("/v1/responses", call_body.clone()).await;
    assert_eq!(st, 200, "{r}");
    check("ResponseObject", &r);
    let call = r["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["type"] == "function_call")
        .unwrap_or_else(|| panic!("no call: {r}"))
        .clone();
    assert_eq!(r["status"], "completed");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(args.is_object(), "{args}");
    assert!(call["call_id"].as_str().unwrap().starts_with("call_"));
    let mut streamed = call_body.clone();
    streamed["stream"] = json!(true);
    let events = s.stream_named("/v1/responses", streamed).await;
    let pieces: String = events
        .iter()
        .filter(|(n, _)| n == "response.function_call_arguments.delta")
        .map(|(_, v)| v["delta"].as_str().unwrap())
        .collect();
    let done = events
        .iter()
        .find(|(n, _)| n == "response.function_call_arguments.done")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert_eq!(
        (pieces.as_str(), &done["arguments"]),
        (call["arguments"].as_str().unwrap(), &call["arguments"])
    );
    assert_eq!(done["name"], call["name"]);
    for (_, v) in &events {
        check("ResponseStreamEvent", v);
    }
    // Its result continues the stored conversation.
    let (st, r2) = s
        .post(
            "/v1/responses",
            json!({"model": MODEL, "previous_response_id": r["id"], "max_output_tokens": 5, "tools": tools,
                   "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "{\"sky\": \"clear\"}"}]}),
        )
        .await;
    assert_eq!(st, 200, "{r2}");
    assert_eq!(r2["previous_response_id"], r["id"]);
    assert!(r2["usage"]["input_tokens"].as_u64() > r["usage"]["input_tokens"].as_u64());

    // text.format json_schema.
    let obj = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
                     "required": ["n"], "additionalProperties": false});
    let (st, r) = s
        .post(
            "/v1/responses",
            json!({"model": MODEL, "input": "A number", "max_output_tokens": 40, "temperature": 0,
                   "text": {"format": {"type": "json_schema", "name": "num", "schema": obj, "strict": true}}}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["text"]["format"]["type"], "json_schema");
    if r["status"] == "completed" {
        let v: Value = serde_json::from_str(r["output_text"].as_str().unwrap()).unwrap();
        assert!(jsonschema::validator_for(&obj).unwrap().is_valid(&v), "{v}");
    }

    // Retrieve, delete, store: false.
    let id = r["id"].as_str().unwrap();
    let (st, got) = s.get_status(&format!("/v1/responses/{id}")).await;
    assert_eq!((st, &got), (200, &r));
    let (st, v) = s.delete(&format!("/v1/responses/{id}")).await;
    assert_eq!((st, v["deleted"].as_bool()), (200, Some(true)));
    check("DeletedResponse", &v);
    let (st, v) = s.get_status(&format!("/v1/responses/{id}")).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("response_not_found"))
    );
    check("ErrorResponse", &v);
    let (_, unstored) = s
        .post(
            "/v1/responses",
            json!({"model": MODEL, "input": "x", "max_output_tokens": 2, "store": false}),
        )
        .await;
    assert_eq!(unstored["store"], false);
    let (st, v) = s
        .post(
            "/v1/responses",
            json!({"model": MODEL, "input": "x", "previous_response_id": unstored["id"]}),
        )
        .await;
    assert_eq!(
        (st, v["error"]["param"].as_str(), v["error"]["code"].as_str()),
        (
            404,
            Some("previous_response_id"),
            Some("previous_response_not_found")
        )
    );

    // What is not supported is a 400 naming the field.
    for (extra, param) in [
        (json!({"background": true}), "background"),
        (json!({"tools": [{"type": "telepathy"}]}), "tools[0].type"),
        (
            json!({"input": [{"type": "item_reference", "id": "x"}]}),
            "input[0].type",
        ),
        (json!({"input": null}), "input"),
        (json!({"text": {"format": {"type": "yaml"}}}), "text.format.type"),
        // Checked by the engine, named as the Responses API calls it.
        (json!({"max_output_tokens": 0}), "max_output_tokens"),
        (json!({"top_p": 0}), "top_p"),
    ] {
        let mut b = json!({"model": MODEL, "input": "x"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let (st, v) = s.post("/v1/responses", b).await;
        assert_eq!((st, v["error"]["param"].as_str()), (400, Some(param)), "{v}");
        check("ErrorResponse", &v);
    }

    // The store keeps at most `responses_store_max`: the oldest goes first.
    let small = Server::start(&["--responses-store-max", "1"]).await;
    let one = json!({"model": MODEL, "input": "x", "max_output_tokens": 1});
    let (_, a) = small.post("/v1/responses", one.clone()).await;
    let (_, b) = small.post("/v1/responses", one).await;
    let (sa, _) = small
        .get_status(&format!("/v1/responses/{}", a["id"].as_str().unwrap()))
        .await;
    let (sb, _) = small
        .get_status(&format!("/v1/responses/{}", b["id"].as_str().unwrap()))
        .await;
    assert_eq!((sa, sb), (404, 200));
}

/// A reasoning model's thought is a `reasoning` item of the Responses API (its tokens
/// counted as reasoning tokens) and a `thinking` block of the Messages API, before the
/// answer once a thinking budget closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thoughts_in_the_responses_and_messages_apis() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("reasoner");
    reasoning_fixture(&dir);
    let s = Server::start_model(&dir, &["--served-model-name", MODEL]).await;
    let doc: Value = s.get("/openapi.json").await;
    let (st, r) = s
        .post(
            "/v1/responses",
            json!({"model": MODEL, "input": "Think", "max_output_tokens": 10}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_valid(&schema(&doc, "ResponseObject"), "ResponseObject", &r);
    assert_eq!(r["output"][0]["type"], "reasoning", "{r}");
    assert!(!r["output"][0]["content"][0]["text"].as_str().unwrap().is_empty());
    let reasoning = r["usage"]["output_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .unwrap();
    assert!(reasoning > 0 && reasoning <= 10, "{r}");
    assert_eq!(r["output_text"], "");

    let body = json!({"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "Think"}],
                      "thinking": {"type": "enabled", "budget_tokens": 4}, "temperature": 0});
    let (st, m) = s.post("/v1/messages", body.clone()).await;
    assert_eq!(st, 200, "{m}");
    assert_valid(&schema(&doc, "Message"), "Message", &m);
    let kinds: Vec<&str> = m["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds[0], "thinking", "{m}");
    assert_eq!(m["content"][0]["signature"], "");
    let mut sb = body;
    sb["stream"] = json!(true);
    let events = s.stream_named("/v1/messages", sb).await;
    let thought: String = events
        .iter()
        .filter(|(_, v)| v["delta"]["type"] == "thinking_delta")
        .map(|(_, v)| v["delta"]["thinking"].as_str().unwrap())
        .collect();
    assert_eq!(thought, m["content"][0]["thinking"].as_str().unwrap());
}

/// A Messages API request with the key in `x-api-key` (as Anthropic's SDKs send it).
async fn messages(s: &Server, path: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut req = s.http.post(s.url(path)).json(&body);
    if let Some(k) = key {
        req = req
            .header("x-api-key", k)
            .header("anthropic-version", "2023-06-01");
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// With a request deadline set, the engine's events come through a merged stream that
/// must not be polled after its end: a streamed response still ends with its final event
/// (the body was cut off by a panic).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streamed_response_completes_under_a_request_deadline() {
    let s = Server::start(&["--request-timeout-secs", "600"]).await;
    let body =
        json!({"model": MODEL, "input": "Hello", "max_output_tokens": 8, "temperature": 0, "stream": true});
    let events = s.stream_named("/v1/responses", body).await;
    let (name, last) = events.last().expect("events");
    assert!(
        name == "response.completed" || name == "response.incomplete",
        "the stream ends with the response: {events:?}"
    );
    assert!(
        last["response"]["usage"]["output_tokens"].as_u64().unwrap() > 0,
        "{last}"
    );
    let (name, _) = &s
        .stream_named(
            "/v1/messages",
            json!({"model": MODEL, "max_tokens": 8, "stream": true,
                   "messages": [{"role": "user", "content": "Hello"}]}),
        )
        .await
        .pop()
        .expect("events");
    assert_eq!(name, "message_stop");
}

/// A streamed message's events, sent with `key` as `x-api-key`.
async fn messages_stream(s: &Server, body: Value, key: &str) -> Vec<(String, Value)> {
    let r = s
        .http
        .post(s.url("/v1/messages"))
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    parse_named_sse(&r.text().await.unwrap())
}

/// Anthropic's Messages API over HTTP: a message and its stream (the event order, each
/// valid against the OpenAPI document, deltas adding up to the whole answer), a stop
/// sequence named in `stop_sequence`, a forced tool use whose streamed input JSON makes
/// the same input, count_tokens equal to what a message reports, `x-api-key`, and
/// errors in Anthropic's shape with its types.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anthropic_messages_over_http() {
    let s = Server::start(&["--api-key", "sekrit"]).await;
    let doc: Value = s
        .http
        .get(s.url("/openapi.json"))
        .bearer_auth("sekrit")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let check = |name: &str, v: &Value| assert_valid(&schema(&doc, name), name, v);
    let key = Some("sekrit");
    let body = json!({"model": MODEL, "max_tokens": 12, "system": "Be brief.", "temperature": 0,
                      "messages": [{"role": "user", "content": "Hello"}]});
    let (st, m) = messages(&s, "/v1/messages", body.clone(), key).await;
    assert_eq!(st, 200, "{m}");
    check("Message", &m);
    assert_eq!(
        (m["type"].as_str(), m["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    let text: String = m["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["text"].as_str().unwrap())
        .collect();
    let out = m["usage"]["output_tokens"].as_u64().unwrap();
    assert!(out > 0);
    let reason = m["stop_reason"].as_str().unwrap();
    assert!(
        reason == "end_turn" || (reason == "max_tokens" && out == 12),
        "{m}"
    );

    // Streamed: the same answer.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let events = messages_stream(&s, sb, "sekrit").await;
    for (name, v) in &events {
        assert_eq!(v["type"], name.as_str());
        check("StreamEvent", v);
    }
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "message_start");
    assert_eq!(names[names.len() - 2..], ["message_delta", "message_stop"]);
    let deltas: String = events
        .iter()
        .filter(|(_, v)| v["delta"]["type"] == "text_delta")
        .map(|(_, v)| v["delta"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, text);
    let end = &events[events.len() - 2].1;
    assert_eq!(end["delta"]["stop_reason"], m["stop_reason"]);
    assert_eq!(end["usage"]["output_tokens"], m["usage"]["output_tokens"]);

    // A stop sequence from the middle of the answer ends it there, and is named.
    let chars: Vec<char> = text.chars().collect();
    if chars.len() >= 6 {
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
        let mut b = body.clone();
        b["stop_sequences"] = json!(["never-appears", stop]);
        let (st, m) = messages(&s, "/v1/messages", b, key).await;
        assert_eq!(st, 200, "{m}");
        assert_eq!(
            (m["stop_reason"].as_str(), m["stop_sequence"].as_str()),
            (Some("stop_sequence"), Some(stop.as_str()))
        );
        let got: String = m["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["text"].as_str().unwrap())
            .collect();
        assert_eq!(got, text[..text.find(&stop).unwrap()]);
    }

    // A forced tool use, whole and streamed.
    let tools: Vec<Value> = weather_tools()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| json!({"name": t["function"]["name"], "input_schema": t["function"]["parameters"]}))
        .collect();
    let tb = json!({"model": MODEL, "max_tokens": 200, "temperature": 0, "tools": tools,
                    "tool_choice": {"type": "tool", "name": "get_weather"},
                    "messages": [{"role": "user", "content": "Weather in Paris?"}]});
    let (st, m) = messages(&s, "/v1/messages", tb.clone(), key).await;
    assert_eq!(st, 200, "{m}");
    check("Message", &m);
    assert_eq!(m["stop_reason"], "tool_use");
    let using = m["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap()
        .clone();
    assert_eq!(using["name"], "get_weather");
    assert!(using["id"].as_str().unwrap().starts_with("toolu_"));
    assert!(using["input"]["city"].is_string(), "{using}");
    let mut sb = tb.clone();
    sb["stream"] = json!(true);
    let events = messages_stream(&s, sb, "sekrit").await;
    let json_text: String = events
        .iter()
        .filter(|(_, v)| v["delta"]["type"] == "input_json_delta")
        .map(|(_, v)| v["delta"]["partial_json"].as_str().unwrap())
        .collect();
    assert_eq!(serde_json::from_str::<Value>(&json_text).unwrap(), using["input"]);
    // The result goes back as a tool_result block.
    let mut round = tb.clone();
    round["tool_choice"] = json!({"type": "auto"});
    round["max_tokens"] = json!(5);
    round["messages"] = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": m["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": using["id"], "content": "sunny"}]}]);
    let (st, v) = messages(&s, "/v1/messages", round, key).await;
    assert_eq!(st, 200, "{v}");

    // count_tokens counts what a message's prompt is.
    let (st, n) = messages(
        &s,
        "/v1/messages/count_tokens",
        json!({"model": MODEL, "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hello"}]}),
        key,
    )
    .await;
    assert_eq!(st, 200, "{n}");
    check("TokenCount", &n);
    let (_, m) = messages(&s, "/v1/messages", body.clone(), key).await;
    let prompt = m["usage"]["input_tokens"].as_u64().unwrap()
        + m["usage"]["cache_read_input_tokens"].as_u64().unwrap();
    assert_eq!(n["input_tokens"].as_u64(), Some(prompt));

    // Errors in Anthropic's shape, with its types; the key by either header.
    let err = |v: &Value| {
        (
            v["type"].as_str().map(String::from),
            v["error"]["type"].as_str().map(String::from),
        )
    };
    let e = |t: &str| (Some("error".to_string()), Some(t.to_string()));
    let (st, v) = messages(&s, "/v1/messages", body.clone(), None).await;
    assert_eq!((st, err(&v)), (401, e("authentication_error")), "{v}");
    check("AnthropicError", &v);
    let (st, v) = messages(&s, "/v1/messages", body.clone(), Some("wrong")).await;
    assert_eq!((st, err(&v)), (401, e("authentication_error")));
    let r = s
        .http
        .post(s.url("/v1/messages"))
        .bearer_auth("sekrit")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (b, status, kind) in [
        (
            json!({"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
            404,
            "not_found_error",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "wizard", "content": "x"}]}),
            400,
            "invalid_request_error",
        ),
    ] {
        let (st, v) = messages(&s, "/v1/messages", b, key).await;
        assert_eq!((st, err(&v)), (status, e(kind)), "{v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        check("AnthropicError", &v);
    }
    let r = s
        .http
        .post(s.url("/v1/messages"))
        .header("x-api-key", "sekrit")
        .header("content-type", "text/plain")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(err(&r.json().await.unwrap()), e("invalid_request_error"));
}

/// vLLM's tokenize endpoints: a prompt's tokens detokenize back to it; chat messages
/// count what a chat request reports as prompt tokens; `max_model_len` agrees with
/// `/v1/models`; bad requests are 400s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokenize_round_trips() {
    let s = Server::start(&[]).await;
    let doc: Value = s.get("/openapi.json").await;
    let check = |name: &str, v: &Value| assert_valid(&schema(&doc, name), name, v);
    let text = "Hello, world! Ünïcödé and 数字 123";
    let (st, t) = s
        .post("/tokenize", json!({"prompt": text, "return_token_strs": true}))
        .await;
    assert_eq!(st, 200, "{t}");
    check("TokenizeResponse", &t);
    let tokens = t["tokens"].as_array().unwrap().clone();
    assert_eq!(t["count"].as_u64(), Some(tokens.len() as u64));
    assert_eq!(t["token_strs"].as_array().unwrap().len(), tokens.len());
    let (st, d) = s
        .post("/detokenize", json!({"model": MODEL, "tokens": tokens}))
        .await;
    assert_eq!((st, d["prompt"].as_str()), (200, Some(text)));
    check("DetokenizeResponse", &d);
    let models = s.get("/v1/models").await;
    assert_eq!(models["data"][0]["max_model_len"], t["max_model_len"]);
    assert!(t["max_model_len"].as_u64().unwrap() > 0);

    let msgs = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
    let (st, t) = s.post("/tokenize", json!({"messages": msgs})).await;
    assert_eq!(st, 200, "{t}");
    let v = s
        .chat(json!({"model": MODEL, "messages": msgs, "max_tokens": 1}))
        .await;
    assert_eq!(t["count"], v["usage"]["prompt_tokens"]);

    for (path, body, status) in [
        ("/tokenize", json!({}), 400),
        ("/tokenize", json!({"prompt": "x", "messages": msgs}), 400),
        ("/tokenize", json!({"prompt": "x", "model": "nope"}), 404),
        (
            "/tokenize",
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
        ),
        ("/detokenize", json!({"tokens": [1, 99999999]}), 400),
        ("/detokenize", json!({"tokens": "abc"}), 400),
    ] {
        let (st, v) = s.post(path, body.clone()).await;
        assert_eq!(st, status, "{body}: {v}");
        check("ErrorResponse", &v);
    }
}

/// The metrics the inference gateway reads: KV-cache use as a 0-1 fraction rises while
/// requests run and returns to 0; waiting and running gauges; the pool's shape in
/// `moeserve_cache_config_info`'s labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_metrics_follow_the_load() {
    let s = Server::start(&["--max-num-seqs", "2"]).await;
    let text = s.metrics_text().await;
    let info = text
        .lines()
        .find(|l| l.starts_with("moeserve_cache_config_info{"))
        .unwrap_or_else(|| panic!("no cache_config_info in {text}"));
    let total = s.metric("moeserve_kv_cache_blocks_total").await;
    assert!(info.contains("block_size=\"16\""), "{info}");
    assert!(info.contains(&format!("num_gpu_blocks=\"{total}\"")), "{info}");
    assert!(info.ends_with(" 1"), "{info}");
    assert_eq!(s.metric("moeserve_kv_cache_usage_perc").await, 0.0);

    // Four long requests on two sequence slots: two run, two wait.
    let mut requests = Vec::new();
    for i in 0..4 {
        let http = s.http.clone();
        let url = s.url("/v1/chat/completions");
        requests.push(tokio::spawn(async move {
            http.post(url)
                .json(&chat_body(&format!("Go {i}"), json!({"max_tokens": 400})))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }));
    }
    let t = Instant::now();
    let (mut usage, mut running, mut waiting) = (0.0, 0.0, 0.0);
    while usage == 0.0 || running < 2.0 || waiting < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "usage {usage}, running {running}, waiting {waiting}"
        );
        usage = s.metric("moeserve_kv_cache_usage_perc").await;
        running = s.metric("moeserve_num_requests_running").await;
        waiting = s.metric("moeserve_num_requests_waiting").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let used = s.metric("moeserve_kv_cache_blocks_used").await;
    assert!(usage > 0.0 && usage <= 1.0, "{usage}");
    assert!(
        (usage - used / total).abs() < 0.05 || used > 0.0,
        "{usage} vs {used}/{total}"
    );
    for r in requests {
        assert_eq!(r.await.unwrap()["usage"]["completion_tokens"], 400);
    }
    s.wait_metric("moeserve_kv_cache_usage_perc", 0.0).await;
    s.wait_metric("moeserve_num_requests_running", 0.0).await;
    assert_eq!(s.metric("moeserve_num_requests_waiting").await, 0.0);
}

/// What agents send that a chat client would not: their model's maximum output (Claude
/// Code 32000) is cut to what the context leaves on the Messages and Responses APIs
/// (chat still refuses it); a system message after the user's turn; hosted tools, left
/// out; and a forced call to one function ends the turn after that call.
/// `--max-output-tokens` caps every API. The KV pool here is small, so "what the
/// context leaves" is what the pool holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_requests() {
    let s = Server::start(&["--kv-cache-memory", "2MiB", "--block-size", "16"]).await;
    let pool = s.metric("moeserve_kv_cache_blocks_total").await as u64 * 16;
    let context = s.get("/v1/models").await["data"][0]["max_model_len"]
        .as_u64()
        .unwrap();
    assert!(pool < 32000 && context < 100000);
    let (st, m) = s
        .post(
            "/v1/messages",
            json!({"model": MODEL, "max_tokens": 32000, "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "system", "content": "Answer in French."}],
                "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
        )
        .await;
    assert_eq!(st, 200, "{m}");
    assert!(
        m["stop_reason"] == "max_tokens" || m["stop_reason"] == "end_turn",
        "{m}"
    );
    let used = m["usage"]["input_tokens"].as_u64().unwrap()
        + m["usage"]["cache_read_input_tokens"].as_u64().unwrap()
        + m["usage"]["output_tokens"].as_u64().unwrap();
    assert!(
        used <= pool.min(context),
        "{used} tokens in a pool of {pool}: {m}"
    );
    let (st, r) = s
        .post(
            "/v1/responses",
            json!({"model": MODEL, "input": "Hi", "max_output_tokens": 100000,
                "tools": [{"type": "web_search"}], "store": false}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let (st, c) = s
        .post(
            "/v1/chat/completions",
            json!({"model": MODEL, "max_tokens": 100000, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(
        (st, c["error"]["param"].as_str()),
        (400, Some("max_tokens")),
        "{c}"
    );

    // A forced call to one function: one call, then the turn ends.
    let tool = json!({"type": "function", "name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": false}});
    let (st, r) = s
        .post(
            "/v1/responses",
            json!({"model": MODEL, "input": "Weather in Paris?", "tools": [tool],
                "tool_choice": "required", "max_output_tokens": 200, "store": false}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["status"], "completed", "{r}");
    let calls = output_items(&r, "function_call");
    assert_eq!(calls.len(), 1, "{r}");

    let capped = Server::start(&["--max-output-tokens", "3", "--default-temperature", "0"]).await;
    let story = json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}]});
    let v = capped.chat(story.clone()).await;
    let again = capped.chat(story).await;
    assert_eq!(
        v["choices"][0]["message"]["content"], again["choices"][0]["message"]["content"],
        "no temperature sent: greedy under --default-temperature 0"
    );
    assert_eq!(
        (
            v["usage"]["completion_tokens"].as_u64(),
            v["choices"][0]["finish_reason"].as_str()
        ),
        (Some(3), Some("length")),
        "{v}"
    );
}

/// `POST /v1/responses/compact` (Codex calls it when its context fills): the user's
/// messages come back as they were, then a `compaction` item with the model's summary
/// of the rest, and that output continues the conversation as the next input.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn responses_compact() {
    let s = Server::start(&["--max-output-tokens", "16"]).await;
    let doc: Value = s.get("/openapi.json").await;
    let input = json!([
        {"role": "user", "content": "List the files."},
        {"type": "function_call", "call_id": "c1", "name": "ls", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "a.txt b.txt"},
        {"role": "assistant", "content": "Two files: a.txt and b.txt."},
        {"role": "user", "content": "Now read a.txt."},
    ]);
    let (st, c) = s
        .post("/v1/responses/compact", json!({"model": MODEL, "input": input}))
        .await;
    assert_eq!(st, 200, "{c}");
    assert_valid(&schema(&doc, "CompactResponse"), "CompactResponse", &c);
    assert_eq!(c["object"], "response.compaction");
    let out = c["output"].as_array().unwrap();
    let users: Vec<&str> = out
        .iter()
        .filter(|i| i["role"] == "user")
        .map(|i| i["content"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["List the files.", "Now read a.txt."]);
    let last = out.last().unwrap();
    assert_eq!(last["type"], "compaction", "{c}");
    assert!(last["encrypted_content"]
        .as_str()
        .unwrap()
        .starts_with("moeserve-compaction-v1:"));
    assert!(c["usage"]["output_tokens"].as_u64().unwrap() <= 16, "{c}");

    let mut next = out.clone();
    next.push(json!({"role": "user", "content": "Go on."}));
    let (st, r) = s
        .post(
            "/v1/responses",
            json!({"model": MODEL, "input": next, "max_output_tokens": 4}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let (st, e) = s
        .post("/v1/responses/compact", json!({"model": MODEL, "input": []}))
        .await;
    assert_eq!((st, e["error"]["param"].as_str()), (400, Some("input")), "{e}");
}

/// A response's output items of type `kind`.
fn output_items<'a>(r: &'a Value, kind: &str) -> Vec<&'a Value> {
    r["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == kind)
        .collect()
}

/// Custom (free-form) tools, as Codex offers `apply_patch` and `exec`: the input follows
/// the tool's grammar (Lark or regex) and comes back as a `custom_tool_call` item on
/// Responses (streamed as `response.custom_tool_call_input.*`, equal to the whole
/// response) and as a `custom` tool call on chat; the call and its output are read back
/// in the next turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn custom_tools() {
    let s = Server::start(&["--default-temperature", "0"]).await;
    let lark = "start: \"*** Begin Patch\\n\" \"*** Delete File: \" NAME LF \"*** End Patch\"\nNAME: /[a-z]{1,8}\\.txt/\n%import common.LF";
    let tools = json!([
        {"type": "custom", "name": "apply_patch", "description": "Edits files.",
            "format": {"type": "grammar", "syntax": "lark", "definition": lark}},
        {"type": "function", "name": "ls", "parameters": {"type": "object", "properties": {}}},
    ]);
    let body = json!({"model": MODEL, "input": "Delete notes.txt", "tools": tools,
        "tool_choice": {"type": "custom", "name": "apply_patch"}, "max_output_tokens": 120, "store": false});
    let (st, r) = s.post("/v1/responses", body.clone()).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["status"], "completed", "{r}");
    let calls = output_items(&r, "custom_tool_call");
    assert_eq!(calls.len(), 1, "{r}");
    let input = calls[0]["input"].as_str().unwrap();
    let name = input
        .strip_prefix("*** Begin Patch\n*** Delete File: ")
        .and_then(|rest| rest.strip_suffix("\n*** End Patch"))
        .unwrap_or_else(|| panic!("not a sentence of the grammar: {input:?}"));
    let stem = name.strip_suffix(".txt").unwrap();
    assert!(
        (1..=8).contains(&stem.len()) && stem.bytes().all(|b| b.is_ascii_lowercase()),
        "{input:?}"
    );
    assert_eq!(calls[0]["name"], "apply_patch");
    assert!(calls[0]["call_id"].as_str().unwrap().starts_with("call_"));

    // Streamed: the input's pieces add up to it, and the items are the same.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events: Vec<Value> = s
        .stream_named("/v1/responses", streamed)
        .await
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.custom_tool_call_input.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    let done = events
        .iter()
        .find(|e| e["type"] == "response.custom_tool_call_input.done")
        .unwrap();
    assert_eq!((deltas.as_str(), done["input"].as_str()), (input, Some(input)));
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.completed");
    let strip = |items: &Value| -> Vec<Value> {
        items
            .as_array()
            .unwrap()
            .iter()
            .map(|i| json!({"type": i["type"], "name": i["name"], "input": i["input"]}))
            .collect()
    };
    assert_eq!(strip(&last["response"]["output"]), strip(&r["output"]));

    // The next turn brings the call and its output back.
    let (st, next) = s
        .post(
            "/v1/responses",
            json!({"model": MODEL, "tools": tools, "max_output_tokens": 8, "store": false, "input": [
                {"role": "user", "content": "Delete notes.txt"},
                {"type": "custom_tool_call", "call_id": "call_1", "name": "apply_patch", "input": input},
                {"type": "custom_tool_call_output", "call_id": "call_1", "output": "Done!"}]}),
        )
        .await;
    assert_eq!(st, 200, "{next}");

    // Chat's custom tools: a regex, forced.
    let chat_tool = json!({"type": "custom", "custom": {"name": "rate", "format": {"type": "grammar",
        "grammar": {"syntax": "regex", "definition": "(good|bad), [1-5] stars"}}}});
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "Rate Paris."}],
        "tools": [chat_tool], "tool_choice": "required", "max_tokens": 200});
    let v = s.chat(chat.clone()).await;
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(
        (call["type"].as_str(), call["custom"]["name"].as_str()),
        (Some("custom"), Some("rate")),
        "{v}"
    );
    let input = call["custom"]["input"].as_str().unwrap();
    let (word, rest) = input
        .split_once(", ")
        .unwrap_or_else(|| panic!("{input:?} in {v}"));
    assert!(
        ["good", "bad"].contains(&word) && rest.len() == 7 && rest.ends_with(" stars"),
        "{input:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let mut streamed = chat;
    streamed["stream"] = json!(true);
    let chunks = s.stream("/v1/chat/completions", streamed).await;
    let pieces: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["custom"]["input"].as_str())
        .collect();
    assert_eq!(pieces, input);
}
