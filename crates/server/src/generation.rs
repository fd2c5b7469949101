//! What the generation endpoints share: one request's engine requests merged into one
//! event stream (the deadline an event of its own), and [`Fold`], the accumulator that
//! takes those events one at a time. The streamed chunks are built from the [`Update`]s
//! it returns, the final body from its state at the end: one fold for both response
//! shapes of chat and completions, so streamed and non-streamed outputs cannot drift.

use std::pin::Pin;
use std::time::Duration;

use futures::stream::{self, Stream, StreamExt};
use moeserve_core::engine::{
    EngineEvent, EngineFailure, FailureKind, FinishReason, RequestHandle, TokenLogprob, Usage,
};
use moeserve_core::reasoning::ReasoningSplitter;
use moeserve_core::tools::{ToolCall, ToolCallParser, ToolEvent, ToolFormat};

/// An event of a request's merged stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An engine event of the request's `prompt`-th engine request (several for a
    /// multi-prompt completion).
    Engine { prompt: usize, event: EngineEvent },
    /// The request's deadline passed: its engine requests were aborted (their handles
    /// dropped) and the stream ends here.
    Deadline,
}

/// A request's events.
pub type Events = Pin<Box<dyn Stream<Item = Event> + Send>>;

/// Every event of `handles`' engine requests, tagged with their position, ending when
/// all have sent their last; with a deadline, [`Event::Deadline`] and the end at that
/// time, the handles dropped (which aborts the engine requests).
pub fn merge(handles: Vec<RequestHandle>, deadline: Option<Duration>) -> Events {
    let streams = handles.into_iter().enumerate().map(|(prompt, h)| {
        stream::unfold(Some(h), move |h| async move {
            let mut h = h?;
            let event = h.next().await?;
            let last = matches!(event, EngineEvent::Done(_) | EngineEvent::Error(_));
            Some((Event::Engine { prompt, event }, (!last).then_some(h)))
        })
        .boxed()
    });
    let merged = stream::select_all(streams);
    let Some(deadline) = deadline else {
        return merged.boxed();
    };
    let deadline = tokio::time::Instant::now() + deadline;
    stream::unfold(Some(merged), move |s| async move {
        let mut s = s?;
        match tokio::time::timeout_at(deadline, s.next()).await {
            Ok(Some(item)) => Some((item, Some(s))),
            Ok(None) => None,
            Err(_) => Some((Event::Deadline, None)),
        }
    })
    .boxed()
}

/// The output of one choice so far.
#[derive(Debug, Clone, Default)]
pub struct Choice {
    /// The answer (all the text, for a model without reasoning).
    pub content: String,
    /// A reasoning model's thought.
    pub reasoning: String,
    pub tokens: usize,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
    /// The stop string that ended the choice, if one did.
    pub stop_sequence: Option<String>,
    /// Tokens whose text went to the thought (a reasoning model's).
    pub reasoning_tokens: usize,
    /// Tool calls read out of the answer (when the request offered tools).
    pub calls: Vec<ToolCall>,
    splitter: Option<ReasoningSplitter>,
    tool_parser: Option<ToolCallParser>,
}

impl Choice {
    /// Splits `text` into reasoning, content and tool-call events, and adds them up.
    fn take(&mut self, text: &str, end: bool) -> (String, String, Vec<ToolEvent>) {
        let (mut content, reasoning) = match self.splitter.as_mut() {
            Some(s) => {
                let mut d = s.push(text);
                if end {
                    let rest = s.finish();
                    d.content.push_str(&rest.content);
                    d.reasoning.push_str(&rest.reasoning);
                }
                (d.content, d.reasoning)
            }
            None => (text.to_string(), String::new()),
        };
        let mut calls = Vec::new();
        if let Some(p) = self.tool_parser.as_mut() {
            let mut events = p.push(&content);
            if end {
                events.extend(p.finish());
            }
            content.clear();
            // The parser numbers calls as this choice does (one parser per choice).
            for e in events {
                match e {
                    ToolEvent::Content(t) => content.push_str(&t),
                    ToolEvent::CallStart { ref name, .. } => {
                        self.calls.push(ToolCall {
                            name: name.clone(),
                            arguments: String::new(),
                        });
                        calls.push(e);
                    }
                    ToolEvent::Arguments { index, ref text } => {
                        self.calls[index].arguments.push_str(text);
                        calls.push(e);
                    }
                }
            }
        }
        self.content.push_str(&content);
        self.reasoning.push_str(&reasoning);
        (content, reasoning, calls)
    }
}

/// What one event changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// New output of choice `index`: `tokens` new tokens (counted even before their text
    /// is whole), their text as content and reasoning, their logprobs, and the tool
    /// calls' starts and argument pieces found in it.
    Delta {
        index: usize,
        tokens: usize,
        content: String,
        reasoning: String,
        logprobs: Vec<TokenLogprob>,
        calls: Vec<ToolEvent>,
    },
    /// The prompt logprobs of prompt `prompt` arrived.
    PromptLogprobs { prompt: usize },
    /// Choice `index` ended.
    Finished { index: usize, reason: FinishReason },
    /// The engine failed the request.
    Failed(EngineFailure),
}

/// The choices of one request (`n` per prompt; choice `prompt * n + i`), folded from its
/// events.
#[derive(Debug, Clone)]
pub struct Fold {
    n: usize,
    choices: Vec<Choice>,
    prompt_lens: Vec<usize>,
    prompt_logprobs: Vec<Option<Vec<Option<TokenLogprob>>>>,
    /// Each engine request's usage, once it sent it.
    usage: Vec<Option<Usage>>,
}

impl Fold {
    /// For prompts of `prompt_lens` tokens with `n` choices each; every choice's text
    /// split into reasoning and content by a copy of `splitter` when the model reasons.
    pub fn new(prompt_lens: Vec<usize>, n: usize, splitter: Option<ReasoningSplitter>) -> Self {
        let prompts = prompt_lens.len();
        Self {
            n,
            choices: (0..prompts * n)
                .map(|_| Choice {
                    splitter: splitter.clone(),
                    ..Choice::default()
                })
                .collect(),
            prompt_lens,
            prompt_logprobs: vec![None; prompts],
            usage: vec![None; prompts],
        }
    }

    /// Reads tool calls in `format` out of every choice's answer.
    pub fn with_tool_calls(mut self, format: ToolFormat) -> Self {
        for c in &mut self.choices {
            c.tool_parser = Some(ToolCallParser::new(format));
        }
        self
    }

    pub fn choices(&self) -> &[Choice] {
        &self.choices
    }

    pub fn prompt_logprobs(&self, prompt: usize) -> Option<&[Option<TokenLogprob>]> {
        self.prompt_logprobs[prompt].as_deref()
    }

    /// Takes one event; returns what it changed.
    pub fn apply(&mut self, event: Event) -> Vec<Update> {
        let (prompt, event) = match event {
            Event::Engine { prompt, event } => (prompt, event),
            Event::Deadline => return self.close(),
        };
        match event {
            EngineEvent::PromptLogprobs(lp) => {
                self.prompt_logprobs[prompt] = Some(lp);
                vec![Update::PromptLogprobs { prompt }]
            }
            EngineEvent::Delta {
                index,
                token_ids,
                text,
                logprobs,
            } => {
                let index = prompt * self.n + index;
                let c = &mut self.choices[index];
                c.tokens += token_ids.len();
                c.logprobs.extend(logprobs.iter().cloned());
                let (content, reasoning, calls) = c.take(&text, false);
                if !reasoning.is_empty() {
                    c.reasoning_tokens += token_ids.len();
                }
                vec![Update::Delta {
                    index,
                    tokens: token_ids.len(),
                    content,
                    reasoning,
                    logprobs,
                    calls,
                }]
            }
            // An engine abort reaches a client only at shutdown (after the drain time):
            // the request failed, it did not end by length or stop.
            EngineEvent::Finished {
                reason: FinishReason::Abort,
                ..
            } => vec![Update::Failed(EngineFailure {
                kind: FailureKind::Aborted,
                message: "the server shut down before the request finished".into(),
            })],
            EngineEvent::Finished { index, reason, stop } => {
                let index = prompt * self.n + index;
                if self.choices[index].finish.is_none() {
                    self.choices[index].stop_sequence = stop;
                }
                self.finish(index, reason)
            }
            EngineEvent::Done(u) => {
                self.usage[prompt] = Some(u);
                Vec::new()
            }
            EngineEvent::Error(e) => vec![Update::Failed(e)],
        }
    }

    /// The end of the events: every choice still open ends with `length` (the deadline
    /// passed, or the stream broke off).
    pub fn close(&mut self) -> Vec<Update> {
        (0..self.choices.len())
            .flat_map(|i| self.finish(i, FinishReason::Length))
            .collect()
    }

    /// Ends choice `index` (once): whatever its splitter and tool parser held back, then
    /// the finish.
    fn finish(&mut self, index: usize, reason: FinishReason) -> Vec<Update> {
        let c = &mut self.choices[index];
        if c.finish.is_some() {
            return Vec::new();
        }
        c.finish = Some(reason);
        let mut updates = Vec::new();
        let (content, reasoning, calls) = c.take("", true);
        if !content.is_empty() || !reasoning.is_empty() || !calls.is_empty() {
            updates.push(Update::Delta {
                index,
                tokens: 0,
                content,
                reasoning,
                logprobs: Vec::new(),
                calls,
            });
        }
        updates.push(Update::Finished { index, reason });
        updates
    }

    /// The request's token counts: each engine request's own, or for one cut short by
    /// the deadline, its prompt and what its choices produced.
    pub fn usage(&self) -> Usage {
        let mut total = Usage::default();
        for (p, u) in self.usage.iter().enumerate() {
            let u = u.unwrap_or_else(|| Usage {
                prompt_tokens: self.prompt_lens[p],
                completion_tokens: self.choices[p * self.n..(p + 1) * self.n]
                    .iter()
                    .map(|c| c.tokens)
                    .sum(),
                cached_tokens: 0,
            });
            total.prompt_tokens += u.prompt_tokens;
            total.completion_tokens += u.completion_tokens;
            total.cached_tokens += u.cached_tokens;
        }
        total
    }

    /// Whether the model splits reasoning from content.
    pub fn reasons(&self) -> bool {
        self.choices.first().is_some_and(|c| c.splitter.is_some())
    }
}

/// What a block of an answer holds, in the order the model wrote them: the thought, text,
/// or one tool call (its arguments are the block's text).
#[derive(Debug, Clone, PartialEq)]
pub enum BlockKind {
    Reasoning,
    Text,
    Call { name: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub kind: BlockKind,
    pub text: String,
}

/// A step of the block sequence: block `i` opened, grew by a piece, or closed.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockEvent {
    Start(usize),
    Delta(usize, String),
    Stop(usize),
}

/// One choice's answer as a sequence of blocks (the Responses API's output items,
/// Anthropic's content blocks), built from its [`Update`]s: the events stream one block
/// at a time, and the finished list is the non-streamed body, so the two cannot differ.
/// Whitespace between blocks opens no text block (a model writes a newline before a
/// call; that is not an answer).
#[derive(Debug, Clone, Default)]
pub struct Blocks {
    pub blocks: Vec<Block>,
    open: bool,
    /// Whitespace that opens a text block only if more text follows.
    pending: String,
}

impl Blocks {
    /// The block events of one update of choice 0 (the APIs that use blocks have one).
    pub fn push(&mut self, u: &Update) -> Vec<BlockEvent> {
        let mut out = Vec::new();
        let Update::Delta {
            index: 0,
            content,
            reasoning,
            calls,
            ..
        } = u
        else {
            return out;
        };
        if !reasoning.is_empty() {
            self.pending.clear();
            self.add(BlockKind::Reasoning, reasoning, &mut out);
        }
        if !content.is_empty() {
            let text_open = self.open && self.blocks.last().is_some_and(|b| b.kind == BlockKind::Text);
            if text_open {
                self.add(BlockKind::Text, content, &mut out);
            } else {
                self.pending.push_str(content);
                if !self.pending.trim().is_empty() {
                    let text = std::mem::take(&mut self.pending);
                    self.add(BlockKind::Text, &text, &mut out);
                }
            }
        }
        for e in calls {
            match e {
                ToolEvent::CallStart { name, .. } => {
                    self.pending.clear();
                    self.close(&mut out);
                    self.open(BlockKind::Call { name: name.clone() }, &mut out);
                }
                ToolEvent::Arguments { text, .. } => {
                    if let Some(b) = self.blocks.last_mut().filter(|_| self.open) {
                        b.text.push_str(text);
                        out.push(BlockEvent::Delta(self.blocks.len() - 1, text.clone()));
                    }
                }
                ToolEvent::Content(_) => {}
            }
        }
        out
    }

    /// The end of the answer: the open block closes.
    pub fn finish(&mut self) -> Vec<BlockEvent> {
        let mut out = Vec::new();
        self.close(&mut out);
        out
    }

    fn add(&mut self, kind: BlockKind, text: &str, out: &mut Vec<BlockEvent>) {
        let same = self.open && self.blocks.last().is_some_and(|b| b.kind == kind);
        if !same {
            self.close(out);
            self.open(kind, out);
        }
        let i = self.blocks.len() - 1;
        self.blocks[i].text.push_str(text);
        out.push(BlockEvent::Delta(i, text.to_string()));
    }

    fn open(&mut self, kind: BlockKind, out: &mut Vec<BlockEvent>) {
        self.blocks.push(Block {
            kind,
            text: String::new(),
        });
        self.open = true;
        out.push(BlockEvent::Start(self.blocks.len() - 1));
    }

    fn close(&mut self, out: &mut Vec<BlockEvent>) {
        if self.open {
            self.open = false;
            out.push(BlockEvent::Stop(self.blocks.len() - 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(prompt: usize, index: usize, text: &str) -> Event {
        Event::Engine {
            prompt,
            event: EngineEvent::Delta {
                index,
                token_ids: vec![7],
                text: text.into(),
                logprobs: vec![],
            },
        }
    }

    /// Two prompts of two choices: deltas land on `prompt * n + index`, finishes once,
    /// usage adds up; a deadline ends the open choices with `length` and counts what
    /// the cut request produced.
    #[test]
    fn choices_usage_and_the_deadline() {
        let mut f = Fold::new(vec![5, 9], 2, None);
        f.apply(delta(0, 1, "a"));
        f.apply(delta(1, 0, "b"));
        f.apply(delta(1, 0, "c"));
        let fin = |prompt, index| Event::Engine {
            prompt,
            event: EngineEvent::Finished {
                index,
                reason: FinishReason::Stop,
                stop: None,
            },
        };
        assert_eq!(
            f.apply(fin(0, 1)),
            vec![Update::Finished {
                index: 1,
                reason: FinishReason::Stop
            }]
        );
        assert!(f.apply(fin(0, 1)).is_empty());
        f.apply(Event::Engine {
            prompt: 0,
            event: EngineEvent::Done(Usage {
                prompt_tokens: 5,
                completion_tokens: 1,
                cached_tokens: 3,
            }),
        });
        let closed = f.apply(Event::Deadline);
        assert_eq!(closed.len(), 3, "{closed:?}");
        let texts: Vec<&str> = f.choices().iter().map(|c| c.content.as_str()).collect();
        assert_eq!(texts, ["", "a", "bc", ""]);
        assert!(f.choices().iter().all(|c| c.finish.is_some()));
        assert_eq!(
            f.usage(),
            Usage {
                prompt_tokens: 14,
                completion_tokens: 3,
                cached_tokens: 3
            }
        );
    }

    fn delta_update(content: &str, reasoning: &str, calls: Vec<ToolEvent>) -> Update {
        Update::Delta {
            index: 0,
            tokens: 1,
            content: content.into(),
            reasoning: reasoning.into(),
            logprobs: vec![],
            calls,
        }
    }

    /// A thought, text, whitespace, two calls: four blocks, each opened, grown and closed
    /// once, in order; the whitespace before the first call opens no block.
    #[test]
    fn blocks_follow_the_answer() {
        let mut b = Blocks::default();
        let mut events = Vec::new();
        events.extend(b.push(&delta_update("", "let me think", vec![])));
        events.extend(b.push(&delta_update("\n", "", vec![])));
        events.extend(b.push(&delta_update("It is ", "", vec![])));
        events.extend(b.push(&delta_update("sunny.", "", vec![])));
        let call = |index, name: &str, args: &str| {
            vec![
                ToolEvent::CallStart {
                    index,
                    name: name.into(),
                },
                ToolEvent::Arguments {
                    index,
                    text: args.into(),
                },
            ]
        };
        events.extend(b.push(&delta_update("\n", "", call(0, "f", "{\"a\":"))));
        events.extend(b.push(&delta_update(
            "",
            "",
            vec![ToolEvent::Arguments {
                index: 0,
                text: "1}".into(),
            }],
        )));
        events.extend(b.push(&delta_update(" \n", "", call(1, "g", "{}"))));
        events.extend(b.finish());
        let kinds: Vec<_> = b.blocks.iter().map(|b| (&b.kind, b.text.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (&BlockKind::Reasoning, "let me think"),
                (&BlockKind::Text, "\nIt is sunny.\n"),
                (&BlockKind::Call { name: "f".into() }, "{\"a\":1}"),
                (&BlockKind::Call { name: "g".into() }, "{}"),
            ]
        );
        let starts: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                BlockEvent::Start(i) => Some(*i),
                _ => None,
            })
            .collect();
        let stops: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                BlockEvent::Stop(i) => Some(*i),
                _ => None,
            })
            .collect();
        assert_eq!((starts, stops), (vec![0, 1, 2, 3], vec![0, 1, 2, 3]));
        // The deltas add up to each block's text.
        for (i, block) in b.blocks.iter().enumerate() {
            let text: String = events
                .iter()
                .filter_map(|e| match e {
                    BlockEvent::Delta(j, t) if *j == i => Some(t.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(text, block.text);
        }
        // Only whitespace: no block at all.
        let mut b = Blocks::default();
        assert!(b.push(&delta_update("\n \n", "", vec![])).is_empty());
        assert!(b.finish().is_empty());
    }
}
