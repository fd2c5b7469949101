//! CPU attention over the paged KV cache.
//!
//! Hand-written because no crate does this: candle's attention wants each sequence's keys
//! and values as one contiguous tensor, which would mean gathering the whole cache of
//! every sequence into a fresh buffer at every step. This kernel reads keys and values in
//! place, block by block, through each sequence's block table, and handles a batch that
//! mixes prompt chunks (causal within the chunk, plus the cached prefix) with one-token
//! decodes. Work is split over (token, head) pairs on rayon's pool, which is also the pool
//! candle's matmuls use, so the model never oversubscribes the cores.

use candle_core::Tensor;
use rayon::prelude::*;

use super::host::with_f32;
use super::isa::Isa;
use super::kv_buffer::KvBuffer;
use super::simd::{self, F32x};
use super::vmath::softmax_rows;
use crate::error::{Error, Result};
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
    /// The scores' factor before the softmax (`1/sqrt(head_dim)` for plain attention).
    pub scale: f32,
}

impl AttnGeometry {
    /// Where the `dim` values of head `kv_head` at cache slot `slot` start in a layer's
    /// buffer. Within a block, each head's vectors are contiguous (`[block][head][slot in
    /// block][dim]`), so attention streams a block of one head as one run of memory.
    #[inline(always)]
    pub fn offset(&self, slot: usize, kv_head: usize, dim: usize) -> usize {
        let (block, at) = (slot / self.block_size, slot % self.block_size);
        self.block_start(block, kv_head, dim) + at * dim
    }

    /// Where head `kv_head`'s run of `block_size` vectors of `dim` values starts in
    /// cache block `block`.
    #[inline(always)]
    pub fn block_start(&self, block: usize, kv_head: usize, dim: usize) -> usize {
        (block * self.num_kv_heads + kv_head) * self.block_size * dim
    }

    /// Keys are stored transposed within each block and head (`[dim][slot in block]`), so
    /// the scores of 16 consecutive positions are 16 lanes of one multiply-add per key
    /// dimension, with no reduction across lanes. Not for latent attention, whose cached
    /// vector is read as the value too.
    #[inline(always)]
    pub fn keys_transposed(&self) -> bool {
        self.value_offset.is_none()
    }

    /// Where element 0 of the key of head `kv_head` at cache slot `slot` is, and the
    /// distance between its consecutive elements.
    #[inline(always)]
    pub fn key_at(&self, slot: usize, kv_head: usize) -> (usize, usize) {
        if self.keys_transposed() {
            let (block, at) = (slot / self.block_size, slot % self.block_size);
            (
                self.block_start(block, kv_head, self.head_dim) + at,
                self.block_size,
            )
        } else {
            (self.offset(slot, kv_head, self.head_dim), 1)
        }
    }
}

/// [`write_kv`] for tensors (`[T, num_kv_heads * head_dim]` keys, values likewise or
/// none), read in place.
pub(crate) fn write_kv_tensors(
    layer: &mut KvLayer,
    g: &AttnGeometry,
    slots: &[usize],
    (keys, values): (&Tensor, Option<&Tensor>),
) -> Result<()> {
    crate::backend::check_kv_write(g, slots, (keys, values))?;
    with_f32(keys, |k| match values {
        Some(v) => with_f32(v, |v| write_kv(layer, g, slots, k, v)),
        None => {
            write_kv(layer, g, slots, k, &[]);
            Ok(())
        }
    })?
}

/// [`paged_attention`] for a query tensor `[T, num_heads * head_dim]`, read in place;
/// `[T, num_heads * value_dim]` back.
pub(crate) fn attend_tensor(
    isa: Isa,
    q: &Tensor,
    layer: &KvLayer,
    seqs: &[AttnSeq],
    g: AttnGeometry,
) -> Result<Tensor> {
    let t: usize = seqs.iter().map(|s| s.len).sum();
    if q.elem_count() != t * g.num_heads * g.head_dim {
        return Err(Error::InvalidBatch(format!(
            "a query of {} values for {t} tokens of geometry {g:?}",
            q.elem_count()
        )));
    }
    let out = with_f32(q, |q| paged_attention(isa, q, layer, seqs, g))?;
    Ok(Tensor::from_vec(out, (t, g.num_heads * g.value_dim), q.device())?)
}

/// The cached key vectors (`width` values each, untransposed: latent attention's) at
/// `slots`, as `[slots, width]`.
pub(crate) fn read_keys(layer: &KvLayer, slots: &[usize], width: usize) -> Result<Tensor> {
    let mut rows = Vec::with_capacity(slots.len() * width);
    for &slot in slots {
        if (slot + 1) * width > layer.keys.len() {
            return Err(Error::InvalidBatch(format!(
                "cache slot {slot} is outside the layer"
            )));
        }
        layer.keys.read_into(slot * width, width, &mut rows);
    }
    Ok(Tensor::from_vec(
        rows,
        (slots.len(), width),
        &candle_core::Device::Cpu,
    )?)
}

/// Writes the keys `[T, num_kv_heads * head_dim]` and values (`[T, num_kv_heads *
/// value_dim]`, or none) of a batch's tokens into their cache slots.
pub fn write_kv(layer: &mut KvLayer, g: &AttnGeometry, slots: &[usize], keys: &[f32], values: &[f32]) {
    let (hk, hv) = (g.head_dim, if values.is_empty() { 0 } else { g.value_dim });
    for (i, &slot) in slots.iter().enumerate() {
        for h in 0..g.num_kv_heads {
            let row = i * g.num_kv_heads + h;
            let (at, stride) = g.key_at(slot, h);
            layer
                .keys
                .write_strided(at, stride, &keys[row * hk..(row + 1) * hk]);
            if hv > 0 {
                layer
                    .values
                    .write(g.offset(slot, h, hv), &values[row * hv..(row + 1) * hv]);
            }
        }
    }
}

/// Causal attention of every query token over its sequence's cached positions
/// `0..=pos`. `q` is `[T, num_heads, head_dim]`; returns `[T, num_heads, value_dim]`.
/// The cache must already hold this batch's keys and values (see [`write_kv`]).
pub fn paged_attention(isa: Isa, q: &[f32], layer: &KvLayer, seqs: &[AttnSeq], g: AttnGeometry) -> Vec<f32> {
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
    let mut out = vec![0f32; num_tokens * g.num_heads * g.value_dim];
    let tasks = num_tokens * g.num_heads / heads_per_task;
    // A task's sequence, position and key/value head.
    let task_at = |task: usize| {
        let first_row = task * heads_per_task;
        let (t, h) = (first_row / g.num_heads, first_row % g.num_heads);
        let (si, pos) = token_pos[t];
        (first_row, si, pos, h / group)
    };
    let run = |attend: &TaskFn, prefetch: &PrefetchFn, out: &mut Vec<f32>| {
        out.par_chunks_mut(heads_per_task * g.value_dim)
            .enumerate()
            .for_each_init(Scratch::default, |scratch: &mut Scratch, (task, out)| {
                // A thread mostly runs consecutive tasks: start the next one's first
                // cache blocks on their way (blocks are scattered, so the hardware
                // prefetchers cannot see them coming).
                if task + 1 < tasks {
                    let (_, si, pos, kv_head) = task_at(task + 1);
                    let blocks = (pos + 1).div_ceil(g.block_size).min(2);
                    for &b in &seqs[si].block_table[..blocks] {
                        prefetch(
                            g.block_start(b as usize, kv_head, g.head_dim),
                            g.block_start(b as usize, kv_head, g.value_dim),
                        );
                    }
                }
                let (first_row, si, pos, kv_head) = task_at(task);
                let job = AttendJob {
                    q: &q[first_row * g.head_dim..(first_row + heads_per_task) * g.head_dim],
                    table: seqs[si].block_table,
                    kv_head,
                    len: pos + 1,
                    g: &g,
                    scale: g.scale,
                };
                scratch.locate(&job);
                attend(&job, scratch, out);
            });
    };
    match (&layer.keys, &layer.values) {
        (KvBuffer::F32(k), KvBuffer::F32(v)) => {
            let kernel = attend_kernel::<f32>(isa);
            run(
                // SAFETY: `attend_kernel` only returns kernels the CPU supports.
                &|job, s, o| unsafe { kernel(job, k, v, s, o) },
                &|ka, va| prefetch_block(k, v, ka, va, &g),
                &mut out,
            )
        }
        (KvBuffer::F16(k), KvBuffer::F16(v)) => {
            let kernel = attend_kernel::<half::f16>(isa);
            run(
                // SAFETY: as above.
                &|job, s, o| unsafe { kernel(job, k, v, s, o) },
                &|ka, va| prefetch_block(k, v, ka, va, &g),
                &mut out,
            )
        }
        _ => unreachable!("keys and values of one cache share a dtype"),
    }
    out
}

/// Runs one task: the job, its scratch, its output rows.
type TaskFn<'a> = dyn Fn(&AttendJob, &mut Scratch, &mut [f32]) + Sync + 'a;

/// Prefetches one cache block of one head: where its keys and its values start.
type PrefetchFn<'a> = dyn Fn(usize, usize) + Sync + 'a;

/// Hints one block of one head's keys (from `key_at`) and values (from `value_at`) into
/// the cache. Latent attention has no separate values.
fn prefetch_block<E>(keys: &[E], values: &[E], key_at: usize, value_at: usize, g: &AttnGeometry) {
    let elem = std::mem::size_of::<E>();
    let runs = [
        (keys.as_ptr().wrapping_add(key_at), g.block_size * g.head_dim),
        (values.as_ptr().wrapping_add(value_at), g.block_size * g.value_dim),
    ];
    let n = if g.value_offset.is_some() || values.is_empty() {
        1
    } else {
        2
    };
    for &(p, len) in &runs[..n] {
        for line in (0..len * elem).step_by(64) {
            simd::prefetch((p as *const u8).wrapping_add(line));
        }
    }
}

/// Per-thread buffers of [`paged_attention`]'s tasks, reused from task to task.
#[derive(Default)]
struct Scratch {
    /// `[heads, len]`: the scores of the task's query heads, then their softmax.
    scores: Vec<f32>,
    /// Where each position's key vector starts in the layer's key buffer (its elements
    /// `block_size` apart when keys are transposed, else adjacent).
    keys_at: Vec<usize>,
    /// Where each position's value vector starts, in the value buffer (or, for latent
    /// attention, in the key buffer).
    values_at: Vec<usize>,
}

impl Scratch {
    /// Resolves the job's positions to cache offsets once, block by block, so the loops
    /// over keys and values do no block-table arithmetic.
    fn locate(&mut self, job: &AttendJob) {
        let g = job.g;
        let (bs, n) = (g.block_size, job.len);
        self.keys_at.resize(n, 0);
        self.values_at.resize(n, 0);
        for (b, &block) in job.table.iter().enumerate().take(n.div_ceil(bs)) {
            let first = b * bs;
            let (k0, v0) = (
                g.block_start(block as usize, job.kv_head, g.head_dim),
                g.block_start(block as usize, job.kv_head, g.value_dim),
            );
            let key_step = if g.keys_transposed() { 1 } else { g.head_dim };
            for j in first..(first + bs).min(n) {
                let k = k0 + (j - first) * key_step;
                self.keys_at[j] = k;
                self.values_at[j] = match g.value_offset {
                    Some(off) => k + off,
                    None => v0 + (j - first) * g.value_dim,
                };
            }
        }
        self.scores.clear();
        self.scores.resize(job.q.len() / g.head_dim * job.len, 0.0);
    }
}

/// One task of [`paged_attention`]: `q` holds one token's query heads (all reading
/// `kv_head`), attending over cached positions `0..len`.
struct AttendJob<'a> {
    q: &'a [f32],
    table: &'a [u32],
    kv_head: usize,
    len: usize,
    g: &'a AttnGeometry,
    scale: f32,
}

/// An element type of the cache, widened to f32 for the arithmetic.
trait KvElem: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;

    /// `S::LANES` values from `p`, widened.
    ///
    /// # Safety
    /// `p..p + S::LANES` is readable; the CPU has `S`'s features.
    unsafe fn load<S: F32x>(p: *const Self) -> S::V;
}

impl KvElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[inline(always)]
    unsafe fn load<S: F32x>(p: *const Self) -> S::V {
        // SAFETY: by the caller's contract.
        unsafe { S::load(p) }
    }
}

impl KvElem for half::f16 {
    /// IEEE half to single by moving the exponent and mantissa into place and rescaling
    /// by 2^112, which is exact for normal and subnormal halves and, unlike
    /// `f16::to_f32` without compile-time F16C, vectorises (infinities, which an f16
    /// cache cannot tell apart from overflow anyway, come out as 65536).
    #[inline(always)]
    fn widen(self) -> f32 {
        let h = self.to_bits() as u32;
        let magnitude = f32::from_bits((h & 0x7fff) << 13) * f32::from_bits((127 + 112) << 23);
        f32::from_bits(magnitude.to_bits() | ((h & 0x8000) << 16))
    }

    #[inline(always)]
    unsafe fn load<S: F32x>(p: *const Self) -> S::V {
        // SAFETY: by the caller's contract.
        unsafe { S::load_f16(p as *const u16) }
    }
}

type AttendKernel<E> = unsafe fn(&AttendJob, &[E], &[E], &mut Scratch, &mut [f32]);

/// The attention kernel of kernel set `isa`.
fn attend_kernel<E: KvElem>(isa: Isa) -> AttendKernel<E> {
    match isa.runnable() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => attend_avx512::<E>,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => attend_avx2::<E>,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => attend_neon::<E>,
        _ => attend_portable::<E>,
    }
}

/// # Safety
/// The CPU has the features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn attend_avx512<E: KvElem>(
    job: &AttendJob,
    k: &[E],
    v: &[E],
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    // SAFETY: forwarded.
    unsafe { attend_simd::<simd::Avx512, E>(job, k, v, scratch, out) }
}

/// # Safety
/// The CPU has the features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<E: KvElem>(job: &AttendJob, k: &[E], v: &[E], scratch: &mut Scratch, out: &mut [f32]) {
    // SAFETY: forwarded.
    unsafe { attend_simd::<simd::Avx2, E>(job, k, v, scratch, out) }
}

/// # Safety
/// The CPU has the features (every aarch64 CPU).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn attend_neon<E: KvElem>(job: &AttendJob, k: &[E], v: &[E], scratch: &mut Scratch, out: &mut [f32]) {
    // SAFETY: forwarded.
    unsafe { attend_simd::<simd::Neon, E>(job, k, v, scratch, out) }
}

unsafe fn attend_portable<E: KvElem>(
    job: &AttendJob,
    k: &[E],
    v: &[E],
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    attend(job, k, v, scratch, out)
}

/// The vector form, in any kernel set's vectors (`L = S::LANES` values of f32: 16 on
/// AVX-512, 8 on AVX2, 4 on NEON), for head sizes in multiples of `L` (all real models)
/// and up to 8 query heads per task.
///
/// Scores, with transposed keys (block sizes in multiples of `L`): `L` positions are the
/// lanes of one register per query head, one multiply-add per key dimension with the
/// query element broadcast, every head of the task sharing each load (and f16 widening)
/// of the keys ([`scores_transposed`]). Latent attention's untransposed keys: `L`
/// positions at a time per query head, each position's partial products in one
/// register, then one transposing reduction ([`F32x::sums_of_each`]) turns the `L`
/// registers into the `L` scores. Values: one pass over the positions per `L W` output
/// values, every query head of the task accumulating in registers from one load of each
/// cached vector ([`value_pass`]). How many accumulators a pass keeps follows the set's
/// register count.
///
/// # Safety
/// The CPU has `S`'s features.
#[inline(always)]
unsafe fn attend_simd<S: F32x, E: KvElem>(
    job: &AttendJob,
    keys: &[E],
    values: &[E],
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let lanes = S::LANES;
    let g = job.g;
    let heads = job.q.len() / g.head_dim;
    let transposed = g.keys_transposed();
    if !g.head_dim.is_multiple_of(lanes)
        || !g.value_dim.is_multiple_of(lanes)
        || heads > 8
        || (transposed && !g.block_size.is_multiple_of(lanes))
    {
        return attend(job, keys, values, scratch, out);
    }
    let n = job.len;
    let src = if g.value_offset.is_some() { keys } else { values };
    // The last key element read from each position (transposed: `L` lanes from each
    // `L`-aligned chunk start, which stay inside the block's run).
    let key_span = if transposed {
        (g.head_dim - 1) * g.block_size + lanes
    } else {
        g.head_dim
    };
    assert!(
        scratch.keys_at.len() == n
            && scratch.values_at.len() == n
            && scratch.scores.len() == heads * n
            && out.len() >= heads * g.value_dim
            && scratch
                .keys_at
                .iter()
                .step_by(lanes)
                .all(|&at| at + key_span <= keys.len())
            && (transposed || scratch.keys_at.iter().all(|&at| at + g.head_dim <= keys.len()))
            && scratch.values_at.iter().all(|&at| at + g.value_dim <= src.len())
    );
    let Scratch {
        scores,
        keys_at,
        values_at,
    } = scratch;
    let scores = scores.as_mut_slice();
    // SAFETY (every pass): the chunks' key runs and the value vectors are inside their
    // buffers (assert); `scores` holds `heads` rows of `n`; the CPU has `S`'s features.
    unsafe {
        if transposed {
            // Accumulators: `H * P` of them, with `P` key loads and a broadcast beside.
            let args = (job.q, keys, keys_at.as_slice(), g, job.scale);
            match (S::MANY_REGISTERS, heads) {
                (_, 1) => score_passes::<S, E, 1, 4>(args, scores),
                (_, 2) => score_passes::<S, E, 2, 4>(args, scores),
                (true, 3) => score_passes::<S, E, 3, 4>(args, scores),
                (true, 4) => score_passes::<S, E, 4, 4>(args, scores),
                (false, 3) => score_passes::<S, E, 3, 2>(args, scores),
                (false, 4) => score_passes::<S, E, 4, 2>(args, scores),
                (true, 5) => score_passes::<S, E, 5, 2>(args, scores),
                (true, 6) => score_passes::<S, E, 6, 2>(args, scores),
                (true, 7) => score_passes::<S, E, 7, 2>(args, scores),
                (true, _) => score_passes::<S, E, 8, 2>(args, scores),
                (false, 5) => score_passes::<S, E, 5, 1>(args, scores),
                (false, 6) => score_passes::<S, E, 6, 1>(args, scores),
                (false, 7) => score_passes::<S, E, 7, 1>(args, scores),
                (false, _) => score_passes::<S, E, 8, 1>(args, scores),
            }
        } else {
            scores_untransposed::<S, E>(job, keys, keys_at, scores);
        }
    }
    softmax_rows(scores, n);
    let args = (scores as &[f32], values_at.as_slice(), src, g.value_dim);
    // SAFETY: as above.
    unsafe {
        match (S::MANY_REGISTERS, heads) {
            (_, 1) => value_passes::<S, E, 1, 4>(args, out),
            (_, 2) => value_passes::<S, E, 2, 4>(args, out),
            (true, 3) => value_passes::<S, E, 3, 4>(args, out),
            (true, 4) => value_passes::<S, E, 4, 4>(args, out),
            (true, 5) => value_passes::<S, E, 5, 4>(args, out),
            (true, 6) => value_passes::<S, E, 6, 2>(args, out),
            (true, 7) => value_passes::<S, E, 7, 2>(args, out),
            (true, _) => value_passes::<S, E, 8, 2>(args, out),
            (false, 3) => value_passes::<S, E, 3, 2>(args, out),
            (false, 4) => value_passes::<S, E, 4, 2>(args, out),
            (false, 5) => value_passes::<S, E, 5, 2>(args, out),
            (false, 6) => value_passes::<S, E, 6, 2>(args, out),
            (false, 7) => value_passes::<S, E, 7, 1>(args, out),
            (false, _) => value_passes::<S, E, 8, 1>(args, out),
        }
    }
}

/// What a score pass reads: the task's queries, the keys, each position's key offset,
/// the geometry, the scale.
type ScoreArgs<'a, E> = (&'a [f32], &'a [E], &'a [usize], &'a AttnGeometry, f32);

/// What a value pass reads: the probabilities, each position's value offset, the value
/// source, value_dim.
type ValueArgs<'a, E> = (&'a [f32], &'a [usize], &'a [E], usize);

/// The scores of every position, `P` chunks of `L` positions per pass while whole ones
/// fit, then one chunk at a time.
///
/// # Safety
/// As [`scores_transposed`] for every chunk.
#[inline(always)]
unsafe fn score_passes<S: F32x, E: KvElem, const H: usize, const P: usize>(
    (q, keys, keys_at, g, scale): ScoreArgs<E>,
    scores: &mut [f32],
) {
    let chunks = keys_at.len().div_ceil(S::LANES);
    let mut c = 0;
    while c < chunks {
        // SAFETY: by the caller's contract.
        unsafe {
            if c + P <= chunks {
                scores_transposed::<S, E, H, P>(q, keys, keys_at, S::LANES * c, g, scale, scores);
                c += P;
            } else {
                scores_transposed::<S, E, H, 1>(q, keys, keys_at, S::LANES * c, g, scale, scores);
                c += 1;
            }
        }
    }
}

/// The scores of positions `j0..j0 + L P` (the last chunk may run past the sequence;
/// those lanes are not stored) for the `H` query heads in `q`, from keys stored
/// transposed: per key dimension, one load of `L` positions per chunk and one
/// multiply-add per head and chunk, the `H * P` accumulators independent chains.
///
/// # Safety
/// Keys are transposed with block sizes in multiples of `L`, `j0` is a multiple of `L`
/// below the sequence's length, each chunk's run of `(head_dim - 1) * block_size + L`
/// keys from its first position's offset is inside `keys`; the CPU has `S`'s features.
#[inline(always)]
unsafe fn scores_transposed<S: F32x, E: KvElem, const H: usize, const P: usize>(
    q: &[f32],
    keys: &[E],
    keys_at: &[usize],
    j0: usize,
    g: &AttnGeometry,
    scale: f32,
    scores: &mut [f32],
) {
    let lanes = S::LANES;
    let (n, d, bs) = (keys_at.len(), g.head_dim, g.block_size);
    assert!(q.len() >= H * d && scores.len() >= H * n && j0 < n);
    let mut base = [std::ptr::null::<E>(); P];
    for (p, b) in base.iter_mut().enumerate() {
        // Chunks past the sequence read the last chunk again; nothing is stored.
        let j = (j0 + lanes * p).min((n - 1) / lanes * lanes);
        // SAFETY: inside `keys` by the caller's contract.
        *b = unsafe { keys.as_ptr().add(keys_at[j]) };
    }
    // Prefetch the keys of the next pass's chunks (scattered blocks: the hardware
    // prefetchers cannot see them coming), one line per prefetch.
    let elem = std::mem::size_of::<E>();
    let step = (64 / (bs * elem)).max(1);
    for p in 0..P {
        let j = j0 + lanes * (P + p);
        if j >= n {
            break;
        }
        let next = keys.as_ptr().wrapping_add(keys_at[j]) as *const u8;
        for e in (0..d).step_by(step) {
            for line in (0..lanes * elem).step_by(64) {
                S::prefetch(next.wrapping_add(e * bs * elem + line));
            }
        }
    }
    // SAFETY (all): the CPU has `S`'s features; loads inside the chunks' runs
    // (contract), `h * d + e < H * d <= q.len()` (assert).
    unsafe {
        let mut acc = [[S::zero(); P]; H];
        for e in 0..d {
            let mut k = [S::zero(); P];
            for p in 0..P {
                k[p] = E::load::<S>(base[p].add(e * bs));
            }
            for (h, acc) in acc.iter_mut().enumerate() {
                let qe = S::splat(*q.get_unchecked(h * d + e));
                for (a, k) in acc.iter_mut().zip(&k) {
                    *a = S::fmadd(qe, *k, *a);
                }
            }
        }
        let scale = S::splat(scale);
        for (h, acc) in acc.iter().enumerate() {
            for (p, a) in acc.iter().enumerate() {
                let j = j0 + lanes * p;
                if j >= n {
                    break;
                }
                // `j + m <= n`: inside row `h` of `scores` (assert).
                S::store_first(
                    scores.as_mut_ptr().add(h * n + j),
                    S::mul(*a, scale),
                    lanes.min(n - j),
                );
            }
        }
    }
}

/// Latent attention's scores (keys untransposed, each position's vector contiguous):
/// `L` positions at a time per head, each position's partial products in one register,
/// then one transposing reduction for the `L` scores.
///
/// # Safety
/// Each key vector is inside `keys`; `scores` holds the task's heads' rows; the CPU has
/// `S`'s features.
#[inline(always)]
unsafe fn scores_untransposed<S: F32x, E: KvElem>(
    job: &AttendJob,
    keys: &[E],
    keys_at: &[usize],
    scores: &mut [f32],
) {
    let (lanes, g, n) = (S::LANES, job.g, job.len);
    // SAFETY (all): by the caller's contract; `c < head_dim / L`.
    unsafe {
        for (h, q) in job.q.chunks_exact(g.head_dim).enumerate() {
            let row = &mut scores[h * n..][..n];
            for j0 in (0..n).step_by(lanes) {
                let m = lanes.min(n - j0);
                // A short last chunk repeats its last position; the store drops the extra.
                let mut at = [0usize; 16];
                for (i, a) in at.iter_mut().enumerate().take(lanes) {
                    *a = keys_at[j0 + i.min(m - 1)];
                }
                let mut acc = [S::zero(); 16];
                for c in 0..g.head_dim / lanes {
                    let qc = S::load(q.as_ptr().add(lanes * c));
                    for i in 0..lanes {
                        let k = E::load::<S>(keys.as_ptr().add(at[i] + lanes * c));
                        acc[i] = S::fmadd(qc, k, acc[i]);
                    }
                }
                let s = S::mul(S::sums_of_each(&acc[..lanes]), S::splat(job.scale));
                S::store_first(row.as_mut_ptr().add(j0), s, m);
            }
        }
    }
}

/// The outputs, `W` chunks of `L` values per pass while whole ones fit, then one chunk
/// at a time.
///
/// # Safety
/// As [`value_pass`].
#[inline(always)]
unsafe fn value_passes<S: F32x, E: KvElem, const H: usize, const W: usize>(
    args: ValueArgs<E>,
    out: &mut [f32],
) {
    let chunks = args.3 / S::LANES;
    let mut c = 0;
    while c < chunks {
        // SAFETY: by the caller's contract.
        unsafe {
            if c + W <= chunks {
                value_pass::<S, E, H, W>(args, c, out);
                c += W;
            } else {
                value_pass::<S, E, H, 1>(args, c, out);
                c += 1;
            }
        }
    }
}

/// `out[h, L c0..L (c0 + W)] = sum_j p[h, j] * value_j[L c0..L (c0 + W)]` for the `H`
/// heads of a task: `H * W` accumulators stay in registers through the pass.
///
/// # Safety
/// The CPU has `S`'s features.
#[inline(always)]
unsafe fn value_pass<S: F32x, E: KvElem, const H: usize, const W: usize>(
    (probs, values_at, src, value_dim): ValueArgs<E>,
    c0: usize,
    out: &mut [f32],
) {
    /// How many positions ahead the value pass prefetches.
    const VALUE_PREFETCH: usize = 32;
    let lanes = S::LANES;
    let n = values_at.len();
    assert!(
        probs.len() >= H * n
            && out.len() >= H * value_dim
            && lanes * (c0 + W) <= value_dim
            && values_at.iter().all(|&at| at + value_dim <= src.len())
    );
    let elem = std::mem::size_of::<E>();
    // SAFETY (all): the CPU has `S`'s features; loads and stores inside `src` and `out`
    // by the assert.
    unsafe {
        let mut acc = [[S::zero(); W]; H];
        for (j, &at) in values_at.iter().enumerate() {
            // Prefetch the values a block ahead: cache blocks are scattered, so the
            // hardware prefetchers cannot see the next one coming.
            if let Some(&ahead) = values_at.get(j + VALUE_PREFETCH) {
                let p = src.as_ptr().wrapping_add(ahead + lanes * c0) as *const u8;
                for line in (0..lanes * W * elem).step_by(64) {
                    S::prefetch(p.wrapping_add(line));
                }
            }
            let mut v = [S::zero(); W];
            for (c, v) in v.iter_mut().enumerate() {
                *v = E::load::<S>(src.as_ptr().add(at + lanes * (c0 + c)));
            }
            for (h, acc) in acc.iter_mut().enumerate() {
                let p = S::splat(probs[h * n + j]);
                for c in 0..W {
                    acc[c] = S::fmadd(p, v[c], acc[c]);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            for (c, a) in acc.iter().enumerate() {
                S::store(out.as_mut_ptr().add(h * value_dim + lanes * (c0 + c)), *a);
            }
        }
    }
}

/// Softmax attention of `heads` query vectors over the same cached keys and values
/// (the positions located in `scratch`): `out` is `[heads, value_dim]`.
#[inline(always)]
fn attend<E: KvElem>(job: &AttendJob, keys: &[E], values: &[E], scratch: &mut Scratch, out: &mut [f32]) {
    let g = job.g;
    let n = job.len;
    let Scratch {
        scores,
        keys_at,
        values_at,
    } = scratch;
    let stride = g.key_at(0, 0).1;
    if stride == 1 {
        for (j, &at) in keys_at.iter().enumerate() {
            for (hi, qv) in job.q.chunks_exact(g.head_dim).enumerate() {
                scores[hi * n + j] = dot(qv, &keys[at..][..g.head_dim]) * job.scale;
            }
        }
    } else {
        // Transposed keys: for each key dimension, the positions of a run within one
        // block are adjacent, so their scores accumulate a dimension at a time over
        // contiguous memory (which vectorises, where a strided dot product per position
        // would not).
        let mut j0 = 0;
        while j0 < n {
            let mut len = 1;
            while j0 + len < n && keys_at[j0 + len] == keys_at[j0] + len {
                len += 1;
            }
            for (hi, qv) in job.q.chunks_exact(g.head_dim).enumerate() {
                let row = &mut scores[hi * n + j0..][..len];
                row.fill(0.0);
                for (e, &qe) in qv.iter().enumerate() {
                    let k = &keys[keys_at[j0] + e * stride..][..len];
                    for (s, k) in row.iter_mut().zip(k) {
                        *s += qe * k.widen();
                    }
                }
                for s in row.iter_mut() {
                    *s *= job.scale;
                }
            }
            j0 += len;
        }
    }
    softmax_rows(scores, n);
    // Latent attention reads values from the cached keys.
    let src = if g.value_offset.is_some() { keys } else { values };
    for (j, &at) in values_at.iter().enumerate() {
        let v = &src[at..][..g.value_dim];
        for (hi, o) in out.chunks_exact_mut(g.value_dim).enumerate() {
            axpy(scores[hi * n + j], v, o);
        }
    }
}

/// Dot product over 16-wide chunks with one vector of partial sums, so the compiler
/// vectorises it (a single running sum would serialise on floating-point addition order).
#[inline(always)]
fn dot<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        let y = widen16(y);
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    // Pairwise (a tree of vector adds), not a serial chain of 15 scalar adds. (Plain
    // loops, not `array::from_fn`, whose closures would not inherit the callers' target
    // features.)
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    let mut s = acc[0];
    for (x, y) in ra.iter().zip(rb) {
        s += x * y.widen();
    }
    s
}

#[inline(always)]
fn widen16<E: KvElem>(v: &[E]) -> [f32; 16] {
    let v: &[E; 16] = v.try_into().expect("16 values");
    let mut out = [0f32; 16];
    for i in 0..16 {
        out[i] = v[i].widen();
    }
    out
}

/// `out += w * v`
#[inline(always)]
fn axpy<E: KvElem>(w: f32, v: &[E], out: &mut [f32]) {
    let mut co = out.chunks_exact_mut(16);
    let mut cv = v.chunks_exact(16);
    for (o, x) in (&mut co).zip(&mut cv) {
        let x = widen16(x);
        for i in 0..16 {
            o[i] += w * x[i];
        }
    }
    for (o, x) in co.into_remainder().iter_mut().zip(cv.remainder()) {
        *o += w * x.widen();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{BlockPool, BlockTable, KvDtype, KvLayout, KvStorage};
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
        // f32 cache: only summation order differs; f16: the cache's rounding (2^-11).
        // Each kernel set this CPU runs: head sizes in multiples of its lanes (16 AVX-512,
        // 8 AVX2, 4 NEON) run its vector form, others (12 on x86) the portable loops; one
        // to eight query heads per key/value head, value sizes that fill whole register
        // passes or leave a remainder, contexts shorter and longer than a chunk.
        for (heads, kv_heads, d, vd, lens) in [
            (4, 2, 12, 12, (11, 3, 6)),
            (4, 2, 32, 32, (11, 3, 6)),
            (9, 3, 64, 64, (40, 21, 13)),
            (16, 2, 32, 80, (35, 17, 19)),
            (5, 1, 16, 48, (17, 0, 33)),
            (6, 3, 32, 32, (9, 2, 1)),
            // Contexts of several chunks of 16: the score kernel's 4- and 2-chunk passes
            // with single chunks after them, for 1 to 8 heads per task.
            (2, 2, 32, 32, (70, 0, 1)),
            (8, 2, 64, 64, (100, 70, 9)),
            (12, 3, 32, 32, (90, 40, 30)),
            (12, 2, 32, 32, (60, 20, 5)),
            (14, 2, 16, 32, (50, 33, 2)),
            (16, 2, 16, 16, (75, 50, 3)),
        ] {
            // Blocks in multiples of a set's lanes run its score kernel over transposed
            // keys (chunks of lanes inside a block), others the portable loops.
            for block_size in [4, 8, 16, 32] {
                let g = AttnGeometry {
                    num_heads: heads,
                    num_kv_heads: kv_heads,
                    head_dim: d,
                    value_dim: vd,
                    block_size,
                    value_offset: None,
                    scale: 0.3,
                };
                on_pools(|| {
                    mixed_prefill_and_decode(KvDtype::F32, g, lens, 1e-5);
                    mixed_prefill_and_decode(KvDtype::F16, g, lens, 2e-3);
                });
            }
        }
    }

    /// Runs `f` on a pool of 1 thread and on one of 64: a task is all the query heads of
    /// a key/value head on the first, a single head on the second (few tasks per thread),
    /// whatever the machine's core count.
    fn on_pools(f: impl Fn() + Sync) {
        for threads in [1, 64] {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(&f);
        }
    }

    /// Latent attention's layout: one cached vector per position read as the key, its
    /// tail as the value (`value_offset`), keys not transposed.
    #[test]
    fn latent_layout_reads_values_from_the_keys() {
        for block_size in [4, 16] {
            let g = AttnGeometry {
                num_heads: 4,
                num_kv_heads: 1,
                head_dim: 48,
                value_dim: 32,
                block_size,
                value_offset: Some(16),
                scale: 0.3,
            };
            assert!(!g.keys_transposed());
            on_pools(|| {
                mixed_prefill_and_decode(KvDtype::F32, g, (37, 20, 7), 1e-5);
                mixed_prefill_and_decode(KvDtype::F16, g, (37, 20, 7), 2e-3);
            });
        }
    }

    /// Sequence A: `len_a - 1` cached positions, then a 1-token decode. Sequence B:
    /// `cached_b` cached positions, then a prompt chunk of `chunk_b` tokens.
    fn mixed_prefill_and_decode(
        dtype: KvDtype,
        g: AttnGeometry,
        (len_a, cached_b, chunk_b): (usize, usize, usize),
        tolerance: f32,
    ) {
        let (d, vd, kvh) = (g.head_dim, g.value_dim, g.num_kv_heads);
        let latent = g.value_offset.is_some();
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: kvh,
            key_dim: d,
            value_dim: if latent { 0 } else { vd },
            dtype,
        };
        let len_b = cached_b + chunk_b;
        let bs = g.block_size;
        let blocks = (len_a.div_ceil(bs) + len_b.div_ceil(bs)) * 2;
        let mut kv = KvStorage::new(layout, g.block_size, blocks).unwrap();
        let mut alloc = BlockPool::new(blocks);
        let mut rng = StdRng::seed_from_u64(7);
        let mut rand_vec = |n: usize| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>();
        let (ka, mut va) = (rand_vec(len_a * kvh * d), rand_vec(len_a * kvh * vd));
        let (kb, mut vb) = (rand_vec(len_b * kvh * d), rand_vec(len_b * kvh * vd));
        // Latent attention: the values are the keys' tails, and only keys are written.
        if let Some(off) = g.value_offset {
            let tails =
                |k: &[f32]| -> Vec<f32> { k.chunks(d).flat_map(|v| v[off..off + vd].to_vec()).collect() };
            (va, vb) = (tails(&ka), tails(&kb));
        }
        let mut ta = BlockTable::new();
        let mut tb = BlockTable::new();
        // Interleave allocations so the tables are not contiguous runs.
        for n in 1..=len_a.max(len_b).div_ceil(bs) {
            ta.reserve(&mut alloc, (n * bs).min(len_a), bs).unwrap();
            tb.reserve(&mut alloc, (n * bs).min(len_b), bs).unwrap();
        }
        let slots = |t: &BlockTable, n: usize| {
            (0..n)
                .map(|p| kv.slot(t.blocks(), p).unwrap())
                .collect::<Vec<_>>()
        };
        let (sa, sb) = (slots(&ta, len_a), slots(&tb, len_b));
        let (wa, wb): (&[f32], &[f32]) = if latent { (&[], &[]) } else { (&va, &vb) };
        write_kv(kv.layer_mut(0), &g, &sa, &ka, wa);
        write_kv(kv.layer_mut(0), &g, &sb, &kb, wb);

        let qa = rand_vec(g.num_heads * d);
        let qb = rand_vec(chunk_b * g.num_heads * d);
        let q: Vec<f32> = qa.iter().chain(&qb).copied().collect();
        let seqs = [
            AttnSeq {
                first_token: 0,
                len: 1,
                start_pos: len_a - 1,
                block_table: ta.blocks(),
            },
            AttnSeq {
                first_token: 1,
                len: chunk_b,
                start_pos: cached_b,
                block_table: tb.blocks(),
            },
        ];
        let scale = g.scale;
        let want_a = naive(&qa, &ka, &va, len_a - 1, g, scale);
        let want_b = naive(&qb, &kb, &vb, cached_b, g, scale);
        let want: Vec<f32> = want_a.into_iter().chain(want_b).collect();
        // Every kernel set this CPU runs.
        for isa in Isa::available() {
            let out = paged_attention(isa, &q, kv.layer(0), &seqs, g);
            assert_eq!(out.len(), want.len());
            let max_err = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                max_err < tolerance,
                "{isa}, {dtype:?}, {g:?}: max abs error {max_err}"
            );
        }
    }

    #[test]
    fn f16_widening_is_exact() {
        for bits in 0..=u16::MAX {
            let h = half::f16::from_bits(bits);
            if h.is_finite() {
                assert_eq!(h.widen(), h.to_f32(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn dot_matches_naive_sum_for_odd_lengths() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.1).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-4);
    }
}
