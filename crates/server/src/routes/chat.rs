//! `POST /v1/chat/completions`

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use moeserve_core::engine::{FinishReason as EngineFinish, GenerateRequest, SamplingParams, TokenLogprob};
use moeserve_core::reasoning::ReasoningSplitter;
use moeserve_core::sampling::Reasoning;
use moeserve_core::tools::{call_grammar, prepare_messages, CallMode, ToolEvent};
use moeserve_core::TextCodec;
use serde_json::Value;

use super::{
    compile_constraint, encode, include_usage, run_to_end, sse_response, to_json, token_text,
    GenerationErrors, ResponseMeta, Timing,
};
use crate::api::requests::ChatCompletionRequest;
use crate::api::responses::{
    tool_call_id, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatDelta, ChatLogprobs, ChatTokenLogprob, FinishReason, FunctionCall, FunctionCallDelta, Role,
    ToolCallDelta, ToolCallOut, ToolType, TopLogprob, UsageSlot,
};
use crate::api::structured::constraint_spec;
use crate::api::tools::tool_plan;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::generation::{merge, Choice, Events, Fold, Update};
use crate::state::{LoadedEngine, SharedState};

/// OpenAI's chat `logprobs` object.
fn logprobs(codec: &TextCodec, lps: &[TokenLogprob]) -> ChatLogprobs {
    let top = |id: u32, logprob: f32| {
        TopLogprob {
            // The token's own bytes, which may be part of a character (its text then
            // has U+FFFD where the part is).
            bytes: codec.token_bytes(id),
            token: token_text(codec, id),
            logprob,
        }
    };
    ChatLogprobs {
        content: lps
            .iter()
            .map(|l| {
                let t = top(l.token, l.logprob);
                ChatTokenLogprob {
                    token: t.token,
                    logprob: t.logprob,
                    bytes: t.bytes,
                    top_logprobs: l.top.iter().map(|&(id, lp)| top(id, lp)).collect(),
                }
            })
            .collect(),
    }
}

/// The chunk of one choice of a streamed chat completion.
fn chunk(
    meta: &ResponseMeta,
    index: usize,
    delta: ChatDelta,
    logprobs: Option<ChatLogprobs>,
    finish_reason: Option<FinishReason>,
) -> serde_json::Value {
    let choice = ChatChunkChoice {
        index,
        delta,
        logprobs,
        finish_reason,
    };
    to_json(&ChatCompletionChunk::new(
        &meta.meta,
        vec![choice],
        meta.no_usage(),
    ))
}

/// The chunk for a delta or a finish, if it says anything.
fn update_chunk(
    meta: &ResponseMeta,
    u: &Update,
    codec: &TextCodec,
    want_logprobs: bool,
    fold: &Fold,
) -> Option<serde_json::Value> {
    match u {
        Update::Delta {
            index,
            content,
            reasoning,
            logprobs: lps,
            calls,
            ..
        } => {
            let lp = want_logprobs
                .then(|| logprobs(codec, lps))
                .filter(|l| !l.content.is_empty());
            let delta = ChatDelta {
                role: None,
                content: (!content.is_empty()).then(|| content.clone()),
                reasoning_content: (!reasoning.is_empty()).then(|| reasoning.clone()),
                tool_calls: (!calls.is_empty()).then(|| tool_call_deltas(calls)),
            };
            (delta.content.is_some()
                || delta.reasoning_content.is_some()
                || delta.tool_calls.is_some()
                || lp.is_some())
            .then(|| chunk(meta, *index, delta, lp, None))
        }
        Update::Finished { index, reason } => Some(chunk(
            meta,
            *index,
            ChatDelta::default(),
            None,
            Some(finish_reason(*reason, &fold.choices()[*index])),
        )),
        Update::PromptLogprobs { .. } | Update::Failed(_) => None,
    }
}

/// `tool_calls` when the answer called tools and ended by itself.
fn finish_reason(reason: EngineFinish, c: &Choice) -> FinishReason {
    match reason {
        EngineFinish::Stop if !c.calls.is_empty() => FinishReason::ToolCalls,
        r => r.into(),
    }
}

/// The streamed pieces of tool calls: a call's first piece carries a new id, its type
/// and name; the pieces of one call in one update are joined.
fn tool_call_deltas(events: &[ToolEvent]) -> Vec<ToolCallDelta> {
    let mut out: Vec<ToolCallDelta> = Vec::new();
    for e in events {
        match e {
            ToolEvent::CallStart { index, name } => out.push(ToolCallDelta {
                index: *index,
                id: Some(tool_call_id()),
                kind: Some(ToolType::Function),
                function: FunctionCallDelta {
                    name: Some(name.clone()),
                    arguments: Some(String::new()),
                },
            }),
            ToolEvent::Arguments { index, text } => match out.last_mut() {
                Some(d) if d.index == *index => {
                    d.function
                        .arguments
                        .get_or_insert_with(String::new)
                        .push_str(text);
                }
                _ => out.push(ToolCallDelta {
                    index: *index,
                    id: None,
                    kind: None,
                    function: FunctionCallDelta {
                        name: None,
                        arguments: Some(text.clone()),
                    },
                }),
            },
            ToolEvent::Content(_) => {}
        }
    }
    out
}

#[utoipa::path(post, path = "/v1/chat/completions", tag = "generation", request_body = ChatCompletionRequest,
    security(("api_key" = [])), responses(
        (status = 200, description = "The completion; with `stream: true`, Server-Sent Events whose `data` are chat completion chunks, then `[DONE]`.",
            content((ChatCompletion = "application/json"), (ChatCompletionChunk = "text/event-stream"))),
        GenerationErrors))]
pub async fn chat_completions(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let chat = prepare_chat(&state, &req).await?;
    let (n, want_logprobs) = (chat.params.n, chat.params.logprobs.is_some());
    let ChatRun {
        model,
        codec,
        mut fold,
        events,
        ..
    } = chat.submit(&state, "messages")?;
    let meta = ResponseMeta::new("chatcmpl", &model, include_usage(&req.stream_options));
    let mut timing = Timing::new("/v1/chat/completions");

    if !req.stream {
        run_to_end(&state, events, &mut fold, &mut timing, |_| {}).await?;
        let reasons = fold.reasons();
        let choices = fold
            .choices()
            .iter()
            .enumerate()
            .map(|(index, c)| ChatChoice {
                index,
                message: AssistantMessage {
                    role: Role::Assistant,
                    // Only calls: no content (whitespace around them is not an answer).
                    content: (c.calls.is_empty() || !c.content.trim().is_empty()).then(|| c.content.clone()),
                    tool_calls: (!c.calls.is_empty()).then(|| {
                        c.calls
                            .iter()
                            .map(|call| ToolCallOut {
                                id: tool_call_id(),
                                kind: ToolType::Function,
                                function: FunctionCall {
                                    name: call.name.clone(),
                                    arguments: call.arguments.clone(),
                                },
                            })
                            .collect()
                    }),
                    reasoning_content: reasons.then(|| c.reasoning.clone()),
                },
                logprobs: want_logprobs.then(|| logprobs(&codec, &c.logprobs)),
                finish_reason: c.finish.map(|r| finish_reason(r, c)),
            })
            .collect();
        let body = ChatCompletion::new(&meta.meta, choices, fold.usage().into());
        return Ok(axum::Json(body).into_response());
    }

    let keepalive = state.settings.sse_keepalive_secs;
    let stream = async_stream::stream! {
        let mut events = events;
        for i in 0..n {
            let delta = ChatDelta { role: Some(Role::Assistant), content: Some(String::new()), ..ChatDelta::default() };
            yield chunk(&meta, i, delta, None, None);
        }
        let mut failed = false;
        'events: while let Some(event) = events.next().await {
            for u in fold.apply(event) {
                timing.observe(&state, &u);
                if let Update::Failed(e) = u {
                    yield ApiError::from(e).body();
                    failed = true;
                    break 'events;
                }
                if let Some(c) = update_chunk(&meta, &u, &codec, want_logprobs, &fold) {
                    yield c;
                }
            }
        }
        if !failed {
            for u in fold.close() {
                if let Some(c) = update_chunk(&meta, &u, &codec, want_logprobs, &fold) {
                    yield c;
                }
            }
        }
        timing.done(&state);
        if meta.include_usage {
            yield to_json(&ChatCompletionChunk::new(&meta.meta, vec![], UsageSlot::Present(fold.usage().into())));
        }
    };
    Ok(sse_response(stream, keepalive))
}

/// A chat request made ready for the engine: the rendered prompt's tokens, the sampling
/// parameters (constraint included) and the fold its events go into. The Responses and
/// Messages APIs translate their requests into chat requests and share this.
pub struct PreparedChat<'a> {
    pub model: &'a LoadedEngine,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub fold: Fold,
}

/// A submitted chat request.
pub struct ChatRun {
    pub model: String,
    pub codec: Arc<TextCodec>,
    pub fold: Fold,
    pub events: Events,
    pub prompt_tokens: usize,
}

impl PreparedChat<'_> {
    /// Hands the request to the engine; `prompt_param` names the field a prompt error
    /// points at.
    pub fn submit(self, state: &SharedState, prompt_param: &str) -> Result<ChatRun, ApiError> {
        let prompt_tokens = self.prompt.len();
        let handle = self
            .model
            .engine
            .submit(GenerateRequest {
                prompt: self.prompt,
                params: self.params,
            })
            .map_err(|e| ApiError::from_submit(e, prompt_param, state.retry_after_secs()))?;
        Ok(ChatRun {
            model: self.model.id.clone(),
            codec: self.model.engine.codec().clone(),
            fold: self.fold,
            events: merge(vec![handle], state.settings.request_deadline()),
            prompt_tokens,
        })
    }
}

/// Checks a chat request, renders its prompt with the chat template (tools included),
/// and compiles its constraint.
pub async fn prepare_chat<'a>(
    state: &'a SharedState,
    req: &ChatCompletionRequest,
) -> Result<PreparedChat<'a>, ApiError> {
    let m = state.engine_for(&req.model)?;
    let mut params = req.to_params(state.settings.max_n)?;
    state
        .settings
        .apply_request_defaults(&mut params, req.temperature.is_some());
    let mut messages = req.template_messages()?;
    let tools = tool_plan(
        req.tools.as_deref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    let offered = tools.as_ref().filter(|t| t.offers_tools());
    let format = m.tool_format;
    // The conversation in the template's terms (calls' arguments as mappings; for the
    // generic format, calls and results as text and the tools in the system prompt).
    if let Value::Array(list) = &mut messages {
        let functions = offered.map_or(&[][..], |t| &t.functions[..]);
        prepare_messages(format, list, functions);
    }
    let template_tools: Option<Value> = offered.filter(|_| format.template_renders_tools()).map(|t| {
        t.functions
            .iter()
            .map(|f| serde_json::json!({"type": "function", "function": f.definition()}))
            .collect()
    });
    let template = m
        .template
        .as_ref()
        .ok_or_else(|| ApiError::invalid("this model has no chat template; use /v1/completions", None))?;
    let render = |messages: &Value| {
        template.render(
            messages,
            true,
            template_tools.as_ref(),
            template_tools.as_ref().and(req.tool_choice.as_ref()),
        )
    };
    let prompt_text = match render(&messages) {
        Ok(text) => text,
        // Templates that allow a system turn only first (Qwen's, Gemma's raise) get the
        // later system messages (Claude Code sends one after the user's turn) joined to
        // the first, in order; those that allow it keep them where they were.
        Err(e) => match merge_later_system_messages(&messages) {
            Some(merged) => {
                tracing::debug!("system messages joined into the first: {e}");
                render(&merged)
            }
            None => Err(e),
        }
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?,
    };
    let codec: Arc<TextCodec> = m.engine.codec().clone();
    // Reasoning models: a splitter per choice, and the optional thinking budget.
    let opened = m.reasoning.as_ref().is_some_and(|t| t.opened_in(&prompt_text));
    let splitter = m
        .reasoning
        .as_ref()
        .map(|t| ReasoningSplitter::new(t.clone(), opened));
    if req.max_reasoning_tokens.is_some() && m.reasoning.is_none() {
        return Err(ApiError::invalid_param(
            "max_reasoning_tokens",
            "this model does not produce reasoning output",
        ));
    }
    params.reasoning = m.reasoning.as_ref().map(|t| Reasoning {
        max_tokens: req.max_reasoning_tokens,
        start_token: t.start_token,
        end_token: t.end_token,
        starts_open: opened,
    });
    let mut spec = constraint_spec(req.response_format.as_ref(), req.structured_outputs.as_ref())?;
    // Calls are constrained to well-formed calls of the offered functions in the model's
    // format: the whole answer when a call is required, from the opening marker on when
    // the model decides (unless the answer has a format of its own: then it is read as
    // that, not for calls).
    let answer_has_format = spec.is_some();
    let mut auto_calls = false;
    if let Some((functions, mode)) = tools.as_ref().and_then(|t| t.call_constraint()) {
        let parallel = tools.as_ref().is_some_and(|t| t.parallel);
        match (&spec, mode) {
            (Some(_), CallMode::Required) => {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    "a required tool call cannot be combined with response_format or structured_outputs",
                ))
            }
            (Some(_), CallMode::Auto) => {}
            (None, mode) => {
                auto_calls = mode == CallMode::Auto;
                spec = Some((call_grammar(&codec, format, &functions, parallel, mode), "tools"));
            }
        }
    }
    params.constraint = match compile_constraint(state, spec).await {
        // The model may answer without calls: a call grammar that cannot be built (a
        // schema feature llguidance lacks) leaves calls unconstrained, not refused.
        Err(e) if auto_calls => {
            tracing::warn!("tool calls unconstrained: {e:?}");
            None
        }
        other => other?,
    };
    if offered.is_some() && format.template_renders_tools() {
        // The format's markers are special tokens in some vocabularies (Mistral's
        // [TOOL_CALLS], Llama's <|python_tag|>): kept in the text for the parser, which
        // takes them out of the content.
        params.skip_special_tokens = false;
    }
    let prompt = encode(codec.clone(), prompt_text).await?;
    if req.clamp_max_tokens {
        let l = m.engine.limits();
        let room = l.context_length.min(l.pool_tokens).saturating_sub(prompt.len());
        // A prompt that fills the context is still refused, by the engine.
        if room > 0 {
            params.max_tokens = params.max_tokens.map(|t| t.min(room));
        }
    }
    let mut fold = Fold::new(vec![prompt.len()], params.n, splitter);
    if offered.is_some() && !answer_has_format {
        fold = fold.with_tool_calls(format);
    }
    Ok(PreparedChat {
        model: m,
        prompt,
        params,
        fold,
    })
}

/// `messages` with every system message after the first message joined to a leading
/// system message (made if there is none), in order; `None` when there is nothing to
/// join.
fn merge_later_system_messages(messages: &Value) -> Option<Value> {
    let list = messages.as_array()?;
    let is_system = |m: &Value| m.get("role").and_then(Value::as_str) == Some("system");
    if !list.iter().skip(1).any(is_system) {
        return None;
    }
    let text = |m: &Value| m.get("content").and_then(Value::as_str).unwrap_or("").to_string();
    let system: Vec<String> = list.iter().filter(|m| is_system(m)).map(text).collect();
    let mut out = vec![serde_json::json!({"role": "system", "content": system.join("\n\n")})];
    out.extend(list.iter().filter(|m| !is_system(m)).cloned());
    Some(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::merge_later_system_messages;

    #[test]
    fn later_system_messages_join_the_first() {
        let m = json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "system", "content": "It is Monday."},
            {"role": "assistant", "content": "Hello"},
        ]);
        assert_eq!(
            merge_later_system_messages(&m),
            Some(json!([
                {"role": "system", "content": "Be brief.\n\nIt is Monday."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ]))
        );
        let no_leading = json!([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Now."}]);
        assert_eq!(
            merge_later_system_messages(&no_leading),
            Some(json!([{"role": "system", "content": "Now."}, {"role": "user", "content": "Hi"}]))
        );
        assert_eq!(
            merge_later_system_messages(
                &json!([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
            ),
            None
        );
    }
}
