//! Tool calling: the format a model writes calls in ([`ToolFormat`], detected from its
//! vocabulary and chat template), the conversation prepared for its template, the
//! grammar that makes a required call well-formed, and the parser that reads calls back
//! out of the answer ([`parser`]).
//!
//! Models whose template has no tool format (the default SmolLM2 model's) get the
//! [`ToolFormat::Generic`] format: the tool definitions go into the system prompt with
//! instructions to answer `<tool_call>{"name": .., "arguments": {..}}</tool_call>`, and
//! the same is parsed back, so tools work on every model.

pub mod custom;
pub mod parser;

use serde_json::{json, Value};

pub use custom::{CustomInput, FreeForm};
pub use parser::{collect, ToolCall, ToolCallParser, ToolEvent};

use crate::grammar::ConstraintSpec;
use crate::tokenizer::TextCodec;

/// How a model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// Hermes, Qwen2.5, Qwen3: `<tool_call>\n{"name": .., "arguments": {..}}\n</tool_call>`.
    Hermes,
    /// Llama 3.1-3.3: `<|python_tag|>` or a bare `{"name": .., "parameters": {..}}`,
    /// several separated by `;`.
    Llama3Json,
    /// Mistral: `[TOOL_CALLS][{"name": .., "arguments": {..}}]` (v3), or
    /// `[TOOL_CALLS]name[ARGS]{..}` (v11).
    Mistral,
    /// DeepSeek-V3/R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name`,
    /// the arguments in a ```json block, `<｜tool▁call▁end｜><｜tool▁calls▁end｜>` (V3.1:
    /// `name<｜tool▁sep｜>{..}`).
    DeepSeekV3,
    /// Ours, for templates without a tool format: Hermes' markers as plain text.
    Generic,
}

impl ToolFormat {
    /// The format of the model's chat template: by the markers it writes, checked
    /// against the vocabulary where they are single tokens.
    pub fn detect(codec: &TextCodec) -> Self {
        let template = codec.chat_template().unwrap_or("");
        let token = |t: &str| codec.tokenizer().token_to_id(t).is_some();
        if token("<｜tool▁calls▁begin｜>") && template.contains("tool▁calls▁begin") {
            ToolFormat::DeepSeekV3
        } else if token("[TOOL_CALLS]") && template.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if token("<|python_tag|>") && template.contains("tools") {
            ToolFormat::Llama3Json
        } else if template.contains("<tool_call>") {
            ToolFormat::Hermes
        } else {
            ToolFormat::Generic
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "hermes",
            ToolFormat::Llama3Json => "llama3_json",
            ToolFormat::Mistral => "mistral",
            ToolFormat::DeepSeekV3 => "deepseek_v3",
            ToolFormat::Generic => "generic",
        }
    }

    /// Whether the chat template renders tool definitions and calls itself.
    pub fn template_renders_tools(self) -> bool {
        self != ToolFormat::Generic
    }

    /// The key of a call's arguments in the format's JSON.
    fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Llama3Json => "parameters",
            _ => "arguments",
        }
    }
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionSpec {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema of the arguments object.
    pub parameters: Value,
    /// A custom (free-form) tool: its arguments are `{"input": <text>}`, the text
    /// following the tool's grammar.
    pub custom: Option<CustomInput>,
}

impl FunctionSpec {
    /// `{"name", "description", "parameters"}`, as OpenAI's `function` object.
    pub fn definition(&self) -> Value {
        let mut d = json!({"name": self.name, "parameters": self.parameters});
        let description = match (&self.description, &self.custom) {
            (d, Some(c)) => Some(format!(
                "{}{}",
                d.as_deref().map(|d| format!("{d}\n\n")).unwrap_or_default(),
                c.form.describe()
            )),
            (d, None) => d.clone(),
        };
        if let Some(desc) = description {
            d["description"] = desc.into();
        }
        d
    }
}

/// The system prompt's part that offers `functions` in the generic format.
pub fn generic_system_prompt(functions: &[FunctionSpec]) -> String {
    let mut s = String::from(
        "You can call functions. These are the available functions, as JSON schemas of their arguments:\n",
    );
    for f in functions {
        s.push_str(&f.definition().to_string());
        s.push('\n');
    }
    s.push_str(
        "\nTo call a function, answer with one line per call and nothing else:\n\
         <tool_call>{\"name\": \"<function name>\", \"arguments\": {<the arguments as JSON>}}</tool_call>\n\
         Function results come back in <tool_response></tool_response> tags. \
         If no function is needed, answer normally.",
    );
    s
}

/// Prepares a conversation (`{role, content, tool_calls, tool_call_id}` objects) for the
/// template: for a template with its own tool format, each call's `arguments` becomes a
/// mapping (what Jinja templates index and `tojson`); for the generic format, calls are
/// written into the assistant's text and tool results become user turns in
/// `<tool_response>` tags, and the definitions go into the system prompt (a new one when
/// there is none).
pub fn prepare_messages(format: ToolFormat, messages: &mut Vec<Value>, functions: &[FunctionSpec]) {
    for m in messages.iter_mut() {
        let Some(calls) = m.get_mut("tool_calls").and_then(Value::as_array_mut) else {
            continue;
        };
        for c in calls.iter_mut() {
            if let Some(f) = c.get_mut("function") {
                if let Some(Value::String(args)) = f.get("arguments") {
                    if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(args) {
                        f["arguments"] = v;
                    }
                }
            }
        }
    }
    if format != ToolFormat::Generic {
        return;
    }
    for m in messages.iter_mut() {
        let role = m["role"].as_str().unwrap_or("").to_string();
        if role == "assistant" {
            if let Some(calls) = m.get("tool_calls").and_then(Value::as_array).cloned() {
                let mut text = m["content"].as_str().unwrap_or("").to_string();
                for c in calls {
                    let f = &c["function"];
                    let call = json!({"name": f["name"], "arguments": f["arguments"]});
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!("<tool_call>{call}</tool_call>"));
                }
                m["content"] = text.into();
                m.as_object_mut().unwrap().remove("tool_calls");
            }
        } else if role == "tool" {
            let content = m["content"].as_str().unwrap_or("").to_string();
            *m = json!({"role": "user", "content": format!("<tool_response>\n{content}\n</tool_response>")});
        }
    }
    if functions.is_empty() {
        return;
    }
    let prompt = generic_system_prompt(functions);
    match messages.first_mut() {
        Some(first) if first["role"] == "system" => {
            let own = first["content"].as_str().unwrap_or("").to_string();
            first["content"] = format!("{own}\n\n{prompt}").trim_start().to_string().into();
        }
        _ => messages.insert(0, json!({"role": "system", "content": prompt})),
    }
}

/// A grammar piece for `marker`: its token when the vocabulary has it as one (a special
/// token is only ever allowed by naming it), else its text.
fn marker(codec: &TextCodec, text: &str) -> String {
    match codec.tokenizer().token_to_id(text) {
        Some(id) => format!("<[{id}]>"),
        None => serde_json::to_string(text).expect("a string serialises"),
    }
}

/// How the answer may call tools, for [`call_grammar`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallMode {
    /// The answer is calls and nothing else.
    Required,
    /// Free text; once the model opens a call (its format's opening marker), the rest of
    /// the answer is well-formed calls.
    Auto,
}

/// The most calls one answer may make. A turn's calls end where the model stops
/// writing them; a small model may instead write the same call again and again until its
/// token limit, so the grammar ends the turn after this many (and a forced answer, with
/// `tool_choice` required, after as many calls as there are functions: one function
/// forced is one call).
pub const MAX_PARALLEL_CALLS: usize = 8;

/// Up to `most - 1` more of `item` (which starts with its separator), as nested optional
/// groups: `(item (item ..)?)?`.
fn more_calls(item: &str, most: usize) -> String {
    (1..most).fold(String::new(), |inner, _| {
        if inner.is_empty() {
            format!("({item})?")
        } else {
            format!("({item} {inner})?")
        }
    })
}

/// The grammar of tool calls in the model's format: one (or with `parallel`, up to
/// [`MAX_PARALLEL_CALLS`], and in a forced answer up to one per function) calls, each naming one of `functions` with arguments valid against its schema.
/// With [`CallMode::Auto`] the answer may instead be free text, and a call is
/// constrained from its opening marker on: a special token is only allowed where the
/// grammar names it, so free text can never open a call by accident; a marker that is
/// plain text ends the text lexeme lazily (llguidance's `suffix`).
pub fn call_grammar(
    codec: &TextCodec,
    format: ToolFormat,
    functions: &[FunctionSpec],
    parallel: bool,
    mode: CallMode,
) -> ConstraintSpec {
    let options = json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
    // Each function's schema stays the root of its own `%json`, so its `$ref`s to
    // `#/$defs/..` resolve; the call object around it is literal text in the compact
    // layout the options give.
    // A custom tool's `input` is a JSON string whose escaped text follows its grammar.
    let arguments_json = |f: &FunctionSpec| {
        if let Some(c) = &f.custom {
            return format!("\"{{\\\"input\\\": \\\"\" {} \"\\\"}}\"", c.quoted_grammar);
        }
        let mut schema = f.parameters.clone();
        if let Value::Object(o) = &mut schema {
            o.insert("x-guidance".into(), options.clone());
        }
        format!("%json {schema}")
    };
    let lit = |t: &str| serde_json::to_string(t).expect("a string serialises");
    let one_call = {
        let alternatives: Vec<String> = functions
            .iter()
            .map(|f| {
                let head = format!(
                    "{{\"name\": {}, \"{}\": ",
                    serde_json::to_string(&f.name).unwrap(),
                    format.arguments_key()
                );
                format!("{} {} \"}}\"", lit(&head), arguments_json(f))
            })
            .collect();
        format!("one: {}\n", alternatives.join("\n    | "))
    };
    let m = |t: &str| marker(codec, t);
    let most = match mode {
        CallMode::Required => functions.len().clamp(1, MAX_PARALLEL_CALLS),
        CallMode::Auto => MAX_PARALLEL_CALLS,
    };
    // Each format as its opening marker and what follows it (the rule `rest`).
    let (open, rest) = match format {
        ToolFormat::Hermes | ToolFormat::Generic => {
            // Qwen's template puts the object on its own line; ours does not.
            let nl = if format == ToolFormat::Hermes {
                "\"\\n\" "
            } else {
                ""
            };
            let more = if parallel {
                format!(
                    " {}",
                    more_calls(&format!("\"\\n\" {} body", m("<tool_call>")), most)
                )
            } else {
                String::new()
            };
            let rules = format!(
                "rest: body{more}\nbody: {nl}one {nl}{}\n{one_call}",
                m("</tool_call>")
            );
            ("<tool_call>", rules)
        }
        ToolFormat::Llama3Json => {
            let more = if parallel {
                format!(" {}", more_calls("\"; \" one", most))
            } else {
                String::new()
            };
            ("<|python_tag|>", format!("rest: one{more}\n{one_call}"))
        }
        ToolFormat::Mistral => {
            let more = if parallel {
                format!(" {}", more_calls("\", \" one", most))
            } else {
                String::new()
            };
            ("[TOOL_CALLS]", format!("rest: \"[\" one{more} \"]\"\n{one_call}"))
        }
        ToolFormat::DeepSeekV3 => {
            let calls: Vec<String> = functions
                .iter()
                .map(|f| {
                    let schema = arguments_json(f);
                    format!(
                        "{} \"function\" {} {} \"\\n```json\\n\" {} \"\\n```\" {}",
                        m("<｜tool▁call▁begin｜>"),
                        m("<｜tool▁sep｜>"),
                        serde_json::to_string(&f.name).unwrap(),
                        schema,
                        m("<｜tool▁call▁end｜>")
                    )
                })
                .collect();
            let repeat = if parallel {
                format!(" {}", more_calls("call", most))
            } else {
                String::new()
            };
            let rules = format!(
                "rest: call{repeat} {}\ncall: {}\n",
                m("<｜tool▁calls▁end｜>"),
                calls.join("\n    | ")
            );
            ("<｜tool▁calls▁begin｜>", rules)
        }
    };
    let open_token = codec.tokenizer().token_to_id(open).is_some();
    let start = match (mode, format) {
        // Llama 3 answers a required call with bare JSON.
        (CallMode::Required, ToolFormat::Llama3Json) => "start: rest\n".to_string(),
        (CallMode::Required, _) => format!("start: {} rest\n", m(open)),
        (CallMode::Auto, _) if open_token => {
            format!("start: FREE | FREE? {} rest\nFREE: /(.|\\n)+/\n", m(open))
        }
        (CallMode::Auto, _) => format!(
            "start: FREE | text rest\nFREE: /(.|\\n)*/\ntext[suffix={}]: /(.|\\n)*/\n",
            serde_json::to_string(open).unwrap()
        ),
    };
    ConstraintSpec::Lark(format!("{start}{rest}"))
}

#[cfg(test)]
mod tests;
