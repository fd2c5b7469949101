//! The logit processors: one chain, applied in one order to a copy of a row of logits
//! before a token is chosen. The request's processors first (logit bias, the repetition
//! penalty, presence and frequency penalties), then the step's constraints: tokens banned
//! before `min_tokens`, a per-sequence token mask (structured outputs: only what the
//! grammar allows), and a forced token (the reasoning budget's end of thought), which
//! skips the choice altogether.

use super::params::SamplingParams;

/// The tokens a sequence may choose at one step: one bit per token of the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u64>,
    vocab: usize,
}

impl TokenMask {
    /// A mask of `vocab` tokens that allows none.
    pub fn none(vocab: usize) -> Self {
        Self {
            words: vec![0; vocab.div_ceil(64)],
            vocab,
        }
    }

    /// From 32-bit words, token `i` at bit `i % 32` of word `i / 32` (llguidance's
    /// layout), for a vocabulary of `vocab` tokens.
    pub fn from_words32(words: &[u32], vocab: usize) -> Self {
        let mut mask = Self::none(vocab);
        for (w, pair) in mask.words.iter_mut().zip(words.chunks(2)) {
            *w = pair[0] as u64 | pair.get(1).map_or(0, |&hi| (hi as u64) << 32);
        }
        if !vocab.is_multiple_of(64) {
            if let Some(last) = mask.words.last_mut() {
                *last &= (1u64 << (vocab % 64)) - 1;
            }
        }
        mask
    }

    pub fn allow(&mut self, token: u32) {
        if (token as usize) < self.vocab {
            self.words[token as usize / 64] |= 1 << (token % 64);
        }
    }

    pub fn allows(&self, token: u32) -> bool {
        (token as usize) < self.vocab && self.words[token as usize / 64] & (1 << (token % 64)) != 0
    }

    /// Whether it allows a token not in `banned`.
    pub fn allows_any_except(&self, banned: &[u32]) -> bool {
        let mut words = self.words.clone();
        for &t in banned {
            if (t as usize) < self.vocab {
                words[t as usize / 64] &= !(1 << (t % 64));
            }
        }
        words.iter().any(|&w| w != 0)
    }

    /// Whether it allows no token at all.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// -inf for every token the mask does not allow.
    pub(crate) fn apply(&self, logits: &mut [f32]) {
        for (w, chunk) in self.words.iter().zip(logits.chunks_mut(64)) {
            if *w == u64::MAX {
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if w & (1 << b) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// What constrains one step's choice besides the request's parameters.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepConstraints<'a> {
    /// Never chosen (EOS and stop ids before `min_tokens`).
    pub banned: &'a [u32],
    /// Only these may be chosen.
    pub mask: Option<&'a TokenMask>,
    /// Chosen without sampling.
    pub forced: Option<u32>,
}

impl StepConstraints<'_> {
    /// Whether the logits must be copied and changed before the choice.
    fn changes_logits(&self) -> bool {
        !self.banned.is_empty() || self.mask.is_some()
    }
}

/// The request's processors, from its sampling parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LogitsProcessors {
    bias: Vec<(u32, f32)>,
    /// 1 is off; Hugging Face's definition, over the prompt and the output.
    repetition: f32,
    presence: f32,
    frequency: f32,
}

impl LogitsProcessors {
    pub fn from_params(p: &SamplingParams) -> Self {
        Self {
            bias: p.logit_bias.clone(),
            repetition: p.repetition_penalty,
            presence: p.presence_penalty,
            frequency: p.frequency_penalty,
        }
    }

    /// Whether the request's processors leave the logits as they are.
    pub fn is_identity(&self) -> bool {
        self.bias.is_empty() && self.repetition == 1.0 && self.presence == 0.0 && self.frequency == 0.0
    }

    /// Whether the request's processors or the step's constraints change `logits`
    /// (when they do not, the choice reads the model's row in place).
    pub fn changes_logits(&self, step: &StepConstraints) -> bool {
        !self.is_identity() || step.changes_logits()
    }

    /// `out` = `logits` through the chain. `marks` is a per-token scratch, zero between
    /// calls (and left so).
    pub fn apply(
        &self,
        logits: &[f32],
        prompt: &[u32],
        output: &[u32],
        step: &StepConstraints,
        out: &mut Vec<f32>,
        marks: &mut Vec<u32>,
    ) {
        let l = out;
        l.clear();
        l.extend_from_slice(logits);
        for &(t, b) in &self.bias {
            l[t as usize] += b;
        }
        if marks.len() < l.len() {
            marks.resize(l.len(), 0);
        }
        if self.repetition != 1.0 {
            // Once per distinct token of the prompt and the output; the marks are cleared
            // again after.
            let all = || prompt.iter().chain(output).map(|&t| t as usize);
            for t in all() {
                if std::mem::replace(&mut marks[t], 1) == 0 {
                    l[t] = if l[t] > 0.0 {
                        l[t] / self.repetition
                    } else {
                        l[t] * self.repetition
                    };
                }
            }
            all().for_each(|t| marks[t] = 0);
        }
        if self.presence != 0.0 || self.frequency != 0.0 {
            // Counts of the output's tokens, applied at each token's first occurrence and
            // cleared as they are applied.
            for &t in output {
                marks[t as usize] += 1;
            }
            for &t in output {
                let c = std::mem::take(&mut marks[t as usize]);
                if c > 0 {
                    l[t as usize] -= self.presence + self.frequency * c as f32;
                }
            }
        }
        for &t in step.banned {
            l[t as usize] = f32::NEG_INFINITY;
        }
        if let Some(mask) = step.mask {
            mask.apply(l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The processors give the logits their definitions give, computed plainly: bias,
    /// then the repetition penalty once per distinct prompt or output token, then
    /// presence and frequency over the output's counts, then bans; and the per-thread
    /// marks are left cleared (a second call gives the same).
    #[test]
    fn processors_follow_their_definitions() {
        let vocab = 50;
        let logits: Vec<f32> = (0..vocab).map(|i| (i as f32 - 20.0) * 0.3).collect();
        let prompt = [3u32, 7, 7, 30, 3];
        let output = [7u32, 41, 41, 41, 2, 30];
        let banned = [41u32, 0];
        let p = SamplingParams::with(|p| {
            p.logit_bias = vec![(2, 1.5), (30, -4.0)];
            p.repetition_penalty = 1.3;
            p.presence_penalty = 0.4;
            p.frequency_penalty = 0.25;
        });
        let mut want = logits.clone();
        want[2] += 1.5;
        want[30] -= 4.0;
        for t in [3usize, 7, 30, 41, 2] {
            want[t] = if want[t] > 0.0 {
                want[t] / 1.3
            } else {
                want[t] * 1.3
            };
        }
        for (t, c) in [(7usize, 1.0f32), (41, 3.0), (2, 1.0), (30, 1.0)] {
            want[t] -= 0.4 + 0.25 * c;
        }
        for t in banned {
            want[t as usize] = f32::NEG_INFINITY;
        }
        let chain = LogitsProcessors::from_params(&p);
        let step = StepConstraints {
            banned: &banned,
            ..StepConstraints::default()
        };
        let (mut out, mut marks) = (Vec::new(), Vec::new());
        // Twice: the marks are left cleared, so a second call gives the same.
        for _ in 0..2 {
            chain.apply(&logits, &prompt, &output, &step, &mut out, &mut marks);
            assert_eq!(out, want);
            assert!(marks.iter().all(|&m| m == 0));
        }
        // A mask then leaves only the tokens it allows (and not the banned ones).
        let mut mask = TokenMask::none(vocab);
        for t in [2, 41, 45] {
            mask.allow(t);
        }
        let masked = StepConstraints {
            mask: Some(&mask),
            ..step
        };
        chain.apply(&logits, &prompt, &output, &masked, &mut out, &mut marks);
        let finite: Vec<usize> = (0..vocab).filter(|&t| out[t] > f32::NEG_INFINITY).collect();
        assert_eq!(finite, [2, 45]);
        assert_eq!((out[2], out[45]), (want[2], want[45]));
    }
}
