//! Float helpers shared by the hand-written CPU kernels, written so that they vectorise
//! once inlined into a kernel compiled for AVX-512 (or any other target).

/// `map` of each value of `s`, folded by `f` in 16 lanes, then the lanes folded pairwise,
/// then the values past the last whole 16 in order. Vectorises, where one running value
/// would be a serial chain (floating-point addition is not reassociated by the compiler).
#[inline(always)]
pub(crate) fn fold16(
    s: &[f32],
    init: f32,
    map: impl Fn(f32) -> f32 + Copy,
    f: impl Fn(f32, f32) -> f32 + Copy,
) -> f32 {
    let mut lanes = [init; 16];
    let chunks = s.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            lanes[i] = f(lanes[i], map(c[i]));
        }
    }
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            lanes[i] = f(lanes[i], lanes[i + w]);
        }
    }
    rest.iter().fold(lanes[0], |a, &b| f(a, map(b)))
}

/// The largest value of `s` (NaN ignored; -inf when empty). `fold16` with `f32::max`
/// keeps IEEE maxNum's NaN rule, which compiles to compares and blends on 128-bit lanes;
/// a plain comparison is one `vmaxps` per 16 values.
#[inline(always)]
pub(crate) fn max(s: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = s.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(rest) {
        if v > m {
            m = v;
        }
    }
    m
}

/// Whether any value of `s` is at least `t` (a whole chunk compared at once, no early
/// exit: for skipping chunks of 64 or so that cannot matter).
#[inline(always)]
pub(crate) fn any_at_least(s: &[f32], t: f32) -> bool {
    let mut hit = false;
    for &v in s {
        hit |= v >= t;
    }
    hit
}

/// `e^x` for the softmax (x <= 0 after subtracting the maximum), in plain arithmetic so
/// that it vectorises where `f32::exp` is a libm call per value: `x = n ln2 + r` with
/// `|r| <= ln2 / 2` (ln2 split in two for exactness), `e^r` by its Taylor series to r^7
/// (relative error < 2e-8 on that interval), times `2^n` built in the exponent bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + MAGIC;
    let n = shifted - MAGIC;
    // The same integer read from the mantissa bits, where `n as i32` (a saturating
    // conversion) would keep the loop from vectorising: |n| <= 126 < 2^22.
    let n_int = shifted.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// Each row of `scores` (rows of `n`) becomes its softmax: attention's scores, MoE
/// routers' logits.
#[inline(always)]
pub(crate) fn softmax_rows(scores: &mut [f32], n: usize) {
    for s in scores.chunks_exact_mut(n) {
        let max = fold16(s, f32::NEG_INFINITY, |v| v, f32::max);
        for v in s.iter_mut() {
            *v = exp(*v - max);
        }
        let inv = 1.0 / fold16(s, 0.0, |v| v, |a, b| a + b);
        for v in s.iter_mut() {
            *v *= inv;
        }
    }
}

/// Reductions across 512-bit registers.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// A lane-wise operation to fold with.
    pub(crate) trait LaneOp {
        /// # Safety
        /// The CPU has AVX-512F.
        unsafe fn apply(a: __m512, b: __m512) -> __m512;
    }

    pub(crate) struct Add;
    pub(crate) struct Max;

    impl LaneOp for Add {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn apply(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
    }

    impl LaneOp for Max {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn apply(a: __m512, b: __m512) -> __m512 {
            _mm512_max_ps(a, b)
        }
    }

    /// Lane `i` of the result is the fold of the 16 lanes of `v[i]`: pairs of registers
    /// are interleaved and folded level by level (45 instructions for 16 folds, where 16
    /// separate horizontal folds would take over 100).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn fold_each16<O: LaneOp>(v: &[__m512; 16]) -> __m512 {
        // SAFETY (every `apply`): this function has AVX-512F.
        // Per 128-bit lane: [a0.a2, b0.b2, a1.a3, b1.b3] for each pair (a, b).
        let mut t = [_mm512_setzero_ps(); 8];
        for p in 0..8 {
            let (a, b) = (v[2 * p], v[2 * p + 1]);
            t[p] = unsafe { O::apply(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)) };
        }
        // Per 128-bit lane L: the lane-L folds of four registers.
        let mut u = [_mm512_setzero_ps(); 4];
        for p in 0..4 {
            let (x, y) = (t[2 * p], t[2 * p + 1]);
            u[p] = unsafe { O::apply(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xEE>(x, y)) };
        }
        // Fold the four 128-bit lanes: first pairwise within two registers, then across.
        let (x01, x23) = (fold_lanes::<O>(u[0], u[1]), fold_lanes::<O>(u[2], u[3]));
        fold_lanes::<O>(x01, x23)
    }

    /// 128-bit lanes `[x0.x1, x2.x3, y0.y1, y2.y3]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fold_lanes<O: LaneOp>(x: __m512, y: __m512) -> __m512 {
        // SAFETY: this function has AVX-512F.
        unsafe {
            O::apply(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
            )
        }
    }
}

/// Reductions across 256-bit registers.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// A lane-wise operation to fold with.
    pub(crate) trait LaneOp {
        /// # Safety
        /// The CPU has AVX.
        unsafe fn apply(a: __m256, b: __m256) -> __m256;
    }

    pub(crate) struct Add;
    pub(crate) struct Max;

    impl LaneOp for Add {
        #[inline]
        #[target_feature(enable = "avx")]
        unsafe fn apply(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
    }

    impl LaneOp for Max {
        #[inline]
        #[target_feature(enable = "avx")]
        unsafe fn apply(a: __m256, b: __m256) -> __m256 {
            _mm256_max_ps(a, b)
        }
    }

    /// Lane `i` of the result is the fold of the 8 lanes of `v[i]` (the AVX2 form of
    /// [`avx512::fold_each16`](super::avx512::fold_each16)): pairs interleaved and folded,
    /// then the two 128-bit halves.
    #[inline]
    #[target_feature(enable = "avx")]
    pub(crate) fn fold_each8<O: LaneOp>(v: &[__m256; 8]) -> __m256 {
        // SAFETY (every `apply`): this function has AVX.
        // Per 128-bit lane: [a0.a2, b0.b2, a1.a3, b1.b3] for each pair (a, b).
        let mut t = [_mm256_setzero_ps(); 4];
        for p in 0..4 {
            let (a, b) = (v[2 * p], v[2 * p + 1]);
            t[p] = unsafe { O::apply(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b)) };
        }
        // Per 128-bit lane: the lane's folds of four registers.
        let mut u = [_mm256_setzero_ps(); 2];
        for p in 0..2 {
            let (x, y) = (t[2 * p], t[2 * p + 1]);
            u[p] = unsafe { O::apply(_mm256_shuffle_ps::<0x44>(x, y), _mm256_shuffle_ps::<0xEE>(x, y)) };
        }
        // Low halves: registers 0-3 (from u[0]), high halves: 4-7 (from u[1]).
        unsafe {
            O::apply(
                _mm256_permute2f128_ps::<0x20>(u[0], u[1]),
                _mm256_permute2f128_ps::<0x31>(u[0], u[1]),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let (got, want) = (exp(x), x.exp());
            assert!((got - want).abs() <= 4e-7 * want, "exp({x}) = {got}, libm {want}");
        }
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
    }

    /// Sums, maxima and sums of squares over lengths below, at and past whole 16s match
    /// the plain folds (exactly for max, to rounding for the sums).
    #[test]
    fn fold16_matches_plain_folds() {
        for n in [0usize, 5, 16, 32, 37, 576] {
            let s: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32 / 10.0 - 5.0).collect();
            let sum: f32 = s.iter().sum();
            let squares: f32 = s.iter().map(|v| v * v).sum();
            let max = s.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((fold16(&s, 0.0, |v| v, |a, b| a + b) - sum).abs() <= 1e-4 * (1.0 + sum.abs()));
            assert!((fold16(&s, 0.0, |v| v * v, |a, b| a + b) - squares).abs() <= 1e-5 * (1.0 + squares));
            assert_eq!(fold16(&s, 0.0, f32::abs, f32::max), max);
        }
    }

    /// The maximum and the threshold test agree with plain folds, NaN ignored, over
    /// lengths below, at and past whole 16s.
    #[test]
    fn max_and_threshold_match_plain_folds() {
        for n in [0usize, 1, 15, 16, 17, 64, 100] {
            let mut s: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32 / 10.0 - 5.0).collect();
            if n > 3 {
                s[3] = f32::NAN;
            }
            let want = s
                .iter()
                .copied()
                .filter(|v| !v.is_nan())
                .fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&s), want, "n = {n}");
            for t in [-6.0, 0.0, want, want + 0.1] {
                assert_eq!(any_at_least(&s, t), s.iter().any(|&v| v >= t), "n = {n}, t = {t}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fold_each8_folds_each_register() {
        use std::arch::x86_64::*;
        if !is_x86_feature_detected!("avx") {
            return;
        }
        let vals: Vec<[f32; 8]> = (0..8)
            .map(|r| std::array::from_fn(|l| ((r * 31 + l * 17) % 23) as f32 - 11.0 + r as f32 * 0.25))
            .collect();
        // SAFETY: the CPU has AVX (checked above).
        let (sums, maxes) = unsafe {
            let regs: [__m256; 8] = std::array::from_fn(|r| _mm256_loadu_ps(vals[r].as_ptr()));
            let (mut s, mut m) = ([0f32; 8], [0f32; 8]);
            _mm256_storeu_ps(s.as_mut_ptr(), avx2::fold_each8::<avx2::Add>(&regs));
            _mm256_storeu_ps(m.as_mut_ptr(), avx2::fold_each8::<avx2::Max>(&regs));
            (s, m)
        };
        for r in 0..8 {
            let sum: f32 = vals[r].iter().sum();
            assert!((sums[r] - sum).abs() <= 1e-4 * (1.0 + sum.abs()), "register {r}");
            assert_eq!(
                maxes[r],
                vals[r].iter().copied().fold(f32::MIN, f32::max),
                "register {r}"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fold_each16_folds_each_register() {
        use std::arch::x86_64::*;
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let vals: Vec<[f32; 16]> = (0..16)
            .map(|r| std::array::from_fn(|l| ((r * 31 + l * 17) % 23) as f32 - 11.0 + r as f32 * 0.25))
            .collect();
        // SAFETY: the CPU has AVX-512F (checked above).
        let (sums, maxes) = unsafe {
            let regs: [__m512; 16] = std::array::from_fn(|r| _mm512_loadu_ps(vals[r].as_ptr()));
            let (mut s, mut m) = ([0f32; 16], [0f32; 16]);
            _mm512_storeu_ps(s.as_mut_ptr(), avx512::fold_each16::<avx512::Add>(&regs));
            _mm512_storeu_ps(m.as_mut_ptr(), avx512::fold_each16::<avx512::Max>(&regs));
            (s, m)
        };
        for r in 0..16 {
            let sum: f32 = vals[r].iter().sum();
            assert!((sums[r] - sum).abs() <= 1e-4 * (1.0 + sum.abs()), "register {r}");
            assert_eq!(
                maxes[r],
                vals[r].iter().copied().fold(f32::MIN, f32::max),
                "register {r}"
            );
        }
    }
}
