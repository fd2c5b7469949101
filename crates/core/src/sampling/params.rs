//! Choosing the next token: sampling parameters (OpenAI's, plus vLLM's extensions), their
//! validation, and a per-sequence sampler with its own random generator, so that a seeded
//! request samples the same tokens whatever else shares its batch.

use std::collections::HashMap;

use rand::{rngs::StdRng, Rng, SeedableRng};

/// Largest `top_logprobs` (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most `stop` strings per request (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;
/// Most choices per request.
pub const MAX_N: usize = 16;

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
    /// Caps a reasoning model's thought: after this many thinking tokens the thought is
    /// closed by forcing its end token, and the answer follows.
    pub reasoning_budget: Option<ReasoningBudget>,
}

/// `max_reasoning_tokens` in the model's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasoningBudget {
    pub max_tokens: usize,
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
            ignore_eos: false,
            skip_special_tokens: true,
            reasoning_budget: None,
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
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            ..Self::default()
        }
    }

    /// Checks every parameter against OpenAI's ranges (and the vocabulary).
    pub fn validate(&self, vocab_size: usize) -> Result<(), ParamError> {
        let err = |param: &'static str, message: String| Err(ParamError { param, message });
        let finite = |v: f32| v.is_finite();
        if self.n == 0 || self.n > MAX_N {
            return err("n", format!("n must be between 1 and {MAX_N}, got {}", self.n));
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

/// A token's log-probability and, when asked, the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Samples tokens for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// Temperature sampling (0: greedy) with a seed, nothing else.
    pub fn new(temperature: f32, seed: u64) -> Self {
        let params = SamplingParams {
            temperature,
            ..SamplingParams::default()
        };
        Self::from_params(&params, seed)
    }

    pub fn from_params(params: &SamplingParams, seed: u64) -> Self {
        Self {
            params: params.clone(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Chooses the next token from `logits` given the sequence so far. `banned` tokens
    /// (EOS and stop ids before `min_tokens`) are never chosen. Log-probabilities are
    /// those of the model's raw distribution.
    pub fn sample(
        &mut self,
        logits: &[f32],
        prompt: &[u32],
        output: &[u32],
        banned: &[u32],
    ) -> (u32, Option<TokenLogprob>) {
        let p = &self.params;
        let greedy = p.temperature == 0.0 || p.top_k == 1;
        let want_logprobs = p.logprobs;
        if greedy && p.logit_bias.is_empty() && !self.penalised() {
            // Nothing to change in the logits: pick from them as they are.
            let token = argmax_excluding(logits, banned);
            let logprob = want_logprobs.map(|k| token_logprob(logits, token, k));
            return (token, logprob);
        }
        let mut l = logits.to_vec();
        for &(t, b) in &p.logit_bias {
            l[t as usize] += b;
        }
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; l.len()];
            for &t in prompt.iter().chain(output) {
                let t = t as usize;
                if !std::mem::replace(&mut seen[t], true) {
                    l[t] = if l[t] > 0.0 {
                        l[t] / p.repetition_penalty
                    } else {
                        l[t] * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &t in output {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                l[t as usize] -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
        for &t in banned {
            l[t as usize] = f32::NEG_INFINITY;
        }
        let token = if greedy { argmax(&l) } else { self.draw(&mut l) };
        let logprob = want_logprobs.map(|k| token_logprob(logits, token, k));
        (token, logprob)
    }

    /// Whether repetition, presence or frequency penalties change the logits.
    fn penalised(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0
    }

    /// Temperature, top-k, top-p and min-p, then one draw from the per-sequence RNG.
    fn draw(&mut self, l: &mut [f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        // Candidates sorted by logit; only as many as top-k or the nucleus need.
        let mut idx: Vec<u32> = (0..l.len() as u32)
            .filter(|&i| l[i as usize] > f32::NEG_INFINITY)
            .collect();
        if idx.is_empty() {
            return argmax(l);
        }
        let by_logit = |a: &u32, b: &u32| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b));
        let k = if p.top_k > 0 {
            (p.top_k as usize).min(idx.len())
        } else {
            idx.len()
        };
        // Sorting 50k logits per token is the slow part; a partial selection of the head
        // is enough unless top-p needs the whole tail.
        let head = k.min(1024);
        if head < idx.len() {
            idx.select_nth_unstable_by(head - 1, by_logit);
        }
        idx[..head].sort_unstable_by(by_logit);
        let max = l[idx[0] as usize];
        let z: f32 = idx
            .iter()
            .map(|&i| ((l[i as usize] - max) * inv_t).exp())
            .sum::<f32>();
        let mut probs: Vec<(u32, f32)> = idx[..head]
            .iter()
            .map(|&i| (i, ((l[i as usize] - max) * inv_t).exp() / z))
            .collect();
        let head_mass: f32 = probs.iter().map(|x| x.1).sum();
        if head < k && head_mass < p.top_p {
            // The nucleus reaches past the head: sort everything (rare).
            idx.sort_unstable_by(by_logit);
            probs = idx[..k]
                .iter()
                .map(|&i| (i, ((l[i as usize] - max) * inv_t).exp() / z))
                .collect();
        }
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (j, (_, pr)) in probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p {
                    keep = j + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = probs[0].1 * p.min_p;
            probs.retain(|x| x.1 >= floor);
        }
        let total: f32 = probs.iter().map(|x| x.1).sum();
        let mut r = self.rng.random_range(0.0..total);
        for &(t, pr) in &probs {
            if r < pr {
                return t;
            }
            r -= pr;
        }
        probs[probs.len() - 1].0
    }
}

/// `token`'s log-probability under `logits` and the `k` most likely tokens.
pub fn token_logprob(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = (logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>()).ln() + max;
    let lp = |t: u32| (logits[t as usize] as f64 - lse) as f32;
    let mut top = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        let nth = k.min(idx.len()) - 1;
        idx.select_nth_unstable_by(nth, by);
        idx.truncate(k);
        idx.sort_unstable_by(by);
        top = idx.into_iter().map(|t| (t, lp(t))).collect();
    }
    TokenLogprob {
        token,
        logprob: lp(token),
        top,
    }
}

/// Index of the largest value; the lowest index wins ties (as `torch.argmax` does).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// [`argmax`] over the tokens not in `banned` (as if their logits were -inf).
pub fn argmax_excluding(v: &[f32], banned: &[u32]) -> u32 {
    if banned.is_empty() {
        return argmax(v);
    }
    let mut best: Option<usize> = None;
    for (i, x) in v.iter().enumerate() {
        if best.is_none_or(|b| *x > v[b]) && !banned.contains(&(i as u32)) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

/// `log_softmax` of one row of logits, in f64 for accuracy.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    /// Greedy choice without copying the logits skips banned tokens like the copying
    /// path (which sets them to -inf), including a banned maximum and all banned.
    #[test]
    fn argmax_excluding_matches_masked_argmax() {
        let v = [0.5f32, 3.0, -1.0, 3.0, 2.5];
        for banned in [vec![], vec![1], vec![1, 3], vec![0, 1, 3], vec![0, 1, 2, 3, 4]] {
            let mut masked = v.to_vec();
            for &b in &banned {
                masked[b as usize] = f32::NEG_INFINITY;
            }
            assert_eq!(argmax_excluding(&v, &banned), argmax(&masked), "{banned:?}");
        }
    }

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1, 2.0, -1.0, 2.0];
        assert_eq!(Sampler::new(0.0, 0).sample(&logits, &[], &[], &[]).0, 1);
        let draw = |seed| {
            let mut s = Sampler::new(1.0, seed);
            (0..20)
                .map(|_| s.sample(&logits, &[], &[], &[]).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        let lp = log_softmax(&logits);
        let total: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn filters_restrict_the_candidates() {
        let logits: Vec<f32> = (0..100).map(|i| i as f32 * 0.1).collect();
        let run = |p: SamplingParams| {
            let mut s = Sampler::from_params(&p, 1);
            (0..200)
                .map(|_| s.sample(&logits, &[], &[], &[]).0)
                .collect::<std::collections::HashSet<_>>()
        };
        let top_k = run(params(|p| p.top_k = 3));
        assert!(top_k.iter().all(|&t| t >= 97), "{top_k:?}");
        let top_p = run(params(|p| p.top_p = 0.05));
        assert!(top_p.iter().all(|&t| t >= 95), "{top_p:?}");
        let min_p = run(params(|p| p.min_p = 0.95)); // exp(-0.1) = 0.905 < 0.95
        assert!(min_p.iter().all(|&t| t == 99), "{min_p:?}");
        let banned = {
            let mut s = Sampler::new(0.0, 0);
            s.sample(&logits, &[], &[], &[99]).0
        };
        assert_eq!(banned, 98);
    }

    #[test]
    fn penalties_and_bias_change_greedy_choice() {
        let logits = [1.0, 0.9, 0.0];
        let mut s = Sampler::from_params(
            &params(|p| {
                p.temperature = 0.0;
                p.frequency_penalty = 0.5;
            }),
            0,
        );
        assert_eq!(s.sample(&logits, &[], &[0], &[]).0, 1);
        let mut s = Sampler::from_params(
            &params(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 1.5;
            }),
            0,
        );
        assert_eq!(s.sample(&logits, &[0], &[], &[]).0, 1);
        let mut s = Sampler::from_params(
            &params(|p| {
                p.temperature = 0.0;
                p.logit_bias = vec![(2, 5.0)];
            }),
            0,
        );
        assert_eq!(s.sample(&logits, &[], &[], &[]).0, 2);
    }

    #[test]
    fn logprobs_report_the_raw_distribution() {
        let logits = [0.0f32, 1.0, 2.0];
        let lp = token_logprob(&logits, 0, 2);
        let ls = log_softmax(&logits);
        assert!((lp.logprob - ls[0]).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }

    #[test]
    fn validation_names_the_parameter() {
        let bad = [
            (params(|p| p.temperature = 3.0), "temperature"),
            (params(|p| p.top_p = 0.0), "top_p"),
            (params(|p| p.n = 0), "n"),
            (params(|p| p.max_tokens = Some(0)), "max_tokens"),
            (params(|p| p.presence_penalty = -2.5), "presence_penalty"),
            (params(|p| p.frequency_penalty = f32::NAN), "frequency_penalty"),
            (params(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
            (params(|p| p.logit_bias = vec![(1000, 1.0)]), "logit_bias"),
            (params(|p| p.logit_bias = vec![(1, 101.0)]), "logit_bias"),
            (params(|p| p.logprobs = Some(21)), "top_logprobs"),
            (params(|p| p.stop = vec!["a".into(); 5]), "stop"),
            (params(|p| p.min_p = 1.5), "min_p"),
            (
                params(|p| {
                    p.max_tokens = Some(2);
                    p.min_tokens = 3
                }),
                "min_tokens",
            ),
            (params(|p| p.stop_token_ids = vec![100]), "stop_token_ids"),
        ];
        for (p, name) in bad {
            assert_eq!(p.validate(100).unwrap_err().param, name);
        }
        assert!(SamplingParams::default().validate(100).is_ok());
    }
}
