//! `POST /v1/completions`: a string, a list of strings, token ids or lists of token ids;
//! `echo`; integer `logprobs`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use moeserve_core::engine::{EngineFailure, GenerateRequest, TokenLogprob};
use moeserve_core::TextCodec;

use super::{
    compile_constraint, data_event, encode, include_usage, openai_stream_end, openai_stream_failure, respond,
    token_text, Encoder, GenerationErrors, ResponseMeta,
};
use crate::api::requests::{CompletionRequest, Prompt};
use crate::api::responses::{
    Completion, CompletionChoice, CompletionChunk, CompletionLogprobs, FinishReason, UsageSlot,
};
use crate::api::structured::constraint_spec;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::generation::{merge, Fold, Update};
use crate::state::SharedState;

/// Where each token starts in a choice's text, in characters (Python's string indices,
/// as vLLM counts them), across the chunks of a stream. A token that starts inside a
/// character (a byte-level token splitting it) starts where that character does.
#[derive(Debug, Clone, Default)]
struct TextOffsets {
    /// Whole characters so far.
    chars: usize,
    /// The bytes of a character not yet whole.
    partial: Vec<u8>,
}

impl TextOffsets {
    /// `bytes`' offset; then counts them in.
    fn next(&mut self, bytes: &[u8]) -> usize {
        let offset = self.chars;
        self.partial.extend_from_slice(bytes);
        let mut rest: &[u8] = &self.partial;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    self.chars += s.chars().count();
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    self.chars += std::str::from_utf8(&rest[..valid]).unwrap().chars().count();
                    match e.error_len() {
                        // Bytes that are no character count as one (U+FFFD, as decoded).
                        Some(bad) => {
                            self.chars += 1;
                            rest = &rest[valid + bad..];
                        }
                        None => {
                            rest = &rest[valid..];
                            break;
                        }
                    }
                }
            }
        }
        self.partial = rest.to_vec();
        offset
    }
}

/// The legacy completions `logprobs` object for `entries` of (token, its logprob and
/// alternatives), the first token of an echoed prompt having none; `offsets` carries the
/// choice's text offsets from chunk to chunk.
fn logprobs(
    codec: &TextCodec,
    entries: &[(u32, Option<&TokenLogprob>)],
    offsets: &mut TextOffsets,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for &(id, lp) in entries {
        let t = token_text(codec, id);
        out.text_offset.push(offsets.next(&codec.token_bytes(id)));
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

/// A completion's answer: one choice per prompt and `n`, each with the prompt before it
/// when echoed.
struct CompletionEncoder {
    meta: ResponseMeta,
    codec: Arc<TextCodec>,
    prompts: Vec<Vec<u32>>,
    /// The echoed prompts' texts (empty without `echo`).
    prompt_texts: Vec<String>,
    n: usize,
    echo: bool,
    want_logprobs: bool,
    /// Each choice's text offsets across the stream's chunks.
    offsets: Vec<TextOffsets>,
}

impl CompletionEncoder {
    /// The chunk of one choice of a streamed completion.
    fn chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish_reason: Option<FinishReason>,
    ) -> Event {
        let choice = CompletionChoice {
            index,
            text,
            logprobs,
            finish_reason,
        };
        data_event(&CompletionChunk::new(
            &self.meta.meta,
            vec![choice],
            self.meta.no_usage(),
        ))
    }
}

impl Encoder for CompletionEncoder {
    fn start(&mut self) -> Vec<Event> {
        if !self.echo || self.want_logprobs {
            return vec![];
        }
        (0..self.offsets.len())
            .map(|i| self.chunk(i, self.prompt_texts[i / self.n].clone(), None, None))
            .collect()
    }

    fn update(&mut self, u: &Update, fold: &Fold) -> Vec<Event> {
        let n = self.n;
        match u {
            Update::PromptLogprobs { prompt } => (0..n)
                .map(|j| {
                    let entries = prompt_entries(
                        &self.prompts[*prompt],
                        fold.prompt_logprobs(*prompt).unwrap_or(&[]),
                    );
                    let lp = logprobs(&self.codec, &entries, &mut self.offsets[prompt * n + j]);
                    self.chunk(prompt * n + j, self.prompt_texts[*prompt].clone(), Some(lp), None)
                })
                .collect(),
            Update::Delta {
                index,
                content,
                logprobs: lps,
                ..
            } => {
                if content.is_empty() && lps.is_empty() {
                    return vec![];
                }
                let lp = self.want_logprobs.then(|| {
                    let entries: Vec<_> = lps.iter().map(|l| (l.token, Some(l))).collect();
                    logprobs(&self.codec, &entries, &mut self.offsets[*index])
                });
                vec![self.chunk(*index, content.clone(), lp, None)]
            }
            Update::Finished { index, reason } => {
                vec![self.chunk(*index, String::new(), None, Some((*reason).into()))]
            }
            Update::Failed(_) => vec![],
        }
    }

    fn finish(&mut self, fold: &Fold) -> Vec<Event> {
        openai_stream_end(
            self.meta.include_usage.then(|| {
                CompletionChunk::new(&self.meta.meta, vec![], UsageSlot::Present(fold.usage().into()))
            }),
        )
    }

    fn fail(&mut self, e: EngineFailure, _: &Fold) -> Vec<Event> {
        openai_stream_failure(e)
    }

    fn body(self, fold: &Fold) -> Response {
        let choices = fold
            .choices()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let r = i / self.n;
                let logprobs = self.want_logprobs.then(|| {
                    let mut entries = Vec::new();
                    if self.echo {
                        entries = prompt_entries(&self.prompts[r], fold.prompt_logprobs(r).unwrap_or(&[]));
                    }
                    entries.extend(c.logprobs.iter().map(|l| (l.token, Some(l))));
                    logprobs(&self.codec, &entries, &mut TextOffsets::default())
                });
                CompletionChoice {
                    index: i,
                    text: format!("{}{}", self.prompt_texts[r], c.content),
                    logprobs,
                    finish_reason: c.finish.map(Into::into),
                }
            })
            .collect();
        axum::Json(Completion::new(&self.meta.meta, choices, fold.usage().into())).into_response()
    }
}

#[utoipa::path(post, path = "/v1/completions", tag = "generation", request_body = CompletionRequest,
    security(("api_key" = [])), responses(
        (status = 200, description = "The completion, one choice per prompt and `n`; with `stream: true`, Server-Sent Events whose `data` are completion chunks, then `[DONE]`. A non-empty `suffix` is refused with 400.",
            content((Completion = "application/json"), (CompletionChunk = "text/event-stream"))),
        GenerationErrors))]
pub async fn completions(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let m = state.engine_for(&req.model)?;
    let mut params = req.to_params(state.settings.max_n)?;
    state
        .settings
        .apply_request_defaults(&mut params, req.temperature.is_some());
    let spec = constraint_spec(None, req.structured_outputs.as_ref())?;
    params.constraint = compile_constraint(&state, spec).await?;
    let codec: Arc<TextCodec> = m.engine.codec().clone();
    let mut prompts = Vec::new();
    for p in req.prompts()? {
        prompts.push(match p {
            Prompt::Text(t) => encode(codec.clone(), t).await?,
            Prompt::Tokens(t) => t,
        });
    }
    let n = params.n;
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
        .map_err(|e| ApiError::from_submit(e, "prompt", state.retry_after_secs()))?;
    let events = merge(handles, state.settings.request_deadline());
    let fold = Fold::new(prompts.iter().map(Vec::len).collect(), n, None);
    let prompt_texts: Vec<String> = if req.echo {
        prompts
            .iter()
            .map(|p| codec.decode(p, false).unwrap_or_default())
            .collect()
    } else {
        vec![String::new(); prompts.len()]
    };
    let encoder = CompletionEncoder {
        meta: ResponseMeta::new("cmpl", &m.id, include_usage(&req.stream_options)),
        codec,
        offsets: vec![TextOffsets::default(); prompts.len() * n],
        prompts,
        prompt_texts,
        n,
        echo: req.echo,
        want_logprobs: params.logprobs.is_some(),
    };
    respond(&state, events, fold, req.stream, "/v1/completions", encoder).await
}

#[cfg(test)]
mod tests {
    use super::TextOffsets;

    /// "é" (2 bytes) split over two tokens, then "x", then "€" (3 bytes) in one token.
    #[test]
    fn text_offsets_count_characters_across_split_tokens() {
        let mut o = TextOffsets::default();
        let e = "é".as_bytes();
        assert_eq!(o.next(b"ab"), 0);
        assert_eq!(o.next(&e[..1]), 2);
        assert_eq!(o.next(&e[1..]), 2);
        assert_eq!(o.next(b"x"), 3);
        assert_eq!(o.next("€".as_bytes()), 4);
        assert_eq!(o.next(&[0xff]), 5);
        assert_eq!(o.next(b"y"), 6);
    }
}
