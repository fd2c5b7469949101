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
}
