//! `POST /v1/completions`: a string, a list of strings, token ids or lists of token ids;
//! `echo`; integer `logprobs`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use moeserve_core::engine::{EngineEvent, FinishReason, GenerateRequest, TokenLogprob, Usage};
use moeserve_core::TextCodec;
use serde_json::{json, Map, Value};

use super::{
    add_usage, chunk_builder, encode, envelope, finish_reason, include_usage, merge, sse_response,
    token_text, usage_json, ChoiceState, Timing,
};
use crate::error::ApiError;
use crate::openai::{unix_now, CompletionRequest, Prompt};
use crate::server::{ApiJson, SharedState};

/// The legacy completions `logprobs` object, for `entries` of (token, logprob, top).
/// The first prompt token of an echoed prompt has no logprob (`None`).
fn logprobs_json(codec: &TextCodec, entries: &[(u32, Option<&TokenLogprob>)], text_start: usize) -> Value {
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    let mut offset = text_start;
    for &(id, lp) in entries {
        let t = token_text(codec, id);
        offsets.push(offset);
        offset += t.len();
        tokens.push(Value::from(t));
        lps.push(lp.map_or(Value::Null, |l| l.logprob.into()));
        tops.push(lp.map_or(Value::Null, |l| {
            let m: Map<String, Value> = l
                .top
                .iter()
                .map(|&(t, p)| (token_text(codec, t), p.into()))
                .collect();
            Value::Object(m)
        }));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

pub async fn completions(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let m = state.engine_for(&req.model)?;
    let params = req.to_params(state.settings.max_n)?;
    let codec: Arc<TextCodec> = m.engine.codec().clone();
    let mut prompts = Vec::new();
    for p in req.prompts()? {
        prompts.push(match p {
            Prompt::Text(t) => encode(codec.clone(), t).await?,
            Prompt::Tokens(t) => t,
        });
    }
    let n = params.n;
    let want_logprobs = params.logprobs.is_some();
    let echo = req.echo;
    // Submit all or none: a refused prompt drops (aborts) the ones already queued.
    let handles = prompts
        .iter()
        .map(|p| {
            m.engine.submit(GenerateRequest {
                prompt: p.clone(),
                params: params.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::from_submit(e, "prompt"))?;
    let events = merge(handles, state.settings.request_deadline());
    let prompt_texts: Vec<String> = if echo {
        prompts
            .iter()
            .map(|p| codec.decode(p, false).unwrap_or_default())
            .collect()
    } else {
        vec![String::new(); prompts.len()]
    };
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let created = unix_now();
    let model = m.id.clone();
    let mut timing = Timing::new("/v1/completions");
    let total = prompts.len() * n;

    if !req.stream {
        let mut choices = vec![ChoiceState::default(); total];
        let mut prompt_lps: Vec<Vec<Option<TokenLogprob>>> = vec![vec![]; prompts.len()];
        let mut usage = Usage::default();
        let mut done = vec![false; prompts.len()];
        let mut events = events;
        while let Some((r, ev)) = events.next().await {
            match ev {
                EngineEvent::PromptLogprobs(lp) => prompt_lps[r] = lp,
                EngineEvent::Delta {
                    index,
                    token_ids,
                    text,
                    logprobs,
                } => {
                    timing.token(&state);
                    let c = &mut choices[r * n + index];
                    c.text.push_str(&text);
                    c.tokens += token_ids.len();
                    c.logprobs.extend(logprobs);
                }
                EngineEvent::Finished { index, reason } => {
                    for (i, c) in choices.iter_mut().enumerate() {
                        if (r == usize::MAX || i == r * n + index) && c.finish.is_none() {
                            c.finish = Some(reason);
                        }
                    }
                }
                EngineEvent::Done(u) => {
                    add_usage(&mut usage, &u);
                    done[r] = true;
                }
                EngineEvent::Error(e) => return Err(ApiError::from(e)),
            }
        }
        timing.done(&state);
        // Requests cut by the deadline sent no usage: count what they produced.
        for (r, d) in done.iter().enumerate() {
            if !d {
                usage.prompt_tokens += prompts[r].len();
                usage.completion_tokens += choices[r * n..(r + 1) * n]
                    .iter()
                    .map(|c| c.tokens)
                    .sum::<usize>();
            }
        }
        let choices: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let r = i / n;
                let logprobs = if want_logprobs {
                    let mut entries: Vec<(u32, Option<&TokenLogprob>)> = Vec::new();
                    if echo {
                        entries.extend(
                            prompts[r]
                                .iter()
                                .zip(&prompt_lps[r])
                                .map(|(&t, lp)| (t, lp.as_ref())),
                        );
                    }
                    entries.extend(c.logprobs.iter().map(|l| (l.token, Some(l))));
                    logprobs_json(&codec, &entries, 0)
                } else {
                    Value::Null
                };
                json!({
                    "index": i,
                    "text": format!("{}{}", prompt_texts[r], c.text),
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(c.finish.unwrap_or(FinishReason::Length)),
                })
            })
            .collect();
        let mut body = envelope(&id, "text_completion", created, &model, Value::Array(choices));
        body["usage"] = usage_json(&usage);
        return Ok(axum::Json(body).into_response());
    }

    let include_usage = include_usage(&req.stream_options);
    let chunk = chunk_builder(id, "text_completion", created, model, include_usage);
    let prompt_lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let keepalive = state.settings.sse_keepalive_secs;
    let st = state.clone();
    let stream = async_stream::stream! {
        let state = st;
        let mut events = events;
        let mut usage = Usage::default();
        let mut finished = vec![false; total];
        let mut done = vec![false; prompt_lens.len()];
        let mut produced = vec![0usize; total];
        if echo && !want_logprobs {
            for i in 0..total {
                yield chunk(json!([{"index": i, "text": prompt_texts[i / n], "logprobs": null, "finish_reason": null}]));
            }
        }
        while let Some((r, ev)) = events.next().await {
            match ev {
                EngineEvent::PromptLogprobs(lp) => {
                    for j in 0..n {
                        let entries: Vec<(u32, Option<&TokenLogprob>)> =
                            prompts[r].iter().zip(&lp).map(|(&t, l)| (t, l.as_ref())).collect();
                        yield chunk(json!([{"index": r * n + j, "text": prompt_texts[r],
                            "logprobs": logprobs_json(&codec, &entries, 0), "finish_reason": null}]));
                    }
                }
                EngineEvent::Delta { index, token_ids, text, logprobs } => {
                    timing.token(&state);
                    produced[r * n + index] += token_ids.len();
                    if text.is_empty() && logprobs.is_empty() {
                        continue;
                    }
                    let lp = if want_logprobs {
                        let entries: Vec<(u32, Option<&TokenLogprob>)> = logprobs.iter().map(|l| (l.token, Some(l))).collect();
                        logprobs_json(&codec, &entries, 0)
                    } else {
                        Value::Null
                    };
                    yield chunk(json!([{"index": r * n + index, "text": text, "logprobs": lp, "finish_reason": null}]));
                }
                EngineEvent::Finished { index, reason } => {
                    let which: Vec<usize> = if r == usize::MAX { (0..total).collect() } else { vec![r * n + index] };
                    for i in which {
                        if !std::mem::replace(&mut finished[i], true) {
                            yield chunk(json!([{"index": i, "text": "", "logprobs": null, "finish_reason": finish_reason(reason)}]));
                        }
                    }
                }
                EngineEvent::Done(u) => {
                    add_usage(&mut usage, &u);
                    done[r] = true;
                }
                EngineEvent::Error(e) => {
                    yield ApiError::from(e).body();
                    break;
                }
            }
        }
        timing.done(&state);
        for (r, d) in done.iter().enumerate() {
            if !d {
                usage.prompt_tokens += prompt_lens[r];
                usage.completion_tokens += produced[r * n..(r + 1) * n].iter().sum::<usize>();
            }
        }
        if include_usage {
            let mut c = chunk(json!([]));
            c["usage"] = usage_json(&usage);
            yield c;
        }
    };
    Ok(sse_response(stream, keepalive))
}
