//! `POST /v1/chat/completions`

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use moeserve_core::engine::{EngineEvent, FinishReason, GenerateRequest, TokenLogprob, Usage};
use moeserve_core::TextCodec;
use serde_json::{json, Value};

use super::{encode, finish_reason, merge, sse_response, token_text, usage_json, ChoiceState, Timing};
use crate::error::ApiError;
use crate::openai::{unix_now, ChatCompletionRequest};
use crate::server::{ApiJson, SharedState};

pub const SYSTEM_FINGERPRINT: &str = concat!("moeserve-", env!("CARGO_PKG_VERSION"));

/// OpenAI's chat `logprobs` object.
fn logprobs_json(codec: &TextCodec, lps: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let t = token_text(codec, id);
        json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(l.token, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|&(t, lp)| entry(t, lp)).collect();
            e
        })
        .collect();
    json!({"content": content})
}

pub async fn chat_completions(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let m = state.engine_for(&req.model)?;
    let params = req.to_params(state.settings.max_n)?;
    let messages = req.template_messages()?;
    let template = m
        .template
        .as_ref()
        .ok_or_else(|| ApiError::invalid("this model has no chat template; use /v1/completions", None))?;
    let prompt_text = template
        .render(&messages, true, req.tools.as_ref(), req.tool_choice.as_ref())
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
    let codec: Arc<TextCodec> = m.engine.codec().clone();
    let prompt = encode(codec.clone(), prompt_text).await?;
    let prompt_tokens = prompt.len();
    let n = params.n;
    let want_logprobs = params.logprobs.is_some();
    let handle = m.engine.submit(GenerateRequest { prompt, params })?;
    let events = merge(vec![handle], state.settings.request_timeout_secs);
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = unix_now();
    let model = m.id.clone();
    let mut timing = Timing::new("/v1/chat/completions");

    if !req.stream {
        let (choices, usage) = collect(&state, events, n, prompt_tokens, &mut timing).await?;
        timing.done(&state);
        let choices: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": if want_logprobs { logprobs_json(&codec, &c.logprobs) } else { Value::Null },
                    "finish_reason": c.finish.map(finish_reason),
                })
            })
            .collect();
        return Ok(axum::Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices, "usage": usage_json(&usage),
        }))
        .into_response());
    }

    let include_usage = req
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let chunk = move |choices: Value| {
        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices});
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let keepalive = state.settings.sse_keepalive_secs;
    let st = state.clone();
    let stream = async_stream::stream! {
        let state = st;
        let mut events = events;
        let mut usage = Usage { prompt_tokens, ..Usage::default() };
        let mut finished = vec![false; n];
        for i in 0..n {
            yield chunk(json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]));
        }
        while let Some((_, ev)) = events.next().await {
            match ev {
                EngineEvent::Delta { index, token_ids, text, logprobs } => {
                    timing.token(&state);
                    usage.completion_tokens += token_ids.len();
                    if text.is_empty() && logprobs.is_empty() {
                        continue;
                    }
                    let lp = if want_logprobs { logprobs_json(&codec, &logprobs) } else { Value::Null };
                    yield chunk(json!([{"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}]));
                }
                EngineEvent::Finished { index, reason } => {
                    let which: Vec<usize> = if index == usize::MAX { (0..n).collect() } else { vec![index] };
                    for i in which {
                        if !std::mem::replace(&mut finished[i], true) {
                            yield chunk(json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": finish_reason(reason)}]));
                        }
                    }
                }
                EngineEvent::Done(u) => usage = u,
                EngineEvent::Error(e) => {
                    yield ApiError::Internal(e).body();
                    break;
                }
                EngineEvent::PromptLogprobs(_) => {}
            }
        }
        timing.done(&state);
        if include_usage {
            let mut c = chunk(json!([]));
            c["usage"] = usage_json(&usage);
            yield c;
        }
    };
    Ok(sse_response(stream, keepalive))
}

/// Runs a request to the end: each choice's text, tokens, logprobs, finish reason.
pub async fn collect(
    state: &SharedState,
    mut events: super::Events,
    n: usize,
    prompt_tokens: usize,
    timing: &mut Timing,
) -> Result<(Vec<ChoiceState>, Usage), ApiError> {
    let mut choices = vec![ChoiceState::default(); n];
    let mut usage = None;
    while let Some((_, ev)) = events.next().await {
        match ev {
            EngineEvent::Delta {
                index,
                token_ids,
                text,
                logprobs,
            } => {
                timing.token(state);
                let c = &mut choices[index];
                c.text.push_str(&text);
                c.tokens += token_ids.len();
                c.logprobs.extend(logprobs);
            }
            EngineEvent::Finished { index, reason } => {
                for (i, c) in choices.iter_mut().enumerate() {
                    if (index == usize::MAX || i == index) && c.finish.is_none() {
                        c.finish = Some(reason);
                    }
                }
            }
            EngineEvent::Done(u) => usage = Some(u),
            EngineEvent::Error(e) => return Err(ApiError::Internal(e)),
            EngineEvent::PromptLogprobs(_) => {}
        }
    }
    for c in &mut choices {
        c.finish.get_or_insert(FinishReason::Length);
    }
    let usage = usage.unwrap_or(Usage {
        prompt_tokens,
        completion_tokens: choices.iter().map(|c| c.tokens).sum(),
        cached_tokens: 0,
    });
    Ok((choices, usage))
}
