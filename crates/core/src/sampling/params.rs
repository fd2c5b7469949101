//! Sampling parameters (OpenAI's, plus vLLM's extensions) and their validation.

use std::sync::Arc;

use crate::grammar::Constraint;

/// Largest `top_logprobs` (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most `stop` strings per request (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;
/// Most choices per request, unless the engine is configured otherwise.
pub const DEFAULT_MAX_N: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Number of choices, sharing the prompt's KV blocks.
    pub n: usize,
    /// `None`: up to the model's context.
    pub max_tokens: Option<usize>,
    /// No EOS or stop token before this many tokens (vLLM's extension).
    pub min_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// `<= 0` disables.
    pub top_k: i32,
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 disables; applied over prompt and output tokens (Hugging Face's definition).
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    /// Log-probability of each chosen token plus this many alternatives (`None`: off).
    pub logprobs: Option<usize>,
    /// The same for prompt tokens (completions' `echo`).
    pub prompt_logprobs: Option<usize>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS (vLLM's extension; benchmarks rely on it).
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    /// A reasoning model's thought markers: inside the thought no output constraint
    /// applies, and its length may be capped.
    pub reasoning: Option<Reasoning>,
    /// Structured outputs: what the answer must be (outside the thought). Each choice
    /// starts from its own copy.
    pub constraint: Option<Arc<Constraint>>,
    /// Speculative decoding for this request when the engine has it on (a request may
    /// opt out; the output is the same either way).
    pub speculative: bool,
}

/// A reasoning model's thought, in the model's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reasoning {
    /// `max_reasoning_tokens`: after this many thinking tokens the thought is closed by
    /// forcing its end token, and the answer follows.
    pub max_tokens: Option<usize>,
    pub start_token: u32,
    pub end_token: u32,
    /// The prompt already opened the thought.
    pub starts_open: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            max_tokens: None,
            min_tokens: 0,
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
            prompt_logprobs: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            speculative: true,
            ignore_eos: false,
            skip_special_tokens: true,
            reasoning: None,
            constraint: None,
        }
    }
}

/// A parameter outside its range, named as in the OpenAI API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub param: &'static str,
    pub message: String,
}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl SamplingParams {
    /// The defaults changed by `f` (tests).
    #[cfg(test)]
    pub(crate) fn with(f: impl FnOnce(&mut Self)) -> Self {
        let mut p = Self::default();
        f(&mut p);
        p
    }

    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            ..Self::default()
        }
    }

    /// Checks every parameter against OpenAI's ranges (and the vocabulary).
    pub fn validate(&self, vocab_size: usize, max_n: usize) -> Result<(), ParamError> {
        let err = |param: &'static str, message: String| Err(ParamError { param, message });
        let finite = |v: f32| v.is_finite();
        if self.n == 0 || self.n > max_n {
            return err("n", format!("n must be between 1 and {max_n}, got {}", self.n));
        }
        // vLLM's convention: -1 (and 0) mean "off"; other negatives are mistakes.
        if self.top_k < -1 {
            return err(
                "top_k",
                format!("top_k must be -1 or 0 (off) or at least 1, got {}", self.top_k),
            );
        }
        if self.max_tokens == Some(0) {
            return err("max_tokens", "max_tokens must be at least 1".into());
        }
        if let Some(m) = self.max_tokens {
            if self.min_tokens > m {
                return err(
                    "min_tokens",
                    format!("min_tokens ({}) exceeds max_tokens ({m})", self.min_tokens),
                );
            }
        }
        if !finite(self.temperature) || !(0.0..=2.0).contains(&self.temperature) {
            return err(
                "temperature",
                format!("temperature must be between 0 and 2, got {}", self.temperature),
            );
        }
        if !finite(self.top_p) || self.top_p <= 0.0 || self.top_p > 1.0 {
            return err("top_p", format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !finite(self.min_p) || !(0.0..=1.0).contains(&self.min_p) {
            return err(
                "min_p",
                format!("min_p must be between 0 and 1, got {}", self.min_p),
            );
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !finite(v) || !(-2.0..=2.0).contains(&v) {
                return err(name, format!("{name} must be between -2 and 2, got {v}"));
            }
        }
        if !finite(self.repetition_penalty) || self.repetition_penalty <= 0.0 || self.repetition_penalty > 2.0
        {
            return err(
                "repetition_penalty",
                format!(
                    "repetition_penalty must be in (0, 2], got {}",
                    self.repetition_penalty
                ),
            );
        }
        for &(token, bias) in &self.logit_bias {
            if token as usize >= vocab_size {
                return err(
                    "logit_bias",
                    format!("logit_bias token {token} is outside the vocabulary of {vocab_size}"),
                );
            }
            if !finite(bias) || !(-100.0..=100.0).contains(&bias) {
                return err(
                    "logit_bias",
                    format!("logit_bias values must be between -100 and 100, got {bias}"),
                );
            }
        }
        for (name, v) in [
            ("top_logprobs", self.logprobs),
            ("logprobs", self.prompt_logprobs),
        ] {
            if v.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
                return err(name, format!("{name} must be at most {MAX_TOP_LOGPROBS}"));
            }
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return err(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop sequences, got {}",
                    self.stop.len()
                ),
            );
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return err("stop", "stop sequences must not be empty".into());
        }
        if let Some(&t) = self.stop_token_ids.iter().find(|&&t| t as usize >= vocab_size) {
            return err(
                "stop_token_ids",
                format!("stop token {t} is outside the vocabulary of {vocab_size}"),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_parameter() {
        let bad = [
            (SamplingParams::with(|p| p.temperature = 3.0), "temperature"),
            (SamplingParams::with(|p| p.top_p = 0.0), "top_p"),
            (SamplingParams::with(|p| p.n = 0), "n"),
            (SamplingParams::with(|p| p.max_tokens = Some(0)), "max_tokens"),
            (
                SamplingParams::with(|p| p.presence_penalty = -2.5),
                "presence_penalty",
            ),
            (
                SamplingParams::with(|p| p.frequency_penalty = f32::NAN),
                "frequency_penalty",
            ),
            (
                SamplingParams::with(|p| p.repetition_penalty = 0.0),
                "repetition_penalty",
            ),
            (
                SamplingParams::with(|p| p.logit_bias = vec![(1000, 1.0)]),
                "logit_bias",
            ),
            (
                SamplingParams::with(|p| p.logit_bias = vec![(1, 101.0)]),
                "logit_bias",
            ),
            (SamplingParams::with(|p| p.logprobs = Some(21)), "top_logprobs"),
            (SamplingParams::with(|p| p.stop = vec!["a".into(); 5]), "stop"),
            (SamplingParams::with(|p| p.min_p = 1.5), "min_p"),
            (SamplingParams::with(|p| p.top_k = -5), "top_k"),
            (SamplingParams::with(|p| p.n = 17), "n"),
            (
                SamplingParams::with(|p| {
                    p.max_tokens = Some(2);
                    p.min_tokens = 3
                }),
                "min_tokens",
            ),
            (
                SamplingParams::with(|p| p.stop_token_ids = vec![100]),
                "stop_token_ids",
            ),
        ];
        for (p, name) in bad {
            assert_eq!(p.validate(100, DEFAULT_MAX_N).unwrap_err().param, name);
        }
        assert!(SamplingParams::default().validate(100, DEFAULT_MAX_N).is_ok());
    }
}
