//! `POST /v1/chat/completions`

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use moeserve_core::engine::{EngineEvent, FinishReason, GenerateRequest, TokenLogprob, Usage};
use moeserve_core::reasoning::{ReasoningSplitter, SplitDelta};
use moeserve_core::sampling::ReasoningBudget;
use moeserve_core::TextCodec;
use serde_json::{json, Value};

use super::{
    chunk_builder, encode, envelope, finish_reason, include_usage, merge, sse_response, token_text,
    usage_json, ChoiceState, Timing,
};
use crate::error::ApiError;
use crate::openai::{unix_now, ChatCompletionRequest};
use crate::server::{ApiJson, SharedState};

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
    let mut params = params;
    // Reasoning models: a splitter per choice, and the optional thinking budget.
    let opened = m.reasoning.as_ref().is_some_and(|t| t.opened_in(&prompt_text));
    let splitter = m
        .reasoning
        .as_ref()
        .map(|t| ReasoningSplitter::new(t.clone(), opened));
    if let Some(max_tokens) = req.max_reasoning_tokens {
        let t = m.reasoning.as_ref().ok_or_else(|| {
            ApiError::invalid_param(
                "max_reasoning_tokens",
                "this model does not produce reasoning output",
            )
        })?;
        params.reasoning_budget = Some(ReasoningBudget {
            max_tokens,
            start_token: t.start_token,
            end_token: t.end_token,
            starts_open: opened,
        });
    }
    let prompt = encode(codec.clone(), prompt_text).await?;
    let prompt_tokens = prompt.len();
    let n = params.n;
    let want_logprobs = params.logprobs.is_some();
    let handle = m
        .engine
        .submit(GenerateRequest { prompt, params })
        .map_err(|e| ApiError::from_submit(e, "messages"))?;
    let events = merge(vec![handle], state.settings.request_deadline());
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
                let mut message = json!({"role": "assistant", "content": c.text});
                if let Some(mut s) = splitter.clone() {
                    let mut d = s.push(&c.text);
                    let rest = s.finish();
                    d.reasoning.push_str(&rest.reasoning);
                    d.content.push_str(&rest.content);
                    message =
                        json!({"role": "assistant", "content": d.content, "reasoning_content": d.reasoning});
                }
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": if want_logprobs { logprobs_json(&codec, &c.logprobs) } else { Value::Null },
                    "finish_reason": c.finish.map(finish_reason),
                })
            })
            .collect();
        let mut body = envelope(&id, "chat.completion", created, &model, Value::Array(choices));
        body["usage"] = usage_json(&usage);
        return Ok(axum::Json(body).into_response());
    }

    let include_usage = include_usage(&req.stream_options);
    let chunk = chunk_builder(id, "chat.completion.chunk", created, model, include_usage);
    let keepalive = state.settings.sse_keepalive_secs;
    let st = state.clone();
    let stream = async_stream::stream! {
        let state = st;
        let mut events = events;
        let mut usage = Usage { prompt_tokens, ..Usage::default() };
        let mut finished = vec![false; n];
        let mut splitters = vec![splitter; n];
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
                    let delta = match splitters[index].as_mut() {
                        Some(s) => split_delta(s.push(&text)),
                        None => json!({"content": text}),
                    };
                    if delta.as_object().is_some_and(|d| d.is_empty()) && lp.is_null() {
                        continue;
                    }
                    yield chunk(json!([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": null}]));
                }
                EngineEvent::Finished { index, reason } => {
                    let which: Vec<usize> = if index == usize::MAX { (0..n).collect() } else { vec![index] };
                    for i in which {
                        if !std::mem::replace(&mut finished[i], true) {
                            if let Some(s) = splitters[i].as_mut() {
                                let rest = split_delta(s.finish());
                                if !rest.as_object().is_some_and(|d| d.is_empty()) {
                                    yield chunk(json!([{"index": i, "delta": rest, "logprobs": null, "finish_reason": null}]));
                                }
                            }
                            yield chunk(json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": finish_reason(reason)}]));
                        }
                    }
                }
                EngineEvent::Done(u) => usage = u,
                EngineEvent::Error(e) => {
                    yield ApiError::from(e).body();
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

/// A stream delta with the non-empty parts of a reasoning split.
fn split_delta(d: SplitDelta) -> Value {
    let mut v = serde_json::Map::new();
    if !d.reasoning.is_empty() {
        v.insert("reasoning_content".into(), d.reasoning.into());
    }
    if !d.content.is_empty() {
        v.insert("content".into(), d.content.into());
    }
    Value::Object(v)
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
            EngineEvent::Error(e) => return Err(ApiError::from(e)),
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
