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
    pub fn from_files(
        files: &ModelFiles,
        config_bos: Option<u32>,
        config_eos: &[u32],
    ) -> Result<Self> {
        let tokenizer =
            tokenizers::Tokenizer::from_file(&files.tokenizer).map_err(|e| Error::Tokenizer {
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
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer {
                path: "tokenizer.json".into(),
                message: e.to_string(),
            })
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
