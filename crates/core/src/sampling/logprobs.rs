//! Log-probabilities of the model's raw distribution, and the greedy choice.

use super::select::top_k_into;
use crate::backend::cpu::vmath::{any_at_least, exp, fold16, max};

/// A token's log-probability and, when asked, the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

avx512_or_portable! {
    /// `token`'s log-probability under `logits` and the `k` most likely tokens (highest
    /// first, lower id first among equals), by a partial selection rather than a sort.
    pub fn token_logprob(logits: &[f32], token: u32, k: usize) -> TokenLogprob = token_logprob_impl
}

#[inline(always)]
fn token_logprob_impl(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let lse = log_sum_exp(logits);
    let lp = |t: u32| (logits[t as usize] as f64 - lse) as f32;
    let mut top = Vec::new();
    top_k_into(logits, k, &mut top);
    TokenLogprob {
        token,
        logprob: lp(token),
        top: top.into_iter().map(|t| (t, lp(t))).collect(),
    }
}

/// `ln(sum(e^x))` over `logits`: vectorised exponentials summed in 16 f32 lanes per block of 1024, the blocks in f64
/// (a libm `exp` per value in f64 took about 0.5 ms for a 49k vocabulary).
#[inline(always)]
fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = max(logits);
    if !max.is_finite() {
        return max as f64;
    }
    // A loop, not `map(..).sum()`, which was compiled out of line without AVX-512.
    let mut sum = 0f64;
    for c in logits.chunks(1024) {
        sum += fold16(c, 0.0, |v| exp(v - max), |a, b| a + b) as f64;
    }
    sum.ln() + max as f64
}

avx512_or_portable! {
    /// Index of the largest value; the lowest index wins ties (as `torch.argmax` does).
    /// NaN is ignored.
    pub fn argmax(v: &[f32]) -> u32 = argmax_impl
}

/// The maximum (one vectorised pass), then the first chunk that holds it.
#[inline(always)]
fn argmax_impl(v: &[f32]) -> u32 {
    const CHUNK: usize = 64;
    let m = max(v);
    for (c, chunk) in v.chunks(CHUNK).enumerate() {
        if any_at_least(chunk, m) {
            let j = chunk.iter().position(|&x| x >= m).unwrap_or(0);
            return (c * CHUNK + j) as u32;
        }
    }
    0
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

    /// The first index of the maximum, as a plain scan finds it: ties, the maximum in
    /// the last partial chunk, all -inf, NaN ignored, empty.
    #[test]
    fn argmax_is_the_first_maximum() {
        let plain = |v: &[f32]| {
            let mut best = None::<usize>;
            for (i, &x) in v.iter().enumerate() {
                if !x.is_nan() && best.is_none_or(|b| x > v[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0) as u32
        };
        let mut v: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 113) as f32).collect();
        assert_eq!(argmax(&v), plain(&v));
        v[999] = 500.0;
        assert_eq!(argmax(&v), 999);
        v[3] = f32::NAN;
        v[70] = 500.0;
        assert_eq!(argmax(&v), 70);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 100]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[1.0, 2.0, 2.0]), 1);
    }

    #[test]
    fn logprobs_report_the_raw_distribution() {
        let logits = [0.0f32, 1.0, 2.0];
        let lp = token_logprob(&logits, 0, 2);
        let ls = log_softmax(&logits);
        assert!((lp.logprob - ls[0]).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
        let total: f64 = ls.iter().map(|&x| (x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    /// On a vocabulary's worth of logits (ties included), the vectorised log-sum-exp
    /// agrees with f64 and libm to 1e-5, and the alternatives are the head of a full
    /// sort with their log-probabilities.
    #[test]
    fn logprobs_match_a_full_computation() {
        let logits: Vec<f32> = (0..49152)
            .map(|i| ((i * 7919) % 4099) as f32 * 0.005 - 8.0 + if i % 1000 == 0 { 6.0 } else { 0.0 })
            .collect();
        let ls = log_softmax(&logits);
        let mut sorted: Vec<u32> = (0..logits.len() as u32).collect();
        sorted.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        for k in [0, 1, 5, 20] {
            let lp = token_logprob(&logits, 1234, k);
            assert!(
                (lp.logprob - ls[1234]).abs() < 1e-5,
                "{} vs {}",
                lp.logprob,
                ls[1234]
            );
            assert_eq!(lp.top.len(), k);
            for (&(t, p), &want) in lp.top.iter().zip(&sorted) {
                assert_eq!(t, want);
                assert!((p - ls[t as usize]).abs() < 1e-5);
            }
        }
    }
}
