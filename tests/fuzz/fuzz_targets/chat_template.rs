//! Hostile messages through the fixtures' chat templates (ChatML with tools, Llama 3,
//! Mistral, DeepSeek): an error or text, never a panic or a hang.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use moeserve_core::chat::ChatTemplate;

fn templates() -> &'static [ChatTemplate] {
    static T: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    T.get_or_init(|| {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures");
        ["qwen3_moe", "llama", "mixtral", "deepseek_v3"]
            .iter()
            .filter_map(|m| std::fs::read_to_string(format!("{root}/models/{m}/tokenizer_config.json")).ok())
            .filter_map(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .filter_map(|v| ChatTemplate::new(v["chat_template"].as_str()?, None, None).ok())
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    // JSON messages when the input is JSON, else the input as one user message.
    let messages = match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(v @ serde_json::Value::Array(_)) => v,
        Ok(v) => serde_json::json!([{"role": "user", "content": v}]),
        Err(_) => serde_json::json!([
            {"role": "system", "content": String::from_utf8_lossy(data)},
            {"role": "user", "content": String::from_utf8_lossy(data)},
        ]),
    };
    let tools =
        serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": messages.clone()}}]);
    for t in templates() {
        let _ = t.render(&messages, true, None, None);
        let _ = t.render(&messages, true, Some(&tools), None);
    }
});
