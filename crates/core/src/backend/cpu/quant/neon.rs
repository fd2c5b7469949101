//! The NEON kernels (aarch64): `smmla` where the CPU has i8mm, `sdot` where it has
//! dotprod, `smlal` on every other.
//!
//! All three read [`Layout::RowPairs`](super::Layout): 16-byte vectors of 8 consecutive
//! weights of two rows. The 8-bit dot products need 8-bit activations, so each 16-bit
//! activation is split into its high and low bytes (`q = 256 hi + lo`, exact: quantized
//! values stop at [`QMAX`](super::activations::QMAX)), stored once per matmul as
//! `[hi x 8, lo x 8]` per 8 values ([`Activations::hl`]). Then:
//! - `smmla` multiplies that 2x8 matrix of a token's bytes by a weight vector's 2x8 (rows
//!   `2p`, `2p + 1`): `[hi.w0, hi.w1, lo.w0, lo.w1]`, 32 multiply-adds in one instruction,
//!   16 of the 16-bit product's; a row's sum is `256 hi.w + lo.w` at the end of the block;
//! - `sdot` takes the high bytes twice over (`[hi, hi]`), then the low: each lane sums 4
//!   products, and adjacent lanes are added at the end of the block (8 per instruction);
//! - `smlal` widens the weights to 16 bits and multiplies them with the 16-bit values
//!   (4 per instruction).
//!
//! The integer sums are exact, and the scales are applied as on x86 (one fused
//! multiply-add per block for the scale, one for the minimum), so every kernel agrees
//! with the others bit for bit. `sdot`, `smmla` and the f16 widening are written with
//! `asm!`: their intrinsics are not stable in Rust yet.

// The kernels walk several arrays of registers (accumulators, weights, activations) by
// the same index; an iterator over one of them would hide that they line up.
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use crate::backend::cpu::simd::prefetch;

use super::activations::{Activations, QMAX};
use super::{
    check_tile, for_format, BlockFormat, Byte16Fact, Byte16FactMin, Byte32F16, Byte32F16Min, Byte32FactMin,
    Nib32F16Min, Nib32FactMin, PackedQuantMatrix, ScaleCursor, Scales, Storage, Target, GROUP,
    PREFETCH_AHEAD,
};

/// `acc + a b^T` for 2x8 signed byte matrices `a` and `b` (rows of 8 bytes): `[a0.b0,
/// a0.b1, a1.b0, a1.b1]`.
#[inline]
#[target_feature(enable = "neon,i8mm")]
unsafe fn smmla(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: register-only arithmetic; the CPU has i8mm (the caller's features).
    unsafe {
        asm!(
            "smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    acc
}

/// `acc[i] + sum over j < 4 of a[4i + j] * b[4i + j]` (signed bytes).
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: register-only arithmetic; the CPU has dotprod (the caller's features).
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    acc
}

/// Four f16 at `p` widened to f32.
///
/// # Safety
/// `p..p + 8` is readable.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn f16x4(p: *const u8) -> float32x4_t {
    // SAFETY: by the caller's contract.
    let h = unsafe { vld1_u16(p as *const u16) };
    let out: float32x4_t;
    // SAFETY: register-only conversion (FCVTL is base Advanced SIMD).
    unsafe {
        asm!(
            "fcvtl {out:v}.4s, {h:v}.4h",
            out = out(vreg) out,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    out
}

/// Block `b`'s scales of the group's 16 rows as four vectors of f32.
///
/// # Safety
/// Block `b` is one of the cursor's group's.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_scales<F: BlockFormat>(s: ScaleCursor, b: usize) -> [float32x4_t; 4] {
    let (sub, outer) = s.entry::<F>(b, 0);
    // SAFETY: inside the group's scales by the caller's contract.
    unsafe {
        if F::FACTORED {
            let f = vld1q_s8(sub as *const i8);
            let (lo, hi) = (vmovl_s8(vget_low_s8(f)), vmovl_high_s8(f));
            let ints = [
                vmovl_s16(vget_low_s16(lo)),
                vmovl_high_s16(lo),
                vmovl_s16(vget_low_s16(hi)),
                vmovl_high_s16(hi),
            ];
            let mut out = [vdupq_n_f32(0.0); 4];
            for i in 0..4 {
                out[i] = vmulq_f32(vcvtq_f32_s32(ints[i]), vld1q_f32(outer.add(4 * i)));
            }
            out
        } else {
            [
                f16x4(sub),
                f16x4(sub.add(8)),
                f16x4(sub.add(16)),
                f16x4(sub.add(24)),
            ]
        }
    }
}

/// The scales of one block applied to a token's 16 row sums (`totals`, rows `4i..4i + 4`
/// in `totals[i]`): `acc += total * (d * x_scale) + m * x_sum`, in the order the x86
/// kernels use.
#[inline(always)]
unsafe fn apply_scales(
    acc: &mut [float32x4_t; 4],
    totals: [int32x4_t; 4],
    d: &[float32x4_t; 4],
    m: Option<&[float32x4_t; 4]>,
    xs: f32,
    xsum: f32,
) {
    // SAFETY (all): register arithmetic of base Advanced SIMD.
    unsafe {
        let xs = vdupq_n_f32(xs);
        for i in 0..4 {
            acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(totals[i]), vmulq_f32(d[i], xs));
        }
        if let Some(m) = m {
            let xsum = vdupq_n_f32(xsum);
            for i in 0..4 {
                acc[i] = vfmaq_f32(acc[i], m[i], xsum);
            }
        }
    }
}

/// Writes a token's 16 (or, in a ragged last group, `valid`) outputs.
///
/// # Safety
/// `at..at + valid` is writable.
#[inline(always)]
unsafe fn store(at: *mut f32, acc: &[float32x4_t; 4], valid: usize) {
    // SAFETY: by the caller's contract.
    unsafe {
        if valid == GROUP {
            for i in 0..4 {
                vst1q_f32(at.add(4 * i), acc[i]);
            }
        } else {
            let mut all = [0f32; GROUP];
            for i in 0..4 {
                vst1q_f32(all.as_mut_ptr().add(4 * i), acc[i]);
            }
            std::ptr::copy_nonoverlapping(all.as_ptr(), at, valid);
        }
    }
}

/// Prefetches a fixed distance ahead in a group's weights and scales (the hardware
/// prefetchers alone left batch-1 decode short of the memory bandwidth on x86).
#[inline(always)]
fn prefetch_ahead<F: BlockFormat>(w: *const u8, b: usize, scales: ScaleCursor, mins: Option<ScaleCursor>) {
    for line in 0..F::BYTES / 64 {
        prefetch(w.wrapping_add(PREFETCH_AHEAD + 64 * line));
    }
    let ahead = b + PREFETCH_AHEAD / F::BYTES;
    prefetch(scales.block_start::<F>(ahead));
    if let Some(mins) = mins {
        prefetch(mins.block_start::<F>(ahead));
    }
}

/// A tile's pointers into the matrix and the activations.
struct TileInput<const T: usize> {
    w0: *const u8,
    scales: ScaleCursor,
    mins: Option<ScaleCursor>,
    xq: [*const i16; T],
    hl: [*const i8; T],
    xs: [*const f32; T],
    xsum: [*const f32; T],
}

impl<const T: usize> TileInput<T> {
    /// # Safety
    /// [`check_tile`] passed for this tile (and `hl` holds the split bytes when the
    /// kernel reads them).
    #[inline(always)]
    unsafe fn new<F: BlockFormat>(m: &PackedQuantMatrix, g: usize, a: &Activations, t0: usize) -> Self {
        let blocks = m.blocks();
        // SAFETY: in bounds by the caller's contract.
        unsafe {
            let mut input = TileInput {
                w0: m.weights.as_ptr().add(g * blocks * F::BYTES),
                scales: ScaleCursor::at::<F>(&m.scales, g, blocks),
                mins: m.mins.as_ref().map(|s| ScaleCursor::at::<F>(s, g, blocks)),
                xq: [std::ptr::null(); T],
                hl: [std::ptr::null(); T],
                xs: [std::ptr::null(); T],
                xsum: [std::ptr::null(); T],
            };
            for t in 0..T {
                input.xq[t] = a.q.as_ptr().add((t0 + t) * a.cols);
                input.hl[t] = a.hl.as_ptr().wrapping_add((t0 + t) * 2 * a.cols);
                input.xs[t] = a.scale.as_ptr().add((t0 + t) * blocks);
                input.xsum[t] = a.sum.as_ptr().add((t0 + t) * blocks);
            }
            input
        }
    }
}

/// Weight vector `(k, p)` of a block at `w` (8 weights of rows `2p`, `2p + 1`), for a
/// byte format, or its two nibble halves (chunks `k` and `k + 2`) for a 4-bit one.
#[inline(always)]
unsafe fn weights<F: BlockFormat>(w: *const u8, k: usize, p: usize) -> (int8x16_t, int8x16_t) {
    // SAFETY: inside the block by the caller's contract.
    unsafe {
        let v = vld1q_u8(w.add(16 * (8 * k + p)));
        if F::NIBBLES {
            (
                vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))),
                vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)),
            )
        } else {
            (vreinterpretq_s8_u8(v), vdupq_n_s8(0))
        }
    }
}

/// The (chunk, vector) pairs a block's 8-weight chunks are read from: for a 4-bit format
/// chunks `k` and `k + 2` share vector `k`.
#[inline(always)]
const fn vectors_per_block<F: BlockFormat>() -> usize {
    if F::NIBBLES {
        2
    } else {
        F::BLOCK / 8
    }
}

macro_rules! entry {
    ($name:ident, $run:ident, $tile:ident, $features:literal, $tile_len:literal) => {
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
                let n = ($tile_len as usize).min(ts.end - t);
                // SAFETY: forwarded from the caller.
                unsafe {
                    if n >= 2 {
                        $tile::<2, F>(m, g, a, t, out)
                    } else {
                        $tile::<1, F>(m, g, a, t, out)
                    }
                }
                t += n;
            }
        }
    };
}

entry!(group_i8mm, run_i8mm, tile_i8mm, "neon,i8mm,dotprod", 2);
entry!(group_dot, run_dot, tile_dot, "neon,dotprod", 1);
entry!(group_base, run_base, tile_base, "neon", 1);

/// `T` tokens from `t0` against row group `g`, by `smmla`.
#[inline]
#[target_feature(enable = "neon,i8mm,dotprod")]
unsafe fn tile_i8mm<const T: usize, F: BlockFormat>(
    m: &PackedQuantMatrix,
    g: usize,
    a: &Activations,
    t0: usize,
    out: Target,
) {
    check_tile::<F>(m, g, a, t0, T);
    assert!(a.hl.len() >= (t0 + T) * 2 * a.cols);
    // SAFETY (all loads below): by the checks, group `g`'s blocks and the tile's tokens'
    // values, split bytes, scales and sums are in bounds.
    let input = unsafe { TileInput::<T>::new::<F>(m, g, a, t0) };
    let mut acc = [[vdupq_n_f32(0.0); 4]; T];
    for b in 0..m.blocks() {
        let w = input.w0.wrapping_add(b * F::BYTES);
        prefetch_ahead::<F>(w, b, input.scales, input.mins);
        // Per token, per row pair: [hi.w0, hi.w1, lo.w0, lo.w1].
        let mut sums = [[vdupq_n_s32(0); 8]; T];
        for k in 0..vectors_per_block::<F>() {
            let chunk = |t: usize, k: usize| unsafe { vld1q_s8(input.hl[t].add(2 * (b * F::BLOCK + 8 * k))) };
            let x: [int8x16_t; T] = std::array::from_fn(|t| chunk(t, k));
            let x_high: [int8x16_t; T] =
                std::array::from_fn(|t| if F::NIBBLES { chunk(t, k + 2) } else { x[t] });
            for p in 0..8 {
                let (lo, hi) = unsafe { weights::<F>(w, k, p) };
                for t in 0..T {
                    sums[t][p] = unsafe { smmla(sums[t][p], x[t], lo) };
                    if F::NIBBLES {
                        sums[t][p] = unsafe { smmla(sums[t][p], x_high[t], hi) };
                    }
                }
            }
        }
        let d = unsafe { load_scales::<F>(input.scales, b) };
        let mv = input.mins.map(|s| unsafe { load_scales::<F>(s, b) });
        for t in 0..T {
            let totals: [int32x4_t; 4] = std::array::from_fn(|i| {
                let (a, c) = (
                    vreinterpretq_s64_s32(sums[t][2 * i]),
                    vreinterpretq_s64_s32(sums[t][2 * i + 1]),
                );
                let high = vreinterpretq_s32_s64(vzip1q_s64(a, c));
                let low = vreinterpretq_s32_s64(vzip2q_s64(a, c));
                vmlaq_n_s32(low, high, 256)
            });
            unsafe {
                apply_scales(
                    &mut acc[t],
                    totals,
                    &d,
                    mv.as_ref(),
                    *input.xs[t].add(b),
                    *input.xsum[t].add(b),
                )
            };
        }
    }
    let valid = GROUP.min(m.rows - g * GROUP);
    for t in 0..T {
        // SAFETY: token `t0 + t` and row group `g` of the output, `valid` columns.
        unsafe { store(out.at(t0 + t, g), &acc[t], valid) };
    }
}

/// `T` tokens from `t0` against row group `g`, by `sdot`.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn tile_dot<const T: usize, F: BlockFormat>(
    m: &PackedQuantMatrix,
    g: usize,
    a: &Activations,
    t0: usize,
    out: Target,
) {
    check_tile::<F>(m, g, a, t0, T);
    assert!(a.hl.len() >= (t0 + T) * 2 * a.cols);
    // SAFETY (all loads below): as in `tile_i8mm`.
    let input = unsafe { TileInput::<T>::new::<F>(m, g, a, t0) };
    let mut acc = [[vdupq_n_f32(0.0); 4]; T];
    for b in 0..m.blocks() {
        let w = input.w0.wrapping_add(b * F::BYTES);
        prefetch_ahead::<F>(w, b, input.scales, input.mins);
        // Per token, per row pair, high and low bytes: [w0 (0..4), w0 (4..8), w1 (0..4),
        // w1 (4..8)].
        let mut high = [[vdupq_n_s32(0); 8]; T];
        let mut low = [[vdupq_n_s32(0); 8]; T];
        for k in 0..vectors_per_block::<F>() {
            // A chunk's high bytes twice over, and its low bytes twice over.
            let split = |t: usize, k: usize| unsafe {
                let v = vreinterpretq_s64_s8(vld1q_s8(input.hl[t].add(2 * (b * F::BLOCK + 8 * k))));
                (
                    vreinterpretq_s8_s64(vdupq_laneq_s64::<0>(v)),
                    vreinterpretq_s8_s64(vdupq_laneq_s64::<1>(v)),
                )
            };
            let x: [(int8x16_t, int8x16_t); T] = std::array::from_fn(|t| split(t, k));
            let x_high: [(int8x16_t, int8x16_t); T] =
                std::array::from_fn(|t| if F::NIBBLES { split(t, k + 2) } else { x[t] });
            for p in 0..8 {
                let (lo, hi) = unsafe { weights::<F>(w, k, p) };
                for t in 0..T {
                    high[t][p] = unsafe { sdot(high[t][p], lo, x[t].0) };
                    low[t][p] = unsafe { sdot(low[t][p], lo, x[t].1) };
                    if F::NIBBLES {
                        high[t][p] = unsafe { sdot(high[t][p], hi, x_high[t].0) };
                        low[t][p] = unsafe { sdot(low[t][p], hi, x_high[t].1) };
                    }
                }
            }
        }
        let d = unsafe { load_scales::<F>(input.scales, b) };
        let mv = input.mins.map(|s| unsafe { load_scales::<F>(s, b) });
        for t in 0..T {
            let totals: [int32x4_t; 4] = std::array::from_fn(|i| {
                let h = vpaddq_s32(high[t][2 * i], high[t][2 * i + 1]);
                let l = vpaddq_s32(low[t][2 * i], low[t][2 * i + 1]);
                vmlaq_n_s32(l, h, 256)
            });
            unsafe {
                apply_scales(
                    &mut acc[t],
                    totals,
                    &d,
                    mv.as_ref(),
                    *input.xs[t].add(b),
                    *input.xsum[t].add(b),
                )
            };
        }
    }
    let valid = GROUP.min(m.rows - g * GROUP);
    for t in 0..T {
        // SAFETY: token `t0 + t` and row group `g` of the output, `valid` columns.
        unsafe { store(out.at(t0 + t, g), &acc[t], valid) };
    }
}

/// `T` tokens from `t0` against row group `g`, by `smlal` on the 16-bit values.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn tile_base<const T: usize, F: BlockFormat>(
    m: &PackedQuantMatrix,
    g: usize,
    a: &Activations,
    t0: usize,
    out: Target,
) {
    check_tile::<F>(m, g, a, t0, T);
    // SAFETY (all loads below): as in `tile_i8mm`, without the split bytes.
    let input = unsafe { TileInput::<T>::new::<F>(m, g, a, t0) };
    let mut acc = [[vdupq_n_f32(0.0); 4]; T];
    for b in 0..m.blocks() {
        let w = input.w0.wrapping_add(b * F::BYTES);
        prefetch_ahead::<F>(w, b, input.scales, input.mins);
        // Per token and row: four lanes of partial sums.
        let mut sums = [[vdupq_n_s32(0); GROUP]; T];
        for k in 0..vectors_per_block::<F>() {
            let values = |t: usize, k: usize| unsafe { vld1q_s16(input.xq[t].add(b * F::BLOCK + 8 * k)) };
            let x: [int16x8_t; T] = std::array::from_fn(|t| values(t, k));
            let x_high: [int16x8_t; T] =
                std::array::from_fn(|t| if F::NIBBLES { values(t, k + 2) } else { x[t] });
            for p in 0..8 {
                let (lo, hi) = unsafe { weights::<F>(w, k, p) };
                let (lo0, lo1) = (vmovl_s8(vget_low_s8(lo)), vmovl_high_s8(lo));
                for t in 0..T {
                    let s = &mut sums[t];
                    s[2 * p] = unsafe { mlal(s[2 * p], lo0, x[t]) };
                    s[2 * p + 1] = unsafe { mlal(s[2 * p + 1], lo1, x[t]) };
                }
                if F::NIBBLES {
                    let (hi0, hi1) = (vmovl_s8(vget_low_s8(hi)), vmovl_high_s8(hi));
                    for t in 0..T {
                        let s = &mut sums[t];
                        s[2 * p] = unsafe { mlal(s[2 * p], hi0, x_high[t]) };
                        s[2 * p + 1] = unsafe { mlal(s[2 * p + 1], hi1, x_high[t]) };
                    }
                }
            }
        }
        let d = unsafe { load_scales::<F>(input.scales, b) };
        let mv = input.mins.map(|s| unsafe { load_scales::<F>(s, b) });
        for t in 0..T {
            let s = &sums[t];
            let totals: [int32x4_t; 4] = std::array::from_fn(|i| {
                vpaddq_s32(
                    vpaddq_s32(s[4 * i], s[4 * i + 1]),
                    vpaddq_s32(s[4 * i + 2], s[4 * i + 3]),
                )
            });
            unsafe {
                apply_scales(
                    &mut acc[t],
                    totals,
                    &d,
                    mv.as_ref(),
                    *input.xs[t].add(b),
                    *input.xsum[t].add(b),
                )
            };
        }
    }
    let valid = GROUP.min(m.rows - g * GROUP);
    for t in 0..T {
        // SAFETY: token `t0 + t` and row group `g` of the output, `valid` columns.
        unsafe { store(out.at(t0 + t, g), &acc[t], valid) };
    }
}

/// `acc + w * x` lane by lane over 8 16-bit values, into 4 lanes of 32-bit sums.
#[inline(always)]
unsafe fn mlal(acc: int32x4_t, w: int16x8_t, x: int16x8_t) -> int32x4_t {
    // SAFETY: register arithmetic of base Advanced SIMD.
    unsafe { vmlal_high_s16(vmlal_s16(acc, vget_low_s16(w), vget_low_s16(x)), w, x) }
}

/// [`quantize_blocks`](super::activations::quantize_blocks) for NEON, block by block
/// (across-vector maxima and sums are single instructions here), and, when `hl` is not
/// empty, each 8 values' high and low bytes for the 8-bit dot products. Values, scales
/// and rounding (to nearest even, `fcvtns`) are the scalar form's; only the sums add in
/// another order.
///
/// # Safety
/// The CPU has Advanced SIMD (every aarch64 CPU).
#[target_feature(enable = "neon")]
pub(super) unsafe fn quantize(
    x: &[f32],
    q: &mut [i16],
    scale: &mut [f32],
    sum: &mut [f32],
    hl: &mut [i8],
    block: usize,
) {
    let blocks = x.len() / block;
    assert!(
        block.is_multiple_of(8)
            && x.len().is_multiple_of(block)
            && q.len() >= x.len()
            && scale.len() >= blocks
            && sum.len() >= blocks
            && (hl.is_empty() || hl.len() >= 2 * x.len())
    );
    for i in 0..blocks {
        let base = i * block;
        // SAFETY (all loads and stores): `base + block <= x.len() <= q.len()`, and the
        // split bytes of these values are `2 base..2 (base + block)` of `hl` (assert).
        unsafe {
            let p = x.as_ptr().add(base);
            let (mut m, mut s) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
            for v in 0..block / 4 {
                let xv = vld1q_f32(p.add(4 * v));
                m = vmaxq_f32(m, vabsq_f32(xv));
                s = vaddq_f32(s, xv);
            }
            let sc = vmaxvq_f32(m) / QMAX;
            let inv = if sc > 0.0 { 1.0 / sc } else { 0.0 };
            scale[i] = sc;
            sum[i] = vaddvq_f32(s);
            for v in 0..block / 8 {
                let at = base + 8 * v;
                let r0 = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x.as_ptr().add(at)), inv));
                let r1 = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x.as_ptr().add(at + 4)), inv));
                let q16 = vcombine_s16(vqmovn_s32(r0), vqmovn_s32(r1));
                vst1q_s16(q.as_mut_ptr().add(at), q16);
                if !hl.is_empty() {
                    let high = vshrq_n_s16::<8>(vaddq_s16(q16, vdupq_n_s16(128)));
                    let low = vsubq_s16(q16, vshlq_n_s16::<8>(high));
                    vst1q_s8(
                        hl.as_mut_ptr().add(2 * at),
                        vcombine_s8(vmovn_s16(high), vmovn_s16(low)),
                    );
                }
            }
        }
    }
}
