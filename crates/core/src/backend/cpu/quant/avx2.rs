//! The AVX2 kernels, with (`vpdpwssd` on 256-bit registers, AVX-VNNI) and without
//! (`vpmaddwd` + `vpaddd`) VNNI.
//!
//! They read the AVX-512 kernels' layout ([`Layout::Pairs`](super::Layout)) as two halves:
//! each 32-byte chunk holds a pair of weights of 16 rows, and its first 16 bytes are that
//! pair of rows 0-7, its last 16 of rows 8-15. One half widens (`vpmovzxbw` or
//! `vpmovsxbw`) into a 256-bit register of 8 rows x 2 weights, which one `vpmaddwd` with
//! a broadcast pair of activations turns into 8 per-row sums. A pass takes one half of a
//! row group through all its blocks, so that a tile of 4 tokens keeps its accumulators
//! (two integer and one float register per token) in the 16 registers with the weights
//! and constants. Same integer sums, and the scales applied in the same order, as the
//! AVX-512 kernels: the results are theirs bit for bit.

use std::arch::x86_64::*;
use std::ops::Range;

use super::activations::Activations;
use super::{
    check_tile, for_format, BlockFormat, Byte16Fact, Byte16FactMin, Byte32F16, Byte32F16Min, Byte32FactMin,
    Nib32F16Min, Nib32FactMin, PackedQuantMatrix, ScaleCursor, Scales, Storage, Target, GROUP,
    PREFETCH_AHEAD,
};

/// Tokens whose accumulators live in registers at once (of 16).
const TOKEN_TILE: usize = 4;

/// 8 lanes of `acc + w.lo * x.lo + w.hi * x.hi` over 16-bit pairs, `x` the pair of
/// activations at `p` broadcast to every lane.
///
/// # Safety
/// `p..p + 2` is readable.
#[inline]
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn dot_vnni(acc: __m256i, w: __m256i, p: *const i16) -> __m256i {
    // SAFETY: by the caller's contract.
    let x = _mm256_set1_epi32(unsafe { (p as *const i32).read_unaligned() });
    _mm256_dpwssd_avx_epi32(acc, w, x)
}

/// [`dot_vnni`] for CPUs without AVX-VNNI.
///
/// # Safety
/// As [`dot_vnni`].
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot(acc: __m256i, w: __m256i, p: *const i16) -> __m256i {
    // SAFETY: by the caller's contract.
    let x = _mm256_set1_epi32(unsafe { (p as *const i32).read_unaligned() });
    _mm256_add_epi32(acc, _mm256_madd_epi16(w, x))
}

/// Block `b`'s scales of rows `8 half..8 half + 8` as f32.
///
/// # Safety
/// Block `b` is one of the cursor's group's; `half` is 0 or 1.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_scales<F: BlockFormat>(s: ScaleCursor, b: usize, half: usize) -> __m256 {
    let (sub, outer) = s.entry::<F>(b, 8 * half);
    // SAFETY: inside the group's scales by the caller's contract.
    unsafe {
        if F::FACTORED {
            _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(sub as *const __m128i))),
                _mm256_loadu_ps(outer),
            )
        } else {
            _mm256_cvtph_ps(_mm_loadu_si128(sub as *const __m128i))
        }
    }
}

macro_rules! group_kernel {
    ($name:ident, $run:ident, $tile:ident, $features:literal, $dot:ident) => {
        /// # Safety
        /// `out` is `[tokens, rows]` with every token of `ts` below `tokens`; the CPU
        /// has the enabled features.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn $name(
            m: &PackedQuantMatrix,
            g: usize,
            a: &Activations,
            ts: Range<usize>,
            out: Target,
        ) {
            // SAFETY: forwarded from the caller; the format is `m`'s.
            unsafe { for_format!(m, $run(m, g, a, ts, out)) }
        }

        /// # Safety
        /// As the kernel's; `m` is in format `F`.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $run<F: BlockFormat>(
            m: &PackedQuantMatrix,
            g: usize,
            a: &Activations,
            ts: Range<usize>,
            out: Target,
        ) {
            let valid = GROUP.min(m.rows - g * GROUP);
            for half in 0..valid.div_ceil(8) {
                let mut t = ts.start;
                while t < ts.end {
                    let n = TOKEN_TILE.min(ts.end - t);
                    // SAFETY: forwarded from the caller.
                    unsafe {
                        match n {
                            4 => $tile::<4, F>(m, g, half, a, t, out),
                            3 => $tile::<3, F>(m, g, half, a, t, out),
                            2 => $tile::<2, F>(m, g, half, a, t, out),
                            _ => $tile::<1, F>(m, g, half, a, t, out),
                        }
                    }
                    t += n;
                }
            }
        }

        /// `T` tokens from `t0` against rows `8 half..8 half + 8` of row group `g`.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $tile<const T: usize, F: BlockFormat>(
            m: &PackedQuantMatrix,
            g: usize,
            half: usize,
            a: &Activations,
            t0: usize,
            out: Target,
        ) {
            let blocks = m.blocks();
            check_tile::<F>(m, g, a, t0, T);
            // SAFETY (all pointer arithmetic and loads below): by the check, group `g`'s
            // `blocks` blocks of weights, scales and minimums are in bounds, and each
            // token `t0 + t` has `cols = blocks * BLOCK` activations and `blocks` scales
            // and sums; `half` is 0 or 1, so its 16 bytes of each 32-byte chunk are the
            // chunk's.
            let w0 = unsafe { m.weights.as_ptr().add(g * blocks * F::BYTES + 16 * half) };
            let scales = unsafe { ScaleCursor::at::<F>(&m.scales, g, blocks) };
            let mins = m
                .mins
                .as_ref()
                .map(|s| unsafe { ScaleCursor::at::<F>(s, g, blocks) });
            let mut xq = [std::ptr::null::<i16>(); T];
            let mut xs = [std::ptr::null::<f32>(); T];
            let mut xsum = [std::ptr::null::<f32>(); T];
            for t in 0..T {
                unsafe {
                    xq[t] = a.q.as_ptr().add((t0 + t) * a.cols);
                    xs[t] = a.scale.as_ptr().add((t0 + t) * blocks);
                    xsum[t] = a.sum.as_ptr().add((t0 + t) * blocks);
                }
            }
            let mut acc = [_mm256_setzero_ps(); T];
            let low_nibbles = _mm256_set1_epi16(0x0F);
            for b in 0..blocks {
                let w = unsafe { w0.add(b * F::BYTES) };
                // Software prefetch a fixed distance ahead, as the AVX-512 kernels do;
                // the first half's pass brings in the lines the second reads.
                if half == 0 {
                    for line in 0..F::BYTES / 64 {
                        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(PREFETCH_AHEAD + 64 * line) as *const i8);
                    }
                    let ahead = b + PREFETCH_AHEAD / F::BYTES;
                    _mm_prefetch::<_MM_HINT_T0>(scales.block_start::<F>(ahead) as *const i8);
                    if let Some(mins) = mins {
                        _mm_prefetch::<_MM_HINT_T0>(mins.block_start::<F>(ahead) as *const i8);
                    }
                }
                // Two accumulators per token, so that with few tokens the dot products
                // are not one serial chain of latencies.
                let mut sums = [[_mm256_setzero_si256(); 2]; T];
                if F::NIBBLES {
                    for c in 0..8 {
                        let raw =
                            unsafe { _mm256_cvtepu8_epi16(_mm_loadu_si128(w.add(c * 32) as *const __m128i)) };
                        let lo = _mm256_and_si256(raw, low_nibbles);
                        let hi = _mm256_srli_epi16::<4>(raw);
                        for t in 0..T {
                            let x = unsafe { xq[t].add(b * F::BLOCK) };
                            sums[t][0] = unsafe { $dot(sums[t][0], lo, x.add(2 * c)) };
                            sums[t][1] = unsafe { $dot(sums[t][1], hi, x.add(2 * c + 16)) };
                        }
                    }
                } else {
                    // Chunks two at a time, one per accumulator (blocks are 16 or 32
                    // wide, so the chunk count is even).
                    for c in (0..F::BLOCK / 2).step_by(2) {
                        let (w0, w1) = unsafe {
                            (
                                _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(c * 32) as *const __m128i)),
                                _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(c * 32 + 32) as *const __m128i)),
                            )
                        };
                        for t in 0..T {
                            let x = unsafe { xq[t].add(b * F::BLOCK) };
                            sums[t][0] = unsafe { $dot(sums[t][0], w0, x.add(2 * c)) };
                            sums[t][1] = unsafe { $dot(sums[t][1], w1, x.add(2 * c + 2)) };
                        }
                    }
                }
                let d = unsafe { load_scales::<F>(scales, b, half) };
                for t in 0..T {
                    let total = _mm256_add_epi32(sums[t][0], sums[t][1]);
                    let xscale = _mm256_set1_ps(unsafe { *xs[t].add(b) });
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(d, xscale), acc[t]);
                }
                if let Some(mins) = mins {
                    let mv = unsafe { load_scales::<F>(mins, b, half) };
                    for t in 0..T {
                        let xsum = _mm256_set1_ps(unsafe { *xsum[t].add(b) });
                        acc[t] = _mm256_fmadd_ps(mv, xsum, acc[t]);
                    }
                }
            }
            let valid = (GROUP.min(m.rows - g * GROUP) - 8 * half).min(8);
            for t in 0..T {
                // SAFETY: token `t0 + t` and row group `g` of the output, `valid` columns
                // from `8 half`.
                unsafe {
                    let at = out.at(t0 + t, g).add(8 * half);
                    if valid == 8 {
                        _mm256_storeu_ps(at, acc[t]);
                    } else {
                        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), lanes);
                        _mm256_maskstore_ps(at, mask, acc[t]);
                    }
                }
            }
        }
    };
}

group_kernel!(group_vnni, run_vnni, tile_vnni, "avx2,avxvnni,fma,f16c", dot_vnni);
group_kernel!(group, run, tile, "avx2,fma,f16c", dot);
