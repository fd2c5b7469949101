//! Structured outputs: constraints on what a sequence may generate (a JSON schema, any
//! JSON object, a regular expression, one of a list of strings, a Lark grammar),
//! compiled by llguidance against the model's own vocabulary.
//!
//! The token trie is built from our `tokenizers::Tokenizer` (serialised as the
//! `tokenizer.json` document it was read from, or assembled from GGUF metadata), so
//! byte-level BPE and SentencePiece byte-fallback vocabularies are read the same way and
//! llguidance's own tokenizers adapter (a second `tokenizers` version) is not needed.
//! Special tokens are marked as such in the trie, so no constraint ever allows one
//! unless its grammar names it; the end-of-sequence tokens are allowed exactly where the
//! grammar accepts.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::sampling::TokenMask;
use crate::tokenizer::TextCodec;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// A value valid against this JSON schema.
    JsonSchema(Value),
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A match of this regular expression (whole output).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A sentence of this Lark grammar (llguidance's dialect: `%json {..}` embeds a
    /// schema, `<[id]>` names a token).
    Lark(String),
}

/// Compact JSON with one space after `,` and `:` (what `json.dumps` writes), no free
/// whitespace: a small model allowed any whitespace can fill its whole `max_tokens` with
/// newlines inside a valid document.
fn json_options() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

impl ConstraintSpec {
    /// The llguidance grammar for this constraint.
    pub fn to_grammar(&self) -> TopLevelGrammar {
        match self {
            ConstraintSpec::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Value::Object(o) = &mut schema {
                    o.entry("x-guidance").or_insert_with(json_options);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            ConstraintSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(json!({"type": "object", "x-guidance": json_options()}))
            }
            ConstraintSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            ConstraintSpec::Choice(choices) => {
                let alternatives: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&alternatives.join("|"))
            }
            ConstraintSpec::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        }
    }
}

/// The model's vocabulary as llguidance sees it: the token trie, and our tokenizer for
/// the canonical tokenization of forced text.
struct VocabEnv {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Text that is not valid UTF-8 (a forced prefix ending inside a character) is
        // cut at the trie's longest matches.
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// Compiles constraints for one model. Built once per model (the trie and the token
/// slices take a few hundred milliseconds on a 150k vocabulary); compiling one
/// constraint then takes about a millisecond.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocab_size", &self.factory.tok_env().tok_trie().vocab_size())
            .finish()
    }
}

impl GrammarCompiler {
    /// The trie of `codec`'s vocabulary, padded to the model's `vocab_size` (logits rows
    /// wider than the tokenizer: the extra ids are never allowed).
    pub fn new(codec: &TextCodec, vocab_size: usize) -> Result<Self> {
        let err = |m: String| Error::Tokenizer {
            path: "tokenizer.json".into(),
            message: format!("building the structured-output vocabulary: {m}"),
        };
        let doc: Value = codec
            .tokenizer()
            .to_string(false)
            .map_err(|e| err(e.to_string()))
            .and_then(|s| serde_json::from_str(&s).map_err(|e| err(e.to_string())))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&doc).map_err(|e| err(e.to_string()))?;
        words.resize(vocab_size.max(words.len()), Vec::new());
        let eos = codec.eos_token_ids();
        let first_eos = eos.first().copied().unwrap_or(llguidance::toktrie::INVALID_TOKEN);
        let mut trie = TokTrie::from(&TokRxInfo::new(words.len() as u32, first_eos), &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(eos);
        }
        // Forced text that spells a special token (`"</s>"` inside a JSON string) is
        // text: encoded as ordinary tokens, never as the special one.
        let mut tokenizer = codec.tokenizer().clone();
        tokenizer.set_encode_special_tokens(true);
        let env: TokEnv = Arc::new(VocabEnv { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| err(e.to_string()))?;
        // Errors are returned, not printed.
        factory.quiet();
        Ok(Self { factory })
    }

    /// A constraint ready to use, or what is wrong with it (an invalid schema, a schema
    /// feature llguidance does not support, a grammar that does not compile).
    pub fn compile(&self, spec: &ConstraintSpec) -> std::result::Result<Constraint, String> {
        let parser = self
            .factory
            .create_parser(spec.to_grammar())
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constraint { matcher })
    }
}

/// One sequence's constraint: where it stands in its grammar. Cloning gives an
/// independent copy (each choice of an `n > 1` request starts from its own).
pub struct Constraint {
    matcher: Matcher,
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl PartialEq for Constraint {
    /// Constraints are compared by identity only (for `SamplingParams`' equality).
    fn eq(&self, _: &Self) -> bool {
        false
    }
}

impl Constraint {
    /// The tokens allowed next (EOS among them when the grammar can end here).
    pub fn mask(&mut self) -> std::result::Result<TokenMask, String> {
        let vob = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        Ok(TokenMask::from_words32(vob.as_slice(), vob.len()))
    }

    /// Whether `token` may come next (cheaper than a mask: one walk of the grammar).
    pub fn allows(&mut self, token: u32) -> bool {
        self.matcher.validate_tokens(&[token]).is_ok_and(|n| n == 1)
    }

    /// Advances past `token`.
    pub fn consume(&mut self, token: u32) -> std::result::Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// Tokens the grammar forces next (the rest of a fixed key, a closing bracket), to
    /// be appended without choosing; they still need to be consumed.
    pub fn forced_tokens(&mut self) -> Vec<u32> {
        self.matcher.compute_ff_tokens()
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }

    /// The grammar could end here.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
        dir.join(name).to_str().unwrap().to_string()
    }

    fn codec() -> TextCodec {
        let files = crate::source::resolve(&fixture("llama")).expect("fixture");
        TextCodec::from_files(&files, None, &[2]).expect("tokenizer")
    }

    /// Greedily walks `constraint` choosing, at each step, the allowed token whose text
    /// continues `target` furthest, and returns the text it produced.
    fn spell(compiler: &GrammarCompiler, codec: &TextCodec, spec: ConstraintSpec, target: &str) -> String {
        let mut c = compiler.compile(&spec).unwrap();
        let mut ids = Vec::new();
        let vocab = codec.tokenizer().get_vocab_size(true);
        while !c.is_finished() {
            let mask = c.mask().unwrap();
            let done = codec.decode(&ids, false).unwrap();
            let rest = &target[done.len().min(target.len())..];
            let best = (0..vocab as u32)
                .filter(|&t| mask.allows(t))
                .filter_map(|t| {
                    let mut next = ids.clone();
                    next.push(t);
                    let text = codec.decode(&next, false).ok()?;
                    let added = text.get(done.len()..)?.to_string();
                    (!added.is_empty() && rest.starts_with(&added)).then_some((added.len(), t))
                })
                .max();
            match best {
                Some((_, t)) => {
                    assert!(c.allows(t));
                    c.consume(t).unwrap();
                    ids.push(t);
                }
                None => {
                    // Only the end is left: EOS must be allowed exactly now.
                    assert!(c.is_accepting(), "stuck at {done:?}");
                    for &e in codec.eos_token_ids() {
                        assert!(mask.allows(e));
                    }
                    break;
                }
            }
        }
        codec.decode(&ids, false).unwrap()
    }

    #[test]
    fn constraints_allow_exactly_their_language() {
        let codec = codec();
        let vocab = codec.tokenizer().get_vocab_size(true);
        let compiler = GrammarCompiler::new(&codec, vocab).unwrap();
        let schema = json!({"type": "object", "properties": {"name": {"type": "string"},
            "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": false});
        let text = spell(
            &compiler,
            &codec,
            ConstraintSpec::JsonSchema(schema),
            r#"{"name": "Ada", "age": 36}"#,
        );
        assert_eq!(text, r#"{"name": "Ada", "age": 36}"#);
        let text = spell(
            &compiler,
            &codec,
            ConstraintSpec::Regex("[0-9]{3}-[a-z]+".into()),
            "123-abc",
        );
        assert_eq!(text, "123-abc");
        let choice = ConstraintSpec::Choice(vec!["yes".into(), "no (a.k.a. nope)".into()]);
        assert_eq!(
            spell(&compiler, &codec, choice, "no (a.k.a. nope)"),
            "no (a.k.a. nope)"
        );

        // At the start of a JSON object only `{` (possibly with more) may come; no
        // special token ever, and no EOS before the grammar can end.
        let mut c = compiler.compile(&ConstraintSpec::JsonObject).unwrap();
        let mask = c.mask().unwrap();
        for t in 0..vocab as u32 {
            if mask.allows(t) {
                let s = codec.decode(&[t], false).unwrap();
                assert!(
                    s.starts_with('{'),
                    "token {t} {s:?} allowed at the start of an object"
                );
            }
        }
        for &e in codec.eos_token_ids() {
            assert!(!mask.allows(e));
        }
        let brace = codec.tokenizer().token_to_id("{").unwrap();
        assert!(c.allows(brace));
        assert!(!c.allows(codec.tokenizer().token_to_id("a").unwrap()));
    }

    /// A vocabulary assembled from GGUF metadata gives the same trie as its
    /// `tokenizer.json`: the same constraint allows the same tokens.
    #[test]
    fn gguf_vocabularies_give_the_same_masks() {
        let st = crate::load(&fixture("mixtral"), &crate::LoadOptions::default()).unwrap();
        let gg = crate::load(&fixture("mixtral-f16.gguf"), &crate::LoadOptions::default()).unwrap();
        let vocab = st.model.config().vocab_size;
        let schema = ConstraintSpec::JsonSchema(json!({"type": "array", "items": {"enum": ["a b", "c"]}}));
        let masks = [&st.codec, &gg.codec].map(|codec| {
            let mut c = GrammarCompiler::new(codec, vocab)
                .unwrap()
                .compile(&schema)
                .unwrap();
            let first = c.mask().unwrap();
            let open = codec.tokenizer().token_to_id("[").unwrap();
            c.consume(open).unwrap();
            (first, c.mask().unwrap())
        });
        assert_eq!(masks[0], masks[1]);
    }

    #[test]
    fn bad_constraints_are_refused_with_a_reason() {
        let codec = codec();
        let compiler = GrammarCompiler::new(&codec, codec.tokenizer().get_vocab_size(true)).unwrap();
        for spec in [
            ConstraintSpec::Regex("(unclosed".into()),
            ConstraintSpec::Lark("start: undefined_rule".into()),
            ConstraintSpec::JsonSchema(json!({"type": "no-such-type"})),
        ] {
            let e = compiler.compile(&spec).unwrap_err();
            assert!(!e.is_empty(), "{spec:?}");
        }
    }
}
