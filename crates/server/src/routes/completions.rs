//! `POST /v1/completions`: a string, a list of strings, token ids or lists of token ids;
//! `echo`; integer `logprobs`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use moeserve_core::engine::{GenerateRequest, TokenLogprob};
use moeserve_core::TextCodec;

use super::{
    encode, include_usage, run_to_end, sse_response, to_json, token_text, Timing, SYSTEM_FINGERPRINT,
};
use crate::api::requests::{CompletionRequest, Prompt};
use crate::api::responses::{
    Completion, CompletionChoice, CompletionChunk, CompletionLogprobs, ErrorResponse, FinishReason,
    TextCompletionObject, UsageSlot,
};
use crate::api::unix_now;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::generation::{merge, Fold, Update};
use crate::state::SharedState;

/// The legacy completions `logprobs` object for `entries` of (token, its logprob and
/// alternatives); the first token of an echoed prompt has none.
fn logprobs(codec: &TextCodec, entries: &[(u32, Option<&TokenLogprob>)]) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = 0;
    for &(id, lp) in entries {
        let t = token_text(codec, id);
        out.text_offset.push(offset);
        offset += t.len();
        out.tokens.push(t);
        out.token_logprobs.push(lp.map(|l| l.logprob));
        out.top_logprobs.push(lp.map(|l| {
            l.top
                .iter()
                .map(|&(t, p)| (token_text(codec, t), p))
                .collect::<BTreeMap<String, f32>>()
        }));
    }
    out
}

/// A prompt's tokens with their logprobs (none for the first), for `echo`.
fn prompt_entries<'a>(
    prompt: &[u32],
    lps: &'a [Option<TokenLogprob>],
) -> Vec<(u32, Option<&'a TokenLogprob>)> {
    prompt.iter().zip(lps).map(|(&t, l)| (t, l.as_ref())).collect()
}

/// Builds a completion response's chunks.
struct Chunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl Chunks {
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: UsageSlot) -> serde_json::Value {
        to_json(&CompletionChunk {
            id: self.id.clone(),
            object: TextCompletionObject::TextCompletion,
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: SYSTEM_FINGERPRINT.into(),
            choices,
            usage: if self.include_usage && usage.is_absent() {
                UsageSlot::Null
            } else {
                usage
            },
        })
    }

    fn one(
        &self,
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish_reason: Option<FinishReason>,
    ) -> serde_json::Value {
        self.chunk(
            vec![CompletionChoice {
                index,
                text,
                logprobs,
                finish_reason,
            }],
            UsageSlot::Absent,
        )
    }
}

#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "generation",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion, one choice per prompt and `n`; with `stream: true`, Server-Sent Events whose `data` are completion chunks, then `[DONE]`.",
            content((Completion = "application/json"), (CompletionChunk = "text/event-stream"))),
        (status = 400, description = "Malformed JSON, a wrong type, a value out of range, a prompt too long for the context, a non-empty `suffix`.", body = ErrorResponse),
        (status = 401, description = "A missing or wrong API key.", body = ErrorResponse),
        (status = 404, description = "An unknown model.", body = ErrorResponse),
        (status = 413, description = "A body over `max_body_bytes`.", body = ErrorResponse),
        (status = 415, description = "Not `application/json`.", body = ErrorResponse),
        (status = 429, description = "`max_waiting_requests` are waiting.", body = ErrorResponse),
        (status = 500, description = "The engine failed the request.", body = ErrorResponse),
        (status = 503, description = "The model is loading, or the server is shutting down.", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
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
    let mut fold = Fold::new(prompts.iter().map(Vec::len).collect(), n, None);
    let prompt_texts: Vec<String> = if echo {
        prompts
            .iter()
            .map(|p| codec.decode(p, false).unwrap_or_default())
            .collect()
    } else {
        vec![String::new(); prompts.len()]
    };
    let chunks = Chunks {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: m.id.clone(),
        include_usage: include_usage(&req.stream_options),
    };
    let mut timing = Timing::new("/v1/completions");

    if !req.stream {
        run_to_end(&state, events, &mut fold, &mut timing).await?;
        let choices = fold
            .choices()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let r = i / n;
                let logprobs = want_logprobs.then(|| {
                    let mut entries = Vec::new();
                    if echo {
                        entries = prompt_entries(&prompts[r], fold.prompt_logprobs(r).unwrap_or(&[]));
                    }
                    entries.extend(c.logprobs.iter().map(|l| (l.token, Some(l))));
                    logprobs(&codec, &entries)
                });
                CompletionChoice {
                    index: i,
                    text: format!("{}{}", prompt_texts[r], c.content),
                    logprobs,
                    finish_reason: c.finish.map(Into::into),
                }
            })
            .collect();
        let body = Completion {
            id: chunks.id,
            object: TextCompletionObject::TextCompletion,
            created: chunks.created,
            model: chunks.model,
            system_fingerprint: SYSTEM_FINGERPRINT.into(),
            choices,
            usage: fold.usage().into(),
        };
        return Ok(axum::Json(body).into_response());
    }

    let keepalive = state.settings.sse_keepalive_secs;
    let total = prompts.len() * n;
    let stream = async_stream::stream! {
        let mut events = events;
        if echo && !want_logprobs {
            for i in 0..total {
                yield chunks.one(i, prompt_texts[i / n].clone(), None, None);
            }
        }
        let mut failed = false;
        'events: while let Some(event) = events.next().await {
            let updates = fold.apply(event);
            for u in updates {
                timing.observe(&state, &u);
                match u {
                    Update::PromptLogprobs { prompt } => {
                        let entries = prompt_entries(&prompts[prompt], fold.prompt_logprobs(prompt).unwrap_or(&[]));
                        for j in 0..n {
                            let lp = logprobs(&codec, &entries);
                            yield chunks.one(prompt * n + j, prompt_texts[prompt].clone(), Some(lp), None);
                        }
                    }
                    Update::Delta { index, content, logprobs: lps, .. } => {
                        if content.is_empty() && lps.is_empty() {
                            continue;
                        }
                        let lp = want_logprobs.then(|| {
                            let entries: Vec<_> = lps.iter().map(|l| (l.token, Some(l))).collect();
                            logprobs(&codec, &entries)
                        });
                        yield chunks.one(index, content, lp, None);
                    }
                    Update::Finished { index, reason } => {
                        yield chunks.one(index, String::new(), None, Some(reason.into()));
                    }
                    Update::Failed(e) => {
                        yield ApiError::from(e).body();
                        failed = true;
                        break 'events;
                    }
                }
            }
        }
        if !failed {
            for u in fold.close() {
                if let Update::Finished { index, reason } = u {
                    yield chunks.one(index, String::new(), None, Some(reason.into()));
                }
            }
        }
        timing.done(&state);
        if chunks.include_usage {
            yield chunks.chunk(vec![], UsageSlot::Present(fold.usage().into()));
        }
    };
    Ok(sse_response(stream, keepalive))
}
