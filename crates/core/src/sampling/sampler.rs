//! A per-sequence sampler: the logit processor chain ([`LogitsProcessors`] and the
//! step's [`StepConstraints`]), then greedy choice or one draw from the filtered
//! distribution with the sequence's own random generator, so that a seeded request
//! samples the same tokens whatever else shares its batch and whichever thread samples
//! it.

use std::cell::RefCell;

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::distribution::{self, Filters};
use super::logprobs::{argmax, argmax_excluding, token_logprob, TokenLogprob};
use super::params::SamplingParams;
use super::processors::{LogitsProcessors, StepConstraints};

/// Buffers of a vocabulary's size, one set per thread, reused from token to token
/// (allocating 200 KB per sampled token costs page faults).
#[derive(Default)]
struct Scratch {
    /// The logits after the processors.
    logits: Vec<f32>,
    /// Per token, zero between calls: marks and counts for the penalties.
    marks: Vec<u32>,
    distribution: distribution::Scratch,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Samples tokens for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    processors: LogitsProcessors,
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
            processors: LogitsProcessors::from_params(params),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Whether choosing freely and redrawing with the mask when the choice is not allowed
    /// gives the masked distribution: greedy, or temperature sampling without top-k,
    /// top-p or min-p (which cut the distribution before the mask would), and no
    /// logprobs (which are of the masked distribution).
    pub fn masks_by_rejection(&self) -> bool {
        let p = &self.params;
        let greedy = p.temperature == 0.0 || p.top_k == 1;
        p.logprobs.is_none() && (greedy || (p.top_k <= 0 && p.top_p >= 1.0 && p.min_p == 0.0))
    }

    /// Chooses the next token from `logits` given the sequence so far and the step's
    /// constraints (banned tokens, a mask, a forced token). Log-probabilities are those
    /// of the model's raw distribution, restricted to the mask when there is one.
    pub fn sample(
        &mut self,
        logits: &[f32],
        prompt: &[u32],
        output: &[u32],
        step: &StepConstraints,
    ) -> (u32, Option<TokenLogprob>) {
        let p = &self.params;
        let greedy = p.temperature == 0.0 || p.top_k == 1;
        let token = if let Some(t) = step.forced {
            t
        } else if greedy && self.processors.is_identity() && step.mask.is_none() {
            // Greedy with at most some bans: the model's row as it is, bans skipped.
            argmax_excluding(logits, step.banned)
        } else if !self.processors.changes_logits(step) {
            // Nothing changes the logits: draw from the model's row as it is.
            SCRATCH.with_borrow_mut(|s| self.draw(logits, &mut s.distribution))
        } else {
            SCRATCH.with_borrow_mut(|s| {
                let Scratch {
                    logits: l,
                    marks,
                    distribution,
                } = s;
                self.processors.apply(logits, prompt, output, step, l, marks);
                if greedy {
                    argmax(l)
                } else {
                    self.draw(l, distribution)
                }
            })
        };
        let logprob = self.params.logprobs.map(|k| match step.mask {
            None => token_logprob(logits, token, k),
            Some(mask) => {
                let mut masked = logits.to_vec();
                mask.apply(&mut masked);
                let mut lp = token_logprob(&masked, token, k);
                lp.top.retain(|&(_, l)| l.is_finite());
                lp
            }
        });
        (token, logprob)
    }

    /// One draw from `l` (temperature, top-k, top-p, min-p) with the sequence's generator.
    fn draw(&mut self, l: &[f32], scratch: &mut distribution::Scratch) -> u32 {
        let p = &self.params;
        let filters = Filters {
            inv_t: 1.0 / p.temperature,
            top_k: (p.top_k > 0).then_some(p.top_k as usize),
            top_p: p.top_p,
            min_p: p.min_p,
        };
        let rng = &mut self.rng;
        distribution::draw(l, &filters, scratch, &mut || rng.random()).unwrap_or_else(|| argmax(l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::distribution::tests::{filter_grid, full_sort_reference, model_like_logits};
    use crate::sampling::log_softmax;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1, 2.0, -1.0, 2.0];
        assert_eq!(
            Sampler::new(0.0, 0)
                .sample(&logits, &[], &[], &StepConstraints::default())
                .0,
            1
        );
        let draw = |seed| {
            let mut s = Sampler::new(1.0, seed);
            (0..20)
                .map(|_| s.sample(&logits, &[], &[], &StepConstraints::default()).0)
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
                .map(|_| s.sample(&logits, &[], &[], &StepConstraints::default()).0)
                .collect::<std::collections::HashSet<_>>()
        };
        let top_k = run(SamplingParams::with(|p| p.top_k = 3));
        assert!(top_k.iter().all(|&t| t >= 97), "{top_k:?}");
        let top_p = run(SamplingParams::with(|p| p.top_p = 0.05));
        assert!(top_p.iter().all(|&t| t >= 95), "{top_p:?}");
        let min_p = run(SamplingParams::with(|p| p.min_p = 0.95)); // exp(-0.1) = 0.905 < 0.95
        assert!(min_p.iter().all(|&t| t == 99), "{min_p:?}");
        let banned = {
            let mut s = Sampler::new(0.0, 0);
            s.sample(
                &logits,
                &[],
                &[],
                &StepConstraints {
                    banned: &[99],
                    ..Default::default()
                },
            )
            .0
        };
        assert_eq!(banned, 98);
    }

    #[test]
    fn penalties_and_bias_change_greedy_choice() {
        let logits = [1.0, 0.9, 0.0];
        let mut s = Sampler::from_params(
            &SamplingParams::with(|p| {
                p.temperature = 0.0;
                p.frequency_penalty = 0.5;
            }),
            0,
        );
        assert_eq!(s.sample(&logits, &[], &[0], &StepConstraints::default()).0, 1);
        let mut s = Sampler::from_params(
            &SamplingParams::with(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 1.5;
            }),
            0,
        );
        assert_eq!(s.sample(&logits, &[0], &[], &StepConstraints::default()).0, 1);
        let mut s = Sampler::from_params(
            &SamplingParams::with(|p| {
                p.temperature = 0.0;
                p.logit_bias = vec![(2, 5.0)];
            }),
            0,
        );
        assert_eq!(s.sample(&logits, &[], &[], &StepConstraints::default()).0, 2);
    }

    /// Sampled tokens follow the full sort's distribution for every combination of
    /// temperature, top-k, top-p and min-p (every fifth of the grid, which varies each
    /// filter), on peaked and on flat logits: 20,000 draws from a fixed seed over a
    /// 3,001-token vocabulary, never a token outside the support, and a chi-square
    /// statistic over the tokens expected at least 5 times (the rest pooled) within
    /// df + 6 sqrt(2 df), six standard deviations of the statistic under the null.
    #[test]
    fn draws_follow_the_distribution() {
        const DRAWS: usize = 20_000;
        let peaked = model_like_logits(3001, 7);
        // Flat: top-p's nucleus spans most tokens, and min-p rejects draws often.
        let flat: Vec<f32> = (0..3001).map(|i| ((i * 31) % 17) as f32 * 0.1).collect();
        let cases = filter_grid().into_iter().enumerate().filter(|(n, _)| n % 5 == 0);
        for (n, (f, logits)) in cases.flat_map(|(n, f)| [(n, (f, &peaked)), (n + 1000, (f, &flat))]) {
            let p = SamplingParams::with(|p| {
                p.temperature = 1.0 / f.inv_t;
                p.top_k = f.top_k.map_or(-1, |k| k as i32);
                p.top_p = f.top_p;
                p.min_p = f.min_p;
            });
            let want = full_sort_reference(logits, &f);
            let mut sampler = Sampler::from_params(&p, n as u64);
            let mut counts = vec![0usize; logits.len()];
            for _ in 0..DRAWS {
                counts[sampler.sample(logits, &[], &[], &StepConstraints::default()).0 as usize] += 1;
            }
            let (mut chi2, mut df) = (0.0, 0usize);
            let (mut pooled_seen, mut pooled_want) = (0.0, 0.0);
            for (&c, &pr) in counts.iter().zip(&want) {
                assert!(c == 0 || pr > 0.0, "{f:?}: drew a token outside the support");
                let expected = pr * DRAWS as f64;
                if expected >= 5.0 {
                    chi2 += (c as f64 - expected).powi(2) / expected;
                    df += 1;
                } else {
                    pooled_seen += c as f64;
                    pooled_want += expected;
                }
            }
            if pooled_want >= 5.0 {
                chi2 += (pooled_seen - pooled_want).powi(2) / pooled_want;
                df += 1;
            }
            let df = df.saturating_sub(1).max(1) as f64;
            assert!(
                chi2 <= df + 6.0 * (2.0 * df).sqrt(),
                "{f:?}: chi-square {chi2:.1} over {df} degrees of freedom"
            );
        }
    }
}
