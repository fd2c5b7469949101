//! Text <-> token ids: a `tokenizers::Tokenizer` plus the special tokens and chat template
//! that the checkpoint's side files declare.

use std::path::Path;

use serde_json::Value;

use crate::config::token_ids;
use crate::error::{Error, Result};
use crate::source::ModelFiles;

pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    chat_template: Option<String>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// `"bos_token": "<s>"` or `"bos_token": {"content": "<s>", ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

impl TextCodec {
    pub fn new(
        tokenizer: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Vec<u32>,
        chat_template: Option<String>,
    ) -> Self {
        Self {
            tokenizer,
            bos_token_id: bos,
            eos_token_ids: eos,
            chat_template,
        }
    }

    /// `tokenizer.json`, with BOS/EOS and the chat template from `tokenizer_config.json`;
    /// EOS ids from `generation_config.json` (all of them) take precedence, then
    /// `config_eos` (from `config.json`).
    pub fn from_files(files: &ModelFiles, config_bos: Option<u32>, config_eos: &[u32]) -> Result<Self> {
        let tokenizer = tokenizers::Tokenizer::from_file(&files.tokenizer).map_err(|e| Error::Tokenizer {
            path: files.tokenizer.clone(),
            message: e.to_string(),
        })?;
        let tc = match &files.tokenizer_config {
            Some(p) => read_json(p)?,
            None => Value::Null,
        };
        let id_of = |v: Option<&Value>| token_text(v).and_then(|t| tokenizer.token_to_id(&t));
        let mut eos = match &files.generation_config {
            Some(p) => token_ids(&read_json(p)?.get("eos_token_id").cloned()),
            None => vec![],
        };
        if eos.is_empty() {
            eos = config_eos.to_vec();
        }
        if let Some(id) = id_of(tc.get("eos_token")) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let bos = id_of(tc.get("bos_token")).or(config_bos);
        let chat_template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: use "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            _ => None,
        };
        Ok(Self::new(tokenizer, bos, eos, chat_template))
    }

    /// A stand-in for models without a tokenizer (random benchmark models): token `i`
    /// is the word `t{i}`.
    pub fn byte_fallback(vocab_size: usize) -> Self {
        let vocab: serde_json::Map<String, Value> = (0..vocab_size)
            .map(|i| (format!("t{i}"), Value::from(i)))
            .collect();
        let doc = serde_json::json!({"version": "1.0", "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}});
        let tokenizer: tokenizers::Tokenizer = doc.to_string().parse().expect("valid word-level tokenizer");
        Self::new(tokenizer, None, vec![], None)
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Encodes with the tokenizer's own special-token handling (its post-processor adds
    /// BOS where the model wants it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Encodes with or without the special tokens the tokenizer's post-processor adds
    /// (vLLM's `add_special_tokens`).
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer {
                path: "tokenizer.json".into(),
                message: e.to_string(),
            })
    }

    /// The bytes token `id` stands for, which may be part of a UTF-8 character (a
    /// logprob's `bytes`; decoding the token alone would turn such a part into U+FFFD).
    /// Byte-level BPE tokens map back through GPT-2's byte alphabet, SentencePiece
    /// `<0xHH>` byte-fallback tokens are their byte, added tokens and the rest are their
    /// decoded text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let decoded = || self.decode(&[id], false).unwrap_or_default().into_bytes();
        if self
            .tokenizer
            .get_added_vocabulary()
            .simple_id_to_token(id)
            .is_some()
        {
            return decoded();
        }
        let Some(piece) = self.tokenizer.id_to_token(id) else {
            return Vec::new();
        };
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
            if let (2, Ok(b)) = (hex.len(), u8::from_str_radix(hex, 16)) {
                return vec![b];
            }
        }
        let byte_level = matches!(
            self.tokenizer.get_decoder(),
            Some(tokenizers::decoders::DecoderWrapper::ByteLevel(_))
        );
        if byte_level {
            if let Some(bytes) = piece.chars().map(byte_level_byte).collect::<Option<Vec<u8>>>() {
                return bytes;
            }
        }
        decoded()
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer {
                path: "tokenizer.json".into(),
                message: e.to_string(),
            })
    }
}

/// GPT-2's byte-level alphabet read backwards: printable bytes stand for themselves, the
/// other 68 (controls, space, 0x7F-0xA0, 0xAD) for U+0100 onwards, in byte order.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let c = c as u32;
    if c < 256 {
        return printable(c).then_some(c as u8);
    }
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth((c - 256) as usize)
        .map(|b| b as u8)
}

/// Building a `tokenizers::Tokenizer` from GGUF metadata, so a GGUF file alone is enough
/// to serve. The tokenizer is assembled as the `tokenizer.json` document Hugging Face
/// would ship for the model and parsed by the `tokenizers` crate.
mod from_gguf {
    use std::collections::HashMap;

    use candle_core::quantized::gguf_file::Value as GgufValue;
    use serde_json::{json, Value};

    use crate::gguf::meta_str;

    /// llama.cpp token types.
    const NORMAL: i32 = 1;
    const CONTROL: i32 = 3;
    const USER_DEFINED: i32 = 4;
    const BYTE: i32 = 6;

    pub(super) fn strings(md: &HashMap<String, GgufValue>, key: &str) -> Result<Vec<String>, String> {
        let v = md.get(key).ok_or_else(|| format!("missing {key}"))?;
        v.to_vec()
            .map_err(|e| format!("{key}: {e}"))?
            .iter()
            .map(|x| x.to_string().cloned().map_err(|e| format!("{key}: {e}")))
            .collect()
    }

    fn ints(md: &HashMap<String, GgufValue>, key: &str) -> Vec<i32> {
        md.get(key)
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(NORMAL)).collect())
            .unwrap_or_default()
    }

    fn floats(md: &HashMap<String, GgufValue>, key: &str) -> Vec<f32> {
        md.get(key)
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|x| x.to_f32().unwrap_or(0.0)).collect())
            .unwrap_or_default()
    }

    fn flag(md: &HashMap<String, GgufValue>, key: &str) -> Option<bool> {
        md.get(key).and_then(|v| v.to_bool().ok())
    }

    fn byte_level(use_regex: bool) -> Value {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
    }

    fn split(pattern: &str) -> Value {
        json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
    }

    /// The pre-tokenizer of a byte-level BPE vocabulary, by llama.cpp's `tokenizer.ggml.pre`
    /// name, and whether merges are skipped for whole-word vocabulary hits (Llama 3).
    fn bpe_pre_tokenizer(pre: &str) -> (Value, bool) {
        const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        match pre {
            // StarCoder-style: every digit alone, then GPT-2's split.
            "smollm" | "starcoder" | "refact" => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                false,
            ),
            "llama3" | "llama-bpe" | "llama-v3" => (
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]}),
                true,
            ),
            "qwen2" | "deepseek-r1-qwen" => (
                json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}),
                false,
            ),
            // GPT-2's own regex ("gpt2", "default", "olmo", ...).
            _ => (byte_level(true), false),
        }
    }

    /// SentencePiece BPE stores scores, not merges: a pair merges when the joined piece is
    /// in the vocabulary, higher-scored pieces first. Those merges, in that order, make a
    /// BPE model that tokenizes the same way.
    fn spm_merges(tokens: &[String], scores: &[f32], types: &[i32]) -> Vec<(String, String)> {
        let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        let mut merges = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            if types.get(i).copied().unwrap_or(NORMAL) != NORMAL {
                continue;
            }
            for (split, _) in t.char_indices().skip(1) {
                let (l, r) = t.split_at(split);
                if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                    merges.push((scores.get(i).copied().unwrap_or(0.0), i, li, ri));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        merges
            .into_iter()
            .map(|(_, _, l, r)| (tokens[l].clone(), tokens[r].clone()))
            .collect()
    }

    /// The `tokenizer.json` document for the GGUF tokenizer metadata.
    pub(super) fn tokenizer_json(md: &HashMap<String, GgufValue>) -> Result<Value, String> {
        let model = meta_str(md, "tokenizer.ggml.model").ok_or("missing tokenizer.ggml.model")?;
        let tokens = strings(md, "tokenizer.ggml.tokens")?;
        let types = ints(md, "tokenizer.ggml.token_type");
        let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let added: Vec<Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(&CONTROL) | Some(&USER_DEFINED)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": types[i] == CONTROL})
            })
            .collect();
        let bos = id("tokenizer.ggml.bos_token_id");
        let (model_json, normalizer, pre_tokenizer, decoder, default_add_bos) = match model {
            "gpt2" => {
                let merges = strings(md, "tokenizer.ggml.merges")?;
                let pre = meta_str(md, "tokenizer.ggml.pre").unwrap_or("default");
                let (pre_tokenizer, ignore_merges) = bpe_pre_tokenizer(pre);
                (
                    json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                           "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                           "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}),
                    Value::Null,
                    pre_tokenizer,
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                    false,
                )
            }
            "llama" => {
                let scores = floats(md, "tokenizer.ggml.scores");
                let merges: Vec<Value> = spm_merges(&tokens, &scores, &types)
                    .into_iter()
                    .map(|(l, r)| json!([l, r]))
                    .collect();
                let unk = id("tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i as usize).cloned());
                let add_space = flag(md, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let mut norm =
                    vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
                if add_space {
                    norm.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
                }
                let mut dec = vec![
                    json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if add_space {
                    dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                let has_bytes = types.contains(&BYTE);
                (
                    json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                           "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": has_bytes,
                           "ignore_merges": false, "vocab": vocab, "merges": merges}),
                    json!({"type": "Sequence", "normalizers": norm}),
                    Value::Null,
                    json!({"type": "Sequence", "decoders": dec}),
                    true,
                )
            }
            other => {
                return Err(format!(
                    "tokenizer.ggml.model {other:?} is not supported (gpt2, llama)"
                ))
            }
        };
        let add_bos = flag(md, "tokenizer.ggml.add_bos_token").unwrap_or(default_add_bos);
        let post_processor = match (add_bos, bos) {
            (true, Some(b)) => {
                let bos_text = tokens
                    .get(b as usize)
                    .cloned()
                    .ok_or("bos_token_id is outside the vocabulary")?;
                json!({"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                {"Sequence": {"id": "B", "type_id": 1}}],
                       "special_tokens": {bos_text.clone(): {"id": bos_text, "ids": [b], "tokens": [bos_text]}}})
            }
            _ => Value::Null,
        };
        Ok(
            json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                  "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
                  "decoder": decoder, "model": model_json}),
        )
    }
}

impl TextCodec {
    /// The tokenizer, special tokens and chat template stored in a GGUF file's metadata.
    pub fn from_gguf(
        md: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
        path: &Path,
    ) -> Result<Self> {
        let err = |message: String| Error::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let doc = from_gguf::tokenizer_json(md).map_err(err)?;
        let tokenizer: tokenizers::Tokenizer = doc
            .to_string()
            .parse()
            .map_err(|e: tokenizers::Error| err(e.to_string()))?;
        let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        let mut eos: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        if let Some(eot) = id("tokenizer.ggml.eot_token_id") {
            if !eos.contains(&eot) {
                eos.push(eot);
            }
        }
        let template = crate::gguf::meta_str(md, "tokenizer.chat_template").map(String::from);
        Ok(Self::new(
            tokenizer,
            id("tokenizer.ggml.bos_token_id"),
            eos,
            template,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(source: &str) -> TextCodec {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
        crate::load(dir.join(source).to_str().unwrap(), &crate::LoadOptions::default())
            .expect("fixture")
            .codec
    }

    /// Tokens that split a UTF-8 character give their own bytes (alone they decode to
    /// U+FFFD), and every token's bytes add up to the text, for byte-level BPE (from
    /// tokenizer.json and rebuilt from GGUF metadata).
    #[test]
    fn token_bytes_add_up_to_the_text() {
        for source in ["llama", "mixtral-f16.gguf"] {
            let c = codec(source);
            let text = "naïve €5 — 日本";
            let ids = c.encode(text).unwrap();
            let bytes: Vec<u8> = ids.iter().flat_map(|&id| c.token_bytes(id)).collect();
            assert_eq!(String::from_utf8(bytes).unwrap(), text, "{source}");
            let split = ids
                .iter()
                .filter(|&&id| std::str::from_utf8(&c.token_bytes(id)).is_err())
                .count();
            assert!(
                split > 0,
                "{source}: the fixture vocabulary splits some character"
            );
        }
    }

    #[test]
    fn byte_level_alphabet_round_trips() {
        for b in 0..=255u8 {
            let c = if (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174 {
                char::from(b)
            } else {
                let n = (0..b)
                    .filter(|&x| !((33..=126).contains(&x) || (161..=172).contains(&x) || x >= 174))
                    .count();
                char::from_u32(256 + n as u32).unwrap()
            };
            assert_eq!(byte_level_byte(c), Some(b));
        }
        assert_eq!(byte_level_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_byte('\u{4000}'), None);
    }
}
