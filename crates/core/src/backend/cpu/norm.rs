//! RMS norm over rows, with and without a residual add fused in: one pass per row, the
//! outputs written without zeroing. Hand-written because candle's `rms_norm` is a separate
//! pass per op (and the residual add another), and the q/k norms of attention run on
//! small rows where its per-call overhead dominates.

use std::mem::MaybeUninit;

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::host::{assume_init_mut, filled_vec, with_f32};
use super::isa::Isa;
use super::vmath::fold16;
use crate::error::{Error, Result};

/// Each row of `x` (its last dimension) normed with `weight`, in f32 for f32 input, else
/// through candle's `rms_norm` in f32 and back.
pub(crate) fn rms_norm(isa: Isa, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    if x.dtype() != DType::F32 {
        let y = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?.contiguous()?, weight, eps)?;
        return Ok(y.to_dtype(x.dtype())?);
    }
    let normed = with_f32(weight, |w| with_f32(x, |v| norm_rows(isa, v, w, eps)))???;
    Ok(Tensor::from_vec(normed, x.shape(), x.device())?)
}

/// `(x + residual, rms_norm(x + residual))` by the row kernel for f32 rows of equal shape,
/// else by candle's ops.
pub(crate) fn add_rms_norm(
    isa: Isa,
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    if x.dtype() != DType::F32
        || residual.dtype() != DType::F32
        || x.rank() != 2
        || x.dims() != residual.dims()
    {
        let sum = (x + residual)?;
        let normed = rms_norm(isa, &sum, weight, eps)?;
        return Ok((sum, normed));
    }
    let (t, d) = x.dims2()?;
    let min_rows = min_rows_per_task(t * d, d);
    // Both outputs are written in full, row by row, so neither is zeroed first.
    let mut normed: Vec<f32> = Vec::with_capacity(t * d);
    if weight.dim(0)? != d {
        return Err(Error::InvalidBatch(format!(
            "a norm of {} values over rows of {d}",
            weight.dim(0)?
        )));
    }
    let rows = &mut normed.spare_capacity_mut()[..t * d];
    let sum = with_f32(weight, |w| {
        with_f32(x, |x| {
            with_f32(residual, |r| {
                // SAFETY: every row of `sum` is written by `norm_row`.
                unsafe {
                    filled_vec(t * d, |sum| {
                        rows.par_chunks_mut(d)
                            .zip(sum.par_chunks_mut(d))
                            .with_min_len(min_rows)
                            .enumerate()
                            .for_each(|(i, (n, s))| {
                                norm_row(isa, &x[i * d..][..d], Some((&r[i * d..][..d], s)), w, eps, n)
                            })
                    })
                }
            })
        })
    })???;
    // SAFETY: every row of `normed` was written by `norm_row` above (the closure returned
    // normally, so every row ran).
    unsafe { normed.set_len(t * d) };
    let dev = x.device();
    Ok((
        Tensor::from_vec(sum, (t, d), dev)?,
        Tensor::from_vec(normed, (t, d), dev)?,
    ))
}

/// Each `w.len()`-wide row of `x` normed.
fn norm_rows(isa: Isa, x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>> {
    let d = w.len();
    if d == 0 || !x.len().is_multiple_of(d) {
        return Err(Error::InvalidBatch(format!(
            "{} values are not rows of {d}",
            x.len()
        )));
    }
    // SAFETY: every row of the output is written by `norm_row`.
    Ok(unsafe {
        filled_vec(x.len(), |out| {
            out.par_chunks_mut(d)
                .zip(x.par_chunks(d))
                .with_min_len(min_rows_per_task(x.len(), d))
                .for_each(|(o, xr)| norm_row(isa, xr, None, w, eps, o))
        })
    })
}

/// Rows per task when `len` values in rows of `d` are normed: all of them on the calling
/// thread below 2^16 values (a decode step's few rows take microseconds, less than
/// handing them out would), else tasks of about 2^13 values.
fn min_rows_per_task(len: usize, d: usize) -> usize {
    if len >= 1 << 16 {
        (1usize << 13).div_ceil(d)
    } else {
        len / d.max(1) + 1
    }
}

/// A residual row to add, and the row the sum is written to.
type Residual<'a> = (&'a [f32], &'a mut [MaybeUninit<f32>]);

/// One row: `s = x (+ residual)`, `normed = s / rms(s) * weight`, compiled for the
/// kernel set (the plain loops vectorise 16, 8 or 4 lanes wide; NEON is the baseline of
/// every aarch64 build).
fn norm_row(
    isa: Isa,
    x: &[f32],
    residual: Option<Residual>,
    w: &[f32],
    eps: f32,
    normed: &mut [MaybeUninit<f32>],
) {
    match isa.runnable() {
        // SAFETY (both): the model's kernel set is one the CPU runs.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { norm_row_avx512(x, residual, w, eps, normed) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { norm_row_avx2(x, residual, w, eps, normed) },
        _ => norm_row_impl(x, residual, w, eps, normed),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn norm_row_avx2(
    x: &[f32],
    residual: Option<Residual>,
    w: &[f32],
    eps: f32,
    normed: &mut [MaybeUninit<f32>],
) {
    norm_row_impl(x, residual, w, eps, normed)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn norm_row_avx512(
    x: &[f32],
    residual: Option<Residual>,
    w: &[f32],
    eps: f32,
    normed: &mut [MaybeUninit<f32>],
) {
    norm_row_impl(x, residual, w, eps, normed)
}

#[inline(always)]
fn norm_row_impl(
    x: &[f32],
    residual: Option<Residual>,
    w: &[f32],
    eps: f32,
    normed: &mut [MaybeUninit<f32>],
) {
    assert!(
        normed.len() == x.len()
            && residual
                .as_ref()
                .is_none_or(|(r, sum)| r.len() == x.len() && sum.len() == x.len())
    );
    // `normed` first holds the sum, written in full (as is the `sum` output).
    match residual {
        Some((r, sum)) => {
            for (((o, s), a), b) in normed.iter_mut().zip(sum.iter_mut()).zip(x).zip(r) {
                o.write(*s.write(a + b));
            }
        }
        None => {
            for (o, a) in normed.iter_mut().zip(x) {
                o.write(*a);
            }
        }
    }
    // SAFETY: every element of `normed` was written just above (equal lengths, assert).
    let normed = unsafe { assume_init_mut(normed) };
    let squares = fold16(normed, 0.0, |v| v * v, |a, b| a + b);
    let inv = 1.0 / (squares / x.len() as f32 + eps).sqrt();
    for (o, w) in normed.iter_mut().zip(w) {
        *o = *o * inv * w;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The row kernel (with and without the residual add) agrees with candle's rms_norm
    /// on few rows (serial) and many (parallel), and with a width that is not a multiple
    /// of 16; so do the fallbacks for bf16 input.
    #[test]
    fn row_kernel_matches_candle() {
        let dev = Device::Cpu;
        // The last two split rows over the pool (t * d >= 2^16); the others run serially.
        // (70 x 1000 is also 70 heads of one token, for the q/k norms.)
        for (t, d) in [(1usize, 576usize), (3, 37), (20, 64), (120, 576), (70, 1000)] {
            let weight = Tensor::randn(1f32, 0.2, d, &dev).unwrap();
            let x = Tensor::randn(0f32, 2.0, (t, d), &dev).unwrap();
            let r = Tensor::randn(0f32, 2.0, (t, d), &dev).unwrap();
            let close = |a: &Tensor, b: &Tensor, tol: f32| {
                let (a, b) = (
                    a.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
                    b.to_vec2::<f32>().unwrap(),
                );
                for (a, b) in a.iter().flatten().zip(b.iter().flatten()) {
                    assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{a} vs {b}");
                }
            };
            // Every kernel set this CPU runs.
            for isa in Isa::available() {
                let want = candle_nn::ops::rms_norm(&x, &weight, 1e-5).unwrap();
                close(&rms_norm(isa, &x, &weight, 1e-5).unwrap(), &want, 1e-5);
                let (s, n) = add_rms_norm(isa, &x, &r, &weight, 1e-5).unwrap();
                let want_s = (&x + &r).unwrap();
                close(&s, &want_s, 1e-5);
                close(
                    &n,
                    &candle_nn::ops::rms_norm(&want_s, &weight, 1e-5).unwrap(),
                    1e-5,
                );
                let xb = x.to_dtype(DType::BF16).unwrap();
                close(&rms_norm(isa, &xb, &weight, 1e-5).unwrap(), &want, 2e-2);
            }
        }
    }
}
