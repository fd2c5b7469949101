//! The distribution a sampled token is drawn from, and the draw, without sorting the
//! vocabulary.
//!
//! Temperature, then top-k, top-p and min-p, define which tokens may be drawn and their
//! weights: exactly what a full sort by logit (in [`rank`] order) would give. Top-k keeps
//! the k best; top-p the shortest run of the best whose probabilities (of the whole
//! tempered distribution) reach `top_p`; min-p those whose probability is at least
//! `min_p` times the top one. A draw maps one uniform number through the cumulative
//! weights (inverse CDF). Only what a filter needs is ordered:
//! - no filter (OpenAI's default, temperature 1 and top_p 1): one vectorised pass of
//!   exponentials that also sums each block of [`BLOCK`] weights; the draw walks the block
//!   sums, then one block;
//! - top-k: one scan that keeps the k best in a heap, skipping chunks that cannot enter;
//! - top-p: a draw from the whole distribution, kept when the mass ranked above the token
//!   is below top_p (one masked sum), else drawn again; after a few misses, the nucleus is
//!   built: the tokens above a threshold that holds its mass, then a quickselect that
//!   descends by mass, never a sort of them all;
//! - min-p: a threshold pass.
//!
//! The passes are written as plain loops that vectorise, compiled once for AVX-512 and once
//! portable ([`support`] picks at run time, as the model's kernels do).

use super::select::{rank, top_k_into};
use crate::backend::cpu::vmath::{any_at_least, exp, fold16, max};

/// Weights per block of the dense distribution (sums kept for the draw).
const BLOCK: usize = 512;
/// Thresholds on the relative weight (the top token weighs 1), highest first: the
/// nucleus' candidates are the tokens above the first one whose tokens carry its mass
/// (usually the first: a few likely tokens), then every token with weight.
const NUCLEUS_THRESHOLDS: [f32; 6] = [
    1.0 / 16.0,
    1.0 / 256.0,
    1.0 / 4096.0,
    1.0 / 65536.0,
    1.0 / 16_777_216.0,
    f32::MIN_POSITIVE,
];

/// Temperature and the truncation filters, as the sampler applies them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Filters {
    /// 1 / temperature (> 0).
    pub inv_t: f32,
    pub top_k: Option<usize>,
    /// In (0, 1]; 1 is off.
    pub top_p: f32,
    /// In [0, 1]; 0 is off.
    pub min_p: f32,
}

/// Buffers reused from one draw to the next (a vocabulary's weights are 200 KB).
#[derive(Debug, Default)]
pub(super) struct Scratch {
    weights: Vec<f32>,
    block_sums: Vec<f32>,
    ids: Vec<u32>,
    id_weights: Vec<f32>,
}

/// The tokens that may be drawn and their weights (not normalised).
#[derive(Debug)]
pub(super) enum Support<'a> {
    /// Every token, by id; excluded tokens weigh 0. `block_sums[b]` is the sum of
    /// `weights[b * BLOCK..]`'s block.
    Dense {
        weights: &'a [f32],
        block_sums: &'a [f32],
    },
    /// These tokens with these weights.
    Listed { ids: &'a [u32], weights: &'a [f32] },
}

/// Draws from the tempered distribution, then accepts the token only when it is in the
/// nucleus (and passes min-p), before falling back to building the nucleus: this many
/// tries. Each try is accepted with the nucleus' probability (at least top_p without
/// min-p), so the fallback runs for fewer than 1 in 10^8 draws at top_p 0.9.
const REJECTION_TRIES: usize = 8;

avx512_or_portable! {
    /// One token drawn from the distribution of logits `l` (after the logit processors:
    /// banned tokens are -inf) under `f`, with uniform numbers in [0, 1) from `uniform`.
    /// `None` when no logit is finite.
    pub(super) fn draw(l: &[f32], f: &Filters, s: &mut Scratch, uniform: &mut dyn FnMut() -> f64) -> Option<u32> = draw_impl
}

#[inline(always)]
fn draw_impl(l: &[f32], f: &Filters, s: &mut Scratch, uniform: &mut dyn FnMut() -> f64) -> Option<u32> {
    if f.top_k.is_none() && f.top_p < 1.0 {
        // Top-p by rejection: a draw from the whole distribution, restricted to the
        // nucleus, is a draw from the nucleus. Whether a token is in it is one masked sum
        // (the mass ranked above it), so no nucleus of thousands of tokens (a flat
        // distribution: a random model's, or a high temperature) is ever built.
        let max = max(l);
        if max == f32::NEG_INFINITY {
            return None;
        }
        let z = dense_weights(l, max, f.inv_t, &mut s.weights, &mut s.block_sums);
        let need = f.top_p as f64 * z as f64;
        let dense = Support::Dense {
            weights: &s.weights,
            block_sums: &s.block_sums,
        };
        for _ in 0..REJECTION_TRIES {
            let x = dense.pick(uniform())? as usize;
            if s.weights[x] >= f.min_p && mass_ranked_above(l, &s.weights, x) < need {
                return Some(x as u32);
            }
        }
    }
    support_impl(l, f, s)?.pick(uniform())
}

/// The total weight of the tokens that rank above token `x` ([`rank`] order: a higher
/// logit, or the same logit and a lower id).
#[inline(always)]
fn mass_ranked_above(l: &[f32], w: &[f32], x: usize) -> f64 {
    let lx = l[x];
    masked_sum(&l[..x], &w[..x], |v| v >= lx) + masked_sum(&l[x + 1..], &w[x + 1..], |v| v > lx)
}

/// The sum of `w` where `keep` holds for `l`: 16 lanes in f32 per block, blocks in f64.
#[inline(always)]
fn masked_sum(l: &[f32], w: &[f32], keep: impl Fn(f32) -> bool + Copy) -> f64 {
    let mut total = 0f64;
    for (l, w) in l.chunks(BLOCK).zip(w.chunks(BLOCK)) {
        let mut lanes = [0f32; 16];
        let (lc, wc) = (l.chunks_exact(16), w.chunks_exact(16));
        let rest: f32 = lc
            .remainder()
            .iter()
            .zip(wc.remainder())
            .map(|(&v, &w)| if keep(v) { w } else { 0.0 })
            .sum();
        for (l, w) in lc.zip(wc) {
            for i in 0..16 {
                // Both loaded first: a load under the condition kept this loop scalar.
                let (v, w) = (l[i], w[i]);
                lanes[i] += if keep(v) { w } else { 0.0 };
            }
        }
        let mut block = rest;
        for v in lanes {
            block += v;
        }
        total += block as f64;
    }
    total
}

/// The distribution to draw from for logits `l` under `f`, built in full (ordered as far
/// as the filters need). `None` when no logit is finite.
#[cfg(test)]
pub(super) fn support<'s>(l: &[f32], f: &Filters, s: &'s mut Scratch) -> Option<Support<'s>> {
    support_impl(l, f, s)
}

#[inline(always)]
fn support_impl<'s>(l: &[f32], f: &Filters, s: &'s mut Scratch) -> Option<Support<'s>> {
    let max = max(l);
    // Also NaN-free: `max` ignores NaN.
    if max == f32::NEG_INFINITY {
        return None;
    }
    let Scratch {
        weights,
        block_sums,
        ids,
        id_weights,
    } = s;
    if let Some(k) = f.top_k {
        top_k_into(l, k, ids);
        // Top-p's probabilities are of the whole distribution, not of the k kept.
        let z = if f.top_p < 1.0 {
            sum_weights(l, max, f.inv_t)
        } else {
            1.0
        };
        id_weights.clear();
        id_weights.extend(ids.iter().map(|&i| weight(l[i as usize], max, f.inv_t)));
        cut_sorted(ids, id_weights, z, f);
        return Some(Support::Listed {
            ids,
            weights: id_weights,
        });
    }
    let z = dense_weights(l, max, f.inv_t, weights, block_sums);
    if f.top_p < 1.0 {
        let need = f.top_p as f64 * z as f64;
        let mut reached = false;
        for t in NUCLEUS_THRESHOLDS {
            collect_at_least(weights, t, ids);
            if ids.iter().map(|&i| weights[i as usize] as f64).sum::<f64>() >= need {
                reached = true;
                break;
            }
        }
        // Every token with weight falls short only by rounding: then they are all kept.
        let keep = if reached {
            nucleus_len(ids, l, weights, need)
        } else {
            ids.len()
        };
        ids.truncate(keep);
        if f.min_p > 0.0 {
            // The top token, which weighs 1, is always in the nucleus.
            ids.retain(|&i| weights[i as usize] >= f.min_p);
        }
        id_weights.clear();
        id_weights.extend(ids.iter().map(|&i| weights[i as usize]));
        return Some(Support::Listed {
            ids,
            weights: id_weights,
        });
    }
    if f.min_p > 0.0 {
        // The top token weighs 1: a token whose probability is at least min_p times the
        // top one's weighs at least min_p.
        collect_at_least(weights, f.min_p, ids);
        id_weights.clear();
        id_weights.extend(ids.iter().map(|&i| weights[i as usize]));
        return Some(Support::Listed {
            ids,
            weights: id_weights,
        });
    }
    Some(Support::Dense { weights, block_sums })
}

/// A token's weight relative to the top one: `e^((x - max) / T)`. -inf (banned), NaN and
/// anything 87 nats below the top weigh 0 (vmath's `exp` would clamp them to 1e-38).
#[inline(always)]
fn weight(x: f32, max: f32, inv_t: f32) -> f32 {
    let s = (x - max) * inv_t;
    let e = exp(s);
    if s >= -87.0 {
        e
    } else {
        0.0
    }
}

/// Every token's weight into `weights`, each block's sum into `block_sums`; returns the
/// total.
#[inline(always)]
fn dense_weights(l: &[f32], max: f32, inv_t: f32, weights: &mut Vec<f32>, block_sums: &mut Vec<f32>) -> f32 {
    // Written in full below: resizing only when the vocabulary changes.
    if weights.len() != l.len() {
        weights.resize(l.len(), 0.0);
    }
    block_sums.clear();
    let mut total = 0f64;
    for (w, x) in weights.chunks_mut(BLOCK).zip(l.chunks(BLOCK)) {
        for (w, &x) in w.iter_mut().zip(x) {
            *w = weight(x, max, inv_t);
        }
        let sum = fold16(w, 0.0, |v| v, |a, b| a + b);
        block_sums.push(sum);
        total += sum as f64;
    }
    total as f32
}

/// The total weight of `l` (the probabilities' normaliser), without keeping the weights.
#[inline(always)]
fn sum_weights(l: &[f32], max: f32, inv_t: f32) -> f32 {
    // Loops, not iterator adapters: a `map(..).sum()` here was compiled out of line for
    // the baseline target, not for the caller's AVX-512.
    let mut total = 0f64;
    for x in l.chunks(BLOCK) {
        total += fold16(x, 0.0, |v| weight(v, max, inv_t), |a, b| a + b) as f64;
    }
    total as f32
}

/// Reorders `ids` so that its first `n` are the nucleus, the fewest best-ranked tokens
/// (in [`rank`] order) whose weights sum to at least `need`, and returns `n` (all of
/// them when they fall short). A quickselect that descends by mass, in expected linear
/// time: sorting a nucleus of thousands of tokens took a millisecond.
fn nucleus_len(ids: &mut [u32], l: &[f32], w: &[f32], need: f64) -> usize {
    let (mut lo, mut hi, mut before) = (0, ids.len(), 0f64);
    let mass = |ids: &[u32]| ids.iter().map(|&i| w[i as usize] as f64).sum::<f64>();
    while hi - lo > 32 {
        let part = &mut ids[lo..hi];
        let n = part.len();
        // The median of three distinct tokens: some token ranks below it and it ranks at
        // or above itself, so both sides of the partition are non-empty.
        let mut three = [part[0], part[n / 2], part[n - 1]];
        three.sort_unstable_by(|&a, &b| rank(l, a, b));
        let pivot = three[1];
        let mut upper = 0;
        for j in 0..n {
            if rank(l, part[j], pivot).is_le() {
                part.swap(upper, j);
                upper += 1;
            }
        }
        let upper_mass = mass(&part[..upper]);
        if before + upper_mass >= need {
            hi = lo + upper;
        } else {
            before += upper_mass;
            lo += upper;
        }
    }
    ids[lo..hi].sort_unstable_by(|&a, &b| rank(l, a, b));
    for (j, &i) in ids.iter().enumerate().take(hi).skip(lo) {
        before += w[i as usize] as f64;
        if before >= need {
            return j + 1;
        }
    }
    hi
}

/// The ids of the tokens weighing at least `threshold` (> 0), in id order.
#[inline(always)]
fn collect_at_least(weights: &[f32], threshold: f32, ids: &mut Vec<u32>) {
    const CHUNK: usize = 64;
    ids.clear();
    for (c, chunk) in weights.chunks(CHUNK).enumerate() {
        if !any_at_least(chunk, threshold) {
            continue;
        }
        for (j, &w) in chunk.iter().enumerate() {
            if w >= threshold {
                ids.push((c * CHUNK + j) as u32);
            }
        }
    }
}

/// Applies top-p and min-p to candidates sorted best first (`weights` relative to the
/// top token, `z` the whole distribution's total weight). Returns false when the
/// candidates' probabilities do not reach `top_p` (all of them are then kept).
fn cut_sorted(ids: &mut Vec<u32>, weights: &mut Vec<f32>, z: f32, f: &Filters) -> bool {
    let mut reached = true;
    if f.top_p < 1.0 {
        reached = false;
        // In f64: a nucleus of thousands of tokens summed in f32 drifts by more than the
        // probability of the tokens at its edge.
        let (z64, top_p) = (z as f64, f.top_p as f64);
        let mut cum = 0f64;
        for (j, &w) in weights.iter().enumerate() {
            cum += w as f64 / z64;
            if cum >= top_p {
                ids.truncate(j + 1);
                weights.truncate(j + 1);
                reached = true;
                break;
            }
        }
    }
    if f.min_p > 0.0 && !weights.is_empty() {
        let floor = weights[0] / z * f.min_p;
        let mut kept = 0;
        for j in 0..weights.len() {
            if weights[j] / z >= floor {
                (ids[kept], weights[kept]) = (ids[j], weights[j]);
                kept += 1;
            }
        }
        ids.truncate(kept);
        weights.truncate(kept);
    }
    reached
}

impl Support<'_> {
    /// The token whose run of cumulative weight holds `u` (in [0, 1)) times the total;
    /// `None` when nothing has weight.
    pub fn pick(&self, u: f64) -> Option<u32> {
        match *self {
            Support::Dense { weights, block_sums } => {
                let total: f64 = block_sums.iter().map(|&s| s as f64).sum();
                let r = u * total;
                let mut before = 0f64;
                for (b, &sum) in block_sums.iter().enumerate() {
                    let after = before + sum as f64;
                    if r < after {
                        let block = &weights[b * BLOCK..((b + 1) * BLOCK).min(weights.len())];
                        return walk(block, r - before).map(|j| (b * BLOCK + j) as u32);
                    }
                    before = after;
                }
                last_weighted(weights).map(|j| j as u32)
            }
            Support::Listed { ids, weights } => {
                let total: f64 = weights.iter().map(|&w| w as f64).sum();
                walk(weights, u * total).map(|j| ids[j])
            }
        }
    }

    /// Each token's probability (tests compare them with a full sort's).
    #[cfg(test)]
    pub fn probabilities(&self, vocab: usize) -> Vec<f64> {
        let mut p = vec![0f64; vocab];
        match *self {
            Support::Dense { weights, .. } => {
                for (p, &w) in p.iter_mut().zip(weights) {
                    *p = w as f64;
                }
            }
            Support::Listed { ids, weights } => {
                for (&i, &w) in ids.iter().zip(weights) {
                    p[i as usize] = w as f64;
                }
            }
        }
        let total: f64 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= total);
        p
    }
}

/// The first index at which the running sum of `weights` passes `r`; the last weighted one
/// when rounding leaves `r` past the sum.
fn walk(weights: &[f32], r: f64) -> Option<usize> {
    let mut cum = 0f64;
    for (j, &w) in weights.iter().enumerate() {
        cum += w as f64;
        if r < cum {
            return Some(j);
        }
    }
    last_weighted(weights)
}

fn last_weighted(weights: &[f32]) -> Option<usize> {
    weights.iter().rposition(|&w| w > 0.0)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The distribution as the sampler defined it before it stopped sorting: every
    /// finite token sorted by logit, probabilities of the whole tempered distribution,
    /// the first `top_k`, then the shortest prefix reaching `top_p`, then those at least
    /// `min_p` times the first; renormalised. In f64 with the standard library's `exp`.
    pub(crate) fn full_sort_reference(l: &[f32], f: &Filters) -> Vec<f64> {
        let mut idx: Vec<u32> = (0..l.len() as u32)
            .filter(|&i| l[i as usize] > f32::NEG_INFINITY)
            .collect();
        idx.sort_by(|&a, &b| rank(l, a, b));
        let max = l[idx[0] as usize] as f64;
        let w = |i: u32| ((l[i as usize] as f64 - max) * f.inv_t as f64).exp();
        let z: f64 = idx.iter().map(|&i| w(i)).sum();
        let mut probs: Vec<(u32, f64)> = idx.iter().map(|&i| (i, w(i) / z)).collect();
        if let Some(k) = f.top_k {
            probs.truncate(k);
        }
        if f.top_p < 1.0 {
            let mut cum = 0.0;
            if let Some(j) = probs.iter().position(|&(_, p)| {
                cum += p;
                cum >= f.top_p as f64
            }) {
                probs.truncate(j + 1);
            }
        }
        if f.min_p > 0.0 {
            let floor = probs[0].1 * f.min_p as f64;
            probs.retain(|&(_, p)| p >= floor);
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let mut out = vec![0f64; l.len()];
        for (i, p) in probs {
            out[i as usize] = p / total;
        }
        out
    }

    /// Logits shaped like a language model's: a few likely tokens, a long tail, runs of
    /// equal values (ties), and some banned (-inf).
    pub(crate) fn model_like_logits(vocab: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as f32 / (1u64 << 31) as f32
        };
        (0..vocab)
            .map(|i| {
                if i % 97 == 13 {
                    f32::NEG_INFINITY
                } else if i % 11 == 0 {
                    2.5 // ties
                } else {
                    let u = next();
                    // Heavy head: a few tokens far above a Gaussian-ish tail.
                    if u > 0.998 {
                        8.0 + 4.0 * next()
                    } else {
                        4.0 * (next() + next() + next()) - 6.0
                    }
                }
            })
            .collect()
    }

    pub(crate) fn filter_grid() -> Vec<Filters> {
        let mut grid = Vec::new();
        for inv_t in [1.0, 1.0 / 0.7, 1.0 / 1.6, 1.0 / 0.05] {
            for top_k in [None, Some(5), Some(40), Some(400)] {
                for top_p in [1.0, 0.9, 0.5, 0.999] {
                    for min_p in [0.0, 0.05, 0.3] {
                        grid.push(Filters {
                            inv_t,
                            top_k,
                            top_p,
                            min_p,
                        });
                    }
                }
            }
        }
        grid
    }

    /// The support built without sorting (the fallback of the draw) has the full sort's
    /// tokens and probabilities, for every combination of filters.
    /// Tolerance: 1e-6 plus 1e-4 relative per token (f32 weights and vmath's `exp` against
    /// f64 and libm's).
    #[test]
    fn support_matches_the_full_sort() {
        let mut s = Scratch::default();
        for (vocab, seed) in [(3001, 1), (49152, 2), (100, 3)] {
            let l = model_like_logits(vocab, seed);
            // A flat distribution too, whose nucleus spans thousands of tokens.
            let flat: Vec<f32> = (0..vocab).map(|i| ((i * 31) % 17) as f32 * 0.01).collect();
            for l in [&l, &flat] {
                for f in filter_grid() {
                    let want = full_sort_reference(l, &f);
                    let got = support(l, &f, &mut s).unwrap().probabilities(vocab);
                    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-6 + 1e-4 * w,
                            "vocab {vocab} {f:?}: token {i} has {g}, the full sort {w}"
                        );
                    }
                }
            }
        }
    }

    /// The mass ranked above a token is the sum of the weights before it in a full sort,
    /// for a token of each kind: the top, in a run of ties, in the tail, banned.
    #[test]
    fn mass_ranked_above_is_the_sorted_prefix() {
        let l = model_like_logits(3001, 4);
        let w: Vec<f32> = l.iter().map(|&x| weight(x, 12.0, 0.8)).collect();
        let mut sorted: Vec<u32> = (0..l.len() as u32).collect();
        sorted.sort_by(|&a, &b| rank(&l, a, b));
        let top = sorted[0] as usize;
        for x in [top, 0, 11, 22, 2990, 13, 1500] {
            let pos = sorted.iter().position(|&t| t as usize == x).unwrap();
            let want: f64 = sorted[..pos].iter().map(|&t| w[t as usize] as f64).sum();
            let got = mass_ranked_above(&l, &w, x);
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want),
                "token {x}: {got} vs {want}"
            );
        }
    }

    /// Nothing finite: no distribution; a draw never lands on a weightless token, even
    /// with `u` at the top of its range.
    #[test]
    fn edges() {
        let mut s = Scratch::default();
        let f = Filters {
            inv_t: 1.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
        };
        assert!(support(&[f32::NEG_INFINITY; 40], &f, &mut s).is_none());
        for top_p in [1.0, 0.5] {
            let f = Filters { top_p, ..f };
            assert_eq!(draw(&[f32::NEG_INFINITY; 40], &f, &mut s, &mut || 0.5), None);
        }
        let mut l = vec![f32::NEG_INFINITY; 2000];
        l[1500] = 0.0;
        l[3] = -1000.0; // 1000 nats down: weighs 0
        let d = support(&l, &f, &mut s).unwrap();
        for u in [0.0, 0.5, 1.0 - f64::EPSILON, 1.0] {
            assert_eq!(d.pick(u), Some(1500), "u = {u}");
        }
    }
}
