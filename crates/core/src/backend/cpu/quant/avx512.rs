//! The AVX-512 kernels, with (`vpdpwssd`) and without (`vpmaddwd` + `vpaddd`) VNNI.

use std::arch::x86_64::*;
use std::ops::Range;

use super::activations::Activations;
use super::{
    check_tile, for_format, BlockFormat, Byte16Fact, Byte16FactMin, Byte32F16, Byte32F16Min, Byte32FactMin,
    Nib32F16Min, Nib32FactMin, PackedQuantMatrix, ScaleCursor, Scales, Storage, Target, GROUP,
    PREFETCH_AHEAD,
};

/// Tokens whose accumulators live in registers at once (of 32).
const TOKEN_TILE: usize = 8;

/// 16 lanes of `acc + w.lo * x.lo + w.hi * x.hi` over 16-bit pairs, `x` the pair of
/// activations at `p` broadcast to every lane: one `vpdpwssd` with its broadcast
/// folded into the memory operand. (The intrinsic, given a broadcast register,
/// compiles to a separate broadcast, or to `vpmaddwd` + `vpaddd`: three instructions
/// where one does.)
///
/// # Safety
/// `p..p + 2` is readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_vnni(acc: __m512i, w: __m512i, p: *const i16) -> __m512i {
    let mut acc = acc;
    // SAFETY: reads 4 bytes at `p`, readable by the caller's contract.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {w}, dword ptr [{p}]{{1to16}}",
            acc = inout(zmm_reg) acc,
            w = in(zmm_reg) w,
            p = in(reg) p,
            options(pure, readonly, nostack, preserves_flags),
        )
    };
    acc
}

/// [`dot_vnni`] for CPUs without VNNI.
///
/// # Safety
/// As [`dot_vnni`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn dot_bw(acc: __m512i, w: __m512i, p: *const i16) -> __m512i {
    // SAFETY: by the caller's contract.
    let x = _mm512_set1_epi32(unsafe { (p as *const i32).read_unaligned() });
    _mm512_add_epi32(acc, _mm512_madd_epi16(w, x))
}

/// Block `b`'s 16 scales as f32.
///
/// # Safety
/// Block `b` is one of the cursor's group's.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_scales<F: BlockFormat>(s: ScaleCursor, b: usize) -> __m512 {
    let (sub, outer) = s.entry::<F>(b, 0);
    // SAFETY: inside the group's scales by the caller's contract.
    unsafe {
        if F::FACTORED {
            _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sub as *const __m128i))),
                _mm512_loadu_ps(outer),
            )
        } else {
            _mm512_cvtph_ps(_mm256_loadu_si256(sub as *const __m256i))
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
            let mut t = ts.start;
            while t < ts.end {
                let n = TOKEN_TILE.min(ts.end - t);
                // SAFETY: forwarded from the caller.
                unsafe {
                    match n {
                        8 => $tile::<8, F>(m, g, a, t, out),
                        7 => $tile::<7, F>(m, g, a, t, out),
                        6 => $tile::<6, F>(m, g, a, t, out),
                        5 => $tile::<5, F>(m, g, a, t, out),
                        4 => $tile::<4, F>(m, g, a, t, out),
                        3 => $tile::<3, F>(m, g, a, t, out),
                        2 => $tile::<2, F>(m, g, a, t, out),
                        _ => $tile::<1, F>(m, g, a, t, out),
                    }
                }
                t += n;
            }
        }

        /// `T` tokens from `t0` against row group `g`.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $tile<const T: usize, F: BlockFormat>(
            m: &PackedQuantMatrix,
            g: usize,
            a: &Activations,
            t0: usize,
            out: Target,
        ) {
            let blocks = m.blocks();
            check_tile::<F>(m, g, a, t0, T);
            // SAFETY (all pointer arithmetic and loads below): by the assert, group
            // `g`'s `blocks` blocks of weights, scales and minimums are in bounds, and
            // each token `t0 + t` has `cols = blocks * BLOCK` activations and `blocks`
            // scales and sums.
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
            let mut acc = [_mm512_setzero_ps(); T];
            let low_nibbles = _mm512_set1_epi16(0x0F);
            for b in 0..blocks {
                let w = unsafe { w0.add(b * F::BYTES) };
                // Software prefetch a fixed distance ahead in the weights: a task
                // streams one stretch of row groups, and the hardware prefetchers
                // alone left batch-1 decode well short of the memory bandwidth.
                for line in 0..F::BYTES / 64 {
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(PREFETCH_AHEAD + 64 * line) as *const i8);
                }
                let ahead = b + PREFETCH_AHEAD / F::BYTES;
                _mm_prefetch::<_MM_HINT_T0>(scales.block_start::<F>(ahead) as *const i8);
                if let Some(mins) = mins {
                    _mm_prefetch::<_MM_HINT_T0>(mins.block_start::<F>(ahead) as *const i8);
                }
                // Two accumulators per token, so that with few tokens the dot
                // products are not one serial chain of multiply-add latencies.
                let mut sums = [[_mm512_setzero_si512(); 2]; T];
                if F::NIBBLES {
                    for c in 0..8 {
                        let raw = unsafe {
                            _mm512_cvtepu8_epi16(_mm256_loadu_si256(w.add(c * 32) as *const __m256i))
                        };
                        let lo = _mm512_and_si512(raw, low_nibbles);
                        let hi = _mm512_srli_epi16::<4>(raw);
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
                                _mm512_cvtepi8_epi16(_mm256_loadu_si256(w.add(c * 32) as *const __m256i)),
                                _mm512_cvtepi8_epi16(
                                    _mm256_loadu_si256(w.add(c * 32 + 32) as *const __m256i),
                                ),
                            )
                        };
                        for t in 0..T {
                            let x = unsafe { xq[t].add(b * F::BLOCK) };
                            sums[t][0] = unsafe { $dot(sums[t][0], w0, x.add(2 * c)) };
                            sums[t][1] = unsafe { $dot(sums[t][1], w1, x.add(2 * c + 2)) };
                        }
                    }
                }
                let d = unsafe { load_scales::<F>(scales, b) };
                for t in 0..T {
                    let total = _mm512_add_epi32(sums[t][0], sums[t][1]);
                    let xscale = _mm512_set1_ps(unsafe { *xs[t].add(b) });
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(d, xscale), acc[t]);
                }
                if let Some(mins) = mins {
                    let mv = unsafe { load_scales::<F>(mins, b) };
                    for t in 0..T {
                        let xsum = _mm512_set1_ps(unsafe { *xsum[t].add(b) });
                        acc[t] = _mm512_fmadd_ps(mv, xsum, acc[t]);
                    }
                }
            }
            let valid = GROUP.min(m.rows - g * GROUP);
            let mask: __mmask16 = if valid == GROUP {
                !0
            } else {
                (1u16 << valid) - 1
            };
            for t in 0..T {
                // SAFETY: token `t0 + t` and row group `g` of the output, `valid`
                // columns.
                unsafe { _mm512_mask_storeu_ps(out.at(t0 + t, g), mask, acc[t]) };
            }
        }
    };
}

group_kernel!(
    group_vnni,
    run_vnni,
    tile_vnni,
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
    dot_vnni
);
group_kernel!(
    group_bw,
    run_bw,
    tile_bw,
    "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
    dot_bw
);
