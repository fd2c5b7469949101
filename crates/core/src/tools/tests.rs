//! Tool-call parsing on outputs written down from each family's published chat template
//! and examples, fed whole and split at every position; detection; the required-call
//! grammars of every format, walked token by token.

use serde_json::json;

use super::*;
use crate::grammar::GrammarCompiler;
use crate::reasoning::{ReasoningSplitter, ReasoningTags};

/// Feeds `text` in two pieces split at `at` (a char boundary), then finishes.
fn parse_split(format: ToolFormat, text: &str, at: usize) -> Vec<ToolEvent> {
    let mut p = ToolCallParser::new(format);
    let mut events = p.push(&text[..at]);
    events.extend(p.push(&text[at..]));
    events.extend(p.finish());
    events
}

/// Feeds `text` one character at a time.
fn parse_chars(format: ToolFormat, text: &str) -> Vec<ToolEvent> {
    let mut p = ToolCallParser::new(format);
    let mut events = Vec::new();
    for c in text.chars() {
        events.extend(p.push(c.encode_utf8(&mut [0; 4])));
    }
    events.extend(p.finish());
    events
}

/// The content and calls of `text`, checked to be the same whatever the chunk
/// boundaries: every split point and one character at a time.
fn parse(format: ToolFormat, text: &str) -> (String, Vec<ToolCall>) {
    let whole = collect(&parse_split(format, text, text.len()));
    for at in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
        assert_eq!(
            collect(&parse_split(format, text, at)),
            whole,
            "split at {at} of {text:?}"
        );
    }
    assert_eq!(
        collect(&parse_chars(format, text)),
        whole,
        "char by char: {text:?}"
    );
    whole
}

fn call(name: &str, arguments: &str) -> ToolCall {
    ToolCall {
        name: name.into(),
        arguments: arguments.into(),
    }
}

#[test]
fn hermes_and_qwen_calls() {
    // Qwen2.5 / Qwen3 (and Hermes 2 Pro): one object per <tool_call> block.
    let text = "<tool_call>\n{\"name\": \"get_current_temperature\", \"arguments\": {\"location\": \"San Francisco, CA, USA\", \"unit\": \"celsius\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_temperature_date\", \"arguments\": {\"location\": \"San Francisco, CA, USA\", \"date\": \"2024-10-01\", \"unit\": \"celsius\"}}\n</tool_call>";
    let (content, calls) = parse(ToolFormat::Hermes, text);
    assert_eq!(content, "");
    assert_eq!(
        calls,
        [
            call(
                "get_current_temperature",
                r#"{"location": "San Francisco, CA, USA", "unit": "celsius"}"#
            ),
            call(
                "get_temperature_date",
                r#"{"location": "San Francisco, CA, USA", "date": "2024-10-01", "unit": "celsius"}"#
            ),
        ]
    );
    // Text before a call is content; braces and escaped quotes inside strings are
    // arguments' bytes, passed through as written (key order, spacing).
    let text = "Let me check.\n\n<tool_call>\n{\"arguments\":{\"q\":\"a \\\"}\\\" {b}\",\"n\":[1,{\"x\":2}]},\"name\":\"search\"}\n</tool_call>";
    let (content, calls) = parse(ToolFormat::Hermes, text);
    assert_eq!(content, "Let me check.");
    assert_eq!(calls, [call("search", r#"{"q":"a \"}\" {b}","n":[1,{"x":2}]}"#)]);
    // No call: all content, trailing whitespace kept; an almost-marker is content.
    let (content, calls) = parse(ToolFormat::Hermes, "The <tool> is fine.\n");
    assert_eq!((content.as_str(), calls.len()), ("The <tool> is fine.\n", 0));
    // A block without a name is not a call.
    let (content, calls) = parse(ToolFormat::Hermes, "<tool_call>{\"x\": 1}</tool_call>");
    assert_eq!((content.as_str(), calls.len()), ("{\"x\": 1}", 0));
    // Arguments as a JSON string are passed on as that string's text.
    let (_, calls) = parse(
        ToolFormat::Generic,
        "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call>",
    );
    assert_eq!(calls, [call("f", r#"{"a": 1}"#)]);
    // Cut off by max_tokens: the call so far.
    let (_, calls) = parse(
        ToolFormat::Hermes,
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"city\": \"Par",
    );
    assert_eq!(calls, [call("f", r#"{"city": "Par"#)]);
}

#[test]
fn llama3_calls() {
    // Llama 3.1/3.2 JSON tool calling: a bare object with "parameters".
    let text = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\", \"days\": 3}}";
    let (content, calls) = parse(ToolFormat::Llama3Json, text);
    assert_eq!(content, "");
    assert_eq!(calls, [call("get_weather", r#"{"city": "Paris", "days": 3}"#)]);
    // <|python_tag|> and several calls separated by `;`.
    let text = "<|python_tag|>{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"x\": [1, 2]}}";
    let (content, calls) = parse(ToolFormat::Llama3Json, text);
    assert_eq!(content, "");
    assert_eq!(calls, [call("a", "{}"), call("b", r#"{"x": [1, 2]}"#)]);
    // A JSON answer that is not a call, and plain text, are content.
    let (content, calls) = parse(ToolFormat::Llama3Json, "{\"answer\": 42}");
    assert_eq!((content.as_str(), calls.len()), ("{\"answer\": 42}", 0));
    // The tag alone (cut by max_tokens), or before something that is not JSON.
    let (content, calls) = parse(ToolFormat::Llama3Json, "<|python_tag|>");
    assert_eq!((content.as_str(), calls.len()), ("", 0));
    let (content, _) = parse(ToolFormat::Llama3Json, "<|python_tag|>search(q)");
    assert_eq!(content, "search(q)");
    let (content, calls) = parse(ToolFormat::Llama3Json, "  Paris is sunny.");
    assert_eq!((content.as_str(), calls.len()), ("  Paris is sunny.", 0));
}

#[test]
fn mistral_calls() {
    // v3 (Mistral 7B v0.3, Mixtral 8x22B): a JSON array after [TOOL_CALLS].
    let text = "[TOOL_CALLS] [{\"name\": \"get_current_weather\", \"arguments\": {\"location\": \"Paris, France\", \"format\": \"celsius\"}}, {\"name\": \"now\", \"arguments\": {}}]";
    let (content, calls) = parse(ToolFormat::Mistral, text);
    assert_eq!(content, "");
    assert_eq!(
        calls,
        [
            call(
                "get_current_weather",
                r#"{"location": "Paris, France", "format": "celsius"}"#
            ),
            call("now", "{}")
        ]
    );
    // v11 (Mistral Small 3.1+): name[ARGS]{..}, one [TOOL_CALLS] per call.
    let text = "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Lyon\"}[TOOL_CALLS]now[ARGS]{}";
    let (_, calls) = parse(ToolFormat::Mistral, text);
    assert_eq!(
        calls,
        [call("get_weather", r#"{"city": "Lyon"}"#), call("now", "{}")]
    );
}

#[test]
fn deepseek_calls() {
    // DeepSeek-V3 / R1's template.
    let text = "I'll look it up.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"location\": \"Tokyo\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{\"tz\": \"JST\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let (content, calls) = parse(ToolFormat::DeepSeekV3, text);
    assert_eq!(content, "I'll look it up.");
    assert_eq!(
        calls,
        [
            call("get_weather", r#"{"location": "Tokyo"}"#),
            call("get_time", r#"{"tz": "JST"}"#)
        ]
    );
    // V3.1: name<｜tool▁sep｜>arguments.
    let text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"location\": \"Oslo\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let (_, calls) = parse(ToolFormat::DeepSeekV3, text);
    assert_eq!(calls, [call("get_weather", r#"{"location": "Oslo"}"#)]);
}

/// Streamed events: a call's name first, then its arguments in pieces that add up.
#[test]
fn streamed_calls_start_with_the_name() {
    let text = "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": [1, 2], \"b\": \"x\"}}</tool_call>";
    let events = parse_chars(ToolFormat::Generic, text);
    assert_eq!(
        events[0],
        ToolEvent::CallStart {
            index: 0,
            name: "f".into()
        }
    );
    assert!(events.len() > 3, "arguments streamed in pieces: {events:?}");
    assert!(events[1..]
        .iter()
        .all(|e| matches!(e, ToolEvent::Arguments { index: 0, .. })));
}

/// A reasoning model's thought is split off first; the answer's calls are parsed.
#[test]
fn reasoning_then_calls() {
    let tags = ReasoningTags {
        start_token: 0,
        end_token: 1,
        start: "<think>".into(),
        end: "</think>".into(),
    };
    let text = "<think>\nThe user wants the weather; I should call get_weather.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>";
    for at in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
        let mut splitter = ReasoningSplitter::new(tags.clone(), false);
        let mut parser = ToolCallParser::new(ToolFormat::Hermes);
        let (mut reasoning, mut events) = (String::new(), Vec::new());
        for piece in [&text[..at], &text[at..]] {
            let d = splitter.push(piece);
            reasoning.push_str(&d.reasoning);
            events.extend(parser.push(&d.content));
        }
        let d = splitter.finish();
        reasoning.push_str(&d.reasoning);
        events.extend(parser.push(&d.content));
        events.extend(parser.finish());
        assert_eq!(
            reasoning,
            "\nThe user wants the weather; I should call get_weather.\n"
        );
        let (content, calls) = collect(&events);
        assert_eq!(content, "");
        assert_eq!(calls, [call("get_weather", r#"{"city": "Rome"}"#)]);
    }
}

/// A fixture codec with the format's markers as special tokens and a template naming
/// them.
fn codec_with(markers: &[&str], template: &str) -> TextCodec {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama");
    let files = crate::source::resolve(dir.to_str().unwrap()).unwrap();
    let base = TextCodec::from_files(&files, None, &[2]).unwrap();
    let mut tok = base.tokenizer().clone();
    let added: Vec<tokenizers::AddedToken> = markers
        .iter()
        .map(|m| tokenizers::AddedToken::from(m.to_string(), true))
        .collect();
    tok.add_special_tokens(&added);
    TextCodec::new(tok, None, vec![2], Some(template.to_string()))
}

#[test]
fn formats_are_detected_from_vocabulary_and_template() {
    let cases = [
        (
            vec!["<tool_call>", "</tool_call>"],
            "{% if tools %}<tool_call>{% endif %}",
            ToolFormat::Hermes,
        ),
        (
            vec!["<|python_tag|>"],
            "{% if tools %}<|python_tag|>{% endif %}",
            ToolFormat::Llama3Json,
        ),
        (vec!["[TOOL_CALLS]"], "{{ '[TOOL_CALLS]' }}", ToolFormat::Mistral),
        (
            vec!["<｜tool▁calls▁begin｜>"],
            "<｜tool▁calls▁begin｜>",
            ToolFormat::DeepSeekV3,
        ),
        (vec![], "{{ messages }}", ToolFormat::Generic),
        // The marker in the vocabulary but not in the template: not the format.
        (vec!["[TOOL_CALLS]"], "{{ messages }}", ToolFormat::Generic),
    ];
    for (markers, template, want) in cases {
        assert_eq!(
            ToolFormat::detect(&codec_with(&markers, template)),
            want,
            "{markers:?}"
        );
    }
}

/// Every format's required-call grammar accepts a valid call, token by token (its
/// markers as their special tokens), and ends there; a call of an unknown function or
/// with invalid arguments is refused.
fn weather_functions() -> [FunctionSpec; 2] {
    [
        FunctionSpec {
            name: "get_weather".into(),
            description: Some("Weather now".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"},
                "unit": {"enum": ["c", "f"]}}, "required": ["city"], "additionalProperties": false}),
            custom: None,
        },
        FunctionSpec {
            name: "now".into(),
            description: None,
            parameters: json!({"type": "object", "properties": {}}),
            custom: None,
        },
    ]
}

/// DeepSeek-V3's tool-call tokens: calls begin, calls end, call begin, call end, separator.
const DEEPSEEK_MARKERS: [&str; 5] = [
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
];

/// Per format: its markers, a valid required call, and an invalid one.
fn call_cases() -> Vec<(ToolFormat, Vec<&'static str>, String, String)> {
    let ds = DEEPSEEK_MARKERS;
    let cases: Vec<(ToolFormat, Vec<&'static str>, String, String)> = vec![
        (
            ToolFormat::Hermes,
            vec!["<tool_call>", "</tool_call>"],
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\", \"unit\": \"c\"}}\n</tool_call>".into(),
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"town\": \"Rome\"}}\n</tool_call>".into(),
        ),
        (
            ToolFormat::Generic,
            vec![],
            "<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>".into(),
            "<tool_call>{\"name\": \"later\", \"arguments\": {}}</tool_call>".into(),
        ),
        (
            ToolFormat::Llama3Json,
            vec!["<|python_tag|>"],
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}".into(),
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}".into(),
        ),
        (
            ToolFormat::Mistral,
            vec!["[TOOL_CALLS]"],
            "[TOOL_CALLS][{\"name\": \"now\", \"arguments\": {}}]".into(),
            "[TOOL_CALLS][{\"name\": \"now\", \"arguments\": {}}, {\"name\": \"now\", \"arguments\": {}}]".into(),
        ),
        (
            ToolFormat::DeepSeekV3,
            ds.to_vec(),
            format!("{}{}function{}get_weather\n```json\n{{\"city\": \"Lima\"}}\n```{}{}", ds[0], ds[2], ds[4], ds[3], ds[1]),
            format!("{}{}function{}get_weather\n```json\n{{\"unit\": \"c\"}}\n```{}{}", ds[0], ds[2], ds[4], ds[3], ds[1]),
        ),
    ];
    cases
}

/// Walks `text`'s tokens through `spec`: `Err(i)` when token `i` is refused, else
/// whether the grammar may end there.
fn walk(
    codec: &TextCodec,
    compiler: &GrammarCompiler,
    spec: &ConstraintSpec,
    text: &str,
) -> Result<bool, usize> {
    let mut c = compiler.compile(spec).unwrap_or_else(|e| panic!("{e}\n{spec:?}"));
    let ids = codec.tokenizer().encode(text, false).unwrap().get_ids().to_vec();
    for (i, &t) in ids.iter().enumerate() {
        if !c.allows(t) {
            return Err(i);
        }
        c.consume(t).unwrap();
    }
    Ok(c.is_finished() || c.is_accepting())
}

/// Every format's required-call grammar accepts a valid call, token by token (its
/// markers as their special tokens), and ends there; a call of an unknown function or
/// with invalid arguments is refused.
#[test]
fn required_call_grammars_accept_exactly_valid_calls() {
    let functions = weather_functions();
    for (format, markers, good, bad) in call_cases() {
        let codec = codec_with(&markers, "");
        let vocab = codec.tokenizer().get_vocab_size(true);
        let compiler = GrammarCompiler::new(&codec, vocab).unwrap();
        let spec = call_grammar(&codec, format, &functions, false, CallMode::Required);
        let walk = |text: &str| walk(&codec, &compiler, &spec, text);
        assert_eq!(walk(&good), Ok(true), "{format:?}: {good:?}");
        assert!(!matches!(walk(&bad), Ok(true)), "{format:?} accepted {bad:?}");
        // And what it accepts parses back into the call.
        let (_, calls) = parse(format, &good);
        assert_eq!(calls.len(), 1, "{format:?}");
        assert!(serde_json::from_str::<serde_json::Value>(&calls[0].arguments).is_ok());
    }
}

/// With parallel calls, a forced answer (required) takes one call per offered function
/// at most and an open one (auto) `MAX_PARALLEL_CALLS`, then ends the turn: a model that
/// writes the same call again and again (a small one given a forced call does) stops
/// there instead of at its token limit.
#[test]
fn parallel_call_grammars_end_after_the_most_calls() {
    let functions = weather_functions();
    for (format, markers, good, _) in call_cases() {
        let separator = match format {
            ToolFormat::Hermes | ToolFormat::Generic => "\n",
            ToolFormat::Llama3Json => "; ",
            _ => continue,
        };
        let codec = codec_with(&markers, "");
        let vocab = codec.tokenizer().get_vocab_size(true);
        let compiler = GrammarCompiler::new(&codec, vocab).unwrap();
        let calls = |n: usize| vec![good.as_str(); n].join(separator);
        let mut modes = vec![(CallMode::Required, functions.len())];
        // Free text cannot hold a call only where the marker is a special token.
        if format == ToolFormat::Hermes {
            modes.push((CallMode::Auto, MAX_PARALLEL_CALLS));
        }
        for (mode, most) in modes {
            let spec = call_grammar(&codec, format, &functions, true, mode);
            for n in 1..=most {
                assert_eq!(
                    walk(&codec, &compiler, &spec, &calls(n)),
                    Ok(true),
                    "{format:?} {mode:?}: {n} calls"
                );
            }
            let (_, parsed) = parse(format, &calls(most));
            assert_eq!(parsed.len(), most, "{format:?}");
            assert!(
                walk(&codec, &compiler, &spec, &calls(most + 1)).is_err(),
                "{format:?} {mode:?} took a call past {most}"
            );
        }
    }
}

/// Parameters that refer to their own `$defs` (as pydantic writes them) compile in every
/// format, and a call using them is accepted.
#[test]
fn parameters_with_defs_compile_in_every_format() {
    let functions = [FunctionSpec {
        name: "add_person".into(),
        description: None,
        parameters: json!({"type": "object", "properties": {"p": {"$ref": "#/$defs/Person"}},
            "required": ["p"], "additionalProperties": false,
            "$defs": {"Person": {"type": "object", "properties": {"age": {"type": "integer"}},
                "required": ["age"], "additionalProperties": false}}}),
        custom: None,
    }];
    for (format, markers, _, _) in call_cases() {
        let codec = codec_with(&markers, "");
        let compiler = GrammarCompiler::new(&codec, codec.tokenizer().get_vocab_size(true)).unwrap();
        for mode in [CallMode::Required, CallMode::Auto] {
            let spec = call_grammar(&codec, format, &functions, true, mode);
            compiler
                .compile(&spec)
                .unwrap_or_else(|e| panic!("{format:?} {mode:?}: {e}"));
        }
    }
    let codec = codec_with(&[], "");
    let compiler = GrammarCompiler::new(&codec, codec.tokenizer().get_vocab_size(true)).unwrap();
    let spec = call_grammar(&codec, ToolFormat::Generic, &functions, false, CallMode::Required);
    let call = "<tool_call>{\"name\": \"add_person\", \"arguments\": {\"p\": {\"age\": 7}}}</tool_call>";
    assert_eq!(walk(&codec, &compiler, &spec, call), Ok(true));
    let bad = "<tool_call>{\"name\": \"add_person\", \"arguments\": {\"p\": {\"age\": \"x\"}}}</tool_call>";
    assert!(!matches!(walk(&codec, &compiler, &spec, bad), Ok(true)));
}

/// `auto`: free text alone is fine, and so is text then a valid call (after the
/// format's opening marker); once a call is open, an invalid one is refused.
#[test]
fn auto_call_grammars_constrain_only_opened_calls() {
    let functions = weather_functions();
    for (format, markers, good, bad) in call_cases() {
        let codec = codec_with(&markers, "");
        let vocab = codec.tokenizer().get_vocab_size(true);
        let compiler = GrammarCompiler::new(&codec, vocab).unwrap();
        let spec = call_grammar(&codec, format, &functions, false, CallMode::Auto);
        let walk = |text: &str| walk(&codec, &compiler, &spec, text);
        assert_eq!(
            walk("It is sunny in Rome, 21 C.\nAnything else?"),
            Ok(true),
            "{format:?}"
        );
        // Llama 3's required form is bare JSON; its auto form opens with the tag.
        let (good, bad) = match format {
            ToolFormat::Llama3Json => (format!("<|python_tag|>{good}"), format!("<|python_tag|>{bad}")),
            _ => (good, bad),
        };
        assert_eq!(
            walk(&format!("Let me look.{good}")),
            Ok(true),
            "{format:?}: {good:?}"
        );
        assert!(
            !matches!(walk(&format!("Let me look.{bad}")), Ok(true)),
            "{format:?} accepted {bad:?}"
        );
    }
}

#[test]
fn generic_conversations_carry_calls_and_results_as_text() {
    let functions = [FunctionSpec {
        name: "add".into(),
        description: Some("Adds".into()),
        parameters: json!({"type": "object", "properties": {"a": {"type": "number"}}}),
        custom: None,
    }];
    let mut messages = vec![
        json!({"role": "user", "content": "1+2?"}),
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": "{\"a\": 1}"}}]}),
        json!({"role": "tool", "tool_call_id": "call_1", "content": "3"}),
    ];
    prepare_messages(ToolFormat::Generic, &mut messages, &functions);
    let system = messages.remove(0);
    assert_eq!(system["role"], "system");
    assert_eq!(
        messages[1],
        json!({"role": "assistant", "content": "<tool_call>{\"name\":\"add\",\"arguments\":{\"a\":1}}</tool_call>"})
    );
    assert_eq!(
        messages[2],
        json!({"role": "user", "content": "<tool_response>\n3\n</tool_response>"})
    );
    assert!(system["content"].as_str().unwrap().contains("\"name\":\"add\""));
    // A template with its own format gets the arguments as a mapping.
    let mut messages = vec![
        json!({"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{\"a\": 1}"}}]}),
    ];
    prepare_messages(ToolFormat::Hermes, &mut messages, &functions);
    assert_eq!(
        messages[0]["tool_calls"][0]["function"]["arguments"],
        json!({"a": 1})
    );
}

/// A custom tool's grammar as Codex CLI sent it (its recorded requests, committed as
/// fixtures): `apply_patch` (Lark, by `codex exec -m gpt-5.5`) and code mode's `exec`.
fn codex_custom_grammar(fixture: &str, name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/agents")
        .join(fixture);
    let recorded: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    fn find(tools: &serde_json::Value, name: &str) -> Option<String> {
        tools.as_array()?.iter().find_map(|t| {
            if t["type"] == "namespace" {
                return find(&t["tools"], name);
            }
            (t["type"] == "custom" && t["name"] == name)
                .then(|| t["format"]["definition"].as_str().unwrap().to_string())
        })
    }
    let body = &recorded["body"];
    find(&body["tools"], name)
        .or_else(|| {
            body["input"]
                .as_array()?
                .iter()
                .find_map(|i| find(&i["tools"], name))
        })
        .unwrap_or_else(|| panic!("{name} not in {fixture}"))
}

/// One call of `name` with `input` in `format`, as the model writes it.
fn custom_call(format: ToolFormat, name: &str, input: &str) -> String {
    let args = format!("{{\"input\": {}}}", serde_json::to_string(input).unwrap());
    let ds = DEEPSEEK_MARKERS;
    match format {
        ToolFormat::Hermes => {
            format!("<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {args}}}\n</tool_call>")
        }
        ToolFormat::Generic => {
            format!("<tool_call>{{\"name\": \"{name}\", \"arguments\": {args}}}</tool_call>")
        }
        ToolFormat::Llama3Json => format!("{{\"name\": \"{name}\", \"parameters\": {args}}}"),
        ToolFormat::Mistral => format!("[TOOL_CALLS][{{\"name\": \"{name}\", \"arguments\": {args}}}]"),
        ToolFormat::DeepSeekV3 => format!(
            "{}{}function{}{name}\n```json\n{args}\n```{}{}",
            ds[0], ds[2], ds[4], ds[3], ds[1]
        ),
    }
}

fn custom_function(name: &str, form: FreeForm) -> FunctionSpec {
    FunctionSpec {
        name: name.into(),
        description: Some("A custom tool.".into()),
        parameters: CustomInput::parameters(),
        custom: Some(CustomInput::new(form).unwrap()),
    }
}

/// A custom tool's input is constrained by its grammar inside the JSON string of its
/// call, in every format: Codex's `apply_patch` grammar accepts a patch (quotes,
/// backslashes and newlines escaped as JSON writes them) and refuses one without its
/// end; what it accepts parses back into the patch.
#[test]
fn custom_tool_inputs_follow_their_grammar_in_every_format() {
    let grammar = codex_custom_grammar("codex-exec-apply-patch-request.json", "apply_patch");
    let functions = [
        custom_function("apply_patch", FreeForm::Lark(grammar)),
        weather_functions()[0].clone(),
    ];
    let patch = "*** Begin Patch\n*** Add File: hello.txt\n+say \"hi\" \\ bye\n*** Update File: a.py\n@@ def f():\n-    return 1\n+    return 2\n*** End Patch\n";
    let no_end = "*** Begin Patch\n*** Add File: hello.txt\n+hi\n";
    for (format, markers, _, _) in call_cases() {
        let codec = codec_with(&markers, "");
        let compiler = GrammarCompiler::new(&codec, codec.tokenizer().get_vocab_size(true)).unwrap();
        let spec = call_grammar(&codec, format, &functions, false, CallMode::Required);
        let good = custom_call(format, "apply_patch", patch);
        assert_eq!(
            walk(&codec, &compiler, &spec, &good),
            Ok(true),
            "{format:?}: {good}"
        );
        let (_, calls) = parse(format, &good);
        let args: serde_json::Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert_eq!(args, json!({"input": patch}), "{format:?}");
        let bad = custom_call(format, "apply_patch", no_end);
        assert!(
            !matches!(walk(&codec, &compiler, &spec, &bad), Ok(true)),
            "{format:?} accepted a patch without its end"
        );
        // The raw patch (not escaped) is not a JSON string: refused.
        let raw = good.replace("\\n", "\n");
        assert!(
            !matches!(walk(&codec, &compiler, &spec, &raw), Ok(true)),
            "{format:?}"
        );
    }
}

/// Code mode's `exec` (a pragma line or any source, `[\s\S]+`), a regex tool and a
/// free-text one, in the generic format, with auto calls.
#[test]
fn custom_tool_grammars_of_every_form() {
    let exec = codex_custom_grammar("codex-exec-code-mode-request.json", "exec");
    let functions = [
        custom_function("exec", FreeForm::Lark(exec)),
        custom_function(
            "version",
            FreeForm::Regex(r#"v[0-9]+\.[0-9]+ "(beta|rc)"/x"#.into()),
        ),
        custom_function("note", FreeForm::Text),
    ];
    let codec = codec_with(&[], "");
    let compiler = GrammarCompiler::new(&codec, codec.tokenizer().get_vocab_size(true)).unwrap();
    let spec = call_grammar(&codec, ToolFormat::Generic, &functions, true, CallMode::Auto);
    let walk = |text: &str| walk(&codec, &compiler, &spec, text);
    let js = "// @exec: {\"timeout\": 5}\nconst r = await tools.exec_command({cmd: \"ls\\n\"});\ntext(r);";
    for (name, input) in [
        ("exec", js),
        ("version", "v1.2 \"rc\"/x"),
        ("note", "any\ttext \u{1}"),
    ] {
        let call = custom_call(ToolFormat::Generic, name, input);
        assert_eq!(walk(&format!("Sure.{call}")), Ok(true), "{call}");
        let (_, calls) = parse(ToolFormat::Generic, &call);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&calls[0].arguments).unwrap(),
            json!({"input": input})
        );
    }
    let wrong = custom_call(ToolFormat::Generic, "version", "v1 \"rc\"/x");
    assert!(!matches!(walk(&wrong), Ok(true)));
}

/// What a custom grammar cannot be escaped with is refused, naming why; common imports,
/// ranges and case-insensitive strings are escaped.
#[test]
fn custom_grammars_that_cannot_be_quoted_are_refused() {
    for (grammar, why) in [
        ("start: <|im_end|>", "special tokens"),
        ("start: %json {\"type\": \"integer\"}", "%json"),
        ("start: @sub", "grammar references"),
        ("%import python.NAME\nstart: NAME", "only imports from common"),
        ("start: /[/", "does not parse"),
    ] {
        let e = CustomInput::new(FreeForm::Lark(grammar.into())).unwrap_err();
        assert!(e.contains(why), "{grammar}: {e}");
    }
    // Ranges, case-insensitive strings and common imports (both spellings) escaped.
    let grammar =
        "start: \"a\"..\"c\" \"Hi\"i LF WS? \"q\\\"\" // a comment\n%import common.LF\n%import common (WS)";
    let q = custom::json_quoted_lark(grammar).unwrap();
    assert!(!q.contains("%import") && !q.contains("comment"), "{q}");
    let functions = [custom_function("f", FreeForm::Lark(grammar.into()))];
    let codec = codec_with(&[], "");
    let compiler = GrammarCompiler::new(&codec, codec.tokenizer().get_vocab_size(true)).unwrap();
    let spec = call_grammar(&codec, ToolFormat::Generic, &functions, false, CallMode::Required);
    for (input, ok) in [
        ("bhI\n \tq\"", true),
        ("bHi\nq\"", true),
        ("dHi\nq\"", false),
        ("bHiq\"", false),
    ] {
        let call = custom_call(ToolFormat::Generic, "f", input);
        assert_eq!(
            matches!(walk(&codec, &compiler, &spec, &call), Ok(true)),
            ok,
            "{input:?} in {q}"
        );
    }
}
