//! Activations quantized for the integer kernels: 16 bits per value with one scale per
//! weight block, quantized once per matmul (each value is then read by every row group).

use std::cell::Cell;

use rayon::prelude::*;

use super::QuantKernel;
use crate::backend::cpu::vmath::fold16;

/// The largest quantized value: `127 * 256 + 127`, so that a value's high and low bytes
/// (`q = 256 hi + lo`, both signed bytes) are what NEON's 8-bit dot products take
/// (`i16::MAX` would give a high byte of 128). Every kernel set quantizes alike, so
/// their integer sums are the same.
pub(super) const QMAX: f32 = 32639.0;

/// Activations quantized to 16 bits per value, one scale per weight block. The buffers
/// may be longer than `tokens` rows (reused from an earlier matmul); only the first
/// `tokens` rows are meaningful.
pub(super) struct Activations {
    pub(super) tokens: usize,
    pub(super) cols: usize,
    /// Values per scale: the weights' block.
    pub(super) block: usize,
    /// `[tokens, cols]`
    pub(super) q: Vec<i16>,
    /// `[tokens, blocks]`: value = q * scale.
    pub(super) scale: Vec<f32>,
    /// `[tokens, blocks]`: the block's exact f32 sum, for the minimum term.
    pub(super) sum: Vec<f32>,
    /// For NEON's 8-bit dot products (`sdot`, `smmla`), else empty: `[tokens, cols / 8,
    /// 16]`, each 8 values' high bytes then their low bytes (`q = 256 hi + lo`).
    pub(super) hl: Vec<i8>,
}

/// One task's token rows: the input and the rows of each buffer.
struct TokenRows<'a> {
    x: &'a [f32],
    q: &'a mut [i16],
    scale: &'a mut [f32],
    sum: &'a mut [f32],
    hl: &'a mut [i8],
}

impl Activations {
    pub(super) fn quantize(x: &[f32], tokens: usize, cols: usize, block: usize, kernel: QuantKernel) -> Self {
        let blocks = cols / block;
        let split = matches!(kernel, QuantKernel::NeonDot | QuantKernel::NeonI8mm);
        // This thread's buffers from its last matmul, when it has them: every value is
        // overwritten below, so there is no zeroing pass.
        let (mut q, mut scale, mut sum, mut hl) = SPARE_ACTIVATIONS.take().unwrap_or_default();
        let (values, scales, split_values) = (
            tokens * cols,
            tokens * blocks,
            if split { 2 * tokens * cols } else { 0 },
        );
        for (v, n) in [(&mut scale, scales), (&mut sum, scales)] {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        }
        if q.len() < values {
            q.resize(values, 0);
        }
        if hl.len() < split_values {
            hl.resize(split_values, 0);
        }
        let mut a = Activations {
            tokens,
            cols,
            block,
            q,
            scale,
            sum,
            hl,
        };
        let hl_row = if split { 2 * cols } else { 0 };
        // Row by row: the vector quantizers take several blocks at a time and leave the
        // rest to the scalar one, whose block sums add in another order, so a span running
        // across rows would make a token's activations depend on the tokens beside it
        // (speculative decoding needs a token's logits the same in any batch, bit for bit).
        let rows = |r: TokenRows| {
            for t in 0..r.x.len() / cols {
                let (x, q) = (&r.x[t * cols..][..cols], &mut r.q[t * cols..][..cols]);
                let (scale, sum) = (
                    &mut r.scale[t * blocks..][..blocks],
                    &mut r.sum[t * blocks..][..blocks],
                );
                let hl = &mut r.hl[t * hl_row..][..hl_row];
                quantize_row(kernel, x, q, scale, sum, hl, block);
            }
        };
        let (q, scale, sum, hl) = (
            &mut a.q[..values],
            &mut a.scale[..scales],
            &mut a.sum[..scales],
            &mut a.hl[..split_values],
        );
        // Token rows in parallel when there are many (a prompt chunk, a large decode
        // batch); a matmul's quantization is otherwise a serial stretch before it.
        let per_task = 4;
        let whole = TokenRows { x, q, scale, sum, hl };
        if tokens < 2 * per_task {
            rows(whole);
        } else {
            let mut tasks = Vec::with_capacity(tokens.div_ceil(per_task));
            let mut rest = whole;
            while !rest.x.is_empty() {
                let n = per_task.min(rest.x.len() / cols);
                let (x, x_rest) = rest.x.split_at(n * cols);
                let (q, q_rest) = rest.q.split_at_mut(n * cols);
                let (scale, scale_rest) = rest.scale.split_at_mut(n * blocks);
                let (sum, sum_rest) = rest.sum.split_at_mut(n * blocks);
                let (hl, hl_rest) = rest.hl.split_at_mut(n * hl_row);
                tasks.push(TokenRows { x, q, scale, sum, hl });
                rest = TokenRows {
                    x: x_rest,
                    q: q_rest,
                    scale: scale_rest,
                    sum: sum_rest,
                    hl: hl_rest,
                };
            }
            tasks.into_par_iter().for_each(rows);
        }
        a
    }
}

/// One token's row for `kernel`: its values, block scales and sums, and for NEON's 8-bit
/// dot products its split bytes.
#[inline]
fn quantize_row(
    kernel: QuantKernel,
    x: &[f32],
    q: &mut [i16],
    scale: &mut [f32],
    sum: &mut [f32],
    hl: &mut [i8],
    block: usize,
) {
    match kernel {
        // SAFETY (each arm): the kernel is one this CPU runs (it was packed for it), so the
        // CPU has the quantizer's features.
        #[cfg(target_arch = "x86_64")]
        QuantKernel::Avx512Vnni | QuantKernel::Avx512 => unsafe { quantize_avx512(x, q, scale, sum, block) },
        #[cfg(target_arch = "x86_64")]
        QuantKernel::Avx2Vnni | QuantKernel::Avx2 => unsafe { quantize_avx2(x, q, scale, sum, block) },
        #[cfg(target_arch = "aarch64")]
        QuantKernel::NeonI8mm | QuantKernel::NeonDot | QuantKernel::Neon => unsafe {
            super::neon::quantize(x, q, scale, sum, hl, block)
        },
        _ => quantize_blocks(x, q, scale, sum, block),
    }
    let _ = hl;
}

/// An [`Activations`]' values, scales, sums and split bytes.
type ActivationBuffers = (Vec<i16>, Vec<f32>, Vec<f32>, Vec<i8>);

thread_local! {
    /// The buffers of the last [`Activations`] dropped on this thread, for the next one
    /// to reuse.
    static SPARE_ACTIVATIONS: Cell<Option<ActivationBuffers>> = const { Cell::new(None) };
}

impl Drop for Activations {
    fn drop(&mut self) {
        // A long prompt's buffers are not worth keeping for every pool thread's lifetime.
        const KEEP: usize = 1 << 22;
        if self.q.len() > KEEP {
            return;
        }
        let bufs = (
            std::mem::take(&mut self.q),
            std::mem::take(&mut self.scale),
            std::mem::take(&mut self.sum),
            std::mem::take(&mut self.hl),
        );
        SPARE_ACTIVATIONS.set(Some(bufs));
    }
}

/// [`quantize_blocks`] for AVX-512, 16 blocks at a time when blocks are 16 or 32 wide
/// (every packed format): the maxima and sums of 16 blocks come out of one transposing
/// reduction ([`fold_each16`](crate::vmath::avx512::fold_each16)) instead of two
/// horizontal reductions per block, which made this a tenth of a decode step with
/// 16-wide blocks. Values, scales and rounding are those of [`quantize_blocks`]; only
/// the sums add in another order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
pub(super) unsafe fn quantize_avx512(
    x: &[f32],
    q: &mut [i16],
    scale: &mut [f32],
    sum: &mut [f32],
    block: usize,
) {
    use crate::backend::cpu::vmath::avx512::{fold_each16, Add, Max};
    use std::arch::x86_64::*;
    let span = 16 * block;
    let whole = if block == 16 || block == 32 {
        x.len() / span * span
    } else {
        0
    };
    assert!(q.len() >= x.len() && scale.len() >= x.len() / block && sum.len() >= x.len() / block);
    let vectors = block / 16;
    for g in 0..whole / span {
        let base = g * span;
        // SAFETY (loads and stores): `base + span <= whole <= x.len() <= q.len()`, and
        // the 16 scales and sums of this span are inside `scale` and `sum` (assert).
        let (mut maxes, mut sums) = ([_mm512_setzero_ps(); 16], [_mm512_setzero_ps(); 16]);
        for b in 0..16 {
            let p = unsafe { x.as_ptr().add(base + b * block) };
            let v0 = unsafe { _mm512_loadu_ps(p) };
            let (mut m, mut s) = (_mm512_abs_ps(v0), v0);
            if vectors == 2 {
                let v1 = unsafe { _mm512_loadu_ps(p.add(16)) };
                m = _mm512_max_ps(m, _mm512_abs_ps(v1));
                s = _mm512_add_ps(s, v1);
            }
            maxes[b] = m;
            sums[b] = s;
        }
        let amax = fold_each16::<Max>(&maxes);
        let sc = _mm512_div_ps(amax, _mm512_set1_ps(QMAX));
        let nonzero = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(sc, _mm512_setzero_ps());
        let inv = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(1.0), sc);
        let first = base / block;
        unsafe {
            _mm512_storeu_ps(scale.as_mut_ptr().add(first), sc);
            _mm512_storeu_ps(sum.as_mut_ptr().add(first), fold_each16::<Add>(&sums));
        }
        let mut invs = [0f32; 16];
        unsafe { _mm512_storeu_ps(invs.as_mut_ptr(), inv) };
        for (b, &iv) in invs.iter().enumerate() {
            let iv = _mm512_set1_ps(iv);
            for v in 0..vectors {
                let at = base + b * block + 16 * v;
                unsafe {
                    // Round to nearest even (the default rounding mode), as the scalar
                    // form; |value * inv| <= QMAX, so narrowing to 16 bits is exact.
                    let r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(at)), iv));
                    _mm256_storeu_si256(q.as_mut_ptr().add(at) as *mut __m256i, _mm512_cvtepi32_epi16(r));
                }
            }
        }
    }
    let done = whole / block;
    quantize_blocks(
        &x[whole..],
        &mut q[whole..],
        &mut scale[done..],
        &mut sum[done..],
        block,
    )
}

/// [`quantize_blocks`] for AVX2, 8 blocks at a time (every packed format's blocks are
/// 16 or 32 wide): their maxima and sums come out of one transposing reduction
/// ([`fold_each8`](crate::backend::cpu::vmath::avx2::fold_each8)). Values, scales and
/// rounding are those of [`quantize_blocks`]; only the sums add in another order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_avx2(
    x: &[f32],
    q: &mut [i16],
    scale: &mut [f32],
    sum: &mut [f32],
    block: usize,
) {
    use crate::backend::cpu::vmath::avx2::{fold_each8, Add, Max};
    use std::arch::x86_64::*;
    let span = 8 * block;
    let whole = if block == 16 || block == 32 {
        x.len() / span * span
    } else {
        0
    };
    assert!(q.len() >= x.len() && scale.len() >= x.len() / block && sum.len() >= x.len() / block);
    let vectors = block / 8;
    let sign = _mm256_set1_ps(-0.0);
    for g in 0..whole / span {
        let base = g * span;
        // SAFETY (loads and stores): `base + span <= whole <= x.len() <= q.len()`, and
        // the 8 scales and sums of this span are inside `scale` and `sum` (assert).
        let (mut maxes, mut sums) = ([_mm256_setzero_ps(); 8], [_mm256_setzero_ps(); 8]);
        for b in 0..8 {
            let p = unsafe { x.as_ptr().add(base + b * block) };
            let (mut m, mut s) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for v in 0..vectors {
                let x = unsafe { _mm256_loadu_ps(p.add(8 * v)) };
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, x));
                s = _mm256_add_ps(s, x);
            }
            maxes[b] = m;
            sums[b] = s;
        }
        let amax = fold_each8::<Max>(&maxes);
        let sc = _mm256_div_ps(amax, _mm256_set1_ps(QMAX));
        let nonzero = _mm256_cmp_ps::<_CMP_GT_OQ>(sc, _mm256_setzero_ps());
        let inv = _mm256_and_ps(nonzero, _mm256_div_ps(_mm256_set1_ps(1.0), sc));
        let first = base / block;
        unsafe {
            _mm256_storeu_ps(scale.as_mut_ptr().add(first), sc);
            _mm256_storeu_ps(sum.as_mut_ptr().add(first), fold_each8::<Add>(&sums));
        }
        let mut invs = [0f32; 8];
        unsafe { _mm256_storeu_ps(invs.as_mut_ptr(), inv) };
        for (b, &iv) in invs.iter().enumerate() {
            let iv = _mm256_set1_ps(iv);
            for v in (0..vectors).step_by(2) {
                let at = base + b * block + 8 * v;
                unsafe {
                    // Round to nearest even (the default rounding mode), as the scalar
                    // form; |value * inv| <= QMAX, so the saturating pack is exact. The
                    // pack interleaves 128-bit lanes; the permute puts them back in order.
                    let r0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(at)), iv));
                    let r1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(at + 8)), iv));
                    let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(r0, r1));
                    _mm256_storeu_si256(q.as_mut_ptr().add(at) as *mut __m256i, packed);
                }
            }
        }
    }
    let done = whole / block;
    quantize_blocks(
        &x[whole..],
        &mut q[whole..],
        &mut scale[done..],
        &mut sum[done..],
        block,
    )
}

/// Each block of `block` values becomes 16-bit integers with one scale (`x ~ q * scale`,
/// `|q| <= QMAX`) and its f32 sum.
#[inline(always)]
pub(super) fn quantize_blocks(x: &[f32], q: &mut [i16], scale: &mut [f32], sum: &mut [f32], block: usize) {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    for (i, (xb, qb)) in x.chunks_exact(block).zip(q.chunks_exact_mut(block)).enumerate() {
        let amax = fold16(xb, 0.0, f32::abs, f32::max);
        let s = amax / QMAX;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for (q, v) in qb.iter_mut().zip(xb) {
            // Round to nearest even by adding 1.5 * 2^23, and read the integer from the
            // mantissa bits (|v * inv| <= QMAX): vectorises, where `round_ties_even` is a
            // libm call and `as i16` a saturating conversion per value.
            *q = (v * inv + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits()) as i16;
        }
        scale[i] = s;
        sum[i] = fold16(xb, 0.0, |v| v, |a, b| a + b);
    }
}

/// Splits each 8 values of a quantized row into their high and low bytes (`q = 256 hi +
/// lo`, both in -128..=127 since `|q| <= QMAX`): `hl` is `[cols / 8, 16]`, high bytes
/// first. The scalar form of NEON's split (and its test).
#[allow(dead_code)]
pub(super) fn split_bytes(q: &[i16], hl: &mut [i8]) {
    for (q, hl) in q.chunks_exact(8).zip(hl.chunks_exact_mut(16)) {
        for (j, &v) in q.iter().enumerate() {
            let hi = (v as i32 + 128) >> 8;
            hl[j] = hi as i8;
            hl[8 + j] = (v as i32 - 256 * hi) as i8;
        }
    }
}
