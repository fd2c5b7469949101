//! Partial selection over a vocabulary's logits: the few best tokens without sorting all
//! of them (a 49k-token vocabulary's full sort took milliseconds per sampled token).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::backend::cpu::vmath::any_at_least;

/// The order in which tokens rank everywhere in sampling: higher logit first (IEEE total
/// order), lower id first among equals.
#[inline]
pub(super) fn rank(l: &[f32], a: u32, b: u32) -> Ordering {
    l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b))
}

/// Logits scanned per chunk: a chunk whose largest value cannot enter is skipped whole.
const CHUNK: usize = 64;
/// Up to this `k` the best are kept in a heap during one scan; above it a selection over
/// every finite token costs less than the heap's pushes.
const HEAP_MAX_K: usize = 256;

/// A kept token in the heap, ordered so that the worst kept one is on top.
#[derive(Clone, Copy)]
struct Kept {
    logit: f32,
    id: u32,
}

impl Ord for Kept {
    fn cmp(&self, other: &Self) -> Ordering {
        // Greater means worse: a lower logit, or the same logit and a higher id.
        other.logit.total_cmp(&self.logit).then(self.id.cmp(&other.id))
    }
}

impl PartialOrd for Kept {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Kept {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Kept {}

/// The `k` best tokens of `l` among those with a finite logit (or -inf excluded and NaN
/// excluded: banned tokens), best first in [`rank`] order; all of them when fewer.
#[inline(always)]
pub(super) fn top_k_into(l: &[f32], k: usize, out: &mut Vec<u32>) {
    out.clear();
    if k == 0 {
        return;
    }
    if k > HEAP_MAX_K {
        out.extend((0..l.len() as u32).filter(|&i| l[i as usize] > f32::NEG_INFINITY));
        if k < out.len() {
            out.select_nth_unstable_by(k - 1, |&a, &b| rank(l, a, b));
            out.truncate(k);
        }
        out.sort_unstable_by(|&a, &b| rank(l, a, b));
        return;
    }
    let mut heap = BinaryHeap::with_capacity(k);
    // The logit to beat once the heap is full (the worst kept). Tokens come in id order,
    // so one that only ties it has the higher id and ranks below it: it must be greater.
    let mut floor = f32::NEG_INFINITY;
    for (c, chunk) in l.chunks(CHUNK).enumerate() {
        // At least, not above: -0.0 and 0.0 compare equal here but not in the total order.
        if heap.len() == k && !any_at_least(chunk, floor) {
            continue;
        }
        for (j, &logit) in chunk.iter().enumerate() {
            if logit == f32::NEG_INFINITY || logit.is_nan() {
                continue;
            }
            let id = (c * CHUNK + j) as u32;
            if heap.len() < k {
                heap.push(Kept { logit, id });
                if heap.len() == k {
                    floor = heap.peek().map_or(f32::NEG_INFINITY, |w: &Kept| w.logit);
                }
            } else if logit.total_cmp(&floor).is_gt() {
                *heap.peek_mut().expect("full heap") = Kept { logit, id };
                floor = heap.peek().map_or(f32::NEG_INFINITY, |w| w.logit);
            }
        }
    }
    // Ascending in `Kept`'s order is best first.
    out.extend(heap.into_sorted_vec().into_iter().map(|w| w.id));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The heap scan and the selection give exactly the first `k` of a full sort in
    /// [`rank`] order, over ties, signed zeros, banned (-inf) and NaN values, and chunk
    /// boundaries.
    #[test]
    fn top_k_is_the_head_of_a_full_sort() {
        let n = 1000;
        let mut l: Vec<f32> = (0..n).map(|i| ((i * 7919) % 113) as f32 * 0.25 - 10.0).collect();
        for i in (0..n).step_by(37) {
            l[i] = f32::NEG_INFINITY;
        }
        l[5] = f32::NAN;
        l[6] = -0.0;
        l[700] = 0.0;
        let mut sorted: Vec<u32> = (0..n as u32)
            .filter(|&i| l[i as usize] > f32::NEG_INFINITY)
            .collect();
        sorted.sort_by(|&a, &b| rank(&l, a, b));
        let mut out = Vec::new();
        for k in [1, 2, 3, 16, 40, 64, 65, 255, 256, 257, 500, 970, 2000] {
            top_k_into(&l, k, &mut out);
            assert_eq!(out, sorted[..k.min(sorted.len())], "k = {k}");
        }
        // Signed zeros at the boundary: 0.0 ranks above -0.0, ids break the rest.
        let zeros: Vec<f32> = (0..200).map(|i| if i % 3 == 2 { 0.0 } else { -0.0 }).collect();
        let mut sorted: Vec<u32> = (0..200).collect();
        sorted.sort_by(|&a, &b| rank(&zeros, a, b));
        for k in [1, 10, 66, 67, 68, 150] {
            top_k_into(&zeros, k, &mut out);
            assert_eq!(out, sorted[..k], "zeros, k = {k}");
        }
        // Rising values: every token displaces the worst kept one.
        let rising: Vec<f32> = (0..300).map(|i| i as f32).collect();
        top_k_into(&rising, 5, &mut out);
        assert_eq!(out, [299, 298, 297, 296, 295]);
    }
}
