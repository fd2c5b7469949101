//! `POST /v1/chat/completions`, and what the Responses and Messages APIs share with it:
//! a [`Conversation`] rendered into a prompt and submitted ([`prepare_chat`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use moeserve_core::engine::{
    EngineFailure, FinishReason as EngineFinish, GenerateRequest, SamplingParams, TokenLogprob,
};
use moeserve_core::reasoning::ReasoningSplitter;
use moeserve_core::sampling::Reasoning;
use moeserve_core::tools::{call_grammar, prepare_messages, CallMode, ToolCall, ToolEvent};
use moeserve_core::TextCodec;
use serde_json::Value;

use super::{
    compile_constraint, data_event, encode, include_usage, openai_stream_end, openai_stream_failure, respond,
    token_text, Encoder, GenerationErrors, ResponseMeta,
};
use crate::api::conversation::{custom_input, Conversation, Fields, InputDecoder};
use crate::api::requests::ChatCompletionRequest;
use crate::api::responses::{
    tool_call_id, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatDelta, ChatLogprobs, ChatTokenLogprob, CustomCall, CustomCallDelta, FinishReason, FunctionCall,
    FunctionCallDelta, Role, ToolCallDelta, ToolCallOut, ToolType, TopLogprob, UsageSlot,
};
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

/// `tool_calls` when the answer called tools and ended by itself.
fn finish_reason(reason: EngineFinish, c: &Choice) -> FinishReason {
    match reason {
        EngineFinish::Stop if !c.calls.is_empty() => FinishReason::ToolCalls,
        r => r.into(),
    }
}

/// A chat completion's answer: chunks of `choices` (their content, thought, calls and
/// logprobs), then `[DONE]`; or the whole completion.
struct ChatEncoder {
    meta: ResponseMeta,
    codec: Arc<TextCodec>,
    n: usize,
    want_logprobs: bool,
    /// The functions offered as custom tools (their calls' input streams as text).
    custom: HashSet<String>,
    /// Each choice's open custom calls' decoders, by call index.
    inputs: Vec<HashMap<usize, InputDecoder>>,
}

impl ChatEncoder {
    /// The chunk of one choice.
    fn chunk(
        &self,
        index: usize,
        delta: ChatDelta,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<FinishReason>,
    ) -> Event {
        let choice = ChatChunkChoice {
            index,
            delta,
            logprobs,
            finish_reason,
        };
        data_event(&ChatCompletionChunk::new(
            &self.meta.meta,
            vec![choice],
            self.meta.no_usage(),
        ))
    }

    /// The streamed pieces of tool calls: a call's first piece carries a new id, its
    /// type and name; the pieces of one call in one update are joined. A custom tool's
    /// call streams its input's text, not the arguments around it.
    fn tool_call_deltas(&mut self, choice: usize, events: &[ToolEvent]) -> Vec<ToolCallDelta> {
        let mut out: Vec<ToolCallDelta> = Vec::new();
        for e in events {
            match e {
                ToolEvent::CallStart { index, name } => {
                    let custom = self.custom.contains(name);
                    if custom {
                        self.inputs[choice].insert(*index, InputDecoder::default());
                    }
                    out.push(ToolCallDelta {
                        index: *index,
                        id: Some(tool_call_id()),
                        kind: Some(if custom {
                            ToolType::Custom
                        } else {
                            ToolType::Function
                        }),
                        function: (!custom).then(|| FunctionCallDelta {
                            name: Some(name.clone()),
                            arguments: Some(String::new()),
                        }),
                        custom: custom.then(|| CustomCallDelta {
                            name: Some(name.clone()),
                            input: Some(String::new()),
                        }),
                    });
                }
                ToolEvent::Arguments { index, text } => {
                    let (text, custom) = match self.inputs[choice].get_mut(index) {
                        Some(d) => (d.push(text), true),
                        None => (text.clone(), false),
                    };
                    // The arguments around a custom call's input are not streamed.
                    if custom && text.is_empty() {
                        continue;
                    }
                    match out.last_mut() {
                        Some(d) if d.index == *index => {
                            let piece = match (&mut d.function, &mut d.custom) {
                                (Some(f), _) => f.arguments.get_or_insert_with(String::new),
                                (_, Some(c)) => c.input.get_or_insert_with(String::new),
                                _ => continue,
                            };
                            piece.push_str(&text);
                        }
                        _ => out.push(ToolCallDelta {
                            index: *index,
                            id: None,
                            kind: None,
                            function: (!custom).then(|| FunctionCallDelta {
                                name: None,
                                arguments: Some(text.clone()),
                            }),
                            custom: custom.then_some(CustomCallDelta {
                                name: None,
                                input: Some(text),
                            }),
                        }),
                    }
                }
                ToolEvent::Content(_) => {}
            }
        }
        out
    }

    /// A call of a complete answer.
    fn tool_call(&self, call: &ToolCall) -> ToolCallOut {
        if self.custom.contains(&call.name) {
            ToolCallOut {
                id: tool_call_id(),
                kind: ToolType::Custom,
                function: None,
                custom: Some(CustomCall {
                    name: call.name.clone(),
                    input: custom_input(&call.arguments),
                }),
            }
        } else {
            ToolCallOut {
                id: tool_call_id(),
                kind: ToolType::Function,
                function: Some(FunctionCall {
                    name: call.name.clone(),
                    arguments: call.arguments.clone(),
                }),
                custom: None,
            }
        }
    }
}

impl Encoder for ChatEncoder {
    fn start(&mut self) -> Vec<Event> {
        (0..self.n)
            .map(|i| {
                let delta = ChatDelta {
                    role: Some(Role::Assistant),
                    content: Some(String::new()),
                    ..ChatDelta::default()
                };
                self.chunk(i, delta, None, None)
            })
            .collect()
    }

    fn update(&mut self, u: &Update, fold: &Fold) -> Vec<Event> {
        match u {
            Update::Delta {
                index,
                content,
                reasoning,
                logprobs: lps,
                calls,
                ..
            } => {
                let lp = self
                    .want_logprobs
                    .then(|| logprobs(&self.codec, lps))
                    .filter(|l| !l.content.is_empty());
                let tool_calls = (!calls.is_empty()).then(|| self.tool_call_deltas(*index, calls));
                let delta = ChatDelta {
                    role: None,
                    content: (!content.is_empty()).then(|| content.clone()),
                    reasoning_content: (!reasoning.is_empty()).then(|| reasoning.clone()),
                    tool_calls,
                };
                if delta.content.is_some()
                    || delta.reasoning_content.is_some()
                    || delta.tool_calls.is_some()
                    || lp.is_some()
                {
                    vec![self.chunk(*index, delta, lp, None)]
                } else {
                    vec![]
                }
            }
            Update::Finished { index, reason } => vec![self.chunk(
                *index,
                ChatDelta::default(),
                None,
                Some(finish_reason(*reason, &fold.choices()[*index])),
            )],
            Update::PromptLogprobs { .. } | Update::Failed(_) => vec![],
        }
    }

    fn finish(&mut self, fold: &Fold) -> Vec<Event> {
        openai_stream_end(self.meta.include_usage.then(|| {
            ChatCompletionChunk::new(&self.meta.meta, vec![], UsageSlot::Present(fold.usage().into()))
        }))
    }

    fn fail(&mut self, e: EngineFailure, _: &Fold) -> Vec<Event> {
        openai_stream_failure(e)
    }

    fn body(self, fold: &Fold) -> Response {
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
                    tool_calls: (!c.calls.is_empty())
                        .then(|| c.calls.iter().map(|call| self.tool_call(call)).collect()),
                    reasoning_content: reasons.then(|| c.reasoning.clone()),
                },
                logprobs: self.want_logprobs.then(|| logprobs(&self.codec, &c.logprobs)),
                finish_reason: c.finish.map(|r| finish_reason(r, c)),
            })
            .collect();
        axum::Json(ChatCompletion::new(&self.meta.meta, choices, fold.usage().into())).into_response()
    }
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
    let conv = req.to_conversation(state.settings.max_n)?;
    let chat = prepare_chat(&state, &conv).await?;
    let (n, want_logprobs) = (chat.params.n, chat.params.logprobs.is_some());
    let run = chat.submit(&state)?;
    let encoder = ChatEncoder {
        meta: ResponseMeta::new("chatcmpl", &run.model, include_usage(&req.stream_options)),
        codec: run.codec,
        n,
        want_logprobs,
        custom: conv.custom_names(),
        inputs: (0..n).map(|_| HashMap::new()).collect(),
    };
    respond(
        &state,
        run.events,
        run.fold,
        req.stream,
        "/v1/chat/completions",
        encoder,
    )
    .await
}

/// A request made ready for the engine: the rendered prompt's tokens, the sampling
/// parameters (constraint included) and the fold its events go into. Every generation
/// API but completions goes through this, from its [`Conversation`].
pub struct PreparedChat<'a> {
    pub model: &'a LoadedEngine,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub fold: Fold,
    fields: &'static Fields,
}

/// A submitted request.
pub struct ChatRun {
    pub model: String,
    pub codec: Arc<TextCodec>,
    pub fold: Fold,
    pub events: Events,
    pub prompt_tokens: usize,
}

impl PreparedChat<'_> {
    /// Hands the request to the engine.
    pub fn submit(self, state: &SharedState) -> Result<ChatRun, ApiError> {
        let prompt_tokens = self.prompt.len();
        let handle = self
            .model
            .engine
            .submit(GenerateRequest {
                prompt: self.prompt,
                params: self.params,
            })
            .map_err(|e| {
                self.fields.rename(ApiError::from_submit(
                    e,
                    self.fields.messages,
                    state.retry_after_secs(),
                ))
            })?;
        Ok(ChatRun {
            model: self.model.id.clone(),
            codec: self.model.engine.codec().clone(),
            fold: self.fold,
            events: merge(vec![handle], state.settings.request_deadline()),
            prompt_tokens,
        })
    }
}

/// Renders a conversation's prompt with the chat template (tools included), and compiles
/// its constraint; errors name the client's fields.
pub async fn prepare_chat<'a>(
    state: &'a SharedState,
    conv: &Conversation,
) -> Result<PreparedChat<'a>, ApiError> {
    prepare(state, conv).await.map_err(|e| conv.fields.rename(e))
}

async fn prepare<'a>(state: &'a SharedState, conv: &Conversation) -> Result<PreparedChat<'a>, ApiError> {
    let fields = conv.fields;
    let m = state.engine_for(&conv.model)?;
    let mut params = conv.params.clone();
    state
        .settings
        .apply_request_defaults(&mut params, conv.temperature_set);
    let mut messages = conv.template_messages();
    let tools = conv.tools.as_ref();
    let offered = tools.filter(|t| t.offers_tools());
    let format = m.tool_format;
    // The conversation in the template's terms (calls' arguments as mappings; for the
    // generic format, calls and results as text and the tools in the system prompt).
    let functions = offered.map_or(&[][..], |t| &t.functions[..]);
    prepare_messages(format, &mut messages, functions);
    let messages = Value::Array(messages);
    let template_tools: Option<Value> = offered.filter(|_| format.template_renders_tools()).map(|t| {
        t.functions
            .iter()
            .map(|f| serde_json::json!({"type": "function", "function": f.definition()}))
            .collect()
    });
    let template_choice = template_tools.as_ref().and(conv.template_tool_choice());
    let template = m
        .template
        .as_ref()
        .ok_or_else(|| ApiError::invalid("this model has no chat template; use /v1/completions", None))?;
    let render =
        |messages: &Value| template.render(messages, true, template_tools.as_ref(), template_choice.as_ref());
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
        .map_err(|e| ApiError::invalid_param(fields.messages, e.to_string()))?,
    };
    let codec: Arc<TextCodec> = m.engine.codec().clone();
    // Reasoning models: a splitter per choice, and the optional thinking budget.
    let opened = m.reasoning.as_ref().is_some_and(|t| t.opened_in(&prompt_text));
    let splitter = m
        .reasoning
        .as_ref()
        .map(|t| ReasoningSplitter::new(t.clone(), opened));
    if conv.max_reasoning_tokens.is_some() && m.reasoning.is_none() {
        return Err(ApiError::invalid_param(
            conv.reasoning_field,
            "this model does not produce reasoning output",
        ));
    }
    params.reasoning = m.reasoning.as_ref().map(|t| Reasoning {
        max_tokens: conv.max_reasoning_tokens,
        start_token: t.start_token,
        end_token: t.end_token,
        starts_open: opened,
    });
    let mut spec = conv.format.clone();
    // Calls are constrained to well-formed calls of the offered functions in the model's
    // format: the whole answer when a call is required, from the opening marker on when
    // the model decides (unless the answer has a format of its own: then it is read as
    // that, not for calls).
    let answer_has_format = spec.is_some();
    let mut auto_calls = false;
    if let Some((functions, mode)) = tools.and_then(|t| t.call_constraint()) {
        let parallel = tools.is_some_and(|t| t.parallel);
        match (&spec, mode) {
            (Some((_, field)), CallMode::Required) => {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("a required tool call cannot be combined with {field}"),
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
    if conv.clamp_max_tokens {
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
        fields,
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
