//! CPU attention over the paged KV cache.
//!
//! Hand-written because no crate does this: candle's attention wants each sequence's keys
//! and values as one contiguous tensor, which would mean gathering the whole cache of
//! every sequence into a fresh buffer at every step. This kernel reads keys and values in
//! place, block by block, through each sequence's block table, and handles a batch that
//! mixes prompt chunks (causal within the chunk, plus the cached prefix) with one-token
//! decodes. Work is split over (token, head) pairs on rayon's pool, which is also the pool
//! candle's matmuls use, so the model never oversubscribes the cores.

use rayon::prelude::*;

use crate::kv::KvLayer;

/// One sequence's part of a batch: its query tokens are rows
/// `first_token..first_token + len` of `q`, at positions `start_pos..start_pos + len`.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    pub first_token: usize,
    pub len: usize,
    pub start_pos: usize,
    pub block_table: &'a [u32],
}

/// Head counts and sizes. `num_heads` must be a multiple of `num_kv_heads` (grouped-query
/// attention: query head `h` reads key/value head `h / (num_heads / num_kv_heads)`).
#[derive(Debug, Clone, Copy)]
pub struct AttnGeometry {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub value_dim: usize,
    pub block_size: usize,
    /// Values are not stored separately but read from each cached key vector at this
    /// offset (latent attention: the latent is both key and value).
    pub value_offset: Option<usize>,
}

/// Writes the keys `[T, num_kv_heads * key_dim]` and values of a batch's tokens into
/// their cache slots.
pub fn write_kv(layer: &mut KvLayer, slots: &[usize], keys: &[f32], values: &[f32]) {
    let t = slots.len();
    let kw = keys.len() / t.max(1);
    let vw = values.len() / t.max(1);
    for (i, &slot) in slots.iter().enumerate() {
        layer.keys[slot * kw..(slot + 1) * kw].copy_from_slice(&keys[i * kw..(i + 1) * kw]);
        if vw > 0 {
            layer.values[slot * vw..(slot + 1) * vw].copy_from_slice(&values[i * vw..(i + 1) * vw]);
        }
    }
}

/// Causal attention of every query token over its sequence's cached positions
/// `0..=pos`. `q` is `[T, num_heads, head_dim]`; returns `[T, num_heads, value_dim]`.
/// The cache must already hold this batch's keys and values (see [`write_kv`]).
pub fn paged_attention(
    q: &[f32],
    layer: &KvLayer,
    seqs: &[AttnSeq],
    g: AttnGeometry,
    scale: f32,
) -> Vec<f32> {
    let num_tokens: usize = seqs.iter().map(|s| s.len).sum();
    debug_assert_eq!(q.len(), num_tokens * g.num_heads * g.head_dim);
    // token index -> (sequence, position)
    let mut token_pos = vec![(0usize, 0usize); num_tokens];
    for (si, s) in seqs.iter().enumerate() {
        for i in 0..s.len {
            token_pos[s.first_token + i] = (si, s.start_pos + i);
        }
    }
    let group = g.num_heads / g.num_kv_heads;
    // A task is one token's query heads that share a key/value head, so each cached key
    // and value is read once for all of them; when that leaves too few tasks to keep
    // every thread busy (batch-1 decode), a task is a single head.
    let heads_per_task = if num_tokens * g.num_kv_heads >= 4 * rayon::current_num_threads() {
        group
    } else {
        1
    };
    let attend = attend_kernel();
    let mut out = vec![0f32; num_tokens * g.num_heads * g.value_dim];
    out.par_chunks_mut(heads_per_task * g.value_dim)
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (task, out)| {
            let first_row = task * heads_per_task;
            let (t, h) = (first_row / g.num_heads, first_row % g.num_heads);
            let (si, pos) = token_pos[t];
            let job = AttendJob {
                q: &q[first_row * g.head_dim..(first_row + heads_per_task) * g.head_dim],
                layer,
                table: seqs[si].block_table,
                kv_head: h / group,
                len: pos + 1,
                g: &g,
                scale,
            };
            // SAFETY: `attend_kernel` only returns kernels the CPU supports.
            unsafe { attend(&job, scores, out) };
        });
    out
}

/// One task of [`paged_attention`]: `q` holds one token's query heads (all reading
/// `kv_head`), attending over cached positions `0..len`.
struct AttendJob<'a> {
    q: &'a [f32],
    layer: &'a KvLayer,
    table: &'a [u32],
    kv_head: usize,
    len: usize,
    g: &'a AttnGeometry,
    scale: f32,
}

type AttendKernel = unsafe fn(&AttendJob, &mut Vec<f32>, &mut [f32]);

/// The attention inner loops compiled for the best instruction set the CPU has (they are
/// dot products and axpys over head_dim floats; baseline x86-64 would do them 4 wide).
fn attend_kernel() -> AttendKernel {
    static KERNEL: std::sync::OnceLock<AttendKernel> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("fma") {
                return attend_avx512;
            }
            if has!("avx2") && has!("fma") {
                return attend_avx2;
            }
        }
        attend_portable
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_avx512(job: &AttendJob, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend(job, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(job: &AttendJob, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend(job, scores, out)
}

unsafe fn attend_portable(job: &AttendJob, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend(job, scores, out)
}

/// Softmax attention of `heads` query vectors over the same cached keys and values:
/// `scores` is `[heads, len]`, `out` is `[heads, value_dim]`.
#[inline(always)]
fn attend(job: &AttendJob, scores: &mut Vec<f32>, out: &mut [f32]) {
    let g = job.g;
    let heads = job.q.len() / g.head_dim;
    let n = job.len;
    let k_stride = g.num_kv_heads * g.head_dim;
    let v_stride = g.num_kv_heads * g.value_dim;
    let slot = |j: usize| job.table[j / g.block_size] as usize * g.block_size + j % g.block_size;
    scores.clear();
    scores.resize(heads * n, 0.0);
    for j in 0..n {
        let k = &job.layer.keys[slot(j) * k_stride + job.kv_head * g.head_dim..][..g.head_dim];
        for (hi, qv) in job.q.chunks_exact(g.head_dim).enumerate() {
            scores[hi * n + j] = dot(qv, k) * job.scale;
        }
    }
    for s in scores.chunks_exact_mut(n) {
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in s.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in s.iter_mut() {
            *v *= inv;
        }
    }
    for j in 0..n {
        let v = match g.value_offset {
            Some(off) => {
                &job.layer.keys[slot(j) * k_stride + job.kv_head * g.head_dim + off..][..g.value_dim]
            }
            None => &job.layer.values[slot(j) * v_stride + job.kv_head * g.value_dim..][..g.value_dim],
        };
        for (hi, o) in out.chunks_exact_mut(g.value_dim).enumerate() {
            axpy(scores[hi * n + j], v, o);
        }
    }
}

/// Dot product with eight independent accumulators, so the compiler vectorises it
/// (a single running sum would serialise on floating-point addition order).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `out += w * v`
#[inline(always)]
fn axpy(w: f32, v: &[f32], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += w * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{BlockAllocator, BlockTable, KvCache, KvLayout};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Plain causal attention over contiguous K/V, written the textbook way.
    fn naive(q: &[f32], k: &[f32], v: &[f32], start: usize, g: AttnGeometry, scale: f32) -> Vec<f32> {
        let t = q.len() / (g.num_heads * g.head_dim);
        let group = g.num_heads / g.num_kv_heads;
        let mut out = vec![0f32; t * g.num_heads * g.value_dim];
        for i in 0..t {
            let pos = start + i;
            for h in 0..g.num_heads {
                let kvh = h / group;
                let qv = &q[(i * g.num_heads + h) * g.head_dim..][..g.head_dim];
                let scores: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let kk = &k[(j * g.num_kv_heads + kvh) * g.head_dim..][..g.head_dim];
                        qv.iter().zip(kk).map(|(a, b)| (a * b) as f64).sum::<f64>() * scale as f64
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..g.value_dim {
                    let acc: f64 = (0..=pos)
                        .map(|j| e[j] / z * v[(j * g.num_kv_heads + kvh) * g.value_dim + d] as f64)
                        .sum();
                    out[(i * g.num_heads + h) * g.value_dim + d] = acc as f32;
                }
            }
        }
        out
    }

    #[test]
    fn paged_matches_contiguous_for_mixed_prefill_and_decode() {
        let g = AttnGeometry {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 12,
            value_dim: 12,
            block_size: 4,
            value_offset: None,
        };
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: 2,
            key_dim: 12,
            value_dim: 12,
        };
        let mut kv = KvCache::new(layout, g.block_size, 32).unwrap();
        let mut alloc = BlockAllocator::new(32);
        let mut rng = StdRng::seed_from_u64(7);
        let mut rand_vec = |n: usize| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>();
        // Sequence A: 10 cached positions, then a 1-token decode at position 10.
        // Sequence B: 3 cached positions, then a 6-token prompt chunk at positions 3..9.
        let (len_a, len_b) = (11usize, 9usize);
        let (ka, va) = (rand_vec(len_a * 24), rand_vec(len_a * 24));
        let (kb, vb) = (rand_vec(len_b * 24), rand_vec(len_b * 24));
        let mut ta = BlockTable::new();
        let mut tb = BlockTable::new();
        // Interleave allocations so the tables are not contiguous runs.
        for n in 1..=3 {
            ta.reserve(&mut alloc, n * 4, 4).unwrap();
            tb.reserve(&mut alloc, n * 4, 4).unwrap();
        }
        let slots = |t: &BlockTable, n: usize| {
            (0..n)
                .map(|p| kv.slot(t.blocks(), p).unwrap())
                .collect::<Vec<_>>()
        };
        let (sa, sb) = (slots(&ta, len_a), slots(&tb, len_b));
        write_kv(kv.layer_mut(0), &sa, &ka, &va);
        write_kv(kv.layer_mut(0), &sb, &kb, &vb);

        let qa = rand_vec(4 * 12);
        let qb = rand_vec(6 * 4 * 12);
        let q: Vec<f32> = qa.iter().chain(&qb).copied().collect();
        let seqs = [
            AttnSeq {
                first_token: 0,
                len: 1,
                start_pos: 10,
                block_table: ta.blocks(),
            },
            AttnSeq {
                first_token: 1,
                len: 6,
                start_pos: 3,
                block_table: tb.blocks(),
            },
        ];
        let scale = 0.3;
        let out = paged_attention(&q, kv.layer(0), &seqs, g, scale);
        let want_a = naive(&qa, &ka, &va, 10, g, scale);
        let want_b = naive(&qb, &kb[..len_b * 24], &vb, 3, g, scale);
        let want: Vec<f32> = want_a.into_iter().chain(want_b).collect();
        let max_err = out
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_err < 1e-5, "max abs error {max_err}");
    }

    #[test]
    fn dot_matches_naive_sum_for_odd_lengths() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.1).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-4);
    }
}
