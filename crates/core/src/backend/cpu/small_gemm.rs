//! Dense f32 matmuls with few weight rows (MoE routers' gates, shared experts' gates):
//! plain dot products, four rows at a time in the kernel set's vectors. candle's matmul
//! is a thread-pool GEMM whose setup cost dominates at a decode step's few tokens.

use super::isa::Isa;
use super::simd::F32x;

/// `x W^T` for a [`Matrix::SmallF32`](crate::backend::Matrix::SmallF32) weight: `x` is `[tokens, hidden]`, `w`
/// `[experts, hidden]` (named for the MoE router's gate, the main user), both f32; the
/// result is `[tokens, experts]`. Dot products vectorised for the CPU at hand; tokens split
/// over the pool only when there are many (a prompt).
pub(crate) fn matmul(isa: Isa, x: &[f32], w: &[f32], hidden: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let experts = w.len() / hidden;
    let mut out = vec![0f32; x.len() / hidden * experts];
    let rows = |(x, out): (&[f32], &mut [f32])| match isa.runnable() {
        // SAFETY (each): the model's kernel set is one the CPU runs.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { rows_avx512(x, w, hidden, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { rows_avx2(x, w, hidden, out) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { rows_neon(x, w, hidden, out) },
        _ => small_matmul_rows(x, w, hidden, out),
    };
    // About 2 M multiply-adds per task (64 tokens of a 32x1024 gate).
    let per_task = (1usize << 21).div_ceil(w.len()).max(1);
    if x.len() / hidden > per_task {
        x.par_chunks(per_task * hidden)
            .zip(out.par_chunks_mut(per_task * experts))
            .for_each(rows);
    } else {
        rows((x, &mut out));
    }
    out
}

/// Plain dot products, 16 lanes so that they vectorise.
#[inline(always)]
fn small_matmul_rows(x: &[f32], w: &[f32], hidden: usize, out: &mut [f32]) {
    let experts = w.len() / hidden;
    for (xr, or) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(experts.max(1))) {
        for (wr, o) in w.chunks_exact(hidden).zip(or.iter_mut()) {
            let mut lanes = [0f32; 16];
            let (xc, wc) = (xr.chunks_exact(16), wr.chunks_exact(16));
            let tail: f32 = xc
                .remainder()
                .iter()
                .zip(wc.remainder())
                .map(|(a, b)| a * b)
                .sum();
            for (a, b) in xc.zip(wc) {
                for i in 0..16 {
                    lanes[i] += a[i] * b[i];
                }
            }
            *o = lanes.iter().sum::<f32>() + tail;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn rows_avx512(x: &[f32], w: &[f32], hidden: usize, out: &mut [f32]) {
    // SAFETY: forwarded.
    unsafe { rows_simd::<super::simd::Avx512>(x, w, hidden, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2(x: &[f32], w: &[f32], hidden: usize, out: &mut [f32]) {
    // SAFETY: forwarded.
    unsafe { rows_simd::<super::simd::Avx2>(x, w, hidden, out) }
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn rows_neon(x: &[f32], w: &[f32], hidden: usize, out: &mut [f32]) {
    // SAFETY: forwarded.
    unsafe { rows_simd::<super::simd::Neon>(x, w, hidden, out) }
}

/// [`small_matmul_rows`] in `S`'s vectors: four experts at a time, so that each vector of
/// the token's input is loaded once for four rows of the gate and the four running sums
/// are independent chains of fused multiply-adds.
///
/// # Safety
/// The CPU has `S`'s features.
#[inline(always)]
unsafe fn rows_simd<S: F32x>(x: &[f32], w: &[f32], hidden: usize, out: &mut [f32]) {
    let lanes = S::LANES;
    let experts = w.len() / hidden;
    let whole = hidden / lanes * lanes;
    assert!(x.len() / hidden * experts <= out.len() && w.len() == experts * hidden);
    for (xr, or) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(experts)) {
        let four = experts / 4 * 4;
        for e in (0..four).step_by(4) {
            // SAFETY (loads): `c + lanes <= whole <= hidden`, inside the token's row and
            // inside rows `e..e + 4` of the gate (`e + 4 <= experts`); the CPU has `S`'s
            // features (the caller's contract).
            unsafe {
                let mut acc = [S::zero(); 4];
                for c in (0..whole).step_by(lanes) {
                    let a = S::load(xr.as_ptr().add(c));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let b = S::load(w.as_ptr().add((e + r) * hidden + c));
                        *acc = S::fmadd(a, b, *acc);
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let wr = &w[(e + r) * hidden..(e + r + 1) * hidden];
                    let tail: f32 = xr[whole..].iter().zip(&wr[whole..]).map(|(a, b)| a * b).sum();
                    or[e + r] = S::reduce_add(*acc) + tail;
                }
            }
        }
        small_matmul_rows(xr, &w[four * hidden..], hidden, &mut or[four..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The small f32 matmul is `x W^T` within f32 rounding, for gate sizes with and
    /// without a partial 16-lane chunk and expert counts with and without a partial
    /// group of four, through the serial and the split-over-the-pool forms.
    #[test]
    fn small_f32_matmul_matches_a_plain_one() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(7);
        for (tokens, experts, hidden) in [(1, 32, 1024), (3, 7, 40), (5, 60, 33), (300, 8, 2048)] {
            let x: Vec<f32> = (0..tokens * hidden)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let w: Vec<f32> = (0..experts * hidden)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            // Every kernel set this CPU runs, and the plain loops.
            let mut plain = vec![0f32; tokens * experts];
            small_matmul_rows(&x, &w, hidden, &mut plain);
            let sets = Isa::available()
                .into_iter()
                .map(|isa| matmul(isa, &x, &w, hidden));
            for got in sets.chain([plain]) {
                assert_eq!(got.len(), tokens * experts);
                for t in 0..tokens {
                    for e in 0..experts {
                        let want: f64 = (0..hidden)
                            .map(|k| x[t * hidden + k] as f64 * w[e * hidden + k] as f64)
                            .sum();
                        let g = got[t * experts + e] as f64;
                        assert!(
                            (g - want).abs() < 1e-4 * (hidden as f64).sqrt(),
                            "{tokens}x{experts}x{hidden} [{t},{e}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
