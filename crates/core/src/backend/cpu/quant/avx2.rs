//! The AVX2 kernels, with (`vpdpwssd` on 256-bit registers, AVX-VNNI) and without
//! (`vpmaddwd` + `vpaddd`) VNNI.
//!
//! They read the AVX-512 kernels' layout ([`Layout::Pairs`](super::Layout)) as two halves:
//! each 32-byte chunk holds a pair of weights of 16 rows, and its first 16 bytes are that
//! pair of rows 0-7, its last 16 of rows 8-15. One half widens (`vpmovzxbw` or
//! `vpmovsxbw`) into a 256-bit register of 8 rows x 2 weights, which one `vpmaddwd` with
//! a broadcast pair of activations turns into 8 per-row sums. With three or more tokens a
//! pass takes one half of a row group through all its blocks, so that a tile of 4 tokens
//! keeps its accumulators (two integer and one float register per token) in the 16
//! registers with the weights and constants; with one or two, a pass takes both halves, so
//! each pair of activations is broadcast once for the 16 rows. Same integer sums, and the
//! scales applied in the same order, as the AVX-512 kernels: the results are theirs bit
//! for bit.

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
            let halves = GROUP.min(m.rows - g * GROUP).div_ceil(8);
            // SAFETY (every tile): forwarded from the caller.
            unsafe {
                // One token (batch-1 decode, most experts of a MoE layer): both halves in
                // one pass, so that each pair of activations is broadcast once for the 16
                // rows and the block loop runs once (a third faster than two passes here;
                // with two tokens, half passes measured faster).
                if halves == 2 && ts.len() == 1 {
                    $tile::<1, 2, 1, F>(m, g, 0, a, ts.start, out);
                    return;
                }
                for half in 0..halves {
                    let mut t = ts.start;
                    while t < ts.end {
                        let n = TOKEN_TILE.min(ts.end - t);
                        match n {
                            4 => $tile::<4, 1, 2, F>(m, g, half, a, t, out),
                            3 => $tile::<3, 1, 2, F>(m, g, half, a, t, out),
                            2 => $tile::<2, 1, 2, F>(m, g, half, a, t, out),
                            _ => $tile::<1, 1, 2, F>(m, g, half, a, t, out),
                        }
                        t += n;
                    }
                }
            }
        }

        /// `T` tokens from `t0` against `H` halves of row group `g` from half `h0`
        /// (rows `8 h0..8 (h0 + H)`), with `A` integer accumulators per token and half
        /// (two, so that with few tokens the dot products are not one serial chain; one
        /// when two halves already give two chains).
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $tile<const T: usize, const H: usize, const A: usize, F: BlockFormat>(
            m: &PackedQuantMatrix,
            g: usize,
            h0: usize,
            a: &Activations,
            t0: usize,
            out: Target,
        ) {
            let blocks = m.blocks();
            check_tile::<F>(m, g, a, t0, T);
            assert!(h0 + H <= 2 && (A == 1 || A == 2));
            // SAFETY (all pointer arithmetic and loads below): by the checks, group `g`'s
            // `blocks` blocks of weights, scales and minimums are in bounds, and each
            // token `t0 + t` has `cols = blocks * BLOCK` activations and `blocks` scales
            // and sums; a half's 16 bytes of each 32-byte chunk are the chunk's.
            let w0 = unsafe { m.weights.as_ptr().add(g * blocks * F::BYTES) };
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
            let mut acc = [[_mm256_setzero_ps(); H]; T];
            let low_nibbles = _mm256_set1_epi16(0x0F);
            for b in 0..blocks {
                let w = unsafe { w0.add(b * F::BYTES) };
                // Software prefetch a fixed distance ahead, as the AVX-512 kernels do;
                // the first half's pass brings in the lines the second reads.
                if h0 == 0 {
                    for line in 0..F::BYTES / 64 {
                        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(PREFETCH_AHEAD + 64 * line) as *const i8);
                    }
                    let ahead = b + PREFETCH_AHEAD / F::BYTES;
                    _mm_prefetch::<_MM_HINT_T0>(scales.block_start::<F>(ahead) as *const i8);
                    if let Some(mins) = mins {
                        _mm_prefetch::<_MM_HINT_T0>(mins.block_start::<F>(ahead) as *const i8);
                    }
                }
                let mut sums = [[[_mm256_setzero_si256(); A]; H]; T];
                if F::NIBBLES {
                    for c in 0..8 {
                        let mut lo = [_mm256_setzero_si256(); H];
                        let mut hi = [_mm256_setzero_si256(); H];
                        for h in 0..H {
                            let p = unsafe { w.add(c * 32 + 16 * (h0 + h)) };
                            let raw = unsafe { _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i)) };
                            lo[h] = _mm256_and_si256(raw, low_nibbles);
                            hi[h] = _mm256_srli_epi16::<4>(raw);
                        }
                        for t in 0..T {
                            let x = unsafe { xq[t].add(b * F::BLOCK) };
                            for h in 0..H {
                                let s = &mut sums[t][h];
                                s[0] = unsafe { $dot(s[0], lo[h], x.add(2 * c)) };
                                s[A - 1] = unsafe { $dot(s[A - 1], hi[h], x.add(2 * c + 16)) };
                            }
                        }
                    }
                } else {
                    // Chunks two at a time (blocks are 16 or 32 wide, so the chunk count
                    // is even).
                    for c in (0..F::BLOCK / 2).step_by(2) {
                        let mut w_even = [_mm256_setzero_si256(); H];
                        let mut w_odd = [_mm256_setzero_si256(); H];
                        for h in 0..H {
                            let p = unsafe { w.add(c * 32 + 16 * (h0 + h)) };
                            unsafe {
                                w_even[h] = _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i));
                                w_odd[h] = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(32) as *const __m128i));
                            }
                        }
                        for t in 0..T {
                            let x = unsafe { xq[t].add(b * F::BLOCK) };
                            for h in 0..H {
                                let s = &mut sums[t][h];
                                s[0] = unsafe { $dot(s[0], w_even[h], x.add(2 * c)) };
                                s[A - 1] = unsafe { $dot(s[A - 1], w_odd[h], x.add(2 * c + 2)) };
                            }
                        }
                    }
                }
                for h in 0..H {
                    let d = unsafe { load_scales::<F>(scales, b, h0 + h) };
                    for t in 0..T {
                        let s = &sums[t][h];
                        let total = if A == 2 {
                            _mm256_add_epi32(s[0], s[A - 1])
                        } else {
                            s[0]
                        };
                        let xscale = _mm256_set1_ps(unsafe { *xs[t].add(b) });
                        acc[t][h] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(total),
                            _mm256_mul_ps(d, xscale),
                            acc[t][h],
                        );
                    }
                    if let Some(mins) = mins {
                        let mv = unsafe { load_scales::<F>(mins, b, h0 + h) };
                        for t in 0..T {
                            let xsum = _mm256_set1_ps(unsafe { *xsum[t].add(b) });
                            acc[t][h] = _mm256_fmadd_ps(mv, xsum, acc[t][h]);
                        }
                    }
                }
            }
            let rows = GROUP.min(m.rows - g * GROUP);
            for h in 0..H {
                let valid = rows.saturating_sub(8 * (h0 + h)).min(8);
                for t in 0..T {
                    // SAFETY: token `t0 + t` and row group `g` of the output, `valid`
                    // columns from `8 (h0 + h)`.
                    unsafe {
                        let at = out.at(t0 + t, g).add(8 * (h0 + h));
                        if valid == 8 {
                            _mm256_storeu_ps(at, acc[t][h]);
                        } else if valid > 0 {
                            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), lanes);
                            _mm256_maskstore_ps(at, mask, acc[t][h]);
                        }
                    }
                }
            }
        }
    };
}

group_kernel!(group_vnni, run_vnni, tile_vnni, "avx2,avxvnni,fma,f16c", dot_vnni);
group_kernel!(group, run, tile, "avx2,fma,f16c", dot);
