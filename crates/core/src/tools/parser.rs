//! Tool calls out of a streamed answer: [`ToolCallParser`] takes the answer's text piece
//! by piece and separates plain content from calls, each call as its name and then its
//! arguments' bytes exactly as the model wrote them (never re-serialised from a partial
//! parse). Text that could still be the start of a marker is held back, as the stop
//! checker does, so feeding the text in any pieces gives the same events, concatenated,
//! as feeding it at once.

use serde_json::Value;

use super::ToolFormat;

/// What the parser found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    /// Plain answer text.
    Content(String),
    /// Call `index` begins: its function's name.
    CallStart { index: usize, name: String },
    /// More of call `index`'s arguments (a JSON text, in pieces).
    Arguments { index: usize, text: String },
}

/// A whole call, as the events of one call add up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// Adds `events` up: the content and the calls.
pub fn collect(events: &[ToolEvent]) -> (String, Vec<ToolCall>) {
    let mut content = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    for e in events {
        match e {
            ToolEvent::Content(t) => content.push_str(t),
            ToolEvent::CallStart { name, .. } => calls.push(ToolCall {
                name: name.clone(),
                arguments: String::new(),
            }),
            ToolEvent::Arguments { index, text } => calls[*index].arguments.push_str(text),
        }
    }
    (content, calls)
}

// The markers of each format.
const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_CALLS: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";
const DS_CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const DS_CALLS_END: &str = "<｜tool▁calls▁end｜>";
const DS_CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const DS_CALL_END: &str = "<｜tool▁call▁end｜>";
const DS_SEP: &str = "<｜tool▁sep｜>";
const DS_JSON_OPEN: &str = "```json\n";
const DS_JSON_CLOSE: &str = "\n```";

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Plain text, watching for an opening marker.
    Text,
    /// Inside a call's JSON object (`{"name": .., "arguments": ..}`).
    Object,
    /// After a Hermes call's object: its closing marker.
    HermesClose,
    /// After `<|python_tag|>`: the first call's object.
    LlamaFirst,
    /// After a Llama 3 call: `;` and another, or the end.
    LlamaNext,
    /// After `[TOOL_CALLS]`: a JSON array of calls, or Mistral v11's `name[ARGS]{..}`.
    MistralStart,
    /// In Mistral's array: the next object, `,` or `]`.
    MistralArray,
    /// Mistral v11: the name before `[ARGS]`.
    MistralName,
    /// Raw arguments until the end of the text (Mistral v11) or a marker (DeepSeek).
    RawArguments { until: &'static str },
    /// DeepSeek: between calls, `<｜tool▁call▁begin｜>` or `<｜tool▁calls▁end｜>`.
    DeepSeekNext,
    /// DeepSeek: a call's head up to `<｜tool▁sep｜>` (`function`, or the name in V3.1).
    DeepSeekHead,
    /// DeepSeek V3: the name line after `function<｜tool▁sep｜>`.
    DeepSeekName,
    /// DeepSeek V3: the opening of the arguments' code block.
    DeepSeekFence,
    /// DeepSeek: after a call's arguments, `<｜tool▁call▁end｜>`.
    DeepSeekCallEnd,
}

/// Separates content from tool calls in one choice's answer.
#[derive(Debug, Clone)]
pub struct ToolCallParser {
    format: ToolFormat,
    state: State,
    /// Text received and not yet decided.
    pending: String,
    /// Whitespace held in plain text: emitted before more text, dropped before a call.
    held_space: String,
    /// Nothing but whitespace so far (Llama 3's bare JSON call must open the answer).
    at_start: bool,
    calls: usize,
    object: ObjectScanner,
}

impl ToolCallParser {
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            state: State::Text,
            pending: String::new(),
            held_space: String::new(),
            at_start: true,
            calls: 0,
            object: ObjectScanner::default(),
        }
    }

    /// Takes the next piece of text.
    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        while self.step(&mut out, false) {}
        out
    }

    /// The end of the text: what was held back is decided.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        while self.step(&mut out, true) {}
        if self.state == State::Object {
            self.object.finish(&mut self.calls, &mut out);
        }
        if !self.held_space.is_empty() && self.calls == 0 {
            out.push(ToolEvent::Content(std::mem::take(&mut self.held_space)));
        }
        merge_content(out)
    }

    fn openers(&self) -> &'static [&'static str] {
        match self.format {
            ToolFormat::Hermes | ToolFormat::Generic => &[HERMES_OPEN],
            ToolFormat::Llama3Json => &[PYTHON_TAG],
            ToolFormat::Mistral => &[MISTRAL_CALLS],
            ToolFormat::DeepSeekV3 => &[DS_CALLS_BEGIN, DS_CALL_BEGIN],
        }
    }

    /// Emits plain text, holding whitespace runs until more text follows.
    fn text(&mut self, text: &str, out: &mut Vec<ToolEvent>) {
        if text.is_empty() {
            return;
        }
        let trimmed = text.trim_end();
        if trimmed.is_empty() {
            self.held_space.push_str(text);
            return;
        }
        let mut s = std::mem::take(&mut self.held_space);
        s.push_str(trimmed);
        self.held_space = text[trimmed.len()..].to_string();
        self.at_start = false;
        out.push(ToolEvent::Content(s));
    }

    /// One move forward; false when nothing more can be decided now.
    fn step(&mut self, out: &mut Vec<ToolEvent>, end: bool) -> bool {
        match self.state.clone() {
            State::Text => {
                if self.format == ToolFormat::Llama3Json && self.at_start {
                    // A bare `{"name": ...}` opening the answer is a call.
                    let bare = "{\"name\"";
                    let t = self.pending.trim_start();
                    if t.starts_with(bare) {
                        self.held_space.clear();
                        let skip = self.pending.len() - t.len();
                        self.pending.drain(..skip);
                        self.open_object();
                        return true;
                    }
                    if !end && bare.starts_with(t) {
                        return false; // whitespace, or the start of `{"name"`
                    }
                    self.at_start = false;
                }
                let openers = self.openers();
                let found = openers
                    .iter()
                    .filter_map(|m| self.pending.find(m).map(|i| (i, *m)))
                    .min();
                if let Some((i, marker)) = found {
                    let before: String = self.pending.drain(..i).collect();
                    self.text(&before, out);
                    self.held_space.clear();
                    self.pending.drain(..marker.len());
                    self.opened(marker);
                    return true;
                }
                let keep = if end {
                    0
                } else {
                    held_prefix(&self.pending, openers)
                };
                let emit: String = self.pending.drain(..self.pending.len() - keep).collect();
                self.text(&emit, out);
                false
            }
            State::Object => {
                let text = std::mem::take(&mut self.pending);
                let (used, done) = self.object.push(&text, &mut self.calls, out);
                self.pending = text[used..].to_string();
                if done {
                    self.state = match self.format {
                        ToolFormat::Hermes | ToolFormat::Generic => State::HermesClose,
                        ToolFormat::Llama3Json => State::LlamaNext,
                        ToolFormat::Mistral => State::MistralArray,
                        ToolFormat::DeepSeekV3 => State::Text,
                    };
                    return true;
                }
                false
            }
            State::HermesClose => self.expect(&[HERMES_CLOSE], end, |p, _| p.state = State::Text),
            State::LlamaFirst => {
                let t = self.pending.trim_start();
                if t.is_empty() && !end {
                    return false;
                }
                if t.starts_with('{') {
                    let skip = self.pending.len() - t.len();
                    self.pending.drain(..skip);
                    self.open_object();
                } else {
                    self.state = State::Text;
                }
                true
            }
            State::LlamaNext => {
                let t = self.pending.trim_start();
                if t.is_empty() && !end {
                    return false;
                }
                if let Some(rest) = t.strip_prefix(';') {
                    let rest = rest.trim_start();
                    if rest.is_empty() && !end {
                        return false;
                    }
                    if rest.starts_with('{') {
                        let skip = self.pending.len() - rest.len();
                        self.pending.drain(..skip);
                        self.open_object();
                        return true;
                    }
                }
                self.state = State::Text;
                true
            }
            State::MistralStart => {
                let t = self.pending.trim_start();
                if t.is_empty() {
                    return false;
                }
                let skip = self.pending.len() - t.len();
                if t.starts_with('[') {
                    self.pending.drain(..skip + 1);
                    self.state = State::MistralArray;
                } else {
                    self.pending.drain(..skip);
                    self.state = State::MistralName;
                }
                true
            }
            State::MistralArray => {
                let t = self.pending.trim_start();
                if t.is_empty() {
                    return false;
                }
                let skip = self.pending.len() - t.len();
                match t.as_bytes()[0] {
                    b'{' => {
                        self.pending.drain(..skip);
                        self.open_object();
                    }
                    b',' => {
                        self.pending.drain(..skip + 1);
                    }
                    b']' => {
                        self.pending.drain(..skip + 1);
                        self.state = State::Text;
                    }
                    _ => self.state = State::Text,
                }
                true
            }
            State::MistralName => {
                let Some(i) = self.pending.find(MISTRAL_ARGS) else {
                    if end {
                        self.state = State::Text;
                    }
                    return end;
                };
                let name: String = self.pending.drain(..i).collect();
                self.pending.drain(..MISTRAL_ARGS.len());
                self.start_call(name.trim().to_string(), out);
                self.state = State::RawArguments { until: MISTRAL_CALLS };
                true
            }
            State::RawArguments { until } => {
                let index = self.calls - 1;
                let (piece, found) = if until.is_empty() {
                    (std::mem::take(&mut self.pending), false)
                } else if let Some(i) = self.pending.find(until) {
                    let piece: String = self.pending.drain(..i).collect();
                    self.pending.drain(..until.len());
                    (piece, true)
                } else {
                    let keep = if end {
                        0
                    } else {
                        held_prefix(&self.pending, &[until])
                    };
                    (self.pending.drain(..self.pending.len() - keep).collect(), false)
                };
                if !piece.is_empty() {
                    out.push(ToolEvent::Arguments { index, text: piece });
                }
                if found {
                    self.state = if self.format == ToolFormat::Mistral {
                        State::MistralStart // the marker opened the next call
                    } else {
                        State::DeepSeekCallEnd
                    };
                    return true;
                }
                false
            }
            State::DeepSeekNext => self.expect(&[DS_CALL_BEGIN, DS_CALLS_END], end, |p, m| {
                p.state = if m == DS_CALL_BEGIN {
                    State::DeepSeekHead
                } else {
                    State::Text
                }
            }),
            State::DeepSeekHead => {
                let Some(i) = self.pending.find(DS_SEP) else {
                    if end {
                        self.state = State::Text;
                    }
                    return end;
                };
                let head: String = self.pending.drain(..i).collect();
                self.pending.drain(..DS_SEP.len());
                let head = head.trim();
                if head == "function" {
                    self.state = State::DeepSeekName;
                } else {
                    // V3.1: `name<｜tool▁sep｜>{arguments}<｜tool▁call▁end｜>`.
                    self.start_call(head.to_string(), out);
                    self.state = State::RawArguments { until: DS_CALL_END };
                }
                true
            }
            State::DeepSeekName => {
                let Some(i) = self.pending.find('\n') else {
                    if end && !self.pending.is_empty() {
                        let name = std::mem::take(&mut self.pending);
                        self.start_call(name.trim().to_string(), out);
                    }
                    return false;
                };
                let name: String = self.pending.drain(..i + 1).collect();
                self.start_call(name.trim().to_string(), out);
                self.state = State::DeepSeekFence;
                true
            }
            State::DeepSeekFence => {
                if self.pending.len() < DS_JSON_OPEN.len() && DS_JSON_OPEN.starts_with(&self.pending) && !end
                {
                    return false;
                }
                if self.pending.starts_with(DS_JSON_OPEN) {
                    self.pending.drain(..DS_JSON_OPEN.len());
                }
                self.state = State::RawArguments { until: DS_JSON_CLOSE };
                true
            }
            State::DeepSeekCallEnd => {
                // Optional: V3's fence is followed by the call's end; V3.1's end was the
                // arguments' terminator itself.
                let t = self.pending.trim_start();
                if t.is_empty() && !end {
                    return false;
                }
                if DS_CALL_END.starts_with(t) && !end && t.len() < DS_CALL_END.len() {
                    return false;
                }
                if t.starts_with(DS_CALL_END) {
                    let skip = self.pending.len() - t.len() + DS_CALL_END.len();
                    self.pending.drain(..skip);
                }
                self.state = State::DeepSeekNext;
                true
            }
        }
    }

    /// Skips whitespace, then consumes one of `markers` and calls `then`; anything else
    /// goes back to plain text.
    fn expect(&mut self, markers: &[&'static str], end: bool, then: impl FnOnce(&mut Self, &str)) -> bool {
        let t = self.pending.trim_start();
        if t.is_empty() && !end {
            return false;
        }
        let skip = self.pending.len() - t.len();
        if let Some(m) = markers.iter().find(|m| t.starts_with(**m)) {
            self.pending.drain(..skip + m.len());
            then(self, m);
            return true;
        }
        if !end && markers.iter().any(|m| m.starts_with(t)) {
            return false;
        }
        self.state = State::Text;
        !self.pending.is_empty()
    }

    fn opened(&mut self, marker: &str) {
        self.at_start = false;
        self.state = match marker {
            HERMES_OPEN => State::Object,
            PYTHON_TAG => State::LlamaFirst,
            MISTRAL_CALLS => State::MistralStart,
            DS_CALLS_BEGIN => State::DeepSeekNext,
            DS_CALL_BEGIN => State::DeepSeekHead,
            _ => State::Text,
        };
        if self.state == State::Object {
            self.open_object();
        }
    }

    fn open_object(&mut self) {
        self.at_start = false;
        self.object = ObjectScanner::default();
        self.state = State::Object;
    }

    fn start_call(&mut self, name: String, out: &mut Vec<ToolEvent>) {
        out.push(ToolEvent::CallStart {
            index: self.calls,
            name,
        });
        self.calls += 1;
    }
}

/// Joins adjacent content events.
fn merge_content(events: Vec<ToolEvent>) -> Vec<ToolEvent> {
    let mut out: Vec<ToolEvent> = Vec::with_capacity(events.len());
    for e in events {
        if let (Some(ToolEvent::Content(a)), ToolEvent::Content(b)) = (out.last_mut(), &e) {
            a.push_str(b);
            continue;
        }
        out.push(e);
    }
    out
}

/// The length of the longest suffix of `text` that is a proper prefix of a marker.
fn held_prefix(text: &str, markers: &[&str]) -> usize {
    let mut best = 0;
    for m in markers {
        for (i, _) in m.char_indices().skip(1) {
            if i > best && text.ends_with(&m[..i]) {
                best = i;
            }
        }
    }
    best
}

/// Scans one call's JSON object character by character, tracking its top-level keys.
/// The name is taken when its string is complete; the arguments' bytes are passed on as
/// they arrive once the name is known (else when the object is complete).
#[derive(Debug, Clone, Default)]
struct ObjectScanner {
    raw: String,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// At depth 1: reading a key, or the key whose value is being read.
    key: Option<String>,
    reading_key: bool,
    expecting_value: bool,
    /// Where the current top-level value starts in `raw`.
    value_start: Option<usize>,
    name: Option<String>,
    /// The arguments value's start, and how much of it was passed on.
    args_start: Option<usize>,
    args_sent: usize,
    args_done: Option<(usize, usize)>,
    started: Option<usize>,
}

const ARGUMENT_KEYS: [&str; 2] = ["arguments", "parameters"];

impl ObjectScanner {
    /// Takes `text`; returns the bytes used and whether the object is complete.
    fn push(&mut self, text: &str, calls: &mut usize, out: &mut Vec<ToolEvent>) -> (usize, bool) {
        for (i, c) in text.char_indices() {
            let pos = self.raw.len();
            self.raw.push(c);
            if self.scan(c, pos) {
                self.stream_arguments(calls, out, true);
                self.complete(calls, out);
                return (i + c.len_utf8(), true);
            }
        }
        self.stream_arguments(calls, out, false);
        (text.len(), false)
    }

    /// One character at `pos`; true when the object closes with it.
    fn scan(&mut self, c: char, pos: usize) -> bool {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if c == '\\' {
                self.escaped = true;
            } else if c == '"' {
                self.in_string = false;
                if self.reading_key {
                    self.reading_key = false;
                    let start = self.value_start.take().unwrap_or(pos);
                    self.key = serde_json::from_str(&self.raw[start..=pos]).ok();
                } else if self.depth == 1 {
                    self.end_value(pos + 1);
                }
            }
            return false;
        }
        match c {
            '{' | '[' => {
                self.depth += 1;
                if self.depth == 2 && self.expecting_value {
                    self.begin_value(pos);
                }
            }
            '}' | ']' => {
                if self.depth == 1 {
                    self.end_scalar(pos);
                    self.depth = 0;
                    return true;
                }
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 1 {
                    self.end_value(pos + 1);
                }
            }
            '"' => {
                self.in_string = true;
                if self.depth == 1 {
                    if self.expecting_value {
                        self.begin_value(pos);
                    } else {
                        self.reading_key = true;
                        self.value_start = Some(pos);
                    }
                }
            }
            ':' if self.depth == 1 => self.expecting_value = true,
            ',' if self.depth == 1 => {
                self.end_scalar(pos);
                self.expecting_value = false;
            }
            c if self.depth == 1 && self.expecting_value && !c.is_whitespace() => self.begin_value(pos),
            _ => {}
        }
        false
    }

    fn is_arguments(&self) -> bool {
        self.key.as_deref().is_some_and(|k| ARGUMENT_KEYS.contains(&k))
    }

    fn begin_value(&mut self, pos: usize) {
        self.expecting_value = false;
        self.value_start = Some(pos);
        if self.is_arguments() && self.args_start.is_none() {
            self.args_start = Some(pos);
        }
    }

    /// A scalar value (number, literal) ends at a `,` or the closing brace.
    fn end_scalar(&mut self, pos: usize) {
        if self.value_start.is_some() {
            self.end_value(pos);
        }
    }

    fn end_value(&mut self, end: usize) {
        let Some(start) = self.value_start.take() else {
            return;
        };
        let raw = self.raw[start..end].trim_end();
        let end = start + raw.len();
        match self.key.as_deref() {
            Some("name") if self.name.is_none() => {
                self.name = serde_json::from_str::<String>(raw).ok();
            }
            Some(k) if ARGUMENT_KEYS.contains(&k) && self.args_done.is_none() => {
                self.args_done = Some((start, end));
            }
            _ => {}
        }
        self.key = None;
    }

    /// Passes on the arguments' new bytes when the name is known and they are an object
    /// (a string or scalar is passed on whole at the end).
    fn stream_arguments(&mut self, calls: &mut usize, out: &mut Vec<ToolEvent>, closing: bool) {
        let (Some(name), Some(start)) = (&self.name, self.args_start) else {
            return;
        };
        if !self.raw[start..].starts_with('{') {
            return;
        }
        if self.started.is_none() {
            self.started = Some(*calls);
            out.push(ToolEvent::CallStart {
                index: *calls,
                name: name.clone(),
            });
            *calls += 1;
            self.args_sent = start;
        }
        let upto = match self.args_done {
            Some((_, end)) => end,
            // Trailing whitespace may turn out to be after the value: held until then.
            None if !closing => start + self.raw[start..].trim_end().len(),
            None => self.raw.len(),
        };
        if upto > self.args_sent {
            out.push(ToolEvent::Arguments {
                index: self.started.unwrap(),
                text: self.raw[self.args_sent..upto].to_string(),
            });
            self.args_sent = upto;
        }
    }

    /// The object closed: a call not yet started starts now, with its whole arguments.
    fn complete(&mut self, calls: &mut usize, out: &mut Vec<ToolEvent>) {
        if self.started.is_some() {
            return;
        }
        let Some(name) = self.name.clone() else {
            // Not a call: the text was plain content after all.
            out.push(ToolEvent::Content(std::mem::take(&mut self.raw)));
            return;
        };
        let arguments = match self.args_done {
            Some((s, e)) => {
                let raw = &self.raw[s..e];
                match serde_json::from_str::<Value>(raw) {
                    Ok(Value::String(inner)) => inner,
                    _ => raw.to_string(),
                }
            }
            None => "{}".to_string(),
        };
        out.push(ToolEvent::CallStart { index: *calls, name });
        out.push(ToolEvent::Arguments {
            index: *calls,
            text: arguments,
        });
        *calls += 1;
        self.started = Some(*calls - 1);
    }

    /// The text ended inside the object: what is known is passed on.
    fn finish(&mut self, calls: &mut usize, out: &mut Vec<ToolEvent>) {
        if self.started.is_some() {
            self.stream_arguments(calls, out, true);
            return;
        }
        if self.name.is_some() {
            if self.args_done.is_none() {
                if let Some(s) = self.args_start {
                    self.args_done = Some((s, self.raw.len()));
                }
            }
            self.complete(calls, out);
        } else {
            out.push(ToolEvent::Content(std::mem::take(&mut self.raw)));
        }
    }
}
